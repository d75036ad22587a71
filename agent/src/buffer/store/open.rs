//! Opening the store: the epoch, the salvage of a damaged file, an open that storage does not let
//! finish (it finishes with the first commit that works), and reopening after a storage error.

use super::*;

/// The open database, shared by the store and its readers; replaced when the store reopens it
/// after a storage error ([`Store::reopen`]).
#[derive(Default)]
pub(in crate::buffer) struct DbSlot {
    slot: std::sync::RwLock<Option<Arc<Database>>>,
    reopening: std::sync::atomic::AtomicBool,
}

impl DbSlot {
    pub(super) fn new(db: Option<Database>) -> Arc<DbSlot> {
        Arc::new(DbSlot {
            slot: std::sync::RwLock::new(db.map(Arc::new)),
            reopening: Default::default(),
        })
    }

    /// The database; while it is being reopened, the new one (waiting up to 2 s).
    pub(in crate::buffer) fn get(&self) -> Result<Arc<Database>, redb::Error> {
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
pub(super) struct Deferred {
    pub(super) salvaged: Option<recover::Salvaged>,
    error: String,
}

pub(super) type Reopen = Box<dyn Fn() -> Result<Database, redb::DatabaseError> + Send>;
pub(super) type FileLen = Box<dyn Fn() -> Option<u64> + Send>;

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
            let tx = store.write_tx()?;
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
    pub(super) fn settle_open(
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
    pub(super) fn scan(&mut self) -> Result<(), BufferError> {
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
        let tx = self.write_tx()?;
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
}
