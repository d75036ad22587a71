//! The verifier alone, no broker: product messages of 1 record x 1 field (the fleet's shape) and of
//! 1 record x 100 fields, over 1,200 streams, every tenth message a duplicate. Prints messages/s.
//! Run: `cargo bench -p plantmesh --bench verify`. Through a broker: scripts/fleet.sh.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark that fails stops with its location"
)]

use plantmesh::fleet::verify::Verifier;
use std::time::Instant;

fn message(epoch: u64, seq: u64, fields: usize) -> Vec<u8> {
    let values: Vec<String> = (0..fields).map(|f| format!("\"r{f}\":{}", seq + f as u64)).collect();
    let qualities: Vec<String> = (0..fields).map(|f| format!("\"r{f}\":\"good\"")).collect();
    format!(
        r#"{{"product":"p","version":"1.0.0","agent":"gw","epoch":{epoch},"seq":{seq},"historical":false,"records":[{{"ts":"2026-12-01T00:00:00.000Z","fields":{{{}}},"quality":{{{}}}}}]}}"#,
        values.join(","),
        qualities.join(",")
    )
    .into_bytes()
}

fn main() {
    const STREAMS: u64 = 1_200;
    for (fields, n) in [(1usize, 600_000u64), (100, 60_000)] {
        let urns: Vec<String> = (0..STREAMS).map(|i| format!("urn:plantmesh:_:s:gw-{i}:p:v1")).collect();
        let msgs: Vec<(usize, Vec<u8>)> = (0..n)
            .map(|i| {
                let s = (i % STREAMS) as usize;
                let seq = i / STREAMS + 1;
                // Every tenth message again: a duplicate after a reconnect.
                let seq = if i % 10 == 9 { seq.saturating_sub(1).max(1) } else { seq };
                (s, message(7, seq, fields))
            })
            .collect();
        let bytes: usize = msgs.iter().map(|(_, m)| m.len()).sum();
        let mut v = Verifier::new();
        let t = Instant::now();
        for (s, m) in &msgs {
            v.message(&urns[*s], m);
        }
        let took = t.elapsed().as_secs_f64();
        let r = v.report();
        assert!(r.malformed.is_empty());
        println!(
            "verify: {n} messages of {fields} field(s) ({} B each) over {STREAMS} streams: {:.0} messages/s ({:.2} us each), report {:.1} ms",
            bytes / n as usize,
            n as f64 / took,
            took * 1e6 / n as f64,
            {
                let t = Instant::now();
                let _ = v.report();
                t.elapsed().as_secs_f64() * 1e3
            }
        );
    }
}
