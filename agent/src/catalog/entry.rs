//! The catalog index: one small retained entry per product on a topic that does not depend on the
//! governance file's topic template, `_plantmesh/catalog/{enterprise}/{site}/{agent}/{product}.v{major}`
//! (`_` for an enterprise not set). One subscription, `_plantmesh/catalog/#`, finds every product of
//! every agent on the broker, whatever template each agent's products follow; the entry says where
//! the product's data, descriptor, contract and SLIs are (docs/wire-format.md, "Catalog index").

use crate::config::{AgentPlan, Plan, ProductPlan};
use serde_json::json;

/// The fixed root of the catalog index.
pub const ROOT: &str = "_plantmesh/catalog";

/// Where product `p`'s entry is retained.
pub fn entry_topic(agent: &AgentPlan, p: &ProductPlan) -> String {
    format!(
        "{ROOT}/{}/{}/{}/{}",
        agent.enterprise.as_deref().unwrap_or("_"),
        agent.site,
        agent.id,
        p.key
    )
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    use std::fmt::Write;
    sha2::Sha256::digest(bytes)
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}"); // writing to a String cannot fail
            s
        })
}

/// The entry: identity, owner, status, the contract's hash and the product's topics.
pub fn entry(plan: &Plan, p: &ProductPlan, contract: &[u8]) -> Vec<u8> {
    let mut topics = json!({
        "data": p.topic,
        "descriptor": crate::publish::envelope::descriptor_topic(p),
        "contract": super::odcs::contract_topic(p),
        "sli": super::sli_topic(p),
        "gaps": crate::publish::envelope::gaps_topic(p),
    });
    if p.uns {
        topics["uns"] = p.uns_topic.clone().into();
    }
    #[allow(clippy::expect_used, reason = "a JSON value serializes into a Vec")]
    serde_json::to_vec(&json!({
        "urn": crate::config::urn(&plan.agent, &p.id, p.major),
        "product": p.id,
        "major": p.major,
        "version": p.version,
        "status": p.status,
        "domain": p.domain,
        "owner": p.owner,
        "enterprise": plan.agent.enterprise,
        "site": plan.agent.site,
        "agent": plan.agent.id,
        // SHA-256 of the retained contract's bytes: any consumer can check it with any tool.
        "contract_sha256": sha256_hex(contract),
        "topics": topics,
    }))
    .expect("catalog entry serializes")
}
