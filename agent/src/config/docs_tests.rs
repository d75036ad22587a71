//! Every key the config parser accepts is documented in docs/configuration.md. The keys are not
//! listed here by hand: they are read off the parser itself, which names the keys a table may have
//! when it refuses one it does not know; so a key added to `raw` without documentation fails this.

use super::raw;
use serde::de::DeserializeOwned;
use std::collections::BTreeSet;

/// One step from a file's top level to a table.
#[derive(Debug, Clone)]
enum Step {
    /// `key = { ... }`
    Table(String),
    /// `[[key]]`
    List(String),
    /// `[key.<any name>]`: a table of tables named by the user (`[classes.internal]`).
    Named(String),
}

/// The TOML text of `steps` leading to a table that holds only the unknown key `__probe`.
fn probe_text(steps: &[Step]) -> String {
    let mut value = toml::Value::Table(toml::map::Map::from_iter([(
        "__probe".to_string(),
        toml::Value::Integer(1),
    )]));
    for step in steps.iter().rev() {
        let (key, inner) = match step {
            Step::Table(k) => (k, value),
            Step::List(k) => (k, toml::Value::Array(vec![value])),
            Step::Named(k) => (
                k,
                toml::Value::Table(toml::map::Map::from_iter([("any-name".to_string(), value)])),
            ),
        };
        value = toml::Value::Table(toml::map::Map::from_iter([(key.clone(), inner)]));
    }
    toml::to_string(&value).expect("a table serializes")
}

/// The keys the table at `steps` accepts, or `None` when there is no table of its own there.
fn keys_at<T: DeserializeOwned>(steps: &[Step]) -> Option<Vec<String>> {
    let e = match toml::from_str::<T>(&probe_text(steps)) {
        Ok(_) => return None,
        Err(e) => e,
    };
    let message = e.message();
    let rest = message.strip_prefix("unknown field `__probe`")?;
    Some(rest.split('`').skip(1).step_by(2).map(str::to_string).collect())
}

fn name(steps: &[Step], key: &str) -> String {
    let mut out = String::new();
    for s in steps {
        match s {
            Step::Table(k) => out.push_str(&format!("{k}.")),
            Step::List(k) => out.push_str(&format!("{k}[].")),
            Step::Named(k) => out.push_str(&format!("{k}.<name>.")),
        }
    }
    out + key
}

/// Every key of file type `T`, as dotted paths (`devices[].tags[].byte_order`).
fn every_key<T: DeserializeOwned>() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut todo: Vec<Vec<Step>> = vec![Vec::new()];
    while let Some(at) = todo.pop() {
        let Some(keys) = keys_at::<T>(&at) else { continue };
        for key in keys {
            out.insert(name(&at, &key));
            if at.len() >= 4 {
                continue;
            }
            for step in [
                Step::Table(key.clone()),
                Step::List(key.clone()),
                Step::Named(key.clone()),
            ] {
                let mut deeper = at.clone();
                deeper.push(step);
                if keys_at::<T>(&deeper).is_some() {
                    todo.push(deeper);
                    break;
                }
            }
        }
    }
    out
}

/// Whether the docs name `key` the way their tables do: `` `key` `` alone, or with its section
/// (`` `[publish] mode` ``), or in a list of keys (`` `site`, `area` ``); a table by its heading.
fn documented(docs: &str, key: &str) -> bool {
    [
        format!("`{key}`"),
        format!(" {key}`"),
        format!("`{key} "),
        format!(".{key}`"),
        format!("]{key}`"),
        // A table: its heading (`[buffer]`, `[[devices.tags]]`, `[classes.<name>]`).
        format!("[{key}]"),
        format!(".{key}]"),
        format!("[{key}."),
    ]
    .iter()
    .any(|form| docs.contains(form.as_str()))
}

#[test]
fn every_key_the_parser_accepts_is_in_configuration_md() {
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md"))
        .expect("docs/configuration.md");
    let gateway = every_key::<raw::Gateway>();
    let governance = every_key::<raw::Governance>();
    let product = every_key::<raw::Product>();
    // The explorer reaches into lists, nested tables and tables of named tables.
    for (set, key) in [
        (&gateway, "devices[].tags[].byte_order"),
        (&gateway, "upstream.sparkplug.primary_host"),
        (&gateway, "buffer.max_bytes"),
        (&product, "fields[].source"),
        (&governance, "classes.<name>.action"),
    ] {
        assert!(set.contains(key), "{key} not found among {set:?}");
    }
    let mut missing: Vec<String> = Vec::new();
    for (file, set) in [
        ("agent.toml", &gateway),
        ("governance.toml", &governance),
        ("product", &product),
    ] {
        for path in set {
            let key = path.rsplit('.').next().unwrap_or(path);
            if !documented(&docs, key) {
                missing.push(format!("{file}: {path}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "keys the parser accepts that docs/configuration.md does not name:\n{}",
        missing.join("\n")
    );
}

#[test]
fn a_key_the_docs_do_not_name_is_found() {
    let docs = "| `poll_interval` | duration |\n| `[publish] mode` | x |\n| `site`, `area` | y |";
    for key in ["poll_interval", "mode", "site", "area"] {
        assert!(documented(docs, key), "{key}");
    }
    assert!(!documented(docs, "poll_intervall") && !documented(docs, "interval"));
}
