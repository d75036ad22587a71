//! `/metrics` (Prometheus text format), `/health` and the status page on a loopback address
//! ([`crate::http`]). `/health` is 200
//! `ok` while the buffer writer runs, 200 `degraded: <reason>` (a line each) while buffer commits
//! fail or the data directory is nearly full, and 503 once the writer has stopped (the agent is
//! about to exit).

use crate::buffer::BufferStats;
use crate::config::DeviceKind;
use crate::config::Plan;
use crate::publish::PublishStats;
use crate::sources::DeviceStats;
use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// What the agent runs now: the plan and what is counted per device and product of it. A reload
/// replaces it as a whole (see [`crate::reload`]); readers take one [`Running::now`] and use it
/// throughout, so every index they use is of one plan.
pub struct Now {
    pub plan: Arc<Plan>,
    /// Per device of the plan.
    pub devices: Vec<Arc<DeviceStats>>,
    /// Records produced per product of the plan.
    pub produced: Arc<Vec<std::sync::atomic::AtomicU64>>,
    /// Per product of the plan: its slot in the buffer and the publisher (stable across reloads).
    pub slots: Vec<usize>,
    /// Product files the last reload refused (their products run on their previous version):
    /// `(file, first problem)`.
    pub refused: Vec<(String, String)>,
}

impl Now {
    /// A plan just started: slots in plan order, nothing refused.
    pub fn start(plan: Arc<Plan>, devices: Vec<Arc<DeviceStats>>) -> Now {
        Now {
            produced: Arc::new(plan.products.iter().map(|_| Default::default()).collect()),
            slots: (0..plan.products.len()).collect(),
            refused: Vec::new(),
            devices,
            plan,
        }
    }
}

/// Reloads, for metrics.
#[derive(Debug, Default)]
pub struct ReloadStats {
    pub accepted: std::sync::atomic::AtomicU64,
    /// Reloads that refused anything (a whole config or one product file).
    pub refused: std::sync::atomic::AtomicU64,
}

/// The current [`Now`], shared.
pub type Current = Arc<std::sync::RwLock<Arc<Now>>>;

/// Handles to what is running, for the status view.
#[derive(Clone)]
pub struct Running {
    pub current: Current,
    pub buffer: Arc<BufferStats>,
    pub publish: Arc<PublishStats>,
    pub reloads: Arc<ReloadStats>,
    pub epoch: u64,
    pub broker: String,
    /// Latest record per product, rendered, for the view.
    pub last: Arc<std::sync::Mutex<Vec<Option<String>>>>,
    /// Where the status page is served, once bound.
    pub page: Arc<std::sync::OnceLock<std::net::SocketAddr>>,
    /// Whether the view or the page looks (live values are kept only then).
    pub shown: crate::page::Shown,
    pub slis: Arc<std::sync::Mutex<crate::catalog::Slis>>,
    /// False once the buffer writer has stopped.
    pub writer_alive: Arc<std::sync::atomic::AtomicBool>,
}

impl Running {
    /// What runs now.
    pub fn now(&self) -> Arc<Now> {
        match self.current.read() {
            Ok(n) => n.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// A `Running` with no tasks behind it (unit tests of the endpoints).
    #[cfg(test)]
    pub fn for_tests(plan: Arc<Plan>) -> Running {
        let devices = plan.devices.iter().map(|_| Arc::new(DeviceStats::default())).collect();
        Running {
            buffer: Arc::new(BufferStats::default()),
            publish: Arc::new(PublishStats::default()),
            reloads: Arc::default(),
            epoch: 1,
            broker: String::new(),
            last: Arc::new(std::sync::Mutex::new(Vec::new())),
            shown: crate::page::Shown::default(),
            page: Arc::default(),
            slis: Arc::new(std::sync::Mutex::new(crate::catalog::Slis::new(plan.products.len()))),
            writer_alive: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            current: Arc::new(std::sync::RwLock::new(Arc::new(Now::start(plan, devices)))),
        }
    }
}

/// Binds and serves in the background; returns the bound address. `/metrics`, `/health`, and the
/// read-only status page (`/`) with its JSON (`/api/state`, [`crate::page::agent_state`]).
pub async fn serve(addr: std::net::SocketAddr, r: Running) -> std::io::Result<std::net::SocketAddr> {
    use crate::http::Response;
    crate::http::serve(
        addr,
        Arc::new(move |path: &str| match path {
            "/metrics" => Response::text("200 OK", metrics(&r)),
            "/health" if r.writer_alive.load(Relaxed) => Response::text("200 OK", health(&r.buffer)),
            "/health" => Response::text("503 Service Unavailable", "buffer writer stopped\n".to_string()),
            "/api/state" => Response::json(crate::page::agent_state(&r).to_string()),
            _ => crate::page::respond(path),
        }),
    )
    .await
}

/// `ok`, or `degraded: <why>` (still 200: the agent runs and sends live data, a restart would not
/// help), one reason a line.
fn health(b: &BufferStats) -> String {
    let mut why = Vec::new();
    if b.degraded.load(Relaxed) {
        let error = b.storage_error.lock().ok().and_then(|e| e.clone()).unwrap_or_default();
        why.push(format!("buffer storage failing, nothing new is made durable: {error}"));
    }
    if b.disk_low.load(Relaxed) {
        why.push(format!(
            "data directory nearly full: {} bytes free",
            b.disk_free_bytes.load(Relaxed)
        ));
    }
    if why.is_empty() {
        "ok\n".to_string()
    } else {
        why.iter().map(|w| format!("degraded: {w}\n")).collect()
    }
}

fn metrics(r: &Running) -> String {
    let now = r.now();
    let mut s = String::new();
    let b = &r.buffer;
    let p = &r.publish;
    let mut gauge = |name: &str, help: &str, kind: &str, value: String| {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    };
    gauge(
        "plantmesh_buffer_pending_messages",
        "Messages in the buffer awaiting PUBACK.",
        "gauge",
        b.pending_messages.load(Relaxed).to_string(),
    );
    gauge(
        "plantmesh_buffer_pending_bytes",
        "Bytes in the buffer awaiting PUBACK.",
        "gauge",
        b.pending_bytes.load(Relaxed).to_string(),
    );
    gauge(
        "plantmesh_buffer_degraded",
        "1 while buffer commits fail (disk full, I/O errors): live data flows from memory, nothing new is made durable.",
        "gauge",
        u8::from(b.degraded.load(Relaxed)).to_string(),
    );
    gauge(
        "plantmesh_buffer_failed_commits_total",
        "Buffer commits that failed (each retried with backoff).",
        "counter",
        b.failed_commits.load(Relaxed).to_string(),
    );
    gauge(
        "plantmesh_buffer_dropped_from_memory_messages_total",
        "Messages dropped from memory while storage failed and nothing was acknowledged (storage_unavailable gap events).",
        "counter",
        b.shed_messages.load(Relaxed).to_string(),
    );
    gauge(
        "plantmesh_buffer_disk_free_bytes",
        "Free bytes on the data directory's file system.",
        "gauge",
        b.disk_free_bytes.load(Relaxed).to_string(),
    );
    gauge(
        "plantmesh_buffer_disk_low",
        "1 while free space on the data directory is below [buffer] free_space_warning.",
        "gauge",
        u8::from(b.disk_low.load(Relaxed)).to_string(),
    );
    gauge(
        "plantmesh_records_accepted_total",
        "Records taken into numbered messages (safe once committed or acknowledged).",
        "counter",
        b.accepted_records.load(Relaxed).to_string(),
    );
    gauge(
        "plantmesh_buffer_written_messages_total",
        "Messages written to storage because the broker had not acknowledged them within the commit interval.",
        "counter",
        b.written_messages.load(Relaxed).to_string(),
    );
    gauge(
        "plantmesh_buffer_unwritten_messages_total",
        "Messages the broker acknowledged before their commit was due: never written.",
        "counter",
        b.unwritten_messages.load(Relaxed).to_string(),
    );
    gauge(
        "plantmesh_buffer_staged_messages",
        "Messages numbered and in memory, neither committed nor acknowledged yet.",
        "gauge",
        b.staged_messages.load(Relaxed).to_string(),
    );
    gauge(
        "plantmesh_records_dropped_total",
        "Records dropped for any reason (each reported as a gap event).",
        "counter",
        b.dropped_records.load(Relaxed).to_string(),
    );
    gauge(
        "plantmesh_buffer_commits_total",
        "Group commits (fsyncs).",
        "counter",
        b.commits.load(Relaxed).to_string(),
    );
    gauge(
        "plantmesh_messages_acked_total",
        "Messages acknowledged by the broker.",
        "counter",
        p.messages_acked.load(Relaxed).to_string(),
    );
    gauge(
        "plantmesh_records_acked_total",
        "Records acknowledged by the broker.",
        "counter",
        p.records_acked.load(Relaxed).to_string(),
    );
    gauge(
        "plantmesh_uns_messages_total",
        "UNS view messages sent: field values (retained, newest only) and clears of withdrawn topics.",
        "counter",
        p.uns_sent.load(Relaxed).to_string(),
    );
    gauge(
        "plantmesh_dead_lettered_total",
        "Messages refused by the broker or by egress checks.",
        "counter",
        p.dead_lettered.load(Relaxed).to_string(),
    );
    gauge(
        "plantmesh_upstream_connected",
        "1 while connected to the upstream broker.",
        "gauge",
        p.connected.load(Relaxed).to_string(),
    );
    let _ = writeln!(
        s,
        "# HELP plantmesh_publish_latency_ms Read-to-PUBACK latency.\n# TYPE plantmesh_publish_latency_ms summary"
    );
    for q in [0.5, 0.99] {
        if let Some(v) = p.latency_quantile(q) {
            let _ = writeln!(s, "plantmesh_publish_latency_ms{{quantile=\"{q}\"}} {v}");
        }
    }
    // The same as cumulative buckets, so that a scraper can take quantiles over any window.
    let _ = writeln!(
        s,
        "# HELP plantmesh_publish_latency_window_ms Read-to-PUBACK latency of live messages, cumulative.\n# TYPE plantmesh_publish_latency_window_ms histogram"
    );
    for (le, n) in p.latency_buckets() {
        let _ = writeln!(s, "plantmesh_publish_latency_window_ms_bucket{{le=\"{le}\"}} {n}");
    }
    let total = p.latency_total();
    let _ = writeln!(s, "plantmesh_publish_latency_window_ms_bucket{{le=\"+Inf\"}} {total}");
    let devices = &now.plan.devices;
    let per_device = |f: &dyn Fn(usize) -> u64| -> Vec<(String, String)> {
        devices
            .iter()
            .enumerate()
            .map(|(i, d)| (format!("device=\"{}\"", d.id), f(i).to_string()))
            .collect()
    };
    family(
        &mut s,
        "plantmesh_device_connected",
        "1 while the device's connection is up.",
        "gauge",
        per_device(&|i| now.devices[i].connected.load(Relaxed)).into_iter(),
    );
    family(
        &mut s,
        "plantmesh_device_polls_total",
        "Polls (or notification batches; MQTT devices: messages) per device.",
        "counter",
        per_device(&|i| now.devices[i].polls.load(Relaxed)).into_iter(),
    );
    // By reason: `request` (Modbus, OPC UA: a failed request), `framing` (sensor nodes: byte runs
    // on the link that were not frames), `unreadable` and `oversize` (MQTT devices: messages that
    // could not be read, and messages over max_message_bytes, skipped).
    let errors = now.plan.devices.iter().enumerate().flat_map(|(i, d)| {
        let stats = &now.devices[i];
        let (all, oversize) = (stats.errors.load(Relaxed), stats.oversize.load(Relaxed));
        let reason = match d.kind {
            DeviceKind::Sensor(_) => "framing",
            DeviceKind::Mqtt(_) => "unreadable",
            _ => "request",
        };
        let mut v = vec![(
            format!("device=\"{}\",reason=\"{reason}\"", d.id),
            all.saturating_sub(oversize).to_string(),
        )];
        if matches!(d.kind, DeviceKind::Mqtt(_)) {
            v.push((format!("device=\"{}\",reason=\"oversize\"", d.id), oversize.to_string()));
        }
        v
    });
    family(
        &mut s,
        "plantmesh_device_errors_total",
        "Device errors by reason: request (Modbus, OPC UA), framing (sensor nodes), unreadable and oversize (MQTT devices).",
        "counter",
        errors,
    );
    let sensor = |i: &(String, String)| {
        now.plan
            .devices
            .iter()
            .any(|d| matches!(d.kind, DeviceKind::Sensor(_)) && i.0 == format!("device=\"{}\"", d.id))
    };
    family(
        &mut s,
        "plantmesh_sensor_crc_errors_total",
        "Sensor-node frames that failed their CRC.",
        "counter",
        per_device(&|i| now.devices[i].crc_errors.load(Relaxed))
            .into_iter()
            .filter(sensor),
    );
    family(
        &mut s,
        "plantmesh_sensor_lost_frames_total",
        "Sensor-node frames lost on the link (gaps in the node's sequence numbers).",
        "counter",
        per_device(&|i| now.devices[i].lost_frames.load(Relaxed))
            .into_iter()
            .filter(sensor),
    );
    family(
        &mut s,
        "plantmesh_sensor_restarts_total",
        "Sensor-node restarts seen.",
        "counter",
        per_device(&|i| now.devices[i].reboots.load(Relaxed))
            .into_iter()
            .filter(sensor),
    );
    let mqtt = |i: &(String, String)| {
        now.plan
            .devices
            .iter()
            .any(|d| matches!(d.kind, DeviceKind::Mqtt(_)) && i.0 == format!("device=\"{}\"", d.id))
    };
    family(
        &mut s,
        "plantmesh_mqtt_sequence_lost_total",
        "Sparkplug messages missing from edge nodes' sequences (MQTT devices).",
        "counter",
        per_device(&|i| now.devices[i].lost_frames.load(Relaxed))
            .into_iter()
            .filter(mqtt),
    );
    family(
        &mut s,
        "plantmesh_mqtt_rebirth_requests_total",
        "Rebirth requests sent to Sparkplug edge nodes (MQTT devices).",
        "counter",
        per_device(&|i| now.devices[i].requests.load(Relaxed))
            .into_iter()
            .filter(mqtt),
    );
    if let Ok(slis) = r.slis.lock() {
        let products = &now.plan.products;
        let label = |i: usize| format!("product=\"{}\",major=\"{}\"", products[i].id, products[i].major);
        family(
            &mut s,
            "plantmesh_product_completeness",
            "Good values / values in the last SLI interval.",
            "gauge",
            (0..products.len()).map(|i| (label(i), slis.last(i).1.to_string())),
        );
        family(
            &mut s,
            "plantmesh_product_freshness_seconds",
            "Age of the newest good value at the last SLI interval.",
            "gauge",
            (0..products.len()).filter_map(|i| slis.last(i).0.map(|ms| (label(i), (ms as f64 / 1000.0).to_string()))),
        );
        family(
            &mut s,
            "plantmesh_product_records_total",
            "Records produced per product.",
            "counter",
            (0..products.len()).map(|i| (label(i), slis.last(i).2.to_string())),
        );
    }
    family(
        &mut s,
        "plantmesh_config_reloads_total",
        "Reloads of the configuration, by outcome (refused: anything of it was not applied).",
        "counter",
        [
            (
                "outcome=\"accepted\"".to_string(),
                r.reloads.accepted.load(Relaxed).to_string(),
            ),
            (
                "outcome=\"refused\"".to_string(),
                r.reloads.refused.load(Relaxed).to_string(),
            ),
        ]
        .into_iter(),
    );
    family(
        &mut s,
        "plantmesh_config_refused_files",
        "Product files the last reload refused: their products run on their previous version.",
        "gauge",
        now.refused.iter().map(|(file, _)| {
            (
                format!("file=\"{}\"", file.replace('\\', "\\\\").replace('"', "\\\"")),
                "1".to_string(),
            )
        }),
    );
    s
}

/// One metric family with labelled samples.
fn family(s: &mut String, name: &str, help: &str, kind: &str, samples: impl Iterator<Item = (String, String)>) {
    let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(s, "{name}{{{labels}}} {value}");
    }
}

#[cfg(test)]
mod tests {
    /// Regression: the responder answered after its first read. A client whose request arrived in
    /// several segments had its later writes hit a closed socket, and the connection was reset
    /// (seen as a broken pipe in the SLI test under load). Now the whole request head is read first.
    #[tokio::test]
    async fn a_request_in_many_segments_is_read_whole() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let plan = crate::config::load_texts(
            (
                std::path::Path::new("agent.toml"),
                "[agent]\nid = \"g\"\nsite = \"s\"\narea = \"a\"\nline = \"l\"\ngovernance = \"builtin-defaults\"\n",
            ),
            None,
            &[],
            std::path::Path::new("/tmp"),
        )
        .unwrap();
        let running = super::Running::for_tests(std::sync::Arc::new(plan));
        let addr = super::serve("127.0.0.1:0".parse().unwrap(), running).await.unwrap();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        for piece in ["GET ", "/hea", "lth HTTP/1.1\r\n", "host: x\r\n", "\r\n"] {
            s.write_all(piece.as_bytes()).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK") && out.ends_with("ok\n"), "{out}");
    }
}
