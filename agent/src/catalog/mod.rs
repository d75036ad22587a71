//! Catalog: what a platform learns of each product besides its data. [`odcs`]: the ODCS data
//! contract; [`entry`]: the catalog index entry on a fixed topic; this file: the measured service
//! levels per product (SLIs).
//!
//! In: every governed record (from map, after governance), buffer and publish counters. Out: one SLI
//! document per product per interval, published retained on `{topic}/_sli`, and the same figures
//! as Prometheus metrics. Bookkeeping, and [`publish_slis`], the task that emits the documents.
//!
//! - `freshness_ms`: age of the newest record with at least one good value (grows while a device is
//!   down, even though records with bad qualities keep flowing).
//! - `completeness`: good values / values over the records of the last interval (1.0 = every field of
//!   every record good; 0.0 = nothing good, or no record at all).
//! - `records`: records in the interval; `records_total` since start; `drops`: records dropped so far
//!   by reason (from the buffer's counters); `latency_ms`: read-to-PUBACK quantiles of the product's
//!   messages acknowledged in the interval.
//! - `targets` and `met`: the contract's service levels and whether the interval met them.

pub mod asyncapi;
pub mod entry;
pub mod ledger;
pub mod odcs;

use crate::config::ProductPlan;
use crate::govern::Governed;
use crate::model::Millis;
use serde_json::json;

/// Stands in a document for a long array that [`splice`] writes in its place: see [`json_array`].
pub const ARRAY_HERE: &str = "$plantmesh:array-here";

/// The JSON text of an array, built one item at a time. A product's descriptor and contract hold
/// an entry per field; built as one JSON tree, a thousand-field product's contract was 20,000
/// allocations that lived at once on every connect, and the holes they left kept the heap about
/// 1 MiB larger for as long as the agent ran (10 products x 1,000 fields: steady RSS 15.0 -> 14.0
/// MiB without them, `scripts/footprint.sh`). Here one item's tree lives at a time.
pub fn json_array(items: impl Iterator<Item = serde_json::Value>) -> Vec<u8> {
    let mut out = vec![b'['];
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        #[allow(clippy::expect_used, reason = "a JSON value serializes into a Vec")]
        serde_json::to_writer(&mut out, &item).expect("serializes");
    }
    out.push(b']');
    out
}

/// `doc` as JSON text with `array` (from [`json_array`]) where `doc` holds the string
/// [`ARRAY_HERE`]: the same bytes as serializing `doc` with the array in that place. Only one
/// place can match: a string holding the placeholder between quotes has them escaped.
pub fn splice(doc: &serde_json::Value, array: &[u8]) -> Vec<u8> {
    #[allow(clippy::expect_used, reason = "a JSON value serializes into a Vec")]
    let text = serde_json::to_vec(doc).expect("serializes");
    let marker = format!("\"{ARRAY_HERE}\"");
    let Some(at) = text.windows(marker.len()).position(|w| w == marker.as_bytes()) else {
        return text;
    };
    let mut out = Vec::with_capacity(text.len() + array.len());
    out.extend_from_slice(&text[..at]);
    out.extend_from_slice(array);
    out.extend_from_slice(&text[at + marker.len()..]);
    out
}

#[derive(Debug, Clone, Default)]
struct ProductSli {
    newest_good: Option<Millis>,
    window_records: u64,
    window_values: u64,
    window_good: u64,
    records_total: u64,
    last_completeness: f64,
    last_freshness_ms: Option<u64>,
}

/// SLI bookkeeping for all products.
#[derive(Debug, Clone)]
pub struct Slis {
    products: Vec<ProductSli>,
}

/// One product's figures at an interval's end.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub freshness_ms: Option<u64>,
    pub completeness: f64,
    pub records: u64,
    pub records_total: u64,
}

impl Slis {
    pub fn new(products: usize) -> Self {
        Slis {
            products: vec![ProductSli::default(); products],
        }
    }

    /// Counts one record that will be published.
    pub fn record(&mut self, product: usize, r: &Governed) {
        let Some(p) = self.products.get_mut(product) else {
            return;
        };
        let good = r.fields.iter().filter(|(_, v, q)| v.is_some() && q.is_good()).count() as u64;
        p.window_records += 1;
        p.records_total += 1;
        p.window_values += r.fields.len() as u64;
        p.window_good += good;
        if good > 0 {
            p.newest_good = Some(p.newest_good.map_or(r.ts, |t| t.max(r.ts)));
        }
    }

    /// Closes the interval at `now` and returns every product's figures.
    pub fn snapshot(&mut self, now: Millis) -> Vec<Snapshot> {
        self.products
            .iter_mut()
            .map(|p| {
                let completeness = if p.window_values == 0 {
                    0.0
                } else {
                    p.window_good as f64 / p.window_values as f64
                };
                let s = Snapshot {
                    freshness_ms: p.newest_good.map(|t| now.saturating_sub(t)),
                    completeness,
                    records: p.window_records,
                    records_total: p.records_total,
                };
                p.last_completeness = completeness;
                p.last_freshness_ms = s.freshness_ms;
                p.window_records = 0;
                p.window_values = 0;
                p.window_good = 0;
                s
            })
            .collect()
    }

    /// The figures of the last closed interval (for metrics between emissions).
    pub fn last(&self, product: usize) -> (Option<u64>, f64, u64) {
        self.products.get(product).map_or((None, 0.0, 0), |p| {
            (p.last_freshness_ms, p.last_completeness, p.records_total)
        })
    }

    /// A reload: `kept` pairs each product of the new plan with its place in the old one (same
    /// product key); the others start afresh.
    pub fn remap(&mut self, products: usize, kept: &[(usize, usize)]) {
        let mut next = vec![ProductSli::default(); products];
        for &(new, old) in kept {
            if let (Some(n), Some(o)) = (next.get_mut(new), self.products.get(old)) {
                *n = o.clone();
            }
        }
        self.products = next;
    }
}

/// Whether a measured figure meets its target (`None`: no target, or nothing measured).
fn met(target: Option<f64>, measured: Option<f64>, higher_is_better: bool) -> Option<bool> {
    let (t, m) = (target?, measured?);
    Some(if higher_is_better { m >= t } else { m <= t })
}

/// Every `sli_interval`, one retained SLI document per product to `retained` (the publisher),
/// until `shutdown`.
pub async fn publish_slis(
    current: crate::telemetry::Current,
    slis: std::sync::Arc<std::sync::Mutex<Slis>>,
    stats: std::sync::Arc<crate::publish::PublishStats>,
    reader: crate::buffer::Reader,
    retained: tokio::sync::mpsc::UnboundedSender<(String, Vec<u8>)>,
    shown: crate::page::Shown,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let now_of = || match current.read() {
        Ok(n) => n.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    let every = now_of().plan.agent.sli_interval;
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        let now = crate::model::now_millis();
        // A reload swaps the plan while holding this lock: the snapshots and the plan match.
        let (snapshots, running) = match slis.lock() {
            Ok(mut s) => (s.snapshot(now), now_of()),
            Err(_) => return,
        };
        let plan = &running.plan;
        // Drops by product key, so each product takes its own without a scan over all of them.
        let mut drops: std::collections::HashMap<String, Vec<(String, u64)>> = std::collections::HashMap::new();
        for (key, reason, n) in reader.drops().unwrap_or_default() {
            drops.entry(key).or_default().push((reason, n));
        }
        for (i, (p, s)) in plan.products.iter().zip(&snapshots).enumerate() {
            let latency = stats.take_product_latency(running.slots.get(i).copied().unwrap_or(usize::MAX));
            let mine = drops.get(&p.key).map_or(&[][..], Vec::as_slice);
            let doc = sli_document(p, &plan.agent.id, every.as_millis() as u64, s, latency, mine, now);
            shown.sli(&p.key, &doc, now);
            let _ = retained.send((sli_topic(p), doc));
        }
    }
}

/// Where a product's SLI document is retained.
pub fn sli_topic(p: &ProductPlan) -> String {
    format!("{}/_sli", p.topic)
}

/// The `_sli` document: measured figures beside the targets the contract promises.
#[allow(clippy::too_many_arguments)]
pub fn sli_document(
    product: &ProductPlan,
    agent: &str,
    interval_ms: u64,
    s: &Snapshot,
    latency: (Option<u64>, Option<u64>),
    drops: &[(String, u64)],
    now: Millis,
) -> Vec<u8> {
    let drops: serde_json::Map<String, serde_json::Value> = drops.iter().map(|(r, n)| (r.clone(), json!(n))).collect();
    let sl = &product.service_levels;
    let ms = |d: std::time::Duration| d.as_millis() as f64;
    let expected_ms = ms(sl.expected_interval).max(1.0);
    #[allow(clippy::expect_used, reason = "a JSON value serializes into a Vec")]
    serde_json::to_vec(&json!({
        "product": product.id,
        "version": product.version,
        "status": product.status,
        "agent": agent,
        "ts": crate::model::format_rfc3339_millis(now),
        "interval_ms": interval_ms,
        "freshness_ms": s.freshness_ms,
        "completeness": s.completeness,
        "records": s.records,
        "expected_records": (interval_ms as f64 / expected_ms).floor() as u64,
        "records_total": s.records_total,
        "latency_ms": {"p50": latency.0, "p99": latency.1, "scope": "product", "over": "interval"},
        "drops": drops,
        "targets": {
            "freshness_ms": sl.freshness.map(ms),
            "completeness": sl.completeness,
            "latency_p99_ms": sl.latency_p99.map(ms),
            "expected_interval_ms": ms(sl.expected_interval),
        },
        "met": {
            "freshness": met(sl.freshness.map(ms), s.freshness_ms.map(|f| f as f64), false),
            "completeness": met(sl.completeness, Some(s.completeness), true),
            "latency": met(sl.latency_p99.map(ms), latency.1.map(|l| l as f64), false),
        },
    }))
    .expect("SLI serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BadReason, Quality, Value};

    fn rec(ts: Millis, good: usize, bad: usize) -> Governed {
        let mut fields = Vec::new();
        for i in 0..good {
            fields.push((i, Some(Value::Int(1)), Quality::Good));
        }
        for i in 0..bad {
            fields.push((good + i, None, Quality::Bad(BadReason::Timeout)));
        }
        Governed { ts, fields }
    }

    #[test]
    fn freshness_follows_good_values_and_completeness_the_window() {
        let mut s = Slis::new(1);
        s.record(0, &rec(1_000, 2, 0));
        s.record(0, &rec(2_000, 1, 1));
        let a = s.snapshot(2_500);
        assert_eq!(
            (a[0].freshness_ms, a[0].completeness, a[0].records),
            (Some(500), 0.75, 2)
        );
        // A device outage: only bad values.
        s.record(0, &rec(3_000, 0, 2));
        let b = s.snapshot(5_000);
        assert_eq!(
            (b[0].freshness_ms, b[0].completeness),
            (Some(3_000), 0.0),
            "freshness keeps growing"
        );
        // Nothing at all in an interval.
        let c = s.snapshot(6_000);
        assert_eq!((c[0].completeness, c[0].records, c[0].records_total), (0.0, 0, 3));
    }
}
