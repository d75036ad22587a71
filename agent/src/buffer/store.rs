//! The redb store: per-product queues of numbered messages, gap events and drop counters.
//!
//! Tables (all keys big-endian-ordered by redb's tuple encoding):
//! - `meta`: `"epoch"` -> the epoch of the current open (bumped by every open, persisted before use).
//! - `messages`: `(product, epoch, seq)` -> message (header + records JSON, see [`StoredMessage`]).
//! - `gaps`: `id` -> gap event, until the broker has acknowledged it.
//! - `drops`: `(product, reason)` -> records dropped so far (never decreases).
//! - `treatments`: `(product, fingerprint)` -> each governance treatment the product has run under
//!   ([`crate::govern::Treatment`]); messages carry the fingerprint of theirs.
//! - `seqs`: `(product, epoch)` -> `sealed, reserved, gap topic`. Messages are numbered in memory
//!   (and may be sent, and acknowledged, before any commit): every seq up to `sealed` is committed,
//!   acknowledged or covered by a gap event; seqs up to `reserved` may have been handed out. A
//!   commit reserves seqs in blocks, so that numbering needs no commit of its own.
//!
//! Invariants: `seq` starts at 1 in every epoch and grows by one per message, whether the message
//! is stored, dropped or acknowledged before it was ever written; every message dropped is covered
//! by a gap event written in the same transaction, and every seq a crash may have lost
//! (`sealed+1..=reserved` of an earlier epoch) by one `crash` gap event written by the next open,
//! so a consumer can prove completeness from seq continuity plus gap events.
//! A commit returns only after redb's `Durability::Immediate` commit (fsync) has returned.

use super::message::PER_MESSAGE_OVERHEAD;
pub use super::message::{MessageId, NewMessage, StoredMessage};
use super::{recover, GapReason, Keys, ProductKey};
use crate::config::FullPolicy;
use crate::model::Millis;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

mod open;
mod reader;
pub use open::Damage;
use open::{DbSlot, Deferred, FileLen, Reopen};
pub use reader::Reader;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const MESSAGES: TableDefinition<(&str, u64, u64), &[u8]> = TableDefinition::new("messages");
const GAPS: TableDefinition<u64, &[u8]> = TableDefinition::new("gaps");
const DROPS: TableDefinition<(&str, &str), u64> = TableDefinition::new("drops");
const DEAD: TableDefinition<(&str, u64, u64), &[u8]> = TableDefinition::new("dead_letters");
const TREATMENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("treatments");
const SEQS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("seqs");
/// How far the file may grow beyond `max_bytes` (redb's own tables and free-space state).
pub const FILE_MARGIN: u64 = 1 << 20;
const TABLES: recover::Tables = recover::Tables {
    meta: META,
    messages: MESSAGES,
    gaps: GAPS,
    drops: DROPS,
    treatments: TREATMENTS,
    seqs: SEQS,
    dead: DEAD,
};

#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error("buffer storage error in {path}: {source}")]
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
    /// Messages numbered before the commit ([`Store::number`]), stored first, with their ids.
    pub numbered: Vec<Arc<StoredMessage>>,
    /// Messages the commit numbers.
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
    /// The same for records whose messages were numbered already: `(product, seqs, records,
    /// reason)`, a gap event over those seqs.
    pub refused_seqs: Vec<(ProductKey, (u64, u64), u64, GapReason)>,
    /// Seqs to keep reserved ahead of each product's last numbered one (at least).
    pub reserve: Vec<(ProductKey, u64)>,
    /// A clean stop: nothing more is numbered, so no seq stays reserved (no `crash` gap follows).
    pub release: bool,
    /// Products with numbered messages that stay out of this commit (still staged): the lowest
    /// such seq of each. Only the seqs below it are sealed.
    pub unsealed: Vec<(ProductKey, u64)>,
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
    /// The same for numbered messages: `(product, seq, records)`; their seqs are part of the stretch.
    pub blocked_seqs: Vec<(ProductKey, u64, u64)>,
    /// `crash` gap events of an open that could not write them (storage failing at start).
    pub crashed: Vec<GapEvent>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Queue {
    bytes: u64,
    messages: u64,
    next_seq: u64,
    /// As durable in `seqs` for this epoch.
    sealed: u64,
    reserved: u64,
    /// Reserved in memory only, above `reserved` ([`Store::reserve_in_memory`]).
    unsaved: u64,
}

/// What `open` found.
#[derive(Debug)]
pub struct OpenReport {
    pub epoch: u64,
    pub pending_messages: u64,
    pub pending_bytes: u64,
    /// Set when a damaged file was moved aside and a fresh buffer started.
    pub damage: Option<Damage>,
    /// `crash` gap events this open wrote: seqs of earlier epochs a crash may have lost.
    pub crashed: Vec<GapEvent>,
}

pub struct Store {
    db: Arc<DbSlot>,
    /// Opens the database again ([`Store::reopen`]).
    reopen_fn: Reopen,
    /// The file's length now.
    file_len: FileLen,
    /// The bytes of messages the file can hold within `max_bytes` (lowered when the file grows
    /// near it: what redb's pages, tree and free space cost on top, learnt from the file).
    usable: u64,
    last_len: u64,
    /// Bytes of file per byte of messages, learnt when the file grew (it was full then).
    ratio: f64,
    path: PathBuf,
    epoch: u64,
    max_bytes: u64,
    total_bytes: u64,
    queues: HashMap<ProductKey, Queue>,
    sizes: HashMap<(ProductKey, MessageId), u64>,
    limits: HashMap<ProductKey, ProductLimits>,
    keys: Keys,
    next_gap: u64,
    /// The open's own commit, still to do.
    deferred: Option<Deferred>,
    /// Governance treatments still to store: `(product, fingerprint, bytes)`.
    treatments: Vec<(String, u64, Vec<u8>)>,
}

/// A `seqs` value: `sealed u64, reserved u64` little-endian, then the gap topic.
fn encode_seqs(sealed: u64, reserved: u64, topic: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + topic.len());
    v.extend(sealed.to_le_bytes());
    v.extend(reserved.to_le_bytes());
    v.extend(topic.as_bytes());
    v
}

/// A `seqs` value read back; anything unreadable seals nothing and reserves nothing.
fn decode_seqs(b: &[u8]) -> (u64, u64, String) {
    let word = |r: std::ops::Range<usize>| b.get(r).and_then(|w| w.try_into().ok()).map(u64::from_le_bytes);
    match (word(0..8), word(8..16)) {
        (Some(sealed), Some(reserved)) => (sealed, reserved, String::from_utf8_lossy(&b[16..]).into_owned()),
        _ => (0, 0, String::new()),
    }
}

/// Stores one gap event under `id`; returns the next id.
fn insert_gap(gaps: &mut redb::Table<u64, &[u8]>, id: u64, ev: &GapEvent) -> Result<u64, redb::StorageError> {
    #[allow(clippy::expect_used, reason = "a struct of strings and integers serializes")]
    let json = serde_json::to_vec(ev).expect("gap events serialize");
    gaps.insert(id, json.as_slice())?;
    Ok(id + 1)
}

fn storage<E: Into<redb::Error>>(path: &Path) -> impl FnOnce(E) -> BufferError + '_ {
    move |e| BufferError::Storage {
        path: path.to_path_buf(),
        source: e.into(),
    }
}

impl Store {
    /// Opens an existing buffer for reading only (the `buffer` command; the agent must not be running).
    pub fn open_reader(path: &Path) -> Result<Reader, BufferError> {
        let db = Database::builder().open(path).map_err(storage(path))?;
        Ok(Reader {
            db: DbSlot::new(Some(db)),
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

    /// The name of a product key.
    pub fn name(&self, product: ProductKey) -> Arc<str> {
        self.keys.name(product)
    }

    /// Keeps the governance treatment each product runs under now (those already kept stay), so
    /// that its messages can be judged against later rules. Durable before it returns.
    pub fn record_treatments<'a>(
        &mut self,
        treatments: impl IntoIterator<Item = (&'a str, &'a crate::govern::Treatment)>,
    ) -> Result<(), BufferError> {
        self.treatments.extend(
            treatments
                .into_iter()
                .map(|(name, t)| (name.to_string(), t.fingerprint(), t.bytes().to_vec())),
        );
        if self.deferred.is_some() {
            return Ok(()); // the first commit that works stores them
        }
        let path = &self.path;
        let tx = self.write_tx()?;
        self.write_treatments(&tx)?;
        tx.commit().map_err(storage(path))?;
        self.treatments.clear();
        Ok(())
    }

    /// A write transaction that commits with fsync (`Durability::Immediate`).
    fn write_tx(&self) -> Result<redb::WriteTransaction, BufferError> {
        let path = &self.path;
        let mut tx = self
            .db
            .get()
            .map_err(storage(path))?
            .begin_write()
            .map_err(storage(path))?;
        tx.set_durability(redb::Durability::Immediate)
            .map_err(|e| storage(path)(redb::Error::from(e)))?;
        Ok(tx)
    }

    /// Stores the treatments not yet stored (those already kept stay as they are).
    fn write_treatments(&self, tx: &redb::WriteTransaction) -> Result<(), BufferError> {
        let path = &self.path;
        let mut table = tx.open_table(TREATMENTS).map_err(storage(path))?;
        for (name, fingerprint, bytes) in &self.treatments {
            let key = (name.as_str(), *fingerprint);
            if table.get(key).map_err(storage(path))?.is_none() {
                table.insert(key, bytes.as_slice()).map_err(storage(path))?;
            }
        }
        Ok(())
    }

    /// Seqs `product` may still number before a commit reserves more ([`Batch::reserve`]).
    pub fn reserved_left(&self, product: ProductKey) -> u64 {
        self.queues
            .get(&product)
            .map_or(0, |q| (q.reserved + q.unsaved).saturating_sub(q.next_seq.max(1) - 1))
    }

    /// Reserves `n` more seqs for `product` in memory only, while commits fail: live data goes
    /// on. A crash before the next commit announces only the reservation that was durable
    /// (`crash` gap event); the seqs above it that you have not received are lost too.
    pub fn reserve_in_memory(&mut self, product: ProductKey, n: u64) {
        let q = self.queues.entry(product).or_default();
        q.unsaved = (q.reserved + q.unsaved).max(q.next_seq.max(1) - 1) + n - q.reserved;
    }

    /// Numbers the next message of `product` in memory, within its reservation (`None`: a commit
    /// must reserve more first). The seq is spent whatever becomes of the message.
    pub fn number(&mut self, product: ProductKey) -> Option<MessageId> {
        let q = self.queues.entry(product).or_default();
        q.next_seq = q.next_seq.max(1);
        if q.next_seq > q.reserved + q.unsaved {
            return None;
        }
        let seq = q.next_seq;
        q.next_seq += 1;
        Some(MessageId { epoch: self.epoch, seq })
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
        // Sizes this commit sets (`Some`) or removes (`None`), the last change of a key winning; a
        // map, not a list searched per acknowledgement (thousands of them in one commit).
        let mut size_changes: HashMap<(ProductKey, MessageId), Option<u64>> = HashMap::new();
        let mut next_gap = self.next_gap;
        let now = crate::model::now_millis();

        let tx = self.write_tx()?;
        // What an open that met failing storage could not write comes first.
        if let Some(d) = &self.deferred {
            (out.crashed, next_gap) = self.settle_open(&tx, d.salvaged.as_ref(), None)?;
        }
        self.write_treatments(&tx)?;
        {
            let mut messages = tx.open_table(MESSAGES).map_err(storage(&path))?;
            let mut gaps = tx.open_table(GAPS).map_err(storage(&path))?;
            let mut drops = tx.open_table(DROPS).map_err(storage(&path))?;
            let sizes = &self.sizes;
            let size_of = |changes: &HashMap<(ProductKey, MessageId), Option<u64>>,
                           key: &(ProductKey, MessageId)|
             -> Option<u64> {
                match changes.get(key) {
                    Some(s) => *s,
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
                    size_changes.insert(key, None);
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
                insert_gap(gaps, next_gap, &ev).map_err(storage(&path))?;
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
                    size_changes.insert(key, None);
                }
                let size = merged.size();
                messages
                    .insert((&*name, merged.id.epoch, merged.id.seq), merged.encode().as_slice())
                    .map_err(storage(&path))?;
                q.bytes += size;
                q.messages += 1;
                total += size;
                size_changes.insert((product, merged.id), Some(size));
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

            for &(product, seqs, count, ref reason) in &batch.refused_seqs {
                record_gap(
                    &mut gaps,
                    &mut drops,
                    self.gap_event(product, self.epoch, seqs, count, reason.clone(), now),
                )?;
            }

            // Numbered messages first: they are older than any the commit numbers.
            let numbered = batch.numbered.into_iter().map(|m| (m, true));
            let appends = batch.appends.into_iter().map(|m| {
                let q = queues.entry(m.product).or_default();
                q.next_seq = q.next_seq.max(1);
                let id = MessageId {
                    epoch: self.epoch,
                    seq: q.next_seq,
                };
                q.next_seq += 1;
                let stored = StoredMessage {
                    product: m.product,
                    name: self.keys.name(m.product),
                    id,
                    created: m.created,
                    records: m.records,
                    topic: m.topic,
                    version: m.version,
                    governance: m.governance,
                    last_seq: id.seq,
                    body: m.body,
                };
                (Arc::new(stored), false)
            });
            let incoming: Vec<(Arc<StoredMessage>, bool)> = numbered.chain(appends).collect();
            for (stored, was_numbered) in incoming {
                let m = &*stored;
                let id = m.id;
                let name = m.name.clone();
                let mut limits = self.limits.get(&m.product).cloned().unwrap_or(ProductLimits {
                    max_bytes: self.max_bytes,
                    policy: FullPolicy::DropOldest,
                    gap_topic: String::new(),
                });
                limits.max_bytes = self.scaled(limits.max_bytes);
                let cap = self.usable;
                let q = queues.entry(m.product).or_default();
                let size = stored.size();
                let fits = |q: &Queue, total: u64| q.bytes + size <= limits.max_bytes && total + size <= cap;

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
                            if q_bytes + size <= limits.max_bytes && t + size <= cap {
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
                    if q_bytes + size <= limits.max_bytes && t + size <= cap {
                        for (did, _, _) in &dropped {
                            messages.remove((&*name, did.epoch, did.seq)).map_err(storage(&path))?;
                            size_changes.insert((m.product, *did), None);
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
                    let again = messages
                        .insert((&*name, id.epoch, id.seq), bytes.as_slice())
                        .map_err(storage(&path))?
                        .is_some();
                    // Already there: a commit that reported a failed fsync had written it after all.
                    if !again {
                        q.bytes += size;
                        q.messages += 1;
                        total += size;
                    }
                    size_changes.insert((m.product, id), Some(size));
                    out.appended.push((m.product, id, stored.records));
                } else {
                    let reason = match limits.policy {
                        FullPolicy::Block => GapReason::BufferFullBlocked,
                        FullPolicy::RejectNew => GapReason::BufferFullRejectNew,
                        // The message alone exceeds what the product may hold, or other products fill the buffer.
                        FullPolicy::DropOldest => GapReason::BufferFull,
                    };
                    if limits.policy == FullPolicy::Block {
                        // Not taken: the writer counts it into the product's blocked stretch, which
                        // becomes one gap event when it ends. A message numbered here spends no seq
                        // on it; one numbered before brings its seq into the stretch.
                        if !out.now_blocked.contains(&m.product) {
                            out.now_blocked.push(m.product);
                        }
                        if was_numbered {
                            out.blocked_seqs.push((m.product, id.seq, u64::from(m.records)));
                        } else {
                            q.next_seq -= 1;
                            out.blocked_records.push((m.product, u64::from(m.records)));
                        }
                        continue;
                    }
                    record_gap(
                        &mut gaps,
                        &mut drops,
                        self.gap_event(m.product, id.epoch, (id.seq, id.seq), u64::from(m.records), reason, now),
                    )?;
                }
            }
            // After the messages: a staged message refused by the broker was numbered, and is
            // stored by this very commit before it moves to the dead letters.
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
                size_changes.insert(key, None);
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
        }
        {
            // Every seq numbered so far is now committed, acknowledged or in a gap event.
            let mut seqs = tx.open_table(SEQS).map_err(storage(&path))?;
            let reserve: HashMap<ProductKey, u64> = batch.reserve.into_iter().collect();
            for &product in reserve.keys() {
                queues.entry(product).or_default();
            }
            let unsealed: HashMap<ProductKey, u64> = batch.unsealed.into_iter().collect();
            for (&product, q) in queues.iter_mut() {
                let numbered = q.next_seq.max(1) - 1;
                let sealed = unsealed
                    .get(&product)
                    .map_or(numbered, |&s| numbered.min(s.saturating_sub(1)));
                let reserved = if batch.release {
                    sealed
                } else {
                    (q.reserved + q.unsaved).max(numbered + reserve.get(&product).copied().unwrap_or(0))
                };
                q.unsaved = 0;
                if (sealed, reserved) == (q.sealed, q.reserved) {
                    continue;
                }
                let name = self.keys.name(product);
                let topic = self.limits.get(&product).map_or("", |l| l.gap_topic.as_str());
                seqs.insert((&*name, self.epoch), encode_seqs(sealed, reserved, topic).as_slice())
                    .map_err(storage(&path))?;
                (q.sealed, q.reserved) = (sealed, reserved);
            }
        }
        tx.commit().map_err(storage(&path))?;
        self.deferred = None;
        self.treatments.clear();
        let before = self.total_bytes;
        // Durable: now make memory match.
        self.queues = queues;
        self.total_bytes = total;
        self.watch_file(before);
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
        q.bytes <= self.scaled(l.max_bytes) / 2 && self.total_bytes <= self.usable / 2 + self.usable / 4
    }

    /// A share of `max_bytes` scaled to what the file can hold ([`Store::usable`]).
    fn scaled(&self, share: u64) -> u64 {
        (u128::from(share) * u128::from(self.usable) / u128::from(self.max_bytes.max(1))) as u64
    }

    /// After a commit that held `before` bytes of messages before it: redb grows the file by at
    /// least doubling it, once its free pages run out. A file whose next growth would pass
    /// `max_bytes` must not grow again: what may be buffered is held to what fits in it, at the
    /// cost per byte the file showed when it last grew (its pages, tree and free space on top of
    /// the messages), with a tenth to spare. Deleting (drop_oldest) or refusing (block,
    /// reject_new) then keeps the file where it is: freed pages are reused.
    fn watch_file(&mut self, before: u64) {
        let Some(len) = (self.file_len)() else { return };
        if len > self.last_len && self.last_len > 0 && before >= self.last_len / 8 {
            self.ratio = self.ratio.max(self.last_len as f64 / before as f64);
        }
        self.last_len = len;
        let usable = if 2 * len > self.max_bytes + FILE_MARGIN {
            ((len as f64 * 0.9 / self.ratio) as u64).clamp(self.max_bytes / 16, self.max_bytes)
        } else {
            self.max_bytes
        };
        if usable != self.usable {
            tracing::debug!(
                file_bytes = len,
                buffered = self.total_bytes,
                usable,
                ratio = self.ratio,
                "buffer file sized: what may be buffered follows"
            );
            self.usable = usable;
        }
    }
}

#[cfg(test)]
#[path = "damage_tests.rs"]
mod damage_tests;
#[cfg(test)]
#[path = "fault_tests.rs"]
mod fault_tests;
#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
