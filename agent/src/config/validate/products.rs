//! Product files, owned by domain teams: identity, publishing, buffer share, service levels and
//! fields, each field checked against the gateway's tags and the governance rules.

use super::governance::{field_governance, Floor, Rules};
use super::*;
use crate::config::diag::closest;
use std::collections::HashSet;
use toml::Spanned;

/// The gateway's tags as product files see them.
#[derive(Clone, Copy)]
pub(super) struct TagIndex<'a> {
    pub tags: &'a [TagPlan],
    pub by_ref: &'a HashMap<String, usize>,
    /// Every tag written, valid or not.
    pub declared: &'a HashSet<String>,
    /// The least treatment each classified tag requires: its class in the gateway file, or the
    /// strictest one any product gives a field reading it.
    pub floors: &'a HashMap<usize, Floor>,
}

/// Topics of the products planned so far: a field's UNS topic may be no other field's and none of
/// a product's own (its messages, `_descriptor`, `_contract`, `_sli`, `_gaps`), or one would
/// overwrite the other's retained value at the broker.
#[derive(Default)]
pub(super) struct Topics {
    /// Topic -> the product owning it.
    own: HashMap<String, String>,
    /// UNS topic -> `product.field`.
    uns: HashMap<String, String>,
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

pub(super) fn plan(
    cx: &mut Ctx,
    p: raw::Product,
    agent: &AgentPlan,
    buffer: &BufferPlan,
    tags: &TagIndex,
    rules: &Rules,
    topics: &mut Topics,
) -> Option<ProductPlan> {
    let template = rules.template.as_str();
    let TagIndex {
        tags,
        by_ref,
        declared,
        floors,
    } = *tags;
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
    let uns = p.publish.uns.as_ref().is_some_and(|u| *u.get_ref());
    for (fi, f) in p.fields.iter().enumerate() {
        let key = format!("fields[{fi}]");
        cx.name(&f.name, &format!("{key}.name"), false);
        if uns && f.name.get_ref().starts_with('_') {
            // `{base}/_descriptor`, `_sli`, `_gaps` are the agent's own: a field's UNS topic there
            // would overwrite the product's contract or its service levels at the broker.
            let msg = format!(
                "with `[publish] uns`, field `{}` would be published on `{{topic}}/{}`, beside the agent's own `_descriptor`, `_sli` and `_gaps`: a UNS field name may not begin with `_`",
                f.name.get_ref(),
                f.name.get_ref()
            );
            cx.err(&f.name, format!("{key}.name"), msg).help = Some("rename the field".into());
        }
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
        let floor = match &source {
            FieldSource::Tag(t) => floors.get(t).cloned(),
            FieldSource::Derived(d) => match inherited(cx, f, &key, d, &fields) {
                Some(floor) => floor,
                None => continue,
            },
        };
        let Some((classification, action)) = field_governance(cx, f, &key, logical_type, rules, floor.as_ref()) else {
            continue;
        };
        if let (FieldSource::Derived(_), Some(fl)) = (&source, &floor) {
            // A value computed from one that never leaves would reveal it: only a field that never
            // leaves either may derive from it, and it must say so.
            if fl.action == EdgeAction::Never && !says_never(f, rules) {
                let msg = format!(
                    "field `{}` derives from {}, which never leaves the site: the derived value would reveal it",
                    f.name.get_ref(),
                    fl.why
                );
                cx.err(&f.name, format!("{key}.inputs"), msg).help = Some(
                    "derive from fields that may leave, or say that this one never leaves either (action = \"never\")"
                        .into(),
                );
                continue;
            }
        }
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
            Some(r) => Some((r.get_ref()[0], r.get_ref()[1])),
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
            classification: shared.get(&classification),
            action,
            required: f.required,
            aggregate,
            shape: crate::config::FieldShape {
                scale,
                offset,
                deadband,
                range,
                description: f.description.as_str().into(),
            }
            .boxed(),
        });
    }
    let fill = |template: &str| {
        template
            .replace("{enterprise}", agent.enterprise.as_deref().unwrap_or_default())
            .replace("{cell}", agent.cell.as_deref().unwrap_or_default())
            .replace("{site}", &agent.site)
            .replace("{area}", &agent.area)
            .replace("{line}", &agent.line)
            .replace("{domain}", p.domain.get_ref())
            .replace("{product}", id)
            .replace("{major}", &major.to_string())
    };
    let topic = fill(template);
    let uns_topic = fill(&rules.uns_template).replace("{topic}", &topic);
    uns_topics(cx, &p, &fields, (&topic, &uns_topic, uns), rules, topics);
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
    // Without an [egress] table nothing may leave: said once, at the governance file.
    if rules.egress_written && !rules.plan.allows_topic(&topic) {
        let allowed = &rules.plan.allow_topic_prefixes;
        let msg = format!(
            "topic `{topic}` is outside the egress allow-list (rule `egress.allow_topic_prefixes` in {}: {})",
            rules.file,
            if allowed.is_empty() {
                "empty, so nothing may leave".to_string()
            } else {
                allowed.join(", ")
            }
        );
        cx.err(&p.domain, "domain", msg).help = Some(format!(
            "add a prefix of `{topic}` to egress.allow_topic_prefixes in {} (\"#\" alone allows any topic)",
            rules.file
        ));
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
        None => Qos::AtLeastOnce,
        Some(q) if *q.get_ref() == 1 => Qos::AtLeastOnce,
        Some(q) if *q.get_ref() == 2 => Qos::ExactlyOnce,
        Some(q) => {
            cx.err(
                q,
                "publish.qos",
                format!("QoS {} is not offered: use 1 or 2", q.get_ref()),
            )
            .help = Some("QoS 0 would give up at-least-once delivery".into());
            Qos::AtLeastOnce
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
        uns,
        uns_topic,
        max_records_per_message,
        service_levels,
        file: cx.src.path.to_path_buf(),
    })
}

/// The UNS topic of each field that leaves the site, checked as a product topic is (egress, the
/// domain's prefixes) and against every topic taken so far; then this product's topics are taken.
fn uns_topics(
    cx: &mut Ctx,
    p: &raw::Product,
    fields: &[FieldPlan],
    (topic, uns_topic, uns): (&str, &str, bool),
    rules: &Rules,
    topics: &mut Topics,
) {
    let id = p.id.get_ref();
    let own = ["", "/_descriptor", "/_contract", "/_sli", "/_gaps"].map(|s| format!("{topic}{s}"));
    for t in &own {
        if let Some(field) = topics.uns.get(t) {
            let msg = format!("topic `{t}` of this product is the UNS topic of field `{field}`");
            cx.err(&p.id, "id", msg).help = Some("change uns_topic_template in the governance file".into());
        }
    }
    for t in own {
        topics.own.entry(t).or_insert_with(|| id.clone());
    }
    if !uns {
        return;
    }
    let domain = rules.domains.iter().find(|(d, _)| d == p.domain.get_ref());
    for (fi, f) in p.fields.iter().enumerate() {
        let name = f.name.get_ref();
        if name.starts_with('_') {
            continue; // refused already: it would shadow the agent's own topics
        }
        // Nothing of a withheld field, not even its topic: nothing to check.
        match fields.iter().find(|planned| planned.name == name.as_str()) {
            Some(planned) if planned.action != EdgeAction::Never => {}
            _ => continue,
        }
        let key = format!("fields[{fi}].name");
        let t = uns_topic.replace("{field}", name);
        if rules.egress_written && !rules.plan.allows_topic(&t) {
            let msg = format!(
                "the UNS topic `{t}` of field `{name}` is outside the egress allow-list (rule `egress.allow_topic_prefixes` in {})",
                rules.file
            );
            cx.err(&f.name, key, msg).help = Some(format!(
                "add a prefix of `{t}` to egress.allow_topic_prefixes, or change uns_topic_template, in {}",
                rules.file
            ));
            continue;
        }
        if let Some((d, prefixes)) = domain.filter(|(_, pre)| !pre.iter().any(|pre| t.starts_with(pre.as_str()))) {
            let msg = format!(
                "the UNS topic `{t}` of field `{name}` is not under the prefixes domain `{d}` may use (rule `domains` in {}: {})",
                rules.file,
                prefixes.join(", ")
            );
            cx.err(&f.name, key, msg);
            continue;
        }
        let taken = topics
            .own
            .get(&t)
            .map(|owner| format!("a topic of product `{owner}`"))
            .or_else(|| {
                topics
                    .uns
                    .get(&t)
                    .map(|other| format!("the UNS topic of field `{other}`"))
            });
        if let Some(taken) = taken {
            let msg = format!("the UNS topic `{t}` of field `{name}` is already {taken}");
            cx.err(&f.name, key, msg).help =
                Some("rename the field, or change uns_topic_template in the governance file".into());
            continue;
        }
        topics.uns.insert(t, format!("{id}.{name}"));
    }
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
                    format!(
                        "`{}` is not a tag of the gateway file (write <device>.<tag>)",
                        r.escape_debug()
                    ),
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

/// The strictest treatment of a derived field's inputs; `Some(None)` when none of them needs one
/// beyond the default, `None` when they cannot be covered by one treatment (reported).
fn inherited(cx: &mut Ctx, f: &raw::Field, key: &str, d: &Derivation, built: &[FieldPlan]) -> Option<Option<Floor>> {
    let mut floor: Option<Floor> = None;
    for &i in &d.inputs {
        let input = &built[i];
        let this = Floor {
            class: input.classification.to_string(),
            action: input.action,
            why: format!("input `{}` (class `{}`)", input.name, input.classification),
        };
        floor = match floor {
            None => Some(this),
            Some(prev) => match prev.action.stricter(this.action) {
                Some(a) if a == prev.action => Some(prev),
                Some(_) => Some(this),
                None => {
                    let msg = format!(
                        "field `{}` derives from {} and {}, coarsened to steps no one step covers",
                        f.name.get_ref(),
                        prev.why,
                        this.why
                    );
                    cx.err(&f.name, format!("{key}.inputs"), msg).help =
                        Some("set action = \"coarsen\" with a step that is a whole multiple of both".into());
                    return None;
                }
            },
        };
    }
    Some(floor)
}

/// True when a field says by itself that it never leaves: `action = "never"`, or a class whose
/// action is `never` (or that may not go upstream at all).
fn says_never(f: &raw::Field, rules: &Rules) -> bool {
    let by_action = f.action.as_ref().is_some_and(|a| a.get_ref() == "never");
    let by_class = f.classification.as_ref().is_some_and(|c| {
        rules.plan.classes.get(c.get_ref()) == Some(&EdgeAction::Never)
            || rules
                .plan
                .allow_classes
                .as_ref()
                .is_some_and(|a| !a.contains(c.get_ref()))
    });
    by_action || by_class
}
