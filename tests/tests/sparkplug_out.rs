//! Sparkplug B upstream, decoded by an independent decoder (Google's protobuf, compiled in Python
//! from the specification's `sparkplug_b.proto`): births with aliases, types, units and the product's
//! identity; DDATA with values, times and qualities; seq 0..255 over the session; a rebirth on
//! command; backlog after an upstream outage marked `is_historical` with nothing lost; bdSeq carried
//! by the NDEATH will and moved on across an agent restart.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "end-to-end tests: a failure fails the test"
)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;

const T0: u64 = 1_795_255_200_000; // 2026-11-21T10:00:00Z

fn config(dir: &std::path::Path, devices: u16, upstream: u16, protocol: &str, sparkplug_extra: &str) {
    let gateway = format!(
        r#"
[agent]
id = "gw-sp"
site = "plant-a"
area = "a1"
line = "l1"
governance = "builtin-defaults"
metrics_listen = "127.0.0.1:0"
[upstream]
url = "mqtt://127.0.0.1:{upstream}"
protocol = "{protocol}"
encoding = "sparkplug"
reconnect_min = "100ms"
reconnect_max = "500ms"
[upstream.sparkplug]
group_id = "plant-a"
edge_node_id = "gw-sp"
{sparkplug_extra}
[buffer]
commit_interval = "50ms"
[[devices]]
id = "line"
protocol = "mqtt"
url = "mqtt://127.0.0.1:{devices}"
  [[devices.tags]]
  name = "temp"
  topic = "line/state"
  pointer = "/temp"
  timestamp_pointer = "/ts"
  [[devices.tags]]
  name = "count"
  topic = "line/state"
  pointer = "/count"
  timestamp_pointer = "/ts"
  type = "i64"
  [[devices.tags]]
  name = "state"
  topic = "line/state"
  pointer = "/state"
  timestamp_pointer = "/ts"
  type = "string"
"#
    );
    let product = r#"
id = "line-state"
name = "Line state"
version = "1.2.0"
domain = "production"
owner = "line-1"
[[fields]]
name = "temp_c"
source = "line.temp"
unit = "Cel"
[[fields]]
name = "count"
source = "line.count"
unit = "1"
[[fields]]
name = "state"
source = "line.state"
"#;
    write_config(dir, &gateway, &[("line-state", product)]);
}

fn send(port: u16, i: u64) {
    let body =
        json!({"temp": 20.0 + i as f64 / 4.0, "count": i as i64 - 3, "state": format!("S{i}"), "ts": T0 + i * 1000});
    mqtt_pub(port, "line/state", body.to_string().as_bytes(), false);
}

const NODE: &str = "spBv1.0/plant-a/NBIRTH/gw-sp";
const DEVICE: &str = "spBv1.0/plant-a/DBIRTH/gw-sp/line-state.v1";
const DATA: &str = "spBv1.0/plant-a/DDATA/gw-sp/line-state.v1";
const DEATH: &str = "spBv1.0/plant-a/NDEATH/gw-sp";

fn on(msgs: &[Value], topic: &str) -> Vec<Value> {
    msgs.iter()
        .filter(|m| m["topic"] == topic)
        .map(|m| m["payload"].clone())
        .collect()
}

fn metric<'a>(p: &'a Value, name: &str) -> &'a Value {
    p["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("no metric {name} in {p}"))
}

/// Every DDATA metric as (field name, timestamp, value, historical, quality).
fn data_points(msgs: &[Value], aliases: &HashMap<u64, String>) -> Vec<(String, u64, Value, bool, u64)> {
    on(msgs, DATA)
        .iter()
        .flat_map(|p| p["metrics"].as_array().unwrap().clone())
        .map(|m| {
            (
                aliases[&m["alias"].as_u64().unwrap()].clone(),
                m["timestamp"].as_u64().unwrap(),
                m["value"].clone(),
                m["is_historical"].as_bool().unwrap_or(false),
                m["properties"]["Quality"]["value"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn the_agent_is_a_sparkplug_edge_node_that_keeps_its_delivery_promise() {
    let dir = tempfile::tempdir().unwrap();
    let devices = Mosquitto::start(false, "");
    let mut upstream = Mosquitto::start(true, "allow_anonymous true\nqueue_qos0_messages true");
    let host = SparkplugPeer::decoder_with(upstream.port, "spBv1.0/#", "host-app", &["--persistent"]);
    let cfg = dir.path().join("cfg");
    config(&cfg, devices.port, upstream.port, "3.1.1", "");
    let mut agent = Agent::start(&cfg, &dir.path().join("data"));
    wait_for("the births", Duration::from_secs(30), || {
        !on(&host.messages(), DEVICE).is_empty()
    });

    let msgs = host.messages();
    assert!(
        msgs.iter().all(|m| m.get("error").is_none()),
        "every payload decodes: {msgs:?}"
    );
    let nbirth = &on(&msgs, NODE)[0];
    assert_eq!(nbirth["seq"], 0);
    assert_eq!(metric(nbirth, "bdSeq")["value"], 0, "the first connection ever");
    assert_eq!(metric(nbirth, "Node Control/Rebirth")["value"], false);
    let dbirth = &on(&msgs, DEVICE)[0];
    assert_eq!(dbirth["seq"], 1);
    let product = metric(dbirth, "Product");
    for (k, v) in [
        ("id", "line-state"),
        ("version", "1.2.0"),
        ("owner", "line-1"),
        ("classification", "internal"),
    ] {
        assert_eq!(product["properties"][k]["value"], v, "{product}");
    }
    // Types and units from the contract.
    for (name, datatype, unit) in [("temp_c", 10, "Cel"), ("count", 4, "1"), ("state", 12, "")] {
        let m = metric(dbirth, name);
        assert_eq!(m["datatype"], datatype, "{m}");
        assert_eq!(m["properties"]["engUnit"]["value"], unit, "{m}");
    }
    let aliases: HashMap<u64, String> = dbirth["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| Some((m["alias"].as_u64()?, m["name"].as_str()?.to_string())))
        .collect();
    assert_eq!(aliases.len(), 3);

    for i in 0..5 {
        send(devices.port, i);
    }
    wait_for("five records as DDATA", Duration::from_secs(20), || {
        data_points(&host.messages(), &aliases)
            .iter()
            .any(|p| p.0 == "state" && p.2 == "S4")
    });
    let points = data_points(&host.messages(), &aliases);
    for i in 0..5u64 {
        let ts = T0 + i * 1000;
        let at: Vec<_> = points.iter().filter(|p| p.1 == ts).collect();
        let get = |n: &str| {
            at.iter()
                .find(|p| p.0 == n)
                .unwrap_or_else(|| panic!("{n} at {ts}: {points:?}"))
        };
        assert_eq!(get("temp_c").2, json!(20.0 + i as f64 / 4.0));
        assert_eq!(
            get("count").2,
            json!((i as i64 - 3) as u64),
            "Int64 as two's complement"
        );
        assert_eq!(get("state").2, json!(format!("S{i}")));
        assert!(at.iter().all(|p| !p.3 && p.4 == 192), "live and good: {at:?}");
    }

    // A host asks for a rebirth: NBIRTH (seq 0, same bdSeq) and DBIRTH again.
    sparkplug_once(&[
        "rebirth",
        "--port",
        &upstream.port.to_string(),
        "--group",
        "plant-a",
        "--node",
        "gw-sp",
    ]);
    wait_for("the rebirth", Duration::from_secs(20), || {
        on(&host.messages(), NODE).len() == 2
    });
    let reborn = on(&host.messages(), NODE)[1].clone();
    assert_eq!(reborn["seq"], 0);
    assert_eq!(metric(&reborn, "bdSeq")["value"], 0, "same connection, same bdSeq");

    // The upstream broker goes away; records keep coming and wait in the buffer.
    upstream.stop();
    for i in 5..8 {
        send(devices.port, i);
    }
    std::thread::sleep(Duration::from_millis(500));
    upstream.restart();
    wait_for("the backlog as historical DDATA", Duration::from_secs(30), || {
        data_points(&host.messages(), &aliases)
            .iter()
            .any(|p| p.0 == "state" && p.2 == "S7")
    });
    let points = data_points(&host.messages(), &aliases);
    for i in 5..8u64 {
        let at: Vec<_> = points.iter().filter(|p| p.1 == T0 + i * 1000).collect();
        assert_eq!(at.len(), 3, "every field of record {i}: {points:?}");
        assert!(at.iter().all(|p| p.3), "replayed from the buffer: is_historical {at:?}");
    }
    let births = on(&host.messages(), NODE);
    assert_eq!(
        metric(births.last().unwrap(), "bdSeq")["value"],
        1,
        "a new connection, the next bdSeq"
    );

    // Every message of a session counts up from its NBIRTH's 0, modulo 256.
    let mut expected = None;
    for m in host
        .messages()
        .iter()
        .filter(|m| m["topic"].as_str().unwrap().contains("/gw-sp"))
    {
        let (topic, seq) = (m["topic"].as_str().unwrap(), m["payload"]["seq"].as_u64());
        if topic == DEATH || topic.contains("/NCMD/") {
            continue; // the will has no seq; commands are the host's
        }
        if topic == NODE {
            assert_eq!(seq, Some(0));
        } else if let Some(e) = expected {
            assert_eq!(seq, Some(e), "{m}");
        }
        expected = seq.map(|s| (s + 1) % 256);
    }

    // Killed: the broker sends the will, an NDEATH with this connection's bdSeq. The next start
    // moves on from it.
    agent.sigkill();
    // (Mosquitto may also have sent the first connection's will, bdSeq 0, when it shut down.)
    wait_for(
        "the NDEATH will of the second connection",
        Duration::from_secs(20),
        || {
            on(&host.messages(), DEATH)
                .iter()
                .any(|d| metric(d, "bdSeq")["value"] == 1)
        },
    );
    agent.restart();
    wait_for("births after the restart", Duration::from_secs(30), || {
        on(&host.messages(), NODE).len() == 4
    });
    assert_eq!(metric(&on(&host.messages(), NODE)[3], "bdSeq")["value"], 2);
    assert!(host.messages().iter().all(|m| m.get("error").is_none()));
    drop(agent);
}

#[test]
fn births_and_data_wait_for_the_primary_host_to_be_online() {
    let dir = tempfile::tempdir().unwrap();
    let devices = Mosquitto::start(false, "");
    let upstream = Mosquitto::start(false, "");
    let host = SparkplugPeer::decoder(upstream.port, "spBv1.0/#", "watcher");
    let cfg = dir.path().join("cfg");
    // MQTT 5 here (3.1.1 above): both carry the Sparkplug session.
    config(&cfg, devices.port, upstream.port, "5", "primary_host = \"scada\"");
    let agent = Agent::start(&cfg, &dir.path().join("data"));
    let addr = agent.metrics_addr();
    wait_for("connected upstream", Duration::from_secs(20), || {
        scrape(&addr, "/metrics").contains("plantmesh_upstream_connected 1")
    });
    send(devices.port, 0);
    send(devices.port, 1);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        on(&host.messages(), NODE).is_empty(),
        "no birth before the host is online"
    );
    assert!(
        on(&host.messages(), DATA).is_empty(),
        "no data before the host is online"
    );

    let state = |online: &str| {
        sparkplug_once(&[
            "state",
            "--port",
            &upstream.port.to_string(),
            "--id",
            "scada",
            "--online",
            online,
        ]);
    };
    state("true");
    wait_for("births and the waiting records", Duration::from_secs(20), || {
        on(&host.messages(), DATA)
            .iter()
            .map(|p| p["metrics"].as_array().unwrap().len())
            .sum::<usize>()
            == 6
    });
    assert_eq!(metric(&on(&host.messages(), NODE)[0], "bdSeq")["value"], 0);

    // The host goes offline: the node says it is dead, and holds its data.
    state("false");
    wait_for("an NDEATH", Duration::from_secs(20), || {
        !on(&host.messages(), DEATH).is_empty()
    });
    assert_eq!(metric(&on(&host.messages(), DEATH)[0], "bdSeq")["value"], 0);
    send(devices.port, 2);
    std::thread::sleep(Duration::from_millis(1000));
    let count = |m: &[Value]| {
        on(m, DATA)
            .iter()
            .map(|p| p["metrics"].as_array().unwrap().len())
            .sum::<usize>()
    };
    assert_eq!(count(&host.messages()), 6, "nothing while the host is offline");

    // Back online: a new session (the next bdSeq), births, and the held record.
    state("true");
    wait_for("births again and the held record", Duration::from_secs(20), || {
        count(&host.messages()) == 9
    });
    let births = on(&host.messages(), NODE);
    assert_eq!(births.len(), 2);
    assert_eq!(metric(&births[1], "bdSeq")["value"], 1);
    drop(agent);
}
