//! What a central platform ingests, at a real Mosquitto: every product's ODCS data contract as the
//! agent published it, validated by Bitol's ODCS model and `datacontract lint`; one subscription
//! on the catalog index finding every product of three agents with different topic templates; the
//! fleet-unique URN on descriptors, contracts, index entries and messages; and the retained
//! documents of products removed or retired (by a reload, or while the agent was stopped) cleared.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "end-to-end tests: a failure fails the test"
)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Agent C: an enterprise (with a character the URN must encode) and a cell, and a governance
/// file whose template uses both.
fn gateway(broker: u16, modbus: u16) -> String {
    format!(
        r#"
[agent]
id = "gw-cat"
enterprise = "acme:eu"
site = "s1"
area = "a1"
line = "l1"
cell = "c7"
sli_interval = "1s"
metrics_listen = "off"
[upstream]
url = "mqtt://127.0.0.1:{broker}"
protocol = "5"
[buffer]
commit_interval = "50ms"
[[devices]]
id = "plc"
protocol = "modbus_tcp"
address = "127.0.0.1:{modbus}"
poll_interval = "200ms"
  [[devices.tags]]
  name = "counter"
  table = "holding"
  address = 10
  type = "u32"
"#
    )
}

const GOVERNANCE: &str = r#"
topic_template = "{enterprise}/{site}/{cell}/{domain}/{product}/v{major}"
default_classification = "internal"
[classes.internal]
action = "pass"
[egress]
allow_topic_prefixes = ["acme:eu/"]
"#;

fn product(id: &str, status: &str) -> String {
    format!(
        r#"
id = "{id}"
name = "{id}"
version = "1.2.0"
domain = "prod"
owner = "team-{id}"
contact = "{id}@plant.example"
status = "{status}"
on_violation = "drop"
[[fields]]
name = "count"
source = "plc.counter"
unit = "1"
required = true
range = [0, 1e9]
"#
    )
}

/// Runs a validator (`program script args...`) and fails the test with its output unless it passes.
fn must_pass(program: impl AsRef<std::ffi::OsStr>, script: &str, args: &[std::path::PathBuf]) {
    let out = Command::new(program)
        .arg(repo_root().join(script))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The latest payload per topic of everything `sub` received.
fn latest(sub: &Subscriber) -> BTreeMap<String, Value> {
    sub.messages().into_iter().collect()
}

#[test]
fn contracts_validate_with_bitol_tools_and_one_index_filter_finds_every_product() {
    let broker = Mosquitto::start(false, "");
    let modbus = PyModbus::start(&json!({"values": [], "counter": {"address": 10, "period_ms": 50}}));
    let all = Subscriber::start(broker.port, "#", "catalog-all");
    let dir = tempfile::tempdir().unwrap();

    // A: the demo plant (default template, no enterprise).
    let _demo = Command::new(plantmesh_bin())
        .args(["demo", "--broker", &format!("127.0.0.1:{}", broker.port), "--data-dir"])
        .arg(dir.path().join("demo"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(KillOnDrop)
        .unwrap();
    // B: configs/example as shipped, pointed at this broker (its devices are not there: it still
    // announces every product).
    let example = dir.path().join("example");
    copy_dir(&repo_root().join("configs/example"), &example);
    let gw = std::fs::read_to_string(example.join("agent.toml")).unwrap();
    let gw: String = gw
        .lines()
        .filter(|l| {
            !["username", "password_file", "ca_file"]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .map(|l| {
            if l.starts_with("url = ") {
                format!("url = \"mqtt://127.0.0.1:{}\"", broker.port)
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(example.join("agent.toml"), gw).unwrap();
    let key = dir.path().join("site.key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let gov = std::fs::read_to_string(example.join("governance.toml"))
        .unwrap()
        .replace("/etc/plantmesh/site.key", key.to_str().unwrap());
    std::fs::write(example.join("governance.toml"), gov).unwrap();
    let _b = Agent::start(&example, &dir.path().join("data-b"));
    // C: its own template, enterprise and cell; five products for the lifecycle below, one deprecated.
    let cfg = dir.path().join("cfg-c");
    let products = ["stay", "gone", "old", "keep", "later"];
    let files: Vec<(String, String)> = products
        .iter()
        .map(|p| {
            (
                p.to_string(),
                product(p, if *p == "stay" { "deprecated" } else { "active" }),
            )
        })
        .collect();
    let refs: Vec<(&str, &str)> = files.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    write_config(&cfg, &gateway(broker.port, modbus.port), &refs);
    std::fs::write(cfg.join("governance.toml"), GOVERNANCE).unwrap();
    // Product messages of C with their MQTT 5 user properties.
    let mut props = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-V", "mqttv5"])
        .args(["-t", "acme:eu/s1/c7/prod/stay/v1", "-F", "%P"])
        .stdout(Stdio::piped())
        .spawn()
        .map(KillOnDrop)
        .unwrap();
    let props_lines = Lines::default();
    props_lines.follow(props.0.stdout.take().unwrap());
    let data_c = dir.path().join("data-c");
    let mut c = Agent::start(&cfg, &data_c);

    // 6 demo products, 2 of the example, 5 of C: each with a contract and an index entry.
    let expected = 6 + 2 + products.len();
    let count = |suffix: &str| {
        latest(&all)
            .keys()
            .filter(|t| (suffix == "index" && t.starts_with("_plantmesh/catalog/")) || t.ends_with(suffix))
            .count()
    };
    wait_for("every contract and index entry", Duration::from_secs(90), || {
        count("/_contract") >= expected && count("index") >= expected
    });

    // One filter, a late subscriber: every product of every agent, whatever its template.
    let index = retained(broker.port, "_plantmesh/catalog/#");
    assert_eq!(index.len(), expected, "{index:#?}");
    let entries: Vec<Value> = index.iter().map(|(_, p)| serde_json::from_str(p).unwrap()).collect();
    let mut urns: Vec<&str> = entries.iter().map(|e| e["urn"].as_str().unwrap()).collect();
    urns.sort();
    urns.dedup();
    assert_eq!(urns.len(), expected, "URNs are unique in the fleet: {urns:?}");
    for agent in ["gw-demo-01", "gw-press-01", "gw-cat"] {
        assert!(entries.iter().any(|e| e["agent"] == agent), "{agent} in the index");
    }
    let stay = entries.iter().find(|e| e["product"] == "stay").unwrap();
    assert_eq!(stay["urn"], "urn:plantmesh:acme%3Aeu:s1:gw-cat:stay:v1");
    assert_eq!(stay["topics"]["data"], "acme:eu/s1/c7/prod/stay/v1");
    assert_eq!(stay["status"], "deprecated");

    // Every contract as Mosquitto retained it, validated by the standard's own tools.
    let mut contracts = retained(broker.port, "+/+/+/+/+/+/_contract");
    contracts.extend(retained(broker.port, "+/+/+/+/+/_contract"));
    assert_eq!(
        contracts.len(),
        expected,
        "{:?}",
        contracts.iter().map(|c| &c.0).collect::<Vec<_>>()
    );
    let out = dir.path().join("contracts");
    std::fs::create_dir_all(&out).unwrap();
    let mut paths = Vec::new();
    for (i, (topic, payload)) in contracts.iter().enumerate() {
        let doc: Value = serde_json::from_str(payload).unwrap();
        let entry = entries
            .iter()
            .find(|e| e["topics"]["contract"] == topic.as_str())
            .unwrap();
        assert_eq!(doc["id"], entry["urn"], "{topic}");
        let path = out.join(format!("{i}.odcs.json"));
        std::fs::write(&path, payload).unwrap();
        let sha = Command::new("sha256sum").arg(&path).output().unwrap();
        let sha = String::from_utf8(sha.stdout).unwrap();
        assert_eq!(
            entry["contract_sha256"].as_str(),
            sha.split_whitespace().next(),
            "{topic}: the index names this very contract"
        );
        paths.push(path);
    }
    must_pass(python(), "tests/peers/validate_odcs.py", &paths);
    let stay_contract: Value = serde_json::from_str(
        &contracts
            .iter()
            .find(|(t, _)| t == "acme:eu/s1/c7/prod/stay/v1/_contract")
            .unwrap()
            .1,
    )
    .unwrap();
    assert_eq!(stay_contract["status"], "deprecated");
    let count_field = &stay_contract["schema"][0]["properties"][0];
    assert_eq!(count_field["physicalType"], "modbus holding u32 ABCD", "{count_field}");
    assert_eq!(count_field["required"], true, "required under on_violation = drop");
    assert_eq!(
        count_field["quality"].as_array().unwrap().len(),
        2,
        "required and range"
    );

    // The descriptor, the SLI (deprecated is visible in all of them) and every message carry
    // the identity.
    let now = latest(&all);
    let descriptor = &now["acme:eu/s1/c7/prod/stay/v1/_descriptor"];
    assert_eq!(descriptor["urn"], stay["urn"]);
    assert_eq!(descriptor["status"], "deprecated");
    validate_json(
        &repo_root().join("docs/descriptor.schema.json"),
        std::slice::from_ref(descriptor),
    );
    wait_for("an SLI of stay", Duration::from_secs(30), || {
        latest(&all).contains_key("acme:eu/s1/c7/prod/stay/v1/_sli")
    });
    assert_eq!(latest(&all)["acme:eu/s1/c7/prod/stay/v1/_sli"]["status"], "deprecated");
    wait_for("stay's messages", Duration::from_secs(30), || props_lines.len() >= 2);
    assert!(
        props_lines
            .snapshot()
            .iter()
            .all(|l| l.contains("urn:urn:plantmesh:acme%3Aeu:s1:gw-cat:stay:v1")),
        "{:?}",
        props_lines.snapshot()
    );

    // The AsyncAPI document each agent retained validates with the AsyncAPI project's parser, and
    // every message the agents published so far (products, descriptors, contracts, SLIs, gaps,
    // index, status, UNS) validates against the schema its document gives for its channel.
    let mut docs = Vec::new();
    for (site, agent) in [
        ("demo-plant", "gw-demo-01"),
        ("plant1", "gw-press-01"),
        ("s1", "gw-cat"),
    ] {
        let topic = format!("{site}/_agents/{agent}/asyncapi");
        let doc = retained(broker.port, &topic);
        assert_eq!(doc.len(), 1, "{topic} retained");
        let path = out.join(format!("{agent}.asyncapi.json"));
        std::fs::write(&path, &doc[0].1).unwrap();
        docs.push(path);
    }
    let published: Vec<String> = all
        .lines
        .snapshot()
        .iter()
        .filter_map(|l| l.split_once(' '))
        // The demo's simulated flow wrapper publishes on machines/: not the agent.
        .filter(|(t, _)| !t.starts_with("machines/"))
        .map(|(t, p)| serde_json::to_string(&json!([t, p])).unwrap())
        .collect();
    assert!(published.len() > 100, "{}", published.len());
    let jsonl = out.join("messages.jsonl");
    std::fs::write(&jsonl, published.join("\n")).unwrap();
    let args: Vec<std::path::PathBuf> = ["--messages".into(), jsonl].into_iter().chain(docs).collect();
    must_pass("node", "tests/peers/asyncapi/validate.mjs", &args);

    // Lifecycle. A reload: `gone` removed, `old` retired.
    let documents = |p: &str| {
        let base = format!("acme:eu/s1/c7/prod/{p}/v1");
        [
            format!("{base}/_descriptor"),
            format!("{base}/_contract"),
            format!("{base}/_sli"),
            format!("_plantmesh/catalog/acme:eu/s1/gw-cat/{p}.v1"),
        ]
    };
    let left = |p: &str| -> Vec<String> {
        let docs = documents(p);
        let mut at = retained(broker.port, "acme:eu/#");
        at.extend(retained(broker.port, "_plantmesh/catalog/acme:eu/#"));
        at.into_iter().map(|(t, _)| t).filter(|t| docs.contains(t)).collect()
    };
    wait_for("every document of C retained", Duration::from_secs(30), || {
        products.iter().all(|p| left(p).len() == 4)
    });
    std::fs::remove_file(cfg.join("products/gone.toml")).unwrap();
    std::fs::write(cfg.join("products/old.toml"), product("old", "retired")).unwrap();
    let pid = c.child.as_ref().unwrap().id().to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    wait_for("removed and retired products cleared", Duration::from_secs(30), || {
        left("gone").is_empty() && left("old").is_empty()
    });
    // While the agent is stopped: `keep` removed, `later` retired. The next run clears them too.
    assert!(c.stop().success());
    std::fs::remove_file(cfg.join("products/keep.toml")).unwrap();
    std::fs::write(cfg.join("products/later.toml"), product("later", "retired")).unwrap();
    assert_eq!(left("keep").len(), 4, "still retained while the agent is stopped");
    c.restart();
    wait_for(
        "products removed or retired offline cleared",
        Duration::from_secs(30),
        || left("keep").is_empty() && left("later").is_empty(),
    );
    assert_eq!(left("stay").len(), 4, "the product that stays keeps its documents");
    assert!(
        c.log().contains("product no longer in the config drained"),
        "{}",
        c.log()
    );
}

#[test]
fn export_contracts_writes_what_the_agent_would_publish_offline() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(plantmesh_bin())
        .args(["export", "contracts"])
        .arg(dir.path())
        .args(["--config", repo_root().join("configs/example").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let files: Vec<std::path::PathBuf> = String::from_utf8(out.stdout).unwrap().lines().map(Into::into).collect();
    assert_eq!(files.len(), 2, "{files:?}");
    must_pass(python(), "tests/peers/validate_odcs.py", &files);
    let doc: Value = serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).unwrap();
    assert_eq!(doc["kind"], "DataContract");
    assert!(doc["id"]
        .as_str()
        .unwrap()
        .starts_with("urn:plantmesh:_:plant1:gw-press-01:"));
    // A broken config: the problems, and no files.
    let broken = dir.path().join("broken");
    copy_dir(&repo_root().join("configs/example"), &broken);
    std::fs::write(broken.join("agent.toml"), "[agent]\nid = \"x\"\n").unwrap();
    let empty = dir.path().join("none");
    let out = Command::new(plantmesh_bin())
        .args(["export", "contracts"])
        .arg(&empty)
        .args(["--config", broken.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("agent.toml") && err.contains("problem(s) found"), "{err}");
    assert!(!Path::new(&empty).exists());
    // The AsyncAPI document of the same config, offline.
    let out = Command::new(plantmesh_bin())
        .args([
            "export",
            "asyncapi",
            "--config",
            repo_root().join("configs/example").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc = dir.path().join("example.asyncapi.json");
    std::fs::write(&doc, &out.stdout).unwrap();
    must_pass("node", "tests/peers/asyncapi/validate.mjs", &[doc]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["channels"]["press-cycles.v1"]["address"]
        .as_str()
        .unwrap()
        .ends_with("/press-cycles/v1"));
}
