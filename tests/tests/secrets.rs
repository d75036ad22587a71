//! Secrets stay secret, tried as an OT engineer pasting a URL or a password file would: credentials
//! in URLs, password files others can read, passwords over unencrypted channels, control characters
//! in names that become topics.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "end-to-end tests: a failure fails the test"
)]

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

const PRODUCT: &str = "id = \"p1\"\nname = \"P1\"\nversion = \"1.0.0\"\ndomain = \"d\"\nowner = \"o\"\n\
[[fields]]\nname = \"temp\"\nsource = \"plc.temp\"\n";

fn gateway(extra_device: &str, upstream: &str) -> String {
    format!(
        "[agent]\nid = \"gw\"\nsite = \"s\"\narea = \"a\"\nline = \"l\"\ngovernance = \"builtin-defaults\"\nmetrics_listen = \"off\"\n\
         [[devices]]\nid = \"plc\"\nprotocol = \"modbus_tcp\"\naddress = \"127.0.0.1:1\"\n\
         [[devices.tags]]\nname = \"temp\"\ntable = \"holding\"\naddress = 0\n\
         {extra_device}\n[upstream]\n{upstream}\n"
    )
}

fn check(gateway: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), gateway, &[("p1", PRODUCT)]);
    let out = Command::new(plantmesh_bin())
        .arg("check")
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

/// Row 8: user info in a URL passed `check`, was logged on every retry and (for OPC UA) published
/// in the retained descriptor's lineage. Now it is an error that never echoes the password.
#[test]
fn credentials_in_a_url_are_refused_without_echoing_them() {
    let (code, text) = check(&gateway("", "url = \"mqtt://admin:hunter2@127.0.0.1:1883\""));
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("error at `upstream.url`: credentials in the URL"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");

    let opcua = "[[devices]]\nid = \"oven\"\nprotocol = \"opcua\"\n\
                 endpoint = \"opc.tcp://operator:S3cret@127.0.0.1:4840\"\n\
                 [[devices.tags]]\nname = \"zone1\"\nnode_id = \"ns=2;s=Z1\"\n";
    let (code, text) = check(&gateway(opcua, "url = \"mqtt://127.0.0.1:1883\""));
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("error at `devices[1].endpoint`: credentials in the URL"),
        "{text}"
    );
    assert!(!text.contains("S3cret"), "{text}");

    let mqtt = "[[devices]]\nid = \"m\"\nprotocol = \"mqtt\"\nurl = \"mqtt://u:pw-in-url@127.0.0.1:1884\"\n";
    let (code, text) = check(&gateway(mqtt, "url = \"mqtt://127.0.0.1:1883\""));
    assert_eq!(code, Some(1), "{text}");
    assert!(!text.contains("pw-in-url"), "{text}");
}

/// Row 9: a NUL in the site passed `check`, then the broker refused every CONNECT.
#[test]
fn control_characters_in_names_are_refused() {
    for (field, value) in [
        ("site", "s\\u0000x"),
        ("area", "a\\u001bx"),
        ("line", "l\\u007f"),
        ("id", "gw\\u0085"),
    ] {
        let g = gateway("", "url = \"mqtt://127.0.0.1:1883\"").replacen(
            &format!("{field} = \""),
            &format!("{field} = \"{value}"),
            1,
        );
        let (code, text) = check(&g);
        assert_eq!(code, Some(1), "{field}: {text}");
        assert!(text.contains(&format!("error at `agent.{field}`")), "{text}");
        assert!(text.contains("control character U+"), "{text}");
    }
}

/// Row 10: a password over plain mqtt:// and an OPC UA user identity over `None` were accepted
/// without a word. Refused, unless the config says so by name.
#[test]
fn credentials_over_unencrypted_channels_need_saying_so() {
    let up = "url = \"mqtt://127.0.0.1:1883\"\nusername = \"gw\"\npassword_env = \"PW\"";
    let (code, text) = check(&gateway("", up));
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("a password over plain mqtt:// crosses the network readable"),
        "{text}"
    );
    let (code, text) = check(&gateway("", &format!("{up}\nallow_insecure_credentials = true")));
    assert_eq!(code, Some(0), "{text}");

    let opcua = "[[devices]]\nid = \"oven\"\nprotocol = \"opcua\"\nendpoint = \"opc.tcp://127.0.0.1:4840\"\n\
                 security_policy = \"None\"\nidentity = \"username\"\nusername = \"op\"\npassword_env = \"PW\"\n\
                 [[devices.tags]]\nname = \"zone1\"\nnode_id = \"ns=2;s=Z1\"\n";
    let (code, text) = check(&gateway(opcua, "url = \"mqtt://127.0.0.1:1883\""));
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("a user identity over security_mode `None` is not encrypted"),
        "{text}"
    );
    let allowed = opcua.replace(
        "password_env = \"PW\"\n",
        "password_env = \"PW\"\nallow_insecure_credentials = true\n",
    );
    let (code, text) = check(&gateway(&allowed, "url = \"mqtt://127.0.0.1:1883\""));
    assert_eq!(code, Some(0), "{text}");
}

/// Row 10: client keys and the site key were permission-checked, password files were not. The
/// real agent now refuses a password file others can read, with the fix.
#[test]
fn a_password_file_others_can_read_is_refused_at_start() {
    let broker = Mosquitto::start(false, "allow_anonymous true");
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("broker.pass");
    std::fs::write(&secret, "s3cret\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = dir.path().join("cfg");
    let up = format!(
        "url = \"mqtt://127.0.0.1:{}\"\nusername = \"gw\"\npassword_file = \"{}\"\nallow_insecure_credentials = true",
        broker.port,
        secret.display()
    );
    write_config(&cfg, &gateway("", &up), &[("p1", PRODUCT)]);
    let mut agent = Agent::start(&cfg, &dir.path().join("data"));
    wait_for("the agent to refuse the password file", Duration::from_secs(15), || {
        !agent.is_running()
    });
    let log = agent.log();
    assert!(log.contains(&format!("chmod 600 {}", secret.display())), "{log}");
    assert!(!log.contains("s3cret"), "{log}");
}
