//! A product's data contract in the Open Data Contract Standard (ODCS v3.1.0), retained on
//! `{base}/_contract` and written by `plantmesh export contracts DIR`.
//!
//! It says what the agent knows and enforces, in ODCS's own keys wherever ODCS has one: the URN as
//! `id`, the product file's owner, domain, status and service levels, each published field with
//! its logical type and the physical type it is read as (`modbus holding f32 CDAB`, `opcua
//! Double`), `required` and `range` as quality rules, and the MQTT binding as a server. What ODCS
//! has no key for (unit, the edge action, lineage, the topics beside the data) is under
//! `customProperties`, each property named `plantmesh...`. Fields that never leave the site are
//! absent, as in the descriptor.

use crate::config::{EdgeAction, FieldPlan, FieldSource, OnViolation, Plan, ProductPlan};
use crate::sources::{TagKind, TagPlan};
use serde_json::{json, Value as Json};

/// The ODCS version the contracts are written in.
pub const API_VERSION: &str = "v3.1.0";

/// Topic of a product's retained contract.
pub fn contract_topic(p: &ProductPlan) -> String {
    format!("{}/_contract", p.topic)
}

/// `{"property": name, "value": value}`, the ODCS custom-property form.
fn custom(name: &str, value: impl Into<Json>) -> Json {
    json!({"property": name, "value": value.into()})
}

/// How the device delivers the value, in its own protocol's words.
pub fn physical_type(tag: &TagPlan) -> String {
    let ty = tag.data_type.as_str();
    match &tag.kind {
        TagKind::Modbus(m) if m.table.is_bits() => format!("modbus {} {ty}", m.table.as_str()),
        TagKind::Modbus(m) => match m.bit {
            Some(bit) => format!("modbus {} bit {bit}", m.table.as_str()),
            // Byte order matters once a value spans two registers, or a register's bytes swap.
            None if tag.data_type.registers() > 1 || m.byte_order.swaps_bytes() => {
                format!("modbus {} {ty} {}", m.table.as_str(), m.byte_order.as_str())
            }
            None => format!("modbus {} {ty}", m.table.as_str()),
        },
        TagKind::OpcUa(o) => format!("opcua {}", o.type_name),
        TagKind::Sensor(_) => format!("sensor_node {ty}"),
        TagKind::Mqtt(_) => format!("mqtt {ty}"),
    }
}

/// One schema property: a field as it leaves the site.
fn property(plan: &Plan, p: &ProductPlan, f: &FieldPlan) -> Json {
    let logical = crate::config::contract::published_type(f);
    // A masked field is always null, a pseudonym is a string: neither keeps its range, and a
    // masked one cannot promise a value.
    let keeps_values = !matches!(f.action, EdgeAction::Mask | EdgeAction::Pseudonymise);
    // ODCS `required`: the published value is never null. Only so when a record without it is
    // dropped, and the field is not masked.
    let required = f.required && f.action != EdgeAction::Mask && p.on_violation == OnViolation::Drop;
    let mut prop = json!({
        "name": f.name,
        "logicalType": logical,
        "required": required,
        "classification": &*f.classification,
    });
    if !f.description().is_empty() {
        prop["description"] = f.description().into();
    }
    let mut customs = vec![custom("plantmeshEdgeAction", f.action.name())];
    if !f.unit.is_empty() {
        customs.push(custom("plantmeshUnit", f.unit.as_str()));
    }
    match &f.source {
        FieldSource::Tag(t) => {
            let tag = &plan.tags[*t];
            prop["physicalType"] = physical_type(tag).into();
            customs.push(custom("plantmeshLineage", tag.lineage(&plan.devices[tag.device()])));
        }
        FieldSource::Derived(d) => {
            prop["physicalType"] = "derived".into();
            prop["transformSourceObjects"] = d.inputs.iter().map(|&i| json!(&*p.fields[i].name)).collect();
            prop["transformLogic"] = format!(
                "{}({}) * {} + {}",
                d.op.name(),
                d.inputs
                    .iter()
                    .map(|&i| &*p.fields[i].name)
                    .collect::<Vec<_>>()
                    .join(", "),
                f.scale(),
                f.offset()
            )
            .into();
        }
    }
    if matches!(p.publish, crate::config::PublishMode::Window(_)) && f.source.tag().is_some() {
        customs.push(custom("plantmeshAggregate", f.aggregate.name()));
    }
    // Under `on_violation = "drop"` a record breaking a rule is not published: the rule holds for
    // every published record (severity error). Under `flag` it is published with the field's
    // quality naming the breach (severity warning: the record says where it does not hold).
    let (enforced, severity) = match p.on_violation {
        OnViolation::Drop => (true, "error"),
        OnViolation::Flag => (false, "warning"),
    };
    let mut quality = Vec::new();
    if f.required && f.action != EdgeAction::Mask {
        quality.push(json!({
            "type": "library", "metric": "nullValues", "mustBe": 0, "dimension": "completeness",
            "severity": severity,
            "description": if enforced {
                "required: a record without a value for it is dropped (counted, reported as a contract_violation gap)"
            } else {
                "required: a record without a value for it is published with the value null and quality bad:required_missing (or the reason the read failed)"
            },
        }));
    }
    if let (Some((lo, hi)), true) = (f.range(), keeps_values) {
        if matches!(logical, "number" | "integer") {
            prop["logicalTypeOptions"] = json!({"minimum": lo, "maximum": hi});
        }
        quality.push(json!({
            "type": "sql", "dimension": "conformity", "severity": severity,
            "query": format!("SELECT COUNT(*) FROM {{object}} WHERE {{property}} < {lo} OR {{property}} > {hi}"),
            "mustBe": 0,
            "description": if enforced {
                format!("range [{lo}, {hi}]: a record with a value outside it is dropped (counted, reported as a contract_violation gap)")
            } else {
                format!("range [{lo}, {hi}]: a value outside it is published with quality bad:out_of_range")
            },
        }));
    }
    if !quality.is_empty() {
        prop["quality"] = quality.into();
    }
    prop["customProperties"] = customs.into();
    prop
}

/// Where the product is published: the upstream broker, as an ODCS server of type `custom`
/// (ODCS has no MQTT type).
fn server(plan: &Plan, p: &ProductPlan) -> Json {
    let (host, port, tls, encoding) = match &plan.upstream {
        Some(u) => (
            u.host.as_str(),
            u.port,
            u.tls,
            if u.sparkplug.is_some() { "sparkplug_b" } else { "json" },
        ),
        // No upstream in the config: the embedded broker (loopback, 1883 when free).
        None => ("127.0.0.1", 1883, false, "json"),
    };
    let mut topics = json!({
        "descriptor": crate::publish::envelope::descriptor_topic(p),
        "contract": contract_topic(p),
        "sli": crate::catalog::sli_topic(p),
        "gaps": crate::publish::envelope::gaps_topic(p),
        "catalog": super::entry::entry_topic(&plan.agent, p),
    });
    if p.uns {
        topics["uns"] = p.uns_topic.clone().into();
    }
    json!({
        "server": "upstream",
        "type": "custom",
        "description": format!("MQTT {}, QoS {}; product messages as docs/wire-format.md, version 1", if tls { "over TLS" } else { "over TCP" }, p.qos.level()),
        "environment": plan.agent.site,
        "host": host,
        "port": port,
        "format": encoding,
        "encoding": "UTF-8",
        "stream": p.topic,
        "customProperties": [
            custom("plantmeshProtocol", if tls { "mqtts" } else { "mqtt" }),
            custom("plantmeshQos", p.qos.level()),
            custom("plantmeshTopics", topics),
        ],
    })
}

/// The service levels in ODCS form (`property`, `value`, `unit`); the descriptor has the same.
pub fn sla_properties(sl: &crate::config::ServiceLevelPlan) -> Vec<Json> {
    let ms = |d: std::time::Duration| d.as_millis() as u64;
    let mut out = vec![
        json!({"property": "frequency", "value": ms(sl.expected_interval), "unit": "ms",
                              "description": "expected time between records"}),
    ];
    if let Some(d) = sl.freshness {
        out.push(json!({"property": "freshness", "value": ms(d), "unit": "ms",
                        "description": "most age of the newest good value"}));
    }
    if let Some(c) = sl.completeness {
        out.push(json!({"property": "completeness", "value": c,
                        "description": "share of good values per SLI interval"}));
    }
    if let Some(d) = sl.latency_p99 {
        out.push(
            json!({"property": "latency", "value": ms(d), "unit": "ms", "valueExt": "p99",
                        "description": "read-to-PUBACK latency, 99th percentile"}),
        );
    }
    out
}

/// The contract document of product `p` of `plan`.
pub fn contract(plan: &Plan, p: &ProductPlan) -> Json {
    document(plan, p, properties(plan, p).collect::<Vec<Json>>().into())
}

/// The schema property of every field that leaves the site.
fn properties<'a>(plan: &'a Plan, p: &'a ProductPlan) -> impl Iterator<Item = Json> + 'a {
    p.fields
        .iter()
        .filter(|f| f.action != EdgeAction::Never)
        .map(move |f| property(plan, p, f))
}

/// The contract with `properties` as the schema's properties.
fn document(plan: &Plan, p: &ProductPlan, properties: Json) -> Json {
    let urn = crate::config::urn(&plan.agent, &p.id, p.major);
    let mut support = json!({"channel": "owner", "description": p.contact});
    if p.contact.contains('@') && !p.contact.contains(char::is_whitespace) {
        support["tool"] = "email".into();
        support["url"] = format!("mailto:{}", p.contact).into();
    }
    let mut doc = json!({
        "apiVersion": API_VERSION,
        "kind": "DataContract",
        "id": urn,
        "name": p.name,
        "version": p.version,
        "status": p.status,
        "domain": p.domain,
        "dataProduct": p.id,
        "team": {"name": p.owner},
        "support": [support],
        "tags": ["plantmesh", format!("site:{}", plan.agent.site), format!("agent:{}", plan.agent.id)],
        "servers": [server(plan, p)],
        "schema": [{
            "name": p.id,
            "physicalName": p.topic,
            "physicalType": "topic",
            "logicalType": "object",
            "description": "one record per sample (or per window); a product message carries 1 to max_records_per_message of them",
            "properties": properties,
        }],
        "slaProperties": sla_properties(&p.service_levels),
        "customProperties": [
            custom("plantmeshAgent", plan.agent.id.as_str()),
            custom("plantmeshSite", plan.agent.site.as_str()),
            custom("plantmeshMajor", p.major),
            custom("plantmeshWireFormat", 1),
        ],
    });
    if !p.description.is_empty() {
        doc["description"] = json!({"purpose": p.description});
    }
    if let Some(e) = &plan.agent.enterprise {
        doc["tenant"] = e.as_str().into();
    }
    if let crate::config::PublishMode::Window(w) = p.publish {
        if let Some(c) = doc["customProperties"].as_array_mut() {
            c.push(custom("plantmeshWindowMs", w.as_millis() as u64));
        }
    }
    doc
}

/// The contract as it is published: JSON bytes.
/// The same bytes as serializing [`contract`], with one field's JSON tree built at a time
/// (see [`super::json_array`]).
pub fn contract_bytes(plan: &Plan, p: &ProductPlan) -> Vec<u8> {
    let doc = document(plan, p, super::ARRAY_HERE.into());
    super::splice(&doc, &super::json_array(properties(plan, p)))
}

/// Writes every product's contract to `dir` (created if missing) as `<product>.v<major>.odcs.json`,
/// pretty-printed; returns the files written, in product order.
pub fn write_contracts(plan: &Plan, dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut files = Vec::with_capacity(plan.products.len());
    for p in &plan.products {
        let path = dir.join(format!("{}.odcs.json", p.key));
        let mut text = serde_json::to_vec_pretty(&contract(plan, p)).map_err(std::io::Error::other)?;
        text.push(b'\n');
        crate::fsutil::write_atomic(&path, &text)?;
        files.push(path);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const GATEWAY: &str = r#"
[agent]
id = "gw@1"
enterprise = "acme:eu"
site = "s1"
area = "a"
line = "l"
cell = "c7"
[[devices]]
id = "plc"
protocol = "modbus_tcp"
address = "127.0.0.1:502"
  [[devices.tags]]
  name = "temp"
  table = "holding"
  address = 0
  type = "f32"
  byte_order = "CDAB"
  [[devices.tags]]
  name = "count"
  table = "input"
  address = 2
  type = "u16"
  [[devices.tags]]
  name = "run"
  table = "coil"
  address = 0
  type = "bool"
  [[devices.tags]]
  name = "recipe"
  table = "holding"
  address = 5
  type = "u16"
"#;
    const GOVERNANCE: &str = r##"
topic_template = "{enterprise}/{site}/{cell}/{product}/v{major}"
default_classification = "internal"
[classes.internal]
action = "pass"
[classes.restricted]
action = "never"
[classes.confidential]
action = "mask"
[egress]
allow_topic_prefixes = ["#"]
"##;
    const PRODUCT: &str = r#"
id = "oven"
name = "Oven"
version = "2.1.0"
domain = "quality"
owner = "quality-team"
contact = "quality@plant.example"
[[fields]]
name = "temp"
source = "plc.temp"
unit = "Cel"
required = true
range = [0, 400]
[[fields]]
name = "count"
source = "plc.count"
unit = "1"
[[fields]]
name = "run"
source = "plc.run"
unit = "1"
classification = "confidential"
required = true
[[fields]]
name = "secret"
source = "plc.recipe"
unit = "1"
classification = "restricted"
[[fields]]
name = "double"
derive = "sum"
inputs = ["temp", "temp"]
unit = "Cel"
"#;

    fn plan() -> Plan {
        let dir = tempfile::tempdir().unwrap();
        crate::config::load_texts(
            (Path::new("agent.toml"), GATEWAY),
            Some((Path::new("governance.toml"), GOVERNANCE)),
            &[(Path::new("products/oven.toml"), PRODUCT)],
            dir.path(),
        )
        .unwrap()
    }

    #[test]
    fn the_published_contract_is_the_document_byte_for_byte_even_when_a_text_holds_the_placeholder() {
        let hostile = PRODUCT.replace(
            "version = \"2.1.0\"",
            &format!(
                "version = \"2.1.0\"\ndescription = 'x\"{}\"y'",
                super::super::ARRAY_HERE
            ),
        );
        let dir = tempfile::tempdir().unwrap();
        let plan = crate::config::load_texts(
            (Path::new("agent.toml"), GATEWAY),
            Some((Path::new("governance.toml"), GOVERNANCE)),
            &[(Path::new("products/oven.toml"), &hostile)],
            dir.path(),
        )
        .unwrap();
        let p = &plan.products[0];
        let bytes = contract_bytes(&plan, p);
        assert_eq!(bytes, serde_json::to_vec(&contract(&plan, p)).unwrap());
        let back: Json = serde_json::from_slice(&bytes).unwrap();
        assert!(back["description"]["purpose"]
            .as_str()
            .unwrap()
            .contains(super::super::ARRAY_HERE));
        assert_eq!(back["schema"][0]["properties"].as_array().unwrap().len(), 4);
        // The descriptor is spliced alike: its properties are an array, hashed as published.
        let d: Json = serde_json::from_slice(&crate::publish::envelope::descriptor(&plan, p)).unwrap();
        let props = &d["schema"][0]["properties"];
        assert_eq!(props.as_array().unwrap().len(), 4);
        let hash = crate::config::fnv1a64(&[p.version.as_bytes(), &serde_json::to_vec(props).unwrap()]);
        assert_eq!(d["contract_hash"], format!("{hash:016x}"));
    }

    #[test]
    fn the_contract_names_the_product_in_the_fleet_and_says_what_the_agent_enforces() {
        let plan = plan();
        let p = &plan.products[0];
        assert_eq!(p.topic, "acme:eu/s1/c7/oven/v2", "enterprise and cell placeholders");
        let c = contract(&plan, p);
        assert_eq!(
            c["id"], "urn:plantmesh:acme%3Aeu:s1:gw%401:oven:v2",
            "each part percent-encoded"
        );
        assert_eq!(
            (c["apiVersion"].as_str(), c["kind"].as_str()),
            (Some(API_VERSION), Some("DataContract"))
        );
        assert_eq!(c["tenant"], "acme:eu");
        assert_eq!(c["support"][0]["url"], "mailto:quality@plant.example");
        let props = c["schema"][0]["properties"].as_array().unwrap();
        let names: Vec<&str> = props.iter().map(|f| f["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            ["temp", "count", "run", "double"],
            "a field that never leaves is absent"
        );
        let by = |n: &str| props.iter().find(|f| f["name"] == n).unwrap();
        assert_eq!(by("temp")["physicalType"], "modbus holding f32 CDAB");
        assert_eq!(by("count")["physicalType"], "modbus input u16");
        assert_eq!(by("run")["physicalType"], "modbus coil bool");
        assert_eq!(by("double")["physicalType"], "derived");
        assert_eq!(by("double")["transformSourceObjects"], json!(["temp", "temp"]));
        // on_violation = flag (the default): a breach is published, flagged: not ODCS `required`,
        // and the rules are warnings.
        let temp = by("temp");
        assert_eq!(temp["required"], false);
        assert_eq!(temp["logicalTypeOptions"], json!({"minimum": 0.0, "maximum": 400.0}));
        let rules = temp["quality"].as_array().unwrap();
        assert_eq!(rules.len(), 2, "{rules:?}");
        assert!(rules.iter().all(|r| r["severity"] == "warning"));
        assert!(rules[1]["query"]
            .as_str()
            .unwrap()
            .contains("{property} < 0 OR {property} > 400"));
        // A masked field promises no value, so no required rule.
        assert!(by("run").get("quality").is_none(), "{}", by("run"));
        let unit = |f: &Json| {
            f["customProperties"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["property"] == "plantmeshUnit")
                .map(|c| c["value"].clone())
        };
        assert_eq!(unit(temp), Some(json!("Cel")));
        let entry: Json =
            serde_json::from_slice(&super::super::entry::entry(&plan, p, &contract_bytes(&plan, p))).unwrap();
        assert_eq!(entry["urn"], c["id"]);
        assert_eq!(
            super::super::entry::entry_topic(&plan.agent, p),
            "_plantmesh/catalog/acme:eu/s1/gw@1/oven.v2"
        );
    }
}
