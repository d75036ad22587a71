//! The consumer's side of the delivery promise (docs/wire-format.md, "Completeness"), with no I/O:
//! fed the product messages and gap events a subscriber receives, it says what was delivered, what
//! came more than once (and whether the copies were byte-identical apart from `historical`), what
//! the agents announced as lost, by reason, and what is missing without an announcement (a hole).
//! `plantmesh verify` feeds it from a broker; the end-to-end tests feed it what their subscribers
//! saw, so both check the promise the same way.
//!
//! Streams are keyed by the fleet key: the product's URN (agent, product, major) and the epoch.
//! Within an epoch, the seqs that must be accounted for run from the lowest seen to the highest
//! seen; from 1 when the epoch began while this verifier watched (an earlier epoch of the same URN
//! had arrived before it). A `buffer_corrupt` event writes off whatever has not arrived of its
//! epoch and of every earlier one. Beyond the highest seq seen nothing can be known: a message
//! still on its way is not a hole.

use serde::Serialize;
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

/// Everything seen, per URN and epoch.
#[derive(Debug, Default)]
pub struct Verifier {
    streams: BTreeMap<String, BTreeMap<u64, Epoch>>,
    /// Watching since before any agent started: every epoch is due from seq 1.
    all_from_start: bool,
    messages: u64,
    malformed: Vec<String>,
}

#[derive(Debug, Default)]
struct Epoch {
    /// seq -> (last_seq, digest of the content apart from `historical`) per delivered message.
    delivered: BTreeMap<u64, (u64, u64)>,
    /// Seqs delivered or announced (not by `buffer_corrupt`).
    covered: Ranges,
    /// Seqs delivered.
    arrived: Ranges,
    /// Seqs in `crash` events.
    crashed: Ranges,
    delivered_seqs: u64,
    copies: u64,
    duplicates: u64,
    differing: Vec<u64>,
    /// Gap reason -> (events, seqs).
    gaps: BTreeMap<String, (u64, u64)>,
    /// A later `buffer_corrupt` event of this URN: what has not arrived is lost.
    written_off: bool,
    /// The epoch began while the verifier watched: seqs are due from 1.
    from_start: bool,
}

/// Disjoint inclusive ranges, `start -> end`.
#[derive(Debug, Default, Clone)]
struct Ranges(BTreeMap<u64, u64>);

impl Ranges {
    fn insert(&mut self, from: u64, to: u64) {
        let (mut from, mut to) = (from, to);
        // Merge with a range starting before `from` that reaches it.
        if let Some((&s, &e)) = self.0.range(..=from).next_back() {
            if e.saturating_add(1) >= from {
                from = s;
                to = to.max(e);
            }
        }
        // Swallow ranges starting inside (or right after) the new one.
        while let Some((&s, &e)) = self.0.range(from..).next() {
            if s > to.saturating_add(1) {
                break;
            }
            to = to.max(e);
            self.0.remove(&s);
        }
        self.0.insert(from, to);
    }

    fn min(&self) -> Option<u64> {
        self.0.keys().next().copied()
    }

    fn max(&self) -> Option<u64> {
        self.0.values().next_back().copied()
    }

    /// The seqs of `lo..=hi` outside every range, as ranges.
    fn holes(&self, lo: u64, hi: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut next = lo;
        for (&s, &e) in &self.0 {
            if e < next {
                continue;
            }
            if s > hi {
                break;
            }
            if s > next {
                out.push((next, s - 1));
            }
            next = e.saturating_add(1);
        }
        if next <= hi {
            out.push((next, hi));
        }
        out
    }
}

/// A product message's identity and the digest of its content.
struct Head {
    epoch: u64,
    seq: u64,
    last_seq: u64,
    digest: u64,
}

fn head(payload: &[u8]) -> Result<Head, String> {
    let doc: BTreeMap<String, &RawValue> =
        serde_json::from_slice(payload).map_err(|e| format!("not a JSON object: {e}"))?;
    let int = |key: &str| -> Result<Option<u64>, String> {
        doc.get(key)
            .map(|raw| {
                serde_json::from_str::<u64>(raw.get()).map_err(|_| format!("`{key}` is not an unsigned integer"))
            })
            .transpose()
    };
    let epoch = int("epoch")?.ok_or("no `epoch`")?;
    let seq = int("seq")?.ok_or("no `seq`")?;
    let last_seq = int("last_seq")?.unwrap_or(seq);
    if seq == 0 || last_seq < seq {
        return Err(format!("seq {seq}..{last_seq} is not a range of seqs from 1"));
    }
    // The content apart from `historical`, which is the one field a resent copy may change.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for (k, v) in doc.iter().filter(|(k, _)| k.as_str() != "historical") {
        k.hash(&mut h);
        v.get().hash(&mut h);
    }
    Ok(Head {
        epoch,
        seq,
        last_seq,
        digest: h.finish(),
    })
}

#[derive(serde::Deserialize)]
struct GapEvent {
    epoch: u64,
    from_seq: u64,
    to_seq: u64,
    reason: String,
}

impl Verifier {
    pub fn new() -> Verifier {
        Verifier::default()
    }

    /// A verifier that watched since before any of the agents started (a test's subscriber):
    /// every epoch is due from seq 1.
    pub fn from_start() -> Verifier {
        Verifier {
            all_from_start: true,
            ..Verifier::default()
        }
    }

    /// The epoch entry of `urn`, made on first sight (due from seq 1 when an earlier epoch of the
    /// URN was seen before it).
    fn epoch(&mut self, urn: &str, epoch: u64) -> &mut Epoch {
        if !self.streams.contains_key(urn) {
            self.streams.insert(urn.to_string(), BTreeMap::new());
        }
        let all = self.all_from_start;
        let epochs = self
            .streams
            .get_mut(urn)
            .unwrap_or_else(|| unreachable!("inserted above"));
        let earlier = all || epochs.range(..epoch).next().is_some();
        epochs.entry(epoch).or_insert_with(|| Epoch {
            from_start: earlier,
            ..Epoch::default()
        })
    }

    /// A product message of `urn` (on its data topic).
    pub fn message(&mut self, urn: &str, payload: &[u8]) {
        self.messages += 1;
        let h = match head(payload) {
            Ok(h) => h,
            Err(e) => {
                self.malformed.push(format!("{urn}: {e}"));
                return;
            }
        };
        let e = self.epoch(urn, h.epoch);
        e.copies += 1;
        match e.delivered.get(&h.seq) {
            Some(&(last, digest)) => {
                e.duplicates += 1;
                if (last, digest) != (h.last_seq, h.digest) {
                    e.differing.push(h.seq);
                }
            }
            None => {
                e.delivered.insert(h.seq, (h.last_seq, h.digest));
                e.delivered_seqs += h.last_seq - h.seq + 1;
                e.covered.insert(h.seq, h.last_seq);
                e.arrived.insert(h.seq, h.last_seq);
            }
        }
    }

    /// A gap event of `urn` (on its `_gaps` topic).
    pub fn gap(&mut self, urn: &str, payload: &[u8]) {
        let g: GapEvent = match serde_json::from_slice(payload) {
            Ok(g) => g,
            Err(e) => {
                self.malformed.push(format!("{urn}: gap event: {e}"));
                return;
            }
        };
        if g.to_seq < g.from_seq {
            self.malformed
                .push(format!("{urn}: gap event {}..{} is not a range", g.from_seq, g.to_seq));
            return;
        }
        let corrupt = g.reason == "buffer_corrupt";
        let e = self.epoch(urn, g.epoch);
        if g.reason == "crash" {
            e.crashed.insert(g.from_seq, g.to_seq);
        }
        let tally = e.gaps.entry(g.reason).or_default();
        tally.0 += 1;
        tally.1 += g.to_seq - g.from_seq + 1;
        if corrupt {
            if let Some(epochs) = self.streams.get_mut(urn) {
                for e in epochs.range_mut(..=g.epoch).map(|(_, e)| e) {
                    e.written_off = true;
                }
            }
        } else {
            e.covered.insert(g.from_seq, g.to_seq);
        }
    }

    pub fn report(&self) -> Report {
        let mut r = Report {
            messages: self.messages,
            malformed: self.malformed.clone(),
            ..Report::default()
        };
        for (urn, epochs) in &self.streams {
            for (&epoch, e) in epochs {
                let (Some(lo), Some(hi)) = (e.covered.min(), e.covered.max()) else {
                    // Only a `buffer_corrupt` event.
                    r.streams.push(EpochReport::of(urn, epoch, e, Vec::new()));
                    continue;
                };
                let holes = if e.written_off {
                    Vec::new()
                } else {
                    e.covered.holes(if e.from_start { 1 } else { lo }, hi)
                };
                r.streams.push(EpochReport::of(urn, epoch, e, holes));
            }
        }
        for s in &r.streams {
            r.delivered += s.delivered;
            r.duplicates += s.duplicates;
            r.differing += s.differing.len() as u64;
            r.hole_seqs += s.holes.iter().map(|(a, b)| b - a + 1).sum::<u64>();
            r.crash_only += s.crash_only;
            for (reason, (_, seqs)) in &s.gaps {
                *r.gaps.entry(reason.clone()).or_default() += seqs;
            }
        }
        r
    }
}

/// What a verifier found, per stream and in total.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Product messages received (copies included).
    pub messages: u64,
    /// Seqs delivered (a merged message counts for every seq it stands for).
    pub delivered: u64,
    /// Copies beyond the first.
    pub duplicates: u64,
    /// Copies whose content differed from the first (apart from `historical`): a broken promise.
    pub differing: u64,
    /// Seqs announced as lost, by gap reason.
    pub gaps: BTreeMap<String, u64>,
    /// Seqs neither delivered nor announced: a broken promise.
    pub hole_seqs: u64,
    /// Seqs that only a `crash` event accounts for (not delivered).
    pub crash_only: u64,
    /// Payloads that are not product messages or gap events.
    pub malformed: Vec<String>,
    pub streams: Vec<EpochReport>,
}

impl Report {
    /// Every seq delivered or announced, every copy identical, nothing malformed.
    pub fn ok(&self) -> bool {
        self.hole_seqs == 0 && self.differing == 0 && self.malformed.is_empty()
    }

    /// Lines for a person: the totals, then every stream with a hole or a differing copy.
    pub fn text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let gaps: Vec<String> = self.gaps.iter().map(|(r, n)| format!("{r} {n}")).collect();
        let _ = writeln!(
            s,
            "{} stream(s), {} message(s): {} seq(s) delivered, {} duplicate(s) ({} differing), announced gaps: {}, unexplained holes: {} seq(s)",
            self.streams.len(),
            self.messages,
            self.delivered,
            self.duplicates,
            self.differing,
            if gaps.is_empty() { "none".to_string() } else { gaps.join(", ") },
            self.hole_seqs
        );
        for st in &self.streams {
            if !st.holes.is_empty() {
                let holes: Vec<String> = st
                    .holes
                    .iter()
                    .map(|&(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") })
                    .collect();
                let _ = writeln!(
                    s,
                    "HOLE {} epoch {}: seqs {} neither arrived nor are in a gap event",
                    st.urn,
                    st.epoch,
                    holes.join(",")
                );
            }
            if !st.differing.is_empty() {
                let _ = writeln!(
                    s,
                    "DIFFERING {} epoch {}: copies of seqs {:?} differ in content",
                    st.urn, st.epoch, st.differing
                );
            }
        }
        for m in &self.malformed {
            let _ = writeln!(s, "MALFORMED {m}");
        }
        s
    }
}

/// One stream: a URN's epoch.
#[derive(Debug, Serialize)]
pub struct EpochReport {
    pub urn: String,
    pub epoch: u64,
    /// The seqs accounted for: from the first due to the highest seen.
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub messages: u64,
    pub delivered: u64,
    pub duplicates: u64,
    /// Seqs whose copies differed.
    pub differing: Vec<u64>,
    /// Gap reason -> (events, seqs).
    pub gaps: BTreeMap<String, (u64, u64)>,
    /// Unexplained holes (inclusive ranges).
    pub holes: Vec<(u64, u64)>,
    /// A `buffer_corrupt` event wrote off what has not arrived.
    pub written_off: bool,
    /// Seqs that only a `crash` event accounts for.
    pub crash_only: u64,
}

impl EpochReport {
    fn of(urn: &str, epoch: u64, e: &Epoch, holes: Vec<(u64, u64)>) -> EpochReport {
        EpochReport {
            urn: urn.to_string(),
            epoch,
            first_seq: if e.from_start { Some(1) } else { e.covered.min() },
            last_seq: e.covered.max(),
            messages: e.copies,
            delivered: e.delivered_seqs,
            duplicates: e.duplicates,
            differing: e.differing.clone(),
            gaps: e.gaps.clone(),
            holes,
            written_off: e.written_off,
            crash_only: e
                .crashed
                .0
                .iter()
                .flat_map(|(&a, &b)| e.arrived.holes(a, b))
                .map(|(a, b)| b - a + 1)
                .sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const URN: &str = "urn:plantmesh:_:s1:gw1:line:v1";

    fn msg(epoch: u64, seq: u64, historical: bool, value: u64) -> Vec<u8> {
        format!(
            r#"{{"product":"line","version":"1.0.0","agent":"gw1","epoch":{epoch},"seq":{seq},"historical":{historical},"records":[{{"ts":"2026-12-01T00:00:00.000Z","fields":{{"r0":{value}}},"quality":{{"r0":"good"}}}}]}}"#
        )
        .into_bytes()
    }

    fn merged(epoch: u64, seq: u64, last: u64) -> Vec<u8> {
        format!(r#"{{"epoch":{epoch},"seq":{seq},"last_seq":{last},"historical":true,"records":[]}}"#).into_bytes()
    }

    fn gap(epoch: u64, from: u64, to: u64, reason: &str) -> Vec<u8> {
        format!(r#"{{"agent":"gw1","product":"line","major":1,"epoch":{epoch},"from_seq":{from},"to_seq":{to},"count":0,"reason":"{reason}","ts":1}}"#).into_bytes()
    }

    #[test]
    fn every_seq_delivered_or_announced_is_ok() {
        let mut v = Verifier::new();
        for s in 1..=3 {
            v.message(URN, &msg(7, s, false, s));
        }
        v.gap(URN, &gap(7, 4, 5, "buffer_full_drop_oldest"));
        v.message(URN, &merged(7, 6, 9));
        v.message(URN, &msg(7, 10, false, 10));
        let r = v.report();
        assert!(r.ok(), "{}", r.text());
        assert_eq!((r.delivered, r.hole_seqs), (8, 0));
        assert_eq!(r.gaps["buffer_full_drop_oldest"], 2);
    }

    #[test]
    fn a_missing_seq_is_a_hole_and_fails() {
        let mut v = Verifier::new();
        for s in [1, 2, 4, 5, 9] {
            v.message(URN, &msg(7, s, false, s));
        }
        let r = v.report();
        assert!(!r.ok());
        assert_eq!(r.streams[0].holes, vec![(3, 3), (6, 8)]);
        assert_eq!(r.hole_seqs, 4);
        assert!(r.text().contains("seqs 3,6-8 neither arrived"), "{}", r.text());
    }

    #[test]
    fn duplicates_identical_apart_from_historical_are_fine_and_differing_ones_are_not() {
        let mut v = Verifier::new();
        v.message(URN, &msg(7, 1, false, 1));
        v.message(URN, &msg(7, 1, true, 1));
        let r = v.report();
        assert!(r.ok(), "{}", r.text());
        assert_eq!((r.duplicates, r.differing), (1, 0));
        v.message(URN, &msg(7, 1, true, 2));
        let r = v.report();
        assert!(!r.ok());
        assert_eq!((r.duplicates, r.differing), (2, 1));
        assert_eq!(r.streams[0].differing, vec![1]);
    }

    #[test]
    fn a_copy_with_another_extent_differs() {
        let mut v = Verifier::new();
        v.message(URN, &merged(7, 1, 5));
        v.message(URN, &merged(7, 1, 6));
        assert_eq!(v.report().differing, 1);
    }

    #[test]
    fn an_epoch_begun_under_watch_is_due_from_seq_1() {
        // Watching from the middle of epoch 7: seqs before the first seen are not due. Epoch 9
        // began after epoch 7 was seen: its seqs 1 and 2 are.
        let mut v = Verifier::new();
        v.message(URN, &msg(7, 40, false, 0));
        v.message(URN, &msg(7, 41, false, 0));
        v.message(URN, &msg(9, 3, false, 0));
        let r = v.report();
        assert_eq!(r.streams[0].holes, vec![]);
        assert_eq!(r.streams[1].holes, vec![(1, 2)]);
        // An older epoch's backlog arriving after a newer one: not due from 1.
        v.message(URN, &msg(5, 100, true, 0));
        assert_eq!(v.report().streams[0].holes, vec![]);
    }

    #[test]
    fn from_start_makes_every_epoch_due_from_1() {
        let mut v = Verifier::from_start();
        v.message(URN, &msg(7, 3, false, 0));
        assert_eq!(v.report().streams[0].holes, vec![(1, 2)]);
    }

    #[test]
    fn a_crash_event_may_overlap_what_arrived() {
        let mut v = Verifier::new();
        v.message(URN, &msg(7, 1, false, 0));
        v.message(URN, &msg(7, 2, false, 0));
        v.gap(URN, &gap(7, 2, 6, "crash"));
        v.message(URN, &msg(9, 1, false, 0));
        let r = v.report();
        assert!(r.ok(), "{}", r.text());
        assert_eq!(r.gaps["crash"], 5);
        assert_eq!(r.crash_only, 4, "seqs 3-6 only the crash event accounts for");
    }

    #[test]
    fn buffer_corrupt_writes_off_its_epoch_and_earlier_ones() {
        let mut v = Verifier::new();
        v.message(URN, &msg(5, 1, false, 0));
        v.message(URN, &msg(5, 9, false, 0));
        v.message(URN, &msg(7, 1, false, 0));
        v.message(URN, &msg(7, 4, false, 0));
        v.message(URN, &msg(8, 1, false, 0));
        v.message(URN, &msg(8, 3, false, 0));
        v.gap(URN, &gap(7, 1, u64::MAX >> 11, "buffer_corrupt"));
        let r = v.report();
        let holes: Vec<_> = r.streams.iter().map(|s| (s.epoch, s.holes.clone())).collect();
        assert_eq!(holes, vec![(5, vec![]), (7, vec![]), (8, vec![(2, 2)])]);
    }

    #[test]
    fn streams_of_other_urns_do_not_mix() {
        let mut v = Verifier::new();
        v.message(URN, &msg(7, 1, false, 0));
        v.message("urn:plantmesh:_:s2:gw1:line:v1", &msg(7, 2, false, 0));
        v.message(URN, &msg(7, 2, false, 0));
        let r = v.report();
        assert_eq!(r.streams.len(), 2);
        assert!(r.ok(), "{}", r.text());
    }

    #[test]
    fn malformed_payloads_are_reported() {
        let mut v = Verifier::new();
        v.message(URN, b"not json");
        v.message(URN, br#"{"epoch":1,"seq":0}"#);
        v.gap(URN, br#"{"epoch":1,"from_seq":5,"to_seq":2,"reason":"crash"}"#);
        let r = v.report();
        assert_eq!(r.malformed.len(), 3, "{:?}", r.malformed);
        assert!(!r.ok());
    }

    #[test]
    fn ranges_merge_and_find_holes() {
        let mut r = Ranges::default();
        for (a, b) in [(5, 6), (1, 2), (10, 12), (3, 3), (8, 8), (7, 7)] {
            r.insert(a, b);
        }
        assert_eq!(
            r.0.iter().map(|(&a, &b)| (a, b)).collect::<Vec<_>>(),
            vec![(1, 3), (5, 8), (10, 12)]
        );
        assert_eq!(r.holes(1, 14), vec![(4, 4), (9, 9), (13, 14)]);
        assert_eq!(r.holes(6, 7), vec![]);
        r.insert(0, 20);
        assert_eq!(r.0.len(), 1);
        assert_eq!(r.holes(0, 20), vec![]);
    }

    proptest::proptest! {
        /// Against a model: the holes are exactly the seqs between the first and the highest
        /// seen that no message or gap covers, whatever the order of arrival.
        #[test]
        fn holes_match_a_set_model(items in proptest::collection::vec((1u64..60, 0u64..4, proptest::bool::ANY), 1..40)) {
            let mut v = Verifier::new();
            let mut covered = std::collections::BTreeSet::new();
            let mut first = std::collections::BTreeSet::new();
            for &(seq, len, is_gap) in &items {
                if is_gap {
                    v.gap(URN, &gap(3, seq, seq + len, "crash"));
                } else {
                    v.message(URN, &merged(3, seq, seq + len));
                    if !first.insert(seq) {
                        continue; // a copy: only the first one's extent counts
                    }
                }
                covered.extend(seq..=seq + len);
            }
            let (lo, hi) = (*covered.first().unwrap(), *covered.last().unwrap());
            let model: u64 = (lo..=hi).filter(|s| !covered.contains(s)).count() as u64;
            let r = v.report();
            proptest::prop_assert_eq!(r.hole_seqs, model);
        }
    }
}
