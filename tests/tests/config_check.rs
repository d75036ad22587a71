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

/// A config directory with `agent.toml` and one product file.
fn config_dir(gateway: &str, product: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("products")).unwrap();
    std::fs::write(dir.path().join("agent.toml"), gateway).unwrap();
    std::fs::write(dir.path().join("products/p.toml"), product).unwrap();
    dir
}

const PRODUCT: &str = "id = \"p\"\nname = \"P\"\nversion = \"1.0.0\"\ndomain = \"d\"\nowner = \"o\"\n\
    [[fields]]\nname = \"t\"\nsource = \"plc.t\"\nunit = \"Cel\"\n";

#[test]
fn a_misspelt_key_a_unitless_duration_a_wrong_byte_order_and_a_dangling_tag_are_reported_in_one_run() {
    let gateway = "[agent]\nid = \"gw\"\nsite = \"s\"\narea = \"a\"\nline = \"l\"\ngovernance = \"builtin-defaults\"\n\
        [[devices]]\nid = \"plc\"\nprotocol = \"modbus_tcp\"\naddress = \"127.0.0.1:502\"\npoll_intervall = \"1s\"\ntimeout = \"5\"\n\
        [[devices.tags]]\nname = \"t\"\ntable = \"holding\"\naddress = 0\ntype = \"f32\"\nbyte_order = \"CDBA\"\n";
    let dir = config_dir(gateway, &PRODUCT.replace("plc.t", "plc.nope"));
    let out = Command::new(plantmesh_bin())
        .arg("check")
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).replace(&format!("{}/", dir.path().display()), "");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for want in [
        "agent.toml:11:1: error at `devices[0].poll_intervall`: unknown key `poll_intervall`",
        "help: did you mean `poll_interval`?",
        // A duration without a unit does not hide what follows it either.
        "agent.toml:12:11: error at `devices[0].timeout`",
        "agent.toml:18:14: error at `devices[0].tags[0].byte_order`: invalid value `CDBA`",
        "products/p.toml:8:10: error at `fields[0].source`: `plc.nope` is not a tag of the gateway file",
        "4 problem(s) found",
    ] {
        assert!(stderr.contains(want), "`{want}` missing:\n{stderr}");
    }
    assert_eq!(stderr.matches(": error").count(), 4, "{stderr}");
}

#[test]
fn a_named_file_that_is_missing_warns_under_check_and_fails_strict_check_and_run() {
    let gateway = "[agent]\nid = \"gw\"\nsite = \"s\"\narea = \"a\"\nline = \"l\"\ngovernance = \"builtin-defaults\"\n\
        metrics_listen = \"off\"\ndata_dir = \"data\"\n\
        [upstream]\nurl = \"mqtt://127.0.0.1:1\"\nusername = \"gw\"\npassword_file = \"broker.pass\"\nallow_insecure_credentials = true\n\
        [[devices]]\nid = \"plc\"\nprotocol = \"modbus_tcp\"\naddress = \"127.0.0.1:502\"\n\
        [[devices.tags]]\nname = \"t\"\ntable = \"holding\"\naddress = 0\ntype = \"f32\"\n";
    let dir = config_dir(gateway, PRODUCT);
    let run = |args: &[&str]| {
        let out = Command::new(plantmesh_bin())
            .args(args)
            .arg(dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).replace(&format!("{}/", dir.path().display()), "");
        (out.status.code(), stderr)
    };
    let missing = "agent.toml:12:17: {} at `upstream.password_file`: `";
    let (code, stderr) = run(&["check"]);
    assert_eq!(
        code,
        Some(0),
        "a warning only: the config may be checked off the gateway\n{stderr}"
    );
    assert!(
        stderr.contains(&missing.replace("{}", "warning")) && stderr.contains("broker.pass` does not exist"),
        "{stderr}"
    );
    let (code, stderr) = run(&["check", "--strict"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&missing.replace("{}", "error")), "{stderr}");
    let (code, stderr) = run(&["run", "--config"]);
    assert_ne!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(&missing.replace("{}", "error")) && stderr.contains("broker.pass` does not exist"),
        "{stderr}"
    );
    // Present, but readable by others: a secret the agent would refuse to read.
    let pass = dir.path().join("broker.pass");
    std::fs::write(&pass, "secret\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, stderr) = run(&["check", "--strict"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("readable by group or others (mode 644)") && stderr.contains("chmod 600"),
        "{stderr}"
    );
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, stderr) = run(&["check", "--strict"]);
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn a_metrics_address_that_is_taken_fails_the_start_when_it_was_set() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let gateway = format!(
        "[agent]\nid = \"gw\"\nsite = \"s\"\narea = \"a\"\nline = \"l\"\ngovernance = \"builtin-defaults\"\n\
         metrics_listen = \"{addr}\"\ndata_dir = \"data\"\n\
         [[devices]]\nid = \"plc\"\nprotocol = \"modbus_tcp\"\naddress = \"127.0.0.1:1\"\n\
         [[devices.tags]]\nname = \"t\"\ntable = \"holding\"\naddress = 0\ntype = \"f32\"\n"
    );
    let dir = config_dir(&gateway, PRODUCT);
    let mut child = Command::new(plantmesh_bin())
        .args(["run", "--config"])
        .arg(dir.path())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the agent kept running without the metrics and health endpoint it was told to serve");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("agent.metrics_listen: cannot listen on {addr}")),
        "{stderr}"
    );
    drop(taken);
}
