//! Which products have documents retained at the broker, kept in `<data_dir>/retained.json`, so
//! that a product removed from the config while the agent was stopped still has its descriptor,
//! contract, catalog entry and SLI cleared by the next run (a retained message stays at the broker
//! until somebody clears it, and nobody else knows it is there).
//!
//! An entry is written when a product is announced and removed once its documents are cleared.
//! Small: a product's key, its topic and its catalog entry's topic; the documents' topics follow.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `key -> (product topic, catalog entry topic)`.
pub type Entries = BTreeMap<String, (String, String)>;

/// The runtime and the publisher both update the file: one at a time.
static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("retained.json")
}

/// The entry of product `p`.
pub fn entry_of(plan: &crate::config::Plan, p: &crate::config::ProductPlan) -> (String, (String, String)) {
    (
        p.key.clone(),
        (p.topic.clone(), super::entry::entry_topic(&plan.agent, p)),
    )
}

/// The retained topics an entry stands for (as [`super::retained_topics`] lists them).
pub fn topics((topic, entry): &(String, String)) -> Vec<String> {
    vec![
        format!("{topic}/_descriptor"),
        format!("{topic}/_contract"),
        entry.clone(),
        format!("{topic}/_sli"),
    ]
}

/// The entries on file (none when there is no file or it cannot be read: a damaged file costs
/// documents left at the broker, never a product not run).
pub fn read(file: &Path) -> Entries {
    std::fs::read(file)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Changes the file: `f` edits the entries, which are written back.
pub fn update(file: &Path, f: impl FnOnce(&mut Entries)) -> std::io::Result<()> {
    let _one = LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut entries = read(file);
    f(&mut entries);
    let body = serde_json::to_vec(&entries).map_err(std::io::Error::other)?;
    crate::fsutil::write_atomic(file, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_a_round_trip_and_a_damaged_file_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let file = path(dir.path());
        update(&file, |e| {
            e.insert("a.v1".into(), ("s/a/v1".into(), "_plantmesh/catalog/_/s/g/a.v1".into()));
        })
        .unwrap();
        let e = read(&file);
        assert_eq!(
            topics(&e["a.v1"]),
            [
                "s/a/v1/_descriptor",
                "s/a/v1/_contract",
                "_plantmesh/catalog/_/s/g/a.v1",
                "s/a/v1/_sli"
            ]
        );
        std::fs::write(&file, b"{\"a.v1\": [").unwrap();
        assert!(read(&file).is_empty());
    }
}
