//! What the publisher counts: connections, acknowledgements, and read-to-PUBACK latency overall
//! and per product slot.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared with the status view, metrics and benchmarks.
pub struct PublishStats {
    pub connected: AtomicU64,
    pub connects: AtomicU64,
    pub messages_acked: AtomicU64,
    pub records_acked: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub resent: AtomicU64,
    /// UNS view messages sent (field values and clears of withdrawn topics).
    pub uns_sent: AtomicU64,
    /// Read-to-PUBACK latency of acknowledged messages (oldest record), all products.
    latency: Histogram,
    /// The same per announced product (by slot; a reload appends), coarser: 244 bytes a
    /// product, not 2.6 KB (10,000 products would otherwise hold 26 MB of counters).
    product_latency: std::sync::RwLock<Vec<Coarse>>,
}

impl Default for PublishStats {
    fn default() -> Self {
        PublishStats::new(0)
    }
}

impl PublishStats {
    /// Counters for `products` announced products.
    pub fn new(products: usize) -> Self {
        PublishStats {
            connected: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            messages_acked: AtomicU64::new(0),
            records_acked: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            resent: AtomicU64::new(0),
            uns_sent: AtomicU64::new(0),
            latency: Histogram::default(),
            product_latency: std::sync::RwLock::new((0..products).map(|_| Coarse::default()).collect()),
        }
    }

    pub(super) fn record_latency(&self, product: Option<usize>, ms: u64) {
        self.latency.record(ms);
        if let (Some(i), Ok(hs)) = (product, self.product_latency.read()) {
            if let Some(h) = hs.get(i) {
                h.record(ms);
            }
        }
    }

    /// Room for `products` slots (a reload added products).
    pub fn grow(&self, products: usize) {
        if let Ok(mut hs) = self.product_latency.write() {
            while hs.len() < products {
                hs.push(Coarse::default());
            }
        }
    }

    /// The q-quantile (0..1) of read-to-PUBACK latency in ms over all products, if anything was
    /// acknowledged.
    pub fn latency_quantile(&self, q: f64) -> Option<u64> {
        self.latency.quantile(q)
    }

    /// Cumulative counts of read-to-PUBACK latency at bucket bounds (ms), all products.
    pub fn latency_buckets(&self) -> Vec<(u64, u64)> {
        // Each the last millisecond of a bucket, so the counts are exact.
        const BOUNDS: [u64; 23] = [
            1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 99, 149, 199, 299, 499, 699, 999, 1_999, 4_999, 9_999, 19_999,
            59_999,
        ];
        BOUNDS.iter().map(|&le| (le, self.latency.at_most(le))).collect()
    }

    /// Live messages whose latency was recorded.
    pub fn latency_total(&self) -> u64 {
        self.latency.at_most(u64::MAX)
    }

    /// p50 and p99 of one announced product since the last call (the SLI interval), and starts the
    /// next interval.
    pub fn take_product_latency(&self, product: usize) -> (Option<u64>, Option<u64>) {
        let Ok(hs) = self.product_latency.read() else {
            return (None, None);
        };
        match hs.get(product) {
            Some(h) => {
                let q = (h.quantile(0.5), h.quantile(0.99));
                h.reset();
                q
            }
            None => (None, None),
        }
    }
}

/// A latency histogram in milliseconds with a relative error under 19 %: 1 ms steps below 8 ms,
/// then four buckets per doubling up to 65 s, then one for everything slower (61 counters).
pub struct Coarse {
    counts: [std::sync::atomic::AtomicU32; Coarse::BUCKETS],
}

impl Default for Coarse {
    fn default() -> Self {
        Coarse {
            counts: std::array::from_fn(|_| std::sync::atomic::AtomicU32::new(0)),
        }
    }
}

impl Coarse {
    const BUCKETS: usize = 8 + 13 * 4 + 1;

    fn bucket(ms: u64) -> usize {
        if ms < 8 {
            return ms as usize;
        }
        // ms in [2^e, 2^(e+1)), e >= 3: the quarter of that doubling it falls in.
        let e = 63 - ms.leading_zeros() as usize;
        let quarter = ((ms >> (e - 2)) & 3) as usize;
        (8 + (e - 3) * 4 + quarter).min(Self::BUCKETS - 1)
    }

    /// The lowest latency that falls in bucket `b`.
    fn floor(b: usize) -> u64 {
        if b < 8 {
            return b as u64;
        }
        let e = (b - 8) / 4 + 3;
        let quarter = ((b - 8) % 4) as u64;
        (1u64 << e) + quarter * (1u64 << (e - 2))
    }

    pub fn record(&self, ms: u64) {
        self.counts[Self::bucket(ms)].fetch_add(1, Ordering::Relaxed);
    }

    /// Forgets what was recorded (a sample recorded meanwhile may land in either interval).
    pub fn reset(&self) {
        for c in &self.counts {
            c.store(0, Ordering::Relaxed);
        }
    }

    /// The q-quantile (the floor of its bucket), if anything was recorded.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        quantile(self.counts.iter().map(|c| u64::from(c.load(Ordering::Relaxed))), q).map(Self::floor)
    }
}

/// The bucket that holds the q-quantile of `counts`, if any was recorded.
fn quantile(counts: impl Iterator<Item = u64> + Clone, q: f64) -> Option<usize> {
    let total: u64 = counts.clone().sum();
    if total == 0 {
        return None;
    }
    let target = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (b, c) in counts.enumerate() {
        seen += c;
        if seen >= target {
            return Some(b);
        }
    }
    None
}

/// A latency histogram in milliseconds with bounded relative error: 1 ms steps below 100 ms, 10 ms
/// to 1 s, 100 ms to 10 s, 1 s to 60 s, then one bucket for everything slower (331 counters).
pub struct Histogram {
    counts: Vec<AtomicU64>,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: (0..Histogram::BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Histogram {
    const BUCKETS: usize = 100 + 90 + 90 + 50 + 1;

    fn bucket(ms: u64) -> usize {
        (match ms {
            0..100 => ms,
            100..1_000 => 100 + (ms - 100) / 10,
            1_000..10_000 => 190 + (ms - 1_000) / 100,
            10_000..60_000 => 280 + (ms - 10_000) / 1_000,
            _ => 330,
        }) as usize
    }

    /// The lowest latency that falls in bucket `b`.
    fn floor(b: usize) -> u64 {
        let b = b as u64;
        match b {
            0..100 => b,
            100..190 => 100 + (b - 100) * 10,
            190..280 => 1_000 + (b - 190) * 100,
            280..330 => 10_000 + (b - 280) * 1_000,
            _ => 60_000,
        }
    }

    /// Forgets what was recorded (a sample recorded meanwhile may land in either interval).
    pub fn reset(&self) {
        for c in &self.counts {
            c.store(0, Ordering::Relaxed);
        }
    }

    pub fn record(&self, ms: u64) {
        self.counts[Self::bucket(ms)].fetch_add(1, Ordering::Relaxed);
    }

    /// How many samples were at most `ms` (exact where `ms + 1` starts a bucket).
    pub fn at_most(&self, ms: u64) -> u64 {
        let last = Self::bucket(ms);
        self.counts[..=last].iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// The q-quantile (the floor of its bucket), if anything was recorded.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        quantile(counts.into_iter(), q).map(Self::floor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_histogram_quantiles_stay_within_their_bucket() {
        let h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        for ms in [5, 5, 5, 150, 2_345, 45_000, 120_000] {
            h.record(ms);
        }
        assert_eq!(h.quantile(0.0), Some(5));
        assert_eq!(h.quantile(0.5), Some(150));
        assert_eq!(h.quantile(0.6), Some(2_300), "100 ms steps from 1 s");
        assert_eq!(h.quantile(0.8), Some(45_000));
        assert_eq!(h.quantile(1.0), Some(60_000), "slower than a minute is one bucket");
        assert_eq!((h.at_most(4), h.at_most(5), h.at_most(149)), (0, 3, 3));
        assert_eq!((h.at_most(159), h.at_most(59_999), h.at_most(u64::MAX)), (4, 6, 7));
        for ms in 0..70_000 {
            let b = Histogram::bucket(ms);
            assert!(Histogram::floor(b) <= ms, "{ms}");
            assert!(b + 1 == Histogram::BUCKETS || Histogram::floor(b + 1) > ms, "{ms}");
        }
        h.reset();
        assert_eq!(h.quantile(0.5), None);
    }

    #[test]
    fn per_product_histogram_is_within_a_fifth_and_small() {
        assert!(std::mem::size_of::<Coarse>() <= 256);
        let h = Coarse::default();
        assert_eq!(h.quantile(0.5), None);
        for ms in [3, 3, 3, 150, 2_345, 45_000, 120_000] {
            h.record(ms);
        }
        assert_eq!(h.quantile(0.0), Some(3), "1 ms steps below 8 ms");
        assert_eq!(h.quantile(0.5), Some(128));
        assert_eq!(h.quantile(0.6), Some(2_048));
        assert_eq!(h.quantile(0.8), Some(40_960));
        assert_eq!(h.quantile(1.0), Some(65_536), "slower than 65 s is one bucket");
        for ms in 0..200_000 {
            let b = Coarse::bucket(ms);
            let floor = Coarse::floor(b);
            assert!(floor <= ms, "{ms}");
            assert!(b + 1 == Coarse::BUCKETS || Coarse::floor(b + 1) > ms, "{ms}");
            assert!(
                b + 1 == Coarse::BUCKETS || ms - floor <= floor / 4 + 1,
                "{ms}: relative error"
            );
        }
        h.reset();
        assert_eq!(h.quantile(0.5), None);
    }
}
