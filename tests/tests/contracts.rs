//! Product contracts end to end, against pymodbus and Mosquitto: tumbling windows with a derived
//! field and QoS 2; and versioning: the published contract is kept, a breaking change without a new
//! major version is refused, and a new major runs beside the old one on its own topic.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "end-to-end tests: a failure fails the test"
)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::time::Duration;

fn gateway(broker: u16, modbus: u16) -> String {
    format!(
        r#"
[agent]
id = "gw-contracts"
site = "s1"
area = "a1"
line = "l1"
governance = "builtin-defaults"
metrics_listen = "off"
[upstream]
url = "mqtt://127.0.0.1:{broker}"
[buffer]
commit_interval = "50ms"
[[devices]]
id = "plc"
protocol = "modbus_tcp"
address = "127.0.0.1:{modbus}"
poll_interval = "100ms"
  [[devices.tags]]
  name = "counter"
  table = "holding"
  address = 10
  type = "u32"
"#
    )
}

/// pymodbus counts up by one every 20 ms: 50 per second.
fn counting_plc() -> PyModbus {
    PyModbus::start(&json!({"values": [], "counter": {"address": 10, "period_ms": 20}}))
}

#[test]
fn windows_aggregate_a_live_counter_and_derive_from_the_aggregates_at_qos_2() {
    let modbus = counting_plc();
    let broker = Mosquitto::start(false, "");
    // QoS as delivered to a QoS 2 subscriber is the QoS the agent published with.
    let qos_sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port.to_string(),
            "-q",
            "2",
            "-F",
            "%q %t",
        ])
        .args(["-t", "s1/a1/l1/production/rate/v1", "-C", "2"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let sub = Subscriber::start(broker.port, "s1/a1/l1/production/rate/#", "rate-sub");
    let product = r#"
id = "rate"
name = "Rate"
version = "1.0.0"
domain = "production"
owner = "line-1"
[publish]
mode = "window"
window = "1s"
qos = 2
[[fields]]
name = "parts"
source = "plc.counter"
aggregate = "delta"
unit = "1"
[[fields]]
name = "samples"
source = "plc.counter"
aggregate = "count"
unit = "1"
[[fields]]
name = "parts_per_sample"
derive = "ratio"
inputs = ["parts", "samples"]
unit = "1"
"#;
    let dir = tempfile::tempdir().unwrap();
    write_config(
        &dir.path().join("cfg"),
        &gateway(broker.port, modbus.port),
        &[("rate", product)],
    );
    let mut agent = Agent::start(&dir.path().join("cfg"), &dir.path().join("data"));
    let records = |sub: &Subscriber| -> Vec<Value> {
        sub.product_messages()
            .iter()
            .flat_map(|m| m["records"].as_array().unwrap().clone())
            .collect()
    };
    wait_for("five windows", Duration::from_secs(30), || records(&sub).len() >= 5);
    agent.stop();
    let out = qos_sub.wait_with_output().unwrap();
    let delivered = String::from_utf8_lossy(&out.stdout);
    assert!(
        delivered.lines().count() == 2 && delivered.lines().all(|l| l.starts_with("2 ")),
        "{delivered}"
    );
    let rs = records(&sub);
    // The first window may be partial (the agent started inside it); the rest are whole seconds.
    for r in &rs[1..] {
        let ts = r["ts"].as_str().unwrap();
        assert!(ts.ends_with(".000Z"), "stamped with the window's end: {ts}");
        let f = &r["fields"];
        let (parts, samples) = (f["parts"].as_u64().unwrap(), f["samples"].as_u64().unwrap());
        assert!((35..=65).contains(&parts), "50 counts a second: {r}");
        assert!((7..=13).contains(&samples), "10 polls a second: {r}");
        let derived = f["parts_per_sample"].as_f64().unwrap();
        assert!((derived - parts as f64 / samples as f64).abs() < 1e-9, "{r}");
        assert_eq!(r["quality"]["parts_per_sample"], "good");
    }
    // The descriptor names the derivation in the lineage and validates against the shipped schema.
    let descriptor = sub
        .messages()
        .into_iter()
        .find(|(t, _)| t.ends_with("/_descriptor"))
        .unwrap()
        .1;
    let derived = &descriptor["schema"][0]["properties"][2];
    assert_eq!(
        derived["lineage"],
        json!({"derived": "ratio", "inputs": ["parts", "samples"], "scale": 1.0, "offset": 0.0})
    );
    assert_eq!(descriptor["binding"]["qos"], 2);
    validate_json(&repo_root().join("docs/descriptor.schema.json"), &[descriptor]);
}

fn product(version: &str, unit: &str) -> String {
    format!(
        r#"
id = "count"
name = "Count"
version = "{version}"
domain = "production"
owner = "line-1"
[[fields]]
name = "n"
source = "plc.counter"
unit = "{unit}"
"#
    )
}

#[test]
fn a_breaking_change_needs_a_new_major_which_runs_beside_the_old_one() {
    let modbus = counting_plc();
    let broker = Mosquitto::start(false, "");
    let sub = Subscriber::start(broker.port, "s1/a1/l1/production/count/#", "ver-sub");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg");
    let data = dir.path().join("data");
    write_config(
        &cfg,
        &gateway(broker.port, modbus.port),
        &[("count", &product("1.0.0", "1"))],
    );
    let mut agent = Agent::start(&cfg, &data);
    let stored = data.join("contracts/count.v1.json");
    wait_for("the acknowledged descriptor kept", Duration::from_secs(30), || {
        stored.exists()
    });
    agent.stop();
    let kept: Value = serde_json::from_slice(&std::fs::read(&stored).unwrap()).unwrap();
    assert_eq!(kept["version"], "1.0.0");

    // The unit changes under the same major: refused, at the version key, by check and by run.
    write_config(
        &cfg,
        &gateway(broker.port, modbus.port),
        &[("count", &product("1.1.0", "10*3"))],
    );
    let check = Command::new(plantmesh_bin())
        .arg("check")
        .arg(&cfg)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("products/count.toml:4:11: error at `version`: breaking change to `count` without a new major version: field `n` unit `1` -> `10*3`"),
        "{stderr}"
    );
    assert!(stderr.contains("publish it as version 2.0.0"), "{stderr}");
    let mut refused = Agent::start(&cfg, &data);
    wait_for("the agent to refuse the config", Duration::from_secs(10), || {
        !refused.is_running()
    });
    assert!(
        refused.log().contains("breaking change to `count`"),
        "{}",
        refused.log()
    );

    // 2.0.0 beside 1.0.0: both publish, each on its own topic, each with its own stored contract.
    write_config(
        &cfg,
        &gateway(broker.port, modbus.port),
        &[
            ("count", &product("1.0.0", "1")),
            ("count-v2", &product("2.0.0", "10*3")),
        ],
    );
    let mut agent = Agent::start(&cfg, &data);
    let on = |topic: &str| {
        sub.messages()
            .iter()
            .filter(|(t, v)| t == topic && v["product"] == "count")
            .count()
    };
    wait_for("both majors publishing", Duration::from_secs(30), || {
        on("s1/a1/l1/production/count/v1") > 3 && on("s1/a1/l1/production/count/v2") > 3
    });
    wait_for("the v2 contract kept", Duration::from_secs(10), || {
        data.join("contracts/count.v2.json").exists()
    });
    agent.stop();
    let v2 = sub
        .messages()
        .into_iter()
        .find(|(t, _)| t == "s1/a1/l1/production/count/v2")
        .unwrap()
        .1;
    assert_eq!(v2["version"], "2.0.0");
}
