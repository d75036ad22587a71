//! The audit trail: every config load (with its hash and files) and every run's governance counts,
//! one JSON object per line in `<data_dir>/audit.jsonl`, bounded to the newest `MAX_ENTRIES` lines.
//! `plantmesh audit --data-dir DIR` prints it.

use crate::model::{format_rfc3339_millis, now_millis};
use std::io::Write;
use std::path::Path;

/// Lines kept; older ones are dropped when the file is rewritten.
pub const MAX_ENTRIES: usize = 1000;

/// Appends one entry (an object; `ts` and `event` are added), keeping the file bounded.
pub fn append(data_dir: &Path, event: &str, mut entry: serde_json::Value) -> std::io::Result<()> {
    std::fs::create_dir_all(data_dir)?;
    let path = data_dir.join("audit.jsonl");
    if let Some(obj) = entry.as_object_mut() {
        obj.insert("ts".into(), format_rfc3339_millis(now_millis()).into());
        obj.insert("event".into(), event.into());
    }
    let existing = std::fs::read_to_string(&path).unwrap_or_default();
    let lines: Vec<&str> = existing.lines().collect();
    if lines.len() >= MAX_ENTRIES {
        // Rewrite with the newest entries only (atomically: a crash leaves the old file).
        let keep = &lines[lines.len() + 1 - MAX_ENTRIES..];
        let tmp = path.with_extension("jsonl.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        for l in keep {
            writeln!(f, "{l}")?;
        }
        writeln!(f, "{entry}")?;
        f.sync_all()?;
        std::fs::rename(tmp, &path)?;
    } else {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        writeln!(f, "{entry}")?;
    }
    Ok(())
}

/// The entries, oldest first.
pub fn read(data_dir: &Path) -> std::io::Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(data_dir.join("audit.jsonl"))?;
    Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_ordered() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..MAX_ENTRIES + 5 {
            append(dir.path(), "config_load", serde_json::json!({"n": i})).unwrap();
        }
        let entries = read(dir.path()).unwrap();
        assert_eq!(entries.len(), MAX_ENTRIES);
        assert_eq!(entries[0]["n"], 5);
        assert_eq!(entries.last().unwrap()["n"], MAX_ENTRIES + 4);
        assert_eq!(entries[0]["event"], "config_load");
    }
}
