//! Buffer throughput at the default group commit: records/s accepted and fsyncs (commits) per second.
//! Run: `cargo bench -p plantmesh --bench buffer` (or scripts/bench-buffer.sh).
//! The buffer file lives in $BENCH_DIR (default: the system temp dir): point it at the disk you care about.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark that fails stops with its location"
)]

use plantmesh::buffer::{self, ProductLimits, ProductSlot, Store};
use plantmesh::config::FullPolicy;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

fn main() {
    let base = std::env::var_os("BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(base).unwrap();
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    for (interval_ms, rate) in [(200u64, None), (200, Some(10_000u64)), (50, Some(10_000))] {
        let path = dir.path().join(format!("bench-{interval_ms}-{rate:?}.redb"));
        let (store, _) = Store::open(&path, 4 << 30, 4 << 20).unwrap();
        let products: Vec<ProductSlot> = (0..10)
            .map(|i| ProductSlot {
                id: format!("product-{i}"),
                governance: 1,
                topic: format!("site/area/line/domain/product-{i}/v1"),
                version: "1.0.0".into(),
                max_records: None,
                limits: ProductLimits {
                    max_bytes: 400 << 20,
                    policy: FullPolicy::DropOldest,
                    gap_topic: "g".into(),
                },
            })
            .collect();
        let opts = buffer::WriterOptions {
            commit_interval: Duration::from_millis(interval_ms),
            max_records_per_message: 100,
            max_message_bytes: 256 << 10,
            commit_before_send: false,
            max_staged_bytes: buffer::STAGED_BYTES_MAX,
        };
        // Nothing acknowledges: every record is committed (the broker-down case).
        let (h, writer) = buffer::start(store, products, opts);
        // A typical record: 10 fields, ~330 bytes of JSON.
        let record = br#"{"ts":"2026-11-21T10:00:00.123Z","fields":{"f0":181.5,"f1":12,"f2":true,"f3":0.25,"f4":1042,"f5":3,"f6":17.75,"f7":false,"f8":99,"f9":-4.5},"quality":{"f0":"good","f1":"good","f2":"good","f3":"good","f4":"good","f5":"good","f6":"good","f7":"good","f8":"good","f9":"good"}}"#.to_vec();
        let start = Instant::now();
        let mut offered = 0u64;
        while start.elapsed() < Duration::from_secs(seconds) {
            match rate {
                // Saturate: keep the writer's queue full (offer backs off when it is).
                None => {
                    for _ in 0..1000 {
                        h.offer((offered % 10) as usize, 0, record.clone());
                        offered += 1;
                    }
                    while h.stats.accepted_records.load(Relaxed) + 100_000 < offered {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
                Some(r) => {
                    let due = start.elapsed().as_secs_f64() * r as f64;
                    while (offered as f64) < due {
                        h.offer((offered % 10) as usize, 0, record.clone());
                        offered += 1;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        let s = h.stats.clone();
        drop(h);
        writer.join().unwrap().unwrap();
        let accepted = s.accepted_records.load(Relaxed);
        let commits = s.commits.load(Relaxed);
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        println!(
            "buffer commit_interval={interval_ms}ms load={}: {:.0} records/s accepted, {:.1} fsyncs/s, {} records in {} commits, dropped {}, file {} MiB",
            rate.map_or("saturating".to_string(), |r| format!("{r}/s")),
            accepted as f64 / elapsed,
            commits as f64 / elapsed,
            accepted,
            commits,
            s.dropped_records.load(Relaxed),
            size >> 20
        );
    }
}
