//! Hot reload with the real binary, Mosquitto and pymodbus: devices, tags, products and fields
//! added, changed and removed under load, through `plantmesh reload` and SIGHUP, while an
//! unchanged device and product run on untouched; refusals isolated per file; a reload while the
//! broker is down.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "end-to-end tests: a failure fails the test"
)]

mod common;

use common::plant::{by_id, gap_events};
use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const POLL_MS: u64 = 200;

/// A counter at holding register 10 (u32), and 7 at 12.
fn counter() -> PyModbus {
    PyModbus::start(&json!({
        "values": [{"table": "holding", "address": 12, "type": "u32", "value": 7}],
        "counter": {"address": 10, "period_ms": 20},
    }))
}

fn gateway(broker: u16, steady: u16, churn: u16, devices: &[Churn]) -> String {
    let mut g = format!(
        r#"[agent]
id = "gw-reload"
site = "s1"
area = "a1"
line = "l1"
governance = "builtin-defaults"
metrics_listen = "127.0.0.1:0"

[upstream]
url = "mqtt://127.0.0.1:{broker}"
protocol = "5"
reconnect_min = "100ms"
reconnect_max = "300ms"

[buffer]
commit_interval = "50ms"

[[devices]]
id = "steady"
protocol = "modbus_tcp"
address = "127.0.0.1:{steady}"
poll_interval = "{POLL_MS}ms"

  [[devices.tags]]
  name = "counter"
  table = "holding"
  address = 10
  type = "u32"
"#
    );
    for d in devices {
        g.push_str(&format!(
            r#"
[[devices]]
id = "churn-{}"
protocol = "modbus_tcp"
address = "127.0.0.1:{churn}"
poll_interval = "200ms"

  [[devices.tags]]
  name = "counter"
  table = "holding"
  address = {}
  type = "u32"
"#,
            d.n, d.address
        ));
    }
    g
}

/// A product on one tag; `extra` fields (the minor version counts them) read the same tag.
fn product(id: &str, tag: &str, minor: u32, unit: &str) -> String {
    let mut p = format!(
        "id = \"{id}\"\nname = \"{id}\"\nversion = \"1.{minor}.0\"\ndomain = \"d\"\nowner = \"o\"\n\n[[fields]]\nname = \"n\"\nsource = \"{tag}\"\nunit = \"{unit}\"\n"
    );
    for f in 0..minor {
        p.push_str(&format!("\n[[fields]]\nname = \"n{f}\"\nsource = \"{tag}\"\n"));
    }
    p
}

#[derive(Clone)]
struct Churn {
    n: usize,
    /// 10: the counter; 12: a register that holds 7.
    address: u16,
    minor: u32,
}

/// `plantmesh reload` as an operator runs it: its output and whether it succeeded.
fn reload(data: &Path) -> (bool, String) {
    let out = Command::new(plantmesh_bin())
        .args(["reload", "--data-dir"])
        .arg(data)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Milliseconds of the day of an RFC 3339 timestamp (`...T10:00:00.123Z`).
fn ms_of_day(ts: &str) -> u64 {
    let t = ts.split('T').nth(1).unwrap().trim_end_matches('Z');
    let mut it = t.split(':');
    let (h, m, s): (u64, u64, f64) = (
        it.next().unwrap().parse().unwrap(),
        it.next().unwrap().parse().unwrap(),
        it.next().unwrap().parse().unwrap(),
    );
    (h * 3600 + m * 60) * 1000 + (s * 1000.0).round() as u64
}

fn messages_of<'a>(sub: &'a Subscriber, product: &'a str) -> impl Iterator<Item = Value> + 'a {
    sub.product_messages()
        .into_iter()
        .filter(move |m| m["product"] == product)
}

/// Every seq of `product` from its first to its last, in one epoch: nothing lost.
fn contiguous(sub: &Subscriber, product: &str) -> (u64, u64, BTreeMap<(u64, u64), Value>) {
    let (got, _) = by_id(&messages_of(sub, product).collect::<Vec<_>>());
    let epochs: std::collections::BTreeSet<u64> = got.keys().map(|k| k.0).collect();
    assert_eq!(epochs.len(), 1, "{product}: one epoch throughout, got {epochs:?}");
    let mut next = got.keys().next().unwrap().1;
    for m in got.values() {
        let seq = m["seq"].as_u64().unwrap();
        assert_eq!(seq, next, "{product}: seq {next} missing");
        next = m["last_seq"].as_u64().unwrap_or(seq) + 1;
    }
    let first = got.keys().next().unwrap().1;
    (first, next - 1, got)
}

/// Gaps between consecutive read times of `product`'s records with read time in `range`.
fn poll_gaps(got: &BTreeMap<(u64, u64), Value>, range: std::ops::Range<u64>) -> Vec<u64> {
    let mut ts: Vec<u64> = got
        .values()
        .flat_map(|m| m["records"].as_array().unwrap().clone())
        .map(|r| ms_of_day(r["ts"].as_str().unwrap()))
        .filter(|t| range.contains(t))
        .collect();
    ts.sort_unstable();
    ts.dedup();
    ts.windows(2).map(|w| w[1] - w[0]).collect()
}

fn quantile(v: &[u64], q: f64) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn now_of_day() -> u64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    ms % 86_400_000
}

#[test]
fn twenty_reloads_under_load_disturb_nothing_that_did_not_change() {
    let steady_plc = counter();
    let churn_plc = counter();
    let broker = Mosquitto::start(false, "");
    let sub = Subscriber::start(broker.port, "s1/#", "reload-sub");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg");
    let data = dir.path().join("data");
    let mut churn: Vec<Churn> = Vec::new();
    let write = |churn: &[Churn]| {
        let mut products: Vec<(String, String)> = vec![("steady".into(), product("steady", "steady.counter", 0, "1"))];
        for c in churn {
            products.push((
                format!("extra-{}", c.n),
                product(
                    &format!("extra-{}", c.n),
                    &format!("churn-{}.counter", c.n),
                    c.minor,
                    "1",
                ),
            ));
        }
        let _ = std::fs::remove_dir_all(cfg.join("products"));
        let refs: Vec<(&str, &str)> = products.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        write_config(
            &cfg,
            &gateway(broker.port, steady_plc.port, churn_plc.port, churn),
            &refs,
        );
    };
    write(&churn);
    let mut agent = Agent::start(&cfg, &data);
    wait_for("steady's first messages", Duration::from_secs(30), || {
        messages_of(&sub, "steady").count() > 5
    });
    let epoch = agent.epoch();
    // A baseline of the steady device's poll period without reloads.
    std::thread::sleep(Duration::from_secs(3));
    let reloads_from = now_of_day();

    let mut next = 0;
    let mut config_hash = String::new();
    for i in 0..20 {
        // Add, change a product (a new field, a higher minor), change a device's tag, remove.
        let expect: Box<dyn Fn(&Subscriber) -> bool> = match i % 4 {
            0 => {
                churn.push(Churn {
                    n: next,
                    address: 10,
                    minor: 0,
                });
                next += 1;
                let p = format!("extra-{}", next - 1);
                Box::new(move |s: &Subscriber| messages_of(s, &p).count() > 0)
            }
            1 => {
                let c = churn.last_mut().unwrap();
                c.minor += 1;
                let (p, v) = (format!("extra-{}", c.n), format!("1.{}.0", c.minor));
                Box::new(move |s: &Subscriber| messages_of(s, &p).any(|m| m["version"] == v.as_str()))
            }
            2 => {
                let c = churn.last_mut().unwrap();
                c.address = 12;
                let p = format!("extra-{}", c.n);
                let before = messages_of(&sub, &p).count();
                Box::new(move |s: &Subscriber| {
                    messages_of(s, &p)
                        .skip(before)
                        .any(|m| m["records"][0]["fields"]["n"] == 7)
                })
            }
            _ => {
                let c = churn.remove(0);
                // Drained, then its retained descriptor is cleared: an empty retained message
                // (`mosquitto_sub -v` prints an empty payload as `(null)`).
                let line = format!("s1/a1/l1/d/extra-{}/v1/_descriptor (null)", c.n);
                Box::new(move |s: &Subscriber| s.lines.snapshot().contains(&line))
            }
        };
        write(&churn);
        if i % 5 == 4 {
            // The signal a service manager sends.
            let pid = agent.child.as_ref().unwrap().id().to_string();
            assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
        } else {
            let (ok, out) = reload(&data);
            assert!(ok, "reload {i} refused:\n{out}");
            assert!(out.contains("applied"), "reload {i}:\n{out}");
            config_hash = out
                .split("config_hash ")
                .nth(1)
                .unwrap()
                .split(')')
                .next()
                .unwrap()
                .to_string();
        }
        wait_for(
            &format!("reload {i}'s change at the broker"),
            Duration::from_secs(30),
            || expect(&sub),
        );
    }
    let reloads_to = now_of_day();
    std::thread::sleep(Duration::from_secs(1));

    // The steady product: every seq, one epoch, no gap event.
    let (first, last, got) = contiguous(&sub, "steady");
    assert!(last - first > 20, "steady kept publishing: seqs {first}..={last}");
    assert!(
        gap_events(&sub).iter().all(|g| g["product"] != "steady"),
        "{:?}",
        gap_events(&sub)
    );
    assert_eq!(agent.epoch(), epoch, "a reload keeps the epoch");
    // Its device task was never restarted, and its poll period held.
    let log = agent.log();
    let planned = log
        .lines()
        .filter(|l| l.contains("Modbus device planned") && l.contains("device=steady"))
        .count();
    assert_eq!(planned, 1, "the steady device was started once:\n{log}");
    let baseline = poll_gaps(&got, 0..reloads_from);
    let during = poll_gaps(&got, reloads_from..reloads_to);
    let (b_max, d_max) = (*baseline.iter().max().unwrap(), *during.iter().max().unwrap());
    println!(
        "reload: steady poll gaps without reloads p50/p99/max {}/{}/{} ms; during 20 reloads {}/{}/{} ms",
        quantile(&baseline, 0.5),
        quantile(&baseline, 0.99),
        b_max,
        quantile(&during, 0.5),
        quantile(&during, 0.99),
        d_max
    );
    // A poll missed (a restarted task, a stalled pipeline) shows as twice the period or more.
    assert!(
        d_max < 2 * POLL_MS,
        "poll gaps during reloads up to {d_max} ms (without: {b_max} ms)"
    );
    // The status document carries the configuration now running.
    let status: Vec<Value> = sub
        .messages()
        .into_iter()
        .filter(|(t, _)| t.ends_with("/status"))
        .map(|(_, v)| v)
        .collect();
    assert!(
        status.iter().any(|s| s["config_hash"] == config_hash.as_str()),
        "status with config_hash {config_hash}: {status:?}"
    );
    // Every reload is in the audit trail.
    let audit = std::fs::read_to_string(data.join("audit.jsonl")).unwrap();
    assert_eq!(audit.lines().filter(|l| l.contains("config_reload")).count(), 20);
    assert!(agent.stop().success());
}

#[test]
fn refusals_are_isolated_per_file_and_a_reload_while_the_broker_is_down_loses_nothing() {
    let plc = counter();
    let mut broker = Mosquitto::start(true, "");
    let sub = Subscriber::start(broker.port, "s1/#", "refusal-sub");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg");
    let data = dir.path().join("data");
    let gw = gateway(broker.port, plc.port, plc.port, &[]);
    write_config(
        &cfg,
        &gw,
        &[
            ("a", &product("a", "steady.counter", 0, "1")),
            ("b", &product("b", "steady.counter", 0, "1")),
        ],
    );
    // No agent yet: `plantmesh reload` says it cannot reach one (exit 2), and nothing is created.
    let out = Command::new(plantmesh_bin())
        .args(["reload", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the agent"));
    let mut agent = Agent::start(&cfg, &data);
    // The broker acknowledged both descriptors: their contracts bind later configs.
    wait_for("both contracts stored", Duration::from_secs(30), || {
        ["a.v1", "b.v1"].iter().all(|k| {
            std::fs::read_dir(data.join("contracts"))
                .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with(k)))
                .unwrap_or(false)
        })
    });
    let product_file = |name: &str| cfg.join("products").join(format!("{name}.toml"));
    let versions = |p: &str, from: usize| -> Vec<String> {
        messages_of(&sub, p)
            .skip(from)
            .map(|m| m["version"].as_str().unwrap().to_string())
            .collect()
    };

    // A broken product file beside a valid change to another product.
    std::fs::write(
        product_file("a"),
        "id = \"a\"\nname = \"a\"\nversion = \"1.1.0\"\n[[fields]\n",
    )
    .unwrap();
    std::fs::write(product_file("b"), product("b", "steady.counter", 1, "1")).unwrap();
    let (ok, out) = reload(&data);
    assert!(!ok, "a refused file makes the reload fail:\n{out}");
    assert!(out.contains("product b v1.1.0: changed"), "{out}");
    assert!(
        out.contains("products/a.toml:4:"),
        "the error names file and line:\n{out}"
    );
    wait_for("b on 1.1.0", Duration::from_secs(20), || {
        versions("b", 0).contains(&"1.1.0".into())
    });
    let seen = messages_of(&sub, "a").count();
    wait_for("a publishing on", Duration::from_secs(20), || {
        messages_of(&sub, "a").count() > seen + 5
    });
    assert!(
        versions("a", 0).iter().all(|v| v == "1.0.0"),
        "a runs on its old version"
    );

    // A broken gateway file changes nothing, not even a valid product change beside it.
    std::fs::write(
        cfg.join("agent.toml"),
        gw.replace(&format!("poll_interval = \"{POLL_MS}ms\""), "poll_interval = \"soon\""),
    )
    .unwrap();
    std::fs::write(product_file("b"), product("b", "steady.counter", 2, "1")).unwrap();
    let (ok, out) = reload(&data);
    assert!(
        !ok && out.contains("agent.toml:") && out.contains("refused: nothing changed"),
        "{out}"
    );
    let from = messages_of(&sub, "b").count();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        versions("b", from).iter().all(|v| v == "1.1.0"),
        "b stays on 1.1.0: {:?}",
        versions("b", from)
    );
    std::fs::write(cfg.join("agent.toml"), &gw).unwrap();

    // A unit changed under the same major: the contract refuses it.
    std::fs::write(product_file("a"), product("a", "steady.counter", 1, "Cel")).unwrap();
    std::fs::write(product_file("b"), product("b", "steady.counter", 1, "1")).unwrap();
    let (ok, out) = reload(&data);
    assert!(!ok, "{out}");
    assert!(
        out.contains("products/a.toml") && out.contains("unit"),
        "the contract message:\n{out}"
    );
    assert!(versions("a", 0).iter().all(|v| v == "1.0.0"));

    // A reload while the broker is down: a product added, one changed. Then the broker is back.
    std::fs::write(product_file("a"), product("a", "steady.counter", 0, "1")).unwrap();
    std::fs::write(product_file("b"), product("b", "steady.counter", 2, "1")).unwrap();
    std::fs::write(product_file("c"), product("c", "steady.counter", 0, "1")).unwrap();
    let connects_before = broker
        .log()
        .lines()
        .filter(|l| l.contains("New client connected") && !l.contains("refusal-sub"))
        .count();
    broker.stop();
    let (ok, out) = reload(&data);
    assert!(ok, "{out}");
    assert!(
        out.contains("product c v1.0.0: added") && out.contains("product b v1.2.0: changed"),
        "{out}"
    );
    std::thread::sleep(Duration::from_secs(3));
    broker.restart();
    wait_for("c and b 1.2.0 after the outage", Duration::from_secs(30), || {
        messages_of(&sub, "c").count() > 0 && versions("b", 0).contains(&"1.2.0".into())
    });

    // The upstream settings changed: one reconnect, nothing lost.
    std::fs::write(
        cfg.join("agent.toml"),
        gw.replace(
            "reconnect_min = \"100ms\"",
            "reconnect_min = \"100ms\"\nkeep_alive = \"20s\"",
        ),
    )
    .unwrap();
    let (ok, out) = reload(&data);
    assert!(ok && out.contains("upstream: changed, reconnecting"), "{out}");
    let seen = messages_of(&sub, "c").count();
    wait_for("c after the reconnect", Duration::from_secs(20), || {
        messages_of(&sub, "c").count() > seen + 5
    });
    let agent_connects = |log: &str| {
        log.lines()
            .filter(|l| l.contains("New client connected") && !l.contains("refusal-sub"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let connects = agent_connects(&broker.log());
    assert_eq!(
        connects.len(),
        connects_before + 2,
        "one connect after the broker restart, one for the new settings: {connects:?}"
    );
    assert!(
        connects.last().unwrap().contains("k20"),
        "the new keep-alive: {connects:?}"
    );
    let stopped_at = Instant::now();
    assert!(agent.stop().success());
    // Everything numbered reached the broker: a and b have every seq, across the refusals, the
    // outage and the reloads.
    wait_for("the backlog drained", Duration::from_secs(20), || {
        let n = sub.product_messages().len();
        std::thread::sleep(Duration::from_millis(500));
        n == sub.product_messages().len()
    });
    for p in ["a", "b", "c"] {
        let (first, last, _) = contiguous(&sub, p);
        assert!(last > first, "{p}: {first}..={last}");
    }
    assert!(gap_events(&sub).is_empty(), "{:?}", gap_events(&sub));
    println!(
        "reload: broker-down reload drained within {:?} of the stop",
        stopped_at.elapsed()
    );
}

/// `agent.watch_config`: a product file dropped into the config directory is picked up without a
/// signal, once it has stayed unchanged for one period.
#[test]
fn watch_config_reloads_a_change_by_itself() {
    let plc = counter();
    let broker = Mosquitto::start(false, "");
    let sub = Subscriber::start(broker.port, "s1/#", "watch-sub");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg");
    let data = dir.path().join("data");
    let gw = gateway(broker.port, plc.port, plc.port, &[]).replace(
        "governance = \"builtin-defaults\"",
        "governance = \"builtin-defaults\"\nwatch_config = \"300ms\"",
    );
    write_config(&cfg, &gw, &[("a", &product("a", "steady.counter", 0, "1"))]);
    let mut agent = Agent::start(&cfg, &data);
    wait_for("a", Duration::from_secs(30), || messages_of(&sub, "a").count() > 0);
    std::fs::write(cfg.join("products/w.toml"), product("w", "steady.counter", 0, "1")).unwrap();
    wait_for("w, with no reload asked for", Duration::from_secs(20), || {
        messages_of(&sub, "w").count() > 0
    });
    let audit = std::fs::read_to_string(data.join("audit.jsonl")).unwrap();
    assert_eq!(
        audit.lines().filter(|l| l.contains("config_reload")).count(),
        1,
        "{audit}"
    );
    assert!(agent.log().contains("agent.watch_config"), "{}", agent.log());
    assert!(agent.stop().success());
}
