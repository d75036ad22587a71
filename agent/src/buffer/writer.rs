//! The writer thread: numbers records into messages at once, stages them for the publisher, and
//! commits what the broker has not acknowledged in time.
//!
//! Every round takes what the channel holds, groups each product's records into messages
//! (`max_records_per_message`, `max_message_bytes`), numbers them in memory within the seqs the
//! last commit reserved, and stages them in [`Live`]: the publisher sends them within the round.
//! A commit is due when the oldest staged message has waited `commit_interval` (all staged
//! messages go into it), when acknowledgements of committed messages, gap events or drops have
//! waited as long, or when a product runs out of reserved seqs. With a broker that acknowledges
//! within the interval, nothing but the reservations is written: one commit per block of seqs.

use super::live::Live;
use super::{
    Batch, BufferError, GapReason, MessageId, Offered, ProductKey, ProductSlot, Shared, Store, StoredMessage, WriterMsg,
};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// How the writer forms and commits messages.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// The most time a record that is not acknowledged waits to be committed.
    pub commit_interval: Duration,
    pub max_records_per_message: usize,
    pub max_message_bytes: usize,
    /// Commit every message before the publisher may send it (`[buffer] write = "always"`).
    pub commit_before_send: bool,
    /// Staged bytes beyond which a commit is due at once (memory stays bounded when nothing is
    /// acknowledged); while storage fails, the oldest are dropped instead. [`STAGED_BYTES_MAX`].
    pub max_staged_bytes: usize,
}

/// Most backlog messages one commit reads for merging: the merge happens between commits of live
/// data, not instead of them.
const MERGE_PER_COMMIT: usize = 4_000;

/// A blocked stretch longer than this is reported in parts, so a crash loses the count of at most
/// this long (what was never taken is not in the buffer to be replayed).
const STRETCH_REPORT: Duration = Duration::from_secs(60);

/// Staged bytes beyond which a commit is due at once (memory stays bounded when nothing is
/// acknowledged and records arrive faster than one interval's worth fits): the default of
/// [`WriterOptions::max_staged_bytes`].
pub const STAGED_BYTES_MAX: usize = 32 << 20;

/// Commits are retried this long after one failed, doubling up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Seqs reserved per product at first; the block doubles while it lasts less than
/// [`BLOCK_TARGET`], up to [`BLOCK_MAX`].
const BLOCK_MIN: u64 = 1024;
const BLOCK_MAX: u64 = 1 << 20;
const BLOCK_TARGET: Duration = Duration::from_secs(60);

/// A message numbered and not yet committed.
struct Staged {
    msg: Arc<StoredMessage>,
    /// Set when the upstream was down as it was formed: the publisher session it was formed in.
    /// Such a message cannot have been sent while that session has not connected.
    down_in: Option<u64>,
}

/// Everything a `block` product did not take in one blocked stretch: reported as one gap event.
#[derive(Default)]
struct Stretch {
    records: u64,
    since: Option<Instant>,
    /// Seqs of messages numbered before the product blocked and refused at their commit.
    seqs: Option<(u64, u64)>,
}

/// Work that only a commit makes effective.
#[derive(Default)]
struct Durable {
    acks: Vec<(ProductKey, MessageId)>,
    gap_acks: Vec<u64>,
    dead_letters: Vec<(ProductKey, MessageId, GapReason)>,
    since: Option<Instant>,
}

impl Durable {
    fn is_empty(&self) -> bool {
        self.acks.is_empty() && self.gap_acks.is_empty() && self.dead_letters.is_empty()
    }
}

/// Storage is failing: commits are retried with backoff, live data flows from memory.
struct Degraded {
    retry_at: Instant,
    delay: Duration,
}

/// Records refused before they reached a message ([`Batch::refused`]).
type Refused = (ProductKey, u64, GapReason);
/// Numbered messages refused ([`Batch::refused_seqs`]).
type RefusedSeqs = (ProductKey, (u64, u64), u64, GapReason);

/// What a failed commit had taken, put back for the next one.
struct Taken {
    numbered: Vec<Arc<StoredMessage>>,
    down_in: HashMap<(ProductKey, MessageId), u64>,
    acks: Vec<(ProductKey, MessageId)>,
    gap_acks: Vec<u64>,
    dead_letters: Vec<(ProductKey, MessageId, GapReason)>,
    refused: Vec<Refused>,
    refused_seqs: Vec<RefusedSeqs>,
}

/// A product's backlog merge: messages in `from..=through`, read on from `after`.
struct MergeJob {
    slot: usize,
    after: Option<MessageId>,
    from: MessageId,
    through: MessageId,
    token: u64,
}

pub(super) struct Writer {
    store: Store,
    products: Vec<ProductSlot>,
    /// The key of each slot.
    keys: Vec<ProductKey>,
    /// The slot of each key.
    slot_of: HashMap<ProductKey, usize>,
    rx: mpsc::Receiver<WriterMsg>,
    h: Shared,
    live: Arc<Live>,
    notify: tokio::sync::watch::Sender<u64>,
    opts: WriterOptions,
    /// Per slot: the first record's read time and the records taken this round.
    forming: Vec<(u64, Vec<Vec<u8>>)>,
    /// Slots with records this round.
    touched: Vec<usize>,
    staged: HashMap<(ProductKey, MessageId), Staged>,
    /// Staged messages in the order numbered, with when (entries acknowledged since are skipped).
    order: VecDeque<(Instant, ProductKey, MessageId)>,
    staged_bytes: usize,
    /// Acknowledged before their commit, to take out of [`Live`] at the end of the round.
    unstaged: Vec<(ProductKey, MessageId)>,
    durable: Durable,
    /// Per slot: the reservation block and when it was last raised.
    blocks: Vec<(u64, Instant)>,
    stretches: Vec<Stretch>,
    /// Per slot: the first message appended while the upstream was down (never sent since).
    eligible: Vec<Option<MessageId>>,
    /// Backlog merges under way, oldest first; a commit does at most `MERGE_PER_COMMIT` messages.
    jobs: VecDeque<MergeJob>,
    /// Merge requests done, to report after the next commit.
    done: Vec<(ProductKey, u64)>,
    /// Parts of blocked stretches to report at the next commit: `(product, seqs, records)`.
    stretch_parts: Vec<(ProductKey, (u64, u64), u64)>,
    last_commit: Instant,
    last_settle: Instant,
    signals: u64,
    /// Set while commits fail.
    degraded: Option<Degraded>,
    /// Gap events a failed commit did not write, and messages dropped from memory while storage
    /// failed: written by the next commit that succeeds.
    carried: (Vec<Refused>, Vec<RefusedSeqs>),
    /// Staged messages a failed commit had taken (it may have written them after all: a failed
    /// fsync), and those of them acknowledged since: deleted by the next commit, if there.
    put_back: std::collections::HashSet<(ProductKey, MessageId)>,
    recheck: Vec<(ProductKey, MessageId)>,
}

impl Writer {
    pub(super) fn new(
        store: Store,
        products: Vec<ProductSlot>,
        keys: Vec<ProductKey>,
        rx: mpsc::Receiver<WriterMsg>,
        h: Shared,
        notify: tokio::sync::watch::Sender<u64>,
        opts: WriterOptions,
    ) -> Writer {
        let n = products.len();
        let now = Instant::now();
        let mut w = Writer {
            slot_of: keys.iter().enumerate().map(|(i, &k)| (k, i)).collect(),
            keys,
            store,
            products,
            rx,
            live: h.live.clone(),
            h,
            notify,
            opts,
            forming: vec![(0, Vec::new()); n],
            touched: Vec::new(),
            staged: HashMap::new(),
            order: VecDeque::new(),
            staged_bytes: 0,
            unstaged: Vec::new(),
            durable: Durable::default(),
            blocks: vec![(BLOCK_MIN, now.checked_sub(BLOCK_TARGET).unwrap_or(now)); n],
            stretches: (0..n).map(|_| Stretch::default()).collect(),
            eligible: vec![None; n],
            jobs: VecDeque::new(),
            done: Vec::new(),
            stretch_parts: Vec::new(),
            last_commit: now,
            last_settle: now,
            signals: 0,
            degraded: None,
            carried: Default::default(),
            put_back: Default::default(),
            recheck: Vec::new(),
        };
        if let Some(error) = w.store.deferred() {
            // The open could not write: start as after a failed commit, retrying at once.
            w.h.stats.degraded.store(true, Ordering::SeqCst);
            if let Ok(mut reason) = w.h.stats.storage_error.lock() {
                *reason = Some(error.to_string());
            }
            w.degraded = Some(Degraded {
                retry_at: now,
                delay: RETRY_MIN,
            });
        }
        w
    }

    pub(super) fn run(&mut self) -> Result<(), BufferError> {
        // Reserve a first block of seqs for every product, so that numbering needs no commit.
        let first: Vec<(usize, u64)> = (0..self.products.len()).map(|i| (i, 0)).collect();
        self.commit(false, &first)?;
        let mut closed = false;
        while !closed {
            let wait = self.deadline().saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(wait) {
                Ok(m) => self.take(m),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => closed = true,
            }
            // Whatever else is queued joins this round (bounded, so a flood still commits).
            for _ in 0..50_000 {
                match self.rx.try_recv() {
                    Ok(m) => self.take(m),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            let formed = self.form()?;
            if self.degraded.is_some() && self.staged_bytes > self.opts.max_staged_bytes {
                self.shed();
            }
            let acked = !self.unstaged.is_empty();
            self.live.unstage(&std::mem::take(&mut self.unstaged));
            if closed {
                break;
            }
            if self.due(Instant::now()) {
                self.commit(false, &[])?;
            } else if formed || acked {
                self.signal();
            }
        }
        // The last commit: everything staged, every count still open, and no seq left reserved.
        self.commit(true, &[])?;
        info!("buffer writer stopped");
        Ok(())
    }

    /// The broker has this message: a staged one is never written, a committed one is deleted at
    /// the next commit.
    fn acked(&mut self, product: ProductKey, id: MessageId) {
        match self.staged.remove(&(product, id)) {
            Some(s) => {
                // Acknowledged before its commit: it is never written.
                self.staged_bytes = self.staged_bytes.saturating_sub(s.msg.body.len());
                self.unstaged.push((product, id));
                self.h.stats.unwritten_messages.fetch_add(1, Ordering::Relaxed);
                if self.put_back.remove(&(product, id)) {
                    // A commit that failed (its fsync) may have written it after all.
                    self.recheck.push((product, id));
                }
            }
            None => {
                self.durable.acks.push((product, id));
                self.durable.since.get_or_insert_with(Instant::now);
            }
        }
    }

    fn take(&mut self, m: WriterMsg) {
        match m {
            WriterMsg::Records(records) => {
                self.h.queued_records.fetch_sub(records.len() as u64, Ordering::Relaxed);
                for Offered { product, created, json } in records {
                    let Some(f) = self.forming.get_mut(product) else {
                        continue;
                    };
                    if f.1.is_empty() {
                        f.0 = created;
                        self.touched.push(product);
                    }
                    f.1.push(json);
                }
            }
            WriterMsg::Acks(acks) => {
                for (product, id) in acks {
                    self.acked(product, id);
                }
            }
            WriterMsg::GapAck(id) => {
                self.durable.gap_acks.push(id);
                self.durable.since.get_or_insert_with(Instant::now);
            }
            WriterMsg::DeadLetter { product, id, reason } => {
                // A staged message is committed and moved to the dead letters in the same commit.
                self.durable.dead_letters.push((product, id, reason));
                self.durable.since.get_or_insert_with(Instant::now);
            }
            WriterMsg::MergeBacklog {
                product,
                through,
                token,
            } => {
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
            WriterMsg::Products {
                products,
                counters,
                treatments,
            } => self.reconfigure(products, counters, treatments),
        }
    }

    /// A reload: the slots keep their places (a removed product's slot stays while its backlog
    /// drains), changed ones take their new topic, version, limits and governance, new ones are
    /// appended and get their first block of seqs with the next commit.
    fn reconfigure(
        &mut self,
        products: Vec<ProductSlot>,
        counters: super::Counters,
        treatments: Vec<(String, crate::govern::Treatment)>,
    ) {
        let now = Instant::now();
        for (i, slot) in products.iter().enumerate() {
            let key = match self.keys.get(i) {
                Some(&key) => key,
                None => {
                    let key = self.store.key(&slot.id);
                    self.keys.push(key);
                    self.slot_of.insert(key, i);
                    self.forming.push((0, Vec::new()));
                    self.blocks
                        .push((BLOCK_MIN, now.checked_sub(BLOCK_TARGET).unwrap_or(now)));
                    self.stretches.push(Stretch::default());
                    self.eligible.push(None);
                    key
                }
            };
            self.store.set_limits(key, slot.limits.clone());
        }
        if products.len() >= self.products.len() && counters.len() >= products.len() {
            self.products = products;
            self.h.counters = counters;
        }
        if !treatments.is_empty() {
            if let Err(e) = self
                .store
                .record_treatments(treatments.iter().map(|(name, t)| (name.as_str(), t)))
            {
                warn!(error = %e, "cannot store the reloaded governance treatments yet; the next commit that works does");
            }
        }
    }

    /// Groups the round's records into messages, numbers and stages them. True if any was formed.
    fn form(&mut self) -> Result<bool, BufferError> {
        if self.touched.is_empty() {
            return Ok(false);
        }
        let max_bytes = self.opts.max_message_bytes;
        let mut formed: Vec<(usize, u64, u32, Vec<u8>)> = Vec::new();
        for i in std::mem::take(&mut self.touched) {
            let (created, records) = std::mem::take(&mut self.forming[i]);
            let max_records = self.products[i]
                .max_records
                .map_or(self.opts.max_records_per_message, |m| {
                    m.min(self.opts.max_records_per_message)
                });
            let mut body: Vec<u8> = Vec::new();
            let mut n = 0u32;
            for json in records {
                if n > 0 && (n as usize >= max_records || body.len() + json.len() + 2 > max_bytes) {
                    body.push(b']');
                    formed.push((i, created, n, std::mem::take(&mut body)));
                    n = 0;
                }
                body.push(if n == 0 { b'[' } else { b',' });
                body.extend(json);
                n += 1;
            }
            if n > 0 {
                body.push(b']');
                formed.push((i, created, n, body));
            }
        }
        // Seqs first: a product that would run out gets more in one commit before any is used.
        let mut need: HashMap<usize, u64> = HashMap::new();
        for f in &formed {
            *need.entry(f.0).or_default() += 1;
        }
        let short: Vec<(usize, u64)> = need
            .into_iter()
            .filter(|&(i, n)| self.store.reserved_left(self.keys[i]) < n)
            .collect();
        if !short.is_empty() {
            self.commit(false, &short)?;
        }
        // Read before numbering: a message formed while the upstream is down, in a session that
        // has not connected since, has not been sent (see `committed`).
        let session = self.h.stats.upstream_sessions.load(Ordering::SeqCst);
        let down = !self.h.stats.upstream_connected.load(Ordering::SeqCst);
        let now = Instant::now();
        let mut live = Vec::new();
        let (mut records, mut messages) = (0u64, 0u64);
        for (i, created, n, body) in formed {
            let key = self.keys[i];
            let id = match self.store.number(key) {
                Some(id) => id,
                None => {
                    self.commit(false, &[(i, 1)])?;
                    if self.degraded.is_some() && self.store.reserved_left(key) == 0 {
                        // Storage is failing: live data goes on with seqs reserved in memory
                        // only (see `Store::reserve_in_memory`).
                        self.store.reserve_in_memory(key, self.blocks[i].0);
                    }
                    self.store.number(key).ok_or_else(|| BufferError::Storage {
                        path: Default::default(),
                        source: redb::Error::Corrupted("no seq could be reserved".into()),
                    })?
                }
            };
            let slot = &self.products[i];
            let msg = Arc::new(StoredMessage {
                product: key,
                name: self.store.name(key),
                id,
                created,
                records: n,
                topic: slot.topic.clone(),
                version: slot.version.clone(),
                governance: slot.governance,
                last_seq: id.seq,
                body,
            });
            self.staged_bytes += msg.body.len();
            self.order.push_back((now, key, id));
            if !self.opts.commit_before_send {
                live.push(msg.clone());
            }
            self.staged.insert(
                (key, id),
                Staged {
                    msg,
                    down_in: down.then_some(session),
                },
            );
            records += u64::from(n);
            messages += 1;
        }
        let s = &self.h.stats;
        s.accepted_records.fetch_add(records, Ordering::Relaxed);
        s.accepted_messages.fetch_add(messages, Ordering::Relaxed);
        self.live.stage(live);
        Ok(true)
    }

    /// When the oldest staged message was numbered (skipping those acknowledged since).
    fn oldest_staged(&mut self) -> Option<Instant> {
        while let Some(&(t, p, id)) = self.order.front() {
            if self.staged.contains_key(&(p, id)) {
                return Some(t);
            }
            self.order.pop_front();
        }
        None
    }

    /// When the writer must look again, at the latest (a commit may be due then).
    fn deadline(&mut self) -> Instant {
        let interval = self.opts.commit_interval;
        if let Some(d) = &self.degraded {
            return d.retry_at.min(Instant::now() + interval.max(Duration::from_millis(50)));
        }
        let mut at = self.last_settle + interval.max(Duration::from_millis(50));
        if let Some(t) = self.oldest_staged() {
            at = at.min(t + interval);
        }
        if let Some(t) = self.durable.since {
            at = at.min(t + interval);
        }
        if !self.jobs.is_empty() || !self.done.is_empty() {
            at = at.min(self.last_commit + interval);
        }
        at
    }

    fn due(&mut self, now: Instant) -> bool {
        let interval = self.opts.commit_interval;
        if let Some(d) = &self.degraded {
            return now >= d.retry_at;
        }
        if self.staged_bytes > self.opts.max_staged_bytes
            || self.oldest_staged().is_some_and(|t| now >= t + interval)
            || self.durable.since.is_some_and(|t| now >= t + interval)
            || ((!self.jobs.is_empty() || !self.done.is_empty()) && now >= self.last_commit + interval)
        {
            return true;
        }
        if now >= self.last_settle + interval.max(Duration::from_millis(50)) {
            self.last_settle = now;
            return self.needs_settle();
        }
        false
    }

    /// Something refused records since the last commit, a blocked product has room again, or a
    /// blocked stretch is ready to report.
    fn needs_settle(&self) -> bool {
        let h = &self.h;
        (0..self.products.len()).any(|i| {
            let st = &self.stretches[i];
            (h.counters[i].blocked.load(Ordering::Relaxed) && self.store.has_room(self.keys[i]))
                || h.counters[i].lost.load(Ordering::Relaxed) > 0
                || h.counters[i].overloaded.load(Ordering::Relaxed) > 0
                || h.counters[i].violations.load(Ordering::Relaxed) > 0
                || ((st.records > 0 || st.seqs.is_some())
                    && (!h.counters[i].blocked.load(Ordering::Relaxed)
                        || st.since.is_some_and(|t| t.elapsed() >= STRETCH_REPORT)))
        })
    }

    /// Tells the publisher there is something new (staged messages, acknowledgements applied).
    /// The generation moves only when every acknowledgement taken so far is in effect.
    fn signal(&mut self) {
        if self.durable.is_empty() {
            self.h.stats.generation.fetch_add(1, Ordering::Relaxed);
        }
        self.h
            .stats
            .staged_messages
            .store(self.staged.len() as u64, Ordering::Relaxed);
        self.signals += 1;
        let _ = self.notify.send(self.signals);
    }

    /// One group commit: every staged message, the durable work, the counts to settle, and more
    /// seqs for the products in `short` (and for any whose reservation runs low).
    fn commit(&mut self, closing: bool, short: &[(usize, u64)]) -> Result<(), BufferError> {
        if let Some(d) = &self.degraded {
            if !closing && Instant::now() < d.retry_at {
                return Ok(());
            }
            // redb refuses every transaction after a failed write until the file is reopened.
            if let Err(e) = self.store.reopen() {
                if closing {
                    return Err(e);
                }
                self.failed(e);
                return Ok(());
            }
        }
        let durable = std::mem::take(&mut self.durable);
        let mut batch = Batch {
            acks: durable.acks,
            gap_acks: durable.gap_acks,
            dead_letters: durable.dead_letters,
            release: closing,
            ..Default::default()
        };
        // Staged messages that have waited half the interval, oldest first (so each product's in id
        // order, a prefix of its staged ones). Younger ones stay staged while the upstream is up:
        // they are most likely acknowledged before their own commit is due, and writing them now
        // would only make their acknowledgements the next commit's work, and so on. With the
        // upstream down nothing will be acknowledged: all go (and all go when memory is the reason).
        // A staged message the broker refused must be stored by the commit that dead-letters it.
        let refused = batch
            .dead_letters
            .iter()
            .any(|(p, id, _)| self.staged.contains_key(&(*p, *id)));
        // With `write = "always"` nothing is sent before its commit, so nothing is acknowledged
        // before it either: all go too.
        let all = closing
            || refused
            || self.opts.commit_before_send
            || self.staged_bytes > self.opts.max_staged_bytes
            || !self.h.stats.upstream_connected.load(Ordering::SeqCst);
        let now = Instant::now();
        let half = self.opts.commit_interval / 2;
        let mut through: HashMap<ProductKey, MessageId> = HashMap::new();
        let mut down_in: HashMap<(ProductKey, MessageId), u64> = HashMap::new();
        while let Some(&(t, p, id)) = self.order.front() {
            if !all && t + half > now {
                break;
            }
            self.order.pop_front();
            if let Some(s) = self.staged.remove(&(p, id)) {
                self.staged_bytes = self.staged_bytes.saturating_sub(s.msg.body.len());
                through.insert(p, id);
                if let Some(session) = s.down_in {
                    down_in.insert((p, id), session);
                }
                batch.numbered.push(s.msg);
            }
        }
        // What stays staged is not sealed: a crash now may lose it. (A map: thousands of
        // products may each have a message staged.)
        let mut unsealed: HashMap<ProductKey, u64> = HashMap::new();
        for (p, id) in self.staged.keys() {
            let lowest = unsealed.entry(*p).or_insert(id.seq);
            *lowest = (*lowest).min(id.seq);
        }
        batch.unsealed.extend(unsealed);
        batch.acks.append(&mut self.recheck);
        batch.refused.append(&mut self.carried.0);
        batch.refused_seqs.append(&mut self.carried.1);
        let spilled = batch.numbered.len() as u64;
        if let Some(first) = batch.numbered.first() {
            tracing::debug!(
                messages = spilled,
                oldest_ms = crate::model::now_millis().saturating_sub(first.created),
                "committing messages the broker has not acknowledged"
            );
        }
        self.settle(&mut batch, closing);
        if !closing {
            self.reserve(&mut batch, short);
        }
        let merging = self.merge_work(&mut batch);
        let empty = batch.numbered.is_empty()
            && batch.appends.is_empty()
            && batch.acks.is_empty()
            && batch.gap_acks.is_empty()
            && batch.refused.is_empty()
            && batch.refused_seqs.is_empty()
            && batch.dead_letters.is_empty()
            && batch.merges.is_empty()
            && batch.reserve.is_empty()
            && merging.is_empty()
            && !closing;
        // While degraded even an empty commit goes ahead: it is the probe that storage works again.
        if empty && self.degraded.is_none() {
            // Nothing to write (a merge whose read failed, say): look again after an interval,
            // not at once.
            self.last_commit = Instant::now();
            return Ok(());
        }
        let taken = Taken {
            numbered: batch.numbered.clone(),
            down_in: down_in.clone(),
            acks: batch.acks.clone(),
            gap_acks: batch.gap_acks.clone(),
            dead_letters: batch.dead_letters.clone(),
            refused: batch.refused.clone(),
            refused_seqs: batch.refused_seqs.clone(),
        };
        let done = match self.store.commit(batch) {
            Ok(done) => done,
            Err(e) if closing => {
                error!(error = %e, "the last buffer commit failed: what it held is lost (the next start announces it)");
                return Err(e);
            }
            Err(e) => {
                self.put_back(taken);
                // Merges are an optimisation: those under way are given up, not waited for.
                if let Ok(mut merged) = self.h.stats.merged.lock() {
                    merged.extend(merging);
                }
                self.jobs.clear();
                self.failed(e);
                self.signal();
                return Ok(());
            }
        };
        if self.degraded.take().is_some() {
            self.put_back.clear();
            self.h.stats.degraded.store(false, Ordering::SeqCst);
            if let Ok(mut reason) = self.h.stats.storage_error.lock() {
                *reason = None;
            }
            info!(messages = spilled, "buffer storage works again: commits resumed");
        }
        self.last_commit = Instant::now();
        let through: Vec<(ProductKey, MessageId)> = through.into_iter().collect();
        let s = &self.h.stats;
        s.commits.fetch_add(1, Ordering::Relaxed);
        s.written_messages.fetch_add(spilled, Ordering::Relaxed);
        // Eligible for a backlog merge: formed while the upstream was down, in a session that has
        // not connected since (so never sent), and now committed.
        let session = s.upstream_sessions.load(Ordering::SeqCst);
        for (p, id, _) in &done.appended {
            if down_in.get(&(*p, *id)) == Some(&session) {
                if let Some(&i) = self.slot_of.get(p) {
                    self.eligible[i].get_or_insert(*id);
                }
            }
        }
        // Only now, with the commit returned: readers find them in redb from here on.
        self.live.committed(&through);
        if let Ok(mut merged) = s.merged.lock() {
            for (p, token) in merging {
                merged.insert(p, token);
            }
        }
        s.pending_gaps
            .fetch_add((done.gaps.len() + done.crashed.len()) as u64, Ordering::Relaxed);
        for g in &done.crashed {
            warn!(product = %g.product, epoch = g.epoch, from_seq = g.from_seq, to_seq = g.to_seq,
                "the last run stopped without a clean shutdown: these seqs were numbered but neither committed nor seen acknowledged (each delivered or lost); crash gap event recorded");
        }
        let _ = s.pending_gaps.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |g| {
            Some(g.saturating_sub(done.gaps_deleted as u64))
        });
        let dropped: u64 = done.gaps.iter().map(|(_, g)| g.count).sum();
        if dropped > 0 {
            s.dropped_records.fetch_add(dropped, Ordering::Relaxed);
            for (_, g) in &done.gaps {
                warn!(product = %g.product, epoch = g.epoch, from_seq = g.from_seq, to_seq = g.to_seq, records = g.count, reason = %g.reason, "records dropped; gap event recorded");
            }
        }
        for p in &done.now_blocked {
            if let Some(&i) = self.slot_of.get(p) {
                if !self.h.counters[i].blocked.swap(true, Ordering::Relaxed) {
                    warn!(product = %self.products[i].id, "buffer share full: product blocked until the backlog drains");
                }
            }
        }
        for (p, records) in &done.blocked_records {
            if let Some(&i) = self.slot_of.get(p) {
                let st = &mut self.stretches[i];
                st.records += records;
                st.since.get_or_insert_with(Instant::now);
            }
        }
        for &(p, seq, records) in &done.blocked_seqs {
            let Some(&i) = self.slot_of.get(&p) else { continue };
            let st = &mut self.stretches[i];
            match st.seqs {
                Some((from, to)) if to + 1 == seq => st.seqs = Some((from, seq)),
                Some(range) => {
                    // Not contiguous (a message in between was stored): the earlier part is
                    // reported on its own at the next commit.
                    self.durable.since.get_or_insert_with(Instant::now);
                    let earlier = std::mem::take(&mut st.records);
                    st.seqs = Some((seq, seq));
                    self.stretch_parts.push((p, range, earlier));
                }
                None => st.seqs = Some((seq, seq)),
            }
            st.records += records;
            st.since.get_or_insert_with(Instant::now);
        }
        self.publish_stats();
        self.signal();
        Ok(())
    }

    /// A commit failed (disk full, I/O error, read-only file system): live data goes on from
    /// memory, the commit is retried with backoff, and `/health` says why.
    fn failed(&mut self, e: BufferError) {
        let s = &self.h.stats;
        s.failed_commits.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut reason) = s.storage_error.lock() {
            *reason = Some(e.to_string());
        }
        let delay = match &self.degraded {
            Some(d) => (d.delay * 2).min(RETRY_MAX),
            None => {
                s.degraded.store(true, Ordering::SeqCst);
                error!(error = %e, "buffer commit failed: running degraded (live data is sent from memory, nothing new is made durable); retrying");
                RETRY_MIN
            }
        };
        tracing::debug!(retry_in = ?delay, error = %e, "buffer commit failed");
        self.degraded = Some(Degraded {
            retry_at: Instant::now() + delay,
            delay,
        });
    }

    /// Puts back what a failed commit had taken: its messages staged again (oldest first, due
    /// at once), its durable work and its gap events for the next commit.
    fn put_back(&mut self, t: Taken) {
        let due = Instant::now()
            .checked_sub(self.opts.commit_interval)
            .unwrap_or_else(Instant::now);
        for m in t.numbered.into_iter().rev() {
            let key = (m.product, m.id);
            self.put_back.insert(key);
            self.staged_bytes += m.body.len();
            self.order.push_front((due, m.product, m.id));
            self.staged.insert(
                key,
                Staged {
                    down_in: t.down_in.get(&key).copied(),
                    msg: m,
                },
            );
        }
        self.durable.acks.extend(t.acks);
        self.durable.gap_acks.extend(t.gap_acks);
        self.durable.dead_letters.extend(t.dead_letters);
        self.durable.since.get_or_insert(due);
        self.carried.0.extend(t.refused);
        self.carried.1.extend(t.refused_seqs);
    }

    /// While storage fails, memory holds what is not acknowledged: beyond `max_staged_bytes`
    /// the oldest messages are dropped (down to three quarters), each reported as a
    /// `storage_unavailable` gap event once a commit works again.
    fn shed(&mut self) {
        let mut gone = Vec::new();
        while self.staged_bytes > self.opts.max_staged_bytes / 4 * 3 {
            let Some((_, p, id)) = self.order.pop_front() else {
                break;
            };
            let Some(s) = self.staged.remove(&(p, id)) else {
                continue;
            };
            self.staged_bytes = self.staged_bytes.saturating_sub(s.msg.body.len());
            self.carried.1.push((
                p,
                (id.seq, s.msg.last_seq),
                u64::from(s.msg.records),
                GapReason::StorageUnavailable,
            ));
            gone.push((p, id));
        }
        if !gone.is_empty() {
            self.h
                .stats
                .shed_messages
                .fetch_add(gone.len() as u64, Ordering::Relaxed);
            warn!(messages = gone.len(), "storage failing and nothing acknowledged: oldest messages dropped from memory (storage_unavailable gap events follow once storage works)");
            self.live.unstage(&gone);
        }
    }

    /// Settles what was refused since the last commit into `batch` (`closing`: every stretch
    /// ends now), and unblocks `block` products with room again.
    fn settle(&mut self, batch: &mut Batch, closing: bool) {
        for (p, seqs, records) in self.stretch_parts.drain(..) {
            batch
                .refused_seqs
                .push((p, seqs, records, GapReason::BufferFullBlocked));
        }
        for i in 0..self.products.len() {
            let key = self.keys[i];
            let h = &self.h;
            // A blocked product unblocks once half its share is free; what it did not take
            // meanwhile becomes one gap event.
            if h.counters[i].blocked.load(Ordering::Relaxed) && self.store.has_room(key) {
                h.counters[i].blocked.store(false, Ordering::Relaxed);
                info!(product = %self.products[i].id, "buffer share has room again: product unblocked");
            }
            let lost = h.counters[i].lost.swap(0, Ordering::Relaxed);
            let st = &mut self.stretches[i];
            if lost > 0 {
                st.records += lost;
                st.since.get_or_insert_with(Instant::now);
            }
            let over = st.since.is_some_and(|t| t.elapsed() >= STRETCH_REPORT);
            let open = st.records > 0 || st.seqs.is_some();
            if open && (closing || over || !h.counters[i].blocked.load(Ordering::Relaxed)) {
                match st.seqs {
                    Some(seqs) => batch
                        .refused_seqs
                        .push((key, seqs, st.records, GapReason::BufferFullBlocked)),
                    None => batch.refused.push((key, st.records, GapReason::BufferFullBlocked)),
                }
                *st = Stretch::default();
            }
            let overloaded = h.counters[i].overloaded.swap(0, Ordering::Relaxed);
            if overloaded > 0 {
                batch.refused.push((key, overloaded, GapReason::WriterOverload));
            }
            let violations = h.counters[i].violations.swap(0, Ordering::Relaxed);
            if violations > 0 {
                batch.refused.push((key, violations, GapReason::ContractViolation));
            }
        }
    }

    /// More seqs for the products in `short` (`(slot, seqs needed now)`), and, while committing
    /// anyway, for every product whose reservation is below half a block: reservations then come
    /// due together, one commit for all. A block that lasted less than [`BLOCK_TARGET`] doubles.
    fn reserve(&mut self, batch: &mut Batch, short: &[(usize, u64)]) {
        let now = Instant::now();
        let short: HashMap<usize, u64> = short.iter().copied().collect();
        for i in 0..self.products.len() {
            let key = self.keys[i];
            let need = short.get(&i).copied();
            let left = self.store.reserved_left(key);
            let (block, raised) = &mut self.blocks[i];
            if need.is_none() && left >= *block / 2 {
                continue;
            }
            if need.is_some() && now.duration_since(*raised) < BLOCK_TARGET {
                *block = (*block * 2).min(BLOCK_MAX);
            }
            *raised = now;
            batch.reserve.push((key, (*block).max(need.unwrap_or(0) * 2)));
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
            let max_records = slot.max_records.map_or(self.opts.max_records_per_message, |m| {
                m.min(self.opts.max_records_per_message)
            });
            // Just before `from`: messages are keyed by (epoch, seq).
            let after = job.after.or(Some(if job.from.seq > 0 {
                MessageId {
                    epoch: job.from.epoch,
                    seq: job.from.seq - 1,
                }
            } else {
                MessageId {
                    epoch: job.from.epoch.saturating_sub(1),
                    seq: u64::MAX,
                }
            }));
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
                let fits =
                    records + m.records as usize <= max_records && bytes + m.body.len() < self.opts.max_message_bytes;
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
    }
}
