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
    // 2. Rot: one message in the middle of the backlog damaged wherever its bytes are (the live
    // page and stale copies of it in free pages), and the epoch file deleted too.
    let file = data.join("buffer.redb");
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = pending.values().nth(pending.len() / 2).unwrap();
    let ts = middle["records"][0]["ts"].as_str().unwrap().as_bytes().to_vec();
    let hits: Vec<usize> = bytes
        .windows(ts.len())
        .enumerate()
        .filter(|(_, w)| *w == ts.as_slice())
        .map(|(i, _)| i)
        .collect();
    assert!(!hits.is_empty(), "the message's bytes are in the file");
    for at in hits {
        bytes[at + 3] ^= 0x01;
    }
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

/// A small tmpfs, unmounted when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(at: &std::path::Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "cannot mount a tmpfs at {} (the test needs root)", at.display());
        SmallDisk(at.to_path_buf())
    }

    /// Fills the file system up with `filler` until a write fails.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        let chunk = vec![0u8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        let small = [0u8; 512];
        while f.write_all(&small).is_ok() {}
        let _ = f.sync_all();
    }

    fn free(&self) {
        std::fs::remove_file(self.0.join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn health(addr: &str) -> String {
    let r = scrape(addr, "/health");
    r.split("\r\n\r\n").nth(1).unwrap_or_default().to_string()
}

/// Polls `/health` until `f` holds for its body.
fn wait_health(addr: &str, what: &str, secs: u64, f: impl Fn(&str) -> bool) {
    wait_for(what, Duration::from_secs(secs), || {
        std::thread::sleep(Duration::from_millis(200));
        f(&health(addr))
    });
}

/// The agent's cumulative live latency histogram: `(le ms, count)`.
fn latency_buckets(addr: &str) -> Vec<(f64, f64)> {
    scrape(addr, "/metrics")
        .lines()
        .filter_map(|l| l.strip_prefix("plantmesh_publish_latency_window_ms_bucket{le=\""))
        .filter_map(|l| {
            let (le, n) = l.split_once("\"} ")?;
            Some((le.parse().unwrap_or(f64::INFINITY), n.trim().parse().ok()?))
        })
        .collect()
}

/// Quantile `q` (ms, a bucket bound) of the live messages acknowledged between two snapshots.
fn latency(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|&(le, n)| (le, n - before.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1)))
        .collect();
    let total = delta.last().map_or(0.0, |b| b.1);
    delta.iter().find(|b| b.1 >= q * total).map_or(f64::NAN, |b| b.0)
}

/// The data directory's disk fills while the agent runs: it does not exit. `/health` says
/// degraded and why, live data keeps reaching the broker, and once space returns the agent
/// commits again by itself; every seq is explained. Then it is started on a full disk: it runs.
#[test]
fn a_full_disk_degrades_the_agent_and_it_recovers_by_itself() {
    let modbus = device(20);
    let broker = Mosquitto::start(true, "");
    let sub = Subscriber::start(broker.port, "s1/a1/l1/d/line/v1/#", "full-sub");
    let uplink = Proxy::start(broker.port);
    let dir = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&dir.path().join("disk"), "3m");
    let cfg = dir.path().join("cfg");
    let gw = gateway(
        "gw-full",
        uplink.port,
        modbus.port,
        20,
        "10ms",
        "100ms",
        "max_records_per_message = 1\n",
    )
    .replace("[buffer]\n", "[buffer]\nfree_space_warning = \"1MiB\"\n");
    write_config(&cfg, &gw, &[("line", &product(20))]);
    let data = disk.0.join("data");
    let mut agent = Agent::start_logging_to(&cfg, &data, &dir.path().join("agent.log"));
    let addr = agent.metrics_addr();
    wait_for("live data", Duration::from_secs(30), || {
        sub.product_messages().len() > 50
    });
    assert_eq!(health(&addr), "ok\n");
    let start = latency_buckets(&addr);
    std::thread::sleep(Duration::from_secs(5));
    let healthy = latency_buckets(&addr);
    // The disk fills; the uplink goes down so that what is not acknowledged must be committed.
    disk.fill();
    uplink.set_open(false);
    wait_health(&addr, "degraded", 30, |h| h.contains("buffer storage failing"));
    let h = health(&addr);
    assert!(h.contains("No space left on device"), "{h}");
    wait_health(&addr, "the free-space warning", 10, |h| {
        h.contains("data directory nearly full")
    });
    assert!(agent.log().contains("data directory is nearly full"));
    let metrics = scrape(&addr, "/metrics");
    assert_eq!(metric(&metrics, "plantmesh_buffer_degraded"), Some(1.0), "{metrics}");
    // The uplink back, the disk still full: live data reaches the broker.
    uplink.set_open(true);
    let before = sub.product_messages().len();
    wait_for("live data while the disk is full", Duration::from_secs(30), || {
        sub.product_messages().len() > before + 200
    });
    // Live latency over 5 s with the disk full (after the backlog of the outage has gone).
    std::thread::sleep(Duration::from_secs(2));
    let full_start = latency_buckets(&addr);
    std::thread::sleep(Duration::from_secs(5));
    let full = latency_buckets(&addr);
    assert!(
        health(&addr).contains("buffer storage failing"),
        "still full: still degraded"
    );
    assert!(agent.is_running());
    // Space returns: commits resume by themselves (retries back off to 30 s at most).
    disk.free();
    wait_health(&addr, "recovered", 60, |h| h == "ok\n");
    eprintln!(
        "live latency p50/p99: {}/{} ms healthy, {}/{} ms with the disk full",
        latency(&start, &healthy, 0.5),
        latency(&start, &healthy, 0.99),
        latency(&full_start, &full, 0.5),
        latency(&full_start, &full, 0.99)
    );
    wait_explained(&sub);
    assert!(agent.stop().success(), "{}", agent.log());
    // A start on a full disk does not exit (no crash loop under a service manager).
    disk.fill();
    agent.restart();
    std::thread::sleep(Duration::from_secs(5));
    assert!(agent.is_running(), "exited on a full disk:\n{}", agent.log());
    let before = sub.product_messages().len();
    wait_for(
        "live data after a start on a full disk",
        Duration::from_secs(30),
        || sub.product_messages().len() > before + 50,
    );
    disk.free();
    assert!(agent.stop().success(), "{}", agent.log());
    wait_explained(&sub);
}
