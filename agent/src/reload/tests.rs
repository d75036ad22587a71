//! The configuration side of reload: isolation per file, restart-only keys, what counts as changed.

use super::*;

const GATEWAY: &str = r#"
[agent]
id = "gw-1"
site = "s"
area = "a"
line = "l"
governance = "builtin-defaults"

[buffer]
max_bytes = "64MiB"

[[devices]]
id = "plc-1"
protocol = "modbus_tcp"
address = "127.0.0.1:5020"
poll_interval = "500ms"

  [[devices.tags]]
  name = "count"
  table = "holding"
  address = 0
  type = "u16"

  [[devices.tags]]
  name = "temp"
  table = "holding"
  address = 1
  type = "u16"
"#;

fn product(id: &str, version: &str, unit: &str) -> String {
    format!(
        r#"id = "{id}"
name = "{id}"
version = "{version}"
domain = "production"
owner = "team"
description = "d"

[[fields]]
name = "count"
source = "plc-1.count"
unit = "{unit}"
"#
    )
}

struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new(gateway: &str, products: &[(&str, &str)]) -> Dir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("products")).unwrap();
        let d = Dir { dir };
        d.write("agent.toml", gateway);
        for (name, text) in products {
            d.write(&format!("products/{name}"), text);
        }
        d
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.dir.path().join(name), text).unwrap();
    }

    fn paths(&self) -> Vec<PathBuf> {
        vec![self.dir.path().to_path_buf()]
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn load(&self) -> (Plan, Texts) {
        let texts = config::read(&self.paths()).unwrap();
        let plan = config::validate_texts(&texts, Some(&self.data())).unwrap();
        (plan, texts)
    }

    /// What runs now, as a reload finds it.
    fn applied(&self) -> Applied {
        let mut a = Applied::new(&self.data());
        a.keep(&self.load().1);
        a
    }
}

#[test]
fn a_broken_product_file_keeps_its_previous_text_and_the_others_change() {
    let d = Dir::new(
        GATEWAY,
        &[
            ("a.toml", &product("a", "1.0.0", "1")),
            ("b.toml", &product("b", "1.0.0", "1")),
        ],
    );
    let before = d.applied();
    d.write("products/a.toml", "id = \"a\"\nversion = \n");
    d.write("products/b.toml", &product("b", "1.1.0", "1"));
    let loaded = load_isolated(&d.paths(), Some(&d.data()), &before).unwrap();
    assert_eq!(loaded.refused.len(), 1, "{:?}", loaded.refused);
    let (file, problems) = &loaded.refused[0];
    assert!(file.ends_with("products/a.toml"));
    assert!(problems.0[0].line > 0, "the problem is located: {problems}");
    let versions: Vec<(&str, &str)> = loaded
        .plan
        .products
        .iter()
        .map(|p| (p.id.as_str(), p.version.as_str()))
        .collect();
    assert_eq!(versions, vec![("a", "1.0.0"), ("b", "1.1.0")]);
}

#[test]
fn a_new_broken_product_file_is_left_out() {
    let d = Dir::new(GATEWAY, &[("a.toml", &product("a", "1.0.0", "1"))]);
    let before = d.applied();
    d.write(
        "products/c.toml",
        &product("c", "1.0.0", "1").replace("plc-1.count", "plc-1.nope"),
    );
    let loaded = load_isolated(&d.paths(), Some(&d.data()), &before).unwrap();
    assert_eq!(loaded.refused.len(), 1);
    assert_eq!(loaded.plan.products.len(), 1);
}

#[test]
fn a_broken_gateway_file_changes_nothing_even_beside_a_valid_product_change() {
    let d = Dir::new(GATEWAY, &[("a.toml", &product("a", "1.0.0", "1"))]);
    let before = d.applied();
    d.write(
        "agent.toml",
        &GATEWAY.replace("poll_interval = \"500ms\"", "poll_interval = \"soon\""),
    );
    d.write("products/a.toml", &product("a", "1.1.0", "1"));
    let e = load_isolated(&d.paths(), Some(&d.data()), &before).unwrap_err();
    assert!(e.0.iter().any(|p| p.file.ends_with("agent.toml") && p.line > 0), "{e}");
}

#[test]
fn a_unit_changed_under_the_same_major_is_refused_with_the_contract_message() {
    let d = Dir::new(GATEWAY, &[("a.toml", &product("a", "1.0.0", "1"))]);
    let (plan, _) = d.load();
    let before = d.applied();
    // What the broker acknowledged binds later configs.
    let dir = config::contract::dir(&d.data());
    config::contract::save(
        &dir,
        &plan.products[0].key,
        &crate::publish::envelope::descriptor(&plan, &plan.products[0]),
    )
    .unwrap();
    d.write("products/a.toml", &product("a", "1.1.0", "Cel"));
    let loaded = load_isolated(&d.paths(), Some(&d.data()), &before).unwrap();
    assert_eq!(loaded.refused.len(), 1);
    let text = loaded.refused[0].1.to_string();
    assert!(text.contains("unit"), "{text}");
    assert_eq!(loaded.plan.products[0].version, "1.0.0");
}

#[test]
fn diff_names_what_restarts() {
    let d = Dir::new(
        GATEWAY,
        &[
            ("a.toml", &product("a", "1.0.0", "1")),
            ("b.toml", &product("b", "1.0.0", "1")),
        ],
    );
    let (old, _) = d.load();
    // A device added before the existing one moves its tags in the table; the existing one is kept.
    let gateway = GATEWAY.replace(
        "[[devices]]\nid = \"plc-1\"",
        "[[devices]]\nid = \"plc-0\"\nprotocol = \"modbus_tcp\"\naddress = \"127.0.0.1:5021\"\n\n  [[devices.tags]]\n  name = \"x\"\n  table = \"holding\"\n  address = 0\n  type = \"u16\"\n\n[[devices]]\nid = \"plc-1\"",
    );
    d.write("agent.toml", &gateway);
    d.write("products/b.toml", &product("b", "1.1.0", "1"));
    std::fs::remove_file(d.dir.path().join("products/a.toml")).unwrap();
    d.write("products/c.toml", &product("c", "1.0.0", "1"));
    let (new, texts) = d.load();
    let c = diff(&old, &new, &texts.gateway).unwrap();
    assert_eq!(c.devices_kept, vec![(0, 1)]);
    assert_eq!(c.devices_added, vec![0]);
    assert!(c.devices_changed.is_empty() && c.devices_removed.is_empty());
    assert_eq!(c.products_removed, vec![0], "a");
    assert_eq!(c.products_added.len(), 1, "c");
    assert_eq!(c.products_changed.len(), 1, "b: a new version is a new descriptor");
    assert!(!c.upstream && !c.none);

    let same = diff(&new, &new, &texts.gateway).unwrap();
    assert!(same.none);
    assert!(same.products_changed.is_empty() && same.devices_changed.is_empty());
}

#[test]
fn a_changed_register_restarts_its_device_only() {
    let d = Dir::new(GATEWAY, &[("a.toml", &product("a", "1.0.0", "1"))]);
    let (old, _) = d.load();
    d.write("agent.toml", &GATEWAY.replace("address = 1\n", "address = 7\n"));
    let (new, texts) = d.load();
    let c = diff(&old, &new, &texts.gateway).unwrap();
    assert_eq!(c.devices_changed, vec![(0, 0)]);
    // The product's lineage names the register: its descriptor changes.
    assert!(
        c.products_changed.is_empty(),
        "`a` reads `count`, whose register did not move"
    );
}

#[test]
fn restart_only_keys_refuse_the_gateway_file_at_their_line() {
    let d = Dir::new(GATEWAY, &[("a.toml", &product("a", "1.0.0", "1"))]);
    let (old, _) = d.load();
    d.write(
        "agent.toml",
        &GATEWAY.replace("max_bytes = \"64MiB\"", "max_bytes = \"32MiB\""),
    );
    let (new, texts) = d.load();
    let e = diff(&old, &new, &texts.gateway).unwrap_err();
    assert_eq!(e.0.len(), 1, "{e}");
    assert_eq!(e.0[0].line, 9, "the [buffer] header: {e}");
    assert!(e.0[0].message.contains("restart"), "{e}");

    d.write("agent.toml", &GATEWAY.replace("id = \"gw-1\"", "id = \"gw-2\""));
    let (new, texts) = d.load();
    let e = diff(&old, &new, &texts.gateway).unwrap_err();
    assert_eq!((e.0[0].line, e.0[0].key.as_str()), (3, "agent.id"), "{e}");
}

#[test]
fn a_refused_file_whose_running_copy_is_gone_refuses_everything() {
    let d = Dir::new(
        GATEWAY,
        &[
            ("a.toml", &product("a", "1.0.0", "1")),
            ("b.toml", &product("b", "1.0.0", "1")),
        ],
    );
    let before = d.applied();
    // The copy of a running file altered behind the agent's back: it is not put back to that.
    for e in std::fs::read_dir(d.data().join("applied")).unwrap() {
        std::fs::write(e.unwrap().path(), product("a", "9.0.0", "1")).unwrap();
    }
    d.write("products/a.toml", "id = ");
    d.write("products/b.toml", &product("b", "1.1.0", "1"));
    let e = load_isolated(&d.paths(), Some(&d.data()), &before).unwrap_err();
    assert!(e.to_string().contains("cannot put this file back"), "{e}");
}
