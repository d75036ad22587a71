//! The store and the writer on a simulated disk: writes and syncs that fail (a full disk, I/O
//! errors), and power cuts at random points.

use crate::buffer::sim_disk::SimDisk;
use crate::buffer::*;
use crate::config::FullPolicy;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const ENOSPC: i32 = 28;
const EIO: i32 = 5;

fn wait(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn slot() -> ProductSlot {
    ProductSlot {
        id: "p".into(),
        governance: 1,
        topic: "t".into(),
        version: "1.0.0".into(),
        max_records: None,
        limits: ProductLimits {
            max_bytes: 64 << 20,
            policy: FullPolicy::DropOldest,
            gap_topic: "t/_gaps".into(),
        },
    }
}

/// A full disk, then EIO on sync: the writer does not stop. Live messages are staged (sent) all
/// along, those acknowledged are never written, `degraded` says why; once the disk works again
/// the writer reopens the file by itself and commits what is still unacknowledged, byte-identical.
#[test]
fn a_failing_disk_degrades_the_writer_and_it_recovers_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let disk = SimDisk::new();
    let (store, _) = Store::open_backend(&dir.path().join("b.redb"), 64 << 20, 1 << 20, disk.clone()).unwrap();
    let reader = store.reader();
    let opts = WriterOptions {
        commit_interval: Duration::from_millis(100),
        max_records_per_message: 1,
        max_message_bytes: 1 << 20,
        commit_before_send: false,
        max_staged_bytes: STAGED_BYTES_MAX,
    };
    let (h, writer) = start(store, vec![slot()], opts);
    h.stats.upstream_connected.store(true, Ordering::SeqCst);
    let key = reader.key("p");
    for (errno, fail_writes) in [(ENOSPC, true), (EIO, false)] {
        if fail_writes {
            disk.fail_writes(Some(errno));
        } else {
            disk.fail_syncs(Some(errno));
        }
        let before = h.live.after(key, None, usize::MAX).0.len();
        for i in 0..10 {
            h.offer(0, i, format!("{{\"i\":{i}}}").into_bytes());
        }
        wait("degraded", 10, || h.stats.degraded.load(Ordering::SeqCst));
        let reason = h.stats.storage_error.lock().unwrap().clone().unwrap();
        assert!(reason.contains(&format!("os error {errno}")), "{reason}");
        // Live data goes on while storage fails: staged at once, for the publisher.
        for i in 10..20 {
            h.offer(0, i, format!("{{\"i\":{i}}}").into_bytes());
        }
        wait("20 more staged", 10, || {
            h.live.after(key, None, usize::MAX).0.len() >= before + 20
        });
        let staged = h.live.after(key, None, usize::MAX).0;
        // Half of them acknowledged while degraded: those are never written.
        let acked: Vec<MessageId> = staged.iter().step_by(2).map(|m| m.id).collect();
        for id in &acked {
            h.ack(key, *id);
        }
        std::thread::sleep(Duration::from_millis(1500));
        assert!(h.stats.degraded.load(Ordering::SeqCst), "still failing: still degraded");
        disk.fail_writes(None);
        disk.fail_syncs(None);
        wait("recovered", 40, || !h.stats.degraded.load(Ordering::SeqCst));
        wait("the unacknowledged ones committed", 10, || {
            reader.read_after(key, None, usize::MAX).unwrap().len() >= staged.len() - acked.len()
        });
        let stored = reader.read_after(key, None, usize::MAX).unwrap();
        for m in staged.iter().filter(|m| !acked.contains(&m.id)) {
            assert!(stored.contains(m), "{:?} not committed as staged", m.id);
        }
        for id in &acked {
            assert!(
                stored.iter().all(|m| m.id != *id),
                "{id:?} was acknowledged but written"
            );
        }
        // Acknowledge everything stored: the next round starts empty.
        for m in &stored {
            h.ack(key, m.id);
        }
        wait("all acknowledged", 10, || {
            reader.read_after(key, None, 1).unwrap().is_empty()
        });
    }
    assert!(h.stats.failed_commits.load(Ordering::Relaxed) >= 2);
    assert_eq!(h.stats.shed_messages.load(Ordering::Relaxed), 0);
    drop(h);
    writer.join().unwrap().unwrap();
}

/// With storage failing and nothing acknowledged, memory stays bounded: the oldest messages are
/// dropped, and once storage works each is reported in a `storage_unavailable` gap event, with
/// the exact records; every seq is a stored message or in a gap event.
#[test]
fn memory_stays_bounded_while_storage_fails_and_what_is_dropped_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let disk = SimDisk::new();
    let (store, _) = Store::open_backend(&dir.path().join("b.redb"), 64 << 20, 1 << 20, disk.clone()).unwrap();
    let reader = store.reader();
    let opts = WriterOptions {
        commit_interval: Duration::from_millis(50),
        max_records_per_message: 1,
        max_message_bytes: 1 << 20,
        commit_before_send: false,
        max_staged_bytes: 64 << 10,
    };
    let (h, writer) = start(store, vec![slot()], opts);
    let key = reader.key("p");
    disk.fail_writes(Some(ENOSPC));
    let pad = "x".repeat(1000);
    for i in 0..200u64 {
        h.offer(0, i, format!("{{\"i\":{i},\"pad\":\"{pad}\"}}").into_bytes());
        if i == 0 {
            wait("degraded", 10, || h.stats.degraded.load(Ordering::SeqCst));
        }
    }
    wait("some dropped from memory", 10, || {
        h.stats.shed_messages.load(Ordering::Relaxed) > 0
    });
    let staged_bytes: usize = h.live.after(key, None, usize::MAX).0.iter().map(|m| m.body.len()).sum();
    assert!(staged_bytes <= 64 << 10, "{staged_bytes} bytes held");
    disk.fail_writes(None);
    wait("recovered", 40, || !h.stats.degraded.load(Ordering::SeqCst));
    drop(h);
    writer.join().unwrap().unwrap();
    let stored = reader.read_after(key, None, usize::MAX).unwrap();
    let gaps: Vec<GapEvent> = reader.gaps(1000).unwrap().into_iter().map(|(_, g)| g).collect();
    let lost: u64 = gaps
        .iter()
        .filter(|g| g.reason == GapReason::StorageUnavailable)
        .map(|g| g.count)
        .sum();
    assert!(lost > 0);
    assert_eq!(
        stored.len() as u64 + lost,
        200,
        "every record stored or counted: {gaps:?}"
    );
    let mut seqs: Vec<u64> = stored.iter().map(|m| m.id.seq).collect();
    for g in &gaps {
        seqs.extend(g.from_seq..=g.to_seq);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>(), "every seq explained once");
}
