//! A plant for the buffer tests: a Modbus line of u32 registers (the first a counter), its
//! gateway and product, and the completeness rules a consumer applies to what arrives.

use super::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// `(epoch, seq)` -> the message, every copy checked identical; and how many copies were extra.
pub fn by_id(messages: &[Value]) -> (BTreeMap<(u64, u64), Value>, usize) {
    let mut out = BTreeMap::new();
    let mut dups = 0;
    for m in messages {
        let id = (m["epoch"].as_u64().unwrap(), m["seq"].as_u64().unwrap());
        if let Some(prev) = out.insert(id, m.clone()) {
            dups += 1;
            assert_eq!(prev["records"], m["records"], "two contents for {id:?}");
            assert_eq!(prev["last_seq"], m["last_seq"], "two extents for {id:?}");
        }
    }
    (out, dups)
}

pub fn gap_events(sub: &Subscriber) -> Vec<Value> {
    sub.messages()
        .into_iter()
        .filter(|(t, _)| t.ends_with("/_gaps"))
        .map(|(_, g)| g)
        .collect()
}

/// What `sub` received, checked by the project's own verifier (`agent::fleet::verify`, what
/// `plantmesh verify` runs at a broker): every seq of every epoch from 1 up to the highest seen is a
/// message that arrived or lies in a gap event (the rules of docs/wire-format.md), and every copy
/// of a message is byte-identical apart from `historical`. Streams are keyed by product and major.
pub fn verified(sub: &Subscriber) -> agent::fleet::verify::Report {
    let mut v = agent::fleet::verify::Verifier::from_start();
    for (topic, payload) in sub.raw() {
        let Ok(doc) = serde_json::from_str::<Value>(&payload) else {
            continue;
        };
        let product = doc["product"].as_str().unwrap_or_default();
        if topic.ends_with("/_gaps") {
            v.gap(&format!("{product}.v{}", doc["major"]), payload.as_bytes());
        } else if !topic.contains("/_") && doc.get("records").is_some() {
            let major = doc["version"].as_str().and_then(|s| s.split('.').next()).unwrap_or("?");
            v.message(&format!("{product}.v{major}"), payload.as_bytes());
        }
    }
    v.report()
}

/// Waits for every seq to be explained (gap events may still be on their way); returns how many
/// seqs only a `crash` event accounts for.
pub fn wait_explained(sub: &Subscriber) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = verified(sub);
        if r.ok() {
            return r.crash_only as usize;
        }
        assert!(Instant::now() < deadline, "{}", r.text());
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn gateway(id: &str, broker: u16, modbus: u16, tags: usize, poll: &str, commit: &str, extra: &str) -> String {
    let mut g = format!(
        "[agent]\nid = \"{id}\"\nsite = \"s1\"\narea = \"a1\"\nline = \"l1\"\ngovernance = \"builtin-defaults\"\nmetrics_listen = \"127.0.0.1:0\"\n\
         [upstream]\nurl = \"mqtt://127.0.0.1:{broker}\"\nprotocol = \"5\"\nmax_inflight = 32\nreconnect_min = \"100ms\"\nreconnect_max = \"300ms\"\n{extra}\n\
         [buffer]\ncommit_interval = \"{commit}\"\n\
         [[devices]]\nid = \"plc\"\nprotocol = \"modbus_tcp\"\naddress = \"127.0.0.1:{modbus}\"\npoll_interval = \"{poll}\"\n"
    );
    for i in 0..tags {
        g.push_str(&format!(
            "[[devices.tags]]\nname = \"r{i}\"\ntable = \"holding\"\naddress = {}\ntype = \"u32\"\n",
            10 + 2 * i
        ));
    }
    g
}

pub fn product(tags: usize) -> String {
    let mut p = "id = \"line\"\nname = \"Line\"\nversion = \"1.0.0\"\ndomain = \"d\"\nowner = \"o\"\n".to_string();
    for i in 0..tags {
        p.push_str(&format!("[[fields]]\nname = \"r{i}\"\nsource = \"plc.r{i}\"\n"));
    }
    p
}

/// A device of `tags` u32 registers, the first a counter.
pub fn device(tags: usize) -> PyModbus {
    let values: Vec<Value> = (1..tags)
        .map(|i| json!({"table": "holding", "address": 10 + 2 * i, "type": "u32", "value": i}))
        .collect();
    PyModbus::start(&json!({"values": values, "counter": {"address": 10, "period_ms": 10}}))
}
