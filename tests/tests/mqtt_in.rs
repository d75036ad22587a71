//! MQTT in, end to end through a real Mosquitto: machines publishing JSON and plain values, and a
//! Sparkplug B edge node (Python, Google's protobuf), become product records with the right values,
//! types and timestamps; a node death makes its tags stale; a sequence gap asks for a rebirth; garbage
//! is counted and touches nothing else.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "end-to-end tests: a failure fails the test"
)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

fn gateway(broker: u16, devices: &str) -> String {
    format!(
        r#"
[agent]
id = "gw-mqtt"
site = "s1"
area = "a1"
line = "l1"
governance = "builtin-defaults"
metrics_listen = "127.0.0.1:0"
[upstream]
url = "mqtt://127.0.0.1:{broker}"
[buffer]
commit_interval = "50ms"
{devices}
"#
    )
}

fn records(sub: &Subscriber) -> Vec<Value> {
    sub.product_messages()
        .iter()
        .flat_map(|m| m["records"].as_array().unwrap().clone())
        .collect()
}

const T0: u64 = 1_795_255_200_000; // 2026-11-21T10:00:00Z

#[test]
fn json_and_plain_payloads_become_records_and_garbage_only_counts() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(false, "");
    // A retained state from before the agent started: a last known value, stamped with its own time.
    mqtt_pub(
        broker.port,
        "plant/line-1/m3/state",
        br#"{"temp": 19.25, "mode": "IDLE", "ts": "2026-11-21T09:00:00Z"}"#,
        true,
    );
    let devices = r#"
[[devices]]
id = "machines"
protocol = "mqtt"
url = "mqtt://127.0.0.1:BROKER"
  [[devices.tags]]
  name = "{line}_{machine}_temp"
  topic = "plant/+line/+machine/state"
  pointer = "/temp"
  timestamp_pointer = "/ts"
  [[devices.tags]]
  name = "{line}_{machine}_mode"
  topic = "plant/+line/+machine/state"
  pointer = "/mode"
  timestamp_pointer = "/ts"
  type = "string"
  [[devices.tags]]
  name = "speed"
  topic = "plant/line-1/speed"
  type = "i64"
"#
    .replace("BROKER", &broker.port.to_string());
    let product = r#"
id = "machine-state"
name = "Machine state"
version = "1.0.0"
domain = "production"
owner = "line-1"
[[fields]]
name = "temp"
source = "machines.line-1_m3_temp"
unit = "Cel"
[[fields]]
name = "mode"
source = "machines.line-1_m3_mode"
[[fields]]
name = "speed"
source = "machines.speed"
unit = "1/min"
"#;
    let cfg = dir.path().join("cfg");
    write_config(&cfg, &gateway(broker.port, &devices), &[("machine-state", product)]);
    let sub = Subscriber::start(broker.port, "s1/a1/l1/production/#", "state-sub");
    let agent = Agent::start(&cfg, &dir.path().join("data"));
    wait_for("the retained state as a record", Duration::from_secs(30), || {
        records(&sub).iter().any(|r| r["fields"]["temp"] == 19.25)
    });
    let retained = records(&sub)
        .into_iter()
        .find(|r| r["fields"]["temp"] == 19.25)
        .unwrap();
    assert_eq!(retained["ts"], "2026-11-21T09:00:00.000Z", "{retained}");
    assert_eq!(retained["quality"]["temp"], "uncertain:retained", "{retained}");
    assert_eq!(retained["fields"]["mode"], "IDLE");

    // Fresh messages, garbage between them on the same topic and on another one.
    let mut garbage = 0;
    for i in 0..12u64 {
        let ts = T0 + i * 1000;
        let body = json!({"temp": 20.0 + i as f64 * 0.5, "mode": if i % 2 == 0 { "AUTO" } else { "MANUAL" }, "ts": ts});
        mqtt_pub(broker.port, "plant/line-1/m3/state", body.to_string().as_bytes(), false);
        mqtt_pub(
            broker.port,
            "plant/line-1/speed",
            (100 + i).to_string().as_bytes(),
            false,
        );
        if i % 3 == 1 {
            let junk: &[&[u8]] = &[b"{\"temp\": ", b"\xff\x00\x13", br#"{"temp": "hot", "ts": 1}"#, b"[]"];
            mqtt_pub(
                broker.port,
                "plant/line-1/m3/state",
                junk[(i as usize / 3) % junk.len()],
                false,
            );
            mqtt_pub(broker.port, "plant/line-1/speed", b"fast", false);
            garbage += 2;
        }
    }
    wait_for("every fresh state", Duration::from_secs(30), || {
        records(&sub)
            .iter()
            .any(|r| r["fields"]["speed"] == 111 && r["fields"]["temp"] == 25.5)
    });
    let addr = agent.metrics_addr();
    let mut metrics = String::new();
    wait_for("the garbage counted", Duration::from_secs(10), || {
        metrics = scrape(&addr, "/metrics");
        metric(
            &metrics,
            "plantmesh_device_errors_total{device=\"machines\",reason=\"unreadable\"}",
        ) == Some(garbage as f64)
    });
    // One message per publish (the retained one included), each read once.
    assert_eq!(
        metric(&metrics, "plantmesh_device_polls_total{device=\"machines\"}"),
        Some((1 + 24 + garbage) as f64),
        "{metrics}"
    );
    let rs = records(&sub);
    for i in 0..12u64 {
        let ts = format!("2026-11-21T10:00:{:02}.000Z", i);
        let r = rs
            .iter()
            .find(|r| r["ts"] == ts.as_str())
            .unwrap_or_else(|| panic!("no record at {ts}: {rs:?}"));
        assert_eq!(r["fields"]["temp"], 20.0 + i as f64 * 0.5, "{r}");
        assert_eq!(r["quality"]["temp"], "good", "{r}");
        assert_eq!(r["fields"]["mode"], if i % 2 == 0 { "AUTO" } else { "MANUAL" }, "{r}");
    }
    // Speed is an integer in the record, read on arrival; garbage on it is bad:decode, and only there.
    let speeds: Vec<i64> = rs.iter().filter_map(|r| r["fields"]["speed"].as_i64()).collect();
    for s in 100..112 {
        assert!(speeds.contains(&s), "speed {s} missing: {speeds:?}");
    }
    assert!(rs.iter().any(|r| r["quality"]["speed"] == "bad:decode"));
    drop(agent);
}

#[test]
fn sparkplug_births_data_deaths_and_gaps_through_mosquitto() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(false, "");
    let devices = r#"
[[devices]]
id = "filler-node"
protocol = "mqtt"
url = "mqtt://127.0.0.1:BROKER"
  [[devices.tags]]
  name = "count"
  sparkplug = "G1/edge-1/filler"
  metric = "Fill/Count"
  type = "i64"
  [[devices.tags]]
  name = "weight"
  sparkplug = "G1/edge-1/filler"
  metric = "Fill/Weight"
  [[devices.tags]]
  name = "running"
  sparkplug = "G1/edge-1/filler"
  metric = "Running"
  type = "bool"
  [[devices.tags]]
  name = "recipe"
  sparkplug = "G1/edge-1/filler"
  metric = "Recipe"
  type = "string"
  [[devices.tags]]
  name = "uptime"
  sparkplug = "G1/edge-1"
  metric = "Uptime"
  type = "u64"
"#
    .replace("BROKER", &broker.port.to_string());
    let product = r#"
id = "filler"
name = "Filler"
version = "1.0.0"
domain = "production"
owner = "line-1"
[[fields]]
name = "count"
source = "filler-node.count"
unit = "1"
[[fields]]
name = "weight"
source = "filler-node.weight"
unit = "g"
[[fields]]
name = "running"
source = "filler-node.running"
[[fields]]
name = "recipe"
source = "filler-node.recipe"
[[fields]]
name = "uptime"
source = "filler-node.uptime"
unit = "s"
"#;
    let cfg = dir.path().join("cfg");
    write_config(&cfg, &gateway(broker.port, &devices), &[("filler", product)]);
    let sub = Subscriber::start(broker.port, "s1/a1/l1/production/#", "filler-sub");
    // The node is born before the agent is there: the agent's first sight of it is data, so it
    // asks for a rebirth.
    let mut node = SparkplugPeer::node(broker.port, "G1", "edge-1", "filler");
    node.command(json!({"op": "connect", "bdseq": 3}), "READY");
    let agent = Agent::start(&cfg, &dir.path().join("data"));
    let addr = agent.metrics_addr();
    wait_for("the agent subscribed", Duration::from_secs(20), || {
        metric(
            &scrape(&addr, "/metrics"),
            "plantmesh_device_connected{device=\"filler-node\"}",
        ) == Some(1.0)
    });
    node.command(json!({"op": "data", "values": {"Fill/Count": 1}, "ts": T0}), "SENT");
    node.wait_line("REBIRTH", Duration::from_secs(10));
    wait_for("the births as a record", Duration::from_secs(20), || {
        records(&sub)
            .iter()
            .any(|r| r["fields"]["recipe"] == "none" && r["fields"]["uptime"] == 1000)
    });

    for i in 1..=5u64 {
        let values = json!({"Fill/Count": i as i64 * 10 - 25, "Fill/Weight": 500.0 + i as f64 / 4.0,
                            "Running": i % 2 == 1, "Recipe": format!("R{i}")});
        node.command(json!({"op": "data", "values": values, "ts": T0 + i * 1000}), "SENT");
    }
    wait_for("five data records", Duration::from_secs(20), || {
        records(&sub).iter().any(|r| r["fields"]["recipe"] == "R5")
    });
    let rs = records(&sub);
    for i in 1..=5u64 {
        let ts = format!("2026-11-21T10:00:{:02}.000Z", i);
        let r = rs
            .iter()
            .find(|r| r["ts"] == ts.as_str())
            .unwrap_or_else(|| panic!("no record at {ts}: {rs:?}"));
        let f = &r["fields"];
        assert_eq!(
            f["count"],
            json!(i as i64 * 10 - 25),
            "Int32 two's complement read back: {r}"
        );
        assert_eq!(f["weight"], json!(500.0 + i as f64 / 4.0), "{r}");
        assert_eq!(f["running"], json!(i % 2 == 1), "{r}");
        assert_eq!(f["recipe"], json!(format!("R{i}")), "{r}");
        assert!(r["quality"].as_object().unwrap().values().all(|q| q == "good"), "{r}");
    }
    assert_eq!(node.count("REBIRTH"), 1, "no rebirth while the sequence is whole");

    // Two messages lost: counted, and the node is asked for its births.
    node.command(json!({"op": "skip", "n": 2}), "SKIPPED");
    node.command(
        json!({"op": "data", "values": {"Recipe": "after-gap"}, "ts": T0 + 9000}),
        "SENT",
    );
    wait_for("a second rebirth request", Duration::from_secs(10), || {
        node.count("REBIRTH") == 2
    });
    let mut metrics = String::new();
    wait_for("the gap counted", Duration::from_secs(10), || {
        metrics = scrape(&addr, "/metrics");
        metric(&metrics, "plantmesh_mqtt_sequence_lost_total{device=\"filler-node\"}") == Some(2.0)
    });
    assert_eq!(
        metric(
            &metrics,
            "plantmesh_mqtt_rebirth_requests_total{device=\"filler-node\"}"
        ),
        Some(2.0),
        "{metrics}"
    );
    wait_for("data after the gap", Duration::from_secs(10), || {
        records(&sub).iter().any(|r| r["fields"]["recipe"] == "after-gap")
    });

    // Garbage on the node's topics: counted, nothing else disturbed (the next data still reads).
    let errors_before = metric(
        &scrape(&addr, "/metrics"),
        "plantmesh_device_errors_total{device=\"filler-node\",reason=\"unreadable\"}",
    )
    .unwrap();
    mqtt_pub(
        broker.port,
        "spBv1.0/G1/DDATA/edge-1/filler",
        b"\x0a\xff\xff\xff",
        false,
    );
    mqtt_pub(broker.port, "spBv1.0/G1/NDATA/edge-1", b"not protobuf at all", false);
    wait_for("the garbage counted", Duration::from_secs(10), || {
        metric(
            &scrape(&addr, "/metrics"),
            "plantmesh_device_errors_total{device=\"filler-node\",reason=\"unreadable\"}",
        ) == Some(errors_before + 2.0)
    });
    node.command(
        json!({"op": "data", "values": {"Recipe": "after-garbage"}, "ts": T0 + 10_000}),
        "SENT",
    );
    wait_for("data after the garbage", Duration::from_secs(10), || {
        records(&sub)
            .iter()
            .any(|r| r["fields"]["recipe"] == "after-garbage" && r["quality"]["recipe"] == "good")
    });

    // The node dies (SIGKILL: the broker sends its NDEATH will): every tag is stale.
    std::thread::sleep(Duration::from_millis(500));
    node.kill();
    wait_for("the death as stale tags", Duration::from_secs(20), || {
        records(&sub).last().is_some_and(|r| {
            r["quality"].as_object().unwrap().values().all(|q| q == "stale")
                && r["fields"].as_object().unwrap().values().all(Value::is_null)
        })
    });
    drop(agent);
}

/// A device message over `max_message_bytes` is counted and skipped, never a lost connection:
/// a retained one (which the broker sends again on every subscribe) and a live one, both 2 MiB,
/// against a 1 MiB limit; the device stays connected, later messages arrive, each oversize message
/// is counted once under its reason.
#[test]
fn oversize_device_messages_are_counted_and_skipped_without_losing_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(false, "");
    let big = vec![b'7'; 2 << 20];
    mqtt_pub(broker.port, "plant/line-1/speed", &big, true);
    let devices = r#"
[[devices]]
id = "machines"
protocol = "mqtt"
url = "mqtt://127.0.0.1:BROKER"
max_message_bytes = "1MiB"
  [[devices.tags]]
  name = "speed"
  topic = "plant/line-1/speed"
  type = "i64"
"#
    .replace("BROKER", &broker.port.to_string());
    let product = r#"
id = "speeds"
name = "Speeds"
version = "1.0.0"
domain = "production"
owner = "team"
[[fields]]
name = "speed"
source = "machines.speed"
"#;
    let cfg = dir.path().join("cfg");
    write_config(&cfg, &gateway(broker.port, &devices), &[("speeds", product)]);
    let sub = Subscriber::start(broker.port, "s1/a1/l1/production/#", "oversize-sub");
    let agent = Agent::start(&cfg, &dir.path().join("data"));
    let addr = agent.metrics_addr();
    let oversize = || {
        metric(
            &scrape(&addr, "/metrics"),
            "plantmesh_device_errors_total{device=\"machines\",reason=\"oversize\"}",
        )
    };
    wait_for("the retained oversize message counted", Duration::from_secs(30), || {
        oversize() == Some(1.0)
    });
    mqtt_pub(broker.port, "plant/line-1/speed", &big, false);
    for v in 1..=5u64 {
        mqtt_pub(broker.port, "plant/line-1/speed", v.to_string().as_bytes(), false);
    }
    wait_for("the later messages", Duration::from_secs(30), || {
        (1..=5).all(|v| records(&sub).iter().any(|r| r["fields"]["speed"] == v))
    });
    std::thread::sleep(Duration::from_secs(1));
    let metrics = scrape(&addr, "/metrics");
    assert_eq!(
        metric(
            &metrics,
            "plantmesh_device_errors_total{device=\"machines\",reason=\"oversize\"}"
        ),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "plantmesh_device_connected{device=\"machines\"}"),
        Some(1.0)
    );
    assert!(
        !agent.log().contains("device broker connection lost"),
        "{}",
        agent.log()
    );
    assert_eq!(
        agent.log().matches("over max_message_bytes is skipped").count(),
        1,
        "once per topic"
    );
}
