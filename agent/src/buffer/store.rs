//! The redb store: per-product queues of numbered messages, gap events and drop counters.
//!
//! Tables (all keys big-endian-ordered by redb's tuple encoding):
//! - `meta`: `"epoch"` -> the epoch of the current open (bumped by every open, persisted before use).
//! - `messages`: `(product, epoch, seq)` -> message (header + records JSON, see [`StoredMessage`]).
//! - `gaps`: `id` -> gap event, until the broker has acknowledged it.
//! - `drops`: `(product, reason)` -> records dropped so far (never decreases).
//! - `treatments`: `(product, fingerprint)` -> each governance treatment the product has run under
//!   ([`crate::govern::Treatment`]); messages carry the fingerprint of theirs.
//!
//! Invariants: `seq` starts at 1 in every epoch and grows by one per message, whether the message
//! is stored or dropped; every message dropped is covered by a gap event written in the same
//! transaction, so a consumer can prove completeness from seq continuity plus gap events.
//! A commit returns only after redb's `Durability::Immediate` commit (fsync) has returned.

use super::message::PER_MESSAGE_OVERHEAD;
pub use super::message::{MessageId, NewMessage, StoredMessage};
use super::{GapReason, Keys, ProductKey};
use crate::config::FullPolicy;
use crate::model::Millis;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const MESSAGES: TableDefinition<(&str, u64, u64), &[u8]> = TableDefinition::new("messages");
const GAPS: TableDefinition<u64, &[u8]> = TableDefinition::new("gaps");
const DROPS: TableDefinition<(&str, &str), u64> = TableDefinition::new("drops");
const DEAD: TableDefinition<(&str, u64, u64), &[u8]> = TableDefinition::new("dead_letters");
const TREATMENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("treatments");

#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error("buffer storage error in {path}: {source}; stopping: nothing more can be accepted safely")]
    Storage { path: PathBuf, source: redb::Error },
    #[error("cannot move the corrupt buffer {path} aside: {source}")]
    MoveAside { path: PathBuf, source: std::io::Error },
}

/// Records lost before or at the buffer, as reported upstream on `_gaps`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GapEvent {
    pub product: String,
    pub epoch: u64,
    pub from_seq: u64,
    pub to_seq: u64,
    /// Records lost.
    pub count: u64,
    pub reason: GapReason,
    /// When the agent recorded the gap (ms since the Unix epoch).
    pub ts: Millis,
    /// Topic the gap event goes to.
    pub topic: String,
}

/// How a product may use the buffer.
#[derive(Debug, Clone)]
pub struct ProductLimits {
    pub max_bytes: u64,
    pub policy: FullPolicy,
    /// Topic of the product's gap events.
    pub gap_topic: String,
}

/// Everything one group commit does, in one write transaction.
#[derive(Debug, Default)]
pub struct Batch {
    pub appends: Vec<NewMessage>,
    pub acks: Vec<(ProductKey, MessageId)>,
    pub gap_acks: Vec<u64>,
    /// Messages the broker refused (MQTT 5 reason code >= 0x80): moved to `dead_letters`.
    pub dead_letters: Vec<(ProductKey, MessageId, GapReason)>,
    /// Runs of consecutive backlog messages to merge into one before their first send (each run
    /// becomes one message at its first id, standing for all their seqs).
    pub merges: Vec<(ProductKey, Vec<MessageId>)>,
    /// Records refused before they reached a message: `(product, count, reason)`; reasons are
    /// `buffer_full_blocked` (a `block` product while full), `writer_overload` (the writer was
    /// too far behind to queue more) and `contract_violation`.
    pub refused: Vec<(ProductKey, u64, GapReason)>,
}

/// What a commit did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Committed {
    /// Messages stored: product, id, records.
    pub appended: Vec<(ProductKey, MessageId, u32)>,
    /// Gap events written: `(gap id, event)`.
    pub gaps: Vec<(u64, GapEvent)>,
    pub deleted: usize,
    /// Gap events deleted (acknowledged upstream).
    pub gaps_deleted: usize,
    /// Merged messages written (each from a run of `Batch::merges`).
    pub merged: usize,
    /// Products whose `block` share is now full (they stop taking records).
    pub now_blocked: Vec<ProductKey>,
    /// Records of `block` products not taken because their share was full: `(product, records)`,
    /// without a gap event yet (the writer reports a blocked stretch as one).
    pub blocked_records: Vec<(ProductKey, u64)>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Queue {
    bytes: u64,
    messages: u64,
    next_seq: u64,
}

/// What `open` found.
#[derive(Debug)]
pub struct OpenReport {
    pub epoch: u64,
    pub pending_messages: u64,
    pub pending_bytes: u64,
    /// Set when a corrupt file was moved aside and a fresh buffer started.
    pub moved_aside: Option<PathBuf>,
}

pub struct Store {
    db: Arc<Database>,
    path: PathBuf,
    epoch: u64,
    max_bytes: u64,
    total_bytes: u64,
    queues: HashMap<ProductKey, Queue>,
    sizes: HashMap<(ProductKey, MessageId), u64>,
    limits: HashMap<ProductKey, ProductLimits>,
    keys: Keys,
    next_gap: u64,
}

/// Errors that mean "this file is not a usable buffer" (as opposed to an I/O failure of the disk).
fn is_corrupt(e: &redb::DatabaseError) -> bool {
    match e {
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(_)) | redb::DatabaseError::UpgradeRequired(_) => {
            true
        }
        redb::DatabaseError::Storage(redb::StorageError::Io(io)) => io.kind() == std::io::ErrorKind::InvalidData,
        _ => false,
    }
}

fn storage<E: Into<redb::Error>>(path: &Path) -> impl FnOnce(E) -> BufferError + '_ {
    move |e| BufferError::Storage {
        path: path.to_path_buf(),
        source: e.into(),
    }
}

impl Store {
    /// Opens (or creates) the buffer, bumps and persists the epoch, and scans what is pending.
    /// A file that redb cannot open as a database is moved aside (`<name>.corrupt-<ms>`) and a fresh
    /// buffer is started: the agent must come back without a human deleting files.
    pub fn open(path: &Path, max_bytes: u64, cache_bytes: usize) -> Result<(Store, OpenReport), BufferError> {
        let builder = || {
            let mut b = Database::builder();
            b.set_cache_size(cache_bytes);
            b
        };
        let mut moved_aside = None;
        let db = match builder().create(path) {
            Ok(db) => db,
            Err(e) if is_corrupt(&e) => {
                let aside = path.with_extension(format!("redb.corrupt-{}", crate::model::now_millis()));
                tracing::error!(path = %path.display(), moved_to = %aside.display(), error = %e,
                    "buffer file is corrupt; moving it aside and starting an empty buffer (its messages are not replayed)");
                std::fs::rename(path, &aside).map_err(|source| BufferError::MoveAside {
                    path: path.to_path_buf(),
                    source,
                })?;
                moved_aside = Some(aside);
                builder().create(path).map_err(storage(path))?
            }
            Err(e) => return Err(storage(path)(e)),
        };
        let mut store = Store {
            db: Arc::new(db),
            path: path.to_path_buf(),
            epoch: 0,
            max_bytes,
            total_bytes: 0,
            queues: HashMap::new(),
            sizes: HashMap::new(),
            limits: HashMap::new(),
            keys: Keys::default(),
            next_gap: 1,
        };
        let mut tx = store.db.begin_write().map_err(storage(path))?;
        tx.set_durability(redb::Durability::Immediate)
            .map_err(|e| storage(path)(redb::Error::from(e)))?;
        {
            let mut meta = tx.open_table(META).map_err(storage(path))?;
            let epoch = meta.get("epoch").map_err(storage(path))?.map_or(0, |v| v.value()) + 1;
            meta.insert("epoch", epoch).map_err(storage(path))?;
            store.epoch = epoch;
            tx.open_table(MESSAGES).map_err(storage(path))?;
            tx.open_table(DROPS).map_err(storage(path))?;
            tx.open_table(DEAD).map_err(storage(path))?;
            tx.open_table(TREATMENTS).map_err(storage(path))?;
            let gaps = tx.open_table(GAPS).map_err(storage(path))?;
            store.next_gap = gaps.last().map_err(storage(path))?.map_or(1, |(k, _)| k.value() + 1);
        }
        tx.commit().map_err(storage(path))?;
        // Scan what is pending to rebuild the byte accounting.
        let rx = store.db.begin_read().map_err(storage(path))?;
        let table = rx.open_table(MESSAGES).map_err(storage(path))?;
        for entry in table.iter().map_err(storage(path))? {
            let (k, v) = entry.map_err(storage(path))?;
            let (product, epoch, seq) = k.value();
            let id = MessageId { epoch, seq };
            let size = v.value().len() as u64 + product.len() as u64 + PER_MESSAGE_OVERHEAD;
            let key = store.keys.intern(product);
            let q = store.queues.entry(key).or_default();
            q.bytes += size;
            q.messages += 1;
            store.total_bytes += size;
            store.sizes.insert((key, id), size);
        }
        for q in store.queues.values_mut() {
            q.next_seq = 1;
        }
        let report = OpenReport {
            epoch: store.epoch,
            pending_messages: store.queues.values().map(|q| q.messages).sum(),
            pending_bytes: store.total_bytes,
            moved_aside,
        };
        Ok((store, report))
    }

    /// Opens an existing buffer for reading only (the `buffer` command; the agent must not be running).
    pub fn open_reader(path: &Path) -> Result<Reader, BufferError> {
        let db = Database::builder().open(path).map_err(storage(path))?;
        Ok(Reader {
            db: Arc::new(db),
            path: path.to_path_buf(),
            keys: Keys::default(),
        })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn reader(&self) -> Reader {
        Reader {
            db: self.db.clone(),
            path: self.path.clone(),
            keys: self.keys.clone(),
        }
    }

    /// The key of a product version's name (`{id}.v{major}`), shared with every reader.
    pub fn key(&self, name: &str) -> ProductKey {
        self.keys.intern(name)
    }

    /// Keeps the governance treatment each product runs under now (those already kept stay), so
    /// that its messages can be judged against later rules. Durable before it returns.
    pub fn record_treatments<'a>(
        &mut self,
        treatments: impl IntoIterator<Item = (&'a str, &'a crate::govern::Treatment)>,
    ) -> Result<(), BufferError> {
        let path = &self.path;
        let mut tx = self.db.begin_write().map_err(storage(path))?;
        tx.set_durability(redb::Durability::Immediate)
            .map_err(|e| storage(path)(redb::Error::from(e)))?;
        {
            let mut table = tx.open_table(TREATMENTS).map_err(storage(path))?;
            for (name, t) in treatments {
                let key = (name, t.fingerprint());
                if table.get(key).map_err(storage(path))?.is_none() {
                    table.insert(key, t.bytes()).map_err(storage(path))?;
                }
            }
        }
        tx.commit().map_err(storage(path))
    }

    pub fn set_limits(&mut self, product: ProductKey, limits: ProductLimits) {
        self.limits.insert(product, limits);
    }

    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Pending messages and bytes of one product.
    pub fn depth(&self, product: ProductKey) -> (u64, u64) {
        self.queues.get(&product).map_or((0, 0), |q| (q.messages, q.bytes))
    }

    /// Products with pending messages.
    pub fn products(&self) -> Vec<ProductKey> {
        let mut v: Vec<ProductKey> = self
            .queues
            .iter()
            .filter(|(_, q)| q.messages > 0)
            .map(|(p, _)| *p)
            .collect();
        v.sort();
        v
    }

    /// Applies one group commit atomically and durably.
    pub fn commit(&mut self, batch: Batch) -> Result<Committed, BufferError> {
        let path = self.path.clone();
        let mut out = Committed::default();
        // Work on copies of the accounting so a failed commit leaves memory matching the file.
        let mut queues = self.queues.clone();
        let mut total = self.total_bytes;
        let mut size_changes: Vec<((ProductKey, MessageId), Option<u64>)> = Vec::new();
        let mut next_gap = self.next_gap;
        let now = crate::model::now_millis();

        let mut tx = self.db.begin_write().map_err(storage(&path))?;
        tx.set_durability(redb::Durability::Immediate)
            .map_err(|e| storage(&path)(redb::Error::from(e)))?;
        {
            let mut messages = tx.open_table(MESSAGES).map_err(storage(&path))?;
            let mut gaps = tx.open_table(GAPS).map_err(storage(&path))?;
            let mut drops = tx.open_table(DROPS).map_err(storage(&path))?;
            let sizes = &self.sizes;
            let size_of =
                |changes: &Vec<((ProductKey, MessageId), Option<u64>)>, key: &(ProductKey, MessageId)| -> Option<u64> {
                    match changes.iter().rev().find(|(k, _)| k == key) {
                        Some((_, s)) => *s,
                        None => sizes.get(key).copied(),
                    }
                };

            for &(product, id) in &batch.acks {
                let key = (product, id);
                let name = self.keys.name(product);
                if messages
                    .remove((&*name, id.epoch, id.seq))
                    .map_err(storage(&path))?
                    .is_some()
                {
                    let size = size_of(&size_changes, &key).unwrap_or(0);
                    let q = queues.entry(product).or_default();
                    q.bytes = q.bytes.saturating_sub(size);
                    q.messages = q.messages.saturating_sub(1);
                    total = total.saturating_sub(size);
                    size_changes.push((key, None));
                    out.deleted += 1;
                }
            }
            for id in &batch.gap_acks {
                if gaps.remove(*id).map_err(storage(&path))?.is_some() {
                    out.gaps_deleted += 1;
                }
            }

            let mut record_gap = |gaps: &mut redb::Table<u64, &[u8]>,
                                  drops: &mut redb::Table<(&str, &str), u64>,
                                  ev: GapEvent|
             -> Result<(), BufferError> {
                #[allow(clippy::expect_used, reason = "a struct of strings and integers serializes")]
                let json = serde_json::to_vec(&ev).expect("gap events serialize");
                gaps.insert(next_gap, json.as_slice()).map_err(storage(&path))?;
                let prev = drops
                    .get((ev.product.as_str(), &*ev.reason.as_str()))
                    .map_err(storage(&path))?
                    .map_or(0, |v| v.value());
                drops
                    .insert((ev.product.as_str(), &*ev.reason.as_str()), prev + ev.count)
                    .map_err(storage(&path))?;
                out.gaps.push((next_gap, ev));
                next_gap += 1;
                Ok(())
            };

            for (product, id, reason) in &batch.dead_letters {
                let (product, id) = (*product, *id);
                let key = (product, id);
                let name = self.keys.name(product);
                let removed = messages
                    .remove((&*name, id.epoch, id.seq))
                    .map_err(storage(&path))?
                    .map(|v| v.value().to_vec());
                let Some(bytes) = removed else { continue };
                let decoded = StoredMessage::decode(product, &name, id, &bytes);
                let records = decoded.as_ref().map_or(0, |m| m.records);
                let mut dead = tx.open_table(DEAD).map_err(storage(&path))?;
                dead.insert((&*name, id.epoch, id.seq), bytes.as_slice())
                    .map_err(storage(&path))?;
                let size = size_of(&size_changes, &key).unwrap_or(0);
                let q = queues.entry(product).or_default();
                q.bytes = q.bytes.saturating_sub(size);
                q.messages = q.messages.saturating_sub(1);
                total = total.saturating_sub(size);
                size_changes.push((key, None));
                let last = decoded.as_ref().map_or(id.seq, |m| m.last_seq);
                let mut ev = self.gap_event(
                    product,
                    id.epoch,
                    (id.seq, last),
                    u64::from(records),
                    reason.clone(),
                    now,
                );
                if ev.topic.is_empty() {
                    // A product no longer in the config: its message still knows where it belonged.
                    ev.topic = decoded.map(|m| format!("{}/_gaps", m.topic)).unwrap_or_default();
                }
                record_gap(&mut gaps, &mut drops, ev)?;
            }

            for (product, run) in &batch.merges {
                let product = *product;
                let name = self.keys.name(product);
                let mut parts = Vec::with_capacity(run.len());
                for id in run {
                    let Some(v) = messages.get((&*name, id.epoch, id.seq)).map_err(storage(&path))? else {
                        break;
                    };
                    let Some(m) = StoredMessage::decode(product, &name, *id, v.value()) else {
                        break;
                    };
                    parts.push(m);
                }
                // Only a whole run of one stream: anything else stays as it is.
                let Some(merged) = StoredMessage::merge(&parts).filter(|_| parts.len() == run.len()) else {
                    continue;
                };
                let q = queues.entry(product).or_default();
                for m in &parts {
                    messages
                        .remove((&*name, m.id.epoch, m.id.seq))
                        .map_err(storage(&path))?;
                    let key = (product, m.id);
                    let size = size_of(&size_changes, &key).unwrap_or(0);
                    q.bytes = q.bytes.saturating_sub(size);
                    q.messages = q.messages.saturating_sub(1);
                    total = total.saturating_sub(size);
                    size_changes.push((key, None));
                }
                let size = merged.size();
                messages
                    .insert((&*name, merged.id.epoch, merged.id.seq), merged.encode().as_slice())
                    .map_err(storage(&path))?;
                q.bytes += size;
                q.messages += 1;
                total += size;
                size_changes.push(((product, merged.id), Some(size)));
                out.merged += 1;
            }

            for &(product, count, ref reason) in &batch.refused {
                let q = queues.entry(product).or_default();
                q.next_seq = q.next_seq.max(1);
                let seq = q.next_seq;
                q.next_seq += 1;
                record_gap(
                    &mut gaps,
                    &mut drops,
                    self.gap_event(product, self.epoch, (seq, seq), count, reason.clone(), now),
                )?;
            }

            for m in batch.appends {
                let name = self.keys.name(m.product);
                let limits = self.limits.get(&m.product).cloned().unwrap_or(ProductLimits {
                    max_bytes: self.max_bytes,
                    policy: FullPolicy::DropOldest,
                    gap_topic: String::new(),
                });
                let q = queues.entry(m.product).or_default();
                q.next_seq = q.next_seq.max(1);
                let id = MessageId {
                    epoch: self.epoch,
                    seq: q.next_seq,
                };
                q.next_seq += 1;
                let stored = StoredMessage {
                    product: m.product,
                    name: name.clone(),
                    id,
                    created: m.created,
                    records: m.records,
                    topic: m.topic,
                    version: m.version,
                    governance: m.governance,
                    last_seq: id.seq,
                    body: m.body,
                };
                let size = stored.size();
                let fits = |q: &Queue, total: u64| q.bytes + size <= limits.max_bytes && total + size <= self.max_bytes;

                if !fits(q, total) && limits.policy == FullPolicy::DropOldest {
                    // Delete this product's oldest messages until the new one fits.
                    let mut dropped: Vec<(MessageId, u64, u64)> = Vec::new();
                    let mut q_bytes = q.bytes;
                    let mut t = total;
                    {
                        let range = messages
                            .range((&*name, 0u64, 0u64)..=(&*name, u64::MAX, u64::MAX))
                            .map_err(storage(&path))?;
                        for entry in range {
                            if q_bytes + size <= limits.max_bytes && t + size <= self.max_bytes {
                                break;
                            }
                            let (k, v) = entry.map_err(storage(&path))?;
                            let (_, e, s) = k.value();
                            let (records, last) =
                                StoredMessage::decode(m.product, &name, MessageId { epoch: e, seq: s }, v.value())
                                    .map_or((0, s), |x| (x.records, x.last_seq));
                            let key = (m.product, MessageId { epoch: e, seq: s });
                            let sz = size_of(&size_changes, &key).unwrap_or(0);
                            q_bytes = q_bytes.saturating_sub(sz);
                            t = t.saturating_sub(sz);
                            dropped.push((MessageId { epoch: e, seq: s }, last, u64::from(records)));
                        }
                    }
                    if q_bytes + size <= limits.max_bytes && t + size <= self.max_bytes {
                        for (did, _, _) in &dropped {
                            messages.remove((&*name, did.epoch, did.seq)).map_err(storage(&path))?;
                            size_changes.push(((m.product, *did), None));
                        }
                        q.bytes = q_bytes;
                        q.messages -= dropped.len() as u64;
                        total = t;
                        // One gap event per contiguous run of seqs within an epoch.
                        let mut runs: Vec<(u64, u64, u64, u64)> = Vec::new(); // epoch, from, to, records
                        for (did, last, recs) in &dropped {
                            match runs.last_mut() {
                                Some(r) if r.0 == did.epoch && r.2 + 1 == did.seq => {
                                    r.2 = *last;
                                    r.3 += recs;
                                }
                                _ => runs.push((did.epoch, did.seq, *last, *recs)),
                            }
                        }
                        for (epoch, from, to, count) in runs {
                            record_gap(
                                &mut gaps,
                                &mut drops,
                                self.gap_event(
                                    m.product,
                                    epoch,
                                    (from, to),
                                    count,
                                    GapReason::BufferFullDropOldest,
                                    now,
                                ),
                            )?;
                        }
                    }
                }

                if fits(q, total) {
                    let bytes = stored.encode();
                    messages
                        .insert((&*name, id.epoch, id.seq), bytes.as_slice())
                        .map_err(storage(&path))?;
                    q.bytes += size;
                    q.messages += 1;
                    total += size;
                    size_changes.push(((m.product, id), Some(size)));
                    out.appended.push((m.product, id, stored.records));
                } else {
                    let reason = match limits.policy {
                        FullPolicy::Block => GapReason::BufferFullBlocked,
                        FullPolicy::RejectNew => GapReason::BufferFullRejectNew,
                        // The message alone exceeds what the product may hold, or other products fill the buffer.
                        FullPolicy::DropOldest => GapReason::BufferFull,
                    };
                    if limits.policy == FullPolicy::Block {
                        // Not taken, and no seq spent on it: the writer counts it into the product's
                        // blocked stretch, which becomes one gap event (one seq) when it ends.
                        q.next_seq -= 1;
                        if !out.now_blocked.contains(&m.product) {
                            out.now_blocked.push(m.product);
                        }
                        out.blocked_records.push((m.product, u64::from(m.records)));
                        continue;
                    }
                    record_gap(
                        &mut gaps,
                        &mut drops,
                        self.gap_event(m.product, id.epoch, (id.seq, id.seq), u64::from(m.records), reason, now),
                    )?;
                }
            }
        }
        tx.commit().map_err(storage(&path))?;
        // Durable: now make memory match.
        self.queues = queues;
        self.total_bytes = total;
        self.next_gap = next_gap;
        for (key, size) in size_changes {
            match size {
                Some(s) => {
                    self.sizes.insert(key, s);
                }
                None => {
                    self.sizes.remove(&key);
                }
            }
        }
        Ok(out)
    }

    /// A gap event for `product`, addressed to its gap topic.
    fn gap_event(
        &self,
        product: ProductKey,
        epoch: u64,
        seqs: (u64, u64),
        count: u64,
        reason: GapReason,
        ts: Millis,
    ) -> GapEvent {
        let topic = self
            .limits
            .get(&product)
            .map(|l| l.gap_topic.clone())
            .unwrap_or_default();
        GapEvent {
            product: self.keys.name(product).to_string(),
            epoch,
            from_seq: seqs.0,
            to_seq: seqs.1,
            count,
            reason,
            ts,
            topic,
        }
    }

    /// True when a `block` product has room again (half its share free, so it does not flap).
    pub fn has_room(&self, product: ProductKey) -> bool {
        let Some(l) = self.limits.get(&product) else {
            return true;
        };
        let q = self.queues.get(&product).copied().unwrap_or_default();
        q.bytes <= l.max_bytes / 2 && self.total_bytes <= self.max_bytes / 2 + self.max_bytes / 4
    }
}

/// Read access for the publisher and the `buffer` command; safe beside the writer (MVCC).
#[derive(Clone)]
pub struct Reader {
    db: Arc<Database>,
    path: PathBuf,
    keys: Keys,
}

impl Reader {
    /// The key of a product version's name (`{id}.v{major}`).
    pub fn key(&self, name: &str) -> ProductKey {
        self.keys.intern(name)
    }

    /// The name of a product key.
    pub fn name(&self, product: ProductKey) -> Arc<str> {
        self.keys.name(product)
    }

    /// Up to `limit` messages of `product` after `after` (from the start when `None`), in order.
    pub fn read_after(
        &self,
        product: ProductKey,
        after: Option<MessageId>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, BufferError> {
        let path = &self.path;
        let name = self.keys.name(product);
        let rx = self.db.begin_read().map_err(storage(path))?;
        let table = rx.open_table(MESSAGES).map_err(storage(path))?;
        let start = after.map_or((0, 0), |a| {
            if a.seq == u64::MAX {
                (a.epoch + 1, 0)
            } else {
                (a.epoch, a.seq + 1)
            }
        });
        let mut out = Vec::new();
        for entry in table
            .range((&*name, start.0, start.1)..=(&*name, u64::MAX, u64::MAX))
            .map_err(storage(path))?
        {
            if out.len() >= limit {
                break;
            }
            let (k, v) = entry.map_err(storage(path))?;
            let (_, epoch, seq) = k.value();
            let id = MessageId { epoch, seq };
            if let Some(m) = StoredMessage::decode(product, &name, id, v.value()) {
                out.push(m);
            } else {
                tracing::error!(product = %name, epoch, seq, "undecodable message in the buffer; skipping it");
            }
        }
        Ok(out)
    }

    /// The governance treatment `product` ran under when it wrote messages with `fingerprint`.
    pub fn treatment(
        &self,
        product: ProductKey,
        fingerprint: u64,
    ) -> Result<Option<crate::govern::Treatment>, BufferError> {
        let path = &self.path;
        let name = self.keys.name(product);
        let rx = self.db.begin_read().map_err(storage(path))?;
        let table = match rx.open_table(TREATMENTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(storage(path)(e)),
        };
        let found = table.get((&*name, fingerprint)).map_err(storage(path))?;
        Ok(found.map(|v| crate::govern::Treatment::from_bytes(v.value().to_vec())))
    }

    /// The newest pending message id of `product`.
    pub fn last_id(&self, product: ProductKey) -> Result<Option<MessageId>, BufferError> {
        let path = &self.path;
        let name = self.keys.name(product);
        let rx = self.db.begin_read().map_err(storage(path))?;
        let table = rx.open_table(MESSAGES).map_err(storage(path))?;
        let last = table
            .range((&*name, 0u64, 0u64)..=(&*name, u64::MAX, u64::MAX))
            .map_err(storage(path))?
            .next_back();
        Ok(match last {
            Some(entry) => {
                let (k, _) = entry.map_err(storage(path))?;
                let (_, epoch, seq) = k.value();
                Some(MessageId { epoch, seq })
            }
            None => None,
        })
    }

    /// Products that have pending messages, in name order.
    pub fn products(&self) -> Result<Vec<ProductKey>, BufferError> {
        let path = &self.path;
        let rx = self.db.begin_read().map_err(storage(path))?;
        let table = rx.open_table(MESSAGES).map_err(storage(path))?;
        let mut out: Vec<ProductKey> = Vec::new();
        let mut last = String::new();
        for entry in table.iter().map_err(storage(path))? {
            let (k, _) = entry.map_err(storage(path))?;
            let p = k.value().0;
            if out.is_empty() || last != p {
                out.push(self.keys.intern(p));
                last = p.to_string();
            }
        }
        Ok(out)
    }

    /// Pending gap events, oldest first.
    pub fn gaps(&self, limit: usize) -> Result<Vec<(u64, GapEvent)>, BufferError> {
        let path = &self.path;
        let rx = self.db.begin_read().map_err(storage(path))?;
        let table = rx.open_table(GAPS).map_err(storage(path))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(storage(path))?.take(limit) {
            let (k, v) = entry.map_err(storage(path))?;
            if let Ok(ev) = serde_json::from_slice::<GapEvent>(v.value()) {
                out.push((k.value(), ev));
            }
        }
        Ok(out)
    }

    /// Records dropped so far, by product and reason.
    pub fn drops(&self) -> Result<Vec<(String, String, u64)>, BufferError> {
        let path = &self.path;
        let rx = self.db.begin_read().map_err(storage(path))?;
        let table = rx.open_table(DROPS).map_err(storage(path))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(storage(path))? {
            let (k, v) = entry.map_err(storage(path))?;
            let (p, r) = k.value();
            out.push((p.to_string(), r.to_string(), v.value()));
        }
        Ok(out)
    }

    /// Number of pending messages in all products.
    pub fn len(&self) -> Result<u64, BufferError> {
        let path = &self.path;
        let rx = self.db.begin_read().map_err(storage(path))?;
        let table = rx.open_table(MESSAGES).map_err(storage(path))?;
        table.len().map_err(storage(path))
    }

    pub fn is_empty(&self) -> Result<bool, BufferError> {
        Ok(self.len()? == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeSet, VecDeque};

    const TOPIC: &str = "t";
    const VERSION: &str = "1.0.0";

    #[derive(Debug, Clone)]
    enum Op {
        Append { product: usize, records: u32, body: usize },
        Ack { product: usize, nth: usize },
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (0..2usize, 1..5u32, 10..400usize).prop_map(|(product, records, body)| Op::Append { product, records, body }),
            3 => (0..2usize, 0..8usize).prop_map(|(product, nth)| Op::Ack { product, nth }),
            1 => Just(Op::Reopen),
        ]
    }

    const PRODUCTS: [&str; 2] = ["alpha", "beta"];
    const POLICIES: [FullPolicy; 2] = [FullPolicy::DropOldest, FullPolicy::RejectNew];
    const SHARE: u64 = 1500;
    const TOTAL: u64 = 2400;

    fn size(product: &str, body: usize) -> u64 {
        (32 + TOPIC.len() + VERSION.len() + body + product.len()) as u64 + PER_MESSAGE_OVERHEAD
    }

    fn open(path: &Path) -> Store {
        let (mut s, _) = Store::open(path, TOTAL, 1 << 20).unwrap();
        for (p, policy) in PRODUCTS.iter().zip(POLICIES) {
            let key = s.key(p);
            s.set_limits(
                key,
                ProductLimits {
                    max_bytes: SHARE,
                    policy,
                    gap_topic: "g".into(),
                },
            );
        }
        s
    }

    /// The model: per product, the pending (id, records, size) in order; plus every seq ever assigned.
    #[derive(Default)]
    struct Model {
        epoch: u64,
        next_seq: [u64; 2],
        queues: [VecDeque<(MessageId, u32, u64)>; 2],
        acked: [BTreeSet<MessageId>; 2],
        assigned: [BTreeSet<MessageId>; 2],
        dropped_records: [u64; 2],
    }

    impl Model {
        fn total(&self) -> u64 {
            self.queues.iter().flatten().map(|m| m.2).sum()
        }
        fn bytes(&self, p: usize) -> u64 {
            self.queues[p].iter().map(|m| m.2).sum()
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]
        #[test]
        fn store_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("buffer.redb");
            let mut store = open(&path);
            let mut m = Model { epoch: 1, next_seq: [1, 1], ..Default::default() };
            for op in ops {
                match op {
                    Op::Append { product, records, body } => {
                        let name = PRODUCTS[product];
                        let id = MessageId { epoch: m.epoch, seq: m.next_seq[product] };
                        m.next_seq[product] += 1;
                        m.assigned[product].insert(id);
                        let sz = size(name, body);
                        let fits = |m: &Model| m.bytes(product) + sz <= SHARE && m.total() + sz <= TOTAL;
                        if !fits(&m) && POLICIES[product] == FullPolicy::DropOldest {
                            // Would dropping this product's oldest make room?
                            let mut k = 0;
                            let (mut pb, mut t) = (m.bytes(product), m.total());
                            while !(pb + sz <= SHARE && t + sz <= TOTAL) && k < m.queues[product].len() {
                                pb -= m.queues[product][k].2;
                                t -= m.queues[product][k].2;
                                k += 1;
                            }
                            if pb + sz <= SHARE && t + sz <= TOTAL {
                                for _ in 0..k {
                                    let (_, recs, _) = m.queues[product].pop_front().unwrap();
                                    m.dropped_records[product] += u64::from(recs);
                                }
                            }
                        }
                        if fits(&m) {
                            m.queues[product].push_back((id, records, sz));
                        } else {
                            m.dropped_records[product] += u64::from(records);
                        }
                        let new = NewMessage { product: store.key(name), created: 1, records, topic: TOPIC.into(), version: VERSION.into(), governance: 7, body: vec![b'x'; body] };
                        store.commit(Batch { appends: vec![new], ..Default::default() }).unwrap();
                    }
                    Op::Ack { product, nth } => {
                        if let Some(&(id, _, _)) = m.queues[product].get(nth) {
                            m.queues[product].remove(nth);
                            m.acked[product].insert(id);
                            let key = store.key(PRODUCTS[product]);
                            store.commit(Batch { acks: vec![(key, id)], ..Default::default() }).unwrap();
                        }
                    }
                    Op::Reopen => {
                        drop(store);
                        store = open(&path);
                        m.epoch += 1;
                        m.next_seq = [1, 1];
                        prop_assert_eq!(store.epoch(), m.epoch);
                    }
                }
                let reader = store.reader();
                for (p, name) in PRODUCTS.iter().enumerate() {
                    // Nothing accepted is lost, nothing acknowledged comes back, order is kept.
                    let got: Vec<MessageId> = reader.read_after(reader.key(name), None, 1000).unwrap().iter().map(|s| s.id).collect();
                    let want: Vec<MessageId> = m.queues[p].iter().map(|q| q.0).collect();
                    prop_assert_eq!(&got, &want);
                    prop_assert_eq!(store.depth(store.key(name)).1, m.bytes(p));
                }
                // Every drop is counted...
                let drops = reader.drops().unwrap();
                for (p, name) in PRODUCTS.iter().enumerate() {
                    let counted: u64 = drops.iter().filter(|d| d.0 == *name).map(|d| d.2).sum();
                    prop_assert_eq!(counted, m.dropped_records[p]);
                }
                // ...and gap events cover exactly the seqs neither pending nor acknowledged.
                let gaps = reader.gaps(100_000).unwrap();
                for (p, name) in PRODUCTS.iter().enumerate() {
                    let mut covered = BTreeSet::new();
                    for (_, g) in gaps.iter().filter(|g| g.1.product == *name) {
                        for seq in g.from_seq..=g.to_seq {
                            prop_assert!(covered.insert(MessageId { epoch: g.epoch, seq }), "seq covered twice");
                        }
                    }
                    let pending: BTreeSet<MessageId> = m.queues[p].iter().map(|q| q.0).collect();
                    let expected: BTreeSet<MessageId> = m.assigned[p].iter().filter(|id| !pending.contains(id) && !m.acked[p].contains(id)).copied().collect();
                    prop_assert_eq!(covered, expected);
                }
            }
        }
    }

    #[test]
    fn corrupt_file_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.redb");
        std::fs::write(&path, vec![0xA5u8; 8192]).unwrap();
        let (store, report) = Store::open(&path, 1 << 20, 1 << 20).unwrap();
        let aside = report.moved_aside.expect("moved aside");
        assert!(aside.exists());
        assert_eq!(store.epoch(), 1);
        assert!(store.reader().is_empty().unwrap());
    }

    #[test]
    fn epoch_bumps_and_messages_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.redb");
        let (mut s, r) = Store::open(&path, 1 << 20, 1 << 20).unwrap();
        assert_eq!(r.epoch, 1);
        let p = s.key("p");
        let new = NewMessage {
            product: p,
            created: 5,
            records: 2,
            topic: "a/b".into(),
            version: "1.2.3".into(),
            governance: 42,
            body: b"[{},{}]".to_vec(),
        };
        let done = s
            .commit(Batch {
                appends: vec![new],
                ..Default::default()
            })
            .unwrap();
        assert_eq!(done.appended, vec![(p, MessageId { epoch: 1, seq: 1 }, 2)]);
        drop(s);
        let (s, r) = Store::open(&path, 1 << 20, 1 << 20).unwrap();
        assert_eq!((r.epoch, r.pending_messages), (2, 1));
        let reader = s.reader();
        let m = &reader.read_after(reader.key("p"), None, 10).unwrap()[0];
        assert_eq!(
            (m.topic.as_str(), m.version.as_str(), m.records, m.body.as_slice()),
            ("a/b", "1.2.3", 2, &b"[{},{}]"[..])
        );
        assert_eq!(reader.products().unwrap(), vec![reader.key("p")]);
        assert_eq!(&*m.name, "p");
        assert_eq!(m.governance, 42);
    }

    #[test]
    fn format_1_messages_read_back_with_an_unknown_treatment() {
        let name: Arc<str> = "p".into();
        let key = Keys::default().intern("p");
        let m = StoredMessage {
            product: key,
            name: name.clone(),
            id: MessageId { epoch: 1, seq: 1 },
            created: 5,
            records: 2,
            topic: "a/b".into(),
            version: "1.2.3".into(),
            governance: 9,
            last_seq: 1,
            body: b"[{},{}]".to_vec(),
        };
        let v2 = m.encode();
        // Format 1: the same without the governance fingerprint.
        let mut v1 = v2.clone();
        v1[0] = 1;
        v1.drain(13..29);
        let old = StoredMessage::decode(m.product, &name, m.id, &v1).unwrap();
        assert_eq!(old.governance, crate::govern::treatment::UNKNOWN);
        assert_eq!((old.topic.as_str(), old.body.as_slice()), ("a/b", &b"[{},{}]"[..]));
        assert_eq!(StoredMessage::decode(m.product, &name, m.id, &v2), Some(m));
        for cut in 0..v2.len() - 7 {
            // Truncated bytes never panic; too short for the header reads as nothing.
            let _ = StoredMessage::decode(key, &name, MessageId { epoch: 1, seq: 1 }, &v2[..cut]);
        }
    }

    #[test]
    fn treatments_are_kept_across_opens() {
        use crate::config::EdgeAction;
        use crate::govern::Treatment;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.redb");
        let a = Treatment::from_actions([("t", EdgeAction::Pass)]);
        let b = Treatment::from_actions([("t", EdgeAction::Never)]);
        let (mut s, _) = Store::open(&path, 1 << 20, 1 << 20).unwrap();
        s.record_treatments([("p", &a)]).unwrap();
        drop(s);
        let (mut s, _) = Store::open(&path, 1 << 20, 1 << 20).unwrap();
        s.record_treatments([("p", &b), ("p", &a)]).unwrap();
        let r = s.reader();
        let p = r.key("p");
        assert_eq!(r.treatment(p, a.fingerprint()).unwrap(), Some(a.clone()));
        assert_eq!(r.treatment(p, b.fingerprint()).unwrap(), Some(b));
        assert_eq!(r.treatment(r.key("q"), a.fingerprint()).unwrap(), None);
        assert_eq!(r.treatment(p, crate::govern::treatment::UNKNOWN).unwrap(), None);
    }

    #[test]
    fn a_merged_run_is_one_message_standing_for_all_its_seqs() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Store::open(&dir.path().join("m.redb"), 1 << 20, 1 << 20).unwrap();
        let p = s.key("p");
        let new = |n: u8| NewMessage {
            product: p,
            created: 10 + u64::from(n),
            records: 1,
            topic: "a/b".into(),
            version: "1.0.0".into(),
            governance: 3,
            body: format!("[{{\"n\":{n}}}]").into_bytes(),
        };
        s.commit(Batch {
            appends: (1..=5).map(new).collect(),
            ..Default::default()
        })
        .unwrap();
        let ids: Vec<MessageId> = (1..=5).map(|seq| MessageId { epoch: 1, seq }).collect();
        // A run with a hole is left alone.
        let holed = vec![ids[0], ids[2]];
        let done = s
            .commit(Batch {
                merges: vec![(p, holed), (p, ids[1..].to_vec())],
                ..Default::default()
            })
            .unwrap();
        assert_eq!(done.merged, 1);
        let r = s.reader();
        let all = r.read_after(p, None, 10).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!((all[0].id.seq, all[0].last_seq), (1, 1));
        let m = &all[1];
        assert_eq!((m.id.seq, m.last_seq, m.records, m.created), (2, 5, 4, 12));
        assert_eq!(m.body, br#"[{"n":2},{"n":3},{"n":4},{"n":5}]"#.to_vec());
        assert_eq!(s.depth(p).0, 2);
        // Dropped, a merged message is a gap over all its seqs.
        let done = s
            .commit(Batch {
                dead_letters: vec![(p, m.id, GapReason::EgressDenied)],
                ..Default::default()
            })
            .unwrap();
        let g = &done.gaps[0].1;
        assert_eq!((g.from_seq, g.to_seq, g.count), (2, 5, 4));
        assert_eq!(s.depth(p).0, 1);
    }
}
