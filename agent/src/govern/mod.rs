//! Govern: what may leave the site, decided per record. Pure and synchronous.
//!
//! In: a product's [`Record`] (every field, in contract order). Out: a [`Decision`]: publish a
//! [`Governed`] record that holds only what may leave, altered as the governance file requires, or
//! drop it. Default deny: a field leaves only if the contract declares it and its classification
//! allows it; `never` fields are absent (not even their key), `mask` publishes the key with a null
//! value, `pseudonymise` a keyed hash (`h:` + 128 bits of HMAC-SHA-256 with the site secret, hex),
//! `coarsen` the value rounded to its step. Contract checks run first: a required field without a good
//! value, or a value outside its range, is flagged in the field's quality (`on_violation = "flag"`) or
//! drops the record (`"drop"`). Every alteration and every drop is counted per product and rule.

#[cfg(test)]
mod sentinel_tests;
pub mod treatment;
pub use treatment::Treatment;

use crate::config::{EdgeAction, FieldPlan, OnViolation, Plan};
use crate::model::{BadReason, Millis, Quality, Record, Value};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::BTreeMap;

/// A record as it may leave the site: `(field index, value, quality)` for the fields that leave.
#[derive(Debug, Clone, PartialEq)]
pub struct Governed {
    pub ts: Millis,
    pub fields: Vec<(usize, Option<Value>, Quality)>,
}

impl Governed {
    /// Every field as it is (for tests and tools that bypass governance on purpose).
    pub fn all(record: Record) -> Governed {
        Governed {
            ts: record.ts,
            fields: record
                .fields
                .into_iter()
                .enumerate()
                .map(|(i, (v, q))| (i, v, q))
                .collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Publish(Governed),
    /// The record breaks its contract and the product drops such records.
    Drop {
        rule: Rule,
    },
}

/// The rules a governance decision is counted (and audited) under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rule {
    Pseudonymise,
    Mask,
    Coarsen,
    Never,
    /// A value outside the field's range (flagged).
    ContractRange,
    /// A required field without a good value (flagged).
    ContractRequired,
    /// A record dropped for breaking its contract (`on_violation = "drop"`).
    ContractDrop,
    /// Why such a record is dropped: its gap events carry this reason.
    ContractViolation,
}

impl Rule {
    /// The rule's name in logs, metrics and the audit trail.
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Pseudonymise => "pseudonymise",
            Rule::Mask => "mask",
            Rule::Coarsen => "coarsen",
            Rule::Never => "never",
            Rule::ContractRange => "contract_range",
            Rule::ContractRequired => "contract_required",
            Rule::ContractDrop => "contract_drop",
            Rule::ContractViolation => "contract_violation",
        }
    }

    /// The rule an edge action is counted under; `None` for `pass` (not counted).
    pub fn of_action(action: EdgeAction) -> Option<Rule> {
        match action {
            EdgeAction::Pass => None,
            EdgeAction::Coarsen(_) => Some(Rule::Coarsen),
            EdgeAction::Pseudonymise => Some(Rule::Pseudonymise),
            EdgeAction::Mask => Some(Rule::Mask),
            EdgeAction::Never => Some(Rule::Never),
        }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Decisions counted per (product, rule).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts(pub BTreeMap<(usize, Rule), u64>);

impl Counts {
    fn add(&mut self, product: usize, rule: Rule, n: u64) {
        *self.0.entry((product, rule)).or_default() += n;
    }
}

pub struct Governor {
    products: Vec<(std::sync::Arc<[FieldPlan]>, OnViolation)>,
    key: Option<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum GovernError {
    #[error("product `{product}` pseudonymises field `{field}` but no site secret was loaded (pseudonymise_key_file in the governance file)")]
    NoKey { product: String, field: String },
    /// The site secret's file is missing, unreadable, too short or readable by others.
    #[error("{0}")]
    Key(String),
}

impl Governor {
    /// `key`: the site secret, when the governance file names one.
    pub fn new(plan: &Plan, key: Option<Vec<u8>>) -> Result<Governor, GovernError> {
        for p in &plan.products {
            if let Some(f) = p.fields.iter().find(|f| f.action == EdgeAction::Pseudonymise) {
                if key.is_none() {
                    return Err(GovernError::NoKey {
                        product: p.id.clone(),
                        field: f.name.to_string(),
                    });
                }
            }
        }
        Ok(Governor {
            products: plan
                .products
                .iter()
                .map(|p| (p.fields.clone(), p.on_violation))
                .collect(),
            key,
        })
    }

    pub fn apply(&self, product: usize, record: Record, counts: &mut Counts) -> Decision {
        let (fields, on_violation) = &self.products[product];
        let mut out = Vec::with_capacity(fields.len());
        let mut violated = false;
        for (i, (f, (value, mut quality))) in fields.iter().zip(record.fields).enumerate() {
            // Contract checks.
            if let (Some((lo, hi)), Some(x)) = (f.range(), value.as_ref().and_then(Value::as_f64)) {
                if quality.is_good() && !(lo..=hi).contains(&x) {
                    quality = Quality::Bad(BadReason::OutOfRange);
                    counts.add(product, Rule::ContractRange, 1);
                    violated = true;
                }
            }
            if f.required
                && (value.is_none() || !matches!(quality, Quality::Good | Quality::Bad(BadReason::OutOfRange)))
            {
                // Keep a more telling reason (timeout, exception) when there is one.
                if quality.is_good() {
                    quality = Quality::Bad(BadReason::RequiredMissing);
                }
                counts.add(product, Rule::ContractRequired, 1);
                violated = true;
            }
            // Edge action.
            let leaving = match f.action {
                EdgeAction::Pass => Some(value),
                EdgeAction::Never => None,
                EdgeAction::Mask => Some(None),
                EdgeAction::Coarsen(step) => Some(value.map(|v| match v.as_f64() {
                    Some(x) if !matches!(v, Value::Bool(_)) => Value::Float((x / step).round() * step),
                    _ => v,
                })),
                EdgeAction::Pseudonymise => Some(value.map(|v| Value::Text(self.pseudonym(&v)))),
            };
            if let Some(rule) = Rule::of_action(f.action) {
                counts.add(product, rule, 1);
            }
            if let Some(v) = leaving {
                out.push((i, v, quality));
            }
        }
        if violated && *on_violation == OnViolation::Drop {
            counts.add(product, Rule::ContractDrop, 1);
            return Decision::Drop {
                rule: Rule::ContractViolation,
            };
        }
        Decision::Publish(Governed {
            ts: record.ts,
            fields: out,
        })
    }

    /// `h:` + the first 16 bytes of HMAC-SHA-256(site secret, canonical value), hex.
    pub fn pseudonym(&self, v: &Value) -> String {
        #[allow(
            clippy::expect_used,
            reason = "Governor::new refuses a plan that pseudonymises without a key"
        )]
        let key = self.key.as_deref().expect("checked in Governor::new");
        #[allow(clippy::expect_used, reason = "HMAC takes keys of any length")]
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
        match v {
            Value::Text(s) => mac.update(s.as_bytes()),
            other => mac.update(other.to_json().to_string().as_bytes()),
        }
        let tag = mac.finalize().into_bytes();
        let mut s = String::with_capacity(34);
        s.push_str("h:");
        for b in &tag[..16] {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

/// Reads the site secret: at least 32 bytes, readable by its owner only.
pub fn read_key(path: &std::path::Path) -> Result<Vec<u8>, GovernError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path)
            .map_err(|e| GovernError::Key(format!("cannot read the pseudonymisation key {}: {e}", path.display())))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(GovernError::Key(format!(
                "the pseudonymisation key {} is readable by group or others; run: chmod 600 {}",
                path.display(),
                path.display()
            )));
        }
    }
    let key = std::fs::read(path)
        .map_err(|e| GovernError::Key(format!("cannot read the pseudonymisation key {}: {e}", path.display())))?;
    if key.len() < 32 {
        return Err(GovernError::Key(format!(
            "the pseudonymisation key {} has {} bytes; it needs at least 32 (e.g. head -c 32 /dev/urandom > key)",
            path.display(),
            key.len()
        )));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LogicalType, ProductPlan};
    use crate::publish::envelope::RecordEncoder;
    use proptest::prelude::*;

    fn field(i: usize, action: EdgeAction, logical: LogicalType) -> FieldPlan {
        FieldPlan {
            classification: crate::config::SharedStr::new("c".into()),
            action,
            ..crate::config::test_field(&format!("f{i}"), logical)
        }
    }

    fn product(fields: Vec<FieldPlan>) -> ProductPlan {
        crate::config::test_product(fields)
    }

    fn governor(p: &ProductPlan) -> Governor {
        Governor {
            products: vec![(p.fields.clone(), p.on_violation)],
            key: Some(b"a site secret of at least 32 bytes!!".to_vec()),
        }
    }

    /// 250 policies (a million records); fewer with `PLANTMESH_GOVERN_CASES`, for runs under
    /// emulation, where the same property is checked on fewer records.
    fn policy_cases() -> u32 {
        std::env::var("PLANTMESH_GOVERN_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(250)
    }

    fn action() -> impl Strategy<Value = EdgeAction> {
        prop_oneof![
            Just(EdgeAction::Pass),
            (1u32..1000).prop_map(|s| EdgeAction::Coarsen(f64::from(s) / 10.0)),
            Just(EdgeAction::Pseudonymise),
            Just(EdgeAction::Mask),
            Just(EdgeAction::Never),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: policy_cases(), ..ProptestConfig::default() })]
        /// 250 policies x 4,000 records = 1,000,000 records: whatever the policy and the values, the
        /// encoded record never carries a `never` field (not even its key), never a pseudonymised or
        /// masked value in clear, and nothing the contract does not declare.
        #[test]
        fn nothing_leaves_that_governance_forbids(actions in proptest::collection::vec(action(), 1..8), seed in any::<u64>()) {
            let fields: Vec<FieldPlan> = actions
                .iter()
                .enumerate()
                .map(|(i, a)| field(i, *a, if matches!(a, EdgeAction::Coarsen(_)) || i % 2 == 0 { LogicalType::Number } else { LogicalType::String }))
                .collect();
            let p = product(fields);
            let g = governor(&p);
            let enc = RecordEncoder::new(&p);
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut counts = Counts::default();
            for _ in 0..4000 {
                // Distinctive clear values: numbers with many digits, strings with a marker.
                let clear: Vec<Value> = p
                    .fields
                    .iter()
                    .map(|f| match f.logical_type {
                        LogicalType::Number => Value::Float(rng.f64() * 1e6 + 123_456.789),
                        _ => Value::Text(format!("secret-{:016x}", rng.u64(..))),
                    })
                    .collect();
                let record = Record { ts: 1, fields: clear.iter().map(|v| (Some(v.clone()), Quality::Good)).collect() };
                let Decision::Publish(out) = g.apply(0, record, &mut counts) else {
                    return Err(TestCaseError::fail("no contract checks configured: nothing may be dropped"));
                };
                let json = String::from_utf8(enc.encode(&out)).unwrap();
                let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
                let keys: Vec<&String> = parsed["fields"].as_object().unwrap().keys().collect();
                for (i, f) in p.fields.iter().enumerate() {
                    let present = keys.iter().any(|k| k.as_str() == &*f.name);
                    let clear_text = match &clear[i] {
                        Value::Text(s) => s.clone(),
                        v => v.to_json().to_string(),
                    };
                    match f.action {
                        EdgeAction::Never => {
                            prop_assert!(!present, "never field {} published", f.name);
                            prop_assert!(!json.contains(&clear_text));
                        }
                        EdgeAction::Pseudonymise => {
                            prop_assert!(present);
                            let v = parsed["fields"][&*f.name].as_str().unwrap();
                            prop_assert!(v.starts_with("h:") && v.len() == 34, "{v}");
                            prop_assert!(!json.contains(&clear_text), "clear value of a pseudonymised field leaked");
                        }
                        EdgeAction::Mask => {
                            prop_assert!(present);
                            prop_assert!(parsed["fields"][&*f.name].is_null());
                            prop_assert!(!json.contains(&clear_text));
                        }
                        EdgeAction::Coarsen(step) => {
                            let v = parsed["fields"][&*f.name].as_f64().unwrap();
                            let k = (v / step).round();
                            prop_assert!((v - k * step).abs() <= 1e-6 * v.abs().max(1.0), "{v} is not a multiple of {step}");
                        }
                        EdgeAction::Pass => prop_assert!(present),
                    }
                }
                // Only declared fields.
                prop_assert!(keys.iter().all(|k| p.fields.iter().any(|f| &*f.name == k.as_str())));
            }
        }
    }

    #[test]
    fn pseudonyms_are_stable_keyed_and_distinct() {
        let p = product(vec![field(0, EdgeAction::Pseudonymise, LogicalType::String)]);
        let g = governor(&p);
        let a = g.pseudonym(&Value::Text("badge-4711".into()));
        assert_eq!(
            a,
            g.pseudonym(&Value::Text("badge-4711".into())),
            "the same badge maps to the same pseudonym"
        );
        assert_ne!(a, g.pseudonym(&Value::Text("badge-4712".into())));
        let other = Governor {
            products: vec![],
            key: Some(b"another site secret, also 32 bytes long".to_vec()),
        };
        assert_ne!(
            a,
            other.pseudonym(&Value::Text("badge-4711".into())),
            "other sites cannot link it"
        );
    }

    #[test]
    fn contract_violations_are_flagged_or_dropped_and_counted() {
        let mut f = field(0, EdgeAction::Pass, LogicalType::Number);
        f.shape = crate::config::FieldShape {
            range: Some((0.0, 100.0)),
            ..Default::default()
        }
        .boxed();
        let mut r = field(1, EdgeAction::Pass, LogicalType::Number);
        r.required = true;
        let mut p = product(vec![f, r]);
        let g = governor(&p);
        let mut counts = Counts::default();
        let rec = Record {
            ts: 5,
            fields: vec![
                (Some(Value::Float(250.0)), Quality::Good),
                (None, Quality::Bad(BadReason::Timeout)),
            ],
        };
        let Decision::Publish(out) = g.apply(0, rec.clone(), &mut counts) else {
            panic!("flag publishes")
        };
        assert_eq!(
            out.fields[0],
            (0, Some(Value::Float(250.0)), Quality::Bad(BadReason::OutOfRange))
        );
        assert_eq!(
            out.fields[1].2,
            Quality::Bad(BadReason::Timeout),
            "the original reason is kept"
        );
        assert_eq!(counts.0[&(0, Rule::ContractRange)], 1);
        assert_eq!(counts.0[&(0, Rule::ContractRequired)], 1);
        p.on_violation = OnViolation::Drop;
        let g = governor(&p);
        assert_eq!(
            g.apply(0, rec, &mut counts),
            Decision::Drop {
                rule: Rule::ContractViolation
            }
        );
        assert_eq!(counts.0[&(0, Rule::ContractDrop)], 1);
    }
}
