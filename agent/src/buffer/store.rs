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

/// The open database, shared by the store and its readers; replaced when the store reopens it
/// after a storage error ([`Store::reopen`]).
#[derive(Default)]
pub(super) struct DbSlot {
    slot: std::sync::RwLock<Option<Arc<Database>>>,
    reopening: std::sync::atomic::AtomicBool,
}

impl DbSlot {
    fn new(db: Option<Database>) -> Arc<DbSlot> {
        Arc::new(DbSlot {
            slot: std::sync::RwLock::new(db.map(Arc::new)),
            reopening: Default::default(),
        })
    }

    /// The database; while it is being reopened, the new one (waiting up to 2 s).
    pub(super) fn get(&self) -> Result<Arc<Database>, redb::Error> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            if let Some(db) = self
                .slot
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .as_ref()
            {
                return Ok(db.clone());
            }
            if !self.reopening.load(std::sync::atomic::Ordering::SeqCst) || std::time::Instant::now() > deadline {
                return Err(redb::Error::PreviousIo);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

/// A damaged buffer file found by `open`.
#[derive(Debug, Clone)]
pub struct Damage {
    /// Where the damaged file now is (never written again).
    pub aside: PathBuf,
    /// What was wrong with it.
    pub problem: String,
    /// redb could open the file at all (if not, nothing was salvaged).
    pub opened: bool,
    /// Messages copied into the fresh buffer, with their ids.
    pub salvaged_messages: u64,
    /// Gap topics of the products the salvaged `seqs` table names.
    pub topics: Vec<(String, String)>,
    /// The epoch before this open: the loss is announced for it and every earlier one.
    pub last_epoch: u64,
}

/// No backend: the file at the path (`Store::open`). Uninhabited.
#[derive(Debug, Clone)]
enum NoBackend {}

impl redb::StorageBackend for NoBackend {
    fn len(&self) -> std::io::Result<u64> {
        match *self {}
    }
    fn read(&self, _: u64, _: &mut [u8]) -> std::io::Result<()> {
        match *self {}
    }
    fn set_len(&self, _: u64) -> std::io::Result<()> {
        match *self {}
    }
    fn sync_data(&self) -> std::io::Result<()> {
        match *self {}
    }
    fn write(&self, _: u64, _: &[u8]) -> std::io::Result<()> {
        match *self {}
    }
}

/// An open whose commit could not be made (storage failing at start).
struct Deferred {
    salvaged: Option<recover::Salvaged>,
    error: String,
}

type Reopen = Box<dyn Fn() -> Result<Database, redb::DatabaseError> + Send>;
type FileLen = Box<dyn Fn() -> Option<u64> + Send>;

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

/// Errors that mean "this file is not a usable buffer", as opposed to a failure of the disk (or
/// another process holding it): anything redb says about the content of the file.
fn is_corrupt(e: &redb::DatabaseError) -> bool {
    use std::io::ErrorKind::{InvalidData, UnexpectedEof};
    match e {
        redb::DatabaseError::Storage(redb::StorageError::Io(io)) => matches!(io.kind(), InvalidData | UnexpectedEof),
        redb::DatabaseError::DatabaseAlreadyOpen | redb::DatabaseError::RepairAborted => false,
        _ => true,
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
    /// Opens (or creates) the buffer, bumps and persists the epoch (in the file and in the epoch
    /// file beside it, see [`recover`]), and scans what is pending. A damaged file (redb's
    /// integrity check fails, it is 0 bytes or truncated, or reading it panics) is moved aside
    /// (`<name>.corrupt-<ms>`), what can be read of it is copied into a fresh buffer, and the
    /// report says so ([`OpenReport::damage`]; [`Store::record_damage`] announces the loss): the
    /// agent must come back without a human deleting files, and with ids never used before.
    pub fn open(path: &Path, max_bytes: u64, cache_bytes: usize) -> Result<(Store, OpenReport), BufferError> {
        Store::open_with(path, max_bytes, cache_bytes, None::<NoBackend>)
    }

    /// [`Store::open`] on a storage backend of the caller's (the tests' simulated disk): `path`
    /// only names the buffer and places the epoch file. A damaged backend is an error here.
    pub fn open_backend<B: redb::StorageBackend + Clone>(
        path: &Path,
        max_bytes: u64,
        cache_bytes: usize,
        backend: B,
    ) -> Result<(Store, OpenReport), BufferError> {
        Store::open_with(path, max_bytes, cache_bytes, Some(backend))
    }

    fn open_with<B: redb::StorageBackend + Clone>(
        path: &Path,
        max_bytes: u64,
        cache_bytes: usize,
        backend: Option<B>,
    ) -> Result<(Store, OpenReport), BufferError> {
        let builder = || {
            let mut b = Database::builder();
            b.set_cache_size(cache_bytes);
            b.set_check_integrity_on_open(true);
            b
        };
        let reopen_fn: Reopen = {
            let path = path.to_path_buf();
            let backend = backend.clone();
            Box::new(move || {
                let mut b = Database::builder();
                b.set_cache_size(cache_bytes);
                b.set_check_integrity_on_open(true);
                match &backend {
                    Some(backend) => b.create_with_backend(backend.clone()),
                    None => b.create(&path),
                }
            })
        };
        let file_len: FileLen = {
            let path = path.to_path_buf();
            let backend = backend.clone();
            Box::new(move || match &backend {
                Some(b) => b.len().ok(),
                None => std::fs::metadata(&path).ok().map(|m| m.len()),
            })
        };
        let epoch_file = recover::epoch_path(path);
        let kept_epoch = recover::read_epoch(&epoch_file);
        let opened = match (backend, std::fs::metadata(path)) {
            (Some(b), _) => Ok(Ok(recover::contain(|| builder().create_with_backend(b))
                .unwrap_or_else(|| Err(redb::StorageError::Corrupted("redb panicked".into()).into()))
                .map_err(storage(path))?)),
            (None, Ok(m)) if m.len() == 0 => Err("the file is empty (0 bytes)".to_string()),
            (None, _) => match recover::contain(|| builder().create(path)) {
                Some(Ok(db)) => Ok(Ok(db)),
                Some(Err(e)) if is_corrupt(&e) => Err(e.to_string()),
                Some(Err(e)) => Ok(Err(storage(path)(e))),
                None => Err("reading it panicked inside redb".to_string()),
            },
        };
        let (db, mut damage, salvaged) = match opened {
            Ok(db) => (db, None, None),
            Err(why) => {
                let aside = path.with_extension(format!("redb.corrupt-{}", crate::model::now_millis()));
                std::fs::rename(path, &aside).map_err(|source| BufferError::MoveAside {
                    path: path.to_path_buf(),
                    source,
                })?;
                let salvaged = recover::salvage(&aside, &path.with_extension("redb.salvage"), &TABLES);
                tracing::error!(path = %path.display(), moved_to = %aside.display(), problem = %why,
                    salvaged_messages = salvaged.messages.len(), salvaged_gap_events = salvaged.gaps.len(),
                    "buffer file is damaged; moved it aside and copied what could be read into a fresh buffer (what could not is announced as buffer_corrupt gap events)");
                let damage = Damage {
                    aside,
                    problem: why,
                    opened: salvaged.opened,
                    salvaged_messages: 0,
                    topics: Vec::new(),
                    last_epoch: 0,
                };
                (
                    builder().create(path).map_err(storage(path)),
                    Some(damage),
                    Some(salvaged),
                )
            }
        };
        // The epoch first, from what can be read: written beside the buffer before it is used.
        let in_buffer = match &db {
            Ok(db) => db
                .begin_read()
                .ok()
                .and_then(|rx| rx.open_table(META).ok()?.get("epoch").ok()?.map(|v| v.value())),
            Err(_) => None,
        }
        .max(salvaged.as_ref().and_then(|s| s.epoch));
        let epoch = recover::next_epoch(in_buffer, kept_epoch, crate::model::now_millis(), recover::random());
        if in_buffer.max(kept_epoch).is_none() {
            tracing::info!(
                epoch,
                "no earlier epoch found (new data directory, or both copies lost)"
            );
        }
        if let Err(e) = recover::write_epoch(&epoch_file, epoch) {
            tracing::warn!(path = %epoch_file.display(), error = %e,
                "cannot keep the epoch beside the buffer; it is kept in the buffer file only");
        }
        recover::pass_clock(epoch);
        if let Some(d) = &mut damage {
            d.last_epoch = epoch - 1;
        }
        let open_error = db.as_ref().err().map(ToString::to_string);
        let mut store = Store {
            db: DbSlot::new(db.ok()),
            reopen_fn,
            file_len,
            usable: max_bytes,
            last_len: 0,
            ratio: 2.0,
            path: path.to_path_buf(),
            epoch,
            max_bytes,
            total_bytes: 0,
            queues: HashMap::new(),
            sizes: HashMap::new(),
            limits: HashMap::new(),
            keys: Keys::default(),
            next_gap: 1,
            deferred: None,
            treatments: Vec::new(),
        };
        let opened = (|| -> Result<Vec<GapEvent>, BufferError> {
            let mut tx = store
                .db
                .get()
                .map_err(storage(path))?
                .begin_write()
                .map_err(storage(path))?;
            tx.set_durability(redb::Durability::Immediate)
                .map_err(|e| storage(path)(redb::Error::from(e)))?;
            let (crashed, next_gap) = store.settle_open(&tx, salvaged.as_ref(), damage.as_mut())?;
            tx.commit().map_err(storage(path))?;
            store.next_gap = next_gap;
            Ok(crashed)
        })();
        let crashed = match opened {
            Ok(crashed) => {
                store.scan()?;
                crashed
            }
            Err(e) => {
                // Storage failing (a full disk, say): the agent starts all the same, degraded; the
                // first commit that works does what this one could not.
                let error = open_error.unwrap_or_else(|| e.to_string());
                tracing::error!(path = %path.display(), error = %error,
                    "cannot write the buffer file: starting degraded (live data only, nothing made durable until storage works)");
                store.deferred = Some(Deferred { salvaged, error });
                let _ = store.scan();
                Vec::new()
            }
        };
        for q in store.queues.values_mut() {
            q.next_seq = 1;
        }
        let report = OpenReport {
            epoch: store.epoch,
            pending_messages: store.queues.values().map(|q| q.messages).sum(),
            pending_bytes: store.total_bytes,
            damage,
            crashed,
        };
        Ok((store, report))
    }

    /// Set while the open's own commit has not happened (storage failed at start): why.
    pub fn deferred(&self) -> Option<&str> {
        self.deferred.as_ref().map(|d| d.error.as_str())
    }

    /// What an open writes, in `tx`: the salvage of a damaged file, the epoch, and one `crash`
    /// gap event per product and earlier epoch for what the last run numbered and may have sent,
    /// but neither committed nor saw acknowledged. Returns those and the next gap id.
    fn settle_open(
        &self,
        tx: &redb::WriteTransaction,
        salvaged: Option<&recover::Salvaged>,
        damage: Option<&mut Damage>,
    ) -> Result<(Vec<GapEvent>, u64), BufferError> {
        let path = &self.path;
        if let (Some(s), Some(d)) = (salvaged, damage) {
            self.import(tx, s, d)?;
        }
        let epoch = self.epoch;
        let mut meta = tx.open_table(META).map_err(storage(path))?;
        meta.insert("epoch", epoch).map_err(storage(path))?;
        tx.open_table(MESSAGES).map_err(storage(path))?;
        tx.open_table(DROPS).map_err(storage(path))?;
        tx.open_table(DEAD).map_err(storage(path))?;
        tx.open_table(TREATMENTS).map_err(storage(path))?;
        let mut gaps = tx.open_table(GAPS).map_err(storage(path))?;
        let mut next_gap = gaps.last().map_err(storage(path))?.map_or(1, |(k, _)| k.value() + 1);
        let mut seqs = tx.open_table(SEQS).map_err(storage(path))?;
        let mut earlier = Vec::new();
        for entry in seqs.iter().map_err(storage(path))? {
            let (k, v) = entry.map_err(storage(path))?;
            let (name, e) = k.value();
            if e < epoch {
                earlier.push((name.to_string(), e, decode_seqs(v.value())));
            }
        }
        let now = crate::model::now_millis();
        let mut crashed = Vec::new();
        for (name, e, (sealed, reserved, topic)) in earlier {
            seqs.remove((name.as_str(), e)).map_err(storage(path))?;
            if reserved <= sealed {
                continue;
            }
            let ev = GapEvent {
                product: name,
                epoch: e,
                from_seq: sealed + 1,
                to_seq: reserved,
                count: 0,
                reason: GapReason::Crash,
                ts: now,
                topic,
            };
            next_gap = insert_gap(&mut gaps, next_gap, &ev).map_err(storage(path))?;
            crashed.push(ev);
        }
        Ok((crashed, next_gap))
    }

    /// Rebuilds the byte accounting from what is pending in the file.
    fn scan(&mut self) -> Result<(), BufferError> {
        let path = &self.path;
        for q in self.queues.values_mut() {
            q.bytes = 0;
            q.messages = 0;
        }
        self.total_bytes = 0;
        self.sizes.clear();
        let rx = self
            .db
            .get()
            .map_err(storage(path))?
            .begin_read()
            .map_err(storage(path))?;
        let table = rx.open_table(MESSAGES).map_err(storage(path))?;
        for entry in table.iter().map_err(storage(path))? {
            let (k, v) = entry.map_err(storage(path))?;
            let (product, epoch, seq) = k.value();
            let id = MessageId { epoch, seq };
            let size = v.value().len() as u64 + product.len() as u64 + PER_MESSAGE_OVERHEAD;
            let key = self.keys.intern(product);
            let q = self.queues.entry(key).or_default();
            q.bytes += size;
            q.messages += 1;
            self.total_bytes += size;
            self.sizes.insert((key, id), size);
        }
        Ok(())
    }

    /// Opens the database again after a storage error: redb refuses every transaction after a
    /// failed write until it is reopened (and its recovery has rolled the file back to the last
    /// commit that returned). Readers wait for the new one (up to 2 s) meanwhile.
    pub fn reopen(&mut self) -> Result<(), BufferError> {
        let path = self.path.clone();
        self.db.reopening.store(true, std::sync::atomic::Ordering::SeqCst);
        let old = self
            .db
            .slot
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(old) = old {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            while Arc::strong_count(&old) > 1 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        let opened = recover::contain(|| (self.reopen_fn)())
            .unwrap_or_else(|| Err(redb::StorageError::Corrupted("redb panicked reopening the file".into()).into()));
        let result = match opened {
            Ok(db) => {
                *self.db.slot.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(db));
                self.scan()
            }
            Err(e) => Err(storage(&path)(e)),
        };
        self.db.reopening.store(false, std::sync::atomic::Ordering::SeqCst);
        result
    }

    /// Copies what was salvaged from a damaged file into the fresh one (in `open`'s transaction):
    /// messages that decode whole keep their ids; pending gap events, drop counters, treatments,
    /// dead letters and seq reservations (so the crash report of the last run still comes).
    fn import(&self, tx: &redb::WriteTransaction, s: &recover::Salvaged, d: &mut Damage) -> Result<(), BufferError> {
        let path = &self.path;
        let mut meta = tx.open_table(META).map_err(storage(path))?;
        if let Some(e) = s.epoch {
            meta.insert("epoch", e).map_err(storage(path))?;
        }
        let mut messages = tx.open_table(MESSAGES).map_err(storage(path))?;
        for ((name, epoch, seq), v) in &s.messages {
            let id = MessageId {
                epoch: *epoch,
                seq: *seq,
            };
            let whole = StoredMessage::intact(name, id, v)
                && StoredMessage::decode(self.keys.intern(name), &Arc::from(name.as_str()), id, v)
                    .is_some_and(|m| serde_json::from_slice::<serde::de::IgnoredAny>(&m.body).is_ok());
            if whole {
                messages
                    .insert((name.as_str(), *epoch, *seq), v.as_slice())
                    .map_err(storage(path))?;
                d.salvaged_messages += 1;
            }
        }
        let mut gaps = tx.open_table(GAPS).map_err(storage(path))?;
        for (id, v) in &s.gaps {
            if serde_json::from_slice::<GapEvent>(v).is_ok() {
                gaps.insert(*id, v.as_slice()).map_err(storage(path))?;
            }
        }
        let mut drops = tx.open_table(DROPS).map_err(storage(path))?;
        for ((p, r), n) in &s.drops {
            drops.insert((p.as_str(), r.as_str()), *n).map_err(storage(path))?;
        }
        let mut treatments = tx.open_table(TREATMENTS).map_err(storage(path))?;
        for ((p, f), v) in &s.treatments {
            treatments
                .insert((p.as_str(), *f), v.as_slice())
                .map_err(storage(path))?;
        }
        let mut dead = tx.open_table(DEAD).map_err(storage(path))?;
        for ((p, e, q), v) in &s.dead {
            dead.insert((p.as_str(), *e, *q), v.as_slice()).map_err(storage(path))?;
        }
        let mut seqs = tx.open_table(SEQS).map_err(storage(path))?;
        for ((p, e), v) in &s.seqs {
            let (_, _, topic) = decode_seqs(v);
            if !topic.is_empty() && !d.topics.iter().any(|(n, _)| n == p) {
                d.topics.push((p.clone(), topic));
            }
            seqs.insert((p.as_str(), *e), v.as_slice()).map_err(storage(path))?;
        }
        Ok(())
    }

    /// Announces what a damaged file may have lost: one `buffer_corrupt` gap event per product
    /// (those given, `(name, gap topic)`, and those the salvaged file named) for the epoch before
    /// this one and every earlier one (`from_seq` 1, `to_seq` `u64::MAX`, count unknown: 0).
    pub fn record_damage(
        &mut self,
        damage: &Damage,
        products: &[(String, String)],
    ) -> Result<Vec<GapEvent>, BufferError> {
        let path = self.path.clone();
        let mut all: Vec<(String, String)> = products.to_vec();
        for t in &damage.topics {
            if !all.iter().any(|(n, _)| *n == t.0) {
                all.push(t.clone());
            }
        }
        let now = crate::model::now_millis();
        let events: Vec<GapEvent> = all
            .into_iter()
            .map(|(product, topic)| GapEvent {
                product,
                epoch: damage.last_epoch,
                from_seq: 1,
                to_seq: u64::MAX,
                count: 0,
                reason: GapReason::BufferCorrupt,
                ts: now,
                topic,
            })
            .collect();
        let mut tx = self
            .db
            .get()
            .map_err(storage(&path))?
            .begin_write()
            .map_err(storage(&path))?;
        tx.set_durability(redb::Durability::Immediate)
            .map_err(|e| storage(&path)(redb::Error::from(e)))?;
        let mut next = self.next_gap;
        {
            let mut gaps = tx.open_table(GAPS).map_err(storage(&path))?;
            for ev in &events {
                next = insert_gap(&mut gaps, next, ev).map_err(storage(&path))?;
            }
        }
        tx.commit().map_err(storage(&path))?;
        self.next_gap = next;
        Ok(events)
    }

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
        let mut tx = self
            .db
            .get()
            .map_err(storage(path))?
            .begin_write()
            .map_err(storage(path))?;
        tx.set_durability(redb::Durability::Immediate)
            .map_err(|e| storage(path)(redb::Error::from(e)))?;
        self.write_treatments(&tx)?;
        tx.commit().map_err(storage(path))?;
        self.treatments.clear();
        Ok(())
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
        let mut size_changes: Vec<((ProductKey, MessageId), Option<u64>)> = Vec::new();
        let mut next_gap = self.next_gap;
        let now = crate::model::now_millis();

        let mut tx = self
            .db
            .get()
            .map_err(storage(&path))?
            .begin_write()
            .map_err(storage(&path))?;
        tx.set_durability(redb::Durability::Immediate)
            .map_err(|e| storage(&path)(redb::Error::from(e)))?;
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

/// Read access for the publisher and the `buffer` command; safe beside the writer (MVCC).
#[derive(Clone)]
pub struct Reader {
    db: Arc<DbSlot>,
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
        let rx = self
            .db
            .get()
            .map_err(storage(path))?
            .begin_read()
            .map_err(storage(path))?;
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
        let rx = self
            .db
            .get()
            .map_err(storage(path))?
            .begin_read()
            .map_err(storage(path))?;
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
        let rx = self
            .db
            .get()
            .map_err(storage(path))?
            .begin_read()
            .map_err(storage(path))?;
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
        let rx = self
            .db
            .get()
            .map_err(storage(path))?
            .begin_read()
            .map_err(storage(path))?;
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
        let rx = self
            .db
            .get()
            .map_err(storage(path))?
            .begin_read()
            .map_err(storage(path))?;
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
        let rx = self
            .db
            .get()
            .map_err(storage(path))?
            .begin_read()
            .map_err(storage(path))?;
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
        let rx = self
            .db
            .get()
            .map_err(storage(path))?
            .begin_read()
            .map_err(storage(path))?;
        let table = rx.open_table(MESSAGES).map_err(storage(path))?;
        table.len().map_err(storage(path))
    }

    pub fn is_empty(&self) -> Result<bool, BufferError> {
        Ok(self.len()? == 0)
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
