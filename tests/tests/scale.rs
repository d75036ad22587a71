//! Many products on one gateway: the cost follows the data, not the number of products. Two
//! thousand products of one field each, fed by the agent's own simulated Modbus devices and
//! published into a real Mosquitto, each deliver every poll's value, in order and without a hole.
//! (Before the publisher visited only products with something to send, a fill scanned every
//! product once per acknowledgement and the same data spread over this many products fell behind.)
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "end-to-end tests: a failure fails the test"
)]

mod common;

use common::*;
use std::collections::BTreeMap;
use std::time::Duration;

const DEVICES: usize = 20;
const REGISTERS: usize = 100;

#[test]
fn two_thousand_products_of_one_field_deliver_every_value() {
    let (_sim, addresses) = simulate(DEVICES, REGISTERS);
    let broker = Mosquitto::start(false, "");
    let sub = Subscriber::start(broker.port, "s1/a1/l1/#", "scale-sub");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg");
    let mut gateway = format!(
        "[agent]\nid = \"gw-scale\"\nsite = \"s1\"\narea = \"a1\"\nline = \"l1\"\ngovernance = \"builtin-defaults\"\n\
         metrics_listen = \"127.0.0.1:0\"\n[upstream]\nurl = \"mqtt://127.0.0.1:{}\"\nprotocol = \"5\"\n",
        broker.port
    );
    for (d, address) in addresses.iter().enumerate() {
        gateway.push_str(&format!(
            "[[devices]]\nid = \"d{d}\"\nprotocol = \"modbus_tcp\"\naddress = \"{address}\"\npoll_interval = \"1s\"\n"
        ));
        for r in 0..REGISTERS {
            gateway.push_str(&format!(
                "[[devices.tags]]\nname = \"r{r}\"\ntable = \"holding\"\naddress = {r}\n"
            ));
        }
    }
    let products: Vec<(String, String)> = (0..DEVICES)
        .flat_map(|d| (0..REGISTERS).map(move |r| (d, r)))
        .map(|(d, r)| {
            let id = format!("p{d}-{r}");
            let text = format!(
                "id = \"{id}\"\nname = \"{id}\"\nversion = \"1.0.0\"\ndomain = \"scale\"\nowner = \"o\"\n\
                 [[fields]]\nname = \"v\"\nsource = \"d{d}.r{r}\"\nunit = \"1\"\n"
            );
            (id, text)
        })
        .collect();
    let refs: Vec<(&str, &str)> = products.iter().map(|(i, t)| (i.as_str(), t.as_str())).collect();
    write_config(&cfg, &gateway, &refs);
    let agent = Agent::start(&cfg, &dir.path().join("data"));

    // Messages per product, by topic (`s1/a1/l1/scale/<id>/v1`), from one snapshot of what arrived.
    let per_product = |raw: &[(String, String)]| {
        let mut m: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
        for (topic, payload) in raw {
            if topic.contains("/_") || !topic.starts_with("s1/a1/l1/scale/") {
                continue;
            }
            m.entry(topic.split('/').nth(4).unwrap().to_string())
                .or_default()
                .push(serde_json::from_str(payload).unwrap());
        }
        m
    };
    // Every seq from the first seen to the last seen of every product accounted for, checked by
    // the project's verifier. Live messages and those a busy start committed first may interleave
    // (docs/wire-format.md, "Completeness": two streams, each in seq order), so a hole may be open
    // for a moment; one that never closes fails the wait.
    let verified = |raw: &[(String, String)]| {
        let mut v = agent::fleet::verify::Verifier::new();
        for (topic, payload) in raw {
            if topic.starts_with("s1/a1/l1/scale/") && !topic.contains("/_") {
                v.message(topic, payload.as_bytes());
            }
        }
        v.report()
    };
    let mut raw = Vec::new();
    let mut report = None;
    wait_for(
        "five polls of every product to arrive, every seq between accounted for",
        Duration::from_secs(120),
        || {
            raw = sub.raw();
            let m = per_product(&raw);
            let r = verified(&raw);
            let done = m.len() == products.len() && m.values().all(|v| v.len() >= 5) && r.ok();
            report = Some(r);
            done
        },
    );
    let report = report.unwrap();
    assert_eq!(
        report.streams.len(),
        products.len(),
        "one stream (epoch) per product: the agent ran once"
    );
    assert_eq!((report.hole_seqs, report.differing), (0, 0), "{}", report.text());
    for (id, msgs) in &per_product(&raw) {
        // Every record carries its value, good.
        for msg in msgs {
            for r in msg["records"].as_array().unwrap() {
                assert!(r["fields"]["v"].is_number(), "{id}: a value in every record: {r}");
                assert_eq!(r["quality"]["v"], "good", "{id}: {r}");
            }
        }
    }
    let metrics = scrape(&agent.metrics_addr(), "/metrics");
    for series in ["plantmesh_records_dropped_total", "plantmesh_dead_lettered_total"] {
        assert_eq!(metric(&metrics, series), Some(0.0), "{series}: nothing dropped");
    }
}
