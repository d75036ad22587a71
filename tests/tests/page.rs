//! The agent's read-only status page in a real browser: headless Chromium loads the page the demo
//! plant serves on its HTTP port, and the test reads the DOM the page's own JavaScript built from
//! `/api/state`: every product with its owner and contract, every field with unit, classification
//! and edge action, values that change between two loads, nothing of a withheld field's value, and
//! no way to change the agent (only GET is answered). A screenshot is kept in
//! `target/test-artifacts/agent-page.png`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "end-to-end tests: a failure fails the test"
)]

mod common;

use common::*;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn the_demo_plants_page_in_a_real_browser() {
    let data = tempfile::tempdir().unwrap();
    let mut demo = Command::new(plantmesh_bin())
        .args(["demo", "--data-dir"])
        .arg(data.path())
        .env("PLANTMESH_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = std::io::BufReader::new(demo.stdout.take().unwrap());
    let _demo = KillOnDrop(demo);
    // The demo says where its page is.
    let mut url = None;
    for line in out.lines() {
        let line = line.unwrap();
        if let Some(u) = line.strip_prefix("status page: ") {
            url = Some(u.trim().to_string());
            break;
        }
        // The view's status lines follow the URL: without one first, there is no page (its
        // address was taken).
        assert!(!line.starts_with("status:"), "the demo serves no page: {line}");
    }
    let url = url.expect("the demo prints its status page's URL");
    let addr = url.trim_start_matches("http://").trim_end_matches('/').to_string();
    // What the agent says it runs, to look for on the page.
    let state: serde_json::Value =
        serde_json::from_str(scrape(&addr, "/api/state").split_once("\r\n\r\n").unwrap().1).unwrap();
    let products = state["products"].as_array().unwrap().clone();
    assert!(products.len() >= 5, "the demo plant's products: {state}");

    // Live values of the products that poll every second (press-rate aggregates a minute).
    wait_for("live values on the page's endpoint", Duration::from_secs(30), || {
        let s: serde_json::Value =
            serde_json::from_str(scrape(&addr, "/api/state").split_once("\r\n\r\n").unwrap().1).unwrap();
        s["products"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| !p["ts"].is_null())
            .count()
            >= 3
    });
    let first = chromium(&url, 4000, Some("agent-page"));
    for p in &products {
        let id = p["id"].as_str().unwrap();
        assert!(
            first.contains(&format!("data-product=\"{id}\"")),
            "product {id} on the page"
        );
        let section = &first[first.find(&format!("data-product=\"{id}\"")).unwrap()..];
        let section = &section[..section.find("</section>").unwrap()];
        assert!(section.contains(p["owner"].as_str().unwrap()), "{id}'s owner");
        assert!(
            section.contains(p["contract_topic"].as_str().unwrap()),
            "{id}'s contract"
        );
        for f in p["fields"].as_array().unwrap() {
            let name = f["name"].as_str().unwrap();
            let row = &section[section
                .find(&format!("data-field=\"{name}\""))
                .unwrap_or_else(|| panic!("field {id}.{name}"))..];
            let row = &row[..row.find("</tr>").unwrap()];
            for k in ["classification", "action"] {
                assert!(row.contains(f[k].as_str().unwrap()), "{id}.{name}: {k} in {row}");
            }
            if f["action"] == "never" {
                // Withheld: the page shows that it is, and no value.
                assert!(row.contains("class=\"value\">-<"), "{id}.{name} is withheld, yet {row}");
            }
        }
    }
    // The press's cycle counter moves every second: a later look shows another value.
    let cycles = |html: &str| {
        text_after(
            &html[html.find("data-product=\"press-output\"").unwrap()..],
            "data-field=\"cycles\"",
            "value",
        )
    };
    let before = cycles(&first).expect("press-output.cycles on the page");
    std::thread::sleep(Duration::from_secs(3));
    let second = chromium(&url, 4000, None);
    let after = cycles(&second).unwrap();
    assert_ne!(before, after, "the page's values update");
    assert!(before.parse::<u64>().is_ok() && after.parse::<u64>().unwrap() > before.parse::<u64>().unwrap());

    // Read-only: nothing but GET (and HEAD) is answered.
    let post = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            &format!("{url}api/state"),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&post.stdout), "405");
}
