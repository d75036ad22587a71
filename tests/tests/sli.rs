//! Service levels, measured: an induced device outage shows in the `_sli` documents and in
//! `/metrics`, and so does the recovery.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "end-to-end tests: a failure fails the test"
)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

#[test]
fn a_device_outage_shows_in_freshness_and_completeness_then_recovers() {
    let mut modbus = PyModbus::start(&json!({"values": [], "counter": {"address": 10, "period_ms": 20}}));
    let broker = Mosquitto::start(false, "");
    let sub = Subscriber::start(broker.port, "s1/+/+/+/+/+/_sli", "sli-sub");
    let gateway = format!(
        r#"
[agent]
id = "gw-sli"
site = "s1"
area = "a1"
line = "l1"
governance = "builtin-defaults"
sli_interval = "1s"
metrics_listen = "127.0.0.1:0"
[upstream]
url = "mqtt://127.0.0.1:{}"
protocol = "5"
[buffer]
commit_interval = "50ms"
[[devices]]
id = "plc"
protocol = "modbus_tcp"
address = "127.0.0.1:{}"
poll_interval = "100ms"
timeout = "300ms"
  [[devices.tags]]
  name = "counter"
  table = "holding"
  address = 10
  type = "u32"
"#,
        broker.port, modbus.port
    );
    let product = r#"
id = "counter"
name = "c"
version = "1.0.0"
domain = "d"
owner = "o"
[service_levels]
freshness = "1500ms"
completeness = 0.9
latency_p99 = "10s"
[[fields]]
name = "n"
source = "plc.counter"
"#;
    let dir = tempfile::tempdir().unwrap();
    write_config(&dir.path().join("cfg"), &gateway, &[("counter", product)]);
    let mut agent = Agent::start(&dir.path().join("cfg"), &dir.path().join("data"));
    let slis = |sub: &Subscriber| -> Vec<Value> { sub.messages().into_iter().map(|(_, v)| v).collect() };
    let healthy = |v: &Value| {
        v["completeness"] == 1.0
            && v["freshness_ms"].as_u64().is_some_and(|f| f < 1000)
            && v["met"] == json!({"freshness": true, "completeness": true, "latency": true})
    };
    wait_for("a healthy SLI", Duration::from_secs(30), || {
        slis(&sub).iter().any(healthy)
    });

    // The metrics endpoint says the same.
    let addr = agent.metrics_addr();
    let metrics = scrape(&addr, "/metrics");
    assert!(
        metrics.contains("plantmesh_product_completeness{product=\"counter\",major=\"1\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("plantmesh_device_connected{device=\"plc\"} 1"),
        "{metrics}"
    );
    assert!(scrape(&addr, "/health").contains("200 OK"));

    // The device goes away: completeness drops to 0 and freshness grows past the outage.
    modbus.kill();
    let before = slis(&sub).len();
    wait_for("the outage in the SLIs", Duration::from_secs(30), || {
        slis(&sub)[before..]
            .iter()
            .any(|v| v["completeness"] == 0.0 && v["freshness_ms"].as_u64().is_some_and(|f| f >= 2000))
    });
    let outage = slis(&sub)[before..]
        .iter()
        .find(|v| v["freshness_ms"].as_u64().is_some_and(|f| f >= 2000))
        .unwrap()
        .clone();
    assert_eq!(outage["met"]["freshness"], false, "{outage}");
    assert_eq!(outage["met"]["completeness"], false, "{outage}");
    assert_eq!(
        outage["targets"],
        json!({"freshness_ms": 1500.0, "completeness": 0.9, "latency_p99_ms": 10000.0, "expected_interval_ms": 100.0})
    );
    assert_eq!(outage["expected_records"], 10, "one per poll of a 100 ms device in 1 s");
    let metrics = scrape(&addr, "/metrics");
    assert!(
        metrics.contains("plantmesh_product_completeness{product=\"counter\",major=\"1\"} 0"),
        "{metrics}"
    );

    // It comes back: so do the SLIs.
    modbus.restart();
    let during = slis(&sub).len();
    wait_for("recovery in the SLIs", Duration::from_secs(60), || {
        slis(&sub)[during..].iter().any(healthy)
    });
    agent.stop();
    let last = slis(&sub).last().unwrap().clone();
    assert_eq!(last["product"], "counter");
    assert!(last["records_total"].as_u64().unwrap() > 10);
}
