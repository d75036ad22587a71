//! `plantmesh check` on every shipped config (must pass) and on a corpus of broken configs (each must
//! fail with its exact message). Each case in tests/configs/broken/<case>/ holds a config directory
//! and `expect.txt`: lines that must appear in the output (file paths are relative to the case).

mod common;

use common::*;
use std::process::Command;

#[test]
fn every_shipped_config_is_valid() {
    let configs = repo_root().join("configs");
    let mut checked = 0;
    for entry in std::fs::read_dir(&configs).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.join("agent.toml").exists() {
            continue;
        }
        let out = Command::new(plantmesh_bin()).arg("check").arg(&dir).output().unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok:"));
        checked += 1;
    }
    assert!(checked >= 2, "expected configs/demo and configs/example");
}

#[test]
fn every_broken_config_fails_with_its_message() {
    let corpus = repo_root().join("tests/configs/broken");
    let mut cases: Vec<_> = std::fs::read_dir(&corpus).unwrap().map(|e| e.unwrap().path()).collect();
    cases.sort();
    assert!(cases.len() >= 9, "the corpus covers every class of mistake");
    for case in cases {
        let out = Command::new(plantmesh_bin()).arg("check").arg(&case).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).replace(&format!("{}/", case.display()), "");
        assert_eq!(out.status.code(), Some(1), "{}: {stderr}", case.display());
        assert!(!stderr.contains("panicked"), "{stderr}");
        for want in std::fs::read_to_string(case.join("expect.txt"))
            .unwrap()
            .lines()
            .filter(|l| !l.is_empty())
        {
            assert!(
                stderr.contains(want),
                "case {}:\nexpected: {want}\ngot:\n{stderr}",
                case.file_name().unwrap().to_string_lossy()
            );
        }
        // Exactly the problems the case is about: one per case.
        assert_eq!(
            stderr.matches(": error").count(),
            1,
            "case {}: {stderr}",
            case.display()
        );
    }
}
