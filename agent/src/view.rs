//! The live status view: what is being published, at what rate, and what is waiting in the buffer.

use crate::telemetry::Running;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// Redraws the view every second on a terminal; prints one line every 10 s otherwise.
pub fn spawn(r: Running) {
    tokio::spawn(async move {
        let tty = std::io::stdout().is_terminal();
        let period = if tty {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(10)
        };
        if let (false, Some(page)) = (tty, r.page.get()) {
            println!("status page: http://{page}/");
        }
        let started = Instant::now();
        let mut prev = (0u64, 0u64, Instant::now(), vec![0u64; r.now().plan.products.len()]);
        let mut ticker = tokio::time::interval(period);
        loop {
            ticker.tick().await;
            let running = r.now();
            let now = Instant::now();
            let dt = now.duration_since(prev.2).as_secs_f64().max(0.001);
            let msgs = r.publish.messages_acked.load(Relaxed);
            let recs = r.publish.records_acked.load(Relaxed);
            let produced: Vec<u64> = running.produced.iter().map(|c| c.load(Relaxed)).collect();
            let (msg_rate, rec_rate) = ((msgs - prev.0) as f64 / dt, (recs - prev.1) as f64 / dt);
            let depth = r.buffer.pending_messages.load(Relaxed);
            let depth_bytes = r.buffer.pending_bytes.load(Relaxed);
            let up = if r.publish.connected.load(Relaxed) == 1 {
                "connected"
            } else {
                "DISCONNECTED"
            };
            let mut s = String::new();
            if tty {
                s.push_str("\x1b[H\x1b[2J");
                let _ = writeln!(
                    s,
                    "plantmesh {} | agent {} | epoch {} | up {}s",
                    env!("CARGO_PKG_VERSION"),
                    running.plan.agent.id,
                    r.epoch,
                    started.elapsed().as_secs()
                );
                let (host, port) = r.broker.rsplit_once(':').unwrap_or((&r.broker, "1883"));
                let _ = writeln!(
                    s,
                    "upstream {} ({up})   watch it: mosquitto_sub -h {host} -p {port} -t '#' -v",
                    r.broker
                );
                if let Some(page) = r.page.get() {
                    let _ = writeln!(s, "status page: http://{page}/   metrics: http://{page}/metrics");
                }
                let _ = writeln!(s, "published: {msg_rate:.1} msg/s, {rec_rate:.1} records/s | acked total {msgs} msgs / {recs} records");
                let _ = writeln!(
                    s,
                    "buffer: {depth} messages, {} KiB pending | dropped records {}",
                    depth_bytes / 1024,
                    r.buffer.dropped_records.load(Relaxed)
                );
                for (i, d) in running.plan.devices.iter().enumerate() {
                    let st = &running.devices[i];
                    let _ = writeln!(
                        s,
                        "device {:<14} {:<22} {} polls {} requests {} errors {}",
                        d.id,
                        d.kind.address(),
                        if st.connected.load(Relaxed) == 1 {
                            "up  "
                        } else {
                            "DOWN"
                        },
                        st.polls.load(Relaxed),
                        st.requests.load(Relaxed),
                        st.errors.load(Relaxed)
                    );
                }
                let last = r.last.lock().map(|l| l.clone()).unwrap_or_default();
                for (i, p) in running.plan.products.iter().enumerate() {
                    let rate = produced[i].saturating_sub(prev.3.get(i).copied().unwrap_or(0)) as f64 / dt;
                    let _ = writeln!(
                        s,
                        "\nproduct {} v{} ({}) -> {}  {rate:.1} records/s",
                        p.id, p.version, p.domain, p.topic
                    );
                    if let Some(Some(json)) = last.get(i) {
                        let _ = writeln!(s, "  last: {json}");
                    }
                }
            } else {
                let _ = writeln!(s, "status: upstream {up}, {msg_rate:.1} msg/s, {rec_rate:.1} records/s, buffer {depth} messages, dropped {}", r.buffer.dropped_records.load(Relaxed));
            }
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(s.as_bytes());
            let _ = out.flush();
            prev = (msgs, recs, now, produced);
        }
    });
}
