//! Recovery at open: an epoch that never repeats, and the salvage of a damaged buffer file.
//!
//! **The epoch** is kept twice: in the buffer file (`meta`) and in `<buffer>.epoch` beside it
//! (written, fsynced, renamed). Each open takes one more than the larger of the two, or the wall
//! clock in milliseconds since the Unix epoch if that is larger, and returns only once the clock
//! has passed the epoch it took. So every epoch is below the clock of any later start: with both
//! copies lost (a new data directory, or a damaged file and a deleted epoch file) the clock alone
//! gives an epoch above every earlier one, unless the clock went backwards. A clock before
//! [`CLOCK_FLOOR`] is taken as not set (a gateway without a battery-backed clock, before NTP)
//! and not used; with both copies lost as well the epoch is [`UNSET_CLOCK_BASE`] plus 31 random
//! bits, above every clock epoch until the year 2109, and unlike an earlier random one but with
//! a chance of about 2^-31 per restart counted since. Every epoch stays below 2^53, exact in any
//! JSON reader.
//!
//! **A damaged file** (one redb's integrity check refuses, a truncated or 0-byte one, or one that
//! makes redb panic) is moved aside and never written again. Its tables are read from a scratch
//! copy, forwards and then backwards from the end (messages also around damaged pages, see
//! [`read_messages`]), each read contained so that no byte pattern can stop the agent; every
//! message that reads back whole is kept with its identity.

use redb::{AccessGuard, Database, Key, ReadableDatabase, TableDefinition, Value};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// 2026-01-01T00:00:00Z in milliseconds: an epoch taken from the clock is at least this.
pub const CLOCK_FLOOR: u64 = 1_767_225_600_000;
/// With the clock unset too, the epoch is this (2109-05-15 in milliseconds) plus 31 random bits.
pub const UNSET_CLOCK_BASE: u64 = 1 << 42;

/// Where the copy of the epoch is kept: `<buffer file name>.epoch` beside it.
pub fn epoch_path(buffer: &Path) -> PathBuf {
    let mut name = buffer.file_name().unwrap_or_default().to_os_string();
    name.push(".epoch");
    buffer.with_file_name(name)
}

/// The epoch in the epoch file, if it holds one.
pub fn read_epoch(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

pub fn write_epoch(path: &Path, epoch: u64) -> std::io::Result<()> {
    crate::fsutil::write_atomic(path, format!("{epoch}\n").as_bytes())
}

/// The epoch of this open, from the epochs of the buffer file and of the epoch file (see the
/// module documentation), the clock in milliseconds, and a random number.
pub fn next_epoch(in_buffer: Option<u64>, in_file: Option<u64>, now_ms: u64, random: u32) -> u64 {
    let clock = (now_ms >= CLOCK_FLOOR).then_some(now_ms);
    match (in_buffer.max(in_file), clock) {
        (Some(e), c) => e.saturating_add(1).max(c.unwrap_or(0)),
        (None, Some(c)) => c,
        (None, None) => UNSET_CLOCK_BASE + u64::from(random >> 1),
    }
}

/// Waits (at most a few milliseconds) until the clock has passed `epoch`, when the epoch was
/// counted just ahead of it by restarts faster than one a millisecond.
pub fn pass_clock(epoch: u64) {
    loop {
        let now = crate::model::now_millis();
        if now < CLOCK_FLOOR || now > epoch || epoch - now > 10 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// A random number from the operating system's source (the seed of std's hash maps).
pub fn random() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(crate::model::now_millis());
    h.finish() as u32
}

thread_local! {
    static CONTAINED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, turning a panic inside it into `None`. For reading files that may hold any bytes:
/// the agent's panic hook (`main`) aborts on every other panic.
pub fn contain<T>(f: impl FnOnce() -> T) -> Option<T> {
    let was = CONTAINED.with(|c| c.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CONTAINED.with(|c| c.set(was));
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            let what = e
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| e.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(panic = %what, "reading the damaged buffer file failed inside redb; skipping the rest of that table");
            None
        }
    }
}

/// True while [`contain`] runs on this thread (the panic hook lets such a panic unwind).
pub fn contained() -> bool {
    CONTAINED.with(Cell::get)
}

/// What could be read back from a damaged file.
#[derive(Debug, Default)]
pub struct Salvaged {
    /// redb opened the file at all.
    pub opened: bool,
    pub epoch: Option<u64>,
    pub messages: BTreeMap<(String, u64, u64), Vec<u8>>,
    /// Pending gap events (JSON), by their old id.
    pub gaps: BTreeMap<u64, Vec<u8>>,
    pub drops: BTreeMap<(String, String), u64>,
    pub treatments: BTreeMap<(String, u64), Vec<u8>>,
    pub seqs: BTreeMap<(String, u64), Vec<u8>>,
    pub dead: BTreeMap<(String, u64, u64), Vec<u8>>,
}

/// Reads what it can of the damaged file `damaged` (left untouched: the reading is done on
/// `scratch`, a copy removed afterwards).
pub fn salvage(damaged: &Path, scratch: &Path, tables: &Tables) -> Salvaged {
    let mut out = Salvaged::default();
    if std::fs::copy(damaged, scratch).is_ok() {
        if let Some(Ok(db)) = contain(|| Database::builder().open(scratch)) {
            out.opened = true;
            read_table(&db, tables.meta, &mut |k, v| {
                if k.value() == "epoch" {
                    out.epoch = Some(v.value());
                }
            });
            read_messages(&db, tables.messages, &mut out.messages);
            read_table(&db, tables.gaps, &mut |k, v| {
                out.gaps.insert(k.value(), v.value().to_vec());
            });
            read_table(&db, tables.drops, &mut |k, v| {
                let (p, r) = k.value();
                out.drops.insert((p.to_string(), r.to_string()), v.value());
            });
            read_table(&db, tables.treatments, &mut |k, v| {
                let (p, f) = k.value();
                out.treatments.insert((p.to_string(), f), v.value().to_vec());
            });
            read_table(&db, tables.seqs, &mut |k, v| {
                let (p, e) = k.value();
                out.seqs.insert((p.to_string(), e), v.value().to_vec());
            });
            read_table(&db, tables.dead, &mut |k, v| {
                let (p, e, s) = k.value();
                out.dead.insert((p.to_string(), e, s), v.value().to_vec());
            });
            let _ = contain(move || drop(db));
        }
    }
    let _ = std::fs::remove_file(scratch);
    out
}

/// The buffer's tables (defined in `store`).
pub struct Tables {
    pub meta: TableDefinition<'static, &'static str, u64>,
    pub messages: TableDefinition<'static, (&'static str, u64, u64), &'static [u8]>,
    pub gaps: TableDefinition<'static, u64, &'static [u8]>,
    pub drops: TableDefinition<'static, (&'static str, &'static str), u64>,
    pub treatments: TableDefinition<'static, (&'static str, u64), &'static [u8]>,
    pub seqs: TableDefinition<'static, (&'static str, u64), &'static [u8]>,
    pub dead: TableDefinition<'static, (&'static str, u64, u64), &'static [u8]>,
}

type MessageKey = (String, u64, u64);
type MessagesTable = TableDefinition<'static, (&'static str, u64, u64), &'static [u8]>;

/// Most seqs probed one by one (see [`read_messages`]).
const PROBES: usize = 1 << 18;
/// Seqs probed past the last one found in a stream.
const PROBE_PAST: u64 = 4096;

/// Every message that reads back, damage or not: a forward scan that, where it fails, starts
/// again at the next epoch of the product, then at the next product; a backward scan from the
/// end; then, per `(product, epoch)` stream found, every seq from 1 to a little past the last one
/// found, looked up one by one (around a damaged page inside a stream).
fn read_messages(db: &Database, table: MessagesTable, out: &mut BTreeMap<MessageKey, Vec<u8>>) {
    let mut start: MessageKey = (String::new(), 0, 0);
    let mut level = 0;
    for _ in 0..1000 {
        let mut last: Option<MessageKey> = None;
        let done = contain(|| -> bool {
            let Ok(tx) = db.begin_read() else { return false };
            let Ok(t) = tx.open_table(table) else { return false };
            let from = (start.0.as_str(), start.1, start.2);
            let Ok(range) = redb::ReadableTable::range(&t, from..) else {
                return false;
            };
            for entry in range {
                let Ok((k, v)) = entry else { return false };
                let (p, e, s) = k.value();
                out.insert((p.to_string(), e, s), v.value().to_vec());
                last = Some((p.to_string(), e, s));
            }
            true
        })
        .unwrap_or(false);
        if done {
            break;
        }
        // Where it failed: just after the last message read, or at the start itself.
        let at = match last {
            Some(k) => {
                level = 0;
                k
            }
            None => {
                level += 1;
                start.clone()
            }
        };
        start = match level {
            0 if at.1 < u64::MAX => (at.0, at.1 + 1, 0),
            0 | 1 => (format!("{}\0", at.0), 0, 0),
            _ => break,
        };
    }
    read_table(db, table, &mut |k, v| {
        let (p, e, s) = k.value();
        out.insert((p.to_string(), e, s), v.value().to_vec());
    });
    let mut streams: BTreeMap<(String, u64), u64> = BTreeMap::new();
    for (p, e, s) in out.keys() {
        let last = streams.entry((p.clone(), *e)).or_default();
        *last = (*last).max(*s);
    }
    let mut budget = PROBES;
    let _ = contain(|| {
        let Ok(tx) = db.begin_read() else { return };
        let Ok(t) = tx.open_table(table) else { return };
        for ((p, e), last) in streams {
            for seq in 1..=last.saturating_add(PROBE_PAST) {
                if budget == 0 {
                    return;
                }
                let key = (p.clone(), e, seq);
                if out.contains_key(&key) {
                    continue;
                }
                budget -= 1;
                if let Ok(Some(v)) = redb::ReadableTable::get(&t, (p.as_str(), e, seq)) {
                    out.insert(key, v.value().to_vec());
                }
            }
        }
    });
}

/// Every entry of a table that reads back: forwards until the first error, then backwards from
/// the end until the first error.
fn read_table<K: Key + 'static, V: Value + 'static>(
    db: &Database,
    table: TableDefinition<K, V>,
    each: &mut dyn FnMut(&AccessGuard<K>, &AccessGuard<V>),
) {
    let mut pass = |backwards: bool| -> bool {
        contain(|| {
            let Ok(tx) = db.begin_read() else { return false };
            let Ok(t) = tx.open_table(table) else { return false };
            let Ok(iter) = redb::ReadableTable::iter(&t) else {
                return false;
            };
            let mut step = |entry: Result<(AccessGuard<K>, AccessGuard<V>), redb::StorageError>| match entry {
                Ok((k, v)) => {
                    each(&k, &v);
                    true
                }
                Err(_) => false,
            };
            if backwards {
                iter.rev().all(&mut step)
            } else {
                iter.into_iter().all(&mut step)
            }
        })
        .unwrap_or(false)
    };
    if !pass(false) {
        pass(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_epoch_is_one_more_than_the_larger_copy_or_the_clock() {
        let now = CLOCK_FLOOR + 1000;
        // Counted ahead of the clock (restarts faster than the clock moves, or a clock set back).
        assert_eq!(next_epoch(Some(now + 7), None, now, 0), now + 8);
        assert_eq!(next_epoch(None, Some(now + 7), now, 0), now + 8);
        assert_eq!(next_epoch(Some(now + 3), Some(now + 9), now, 0), now + 10);
        assert_eq!(next_epoch(Some(now + 9), Some(now + 3), now, 0), now + 10);
        // Behind the clock: the clock.
        assert_eq!(next_epoch(Some(7), Some(3), now, 0), now);
        assert_eq!(next_epoch(None, None, now, 0), now);
        // A clock that is not set is not used.
        assert_eq!(next_epoch(Some(7), None, 12, 0), 8);
        let unset = next_epoch(None, None, 12, u32::MAX);
        assert!(
            (UNSET_CLOCK_BASE..UNSET_CLOCK_BASE + (1 << 31)).contains(&unset),
            "{unset}"
        );
        assert!(unset > CLOCK_FLOOR * 2 && unset < 1 << 53);
    }

    #[test]
    fn an_open_returns_after_the_clock_passed_its_epoch() {
        let now = crate::model::now_millis();
        pass_clock(now + 3);
        assert!(crate::model::now_millis() > now + 3);
    }

    #[test]
    fn the_epoch_file_round_trips_and_garbage_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let p = epoch_path(&dir.path().join("buffer.redb"));
        assert_eq!(p.file_name().unwrap(), "buffer.redb.epoch");
        assert_eq!(read_epoch(&p), None);
        write_epoch(&p, 42).unwrap();
        assert_eq!(read_epoch(&p), Some(42));
        std::fs::write(&p, b"\x00\xff").unwrap();
        assert_eq!(read_epoch(&p), None);
    }

    #[test]
    fn a_panic_is_contained_and_the_flag_restored() {
        assert!(!contained());
        assert_eq!(contain(|| 5), Some(5));
        let r: Option<()> = contain(|| {
            assert!(contained());
            panic!("bad page")
        });
        assert_eq!(r, None);
        assert!(!contained());
    }
}
