//! The upstream side against a real Mosquitto: TLS and mutual TLS, key-file permissions, the status
//! topic and its will, MQTT 5 user properties, and dead-lettering of messages the broker refuses.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "end-to-end tests: a failure fails the test"
)]

mod common;

use common::*;
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn gateway(broker_port: u16, modbus_port: u16, upstream: &str) -> String {
    format!(
        r#"
[agent]
id = "gw-up"
site = "s1"
area = "a1"
line = "l1"
governance = "builtin-defaults"

[upstream]
url = "{upstream}://127.0.0.1:{broker_port}"
protocol = "5"
reconnect_min = "100ms"
reconnect_max = "500ms"
{{EXTRA}}

[buffer]
commit_interval = "50ms"

[[devices]]
id = "plc"
protocol = "modbus_tcp"
address = "127.0.0.1:{modbus_port}"
poll_interval = "100ms"
  [[devices.tags]]
  name = "counter"
  table = "holding"
  address = 10
  type = "u32"
"#
    )
}

const PRODUCT: &str = r#"
id = "counter"
name = "Counter"
version = "2.1.0"
domain = "test"
owner = "team"
[[fields]]
name = "n"
source = "plc.counter"
"#;

fn counter() -> PyModbus {
    PyModbus::start(&json!({"values": [], "counter": {"address": 10, "period_ms": 20}}))
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A throwaway CA, a server certificate for 127.0.0.1 and a client certificate.
fn pki(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=plantmesh test CA",
        ],
    );
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    for (name, cn) in [("server", "127.0.0.1"), ("client", "gw-up")] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                "san.ext",
            ],
        );
    }
}

#[test]
fn mutual_tls_delivers_and_loose_key_files_are_refused() {
    let modbus = counter();
    let certs = tempfile::tempdir().unwrap();
    pki(certs.path());
    let c = certs.path().display();
    let tls_port = free_port();
    // Plain listener for the test's subscriber, TLS listener requiring a client certificate for the agent.
    let broker = Mosquitto::start(
        false,
        &format!("allow_anonymous true\nlistener {tls_port} 127.0.0.1\ncafile {c}/ca.pem\ncertfile {c}/server.pem\nkeyfile {c}/server.key\nrequire_certificate true\n"),
    );
    let sub = Subscriber::start(broker.port, "s1/#", "tls-sub");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg");
    let key = certs.path().join("client.key");
    let tls = format!(
        "ca_file = \"{c}/ca.pem\"\ncert_file = \"{c}/client.pem\"\nkey_file = \"{}\"",
        key.display()
    );
    write_config(
        &cfg,
        &gateway(tls_port, modbus.port, "mqtts").replace("{EXTRA}", &tls),
        &[("counter", PRODUCT)],
    );

    // A key readable by others: refused at start, with the fix in the message.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut agent = Agent::start(&cfg, &dir.path().join("data"));
    wait_for("the agent to refuse the key", Duration::from_secs(10), || {
        !agent.is_running()
    });
    assert!(
        agent.log().contains(&format!("chmod 600 {}", key.display())),
        "{}",
        agent.log()
    );

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut agent = Agent::start(&cfg, &dir.path().join("data"));
    wait_for("messages over mutual TLS", Duration::from_secs(30), || {
        sub.product_messages().len() >= 3
    });
    // The platform's reader over the same TLS listener, with its own client certificate: the
    // catalog lists the product (docs/fleet.md).
    let out = Command::new(plantmesh_bin())
        .args([
            "catalog",
            "--json",
            "--broker",
            &format!("mqtts://127.0.0.1:{tls_port}"),
        ])
        .arg("--ca-file")
        .arg(certs.path().join("ca.pem"))
        .arg("--cert-file")
        .arg(certs.path().join("client.pem"))
        .arg("--key-file")
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "catalog over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["products"].as_array().unwrap().len(), 1, "{doc}");
    assert_eq!(doc["products"][0]["online"], true, "{doc}");
    agent.stop();
    assert!(
        broker.log().contains("gw-up"),
        "the broker saw the client certificate's connection"
    );
}

#[test]
fn status_is_retained_with_a_will_and_v5_carries_identity_properties() {
    let modbus = counter();
    let broker = Mosquitto::start(false, "");
    let status = Subscriber::start(broker.port, "s1/_agents/#", "status-sub");
    // A v5 subscriber printing user properties.
    let mut props = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port.to_string(),
            "-V",
            "mqttv5",
            "-t",
            "s1/a1/l1/test/counter/v2",
            "-F",
            "%P",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let props_lines = Lines::default();
    props_lines.follow(props.stdout.take().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg");
    write_config(
        &cfg,
        &gateway(broker.port, modbus.port, "mqtt").replace("{EXTRA}", ""),
        &[("counter", PRODUCT)],
    );
    let mut agent = Agent::start(&cfg, &dir.path().join("data"));
    wait_for("online status", Duration::from_secs(30), || {
        status.messages().iter().any(|(_, v)| v["state"] == "online")
    });
    wait_for("user properties", Duration::from_secs(30), || props_lines.len() >= 2);
    agent.sigkill();
    wait_for("the will: offline", Duration::from_secs(30), || {
        status.messages().iter().any(|(_, v)| v["state"] == "offline")
    });
    let _ = props.kill();
    let _ = props.wait();
    let (topic, online) = status
        .messages()
        .into_iter()
        .find(|(_, v)| v["state"] == "online")
        .unwrap();
    assert_eq!(topic, "s1/_agents/gw-up/status");
    assert_eq!(online["agent"], "gw-up");
    let epoch = online["epoch"].as_u64().unwrap();
    assert_eq!(Some(epoch), agent.epoch(), "the epoch of this start");
    assert!(online["config_hash"].as_str().unwrap().len() == 16);
    let line = props_lines.snapshot()[0].clone();
    for want in [
        "product:counter",
        "version:2.1.0",
        &format!("epoch:{epoch}"),
        "historical:false",
    ] {
        assert!(line.contains(want), "user properties {line:?} lack {want}");
    }
    // The descriptor is retained: a late subscriber still gets it.
    let late = Subscriber::start(broker.port, "s1/a1/l1/test/counter/v2/_descriptor", "late-sub");
    wait_for("the retained descriptor", Duration::from_secs(10), || {
        !late.messages().is_empty()
    });
    let d = &late.messages()[0].1;
    assert_eq!(
        (d["id"].as_str(), d["version"].as_str(), d["domain"].as_str()),
        (Some("counter"), Some("2.1.0"), Some("test"))
    );
    assert_eq!(d["schema"][0]["properties"][0]["lineage"]["address"], 10);
}

#[test]
fn messages_the_broker_refuses_are_dead_lettered_and_reported() {
    let modbus = counter();
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl");
    // Anonymous clients may write status, descriptors and gaps, but not the product topic.
    std::fs::write(&acl, "topic readwrite s1/_agents/#\ntopic readwrite s1/a1/l1/test/counter/v2/_descriptor\ntopic readwrite s1/a1/l1/test/counter/v2/_gaps\n").unwrap();
    let broker = Mosquitto::start(false, &format!("allow_anonymous true\nacl_file {}", acl.display()));
    let gaps = Subscriber::start(broker.port, "s1/a1/l1/test/counter/v2/_gaps", "gap-sub");
    let cfg = dir.path().join("cfg");
    write_config(
        &cfg,
        &gateway(broker.port, modbus.port, "mqtt").replace("{EXTRA}", ""),
        &[("counter", PRODUCT)],
    );
    let mut agent = Agent::start(&cfg, &dir.path().join("data"));
    wait_for("gap events for refused messages", Duration::from_secs(30), || {
        gaps.messages().len() >= 2
    });
    agent.stop();
    let (_, g) = gaps.messages()[0].clone();
    assert_eq!(g["reason"], "broker_rejected_0x87");
    assert_eq!(g["product"], "counter");
    assert!(g["count"].as_u64().unwrap() >= 1);
    assert!(agent.log().contains("dead-lettered"), "{}", agent.log());
    // Dead-lettered messages are not pending (never counted as delivered, never retried).
    let left = agent.export();
    let refused: Vec<u64> = gaps
        .messages()
        .iter()
        .map(|(_, g)| g["from_seq"].as_u64().unwrap())
        .collect();
    assert!(left.iter().all(|m| !refused.contains(&m["seq"].as_u64().unwrap())));
    let stats = Command::new(plantmesh_bin())
        .args(["buffer", "stats", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    let stats = String::from_utf8_lossy(&stats.stdout).to_string();
    assert!(stats.contains("dropped counter.v2 (broker_rejected_0x87)"), "{stats}");
}

#[test]
fn a_document_over_the_brokers_packet_limit_is_refused_and_data_still_flows() {
    // Mosquitto announces `max_packet_size` in its CONNACK (MQTT 5). The product's contract is
    // larger than that, its data messages are not: the contract must be refused on our side
    // (sending it would make the broker close the connection), and the session must go on rather
    // than fail on the same packet after every reconnect.
    let modbus = counter();
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(false, "allow_anonymous true\nmax_packet_size 1400");
    let data = Subscriber::start(broker.port, "s1/a1/l1/test/counter/v2", "data-sub");
    let cfg = dir.path().join("cfg");
    write_config(
        &cfg,
        &gateway(broker.port, modbus.port, "mqtt").replace("{EXTRA}", ""),
        &[("counter", PRODUCT)],
    );
    let mut agent = Agent::start(&cfg, &dir.path().join("data"));
    wait_for("data messages", Duration::from_secs(30), || data.messages().len() >= 5);
    std::thread::sleep(Duration::from_secs(1));
    agent.stop();
    let log = agent.log();
    // The product's ODCS contract (and the agent's AsyncAPI document) are over 1,400 bytes.
    let refused = log
        .lines()
        .find(|l| l.contains("over the broker's packet limit") && l.contains("counter/v2/_contract"));
    assert!(refused.is_some(), "{log}");
    assert_eq!(
        log.matches("connected upstream").count(),
        1,
        "one session throughout:\n{log}"
    );
    assert!(!log.contains("upstream connection lost"), "{log}");
}

#[test]
fn password_from_a_file_authenticates() {
    let modbus = counter();
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    let out = Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&passwd)
        .args(["gw-up", "s3cret pass"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let broker = Mosquitto::start(
        false,
        &format!("allow_anonymous false\npassword_file {}", passwd.display()),
    );
    let sub = Subscriber::start_with(broker.port, "s1/#", "auth-sub", &["-u", "gw-up", "-P", "s3cret pass"]);
    let secret = dir.path().join("broker.pass");
    std::fs::write(&secret, "s3cret pass\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = dir.path().join("cfg");
    // Plain MQTT on loopback in a test: the password may cross it, and the config says so.
    let extra = format!(
        "username = \"gw-up\"\npassword_file = \"{}\"\nallow_insecure_credentials = true",
        secret.display()
    );
    write_config(
        &cfg,
        &gateway(broker.port, modbus.port, "mqtt").replace("{EXTRA}", &extra),
        &[("counter", PRODUCT)],
    );
    let mut agent = Agent::start(&cfg, &dir.path().join("data"));
    wait_for("authenticated delivery", Duration::from_secs(30), || {
        sub.product_messages().len() >= 3
    });
    agent.stop();
    assert!(!agent.log().contains("s3cret"), "the password must never be logged");
}

/// A gateway with many products queues a descriptor per product (and, for Sparkplug, a DBIRTH) at
/// every connect, beyond the in-flight window: the connection takes them all and keeps running.
#[test]
fn a_gateway_with_hundreds_of_products_connects_and_announces_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(false, "");
    let cfg = dir.path().join("cfg");
    let products: Vec<(String, String)> = (0..150)
        .map(|i| {
            (
                format!("m{i}"),
                format!(
                    "id = \"m{i}\"\nname = \"machine {i}\"\nversion = \"1.0.0\"\ndomain = \"bench\"\nowner = \"o\"\n\
                     [[fields]]\nname = \"temp\"\nsource = \"machines.m{i}_temp\"\nunit = \"Cel\"\n"
                ),
            )
        })
        .collect();
    for encoding in ["json", "sparkplug"] {
        let expected = 150;
        let gateway = format!(
            r#"
[agent]
id = "gw-many-{encoding}"
site = "s1"
area = "a1"
line = "l1"
governance = "builtin-defaults"
metrics_listen = "127.0.0.1:0"
[upstream]
url = "mqtt://127.0.0.1:{port}"
max_inflight = 8
encoding = "{encoding}"
[[devices]]
id = "machines"
protocol = "mqtt"
url = "mqtt://127.0.0.1:{port}"
  [[devices.tags]]
  name = "{{m}}_temp"
  topic = "many/+m/state"
  pointer = "/temp"
"#,
            port = broker.port
        );
        let _ = std::fs::remove_dir_all(&cfg);
        let refs: Vec<(&str, &str)> = products.iter().map(|(n, t)| (n.as_str(), t.as_str())).collect();
        write_config(&cfg, &gateway, &refs);
        // Descriptors (JSON) or DBIRTHs (Sparkplug, read by the protobuf decoder), by topic.
        let (sub, host) = if encoding == "json" {
            let sub = Subscriber::start(broker.port, "s1/a1/l1/bench/+/v1/_descriptor", "many-json");
            (Some(sub), None)
        } else {
            (
                None,
                Some(SparkplugPeer::decoder(broker.port, "spBv1.0/s1/DBIRTH/#", "many-sp")),
            )
        };
        let mut agent = Agent::start(&cfg, &dir.path().join(format!("data-{encoding}")));
        let announced = || {
            let mut topics: Vec<String> = match (&sub, &host) {
                (Some(s), _) => s.messages().into_iter().map(|(t, _)| t).collect(),
                (_, Some(h)) => h
                    .messages()
                    .iter()
                    .map(|m| m["topic"].as_str().unwrap().to_string())
                    .collect(),
                _ => unreachable!(),
            };
            topics.sort();
            topics.dedup();
            topics.len()
        };
        wait_for(
            &format!("{expected} announcements ({encoding})"),
            Duration::from_secs(30),
            || announced() >= expected,
        );
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            agent.is_running(),
            "{encoding}: the agent survived its connect burst\n{}",
            agent.log()
        );
        agent.stop();
    }
}

/// The connection storm: a connect in progress is never abandoned for another. Through a TCP proxy
/// that counts connections, across broker restarts and refused attempts, exactly one connection is
/// made per connection attempt the agent reports: one per successful reconnect, one per refusal.
#[test]
fn one_tcp_connection_per_connection_attempt() {
    let modbus = counter();
    let mut broker = Mosquitto::start(false, "");
    let proxy = Proxy::start(broker.port);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg");
    write_config(
        &cfg,
        &gateway(proxy.port, modbus.port, "mqtt").replace("{EXTRA}", ""),
        &[("counter", PRODUCT)],
    );
    let mut agent = Agent::start(&cfg, &dir.path().join("data"));
    let count = |agent: &Agent, what: &str| agent.log().matches(what).count();
    wait_for("the first connection", Duration::from_secs(30), || {
        count(&agent, "connected upstream") == 1
    });
    for round in 1..=3 {
        broker.stop();
        wait_for("the loss", Duration::from_secs(30), || {
            count(&agent, "upstream connection lost") == round
        });
        // Refused attempts meanwhile (backoff 100-500 ms).
        std::thread::sleep(Duration::from_millis(1500));
        broker.restart();
        wait_for("the reconnect", Duration::from_secs(30), || {
            count(&agent, "connected upstream") == round + 1
        });
    }
    std::thread::sleep(Duration::from_secs(1));
    let log = agent.log();
    let (accepted, forwarded) = proxy.counts();
    agent.stop();
    let successes = log.matches("connected upstream").count();
    let refused = log.matches("upstream connect failed").count() - log.matches("upstream connection lost").count();
    assert!(refused >= 3, "{log}");
    assert_eq!(
        (accepted, forwarded),
        (successes + refused, successes),
        "TCP connections (accepted, reaching the broker) against {successes} connects and {refused} refusals"
    );
}

/// `online` is published on the connection that stays: a subscriber arriving after every start
/// sees the retained status `online`, and each start makes one connection, not one that the broker
/// drops (publishing the will, `offline`) and another.
#[test]
fn the_retained_status_after_every_start_is_online() {
    let starts: usize = env_or("PLANTMESH_STATUS_STARTS", 50);
    let modbus = counter();
    let broker = Mosquitto::start(false, "");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg");
    write_config(
        &cfg,
        &gateway(broker.port, modbus.port, "mqtt").replace("{EXTRA}", ""),
        &[("counter", PRODUCT)],
    );
    let retained = || {
        let out = Command::new("mosquitto_sub")
            .args([
                "-p",
                &broker.port.to_string(),
                "-t",
                "s1/_agents/gw-up/status",
                "-C",
                "1",
                "-W",
                "5",
            ])
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .map(|v| v["state"].clone())
            .ok()
    };
    for start in 0..starts {
        let mut agent = Agent::start(&cfg, &dir.path().join("data"));
        wait_for("the connection", Duration::from_secs(30), || {
            agent.log().contains("connected upstream")
        });
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(retained(), Some(json!("online")), "start {start}:\n{}", agent.log());
        assert_eq!(
            agent.log().matches("connected upstream").count(),
            1,
            "start {start}:\n{}",
            agent.log()
        );
        // A crash: the broker publishes the will.
        agent.sigkill();
        wait_for("the will", Duration::from_secs(30), || {
            retained() == Some(json!("offline"))
        });
    }
}
