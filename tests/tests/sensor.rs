//! Sensor nodes end to end: the firmware library, built for the host on simulated SHT3x and ADS1115
//! parts, writes frames into a pty; the agent reads the other end as a serial port and publishes the
//! node's product to Mosquitto. Link garbage is counted and never costs more than the frame it ran into.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "end-to-end tests: a failure fails the test"
)]

mod common;

use common::*;
use serde_json::Value;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// `plantmesh simulate --sensor-node`, its pty linked at `link`; the lines it prints.
fn sensor_node(link: &std::path::Path, args: &[&str]) -> (Child, Lines) {
    let mut child = Command::new(plantmesh_bin())
        .args(["simulate", "--sensor-node", "--link"])
        .arg(link)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = Lines::default();
    lines.follow(child.stdout.take().unwrap());
    wait_for("the simulated node's pty", Duration::from_secs(10), || link.exists());
    (child, lines)
}

fn config(dir: &std::path::Path, broker: u16, port: &std::path::Path) {
    let gateway = format!(
        r#"
[agent]
id = "gw-sensor"
site = "s1"
area = "a1"
line = "l1"
governance = "builtin-defaults"
metrics_listen = "127.0.0.1:0"
[upstream]
url = "mqtt://127.0.0.1:{broker}"
[buffer]
commit_interval = "50ms"
[[devices]]
id = "node"
protocol = "sensor_node"
port = "{}"
stale_after = "1s"
"#,
        port.display()
    );
    // No tags in the gateway file: the channels come from the node's hello, by name.
    let product = r#"
id = "pump-room"
name = "Pump room"
version = "1.0.0"
domain = "utilities"
owner = "facilities"
[[fields]]
name = "air_temp"
source = "node.temperature"
unit = "Cel"
[[fields]]
name = "air_humidity"
source = "node.humidity"
unit = "%"
[[fields]]
name = "line_pressure"
source = "node.line_pressure"
unit = "bar"
[[fields]]
name = "tank_level"
source = "node.tank_level"
unit = "m"
"#;
    write_config(dir, &gateway, &[("pump-room", product)]);
}

fn records(sub: &Subscriber) -> Vec<Value> {
    sub.product_messages()
        .iter()
        .flat_map(|m| m["records"].as_array().unwrap().clone())
        .collect()
}

#[test]
fn a_sensor_node_on_a_pty_becomes_a_product_with_values_units_and_faults() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("ttyNODE");
    let (mut node, _) = sensor_node(&link, &["--interval-ms", "100", "--wire-breaks", "10"]);
    let broker = Mosquitto::start(false, "");
    let sub = Subscriber::start(broker.port, "s1/a1/l1/utilities/#", "sensor-sub");
    config(&dir.path().join("cfg"), broker.port, &link);
    let mut agent = Agent::start(&dir.path().join("cfg"), &dir.path().join("data"));
    wait_for("60 node cycles published", Duration::from_secs(40), || {
        records(&sub).len() >= 60
    });
    agent.stop();
    let _ = node.kill();
    let _ = node.wait();
    let rs = records(&sub);
    let good = |r: &Value, f: &str| r["quality"][f] == "good";
    let mut open_loops = 0;
    for r in &rs {
        let f = &r["fields"];
        // What the simulated parts were told, read back through the real drivers and the link.
        assert!(
            good(r, "air_temp") && (18.9..=25.1).contains(&f["air_temp"].as_f64().unwrap()),
            "{r}"
        );
        assert!((34.9..=45.1).contains(&f["air_humidity"].as_f64().unwrap()), "{r}");
        let p = f["line_pressure"].as_f64().unwrap();
        assert!((5.49..=6.51).contains(&p), "4-20 mA scaled to 0-10 bar: {r}");
        if good(r, "tank_level") {
            assert!((0.39..=3.61).contains(&f["tank_level"].as_f64().unwrap()), "{r}");
        } else {
            // 0 mA: below 3.8 mA is a broken wire, and the node says so.
            assert_eq!(r["quality"]["tank_level"], "bad:sensor_wire_break", "{r}");
            assert!(f["tank_level"].is_null());
            open_loops += 1;
        }
    }
    assert!(open_loops >= 5 && open_loops < rs.len(), "{open_loops} of {}", rs.len());
    // The descriptor's lineage names the port; units are the contract's.
    let d = sub
        .messages()
        .into_iter()
        .find(|(t, _)| t.ends_with("/_descriptor"))
        .unwrap()
        .1;
    let lineage = &d["schema"][0]["properties"][2]["lineage"];
    assert_eq!(lineage["protocol"], "sensor_node");
    assert_eq!(lineage["port"], link.display().to_string());
    validate_json(&repo_root().join("docs/descriptor.schema.json"), &[d]);
}

#[test]
fn garbage_on_the_link_is_counted_and_costs_at_most_the_frame_it_runs_into() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("ttyNOISY");
    let broker = Mosquitto::start(false, "");
    let sub = Subscriber::start(broker.port, "s1/a1/l1/utilities/pump-room/v1", "noise-sub");
    config(&dir.path().join("cfg"), broker.port, &link);
    // The agent first: it waits for the port to appear, so it sees every byte from the first.
    let mut agent = Agent::start(&dir.path().join("cfg"), &dir.path().join("data"));
    let (mut node, lines) = sensor_node(
        &link,
        &["--interval-ms", "50", "--garbage-every", "3", "--cycles", "150"],
    );
    assert!(node.wait().unwrap().success());
    let injected = lines.snapshot();
    let count = |kind: &str| injected.iter().filter(|l| *l == &format!("GARBAGE {kind}")).count() as f64;
    // Garbage before every third cycle from the third: 49 pieces, every kind.
    let garbage = injected.iter().filter(|l| l.starts_with("GARBAGE ")).count() as f64;
    assert_eq!(garbage, 49.0);
    assert!(count("noise_into_frame") >= 9.0);
    // 150 samples frames and a hello every 30 cycles were sent; noise cost one frame each.
    let addr = agent.metrics_addr();
    let frames = 155.0 - count("noise_into_frame");
    let mut metrics = String::new();
    wait_for("every surviving frame read", Duration::from_secs(10), || {
        metrics = scrape(&addr, "/metrics");
        metric(&metrics, "plantmesh_device_polls_total{device=\"node\"}") == Some(frames)
    });
    // Each piece of garbage is exactly one undecodable run; only noise running into a frame loses it.
    let errors = metric(
        &metrics,
        "plantmesh_device_errors_total{device=\"node\",reason=\"framing\"}",
    )
    .unwrap();
    assert_eq!(errors, garbage, "{metrics}");
    assert_eq!(
        metric(&metrics, "plantmesh_sensor_lost_frames_total{device=\"node\"}"),
        Some(count("noise_into_frame")),
        "{metrics}"
    );
    assert!(metric(&metrics, "plantmesh_sensor_crc_errors_total{device=\"node\"}").unwrap() >= count("bad_crc"));
    assert_eq!(
        metric(&metrics, "plantmesh_sensor_restarts_total{device=\"node\"}"),
        Some(0.0)
    );
    // The node went quiet before it went away: after stale_after its channels were bad, saying why.
    let q = |r: &Value| r["quality"]["air_temp"].as_str().unwrap_or_default().to_string();
    wait_for("link_lost, then disconnected", Duration::from_secs(30), || {
        records(&sub).last().is_some_and(|r| q(r) == "bad:disconnected")
    });
    agent.stop();
    let after: Vec<String> = records(&sub)
        .iter()
        .map(q)
        .skip_while(|q| q != "bad:link_lost")
        .collect();
    assert!(
        after.len() >= 2 && after.iter().all(|q| q.starts_with("bad:")),
        "{after:?}"
    );
    let good = records(&sub)
        .iter()
        .filter(|r| r["quality"]["air_temp"] == "good")
        .count();
    // 150 cycles; a cycle is lost only when noise ran into its first frame (the hello or a fault
    // frame leaves the cycle's samples intact, so this bounds from below).
    assert!(good as f64 >= 150.0 - count("noise_into_frame"), "{good} good records");
}
