//! Sparkplug B upstream encoding: the agent as a Sparkplug edge node, each product (major version)
//! one of its devices. See docs/wire-format.md, "Sparkplug B".
//!
//! - NBIRTH (seq 0) carries `bdSeq`, `Node Control/Rebirth` and the agent's identity; NDEATH with the
//!   same `bdSeq` is the connection's will. `bdSeq` moves on by one for every connection and is
//!   kept in `<data_dir>/sparkplug-bdseq` (written, fsynced and renamed before the CONNECT), so a
//!   host tells this session's death from an earlier one's across restarts.
//! - DBIRTH per product: one metric per field that may leave the site (alias, type, `engUnit`,
//!   `classification`), and a `Product` metric whose properties carry the product's id, version,
//!   owner, domain, classification and descriptor topic.
//! - DDATA: the buffered records of one message, each field a metric by alias with the record's
//!   time, a `Quality` property (192 good, 64 uncertain, 500 stale, 0 bad) and `is_historical` when
//!   the message is backlog replayed after an outage.

use crate::config::{EdgeAction, LogicalType, Plan};
use crate::model::{now_millis, parse_rfc3339_millis};
use crate::sparkplug::{self as sp, datatype, Kind, Metric, MetricValue, Payload, PropertyValueKind};
use prost::Message;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The Sparkplug identity and products of the agent.
pub struct Encoder {
    pub group: String,
    pub node: String,
    /// The primary host application whose STATE gates births and data, if any.
    pub primary_host: Option<String>,
    products: Vec<Device>,
    agent_version: String,
    config_hash: String,
}

struct Device {
    /// The product's buffer key (`{id}.v{major}`): the Sparkplug device id.
    key: String,
    fields: Vec<Field>,
    by_name: HashMap<String, usize>,
    properties: Vec<(String, PropertyValueKind)>,
}

struct Field {
    name: String,
    alias: u64,
    datatype: u32,
    unit: String,
    classification: String,
}

/// OPC-style quality codes, as Sparkplug hosts read them from the `Quality` property.
pub fn quality_code(q: &str) -> i32 {
    match q {
        "good" => 192,
        "stale" => 500,
        q if q.starts_with("uncertain") => 64,
        _ => 0,
    }
}

impl Encoder {
    pub fn new(plan: &Plan, group: &str, node: &str, primary_host: Option<String>) -> Encoder {
        let products = plan
            .products
            .iter()
            .enumerate()
            .map(|(pi, p)| {
                let fields: Vec<Field> = p
                    .fields
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| f.action != EdgeAction::Never)
                    .map(|(fi, f)| Field {
                        name: f.name.to_string(),
                        // Unique over the node: product in the high bits, field in the low.
                        alias: ((pi as u64 + 1) << 16) | fi as u64,
                        datatype: match (f.action, f.logical_type) {
                            (EdgeAction::Pseudonymise, _) => datatype::STRING,
                            (_, LogicalType::Number) => datatype::DOUBLE,
                            (_, LogicalType::Integer) => datatype::INT64,
                            (_, LogicalType::Boolean) => datatype::BOOLEAN,
                            (_, LogicalType::String | LogicalType::Array) => datatype::STRING,
                        },
                        unit: f.unit.to_string(),
                        classification: f.classification.to_string(),
                    })
                    .collect();
                let by_name = fields.iter().enumerate().map(|(i, f)| (f.name.clone(), i)).collect();
                // The strictest class among the fields that leave the site speaks for the product.
                let classification = p
                    .fields
                    .iter()
                    .filter(|f| f.action != EdgeAction::Never)
                    .max_by_key(|f| f.action.rank())
                    .map_or_else(
                        || plan.governance.default_class.clone(),
                        |f| f.classification.to_string(),
                    );
                let s = |v: &str| PropertyValueKind::String(v.to_string());
                Device {
                    key: p.key.clone(),
                    fields,
                    by_name,
                    properties: vec![
                        ("id".into(), s(&p.id)),
                        ("version".into(), s(&p.version)),
                        ("owner".into(), s(&p.owner)),
                        ("domain".into(), s(&p.domain)),
                        ("classification".into(), s(&classification)),
                        ("descriptor".into(), s(&super::envelope::descriptor_topic(p))),
                    ],
                }
            })
            .collect();
        Encoder {
            group: group.to_string(),
            node: node.to_string(),
            primary_host,
            products,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            config_hash: plan.config_hash.clone(),
        }
    }

    pub fn topic(&self, kind: Kind, product: Option<&str>) -> String {
        sp::topic(&self.group, kind, &self.node, product)
    }

    /// The NDEATH of the connection with `bd_seq`: its will, and what a clean stop publishes.
    pub fn ndeath(&self, bd_seq: u64) -> Vec<u8> {
        Payload {
            timestamp: Some(now_millis()),
            metrics: vec![bd_seq_metric(bd_seq)],
            ..Default::default()
        }
        .encode_to_vec()
    }

    pub fn nbirth(&self, bd_seq: u64) -> Vec<u8> {
        let now = now_millis();
        let text = |name: &str, v: &str| Metric {
            name: Some(name.into()),
            timestamp: Some(now),
            datatype: Some(datatype::STRING),
            value: Some(MetricValue::String(v.into())),
            ..Default::default()
        };
        Payload {
            timestamp: Some(now),
            seq: Some(0),
            metrics: vec![
                bd_seq_metric(bd_seq),
                Metric {
                    name: Some(sp::REBIRTH_METRIC.into()),
                    timestamp: Some(now),
                    datatype: Some(datatype::BOOLEAN),
                    value: Some(MetricValue::Boolean(false)),
                    ..Default::default()
                },
                text("Agent/Version", &self.agent_version),
                text("Agent/ConfigHash", &self.config_hash),
            ],
            ..Default::default()
        }
        .encode_to_vec()
    }

    /// The product keys, in DBIRTH order.
    pub fn devices(&self) -> impl Iterator<Item = &str> {
        self.products.iter().map(|d| d.key.as_str())
    }

    pub fn dbirth(&self, key: &str, seq: u64) -> Option<Vec<u8>> {
        let d = self.products.iter().find(|d| d.key == key)?;
        let now = now_millis();
        let mut metrics: Vec<Metric> = d
            .fields
            .iter()
            .map(|f| Metric {
                name: Some(f.name.clone()),
                alias: Some(f.alias),
                timestamp: Some(now),
                datatype: Some(f.datatype),
                is_null: Some(true),
                properties: Some(sp::property_set([
                    sp::property("engUnit", PropertyValueKind::String(f.unit.clone())),
                    sp::property("classification", PropertyValueKind::String(f.classification.clone())),
                ])),
                ..Default::default()
            })
            .collect();
        metrics.push(Metric {
            name: Some("Product".into()),
            timestamp: Some(now),
            datatype: Some(datatype::STRING),
            value: Some(MetricValue::String(d.key.clone())),
            properties: Some(sp::property_set(
                d.properties.iter().map(|(k, v)| sp::property(k, v.clone())),
            )),
            ..Default::default()
        });
        Some(
            Payload {
                timestamp: Some(now),
                seq: Some(seq),
                metrics,
                ..Default::default()
            }
            .encode_to_vec(),
        )
    }

    /// DDATA for one buffered message (its JSON array of records).
    pub fn ddata(&self, key: &str, body: &[u8], seq: u64, historical: bool) -> Result<Vec<u8>, String> {
        // Messages buffered before products were keyed by major carry the bare id.
        let d = self
            .products
            .iter()
            .find(|d| d.key == key || crate::config::split_product_key(&d.key).0 == key)
            .ok_or_else(|| format!("no product {key}"))?;
        let records: Vec<serde_json::Value> =
            serde_json::from_slice(body).map_err(|e| format!("buffered records are not JSON: {e}"))?;
        let mut metrics = Vec::new();
        for r in &records {
            let ts = r["ts"].as_str().and_then(parse_rfc3339_millis);
            let Some(fields) = r["fields"].as_object() else {
                continue;
            };
            for (name, v) in fields {
                let Some(&fi) = d.by_name.get(name) else { continue };
                let f = &d.fields[fi];
                let q = r["quality"][name].as_str().unwrap_or("good");
                let value = metric_value(v, f.datatype);
                metrics.push(Metric {
                    alias: Some(f.alias),
                    timestamp: ts,
                    is_historical: historical.then_some(true),
                    is_null: value.is_none().then_some(true),
                    properties: Some(sp::property_set([sp::property(
                        "Quality",
                        PropertyValueKind::Int(quality_code(q) as u32),
                    )])),
                    value,
                    ..Default::default()
                });
            }
        }
        Ok(Payload {
            timestamp: Some(now_millis()),
            seq: Some(seq),
            metrics,
            ..Default::default()
        }
        .encode_to_vec())
    }
}

fn bd_seq_metric(bd_seq: u64) -> Metric {
    Metric {
        name: Some("bdSeq".into()),
        timestamp: Some(now_millis()),
        datatype: Some(datatype::INT64),
        value: Some(MetricValue::Long(bd_seq)),
        ..Default::default()
    }
}

/// A record's JSON value as the field's Sparkplug type; `None` (a null metric) when it has none.
fn metric_value(v: &serde_json::Value, t: u32) -> Option<MetricValue> {
    match t {
        datatype::DOUBLE => v.as_f64().map(MetricValue::Double),
        datatype::INT64 => v.as_i64().map(|i| MetricValue::Long(i as u64)),
        datatype::BOOLEAN => v.as_bool().map(MetricValue::Boolean),
        _ => match v {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some(MetricValue::String(s.clone())),
            other => Some(MetricValue::String(other.to_string())),
        },
    }
}

/// Where the last connection's `bdSeq` is kept.
pub fn bd_seq_path(data_dir: &Path) -> PathBuf {
    data_dir.join("sparkplug-bdseq")
}

/// The `bdSeq` of the next connection (0..=255, one more than the last one's, 0 the first time),
/// stored before it is used: write, fsync, rename.
pub fn next_bd_seq(path: &Path) -> std::io::Result<u64> {
    let last = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let next = last.map_or(0, |l| (l + 1) % 256);
    crate::fsutil::write_atomic(path, format!("{next}\n").as_bytes())?;
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bd_seq_moves_on_per_connection_and_survives_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let p = bd_seq_path(dir.path());
        assert_eq!(next_bd_seq(&p).unwrap(), 0);
        assert_eq!(next_bd_seq(&p).unwrap(), 1);
        std::fs::write(&p, "255\n").unwrap();
        assert_eq!(next_bd_seq(&p).unwrap(), 0, "wraps at 256");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "0\n");
    }

    #[test]
    fn quality_codes_follow_the_opc_convention() {
        assert_eq!(quality_code("good"), 192);
        assert_eq!(quality_code("stale"), 500);
        assert_eq!(quality_code("uncertain:retained"), 64);
        assert_eq!(quality_code("bad:timeout"), 0);
    }

    #[test]
    fn record_values_take_their_fields_types() {
        use serde_json::json;
        assert_eq!(
            metric_value(&json!(1.5), datatype::DOUBLE),
            Some(MetricValue::Double(1.5))
        );
        assert_eq!(
            metric_value(&json!(2), datatype::DOUBLE),
            Some(MetricValue::Double(2.0))
        );
        assert_eq!(
            metric_value(&json!(-2), datatype::INT64),
            Some(MetricValue::Long(u64::MAX - 1))
        );
        assert_eq!(metric_value(&json!(null), datatype::DOUBLE), None);
        assert_eq!(
            metric_value(&json!("h:ab"), datatype::STRING),
            Some(MetricValue::String("h:ab".into()))
        );
        assert_eq!(
            metric_value(&json!([1, 2]), datatype::STRING),
            Some(MetricValue::String("[1,2]".into()))
        );
    }
}
