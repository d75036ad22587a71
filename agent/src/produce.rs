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

use crate::buffer::BufferHandle;
use crate::catalog::Slis;
use crate::config::Plan;
use crate::govern::{Counts, Decision, Governor};
use crate::map::Mapper;
use crate::model::{now_millis, ReadingBatch, Record};
use crate::publish::envelope::RecordEncoder;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::info;

/// The latest record per product, rendered, for the status view.
pub type LastRecords = Arc<Mutex<Vec<Option<String>>>>;

/// What the produce stage writes to beside the buffer.
pub struct Outputs {
    pub buffer: BufferHandle,
    pub slis: Arc<Mutex<Slis>>,
    /// Records produced per product.
    pub produced: Arc<Vec<AtomicU64>>,
    /// `Some`: keep the latest record per product (a copy per record).
    pub last: Option<LastRecords>,
}

pub struct Produce {
    plan: Arc<Plan>,
    mapper: Mapper,
    governor: Governor,
    encoders: Vec<RecordEncoder>,
    counts: Counts,
    out: Outputs,
}

impl Produce {
    pub fn new(plan: Arc<Plan>, governor: Governor, out: Outputs) -> Produce {
        Produce {
            mapper: Mapper::new(&plan),
            encoders: plan.products.iter().map(RecordEncoder::new).collect(),
            governor,
            counts: Counts::default(),
            out,
            plan,
        }
    }

    /// Runs until every source has stopped (`batches` closed).
    pub async fn run(mut self, mut batches: mpsc::Receiver<ReadingBatch>) {
        let mut records = Vec::new();
        let tick = self.mapper.next_tick().unwrap_or(Duration::from_secs(3600));
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                b = batches.recv() => match b {
                    Some(b) => self.mapper.on_batch(&b, &mut records),
                    None => break,
                },
                _ = ticker.tick() => self.mapper.on_tick(now_millis(), &mut records),
            }
            for (product, record) in records.drain(..) {
                self.govern_and_offer(product, record);
            }
        }
        self.audit();
    }

    fn govern_and_offer(&mut self, product: usize, record: Record) {
        let governed = match self.governor.apply(product, record, &mut self.counts) {
            Decision::Publish(g) => g,
            Decision::Drop { .. } => {
                self.out.buffer.refuse_contract(product);
                return;
            }
        };
        if let Ok(mut s) = self.out.slis.lock() {
            s.record(product, &governed);
        }
        let json = self.encoders[product].encode(&governed);
        if let Some(last) = &self.out.last {
            if let Ok(mut l) = last.lock() {
                l[product] = Some(String::from_utf8_lossy(&json).into_owned());
            }
        }
        self.out.produced[product].fetch_add(1, Ordering::Relaxed);
        self.out.buffer.offer(product, governed.ts, json);
    }

    /// The run's governance decisions, per product and rule, in the log and the audit trail.
    fn audit(&self) {
        let mut summary = serde_json::Map::new();
        for ((product, rule), n) in &self.counts.0 {
            let p = &self.plan.products[*product];
            info!(product = %p.id, rule = rule.as_str(), count = n, "governance decisions this run");
            summary.insert(format!("{}:{}", p.key, rule.as_str()), (*n).into());
        }
        let entry = serde_json::json!({"config_hash": self.plan.config_hash, "governance": summary});
        if let Err(e) = crate::audit::append(&self.plan.agent.data_dir, "run_end", entry) {
            tracing::warn!(error = %e, "cannot write the audit trail");
        }
    }
}
