//! The store against a model, and its file formats.

use super::*;
use proptest::prelude::*;
use std::collections::{BTreeSet, VecDeque};

const TOPIC: &str = "t";
const VERSION: &str = "1.0.0";

#[derive(Debug, Clone)]
enum Op {
    /// A message the commit numbers (`[buffer] write = "always"`), committed at once.
    Append {
        product: usize,
        records: u32,
        body: usize,
    },
    Ack {
        product: usize,
        nth: usize,
    },
    /// A message numbered in memory and staged (the live path); a product out of reserved seqs
    /// commits first, reserving a few.
    Stage {
        product: usize,
        records: u32,
        body: usize,
    },
    /// A staged message acknowledged before its commit: never written.
    AckStaged {
        product: usize,
        nth: usize,
    },
    /// The commit interval is up: every staged message is committed.
    CommitStaged,
    /// A commit that leaves the `keep` youngest staged messages staged.
    CommitOld {
        keep: usize,
    },
    /// A clean stop (the last commit releases the reservation), then open again.
    Close,
    /// A crash: the staged messages are gone; open again.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..2usize, 1..5u32, 10..400usize).prop_map(|(product, records, body)| Op::Append { product, records, body }),
        3 => (0..2usize, 0..8usize).prop_map(|(product, nth)| Op::Ack { product, nth }),
        4 => (0..2usize, 1..5u32, 10..400usize).prop_map(|(product, records, body)| Op::Stage { product, records, body }),
        2 => (0..2usize, 0..4usize).prop_map(|(product, nth)| Op::AckStaged { product, nth }),
        2 => Just(Op::CommitStaged),
        2 => (0..4usize).prop_map(|keep| Op::CommitOld { keep }),
        1 => Just(Op::Close),
        1 => Just(Op::Reopen),
    ]
}

/// Seqs reserved per product when a staged message finds none left (small, so that crashes leave
/// unused reserved seqs and reservations run out often).
const RESERVE: u64 = 3;

const PRODUCTS: [&str; 2] = ["alpha", "beta"];
const POLICIES: [FullPolicy; 2] = [FullPolicy::DropOldest, FullPolicy::RejectNew];
const SHARE: u64 = 1500;
const TOTAL: u64 = 2400;

fn size(product: &str, body: usize) -> u64 {
    (40 + TOPIC.len() + VERSION.len() + body + product.len()) as u64 + PER_MESSAGE_OVERHEAD
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
    /// Numbered in memory, not committed: (id, records, body length).
    staged: Vec<(usize, MessageId, u32, usize)>,
    /// As the last commit left them in this epoch.
    sealed: [u64; 2],
    reserved: [u64; 2],
    /// Seqs a `crash` gap event covers (delivered or lost, nobody knows).
    crashed: [BTreeSet<MessageId>; 2],
}

impl Model {
    fn total(&self) -> u64 {
        self.queues.iter().flatten().map(|m| m.2).sum()
    }
    fn bytes(&self, p: usize) -> u64 {
        self.queues[p].iter().map(|m| m.2).sum()
    }

    /// A message reaching the store: stored, or dropped under its product's policy.
    fn place(&mut self, product: usize, id: MessageId, records: u32, body: usize) {
        let sz = size(PRODUCTS[product], body);
        let fits = |m: &Model| m.bytes(product) + sz <= SHARE && m.total() + sz <= TOTAL;
        if !fits(self) && POLICIES[product] == FullPolicy::DropOldest {
            // Would dropping this product's oldest make room?
            let mut k = 0;
            let (mut pb, mut t) = (self.bytes(product), self.total());
            while !(pb + sz <= SHARE && t + sz <= TOTAL) && k < self.queues[product].len() {
                pb -= self.queues[product][k].2;
                t -= self.queues[product][k].2;
                k += 1;
            }
            if pb + sz <= SHARE && t + sz <= TOTAL {
                for _ in 0..k {
                    let (_, recs, _) = self.queues[product].pop_front().unwrap();
                    self.dropped_records[product] += u64::from(recs);
                }
            }
        }
        if fits(self) {
            self.queues[product].push_back((id, records, sz));
        } else {
            self.dropped_records[product] += u64::from(records);
        }
    }

    /// A commit: the staged messages first, then the seqs settle (`reserve`: seqs kept ahead).
    fn commit(&mut self, reserve: [u64; 2], release: bool) {
        self.commit_old(0, reserve, release);
    }

    /// A commit of all but the `keep` youngest staged messages; only seqs below a message still
    /// staged are sealed.
    fn commit_old(&mut self, keep: usize, reserve: [u64; 2], release: bool) {
        let at = self.staged.len().saturating_sub(keep);
        let kept = self.staged.split_off(at);
        for (p, id, records, body) in std::mem::take(&mut self.staged) {
            self.place(p, id, records, body);
        }
        for (p, ahead) in reserve.into_iter().enumerate() {
            let numbered = self.next_seq[p] - 1;
            let lowest = kept.iter().filter(|k| k.0 == p).map(|k| k.1.seq).min();
            self.sealed[p] = lowest.map_or(numbered, |l| numbered.min(l - 1));
            self.reserved[p] = if release {
                self.sealed[p]
            } else {
                self.reserved[p].max(numbered + ahead)
            };
        }
        self.staged = kept;
    }

    /// A new epoch after a stop: what a crash may have lost is covered by a `crash` gap event.
    /// A reopen; the store's new epoch must be above every earlier one (`then`).
    fn reopen(&mut self) {
        for p in 0..2 {
            for seq in self.sealed[p] + 1..=self.reserved[p] {
                self.crashed[p].insert(MessageId { epoch: self.epoch, seq });
            }
        }
        self.staged.clear();
        self.next_seq = [1, 1];
        self.sealed = [0, 0];
        self.reserved = [0, 0];
    }
}

/// The staged messages of the model, as the writer would hand them to a commit.
fn numbered(store: &Store, m: &Model) -> Vec<Arc<StoredMessage>> {
    m.staged
        .iter()
        .map(|&(p, id, records, body)| {
            let key = store.key(PRODUCTS[p]);
            Arc::new(StoredMessage {
                product: key,
                name: store.name(key),
                id,
                created: 1,
                records,
                topic: TOPIC.into(),
                version: VERSION.into(),
                governance: 7,
                last_seq: id.seq,
                body: vec![b'x'; body],
            })
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn store_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.redb");
        let mut store = open(&path);
        let mut m = Model { epoch: store.epoch(), next_seq: [1, 1], ..Default::default() };
        for op in ops {
            match op {
                Op::Append { product, records, body } => {
                    let name = PRODUCTS[product];
                    let staged = numbered(&store, &m);
                    for (p, id, records, body) in std::mem::take(&mut m.staged) {
                        m.place(p, id, records, body);
                    }
                    let id = MessageId { epoch: m.epoch, seq: m.next_seq[product] };
                    m.next_seq[product] += 1;
                    m.assigned[product].insert(id);
                    m.place(product, id, records, body);
                    m.commit([0, 0], false);
                    let new = NewMessage { product: store.key(name), created: 1, records, topic: TOPIC.into(), version: VERSION.into(), governance: 7, body: vec![b'x'; body] };
                    store.commit(Batch { numbered: staged, appends: vec![new], ..Default::default() }).unwrap();
                }
                Op::Ack { product, nth } => {
                    if let Some(&(id, _, _)) = m.queues[product].get(nth) {
                        m.queues[product].remove(nth);
                        m.acked[product].insert(id);
                        let key = store.key(PRODUCTS[product]);
                        let staged = numbered(&store, &m);
                        m.commit([0, 0], false);
                        store.commit(Batch { numbered: staged, acks: vec![(key, id)], ..Default::default() }).unwrap();
                    }
                }
                Op::Stage { product, records, body } => {
                    let key = store.key(PRODUCTS[product]);
                    prop_assert_eq!(store.reserved_left(key), m.reserved[product] - (m.next_seq[product] - 1));
                    if store.reserved_left(key) == 0 {
                        let staged = numbered(&store, &m);
                        let mut reserve = [0, 0];
                        reserve[product] = RESERVE;
                        m.commit(reserve, false);
                        store.commit(Batch { numbered: staged, reserve: vec![(key, RESERVE)], ..Default::default() }).unwrap();
                    }
                    let id = store.number(key).unwrap();
                    prop_assert_eq!(id, MessageId { epoch: m.epoch, seq: m.next_seq[product] });
                    m.next_seq[product] += 1;
                    m.assigned[product].insert(id);
                    m.staged.push((product, id, records, body));
                }
                Op::AckStaged { product, nth } => {
                    let mine: Vec<usize> = (0..m.staged.len()).filter(|&i| m.staged[i].0 == product).collect();
                    if let Some(&i) = mine.get(nth) {
                        let (_, id, _, _) = m.staged.remove(i);
                        m.acked[product].insert(id);
                    }
                }
                Op::CommitStaged => {
                    let staged = numbered(&store, &m);
                    m.commit([0, 0], false);
                    store.commit(Batch { numbered: staged, ..Default::default() }).unwrap();
                }
                Op::CommitOld { keep } => {
                    let at = m.staged.len().saturating_sub(keep);
                    let mut unsealed: Vec<(ProductKey, u64)> = Vec::new();
                    for k in &m.staged[at..] {
                        let key = store.key(PRODUCTS[k.0]);
                        match unsealed.iter_mut().find(|u| u.0 == key) {
                            Some(u) => u.1 = u.1.min(k.1.seq),
                            None => unsealed.push((key, k.1.seq)),
                        }
                    }
                    let staged = numbered(&store, &m);
                    m.commit_old(keep, [0, 0], false);
                    store.commit(Batch { numbered: staged[..at].to_vec(), unsealed, ..Default::default() }).unwrap();
                }
                Op::Close => {
                    let staged = numbered(&store, &m);
                    m.commit([0, 0], true);
                    store.commit(Batch { numbered: staged, release: true, ..Default::default() }).unwrap();
                    drop(store);
                    m.reopen();
                    let (s, report) = Store::open(&path, TOTAL, 1 << 20).unwrap();
                    prop_assert!(report.crashed.is_empty(), "a clean stop announces no crash: {:?}", report.crashed);
                    // (That open was an epoch too.)
                    prop_assert!(s.epoch() > m.epoch);
                    m.epoch = s.epoch();
                    drop(s);
                    store = open(&path);
                    prop_assert!(store.epoch() > m.epoch);
                    m.epoch = store.epoch();
                }
                Op::Reopen => {
                    drop(store);
                    m.reopen();
                    store = open(&path);
                    prop_assert!(store.epoch() > m.epoch);
                    m.epoch = store.epoch();
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
                // Staged messages are not decided yet; a crash covers what it may have lost
                // (acknowledged ones among them too: the store cannot know).
                let pending: BTreeSet<MessageId> = m.queues[p].iter().map(|q| q.0).chain(m.staged.iter().filter(|s| s.0 == p).map(|s| s.1)).collect();
                let mut expected: BTreeSet<MessageId> = m.assigned[p].iter().filter(|id| !pending.contains(id) && !m.acked[p].contains(id)).copied().collect();
                expected.extend(m.crashed[p].iter().copied());
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
    let damage = report.damage.expect("moved aside");
    assert!(damage.aside.exists());
    assert_eq!(
        std::fs::read(&damage.aside).unwrap(),
        vec![0xA5u8; 8192],
        "kept as it was"
    );
    assert!(store.epoch() >= recover::CLOCK_FLOOR, "no copy of the epoch: the clock");
    assert!(store.reader().is_empty().unwrap());
}

#[test]
fn epoch_bumps_and_messages_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffer.redb");
    let (mut s, r) = Store::open(&path, 1 << 20, 1 << 20).unwrap();
    let e1 = r.epoch;
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
    assert_eq!(done.appended, vec![(p, MessageId { epoch: e1, seq: 1 }, 2)]);
    drop(s);
    let (s, r) = Store::open(&path, 1 << 20, 1 << 20).unwrap();
    assert!(r.epoch > e1);
    assert_eq!(r.pending_messages, 1);
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
fn older_formats_read_back_and_the_checksum_sees_every_flipped_byte() {
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
    let v3 = m.encode();
    assert!(StoredMessage::intact(&name, m.id, &v3));
    assert!(!StoredMessage::intact("q", m.id, &v3), "bound to its key");
    assert!(
        !StoredMessage::intact(&name, MessageId { epoch: 1, seq: 2 }, &v3),
        "bound to its key"
    );
    // Format 2: the same without the checksum; format 1 without the governance fingerprint too.
    let mut v2 = v3[..v3.len() - 8].to_vec();
    v2[0] = 2;
    let mut v1 = v2.clone();
    v1[0] = 1;
    v1.drain(13..29);
    assert_eq!(StoredMessage::decode(m.product, &name, m.id, &v2), Some(m.clone()));
    for at in 0..v3.len() {
        let mut rotten = v3.clone();
        rotten[at] ^= 0x04;
        assert!(
            !StoredMessage::intact(&name, m.id, &rotten),
            "a flip at byte {at} goes unseen"
        );
    }
    let old = StoredMessage::decode(m.product, &name, m.id, &v1).unwrap();
    assert_eq!(old.governance, crate::govern::treatment::UNKNOWN);
    assert_eq!((old.topic.as_str(), old.body.as_slice()), ("a/b", &b"[{},{}]"[..]));
    assert_eq!(StoredMessage::decode(m.product, &name, m.id, &v3), Some(m.clone()));
    for cut in 0..v3.len() {
        // Truncated bytes never panic; too short for the header reads as nothing.
        let _ = StoredMessage::decode(key, &name, MessageId { epoch: 1, seq: 1 }, &v3[..cut]);
        assert!(!StoredMessage::intact(&name, m.id, &v3[..cut]));
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
    let ids: Vec<MessageId> = (1..=5).map(|seq| MessageId { epoch: s.epoch(), seq }).collect();
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

/// `max_bytes` bounds the file on disk, not only the bytes of the messages: a product filled to
/// its cap again and again (drop_oldest, small and large messages, commits of a few hundred KiB
/// at most as a commit interval makes them) leaves a file no larger than `max_bytes` plus the
/// margin docs/configuration.md states.
#[test]
fn the_file_stays_within_max_bytes_and_its_margin() {
    // How many times each cap is written over (fewer under emulation).
    let fills: u64 = std::env::var("PLANTMESH_FILE_FILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    for (cap, size_max, per_commit) in [
        (4u64 << 20, 3_000usize, 20),
        (16 << 20, 300_000, 2),
        (16 << 20, 40_000, 10),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.redb");
        let (mut s, _) = Store::open(&path, cap, 1 << 20).unwrap();
        let p = s.key("p");
        s.set_limits(
            p,
            ProductLimits {
                max_bytes: cap,
                policy: FullPolicy::DropOldest,
                gap_topic: "g".into(),
            },
        );
        let mut rng = 0x1234_5678_9abc_def1_u64;
        let mut largest = 0;
        let mut written = 0u64;
        while written < cap * fills {
            let mut appends = Vec::new();
            for _ in 0..per_commit {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let n = 10 + (rng % size_max as u64) as usize;
                written += n as u64;
                appends.push(NewMessage {
                    product: p,
                    created: 1,
                    records: 1,
                    topic: TOPIC.into(),
                    version: VERSION.into(),
                    governance: 1,
                    body: vec![b'x'; n],
                });
            }
            s.commit(Batch {
                appends,
                ..Default::default()
            })
            .unwrap();
            largest = largest.max(std::fs::metadata(&path).unwrap().len());
        }
        eprintln!(
            "cap {cap}, messages up to {size_max} B: file at most {largest} B ({:.2}x), {} B of messages held",
            largest as f64 / cap as f64,
            s.total_bytes()
        );
        assert!(
            largest <= cap + super::FILE_MARGIN,
            "cap {cap}, messages up to {size_max} B: the file reached {largest} B"
        );
    }
}
