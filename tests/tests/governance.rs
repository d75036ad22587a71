//! Governance at the edge, end to end: pymodbus -> plantmesh -> Mosquitto.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "end-to-end tests: a failure fails the test"
)]

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;

const GOVERNANCE: &str = r#"
default_classification = "internal"
pseudonymise_key_file = "site.key"
[classes.internal]
action = "pass"
[classes.personal]
action = "pseudonymise"
[classes.restricted]
action = "never"
[egress]
allow_topic_prefixes = ["s1/"]
"#;

fn gateway(broker_port: u16, modbus_port: u16) -> String {
    format!(
        r#"
[agent]
id = "gw-gov"
site = "s1"
area = "a1"
line = "l1"
[upstream]
url = "mqtt://127.0.0.1:{broker_port}"
protocol = "5"
reconnect_min = "100ms"
reconnect_max = "500ms"
[buffer]
commit_interval = "50ms"
[[devices]]
id = "plc"
protocol = "modbus_tcp"
address = "127.0.0.1:{modbus_port}"
poll_interval = "200ms"
  [[devices.tags]]
  name = "badge"
  table = "holding"
  address = 0
  type = "string"
  length = 4
  [[devices.tags]]
  name = "temp"
  table = "holding"
  address = 10
  type = "f32"
  [[devices.tags]]
  name = "recipe"
  table = "holding"
  address = 20
  type = "f32"
  [[devices.tags]]
  name = "pressure"
  table = "holding"
  address = 30
  type = "f32"
"#
    )
}

const PRODUCT: &str = r#"
id = "press"
name = "Press"
version = "1.0.0"
domain = "production"
owner = "team"
[[fields]]
name = "operator"
source = "plc.badge"
classification = "personal"
[[fields]]
name = "temp"
source = "plc.temp"
range = [0.0, 400.0]
[[fields]]
name = "recipe_setpoint"
source = "plc.recipe"
classification = "restricted"
[[fields]]
name = "pressure"
source = "plc.pressure"
action = "coarsen"
step = 10.0
"#;

fn modbus() -> PyModbus {
    PyModbus::start(&json!({"values": [
        {"table": "holding", "address": 0, "type": "string", "length": 4, "value": "OP-0042"},
        {"table": "holding", "address": 10, "type": "f32", "value": 999.0},
        {"table": "holding", "address": 20, "type": "f32", "value": 777.125},
        {"table": "holding", "address": 30, "type": "f32", "value": 123.5},
    ]}))
}

fn write_key(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let key = dir.join("site.key");
    std::fs::write(&key, b"0123456789abcdef0123456789abcdef-test-site-secret").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn what_leaves_is_what_governance_allows() {
    let modbus = modbus();
    let broker = Mosquitto::start(false, "");
    let sub = Subscriber::start(broker.port, "s1/#", "gov-sub");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg");
    write_config(&cfg, &gateway(broker.port, modbus.port), &[("press", PRODUCT)]);
    std::fs::write(cfg.join("governance.toml"), GOVERNANCE).unwrap();
    write_key(&cfg);
    let mut agent = Agent::start(&cfg, &dir.path().join("data"));
    wait_for("governed messages", Duration::from_secs(30), || {
        sub.product_messages().len() >= 3
    });
    agent.stop();

    let raw: Vec<String> = sub.lines.snapshot();
    assert!(
        raw.iter().all(|l| !l.contains("OP-0042")),
        "a badge left the site in clear"
    );
    assert!(
        raw.iter().all(|l| !l.contains("777.125")),
        "a restricted value left the site"
    );
    let msg = &sub.product_messages()[1];
    let r = &msg["records"][0];
    let operator = r["fields"]["operator"].as_str().unwrap();
    assert!(operator.starts_with("h:") && operator.len() == 34, "{operator}");
    assert!(
        r["fields"].get("recipe_setpoint").is_none() && r["quality"].get("recipe_setpoint").is_none(),
        "never: not even the key"
    );
    assert_eq!(r["fields"]["temp"], 999.0, "flagged, not hidden");
    assert_eq!(r["quality"]["temp"], "bad:out_of_range");
    assert_eq!(r["fields"]["pressure"], 120.0, "coarsened to its step");
    // The same badge gives the same pseudonym in every record (linkable within the site's data).
    let all: Vec<String> = sub
        .product_messages()
        .iter()
        .map(|m| m["records"][0]["fields"]["operator"].as_str().unwrap().to_string())
        .collect();
    assert!(all.windows(2).all(|w| w[0] == w[1]));
    // The published contract says what happens at the edge and omits what never leaves.
    let (_, d) = sub
        .messages()
        .into_iter()
        .find(|(t, _)| t.ends_with("/_descriptor"))
        .unwrap();
    let props = d["schema"][0]["properties"].as_array().unwrap();
    assert!(props.iter().all(|p| p["name"] != "recipe_setpoint"));
    let op = props.iter().find(|p| p["name"] == "operator").unwrap();
    assert_eq!(
        (
            op["classification"].as_str(),
            op["edgeAction"].as_str(),
            op["logicalType"].as_str()
        ),
        (Some("personal"), Some("pseudonymise"), Some("string"))
    );
}

#[test]
fn a_loose_key_file_is_refused_and_stale_products_never_leave() {
    let modbus = modbus();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg");
    // Phase 1: no broker reachable; the agent buffers `press`.
    let dead_port = free_port();
    write_config(&cfg, &gateway(dead_port, modbus.port), &[("press", PRODUCT)]);
    std::fs::write(cfg.join("governance.toml"), GOVERNANCE).unwrap();
    write_key(&cfg);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(cfg.join("site.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut agent = Agent::start(&cfg, &dir.path().join("data"));
    wait_for("the refusal", Duration::from_secs(10), || !agent.is_running());
    assert!(agent.log().contains("chmod 600"), "{}", agent.log());
    std::fs::set_permissions(cfg.join("site.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut agent = Agent::start(&cfg, &dir.path().join("data"));
    wait_for("a backlog", Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_millis(300));
        agent.log().contains("upstream connect failed")
    });
    std::thread::sleep(Duration::from_secs(1));
    agent.sigkill();
    let buffered = agent.export().len();
    assert!(buffered >= 2, "{buffered}");

    // Phase 2: the product is gone from the config; its buffered messages must not be published.
    let broker = Mosquitto::start(false, "");
    let sub = Subscriber::start(broker.port, "s1/#", "gov-stale-sub");
    std::fs::remove_file(cfg.join("products/press.toml")).unwrap();
    std::fs::write(cfg.join("agent.toml"), gateway(broker.port, modbus.port)).unwrap();
    let mut agent = Agent::start(&cfg, &dir.path().join("data"));
    wait_for("the egress denial", Duration::from_secs(30), || {
        agent.log().contains("egress denied")
    });
    wait_for("the gap events for them", Duration::from_secs(30), || {
        sub.messages()
            .iter()
            .any(|(t, g)| t.ends_with("/_gaps") && g["reason"] == "egress_denied")
    });
    agent.stop();
    assert!(
        sub.product_messages().is_empty(),
        "a product without a valid contract was published"
    );
    let stats = std::process::Command::new(plantmesh_bin())
        .args(["buffer", "stats", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    let stats = String::from_utf8_lossy(&stats.stdout).to_string();
    assert!(stats.contains("dropped press.v1 (egress_denied)"), "{stats}");
}

/// Buffers `press` with no broker reachable under `GOVERNANCE`; the agent is then killed.
/// Returns the config directory and the `(epoch, seq)` of every buffered message.
fn buffered_offline(dir: &std::path::Path, modbus: &PyModbus) -> (std::path::PathBuf, Vec<(u64, u64)>) {
    let cfg = dir.join("cfg");
    write_config(&cfg, &gateway(free_port(), modbus.port), &[("press", PRODUCT)]);
    std::fs::write(cfg.join("governance.toml"), GOVERNANCE).unwrap();
    write_key(&cfg);
    let mut agent = Agent::start(&cfg, &dir.join("data"));
    wait_for("a backlog", Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_millis(300));
        agent.log().contains("upstream connect failed")
    });
    std::thread::sleep(Duration::from_secs(2));
    agent.sigkill();
    let ids: Vec<(u64, u64)> = agent
        .export()
        .iter()
        .map(|m| (m["epoch"].as_u64().unwrap(), m["seq"].as_u64().unwrap()))
        .collect();
    assert!(ids.len() >= 3, "{ids:?}");
    (cfg, ids)
}

/// The rules at publish time are the rules now: records buffered while the broker was down, the
/// class `personal` then tightened from `pseudonymise` to `never`, a restart with the broker up.
/// Not one message leaves with the old treatment, and `governance_changed` gap events account for
/// every buffered seq.
#[test]
fn buffered_messages_never_leave_under_rules_weaker_than_today() {
    let modbus = modbus();
    let dir = tempfile::tempdir().unwrap();
    let (cfg, buffered) = buffered_offline(dir.path(), &modbus);

    let stricter = GOVERNANCE.replace(
        "[classes.personal]\naction = \"pseudonymise\"",
        "[classes.personal]\naction = \"never\"",
    );
    assert_ne!(stricter, GOVERNANCE);
    std::fs::write(cfg.join("governance.toml"), stricter).unwrap();
    let broker = Mosquitto::start(false, "");
    let sub = Subscriber::start(broker.port, "s1/#", "gov-tighten-sub");
    std::fs::write(cfg.join("agent.toml"), gateway(broker.port, modbus.port)).unwrap();
    let mut agent = Agent::start(&cfg, &dir.path().join("data"));
    let covered = |sub: &Subscriber| {
        let gaps: Vec<serde_json::Value> = sub
            .messages()
            .into_iter()
            .filter(|(t, g)| t.ends_with("/_gaps") && g["reason"] == "governance_changed")
            .map(|(_, g)| g)
            .collect();
        buffered.iter().all(|&(e, s)| {
            gaps.iter()
                .any(|g| g["epoch"] == e && g["from_seq"].as_u64() <= Some(s) && g["to_seq"].as_u64() >= Some(s))
        })
    };
    wait_for("gap events for every buffered message", Duration::from_secs(30), || {
        covered(&sub)
    });
    wait_for("live messages", Duration::from_secs(30), || {
        sub.product_messages().len() >= 3
    });
    agent.stop();

    let messages = sub.product_messages();
    for m in &messages {
        let id = (m["epoch"].as_u64().unwrap(), m["seq"].as_u64().unwrap());
        assert!(
            !buffered.contains(&id),
            "a message buffered under the old rules left: {m}"
        );
        for r in m["records"].as_array().unwrap() {
            assert!(
                r["fields"].get("operator").is_none(),
                "the operator left under `never`: {m}"
            );
        }
    }
    assert!(messages.iter().all(|m| m["historical"] == false));
    assert!(agent.log().contains("governance_changed"), "{}", agent.log());
}

/// Loosened rules do not cost the backlog: `restricted` changed from `never` to `pass`, and the
/// messages buffered while it was `never` (stricter than now) are still delivered, without the field.
#[test]
fn buffered_messages_treated_more_strictly_than_today_still_leave() {
    let modbus = modbus();
    let dir = tempfile::tempdir().unwrap();
    let (cfg, buffered) = buffered_offline(dir.path(), &modbus);

    let looser = GOVERNANCE.replace(
        "[classes.restricted]\naction = \"never\"",
        "[classes.restricted]\naction = \"pass\"",
    );
    assert_ne!(looser, GOVERNANCE);
    std::fs::write(cfg.join("governance.toml"), looser).unwrap();
    let broker = Mosquitto::start(false, "");
    let sub = Subscriber::start(broker.port, "s1/#", "gov-loosen-sub");
    std::fs::write(cfg.join("agent.toml"), gateway(broker.port, modbus.port)).unwrap();
    let mut agent = Agent::start(&cfg, &dir.path().join("data"));
    let ids = |sub: &Subscriber| -> Vec<(u64, u64)> {
        sub.product_messages()
            .iter()
            .map(|m| (m["epoch"].as_u64().unwrap(), m["seq"].as_u64().unwrap()))
            .collect()
    };
    wait_for("the whole backlog", Duration::from_secs(30), || {
        let got = ids(&sub);
        buffered.iter().all(|id| got.contains(id))
    });
    wait_for("live messages", Duration::from_secs(30), || {
        sub.product_messages().iter().any(|m| m["historical"] == false)
    });
    agent.stop();
    for m in sub.product_messages() {
        let id = (m["epoch"].as_u64().unwrap(), m["seq"].as_u64().unwrap());
        let recipe = m["records"][0]["fields"].get("recipe_setpoint").cloned();
        if buffered.contains(&id) {
            assert_eq!(recipe, None, "governed under `never` when buffered: {m}");
        } else {
            assert_eq!(recipe, Some(json!(777.125)), "{m}");
        }
    }
    assert!(
        !sub.messages()
            .iter()
            .any(|(t, g)| t.ends_with("/_gaps") && g["reason"] == "governance_changed"),
        "nothing needed dead-lettering"
    );
}

/// Fail closed: without governance.toml the agent runs only when the gateway file names the
/// built-in rules, and then warns at every start; `run` refuses the same config without that key.
#[test]
fn without_a_governance_file_the_agent_runs_only_on_named_builtin_defaults() {
    let modbus = modbus();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg");
    let product = PRODUCT.replace("classification = \"personal\"\n", "");
    write_config(&cfg, &gateway(free_port(), modbus.port), &[("press", &product)]);
    let mut agent = Agent::start(&cfg, &dir.path().join("data"));
    wait_for("the refusal", Duration::from_secs(10), || !agent.is_running());
    assert!(
        agent
            .log()
            .contains("no governance.toml: without rules nothing may run"),
        "{}",
        agent.log()
    );
    let named = gateway(free_port(), modbus.port).replacen(
        "line = \"l1\"\n",
        "line = \"l1\"\ngovernance = \"builtin-defaults\"\n",
        1,
    );
    std::fs::write(cfg.join("agent.toml"), named).unwrap();
    for start in 0..2 {
        let mut agent = Agent::start(&cfg, &dir.path().join("data"));
        wait_for("the warning", Duration::from_secs(20), || {
            agent.log().contains("running on the built-in governance defaults")
        });
        assert!(agent.is_running(), "start {start}: {}", agent.log());
        agent.stop();
    }
}

/// The same through a reload, without a restart: records buffered while the upstream is
/// unreachable, then one reload tightens `personal` to `never` and points the upstream at a broker
/// that runs. Nothing of the old treatment leaves; `governance_changed` gap events stand for it.
#[test]
fn a_reload_that_tightens_governance_regoverns_what_is_buffered() {
    let modbus = modbus();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg");
    write_config(&cfg, &gateway(free_port(), modbus.port), &[("press", PRODUCT)]);
    std::fs::write(cfg.join("governance.toml"), GOVERNANCE).unwrap();
    write_key(&cfg);
    let data = dir.path().join("data");
    let mut agent = Agent::start(&cfg, &data);
    wait_for("a backlog", Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_millis(300));
        agent.log().contains("upstream connect failed")
    });
    std::thread::sleep(Duration::from_secs(2));

    let broker = Mosquitto::start(false, "");
    let sub = Subscriber::start(broker.port, "s1/#", "gov-reload-sub");
    let stricter = GOVERNANCE.replace(
        "[classes.personal]\naction = \"pseudonymise\"",
        "[classes.personal]\naction = \"never\"",
    );
    std::fs::write(cfg.join("governance.toml"), stricter).unwrap();
    std::fs::write(cfg.join("agent.toml"), gateway(broker.port, modbus.port)).unwrap();
    let out = std::process::Command::new(plantmesh_bin())
        .args(["reload", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("product press v1.0.0: changed") && text.contains("upstream: changed"),
        "{text}"
    );
    let gaps = |sub: &Subscriber| {
        sub.messages()
            .into_iter()
            .filter(|(t, g)| t.ends_with("/_gaps") && g["reason"] == "governance_changed")
            .count()
    };
    wait_for("governance_changed gap events", Duration::from_secs(30), || {
        gaps(&sub) > 0
    });
    wait_for("live messages", Duration::from_secs(30), || {
        sub.product_messages().len() >= 3
    });
    agent.stop();
    for m in sub.product_messages() {
        for r in m["records"].as_array().unwrap() {
            assert!(
                r["fields"].get("operator").is_none(),
                "the operator left under `never`: {m}"
            );
        }
    }
}

/// The governance file places the UNS view (`uns_topic_template`): a late subscriber of the
/// template's namespace at Mosquitto finds each field that leaves, retained, governed as in the
/// product messages (the badge as its pseudonym, the pressure coarsened, no topic for the
/// restricted set point), and nothing under the default `{topic}/{field}`; the descriptor names
/// the template's topics.
#[test]
fn the_uns_view_goes_where_the_governance_template_says() {
    let modbus = modbus();
    let broker = Mosquitto::start(false, "");
    let sub = Subscriber::start(broker.port, "s1/#", "gov-uns-sub");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg");
    let product = PRODUCT.replace("owner = \"team\"\n", "owner = \"team\"\n[publish]\nuns = true\n");
    write_config(&cfg, &gateway(broker.port, modbus.port), &[("press", &product)]);
    let governance = format!("uns_topic_template = \"s1/uns/{{area}}/{{line}}/{{product}}/{{field}}\"\n{GOVERNANCE}");
    std::fs::write(cfg.join("governance.toml"), governance).unwrap();
    write_key(&cfg);
    let mut agent = Agent::start(&cfg, &dir.path().join("data"));
    wait_for("the UNS topics", Duration::from_secs(30), || {
        retained(broker.port, "s1/uns/#").len() >= 3
    });
    let view: std::collections::BTreeMap<String, serde_json::Value> = retained(broker.port, "s1/uns/#")
        .into_iter()
        .map(|(t, p)| (t, serde_json::from_str(&p).unwrap()))
        .collect();
    agent.stop();
    assert_eq!(
        view.keys().collect::<Vec<_>>(),
        [
            "s1/uns/a1/l1/press/operator",
            "s1/uns/a1/l1/press/pressure",
            "s1/uns/a1/l1/press/temp"
        ],
        "{view:?}"
    );
    let operator = view["s1/uns/a1/l1/press/operator"]["value"].as_str().unwrap();
    assert!(operator.starts_with("h:") && operator.len() == 34, "{operator}");
    assert_eq!(view["s1/uns/a1/l1/press/pressure"]["value"], 120.0);
    assert_eq!(view["s1/uns/a1/l1/press/temp"]["quality"], "bad:out_of_range");
    let raw = sub.raw();
    assert!(
        raw.iter()
            .all(|(_, p)| !p.contains("OP-0042") && !p.contains("777.125")),
        "nothing withheld, no badge in clear"
    );
    // The product stream is where it was; no field topic under it.
    let product_topic = "s1/a1/l1/production/press/v1";
    assert!(raw.iter().any(|(t, _)| t == product_topic));
    assert!(
        raw.iter()
            .all(|(t, _)| !t.starts_with(&format!("{product_topic}/")) || t.contains("/_")),
        "a field topic under the product's: {:?}",
        raw.iter().map(|(t, _)| t).collect::<std::collections::BTreeSet<_>>()
    );
    let (_, d) = sub
        .messages()
        .into_iter()
        .find(|(t, _)| t.ends_with("/_descriptor"))
        .unwrap();
    assert_eq!(d["binding"]["uns_topic"], "s1/uns/a1/l1/press/{field}", "{d}");
}
