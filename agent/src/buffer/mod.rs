//! Buffer: the durable middle of the pipeline.
//!
//! In: encoded records per product (from map) and acknowledgements (from publish). Out: numbered
//! messages in redb, read by the publisher. A record is *accepted* when the group commit that wrote
//! its message has returned from fsync; from then on it survives crashes and power cuts until the
//! broker's PUBACK for that exact message deletes it.
//!
//! Group commit: one writer thread collects for `commit_interval` (default 200 ms) and writes
//! everything (new messages, deletions, gap events) in one redb transaction with
//! `Durability::Immediate`. Fsyncs are therefore bounded by 1/commit_interval (5/s by default) at any
//! rate up to 50,000 records per interval (250,000 records/s by default); beyond that a batch is also
//! committed once 50,000 records wait, to bound memory (measured: 9.6 fsyncs/s at 775,000 records/s).
//! That keeps flash wear on gateways flat, and the interval is the upper bound on the time a record
//! waits to be accepted. Records are grouped into messages at commit time (at most
//! `max_records_per_message` records and `max_message_bytes` bytes each).
//!
//! Failure: a storage error stops the writer; the agent raises an alarm and exits non-zero so the
//! service manager restarts it. Nothing is reported accepted after a failed commit.

mod message;
pub mod store;

mod gap;
pub use gap::GapReason;
mod key;
pub use key::{Keys, ProductKey};
pub use store::{Batch, BufferError, GapEvent, MessageId, NewMessage, ProductLimits, Reader, Store, StoredMessage};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// What the writer is told.
#[derive(Debug)]
pub enum WriterMsg {
    /// One encoded record (a JSON object) of a product.
    Record {
        product: usize,
        created: u64,
        json: Vec<u8>,
    },
    /// The broker acknowledged this message.
    Ack { product: ProductKey, id: MessageId },
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
    pub dropped_records: AtomicU64,
    pub pending_messages: AtomicU64,
    pub pending_bytes: AtomicU64,
    /// Bumped after every commit; the publisher waits on it.
    pub generation: AtomicU64,
    /// Gap events stored and not yet acknowledged.
    pub pending_gaps: AtomicU64,
    /// Newest message id appended per product in this run: the publisher reads only products that
    /// have something new, instead of asking redb about every product on every PUBACK.
    pub latest: std::sync::Mutex<std::collections::HashMap<ProductKey, MessageId>>,
    /// Set by the publisher while its upstream connection is up. Messages appended while it is
    /// down are never sent before the next connect, so until then they may be merged.
    pub upstream_connected: std::sync::atomic::AtomicBool,
    /// The last backlog merge request done, per product (see [`BufferHandle::merge_backlog`]).
    pub merged: std::sync::Mutex<std::collections::HashMap<ProductKey, u64>>,
}

/// Producer side of the buffer: handed to map (records) and publish (acks).
#[derive(Clone)]
pub struct BufferHandle {
    tx: mpsc::Sender<WriterMsg>,
    queued_records: Arc<AtomicU64>,
    max_queued: u64,
    /// Per product: set while a `block` product's share is full.
    pub blocked: Arc<Vec<AtomicBool>>,
    /// Per product: records not taken because the product was blocked, since the last commit.
    pub lost: Arc<Vec<AtomicU64>>,
    /// Per product: records not taken because the writer was too far behind, since the last commit.
    pub overloaded: Arc<Vec<AtomicU64>>,
    /// Per product: records governance dropped for breaking the contract, since the last commit.
    pub violations: Arc<Vec<AtomicU64>>,
    pub stats: Arc<BufferStats>,
    pub notify: tokio::sync::watch::Receiver<u64>,
}

impl BufferHandle {
    /// Offers one record; a record refused here (product blocked, writer far behind) is counted and
    /// becomes a gap event at the next commit.
    pub fn offer(&self, product: usize, created: u64, json: Vec<u8>) {
        if self.blocked[product].load(Ordering::Relaxed) {
            self.lost[product].fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.queued_records.load(Ordering::Relaxed) >= self.max_queued {
            self.overloaded[product].fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.queued_records.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(WriterMsg::Record { product, created, json }).is_err() {
            // The writer has stopped (storage failure); the agent is exiting. Counted all the same.
            self.overloaded[product].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A record governance dropped (contract violation, `on_violation = "drop"`): counted and reported
    /// as a gap like every other drop.
    pub fn refuse_contract(&self, product: usize) {
        self.violations[product].fetch_add(1, Ordering::Relaxed);
    }

    pub fn ack(&self, product: ProductKey, id: MessageId) {
        let _ = self.tx.send(WriterMsg::Ack { product, id });
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
    commit_interval: Duration,
    max_records_per_message: usize,
    max_message_bytes: usize,
) -> (BufferHandle, std::thread::JoinHandle<Result<(), BufferError>>) {
    start_with_queue_limit(
        store,
        products,
        commit_interval,
        max_records_per_message,
        max_message_bytes,
        200_000,
    )
}

/// [`start`] with the most records that may wait for the writer before offers are refused.
fn start_with_queue_limit(
    store: Store,
    products: Vec<ProductSlot>,
    commit_interval: Duration,
    max_records_per_message: usize,
    max_message_bytes: usize,
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
        blocked: Arc::new(products.iter().map(|_| AtomicBool::new(false)).collect()),
        lost: Arc::new(products.iter().map(|_| AtomicU64::new(0)).collect()),
        overloaded: Arc::new(products.iter().map(|_| AtomicU64::new(0)).collect()),
        violations: Arc::new(products.iter().map(|_| AtomicU64::new(0)).collect()),
        stats: stats.clone(),
        notify: notify_rx,
    };
    // The writer gets the shared counters but no sender: the channel closes when the last producer
    // (map, publisher) is gone, which is how the writer knows to make its final commit and stop.
    let shared = Shared {
        queued_records: handle.queued_records.clone(),
        blocked: handle.blocked.clone(),
        lost: handle.lost.clone(),
        overloaded: handle.overloaded.clone(),
        violations: handle.violations.clone(),
        stats: handle.stats.clone(),
    };
    #[allow(
        clippy::expect_used,
        reason = "at start only: an agent that cannot start its one writer thread cannot run, and says so"
    )]
    let join = std::thread::Builder::new()
        .name("buffer-writer".into())
        .spawn(move || {
            let mut w = Writer {
                slot_of: keys.iter().enumerate().map(|(i, &k)| (k, i)).collect(),
                keys,
                store,
                products,
                rx,
                h: shared,
                notify: notify_tx,
                max_records_per_message,
                max_message_bytes,
                commit_interval,
                stretches: Vec::new(),
                eligible: Vec::new(),
                jobs: std::collections::VecDeque::new(),
                done: Vec::new(),
            };
            w.stretches = vec![(0, None); w.products.len()];
            w.eligible = vec![None; w.products.len()];
            w.run()
        })
        .expect("spawn buffer writer");
    (handle, join)
}

struct Shared {
    queued_records: Arc<AtomicU64>,
    blocked: Arc<Vec<AtomicBool>>,
    lost: Arc<Vec<AtomicU64>>,
    overloaded: Arc<Vec<AtomicU64>>,
    violations: Arc<Vec<AtomicU64>>,
    stats: Arc<BufferStats>,
}

struct Writer {
    store: Store,
    products: Vec<ProductSlot>,
    /// The key of each slot.
    keys: Vec<ProductKey>,
    /// The slot of each key.
    slot_of: std::collections::HashMap<ProductKey, usize>,
    rx: mpsc::Receiver<WriterMsg>,
    h: Shared,
    notify: tokio::sync::watch::Sender<u64>,
    max_records_per_message: usize,
    max_message_bytes: usize,
    commit_interval: Duration,
    /// Per slot: records a `block` product did not take in its current blocked stretch, and when
    /// the stretch began. One gap event (one seq) reports a stretch when it ends.
    stretches: Vec<(u64, Option<Instant>)>,
    /// Per slot: the first message appended while the upstream was down (never sent since).
    eligible: Vec<Option<MessageId>>,
    /// Backlog merges under way, oldest first; a commit does at most `MERGE_PER_COMMIT` messages.
    jobs: std::collections::VecDeque<MergeJob>,
    /// Merge requests done, to report after the next commit.
    done: Vec<(ProductKey, u64)>,
}

/// A product's backlog merge: messages in `from..=through`, read on from `after`.
struct MergeJob {
    slot: usize,
    after: Option<MessageId>,
    from: MessageId,
    through: MessageId,
    token: u64,
}

/// Most backlog messages one commit reads for merging: the merge happens between commits of live
/// data, not instead of them.
const MERGE_PER_COMMIT: usize = 4_000;

/// A blocked stretch longer than this is reported in parts, so a crash loses the count of at most
/// this long (what was never taken is not in the buffer to be replayed).
const STRETCH_REPORT: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Pending {
    records: Vec<Vec<Vec<u8>>>,
    created: Vec<u64>,
    acks: Vec<(ProductKey, MessageId)>,
    gap_acks: Vec<u64>,
    dead_letters: Vec<(ProductKey, MessageId, GapReason)>,
    merges: Vec<(ProductKey, Vec<MessageId>)>,
    merge_requested: bool,
    count: usize,
}

impl Writer {
    fn run(&mut self) -> Result<(), BufferError> {
        self.publish_stats();
        let mut last_commit = Instant::now();
        let mut closed = false;
        while !closed {
            // Read before anything is taken: a message appended in this round is eligible for a
            // backlog merge only if the upstream was down before the round began, and no merge
            // request (sent after a connect) came in the round.
            let disconnected = !self.h.stats.upstream_connected.load(Ordering::SeqCst);
            let mut p = Pending {
                records: vec![Vec::new(); self.products.len()],
                created: vec![0; self.products.len()],
                ..Default::default()
            };
            // Wait for work; with nothing to do, wake every commit interval to settle blocked/lost counts.
            match self
                .rx
                .recv_timeout(self.commit_interval.max(Duration::from_millis(50)))
            {
                Ok(m) => self.take(m, &mut p),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => closed = true,
            }
            let deadline = last_commit + self.commit_interval;
            while !closed && p.count < 50_000 {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                match self.rx.recv_timeout(deadline - now) {
                    Ok(m) => self.take(m, &mut p),
                    Err(mpsc::RecvTimeoutError::Timeout) => break,
                    Err(mpsc::RecvTimeoutError::Disconnected) => closed = true,
                }
            }
            // Drain what is already queued so nothing waits a second interval.
            while let Ok(m) = self.rx.try_recv() {
                self.take(m, &mut p);
            }
            let merge_requested = p.merge_requested;
            let mut batch = self.batch(p, closed);
            let merging = self.merge_work(&mut batch);
            if batch.appends.is_empty()
                && batch.acks.is_empty()
                && batch.gap_acks.is_empty()
                && batch.refused.is_empty()
                && batch.dead_letters.is_empty()
                && batch.merges.is_empty()
                && merging.is_empty()
            {
                continue;
            }

            match self.store.commit(batch) {
                Ok(done) => {
                    last_commit = Instant::now();
                    let accepted: u64 = done.appended.len() as u64;
                    let s = &self.h.stats;
                    s.commits.fetch_add(1, Ordering::Relaxed);
                    s.accepted_messages.fetch_add(accepted, Ordering::Relaxed);
                    let dropped: u64 = done.gaps.iter().map(|(_, g)| g.count).sum();
                    let records: u64 = done.appended.iter().map(|a| u64::from(a.2)).sum();
                    if let Ok(mut latest) = s.latest.lock() {
                        for (p, id, _) in &done.appended {
                            latest.insert(*p, *id);
                        }
                    }
                    if disconnected && !merge_requested {
                        for (p, id, _) in &done.appended {
                            if let Some(&i) = self.slot_of.get(p) {
                                self.eligible[i].get_or_insert(*id);
                            }
                        }
                    }
                    if let Ok(mut merged) = s.merged.lock() {
                        for (p, token) in merging {
                            merged.insert(p, token);
                        }
                    }
                    s.pending_gaps.fetch_add(done.gaps.len() as u64, Ordering::Relaxed);
                    let _ = s.pending_gaps.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |g| {
                        Some(g.saturating_sub(done.gaps_deleted as u64))
                    });
                    s.accepted_records.fetch_add(records, Ordering::Relaxed);
                    if dropped > 0 {
                        s.dropped_records.fetch_add(dropped, Ordering::Relaxed);
                        for (_, g) in &done.gaps {
                            warn!(product = %g.product, epoch = g.epoch, from_seq = g.from_seq, to_seq = g.to_seq, records = g.count, reason = %g.reason, "records dropped; gap event recorded");
                        }
                    }
                    for p in &done.now_blocked {
                        if let Some(&i) = self.slot_of.get(p) {
                            if !self.h.blocked[i].swap(true, Ordering::Relaxed) {
                                warn!(product = %self.products[i].id, "buffer share full: product blocked until the backlog drains");
                            }
                        }
                    }
                    for (p, records) in &done.blocked_records {
                        if let Some(&i) = self.slot_of.get(p) {
                            let s = &mut self.stretches[i];
                            s.0 += records;
                            s.1.get_or_insert_with(Instant::now);
                        }
                    }
                    self.publish_stats();
                }
                Err(e) => {
                    error!(error = %e, "buffer commit failed; no further records are accepted");
                    return Err(e);
                }
            }
        }
        // What a stretch still counts when the writer stops is reported, not forgotten.
        let n = self.products.len();
        let last = Pending {
            records: vec![Vec::new(); n],
            created: vec![0; n],
            ..Default::default()
        };
        let batch = self.batch(last, true);
        if !batch.refused.is_empty() {
            self.store.commit(batch)?;
        }
        info!("buffer writer stopped");
        Ok(())
    }

    fn take(&mut self, m: WriterMsg, p: &mut Pending) {
        match m {
            WriterMsg::Record { product, created, json } => {
                self.h.queued_records.fetch_sub(1, Ordering::Relaxed);
                if p.records[product].is_empty() {
                    p.created[product] = created;
                }
                p.records[product].push(json);
                p.count += 1;
            }
            WriterMsg::Ack { product, id } => {
                p.acks.push((product, id));
                p.count += 1;
            }
            WriterMsg::GapAck(id) => p.gap_acks.push(id),
            WriterMsg::DeadLetter { product, id, reason } => {
                p.dead_letters.push((product, id, reason));
                p.count += 1;
            }
            WriterMsg::MergeBacklog {
                product,
                through,
                token,
            } => {
                p.merge_requested = true;
                let Some(&i) = self.slot_of.get(&product) else {
                    self.done.push((product, token));
                    return;
                };
                // What was appended while the upstream was down, up to the backlog's end; later
                // appends may be sent live at once, so they lose their eligibility here.
                match (self.eligible[i].take(), through) {
                    (Some(from), Some(through)) if from <= through => self.jobs.push_back(MergeJob {
                        slot: i,
                        after: None,
                        from,
                        through,
                        token,
                    }),
                    _ => self.done.push((product, token)),
                }
            }
        }
    }

    /// Adds the next part of the oldest backlog merges to `batch`: runs of consecutive messages, each
    /// as large as the product's limits allow. Returns the merge requests this commit completes.
    fn merge_work(&mut self, batch: &mut Batch) -> Vec<(ProductKey, u64)> {
        let mut finished = std::mem::take(&mut self.done);
        let reader = self.store.reader();
        let mut budget = MERGE_PER_COMMIT;
        while budget > 0 {
            let Some(job) = self.jobs.front_mut() else { break };
            let key = self.keys[job.slot];
            let slot = &self.products[job.slot];
            let max_records = slot
                .max_records
                .map_or(self.max_records_per_message, |m| m.min(self.max_records_per_message));
            let after = job.after.or_else(|| {
                // Just before `from`: messages are keyed by (epoch, seq).
                Some(if job.from.seq > 0 {
                    MessageId {
                        epoch: job.from.epoch,
                        seq: job.from.seq - 1,
                    }
                } else {
                    MessageId {
                        epoch: job.from.epoch.saturating_sub(1),
                        seq: u64::MAX,
                    }
                })
            });
            let limit = budget;
            let Ok(msgs) = reader.read_after(key, after, limit) else {
                break; // a storage problem shows in the commit itself
            };
            budget = budget.saturating_sub(msgs.len().max(1));
            let mut run: Vec<MessageId> = Vec::new();
            let (mut records, mut bytes) = (0usize, 0usize);
            let mut last = None;
            let mut end = msgs.is_empty();
            for m in &msgs {
                if m.id > job.through {
                    end = true;
                    break;
                }
                last = Some(MessageId {
                    epoch: m.id.epoch,
                    seq: m.last_seq,
                });
                let fits = records + m.records as usize <= max_records && bytes + m.body.len() < self.max_message_bytes;
                if !fits || run.is_empty() {
                    if run.len() >= 2 {
                        batch.merges.push((key, std::mem::take(&mut run)));
                    }
                    run.clear();
                    (records, bytes) = (0, 0);
                }
                run.push(m.id);
                records += m.records as usize;
                bytes += m.body.len() + 1;
            }
            if run.len() >= 2 {
                batch.merges.push((key, run));
            }
            if end || msgs.len() < limit || last.is_some_and(|l| l >= job.through) {
                let token = job.token;
                self.jobs.pop_front();
                finished.push((key, token));
            } else {
                job.after = last;
            }
        }
        finished
    }

    /// Groups records into messages and settles lost counts (`closing`: every stretch ends now).
    fn batch(&mut self, p: Pending, closing: bool) -> Batch {
        let mut batch = Batch {
            acks: p.acks,
            gap_acks: p.gap_acks,
            dead_letters: p.dead_letters,
            merges: p.merges,
            ..Default::default()
        };
        for (i, records) in p.records.into_iter().enumerate() {
            let slot = &self.products[i];
            let key = self.keys[i];
            let max_records = slot
                .max_records
                .map_or(self.max_records_per_message, |m| m.min(self.max_records_per_message));
            let mut body: Vec<u8> = Vec::new();
            let mut n = 0u32;
            for json in records {
                if n > 0 && (n as usize >= max_records || body.len() + json.len() + 2 > self.max_message_bytes) {
                    body.push(b']');
                    batch
                        .appends
                        .push(self.message(i, p.created[i], n, std::mem::take(&mut body)));
                    n = 0;
                }
                body.push(if n == 0 { b'[' } else { b',' });
                body.extend(json);
                n += 1;
            }
            if n > 0 {
                body.push(b']');
                batch.appends.push(self.message(i, p.created[i], n, body));
            }
            // A blocked product unblocks once half its share is free; what it did not take meanwhile
            // becomes one gap event.
            if self.h.blocked[i].load(Ordering::Relaxed) && self.store.has_room(key) {
                self.h.blocked[i].store(false, Ordering::Relaxed);
                info!(product = %slot.id, "buffer share has room again: product unblocked");
            }
            // Everything one blocked stretch did not take is one gap event, when the stretch ends.
            let lost = self.h.lost[i].swap(0, Ordering::Relaxed);
            let stretch = &mut self.stretches[i];
            if lost > 0 {
                stretch.0 += lost;
                stretch.1.get_or_insert_with(Instant::now);
            }
            let over = stretch.1.is_some_and(|t| t.elapsed() >= STRETCH_REPORT);
            if stretch.0 > 0 && (closing || over || !self.h.blocked[i].load(Ordering::Relaxed)) {
                batch.refused.push((key, stretch.0, GapReason::BufferFullBlocked));
                *stretch = (0, None);
            }
            let overloaded = self.h.overloaded[i].swap(0, Ordering::Relaxed);
            if overloaded > 0 {
                batch.refused.push((key, overloaded, GapReason::WriterOverload));
            }
            let violations = self.h.violations[i].swap(0, Ordering::Relaxed);
            if violations > 0 {
                batch.refused.push((key, violations, GapReason::ContractViolation));
            }
        }
        batch
    }

    fn message(&self, i: usize, created: u64, records: u32, body: Vec<u8>) -> NewMessage {
        let slot = &self.products[i];
        NewMessage {
            product: self.keys[i],
            created,
            records,
            topic: slot.topic.clone(),
            version: slot.version.clone(),
            governance: slot.governance,
            body,
        }
    }

    fn publish_stats(&self) {
        let s = &self.h.stats;
        let (mut msgs, mut bytes) = (0, 0);
        for p in self.store.products() {
            let (m, b) = self.store.depth(p);
            msgs += m;
            bytes += b;
        }
        s.pending_messages.store(msgs, Ordering::Relaxed);
        s.pending_bytes.store(bytes, Ordering::Relaxed);
        let g = s.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let _ = self.notify.send(g);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FullPolicy;

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
            Duration::from_millis(300),
            4,
            2500,
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

    /// When the writer is far behind, offers are refused, counted, and reported as `writer_overload`.
    #[test]
    fn an_overloaded_writer_counts_what_it_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("o.redb"), 64 << 20, 1 << 20).unwrap();
        let reader = store.reader();
        let (h, writer) = start_with_queue_limit(
            store,
            vec![slot(FullPolicy::DropOldest, 64 << 20)],
            Duration::from_millis(500),
            100,
            1 << 20,
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
        let (h, writer) = start(store, vec![slot], Duration::from_millis(5), 1, 64 << 10);
        let record = vec![b'x'; 1000];
        // Fill the share: about 7 one-record messages fit in 8 KiB.
        let mut offered = 0u64;
        while !h.blocked[0].load(Ordering::Relaxed) {
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
        wait("unblock", || !h.blocked[0].load(Ordering::Relaxed));
        wait("the stretch's gap event", || !blocked_gaps().is_empty());
        let gaps = blocked_gaps();
        assert_eq!(gaps.len(), 1, "{gaps:?}");
        // Every record offered is either a message or counted in that one event.
        assert_eq!(gaps[0].count, offered - pending.len() as u64);
        assert_eq!((gaps[0].from_seq, gaps[0].to_seq), (gaps[0].from_seq, gaps[0].from_seq));
        let total_dropped: u64 = reader.drops().unwrap().iter().map(|d| d.2).sum();
        assert_eq!(total_dropped, gaps[0].count);
        // Seqs stay explained: the messages, then the one seq of the stretch.
        let mut seqs: Vec<u64> = pending.iter().map(|m| m.id.seq).collect();
        seqs.push(gaps[0].from_seq);
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
        drop(h);
        writer.join().unwrap().unwrap();
    }
}
