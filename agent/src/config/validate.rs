//! Raw config -> [`Plan`]: every rule that serde cannot express, each with its location.

use super::diag::{closest, Diagnostic, Diagnostics, Source};
use super::raw;
use super::*;
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, HashMap, HashSet};
use toml::Spanned;

mod mqtt;

/// Parses one file into its raw type; a syntax or type error becomes one located diagnostic.
pub(super) fn parse<T: DeserializeOwned>(src: &Source) -> Result<T, Diagnostic> {
    let de = toml::Deserializer::parse(src.text).map_err(|e| toml_error(src, &e, String::new()))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string().replace(".$__serde_spanned_private_value", "");
        toml_error(src, e.inner(), if path == "." { String::new() } else { path })
    })
}

fn toml_error(src: &Source, e: &toml::de::Error, key: String) -> Diagnostic {
    let span = e.span().unwrap_or(0..0);
    let message = e.message().trim().to_string();
    let mut d = src.at(span, key, message.clone());
    // serde's messages: "unknown field `pol_interval`, expected one of `a`, `b`" and
    // "unknown variant `x`, expected ...": suggest the nearest expected name.
    for prefix in ["unknown field `", "unknown variant `"] {
        if let Some(rest) = message.strip_prefix(prefix) {
            let word = rest.split('`').next().unwrap_or_default();
            let expected: Vec<&str> = rest.split('`').skip(2).step_by(2).collect();
            if prefix.starts_with("unknown field") {
                d.message = format!("unknown key `{word}`");
            }
            d.help = Some(match closest(word, expected.iter().copied()) {
                Some(best) => format!("did you mean `{best}`?"),
                None => format!("expected one of: {}", expected.join(", ")),
            });
            if word == "password" {
                d.message = "inline secret: `password` is not allowed in config".into();
                d.help = Some("put the password in a file (password_file) or the environment (password_env)".into());
            }
        }
    }
    d
}

struct Ctx<'a> {
    src: Source<'a>,
    problems: &'a mut Vec<Diagnostic>,
}

impl Ctx<'_> {
    fn err<T>(&mut self, v: &Spanned<T>, key: impl Into<String>, msg: impl Into<String>) -> &mut Diagnostic {
        let d = self.src.at(v.span(), key, msg);
        self.problems.push(d);
        self.problems.last_mut().expect("just pushed")
    }

    fn whole(&mut self, key: impl Into<String>, msg: impl Into<String>) {
        let d = self.src.whole_file(key, msg);
        self.problems.push(d);
    }

    /// Parses a spanned string against a fixed vocabulary, suggesting the nearest word.
    fn choice<T: Copy>(&mut self, v: &Spanned<String>, key: &str, options: &[(&str, T)]) -> Option<T> {
        if let Some((_, t)) = options.iter().find(|(name, _)| *name == v.get_ref().as_str()) {
            return Some(*t);
        }
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        let help = match closest(v.get_ref(), names.iter().copied()) {
            Some(best) => format!("did you mean `{best}`?"),
            None => format!("expected one of: {}", names.join(", ")),
        };
        self.err(v, key, format!("invalid value `{}`", v.get_ref())).help = Some(help);
        None
    }

    fn range<T: PartialOrd + Copy + std::fmt::Display>(
        &mut self,
        v: &Spanned<T>,
        key: &str,
        lo: T,
        hi: T,
    ) -> Option<T> {
        let x = *v.get_ref();
        if x < lo || x > hi {
            self.err(v, key, format!("{x} is out of range: allowed {lo}..={hi}"));
            None
        } else {
            Some(x)
        }
    }

    fn name(&mut self, v: &Spanned<String>, key: &str, allow_dot: bool) {
        let s = v.get_ref();
        let bad = s.is_empty()
            || s.chars()
                .any(|c| c.is_whitespace() || matches!(c, '/' | '+' | '#' | '{' | '}'))
            || (!allow_dot && s.contains('.'));
        if bad {
            self.err(
                v,
                key,
                format!(
                    "`{s}` is not a valid name: it must be non-empty, without spaces, `/`, `+`, `#`, braces{}",
                    if allow_dot { "" } else { " or `.`" }
                ),
            );
        }
    }
}

fn secs(d: &Spanned<units::ConfigDuration>) -> Spanned<f64> {
    Spanned::new(d.span(), d.get_ref().0.as_secs_f64())
}

pub(super) fn validate(
    gateway: &(PathBuf, String),
    governance: Option<&(PathBuf, String)>,
    products: &[(PathBuf, String)],
    data_dir: Option<&Path>,
) -> Result<Plan, Diagnostics> {
    let mut problems = Vec::new();
    let mut files = vec![gateway.0.clone()];
    let mut hash_input: Vec<&[u8]> = vec![gateway.1.as_bytes()];

    // Governance first: every product is checked against it.
    let mut rules = Rules {
        plan: GovernancePlan::default(),
        template: DEFAULT_TOPIC_TEMPLATE.to_string(),
        required: Vec::new(),
        domains: Vec::new(),
        file: "governance.toml (defaults)".into(),
    };
    if let Some((path, text)) = governance {
        files.push(path.clone());
        hash_input.push(text.as_bytes());
        let src = Source { path, text };
        match parse::<raw::Governance>(&src) {
            Err(d) => problems.push(d),
            Ok(g) => {
                let mut cx = Ctx {
                    src,
                    problems: &mut problems,
                };
                rules = governance_rules(&mut cx, g);
            }
        }
    }

    let src = Source {
        path: &gateway.0,
        text: &gateway.1,
    };
    let gw = match parse::<raw::Gateway>(&src) {
        Ok(gw) => Some(gw),
        Err(d) => {
            problems.push(d);
            None
        }
    };
    let mut cx = Ctx {
        src,
        problems: &mut problems,
    };
    let mut built = gw.map(|gw| gateway_plan(&mut cx, gw, &rules));
    if let Some((_, _, _, devices, tags, declared, templates)) = built.as_mut() {
        tags_from_products(products, devices, tags, declared, templates);
    }
    if let (Some(dir), Some(parts)) = (data_dir, built.as_mut()) {
        parts.0.data_dir = dir.to_path_buf();
    }

    let mut plan_products = Vec::new();
    if let Some((agent, _, buffer, devices, tags, declared, _)) = &built {
        let by_ref: HashMap<String, usize> = tags
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("{}.{}", devices[t.device].id, t.name), i))
            .collect();
        let mut seen_ids: HashMap<(String, String), PathBuf> = HashMap::new();
        let published = crate::contract::load(&crate::contract::dir(&agent.data_dir));
        for (path, text) in products {
            files.push(path.clone());
            hash_input.push(text.as_bytes());
            let src = Source { path, text };
            let raw = match parse::<raw::Product>(&src) {
                Ok(p) => p,
                Err(d) => {
                    problems.push(d);
                    continue;
                }
            };
            let mut cx = Ctx {
                src,
                problems: &mut problems,
            };
            // One product may be defined twice only with different major versions (a migration
            // window: the old major keeps publishing on its own topic beside the new one).
            let major = raw.version.get_ref().split('.').next().unwrap_or("").to_string();
            let seen = (raw.id.get_ref().clone(), major.clone());
            if let Some(first) = seen_ids.get(&seen) {
                let msg = format!(
                    "duplicate product `{}` major version {major}: also defined in {}",
                    raw.id.get_ref(),
                    first.display()
                );
                cx.err(&raw.id, "id", msg).help =
                    Some("two files may define one product only with different major versions".into());
                continue;
            }
            seen_ids.insert(seen, path.clone());
            let version_at = raw.version.clone();
            if let Some(p) = product_plan(
                &mut cx,
                raw,
                agent,
                buffer,
                &TagIndex {
                    tags,
                    by_ref: &by_ref,
                    declared,
                },
                &rules,
            ) {
                if let Some(stored) = published.get(&p.key) {
                    if let Some((message, help)) = crate::contract::check(&p, stored) {
                        cx.err(&version_at, "version", message).help = Some(help);
                        continue;
                    }
                }
                plan_products.push(p);
            }
        }
    }

    if !problems.is_empty() {
        return Err(Diagnostics(problems));
    }
    let (agent, upstream, buffer, devices, tags, _, _) = built.expect("no problems means the gateway parsed");
    for p in &mut plan_products {
        if p.service_levels.expected_interval.is_zero() {
            // Every sample or on change: at best one record per poll of the fastest device.
            p.service_levels.expected_interval = p
                .fields
                .iter()
                .filter_map(|f| f.source.tag())
                .map(|tag| {
                    let d = &devices[tags[tag].device];
                    d.opcua
                        .as_ref()
                        .filter(|o| !o.polling)
                        .map_or(d.poll_interval, |o| o.publishing_interval)
                })
                .min()
                .unwrap_or(Duration::from_secs(1));
        }
    }
    Ok(Plan {
        agent,
        upstream,
        buffer,
        devices,
        tags: tags.into(),
        products: plan_products,
        governance: rules.plan,
        config_hash: format!("{:016x}", fnv1a64(&hash_input)),
        files,
    })
}

/// One shared copy of each distinct string (a product's units and classes): thousands of fields
/// then hold a pointer each rather than an allocation each.
#[derive(Default)]
struct Shared(HashMap<String, SharedStr>);

impl Shared {
    fn get(&mut self, s: &str) -> SharedStr {
        if let Some(a) = self.0.get(s) {
            return a.clone();
        }
        let a = SharedStr::new(s.to_string());
        self.0.insert(s.to_string(), a.clone());
        a
    }
}

fn check_template(cx: &mut Ctx, t: &Spanned<String>) -> bool {
    const KNOWN: [&str; 6] = ["site", "area", "line", "domain", "product", "major"];
    let mut ok = true;
    let mut rest = t.get_ref().as_str();
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            cx.err(t, "topic_template", "unclosed `{` in topic template");
            return false;
        };
        let name = &rest[open + 1..open + close];
        if !KNOWN.contains(&name) {
            let help = closest(name, KNOWN).map_or_else(
                || format!("known: {}", KNOWN.join(", ")),
                |b| format!("did you mean `{{{b}}}`?"),
            );
            cx.err(t, "topic_template", format!("unknown placeholder `{{{name}}}`"))
                .help = Some(help);
            ok = false;
        }
        rest = &rest[open + close + 1..];
    }
    if !t.get_ref().contains("{product}") {
        cx.err(
            t,
            "topic_template",
            "the topic template must contain `{product}` so products do not share a topic",
        );
        ok = false;
    }
    ok
}

/// The gateway's tags as product files see them.
#[derive(Clone, Copy)]
struct TagIndex<'a> {
    tags: &'a [TagPlan],
    by_ref: &'a HashMap<String, usize>,
    /// Every tag written, valid or not.
    declared: &'a HashSet<String>,
}

type GatewayParts = (
    AgentPlan,
    Option<UpstreamPlan>,
    BufferPlan,
    Vec<DevicePlan>,
    Vec<TagPlan>,
    HashSet<String>,
    Vec<mqtt::Template>,
);

fn gateway_plan(cx: &mut Ctx, gw: raw::Gateway, rules: &Rules) -> GatewayParts {
    let a = &gw.agent;
    cx.name(&a.id, "agent.id", true);
    cx.name(&a.site, "agent.site", true);
    cx.name(&a.area, "agent.area", true);
    cx.name(&a.line, "agent.line", true);
    let base = cx.src.path.parent().map(Path::to_path_buf).unwrap_or_default();
    let data_dir = a
        .data_dir
        .as_deref()
        .map_or_else(|| PathBuf::from("/var/lib/plantmesh"), |d| base.join(d));
    let sli_interval = a.sli_interval.as_ref().map_or(Duration::from_secs(10), |v| {
        cx.range(&secs(v), "agent.sli_interval", 0.1, 3600.0);
        v.get_ref().0
    });
    let metrics_listen = match &a.metrics_listen {
        None => Some(std::net::SocketAddr::from(([127, 0, 0, 1], 9464))),
        Some(m) if m.get_ref() == "off" => None,
        Some(m) => match m.get_ref().parse::<std::net::SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                cx.err(m, "agent.metrics_listen", format!("`{}` is not ip:port", m.get_ref()))
                    .help = Some("e.g. \"127.0.0.1:9464\", or \"off\"".into());
                None
            }
        },
    };
    let agent = AgentPlan {
        id: a.id.get_ref().clone(),
        site: a.site.get_ref().clone(),
        area: a.area.get_ref().clone(),
        line: a.line.get_ref().clone(),
        data_dir,
        sli_interval,
        metrics_listen,
    };
    let encoding_at = gw.upstream.as_ref().and_then(|u| u.encoding.clone());
    let upstream = gw
        .upstream
        .and_then(|u| upstream_plan(cx, u, &agent.id, &agent.site, &base, "upstream"));
    // Sparkplug data goes to its own topic namespace: the egress allow-list must admit it.
    if let (Some(sp), Some(at)) = (upstream.as_ref().and_then(|u| u.sparkplug.as_ref()), &encoding_at) {
        let topic = crate::sparkplug::topic(&sp.group_id, crate::sparkplug::Kind::DData, &sp.edge_node_id, Some("x"));
        let prefixes = &rules.plan.allow_topic_prefixes;
        if !prefixes.is_empty() && !prefixes.iter().any(|p| topic.starts_with(p.as_str())) {
            let (ns, group) = (crate::sparkplug::NAMESPACE, &sp.group_id);
            cx.err(
                at,
                "upstream.encoding",
                format!(
                    "Sparkplug data goes to {ns}/{group}/..., which the governance egress allow-list does not allow"
                ),
            )
            .help = Some(format!(
                "add \"{ns}/{group}/\" to allow_topic_prefixes in {}",
                rules.file
            ));
        }
    }

    let max_bytes = match &gw.buffer.max_bytes {
        Some(v) => {
            let mib = Spanned::new(v.span(), v.get_ref().0);
            cx.range(&mib, "buffer.max_bytes", 1 << 20, 1 << 40).unwrap_or(1 << 20)
        }
        None => 256 << 20,
    };
    let commit_interval = match &gw.buffer.commit_interval {
        Some(v) => {
            cx.range(&secs(v), "buffer.commit_interval", 0.001, 10.0);
            v.get_ref().0
        }
        None => Duration::from_millis(200),
    };
    let buffer = BufferPlan {
        max_bytes,
        commit_interval,
    };

    let mut devices = Vec::new();
    let mut tags = Vec::new();
    let mut device_ids: HashMap<String, usize> = HashMap::new();
    // Every tag written, valid or not: a product pointing at an invalid tag is not a second error.
    let mut declared: HashSet<String> = HashSet::new();
    let mut templates = Vec::new();
    for (di, d) in gw.devices.into_iter().enumerate() {
        let key = format!("devices[{di}]");
        cx.name(&d.id, &format!("{key}.id"), false);
        if device_ids.insert(d.id.get_ref().clone(), di).is_some() {
            let msg = format!("duplicate device id `{}`", d.id.get_ref());
            cx.err(&d.id, format!("{key}.id"), msg);
        }
        let Some(protocol) = cx.choice(
            &d.protocol,
            &format!("{key}.protocol"),
            &[
                ("modbus_tcp", "modbus_tcp"),
                ("modbus_rtu", "modbus_rtu"),
                ("opcua", "opcua"),
                ("sensor_node", "sensor_node"),
                ("mqtt", "mqtt"),
            ],
        ) else {
            continue;
        };
        if protocol == "mqtt" {
            let serial_only = [
                ("port", d.port.as_ref().map(Spanned::span)),
                ("baud", d.baud.as_ref().map(Spanned::span)),
            ];
            not_for(cx, &serial_only, &key, "mqtt");
            let plan = mqtt::device(
                cx,
                &d,
                &key,
                di,
                &base,
                &agent.id,
                &mut tags,
                &mut declared,
                &mut templates,
            );
            devices.extend(plan);
            continue;
        }
        not_for(cx, &pick(&device_spans(&d), &["url"]), &key, protocol);
        for (ti, t) in d.tags.iter().enumerate() {
            let mqtt_only = [
                "topic",
                "payload",
                "pointer",
                "timestamp_pointer",
                "sparkplug",
                "metric",
            ];
            not_for(
                cx,
                &pick(&tag_spans(t), &mqtt_only),
                &format!("{key}.tags[{ti}]"),
                protocol,
            );
        }
        let serial_only = pick(
            &device_spans(&d),
            &["port", "baud", "parity", "stop_bits", "data_bits", "inter_frame"],
        );
        if protocol == "opcua" {
            not_for(cx, &serial_only, &key, "opcua");
            if let Some(plan) = opcua_device(cx, &d, &key, di, &base, &mut tags, &mut declared) {
                devices.push(plan);
            }
            continue;
        }
        if protocol == "sensor_node" {
            if let Some(plan) = sensor_device(cx, &d, &key, di, &mut tags, &mut declared) {
                devices.push(plan);
            }
            continue;
        }
        if let Some(s) = &d.stale_after {
            cx.err(
                s,
                format!("{key}.stale_after"),
                format!("`stale_after` does not apply to {protocol} devices"),
            );
        }
        let rtu = protocol == "modbus_rtu";
        let serial = if rtu {
            if let Some(a) = &d.address {
                cx.err(
                    a,
                    format!("{key}.address"),
                    "a modbus_rtu device has `port`, not `address`",
                )
                .help = Some("e.g. port = \"/dev/ttyUSB0\"".into());
            }
            match serial_line(cx, &d, &key, 19_200) {
                Some(s) => Some(s),
                None => continue,
            }
        } else {
            not_for(cx, &serial_only, &key, "modbus_tcp");
            None
        };
        let opcua_only = pick(
            &device_spans(&d),
            &[
                "endpoint",
                "security_policy",
                "security_mode",
                "identity",
                "publishing_interval",
                "mode",
                "timestamps",
                "password",
            ],
        );
        not_for(cx, &opcua_only, &key, protocol);
        let address = if let Some(s) = &serial {
            s.port.clone()
        } else if let Some(address_s) = &d.address {
            tcp_address(cx, address_s, &key)
        } else {
            cx.err(
                &d.protocol,
                format!("{key}.address"),
                "a modbus_tcp device needs `address` (host:port)",
            );
            continue;
        };
        let unit_id = d
            .unit_id
            .as_ref()
            .and_then(|u| cx.range(u, &format!("{key}.unit_id"), 0, 255))
            .unwrap_or(1) as u8;
        let poll_interval = d.poll_interval.as_ref().map_or(Duration::from_secs(1), |v| {
            cx.range(&secs(v), &format!("{key}.poll_interval"), 0.01, 86_400.0);
            v.get_ref().0
        });
        let timeout = d.timeout.as_ref().map_or(Duration::from_secs(1), |v| {
            cx.range(&secs(v), &format!("{key}.timeout"), 0.01, 60.0);
            v.get_ref().0
        });
        let max_gap = d
            .max_gap
            .as_ref()
            .and_then(|v| cx.range(v, &format!("{key}.max_gap"), 0, 124));
        let max_regs = d
            .max_registers_per_read
            .as_ref()
            .and_then(|v| cx.range(v, &format!("{key}.max_registers_per_read"), 1, 125))
            .unwrap_or(125) as u16;
        let max_bits = d
            .max_bits_per_read
            .as_ref()
            .and_then(|v| cx.range(v, &format!("{key}.max_bits_per_read"), 1, 2000))
            .unwrap_or(2000) as u16;
        let mut plan = DevicePlan {
            id: d.id.get_ref().clone(),
            address,
            poll_interval,
            timeout,
            max_gap_registers: max_gap.unwrap_or(8) as u16,
            max_gap_bits: max_gap.map_or(64, |g| g * 8) as u16,
            max_registers_per_read: max_regs,
            max_bits_per_read: max_bits,
            tags: Vec::new(),
            opcua: None,
            serial,
            sensor: None,
            mqtt: None,
        };
        let mut names: HashMap<String, ()> = HashMap::new();
        let mut spans: Vec<(usize, std::ops::Range<usize>, String)> = Vec::new();
        for (ti, t) in d.tags.into_iter().enumerate() {
            let key = format!("{key}.tags[{ti}]");
            cx.name(&t.name, &format!("{key}.name"), false);
            declared.insert(format!("{}.{}", d.id.get_ref(), t.name.get_ref()));
            if names.insert(t.name.get_ref().clone(), ()).is_some() {
                let msg = format!("duplicate tag name `{}` in device `{}`", t.name.get_ref(), plan.id);
                cx.err(&t.name, format!("{key}.name"), msg);
            }
            let opcua_only = pick(
                &tag_spans(&t),
                &[
                    "node_id",
                    "sampling_interval",
                    "queue_size",
                    "deadband",
                    "deadband_type",
                ],
            );
            not_for(cx, &opcua_only, &key, protocol);
            if let Some(c) = &t.channel {
                cx.err(
                    c,
                    format!("{key}.channel"),
                    format!("`channel` does not apply to {protocol} devices"),
                );
            }
            if let Some(tag) = tag_plan(cx, &t, &key, di, unit_id, max_regs) {
                let span = t.address.as_ref().map_or(0..0, Spanned::span);
                spans.push((tags.len(), span, format!("{key}.address")));
                plan.tags.push(tags.len());
                tags.push(tag);
            }
        }
        check_overlaps(cx, &tags, &spans);
        devices.push(plan);
    }
    (agent, upstream, buffer, devices, tags, declared, templates)
}

fn tag_plan(cx: &mut Ctx, t: &raw::Tag, key: &str, device: usize, unit_id: u8, max_regs: u16) -> Option<TagPlan> {
    use DataType::*;
    let (Some(table_s), Some(address_s)) = (&t.table, &t.address) else {
        cx.err(&t.name, key.to_string(), "a modbus_tcp tag needs `table` and `address`");
        return None;
    };
    let table = cx.choice(
        table_s,
        &format!("{key}.table"),
        &[
            ("holding", Table::Holding),
            ("input", Table::Input),
            ("coil", Table::Coil),
            ("discrete_input", Table::DiscreteInput),
        ],
    )?;
    let address = cx.range(address_s, &format!("{key}.address"), 0, 65_535)? as u16;
    let type_options: [(&str, DataType); 10] = [
        ("bool", Bool),
        ("u16", U16),
        ("i16", I16),
        ("u32", U32),
        ("i32", I32),
        ("u64", U64),
        ("i64", I64),
        ("f32", F32),
        ("f64", F64),
        ("string", Text(0)),
    ];
    let mut data_type = match &t.data_type {
        Some(v) => cx.choice(v, &format!("{key}.type"), &type_options)?,
        None if table.is_bits() => Bool,
        None => U16,
    };
    if table.is_bits() && data_type != Bool {
        let v = t.data_type.as_ref().expect("non-bool type was written");
        cx.err(
            v,
            format!("{key}.type"),
            "coils and discrete inputs hold bits: the type must be `bool`",
        );
        return None;
    }
    let bit = match &t.bit {
        Some(b) if data_type == Bool && !table.is_bits() => Some(cx.range(b, &format!("{key}.bit"), 0, 15)? as u8),
        Some(b) => {
            cx.err(
                b,
                format!("{key}.bit"),
                "`bit` applies only to bool tags in holding or input registers",
            );
            return None;
        }
        None if data_type == Bool && !table.is_bits() => {
            cx.err(
                &t.name,
                format!("{key}.bit"),
                "a bool tag in a register table needs `bit` (0..=15)",
            );
            return None;
        }
        None => None,
    };
    match (&t.length, data_type) {
        (Some(l), Text(_)) => data_type = Text(cx.range(l, &format!("{key}.length"), 1, i64::from(max_regs))? as u16),
        (None, Text(_)) => {
            cx.err(
                &t.name,
                format!("{key}.length"),
                "a string tag needs `length` (in registers, two characters each)",
            );
            return None;
        }
        (Some(l), _) => {
            cx.err(l, format!("{key}.length"), "`length` applies only to string tags");
            return None;
        }
        (None, _) => {}
    }
    let byte_order = match &t.byte_order {
        None => ByteOrder::Abcd,
        Some(v) => {
            let order = cx.choice(
                v,
                &format!("{key}.byte_order"),
                &[
                    ("ABCD", ByteOrder::Abcd),
                    ("CDAB", ByteOrder::Cdab),
                    ("BADC", ByteOrder::Badc),
                    ("DCBA", ByteOrder::Dcba),
                ],
            )?;
            if table.is_bits() || data_type == Bool {
                cx.err(v, format!("{key}.byte_order"), "byte_order has no meaning for bits");
                return None;
            }
            if order.swaps_words() && (data_type.registers() == 1 || matches!(data_type, Text(_))) {
                cx.err(
                    v,
                    format!("{key}.byte_order"),
                    "word order has no meaning for single-register and string values",
                )
                .help = Some("use ABCD or BADC".into());
                return None;
            }
            order
        }
    };
    let numeric = !matches!(data_type, Bool | Text(_));
    let scale = match &t.scale {
        Some(s) if !numeric => {
            cx.err(s, format!("{key}.scale"), "scale applies only to numeric tags");
            return None;
        }
        Some(s) if *s.get_ref() == 0.0 || !s.get_ref().is_finite() => {
            cx.err(s, format!("{key}.scale"), "scale must be a finite, non-zero number");
            return None;
        }
        Some(s) => *s.get_ref(),
        None => 1.0,
    };
    let tag_unit = t
        .unit_id
        .as_ref()
        .map(|u| cx.range(u, &format!("{key}.unit_id"), 0, 255).unwrap_or(0) as u8);
    let plan = TagPlan {
        device,
        name: t.name.get_ref().into(),
        unit_id: tag_unit.unwrap_or(unit_id),
        table,
        address,
        data_type,
        byte_order,
        bit,
        scale,
        offset: t.offset.unwrap_or(0.0),
        opcua: None,
        sensor_channel: None,
        mqtt: None,
    };
    if u32::from(address) + u32::from(plan.width()) > 65_536 {
        cx.err(
            address_s,
            format!("{key}.address"),
            format!(
                "the value ends past address 65535 ({} registers from {address})",
                plan.width()
            ),
        );
        return None;
    }
    Some(plan)
}

/// Two tags of one device may not share a register (or coil), except bool tags on different bits
/// of a register; reading a register whole and its bits separately is allowed.
fn check_overlaps(cx: &mut Ctx, tags: &[TagPlan], spans: &[(usize, std::ops::Range<usize>, String)]) {
    let mut by_area: BTreeMap<(u8, Table), Vec<usize>> = BTreeMap::new();
    for (i, _, _) in spans {
        by_area.entry((tags[*i].unit_id, tags[*i].table)).or_default().push(*i);
    }
    let span_of: HashMap<usize, (std::ops::Range<usize>, String)> =
        spans.iter().map(|(i, s, k)| (*i, (s.clone(), k.clone()))).collect();
    for list in by_area.values() {
        for (n, &a) in list.iter().enumerate() {
            for &b in &list[..n] {
                let (ta, tb) = (&tags[a], &tags[b]);
                let overlap = ta.address < tb.address + tb.width() && tb.address < ta.address + ta.width();
                if !overlap {
                    continue;
                }
                let conflict = match (ta.bit, tb.bit) {
                    (Some(x), Some(y)) => x == y,
                    (Some(_), None) | (None, Some(_)) => false,
                    (None, None) => true,
                };
                if conflict {
                    let (span, key) = span_of[&a].clone();
                    let d = cx.src.at(
                        span,
                        key,
                        format!(
                            "tag `{}` (address {}, {} register(s)) overlaps tag `{}` (address {}, {} register(s)) in the same table",
                            ta.name,
                            ta.address,
                            ta.width(),
                            tb.name,
                            tb.address,
                            tb.width()
                        ),
                    );
                    cx.problems.push(d);
                }
            }
        }
    }
}

fn upstream_plan(
    cx: &mut Ctx,
    u: raw::Upstream,
    agent_id: &str,
    site: &str,
    base: &Path,
    key: &str,
) -> Option<UpstreamPlan> {
    let url = u.url.get_ref().as_str();
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let tls = match scheme {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" | "tls" => true,
        _ => {
            cx.err(&u.url, format!("{key}.url"), format!("`{url}` is not an MQTT URL"))
                .help = Some("write mqtt://host:1883 or mqtts://host:8883".into());
            return None;
        }
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => match p.parse::<u16>() {
            Ok(p) => (h.trim_matches(['[', ']']).to_string(), p),
            Err(_) => {
                cx.err(&u.url, format!("{key}.url"), format!("`{p}` is not a port number"));
                return None;
            }
        },
        None => (rest.to_string(), if tls { 8883 } else { 1883 }),
    };
    let version = match &u.protocol {
        None => MqttVersion::V5,
        Some(v) => cx.choice(
            v,
            &format!("{key}.protocol"),
            &[("5", MqttVersion::V5), ("3.1.1", MqttVersion::V311)],
        )?,
    };
    if let Some(p) = &u.password {
        cx.err(
            p,
            format!("{key}.password"),
            "inline secret: `password` is not allowed in config",
        )
        .help = Some("put the password in a file (password_file) or the environment (password_env)".into());
    }
    let password = match (&u.password_file, &u.password_env) {
        (Some(_), Some(_)) => {
            cx.whole(key, "set one of password_file and password_env, not both");
            None
        }
        (Some(f), None) => Some(SecretRef::File(base.join(f))),
        (None, Some(e)) => Some(SecretRef::Env(e.clone())),
        (None, None) => None,
    };
    if password.is_some() && u.username.is_none() {
        cx.whole(format!("{key}.username"), "a password is configured but no username");
    }
    let client_cert = match (&u.cert_file, &u.key_file) {
        (Some(c), Some(k)) => Some((base.join(c), base.join(k.get_ref()))),
        (None, None) => None,
        _ => {
            cx.whole(key, "mutual TLS needs both cert_file and key_file");
            None
        }
    };
    if !tls && (u.ca_file.is_some() || client_cert.is_some()) {
        cx.err(
            &u.url,
            format!("{key}.url"),
            "TLS files are set but the URL is not mqtts://",
        );
    }
    let max_inflight = u
        .max_inflight
        .as_ref()
        .and_then(|v| cx.range(v, &format!("{key}.max_inflight"), 1, 65_535))
        .unwrap_or(32) as u16;
    let max_records = u
        .max_records_per_message
        .as_ref()
        .and_then(|v| cx.range(v, &format!("{key}.max_records_per_message"), 1, 100_000))
        .unwrap_or(100) as usize;
    let backlog_rate = u
        .backlog_rate
        .as_ref()
        .and_then(|v| cx.range(v, &format!("{key}.backlog_rate"), 1, 1_000_000))
        .unwrap_or(100);
    let reconnect_min = u.reconnect_min.map_or(Duration::from_millis(500), |d| d.0);
    let reconnect_max = u.reconnect_max.map_or(Duration::from_secs(30), |d| d.0);
    if reconnect_min > reconnect_max || reconnect_min.is_zero() {
        cx.whole(
            format!("{key}.reconnect_min"),
            "reconnect_min must be non-zero and at most reconnect_max",
        );
    }
    let sparkplug = match &u.encoding {
        None => None,
        Some(e) => match cx.choice(e, &format!("{key}.encoding"), &[("json", false), ("sparkplug", true)])? {
            false => None,
            true => {
                let id = |cx: &mut Ctx, v: &Option<Spanned<String>>, k: &str, default: &str| match v {
                    None => default.to_string(),
                    Some(v) => {
                        cx.name(v, &format!("{key}.sparkplug.{k}"), true);
                        v.get_ref().clone()
                    }
                };
                let sp = u.sparkplug.as_ref().map(Spanned::get_ref);
                let group_id = id(cx, &sp.and_then(|s| s.group_id.clone()), "group_id", site);
                let edge_node_id = id(cx, &sp.and_then(|s| s.edge_node_id.clone()), "edge_node_id", agent_id);
                let primary_host = sp
                    .and_then(|s| s.primary_host.clone())
                    .map(|h| id(cx, &Some(h), "primary_host", ""));
                Some(SparkplugPlan {
                    group_id,
                    edge_node_id,
                    primary_host,
                })
            }
        },
    };
    if let (Some(s), None) = (&u.sparkplug, &sparkplug) {
        cx.err(
            s,
            format!("{key}.sparkplug"),
            "a [sparkplug] table without encoding = \"sparkplug\"",
        );
    }
    Some(UpstreamPlan {
        sparkplug,
        host,
        port,
        tls,
        version,
        client_id: u.client_id.clone().unwrap_or_else(|| format!("plantmesh-{agent_id}")),
        keep_alive: u.keep_alive.map_or(Duration::from_secs(30), |d| d.0),
        username: u.username.clone(),
        password,
        ca_file: u.ca_file.as_ref().map(|f| base.join(f)),
        client_cert,
        max_inflight,
        max_records_per_message: max_records,
        max_message_bytes: u
            .max_message_bytes
            .map_or(256 << 10, |b| b.0.clamp(1024, 256 << 20) as usize),
        backlog_rate,
        reconnect_min,
        reconnect_max,
    })
}

fn product_plan(
    cx: &mut Ctx,
    p: raw::Product,
    agent: &AgentPlan,
    buffer: &BufferPlan,
    tags: &TagIndex,
    rules: &Rules,
) -> Option<ProductPlan> {
    let template = rules.template.as_str();
    let TagIndex { tags, by_ref, declared } = *tags;
    let id = p.id.get_ref();
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        cx.err(
            &p.id,
            "id",
            format!("`{id}` is not a product id: use lowercase letters, digits and `-`"),
        );
    }
    let parts: Vec<Option<u64>> = p.version.get_ref().split('.').map(|s| s.parse().ok()).collect();
    let major = if parts.len() == 3 && parts.iter().all(Option::is_some) {
        parts[0].unwrap_or(0)
    } else {
        cx.err(
            &p.version,
            "version",
            format!("`{}` is not a semantic version", p.version.get_ref()),
        )
        .help = Some("write MAJOR.MINOR.PATCH, e.g. \"1.0.0\"".into());
        0
    };
    cx.name(&p.domain, "domain", false);
    let publish = match &p.publish.mode {
        None => PublishMode::EverySample,
        Some(m) => {
            let mode = cx.choice(
                m,
                "publish.mode",
                &[("every_sample", 0), ("on_change", 1), ("interval", 2), ("window", 3)],
            )?;
            match (mode, &p.publish.interval) {
                (2, Some(i)) => {
                    cx.range(&secs(i), "publish.interval", 0.01, 86_400.0);
                    PublishMode::Interval(i.get_ref().0)
                }
                (2, None) => {
                    cx.err(m, "publish.interval", "mode `interval` needs `interval`, e.g. \"5s\"");
                    return None;
                }
                (3, _) => match &p.publish.window {
                    Some(w) => {
                        cx.range(&secs(w), "publish.window", 0.1, 86_400.0);
                        PublishMode::Window(w.get_ref().0)
                    }
                    None => {
                        cx.err(m, "publish.window", "mode `window` needs `window`, e.g. \"1m\"");
                        return None;
                    }
                },
                (1, _) => PublishMode::OnChange,
                _ => PublishMode::EverySample,
            }
        }
    };
    if let (Some(w), false) = (&p.publish.window, matches!(publish, PublishMode::Window(_))) {
        cx.err(w, "publish.window", "`window` applies only to mode = \"window\"");
    }
    if let (Some(i), false) = (&p.publish.interval, matches!(publish, PublishMode::Interval(_))) {
        cx.err(i, "publish.interval", "`interval` applies only to mode = \"interval\"");
    }
    let max_bytes = match &p.buffer.max_bytes {
        Some(v) => {
            let b = Spanned::new(v.span(), v.get_ref().0);
            cx.range(&b, "buffer.max_bytes", 64 << 10, buffer.max_bytes)
                .unwrap_or(buffer.max_bytes)
        }
        None => buffer.max_bytes,
    };
    let full_policy = match &p.buffer.full_policy {
        None => FullPolicy::DropOldest,
        Some(v) => cx.choice(
            v,
            "buffer.full_policy",
            &[
                ("drop_oldest", FullPolicy::DropOldest),
                ("reject_new", FullPolicy::RejectNew),
                ("block", FullPolicy::Block),
            ],
        )?,
    };
    if p.fields.is_empty() {
        cx.err(&p.id, "fields", "a product needs at least one field");
    }
    // Units and classes repeat across fields: one shared copy of each.
    let mut shared = Shared::default();
    let mut fields = Vec::new();
    let mut names = HashMap::new();
    for (fi, f) in p.fields.iter().enumerate() {
        let key = format!("fields[{fi}]");
        cx.name(&f.name, &format!("{key}.name"), false);
        if names.insert(f.name.get_ref().clone(), ()).is_some() {
            let msg = format!("duplicate field `{}`", f.name.get_ref());
            cx.err(&f.name, format!("{key}.name"), msg);
        }
        let Some((source, natural, tag_type, from)) =
            field_source(cx, f, fi, &key, &p.fields, &fields, tags, by_ref, declared)
        else {
            continue;
        };
        let scale = f.scale.unwrap_or(1.0);
        let offset = f.offset.unwrap_or(0.0);
        if let Some(u) = &f.unit {
            if let Err((message, help)) = super::ucum::check(u.get_ref()) {
                cx.err(u, format!("{key}.unit"), message).help = help;
            }
        }
        let logical_type = match &f.logical_type {
            None => natural,
            Some(v) => {
                let lt = cx.choice(
                    v,
                    &format!("{key}.type"),
                    &[
                        ("number", LogicalType::Number),
                        ("integer", LogicalType::Integer),
                        ("boolean", LogicalType::Boolean),
                        ("string", LogicalType::String),
                        ("array", LogicalType::Array),
                    ],
                )?;
                let compatible = lt == natural || (lt == LogicalType::Number && natural == LogicalType::Integer);
                if !compatible {
                    let msg = format!(
                        "type `{}` does not fit {from}, which gives {}",
                        lt.as_str(),
                        natural.as_str()
                    );
                    cx.err(v, format!("{key}.type"), msg);
                }
                lt
            }
        };
        if (f.scale.is_some() || f.offset.is_some())
            && matches!(natural, LogicalType::Boolean | LogicalType::String | LogicalType::Array)
        {
            cx.err(
                &f.name,
                format!("{key}.scale"),
                "scale and offset apply only to numeric fields",
            );
        }
        let deadband = match &f.deadband {
            Some(d) if *d.get_ref() < 0.0 || !d.get_ref().is_finite() => {
                cx.err(d, format!("{key}.deadband"), "deadband must be a finite number >= 0");
                0.0
            }
            Some(d) => *d.get_ref(),
            None => 0.0,
        };
        let Some((classification, action)) = field_governance(cx, f, &key, logical_type, rules) else {
            continue;
        };
        let numeric_tag = !matches!(tag_type, Some(DataType::Bool | DataType::Text(_) | DataType::Array));
        let aggregate = match (&f.aggregate, matches!(publish, PublishMode::Window(_))) {
            (None, _) => Aggregate::Last,
            (Some(a), _) if tag_type.is_none() => {
                cx.err(
                    a,
                    format!("{key}.aggregate"),
                    "a derived field is computed from its inputs' aggregates; `aggregate` does not apply",
                );
                continue;
            }
            (Some(a), false) => {
                cx.err(
                    a,
                    format!("{key}.aggregate"),
                    "`aggregate` applies only to mode = \"window\"",
                );
                continue;
            }
            (Some(a), true) => {
                let Some(name) = cx.choice(
                    a,
                    &format!("{key}.aggregate"),
                    &[
                        ("last", "last"),
                        ("count", "count"),
                        ("sum", "sum"),
                        ("min", "min"),
                        ("max", "max"),
                        ("mean", "mean"),
                        ("delta", "delta"),
                    ],
                ) else {
                    continue;
                };
                if !matches!(name, "last" | "count") && !numeric_tag {
                    cx.err(a, format!("{key}.aggregate"), format!("`{name}` needs a numeric tag"));
                    continue;
                }
                match name {
                    "last" => Aggregate::Last,
                    "count" => Aggregate::Count,
                    "sum" => Aggregate::Sum,
                    "min" => Aggregate::Min,
                    "max" => Aggregate::Max,
                    "mean" => Aggregate::Mean,
                    _ => {
                        let natural = match tag_type {
                            Some(DataType::U16 | DataType::I16) => 16,
                            Some(DataType::U32 | DataType::I32) => 32,
                            _ => 64,
                        };
                        let bits = match &f.counter_bits {
                            Some(b) if [16, 32, 64].contains(b.get_ref()) => *b.get_ref(),
                            Some(b) => {
                                cx.err(b, format!("{key}.counter_bits"), "counter_bits is 16, 32 or 64");
                                continue;
                            }
                            None => natural,
                        };
                        Aggregate::Delta { bits }
                    }
                }
            }
        };
        let numeric = matches!(logical_type, LogicalType::Number | LogicalType::Integer);
        let range = match &f.range {
            Some(r) if !numeric => {
                cx.err(r, format!("{key}.range"), "`range` applies only to numeric fields");
                None
            }
            Some(r) if r.get_ref()[0] >= r.get_ref()[1] || r.get_ref().iter().any(|x| !x.is_finite()) => {
                cx.err(r, format!("{key}.range"), "a range is [min, max] with min < max");
                None
            }
            Some(r) => Some(Box::new((r.get_ref()[0], r.get_ref()[1]))),
            None => None,
        };
        if rules.required.iter().any(|r| r == "unit") && numeric && f.unit().is_empty() {
            let msg = format!(
                "numeric field `{}` has no `unit`, required by rule `required_metadata` in {}",
                f.name.get_ref(),
                rules.file
            );
            cx.err(&f.name, format!("{key}.unit"), msg);
        }
        fields.push(FieldPlan {
            name: f.name.get_ref().into(),
            source,
            logical_type,
            unit: shared.get(f.unit()),
            scale,
            offset,
            deadband,
            description: f.description.as_str().into(),
            classification: shared.get(&classification),
            action,
            required: f.required,
            range,
            aggregate,
        });
    }
    let topic = template
        .replace("{site}", &agent.site)
        .replace("{area}", &agent.area)
        .replace("{line}", &agent.line)
        .replace("{domain}", p.domain.get_ref())
        .replace("{product}", id)
        .replace("{major}", &major.to_string());
    let status = match &p.status {
        None => "active".to_string(),
        Some(s) => cx
            .choice(
                s,
                "status",
                &[
                    ("draft", "draft"),
                    ("active", "active"),
                    ("deprecated", "deprecated"),
                    ("retired", "retired"),
                ],
            )?
            .to_string(),
    };
    let on_violation = match &p.on_violation {
        None => OnViolation::Flag,
        Some(v) => cx.choice(
            v,
            "on_violation",
            &[("flag", OnViolation::Flag), ("drop", OnViolation::Drop)],
        )?,
    };
    for r in &rules.required {
        let missing = match r.as_str() {
            "description" => p.description.trim().is_empty(),
            "contact" => p.contact.trim().is_empty(),
            "status" => p.status.is_none(),
            _ => false,
        };
        if missing {
            let msg = format!("missing `{r}`, required by rule `required_metadata` in {}", rules.file);
            cx.err(&p.id, r.clone(), msg);
        }
    }
    if !rules.plan.allow_topic_prefixes.is_empty()
        && !rules
            .plan
            .allow_topic_prefixes
            .iter()
            .any(|pre| topic.starts_with(pre.as_str()))
    {
        let msg = format!(
            "topic `{topic}` is outside the egress allow-list (rule `egress.allow_topic_prefixes` in {}: {})",
            rules.file,
            rules.plan.allow_topic_prefixes.join(", ")
        );
        cx.err(&p.domain, "domain", msg);
    }
    if !rules.domains.is_empty() {
        match rules.domains.iter().find(|(d, _)| d == p.domain.get_ref()) {
            None => {
                let msg = format!(
                    "domain `{}` may not publish: it has no rule in `domains` of {}",
                    p.domain.get_ref(),
                    rules.file
                );
                cx.err(&p.domain, "domain", msg);
            }
            Some((d, prefixes)) if !prefixes.iter().any(|pre| topic.starts_with(pre.as_str())) => {
                let msg = format!(
                    "topic `{topic}` is not under the prefixes domain `{d}` may use (rule `domains` in {}: {})",
                    rules.file,
                    prefixes.join(", ")
                );
                cx.err(&p.domain, "domain", msg);
            }
            Some(_) => {}
        }
    }
    let qos = match &p.publish.qos {
        None => 1,
        Some(q) if *q.get_ref() == 1 || *q.get_ref() == 2 => *q.get_ref() as u8,
        Some(q) => {
            cx.err(
                q,
                "publish.qos",
                format!("QoS {} is not offered: use 1 or 2", q.get_ref()),
            )
            .help = Some("QoS 0 would give up at-least-once delivery".into());
            1
        }
    };
    let max_records_per_message = p
        .publish
        .max_records_per_message
        .as_ref()
        .and_then(|v| cx.range(v, "publish.max_records_per_message", 1, 100_000))
        .map(|n| n as usize);
    let sl = &p.service_levels;
    let service_levels = ServiceLevelPlan {
        freshness: sl.freshness.as_ref().map(|v| {
            cx.range(&secs(v), "service_levels.freshness", 0.01, 7.0 * 86_400.0);
            v.get_ref().0
        }),
        expected_interval: sl.expected_interval.as_ref().map_or(
            match publish {
                PublishMode::Interval(d) | PublishMode::Window(d) => d,
                // Filled in from the devices' poll intervals once all products are read.
                PublishMode::EverySample | PublishMode::OnChange => Duration::ZERO,
            },
            |v| {
                cx.range(&secs(v), "service_levels.expected_interval", 0.01, 7.0 * 86_400.0);
                v.get_ref().0
            },
        ),
        completeness: sl
            .completeness
            .as_ref()
            .and_then(|v| cx.range(v, "service_levels.completeness", 0.0, 1.0)),
        latency_p99: sl.latency_p99.as_ref().map(|v| {
            cx.range(&secs(v), "service_levels.latency_p99", 0.001, 3600.0);
            v.get_ref().0
        }),
    };
    Some(ProductPlan {
        key: crate::config::product_key(id, major),
        id: id.clone(),
        name: p.name.clone(),
        version: p.version.get_ref().clone(),
        major,
        domain: p.domain.get_ref().clone(),
        owner: p.owner.clone(),
        contact: p.contact.clone(),
        status,
        on_violation,
        description: p.description.clone(),
        publish,
        max_bytes,
        full_policy,
        fields: fields.into(),
        topic,
        qos,
        max_records_per_message,
        service_levels,
        file: cx.src.path.to_path_buf(),
    })
}

/// A field's source, natural logical type, tag type (`None` for derived fields) and how messages
/// name it; `None` when invalid (reported).
#[allow(clippy::too_many_arguments)]
fn field_source(
    cx: &mut Ctx,
    f: &raw::Field,
    fi: usize,
    key: &str,
    all: &[raw::Field],
    built: &[FieldPlan],
    tags: &[TagPlan],
    by_ref: &HashMap<String, usize>,
    declared: &HashSet<String>,
) -> Option<(FieldSource, LogicalType, Option<DataType>, String)> {
    match (&f.source, &f.derive) {
        (Some(src), Some(_)) => {
            cx.err(
                src,
                format!("{key}.source"),
                "a field has `source` or `derive`, not both",
            );
            None
        }
        (None, None) => {
            cx.err(
                &f.name,
                format!("{key}.source"),
                "a field needs `source` (<device>.<tag>) or `derive`",
            );
            None
        }
        (None, Some(op)) => {
            let op = cx.choice(op, &format!("{key}.derive"), &DeriveOp::ALL)?;
            let Some(inputs) = &f.inputs else {
                cx.err(
                    &f.name,
                    format!("{key}.inputs"),
                    "`derive` needs `inputs`: names of earlier fields",
                );
                return None;
            };
            let (lo, hi) = op.arity();
            let n = inputs.get_ref().len();
            if n < lo || n > hi {
                let msg = format!("`{}` takes {lo}..={hi} inputs, not {n}", op.name());
                cx.err(inputs, format!("{key}.inputs"), msg);
                return None;
            }
            let mut idx = Vec::new();
            for name in inputs.get_ref() {
                match built.iter().position(|b| *b.name == **name) {
                    Some(i) if matches!(built[i].logical_type, LogicalType::Number | LogicalType::Integer) => {
                        idx.push(i)
                    }
                    Some(i) => {
                        let msg = format!("input `{name}` is {}, not numeric", built[i].logical_type.as_str());
                        cx.err(inputs, format!("{key}.inputs"), msg);
                    }
                    None if all[fi + 1..].iter().any(|g| g.name.get_ref() == name) => {
                        let msg = format!("input `{name}` is declared after this field; inputs come first");
                        cx.err(inputs, format!("{key}.inputs"), msg);
                    }
                    None if all[..fi].iter().any(|g| g.name.get_ref() == name) => {} // invalid, reported
                    None => {
                        let help = closest(name, all[..fi].iter().map(|g| g.name.get_ref().as_str()))
                            .map(|b| format!("did you mean `{b}`?"));
                        cx.err(
                            inputs,
                            format!("{key}.inputs"),
                            format!("no field `{name}` in this product"),
                        )
                        .help = help;
                    }
                }
            }
            if f.unit().is_empty() {
                // A derived value's unit is the team's statement; it cannot be inferred safely.
                cx.err(
                    &f.name,
                    format!("{key}.unit"),
                    "a derived field needs its `unit` (UCUM, `1` for ratios)",
                );
                return None;
            }
            (idx.len() == n).then(|| {
                let from = format!("`derive = \"{}\"`", op.name());
                (
                    FieldSource::Derived(Box::new(Derivation { op, inputs: idx })),
                    LogicalType::Number,
                    None,
                    from,
                )
            })
        }
        (Some(src), None) => {
            if let Some(i) = &f.inputs {
                cx.err(i, format!("{key}.inputs"), "`inputs` applies only to derived fields");
            }
            let r = src.get_ref();
            let Some(&tag) = by_ref.get(r) else {
                if declared.contains(r) {
                    return None; // the tag itself is invalid and already reported
                }
                let help = closest(r, by_ref.keys().map(String::as_str)).map(|b| format!("did you mean `{b}`?"));
                cx.err(
                    src,
                    format!("{key}.source"),
                    format!("`{r}` is not a tag of the gateway file (write <device>.<tag>)"),
                )
                .help = help;
                return None;
            };
            let t = &tags[tag];
            let identity =
                f.scale.unwrap_or(1.0) == 1.0 && f.offset.unwrap_or(0.0) == 0.0 && t.scale == 1.0 && t.offset == 0.0;
            let natural = match t.data_type {
                DataType::Bool => LogicalType::Boolean,
                DataType::Text(_) => LogicalType::String,
                DataType::Array => LogicalType::Array,
                DataType::F32 | DataType::F64 => LogicalType::Number,
                _ if identity => LogicalType::Integer,
                _ => LogicalType::Number,
            };
            Some((FieldSource::Tag(tag), natural, Some(t.data_type), format!("tag `{r}`")))
        }
    }
}

/// A Modbus TCP `host:port` (port 502 when omitted).
fn tcp_address(cx: &mut Ctx, address_s: &Spanned<String>, key: &str) -> String {
    let address = address_s.get_ref().clone();
    if address
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
    {
        address
    } else if !address.is_empty() && !address.contains(':') {
        format!("{address}:502")
    } else {
        let msg = format!("`{address}` is not host:port");
        cx.err(address_s, format!("{key}.address"), msg).help = Some("e.g. \"192.168.10.5:502\"".into());
        address
    }
}

/// The serial line of a Modbus RTU device or sensor node.
fn serial_line(cx: &mut Ctx, d: &raw::Device, key: &str, default_baud: u32) -> Option<SerialPlan> {
    let Some(port) = &d.port else {
        cx.err(
            &d.protocol,
            format!("{key}.port"),
            format!("a {} device needs `port` (e.g. /dev/ttyUSB0)", d.protocol.get_ref()),
        );
        return None;
    };
    if port.get_ref().is_empty() {
        cx.err(port, format!("{key}.port"), "`port` is empty");
        return None;
    }
    const BAUDS: [u32; 12] = [
        1200, 2400, 4800, 9600, 14_400, 19_200, 38_400, 57_600, 115_200, 230_400, 460_800, 921_600,
    ];
    let baud = match &d.baud {
        Some(b) if BAUDS.contains(b.get_ref()) => *b.get_ref(),
        Some(b) => {
            cx.err(
                b,
                format!("{key}.baud"),
                format!("{} is not a standard baud rate", b.get_ref()),
            )
            .help = Some("1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, ...".into());
            return None;
        }
        None => default_baud,
    };
    let parity = match &d.parity {
        None => Parity::Even,
        Some(p) => cx.choice(
            p,
            &format!("{key}.parity"),
            &[("even", Parity::Even), ("odd", Parity::Odd), ("none", Parity::None)],
        )?,
    };
    let stop_bits = match &d.stop_bits {
        None if parity == Parity::None => 2,
        None => 1,
        Some(s) => cx.range(s, &format!("{key}.stop_bits"), 1, 2)? as u8,
    };
    let data_bits = match &d.data_bits {
        None => 8,
        Some(b) => cx.range(b, &format!("{key}.data_bits"), 7, 8)? as u8,
    };
    // Modbus over serial line, section 2.5.1.1: 3.5 character times between frames, fixed at
    // 1.75 ms above 19200 baud. A character is 11 bits (start, 8 data, parity or a second stop, stop).
    let char_time = Duration::from_secs_f64(11.0 / f64::from(baud));
    let inter_frame = match &d.inter_frame {
        Some(v) => {
            cx.range(&secs(v), &format!("{key}.inter_frame"), 0.0, 1.0);
            v.get_ref().0
        }
        None if baud > 19_200 => Duration::from_micros(1_750),
        None => char_time.mul_f64(3.5),
    };
    Some(SerialPlan {
        port: port.get_ref().clone(),
        baud,
        parity,
        stop_bits,
        data_bits,
        inter_frame,
    })
}

/// A sensor node: a serial port and, optionally, channels named or scaled by hand. Channels a
/// product uses but no tag declares are added by [`sensor_tags_from_products`].
fn sensor_device(
    cx: &mut Ctx,
    d: &raw::Device,
    key: &str,
    di: usize,
    tags: &mut Vec<TagPlan>,
    declared: &mut HashSet<String>,
) -> Option<DevicePlan> {
    not_for(cx, &modbus_keys(d), key, "sensor_node");
    let not_sensor = pick(
        &device_spans(d),
        &[
            "parity",
            "stop_bits",
            "data_bits",
            "inter_frame",
            "endpoint",
            "security_policy",
            "poll_interval",
            "timeout",
            "mode",
        ],
    );
    not_for(cx, &not_sensor, key, "sensor_node");
    let mut serial = serial_line(cx, d, key, 115_200)?;
    // The link frames itself (COBS); 8N1 is what MCU UARTs and USB CDC default to.
    serial.parity = Parity::None;
    serial.stop_bits = 1;
    let stale_after = d.stale_after.as_ref().map_or(Duration::from_secs(5), |v| {
        cx.range(&secs(v), &format!("{key}.stale_after"), 0.1, 3600.0);
        v.get_ref().0
    });
    let mut plan = DevicePlan {
        id: d.id.get_ref().clone(),
        address: serial.port.clone(),
        poll_interval: stale_after,
        timeout: stale_after,
        max_gap_registers: 0,
        max_gap_bits: 0,
        max_registers_per_read: 0,
        max_bits_per_read: 0,
        tags: Vec::new(),
        opcua: None,
        serial: Some(serial),
        sensor: Some(SensorDevicePlan { stale_after }),
        mqtt: None,
    };
    let mut names = HashSet::new();
    for (ti, t) in d.tags.iter().enumerate() {
        let key = format!("{key}.tags[{ti}]");
        cx.name(&t.name, &format!("{key}.name"), false);
        declared.insert(format!("{}.{}", plan.id, t.name.get_ref()));
        if !names.insert(t.name.get_ref().clone()) {
            let msg = format!("duplicate tag name `{}` in device `{}`", t.name.get_ref(), plan.id);
            cx.err(&t.name, format!("{key}.name"), msg);
            continue;
        }
        let modbus_or_opcua = pick(
            &tag_spans(t),
            &[
                "table",
                "address",
                "type",
                "byte_order",
                "bit",
                "length",
                "unit_id",
                "node_id",
            ],
        );
        not_for(cx, &modbus_or_opcua, &key, "sensor_node");
        let channel = match &t.channel {
            Some(c) => Some(cx.range(c, &format!("{key}.channel"), 0, protocol::link::MAX_CHANNELS as u32 - 1)? as u8),
            None => None,
        };
        let scale = match &t.scale {
            Some(s) if *s.get_ref() == 0.0 || !s.get_ref().is_finite() => {
                cx.err(s, format!("{key}.scale"), "scale must be a finite, non-zero number");
                continue;
            }
            Some(s) => *s.get_ref(),
            None => 1.0,
        };
        plan.tags.push(tags.len());
        tags.push(sensor_tag(
            di,
            t.name.get_ref(),
            channel,
            scale,
            t.offset.unwrap_or(0.0),
        ));
    }
    Some(plan)
}

fn sensor_tag(device: usize, name: &str, channel: Option<u8>, scale: f64, offset: f64) -> TagPlan {
    TagPlan {
        device,
        name: name.into(),
        unit_id: 0,
        table: Table::Holding,
        address: 0,
        data_type: DataType::F64,
        byte_order: ByteOrder::Abcd,
        bit: None,
        scale,
        offset,
        opcua: None,
        sensor_channel: Some(channel),
        mqtt: None,
    }
}

/// Tags that product fields add: sensor-node channels need no tag of their own (a field
/// `<node>.<channel name>` adds one, matched by name against the node's hello at run time), and a
/// field naming an instance of an MQTT template tag adds that instance. Product files are only
/// skimmed here; their real parse reports any problem with them.
fn tags_from_products(
    products: &[(PathBuf, String)],
    devices: &mut [DevicePlan],
    tags: &mut Vec<TagPlan>,
    declared: &mut HashSet<String>,
    templates: &[mqtt::Template],
) {
    /// Only what the skim needs; serde skips everything else without building a table of it.
    #[derive(serde::Deserialize)]
    struct Skim {
        #[serde(default)]
        fields: Vec<SkimField>,
    }
    #[derive(serde::Deserialize)]
    struct SkimField {
        source: Option<String>,
    }
    if !devices.iter().any(|d| d.sensor.is_some() || d.mqtt.is_some()) {
        return;
    }
    for (_, text) in products {
        let Ok(doc) = toml::from_str::<Skim>(text) else {
            continue;
        };
        for src in doc.fields.iter().filter_map(|f| f.source.as_deref()) {
            let Some((dev, name)) = src.split_once('.') else {
                continue;
            };
            let Some(di) = devices.iter().position(|d| d.id == dev) else {
                continue;
            };
            if declared.contains(src) {
                continue;
            }
            let tag = if devices[di].sensor.is_some() {
                let valid_name = !name.is_empty()
                    && name.len() <= 16
                    && name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                if !valid_name {
                    continue;
                }
                sensor_tag(di, name, None, 1.0, 0.0)
            } else if devices[di].mqtt.is_some() {
                match mqtt::instantiate(templates, di, name) {
                    Some(tag) => tag,
                    None => continue,
                }
            } else {
                continue;
            };
            declared.insert(src.to_string());
            devices[di].tags.push(tags.len());
            tags.push(tag);
        }
    }
}

/// Where each protocol-specific device key was written (`None`: not written).
fn device_spans(d: &raw::Device) -> Vec<(&'static str, Option<std::ops::Range<usize>>)> {
    vec![
        ("address", d.address.as_ref().map(Spanned::span)),
        ("port", d.port.as_ref().map(Spanned::span)),
        ("baud", d.baud.as_ref().map(Spanned::span)),
        ("parity", d.parity.as_ref().map(Spanned::span)),
        ("stop_bits", d.stop_bits.as_ref().map(Spanned::span)),
        ("data_bits", d.data_bits.as_ref().map(Spanned::span)),
        ("inter_frame", d.inter_frame.as_ref().map(Spanned::span)),
        ("stale_after", d.stale_after.as_ref().map(Spanned::span)),
        ("endpoint", d.endpoint.as_ref().map(Spanned::span)),
        ("security_policy", d.security_policy.as_ref().map(Spanned::span)),
        ("security_mode", d.security_mode.as_ref().map(Spanned::span)),
        ("identity", d.identity.as_ref().map(Spanned::span)),
        ("password", d.password.as_ref().map(Spanned::span)),
        ("publishing_interval", d.publishing_interval.as_ref().map(Spanned::span)),
        ("mode", d.mode.as_ref().map(Spanned::span)),
        ("timestamps", d.timestamps.as_ref().map(Spanned::span)),
        ("unit_id", d.unit_id.as_ref().map(Spanned::span)),
        ("poll_interval", d.poll_interval.as_ref().map(Spanned::span)),
        ("timeout", d.timeout.as_ref().map(Spanned::span)),
        ("max_gap", d.max_gap.as_ref().map(Spanned::span)),
        (
            "max_registers_per_read",
            d.max_registers_per_read.as_ref().map(Spanned::span),
        ),
        ("max_bits_per_read", d.max_bits_per_read.as_ref().map(Spanned::span)),
        ("url", d.url.as_ref().map(Spanned::span)),
    ]
}

/// Where each protocol-specific tag key was written.
fn tag_spans(t: &raw::Tag) -> Vec<(&'static str, Option<std::ops::Range<usize>>)> {
    vec![
        ("table", t.table.as_ref().map(Spanned::span)),
        ("address", t.address.as_ref().map(Spanned::span)),
        ("node_id", t.node_id.as_ref().map(Spanned::span)),
        ("sampling_interval", t.sampling_interval.as_ref().map(Spanned::span)),
        ("queue_size", t.queue_size.as_ref().map(Spanned::span)),
        ("deadband", t.deadband.as_ref().map(Spanned::span)),
        ("deadband_type", t.deadband_type.as_ref().map(Spanned::span)),
        ("type", t.data_type.as_ref().map(Spanned::span)),
        ("byte_order", t.byte_order.as_ref().map(Spanned::span)),
        ("bit", t.bit.as_ref().map(Spanned::span)),
        ("length", t.length.as_ref().map(Spanned::span)),
        ("unit_id", t.unit_id.as_ref().map(Spanned::span)),
        ("scale", t.scale.as_ref().map(Spanned::span)),
        ("channel", t.channel.as_ref().map(Spanned::span)),
        ("topic", t.topic.as_ref().map(Spanned::span)),
        ("payload", t.payload.as_ref().map(Spanned::span)),
        ("pointer", t.pointer.as_ref().map(Spanned::span)),
        ("timestamp_pointer", t.timestamp_pointer.as_ref().map(Spanned::span)),
        ("sparkplug", t.sparkplug.as_ref().map(Spanned::span)),
        ("metric", t.metric.as_ref().map(Spanned::span)),
    ]
}

/// The keys named, from a span table, for [`not_for`] to refuse where written.
fn pick(
    spans: &[(&'static str, Option<std::ops::Range<usize>>)],
    names: &[&str],
) -> Vec<(&'static str, Option<std::ops::Range<usize>>)> {
    spans.iter().filter(|(n, _)| names.contains(n)).cloned().collect()
}

/// The Modbus-only device keys that were written, for the other protocols to refuse.
fn modbus_keys(d: &raw::Device) -> Vec<(&'static str, Option<std::ops::Range<usize>>)> {
    pick(
        &device_spans(d),
        &[
            "address",
            "unit_id",
            "max_gap",
            "max_registers_per_read",
            "max_bits_per_read",
        ],
    )
}

/// Reports keys that were written but do not apply to the device's protocol.
fn not_for(cx: &mut Ctx, keys: &[(&str, Option<std::ops::Range<usize>>)], key: &str, protocol: &str) {
    for (name, span) in keys {
        if let Some(span) = span {
            let d = cx.src.at(
                span.clone(),
                format!("{key}.{name}"),
                format!("`{name}` does not apply to {protocol} devices"),
            );
            cx.problems.push(d);
        }
    }
}

/// The OPC UA security policies plantmesh offers, by their names in the OPC UA specification.
const OPCUA_POLICIES: [&str; 4] = [
    "Aes256_Sha256_RsaPss",
    "Aes128_Sha256_RsaOaep",
    "Basic256Sha256",
    "None",
];

/// OPC UA built-in types a tag may be declared with, and the value type each gives.
const OPCUA_TYPES: [(&str, DataType); 17] = [
    ("Boolean", DataType::Bool),
    ("SByte", DataType::I64),
    ("Byte", DataType::U64),
    ("Int16", DataType::I64),
    ("UInt16", DataType::U64),
    ("Int32", DataType::I64),
    ("UInt32", DataType::U64),
    ("Int64", DataType::I64),
    ("UInt64", DataType::U64),
    ("Float", DataType::F64),
    ("Double", DataType::F64),
    ("String", DataType::Text(0)),
    ("DateTime", DataType::Text(0)),
    ("ByteString", DataType::Text(0)),
    ("Guid", DataType::Text(0)),
    ("LocalizedText", DataType::Text(0)),
    ("StatusCode", DataType::U64),
];

fn opcua_device(
    cx: &mut Ctx,
    d: &raw::Device,
    key: &str,
    di: usize,
    base: &Path,
    tags: &mut Vec<TagPlan>,
    declared: &mut HashSet<String>,
) -> Option<DevicePlan> {
    not_for(cx, &modbus_keys(d), key, "opcua");
    let Some(endpoint) = &d.endpoint else {
        cx.err(
            &d.protocol,
            format!("{key}.endpoint"),
            "an opcua device needs `endpoint` (opc.tcp://host:port[/path])",
        );
        return None;
    };
    let url = endpoint.get_ref();
    let host_port = url
        .strip_prefix("opc.tcp://")
        .map(|r| r.split('/').next().unwrap_or_default());
    if !host_port.is_some_and(|hp| {
        hp.rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
    }) {
        cx.err(
            endpoint,
            format!("{key}.endpoint"),
            format!("`{url}` is not an OPC UA endpoint URL"),
        )
        .help = Some("write opc.tcp://host:port[/path], e.g. \"opc.tcp://10.0.0.5:4840\"".into());
    }
    let policy = match &d.security_policy {
        None => "Aes256_Sha256_RsaPss".to_string(),
        Some(p) => {
            let options: Vec<(&str, &str)> = OPCUA_POLICIES.iter().map(|p| (*p, *p)).collect();
            cx.choice(p, &format!("{key}.security_policy"), &options)?.to_string()
        }
    };
    let default_mode = if policy == "None" {
        OpcUaSecurityMode::None
    } else {
        OpcUaSecurityMode::SignAndEncrypt
    };
    let mode = match &d.security_mode {
        None => default_mode,
        Some(m) => cx.choice(
            m,
            &format!("{key}.security_mode"),
            &[
                ("SignAndEncrypt", OpcUaSecurityMode::SignAndEncrypt),
                ("Sign", OpcUaSecurityMode::Sign),
                ("None", OpcUaSecurityMode::None),
            ],
        )?,
    };
    if (policy == "None") != (mode == OpcUaSecurityMode::None) {
        let at = d
            .security_mode
            .as_ref()
            .or(d.security_policy.as_ref())
            .unwrap_or(endpoint);
        cx.err(
            at,
            format!("{key}.security_mode"),
            "security_policy `None` goes with security_mode `None`, and only with it",
        );
    }
    if let Some(p) = &d.password {
        cx.err(
            p,
            format!("{key}.password"),
            "inline secret: `password` is not allowed in config",
        )
        .help = Some("put the password in a file (password_file) or the environment (password_env)".into());
    }
    let identity = match d.identity.as_ref().map(|i| {
        cx.choice(
            i,
            &format!("{key}.identity"),
            &[("anonymous", 0), ("username", 1), ("x509", 2)],
        )
    }) {
        None => OpcUaIdentity::Anonymous,
        Some(None) => return None,
        Some(Some(0)) => OpcUaIdentity::Anonymous,
        Some(Some(1)) => {
            let password = match (&d.password_file, &d.password_env) {
                (Some(f), None) => SecretRef::File(base.join(f)),
                (None, Some(e)) => SecretRef::Env(e.clone()),
                _ => {
                    let i = d.identity.as_ref().expect("identity was written");
                    cx.err(
                        i,
                        format!("{key}.identity"),
                        "identity `username` needs `username` and one of `password_file`, `password_env`",
                    );
                    return None;
                }
            };
            let Some(user) = d.username.clone() else {
                let i = d.identity.as_ref().expect("identity was written");
                cx.err(i, format!("{key}.username"), "identity `username` needs `username`");
                return None;
            };
            OpcUaIdentity::UserName { user, password }
        }
        Some(Some(_)) => match (&d.cert_file, &d.key_file) {
            (Some(c), Some(k)) => OpcUaIdentity::X509 {
                cert: base.join(c),
                key: base.join(k),
            },
            _ => {
                let i = d.identity.as_ref().expect("identity was written");
                cx.err(
                    i,
                    format!("{key}.identity"),
                    "identity `x509` needs `cert_file` and `key_file`",
                );
                return None;
            }
        },
    };
    let publishing_interval = d.publishing_interval.as_ref().map_or(Duration::from_secs(1), |v| {
        cx.range(&secs(v), &format!("{key}.publishing_interval"), 0.01, 3600.0);
        v.get_ref().0
    });
    let polling = match &d.mode {
        None => false,
        Some(m) => cx.choice(m, &format!("{key}.mode"), &[("subscription", false), ("polling", true)])?,
    };
    let server_timestamp = match &d.timestamps {
        None => false,
        Some(m) => cx.choice(m, &format!("{key}.timestamps"), &[("source", false), ("server", true)])?,
    };
    let poll_interval = d.poll_interval.as_ref().map_or(Duration::from_secs(1), |v| {
        cx.range(&secs(v), &format!("{key}.poll_interval"), 0.01, 86_400.0);
        v.get_ref().0
    });
    let timeout = d.timeout.as_ref().map_or(Duration::from_secs(5), |v| {
        cx.range(&secs(v), &format!("{key}.timeout"), 0.1, 120.0);
        v.get_ref().0
    });
    let mut plan = DevicePlan {
        id: d.id.get_ref().clone(),
        address: url.clone(),
        poll_interval,
        timeout,
        max_gap_registers: 0,
        max_gap_bits: 0,
        max_registers_per_read: 0,
        max_bits_per_read: 0,
        tags: Vec::new(),
        serial: None,
        sensor: None,
        mqtt: None,
        opcua: Some(OpcUaDevicePlan {
            endpoint: url.clone(),
            security_policy: policy,
            security_mode: mode,
            identity,
            publishing_interval,
            polling,
            server_timestamp,
        }),
    };
    let mut names = HashSet::new();
    for (ti, t) in d.tags.iter().enumerate() {
        let key = format!("{key}.tags[{ti}]");
        cx.name(&t.name, &format!("{key}.name"), false);
        declared.insert(format!("{}.{}", d.id.get_ref(), t.name.get_ref()));
        if !names.insert(t.name.get_ref().clone()) {
            let msg = format!("duplicate tag name `{}` in device `{}`", t.name.get_ref(), plan.id);
            cx.err(&t.name, format!("{key}.name"), msg);
        }
        let modbus_only = pick(
            &tag_spans(t),
            &["table", "address", "byte_order", "bit", "length", "unit_id"],
        );
        not_for(cx, &modbus_only, &key, "opcua");
        let Some(node) = &t.node_id else {
            cx.err(
                &t.name,
                format!("{key}.node_id"),
                "an opcua tag needs `node_id`, e.g. \"ns=2;s=Oven.Zone1\"",
            );
            continue;
        };
        let text = node.get_ref();
        if t.namespace_uri.is_some() && text.starts_with("ns=") {
            cx.err(
                node,
                format!("{key}.node_id"),
                "with `namespace_uri`, write the NodeId without `ns=`",
            );
            continue;
        }
        if text.parse::<opcua::types::NodeId>().is_err() {
            cx.err(node, format!("{key}.node_id"), format!("`{text}` is not a NodeId")).help =
                Some("forms: i=2258, ns=2;s=Oven.Zone1, ns=1;g=09087e75-8e5e-499b-954f-f2a9603db28a, ns=1;b=M/RbKBsRVkePCePcx24oRA==".into());
            continue;
        }
        let (type_name, data_type) = match &t.data_type {
            None => ("Double".to_string(), DataType::F64),
            Some(ty) => {
                let Some((n, dt)) = cx.choice(ty, &format!("{key}.type"), &OPCUA_TYPES.map(|(n, dt)| (n, (n, dt))))
                else {
                    continue;
                };
                (n.to_string(), dt)
            }
        };
        let deadband = match (&t.deadband, &t.deadband_type) {
            (None, None) => None,
            (None, Some(dt)) => {
                cx.err(dt, format!("{key}.deadband_type"), "`deadband_type` needs `deadband`");
                None
            }
            (Some(v), dt) => {
                let x = *v.get_ref();
                if !(x.is_finite() && x >= 0.0) {
                    cx.err(v, format!("{key}.deadband"), "deadband must be a finite number >= 0");
                }
                match dt {
                    None => Some(Deadband::Absolute(x)),
                    Some(dt) => match cx.choice(
                        dt,
                        &format!("{key}.deadband_type"),
                        &[("absolute", false), ("percent", true)],
                    ) {
                        Some(true) if x > 100.0 => {
                            cx.err(v, format!("{key}.deadband"), "a percent deadband is at most 100");
                            None
                        }
                        Some(true) => Some(Deadband::Percent(x)),
                        Some(false) => Some(Deadband::Absolute(x)),
                        None => None,
                    },
                }
            }
        };
        let queue_size = t
            .queue_size
            .as_ref()
            .and_then(|q| cx.range(q, &format!("{key}.queue_size"), 1, 10_000))
            .unwrap_or(1) as u32;
        let sampling_interval = t.sampling_interval.as_ref().map_or(publishing_interval, |v| {
            cx.range(&secs(v), &format!("{key}.sampling_interval"), 0.0, 3600.0);
            v.get_ref().0
        });
        let numeric = matches!(data_type, DataType::I64 | DataType::U64 | DataType::F64);
        let is_array = t.array.unwrap_or(false);
        let scale = match &t.scale {
            Some(s) if !numeric || is_array => {
                cx.err(s, format!("{key}.scale"), "scale applies only to numeric scalar tags");
                continue;
            }
            Some(s) => *s.get_ref(),
            None => 1.0,
        };
        plan.tags.push(tags.len());
        tags.push(TagPlan {
            device: di,
            name: t.name.get_ref().into(),
            unit_id: 0,
            table: Table::Holding,
            address: 0,
            data_type: if is_array { DataType::Array } else { data_type },
            byte_order: ByteOrder::Abcd,
            bit: None,
            scale,
            offset: t.offset.unwrap_or(0.0),
            sensor_channel: None,
            mqtt: None,
            opcua: Some(Box::new(OpcUaTagPlan {
                node_id: text.clone(),
                namespace_uri: t.namespace_uri.clone(),
                sampling_interval,
                queue_size,
                deadband,
                type_name,
            })),
        });
    }
    Some(plan)
}

/// The governance file's rules as product checks need them.
struct Rules {
    plan: GovernancePlan,
    template: String,
    required: Vec<String>,
    domains: Vec<(String, Vec<String>)>,
    /// How messages name the governance file.
    file: String,
}

const ACTIONS: [&str; 5] = ["pass", "coarsen", "pseudonymise", "mask", "never"];

fn action_of(cx: &mut Ctx, name: &Spanned<String>, step: Option<&Spanned<f64>>, key: &str) -> Option<EdgeAction> {
    let options: Vec<(&str, &str)> = ACTIONS.iter().map(|a| (*a, *a)).collect();
    let a = cx.choice(name, key, &options)?;
    Some(match a {
        "pass" => EdgeAction::Pass,
        "coarsen" => match step {
            Some(s) if s.get_ref().is_finite() && *s.get_ref() > 0.0 => EdgeAction::Coarsen(*s.get_ref()),
            Some(s) => {
                cx.err(s, key.replace("action", "step"), "`step` must be a number > 0");
                return None;
            }
            None => {
                cx.err(
                    name,
                    key.replace("action", "step"),
                    "`coarsen` needs `step` (values are rounded to a multiple of it)",
                );
                return None;
            }
        },
        "pseudonymise" => EdgeAction::Pseudonymise,
        "mask" => EdgeAction::Mask,
        _ => EdgeAction::Never,
    })
}

fn governance_rules(cx: &mut Ctx, g: raw::Governance) -> Rules {
    let file = cx.src.path.display().to_string();
    let base = cx.src.path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut plan = GovernancePlan {
        file: Some(cx.src.path.to_path_buf()),
        ..GovernancePlan::default()
    };
    let mut template = DEFAULT_TOPIC_TEMPLATE.to_string();
    if let Some(t) = &g.topic_template {
        if check_template(cx, t) {
            template = t.get_ref().clone();
        }
    }
    if !g.classes.is_empty() {
        plan.classes.clear();
        for (name, class) in &g.classes {
            if let Some(a) = action_of(
                cx,
                &class.action,
                class.step.as_ref(),
                &format!("classes.{name}.action"),
            ) {
                plan.classes.insert(name.clone(), a);
            }
        }
    }
    let class_names: Vec<String> = plan.classes.keys().cloned().collect();
    let known = |cx: &mut Ctx, c: &Spanned<String>, key: &str| {
        if !class_names.contains(c.get_ref()) {
            let help =
                closest(c.get_ref(), class_names.iter().map(String::as_str)).map(|b| format!("did you mean `{b}`?"));
            cx.err(c, key, format!("unknown classification `{}`", c.get_ref())).help = help;
            false
        } else {
            true
        }
    };
    if let Some(d) = &g.default_classification {
        if known(cx, d, "default_classification") {
            plan.default_class = d.get_ref().clone();
        }
    } else if !plan.classes.contains_key(&plan.default_class) {
        let first = plan.classes.keys().next().cloned().unwrap_or_default();
        cx.whole(
            "default_classification",
            format!("there is no class `internal`: set default_classification (e.g. \"{first}\")"),
        );
    }
    if !g.egress.allow_classes.is_empty() {
        let mut allowed = Vec::new();
        for (i, c) in g.egress.allow_classes.iter().enumerate() {
            if known(cx, c, &format!("egress.allow_classes[{i}]")) {
                allowed.push(c.get_ref().clone());
            }
        }
        plan.allow_classes = Some(allowed);
    }
    plan.allow_topic_prefixes = g
        .egress
        .allow_topic_prefixes
        .iter()
        .map(|p| p.get_ref().clone())
        .collect();
    plan.key_file = g.pseudonymise_key_file.as_ref().map(|k| base.join(k.get_ref()));
    let mut required = Vec::new();
    for (i, r) in g.required_metadata.iter().enumerate() {
        if let Some(name) = cx.choice(
            r,
            &format!("required_metadata[{i}]"),
            &[
                ("description", "description"),
                ("contact", "contact"),
                ("status", "status"),
                ("unit", "unit"),
            ],
        ) {
            required.push(name.to_string());
        }
    }
    let domains = g
        .domains
        .iter()
        .map(|d| {
            (
                d.domain.get_ref().clone(),
                d.topic_prefixes.iter().map(|p| p.get_ref().clone()).collect(),
            )
        })
        .collect();
    Rules {
        plan,
        template,
        required,
        domains,
        file,
    }
}

/// A field's classification and the edge action that applies to it; a product may tighten its
/// class's action, never weaken it.
fn field_governance(
    cx: &mut Ctx,
    f: &raw::Field,
    key: &str,
    logical: LogicalType,
    rules: &Rules,
) -> Option<(String, EdgeAction)> {
    let class = match &f.classification {
        Some(c) => {
            if !rules.plan.classes.contains_key(c.get_ref()) {
                let help = closest(c.get_ref(), rules.plan.classes.keys().map(String::as_str))
                    .map(|b| format!("did you mean `{b}`?"));
                let msg = format!(
                    "unknown classification `{}` (the classes of {} are: {})",
                    c.get_ref(),
                    rules.file,
                    rules.plan.classes.keys().cloned().collect::<Vec<_>>().join(", ")
                );
                cx.err(c, format!("{key}.classification"), msg).help = help;
                return None;
            }
            c.get_ref().clone()
        }
        None => rules.plan.default_class.clone(),
    };
    let required = rules.plan.classes[&class];
    let upstream = rules.plan.allow_classes.as_ref().is_none_or(|a| a.contains(&class));
    let mut action = if upstream { required } else { EdgeAction::Never };
    if let Some(a) = &f.action {
        let chosen = action_of(cx, a, f.step.as_ref(), &format!("{key}.action"))?;
        if chosen.rank() < action.rank() {
            let rule = if upstream {
                format!(
                    "rule `classes.{class}.action = \"{}\"` in {}",
                    required.name(),
                    rules.file
                )
            } else {
                format!(
                    "rule `egress.allow_classes` in {} (class `{class}` may not leave the site)",
                    rules.file
                )
            };
            let msg = format!(
                "`{}` weakens governance: class `{class}` requires `{}` ({rule})",
                chosen.name(),
                action.name()
            );
            cx.err(a, format!("{key}.action"), msg).help =
                Some(format!("use `{}` or a stricter action", action.name()));
            return None;
        }
        action = chosen;
    } else if let Some(s) = &f.step {
        cx.err(s, format!("{key}.step"), "`step` applies only to action = \"coarsen\"");
    }
    if matches!(action, EdgeAction::Coarsen(_)) && !matches!(logical, LogicalType::Number | LogicalType::Integer) {
        cx.err(
            &f.name,
            format!("{key}.action"),
            "`coarsen` applies only to numeric fields",
        );
        return None;
    }
    if action == EdgeAction::Pseudonymise && rules.plan.key_file.is_none() {
        let msg = format!(
            "field `{}` must be pseudonymised (class `{class}`), but {} names no `pseudonymise_key_file`",
            f.name.get_ref(),
            rules.file
        );
        cx.err(&f.name, format!("{key}.classification"), msg);
        return None;
    }
    Some((class, action))
}
