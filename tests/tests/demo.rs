//! The README's main command: `plantmesh` with no config runs the demo plant. It must publish its
//! products (Modbus PLC, OPC UA oven, sensor node) under its governance, to its embedded broker.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "end-to-end tests: a failure fails the test"
)]

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn the_demo_plant_publishes_every_product_under_governance() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut demo = Command::new(plantmesh_bin())
        .args(["demo", "--data-dir"])
        .arg(dir.path())
        .env("PLANTMESH_BROKER_PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(KillOnDrop)
        .unwrap();
    wait_for("the embedded broker", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let sub = Subscriber::start(port, "demo-plant/#", "demo-sub");
    let products = |sub: &Subscriber| {
        let mut seen: Vec<String> = sub
            .product_messages()
            .iter()
            .map(|m| m["product"].as_str().unwrap().to_string())
            .collect();
        seen.sort();
        seen.dedup();
        seen
    };
    // press-rate is per minute: it shows up only when the test spans a minute boundary.
    let expected = [
        "oven-profile",
        "packing-output",
        "press-output",
        "press-temperatures",
        "pump-room",
    ];
    let all_seen = |sub: &Subscriber| {
        let seen = products(sub);
        expected.iter().all(|p| seen.iter().any(|s| s == p))
    };
    wait_for("the demo products", Duration::from_secs(60), || all_seen(&sub));
    uns_view_is_retained_and_governed(port, "demo-late-sub", &[]);
    let _ = Command::new("kill").args(["-INT", &demo.id().to_string()]).status();
    let status = demo.wait().unwrap();
    let mut seen = products(&sub);
    seen.retain(|p| p != "press-rate");
    assert_eq!(seen, expected);
    let press = sub
        .product_messages()
        .into_iter()
        .find(|m| m["product"] == "press-output")
        .unwrap();
    let r = &press["records"][0];
    assert!(r["fields"]["operator"].as_str().unwrap().starts_with("h:"), "{r}");
    assert!(r["fields"].get("recipe_setpoint").is_none(), "{r}");
    assert!(
        sub.lines.snapshot().iter().all(|l| !l.contains("OP-0")),
        "a badge left in clear"
    );
    let oven = sub
        .product_messages()
        .into_iter()
        .find(|m| m["product"] == "oven-profile")
        .unwrap();
    assert!(oven["records"][0]["fields"]["zone1_temp_c"].as_f64().unwrap() > 100.0);
    assert!(status.success(), "the demo stops cleanly on Ctrl-C: {status:?}");
    // Every descriptor (Modbus and OPC UA lineage, governed fields) validates against the shipped schema.
    let descriptors: Vec<serde_json::Value> = sub
        .messages()
        .into_iter()
        .filter(|(t, _)| t.ends_with("/_descriptor"))
        .map(|(_, d)| d)
        .collect();
    assert_eq!(descriptors.len(), 6, "one retained descriptor per product");
    // The flow wrapper publishes its own MQTT; its JSON becomes a product, stamped with its own time.
    let packing = sub
        .product_messages()
        .into_iter()
        .find(|m| m["product"] == "packing-output")
        .unwrap();
    let r = &packing["records"][0];
    assert!(
        ["RUNNING", "STOPPED"].contains(&r["fields"]["state"].as_str().unwrap()),
        "{r}"
    );
    assert!(
        r["fields"]["packs_total"].is_u64() && r["quality"]["film_temp_c"] == "good",
        "{r}"
    );
    let wrapper = descriptors.iter().find(|d| d["id"] == "packing-output").unwrap();
    let lineage = &wrapper["schema"][0]["properties"][0]["lineage"];
    assert_eq!(lineage["protocol"], "mqtt", "{lineage}");
    assert_eq!(lineage["topic"], "machines/packaging/wrapper-1/state", "{lineage}");
    // The sensor node's product: the firmware library's readings, through a pty.
    let pump = sub
        .product_messages()
        .into_iter()
        .find(|m| m["product"] == "pump-room" && m["records"][0]["quality"]["line_pressure_bar"] == "good")
        .unwrap();
    let p = pump["records"][0]["fields"]["line_pressure_bar"].as_f64().unwrap();
    assert!((5.0..=7.0).contains(&p), "{pump}");
    // The scrap rate is derived from the window's counters; the contract states its service levels.
    let rate = descriptors.iter().find(|d| d["id"] == "press-rate").unwrap();
    let scrap = rate["schema"][0]["properties"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "scrap_rate_pct")
        .unwrap();
    assert_eq!(scrap["lineage"]["derived"], "share", "{scrap}");
    let sla: Vec<&str> = rate["slaProperties"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["property"].as_str().unwrap())
        .collect();
    assert_eq!(sla, ["frequency", "freshness", "completeness", "latency"]);
    // Every acknowledged descriptor is kept as the contract later configs are checked against.
    let mut kept: Vec<String> = std::fs::read_dir(dir.path().join("contracts"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    kept.sort();
    assert_eq!(
        kept,
        [
            "oven-profile.v1.json",
            "packing-output.v1.json",
            "press-output.v1.json",
            "press-rate.v1.json",
            "press-temperatures.v1.json",
            "pump-room.v1.json"
        ]
    );
    validate_json(&repo_root().join("docs/descriptor.schema.json"), &descriptors);
    // The validator itself rejects a broken descriptor.
    let mut broken = descriptors[0].clone();
    broken["schema"][0]["properties"][0]["edgeAction"] = serde_json::json!("never");
    let result =
        std::panic::catch_unwind(|| validate_json(&repo_root().join("docs/descriptor.schema.json"), &[broken]));
    assert!(
        result.is_err(),
        "a descriptor publishing a `never` field must not validate"
    );
}

/// The UNS view of press-output and press-temperatures: a subscriber arriving late finds every
/// field's latest value retained on its own topic, with unit and quality, governed as in the
/// product messages (no topic for the withheld recipe set point, the badge as its pseudonym).
fn uns_view_is_retained_and_governed(port: u16, id: &str, extra: &[&str]) {
    let late = Subscriber::start_with(port, "demo-plant/#", id, extra);
    let uns = |late: &Subscriber| -> std::collections::BTreeMap<String, serde_json::Value> {
        late.messages()
            .into_iter()
            .filter(|(t, v)| !t.contains("/_") && v.get("records").is_none())
            .collect()
    };
    let fields = |m: &std::collections::BTreeMap<String, serde_json::Value>, product: &str| -> Vec<String> {
        let mut f: Vec<String> = m
            .keys()
            .filter(|t| t.contains(&format!("/{product}/v1/")))
            .map(|t| t.rsplit('/').next().unwrap().to_string())
            .collect();
        f.sort();
        f.dedup();
        f
    };
    wait_for("the UNS topics, retained", Duration::from_secs(30), || {
        let m = uns(&late);
        fields(&m, "press-output").len() == 5 && fields(&m, "press-temperatures").len() == 2
    });
    let m = uns(&late);
    // The restricted recipe set point has no topic at all; the badge is its pseudonym.
    assert_eq!(
        fields(&m, "press-output"),
        ["cycles", "good_parts", "operator", "running", "scrap_parts"]
    );
    let (_, operator) = m
        .iter()
        .find(|(t, _)| t.ends_with("/press-output/v1/operator"))
        .unwrap();
    assert!(operator["value"].as_str().unwrap().starts_with("h:"), "{operator}");
    let (_, die) = m
        .iter()
        .find(|(t, _)| t.ends_with("/press-temperatures/v1/die_temp_c"))
        .unwrap();
    assert_eq!(die["unit"], "Cel", "{die}");
    assert_eq!(die["quality"], "good", "{die}");
    assert!(die["value"].is_number() && die["ts"].is_string(), "{die}");
    assert!(
        late.lines
            .snapshot()
            .iter()
            .all(|l| !l.contains("recipe_setpoint") && !l.contains("OP-0")),
        "nothing of a withheld field, no badge in clear"
    );
}

/// The same UNS view at a real Mosquitto (`plantmesh demo --broker`): its retained messages are
/// what a late subscriber of a plant's broker gets.
#[test]
fn the_demo_uns_view_at_mosquitto() {
    let broker = Mosquitto::start(false, "");
    let dir = tempfile::tempdir().unwrap();
    let mut demo = Command::new(plantmesh_bin())
        .args(["demo", "--broker", &format!("127.0.0.1:{}", broker.port), "--data-dir"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(KillOnDrop)
        .unwrap();
    let sub = Subscriber::start(broker.port, "demo-plant/#", "demo-mosquitto-sub");
    // Every UNS field has been sent once (the late subscriber below sees only what is retained).
    wait_for("the UNS topics at Mosquitto", Duration::from_secs(60), || {
        let mut topics: Vec<String> = sub
            .messages()
            .into_iter()
            .filter(|(t, v)| !t.contains("/_") && v.get("records").is_none())
            .map(|(t, _)| t)
            .collect();
        topics.sort();
        topics.dedup();
        topics.len() >= 7
    });
    // Only what the broker retained: mosquitto_sub stops at the first live message.
    uns_view_is_retained_and_governed(broker.port, "demo-mosquitto-late-sub", &["--retained-only"]);
    let _ = Command::new("kill").args(["-INT", &demo.id().to_string()]).status();
    assert!(demo.wait().unwrap().success(), "the demo stops cleanly on Ctrl-C");
}
