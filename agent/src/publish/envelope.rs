//! The upstream wire format (docs/wire-format.md): records, product messages, descriptors, status.
#![allow(
    clippy::expect_used,
    reason = "every expect here writes JSON of plain values into a Vec<u8>, which cannot fail"
)]

use crate::buffer::StoredMessage;
use crate::config::{Plan, ProductPlan};
use crate::govern::Governed;
use crate::model::{format_rfc3339_millis, Record, Value};
use serde_json::{json, Value as Json};

/// Encodes a product's records: `{"ts":..,"fields":{..},"quality":{..}}`, fields in contract order.
/// Keys are escaped once per product; this runs for every record, so it writes straight into the
/// output with no intermediate JSON tree.
pub struct RecordEncoder {
    /// `"name":` of every field, JSON-escaped, one after another: one allocation rather than one per
    /// field (at thousands of fields the per-allocation overhead outweighed the keys).
    keys: Vec<u8>,
    /// Where each field's key ends in `keys`.
    ends: Vec<u32>,
}

impl RecordEncoder {
    pub fn new(product: &ProductPlan) -> Self {
        let mut keys = Vec::new();
        let mut ends = Vec::with_capacity(product.fields.len());
        for f in product.fields.iter() {
            serde_json::to_writer(&mut keys, &f.name).expect("a string serializes");
            keys.push(b':');
            ends.push(u32::try_from(keys.len()).expect("field names fit in 4 GiB"));
        }
        keys.shrink_to_fit();
        RecordEncoder { keys, ends }
    }

    fn key(&self, field: usize) -> &[u8] {
        let start = if field == 0 { 0 } else { self.ends[field - 1] as usize };
        &self.keys[start..self.ends[field] as usize]
    }

    /// Encodes what governance lets leave: only the fields in `record`, nothing else.
    pub fn encode(&self, record: &Governed) -> Vec<u8> {
        use std::io::Write;
        let mut out = Vec::with_capacity(64 + 2 * self.keys.len() + self.ends.len() * 16);
        out.extend_from_slice(b"{\"ts\":\"");
        out.extend_from_slice(format_rfc3339_millis(record.ts).as_bytes());
        out.extend_from_slice(b"\",\"fields\":{");
        for (i, (field, v, _)) in record.fields.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(self.key(*field));
            write_value(&mut out, v.as_ref());
        }
        out.extend_from_slice(b"},\"quality\":{");
        for (i, (field, _, q)) in record.fields.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(self.key(*field));
            if q.is_good() {
                out.extend_from_slice(b"\"good\"");
            } else {
                write!(out, "\"{}\"", crate::model::QualityText(*q)).expect("write to Vec");
            }
        }
        out.extend_from_slice(b"}}");
        out
    }
}

/// One record of `product` with every field, ungoverned (see [`RecordEncoder`]; tests and tools).
pub fn encode_record(product: &ProductPlan, record: &Record) -> Vec<u8> {
    RecordEncoder::new(product).encode(&Governed::all(record.clone()))
}

/// The product message around stored records.
pub fn encode_message(m: &StoredMessage, agent: &str, historical: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(m.body.len() + 160);
    out.extend_from_slice(b"{\"product\":");
    out.extend(serde_json::to_vec(crate::config::split_product_key(&m.name).0).expect("string"));
    out.extend_from_slice(b",\"version\":");
    out.extend(serde_json::to_vec(&m.version).expect("string"));
    out.extend_from_slice(b",\"agent\":");
    out.extend(serde_json::to_vec(agent).expect("string"));
    out.extend(format!(",\"epoch\":{},\"seq\":{}", m.id.epoch, m.id.seq).as_bytes());
    if m.last_seq > m.id.seq {
        // Backlog messages merged before their first send: this one stands for seq..=last_seq.
        out.extend(format!(",\"last_seq\":{}", m.last_seq).as_bytes());
    }
    out.extend(format!(",\"historical\":{historical},\"records\":").as_bytes());
    out.extend(&m.body);
    out.push(b'}');
    out
}

/// Topic of a product's retained descriptor.
pub fn descriptor_topic(p: &ProductPlan) -> String {
    format!("{}/_descriptor", p.topic)
}

/// A field value as the product messages carry it (JSON; a non-finite float is `null`).
pub fn write_value(out: &mut Vec<u8>, v: Option<&Value>) {
    match v {
        None => out.extend_from_slice(b"null"),
        Some(Value::Bool(b)) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Some(Value::Int(x)) => serde_json::to_writer(&mut *out, x).expect("write to Vec"),
        Some(Value::UInt(x)) => serde_json::to_writer(&mut *out, x).expect("write to Vec"),
        Some(Value::Float(x)) if x.is_finite() => serde_json::to_writer(&mut *out, x).expect("write to Vec"),
        Some(Value::Float(_)) => out.extend_from_slice(b"null"),
        Some(Value::Text(t)) => serde_json::to_writer(&mut *out, t).expect("write to Vec"),
        Some(v @ Value::Array(_)) => serde_json::to_writer(&mut *out, &v.to_json()).expect("write to Vec"),
    }
}

/// Where and how the product is published (the descriptor's `binding`).
fn binding(plan: &Plan, p: &ProductPlan) -> Json {
    let mut b = json!({"protocol": "mqtt", "topic": p.topic, "qos": p.qos.level(), "encoding": "json",
                       "sli_topic": format!("{}/_sli", p.topic),
                       "gaps_topic": gaps_topic(p),
                       "contract_topic": crate::catalog::odcs::contract_topic(p),
                       "catalog_topic": crate::catalog::entry::entry_topic(&plan.agent, p)});
    if p.uns {
        b["uns_topic"] = p.uns_topic.clone().into();
    }
    b
}

/// Topic of a product's gap events.
pub fn gaps_topic(p: &ProductPlan) -> String {
    format!("{}/_gaps", p.topic)
}

/// The wire form of a gap event: the product's id and major version rather than its buffer key.
/// Returns the payload and the product id.
pub fn gap_payload(g: &crate::buffer::GapEvent, agent: &str) -> (Vec<u8>, String) {
    let (id, major) = crate::config::split_product_key(&g.product);
    let payload = serde_json::to_vec(&json!({
        "agent": agent,
        "product": id,
        "major": major,
        "epoch": g.epoch,
        "from_seq": g.from_seq,
        "to_seq": g.to_seq,
        "count": g.count,
        "reason": g.reason,
        "ts": g.ts,
    }))
    .expect("gap serializes");
    (payload, id.to_string())
}

/// Topic of the agent's retained status.
pub fn status_topic(plan: &Plan) -> String {
    format!("{}/_agents/{}/status", plan.agent.site, plan.agent.id)
}

/// The agent's status payload (`online` while connected; `offline` as the will).
pub fn status(plan: &Plan, state: &str, epoch: u64) -> Vec<u8> {
    status_refusing(plan, state, epoch, &[])
}

/// [`status`], naming the product files the last reload refused: `(file, first problem)`.
pub fn status_refusing(plan: &Plan, state: &str, epoch: u64, refused: &[(String, String)]) -> Vec<u8> {
    let mut doc = json!({
        "state": state,
        "agent": plan.agent.id,
        "version": env!("CARGO_PKG_VERSION"),
        "config_hash": plan.config_hash,
        "epoch": epoch,
        "ts": format_rfc3339_millis(crate::model::now_millis()),
    });
    if !refused.is_empty() {
        doc["refused"] = refused
            .iter()
            .map(|(file, problem)| json!({"file": file, "problem": problem}))
            .collect();
    }
    serde_json::to_vec(&doc).expect("status serializes")
}

/// One schema property of the descriptor. What leaves is what the consumer gets: pseudonyms are
/// strings, masked values null.
fn property(p: &ProductPlan, f: &crate::config::FieldPlan, lineage: Json) -> Json {
    json!({
        "name": f.name,
        "logicalType": crate::config::contract::published_type(f),
        "unit": &*f.unit,
        "description": f.description(),
        "required": f.required,
        "classification": &*f.classification,
        "edgeAction": f.action.name(),
        "range": f.range().map(|(lo, hi)| json!({"min": lo, "max": hi})),
        "aggregate": (matches!(p.publish, crate::config::PublishMode::Window(_)) && f.source.tag().is_some())
            .then(|| f.aggregate.name()),
        "lineage": lineage,
    })
}

/// The product descriptor (contract), in Open Data Contract Standard vocabulary plus the MQTT binding
/// and lineage.
pub fn descriptor(plan: &Plan, p: &ProductPlan) -> Vec<u8> {
    // One field's JSON tree at a time (see catalog::json_array): the same bytes as a tree of all.
    let properties = p
        .fields
        .iter()
        // Fields that never leave the site are not part of the published contract.
        .filter(|f| f.action != crate::config::EdgeAction::Never)
        .map(|f| {
            let t = match &f.source {
                crate::config::FieldSource::Tag(t) => &plan.tags[*t],
                crate::config::FieldSource::Derived(d) => {
                    return property(
                        p,
                        f,
                        json!({
                            "derived": d.op.name(),
                            "inputs": d.inputs.iter().map(|&i| &*p.fields[i].name).collect::<Vec<_>>(),
                            "scale": f.scale(),
                            "offset": f.offset(),
                        }),
                    )
                }
            };
            let lineage = t.lineage(&plan.devices[t.device()]);
            property(p, f, lineage)
        });
    let contract = crate::catalog::json_array(properties);
    let doc = json!({
        "apiVersion": "plantmesh/v1",
        "kind": "DataProduct",
        "id": p.id,
        "urn": crate::config::urn(&plan.agent, &p.id, p.major),
        "name": p.name,
        "version": p.version,
        "domain": p.domain,
        "team": p.owner,
        "contact": p.contact,
        "description": p.description,
        "status": p.status,
        "schema": [{"name": p.id, "properties": crate::catalog::ARRAY_HERE}],
        "window_ms": match p.publish {
            crate::config::PublishMode::Window(w) => Some(w.as_millis() as u64),
            _ => None,
        },
        "slaProperties": crate::catalog::odcs::sla_properties(&p.service_levels),
        "binding": binding(plan, p),
        "contract_hash": format!("{:016x}", crate::config::fnv1a64(&[p.version.as_bytes(), &contract])),
        "agent": plan.agent.id,
    });
    crate::catalog::splice(&doc, &contract)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::MessageId;
    use crate::config::LogicalType;
    use crate::model::{BadReason, Quality};

    #[test]
    fn records_are_valid_json_for_every_value_kind() {
        let field = |name: &str| crate::config::test_field(name, LogicalType::Number);
        let p = crate::config::test_product(
            ["b", "i", "u", "f", "nan", "t\"q", "none"]
                .iter()
                .map(|n| field(n))
                .collect(),
        );
        let r = Record {
            ts: 1_795_255_200_123,
            fields: vec![
                (Some(Value::Bool(true)), Quality::Good),
                (Some(Value::Int(-9_000_000_000_000)), Quality::Good),
                (Some(Value::UInt(u64::MAX)), Quality::Good),
                (Some(Value::Float(0.1)), Quality::Good),
                (Some(Value::Float(f64::NAN)), Quality::Good),
                (Some(Value::Text("a \"quoted\"\n text".into())), Quality::Good),
                (None, Quality::Bad(BadReason::Timeout)),
            ],
        };
        let v: Json = serde_json::from_slice(&encode_record(&p, &r)).unwrap();
        assert_eq!(v["ts"], "2026-11-21T10:00:00.123Z");
        assert_eq!(v["fields"]["b"], true);
        assert_eq!(v["fields"]["i"], -9_000_000_000_000i64);
        assert_eq!(v["fields"]["u"], u64::MAX);
        assert_eq!(v["fields"]["f"], 0.1);
        assert_eq!(v["fields"]["nan"], Json::Null);
        assert_eq!(v["fields"]["t\"q"], "a \"quoted\"\n text");
        assert_eq!(v["fields"]["none"], Json::Null);
        assert_eq!(v["quality"]["none"], "bad:timeout");
    }

    #[test]
    fn only_the_fields_governance_lets_leave_are_written_under_their_own_names() {
        let p = crate::config::test_product(
            ["first", "masked", "third", "ünits", "fifth"]
                .iter()
                .map(|n| crate::config::test_field(n, LogicalType::Number))
                .collect(),
        );
        let governed = Governed {
            ts: 0,
            fields: vec![
                (0, Some(Value::Int(1)), Quality::Good),
                (
                    3,
                    Some(Value::Float(2.5)),
                    Quality::Uncertain(BadReason::OpcUa(0x4093_0000)),
                ),
                (4, None, Quality::Bad(BadReason::Timeout)),
            ],
        };
        let v: Json = serde_json::from_slice(&RecordEncoder::new(&p).encode(&governed)).unwrap();
        let names = |k: &str| v[k].as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(names("fields"), ["fifth", "first", "ünits"]);
        assert_eq!(names("quality"), ["fifth", "first", "ünits"]);
        assert_eq!(
            (v["fields"]["first"].as_i64(), v["fields"]["ünits"].as_f64()),
            (Some(1), Some(2.5))
        );
        assert_eq!(v["quality"]["ünits"], "uncertain:opcua_UncertainSensorNotAccurate");
        assert_eq!(v["quality"]["fifth"], "bad:timeout");
    }

    #[test]
    fn message_envelope_is_valid_json_with_identity() {
        let m = StoredMessage {
            product: crate::buffer::Keys::default().intern("oven"),
            name: "oven".into(),
            id: MessageId { epoch: 7, seq: 1042 },
            created: 0,
            records: 1,
            topic: "t".into(),
            version: "1.2.0".into(),
            governance: 1,
            last_seq: 1042,
            body: br#"[{"ts":"2026-11-21T10:00:00.123Z","fields":{"a":1.5},"quality":{"a":"good"}}]"#.to_vec(),
        };
        let v: Json = serde_json::from_slice(&encode_message(&m, "gw-\"1", true)).unwrap();
        assert_eq!(v["product"], "oven");
        assert_eq!(v["agent"], "gw-\"1");
        assert_eq!((v["epoch"].as_u64(), v["seq"].as_u64()), (Some(7), Some(1042)));
        assert_eq!(v["historical"], true);
        assert_eq!(v["records"][0]["fields"]["a"], 1.5);
    }
}
