//! Buffer: the durable middle of the pipeline.
//!
//! In: encoded records per product (from map) and acknowledgements (from publish). Out: numbered
//! messages, staged in memory for the publisher at once ([`live`]) and committed to redb when the
//! broker has not acknowledged them within `commit_interval` ([`writer`]).
//!
//! The guarantee: a record is *safe* once the commit that wrote its message has returned from
//! fsync, or once the broker has acknowledged that message, whichever comes first; from then on it
//! survives crashes and power cuts (a committed message until the PUBACK for that exact message
//! deletes it). A crash loses at most what was neither, and the next start announces it: every seq
//! numbered but not yet committed lies in the range reserved by the last commit, which the next
//! open reports as one `crash` gap event per product.
//!
//! Flash: with a broker that acknowledges within the interval, messages are never written; the
//! writer commits only to reserve the next block of seqs (a few times a minute). With the broker
//! slow or down, everything unacknowledged is committed within `commit_interval` (default 200 ms)
//! in one redb transaction with `Durability::Immediate`, so fsyncs stay bounded by
//! 1/commit_interval at any rate. `[buffer] write = "always"` commits every message before it may
//! be sent, as earlier versions did.
//!
//! Failure: a storage error does not stop the writer. It runs degraded: live messages go on being
//! staged (and sent) from memory, bounded; the commit is retried with backoff after reopening the
//! file; `BufferStats::degraded` and `/health` say so ([`writer`]). The file on disk stays within
//! `max_bytes` ([`store`]); a damaged one is salvaged at open and the epoch never repeats
//! ([`recover`]).

pub mod live;
mod message;
pub mod recover;
#[cfg(test)]
pub mod sim_disk;
pub mod store;
mod writer;
pub use live::Live;
pub use writer::{WriterOptions, STAGED_BYTES_MAX};

mod gap;
pub use gap::GapReason;
mod key;
pub use key::{Keys, ProductKey};
pub use store::{
    Batch, BufferError, Damage, GapEvent, MessageId, NewMessage, ProductLimits, Reader, Store, StoredMessage,
};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

/// One encoded record (a JSON object) of a product slot, offered to the writer.
#[derive(Debug)]
pub struct Offered {
    pub product: usize,
    /// When it was read (ms since the epoch).
    pub created: u64,
    pub json: Vec<u8>,
}

/// What the writer is told.
#[derive(Debug)]
pub enum WriterMsg {
    /// Encoded records (JSON objects) of products: what one batch of readings produced, in one
    /// message (a wake-up of the writer per batch, not per record).
    Records(Vec<Offered>),
    /// The broker acknowledged these messages (those of one pass of the publisher).
    Acks(Vec<(ProductKey, MessageId)>),
    /// The broker acknowledged this gap event.
    GapAck(u64),
    /// The message may not be delivered: the broker refused it (MQTT 5 reason code >= 0x80), or
    /// egress was denied just before publishing. `reason` becomes the gap event's reason.
    DeadLetter {
        product: ProductKey,
        id: MessageId,
        reason: GapReason,
    },
    /// The publisher has connected: merge the product's messages appended while it was down, up
    /// to `through` (its backlog's end; none of them sent yet), into messages as large as the
    /// limits allow, then report `token` in [`BufferStats::merged`].
    MergeBacklog {
        product: ProductKey,
        through: Option<MessageId>,
        token: u64,
    },
    /// A reload changed the products (see [`BufferHandle::reconfigure`]).
    Products {
        products: Vec<ProductSlot>,
        counters: Counters,
        treatments: Vec<(String, crate::govern::Treatment)>,
    },
}

/// A product as the writer needs it.
#[derive(Debug, Clone)]
pub struct ProductSlot {
    pub id: String,
    pub topic: String,
    pub version: String,
    /// Fingerprint of the governance treatment its records get now (stamped on every message).
    pub governance: u64,
    /// Most records per message for this product, when fewer than the writer's default.
    pub max_records: Option<usize>,
    pub limits: ProductLimits,
}

/// Counters shared with the publisher, status view and metrics.
#[derive(Debug, Default)]
pub struct BufferStats {
    pub accepted_records: AtomicU64,
    pub accepted_messages: AtomicU64,
    pub commits: AtomicU64,
    /// Messages written to redb because no acknowledgement came within the commit interval.
    pub written_messages: AtomicU64,
    /// Messages acknowledged before their commit was due: never written.
    pub unwritten_messages: AtomicU64,
    /// Messages numbered and not yet committed nor acknowledged.
    pub staged_messages: AtomicU64,
    pub dropped_records: AtomicU64,
    pub pending_messages: AtomicU64,
    pub pending_bytes: AtomicU64,
    /// Bumped when every acknowledgement the writer has taken is in effect (applied in memory or
    /// committed): a message acknowledged before the generation after next is not read again.
    pub generation: AtomicU64,
    /// Gap events stored and not yet acknowledged.
    pub pending_gaps: AtomicU64,
    /// Set by the publisher while its upstream connection is up. Messages formed while it is
    /// down are never sent before the next connect, so until then they may be merged.
    pub upstream_connected: std::sync::atomic::AtomicBool,
    /// Bumped by the publisher on every connect, before `upstream_connected` is set.
    pub upstream_sessions: AtomicU64,
    /// Set while commits fail (storage full, I/O errors): live data flows from memory, nothing
    /// new is made durable. The reason is in `storage_error`.
    pub degraded: AtomicBool,
    pub storage_error: std::sync::Mutex<Option<String>>,
    /// Commits that failed.
    pub failed_commits: AtomicU64,
    /// Messages dropped from memory while storage failed (`storage_unavailable` gap events).
    pub shed_messages: AtomicU64,
    /// Free bytes on the data directory's file system (0 until first checked, see [`crate::disk`]).
    pub disk_free_bytes: AtomicU64,
    /// Set while that is below `[buffer] free_space_warning`.
    pub disk_low: AtomicBool,
    /// The last backlog merge request done, per product (see [`BufferHandle::merge_backlog`]).
    pub merged: std::sync::Mutex<std::collections::HashMap<ProductKey, u64>>,
}

/// Producer side of the buffer: handed to map (records) and publish (acks).
#[derive(Clone)]
pub struct BufferHandle {
    tx: mpsc::Sender<WriterMsg>,
    queued_records: Arc<AtomicU64>,
    max_queued: u64,
    /// Per product slot. A reload that adds products hands out a handle with a longer table (the
    /// same counters first, see [`BufferHandle::reconfigure`]).
    pub counters: Counters,
    pub stats: Arc<BufferStats>,
    /// Messages numbered and not yet committed (the publisher reads them here first).
    pub live: Arc<Live>,
    pub notify: tokio::sync::watch::Receiver<u64>,
}

/// The counters of every product slot, shared by the handles and the writer.
pub type Counters = Arc<Vec<Arc<ProductCounters>>>;

/// What the producer side counts for one product between commits.
#[derive(Debug, Default)]
pub struct ProductCounters {
    /// Set while a `block` product's share is full.
    pub blocked: AtomicBool,
    /// Records not taken because the product was blocked, since the last commit.
    pub lost: AtomicU64,
    /// Records not taken because the writer was too far behind, since the last commit.
    pub overloaded: AtomicU64,
    /// Records governance dropped for breaking the contract, since the last commit.
    pub violations: AtomicU64,
}

fn counters(n: usize) -> Counters {
    Arc::new((0..n).map(|_| Arc::default()).collect())
}

impl BufferHandle {
    /// Offers one record; see [`BufferHandle::offer_all`].
    pub fn offer(&self, product: usize, created: u64, json: Vec<u8>) {
        let mut one = vec![Offered { product, created, json }];
        self.offer_all(&mut one);
    }

    /// Offers records, taken from `records` (left empty); a record refused here (product blocked,
    /// writer far behind) is counted and becomes a gap event at the next commit.
    pub fn offer_all(&self, records: &mut Vec<Offered>) {
        let mut room = self
            .max_queued
            .saturating_sub(self.queued_records.load(Ordering::Relaxed));
        records.retain(|r| {
            let Some(c) = self.counters.get(r.product) else {
                return false;
            };
            if c.blocked.load(Ordering::Relaxed) {
                c.lost.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            if room == 0 {
                c.overloaded.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            room -= 1;
            true
        });
        if records.is_empty() {
            return;
        }
        self.queued_records.fetch_add(records.len() as u64, Ordering::Relaxed);
        if let Err(mpsc::SendError(WriterMsg::Records(lost))) =
            self.tx.send(WriterMsg::Records(std::mem::take(records)))
        {
            // The writer has stopped (storage failure); the agent is exiting. Counted all the same.
            for r in lost {
                if let Some(c) = self.counters.get(r.product) {
                    c.overloaded.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// A record governance dropped (contract violation, `on_violation = "drop"`): counted and reported
    /// as a gap like every other drop.
    pub fn refuse_contract(&self, product: usize) {
        if let Some(c) = self.counters.get(product) {
            c.violations.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Changes the products in place (a reload): `products` is the whole slot table, the slots of
    /// this handle first (same order, maybe changed: topic, limits, governance), then new ones. No
    /// slot is ever removed: a product that left the config keeps its slot while its backlog
    /// drains. `treatments` are kept in the buffer like those of the start. Returns the handle the
    /// produce stage offers to from now on; records offered to the new slots reach the writer
    /// after the change (one channel, in order).
    pub fn reconfigure(
        &self,
        products: Vec<ProductSlot>,
        treatments: Vec<(String, crate::govern::Treatment)>,
    ) -> BufferHandle {
        let mut table: Vec<Arc<ProductCounters>> = self.counters.iter().cloned().collect();
        table.resize_with(products.len().max(table.len()), Arc::default);
        let mut handle = self.clone();
        handle.counters = Arc::new(table);
        let _ = self.tx.send(WriterMsg::Products {
            products,
            counters: handle.counters.clone(),
            treatments,
        });
        handle
    }

    pub fn ack(&self, product: ProductKey, id: MessageId) {
        self.ack_all(vec![(product, id)]);
    }

    /// Acknowledgements of the broker, in one message to the writer.
    pub fn ack_all(&self, acks: Vec<(ProductKey, MessageId)>) {
        if !acks.is_empty() {
            let _ = self.tx.send(WriterMsg::Acks(acks));
        }
    }

    pub fn dead_letter(&self, product: ProductKey, id: MessageId, reason: GapReason) {
        let _ = self.tx.send(WriterMsg::DeadLetter { product, id, reason });
    }

    /// Asks for the backlog written while the upstream was down to be merged into large messages
    /// before its first send (a few records per commit would otherwise make the drain a matter of
    /// message count). Done when [`BufferStats::merged`] holds `token` for the product.
    pub fn merge_backlog(&self, product: ProductKey, through: Option<MessageId>, token: u64) {
        let _ = self.tx.send(WriterMsg::MergeBacklog {
            product,
            through,
            token,
        });
    }

    pub fn gap_ack(&self, id: u64) {
        let _ = self.tx.send(WriterMsg::GapAck(id));
    }
}

/// Starts the writer thread over an opened store.
pub fn start(
    store: Store,
    products: Vec<ProductSlot>,
    opts: WriterOptions,
) -> (BufferHandle, std::thread::JoinHandle<Result<(), BufferError>>) {
    start_with_queue_limit(store, products, opts, 200_000)
}

/// [`start`] with the most records that may wait for the writer before offers are refused.
fn start_with_queue_limit(
    store: Store,
    products: Vec<ProductSlot>,
    opts: WriterOptions,
    max_queued: u64,
) -> (BufferHandle, std::thread::JoinHandle<Result<(), BufferError>>) {
    let mut store = store;
    let keys: Vec<ProductKey> = products.iter().map(|p| store.key(&p.id)).collect();
    for (p, &key) in products.iter().zip(&keys) {
        store.set_limits(key, p.limits.clone());
    }
    let pending_gaps = store.reader().gaps(usize::MAX).map_or(0, |g| g.len() as u64);
    let (tx, rx) = mpsc::channel();
    let (notify_tx, notify_rx) = tokio::sync::watch::channel(0u64);
    let stats = Arc::new(BufferStats::default());
    stats.pending_gaps.store(pending_gaps, Ordering::Relaxed);
    let handle = BufferHandle {
        tx,
        queued_records: Arc::new(AtomicU64::new(0)),
        max_queued,
        counters: counters(products.len()),
        stats: stats.clone(),
        live: Arc::new(Live::default()),
        notify: notify_rx,
    };
    // The writer gets the shared counters but no sender: the channel closes when the last producer
    // (map, publisher) is gone, which is how the writer knows to make its final commit and stop.
    let shared = Shared {
        queued_records: handle.queued_records.clone(),
        counters: handle.counters.clone(),
        stats: handle.stats.clone(),
        live: handle.live.clone(),
    };
    #[allow(
        clippy::expect_used,
        reason = "at start only: an agent that cannot start its one writer thread cannot run, and says so"
    )]
    let join = std::thread::Builder::new()
        .name("buffer-writer".into())
        .spawn(move || writer::Writer::new(store, products, keys, rx, shared, notify_tx, opts).run())
        .expect("spawn buffer writer");
    (handle, join)
}

/// What the writer shares with the handles.
struct Shared {
    queued_records: Arc<AtomicU64>,
    counters: Counters,
    stats: Arc<BufferStats>,
    live: Arc<Live>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FullPolicy;
    use std::time::{Duration, Instant};

    fn opts(commit_interval: Duration, max_records_per_message: usize, max_message_bytes: usize) -> WriterOptions {
        WriterOptions {
            commit_interval,
            max_records_per_message,
            max_message_bytes,
            commit_before_send: false,
            max_staged_bytes: STAGED_BYTES_MAX,
        }
    }

    fn wait(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn slot(policy: FullPolicy, max_bytes: u64) -> ProductSlot {
        ProductSlot {
            id: "p".into(),
            governance: 1,
            topic: "t".into(),
            version: "1.0.0".into(),
            max_records: None,
            limits: ProductLimits {
                max_bytes,
                policy,
                gap_topic: "t/_gaps".into(),
            },
        }
    }

    /// Records are grouped into messages by count and by bytes; every message body is a JSON array
    /// of whole records.
    #[test]
    fn messages_respect_record_and_byte_limits() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("m.redb"), 64 << 20, 1 << 20).unwrap();
        let reader = store.reader();
        let (h, writer) = start(
            store,
            vec![
                slot(FullPolicy::DropOldest, 64 << 20),
                ProductSlot {
                    id: "q".into(),
                    governance: 1,
                    max_records: Some(3),
                    ..slot(FullPolicy::DropOldest, 64 << 20)
                },
            ],
            opts(Duration::from_millis(300), 4, 2500),
        );
        // A product's own, smaller batch size.
        for i in 0..9 {
            h.offer(1, i, format!("{{\"i\":{i}}}").into_bytes());
        }
        // 10 records of ~1000 bytes: at most 2 fit in 2500 bytes.
        for i in 0..10 {
            h.offer(
                0,
                i,
                format!("{{\"i\":{i},\"pad\":\"{}\"}}", "x".repeat(990)).into_bytes(),
            );
        }
        // 12 small records: at most 4 per message.
        for i in 10..22 {
            h.offer(0, i, format!("{{\"i\":{i}}}").into_bytes());
        }
        drop(h);
        writer.join().unwrap().unwrap();
        let msgs = reader.read_after(reader.key("p"), None, 100).unwrap();
        let mut seen = Vec::new();
        for m in &msgs {
            assert!(m.body.len() <= 2500, "{} bytes", m.body.len());
            let records: Vec<serde_json::Value> = serde_json::from_slice(&m.body).unwrap();
            assert!(records.len() <= 4 && records.len() as u32 == m.records);
            seen.extend(records.iter().map(|r| r["i"].as_u64().unwrap()));
        }
        assert_eq!(seen, (0..22).collect::<Vec<_>>(), "every record once, in order");
        assert_eq!(msgs.len(), 5 + 3);
        let q = reader.read_after(reader.key("q"), None, 100).unwrap();
        assert_eq!(q.iter().map(|m| m.records).collect::<Vec<_>>(), vec![3, 3, 3]);
    }

    /// The live path: a message is readable in [`Live`] as soon as it is formed; one acknowledged
    /// before its commit is due is never written; one that is not is committed within the
    /// interval with the very bytes that were staged, and leaves memory.
    #[test]
    fn staged_messages_are_written_only_when_not_acknowledged_in_time() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("l.redb"), 64 << 20, 1 << 20).unwrap();
        let reader = store.reader();
        let (h, writer) = start(
            store,
            vec![slot(FullPolicy::DropOldest, 64 << 20)],
            // Long enough for a slow machine (the suite also runs this under emulation).
            opts(Duration::from_millis(1500), 1, 1 << 20),
        );
        h.stats.upstream_connected.store(true, Ordering::SeqCst);
        let key = reader.key("p");
        let t0 = Instant::now();
        for i in 0..4 {
            h.offer(0, i, format!("{{\"i\":{i}}}").into_bytes());
        }
        wait("4 staged messages", || h.live.after(key, None, 10).0.len() == 4);
        assert!(
            t0.elapsed() < Duration::from_millis(1500),
            "staged before any commit was due"
        );
        let staged = h.live.after(key, None, 10).0;
        // Two acknowledged at once: never written.
        h.ack(key, staged[0].id);
        h.ack(key, staged[2].id);
        wait("the two others committed", || {
            reader.read_after(key, None, 10).unwrap().len() == 2
        });
        let stored = reader.read_after(key, None, 10).unwrap();
        assert_eq!(
            stored,
            vec![(*staged[1]).clone(), (*staged[3]).clone()],
            "committed as staged"
        );
        // The writer takes them out of memory just after its commit has returned.
        wait("out of memory once committed", || {
            let (left, committed) = h.live.after(key, None, 10);
            left.is_empty() && committed
        });
        assert_eq!(h.stats.unwritten_messages.load(Ordering::Relaxed), 2);
        assert_eq!(h.stats.written_messages.load(Ordering::Relaxed), 2);
        drop(h);
        writer.join().unwrap().unwrap();
        // A clean stop leaves nothing for a `crash` event.
        drop(reader);
        let (_, report) = Store::open(&dir.path().join("l.redb"), 64 << 20, 1 << 20).unwrap();
        assert!(report.crashed.is_empty(), "{:?}", report.crashed);
    }

    /// `[buffer] write = "always"`: nothing is readable before it is committed.
    #[test]
    fn commit_before_send_stages_nothing_for_the_publisher() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("a.redb"), 64 << 20, 1 << 20).unwrap();
        let reader = store.reader();
        let options = WriterOptions {
            commit_before_send: true,
            ..opts(Duration::from_millis(200), 1, 1 << 20)
        };
        let (h, writer) = start(store, vec![slot(FullPolicy::DropOldest, 64 << 20)], options);
        h.stats.upstream_connected.store(true, Ordering::SeqCst);
        let key = reader.key("p");
        h.offer(0, 1, b"{}".to_vec());
        std::thread::sleep(Duration::from_millis(50));
        let (staged, committed) = h.live.after(key, None, 10);
        assert!(staged.is_empty() && !committed, "sent before its commit");
        wait("the commit", || h.live.after(key, None, 10).1);
        assert_eq!(reader.read_after(key, None, 10).unwrap().len(), 1);
        drop(h);
        writer.join().unwrap().unwrap();
    }

    /// When the writer is far behind, offers are refused, counted, and reported as `writer_overload`.
    #[test]
    fn an_overloaded_writer_counts_what_it_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("o.redb"), 64 << 20, 1 << 20).unwrap();
        let reader = store.reader();
        let (h, writer) = start_with_queue_limit(
            store,
            vec![slot(FullPolicy::DropOldest, 64 << 20)],
            opts(Duration::from_millis(500), 100, 1 << 20),
            5,
        );
        for i in 0..100 {
            h.offer(0, i, b"{}".to_vec());
        }
        let stats = h.stats.clone();
        drop(h);
        writer.join().unwrap().unwrap();
        let accepted = stats.accepted_records.load(Ordering::Relaxed);
        let gaps = reader.gaps(100).unwrap();
        let overload: u64 = gaps
            .iter()
            .filter(|(_, g)| g.reason == "writer_overload")
            .map(|(_, g)| g.count)
            .sum();
        assert!(overload >= 90, "{overload} refused");
        assert_eq!(accepted + overload, 100, "every offer accepted or counted");
    }

    /// A `block` product stops taking records when its share is full, counts what it refused, and
    /// reports everything one blocked stretch did not take as one gap event (one seq) when
    /// acknowledgements free half its share: not a gap event per message or per commit.
    #[test]
    fn block_policy_refuses_counts_and_reports_one_gap() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("b.redb"), 64 << 20, 1 << 20).unwrap();
        let reader = store.reader();
        let slot = ProductSlot {
            id: "p".into(),
            governance: 1,
            topic: "t".into(),
            version: "1.0.0".into(),
            max_records: None,
            limits: ProductLimits {
                max_bytes: 8 << 10,
                policy: FullPolicy::Block,
                gap_topic: "t/_gaps".into(),
            },
        };
        let (h, writer) = start(store, vec![slot], opts(Duration::from_millis(5), 1, 64 << 10));
        let record = vec![b'x'; 1000];
        // Fill the share: about 7 one-record messages fit in 8 KiB.
        let mut offered = 0u64;
        while !h.counters[0].blocked.load(Ordering::Relaxed) {
            h.offer(0, 1, record.clone());
            offered += 1;
            std::thread::sleep(Duration::from_millis(2));
            assert!(offered < 1000, "never blocked");
        }
        // While blocked, offers are refused and counted, over many commits.
        for _ in 0..25 {
            h.offer(0, 1, record.clone());
            offered += 1;
            std::thread::sleep(Duration::from_millis(3));
        }
        wait("the queue to drain", || h.queued_records.load(Ordering::Relaxed) == 0);
        std::thread::sleep(Duration::from_millis(50));
        let blocked_gaps = || -> Vec<GapEvent> {
            reader
                .gaps(usize::MAX)
                .unwrap()
                .into_iter()
                .map(|(_, g)| g)
                .filter(|g| g.reason == "buffer_full_blocked")
                .collect()
        };
        assert!(
            blocked_gaps().is_empty(),
            "reported before the stretch ended: {:?}",
            blocked_gaps()
        );
        let pending = reader.read_after(reader.key("p"), None, 100).unwrap();
        assert!(pending.len() >= 5 && pending.len() <= 8, "{}", pending.len());
        // Acknowledge everything: the product unblocks and the stretch becomes one gap event.
        for m in &pending {
            h.ack(m.product, m.id);
        }
        wait("unblock", || !h.counters[0].blocked.load(Ordering::Relaxed));
        wait("the stretch's gap event", || !blocked_gaps().is_empty());
        let gaps = blocked_gaps();
        assert_eq!(gaps.len(), 1, "{gaps:?}");
        // Every record offered is either a message or counted in that one event.
        assert_eq!(gaps[0].count, offered - pending.len() as u64);
        let total_dropped: u64 = reader.drops().unwrap().iter().map(|d| d.2).sum();
        assert_eq!(total_dropped, gaps[0].count);
        // Seqs stay explained: the messages, then the stretch: the seqs of messages numbered before
        // the product blocked and refused at their commit (or one seq, when there were none).
        let mut seqs: Vec<u64> = pending.iter().map(|m| m.id.seq).collect();
        seqs.extend(gaps[0].from_seq..=gaps[0].to_seq);
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
        drop(h);
        writer.join().unwrap().unwrap();
    }
}
