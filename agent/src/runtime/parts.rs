//! The running pieces a reload changes, and the reload itself (the configuration side is
//! [`crate::reload`]).
//!
//! Slots: every product ever run in this process has a slot, its index in the buffer writer, the
//! publisher and the per-product counters. Slots are never reused or removed: a product that left
//! the config keeps its slot (retired) while its backlog drains. Devices: one source task each,
//! numbered in start order; readings name their task, and a task started under an earlier plan
//! has its tag indexes translated ([`Remap`]), so an unchanged device polls on through a reload.
//!
//! Order of a reload: validate everything (nothing has changed yet), stop the tasks of removed and
//! changed devices, change the buffer's slots, switch the produce stage (between two batches),
//! then start the new device tasks (their readings use the new plan's indexes, so they start after
//! the switch), then tell the publisher (new descriptors, cleared ones, status).

use crate::buffer::{BufferHandle, ProductLimits, ProductSlot};
use crate::config::{Plan, ProductPlan};
use crate::produce::{Reconfigure, Remap};
use crate::publish::{envelope, Announced, Change, Egress, PublishStats};
use crate::sources::{DeviceStats, OpcUaIdentityFiles, SourceCtx};
use crate::telemetry::{Current, Now, ReloadStats};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

/// Where a reload reads its configuration from.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    /// The `--config` paths.
    pub paths: Vec<PathBuf>,
    /// The `--data-dir` override.
    pub data_dir: Option<PathBuf>,
    /// The product files running (their texts are on disk, see [`crate::reload::Applied`]).
    pub applied: crate::reload::Applied,
    /// Hands freed memory back to the system (a reload frees a whole plan's worth).
    pub trim: fn(),
}

/// What a reload did: printed by `plantmesh reload`, logged, and kept in the audit trail.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// One line per change applied.
    pub applied: Vec<String>,
    /// Every problem refused (`file:line:column: ...`).
    pub errors: Vec<String>,
    /// The hash of the configuration running afterwards.
    pub config_hash: String,
}

impl Report {
    pub fn refused(&self) -> bool {
        !self.errors.is_empty()
    }

    /// The text `plantmesh reload` prints: the outcome, then what changed, then every error.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let outcome = match (self.refused(), self.applied.is_empty()) {
            (false, true) => "nothing changed",
            (false, false) => "applied",
            (true, true) => "refused: nothing changed",
            (true, false) => "applied in part: some files were refused",
        };
        s.push_str(&format!("reload {outcome} (config_hash {})\n", self.config_hash));
        for a in &self.applied {
            s.push_str(&format!("  {a}\n"));
        }
        for e in &self.errors {
            for (i, line) in e.lines().enumerate() {
                s.push_str(if i == 0 { "  error: " } else { "    " });
                s.push_str(line);
                s.push('\n');
            }
        }
        s
    }
}

struct DeviceTask {
    /// The number its readings carry.
    task: usize,
    /// Its tags' indexes in the plan it was started under.
    spawn_tags: Arc<[usize]>,
    stop: watch::Sender<bool>,
    join: tokio::task::JoinHandle<()>,
    stats: Arc<DeviceStats>,
}

/// The running agent's changeable parts.
pub struct Parts {
    pub plan: Arc<Plan>,
    pub config: Option<ConfigSource>,
    /// Per slot: the buffer's and the publisher's view, and whether the product left the config.
    slot_of: HashMap<String, usize>,
    buffer_slots: Vec<ProductSlot>,
    announced: Vec<Announced>,
    retired: Vec<bool>,
    /// Per device of the plan.
    devices: Vec<DeviceTask>,
    next_task: usize,
    /// Per task number: the translation of its readings (`None`: of the current plan).
    remap: Vec<Option<Arc<Remap>>>,
    buffer: BufferHandle,
    produce: mpsc::UnboundedSender<Reconfigure>,
    publisher: mpsc::UnboundedSender<Change>,
    pub current: Current,
    batches: mpsc::Sender<crate::model::ReadingBatch>,
    opcua: OpcUaIdentityFiles,
    epoch: u64,
    publish_stats: Arc<PublishStats>,
    pub reloads: Arc<ReloadStats>,
    /// The plan runs on the embedded broker (its upstream is not in the config).
    embedded: bool,
    refused: Vec<(String, String)>,
}

/// What the buffer writer needs of a product.
pub fn buffer_slot(p: &ProductPlan) -> ProductSlot {
    ProductSlot {
        id: p.key.clone(),
        governance: crate::govern::Treatment::of(p).fingerprint(),
        topic: p.topic.clone(),
        version: p.version.clone(),
        max_records: p.max_records_per_message,
        limits: ProductLimits {
            max_bytes: p.max_bytes,
            policy: p.full_policy,
            gap_topic: envelope::gaps_topic(p),
        },
    }
}

/// What the publisher announces of product `i` of `plan`.
pub fn announced(plan: &Arc<Plan>, i: usize) -> Announced {
    let p = &plan.products[i];
    let (descriptor_plan, documents_plan, treatment_plan) = (plan.clone(), plan.clone(), plan.clone());
    Announced {
        id: p.key.clone(),
        qos: p.qos,
        descriptor_topic: envelope::descriptor_topic(p),
        sli_topic: crate::catalog::sli_topic(p),
        descriptor: Arc::new(move || envelope::descriptor(&descriptor_plan, &descriptor_plan.products[i])),
        documents: Arc::new(move || {
            let (plan, p) = (&*documents_plan, &documents_plan.products[i]);
            let contract = crate::catalog::odcs::contract_bytes(plan, p);
            let entry = crate::catalog::entry::entry(plan, p, &contract);
            vec![
                (crate::catalog::odcs::contract_topic(p), contract),
                (crate::catalog::entry::entry_topic(&plan.agent, p), entry),
            ]
        }),
        urn: crate::config::urn(&plan.agent, &p.id, p.major).into(),
        governance: crate::govern::Treatment::of(p).fingerprint(),
        treatment: Arc::new(move || crate::govern::Treatment::of(&treatment_plan.products[i])),
    }
}

/// What egress allows under `plan`.
pub fn egress(plan: &Plan, retired: impl IntoIterator<Item = String>) -> Egress {
    Egress {
        topic_prefixes: plan.governance.allow_topic_prefixes.clone(),
        products: plan.products.iter().map(|p| p.key.clone()).chain(retired).collect(),
    }
}

/// The channels and handles [`Parts`] is made of.
pub struct Wiring {
    pub buffer: BufferHandle,
    pub produce: mpsc::UnboundedSender<Reconfigure>,
    pub publisher: mpsc::UnboundedSender<Change>,
    pub batches: mpsc::Sender<crate::model::ReadingBatch>,
    pub opcua: OpcUaIdentityFiles,
    pub epoch: u64,
    pub publish_stats: Arc<PublishStats>,
}

impl Parts {
    /// Starts one source task per device of `plan`; the slots are the plan's products in order.
    pub fn start(plan: Arc<Plan>, config: Option<ConfigSource>, embedded: bool, w: Wiring) -> Parts {
        let mut parts = Parts {
            slot_of: plan
                .products
                .iter()
                .enumerate()
                .map(|(i, p)| (p.key.clone(), i))
                .collect(),
            buffer_slots: plan.products.iter().map(buffer_slot).collect(),
            announced: (0..plan.products.len()).map(|i| announced(&plan, i)).collect(),
            retired: vec![false; plan.products.len()],
            devices: Vec::new(),
            next_task: 0,
            remap: Vec::new(),
            buffer: w.buffer,
            produce: w.produce,
            publisher: w.publisher,
            current: Arc::new(std::sync::RwLock::new(Arc::new(Now::start(plan.clone(), Vec::new())))),
            batches: w.batches,
            opcua: w.opcua,
            epoch: w.epoch,
            publish_stats: w.publish_stats,
            reloads: Arc::default(),
            embedded,
            refused: Vec::new(),
            config,
            plan: plan.clone(),
        };
        for d in 0..plan.devices.len() {
            let task = parts.spawn(&plan, d, Arc::new(DeviceStats::default()));
            parts.devices.push(task);
        }
        let devices = parts.devices.iter().map(|t| t.stats.clone()).collect();
        *parts.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Now::start(plan, devices));
        parts
    }

    fn spawn(&mut self, plan: &Plan, d: usize, stats: Arc<DeviceStats>) -> DeviceTask {
        let device = &plan.devices[d];
        let task = self.next_task;
        self.next_task += 1;
        let (stop, shutdown) = watch::channel(false);
        let ctx = SourceCtx {
            index: task,
            id: device.id.clone(),
            device_tags: device.tags.clone(),
            tags: plan.tags.clone(),
            stats: stats.clone(),
            out: self.batches.clone(),
            shutdown,
        };
        DeviceTask {
            task,
            spawn_tags: device.tags.clone(),
            stop,
            join: crate::sources::spawn(device, ctx, &self.opcua),
            stats,
        }
    }

    /// Stops every device task and waits for them; then drops what keeps the pipeline open, so
    /// the produce stage and the writer can finish.
    pub async fn stop(self) {
        for t in &self.devices {
            let _ = t.stop.send(true);
        }
        for t in self.devices {
            let _ = t.join.await;
        }
    }

    /// Reloads the configuration from its files (SIGHUP, `plantmesh reload`).
    pub async fn reload(&mut self) -> Report {
        let started = Instant::now();
        let report = self.try_reload().await;
        let refused = report.refused();
        if refused {
            self.reloads.refused.fetch_add(1, Ordering::Relaxed);
        } else {
            self.reloads.accepted.fetch_add(1, Ordering::Relaxed);
        }
        let entry = serde_json::json!({
            "config_hash": report.config_hash,
            "outcome": if refused { "refused" } else { "accepted" },
            "applied": report.applied,
            "errors": report.errors,
        });
        if let Err(e) = crate::audit::append(&self.plan.agent.data_dir, "config_reload", entry) {
            warn!(error = %e, "cannot write the audit trail");
        }
        for e in &report.errors {
            warn!(problem = %e, "reload refused this");
        }
        info!(config_hash = %report.config_hash, changes = report.applied.len(), refused = report.errors.len(),
              took_ms = started.elapsed().as_millis() as u64, "configuration reloaded");
        report
    }

    async fn try_reload(&mut self) -> Report {
        let mut report = Report {
            config_hash: self.plan.config_hash.clone(),
            ..Report::default()
        };
        let Some(source) = self.config.clone() else {
            report.errors.push(
                "this agent runs the embedded demo plant: there are no config files to reload (run it with --config)"
                    .into(),
            );
            return report;
        };
        let loading = source.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            crate::reload::load_isolated(&loading.paths, loading.data_dir.as_deref(), &loading.applied)
        })
        .await;
        let loaded = match loaded {
            Ok(Ok(l)) => l,
            Ok(Err(d)) => {
                report.errors.extend(d.0.iter().map(|d| d.to_string()));
                return report;
            }
            Err(e) => {
                report.errors.push(format!("the reload failed: {e}"));
                return report;
            }
        };
        let mut plan = loaded.plan;
        if self.embedded && plan.upstream.is_none() {
            plan.upstream = self.plan.upstream.clone();
        }
        let changes = match crate::reload::diff(&self.plan, &plan, &loaded.texts.gateway) {
            Ok(c) => c,
            Err(d) => {
                report.errors.extend(d.0.iter().map(|d| d.to_string()));
                return report;
            }
        };
        let same_devices = changes.devices_kept.len() == self.plan.devices.len()
            && changes.devices_kept.iter().all(|&(i, j)| i == j)
            && plan.devices.len() == self.plan.devices.len()
            && plan.tags.len() == self.plan.tags.len()
            && plan
                .devices
                .iter()
                .zip(&self.plan.devices)
                .all(|(a, b)| a.tags == b.tags);
        if same_devices {
            // The same table (every device and tag as it was, in place): share the one the
            // device tasks hold instead of keeping two.
            plan.tags = self.plan.tags.clone();
        }
        let key = match &plan.governance.key_file {
            Some(path) => match crate::govern::read_key(path) {
                Ok(k) => Some(k),
                Err(e) => {
                    report.errors.push(format!("governance: {e}"));
                    return report;
                }
            },
            None => None,
        };
        let plan = Arc::new(plan);
        let governor = match crate::govern::Governor::new(&plan, key) {
            Ok(g) => g,
            Err(e) => {
                report.errors.push(format!("governance: {e}"));
                return report;
            }
        };
        // Everything is valid: from here on the reload goes ahead.
        let mut refused = Vec::new();
        for (file, d) in &loaded.refused {
            let shown = file.display().to_string();
            report
                .errors
                .push(format!("{shown} refused; its products run on as they were\n{d}"));
            refused.push((shown, d.0.first().map(|x| x.to_string()).unwrap_or_default()));
        }
        let trim = source.trim;
        let mut applied = source.applied.clone();
        let texts = loaded.texts;
        let kept = tokio::task::spawn_blocking(move || {
            applied.keep(&texts);
            drop(texts);
            trim();
            applied
        })
        .await;
        self.config = Some(ConfigSource {
            applied: kept.unwrap_or(source.applied.clone()),
            ..source
        });
        report.config_hash = plan.config_hash.clone();
        if changes.none && plan.config_hash == self.plan.config_hash && refused == self.refused {
            return report;
        }
        self.apply(plan, governor, &changes, refused, &mut report).await;
        // As after the start: the old plan goes now, the descriptors' buffers once published.
        (source.trim)();
        tokio::spawn(async move {
            for wait in [5, 30] {
                tokio::time::sleep(Duration::from_secs(wait)).await;
                trim();
            }
        });
        report
    }

    async fn apply(
        &mut self,
        plan: Arc<Plan>,
        governor: crate::govern::Governor,
        c: &crate::reload::Changes,
        refused: Vec<(String, String)>,
        report: &mut Report,
    ) {
        let old = self.plan.clone();
        // Products: slots by key, new ones appended.
        let mut slots = Vec::with_capacity(plan.products.len());
        let mut treatments = Vec::new();
        for (j, p) in plan.products.iter().enumerate() {
            let slot = match self.slot_of.get(&p.key) {
                Some(&s) => s,
                None => {
                    let s = self.buffer_slots.len();
                    self.slot_of.insert(p.key.clone(), s);
                    self.buffer_slots.push(buffer_slot(p));
                    self.announced.push(announced(&plan, j));
                    self.retired.push(false);
                    s
                }
            };
            self.buffer_slots[slot] = buffer_slot(p);
            self.announced[slot] = announced(&plan, j);
            self.retired[slot] = false;
            treatments.push((p.key.clone(), crate::govern::Treatment::of(p)));
            slots.push(slot);
        }
        for &i in &c.products_removed {
            if let Some(&s) = self.slot_of.get(&old.products[i].key) {
                self.retired[s] = true;
            }
        }
        let buffer = self.buffer.reconfigure(self.buffer_slots.clone(), treatments);
        self.buffer = buffer.clone();
        self.publish_stats.grow(self.buffer_slots.len());

        // Devices that go or restart stop first (a serial port or a single-connection PLC is
        // free again before the new task opens it).
        let mut old_tasks: Vec<Option<DeviceTask>> = std::mem::take(&mut self.devices).into_iter().map(Some).collect();
        let stopping: Vec<usize> = c
            .devices_removed
            .iter()
            .copied()
            .chain(c.devices_changed.iter().map(|&(i, _)| i))
            .collect();
        for &i in &stopping {
            if let Some(t) = &old_tasks[i] {
                let _ = t.stop.send(true);
            }
        }
        let mut stats_of: HashMap<usize, Arc<DeviceStats>> = HashMap::new();
        for &i in &stopping {
            if let Some(t) = old_tasks[i].take() {
                if tokio::time::timeout(Duration::from_secs(5), t.join).await.is_err() {
                    warn!(device = %old.devices[i].id, "device task did not stop within 5 s; starting its successor anyway");
                }
                if self.remap.len() <= t.task {
                    self.remap.resize(t.task + 1, None);
                }
                self.remap[t.task] = Some(Arc::new(Remap::none()));
                stats_of.insert(i, t.stats);
            }
        }
        let mut kept: HashMap<usize, DeviceTask> = HashMap::new();
        for &(i, j) in &c.devices_kept {
            if let Some(t) = old_tasks[i].take() {
                if self.remap.len() <= t.task {
                    self.remap.resize(t.task + 1, None);
                }
                self.remap[t.task] = (t.spawn_tags != plan.devices[j].tags)
                    .then(|| Arc::new(Remap::new(&t.spawn_tags, &plan.devices[j].tags)));
                kept.insert(j, t);
            }
        }
        let changed_from: HashMap<usize, usize> = c.devices_changed.iter().map(|&(i, j)| (j, i)).collect();
        let device_stats: Vec<Arc<DeviceStats>> = (0..plan.devices.len())
            .map(|j| match kept.get(&j) {
                Some(t) => t.stats.clone(),
                None => changed_from
                    .get(&j)
                    .and_then(|i| stats_of.get(i).cloned())
                    .unwrap_or_default(),
            })
            .collect();

        // The produce stage switches between two batches.
        let now = Arc::new(Now {
            plan: plan.clone(),
            devices: device_stats.clone(),
            produced: Arc::new(plan.products.iter().map(|_| Default::default()).collect()),
            slots: slots.clone(),
            refused: refused.clone(),
        });
        let same_key: Vec<(usize, usize)> = c.products_kept.iter().map(|&(i, j)| (j, i)).collect();
        let (done, switched) = oneshot::channel();
        let _ = self.produce.send(Reconfigure {
            now,
            governor,
            buffer,
            same_key,
            same_state: c.same_state.clone(),
            remap: self.remap.clone(),
            current: self.current.clone(),
            done,
        });
        let _ = switched.await;

        // New device tasks, now that their indexes are the plan's.
        for (j, stats) in device_stats.into_iter().enumerate() {
            let task = match kept.remove(&j) {
                Some(t) => t,
                None => self.spawn(&plan, j, stats),
            };
            self.devices.push(task);
        }

        let announce: Vec<usize> = c
            .products_added
            .iter()
            .chain(&c.products_changed)
            .map(|&j| slots[j])
            .collect();
        // Announced products are on the ledger (cleared from the broker once they leave).
        let ledger = crate::catalog::ledger::path(&plan.agent.data_dir);
        if let Err(e) = crate::catalog::ledger::update(&ledger, |entries| {
            let (added, changed) = (&c.products_added, &c.products_changed);
            entries.extend(
                added
                    .iter()
                    .chain(changed)
                    .map(|&j| crate::catalog::ledger::entry_of(&plan, &plan.products[j])),
            );
        }) {
            tracing::warn!(file = %ledger.display(), error = %e, "cannot record the announced products; if they are removed while the agent is stopped, their retained documents stay at the broker");
        }
        let retired_keys = self
            .slot_of
            .iter()
            .filter(|(_, &s)| self.retired[s])
            .map(|(k, _)| k.clone());
        let upstream = plan.upstream.clone().filter(|_| c.upstream);
        let options = upstream.and_then(|u| {
            crate::publish::link::LinkOptions::resolve(
                &u,
                envelope::status_topic(&plan),
                envelope::status(&plan, "offline", self.epoch),
            )
            .map(|mut o| {
                o.burst = 4 * plan.products.len();
                o
            })
            .map_err(|e| {
                report
                    .errors
                    .push(format!("upstream: {e} (the connection stays as it was)"))
            })
            .ok()
        });
        let _ = self.publisher.send(Change {
            products: self.announced.clone(),
            retired: self.retired.clone(),
            announce,
            egress: egress(&plan, retired_keys),
            online: envelope::status_refusing(&plan, "online", self.epoch, &refused),
            offline: envelope::status_refusing(&plan, "offline", self.epoch, &refused),
            asyncapi: Some({
                let plan = plan.clone();
                Arc::new(move || {
                    let most = plan.upstream.as_ref().map_or(256 * 1024, |u| u.max_message_bytes);
                    crate::catalog::asyncapi::document_within(&plan, most)
                })
            }),
            options,
        });

        let device = |p: &Plan, i: usize| p.devices[i].id.clone();
        let product = |p: &Plan, i: usize| format!("{} v{}", p.products[i].id, p.products[i].version);
        for &j in &c.devices_added {
            report.applied.push(format!("device {}: added", device(&plan, j)));
        }
        for &(_, j) in &c.devices_changed {
            report
                .applied
                .push(format!("device {}: changed, restarted", device(&plan, j)));
        }
        for &i in &c.devices_removed {
            report.applied.push(format!("device {}: removed", device(&old, i)));
        }
        for &j in &c.products_added {
            report.applied.push(format!("product {}: added", product(&plan, j)));
        }
        for &j in &c.products_changed {
            report
                .applied
                .push(format!("product {}: changed, descriptor published", product(&plan, j)));
        }
        for &i in &c.products_removed {
            report.applied.push(format!(
                "product {}: removed (its backlog drains, then its retained descriptor and SLI are cleared)",
                product(&old, i)
            ));
        }
        if c.upstream {
            report.applied.push("upstream: changed, reconnecting".into());
        }
        if old.governance.allow_topic_prefixes != plan.governance.allow_topic_prefixes {
            report.applied.push("governance: egress topics changed".into());
        }
        self.refused = refused;
        self.plan = plan;
    }
}
