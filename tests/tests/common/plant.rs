//! A plant for the buffer tests: a Modbus line of u32 registers (the first a counter), its
//! gateway and product, and the completeness rules a consumer applies to what arrives.

use super::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
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

/// Checks that every seq of every epoch up to the highest one seen is a message that arrived or
/// lies in a gap event: nothing is missing unexplained (the rules of docs/wire-format.md). Returns the seqs that only a `crash` event
/// explains, or what is missing.
pub fn explained(received: &BTreeMap<(u64, u64), Value>, gaps: &[Value]) -> Result<usize, String> {
    let mut covered: BTreeSet<(u64, u64)> = BTreeSet::new();
    for m in received.values() {
        let e = m["epoch"].as_u64().unwrap();
        let from = m["seq"].as_u64().unwrap();
        let to = m["last_seq"].as_u64().unwrap_or(from);
        covered.extend((from..=to).map(|s| (e, s)));
    }
    let mut crash_only = 0;
    // A `buffer_corrupt` event: whatever of its epoch and every earlier one has not arrived is
    // lost (its `to_seq` is the end of the epoch).
    let corrupt_through = gaps
        .iter()
        .filter(|g| g["reason"] == "buffer_corrupt")
        .filter_map(|g| g["epoch"].as_u64())
        .max();
    for g in gaps.iter().filter(|g| g["reason"] != "buffer_corrupt") {
        let e = g["epoch"].as_u64().unwrap();
        for s in g["from_seq"].as_u64().unwrap()..=g["to_seq"].as_u64().unwrap() {
            if covered.insert((e, s)) && g["reason"] == "crash" {
                crash_only += 1;
            }
        }
    }
    let epochs: BTreeSet<u64> = covered.iter().map(|k| k.0).collect();
    for e in epochs.into_iter().filter(|&e| Some(e) > corrupt_through) {
        let max = covered.range((e, 0)..=(e, u64::MAX)).next_back().unwrap().1;
        let missing: Vec<u64> = (1..=max).filter(|s| !covered.contains(&(e, *s))).collect();
        if !missing.is_empty() {
            return Err(format!(
                "epoch {e}: seqs {missing:?} neither arrived nor are in a gap event"
            ));
        }
    }
    Ok(crash_only)
}

/// Waits for every seq to be explained (gap events may still be on their way), then says how.
pub fn wait_explained(sub: &Subscriber) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match explained(&by_id(&sub.product_messages()).0, &gap_events(sub)) {
            Ok(n) => return n,
            Err(e) if Instant::now() > deadline => panic!("{e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
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
