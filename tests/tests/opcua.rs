//! OPC UA (python asyncua server) -> plantmesh -> Mosquitto, with the real binary.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const NS: &str = "urn:plantmesh:test";

fn gateway(broker_port: u16, devices: &str) -> String {
    format!(
        r#"
[agent]
id = "gw-ua"
site = "s1"
area = "a1"
line = "l1"

[upstream]
url = "mqtt://127.0.0.1:{broker_port}"
protocol = "5"
reconnect_min = "100ms"
reconnect_max = "500ms"

[buffer]
commit_interval = "50ms"
{devices}
"#
    )
}

fn product(id: &str, fields: &[(String, String)]) -> String {
    let mut s = format!("id = \"{id}\"\nname = \"{id}\"\nversion = \"1.0.0\"\ndomain = \"quality\"\nowner = \"lab\"\n");
    for (name, source) in fields {
        s += &format!("[[fields]]\nname = \"{name}\"\nsource = \"{source}\"\n");
    }
    s
}

/// (OPC UA type, value given to the server, JSON expected upstream, array)
fn cases() -> Vec<(&'static str, Value, Value, bool)> {
    vec![
        ("Boolean", json!(true), json!(true), false),
        ("SByte", json!(-5), json!(-5), false),
        ("Byte", json!(200), json!(200), false),
        ("Int16", json!(-30000), json!(-30000), false),
        ("UInt16", json!(60000), json!(60000), false),
        ("Int32", json!(-2_000_000_000), json!(-2_000_000_000), false),
        ("UInt32", json!(4_000_000_000u32), json!(4_000_000_000u32), false),
        (
            "Int64",
            json!(-9_000_000_000_000i64),
            json!(-9_000_000_000_000i64),
            false,
        ),
        (
            "UInt64",
            json!(18_000_000_000_000_000_000u64),
            json!(18_000_000_000_000_000_000u64),
            false,
        ),
        ("Float", json!(1.5), json!(1.5), false),
        ("Double", json!(2.25e100), json!(2.25e100), false),
        ("String", json!("Ofen 1 — Zone ä"), json!("Ofen 1 — Zone ä"), false),
        (
            "DateTime",
            json!("2026-11-21T10:00:00.123+00:00"),
            json!("2026-11-21T10:00:00.123Z"),
            false,
        ),
        ("ByteString", json!([1, 2, 3]), json!("AQID"), false),
        (
            "Guid",
            json!("72962b91-fa75-4ae6-8d28-b404dc7daf63"),
            json!("72962b91-fa75-4ae6-8d28-b404dc7daf63"),
            false,
        ),
        ("LocalizedText", json!("Hallo"), json!("Hallo"), false),
        ("Int32", json!([1, 2, 3]), json!([1, 2, 3]), true),
        ("Double", json!([0.5, 1.5]), json!([0.5, 1.5]), true),
        ("String", json!(["a", "b"]), json!(["a", "b"]), true),
    ]
}

fn var_name(ty: &str, array: bool) -> String {
    if array {
        format!("{ty}Array")
    } else {
        ty.to_string()
    }
}

#[test]
fn every_type_arrives_and_a_bad_node_id_spoils_only_its_tag() {
    let vars: Vec<Value> = cases()
        .iter()
        .map(|(ty, v, _, array)| json!({"name": var_name(ty, *array), "type": ty, "value": v, "array": array}))
        .collect();
    let server = PyOpcUa::start(&json!({"namespace": NS, "security": "none", "variables": vars}));
    let broker = Mosquitto::start(false, "");
    let sub = Subscriber::start(broker.port, "s1/#", "ua-types-sub");
    let mut devices = String::new();
    for (id, mode) in [("oven", "subscription"), ("oven-polled", "polling")] {
        devices += &format!(
            "[[devices]]\nid = \"{id}\"\nprotocol = \"opcua\"\nendpoint = \"{}\"\nsecurity_policy = \"None\"\n\
             publishing_interval = \"200ms\"\npoll_interval = \"300ms\"\nmode = \"{mode}\"\n",
            server.endpoint()
        );
        for (ty, _, _, array) in cases() {
            let name = var_name(ty, array);
            devices += &format!(
                "[[devices.tags]]\nname = \"{name}\"\nnode_id = \"s={name}\"\nnamespace_uri = \"{NS}\"\ntype = \"{ty}\"\narray = {array}\n"
            );
        }
        devices += "[[devices.tags]]\nname = \"Missing\"\nnode_id = \"s=DoesNotExist\"\nnamespace_uri = \"urn:plantmesh:test\"\n";
    }
    let mut names: Vec<String> = cases().iter().map(|(ty, _, _, a)| var_name(ty, *a)).collect();
    names.push("Missing".into());
    let fields = |dev: &str| {
        names
            .iter()
            .map(|n| (n.clone(), format!("{dev}.{n}")))
            .collect::<Vec<_>>()
    };
    let dir = tempfile::tempdir().unwrap();
    write_config(
        &dir.path().join("cfg"),
        &gateway(broker.port, &devices),
        &[
            ("sub", &product("ua-sub", &fields("oven"))),
            ("poll", &product("ua-poll", &fields("oven-polled"))),
        ],
    );
    let mut agent = Agent::start(&dir.path().join("cfg"), &dir.path().join("data"));
    let complete = |p: &str| {
        sub.product_messages()
            .into_iter()
            .filter(|m| m["product"] == p)
            .flat_map(|m| m["records"].as_array().unwrap().clone())
            .find(|r| {
                cases()
                    .iter()
                    .all(|(ty, _, _, a)| r["quality"][var_name(ty, *a)] == "good")
                    && r["quality"]["Missing"] != "bad:no_value"
            })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(complete("ua-sub").is_some() && complete("ua-poll").is_some()) {
        if Instant::now() > deadline {
            for m in sub.product_messages().iter().rev().take(2) {
                eprintln!("last message: {m}");
            }
            panic!("no complete records from both devices");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.stop();
    assert!(
        agent.log().contains("OPC UA security is None"),
        "the None warning is logged at start"
    );
    for p in ["ua-sub", "ua-poll"] {
        let r = complete(p).unwrap();
        for (ty, _, want, array) in cases() {
            assert_eq!(r["fields"][var_name(ty, array)], want, "{p}: {ty} (array: {array})");
        }
        assert_eq!(r["fields"]["Missing"], Value::Null);
        assert_eq!(r["quality"]["Missing"], "bad:opcua_BadNodeIdUnknown", "{p}");
    }
}
