//! Raw config -> [`Plan`]: every rule that serde cannot express, each with its location.
//!
//! By subject: [`ctx`] is the toolkit (located problems, parsing, refusing keys of another device
//! kind); [`gateway`] the gateway file (agent, buffer, devices, each validated in its kind's room
//! under `sources/`); [`upstream`] the broker connection; [`governance`] the platform's rules; and
//! [`products`] the domain teams' product files, checked against the rules and the gateway's tags.
//! Contract compatibility with what the broker acknowledged is [`super::contract`].

mod ctx;
mod gateway;
mod governance;
#[cfg(test)]
mod no_panic_tests;
mod products;
mod upstream;

pub(crate) use ctx::{consequences, parse, secs, Ctx, DeviceInput, TagTable};
pub(crate) use upstream::upstream_plan;

use super::diag::{Diagnostics, Source};
use super::*;
use gateway::GatewayParts;
use governance::Rules;
use products::TagIndex;
use std::collections::HashMap;

pub(super) fn validate(
    gateway: &(PathBuf, String),
    governance: Option<&(PathBuf, String)>,
    products: &[(PathBuf, String)],
    data_dir: Option<&Path>,
) -> Result<Plan, Diagnostics> {
    let mut problems = Vec::new();
    // Values the parse took out to read on past them (see ctx::parse).
    let mut taken_out = Vec::new();
    let mut files = vec![gateway.0.clone()];
    let mut hash_input: Vec<&[u8]> = vec![gateway.1.as_bytes()];

    // Governance first: every product is checked against it.
    let mut rules = Rules::builtin();
    if let Some((path, text)) = governance {
        files.push(path.clone());
        hash_input.push(text.as_bytes());
        let src = Source { path, text };
        let blank = text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
        if blank {
            // Fail closed: an empty file (a truncated copy, a placeholder) is not "no rules".
            let mut d = src.at(
                0..0,
                "",
                "the governance file is empty: it must define classes and egress",
            );
            d.help = Some("write the site's rules (docs/configuration.md, \"Governance\"), or remove the file and set `governance = \"builtin-defaults\"` under [agent]".into());
            problems.push(d);
        } else {
            match parse::<raw::Governance>(&src, &mut problems, &mut taken_out) {
                None => {}
                Some(g) => {
                    let mut cx = Ctx {
                        src,
                        problems: &mut problems,
                    };
                    rules = governance::rules(&mut cx, g);
                }
            }
        }
    }

    let src = Source {
        path: &gateway.0,
        text: &gateway.1,
    };
    let gw = parse::<raw::Gateway>(&src, &mut problems, &mut taken_out);
    let mut cx = Ctx {
        src,
        problems: &mut problems,
    };
    if let Some(gw) = &gw {
        governance::builtin_choice(&mut cx, gw.agent.governance.as_ref(), governance.map(|g| &g.0));
    }
    let mut built = gw.map(|gw| gateway::plan(&mut cx, gw, &rules));
    if let Some(parts) = built.as_mut() {
        gateway::tags_from_products(products, &mut parts.devices, &mut parts.table);
        if let Some(dir) = data_dir {
            parts.agent.data_dir = dir.to_path_buf();
        }
    }

    let mut plan_products = Vec::new();
    if let Some(GatewayParts {
        agent,
        buffer,
        devices,
        table,
        device_ids,
        ..
    }) = &built
    {
        let tags = &table.tags;
        let declared = &table.declared;
        let by_ref: HashMap<String, usize> = tags
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("{}.{}", device_ids[t.device()], t.name), i))
            .collect();
        let mut seen_ids: HashMap<(String, String), PathBuf> = HashMap::new();
        let mut topics = products::Topics::default();
        let published = super::contract::load(&super::contract::dir(&agent.data_dir));
        // Every product file is read before any is planned: a tag's class is the strictest any of
        // them gives a field reading it, so two products reading one tag treat it alike.
        let mut parsed = Vec::new();
        for (path, text) in products {
            files.push(path.clone());
            hash_input.push(text.as_bytes());
            let src = Source { path, text };
            if let Some(p) = parse::<raw::Product>(&src, &mut problems, &mut taken_out) {
                parsed.push((src, p));
            }
        }
        let floors = governance::tag_floors(table, &by_ref, devices, &parsed, &rules);
        for (src, raw) in parsed {
            let path = src.path;
            let mut cx = Ctx {
                src,
                problems: &mut problems,
            };
            // One product may be defined twice only with different major versions (a migration
            // window: the old major keeps publishing on its own topic beside the new one).
            let major = raw.version.get_ref().split('.').next().unwrap_or("").to_string();
            let seen = (raw.id.get_ref().clone(), major.clone());
            if let Some(first) = seen_ids.get(&seen) {
                let msg = format!(
                    "duplicate product `{}` major version {major}: also defined in {}",
                    raw.id.get_ref(),
                    first.display()
                );
                cx.err(&raw.id, "id", msg).help =
                    Some("two files may define one product only with different major versions".into());
                continue;
            }
            seen_ids.insert(seen, path.to_path_buf());
            let version_at = raw.version.clone();
            let sparkplug = built
                .as_ref()
                .and_then(|b| b.upstream.as_ref())
                .is_some_and(|u| u.sparkplug.is_some());
            if let (Some(uns), true) = (&raw.publish.uns, sparkplug) {
                if *uns.get_ref() {
                    cx.err(uns, "publish.uns", "the UNS view is for the JSON encoding; with upstream `encoding = \"sparkplug\"` every field already is a metric of the product's DDATA").help =
                        Some("remove `uns`, or publish JSON (upstream `encoding = \"json\"`)".into());
                }
            }
            if let Some(p) = products::plan(
                &mut cx,
                raw,
                agent,
                buffer,
                &TagIndex {
                    tags,
                    by_ref: &by_ref,
                    declared,
                    floors: &floors,
                },
                &rules,
                &mut topics,
            ) {
                if let Some(stored) = published.get(&p.key) {
                    if let Some((message, help)) = super::contract::check(&p, stored) {
                        cx.err(&version_at, "version", message).help = Some(help);
                        continue;
                    }
                }
                plan_products.push(p);
            }
        }
    }

    let Some(GatewayParts {
        agent,
        upstream,
        buffer,
        devices,
        table,
        ..
    }) = built.filter(|_| problems.is_empty())
    else {
        consequences(&mut problems, &taken_out);
        return Err(Diagnostics(problems));
    };
    let tags = table.tags;
    for p in &mut plan_products {
        if p.service_levels.expected_interval.is_zero() {
            // Every sample or on change: at best one record per poll of the fastest device.
            p.service_levels.expected_interval = p
                .fields
                .iter()
                .filter_map(|f| f.source.tag())
                .map(|tag| devices[tags[tag].device()].kind.sample_interval())
                .min()
                .unwrap_or(Duration::from_secs(1));
        }
    }
    // A retired product runs no more: it only has its retained documents cleared once whatever
    // it left in the buffer has been delivered.
    let (retired, plan_products): (Vec<ProductPlan>, Vec<ProductPlan>) =
        plan_products.into_iter().partition(|p| p.status == "retired");
    Ok(Plan {
        agent,
        upstream,
        buffer,
        devices,
        tags: tags.into(),
        products: plan_products,
        retired,
        governance: rules.plan,
        config_hash: format!("{:016x}", fnv1a64(&hash_input)),
        files,
    })
}
