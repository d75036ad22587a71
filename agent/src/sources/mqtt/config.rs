//! MQTT devices: the device-side broker, and tags addressed by topic (JSON, plain) or by Sparkplug
//! B metric. A tag whose topic (or Sparkplug address) has named wildcards (`+line`) is a template:
//! product fields name its instances (`{line}_temp` -> `line-1_temp`), and each instance reads the
//! topic with the captures filled in.

use crate::config::raw;
use crate::config::validate::{upstream_plan, Ctx, DeviceInput, TagTable};
use crate::config::{DataType, MqttVersion, UpstreamPlan};
use crate::sources::{DeviceKind, DevicePlan, TagKind, TagPlan};
use std::collections::HashSet;
use toml::Spanned;

/// Device keys an MQTT device reads (beside `id`, `protocol`, `tags`, and the broker's `client_id`,
/// `username`, `password_file`, `password_env`, `ca_file`, `cert_file`, `key_file`; `password` only
/// to refuse it).
pub const DEVICE_KEYS: &[&str] = &["url", "password", "allow_insecure_credentials", "max_message_bytes"];

/// The largest device message taken by default; a larger one is counted and skipped.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 1 << 20;

/// Tag keys of MQTT tags (beside `name`, `offset`).
pub const TAG_KEYS: &[&str] = &[
    "topic",
    "payload",
    "pointer",
    "timestamp_pointer",
    "sparkplug",
    "metric",
    "type",
    "scale",
];

/// A device-side MQTT broker: how to connect (the same settings as upstream; always MQTT 3.1.1,
/// which every broker speaks, with a clean session: a replayed backlog would only be stale data).
#[derive(Debug, Clone)]
pub struct MqttDevicePlan {
    pub broker: UpstreamPlan,
}

/// How an MQTT tag finds its value in a message.
#[derive(Debug, Clone, PartialEq)]
pub enum MqttPayload {
    /// A JSON document: the value at `pointer`, the time at `timestamp` (else the arrival time).
    Json { pointer: String, timestamp: Option<String> },
    /// The payload is the value, as text (`21.5`, `true`, `RUNNING`).
    Plain,
    /// A Sparkplug B metric of an edge node or device.
    Sparkplug {
        group: String,
        node: String,
        device: Option<String>,
        metric: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct MqttTagPlan {
    /// The topic messages for this tag arrive on (JSON, plain), with every capture filled in.
    pub topic: String,
    /// The filter the device subscribes to for it (captures as `+`).
    pub filter: String,
    pub payload: MqttPayload,
}

/// The lineage of an MQTT tag (the descriptor adds device and tag).
pub fn lineage(m: &MqttTagPlan, device: &DeviceKind) -> serde_json::Value {
    let mut l = serde_json::json!({
        "protocol": "mqtt",
        "broker": device.address(),
    });
    match &m.payload {
        MqttPayload::Json { pointer, timestamp } => {
            l["topic"] = serde_json::json!(m.topic);
            l["payload"] = serde_json::json!("json");
            l["pointer"] = serde_json::json!(pointer);
            l["timestamp_pointer"] = serde_json::json!(timestamp);
        }
        MqttPayload::Plain => {
            l["topic"] = serde_json::json!(m.topic);
            l["payload"] = serde_json::json!("plain");
        }
        MqttPayload::Sparkplug {
            group,
            node,
            device,
            metric,
        } => {
            l["payload"] = serde_json::json!("sparkplug");
            l["sparkplug"] = serde_json::json!({"group": group, "edge_node": node, "device": device, "metric": metric});
        }
    }
    l
}

/// The MQTT part of a tag; `None` for a tag of another kind (an MQTT device has none).
pub fn mqtt(tag: &TagPlan) -> Option<&MqttTagPlan> {
    match &tag.kind {
        TagKind::Mqtt(m) => Some(m),
        _ => None,
    }
}

/// A tag with captures, instantiated by the product fields that name it.
#[derive(Debug, Clone)]
pub(crate) struct Template {
    device: usize,
    /// The template's classification, which its instances inherit.
    pub class: Option<Spanned<String>>,
    name: Vec<Piece>,
    /// The tag as written, its topic and Sparkplug address still holding `+name` segments.
    proto: TagPlan,
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Lit(String),
    Cap(String),
}

pub(crate) fn device(cx: &mut Ctx, input: &DeviceInput, table: &mut TagTable) -> Option<DevicePlan> {
    let (d, key, di, base, agent_id) = (input.raw, input.key, input.index, input.base, input.agent_id);
    let Some(url) = &d.url else {
        cx.err(
            &d.protocol,
            format!("{key}.url"),
            "an mqtt device needs `url` (mqtt://host:port of the device-side broker)",
        );
        return None;
    };
    let id = d.id.get_ref().clone();
    let u = raw::Upstream {
        url: url.clone(),
        protocol: None,
        client_id: Some(
            d.client_id
                .clone()
                .unwrap_or_else(|| format!("plantmesh-{agent_id}-{id}")),
        ),
        keep_alive: None,
        username: d.username.clone(),
        password: d.password.clone(),
        password_file: d.password_file.clone(),
        password_env: d.password_env.clone(),
        allow_insecure_credentials: d.allow_insecure_credentials.clone(),
        ca_file: d.ca_file.clone(),
        cert_file: d.cert_file.clone(),
        key_file: d.key_file.clone().map(|k| Spanned::new(url.span(), k)),
        max_inflight: None,
        max_records_per_message: None,
        max_message_bytes: None,
        backlog_rate: None,
        backlog_bytes_per_second: None,
        reconnect_min: None,
        reconnect_max: None,
        encoding: None,
        sparkplug: None,
    };
    let mut broker = upstream_plan(cx, u, agent_id, "", base, key)?;
    broker.version = MqttVersion::V311;
    broker.max_message_bytes = match &d.max_message_bytes {
        Some(v) => {
            let b = Spanned::new(v.span(), v.get_ref().0);
            cx.range(&b, &format!("{key}.max_message_bytes"), 1 << 10, 64 << 20)
                .unwrap_or(DEFAULT_MAX_MESSAGE_BYTES) as usize
        }
        None => DEFAULT_MAX_MESSAGE_BYTES as usize,
    };
    let mut tags = Vec::new();
    let mut names = HashSet::new();
    for (ti, t) in d.tags.iter().enumerate() {
        let key = format!("{key}.tags[{ti}]");
        if !names.insert(t.name.get_ref().clone()) {
            let msg = format!("duplicate tag name `{}` in device `{id}`", t.name.get_ref());
            cx.err(&t.name, format!("{key}.name"), msg);
            continue;
        }
        let Some((tag, pieces)) = tag(cx, t, &key, di) else {
            table.declared.insert(format!("{id}.{}", t.name.get_ref()));
            continue;
        };
        if pieces.iter().any(|p| matches!(p, Piece::Cap(_))) {
            table.templates.push(Template {
                device: di,
                class: t.classification.clone(),
                name: pieces,
                proto: tag,
            });
        } else {
            table.declared.insert(format!("{id}.{}", t.name.get_ref()));
            tags.push(table.tags.len());
            table.tags.push(tag);
        }
    }
    Some(DevicePlan {
        id,
        tags: tags.into(),
        kind: DeviceKind::Mqtt(MqttDevicePlan { broker }),
    })
}

/// One tag: its plan (a template's still holds `+name` segments) and its name's pieces.
fn tag(cx: &mut Ctx, t: &raw::Tag, key: &str, di: usize) -> Option<(TagPlan, Vec<Piece>)> {
    let pieces = name_pieces(cx, &t.name, &format!("{key}.name"))?;
    let payload_kind = match (&t.payload, &t.sparkplug, &t.pointer) {
        (Some(p), _, _) => cx.choice(
            p,
            &format!("{key}.payload"),
            &[("json", "json"), ("plain", "plain"), ("sparkplug", "sparkplug")],
        )?,
        (None, Some(_), _) => "sparkplug",
        (None, None, Some(_)) => "json",
        (None, None, None) => "plain",
    };
    let at_name = |cx: &mut Ctx, k: &str, msg: String| {
        cx.err(&t.name, format!("{key}.{k}"), msg);
    };
    let (address, address_at, payload) = if payload_kind == "sparkplug" {
        if let Some(topic) = &t.topic {
            cx.err(
                topic,
                format!("{key}.topic"),
                "a sparkplug tag is addressed by `sparkplug` and `metric`, not `topic`",
            )
            .help = Some("e.g. sparkplug = \"plant/edge-1/filler\", metric = \"Line/Speed\"".into());
            return None;
        }
        for (k, v) in [("pointer", &t.pointer), ("timestamp_pointer", &t.timestamp_pointer)] {
            if let Some(v) = v {
                cx.err(v, format!("{key}.{k}"), format!("`{k}` applies to json payloads"));
            }
        }
        let (Some(sp), Some(metric)) = (&t.sparkplug, &t.metric) else {
            at_name(
                cx,
                "sparkplug",
                "a sparkplug tag needs `sparkplug` (group/edge_node[/device]) and `metric`".into(),
            );
            return None;
        };
        let segments: Vec<&str> = sp.get_ref().split('/').collect();
        if !(2..=3).contains(&segments.len())
            || segments
                .iter()
                .any(|s| s.is_empty() || s.contains('#') || (s.starts_with('+') && s.len() == 1))
        {
            cx.err(
                sp,
                format!("{key}.sparkplug"),
                format!("`{}` is not a Sparkplug address", sp.get_ref()),
            )
            .help = Some("write group/edge_node or group/edge_node/device; a segment may be a capture, +name".into());
            return None;
        }
        let payload = MqttPayload::Sparkplug {
            group: segments[0].to_string(),
            node: segments[1].to_string(),
            device: segments.get(2).map(|s| s.to_string()),
            metric: metric.get_ref().clone(),
        };
        (sp.get_ref().clone(), sp.clone(), payload)
    } else {
        for (k, v) in [("sparkplug", &t.sparkplug), ("metric", &t.metric)] {
            if let Some(v) = v {
                cx.err(v, format!("{key}.{k}"), format!("`{k}` applies to sparkplug payloads"));
            }
        }
        let Some(topic) = &t.topic else {
            at_name(cx, "topic", format!("a {payload_kind} tag needs `topic`"));
            return None;
        };
        if !valid_filter(topic.get_ref()) {
            cx.err(
                topic,
                format!("{key}.topic"),
                format!("`{}` is not a valid MQTT topic filter", topic.get_ref()),
            )
            .help = Some("`#` only as the last segment; `+` or `+name` as whole segments".into());
            return None;
        }
        let payload = if payload_kind == "json" {
            let pointer = match &t.pointer {
                Some(p) => json_pointer(cx, p, &format!("{key}.pointer"))?,
                None => String::new(),
            };
            let timestamp = match &t.timestamp_pointer {
                Some(p) => Some(json_pointer(cx, p, &format!("{key}.timestamp_pointer"))?),
                None => None,
            };
            MqttPayload::Json { pointer, timestamp }
        } else {
            for (k, v) in [("pointer", &t.pointer), ("timestamp_pointer", &t.timestamp_pointer)] {
                if let Some(v) = v {
                    cx.err(v, format!("{key}.{k}"), format!("`{k}` applies to json payloads"))
                        .help = Some("set payload = \"json\"".into());
                }
            }
            MqttPayload::Plain
        };
        (topic.get_ref().clone(), topic.clone(), payload)
    };
    // Every capture in the name is a wildcard of the address, and the other way round, so each
    // instance reads exactly one topic.
    let named: Vec<&str> = address
        .split('/')
        .filter_map(|s| s.strip_prefix('+'))
        .filter(|n| !n.is_empty())
        .collect();
    let caps: Vec<&str> = pieces
        .iter()
        .filter_map(|p| match p {
            Piece::Cap(c) => Some(c.as_str()),
            Piece::Lit(_) => None,
        })
        .collect();
    for c in &caps {
        if !named.contains(c) {
            at_name(
                cx,
                "name",
                format!("`{{{c}}}` in the name is not captured: the address has no `+{c}` segment"),
            );
            return None;
        }
    }
    for n in &named {
        if !caps.contains(n) {
            cx.err(
                &address_at,
                format!("{key}.{}", if t.sparkplug.is_some() { "sparkplug" } else { "topic" }),
                format!("the capture `+{n}` is not used in the tag name"),
            )
            .help = Some(format!("put `{{{n}}}` in the name, or write a plain `+`"));
            return None;
        }
    }
    let data_type = match &t.data_type {
        Some(v) => cx.choice(
            v,
            &format!("{key}.type"),
            &[
                ("f64", DataType::F64),
                ("i64", DataType::I64),
                ("u64", DataType::U64),
                ("bool", DataType::Bool),
                ("string", DataType::Text(0)),
            ],
        )?,
        None => DataType::F64,
    };
    let scale = match &t.scale {
        Some(s) if *s.get_ref() == 0.0 || !s.get_ref().is_finite() => {
            cx.err(s, format!("{key}.scale"), "scale must be a finite, non-zero number");
            return None;
        }
        Some(s) => *s.get_ref(),
        None => 1.0,
    };
    let filter = address
        .split('/')
        .map(|s| if s.starts_with('+') { "+" } else { s })
        .collect::<Vec<_>>()
        .join("/");
    let filter = match &payload {
        MqttPayload::Sparkplug { .. } => {
            let s: Vec<&str> = filter.split('/').collect();
            format!("{}/{}/+/{}/#", crate::sparkplug::NAMESPACE, s[0], s[1])
        }
        _ => filter,
    };
    let tag = TagPlan {
        device_index: crate::sources::device_index(di),
        name: t.name.get_ref().into(),
        data_type,
        scale,
        offset: t.offset.unwrap_or(0.0),
        kind: TagKind::Mqtt(Box::new(MqttTagPlan {
            topic: address,
            filter,
            payload,
        })),
    };
    Some((tag, pieces))
}

/// A tag name with `{capture}` pieces; the literal parts follow the usual name rules.
fn name_pieces(cx: &mut Ctx, name: &Spanned<String>, key: &str) -> Option<Vec<Piece>> {
    let mut pieces = Vec::new();
    let mut rest = name.get_ref().as_str();
    let bad = |cx: &mut Ctx, msg: &str| {
        cx.err(
            name,
            key.to_string(),
            format!("`{}` is not a valid tag name: {msg}", name.get_ref()),
        );
    };
    while !rest.is_empty() {
        match rest.find('{') {
            Some(0) => {
                let Some(end) = rest.find('}') else {
                    bad(cx, "a `{` without its `}`");
                    return None;
                };
                let cap = &rest[1..end];
                if cap.is_empty() || !cap.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    bad(cx, "a capture is `{name}`, with letters, digits and `_`");
                    return None;
                }
                if matches!(pieces.last(), Some(Piece::Cap(_))) {
                    bad(cx, "two captures need something between them (e.g. `{a}_{b}`)");
                    return None;
                }
                pieces.push(Piece::Cap(cap.to_string()));
                rest = &rest[end + 1..];
            }
            found => {
                let end = found.unwrap_or(rest.len());
                let lit = &rest[..end];
                if lit
                    .chars()
                    .any(|c| c.is_whitespace() || matches!(c, '/' | '+' | '#' | '}' | '.'))
                {
                    bad(cx, "it must be without spaces, `/`, `+`, `#` or `.`");
                    return None;
                }
                pieces.push(Piece::Lit(lit.to_string()));
                rest = &rest[end..];
            }
        }
    }
    if pieces.is_empty() {
        bad(cx, "it is empty");
        return None;
    }
    Some(pieces)
}

fn json_pointer(cx: &mut Ctx, p: &Spanned<String>, key: &str) -> Option<String> {
    let s = p.get_ref();
    if !(s.is_empty() || s.starts_with('/')) {
        cx.err(p, key.to_string(), format!("`{s}` is not a JSON pointer (RFC 6901)"))
            .help = Some(format!("write \"/{s}\"; nested keys as /a/b, array items as /a/0"));
        return None;
    }
    Some(s.clone())
}

/// MQTT filter syntax: `#` alone and last; `+` (or `+name`) alone in its segment.
pub(crate) fn valid_filter(f: &str) -> bool {
    if f.is_empty() {
        return false;
    }
    let segments: Vec<&str> = f.split('/').collect();
    segments.iter().enumerate().all(|(i, s)| {
        if s.contains('#') {
            *s == "#" && i == segments.len() - 1
        } else if let Some(name) = s.strip_prefix('+') {
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        } else {
            !s.contains('+')
        }
    })
}

/// Matches a tag name against a template's pieces; the captured values, or `None`.
fn match_name(pieces: &[Piece], s: &str, caps: &mut Vec<(String, String)>) -> bool {
    match pieces.first() {
        None => s.is_empty(),
        Some(Piece::Lit(l)) => s
            .strip_prefix(l.as_str())
            .is_some_and(|rest| match_name(&pieces[1..], rest, caps)),
        Some(Piece::Cap(c)) => {
            for (end, ch) in s.char_indices().map(|(i, ch)| (i + ch.len_utf8(), ch)) {
                if matches!(ch, '.' | '/' | '+' | '#') || ch.is_whitespace() {
                    return false;
                }
                let value = &s[..end];
                let known = caps.iter().find(|(k, _)| k == c).map(|(_, v)| v.clone());
                if known.as_deref().is_some_and(|k| k != value) {
                    continue;
                }
                let before = caps.len();
                if known.is_none() {
                    caps.push((c.clone(), value.to_string()));
                }
                if match_name(&pieces[1..], &s[end..], caps) {
                    return true;
                }
                caps.truncate(before);
            }
            false
        }
    }
}

/// `address` with each `+name` segment replaced by its captured value.
fn fill(address: &str, caps: &[(String, String)]) -> String {
    address
        .split('/')
        .map(|s| match s.strip_prefix('+').filter(|n| !n.is_empty()) {
            Some(n) => caps.iter().find(|(k, _)| k == n).map_or(s, |(_, v)| v.as_str()),
            None => s,
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The tag a product field names, when it is an instance of a template of `device`, and the
/// template's classification.
pub(crate) fn instantiate(
    templates: &[Template],
    device: usize,
    name: &str,
) -> Option<(TagPlan, Option<Spanned<String>>)> {
    templates.iter().filter(|t| t.device == device).find_map(|t| {
        let mut caps = Vec::new();
        // A capture becomes a topic segment: one with a control character would make the broker
        // refuse the subscription (and the product's source is then reported as no tag).
        if !match_name(&t.name, name, &mut caps) || caps.iter().any(|(_, v)| v.chars().any(char::is_control)) {
            return None;
        }
        let mut tag = t.proto.clone();
        tag.name = name.into();
        let TagKind::Mqtt(m) = &mut tag.kind else {
            return None;
        };
        m.topic = fill(&m.topic, &caps);
        if let MqttPayload::Sparkplug {
            group, node, device, ..
        } = &mut m.payload
        {
            *group = fill(group, &caps);
            *node = fill(node, &caps);
            if let Some(d) = device {
                *d = fill(d, &caps);
            }
        }
        Some((tag, t.class.clone()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::diag::Source;
    use std::path::PathBuf;

    fn pieces(s: &str) -> Vec<Piece> {
        let mut problems = Vec::new();
        let path = PathBuf::from("t.toml");
        let mut cx = Ctx {
            src: Source { path: &path, text: "" },
            problems: &mut problems,
        };
        name_pieces(&mut cx, &Spanned::new(0..0, s.to_string()), "k").expect("valid")
    }

    #[test]
    fn names_match_templates_by_their_literal_parts() {
        let mut caps = Vec::new();
        assert!(match_name(
            &pieces("{line}_{machine}_temp"),
            "line-1_m_3_temp",
            &mut caps
        ));
        assert_eq!(
            caps,
            vec![("line".into(), "line-1".into()), ("machine".into(), "m_3".into())]
        );
        assert_eq!(fill("plant/+line/+machine/temp", &caps), "plant/line-1/m_3/temp");
        caps.clear();
        assert!(
            !match_name(&pieces("{line}_temp"), "_temp", &mut caps),
            "a capture is not empty"
        );
        assert!(
            !match_name(&pieces("{line}_temp"), "a.b_temp", &mut caps),
            "no dots in a capture"
        );
        assert!(!match_name(&pieces("temp"), "temp2", &mut caps));
        assert!(
            match_name(&pieces("{a}-{a}"), "x-x", &mut caps),
            "a repeated capture is one value"
        );
        caps.clear();
        assert!(!match_name(&pieces("{a}-{a}"), "x-y", &mut caps));
    }

    #[test]
    fn filters_follow_mqtt_rules() {
        for ok in ["a/b", "a/+/c", "a/+line/c", "a/#", "#", "+"] {
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in ["", "a/#/c", "a/b#", "a/x+/c", "a/+li-ne/c"] {
            assert!(!valid_filter(bad), "{bad}");
        }
    }
}
