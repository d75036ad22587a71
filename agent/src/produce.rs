//! Produce: the map and govern stages run together on one task, between the sources and the buffer.
//!
//! In: [`ReadingBatch`]es from every source, and a tick for products that publish on a period or
//! window. Out: per product, governed records encoded as they will be sent (JSON, one per record),
//! offered to the buffer; beside that, every governed record is counted in the product's SLIs, and
//! the latest one is kept for the status view when asked.
//!
//! Each record goes through [`Mapper`] (tags -> product records, pure) and then [`Governor`] (what may
//! leave, pure): a record governance drops for breaking its contract is counted by the buffer as a
//! gap (`contract_violation`), never silently lost. Both stages are synchronous and free of I/O; the
//! task only moves data between channels. When the sources are gone it ends, after writing the run's
//! governance counts to the audit trail.

use crate::buffer::{BufferHandle, Offered};
use crate::catalog::Slis;
use crate::config::Plan;
use crate::govern::{Counts, Decision, Governor};
use crate::map::Mapper;
use crate::model::{now_millis, ReadingBatch, Record};
use crate::publish::envelope::RecordEncoder;
use crate::telemetry::{Current, Now};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::info;

fn swap(current: &Current, now: Arc<Now>) {
    match current.write() {
        Ok(mut c) => *c = now,
        Err(poisoned) => *poisoned.into_inner() = now,
    }
}

/// The latest record per product, rendered, for the status view.
pub type LastRecords = Arc<Mutex<Vec<Option<String>>>>;

/// What the produce stage writes to beside the buffer.
pub struct Outputs {
    pub buffer: BufferHandle,
    pub slis: Arc<Mutex<Slis>>,
    /// Records produced per product.
    pub produced: Arc<Vec<AtomicU64>>,
    /// The latest record per product (a copy per record), kept while [`Outputs::shown`] wants it.
    pub last: LastRecords,
    /// Whether the status view or page is looking.
    pub shown: crate::page::Shown,
    /// The UNS view (`None` with Sparkplug, where every field already is a metric).
    pub uns: Option<Arc<crate::publish::uns::Board>>,
}

/// A reload, as the produce stage takes it: between two batches, so every record is mapped and
/// governed wholly under one configuration.
pub struct Reconfigure {
    pub now: Arc<Now>,
    pub governor: Governor,
    /// The buffer handle with the new slot table ([`BufferHandle::reconfigure`]).
    pub buffer: BufferHandle,
    /// Pairs `(new, old)` of product indexes with the same key: their counts carry over.
    pub same_key: Vec<(usize, usize)>,
    /// Pairs `(new, old)` whose fields and publish mode are unchanged: their state (last values,
    /// the open window) carries over, so a reload neither repeats nor loses a record of theirs.
    pub same_state: Vec<(usize, usize)>,
    /// Per source task: how its readings' tag indexes translate into the new plan's.
    pub remap: Vec<Option<Arc<Remap>>>,
    /// Swapped for `now` under the SLI lock.
    pub current: Current,
    pub done: tokio::sync::oneshot::Sender<()>,
}

/// Tag indexes of a source task started under an earlier plan -> the current plan's (an unchanged
/// device keeps running across reloads; its tags may have moved in the table).
#[derive(Debug, Clone, PartialEq)]
pub struct Remap {
    base: usize,
    to: Vec<u32>,
}

impl Remap {
    /// `from[k]` becomes `to[k]`; any other index maps to none (the task's device is gone).
    pub fn new(from: &[usize], to: &[usize]) -> Remap {
        let base = from.iter().copied().min().unwrap_or(0);
        let top = from.iter().copied().max().map_or(0, |m| m + 1 - base);
        let mut table = vec![u32::MAX; top];
        for (&f, &t) in from.iter().zip(to) {
            table[f - base] = t as u32;
        }
        Remap { base, to: table }
    }

    /// Drops every reading (a removed or restarted device's last batches).
    pub fn none() -> Remap {
        Remap {
            base: 0,
            to: Vec::new(),
        }
    }

    fn apply(&self, b: &mut ReadingBatch) {
        for r in &mut b.readings {
            r.tag = r
                .tag
                .checked_sub(self.base)
                .and_then(|i| self.to.get(i))
                .map_or(usize::MAX, |&t| if t == u32::MAX { usize::MAX } else { t as usize });
        }
    }
}

pub struct Produce {
    plan: Arc<Plan>,
    mapper: Mapper,
    governor: Governor,
    encoders: Vec<RecordEncoder>,
    counts: Counts,
    out: Outputs,
    /// Per product of the plan: its buffer slot.
    slots: Vec<usize>,
    remap: Vec<Option<Arc<Remap>>>,
}

impl Produce {
    pub fn new(plan: Arc<Plan>, governor: Governor, out: Outputs) -> Produce {
        Produce {
            mapper: Mapper::new(&plan),
            encoders: plan.products.iter().map(RecordEncoder::new).collect(),
            governor,
            counts: Counts::default(),
            out,
            slots: (0..plan.products.len()).collect(),
            remap: Vec::new(),
            plan,
        }
    }

    /// Runs until every source has stopped (`batches` closed), taking reloads as they come.
    pub async fn run(
        mut self,
        mut batches: mpsc::Receiver<ReadingBatch>,
        mut reloads: mpsc::UnboundedReceiver<Reconfigure>,
    ) {
        let mut records = Vec::new();
        let mut offers = Vec::new();
        let mut ticker = self.ticker();
        loop {
            tokio::select! {
                b = batches.recv() => match b {
                    Some(mut b) => {
                        if let Some(Some(r)) = self.remap.get(b.device) {
                            r.apply(&mut b);
                        }
                        self.mapper.on_batch(&b, &mut records)
                    }
                    None => break,
                },
                _ = ticker.tick() => self.mapper.on_tick(now_millis(), &mut records),
                Some(r) = reloads.recv() => {
                    self.reconfigure(r);
                    ticker = self.ticker();
                }
            }
            for (product, record) in records.drain(..) {
                self.govern(product, record, &mut offers);
            }
            // One hand-off to the writer per batch of readings, not per record.
            self.out.buffer.offer_all(&mut offers);
        }
        self.audit("run_end");
    }

    fn ticker(&self) -> tokio::time::Interval {
        let tick = self.mapper.next_tick().unwrap_or(Duration::from_secs(3600));
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker
    }

    fn reconfigure(&mut self, r: Reconfigure) {
        // The decisions so far belong to the configuration they were made under.
        self.audit("config_replaced");
        self.counts = Counts::default();
        let plan = r.now.plan.clone();
        let mut mapper = Mapper::new(&plan);
        mapper.carry_over(&mut self.mapper, &r.same_state);
        self.mapper = mapper;
        self.encoders = plan.products.iter().map(RecordEncoder::new).collect();
        self.governor = r.governor;
        self.out.buffer = r.buffer;
        for &(new, old) in &r.same_key {
            if let (Some(n), Some(o)) = (r.now.produced.get(new), self.out.produced.get(old)) {
                n.store(o.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
        self.out.produced = r.now.produced.clone();
        {
            if let Ok(mut l) = self.out.last.lock() {
                let mut next = vec![None; plan.products.len()];
                for &(new, old) in &r.same_key {
                    next[new] = l.get(old).cloned().flatten();
                }
                *l = next;
            }
        }
        if let Some(b) = &self.out.uns {
            b.reload(&plan);
        }
        self.slots = r.now.slots.clone();
        self.remap = r.remap;
        match self.out.slis.lock() {
            Ok(mut slis) => {
                slis.remap(plan.products.len(), &r.same_key);
                swap(&r.current, r.now);
            }
            Err(_) => swap(&r.current, r.now),
        }
        self.plan = plan;
        let _ = r.done.send(());
    }

    /// Governs a record; what may be published joins `offers` (the buffer's product slot).
    fn govern(&mut self, product: usize, record: Record, offers: &mut Vec<Offered>) {
        let slot = self.slots[product];
        let governed = match self.governor.apply(product, record, &mut self.counts) {
            Decision::Publish(g) => g,
            Decision::Drop { .. } => {
                self.out.buffer.refuse_contract(slot);
                return;
            }
        };
        if let Ok(mut s) = self.out.slis.lock() {
            s.record(product, &governed);
        }
        if let (Some(b), true) = (&self.out.uns, self.plan.products[product].uns) {
            b.update(product, &governed);
        }
        let json = self.encoders[product].encode(&governed);
        if self.out.shown.wanted(governed.ts) {
            if let Ok(mut l) = self.out.last.lock() {
                l[product] = Some(String::from_utf8_lossy(&json).into_owned());
            }
        }
        self.out.produced[product].fetch_add(1, Ordering::Relaxed);
        offers.push(Offered {
            product: slot,
            created: governed.ts,
            json,
        });
    }

    /// The governance decisions since the start or the last reload, per product and rule, in the
    /// log and the audit trail (`event`: `run_end` or `config_replaced`).
    fn audit(&self, event: &str) {
        let mut summary = serde_json::Map::new();
        for ((product, rule), n) in &self.counts.0 {
            let p = &self.plan.products[*product];
            info!(product = %p.id, rule = rule.as_str(), count = n, "governance decisions this run");
            summary.insert(format!("{}:{}", p.key, rule.as_str()), (*n).into());
        }
        let entry = serde_json::json!({"config_hash": self.plan.config_hash, "governance": summary});
        if let Err(e) = crate::audit::append(&self.plan.agent.data_dir, event, entry) {
            tracing::warn!(error = %e, "cannot write the audit trail");
        }
    }
}
