//! MQTT source: machines that publish their own MQTT, as JSON, plain values or Sparkplug B.
//!
//! In: an MQTT device's plan ([`config::MqttDevicePlan`]: a device-side broker), and its tags (each a topic with a JSON pointer or
//! a plain payload, or a Sparkplug metric of an edge node or device). Out: one [`ReadingBatch`] per
//! message (per timestamp, for Sparkplug payloads that carry several).
//!
//! What a message is worth:
//! - JSON: the value at the tag's pointer; the time at its `timestamp_pointer` (epoch milliseconds,
//!   epoch seconds below 10^11, or RFC 3339 text), else the arrival time.
//! - A retained message (delivered because we subscribed, not because the machine just published)
//!   is a last known value: its readings are `uncertain:retained`.
//! - Sparkplug: births teach names, aliases and types; data is read by alias or name; a death marks
//!   the node's (or device's) tags `stale`; a gap in `seq`, or data from a node whose birth was not
//!   seen, asks the node for a rebirth (NCMD `Node Control/Rebirth`), at most once per 2 s per node.
//!   Historical metrics carry their own time.
//! - A payload that cannot be read is counted (device errors), logged with its topic, and makes the
//!   tags it was meant for `bad:decode`; nothing else is affected.

pub mod config;

use super::{DeviceStats, SourceCtx, SourceError, TagPlan};
use crate::backoff::Backoff;
use crate::config::DataType;
use crate::model::{now_millis, BadReason, Millis, Quality, Reading, ReadingBatch, Value};
use crate::sparkplug::{self, Kind, Payload};
use config::{mqtt, MqttPayload};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

pub struct MqttSource {
    pub ctx: SourceCtx,
    pub plan: config::MqttDevicePlan,
}

/// A Sparkplug edge node or device: `(group, node, device)`.
type SpKey = (String, String, Option<String>);

/// What the source knows of one Sparkplug edge node, from its births.
#[derive(Debug, Default)]
struct NodeState {
    /// From NBIRTH; `None`: no birth seen since the last death.
    bd_seq: Option<u64>,
    last_seq: Option<u64>,
    /// alias -> (device, metric name, data type), over the node and its devices.
    aliases: HashMap<u64, (Option<String>, String, u32)>,
    /// (device, metric name) -> data type.
    types: HashMap<(Option<String>, String), u32>,
    last_rebirth_request: Option<Instant>,
}

/// What one message did, besides readings.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    pub batches: Vec<ReadingBatch>,
    /// `(topic, payload)` to publish: a rebirth request.
    pub rebirth: Option<(String, Vec<u8>)>,
    /// Payloads (or parts) that could not be read, with why.
    pub errors: Vec<String>,
    /// Sparkplug messages missing from the sequence.
    pub lost: u64,
}

/// Routes messages to tags and decodes them: everything but the connection (unit-tested alone).
pub struct Router {
    device: usize,
    tags: Arc<[TagPlan]>,
    /// Topic -> tags, for tags without wildcards.
    exact: HashMap<String, Vec<usize>>,
    /// Tags whose topic has wildcards.
    wild: Vec<usize>,
    /// Sparkplug node or device -> (metric name, tag).
    sparkplug: HashMap<SpKey, Vec<(String, usize)>>,
    nodes: HashMap<(String, String), NodeState>,
}

impl Router {
    pub fn new(device: usize, device_tags: &[usize], tags: Arc<[TagPlan]>) -> Router {
        let mut r = Router {
            device,
            tags: tags.clone(),
            exact: HashMap::new(),
            wild: Vec::new(),
            sparkplug: HashMap::new(),
            nodes: HashMap::new(),
        };
        for &t in device_tags {
            let Some(m) = mqtt(&tags[t]) else { continue };
            match &m.payload {
                MqttPayload::Sparkplug {
                    group,
                    node,
                    device,
                    metric,
                } => r
                    .sparkplug
                    .entry((group.clone(), node.clone(), device.clone()))
                    .or_default()
                    .push((metric.clone(), t)),
                _ if m.topic.contains(['+', '#']) => r.wild.push(t),
                _ => r.exact.entry(m.topic.clone()).or_default().push(t),
            }
        }
        r
    }

    /// The filters to subscribe to, each once.
    pub fn filters(&self) -> Vec<String> {
        let mut seen = HashSet::new();
        self.exact
            .values()
            .flatten()
            .chain(&self.wild)
            .chain(self.sparkplug.values().flatten().map(|(_, t)| t))
            .filter_map(|&t| mqtt(&self.tags[t]).map(|m| m.filter.clone()))
            .filter(|f| seen.insert(f.clone()))
            .collect()
    }

    /// Every tag, for marking them all bad (disconnect).
    pub fn all_tags(&self) -> Vec<usize> {
        let mut all: Vec<usize> = self
            .exact
            .values()
            .flatten()
            .chain(&self.wild)
            .chain(self.sparkplug.values().flatten().map(|(_, t)| t))
            .copied()
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// Forgets what births taught (a new connection to the broker: births are asked for again).
    pub fn reset_nodes(&mut self) {
        self.nodes.clear();
    }

    pub fn on_message(&mut self, topic: &str, payload: &[u8], retained: bool, now: Millis) -> Outcome {
        let mut out = Outcome::default();
        if topic.chars().any(char::is_control) {
            // Never routed: a segment with a control character is no name of ours.
            out.errors
                .push(format!("topic `{}` holds a control character", topic.escape_debug()));
            return out;
        }
        if topic.starts_with(sparkplug::NAMESPACE) && topic.as_bytes().get(sparkplug::NAMESPACE.len()) == Some(&b'/') {
            self.on_sparkplug(topic, payload, now, &mut out);
            return out;
        }
        let mut targets: Vec<usize> = self.exact.get(topic).cloned().unwrap_or_default();
        targets.extend(
            self.wild
                .iter()
                .filter(|&&t| mqtt(&self.tags[t]).is_some_and(|m| topic_matches(&m.topic, topic))),
        );
        if targets.is_empty() {
            return out;
        }
        let doc = if targets.iter().any(|&t| self.is_json(t)) {
            match serde_json::from_slice::<serde_json::Value>(payload) {
                Ok(d) => Some(d),
                Err(e) => {
                    out.errors.push(format!("not JSON: {e}"));
                    None
                }
            }
        } else {
            None
        };
        let mut by_ts: BTreeMap<Millis, Vec<Reading>> = BTreeMap::new();
        for t in targets {
            let tag = &self.tags[t];
            let Some(m) = mqtt(tag) else {
                continue;
            };
            let (ts, result) = match &m.payload {
                MqttPayload::Json { pointer, timestamp } => match &doc {
                    None => (now, Err(())),
                    Some(d) => {
                        let ts = match timestamp {
                            None => now,
                            Some(p) => match d.pointer(p).and_then(json_time) {
                                Some(ts) => ts,
                                None => {
                                    out.errors.push(format!("no time at {p} for tag {}", tag.name));
                                    now
                                }
                            },
                        };
                        match d.pointer(pointer).map(|v| json_value(v, tag.data_type)) {
                            Some(Ok(v)) => (ts, Ok(v)),
                            Some(Err(why)) => {
                                out.errors.push(format!("tag {}: {why}", tag.name));
                                (ts, Err(()))
                            }
                            None => {
                                out.errors.push(format!("tag {}: nothing at {pointer}", tag.name));
                                (ts, Err(()))
                            }
                        }
                    }
                },
                MqttPayload::Plain => match std::str::from_utf8(payload)
                    .ok()
                    .and_then(|s| plain_value(s.trim(), tag.data_type))
                {
                    Some(v) => (now, Ok(v)),
                    None => {
                        // The size, never the bytes: the payload may be data governance withholds.
                        out.errors.push(format!(
                            "tag {}: a {}-byte payload is not a {}",
                            tag.name,
                            payload.len(),
                            type_name(tag.data_type)
                        ));
                        (now, Err(()))
                    }
                },
                MqttPayload::Sparkplug { .. } => continue,
            };
            let reading = match result {
                Ok(v) => scaled(tag, v, retained),
                Err(()) => Reading {
                    tag: t,
                    value: None,
                    quality: Quality::Bad(BadReason::Decode),
                },
            };
            by_ts.entry(ts).or_default().push(Reading { tag: t, ..reading });
        }
        out.batches = self.batches(by_ts);
        out
    }

    fn is_json(&self, t: usize) -> bool {
        matches!(mqtt(&self.tags[t]).map(|m| &m.payload), Some(MqttPayload::Json { .. }))
    }

    fn batches(&self, by_ts: BTreeMap<Millis, Vec<Reading>>) -> Vec<ReadingBatch> {
        by_ts
            .into_iter()
            .map(|(ts, readings)| ReadingBatch {
                device: self.device,
                ts,
                readings,
            })
            .collect()
    }

    fn on_sparkplug(&mut self, topic: &str, payload: &[u8], now: Millis, out: &mut Outcome) {
        let Some(t) = sparkplug::Topic::parse(topic) else {
            return; // STATE and the like
        };
        if matches!(t.kind, Kind::NCmd | Kind::DCmd) {
            return;
        }
        let node_key = (t.group.to_string(), t.node.to_string());
        let watched = self
            .sparkplug
            .keys()
            .any(|(g, n, _)| *g == node_key.0 && *n == node_key.1);
        if !watched {
            return;
        }
        let p = match <Payload as prost::Message>::decode(payload) {
            Ok(p) => p,
            Err(e) => {
                out.errors.push(format!("not a Sparkplug B payload: {e}"));
                self.mark(&node_key, Some(t.device), Quality::Bad(BadReason::Decode), now, out);
                return;
            }
        };
        let device = t.device.map(str::to_string);
        let node = self.nodes.entry(node_key.clone()).or_default();
        match t.kind {
            Kind::NDeath => {
                // A death certificate of an older session (its bdSeq is not the birth's) is stale news.
                let bd = p
                    .metrics
                    .iter()
                    .find(|m| m.name.as_deref() == Some("bdSeq"))
                    .and_then(|m| match m.value {
                        Some(sparkplug::MetricValue::Long(v)) => Some(v),
                        Some(sparkplug::MetricValue::Int(v)) => Some(u64::from(v)),
                        _ => None,
                    });
                if node.bd_seq.is_some() && bd.is_some() && node.bd_seq != bd {
                    debug!(topic, "NDEATH of an earlier session ignored");
                    return;
                }
                *node = NodeState {
                    last_rebirth_request: node.last_rebirth_request,
                    ..NodeState::default()
                };
                self.mark(&node_key, None, Quality::Stale, now, out);
                return;
            }
            Kind::NBirth => {
                // A birth answers any rebirth request: the next gap may ask again at once.
                *node = NodeState::default();
                node.bd_seq = p
                    .metrics
                    .iter()
                    .find(|m| m.name.as_deref() == Some("bdSeq"))
                    .and_then(|m| match m.value {
                        Some(sparkplug::MetricValue::Long(v)) => Some(v),
                        Some(sparkplug::MetricValue::Int(v)) => Some(u64::from(v)),
                        _ => None,
                    })
                    .or(Some(0));
                node.last_seq = p.seq;
            }
            _ => {
                if node.bd_seq.is_none() {
                    // Data (or a device birth) from a node whose birth we missed: ask for one.
                    Self::ask_rebirth(node, &node_key, out);
                    return;
                }
                let expected = node.last_seq.map(|s| (s + 1) % 256);
                node.last_seq = p.seq;
                if let (Some(e), Some(s)) = (expected, p.seq) {
                    if e != s {
                        out.lost += (s + 256 - e) % 256;
                        Self::ask_rebirth(node, &node_key, out);
                    }
                }
            }
        }
        let node = self.nodes.entry(node_key.clone()).or_default();
        if t.kind == Kind::DDeath {
            node.aliases.retain(|_, (d, _, _)| *d != device);
            node.types.retain(|(d, _), _| *d != device);
            self.mark(&node_key, Some(t.device), Quality::Stale, now, out);
            return;
        }
        let birth = matches!(t.kind, Kind::NBirth | Kind::DBirth);
        if t.kind == Kind::DBirth {
            node.aliases.retain(|_, (d, _, _)| *d != device);
            node.types.retain(|(d, _), _| *d != device);
        }
        let mut by_ts: BTreeMap<Millis, Vec<Reading>> = BTreeMap::new();
        let routes = self
            .sparkplug
            .get(&(node_key.0.clone(), node_key.1.clone(), device.clone()));
        for m in &p.metrics {
            let (name, datatype) = if birth {
                let Some(name) = m.name.clone() else {
                    out.errors.push("a birth metric without a name".into());
                    continue;
                };
                let dt = m.datatype.unwrap_or(0);
                if let Some(alias) = m.alias {
                    node.aliases.insert(alias, (device.clone(), name.clone(), dt));
                }
                node.types.insert((device.clone(), name.clone()), dt);
                (name, dt)
            } else if let Some(alias) = m.alias.filter(|_| m.name.is_none()) {
                match node.aliases.get(&alias) {
                    Some((d, name, dt)) if *d == device => (name.clone(), m.datatype.unwrap_or(*dt)),
                    _ => {
                        out.errors
                            .push(format!("alias {alias} is not in the birth certificate"));
                        Self::ask_rebirth(node, &node_key, out);
                        continue;
                    }
                }
            } else if let Some(name) = &m.name {
                let known = node.types.get(&(device.clone(), name.clone())).copied();
                match m.datatype.or(known) {
                    Some(dt) => (name.clone(), dt),
                    None => {
                        out.errors.push(format!("metric {name} has no data type and no birth"));
                        continue;
                    }
                }
            } else {
                out.errors.push("a metric with neither name nor alias".into());
                continue;
            };
            let Some(routes) = routes else { continue };
            for (_, tag) in routes.iter().filter(|(metric, _)| *metric == name) {
                let ts = m.timestamp.or(p.timestamp).unwrap_or(now);
                let tp = &self.tags[*tag];
                let reading = match sparkplug::value_of(m, datatype) {
                    Ok(Some(v)) => match coerce(v, tp.data_type) {
                        Some(v) => scaled(tp, v, false),
                        None => {
                            out.errors
                                .push(format!("metric {name}: not a {}", type_name(tp.data_type)));
                            bad(*tag, BadReason::Decode)
                        }
                    },
                    Ok(None) => bad(*tag, BadReason::NoValue),
                    Err(why) => {
                        out.errors.push(format!("metric {name}: {why}"));
                        bad(*tag, BadReason::Decode)
                    }
                };
                by_ts.entry(ts).or_default().push(Reading { tag: *tag, ..reading });
            }
        }
        out.batches.extend(self.batches(by_ts));
    }

    fn ask_rebirth(node: &mut NodeState, key: &(String, String), out: &mut Outcome) {
        let now = Instant::now();
        if node
            .last_rebirth_request
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(2))
        {
            return;
        }
        node.last_rebirth_request = Some(now);
        out.rebirth = Some((
            sparkplug::topic(&key.0, Kind::NCmd, &key.1, None),
            sparkplug::rebirth_request(now_millis()),
        ));
    }

    /// Gives every tag of a node and its devices (`scope: None`), or of the node alone
    /// (`Some(None)`) or one device (`Some(Some(device))`), one quality and no value.
    fn mark(
        &self,
        node: &(String, String),
        scope: Option<Option<&str>>,
        quality: Quality,
        now: Millis,
        out: &mut Outcome,
    ) {
        let readings: Vec<Reading> = self
            .sparkplug
            .iter()
            .filter(|((g, n, d), _)| *g == node.0 && *n == node.1 && scope.is_none_or(|s| d.as_deref() == s))
            .flat_map(|(_, routes)| routes.iter().map(|(_, t)| *t))
            .map(|tag| Reading {
                tag,
                value: None,
                quality,
            })
            .collect();
        if !readings.is_empty() {
            out.batches.push(ReadingBatch {
                device: self.device,
                ts: now,
                readings,
            });
        }
    }
}

fn bad(tag: usize, reason: BadReason) -> Reading {
    Reading {
        tag,
        value: None,
        quality: Quality::Bad(reason),
    }
}

/// The tag's scale and offset applied to numbers; a retained value is only a last known one.
fn scaled(tag: &TagPlan, v: Value, retained: bool) -> Reading {
    let v = if tag.scale != 1.0 || tag.offset != 0.0 {
        match v.as_f64() {
            Some(x) if !matches!(v, Value::Bool(_)) => Value::Float(x * tag.scale + tag.offset),
            _ => v,
        }
    } else {
        v
    };
    Reading {
        tag: 0,
        value: Some(v),
        quality: if retained {
            Quality::Uncertain(BadReason::Retained)
        } else {
            Quality::Good
        },
    }
}

fn type_name(t: DataType) -> &'static str {
    match t {
        DataType::Bool => "bool",
        DataType::I64 => "i64",
        DataType::U64 => "u64",
        DataType::Text(_) => "string",
        _ => "f64",
    }
}

/// A decoded value in the tag's declared type, if it fits.
fn coerce(v: Value, t: DataType) -> Option<Value> {
    match (t, v) {
        (DataType::Bool, Value::Bool(b)) => Some(Value::Bool(b)),
        (DataType::Text(_), Value::Text(s)) => Some(Value::Text(s)),
        (DataType::Text(_), v) => Some(Value::Text(v.to_string())),
        (DataType::I64, Value::Int(i)) => Some(Value::Int(i)),
        (DataType::I64, Value::UInt(u)) => i64::try_from(u).ok().map(Value::Int),
        (DataType::U64, Value::UInt(u)) => Some(Value::UInt(u)),
        (DataType::U64, Value::Int(i)) => u64::try_from(i).ok().map(Value::UInt),
        (DataType::F64, v @ (Value::Int(_) | Value::UInt(_) | Value::Float(_))) => v.as_f64().map(Value::Float),
        _ => None,
    }
}

fn json_value(v: &serde_json::Value, t: DataType) -> Result<Value, String> {
    use serde_json::Value as J;
    let got = match v {
        J::Null => return Err("null".into()),
        J::Bool(b) => Value::Bool(*b),
        J::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::Int(i),
            (None, Some(u)) => Value::UInt(u),
            _ => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        J::String(s) => Value::Text(s.clone()),
        other => return Err(format!("{} is not a {}", kind(other), type_name(t))),
    };
    // What the value is, never the value: it may be one governance withholds, and this is logged.
    let shown = described(&got);
    coerce(got, t).ok_or_else(|| format!("{shown} is not a {}", type_name(t)))
}

/// A value's kind and size, for messages that are logged (the value itself may be withheld data).
fn described(v: &Value) -> String {
    match v {
        Value::Bool(_) => "a boolean".into(),
        Value::Int(_) | Value::UInt(_) | Value::Float(_) => "a number".into(),
        Value::Text(s) => format!("a text of {} characters", s.chars().count()),
        Value::Array(a) => format!("an array of {}", a.len()),
    }
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
        _ => "a value",
    }
}

fn plain_value(s: &str, t: DataType) -> Option<Value> {
    match t {
        DataType::Bool => match s.to_ascii_lowercase().as_str() {
            "true" | "1" | "on" => Some(Value::Bool(true)),
            "false" | "0" | "off" => Some(Value::Bool(false)),
            _ => None,
        },
        DataType::I64 => s.parse().ok().map(Value::Int),
        DataType::U64 => s.parse().ok().map(Value::UInt),
        DataType::Text(_) => Some(Value::Text(s.to_string())),
        _ => s.parse::<f64>().ok().filter(|x| x.is_finite()).map(Value::Float),
    }
}

/// A time in a JSON document: epoch milliseconds, epoch seconds (below 10^11, fractions kept to the
/// millisecond), or RFC 3339 text.
fn json_time(v: &serde_json::Value) -> Option<Millis> {
    match v {
        serde_json::Value::Number(n) => {
            let x = n.as_f64()?;
            if !(0.0..1e15).contains(&x) {
                None
            } else if x < 1e11 {
                Some((x * 1000.0).round() as Millis)
            } else {
                Some(x as Millis)
            }
        }
        serde_json::Value::String(s) => crate::model::parse_rfc3339_millis(s),
        _ => None,
    }
}

/// MQTT topic matching: `+` one level, `#` the rest (including none); `+name` is a `+`.
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut t = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            return true;
        }
        match t.next() {
            Some(level) if f.starts_with('+') || f == level => {}
            _ => return false,
        }
    }
    t.next().is_none()
}

impl MqttSource {
    pub async fn run(mut self) {
        let b = self.plan.broker.clone();
        let address = format!("{}:{}", b.host, b.port);
        if b.insecure_credentials {
            warn!(device = %self.ctx.id, broker = %address,
                  "the password crosses plain MQTT readable on the network (allow_insecure_credentials = true)");
        }
        let resolved = match crate::publish::link::LinkOptions::resolve(&b, String::new(), Vec::new()) {
            Ok(r) => r,
            Err(e) => {
                let e = SourceError::Broker(e.to_string());
                warn!(device = %self.ctx.id, error = %e, "cannot set up the device broker connection");
                self.ctx.send_all_bad(BadReason::Disconnected).await;
                return;
            }
        };
        let mut router = Router::new(self.ctx.index, &self.ctx.device_tags, self.ctx.tags.clone());
        let filters = router.filters();
        let all = router.all_tags();
        let mut opts = rumqttc::MqttOptions::new(&b.client_id, &b.host, b.port);
        // MQTT 3.1.1 cannot tell the broker a size limit, and the client cannot skip a packet it
        // refuses (it drops the connection, and a retained one comes back on every subscribe).
        // So packets up to a hard cap are read, and those over `max_message_bytes` are counted
        // and skipped here; only one over the cap still costs the connection.
        let limit = b.max_message_bytes;
        let read_cap = limit.saturating_mul(16).clamp(1 << 20, 256 << 20);
        opts.set_keep_alive(b.keep_alive.max(Duration::from_secs(1)))
            .set_clean_session(true)
            .set_max_packet_size(read_cap, 1 << 20);
        if let Some(tls) = resolved.tls {
            opts.set_transport(rumqttc::Transport::tls_with_config(tls));
        }
        if let Some(user) = &b.username {
            opts.set_credentials(user, resolved.password.clone().unwrap_or_default());
        }
        let (client, mut events) = rumqttc::AsyncClient::new(opts, 64);
        let mut backoff = Backoff::new(b.reconnect_min, b.reconnect_max);
        let mut connected = false;
        let mut unacked_subscriptions = 0;
        let mut oversize_topics: HashSet<String> = HashSet::new();
        loop {
            let ev = tokio::select! {
                ev = events.poll() => ev,
                _ = self.ctx.shutdown.changed() => {
                    let _ = client.try_disconnect();
                    return;
                }
            };
            match ev {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    connected = true;
                    backoff.reset();
                    router.reset_nodes();
                    for f in &filters {
                        if let Err(e) = client.try_subscribe(f, rumqttc::QoS::AtLeastOnce) {
                            warn!(device = %self.ctx.id, filter = %f, error = %e, "cannot subscribe");
                        }
                    }
                    unacked_subscriptions = filters.len();
                }
                // Connected, for this device, means subscribed: from here on nothing published is missed.
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) if unacked_subscriptions > 0 => {
                    unacked_subscriptions -= 1;
                    if unacked_subscriptions == 0 {
                        self.ctx.stats.connected.store(1, Ordering::Relaxed);
                        info!(device = %self.ctx.id, broker = %address, filters = filters.len(), "subscribed on the device broker");
                    }
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) if p.payload.len() > limit => {
                    DeviceStats::inc(&self.ctx.stats.polls);
                    DeviceStats::inc(&self.ctx.stats.errors);
                    DeviceStats::inc(&self.ctx.stats.oversize);
                    let n = self.ctx.stats.oversize.load(Ordering::Relaxed);
                    let first = oversize_topics.len() < 1024 && oversize_topics.insert(p.topic.clone());
                    if first || (oversize_topics.len() >= 1024 && n.is_power_of_two()) {
                        warn!(device = %self.ctx.id, topic = %p.topic, bytes = p.payload.len(), max_message_bytes = limit,
                              retained = p.retain, "a device message over max_message_bytes is skipped (logged once per topic, each one counted)");
                    }
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    DeviceStats::inc(&self.ctx.stats.polls);
                    let topic = p.topic.clone();
                    let outcome = router.on_message(&topic, &p.payload, p.retain, now_millis());
                    if !outcome.errors.is_empty() {
                        let n = self.ctx.stats.errors.fetch_add(1, Ordering::Relaxed) + 1;
                        // Every one is counted; the log names the topic without flooding.
                        if n <= 10 || n.is_power_of_two() {
                            warn!(device = %self.ctx.id, topic = %topic, errors_total = n, problem = %outcome.errors.join("; "), "unreadable MQTT payload");
                        }
                    }
                    if outcome.lost > 0 {
                        self.ctx.stats.lost_frames.fetch_add(outcome.lost, Ordering::Relaxed);
                        warn!(device = %self.ctx.id, topic = %topic, lost = outcome.lost, "Sparkplug sequence gap");
                    }
                    if let Some((t, payload)) = outcome.rebirth {
                        DeviceStats::inc(&self.ctx.stats.requests);
                        info!(device = %self.ctx.id, topic = %t, "asking a Sparkplug edge node for its births");
                        let _ = client.try_publish(t, rumqttc::QoS::AtMostOnce, false, payload);
                    }
                    for batch in outcome.batches {
                        if self.ctx.out.send(batch).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    self.ctx.stats.connected.store(0, Ordering::Relaxed);
                    if connected {
                        warn!(device = %self.ctx.id, error = %e, "device broker connection lost");
                        DeviceStats::inc(&self.ctx.stats.reconnects);
                        connected = false;
                    }
                    if !super::send_all_bad(&self.ctx.out, self.ctx.index, &all, BadReason::Disconnected).await {
                        return;
                    }
                    let wait = backoff.next_delay();
                    debug!(device = %self.ctx.id, error = %e, retry_in = ?wait, "device broker connect failed");
                    if super::sleep_or_shutdown(&mut self.ctx.shutdown, wait).await {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
