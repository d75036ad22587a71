//! The store against damaged files: lost, emptied, truncated, bit-rotted, pages zeroed or swapped.
//! `PLANTMESH_DAMAGE_CASES` sets how many mutated files the property test opens (default 60).

use super::*;
use crate::buffer::sim_disk::Rng;
use std::collections::BTreeMap;

const PAGE: usize = 4096;

/// Panics inside redb that `recover::contain` turns into damage are not reported (as in the
/// agent's own hook); every other panic is.
fn quiet_contained_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !recover::contained() {
                report(info);
            }
        }));
    });
}

fn new(product: ProductKey, n: u64) -> NewMessage {
    NewMessage {
        product,
        created: n,
        records: 1,
        topic: "plant/a".into(),
        version: "1.0.0".into(),
        governance: 5,
        body: format!("[{{\"n\":{n},\"pad\":\"{}\"}}]", "x".repeat((n % 7 * 300) as usize)).into_bytes(),
    }
}

/// A buffer written over three opens: two products, messages committed, some acknowledged, gap
/// events pending, seqs reserved. Returns every epoch used, the raw messages it holds, and every
/// message it ever held (stale copies of acknowledged ones may linger in free pages).
type Raw = BTreeMap<(String, u64, u64), Vec<u8>>;
fn reference(path: &Path) -> (Vec<u64>, Raw, Raw) {
    quiet_contained_panics();
    let mut epochs = Vec::new();
    let mut ever = Raw::new();
    for round in 0..3u64 {
        let (mut s, _) = Store::open(path, 64 << 20, 1 << 20).unwrap();
        epochs.push(s.epoch());
        let (a, b) = (s.key("a.v1"), s.key("b.v1"));
        for p in [a, b] {
            s.set_limits(
                p,
                ProductLimits {
                    max_bytes: 32 << 20,
                    policy: FullPolicy::DropOldest,
                    gap_topic: format!("gaps/{}", s.name(p)),
                },
            );
        }
        let appends = (0..40)
            .map(|i| new(if i % 3 == 0 { b } else { a }, round * 100 + i))
            .collect();
        let done = s
            .commit(Batch {
                appends,
                refused: vec![(a, 2, GapReason::WriterOverload)],
                reserve: vec![(a, 64), (b, 64)],
                ..Default::default()
            })
            .unwrap();
        let tx = s.db.get().unwrap().begin_read().unwrap();
        for e in tx.open_table(MESSAGES).unwrap().iter().unwrap() {
            let (k, v) = e.unwrap();
            let (p, e, q) = k.value();
            ever.insert((p.to_string(), e, q), v.value().to_vec());
        }
        drop(tx);
        let acks = done.appended.iter().step_by(4).map(|(p, id, _)| (*p, *id)).collect();
        s.commit(Batch {
            acks,
            ..Default::default()
        })
        .unwrap();
    }
    (epochs, raw_messages(path).expect("the reference file reads back"), ever)
}

/// The messages of a file as redb point lookups see them (none if it cannot be opened).
fn raw_messages(path: &Path) -> Option<Raw> {
    let db = Database::builder().open(path).ok()?;
    let tx = db.begin_read().ok()?;
    let t = tx.open_table(MESSAGES).ok()?;
    let mut out = BTreeMap::new();
    for e in t.iter().ok()? {
        let (k, v) = e.ok()?;
        let (p, e, s) = k.value();
        out.insert((p.to_string(), e, s), v.value().to_vec());
    }
    Some(out)
}

/// Which of `keys` a plain open of `path` still returns unchanged by point lookup: the messages
/// that survived the damage.
fn survivors(path: &Path, expected: &Raw) -> Vec<(String, u64, u64)> {
    let scratch = path.with_extension("probe");
    std::fs::copy(path, &scratch).unwrap();
    let found = recover::contain(|| {
        let mut found = Vec::new();
        let Ok(db) = Database::builder().open(&scratch) else {
            return found;
        };
        for (k, v) in expected {
            let got = recover::contain(|| {
                let tx = db.begin_read().ok()?;
                let t = tx.open_table(MESSAGES).ok()?;
                let g = t.get((k.0.as_str(), k.1, k.2)).ok()??;
                Some(g.value().to_vec())
            })
            .flatten();
            if got.as_deref() == Some(v.as_slice()) {
                found.push(k.clone());
            }
        }
        found
    })
    .unwrap_or_default();
    let _ = std::fs::remove_file(&scratch);
    found
}

#[derive(Debug, Clone, Copy)]
enum Mutation {
    BitFlips,
    Truncate,
    ZeroPage,
    SwapPages,
}

/// Damages `bytes`; pages holding messages are hit half the time (the rest of a redb file is
/// mostly free space, where damage changes nothing).
fn mutate(bytes: &mut Vec<u8>, kind: Mutation, rng: &mut Rng) {
    let hot: Vec<usize> = bytes
        .windows(5)
        .enumerate()
        .filter(|(_, w)| *w == b"{\"n\":")
        .map(|(i, _)| i / PAGE)
        .collect();
    let pages = bytes.len() / PAGE;
    let page = |rng: &mut Rng| {
        if !hot.is_empty() && rng.next_u64().is_multiple_of(2) {
            hot[rng.index(hot.len())]
        } else {
            rng.index(pages)
        }
    };
    match kind {
        Mutation::BitFlips => {
            for _ in 0..1 + rng.index(8) {
                let at = page(rng) * PAGE + rng.index(PAGE);
                if at < bytes.len() {
                    bytes[at] ^= 1 << rng.index(8);
                }
            }
        }
        Mutation::Truncate => {
            let at = rng.index(bytes.len());
            bytes.truncate(at);
        }
        Mutation::ZeroPage => {
            let p = page(rng);
            bytes[p * PAGE..(p + 1) * PAGE].fill(0);
        }
        Mutation::SwapPages => {
            let (x, y) = (page(rng), page(rng));
            if x != y {
                let (lo, hi) = (x.min(y), x.max(y));
                let (a, b) = bytes.split_at_mut(hi * PAGE);
                a[lo * PAGE..(lo + 1) * PAGE].swap_with_slice(&mut b[..PAGE]);
            }
        }
    }
}

fn reopened_messages(store: &Store) -> Raw {
    let tx = store.db.get().unwrap().begin_read().unwrap();
    let t = tx.open_table(MESSAGES).unwrap();
    t.iter()
        .unwrap()
        .map(|e| {
            let (k, v) = e.unwrap();
            let (p, e, s) = k.value();
            ((p.to_string(), e, s), v.value().to_vec())
        })
        .collect()
}

#[test]
fn a_lost_or_emptied_buffer_file_never_restarts_the_epoch() {
    for (case, damage) in [
        "deleted",
        "empty",
        "garbage",
        "half",
        "first page",
        "deleted with its epoch file",
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.redb");
        let (epochs, _, ever) = reference(&path);
        let bytes = std::fs::read(&path).unwrap();
        let written: Option<Vec<u8>> = match damage {
            "empty" => Some(Vec::new()),
            "garbage" => Some(vec![0x5Au8; bytes.len()]),
            "half" => Some(bytes[..bytes.len() / 2].to_vec()),
            "first page" => {
                let mut b = bytes.clone();
                b[..PAGE].fill(0);
                Some(b)
            }
            _ => None,
        };
        match &written {
            Some(b) => std::fs::write(&path, b).unwrap(),
            None => std::fs::remove_file(&path).unwrap(),
        }
        if damage == "deleted with its epoch file" {
            std::fs::remove_file(recover::epoch_path(&path)).unwrap();
        }
        let (mut store, report) = Store::open(&path, 64 << 20, 1 << 20).unwrap();
        let last = *epochs.last().unwrap();
        assert!(
            report.epoch > last,
            "case {case} ({damage}): epoch {} after {epochs:?}",
            report.epoch
        );
        if damage.starts_with("deleted") {
            assert!(report.damage.is_none());
            continue;
        }
        let d = report
            .damage
            .unwrap_or_else(|| panic!("case {case} ({damage}): not reported"));
        assert_eq!(
            Some(std::fs::read(&d.aside).unwrap()),
            written,
            "case {case} ({damage}): kept aside as found"
        );
        assert_eq!(d.last_epoch, report.epoch - 1);
        let salvaged = reopened_messages(&store);
        for (k, v) in &salvaged {
            assert_eq!(
                ever.get(k),
                Some(v),
                "case {case} ({damage}): a salvaged message is not one the file held"
            );
        }
        // The loss is announced for every product, those only the configuration names too.
        let events = store
            .record_damage(
                &d,
                &[("c.v1".into(), "gaps/c.v1".into()), ("a.v1".into(), "gaps/a.v1".into())],
            )
            .unwrap();
        let mut named: Vec<&str> = events.iter().map(|e| e.product.as_str()).collect();
        named.sort();
        let from_file = d.topics.iter().any(|(n, _)| n == "b.v1");
        assert_eq!(
            named,
            if from_file {
                vec!["a.v1", "b.v1", "c.v1"]
            } else {
                vec!["a.v1", "c.v1"]
            }
        );
        for e in &events {
            assert_eq!(
                (e.reason.clone(), e.epoch, e.from_seq, e.to_seq, e.count),
                (GapReason::BufferCorrupt, report.epoch - 1, 1, u64::MAX, 0)
            );
        }
        let pending = store.reader().gaps(100).unwrap();
        assert!(
            events.iter().all(|e| pending.iter().any(|(_, g)| g == e)),
            "the events are stored to be sent"
        );
    }
}

#[test]
fn a_file_that_fails_its_check_is_salvaged_with_every_message_identical() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffer.redb");
    let (epochs, held, _) = reference(&path);
    // Rot one byte inside a message page: the integrity check refuses the file.
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.windows(5).position(|w| w == b"{\"n\":").unwrap();
    bytes[at + 40] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let alive = survivors(&path, &held);
    let (store, report) = Store::open(&path, 64 << 20, 1 << 20).unwrap();
    let d = report.damage.expect("the check refuses the file");
    assert!(d.opened);
    assert!(report.epoch > *epochs.last().unwrap());
    let salvaged = reopened_messages(&store);
    assert!(
        alive.len() >= held.len() / 2,
        "most survive one rotten byte: {} of {}",
        alive.len(),
        held.len()
    );
    for k in &alive {
        assert_eq!(salvaged.get(k), held.get(k), "{k:?} survived but was not salvaged");
    }
    assert_eq!(report.pending_messages, salvaged.len() as u64);
    // The crash report of the last run still comes: its reservation was salvaged.
    assert!(!report.crashed.is_empty());
}

#[test]
fn mutated_files_never_panic_reuse_an_epoch_or_lose_a_surviving_message() {
    let cases: u64 = std::env::var("PLANTMESH_DAMAGE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("reference.redb");
    let (epochs, held, ever) = reference(&original);
    let bytes = std::fs::read(&original).unwrap();
    let kept_epoch = std::fs::read(recover::epoch_path(&original)).unwrap();
    let kinds = [
        Mutation::BitFlips,
        Mutation::Truncate,
        Mutation::ZeroPage,
        Mutation::SwapPages,
    ];
    let (mut damaged, mut salvaged_total, mut survived_total) = (0, 0, 0);
    for case in 0..cases {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (case + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
        let kind = kinds[(case % 4) as usize];
        let mut b = bytes.clone();
        mutate(&mut b, kind, &mut rng);
        let path = dir.path().join(format!("case-{case}.redb"));
        std::fs::write(&path, &b).unwrap();
        // Half the cases lose the epoch file as well.
        if case % 2 == 0 {
            std::fs::write(recover::epoch_path(&path), &kept_epoch).unwrap();
        }
        let alive = survivors(&path, &held);
        let (store, report) = Store::open(&path, 64 << 20, 1 << 20)
            .unwrap_or_else(|e| panic!("case {case} ({kind:?}): the agent would not start: {e}"));
        assert!(
            report.epoch > *epochs.last().unwrap(),
            "case {case} ({kind:?}): epoch {} reused (earlier {epochs:?})",
            report.epoch
        );
        let now = reopened_messages(&store);
        for k in &alive {
            assert_eq!(
                now.get(k),
                held.get(k),
                "case {case} ({kind:?}): {k:?} survived the damage but is not in the buffer"
            );
        }
        for (k, v) in &now {
            // Intact and genuine: a message the file held (an acknowledged one whose stale page
            // was swapped in is a duplicate, which the consumer's dedupe drops).
            assert_eq!(
                ever.get(k),
                Some(v),
                "case {case} ({kind:?}): {k:?} is not a message the file held"
            );
        }
        damaged += usize::from(report.damage.is_some());
        salvaged_total += now.len();
        survived_total += alive.len();
        drop(store);
        for f in std::fs::read_dir(dir.path()).unwrap() {
            let f = f.unwrap().path();
            if f != original && f != recover::epoch_path(&original) {
                let _ = std::fs::remove_file(f);
            }
        }
    }
    eprintln!("{cases} mutated files: {damaged} found damaged, {survived_total} messages survived, {salvaged_total} in the buffers after open");
    assert!(
        cases < 8 || damaged > 0,
        "no mutation was ever found: the cases test nothing"
    );
}
