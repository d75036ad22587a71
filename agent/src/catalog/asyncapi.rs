//! The gateway's AsyncAPI 3.1 document: every channel the agent publishes on (each product's
//! messages, descriptor, contract, SLI, gaps, UNS view and catalog entry; the agent's status), each
//! with the JSON Schema of its messages, so consumers can be generated or validated from it.
//! Retained on `{site}/_agents/{agent_id}/asyncapi` and printed by `plantmesh export asyncapi`.
//!
//! The product message schemas are exact: a record's `fields` and `quality` may hold only the
//! fields that leave the site (`additionalProperties: false`), each value of its published type or
//! null. The other documents have one shared schema each, naming their required keys.

use crate::config::{EdgeAction, Plan, ProductPlan};
use serde_json::{json, Map, Value as Json};

/// The AsyncAPI version the document is written in.
pub const ASYNCAPI: &str = "3.1.0";

/// Where the document is retained.
pub fn topic(plan: &Plan) -> String {
    format!("{}/_agents/{}/asyncapi", plan.agent.site, plan.agent.id)
}

/// A channel or message id: AsyncAPI component keys are `[A-Za-z0-9._-]`.
fn id(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn value_schema(logical: &str) -> Json {
    match logical {
        "number" => json!({"type": ["number", "null"]}),
        "integer" => json!({"type": ["integer", "null"]}),
        "boolean" => json!({"type": ["boolean", "null"]}),
        "string" => json!({"type": ["string", "null"]}),
        _ => json!({"type": ["array", "null"]}),
    }
}

/// The schema of product `p`'s messages (docs/wire-format.md, "Product message").
fn product_message(p: &ProductPlan) -> Json {
    let leaving = p.fields.iter().filter(|f| f.action != EdgeAction::Never);
    let mut values = Map::new();
    let mut qualities = Map::new();
    for f in leaving {
        values.insert(
            f.name.to_string(),
            value_schema(crate::config::contract::published_type(f)),
        );
        qualities.insert(f.name.to_string(), json!({"$ref": "#/components/schemas/quality"}));
    }
    json!({
        "type": "object",
        "required": ["product", "version", "agent", "epoch", "seq", "historical", "records"],
        "properties": {
            "product": {"const": p.id},
            "version": {"type": "string"},
            "agent": {"type": "string"},
            "epoch": {"type": "integer", "minimum": 1},
            "seq": {"type": "integer", "minimum": 1},
            "last_seq": {"type": "integer", "minimum": 1},
            "historical": {"type": "boolean"},
            "records": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["ts", "fields", "quality"],
                    "additionalProperties": false,
                    "properties": {
                        "ts": {"type": "string", "format": "date-time"},
                        "fields": {"type": "object", "properties": values, "additionalProperties": false},
                        "quality": {"type": "object", "properties": qualities, "additionalProperties": false},
                    },
                },
            },
        },
    })
}

/// The schemas every product shares.
fn shared_schemas() -> Json {
    let obj =
        |required: &[&str], properties: Json| json!({"type": "object", "required": required, "properties": properties});
    let status = json!({"enum": ["draft", "active", "deprecated", "retired"]});
    json!({
        "quality": {"type": "string", "pattern": "^(good|stale|bad:[a-z0-9_A-Z]+|uncertain:[a-z0-9_A-Z]+)$"},
        "descriptor": obj(&["apiVersion", "kind", "id", "urn", "version", "status", "schema", "binding"], json!({
            "apiVersion": {"const": "plantmesh/v1"}, "kind": {"const": "DataProduct"},
            "urn": {"type": "string", "pattern": "^urn:plantmesh:"}, "status": status,
        })),
        "contract": obj(&["apiVersion", "kind", "id", "version", "status", "schema"], json!({
            "apiVersion": {"const": super::odcs::API_VERSION}, "kind": {"const": "DataContract"},
            "id": {"type": "string", "pattern": "^urn:plantmesh:"}, "status": status,
        })),
        "sli": obj(&["product", "version", "status", "agent", "ts", "interval_ms", "completeness", "records", "records_total", "drops", "targets", "met"], json!({
            "product": {"type": "string"}, "completeness": {"type": "number", "minimum": 0, "maximum": 1},
            "freshness_ms": {"type": ["integer", "null"]}, "records": {"type": "integer"}, "status": status,
        })),
        "gap": obj(&["agent", "product", "major", "epoch", "from_seq", "to_seq", "count", "reason", "ts"], json!({
            "epoch": {"type": "integer"}, "from_seq": {"type": "integer"}, "to_seq": {"type": "integer"},
            "count": {"type": "integer"}, "reason": {"type": "string"},
        })),
        "catalogEntry": obj(&["urn", "product", "major", "version", "status", "domain", "owner", "site", "agent", "contract_sha256", "topics"], json!({
            "urn": {"type": "string", "pattern": "^urn:plantmesh:"}, "status": status,
            "contract_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "topics": obj(&["data", "descriptor", "contract", "sli", "gaps"], json!({})),
        })),
        "unsValue": {
            "type": "object", "required": ["value", "ts", "quality"], "additionalProperties": false,
            "properties": {"value": {}, "ts": {"type": "string", "format": "date-time"},
                           "quality": {"$ref": "#/components/schemas/quality"}, "unit": {"type": "string"}},
        },
        "asyncapi": obj(&["asyncapi", "info", "channels", "operations"], json!({"asyncapi": {"const": ASYNCAPI}})),
        "status": obj(&["state", "agent", "version", "config_hash", "epoch", "ts"], json!({
            "state": {"enum": ["online", "offline"]}, "epoch": {"type": "integer"},
            "refused": {"type": "array", "items": obj(&["file", "problem"], json!({}))},
        })),
    })
}

/// The document for `plan`.
pub fn document(plan: &Plan) -> Json {
    let mut channels = Map::new();
    let mut operations = Map::new();
    let mut messages = Map::new();
    for (name, schema, summary) in [
        (
            "descriptor",
            "descriptor",
            "the product descriptor (retained; empty: the product left)",
        ),
        (
            "contract",
            "contract",
            "the product's ODCS data contract (retained; empty: the product left)",
        ),
        (
            "sli",
            "sli",
            "measured service levels (retained; empty: the product left)",
        ),
        ("gap", "gap", "a gap event: seqs that will never arrive, and why"),
        (
            "catalogEntry",
            "catalogEntry",
            "the product's catalog index entry (retained; empty: the product left)",
        ),
        ("unsValue", "unsValue", "a field's latest value (UNS view, retained)"),
        ("status", "status", "the agent's status (retained; also its MQTT will)"),
        ("asyncapi", "asyncapi", "this document (retained)"),
    ] {
        messages.insert(
            name.into(),
            json!({"name": name, "summary": summary, "contentType": "application/json",
                   "payload": {"$ref": format!("#/components/schemas/{schema}")}}),
        );
    }
    let mut add = |channels: &mut Map<String, Json>,
                   cid: String,
                   address: String,
                   message: &str,
                   extra: Option<Json>| {
        let mut ch =
            json!({"address": address, "messages": {message: {"$ref": format!("#/components/messages/{message}")}}});
        if let (Some(Json::Object(extra)), Some(o)) = (extra, ch.as_object_mut()) {
            o.extend(extra);
        }
        channels.insert(cid.clone(), ch);
        operations.insert(
            format!("send.{cid}"),
            json!({"action": "send", "channel": {"$ref": format!("#/channels/{cid}")},
                   "messages": [{"$ref": format!("#/channels/{cid}/messages/{message}")}]}),
        );
    };
    add(
        &mut channels,
        "status".into(),
        crate::publish::envelope::status_topic(plan),
        "status",
        None,
    );
    add(&mut channels, "asyncapi".into(), topic(plan), "asyncapi", None);
    for p in &plan.products {
        let k = id(&p.key);
        let message = format!("product.{k}");
        let sparkplug = plan.upstream.as_ref().and_then(|u| u.sparkplug.as_ref());
        let address = match sparkplug {
            // Product data leaves as Sparkplug B DDATA of the product's device: protobuf, whose
            // schema is the Sparkplug specification's, not a JSON Schema.
            Some(sp) => {
                messages.insert(
                    message.clone(),
                    json!({"name": message, "title": p.name, "contentType": "application/x-protobuf",
                           "summary": format!("records of {} v{} as Sparkplug B DDATA metrics (Eclipse Sparkplug 3.0)", p.id, p.version)}),
                );
                crate::sparkplug::topic(
                    &sp.group_id,
                    crate::sparkplug::Kind::DData,
                    &sp.edge_node_id,
                    Some(&p.key),
                )
            }
            None => {
                messages.insert(
                    message.clone(),
                    json!({"name": message, "title": p.name, "summary": format!("records of {} v{}", p.id, p.version),
                           "contentType": "application/json",
                           "payload": {"$ref": format!("#/components/schemas/{message}")}}),
                );
                p.topic.clone()
            }
        };
        add(
            &mut channels,
            k.clone(),
            address,
            &message,
            Some(json!({
                "title": p.name,
                "description": format!("{} (owner {}, domain {}, status {}); QoS {}", crate::config::urn(&plan.agent, &p.id, p.major), p.owner, p.domain, p.status, p.qos.level()),
            })),
        );
        add(
            &mut channels,
            format!("{k}.descriptor"),
            crate::publish::envelope::descriptor_topic(p),
            "descriptor",
            None,
        );
        add(
            &mut channels,
            format!("{k}.contract"),
            super::odcs::contract_topic(p),
            "contract",
            None,
        );
        add(&mut channels, format!("{k}.sli"), super::sli_topic(p), "sli", None);
        add(
            &mut channels,
            format!("{k}.gaps"),
            crate::publish::envelope::gaps_topic(p),
            "gap",
            None,
        );
        add(
            &mut channels,
            format!("{k}.catalog"),
            super::entry::entry_topic(&plan.agent, p),
            "catalogEntry",
            None,
        );
        if p.uns {
            let fields: Vec<&str> = p
                .fields
                .iter()
                .filter(|f| f.action != EdgeAction::Never)
                .map(|f| &*f.name)
                .collect();
            add(
                &mut channels,
                format!("{k}.uns"),
                p.uns_topic.clone(),
                "unsValue",
                Some(json!({
                    "parameters": {"field": {"enum": fields, "description": "the field's name"}},
                })),
            );
        }
    }
    let mut schemas = match shared_schemas() {
        Json::Object(m) => m,
        _ => Map::new(),
    };
    let json_encoding = plan.upstream.as_ref().is_none_or(|u| u.sparkplug.is_none());
    for p in plan.products.iter().filter(|_| json_encoding) {
        schemas.insert(format!("product.{}", id(&p.key)), product_message(p));
    }
    let (host, protocol, version) = match &plan.upstream {
        Some(u) => (
            format!("{}:{}", u.host, u.port),
            if u.tls { "secure-mqtt" } else { "mqtt" },
            match u.version {
                crate::config::MqttVersion::V5 => "5",
                crate::config::MqttVersion::V311 => "3.1.1",
            },
        ),
        None => ("127.0.0.1:1883".into(), "mqtt", "3.1.1"),
    };
    json!({
        "asyncapi": ASYNCAPI,
        "id": format!("urn:plantmesh:{}:{}:{}", plan.agent.enterprise.as_deref().unwrap_or("_"), plan.agent.site, plan.agent.id),
        "info": {
            "title": format!("plantmesh gateway {}", plan.agent.id),
            "version": env!("CARGO_PKG_VERSION"),
            "description": format!("What agent {} of site {} publishes (wire format version 1, docs/wire-format.md); config {}.", plan.agent.id, plan.agent.site, plan.config_hash),
        },
        "defaultContentType": "application/json",
        "servers": {"upstream": {"host": host, "protocol": protocol, "protocolVersion": version}},
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    })
}

/// The document as it is retained, or nothing (an empty Vec) when it cannot fit in `most` bytes: a
/// product message schema takes at least 70 bytes per field (its value and quality entries), so a
/// gateway of thousands of fields is known to be too large before its document is built (building
/// it, hundreds of KiB of JSON tree on every connect, is what would cost).
pub fn document_within(plan: &Plan, most: usize) -> Vec<u8> {
    let fields: usize = plan
        .products
        .iter()
        .map(|p| p.fields.iter().filter(|f| f.action != EdgeAction::Never).count())
        .sum();
    if fields.saturating_mul(70) > most {
        return Vec::new();
    }
    let doc = document_bytes(plan);
    if doc.len() > most {
        return Vec::new();
    }
    doc
}

/// The document as it is retained: JSON bytes.
pub fn document_bytes(plan: &Plan) -> Vec<u8> {
    #[allow(clippy::expect_used, reason = "a JSON value serializes into a Vec")]
    serde_json::to_vec(&document(plan)).expect("AsyncAPI document serializes")
}
