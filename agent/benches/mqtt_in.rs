//! MQTT-in decoding alone, no broker: a JSON state message read at three pointers (with its time),
//! and a Sparkplug B DDATA of three metrics read by alias. Prints ns per message.
//! Run: `cargo bench -p plantmesh --bench mqtt_in`. End to end through Mosquitto: scripts/bench-mqtt.sh.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark that fails stops with its location"
)]

use plantmesh::sources::mqtt::Router;
use plantmesh::sparkplug::{datatype, encode, metric, Metric, MetricValue};
use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

const GATEWAY: &str = r#"
[agent]
id = "gw"
site = "s"
area = "a"
line = "l"
governance = "builtin-defaults"
[[devices]]
id = "m"
protocol = "mqtt"
url = "mqtt://127.0.0.1:1883"
  [[devices.tags]]
  name = "temp"
  topic = "bench/m0/state"
  pointer = "/temp"
  timestamp_pointer = "/ts"
  [[devices.tags]]
  name = "count"
  topic = "bench/m0/state"
  pointer = "/count"
  timestamp_pointer = "/ts"
  type = "i64"
  [[devices.tags]]
  name = "state"
  topic = "bench/m0/state"
  pointer = "/state"
  timestamp_pointer = "/ts"
  type = "string"
  [[devices.tags]]
  name = "sp_temp"
  sparkplug = "G/edge/m0"
  metric = "temp"
  [[devices.tags]]
  name = "sp_count"
  sparkplug = "G/edge/m0"
  metric = "count"
  type = "i64"
  [[devices.tags]]
  name = "sp_state"
  sparkplug = "G/edge/m0"
  metric = "state"
  type = "string"
"#;

const PRODUCT: &str = r#"
id = "p"
name = "p"
version = "1.0.0"
domain = "d"
owner = "o"
[[fields]]
name = "temp"
source = "m.temp"
unit = "Cel"
"#;

fn payload(seq: u64, metrics: Vec<Metric>) -> Vec<u8> {
    encode(seq, 1_795_255_200_000, metrics)
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let plan = plantmesh::config::load_texts(
        (Path::new("agent.toml"), GATEWAY),
        None,
        &[(Path::new("p.toml"), PRODUCT)],
        dir.path(),
    )
    .unwrap_or_else(|d| panic!("{d}"));
    let mut r = Router::new(0, &plan.devices[0].tags, plan.tags.clone());
    let n = 200_000u64;

    let json = br#"{"ts": 1795255200000, "temp": 21.5, "count": 12345, "state": "RUNNING", "extra": {"a": [1, 2, 3]}}"#;
    let t = Instant::now();
    for _ in 0..n {
        black_box(r.on_message("bench/m0/state", black_box(json), false, 1));
    }
    let ns = t.elapsed().as_nanos() as f64 / n as f64;
    println!(
        "json      {:>4} B: {ns:>7.0} ns/message ({:.0} messages/s on one core)",
        json.len(),
        1e9 / ns
    );

    r.on_message(
        "spBv1.0/G/NBIRTH/edge",
        &payload(0, vec![metric(Some("bdSeq"), 0, datatype::INT64, MetricValue::Long(0))]),
        false,
        1,
    );
    r.on_message(
        "spBv1.0/G/DBIRTH/edge/m0",
        &payload(
            1,
            vec![
                metric(Some("temp"), 1, datatype::DOUBLE, MetricValue::Double(0.0)),
                metric(Some("count"), 2, datatype::INT64, MetricValue::Long(0)),
                metric(Some("state"), 3, datatype::STRING, MetricValue::String("IDLE".into())),
            ],
        ),
        false,
        1,
    );
    let frames: Vec<Vec<u8>> = (0..256u64)
        .map(|s| {
            payload(
                (s + 2) % 256,
                vec![
                    metric(None, 1, 0, MetricValue::Double(21.5)),
                    metric(None, 2, 0, MetricValue::Long(12345)),
                    metric(None, 3, 0, MetricValue::String("RUNNING".into())),
                ],
            )
        })
        .collect();
    let t = Instant::now();
    for i in 0..n {
        let o = r.on_message(
            "spBv1.0/G/DDATA/edge/m0",
            black_box(&frames[(i % 256) as usize]),
            false,
            1,
        );
        debug_assert!(o.rebirth.is_none() && o.lost == 0);
        black_box(o);
    }
    let ns = t.elapsed().as_nanos() as f64 / n as f64;
    println!(
        "sparkplug {:>4} B: {ns:>7.0} ns/message ({:.0} messages/s on one core)",
        frames[0].len(),
        1e9 / ns
    );
}
