//! The fleet's catalog, as a platform sees it from the broker, with no I/O: fed every message of
//! the topics it asks for, it keeps one row per product of every agent. It starts from the catalog
//! index (`_plantmesh/catalog/#`, docs/wire-format.md) and, from each entry, asks for that
//! product's SLI, contract and gap topics and its agent's status topic; nothing else is assumed
//! about the topic template an agent's products follow. Only standard MQTT is needed to feed it.

use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};

/// The subscription that finds every product on a broker.
pub const INDEX: &str = "_plantmesh/catalog/#";

/// What a topic carries, for the product it was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// A catalog entry (its product's row changed), or a document of a product's row.
    Catalog,
    /// A product message of this URN.
    Data(String),
    /// A gap event of this URN.
    Gap(String),
    /// Nothing known (a topic not asked for, or of a product no longer in the index).
    Other,
}

#[derive(Debug, Clone)]
enum Route {
    Sli(String),
    Contract(String),
    Gaps(String),
    Data(String),
    Status,
}

#[derive(Debug, Clone)]
struct Product {
    entry: Value,
    status_topic: String,
    sli: Option<Value>,
    /// Whether the retained contract's SHA-256 is the entry's `contract_sha256`.
    contract_ok: Option<bool>,
    gap_events: u64,
}

/// Which products to follow, and whether their data too (for `verify`).
#[derive(Debug, Clone, Default)]
pub struct Interest {
    /// Only products whose URN or product id matches (`*` matches any run of characters).
    pub filter: Option<String>,
    /// Also the data topics (the product messages).
    pub data: bool,
}

/// `*`-glob match of a whole string.
pub fn glob(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == s;
    }
    let mut rest = s;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(part) else { return false };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
    }
    true
}

/// The fleet: products by URN, agents' status by topic.
#[derive(Debug, Default)]
pub struct Fleet {
    interest: Interest,
    products: BTreeMap<String, Product>,
    /// Entry topic -> URN.
    entries: HashMap<String, String>,
    routes: HashMap<String, Vec<Route>>,
    /// Status topic -> its `state` as last retained (`online`, `offline`).
    agents: HashMap<String, String>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

impl Fleet {
    pub fn new(interest: Interest) -> Fleet {
        Fleet {
            interest,
            ..Fleet::default()
        }
    }

    fn wants(&self, entry: &Value) -> bool {
        match &self.interest.filter {
            None => true,
            Some(f) => [&entry["urn"], &entry["product"]]
                .iter()
                .any(|v| v.as_str().is_some_and(|s| glob(f, s))),
        }
    }

    fn route(&mut self, topic: &str, r: Route, subscribe: &mut Vec<String>) {
        let routes = self.routes.entry(topic.to_string()).or_default();
        if routes.is_empty() {
            subscribe.push(topic.to_string());
        }
        routes.push(r);
    }

    /// Takes one message; returns what it was and the topics to subscribe to now.
    pub fn message(&mut self, topic: &str, payload: &[u8]) -> (Seen, Vec<String>) {
        let mut subscribe = Vec::new();
        if topic.starts_with(crate::catalog::entry::ROOT) {
            self.entry(topic, payload, &mut subscribe);
            return (Seen::Catalog, subscribe);
        }
        let Some(routes) = self.routes.get(topic) else {
            return (Seen::Other, subscribe);
        };
        let mut seen = Seen::Other;
        for r in routes.clone() {
            match r {
                Route::Status => {
                    // `{"state":"online"|"offline",...}` (docs/wire-format.md, "Agent status").
                    let state = serde_json::from_slice::<Value>(payload)
                        .ok()
                        .and_then(|v| v["state"].as_str().map(str::to_string))
                        .unwrap_or_else(|| String::from_utf8_lossy(payload).into_owned());
                    self.agents.insert(topic.to_string(), state);
                    seen = Seen::Catalog;
                }
                Route::Sli(urn) => {
                    if let Some(p) = self.products.get_mut(&urn) {
                        p.sli = serde_json::from_slice(payload).ok();
                        seen = Seen::Catalog;
                    }
                }
                Route::Contract(urn) => {
                    if let Some(p) = self.products.get_mut(&urn) {
                        p.contract_ok = (!payload.is_empty())
                            .then(|| p.entry["contract_sha256"].as_str() == Some(sha256_hex(payload).as_str()));
                        seen = Seen::Catalog;
                    }
                }
                Route::Gaps(urn) => {
                    if let Some(p) = self.products.get_mut(&urn) {
                        p.gap_events += 1;
                        seen = Seen::Gap(urn);
                    }
                }
                Route::Data(urn) => {
                    if self.products.contains_key(&urn) {
                        seen = Seen::Data(urn);
                    }
                }
            }
        }
        (seen, subscribe)
    }

    fn entry(&mut self, topic: &str, payload: &[u8], subscribe: &mut Vec<String>) {
        if payload.is_empty() {
            // Cleared: the product was removed or retired and has drained.
            if let Some(urn) = self.entries.remove(topic) {
                self.products.remove(&urn);
            }
            return;
        }
        let Ok(entry) = serde_json::from_slice::<Value>(payload) else {
            return;
        };
        let (Some(urn), Some(site), Some(agent)) = (
            entry["urn"].as_str().map(str::to_string),
            entry["site"].as_str(),
            entry["agent"].as_str(),
        ) else {
            return;
        };
        if !self.wants(&entry) {
            return;
        }
        let status_topic = format!("{site}/_agents/{agent}/status");
        let known = self.products.contains_key(&urn);
        let t = |k: &str| entry["topics"][k].as_str().map(str::to_string);
        if !known {
            if let Some(x) = t("sli") {
                self.route(&x, Route::Sli(urn.clone()), subscribe);
            }
            if let Some(x) = t("contract") {
                self.route(&x, Route::Contract(urn.clone()), subscribe);
            }
            if let Some(x) = t("gaps") {
                self.route(&x, Route::Gaps(urn.clone()), subscribe);
            }
            if self.interest.data {
                if let Some(x) = t("data") {
                    self.route(&x, Route::Data(urn.clone()), subscribe);
                }
            }
            if !self.routes.contains_key(&status_topic) {
                self.route(&status_topic, Route::Status, subscribe);
            }
        }
        self.entries.insert(topic.to_string(), urn.clone());
        let old = self.products.remove(&urn);
        self.products.insert(
            urn,
            Product {
                status_topic,
                sli: old.as_ref().and_then(|o| o.sli.clone()),
                // A new entry may carry a new contract hash: the contract is checked again when
                // it arrives (a reload republishes both).
                contract_ok: old
                    .as_ref()
                    .filter(|o| o.entry["contract_sha256"] == entry["contract_sha256"])
                    .and_then(|o| o.contract_ok),
                gap_events: old.map_or(0, |o| o.gap_events),
                entry,
            },
        );
    }

    /// Products known.
    pub fn len(&self) -> usize {
        self.products.len()
    }

    pub fn is_empty(&self) -> bool {
        self.products.is_empty()
    }

    /// Every product as a JSON row (docs/catalog.md, "plantmesh catalog").
    pub fn rows(&self) -> Vec<Value> {
        // Products of different agents on one data topic (templates that leave out what tells
        // the agents apart): their consumers cannot tell the streams apart either.
        let mut on_topic: HashMap<&str, Vec<&str>> = HashMap::new();
        for (urn, p) in &self.products {
            if let Some(t) = p.entry["topics"]["data"].as_str() {
                on_topic.entry(t).or_default().push(urn);
            }
        }
        self.products
            .iter()
            .map(|(urn, p)| {
                let shared: Vec<&str> = p.entry["topics"]["data"]
                    .as_str()
                    .and_then(|t| on_topic.get(t))
                    .map(|u| u.iter().copied().filter(|u| *u != urn).collect())
                    .unwrap_or_default();
                let e = &p.entry;
                let online = self.agents.get(&p.status_topic).map(|s| s == "online");
                let sli = p.sli.as_ref().map(|s| {
                    let met = &s["met"];
                    let verdicts: Vec<bool> = ["freshness", "completeness", "latency"]
                        .iter()
                        .filter_map(|k| met[k].as_bool())
                        .collect();
                    json!({
                        "ts": s["ts"],
                        "freshness_ms": s["freshness_ms"],
                        "completeness": s["completeness"],
                        "latency_p99_ms": s["latency_ms"]["p99"],
                        "records_total": s["records_total"],
                        "targets": s["targets"],
                        "met": met,
                        "all_met": if verdicts.is_empty() { Value::Null } else { verdicts.iter().all(|&m| m).into() },
                    })
                });
                json!({
                    "urn": urn,
                    "product": e["product"],
                    "major": e["major"],
                    "version": e["version"],
                    "status": e["status"],
                    "domain": e["domain"],
                    "owner": e["owner"],
                    "enterprise": e["enterprise"],
                    "site": e["site"],
                    "agent": e["agent"],
                    "online": online,
                    "contract": {"topic": e["topics"]["contract"], "sha256": e["contract_sha256"], "verified": p.contract_ok},
                    "topics": e["topics"],
                    "sli": sli,
                    "drops": p.sli.as_ref().map_or(json!({}), |s| s["drops"].clone()),
                    "gap_events": p.gap_events,
                    "topic_shared_with": shared,
                })
            })
            .collect()
    }

    /// The rows as a table for a terminal.
    pub fn table(&self) -> String {
        let rows = self.rows();
        let s = |v: &Value| match v {
            Value::Null => "-".to_string(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let mut lines = vec![[
            "URN", "OWNER", "DOMAIN", "VERSION", "STATUS", "AGENT", "ONLINE", "FRESH_MS", "COMPLETE", "P99_MS", "SLO",
            "DROPS", "GAPS",
        ]
        .map(String::from)
        .to_vec()];
        for r in &rows {
            let drops: u64 = r["drops"]
                .as_object()
                .map_or(0, |d| d.values().filter_map(Value::as_u64).sum());
            lines.push(vec![
                s(&r["urn"]),
                s(&r["owner"]),
                s(&r["domain"]),
                s(&r["version"]),
                s(&r["status"]),
                s(&r["agent"]),
                match r["online"].as_bool() {
                    Some(true) => "online".into(),
                    Some(false) => "OFFLINE".into(),
                    None => "?".into(),
                },
                s(&r["sli"]["freshness_ms"]),
                r["sli"]["completeness"]
                    .as_f64()
                    .map_or("-".into(), |c| format!("{c:.3}")),
                s(&r["sli"]["latency_p99_ms"]),
                match r["sli"]["all_met"].as_bool() {
                    Some(true) => "met".into(),
                    Some(false) => "MISSED".into(),
                    None => "-".into(),
                },
                drops.to_string(),
                s(&r["gap_events"]),
            ]);
        }
        let widths: Vec<usize> = (0..lines[0].len())
            .map(|c| lines.iter().map(|l| l[c].chars().count()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for l in &lines {
            let cells: Vec<String> = l.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
        let online = rows.iter().filter(|r| r["online"] == true).count();
        out.push_str(&format!(
            "{} product(s), {} of them on an online agent\n",
            rows.len(),
            online
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(agent: &str, product: &str, sha: &str) -> (String, Vec<u8>) {
        let base = format!("s1/a/l/d/{product}/v1");
        (
            format!("_plantmesh/catalog/_/s1/{agent}/{product}.v1"),
            serde_json::to_vec(&json!({
                "urn": format!("urn:plantmesh:_:s1:{agent}:{product}:v1"), "product": product, "major": 1,
                "version": "1.0.0", "status": "active", "domain": "production", "owner": "team", "enterprise": null,
                "site": "s1", "agent": agent, "contract_sha256": sha,
                "topics": {"data": base, "descriptor": format!("{base}/_descriptor"), "contract": format!("{base}/_contract"),
                           "sli": format!("{base}/_sli"), "gaps": format!("{base}/_gaps")}
            }))
            .unwrap(),
        )
    }

    #[test]
    fn an_entry_asks_for_its_documents_and_they_fill_the_row() {
        let mut f = Fleet::new(Interest::default());
        let (t, e) = entry("gw1", "press", &sha256_hex(b"contract"));
        let (seen, subs) = f.message(&t, &e);
        assert_eq!(seen, Seen::Catalog);
        assert_eq!(
            subs,
            [
                "s1/a/l/d/press/v1/_sli",
                "s1/a/l/d/press/v1/_contract",
                "s1/a/l/d/press/v1/_gaps",
                "s1/_agents/gw1/status"
            ]
        );
        // The same entry again (a reconnect) asks for nothing new.
        assert!(f.message(&t, &e).1.is_empty());
        f.message("s1/_agents/gw1/status", br#"{"state":"online","agent":"gw1"}"#);
        f.message("s1/a/l/d/press/v1/_contract", b"contract");
        f.message(
            "s1/a/l/d/press/v1/_sli",
            br#"{"ts":"x","freshness_ms":12,"completeness":1.0,"latency_ms":{"p99":40},"drops":{"crash":2},"met":{"freshness":true,"completeness":true,"latency":null}}"#,
        );
        assert_eq!(
            f.message("s1/a/l/d/press/v1/_gaps", b"{}").0,
            Seen::Gap("urn:plantmesh:_:s1:gw1:press:v1".into())
        );
        let r = &f.rows()[0];
        assert_eq!(r["online"], true);
        assert_eq!(r["contract"]["verified"], true);
        assert_eq!(r["sli"]["all_met"], true);
        assert_eq!(r["sli"]["latency_p99_ms"], 40);
        assert_eq!(r["drops"]["crash"], 2);
        assert_eq!(r["gap_events"], 1);
        f.message("s1/_agents/gw1/status", br#"{"state":"offline","agent":"gw1"}"#);
        assert_eq!(f.rows()[0]["online"], false);
        assert!(f.table().contains("OFFLINE"), "{}", f.table());
    }

    #[test]
    fn a_contract_that_is_not_the_one_the_entry_names_is_flagged() {
        let mut f = Fleet::new(Interest::default());
        let (t, e) = entry("gw1", "press", &sha256_hex(b"contract"));
        f.message(&t, &e);
        f.message("s1/a/l/d/press/v1/_contract", b"another contract");
        assert_eq!(f.rows()[0]["contract"]["verified"], false);
    }

    #[test]
    fn a_cleared_entry_removes_the_product_and_filters_apply() {
        let mut f = Fleet::new(Interest {
            filter: Some("urn:plantmesh:_:s1:gw*:press:v1".into()),
            data: true,
        });
        let (t1, e1) = entry("gw1", "press", "x");
        let (t2, e2) = entry("gw2", "oven", "x");
        let subs = f.message(&t1, &e1).1;
        assert!(
            subs.contains(&"s1/a/l/d/press/v1".to_string()),
            "data asked for: {subs:?}"
        );
        f.message(&t2, &e2);
        assert_eq!(f.len(), 1, "the filter keeps only press");
        assert_eq!(
            f.message("s1/a/l/d/press/v1", b"{}").0,
            Seen::Data("urn:plantmesh:_:s1:gw1:press:v1".into())
        );
        f.message(&t1, b"");
        assert!(f.is_empty());
        assert_eq!(f.message("s1/a/l/d/press/v1", b"{}").0, Seen::Other);
    }

    #[test]
    fn products_of_two_agents_on_one_topic_are_flagged() {
        let mut f = Fleet::new(Interest::default());
        let (t1, e1) = entry("gw1", "press", "x");
        let (t2, e2) = entry("gw2", "press", "x");
        f.message(&t1, &e1);
        f.message(&t2, &e2);
        let rows = f.rows();
        assert_eq!(rows[0]["topic_shared_with"], json!(["urn:plantmesh:_:s1:gw2:press:v1"]));
        assert_eq!(rows[1]["topic_shared_with"], json!(["urn:plantmesh:_:s1:gw1:press:v1"]));
    }

    #[test]
    fn globs() {
        assert!(glob("press", "press"));
        assert!(!glob("press", "press2"));
        assert!(glob("urn:*:press:v1", "urn:plantmesh:_:s1:gw:press:v1"));
        assert!(glob("*", ""));
        assert!(glob("a*b*c", "aXbYc"));
        assert!(!glob("a*b*c", "aXbY"));
    }
}
