//! Classification belongs to the source and follows the data: hostile product files, written as a
//! domain team editing its own file would, against `configs/example` (what `check` says, and what
//! `preview` shows would leave the site).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "end-to-end tests: a failure fails the test"
)]

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A copy of `configs/example` with `edit` applied to it.
fn example(edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&repo_root().join("configs/example"), dir.path());
    edit(dir.path());
    dir
}

fn append(path: PathBuf, text: &str) {
    let mut s = std::fs::read_to_string(&path).unwrap();
    s.push_str(text);
    std::fs::write(path, s).unwrap();
}

fn run(args: &[&str]) -> Output {
    Command::new(plantmesh_bin()).args(args).output().unwrap()
}

fn check(dir: &Path) -> (Option<i32>, String) {
    let out = run(&["check", dir.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stderr).replace(&format!("{}/", dir.display()), "");
    assert!(!text.contains("panicked"), "{text}");
    (out.status.code(), text)
}

/// What `preview` says would leave the site for the recorded shift.
fn preview(dir: &Path) -> String {
    let input = dir.join("recorded/press-shift.csv");
    let out = run(&[
        "preview",
        "--config",
        dir.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

const BADGE_RAW: &str = r#"
[[fields]]
name = "badge_raw"
source = "press-plc.operator_badge"
"#;

/// Row 1: a second field reading the tag `press-cycles` pseudonymises, with no classification of
/// its own, published the badge number raw. The tag's class is what any reader gives it.
#[test]
fn a_second_reader_of_a_pseudonymised_tag_is_pseudonymised_too() {
    let dir = example(|d| append(d.join("products/production/press-cycles.toml"), BADGE_RAW));
    assert_eq!(check(dir.path()).0, Some(0), "{}", check(dir.path()).1);
    let text = preview(dir.path());
    let published: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert!(published.iter().any(|l| l.contains("\"badge_raw\":\"h:")), "{text}");
    for badge in ["OP-0042", "OP-0107"] {
        assert!(!published.iter().any(|l| l.contains(badge)), "{badge} leaves:\n{text}");
    }
}

/// Row 1, from another product: the quality team reads the badge the production team pseudonymises.
#[test]
fn another_products_reader_gets_at_least_the_same_treatment() {
    let dir = example(|d| append(d.join("products/quality/die-temperature.toml"), BADGE_RAW));
    let text = preview(dir.path());
    let published: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert!(published.iter().any(|l| l.contains("\"badge_raw\":\"h:")), "{text}");
    assert!(!published.iter().any(|l| l.contains("OP-0")), "{text}");
}

/// The same with no class at all, found by the sentinel property test: one field only says
/// `action = "coarsen"` on the die temperature, another reads the same tag and says nothing; the
/// second is coarsened too, never published raw beside the first.
#[test]
fn a_readers_action_alone_is_the_floor_of_every_reader_of_its_tag() {
    let dir = example(|d| {
        let path = d.join("products/quality/die-temperature.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("source = \"press-plc.die_temp\"\n"), "{text}");
        let text = text.replacen(
            "source = \"press-plc.die_temp\"\n",
            "source = \"press-plc.die_temp\"\naction = \"coarsen\"\nstep = 10.0\n",
            1,
        );
        std::fs::write(
            &path,
            text + "\n[[fields]]\nname = \"die_raw\"\nsource = \"press-plc.die_temp\"\nunit = \"Cel\"\n",
        )
        .unwrap();
    });
    assert_eq!(check(dir.path()).0, Some(0), "{}", check(dir.path()).1);
    let text = preview(dir.path());
    let published: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert!(published.iter().any(|l| l.contains("\"die_raw\":180")), "{text}");
    for raw in ["181.5", "181.7", "181.6", "182.0"] {
        assert!(!published.iter().any(|l| l.contains(raw)), "{raw} leaves:\n{text}");
    }
}

/// A field may make its source's class stricter, never weaker: a class the gateway file gives the
/// tag is explained in the error.
#[test]
fn a_field_cannot_weaken_the_class_of_its_tag() {
    let dir = example(|d| {
        let gw = std::fs::read_to_string(d.join("agent.toml")).unwrap().replace(
            "  name = \"operator_badge\"\n",
            "  name = \"operator_badge\"\n  classification = \"personal\"\n",
        );
        std::fs::write(d.join("agent.toml"), gw).unwrap();
        append(
            d.join("products/quality/die-temperature.toml"),
            "[[fields]]\nname = \"badge_raw\"\nsource = \"press-plc.operator_badge\"\nclassification = \"internal\"\n",
        );
    });
    let (code, text) = check(dir.path());
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("class `internal` is weaker than what field `badge_raw` reads: tag `press-plc.operator_badge`, classified `personal` in the gateway file requires `pseudonymise`"),
        "{text}"
    );
}

/// Row 2: a derivation over a field that never leaves published it exactly (`max(x, x) = x`).
#[test]
fn a_value_derived_from_a_withheld_field_is_refused() {
    let dir = example(|d| {
        append(
            d.join("products/quality/die-temperature.toml"),
            r#"
[[fields]]
name = "die_secret"
source = "press-plc.die_temp"
classification = "restricted"

[[fields]]
name = "die_derived"
derive = "max"
inputs = ["die_secret", "die_secret"]
unit = "Cel"
"#,
        )
    });
    let (code, text) = check(dir.path());
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(
            "field `die_derived` derives from input `die_secret` (class `restricted`), which never leaves the site"
        ),
        "{text}"
    );
}

/// Row 3: a class that coarsens to 10 was "met" by a field coarsening to 0.0001.
#[test]
fn a_finer_coarsening_step_weakens_governance() {
    let dir = example(|d| {
        append(
            d.join("governance.toml"),
            "\n[classes.coarse]\naction = \"coarsen\"\nstep = 10.0\n",
        );
        let gov = std::fs::read_to_string(d.join("governance.toml")).unwrap().replace(
            "allow_classes = [\"public\", \"internal\", \"personal\"]",
            "allow_classes = [\"public\", \"internal\", \"personal\", \"coarse\"]",
        );
        std::fs::write(d.join("governance.toml"), gov).unwrap();
        append(
            d.join("products/quality/die-temperature.toml"),
            "[[fields]]\nname = \"die_fine\"\nsource = \"press-plc.die_temp\"\nunit = \"Cel\"\nclassification = \"coarse\"\naction = \"coarsen\"\nstep = 0.0001\n",
        );
    });
    let (code, text) = check(dir.path());
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("`coarsen` with step 0.0001 weakens governance: class `coarse` requires `coarsen` to a step of 10 or a whole multiple of it"),
        "{text}"
    );
}

/// Row 7: an invalid action on the default class made `check` panic (exit 101).
#[test]
fn an_invalid_default_class_is_an_error_not_a_panic() {
    let dir = example(|d| {
        let gov = std::fs::read_to_string(d.join("governance.toml")).unwrap().replace(
            "[classes.internal]\naction = \"pass\"",
            "[classes.internal]\naction = \"passs\"",
        );
        std::fs::write(d.join("governance.toml"), gov).unwrap();
    });
    let (code, text) = check(dir.path());
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("invalid value `passs`"), "{text}");
}
