//! OPC UA (python asyncua server) -> plantmesh -> Mosquitto, with the real binary.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "end-to-end tests: a failure fails the test"
)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const NS: &str = "urn:plantmesh:test";

fn gateway(broker_port: u16, devices: &str) -> String {
    format!(
        r#"
[agent]
id = "gw-ua"
site = "s1"
area = "a1"
line = "l1"
governance = "builtin-defaults"

[upstream]
url = "mqtt://127.0.0.1:{broker_port}"
protocol = "5"
reconnect_min = "100ms"
reconnect_max = "500ms"

[buffer]
commit_interval = "50ms"
{devices}
"#
    )
}

fn product(id: &str, fields: &[(String, String)]) -> String {
    let mut s = format!("id = \"{id}\"\nname = \"{id}\"\nversion = \"1.0.0\"\ndomain = \"quality\"\nowner = \"lab\"\n");
    for (name, source) in fields {
        s += &format!("[[fields]]\nname = \"{name}\"\nsource = \"{source}\"\n");
    }
    s
}

/// (OPC UA type, value given to the server, JSON expected upstream, array)
fn cases() -> Vec<(&'static str, Value, Value, bool)> {
    vec![
        ("Boolean", json!(true), json!(true), false),
        ("SByte", json!(-5), json!(-5), false),
        ("Byte", json!(200), json!(200), false),
        ("Int16", json!(-30000), json!(-30000), false),
        ("UInt16", json!(60000), json!(60000), false),
        ("Int32", json!(-2_000_000_000), json!(-2_000_000_000), false),
        ("UInt32", json!(4_000_000_000u32), json!(4_000_000_000u32), false),
        (
            "Int64",
            json!(-9_000_000_000_000i64),
            json!(-9_000_000_000_000i64),
            false,
        ),
        (
            "UInt64",
            json!(18_000_000_000_000_000_000u64),
            json!(18_000_000_000_000_000_000u64),
            false,
        ),
        ("Float", json!(1.5), json!(1.5), false),
        ("Double", json!(2.25e100), json!(2.25e100), false),
        ("String", json!("Ofen 1 — Zone ä"), json!("Ofen 1 — Zone ä"), false),
        (
            "DateTime",
            json!("2026-11-21T10:00:00.123+00:00"),
            json!("2026-11-21T10:00:00.123Z"),
            false,
        ),
        ("ByteString", json!([1, 2, 3]), json!("AQID"), false),
        (
            "Guid",
            json!("72962b91-fa75-4ae6-8d28-b404dc7daf63"),
            json!("72962b91-fa75-4ae6-8d28-b404dc7daf63"),
            false,
        ),
        ("LocalizedText", json!("Hallo"), json!("Hallo"), false),
        ("Int32", json!([1, 2, 3]), json!([1, 2, 3]), true),
        ("Double", json!([0.5, 1.5]), json!([0.5, 1.5]), true),
        ("String", json!(["a", "b"]), json!(["a", "b"]), true),
    ]
}

fn var_name(ty: &str, array: bool) -> String {
    if array {
        format!("{ty}Array")
    } else {
        ty.to_string()
    }
}

#[test]
fn every_type_arrives_and_a_bad_node_id_spoils_only_its_tag() {
    let vars: Vec<Value> = cases()
        .iter()
        .map(|(ty, v, _, array)| json!({"name": var_name(ty, *array), "type": ty, "value": v, "array": array}))
        .collect();
    let server = PyOpcUa::start(&json!({"namespace": NS, "security": "none", "variables": vars}));
    let broker = Mosquitto::start(false, "");
    let sub = Subscriber::start(broker.port, "s1/#", "ua-types-sub");
    let mut devices = String::new();
    for (id, mode) in [("oven", "subscription"), ("oven-polled", "polling")] {
        devices += &format!(
            "[[devices]]\nid = \"{id}\"\nprotocol = \"opcua\"\nendpoint = \"{}\"\nsecurity_policy = \"None\"\n\
             publishing_interval = \"200ms\"\npoll_interval = \"300ms\"\nmode = \"{mode}\"\n",
            server.endpoint()
        );
        for (ty, _, _, array) in cases() {
            let name = var_name(ty, array);
            devices += &format!(
                "[[devices.tags]]\nname = \"{name}\"\nnode_id = \"s={name}\"\nnamespace_uri = \"{NS}\"\ntype = \"{ty}\"\narray = {array}\n"
            );
        }
        devices += "[[devices.tags]]\nname = \"Missing\"\nnode_id = \"s=DoesNotExist\"\nnamespace_uri = \"urn:plantmesh:test\"\n";
    }
    let mut names: Vec<String> = cases().iter().map(|(ty, _, _, a)| var_name(ty, *a)).collect();
    names.push("Missing".into());
    let fields = |dev: &str| {
        names
            .iter()
            .map(|n| (n.clone(), format!("{dev}.{n}")))
            .collect::<Vec<_>>()
    };
    let dir = tempfile::tempdir().unwrap();
    write_config(
        &dir.path().join("cfg"),
        &gateway(broker.port, &devices),
        &[
            ("sub", &product("ua-sub", &fields("oven"))),
            ("poll", &product("ua-poll", &fields("oven-polled"))),
        ],
    );
    let mut agent = Agent::start(&dir.path().join("cfg"), &dir.path().join("data"));
    let complete = |p: &str| {
        sub.product_messages()
            .into_iter()
            .filter(|m| m["product"] == p)
            .flat_map(|m| m["records"].as_array().unwrap().clone())
            .find(|r| {
                cases()
                    .iter()
                    .all(|(ty, _, _, a)| r["quality"][var_name(ty, *a)] == "good")
                    && r["quality"]["Missing"] != "bad:no_value"
            })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(complete("ua-sub").is_some() && complete("ua-poll").is_some()) {
        if Instant::now() > deadline {
            for m in sub.product_messages().iter().rev().take(2) {
                eprintln!("last message: {m}");
            }
            panic!("no complete records from both devices");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.stop();
    assert!(
        agent.log().contains("OPC UA security is None"),
        "the None warning is logged at start"
    );
    for p in ["ua-sub", "ua-poll"] {
        let r = complete(p).unwrap();
        for (ty, _, want, array) in cases() {
            assert_eq!(r["fields"][var_name(ty, array)], want, "{p}: {ty} (array: {array})");
        }
        assert_eq!(r["fields"]["Missing"], Value::Null);
        assert_eq!(r["quality"]["Missing"], "bad:opcua_BadNodeIdUnknown", "{p}");
    }
}

fn counter_device(server: &PyOpcUa, extra: &str) -> String {
    format!(
        "[[devices]]\nid = \"oven\"\nprotocol = \"opcua\"\nendpoint = \"{}\"\npublishing_interval = \"200ms\"\n{extra}\n\
         [[devices.tags]]\nname = \"counter\"\nnode_id = \"s=Counter\"\nnamespace_uri = \"{NS}\"\ntype = \"Int64\"\n",
        server.endpoint()
    )
}

fn counters(sub: &Subscriber) -> Vec<(String, i64)> {
    sub.product_messages()
        .iter()
        .flat_map(|m| m["records"].as_array().unwrap().clone())
        .filter_map(|r| Some((r["ts"].as_str()?.to_string(), r["fields"]["counter"].as_i64()?)))
        .collect()
}

#[test]
fn sign_and_encrypt_by_default_and_untrusted_servers_are_refused_until_trusted() {
    let pki = tempfile::tempdir().unwrap();
    let server = PyOpcUa::start(&json!({"namespace": NS, "security": "encrypt", "pki": pki.path(), "counter_ms": 100}));
    let broker = Mosquitto::start(false, "");
    let sub = Subscriber::start(broker.port, "s1/#", "ua-sec-sub");
    let dir = tempfile::tempdir().unwrap();
    // No security settings: the default is Aes256_Sha256_RsaPss with SignAndEncrypt.
    write_config(
        &dir.path().join("cfg"),
        &gateway(broker.port, &counter_device(&server, "")),
        &[("p", &product("ua-sec", &[("counter".into(), "oven.counter".into())]))],
    );
    let data = dir.path().join("data");
    let mut agent = Agent::start(&dir.path().join("cfg"), &data);
    // The server's certificate is unknown: refused, stored in rejected/, with the command to trust it.
    let rejected = data.join("pki/rejected");
    wait_for("the server certificate in rejected/", Duration::from_secs(30), || {
        std::fs::read_dir(&rejected).map(|d| d.count() > 0).unwrap_or(false)
    });
    wait_for("the trust command in the log", Duration::from_secs(30), || {
        agent.log().contains("trust it with: mv ")
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(counters(&sub).is_empty(), "no data may flow from an untrusted server");
    let own = data.join("pki/own/cert.der");
    assert!(
        own.exists(),
        "the application instance certificate is created in the data directory"
    );
    let der = std::fs::read(&own).unwrap();
    assert!(
        der.windows(b"urn:plantmesh:s1:gw-ua".len())
            .any(|w| w == b"urn:plantmesh:s1:gw-ua"),
        "certificate carries the ApplicationUri"
    );

    // Trust it exactly as the log says.
    let file = std::fs::read_dir(&rejected).unwrap().next().unwrap().unwrap().path();
    let cmd = format!("mv '{}' '{}/'", file.display(), data.join("pki/trusted").display());
    assert!(agent.log().contains(&cmd), "the log gives the command {cmd}");
    let status = std::process::Command::new("sh").arg("-c").arg(&cmd).status().unwrap();
    assert!(status.success(), "{cmd}");
    wait_for("data over the encrypted session", Duration::from_secs(60), || {
        counters(&sub).len() >= 3
    });
    agent.stop();
    assert!(
        agent.log().contains("policy=Aes256_Sha256_RsaPss mode=SignAndEncrypt"),
        "{}",
        agent.log()
    );
}

#[test]
fn server_restarts_resume_data_with_one_fresh_subscription() {
    let mut server = PyOpcUa::start(&json!({"namespace": NS, "security": "none", "counter_ms": 100}));
    let broker = Mosquitto::start(false, "");
    let sub = Subscriber::start(broker.port, "s1/#", "ua-restart-sub");
    let dir = tempfile::tempdir().unwrap();
    write_config(
        &dir.path().join("cfg"),
        &gateway(broker.port, &counter_device(&server, "security_policy = \"None\"")),
        &[(
            "p",
            &product("ua-restart", &[("counter".into(), "oven.counter".into())]),
        )],
    );
    let mut agent = Agent::start(&dir.path().join("cfg"), &dir.path().join("data"));
    wait_for("data", Duration::from_secs(30), || counters(&sub).len() >= 5);
    for round in 0..3 {
        server.kill();
        std::thread::sleep(Duration::from_millis(500));
        server.restart();
        let back = Instant::now();
        let ready = agent::model::format_rfc3339_millis(agent::model::now_millis());
        // Values stamped after the restarted server came up can only come from a new subscription.
        wait_for("data after the restart", Duration::from_secs(30), || {
            counters(&sub).iter().any(|(ts, _)| *ts > ready)
        });
        let resumed = back.elapsed();
        // Within twice the publishing interval plus the backoff the agent was in when the server came
        // back (the last `retry_in` it logged), with 1 s of slack for a loaded CI machine.
        let backoff = last_retry_in(&agent.log()).unwrap_or_default();
        let bound = backoff + 2 * Duration::from_millis(200) + Duration::from_secs(1);
        assert!(
            resumed <= bound,
            "round {round}: data resumed after {resumed:?}; bound {bound:?} (backoff {backoff:?})"
        );
        eprintln!("round {round}: data resumed {resumed:?} after the server was back");
        wait_for(
            "one subscription and one session on the server",
            Duration::from_secs(10),
            || server.counts() == Some((1, 1)),
        );
        // ...and it stays that way: no duplicate subscription or session turns up later.
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(
            server.counts(),
            Some((1, 1)),
            "round {round}: exactly one subscription and one session on the server"
        );
    }
    agent.stop();
}

#[test]
fn discover_lists_every_variable_with_its_type_as_pasteable_config() {
    let mut vars: Vec<Value> = cases()
        .iter()
        .map(|(ty, v, _, array)| json!({"name": var_name(ty, *array), "type": ty, "value": v, "array": array}))
        .collect();
    vars.truncate(cases().len());
    // 30 folders x 200 variables: 6,000 variables plus the typed ones, more than one Browse response holds.
    let server = PyOpcUa::start(&json!({"namespace": NS, "security": "none", "variables": vars, "tree": [30, 200]}));
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(plantmesh_bin())
        .args([
            "discover",
            &server.endpoint(),
            "--security-policy",
            "None",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("variables found"), "progress on stderr: {stderr}");
    let proposal = String::from_utf8(out.stdout).unwrap();
    // Every typed variable with its type (and arrays marked).
    for (ty, _, _, array) in cases() {
        let name = var_name(ty, array);
        let block = proposal
            .split("[[devices.tags]]")
            .find(|b| b.contains(&format!("name = \"Plant_{name}\"")))
            .unwrap_or_else(|| panic!("{name} missing"));
        assert!(
            block.contains(&format!("node_id = \"s={name}\"")) && block.contains(&format!("namespace_uri = \"{NS}\"")),
            "{block}"
        );
        assert!(block.contains(&format!("type = \"{ty}\"")), "{name}: {block}");
        assert_eq!(block.contains("array = true"), array, "{name}: {block}");
    }
    // Every variable of the tree.
    for f in 0..30 {
        for i in 0..200 {
            assert!(
                proposal.contains(&format!("node_id = \"s=Area{f}.Tag{i}\"")),
                "Area{f}.Tag{i} missing"
            );
        }
    }
    // Ready to paste: with an [agent] section it is a valid gateway file.
    let cfg = dir.path().join("cfg");
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::write(
        cfg.join("agent.toml"),
        format!("[agent]\nid = \"g\"\nsite = \"s\"\narea = \"a\"\nline = \"l\"\ngovernance = \"builtin-defaults\"\n\n{proposal}"),
    )
    .unwrap();
    let check = std::process::Command::new(plantmesh_bin())
        .arg("check")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
}

#[test]
fn username_identity_with_a_password_from_the_environment() {
    let server = PyOpcUa::start(
        &json!({"namespace": NS, "security": "none", "counter_ms": 100, "users": {"operator": "s3cret"}}),
    );
    let broker = Mosquitto::start(false, "");
    let sub = Subscriber::start(broker.port, "s1/#", "ua-user-sub");
    let identity = "security_policy = \"None\"\nidentity = \"username\"\nusername = \"operator\"\npassword_env = \"PLANTMESH_TEST_UA_PASSWORD\"\nallow_insecure_credentials = true";
    let dir = tempfile::tempdir().unwrap();
    write_config(
        &dir.path().join("cfg"),
        &gateway(broker.port, &counter_device(&server, identity)),
        &[("p", &product("ua-user", &[("counter".into(), "oven.counter".into())]))],
    );
    // A wrong password: the server refuses the session, nothing flows, and the agent keeps trying.
    let mut agent = Agent::start_with_env(
        &dir.path().join("cfg"),
        &dir.path().join("data"),
        &[("PLANTMESH_TEST_UA_PASSWORD", "wrong")],
    );
    wait_for("the refusal in the log", Duration::from_secs(30), || {
        agent.log().contains("OPC UA session ended")
    });
    assert!(counters(&sub).is_empty());
    assert!(agent.is_running());
    agent.stop();
    assert!(!agent.log().contains("wrong"), "the password must never be logged");
    // The right one.
    let mut agent = Agent::start_with_env(
        &dir.path().join("cfg"),
        &dir.path().join("data2"),
        &[("PLANTMESH_TEST_UA_PASSWORD", "s3cret")],
    );
    wait_for("data for the authenticated user", Duration::from_secs(30), || {
        counters(&sub).len() >= 3
    });
    agent.stop();
}

/// The last reconnect backoff the agent logged (`retry_in=742ms` / `retry_in=1.5s`).
fn last_retry_in(log: &str) -> Option<Duration> {
    let v = log.rsplit("retry_in=").next().filter(|_| log.contains("retry_in="))?;
    let token: String = v.chars().take_while(|c| !c.is_whitespace()).collect();
    let (num, scale) = if let Some(n) = token.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = token.strip_suffix("µs") {
        (n, 1e-6)
    } else {
        (token.strip_suffix('s')?, 1.0)
    };
    Some(Duration::from_secs_f64(num.parse::<f64>().ok()? * scale))
}

#[test]
fn connection_errors_say_what_happened_and_what_to_do() {
    let mut server = PyOpcUa::start(&json!({"namespace": NS, "security": "none", "counter_ms": 100}));
    let dir = tempfile::tempdir().unwrap();
    let endpoint = server.endpoint();
    let discover = |extra: &[&str]| {
        let out = std::process::Command::new(plantmesh_bin())
            .arg("discover")
            .arg(&endpoint)
            .args(extra)
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    // The secure default against a server that offers only None: what it offers, the flags that
    // select it, and what None means.
    let (ok, stderr) = discover(&[]);
    assert!(!ok, "{stderr}");
    for want in [
        "offers no endpoint with Aes256_Sha256_RsaPss / SignAndEncrypt",
        "it offers: None / None",
        "--security-policy None --security-mode None",
        "neither signed nor encrypted",
    ] {
        assert!(stderr.contains(want), "`{want}` missing: {stderr}");
    }
    assert!(!stderr.contains("BadTcpEndpointUrlInvalid"), "{stderr}");
    // A server that is down is a refused connection, from discover and from the agent's source.
    server.kill();
    let (ok, stderr) = discover(&["--security-policy", "None"]);
    assert!(
        !ok && stderr.contains("connection refused (nothing listens there"),
        "{stderr}"
    );
    let broker = Mosquitto::start(false, "");
    write_config(
        &dir.path().join("cfg"),
        &gateway(broker.port, &counter_device(&server, "security_policy = \"None\"")),
        &[("p", &product("ua-down", &[("counter".into(), "oven.counter".into())]))],
    );
    let mut agent = Agent::start(&dir.path().join("cfg"), &dir.path().join("data"));
    wait_for("the source's reason", Duration::from_secs(20), || {
        agent.log().contains("connection refused (nothing listens there")
    });
    assert!(!agent.log().contains("no matching endpoint"), "{}", agent.log());
    agent.stop();
}
