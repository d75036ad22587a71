//! The gateway install, as a new user would run it, into a throwaway root: the unit is what
//! `systemd-analyze verify` accepts, hardened as `systemd-analyze security` measures it, the service
//! user exists and is in dialout, the installed binary checks the installed config (the unit's
//! ExecStartPre), and the uninstall path removes what it should and keeps what it should.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "end-to-end tests: a failure fails the test"
)]

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

fn install(root: &Path, extra: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/install-gateway.sh"))
        .arg("--root")
        .arg(root)
        .args(extra)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

#[test]
fn a_throwaway_root_gets_a_verified_hardened_unit_and_comes_clean_off() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // The system's own units (sysinit.target and friends), which the unit is verified against.
    std::fs::create_dir_all(root.join("usr/lib/systemd")).unwrap();
    let status = Command::new("cp")
        .args(["-a", "/usr/lib/systemd/system"])
        .arg(root.join("usr/lib/systemd/"))
        .status()
        .unwrap();
    assert!(status.success());
    let bin = plantmesh_bin();
    install(root, &["--binary", bin.to_str().unwrap()]);

    let unit = std::fs::read_to_string(root.join("etc/systemd/system/plantmesh.service")).unwrap();
    for line in [
        "User=plantmesh",
        "SupplementaryGroups=dialout",
        "ExecStartPre=/usr/local/bin/plantmesh check /etc/plantmesh --data-dir /var/lib/plantmesh",
        "ExecStart=/usr/local/bin/plantmesh run --config /etc/plantmesh --data-dir /var/lib/plantmesh",
        "Restart=on-failure",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/plantmesh",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "LoadCredential=secret:/etc/plantmesh/credentials",
    ] {
        assert!(unit.lines().any(|l| l == line), "missing `{line}`:\n{unit}");
    }
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg("/etc/systemd/system/plantmesh.service")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&verify.stderr).to_string() + &String::from_utf8_lossy(&verify.stdout);
    assert!(
        verify.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    // Exposure as systemd scores it (0 best, 10 worst): at most 2.0.
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=20"])
        .arg(format!("--root={}", root.display()))
        .arg("/etc/systemd/system/plantmesh.service")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&security.stdout).to_string();
    assert!(security.status.success(), "{report}");
    assert!(
        report.contains("Overall exposure level for plantmesh.service"),
        "{report}"
    );

    // The service user, in dialout for serial ports.
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("plantmesh:") && l.ends_with(":/var/lib/plantmesh:/usr/sbin/nologin")),
        "{passwd}"
    );
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap();
    assert!(
        group
            .lines()
            .any(|l| l.starts_with("dialout:") && l.ends_with("plantmesh")),
        "{group}"
    );
    // Secrets root-only; config readable by the service's group only.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str| std::fs::metadata(root.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("etc/plantmesh/credentials"), 0o700);
    assert_eq!(mode("etc/plantmesh"), 0o750);
    assert_eq!(mode("etc/plantmesh/agent.toml"), 0o640);

    // What ExecStartPre runs: the installed binary on the installed config.
    let check = Command::new(root.join("usr/local/bin/plantmesh"))
        .arg("check")
        .arg(root.join("etc/plantmesh"))
        .arg("--data-dir")
        .arg(root.join("var/lib/plantmesh"))
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));

    // A second install keeps an edited config.
    std::fs::write(root.join("etc/plantmesh/agent.toml"), "# edited\n").unwrap();
    install(root, &["--binary", bin.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_to_string(root.join("etc/plantmesh/agent.toml")).unwrap(),
        "# edited\n"
    );

    // Uninstall keeps config and data; --purge removes them.
    std::fs::write(root.join("var/lib/plantmesh/buffer.redb"), b"data").unwrap();
    install(root, &["--uninstall"]);
    assert!(!root.join("etc/systemd/system/plantmesh.service").exists());
    assert!(!root.join("usr/local/bin/plantmesh").exists());
    assert!(root.join("etc/plantmesh/agent.toml").exists() && root.join("var/lib/plantmesh/buffer.redb").exists());
    install(root, &["--uninstall", "--purge"]);
    assert!(!root.join("etc/plantmesh").exists() && !root.join("var/lib/plantmesh").exists());
}
