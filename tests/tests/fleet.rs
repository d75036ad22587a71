//! The mesh seen from the platform's side of the broker: twenty agents of different sites and topic
//! templates into one Mosquitto, read by `plantmesh catalog` and checked by `plantmesh verify`,
//! both using only standard MQTT. The catalog lists every product once with its owner and SLIs,
//! and an agent killed shows offline within its keep-alive; verify finds nothing missing through
//! broker restarts and a SIGKILL; and a PUBLISH withheld on its way to the broker (a proxy drops it
//! and fakes nothing) is reported as an unexplained hole. The catalog page is loaded in headless
//! Chromium (screenshot: `target/test-artifacts/fleet-catalog.png`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "end-to-end tests: a failure fails the test"
)]

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const AGENTS: usize = 20;
const PRODUCTS: usize = 2;
/// The agents' MQTT keep-alive: the broker publishes an agent's `offline` will 1.5 times this
/// after its last packet.
const KEEP_ALIVE_S: u64 = 5;

fn site(i: usize) -> String {
    format!("site-{}", i % 4)
}

fn owner(i: usize, p: usize) -> String {
    format!("team-{i}-{p}")
}

fn urn(i: usize, p: usize) -> String {
    format!("urn:plantmesh:_:{}:gw-{i:02}:p{p}:v1", site(i))
}

/// Agent `i`'s config: its site, one of two topic templates, products p0 and p1 of one field.
fn config(dir: &Path, i: usize, device: &str, broker: u16) {
    let template = [
        "{site}/{area}/{line}/{domain}/{product}/v{major}",
        "fleet/{site}/{line}/{domain}/{product}/v{major}",
    ][i % 2];
    let gateway = format!(
        "[agent]\nid = \"gw-{i:02}\"\nsite = \"{}\"\narea = \"a\"\nline = \"l{i}\"\nmetrics_listen = \"off\"\nsli_interval = \"1s\"\n\
         [upstream]\nurl = \"mqtt://127.0.0.1:{broker}\"\nkeep_alive = \"{KEEP_ALIVE_S}s\"\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\n\
         [[devices]]\nid = \"plc\"\nprotocol = \"modbus_tcp\"\naddress = \"{device}\"\npoll_interval = \"500ms\"\n\
         [[devices.tags]]\nname = \"r0\"\ntable = \"holding\"\naddress = 0\n[[devices.tags]]\nname = \"r1\"\ntable = \"holding\"\naddress = 1\n",
        site(i)
    );
    let products: Vec<(String, String)> = (0..PRODUCTS)
        .map(|p| {
            (
                format!("p{p}"),
                format!(
                    "id = \"p{p}\"\nname = \"P{p}\"\nversion = \"1.0.{p}\"\ndomain = \"{}\"\nowner = \"{}\"\n[[fields]]\nname = \"v\"\nsource = \"plc.r{p}\"\n",
                    ["production", "quality"][p],
                    owner(i, p)
                ),
            )
        })
        .collect();
    let refs: Vec<(&str, &str)> = products.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    write_config(dir, &gateway, &refs);
    std::fs::write(
        dir.join("governance.toml"),
        format!(
            "topic_template = \"{template}\"\ndefault_classification = \"internal\"\n[classes.internal]\naction = \"pass\"\n\
             [egress]\nallow_topic_prefixes = [\"#\"]\nallow_classes = [\"internal\"]\n"
        ),
    )
    .unwrap();
}

/// `plantmesh catalog --json` once: URN -> row.
fn catalog(broker: u16) -> BTreeMap<String, Value> {
    let out = Command::new(plantmesh_bin())
        .args([
            "catalog",
            "--broker",
            &format!("mqtt://127.0.0.1:{broker}"),
            "--json",
            "--wait",
            "10s",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "catalog: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = doc["products"].as_array().unwrap();
    let mut by_urn = BTreeMap::new();
    for r in rows {
        assert!(
            by_urn
                .insert(r["urn"].as_str().unwrap().to_string(), r.clone())
                .is_none(),
            "{} listed twice",
            r["urn"]
        );
    }
    by_urn
}

/// `plantmesh verify` in the background.
fn verify(broker: u16, args: &[&str]) -> Child {
    Command::new(plantmesh_bin())
        .args(["verify", "--broker", &format!("mqtt://127.0.0.1:{broker}"), "--json"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn report(child: Child) -> (Option<i32>, Value, String) {
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let doc = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("verify's report: {e}\n{stderr}"));
    (out.status.code(), doc, stderr)
}

#[test]
fn twenty_agents_catalogued_and_verified_through_restarts_and_a_kill() {
    let mut broker = Mosquitto::start(true, "");
    let (_sim, devices) = simulate(AGENTS, PRODUCTS);
    assert_eq!(devices.len(), AGENTS);
    let dir = tempfile::tempdir().unwrap();
    // The verifier follows the fleet from the start, through everything below.
    let verifier = verify(broker.port, &["--for", "45s"]);
    let mut agents: Vec<Agent> = (0..AGENTS)
        .map(|i| {
            let cfg = dir.path().join(format!("cfg{i}"));
            config(&cfg, i, &devices[i], broker.port);
            Agent::start(&cfg, &dir.path().join(format!("data{i}")))
        })
        .collect();

    // Every product exactly once, with its owner, online, with SLIs measured.
    let want = AGENTS * PRODUCTS;
    let mut rows = BTreeMap::new();
    wait_for(
        "the catalog to list every product online with SLIs",
        Duration::from_secs(60),
        || {
            rows = catalog(broker.port);
            rows.len() == want
                && rows
                    .values()
                    .all(|r| r["online"] == true && r["sli"]["records_total"].as_u64() > Some(0))
        },
    );
    for i in 0..AGENTS {
        for p in 0..PRODUCTS {
            let r = &rows[&urn(i, p)];
            assert_eq!(r["owner"], owner(i, p).as_str(), "{r}");
            assert_eq!(r["site"], site(i).as_str());
            assert_eq!(r["domain"], ["production", "quality"][p]);
            assert_eq!(r["version"], format!("1.0.{p}").as_str());
            assert_eq!(
                r["contract"]["verified"], true,
                "the contract is the one the entry names: {r}"
            );
            assert_eq!(r["topic_shared_with"], serde_json::json!([]), "{r}");
            assert_eq!(r["sli"]["completeness"], 1.0, "a healthy simulated device: {r}");
            let template_root = if i % 2 == 0 { site(i) } else { "fleet".to_string() };
            assert!(r["topics"]["data"].as_str().unwrap().starts_with(&template_root), "{r}");
        }
    }

    // The fleet page, served by the catalog, in a real browser: every product is on it.
    let page = free_port();
    let serve = KillOnDrop(
        Command::new(plantmesh_bin())
            .args([
                "catalog",
                "--broker",
                &format!("mqtt://127.0.0.1:{}", broker.port),
                "--serve",
                &format!("127.0.0.1:{page}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{page}/");
    let mut dom = String::new();
    wait_for(
        "the catalog page to list every product",
        Duration::from_secs(30),
        || {
            dom = chromium(&url, 4000, None);
            rows.keys().all(|u| dom.contains(&format!("data-urn=\"{u}\"")))
        },
    );
    chromium(&url, 4000, Some("fleet-catalog"));
    assert!(
        dom.contains(&owner(7, 1)) && dom.contains("site-3"),
        "owners and sites on the page"
    );
    // Filtered by domain and site (from the address, as the page's selectors write it).
    let filtered = chromium(&format!("{url}?domain=quality&site=site-2"), 4000, None);
    let shown: Vec<&str> = filtered
        .split("data-urn=\"")
        .skip(1)
        .map(|s| &s[..s.find('"').unwrap()])
        .collect();
    let expected: Vec<String> = (0..AGENTS).filter(|i| i % 4 == 2).map(|i| urn(i, 1)).collect();
    assert_eq!(shown, expected, "the quality products of site-2 only");
    drop(serve);

    // Faults: the broker restarts twice; one agent is SIGKILLed and started again.
    std::thread::sleep(Duration::from_secs(3));
    broker.restart();
    std::thread::sleep(Duration::from_secs(4));
    agents[5].sigkill();
    agents[5].restart();
    std::thread::sleep(Duration::from_secs(3));
    broker.restart();
    std::thread::sleep(Duration::from_secs(4));

    // Another agent dies for good: its will says offline within 1.5 keep-alives.
    let status = Subscriber::start(
        broker.port,
        &format!("{}/_agents/gw-07/status", site(7)),
        "fleet-status",
    );
    wait_for("gw-07 online", Duration::from_secs(10), || {
        status.lines.snapshot().iter().any(|l| l.contains("\"online\""))
    });
    let killed = Instant::now();
    agents[7].sigkill();
    wait_for("gw-07 offline", Duration::from_secs(15), || {
        status.lines.snapshot().iter().any(|l| l.contains("\"offline\""))
    });
    let took = killed.elapsed();
    assert!(
        took <= Duration::from_millis(KEEP_ALIVE_S * 1500 + 1500),
        "offline {took:?} after the kill, keep-alive {KEEP_ALIVE_S} s"
    );
    let rows = catalog(broker.port);
    for p in 0..PRODUCTS {
        assert_eq!(rows[&urn(7, p)]["online"], false, "the catalog shows gw-07 offline");
        assert_eq!(rows[&urn(8, p)]["online"], true);
    }

    // Nothing missing: every seq of every stream delivered or announced, copies identical.
    let (code, r, stderr) = report(verifier);
    assert_eq!(code, Some(0), "verify failed: {r}\n{stderr}");
    assert_eq!((r["hole_seqs"].as_u64(), r["differing"].as_u64()), (Some(0), Some(0)));
    let streams = r["streams"].as_array().unwrap();
    for i in 0..AGENTS {
        for p in 0..PRODUCTS {
            assert!(
                streams.iter().any(|s| s["urn"] == urn(i, p).as_str()),
                "verify followed {}",
                urn(i, p)
            );
        }
    }
    let epochs_of_5 = streams.iter().filter(|s| s["urn"] == urn(5, 0).as_str()).count();
    assert_eq!(epochs_of_5, 2, "gw-05 ran two epochs (SIGKILL): {streams:?}");
    assert!(
        r["delivered"].as_u64().unwrap() > (AGENTS * PRODUCTS * 40) as u64,
        "{r}"
    );
}

#[test]
fn a_publish_withheld_before_the_broker_is_an_unexplained_hole() {
    let broker = Mosquitto::start(false, "");
    let (_sim, devices) = simulate(1, PRODUCTS);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg");
    // The agent's uplink runs through a proxy that drops the 5th PUBLISH on p0's data topic (and
    // fakes no PUBACK: the agent waits for one that never comes, as with a broker that lost it).
    let topic = format!("{}/a/l0/production/p0/v1", site(0));
    let mut proxy = Command::new(python())
        .arg(repo_root().join("tests/peers/drop_proxy.py"))
        .args(["0", &broker.port.to_string(), &topic, "5"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let said = Lines::default();
    said.follow(proxy.stdout.take().unwrap());
    let _proxy = KillOnDrop(proxy);
    wait_for("the proxy to listen", Duration::from_secs(10), || said.len() > 0);
    let port: u16 = said.snapshot()[0].strip_prefix("PROXY ").unwrap().parse().unwrap();
    config(&cfg, 0, &devices[0], port);
    let verifier = verify(broker.port, &["--for", "8s", "--product", "p0"]);
    std::thread::sleep(Duration::from_millis(500));
    let _agent = Agent::start(&cfg, &dir.path().join("data"));
    wait_for("the proxy to withhold a PUBLISH", Duration::from_secs(20), || {
        said.snapshot().contains(&format!("DROPPED {topic}"))
    });
    let (code, r, stderr) = report(verifier);
    assert_eq!(code, Some(1), "verify must fail on a hole: {r}\n{stderr}");
    let streams = r["streams"].as_array().unwrap();
    assert_eq!(streams.len(), 1, "only p0 followed (--product): {streams:?}");
    assert_eq!(streams[0]["urn"], urn(0, 0).as_str());
    assert_eq!(streams[0]["holes"], serde_json::json!([[5, 5]]), "{r}");
    assert_eq!(r["hole_seqs"], 1);
}
