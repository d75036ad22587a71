//! The read-only status page: one static HTML file (CSS and a little JavaScript inside, no build
//! step, no CDN) embedded in the binary, that polls `api/state` every two seconds. The agent serves
//! it on its HTTP port ([`crate::telemetry`]) with [`agent_state`] behind it; `plantmesh catalog
//! --serve` serves the same page with the fleet's document. Nothing on it can change anything: the
//! server answers GET only.
//!
//! Live values cost nothing while nobody looks: the produce stage keeps each product's latest record
//! (and the SLI task its latest document) only for a minute after the page last asked
//! ([`Shown`]).

use crate::http::Response;
use crate::model::Millis;
use crate::telemetry::Running;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

const INDEX: &str = include_str!("index.html");

/// The page, or 404.
pub fn respond(path: &str) -> Response {
    match path {
        "/" | "/index.html" => Response {
            status: "200 OK",
            content_type: "text/html; charset=utf-8",
            body: INDEX.as_bytes().to_vec(),
        },
        _ => Response::text(
            "404 Not Found",
            "not here: / (the status page), /api/state, /metrics, /health\n".into(),
        ),
    }
}

/// How long live values are kept after the page last asked.
const KEEP_MS: u64 = 60_000;

/// Whether someone is looking, and what the SLI task last measured while they were.
#[derive(Clone, Default)]
pub struct Shown {
    /// Keep live values for records read before this (ms since the Unix epoch; `u64::MAX`: always,
    /// for the terminal view).
    until: Arc<AtomicU64>,
    /// Product key -> its latest SLI document.
    slis: Arc<Mutex<HashMap<String, Value>>>,
}

impl Shown {
    /// Always kept (the terminal view shows them every second).
    pub fn always() -> Shown {
        let s = Shown::default();
        s.until.store(u64::MAX, Relaxed);
        s
    }

    /// The page asked now.
    pub fn look(&self, now: Millis) {
        self.until.fetch_max(now.saturating_add(KEEP_MS), Relaxed);
    }

    /// Whether to keep what happened at `at`.
    pub fn wanted(&self, at: Millis) -> bool {
        at < self.until.load(Relaxed)
    }

    /// The SLI task's document for `key`, kept while someone looks.
    pub fn sli(&self, key: &str, doc: &[u8], now: Millis) {
        if !self.wanted(now) {
            return;
        }
        if let (Ok(mut m), Ok(v)) = (self.slis.lock(), serde_json::from_slice::<Value>(doc)) {
            m.insert(key.to_string(), v);
        }
    }
}

/// The agent's document for its page: identity, upstream, buffer, devices and every product with
/// its fields (unit, class, edge action, latest value and quality) and SLIs beside their targets.
pub fn agent_state(r: &Running) -> Value {
    let now = crate::model::now_millis();
    r.shown.look(now);
    let running = r.now();
    let plan = &running.plan;
    let last: Vec<Option<String>> = r.last.lock().map(|l| l.clone()).unwrap_or_default();
    let slis = r.shown.slis.lock().map(|m| m.clone()).unwrap_or_default();
    let b = &r.buffer;
    let devices: Vec<Value> = plan
        .devices
        .iter()
        .zip(&running.devices)
        .map(|(d, st)| {
            json!({
                "id": d.id,
                "address": d.kind.address(),
                "connected": st.connected.load(Relaxed) == 1,
                "polls": st.polls.load(Relaxed),
                "errors": st.errors.load(Relaxed),
            })
        })
        .collect();
    let products: Vec<Value> = plan
        .products
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let record: Option<Value> = last
                .get(i)
                .cloned()
                .flatten()
                .and_then(|s| serde_json::from_str(&s).ok());
            let fields: Vec<Value> = p
                .fields
                .iter()
                .map(|f| {
                    let (value, quality) = match &record {
                        Some(rec) => (
                            rec["fields"][f.name.as_str()].clone(),
                            rec["quality"][f.name.as_str()].clone(),
                        ),
                        None => (Value::Null, Value::Null),
                    };
                    json!({
                        "name": f.name.as_str(),
                        "unit": &*f.unit,
                        "classification": &*f.classification,
                        "action": f.action.name(),
                        "value": value,
                        "quality": quality,
                    })
                })
                .collect();
            json!({
                "id": p.id,
                "name": p.name,
                "urn": crate::config::urn(&plan.agent, &p.id, p.major),
                "version": p.version,
                "status": p.status,
                "domain": p.domain,
                "owner": p.owner,
                "topic": p.topic,
                "contract_topic": crate::catalog::odcs::contract_topic(p),
                "ts": record.as_ref().map(|r| r["ts"].clone()),
                "fields": fields,
                "sli": slis.get(&p.key),
            })
        })
        .collect();
    json!({
        "kind": "agent",
        "ts": crate::model::format_rfc3339_millis(now),
        "agent": {
            "id": plan.agent.id,
            "site": plan.agent.site,
            "enterprise": plan.agent.enterprise,
            "version": env!("CARGO_PKG_VERSION"),
            "epoch": r.epoch,
        },
        "upstream": {"broker": r.broker, "connected": r.publish.connected.load(Relaxed) == 1},
        "buffer": {
            "pending_messages": b.pending_messages.load(Relaxed),
            "pending_bytes": b.pending_bytes.load(Relaxed),
            "dropped_records": b.dropped_records.load(Relaxed),
        },
        "devices": devices,
        "products": products,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_self_contained_and_reads_only_its_own_endpoint() {
        // No CDN, no external fonts or scripts: a gateway's browser may have no internet.
        for bad in ["http://", "https://", "//cdn", "@import"] {
            assert!(!INDEX.contains(bad), "the page refers outside itself: {bad}");
        }
        assert!(INDEX.contains("api/state"));
        // The page never writes: no form, no method other than GET.
        for bad in ["<form", "method:", "POST", "PUT", "DELETE"] {
            assert!(!INDEX.contains(bad), "{bad}");
        }
    }

    #[test]
    fn live_values_are_kept_only_while_someone_looks() {
        let s = Shown::default();
        assert!(!s.wanted(1_000));
        s.look(1_000);
        assert!(s.wanted(1_000 + KEEP_MS - 1));
        assert!(!s.wanted(1_000 + KEEP_MS));
        s.sli("k", br#"{"a":1}"#, 1_000 + KEEP_MS);
        assert!(s.slis.lock().unwrap().is_empty());
        assert!(Shown::always().wanted(u64::MAX - 1));
    }
}
