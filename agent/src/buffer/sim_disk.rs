//! A disk for tests, as redb's storage backend: it keeps what was synced apart from what was
//! written since, so that a simulated power cut can drop, keep or tear (sector by sector) each
//! write since the last sync; and it fails writes or syncs on demand (ENOSPC, EIO).

use std::io;
use std::sync::{Arc, Mutex};

/// Writes are torn at this granularity.
pub const SECTOR: usize = 512;

#[derive(Debug, Clone)]
enum Op {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

#[derive(Debug, Default)]
struct State {
    /// What survives any power cut.
    durable: Vec<u8>,
    /// Writes and resizes since the last sync, in order.
    pending: Vec<Op>,
    /// What reads see.
    volatile: Vec<u8>,
    fail_writes: Option<i32>,
    fail_syncs: Option<i32>,
    /// Operations (writes, resizes, syncs) left before the power goes (`None`: it stays on).
    power_left: Option<u64>,
    writes: u64,
    syncs: u64,
}

#[derive(Debug, Clone, Default)]
pub struct SimDisk(Arc<Mutex<State>>);

fn at(offset: u64) -> io::Result<usize> {
    usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

impl SimDisk {
    pub fn new() -> SimDisk {
        SimDisk::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// From now on every write fails with this OS error (`None`: writes work again).
    pub fn fail_writes(&self, errno: Option<i32>) {
        self.state().fail_writes = errno;
    }

    /// From now on every sync fails with this OS error (`None`: syncs work again).
    pub fn fail_syncs(&self, errno: Option<i32>) {
        self.state().fail_syncs = errno;
    }

    /// The power goes after `ops` more writes, resizes or syncs: from then on every one fails
    /// (EIO) and changes nothing, as on a machine that has stopped. [`SimDisk::power_cut`] then
    /// gives the disk as the next boot finds it.
    pub fn power_off_after(&self, ops: u64) {
        self.state().power_left = Some(ops);
    }

    /// Whether the power has gone.
    pub fn is_off(&self) -> bool {
        self.state().power_left == Some(0)
    }

    /// Syncs done (each is one fsync of a real file).
    pub fn syncs(&self) -> u64 {
        self.state().syncs
    }

    /// The disk as a power cut now leaves it: what was synced, and of each write since (in
    /// order) nothing, all of it, or some of its sectors, as `pick` says (0 drop, 1 keep, 2 tear;
    /// a torn write keeps each sector for which `pick` is odd).
    pub fn power_cut(&self, pick: &mut dyn FnMut() -> u64) -> SimDisk {
        let s = self.state();
        let mut image = s.durable.clone();
        for op in &s.pending {
            match op {
                Op::SetLen(n) => {
                    if pick() % 2 == 1 {
                        image.resize(*n as usize, 0);
                    }
                }
                Op::Write(offset, data) => {
                    let offset = *offset as usize;
                    let choice = pick() % 3;
                    if choice == 0 {
                        continue;
                    }
                    if image.len() < offset + data.len() {
                        image.resize(offset + data.len(), 0);
                    }
                    for (i, chunk) in data.chunks(SECTOR).enumerate() {
                        if choice == 1 || pick() % 2 == 1 {
                            let o = offset + i * SECTOR;
                            image[o..o + chunk.len()].copy_from_slice(chunk);
                        }
                    }
                }
            }
        }
        SimDisk(Arc::new(Mutex::new(State {
            durable: image.clone(),
            volatile: image,
            ..State::default()
        })))
    }
}

impl State {
    /// Counts one operation against the power left; false once it is gone.
    fn powered(&mut self) -> bool {
        match &mut self.power_left {
            Some(0) => false,
            Some(n) => {
                *n -= 1;
                true
            }
            None => true,
        }
    }
}

impl redb::StorageBackend for SimDisk {
    fn len(&self) -> io::Result<u64> {
        Ok(self.state().volatile.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let s = self.state();
        let o = at(offset)?;
        let src = s
            .volatile
            .get(o..o + out.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.state();
        if !s.powered() {
            return Err(io::Error::from_raw_os_error(5));
        }
        if let Some(e) = s.fail_writes.filter(|_| len > s.volatile.len() as u64) {
            return Err(io::Error::from_raw_os_error(e));
        }
        s.volatile.resize(at(len)?, 0);
        s.pending.push(Op::SetLen(len));
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut s = self.state();
        if !s.powered() {
            return Err(io::Error::from_raw_os_error(5));
        }
        if let Some(e) = s.fail_syncs {
            return Err(io::Error::from_raw_os_error(e));
        }
        s.durable = s.volatile.clone();
        s.pending.clear();
        s.syncs += 1;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut s = self.state();
        if !s.powered() {
            return Err(io::Error::from_raw_os_error(5));
        }
        if let Some(e) = s.fail_writes {
            return Err(io::Error::from_raw_os_error(e));
        }
        let o = at(offset)?;
        if s.volatile.len() < o + data.len() {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        s.volatile[o..o + data.len()].copy_from_slice(data);
        s.pending.push(Op::Write(offset, data.to_vec()));
        s.writes += 1;
        Ok(())
    }
}

/// A small deterministic generator for the storage property tests (cases reproduce from their
/// number).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }
}
