//! Contract versions: what a consumer of a product may rely on, and whether a change breaks it.
//!
//! The agent keeps the last descriptor it published for every product version (`{id}.v{major}`)
//! in `<data_dir>/contracts/`, written when the broker acknowledged it. At load, each product's
//! published schema is compared with that file: removing or renaming a field, or changing its type
//! or unit, breaks consumers and needs a new major version (which publishes on its own topic, so
//! the old major can run beside it); any other change to the schema needs a higher version.

use crate::config::{EdgeAction, FieldPlan, ProductPlan};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// One field as consumers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedField {
    pub name: String,
    pub logical_type: String,
    pub unit: String,
}

/// The logical type a consumer receives: pseudonyms are strings whatever the source type.
pub fn published_type(f: &FieldPlan) -> &'static str {
    match f.action {
        EdgeAction::Pseudonymise => "string",
        _ => f.logical_type.as_str(),
    }
}

/// The fields of a product that leave the site, as the descriptor lists them.
pub fn published_fields(p: &ProductPlan) -> Vec<PublishedField> {
    p.fields
        .iter()
        .filter(|f| f.action != EdgeAction::Never)
        .map(|f| PublishedField {
            name: f.name.to_string(),
            logical_type: published_type(f).to_string(),
            unit: f.unit.to_string(),
        })
        .collect()
}

/// The last published contract of a product version.
#[derive(Debug, Clone)]
pub struct Stored {
    pub version: String,
    pub fields: Vec<PublishedField>,
    pub file: PathBuf,
}

/// Where the last published descriptors live.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("contracts")
}

/// Reads every stored descriptor (`<key>.json`). Unreadable files are skipped: they cannot make a
/// config invalid, and the next publish rewrites them.
pub fn load(dir: &Path) -> BTreeMap<String, Stored> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(key) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
        else {
            continue;
        };
        let Ok(bytes) = std::fs::read(&path) else { continue };
        if let Some(stored) = parse(&bytes, &path) {
            out.insert(key.to_string(), stored);
        }
    }
    out
}

fn parse(descriptor: &[u8], file: &Path) -> Option<Stored> {
    let d: serde_json::Value = serde_json::from_slice(descriptor).ok()?;
    let props = d["schema"][0]["properties"].as_array()?;
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    Some(Stored {
        version: d["version"].as_str()?.to_string(),
        fields: props
            .iter()
            .map(|p| PublishedField {
                name: text(&p["name"]),
                logical_type: text(&p["logicalType"]),
                unit: text(&p["unit"]),
            })
            .collect(),
        file: file.to_path_buf(),
    })
}

/// Stores a descriptor the broker acknowledged, atomically (write, fsync, rename); unchanged
/// descriptors are not rewritten, to spare the flash.
pub fn save(dir: &Path, key: &str, descriptor: &[u8]) -> std::io::Result<()> {
    let path = dir.join(format!("{key}.json"));
    if std::fs::read(&path).is_ok_and(|old| old == descriptor) {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    crate::fsutil::write_atomic(&path, descriptor)
}

/// One difference between the last published contract and the new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Removed, or renamed (a rename is a removal and an addition to a consumer).
    Removed(String),
    TypeChanged {
        field: String,
        from: String,
        to: String,
    },
    UnitChanged {
        field: String,
        from: String,
        to: String,
    },
    Added(String),
}

impl Change {
    pub fn is_breaking(&self) -> bool {
        !matches!(self, Change::Added(_))
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Removed(n) => write!(f, "field `{n}` removed or renamed"),
            Change::TypeChanged { field, from, to } => write!(f, "field `{field}` type `{from}` -> `{to}`"),
            Change::UnitChanged { field, from, to } => write!(f, "field `{field}` unit `{from}` -> `{to}`"),
            Change::Added(n) => write!(f, "field `{n}` added"),
        }
    }
}

/// What changed from `old` to `new`, breaking changes first.
pub fn diff(old: &[PublishedField], new: &[PublishedField]) -> Vec<Change> {
    let mut changes = Vec::new();
    for o in old {
        match new.iter().find(|n| n.name == o.name) {
            None => changes.push(Change::Removed(o.name.clone())),
            Some(n) => {
                if n.logical_type != o.logical_type {
                    changes.push(Change::TypeChanged {
                        field: o.name.clone(),
                        from: o.logical_type.clone(),
                        to: n.logical_type.clone(),
                    });
                }
                if n.unit != o.unit {
                    changes.push(Change::UnitChanged {
                        field: o.name.clone(),
                        from: o.unit.clone(),
                        to: n.unit.clone(),
                    });
                }
            }
        }
    }
    for n in new {
        if !old.iter().any(|o| o.name == n.name) {
            changes.push(Change::Added(n.name.clone()));
        }
    }
    changes
}

/// `MAJOR.MINOR.PATCH` as numbers.
pub fn semver(v: &str) -> Option<(u64, u64, u64)> {
    let mut it = v.split('.').map(|s| s.parse::<u64>().ok());
    let out = (it.next()??, it.next()??, it.next()??);
    it.next().is_none().then_some(out)
}

/// Why a product's version does not fit its changes, if it does not: `(message, help)`.
pub fn check(p: &ProductPlan, stored: &Stored) -> Option<(String, String)> {
    let changes = diff(&stored.fields, &published_fields(p));
    if changes.is_empty() {
        return None;
    }
    let list = changes.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
    let (major, minor, _) = semver(&p.version).unwrap_or((p.major, 0, 0));
    if changes.iter().any(Change::is_breaking) {
        return Some((
            format!(
                "breaking change to `{}` without a new major version: {list} (last published {}, kept in {})",
                p.id,
                stored.version,
                stored.file.display()
            ),
            format!(
                "publish it as version {}.0.0 (its own topic, v{}); keep a copy of the {}.x file beside it \
                 for a migration window",
                major + 1,
                major + 1,
                major
            ),
        ));
    }
    let old = semver(&stored.version).unwrap_or_default();
    if semver(&p.version).unwrap_or_default() <= old {
        return Some((
            format!(
                "the contract of `{}` changed ({list}) but version {} is not above the last published {}",
                p.id, p.version, stored.version
            ),
            format!("use version {major}.{}.0", old.1.max(minor) + 1),
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(name: &str, t: &str, unit: &str) -> PublishedField {
        PublishedField {
            name: name.into(),
            logical_type: t.into(),
            unit: unit.into(),
        }
    }

    #[test]
    fn removals_type_and_unit_changes_break_additions_do_not() {
        let old = [f("a", "number", "Cel"), f("b", "integer", "1"), f("c", "string", "")];
        let new = [f("a", "number", "K"), f("b", "number", "1"), f("d", "boolean", "")];
        let changes = diff(&old, &new);
        assert_eq!(
            changes,
            vec![
                Change::UnitChanged {
                    field: "a".into(),
                    from: "Cel".into(),
                    to: "K".into()
                },
                Change::TypeChanged {
                    field: "b".into(),
                    from: "integer".into(),
                    to: "number".into()
                },
                Change::Removed("c".into()),
                Change::Added("d".into()),
            ]
        );
        assert_eq!(changes.iter().filter(|c| c.is_breaking()).count(), 3);
        assert!(diff(&old, &old).is_empty());
    }

    #[test]
    fn saved_descriptors_load_back_and_are_not_rewritten_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let d = br#"{"version":"1.2.0","schema":[{"name":"p","properties":[{"name":"a","logicalType":"number","unit":"Cel"}]}]}"#;
        save(dir.path(), "p.v1", d).unwrap();
        let before = std::fs::metadata(dir.path().join("p.v1.json"))
            .unwrap()
            .modified()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        save(dir.path(), "p.v1", d).unwrap();
        let after = std::fs::metadata(dir.path().join("p.v1.json"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(before, after, "an unchanged descriptor is not rewritten");
        let all = load(dir.path());
        assert_eq!(all["p.v1"].version, "1.2.0");
        assert_eq!(all["p.v1"].fields, vec![f("a", "number", "Cel")]);
    }

    #[test]
    fn semver_parses_three_numbers_only() {
        assert_eq!(semver("1.2.3"), Some((1, 2, 3)));
        assert_eq!(semver("1.2"), None);
        assert_eq!(semver("1.2.3.4"), None);
        assert_eq!(semver("1.x.3"), None);
    }
}
