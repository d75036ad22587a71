//! The delivery guarantee with the real binary: SIGKILL while the broker is down, broker restarts
//! mid-stream, a broker that refuses the connection. A subscriber with a persistent QoS 1 session
//! proves what arrived.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "end-to-end tests: a failure fails the test"
)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const MAX_INFLIGHT: usize = 8;

fn config(dir: &std::path::Path, broker_port: u16, modbus_port: u16, upstream_extra: &str) {
    config_with(dir, broker_port, modbus_port, upstream_extra, 5);
}

fn config_with(
    dir: &std::path::Path,
    broker_port: u16,
    modbus_port: u16,
    upstream_extra: &str,
    records_per_message: u32,
) {
    let gateway = format!(
        r#"
[agent]
id = "gw-durable"
site = "s1"
area = "a1"
line = "l1"
governance = "builtin-defaults"

[upstream]
url = "mqtt://127.0.0.1:{broker_port}"
protocol = "5"
max_inflight = {MAX_INFLIGHT}
max_records_per_message = {records_per_message}
reconnect_min = "100ms"
reconnect_max = "500ms"
{upstream_extra}

[buffer]
commit_interval = "100ms"

[[devices]]
id = "plc"
protocol = "modbus_tcp"
address = "127.0.0.1:{modbus_port}"
poll_interval = "50ms"
  [[devices.tags]]
  name = "counter"
  table = "holding"
  address = 10
  type = "u32"
"#
    );
    let product = r#"
id = "counter"
name = "Counter"
version = "1.0.0"
domain = "test"
owner = "team"
[[fields]]
name = "n"
source = "plc.counter"
"#;
    write_config(dir, &gateway, &[("counter", product)]);
}

/// `(epoch, seq)` -> records, and how often each arrived.
fn received(sub: &Subscriber) -> (BTreeMap<(u64, u64), Value>, usize) {
    let mut by_id = BTreeMap::new();
    let mut dups = 0;
    for m in sub.product_messages() {
        let id = (m["epoch"].as_u64().unwrap(), m["seq"].as_u64().unwrap());
        if let Some(prev) = by_id.insert(id, m["records"].clone()) {
            dups += 1;
            assert_eq!(prev, m["records"], "a duplicate of {id:?} differs from the first copy");
        }
    }
    (by_id, dups)
}

/// A gateway with one fast counter (polled every 10 ms, committed every 20 ms) publishing to
/// `broker`, with `max_records` per message; `extra` goes at the end of the [agent] table.
fn counter_gateway(id: &str, broker: u16, modbus: u16, max_records: u32, extra: &str) -> String {
    format!(
        "[agent]\nid = \"{id}\"\nsite = \"s1\"\narea = \"a1\"\nline = \"l1\"\ngovernance = \"builtin-defaults\"\n{extra}\
         [upstream]\nurl = \"mqtt://127.0.0.1:{broker}\"\nmax_records_per_message = {max_records}\nreconnect_min = \"100ms\"\nreconnect_max = \"300ms\"\n\
         [buffer]\ncommit_interval = \"20ms\"\nmax_bytes = \"2GiB\"\n\
         [[devices]]\nid = \"plc\"\nprotocol = \"modbus_tcp\"\naddress = \"127.0.0.1:{modbus}\"\npoll_interval = \"10ms\"\n\
         [[devices.tags]]\nname = \"counter\"\ntable = \"holding\"\naddress = 10\ntype = \"u32\"\n"
    )
}

#[test]
fn nothing_accepted_is_lost_across_sigkill_and_broker_restarts() {
    let modbus = PyModbus::start(&json!({"values": [], "counter": {"address": 10, "period_ms": 20}}));
    let mut broker = Mosquitto::start(true, "");
    let sub = Subscriber::start(broker.port, "s1/#", "durability-sub");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg");
    config(&cfg, broker.port, modbus.port, "");
    let mut agent = Agent::start(&cfg, &dir.path().join("data"));
    let e1 = agent.next_epoch(None);

    // 1. Live: messages flow.
    wait_for("20 messages", Duration::from_secs(30), || received(&sub).0.len() >= 20);

    // 2. Broker down: the agent keeps polling and buffering.
    broker.stop();
    std::thread::sleep(Duration::from_secs(2));

    // 3. SIGKILL the agent. What it committed is in the buffer file.
    agent.sigkill();
    let pending = agent.export();
    assert!(
        pending.len() >= 5,
        "expected a backlog after 2 s without a broker, got {}",
        pending.len()
    );
    let pending_ids: BTreeMap<(u64, u64), Value> = pending
        .iter()
        .map(|m| {
            (
                (m["epoch"].as_u64().unwrap(), m["seq"].as_u64().unwrap()),
                m["records"].clone(),
            )
        })
        .collect();

    // 4. Broker back (the subscriber's session survives in its persistence), then the agent.
    broker.restart();
    agent.restart();
    let e2 = agent.next_epoch(Some(e1));
    wait_for("every pending message to arrive", Duration::from_secs(60), || {
        let (got, _) = received(&sub);
        pending_ids.keys().all(|id| got.contains_key(id))
    });
    let (got, _) = received(&sub);
    for (id, records) in &pending_ids {
        assert_eq!(
            &got[id], records,
            "message {id:?} arrived with other records than were buffered"
        );
    }
    // Backlog replay is marked historical.
    let historical: BTreeSet<(u64, u64)> = sub
        .product_messages()
        .iter()
        .filter(|m| m["historical"] == true)
        .map(|m| (m["epoch"].as_u64().unwrap(), m["seq"].as_u64().unwrap()))
        .collect();
    assert!(
        pending_ids.keys().all(|id| historical.contains(id)),
        "replayed messages must be historical"
    );

    // 5. A broker restart in the middle of the second epoch's stream, once the subscriber is past
    // the replayed backlog (so that what the broker redelivers to it after its own restart, the
    // messages it had sent the subscriber and not yet seen acknowledged, are live ones only).
    let epoch2 = |sub: &Subscriber| received(sub).0.keys().filter(|k| k.0 == e2).count();
    let before = epoch2(&sub);
    wait_for("live messages of epoch 2", Duration::from_secs(30), || {
        epoch2(&sub) >= before.max(10) + 10
    });
    broker.restart();
    wait_for(
        "more epoch 2 messages after the restart",
        Duration::from_secs(30),
        || received(&sub).0.keys().filter(|k| k.0 == e2).count() >= 40,
    );
    let status = agent.stop();
    assert!(status.success(), "graceful stop failed: {status:?}\n{}", agent.log());
    let left = agent.export();

    // Every seq of both epochs, from 1 to the last one assigned, was delivered or is still buffered:
    // nothing accepted was lost.
    let left_ids: BTreeSet<(u64, u64)> = left
        .iter()
        .map(|m| (m["epoch"].as_u64().unwrap(), m["seq"].as_u64().unwrap()))
        .collect();
    wait_for("the subscriber to settle", Duration::from_secs(5), || true);
    let (got, dups) = received(&sub);
    for epoch in [e1, e2] {
        let max = got
            .keys()
            .chain(left_ids.iter())
            .filter(|k| k.0 == epoch)
            .map(|k| k.1)
            .max()
            .unwrap();
        let missing: Vec<u64> = (1..=max)
            .filter(|s| !got.contains_key(&(epoch, *s)) && !left_ids.contains(&(epoch, *s)))
            .collect();
        assert!(
            missing.is_empty(),
            "epoch {epoch}: seqs {missing:?} of 1..={max} were lost"
        );
    }
    // Duplicates only from the in-flight windows at the three interruptions.
    assert!(dups <= 3 * MAX_INFLIGHT, "{dups} duplicates");
    // Values are the device's counter, in order within each epoch.
    let values: Vec<(u64, u64)> = got
        .iter()
        .flat_map(|(id, recs)| {
            recs.as_array()
                .unwrap()
                .iter()
                .map(move |r| (id.0, r["fields"]["n"].as_u64().unwrap()))
        })
        .collect();
    for w in values.windows(2) {
        if w[0].0 == w[1].0 {
            assert!(w[0].1 <= w[1].1, "counter went backwards within an epoch: {w:?}");
        }
    }
    let log = broker.log();
    assert!(
        log.contains("Received PUBLISH from plantmesh-gw-durable"),
        "mosquitto saw no publish from the agent"
    );
}

#[test]
fn a_refused_connection_keeps_everything_buffered() {
    // The broker requires a password the agent does not have: CONNACK refused, again and again.
    let modbus = PyModbus::start(&json!({"values": [], "counter": {"address": 10, "period_ms": 20}}));
    let broker = Mosquitto::start(false, "allow_anonymous false\npassword_file /dev/null");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg");
    config(
        &cfg,
        broker.port,
        modbus.port,
        "username = \"nobody\"\npassword_env = \"PLANTMESH_TEST_NO_SUCH_PASSWORD\"\nallow_insecure_credentials = true",
    );
    // The secret reference is unresolvable: the agent must refuse to start with a clear error.
    let mut agent = Agent::start(&cfg, &dir.path().join("data"));
    wait_for("the agent to exit", Duration::from_secs(10), || !agent.is_running());
    assert!(
        agent.log().contains("PLANTMESH_TEST_NO_SUCH_PASSWORD"),
        "{}",
        agent.log()
    );

    // Without credentials: the broker refuses; records pile up in the buffer, nothing is lost.
    config(&cfg, broker.port, modbus.port, "");
    let mut agent = Agent::start(&cfg, &dir.path().join("data2"));
    wait_for("connect refusals in the log", Duration::from_secs(15), || {
        agent.log().contains("upstream connect failed")
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(agent.is_running(), "the agent must keep running: {}", agent.log());
    agent.sigkill();
    let pending = agent.export();
    assert!(
        pending.len() >= 3,
        "records must stay buffered while the broker refuses: {}",
        pending.len()
    );
    let seqs: Vec<u64> = pending.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "buffered seqs are contiguous from 1"
    );
}

#[test]
fn live_data_flows_while_a_backlog_drains_at_its_rate() {
    // One record per message; the backlog is capped at 1 kB/s (a few messages a second). The
    // uplink fails, not the broker: the subscriber misses nothing.
    let modbus = PyModbus::start(&json!({"values": [], "counter": {"address": 10, "period_ms": 20}}));
    let broker = Mosquitto::start(false, "");
    let sub = Subscriber::start(broker.port, "s1/a1/l1/test/counter/v1", "backlog-sub");
    let uplink = Proxy::start(broker.port);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg");
    config_with(&cfg, uplink.port, modbus.port, "backlog_bytes_per_second = \"1kB\"", 1);
    let mut agent = Agent::start(&cfg, &dir.path().join("data"));
    wait_for("live messages", Duration::from_secs(30), || {
        sub.product_messages().len() >= 5
    });
    uplink.set_open(false);
    std::thread::sleep(Duration::from_secs(3)); // about 60 messages of backlog at a 50 ms poll
    uplink.set_open(true);
    let split = |sub: &Subscriber| {
        let all = sub.product_messages();
        let (h, l): (Vec<Value>, Vec<Value>) = all.into_iter().partition(|m| m["historical"] == true);
        (h, l)
    };
    let before = sub
        .product_messages()
        .iter()
        .filter(|m| m["historical"] == false)
        .count();
    wait_for("20 live messages after the outage", Duration::from_secs(30), || {
        split(&sub).1.len() >= before + 20
    });
    let (historical, _) = split(&sub);
    // Live data did not wait for the backlog: most of the backlog is still to come.
    assert!(
        historical.len() < 30,
        "{} backlog messages already sent: the backlog was not paced",
        historical.len()
    );
    // The whole backlog: every seq up to the newest one delivered, none missing.
    wait_for("the whole backlog", Duration::from_secs(90), || {
        let mut seqs: Vec<u64> = sub
            .product_messages()
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect();
        seqs.sort_unstable();
        seqs.dedup();
        split(&sub).0.len() >= 20 && seqs.iter().enumerate().all(|(i, &s)| s == i as u64 + 1)
    });
    agent.stop();
    let (historical, _) = split(&sub);
    let seqs: Vec<u64> = historical.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "backlog out of order: {seqs:?}");
}

#[test]
fn a_full_buffer_under_drop_oldest_reports_exactly_what_it_dropped() {
    // A 64 KiB share, a fast counter and no broker: the product's oldest messages are dropped.
    let modbus = PyModbus::start(&json!({"values": [], "counter": {"address": 10, "period_ms": 5}}));
    let mut broker = Mosquitto::start(false, "");
    broker.stop();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg");
    let gateway = counter_gateway("gw-full", broker.port, modbus.port, 1, "");
    let product = "id = \"counter\"\nname = \"c\"\nversion = \"1.0.0\"\ndomain = \"d\"\nowner = \"o\"\n\
                   [buffer]\nmax_bytes = \"64KiB\"\nfull_policy = \"drop_oldest\"\n\
                   [[fields]]\nname = \"n\"\nsource = \"plc.counter\"\n";
    write_config(&cfg, &gateway, &[("counter", product)]);
    let mut agent = Agent::start(&cfg, &dir.path().join("data"));
    let stats = |dir: &std::path::Path| {
        let out = std::process::Command::new(plantmesh_bin())
            .args(["buffer", "stats", "--data-dir"])
            .arg(dir)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    std::thread::sleep(Duration::from_secs(6));
    agent.sigkill();
    let report = stats(&dir.path().join("data"));
    let dropped: u64 = report
        .lines()
        .find_map(|l| l.trim().strip_prefix("dropped counter.v1 (buffer_full_drop_oldest): "))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("nothing dropped: {report}"));
    assert!(dropped > 50, "{report}");

    // Broker back, subscriber first, then the agent: every gap event arrives; their counts add up.
    broker.restart();
    let sub = Subscriber::start(broker.port, "s1/a1/l1/d/counter/v1/_gaps", "full-sub");
    std::thread::sleep(Duration::from_millis(500));
    agent.restart();
    let gap_total =
        |sub: &Subscriber| -> u64 { sub.messages().iter().map(|(_, g)| g["count"].as_u64().unwrap()).sum() };
    // (A `crash` event counts 0 records: the count of what a crash lost is not known.)
    wait_for("gap events adding up to the drops", Duration::from_secs(30), || {
        gap_total(&sub) >= dropped
    });
    // The restarted agent keeps polling and may drop a little more until the backlog drains: stop it
    // and compare with the final counters, once no gap event is left unpublished.
    drop(modbus);
    std::thread::sleep(Duration::from_secs(2));
    agent.stop();
    let report = stats(&dir.path().join("data"));
    let dropped: u64 = report
        .lines()
        .find_map(|l| l.trim().strip_prefix("dropped counter.v1 (buffer_full_drop_oldest): "))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(report.contains("gap events awaiting upstream: 0"), "{report}");
    // The SIGKILL is announced too: one `crash` event over the seqs the killed run had numbered
    // (and reserved) but not committed, none of which were stored.
    let (crashes, gaps): (Vec<serde_json::Value>, Vec<serde_json::Value>) = sub
        .messages()
        .into_iter()
        .map(|(_, g)| g)
        .partition(|g| g["reason"] == "crash");
    assert_eq!(crashes.len(), 1, "{crashes:?}");
    assert!(
        crashes[0]["epoch"].as_u64() < agent.epoch(),
        "the crash is the killed run's: {crashes:?}"
    );
    assert!(
        gaps.iter().all(|g| g["reason"] == "buffer_full_drop_oldest"),
        "{gaps:?}"
    );
    assert_eq!(
        gap_total(&sub),
        dropped,
        "gap events report exactly the dropped records"
    );
    // Each gap covers a run of seqs, and the runs never overlap.
    let mut seqs: Vec<u64> = gaps
        .iter()
        .chain(&crashes)
        .flat_map(|g| g["from_seq"].as_u64().unwrap()..=g["to_seq"].as_u64().unwrap())
        .collect();
    let crashed = crashes[0]["to_seq"].as_u64().unwrap() - crashes[0]["from_seq"].as_u64().unwrap() + 1;
    let n = seqs.len();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), n, "overlapping gap events");
    assert_eq!(
        n as u64,
        dropped + crashed,
        "one record per message here, so one seq per dropped record"
    );
}

/// `block` as documented: with the broker down the product's share fills and it stops taking
/// records; everything the blocked stretch did not take is one gap event (over the seqs of the
/// messages numbered before the product blocked and refused at their commit), and it
/// unblocks once half its share is free after the broker returns (the time it takes is printed).
#[test]
fn a_blocked_product_reports_its_stretch_as_one_gap_and_unblocks() {
    let modbus = PyModbus::start(&json!({"values": [], "counter": {"address": 10, "period_ms": 5}}));
    // The uplink fails, not the broker: the subscriber misses nothing.
    let broker = Mosquitto::start(false, "");
    let sub = Subscriber::start(broker.port, "s1/a1/l1/d/counter/v1/#", "block-sub");
    let uplink = Proxy::start(broker.port);
    uplink.set_open(false);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg");
    let gateway = counter_gateway("gw-block", uplink.port, modbus.port, 1, "");
    let product = "id = \"counter\"\nname = \"c\"\nversion = \"1.0.0\"\ndomain = \"d\"\nowner = \"o\"\n\
                   [buffer]\nmax_bytes = \"64KiB\"\nfull_policy = \"block\"\n\
                   [[fields]]\nname = \"n\"\nsource = \"plc.counter\"\n";
    write_config(&cfg, &gateway, &[("counter", product)]);
    let mut agent = Agent::start(&cfg, &dir.path().join("data"));
    wait_for("the product to block", Duration::from_secs(30), || {
        agent.log().contains("product blocked")
    });
    // Blocked for a while: many commits, one stretch.
    std::thread::sleep(Duration::from_secs(3));
    uplink.set_open(true);
    let back = std::time::Instant::now();
    wait_for("the product to unblock", Duration::from_secs(60), || {
        agent.log().contains("product unblocked")
    });
    let unblocked_after = back.elapsed();
    eprintln!("block: unblocked {unblocked_after:?} after the uplink returned");
    let gaps = |sub: &Subscriber| -> Vec<serde_json::Value> {
        sub.messages()
            .into_iter()
            .filter(|(t, _)| t.ends_with("/_gaps"))
            .map(|(_, g)| g)
            .collect()
    };
    wait_for("the stretch's gap event", Duration::from_secs(30), || {
        !gaps(&sub).is_empty()
    });
    // The seqs of the messages and the gap explain each other once the backlog is in: no hole.
    let seqs = |sub: &Subscriber| -> Vec<u64> {
        let mut v: Vec<u64> = sub
            .product_messages()
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect();
        v.extend(
            gaps(sub)
                .iter()
                .flat_map(|g| g["from_seq"].as_u64().unwrap()..=g["to_seq"].as_u64().unwrap()),
        );
        v.sort_unstable();
        v.dedup();
        v
    };
    let explained = |v: &[u64]| v.iter().enumerate().all(|(i, &s)| s == i as u64 + 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !explained(&seqs(&sub)) {
        let v = seqs(&sub);
        let holes: Vec<u64> = (1..=*v.last().unwrap_or(&0))
            .filter(|s| v.binary_search(s).is_err())
            .collect();
        assert!(
            std::time::Instant::now() < deadline,
            "seqs never explained; missing {holes:?}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    agent.stop();
    let gaps = gaps(&sub);
    assert_eq!(gaps.len(), 1, "one gap event for one blocked stretch: {gaps:?}");
    let g = &gaps[0];
    assert_eq!(g["reason"], "buffer_full_blocked");
    // A few seqs at most: the messages of one commit interval (20 ms of a 10 ms poll).
    let seqs = g["to_seq"].as_u64().unwrap() - g["from_seq"].as_u64().unwrap() + 1;
    assert!(seqs <= 10, "{g}");
    assert!(g["count"].as_u64().unwrap() > 100, "{g}");
}

/// The drain test. Records buffered while the uplink is down (20 products reading one counter,
/// a few records per product per commit) are merged into large messages before their first send,
/// each standing for its seqs up to `last_seq`. Every seq of every product arrives once (a
/// duplicate only as an identical copy), in order per stream, with no hole and no overlap, the
/// records keep their order, and live latency during the drain stays within the products'
/// `latency_p99` (2 s). The outage lasts `PLANTMESH_DRAIN_OUTAGE_SECS` (default 3, about 6,000
/// records; 500 gives about 1,000,000). The drain rate is printed.
#[test]
fn a_backlog_written_during_an_outage_drains_merged_and_complete() {
    let outage: u64 = env_or("PLANTMESH_DRAIN_OUTAGE_SECS", 3);
    let modbus = PyModbus::start(&json!({"values": [], "counter": {"address": 10, "period_ms": 5}}));
    let broker = Mosquitto::start(false, "");
    let sub = Subscriber::start(broker.port, "s1/a1/l1/d/+/v1", "merge-sub");
    let uplink = Proxy::start(broker.port);
    uplink.set_open(false);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg");
    let gateway = counter_gateway(
        "gw-merge",
        uplink.port,
        modbus.port,
        50,
        "metrics_listen = \"127.0.0.1:0\"
",
    );
    let products: Vec<(String, String)> = (0..20)
        .map(|i| {
            (
                format!("c{i}"),
                format!(
                    "id = \"c{i}\"\nname = \"c\"\nversion = \"1.0.0\"\ndomain = \"d\"\nowner = \"o\"\n\
                     [buffer]\nmax_bytes = \"100MiB\"\n[service_levels]\nlatency_p99 = \"2s\"\n\
                     [[fields]]\nname = \"n\"\nsource = \"plc.counter\"\n"
                ),
            )
        })
        .collect();
    let refs: Vec<(&str, &str)> = products.iter().map(|(n, t)| (n.as_str(), t.as_str())).collect();
    write_config(&cfg, &gateway, &refs);
    let mut agent = Agent::start(&cfg, &dir.path().join("data"));
    let addr = agent.metrics_addr();
    wait_for("refused connects", Duration::from_secs(30), || {
        agent.log().contains("upstream connect failed")
    });
    std::thread::sleep(Duration::from_secs(outage));
    let buffered = metric(&scrape(&addr, "/metrics"), "plantmesh_records_accepted_total").unwrap();
    uplink.set_open(true);
    let back = std::time::Instant::now();
    // Per product: the (seq, last_seq) of what arrived, deduplicated and sorted.
    let covered = |sub: &Subscriber| -> std::collections::BTreeMap<String, Vec<(u64, u64)>> {
        let mut by: std::collections::BTreeMap<String, Vec<(u64, u64)>> = Default::default();
        for m in sub.product_messages() {
            let seq = m["seq"].as_u64().unwrap();
            let last = m["last_seq"].as_u64().unwrap_or(seq);
            by.entry(m["product"].as_str().unwrap().to_string())
                .or_default()
                .push((seq, last));
        }
        for v in by.values_mut() {
            v.sort_unstable();
            v.dedup();
        }
        by
    };
    let complete = |v: &[(u64, u64)]| v.first().is_some_and(|f| f.0 == 1) && v.windows(2).all(|w| w[1].0 == w[0].1 + 1);
    let acked = || metric(&scrape(&addr, "/metrics"), "plantmesh_records_acked_total").unwrap_or(0.0);
    wait_for("the backlog, complete", Duration::from_secs(120 + outage), || {
        let by = covered(&sub);
        acked() >= buffered && by.len() == 20 && by.values().all(|v| complete(v))
    });
    let drained = back.elapsed();
    eprintln!(
        "drain: {buffered} records buffered in {outage} s, all acknowledged {:.2} s after the uplink returned ({:.0} records/s)",
        drained.as_secs_f64(),
        buffered / drained.as_secs_f64()
    );
    wait_for("live messages after the drain", Duration::from_secs(30), || {
        sub.product_messages()
            .iter()
            .filter(|m| m["historical"] == false)
            .count()
            >= 40
    });
    let p99 = metric(
        &scrape(&addr, "/metrics"),
        "plantmesh_publish_latency_ms{quantile=\"0.99\"}",
    )
    .unwrap();
    agent.stop();
    assert!(
        p99 <= 2000.0,
        "live p99 {p99} ms during the drain, over the products' 2 s"
    );
    let messages = sub.product_messages();
    // Duplicates (the in-flight window after a reconnect) only as identical copies.
    let mut by_id: std::collections::HashMap<(String, u64), &serde_json::Value> = std::collections::HashMap::new();
    for m in &messages {
        let id = (m["product"].as_str().unwrap().to_string(), m["seq"].as_u64().unwrap());
        if let Some(prev) = by_id.insert(id.clone(), m) {
            assert_eq!(
                prev["records"], m["records"],
                "{id:?} sent twice with different records"
            );
            assert_eq!(prev["last_seq"], m["last_seq"]);
        }
    }
    for (p, v) in covered(&sub) {
        assert!(complete(&v), "{p}: holes or overlaps: {v:?}");
    }
    let merged: Vec<&serde_json::Value> = messages.iter().filter(|m| m.get("last_seq").is_some()).collect();
    assert!(!merged.is_empty(), "nothing merged");
    assert!(merged.iter().all(|m| m["historical"] == true), "only backlog is merged");
    for m in &merged {
        let (seq, last) = (m["seq"].as_u64().unwrap(), m["last_seq"].as_u64().unwrap());
        let n = m["records"].as_array().unwrap().len();
        assert!(last > seq && n as u64 > last - seq && n <= 50, "{m}");
    }
    // Order: per product, each stream in seq order, and the counter never goes back in the backlog.
    for i in 0..20 {
        let product = format!("c{i}");
        let mine: Vec<&serde_json::Value> = messages.iter().filter(|m| m["product"] == product.as_str()).collect();
        for historical in [true, false] {
            let mut seqs: Vec<u64> = mine
                .iter()
                .filter(|m| m["historical"] == historical)
                .map(|m| m["seq"].as_u64().unwrap())
                .collect();
            seqs.dedup();
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "{product} historical={historical}: {seqs:?}"
            );
        }
        let mut backlog: Vec<&&serde_json::Value> = mine.iter().filter(|m| m["historical"] == true).collect();
        backlog.sort_by_key(|m| m["seq"].as_u64().unwrap());
        backlog.dedup_by_key(|m| m["seq"].as_u64().unwrap());
        let counters: Vec<u64> = backlog
            .iter()
            .flat_map(|m| {
                m["records"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|r| r["fields"]["n"].as_u64())
            })
            .collect();
        assert!(
            counters.windows(2).all(|w| w[0] <= w[1]),
            "{product}: records out of order in the backlog"
        );
    }
}
