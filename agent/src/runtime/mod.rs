//! Wiring: builds the tasks of a [`Plan`] and runs them until a signal (or the writer stops).
//!
//! Tasks: one per device (sources), one map task (readings -> encoded records -> buffer), the buffer
//! writer thread, and the publisher. Shutdown order: sources stop, map drains into the buffer, the
//! publisher finishes in-flight messages (up to 3 s) and says `offline`, the writer commits what is
//! left and exits. Failing storage does not stop anything: the writer runs degraded (see
//! [`crate::buffer`]); only a writer that stopped (it panicked) makes the agent exit at once.

mod control;
pub mod parts;

use crate::buffer::{self, ProductSlot, Store};
use crate::config::{MqttVersion, Plan, UpstreamPlan};
use crate::govern::GovernError;
use crate::produce::{self, Produce};
use crate::publish::{envelope, link::LinkError, link::LinkOptions, PublishStats, Publisher};
use crate::sources::{DeviceStats, OpcUaIdentityFiles, SourceCtx};
pub use parts::{ConfigSource, Parts, Report};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::{error, info};

pub use crate::telemetry::Running;

/// Why the agent could not start, or stopped. Each says what to fix; `main` prints it and exits
/// non-zero, so the service manager restarts the agent.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Buffer(#[from] buffer::BufferError),
    /// The upstream connection cannot be set up (a secret, CA or key file).
    #[error("upstream: {0}")]
    Upstream(#[from] LinkError),
    #[error("cannot create data directory {}: {source}", path.display())]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("embedded broker: {0}")]
    Broker(String),
    #[error("governance: {0}")]
    Governance(#[from] GovernError),
    #[error("the buffer writer stopped")]
    WriterStopped,
    #[error("cannot handle SIGTERM: {0}")]
    Signal(std::io::Error),
    #[error("agent.metrics_listen: cannot listen on {address}: {source} (choose a free address, or \"off\" to run without /metrics and /health)")]
    Metrics {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// The OPC UA ApplicationUri of this agent (also in its application instance certificate).
pub fn application_uri(plan: &Plan) -> String {
    format!("urn:plantmesh:{}:{}", plan.agent.site, plan.agent.id)
}

/// The products whose retained documents are to be cleared: those the ledger has that the config
/// no longer runs (removed while the agent was stopped), and the retired ones. The ledger then
/// lists them and every product of the config.
fn leftovers(plan: &Plan) -> Vec<(String, Vec<String>)> {
    use crate::catalog::ledger;
    let file = ledger::path(&plan.agent.data_dir);
    let running: std::collections::HashSet<&str> = plan.products.iter().map(|p| p.key.as_str()).collect();
    let mut gone: ledger::Entries = ledger::read(&file)
        .into_iter()
        .filter(|(k, _)| !running.contains(k.as_str()))
        .collect();
    for p in &plan.retired {
        let (k, v) = ledger::entry_of(plan, p);
        gone.entry(k).or_insert(v);
    }
    let update = ledger::update(&file, |e| {
        e.extend(gone.iter().map(|(k, v)| (k.clone(), v.clone())));
        e.extend(plan.products.iter().map(|p| ledger::entry_of(plan, p)));
    });
    if let Err(e) = update {
        tracing::warn!(file = %file.display(), error = %e, "cannot record the announced products; if they are removed while the agent is stopped, their retained documents stay at the broker");
    }
    gone.into_iter().map(|(k, v)| (k, ledger::topics(&v))).collect()
}

/// Default upstream settings for the embedded broker.
pub fn local_upstream(port: u16, client_id: String) -> UpstreamPlan {
    UpstreamPlan {
        host: "127.0.0.1".into(),
        port,
        tls: false,
        version: MqttVersion::V311,
        client_id,
        keep_alive: Duration::from_secs(30),
        username: None,
        password: None,
        insecure_credentials: false,
        ca_file: None,
        client_cert: None,
        max_inflight: 32,
        max_records_per_message: 100,
        max_message_bytes: 256 << 10,
        backlog_bytes_per_second: None,
        reconnect_min: Duration::from_millis(500),
        reconnect_max: Duration::from_secs(30),
        sparkplug: None,
    }
}

/// Starts one task per device, sending every poll's readings to `out` until `shutdown` (a plan
/// that is not reloaded: `plantmesh preview`).
pub fn spawn_sources(
    plan: &Plan,
    out: mpsc::Sender<crate::model::ReadingBatch>,
    shutdown: &watch::Receiver<bool>,
) -> (Vec<tokio::task::JoinHandle<()>>, Vec<Arc<DeviceStats>>) {
    let opcua = opcua_identity(plan);
    let mut device_stats = Vec::new();
    let mut sources = Vec::new();
    for (index, d) in plan.devices.iter().enumerate() {
        let stats = Arc::new(DeviceStats::default());
        device_stats.push(stats.clone());
        let ctx = SourceCtx {
            index,
            id: d.id.clone(),
            device_tags: d.tags.clone(),
            tags: plan.tags.clone(),
            stats,
            out: out.clone(),
            shutdown: shutdown.clone(),
        };
        sources.push(crate::sources::spawn(d, ctx, &opcua));
    }
    (sources, device_stats)
}

fn opcua_identity(plan: &Plan) -> OpcUaIdentityFiles {
    OpcUaIdentityFiles {
        pki_dir: plan.agent.data_dir.join("pki"),
        application_uri: application_uri(plan),
    }
}

/// Runs the agent. `config`: where the plan came from, so that SIGHUP and `plantmesh reload` can
/// reload it (`None`: the embedded demo plant, nothing to reload). `on_start` is called once
/// everything is running (the demo's view hooks in here). `view`: keep the latest record per
/// product for the status view (a copy per record).
pub async fn run(
    mut plan: Plan,
    config: Option<ConfigSource>,
    view: bool,
    on_start: impl FnOnce(Running),
) -> Result<(), RunError> {
    // First: SIGHUP's default action ends the process, and a reload may come at any time.
    let mut sighup =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).map_err(RunError::Signal)?;
    std::fs::create_dir_all(&plan.agent.data_dir).map_err(|source| RunError::DataDir {
        path: plan.agent.data_dir.clone(),
        source,
    })?;
    if plan.governance.file.is_none() {
        tracing::warn!(
            "no governance file: running on the built-in governance defaults (agent.governance = \"builtin-defaults\": public and internal pass, confidential masked, restricted never leaves, any topic)"
        );
    }
    let buffer_path = plan.agent.data_dir.join("buffer.redb");
    let audit_entry = serde_json::json!({
        "config_hash": plan.config_hash,
        "files": plan.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
        "products": plan.products.iter().map(|p| format!("{}@{}", p.id, p.version)).collect::<Vec<_>>(),
        "agent_version": env!("CARGO_PKG_VERSION"),
    });
    if let Err(e) = crate::audit::append(&plan.agent.data_dir, "config_load", audit_entry) {
        tracing::warn!(error = %e, "cannot write the audit trail");
    }
    // A small page cache: the buffer is written sequentially and read near its head.
    let (mut store, report) = Store::open(&buffer_path, plan.buffer.max_bytes, 1 << 20)?;
    info!(path = %buffer_path.display(), epoch = report.epoch, pending_messages = report.pending_messages,
          pending_bytes = report.pending_bytes, "buffer opened");
    for g in &report.crashed {
        tracing::warn!(product = %g.product, epoch = g.epoch, from_seq = g.from_seq, to_seq = g.to_seq,
            "the last run stopped without a clean shutdown: these seqs were numbered but neither committed nor seen acknowledged (each delivered or lost); crash gap event recorded");
    }

    let embedded = plan.upstream.is_none();
    let upstream = match &plan.upstream {
        Some(u) => u.clone(),
        None => {
            let addr = start_embedded_broker()?;
            let u = local_upstream(addr.port(), format!("plantmesh-{}", plan.agent.id));
            plan.upstream = Some(u.clone());
            u
        }
    };
    let broker = format!("{}:{}", upstream.host, upstream.port);
    let plan = Arc::new(plan);

    // What governance does to each product's fields now: kept in the buffer, stamped on every
    // message, so that what was buffered under older rules is judged against these before it goes.
    {
        let treatments: Vec<crate::govern::Treatment> =
            plan.products.iter().map(crate::govern::Treatment::of).collect();
        if let Err(e) = store.record_treatments(plan.products.iter().map(|p| p.key.as_str()).zip(&treatments)) {
            tracing::warn!(error = %e, "cannot store the governance treatments yet; the next commit that works does");
        }
    }
    let slots: Vec<ProductSlot> = plan.products.iter().map(parts::buffer_slot).collect();
    if let Some(damage) = &report.damage {
        let products: Vec<(String, String)> = slots
            .iter()
            .map(|s| (s.id.clone(), s.limits.gap_topic.clone()))
            .collect();
        for g in store.record_damage(damage, &products).unwrap_or_else(|e| {
            error!(error = %e, "cannot record the buffer_corrupt gap events");
            Vec::new()
        }) {
            tracing::error!(product = %g.product, through_epoch = g.epoch, salvaged_messages = damage.salvaged_messages,
                moved_to = %damage.aside.display(),
                "the damaged buffer file may have held messages of this product that were not delivered: buffer_corrupt gap event recorded (whatever of epochs up to this one has not arrived once the salvaged messages are replayed is lost)");
        }
    }
    let reader = store.reader();
    let sli_reader = store.reader();
    let epoch = store.epoch();
    let (handle, writer) = buffer::start(
        store,
        slots,
        buffer::WriterOptions {
            commit_interval: plan.buffer.commit_interval,
            max_records_per_message: upstream.max_records_per_message,
            max_message_bytes: upstream.max_message_bytes,
            commit_before_send: plan.buffer.commit_before_send,
            max_staged_bytes: buffer::STAGED_BYTES_MAX,
        },
    );
    tokio::spawn(crate::disk::watch(
        plan.agent.data_dir.clone(),
        plan.buffer.free_space_warning,
        handle.stats.clone(),
        Duration::from_secs(5),
    ));
    let (writer_done_tx, mut writer_done) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let result = writer.join().unwrap_or_else(|_| {
            Err(buffer::BufferError::Storage {
                path: Default::default(),
                source: redb::Error::Corrupted("writer panicked".into()),
            })
        });
        let _ = writer_done_tx.send(result);
    });

    let (shutdown_tx, shutdown) = watch::channel(false);

    // Publisher.
    let status_topic = envelope::status_topic(&plan);
    let options = LinkOptions::resolve(
        &upstream,
        status_topic.clone(),
        envelope::status(&plan, "offline", epoch),
    )?;
    let mut options = options;
    // On connect every product queues its descriptor, contract and catalog entry; its SLI follows.
    options.burst = 4 * plan.products.len();
    let publish_stats = Arc::new(PublishStats::new(plan.products.len()));
    let (retained_tx, retained_rx) = mpsc::unbounded_channel();
    let sparkplug = upstream.sparkplug.as_ref().map(|sp| crate::publish::SparkplugOut {
        encoder: crate::publish::sparkplug::Encoder::new(
            &plan,
            &sp.group_id,
            &sp.edge_node_id,
            sp.primary_host.clone(),
        ),
        bd_seq_file: crate::publish::sparkplug::bd_seq_path(&plan.agent.data_dir),
    });
    let products = crate::publish::Products::new(
        (0..plan.products.len()).map(|i| parts::announced(&plan, i)).collect(),
        &reader,
    );
    let (change_tx, change_rx) = mpsc::unbounded_channel();
    let uns = sparkplug.is_none().then(|| crate::publish::uns::Board::new(&plan));
    let publisher = Publisher {
        uns: uns.clone(),
        sparkplug,
        options,
        reader,
        buffer: handle.clone(),
        products,
        agent_id: plan.agent.id.clone(),
        status_topic,
        online: envelope::status(&plan, "online", epoch),
        offline: envelope::status(&plan, "offline", epoch),
        stats: publish_stats.clone(),
        shutdown: shutdown.clone(),
        retained: retained_rx,
        contracts_dir: Some(crate::config::contract::dir(&plan.agent.data_dir)),
        egress: parts::egress(&plan, []),
        changes: change_rx,
        retired: vec![false; plan.products.len()],
        clearing: Vec::new(),
        leftovers: leftovers(&plan),
        asyncapi: Some((crate::catalog::asyncapi::topic(&plan), {
            let plan = plan.clone();
            Arc::new(move || {
                let most = plan.upstream.as_ref().map_or(256 * 1024, |u| u.max_message_bytes);
                crate::catalog::asyncapi::document_within(&plan, most)
            })
        })),
        ledger: Some(crate::catalog::ledger::path(&plan.agent.data_dir)),
    };
    if upstream.insecure_credentials {
        tracing::warn!(broker = %broker, "the upstream password crosses plain MQTT readable on the network (allow_insecure_credentials = true)");
    }
    let publisher = tokio::spawn(publisher.run());

    // Sources -> map.
    let (batch_tx, batch_rx) = mpsc::channel(1024);

    // Governance: the site secret is read now; a product that must pseudonymise cannot run without it.
    let key = match &plan.governance.key_file {
        Some(path) => Some(crate::govern::read_key(path)?),
        None => None,
    };
    let governor = crate::govern::Governor::new(&plan, key)?;
    let last = Arc::new(std::sync::Mutex::new(vec![None; plan.products.len()]));
    let shown = if view {
        crate::page::Shown::always()
    } else {
        crate::page::Shown::default()
    };
    let slis = Arc::new(std::sync::Mutex::new(crate::catalog::Slis::new(plan.products.len())));
    let (produce_tx, produce_rx) = mpsc::unbounded_channel();
    let parts = Parts::start(
        plan.clone(),
        config,
        embedded,
        parts::Wiring {
            buffer: handle.clone(),
            produce: produce_tx,
            publisher: change_tx,
            batches: batch_tx,
            opcua: opcua_identity(&plan),
            epoch,
            publish_stats: publish_stats.clone(),
        },
    );
    let current = parts.current.clone();
    let produce = Produce::new(
        plan.clone(),
        governor,
        produce::Outputs {
            buffer: handle.clone(),
            slis: slis.clone(),
            produced: current.read().map(|n| n.produced.clone()).unwrap_or_default(),
            last: last.clone(),
            shown: shown.clone(),
            uns,
        },
    );
    let map_task = tokio::spawn(produce.run(batch_rx, produce_rx));

    // SLIs: one retained document per product per interval.
    tokio::spawn(crate::catalog::publish_slis(
        current.clone(),
        slis.clone(),
        publish_stats.clone(),
        sli_reader,
        retained_tx,
        shown.clone(),
        shutdown.clone(),
    ));
    let writer_alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let running = Running {
        current,
        buffer: handle.stats.clone(),
        publish: publish_stats,
        reloads: parts.reloads.clone(),
        epoch,
        broker,
        last,
        shown,
        page: Arc::default(),
        slis,
        writer_alive: writer_alive.clone(),
    };
    if let Some(addr) = plan.agent.metrics_listen {
        match crate::telemetry::serve(addr, running.clone()).await {
            Ok(bound) => {
                let _ = running.page.set(bound);
                info!(address = %bound, "status page on http://{bound}/ (read-only), metrics on http://{bound}/metrics, health on http://{bound}/health")
            }
            Err(e) if plan.agent.metrics_required => {
                return Err(RunError::Metrics {
                    address: addr,
                    source: e,
                });
            }
            Err(e) => tracing::error!(address = %addr, error = %e,
                "cannot serve metrics and health on the default address: running WITHOUT /metrics and /health; set agent.metrics_listen to a free address (then a failure to bind stops the start) or to \"off\""),
        }
    }
    on_start(running);
    drop(handle);

    let mut parts = parts;
    let mut sigterm =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(RunError::Signal)?;
    let mut control = control::listen(&plan.agent.data_dir);
    // `agent.watch_config`: a change to the files reloads once it has stayed for one period.
    let mut watch = parts.config.as_ref().and(plan.agent.watch_config).map(|every| {
        let mut t = tokio::time::interval(every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let watched = parts.config.as_ref().map(|c| c.paths.clone()).unwrap_or_default();
    let signature = |paths: Vec<std::path::PathBuf>| async move {
        tokio::task::spawn_blocking(move || crate::reload::files_signature(&paths))
            .await
            .unwrap_or(0)
    };
    let mut applied_files = signature(watched.clone()).await;
    let mut seen_files = applied_files;
    let fatal = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break None,
            _ = sigterm.recv() => break None,
            r = &mut writer_done => break Some(r),
            _ = sighup.recv() => {
                info!("SIGHUP: reloading the configuration");
                applied_files = signature(watched.clone()).await;
                let report = parts.reload().await;
                info!("{}", report.text().trim_end());
            }
            Some(request) = control.recv() => {
                applied_files = signature(watched.clone()).await;
                let report = parts.reload().await;
                let _ = request.send(report);
            }
            _ = async {
                match watch.as_mut() {
                    Some(t) => {
                        t.tick().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            } => {
                let now = signature(watched.clone()).await;
                if now != applied_files && now == seen_files {
                    info!("the config files changed: reloading (agent.watch_config)");
                    applied_files = now;
                    let report = parts.reload().await;
                    info!("{}", report.text().trim_end());
                }
                seen_files = now;
            }
        }
    };
    drop(control);
    if let Some(result) = fatal {
        writer_alive.store(false, std::sync::atomic::Ordering::Relaxed);
        // The writer is gone: nothing more can be accepted. Exit without a graceful drain.
        let e = result.unwrap_or(Ok(())).err();
        error!(error = ?e, "buffer writer stopped; exiting so the service manager restarts the agent");
        return Err(e.map_or(RunError::WriterStopped, RunError::Buffer));
    }
    info!("stopping: draining sources, buffer and in-flight messages");
    let _ = shutdown_tx.send(true);
    parts.stop().await;
    let _ = map_task.await;
    match publisher.await {
        Ok(Err(e)) => error!(error = %e, "publisher failed"),
        Err(e) => error!(error = %e, "publisher task failed"),
        Ok(Ok(())) => {}
    }
    match writer_done.await {
        Ok(Err(e)) => Err(e.into()),
        _ => Ok(()),
    }
}

#[cfg(feature = "embedded-broker")]
pub fn start_embedded_broker() -> Result<std::net::SocketAddr, RunError> {
    let port = std::env::var("PLANTMESH_BROKER_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(1883);
    let addr = crate::sim::broker::start(port).map_err(RunError::Broker)?;
    info!(address = %addr, "no upstream configured: embedded MQTT broker listening (try: mosquitto_sub -h {} -p {} -t '#' -v)", addr.ip(), addr.port());
    Ok(addr)
}

#[cfg(not(feature = "embedded-broker"))]
pub fn start_embedded_broker() -> Result<std::net::SocketAddr, RunError> {
    Err(RunError::Broker(
        "no [upstream] configured and this build has no embedded broker (feature `embedded-broker`)".into(),
    ))
}
