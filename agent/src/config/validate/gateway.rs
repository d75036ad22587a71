//! The gateway file: agent identity, the buffer, the upstream broker, and the devices, each device
//! validated in its kind's room (`sources/<kind>/config.rs`) after the keys of other kinds are refused.

use super::ctx::refuse_foreign_keys;
use super::*;
use crate::sources::{mqtt, sensor, DevicePlan, Protocol};
use toml::Spanned;

/// The gateway file, validated.
pub(super) struct GatewayParts {
    pub agent: AgentPlan,
    pub upstream: Option<UpstreamPlan>,
    pub buffer: BufferPlan,
    pub devices: Vec<DevicePlan>,
    pub table: TagTable,
    /// The id of every device of the file, valid or not, by its place in the file: what a tag's
    /// device index means while a device that failed its checks is missing from `devices`.
    pub device_ids: Vec<String>,
}

pub(super) fn plan(cx: &mut Ctx, gw: raw::Gateway, rules: &Rules) -> GatewayParts {
    let a = &gw.agent;
    cx.name(&a.id, "agent.id", true);
    cx.name(&a.site, "agent.site", true);
    cx.name(&a.area, "agent.area", true);
    cx.name(&a.line, "agent.line", true);
    for (v, key, placeholder) in [
        (&a.enterprise, "agent.enterprise", "{enterprise}"),
        (&a.cell, "agent.cell", "{cell}"),
    ] {
        match v {
            Some(v) => cx.name(v, key, true),
            None if rules.template.contains(placeholder) => {
                cx.err(
                    &a.id,
                    key,
                    format!(
                        "the topic template of {} places `{placeholder}`, but [agent] has no `{}`",
                        rules.file,
                        &key[6..]
                    ),
                )
                .help = Some(format!("add {} = \"...\" under [agent]", &key[6..]));
            }
            None => {}
        }
    }
    let base = cx.src.path.parent().map(Path::to_path_buf).unwrap_or_default();
    let data_dir = a
        .data_dir
        .as_deref()
        .map_or_else(|| PathBuf::from("/var/lib/plantmesh"), |d| base.join(d));
    let sli_interval = a.sli_interval.as_ref().map_or(Duration::from_secs(10), |v| {
        cx.range(&secs(v), "agent.sli_interval", 0.1, 3600.0);
        v.get_ref().0
    });
    let watch_config = a.watch_config.as_ref().map(|v| {
        cx.range(&secs(v), "agent.watch_config", 0.1, 3600.0);
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
        enterprise: a.enterprise.as_ref().map(|v| v.get_ref().clone()),
        cell: a.cell.as_ref().map(|v| v.get_ref().clone()),
        data_dir,
        sli_interval,
        watch_config,
        metrics_listen,
        metrics_required: a.metrics_listen.as_ref().is_some_and(|m| m.get_ref() != "off"),
    };
    let encoding_at = gw.upstream.as_ref().and_then(|u| u.encoding.clone());
    let upstream = gw
        .upstream
        .and_then(|u| upstream_plan(cx, u, &agent.id, &agent.site, &base, "upstream"));
    // Sparkplug data goes to its own topic namespace: the egress allow-list must admit it.
    if let (Some(sp), Some(at)) = (upstream.as_ref().and_then(|u| u.sparkplug.as_ref()), &encoding_at) {
        let topic = crate::sparkplug::topic(&sp.group_id, crate::sparkplug::Kind::DData, &sp.edge_node_id, Some("x"));
        if rules.egress_written && !rules.plan.allows_topic(&topic) {
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
    let commit_before_send = gw.buffer.write.as_ref().is_some_and(|w| {
        cx.choice(w, "buffer.write", &[("unacknowledged", false), ("always", true)])
            .unwrap_or(false)
    });
    let free_space_warning = match &gw.buffer.free_space_warning {
        Some(v) => {
            let b = Spanned::new(v.span(), v.get_ref().0);
            cx.range(&b, "buffer.free_space_warning", 0, 1 << 40)
                .unwrap_or(64 << 20)
        }
        None => 64 << 20,
    };
    let buffer = BufferPlan {
        max_bytes,
        commit_interval,
        commit_before_send,
        free_space_warning,
    };

    let mut devices = Vec::new();
    let mut table = TagTable::default();
    let mut device_ids: HashMap<String, usize> = HashMap::new();
    for (di, d) in gw.devices.iter().enumerate() {
        let key = format!("devices[{di}]");
        cx.name(&d.id, &format!("{key}.id"), false);
        if device_ids.insert(d.id.get_ref().clone(), di).is_some() {
            let msg = format!("duplicate device id `{}`", d.id.get_ref());
            cx.err(&d.id, format!("{key}.id"), msg);
        }
        let Some(protocol) = cx.choice(&d.protocol, &format!("{key}.protocol"), &Protocol::ALL) else {
            continue;
        };
        refuse_foreign_keys(cx, d, &key, protocol);
        let input = DeviceInput {
            raw: d,
            key: &key,
            index: di,
            base: &base,
            agent_id: &agent.id,
        };
        if let Some(plan) = protocol.validate(cx, &input, &mut table) {
            tag_classes(cx, d, &key, &plan, &mut table, rules);
            devices.push(plan);
        }
    }
    GatewayParts {
        agent,
        upstream,
        buffer,
        devices,
        table,
        device_ids: gw.devices.iter().map(|d| d.id.get_ref().clone()).collect(),
    }
}

/// Records the classification each tag of a device names, refusing a class the governance file
/// does not have.
fn tag_classes(cx: &mut Ctx, d: &raw::Device, key: &str, plan: &DevicePlan, table: &mut TagTable, rules: &Rules) {
    let by_name: HashMap<&str, (usize, &Spanned<String>)> = d
        .tags
        .iter()
        .enumerate()
        .filter_map(|(ti, t)| t.classification.as_ref().map(|c| (t.name.get_ref().as_str(), (ti, c))))
        .collect();
    for (ti, t) in d.tags.iter().enumerate() {
        if let Some(c) = &t.classification {
            rules.known_class(cx, c, &format!("{key}.tags[{ti}].classification"));
        }
    }
    for &i in plan.tags.iter() {
        if let Some((_, c)) = by_name.get(&*table.tags[i].name) {
            table.classes.insert(i, (*c).clone());
        }
    }
}

/// Tags that product fields add: sensor-node channels need no tag of their own (a field
/// `<node>.<channel name>` adds one, matched by name against the node's hello at run time), and a
/// field naming an instance of an MQTT template tag adds that instance. Product files are only
/// skimmed here; their real parse reports any problem with them.
pub(super) fn tags_from_products(products: &[(PathBuf, String)], devices: &mut [DevicePlan], table: &mut TagTable) {
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
    let adds_tags = |d: &DevicePlan| matches!(d.kind.protocol(), Protocol::SensorNode | Protocol::Mqtt);
    if !devices.iter().any(adds_tags) {
        return;
    }
    // Per device, the tags added here (a device's tag list is shared by its source task, not grown).
    let mut added: Vec<Vec<usize>> = vec![Vec::new(); devices.len()];
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
            if table.declared.contains(src) {
                continue;
            }
            let tag = match devices[di].kind.protocol() {
                Protocol::SensorNode => sensor::config::skimmed_tag(di, name).map(|t| (t, None)),
                Protocol::Mqtt => mqtt::config::instantiate(&table.templates, di, name),
                _ => None,
            };
            let Some((tag, class)) = tag else {
                continue;
            };
            table.declared.insert(src.to_string());
            added[di].push(table.tags.len());
            if let Some(c) = class {
                table.classes.insert(table.tags.len(), c);
            }
            table.tags.push(tag);
        }
    }
    for (d, more) in devices.iter_mut().zip(added) {
        if !more.is_empty() {
            d.tags = d.tags.iter().copied().chain(more).collect();
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{load_texts, Diagnostics};
    use crate::sources::Protocol;
    use std::path::Path;

    /// A value of the right type for each protocol-specific key, so that only its kind can object.
    fn value(key: &str, tag: bool) -> &'static str {
        match key {
            "address" if tag => "1",
            "allow_insecure_credentials" => "true",
            "baud"
            | "stop_bits"
            | "data_bits"
            | "unit_id"
            | "max_gap"
            | "max_registers_per_read"
            | "max_bits_per_read"
            | "queue_size"
            | "bit"
            | "length"
            | "channel" => "1",
            "scale" | "deadband" => "1.0",
            "inter_frame"
            | "stale_after"
            | "publishing_interval"
            | "poll_interval"
            | "timeout"
            | "sampling_interval" => "\"1s\"",
            "max_message_bytes" => "\"1MiB\"",
            _ => "\"x\"",
        }
    }

    fn minimal(protocol: Protocol) -> &'static str {
        match protocol {
            Protocol::ModbusTcp => "address = \"127.0.0.1:502\"",
            Protocol::ModbusRtu => "port = \"/dev/ttyUSB0\"",
            Protocol::OpcUa => "endpoint = \"opc.tcp://127.0.0.1:4840\"",
            Protocol::SensorNode => "port = \"/dev/ttyACM0\"",
            Protocol::Mqtt => "url = \"mqtt://127.0.0.1:1883\"",
        }
    }

    fn check(gateway: &str) -> Vec<String> {
        let err = load_texts((Path::new("agent.toml"), gateway), None, &[], Path::new("/tmp"))
            .err()
            .unwrap_or(Diagnostics(Vec::new()));
        err.0.iter().map(|d| format!("{}: {}", d.key, d.message)).collect()
    }

    /// Every protocol-specific key that some kind reads is refused, where it is written, by every
    /// kind that does not read it: a kind's key list is the whole truth about what it accepts.
    #[test]
    fn each_kind_refuses_the_keys_of_the_others() {
        let all = |tag: bool| -> Vec<&'static str> {
            let mut v: Vec<&str> = Protocol::ALL
                .iter()
                .flat_map(|(_, p)| if tag { p.keys().1 } else { p.keys().0 }.iter().copied())
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let head =
            "[agent]\nid = \"gw\"\nsite = \"s\"\narea = \"a\"\nline = \"l\"\ngovernance = \"builtin-defaults\"\n";
        let mut refused = 0;
        for (name, protocol) in Protocol::ALL {
            let (device_keys, tag_keys) = protocol.keys();
            for key in all(false).into_iter().filter(|k| !device_keys.contains(k)) {
                let gw = format!(
                    "{head}[[devices]]\nid = \"d\"\nprotocol = \"{name}\"\n{}\n{key} = {}\n",
                    minimal(protocol),
                    value(key, false)
                );
                let want = format!("devices[0].{key}: `{key}` does not apply to {name} devices");
                assert!(check(&gw).contains(&want), "{name} took `{key}`: {:?}", check(&gw));
                refused += 1;
            }
            for key in all(true).into_iter().filter(|k| !tag_keys.contains(k)) {
                let gw = format!(
                    "{head}[[devices]]\nid = \"d\"\nprotocol = \"{name}\"\n{}\n[[devices.tags]]\nname = \"t\"\n{key} = {}\n",
                    minimal(protocol),
                    value(key, true)
                );
                let want = format!("devices[0].tags[0].{key}: `{key}` does not apply to {name} devices");
                assert!(check(&gw).contains(&want), "{name} tag took `{key}`: {:?}", check(&gw));
                refused += 1;
            }
        }
        assert!(refused > 80, "{refused} refusals checked");
    }

    /// The kinds' key lists name only keys the raw device and tag types have (a typo in a list
    /// would make a key silently unusable).
    #[test]
    fn key_lists_name_real_keys() {
        let gw = "[agent]\nid = \"gw\"\nsite = \"s\"\narea = \"a\"\nline = \"l\"\ngovernance = \"builtin-defaults\"\n";
        let raw: crate::config::raw::Gateway = toml::from_str(&format!(
            "{gw}[[devices]]\nid = \"d\"\nprotocol = \"modbus_tcp\"\n[[devices.tags]]\nname = \"t\"\n"
        ))
        .unwrap();
        let device: Vec<&str> = raw.devices[0].written_keys().iter().map(|(k, _)| *k).collect();
        let tag: Vec<&str> = raw.devices[0].tags[0].written_keys().iter().map(|(k, _)| *k).collect();
        for (name, p) in Protocol::ALL {
            for k in p.keys().0 {
                assert!(device.contains(k), "{name}: device key `{k}`");
            }
            for k in p.keys().1 {
                assert!(tag.contains(k), "{name}: tag key `{k}`");
            }
        }
    }
}
