//! The upstream wire format (docs/wire-format.md): records, product messages, descriptors, status.

use crate::buffer::StoredMessage;
use crate::config::{Plan, ProductPlan, Table};
use crate::model::{format_rfc3339_millis, Record};
use serde_json::{json, Map, Value as Json};

/// One record as a JSON object: `{"ts":..,"fields":{..},"quality":{..}}`.
pub fn encode_record(product: &ProductPlan, record: &Record) -> Vec<u8> {
    let mut fields = Map::with_capacity(product.fields.len());
    let mut quality = Map::with_capacity(product.fields.len());
    for (f, (v, q)) in product.fields.iter().zip(&record.fields) {
        fields.insert(f.name.clone(), v.as_ref().map_or(Json::Null, |v| v.to_json()));
        quality.insert(f.name.clone(), Json::String(q.to_string()));
    }
    serde_json::to_vec(&json!({"ts": format_rfc3339_millis(record.ts), "fields": fields, "quality": quality}))
        .expect("records serialize")
}

/// The product message around stored records.
pub fn encode_message(m: &StoredMessage, agent: &str, historical: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(m.body.len() + 160);
    out.extend_from_slice(b"{\"product\":");
    out.extend(serde_json::to_vec(&m.product).expect("string"));
    out.extend_from_slice(b",\"version\":");
    out.extend(serde_json::to_vec(&m.version).expect("string"));
    out.extend_from_slice(b",\"agent\":");
    out.extend(serde_json::to_vec(agent).expect("string"));
    out.extend(
        format!(
            ",\"epoch\":{},\"seq\":{},\"historical\":{historical},\"records\":",
            m.id.epoch, m.id.seq
        )
        .as_bytes(),
    );
    out.extend(&m.body);
    out.push(b'}');
    out
}

/// Topic of a product's retained descriptor.
pub fn descriptor_topic(p: &ProductPlan) -> String {
    format!("{}/_descriptor", p.topic)
}

/// Topic of a product's gap events.
pub fn gaps_topic(p: &ProductPlan) -> String {
    format!("{}/_gaps", p.topic)
}

/// Topic of the agent's retained status.
pub fn status_topic(plan: &Plan) -> String {
    format!("{}/_agents/{}/status", plan.agent.site, plan.agent.id)
}

/// The agent's status payload (`online` while connected; `offline` as the will).
pub fn status(plan: &Plan, state: &str, epoch: u64) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "state": state,
        "agent": plan.agent.id,
        "version": env!("CARGO_PKG_VERSION"),
        "config_hash": plan.config_hash,
        "epoch": epoch,
        "ts": format_rfc3339_millis(crate::model::now_millis()),
    }))
    .expect("status serializes")
}

/// The product descriptor (contract), in Open Data Contract Standard vocabulary plus the MQTT binding
/// and lineage.
pub fn descriptor(plan: &Plan, p: &ProductPlan) -> Vec<u8> {
    let properties: Vec<Json> = p
        .fields
        .iter()
        .map(|f| {
            let t = &plan.tags[f.tag];
            let table = match t.table {
                Table::Coil => "coil",
                Table::DiscreteInput => "discrete_input",
                Table::Holding => "holding",
                Table::Input => "input",
            };
            json!({
                "name": f.name,
                "logicalType": f.logical_type.as_str(),
                "unit": f.unit,
                "description": f.description,
                "lineage": {
                    "device": plan.devices[t.device].id,
                    "tag": t.name,
                    "protocol": "modbus_tcp",
                    "unit_id": t.unit_id,
                    "table": table,
                    "address": t.address,
                },
            })
        })
        .collect();
    let contract = serde_json::to_vec(&properties).expect("serializes");
    serde_json::to_vec(&json!({
        "apiVersion": "plantmesh/v1",
        "kind": "DataProduct",
        "id": p.id,
        "name": p.name,
        "version": p.version,
        "domain": p.domain,
        "team": p.owner,
        "description": p.description,
        "status": "active",
        "schema": [{"name": p.id, "properties": properties}],
        "binding": {"protocol": "mqtt", "topic": p.topic, "qos": 1, "encoding": "json",
                    "gaps_topic": gaps_topic(p)},
        "contract_hash": format!("{:016x}", crate::config::fnv1a64(&[p.version.as_bytes(), &contract])),
        "agent": plan.agent.id,
    }))
    .expect("descriptor serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::MessageId;

    #[test]
    fn message_envelope_is_valid_json_with_identity() {
        let m = StoredMessage {
            product: "oven".into(),
            id: MessageId { epoch: 7, seq: 1042 },
            created: 0,
            records: 1,
            topic: "t".into(),
            version: "1.2.0".into(),
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
