//! Storage faults with the real binary, Mosquitto and pymodbus: a damaged buffer file is salvaged
//! and its loss announced, with ids never used before.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "end-to-end tests: a failure fails the test"
)]

mod common;

use common::plant::*;
use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

/// A buffer file rotted while the agent was down: the next start moves it aside, replays every
/// message that reads back intact (byte-identical, under its old id), announces what may be lost
/// as `buffer_corrupt` gap events naming the agent, and numbers on in an epoch above every earlier
/// one, even with the epoch file gone too.
#[test]
fn a_rotten_buffer_file_is_salvaged_and_its_loss_announced() {
    let modbus = device(4);
    let broker = Mosquitto::start(true, "");
    let uplink = Proxy::start(broker.port);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg");
    let gw = gateway(
        "gw-rot",
        uplink.port,
        modbus.port,
        4,
        "10ms",
        "50ms",
        "max_records_per_message = 2\n",
    );
    write_config(&cfg, &gw, &[("line", &product(4))]);
    let data = dir.path().join("data");
    // 1. The uplink down: a backlog is committed; then a kill.
    uplink.set_open(false);
    let mut agent = Agent::start(&cfg, &data);
    let e1 = agent.next_epoch(None);
    std::thread::sleep(Duration::from_secs(3));
    agent.sigkill();
    let pending: BTreeMap<(u64, u64), Value> = agent
        .export()
        .into_iter()
        .map(|m| ((m["epoch"].as_u64().unwrap(), m["seq"].as_u64().unwrap()), m))
        .collect();
    assert!(pending.len() >= 20, "a backlog to salvage: {}", pending.len());
    // 2. Rot: one byte in the middle of a message page, and the epoch file deleted too.
    let file = data.join("buffer.redb");
    let mut bytes = std::fs::read(&file).unwrap();
    let hits: Vec<usize> = bytes
        .windows(5)
        .enumerate()
        .filter(|(_, w)| *w == b"\"r0\":")
        .map(|(i, _)| i)
        .collect();
    let at = hits[hits.len() / 2];
    bytes[at + 2] ^= 0x20;
    std::fs::write(&file, &bytes).unwrap();
    std::fs::remove_file(data.join("buffer.redb.epoch")).unwrap();
    // 3. Up again.
    let sub = Subscriber::start(broker.port, "s1/a1/l1/d/line/v1/#", "rot-sub");
    uplink.set_open(true);
    agent.restart();
    let e2 = agent.next_epoch(None);
    assert!(e2 > e1, "epoch {e2} after {e1}: reused");
    wait_for(
        "the buffer_corrupt event and live data",
        Duration::from_secs(60),
        || {
            gap_events(&sub).iter().any(|g| g["reason"] == "buffer_corrupt")
                && by_id(&sub.product_messages()).0.keys().any(|k| k.0 == e2)
        },
    );
    let log = agent.log();
    assert!(log.contains("buffer file is damaged"), "{log}");
    assert!(
        std::fs::read_dir(&data).unwrap().any(|f| f
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("buffer.redb.corrupt-")),
        "the damaged file is kept aside"
    );
    let corrupt: Vec<Value> = gap_events(&sub)
        .into_iter()
        .filter(|g| g["reason"] == "buffer_corrupt")
        .collect();
    assert_eq!(corrupt.len(), 1, "{corrupt:?}");
    let g = &corrupt[0];
    assert_eq!(g["agent"], "gw-rot");
    assert_eq!(g["product"], "line");
    assert!(
        g["epoch"].as_u64().unwrap() >= e1 && g["epoch"].as_u64().unwrap() < e2,
        "{g}"
    );
    assert_eq!(
        (g["from_seq"].as_u64(), g["to_seq"].as_u64(), g["count"].as_u64()),
        (Some(1), Some(u64::MAX), Some(0))
    );
    // What the rot spared replays as it was committed: most of the backlog.
    wait_for("the salvaged backlog", Duration::from_secs(30), || {
        let (got, _) = by_id(&sub.product_messages());
        got.keys().filter(|k| k.0 == e1).count() * 2 >= pending.len()
    });
    let (got, _) = by_id(&sub.product_messages());
    for (id, m) in got.iter().filter(|(k, _)| k.0 == e1) {
        let was = pending
            .get(id)
            .unwrap_or_else(|| panic!("{id:?} was never in the buffer"));
        assert_eq!(m["records"], was["records"], "{id:?} replayed with other records");
    }
    // Every seq is explained to a consumer that follows the documented rules.
    wait_explained(&sub);
    assert!(agent.stop().success());
}
