//! `plantmesh check` on every shipped config (must pass) and on a corpus of broken configs (each must
//! fail with its exact message). Each case in tests/configs/broken/<case>/ holds a config directory
//! and `expect.txt`: lines that must appear in the output (file paths are relative to the case).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "end-to-end tests: a failure fails the test"
)]

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

#[test]
fn preview_shows_what_would_leave_and_why() {
    let root = repo_root();
    let run = |args: &[&str]| {
        Command::new(plantmesh_bin())
            .arg("preview")
            .args(args)
            .output()
            .unwrap()
    };
    let input = root.join("configs/example/recorded/press-shift.csv");
    let config = root.join("configs/example");
    let out = run(&["--config", config.to_str().unwrap(), "--input", input.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let messages: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        messages.iter().filter(|l| l.contains("/press-cycles/v1 ")).count(),
        4,
        "{text}"
    );
    assert!(
        !text.contains("OP-0042") && !text.contains("OP-0107"),
        "badges in clear: {text}"
    );
    assert!(text.contains("#   operator: pseudonymised: class `personal`"), "{text}");
    let first: serde_json::Value = serde_json::from_str(messages[0].split_once(' ').unwrap().1).unwrap();
    assert_eq!(first["records"][0]["fields"]["good_parts"], 960);
    assert!(first["records"][0]["fields"]["operator"]
        .as_str()
        .unwrap()
        .starts_with("h:"));
    // One product only.
    let out = run(&[
        "--config",
        config.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--product",
        "die-temperature",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .all(|l| l.contains("/die-temperature/v1 ")),
        "{text}"
    );
    // A column that is no tag: a clear error.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "ts,press-plc.cycle_cnt\n2026-11-21T06:00:00Z,1\n").unwrap();
    let out = run(&["--config", config.to_str().unwrap(), "--input", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("column 2 `press-plc.cycle_cnt` is not a tag"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn preview_on_the_live_demo_plant_shows_governed_messages_and_publishes_nothing() {
    let out = Command::new(plantmesh_bin())
        .args(["preview", "--demo", "--seconds", "4", "--product", "press-output"])
        .env("PLANTMESH_LOG", "warn")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let messages: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| serde_json::from_str(l.split_once(' ').unwrap().1).unwrap())
        .collect();
    assert!(messages.len() >= 2, "the simulated press changes every second: {text}");
    assert!(messages.iter().all(|m| m["product"] == "press-output"), "{text}");
    let fields = &messages[0]["records"][0]["fields"];
    assert!(fields["operator"].as_str().unwrap().starts_with("h:"), "{text}");
    assert!(fields.get("recipe_setpoint").is_none(), "{text}");
    assert!(text.contains("#   operator: pseudonymised"), "{text}");
    assert!(text.contains("#   recipe_setpoint: withheld"), "{text}");
    assert!(!text.contains("OP-0"), "a badge in clear: {text}");
}
