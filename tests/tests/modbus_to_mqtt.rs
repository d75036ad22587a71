//! Modbus TCP and RTU (pymodbus) -> plantmesh -> Mosquitto, with the real binary.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "end-to-end tests: a failure fails the test"
)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

const ORDERS: [&str; 4] = ["ABCD", "CDAB", "BADC", "DCBA"];

struct TagCase {
    name: String,
    table: &'static str,
    address: u16,
    ty: &'static str,
    order: Option<&'static str>,
    value: Value,
    extra: String,
}

fn gateway(agent_id: &str, broker_port: u16, devices: &str) -> String {
    format!(
        r#"
[agent]
id = "{agent_id}"
site = "s1"
area = "a1"
line = "l1"
governance = "builtin-defaults"

[upstream]
url = "mqtt://127.0.0.1:{broker_port}"
protocol = "3.1.1"
max_inflight = 8
reconnect_min = "100ms"
reconnect_max = "1s"

[buffer]
commit_interval = "50ms"
{devices}
"#
    )
}

fn product(id: &str, fields: &[(&str, &str)], mode: &str) -> String {
    let mut s = format!("id = \"{id}\"\nname = \"{id}\"\nversion = \"1.0.0\"\ndomain = \"test\"\nowner = \"team\"\n[publish]\nmode = \"{mode}\"\n");
    for (name, source) in fields {
        s += &format!("[[fields]]\nname = \"{name}\"\nsource = \"{source}\"\n");
    }
    s
}

/// Every type in every byte order it allows, laid out to exercise coalescing.
fn cases() -> Vec<TagCase> {
    let mut v = Vec::new();
    let mut addr = 0u16;
    let mut add =
        |name: String, ty: &'static str, order: Option<&'static str>, value: Value, width: u16, extra: String| {
            v.push(TagCase {
                name,
                table: "holding",
                address: addr,
                ty,
                order,
                value,
                extra,
            });
            addr += width;
        };
    for order in ORDERS {
        let o = order.to_lowercase();
        add(
            format!("u32_{o}"),
            "u32",
            Some(order),
            json!(4_000_000_001u32),
            2,
            String::new(),
        );
        add(
            format!("i32_{o}"),
            "i32",
            Some(order),
            json!(-123_456_789),
            2,
            String::new(),
        );
        add(format!("f32_{o}"), "f32", Some(order), json!(123.456), 2, String::new());
        add(
            format!("u64_{o}"),
            "u64",
            Some(order),
            json!(18_000_000_000_000_000_000u64),
            4,
            String::new(),
        );
        add(
            format!("i64_{o}"),
            "i64",
            Some(order),
            json!(-9_000_000_000_000i64),
            4,
            String::new(),
        );
        add(
            format!("f64_{o}"),
            "f64",
            Some(order),
            json!(-2.5e300),
            4,
            String::new(),
        );
    }
    for order in ["ABCD", "BADC"] {
        let o = order.to_lowercase();
        add(format!("u16_{o}"), "u16", Some(order), json!(65_000), 1, String::new());
        add(format!("i16_{o}"), "i16", Some(order), json!(-2), 1, String::new());
        add(
            format!("str_{o}"),
            "string",
            Some(order),
            json!("PRESS-7"),
            4,
            "length = 4\n".into(),
        );
    }
    // A status word 5 registers further on (inside max_gap): two bits of it.
    v.push(TagCase {
        name: "bit3".into(),
        table: "holding",
        address: addr + 5,
        ty: "raw",
        order: None,
        value: json!([0b1000]),
        extra: "bit = 3\n".into(),
    });
    v.push(TagCase {
        name: "bit2".into(),
        table: "holding",
        address: addr + 5,
        ty: "raw",
        order: None,
        value: json!(null),
        extra: "bit = 2\n".into(),
    });
    // Far away: its own read. Scaled.
    v.push(TagCase {
        name: "scaled".into(),
        table: "holding",
        address: 300,
        ty: "i16",
        order: None,
        value: json!(655),
        extra: "scale = 0.1\noffset = -40.0\n".into(),
    });
    v.push(TagCase {
        name: "input_u16".into(),
        table: "input",
        address: 7,
        ty: "u16",
        order: None,
        value: json!(4242),
        extra: String::new(),
    });
    v.push(TagCase {
        name: "coil0".into(),
        table: "coil",
        address: 0,
        ty: "bool",
        order: None,
        value: json!(true),
        extra: String::new(),
    });
    v.push(TagCase {
        name: "coil9".into(),
        table: "coil",
        address: 9,
        ty: "bool",
        order: None,
        value: json!(false),
        extra: String::new(),
    });
    v.push(TagCase {
        name: "di3".into(),
        table: "discrete_input",
        address: 3,
        ty: "bool",
        order: None,
        value: json!(true),
        extra: String::new(),
    });
    v
}

#[test]
fn every_type_and_byte_order_arrives_exactly_with_ideal_coalescing() {
    all_types(false);
}

/// The same over Modbus RTU on a serial line, with a second unit on the bus and a third that never
/// answers: the silent unit costs its own tags a timeout and does not hold up the others.
#[test]
fn every_type_arrives_over_rtu_and_a_silent_unit_does_not_block_the_others() {
    all_types(true);
}

fn all_types(rtu: bool) {
    let cases = cases();
    let spec_values: Vec<Value> = cases
        .iter()
        .filter(|c| !c.value.is_null())
        .map(|c| {
            let mut s = json!({"table": c.table, "address": c.address, "type": c.ty, "value": c.value});
            if let Some(o) = c.order {
                s["order"] = json!(o);
            }
            if c.ty == "string" {
                s["length"] = json!(4);
            }
            s
        })
        .collect();
    // The registers between the last value and the status word exist (unused), as on a real PLC.
    let spacer_at = cases.iter().find(|c| c.name == "bit3").unwrap().address - 5;
    let mut spec_values = spec_values;
    spec_values.push(json!({"table": "holding", "address": spacer_at, "type": "raw", "value": [0, 0, 0, 0, 0]}));
    let modbus = if rtu {
        PyModbus::start_rtu(&json!({"units": {
            "1": {"values": spec_values},
            "2": {"values": [{"table": "input", "address": 500, "type": "u16", "value": 4242}]},
        }}))
    } else {
        PyModbus::start(&json!({"values": spec_values}))
    };
    let broker = Mosquitto::start(false, "");
    let sub = Subscriber::start(broker.port, "s1/#", "types-sub");

    let mut devices = if rtu {
        format!(
            "[[devices]]\nid = \"plc\"\nprotocol = \"modbus_rtu\"\nport = \"{}\"\nbaud = 19200\nparity = \"none\"\n\
             poll_interval = \"1s\"\ntimeout = \"300ms\"\n\
             [[devices.tags]]\nname = \"unit2\"\ntable = \"input\"\naddress = 500\nunit_id = 2\n\
             [[devices.tags]]\nname = \"silent\"\ntable = \"input\"\naddress = 500\nunit_id = 3\n",
            modbus.serial_port().display()
        )
    } else {
        format!(
            "[[devices]]\nid = \"plc\"\nprotocol = \"modbus_tcp\"\naddress = \"127.0.0.1:{}\"\npoll_interval = \"300ms\"\ntimeout = \"1s\"\n",
            modbus.port
        )
    };
    for c in &cases {
        let ty = match c.ty {
            "raw" => "bool",
            t => t,
        };
        devices += &format!(
            "[[devices.tags]]\nname = \"{}\"\ntable = \"{}\"\naddress = {}\ntype = \"{ty}\"\n{}",
            c.name, c.table, c.address, c.extra
        );
        if let Some(o) = c.order {
            devices += &format!("byte_order = \"{o}\"\n");
        }
    }
    let mut fields: Vec<(String, String)> = cases
        .iter()
        .map(|c| (c.name.clone(), format!("plc.{}", c.name)))
        .collect();
    if rtu {
        fields.push(("unit2".into(), "plc.unit2".into()));
        fields.push(("silent".into(), "plc.silent".into()));
    }
    let fields: Vec<(&str, &str)> = fields.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let dir = tempfile::tempdir().unwrap();
    write_config(
        &dir.path().join("cfg"),
        &gateway("gw-types", broker.port, &devices),
        &[("all", &product("all-types", &fields, "every_sample"))],
    );
    let mut agent = Agent::start(&dir.path().join("cfg"), &dir.path().join("data"));

    wait_for("3 product messages", Duration::from_secs(30), || {
        sub.product_messages().len() >= 3
    });
    agent.stop();

    let msg = &sub.product_messages()[1];
    assert_eq!(msg["product"], "all-types");
    assert_eq!(msg["agent"], "gw-types");
    let record = &msg["records"][0];
    for c in &cases {
        let got = &record["fields"][&c.name];
        assert_eq!(record["quality"][&c.name], "good", "{}: {record}", c.name);
        let want = match (c.name.as_str(), c.ty) {
            ("bit3", _) => json!(true),
            ("bit2", _) => json!(false),
            ("scaled", _) => json!(655.0 * 0.1 - 40.0),
            (_, "f32") => json!(f64::from(123.456f32)),
            _ => c.value.clone(),
        };
        assert_eq!(got, &want, "field {}", c.name);
    }
    if rtu {
        assert_eq!(record["fields"]["unit2"], 4242, "{record}");
        assert_eq!(record["quality"]["silent"], "bad:timeout", "{record}");
        // Every poll on time (1 s apart), the silent unit's timeout notwithstanding.
        let ts: Vec<String> = sub
            .product_messages()
            .iter()
            .map(|m| m["records"][0]["ts"].as_str().unwrap().to_string())
            .collect();
        let secs = |t: &str| t[17..23].parse::<f64>().unwrap();
        for w in ts.windows(2) {
            let d = (secs(&w[1]) - secs(&w[0]) + 60.0) % 60.0;
            assert!((0.8..1.3).contains(&d), "polls {w:?}");
        }
    }

    // Coalescing at the ideal: per poll exactly one read per contiguous area.
    let holding_len = cases
        .iter()
        .filter(|c| c.name == "bit3")
        .map(|c| c.address + 1)
        .next()
        .unwrap();
    let mut ideal: BTreeMap<(u8, u16, u16), usize> = BTreeMap::new();
    for shape in [(3u8, 0u16, holding_len), (3, 300, 1), (4, 7, 1), (1, 0, 10), (2, 3, 1)] {
        ideal.insert(shape, 0);
    }
    if rtu {
        // Unit 2's read (the silent unit 3 never reaches the server's tables).
        ideal.insert((4, 500, 1), 0);
    }
    let reqs = modbus.requests();
    let mut seen: BTreeMap<(u8, u16, u16), usize> = BTreeMap::new();
    for r in &reqs {
        *seen.entry(*r).or_default() += 1;
    }
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ideal.keys().collect::<Vec<_>>(),
        "request shapes: {seen:?}"
    );
    let counts: Vec<usize> = seen.values().copied().collect();
    let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
    assert!(max - min <= 1, "every poll reads every area once: {seen:?}");
    assert!(*min >= 3, "{seen:?}");
}

#[test]
fn refused_reads_are_split_and_only_missing_tags_go_bad() {
    // Registers 0, 1 and 5 exist; 2..4 and 50 do not. The merged read 0..6 is refused (02), split
    // into 0..2 and 5..6 for good; the tag at 50 stays bad with the exception code.
    let modbus = PyModbus::start(&json!({"values": [
        {"table": "holding", "address": 0, "type": "u16", "value": 11},
        {"table": "holding", "address": 1, "type": "u16", "value": 12},
        {"table": "holding", "address": 5, "type": "u16", "value": 15},
    ]}));
    let broker = Mosquitto::start(false, "");
    let sub = Subscriber::start(broker.port, "s1/#", "split-sub");
    let devices = format!(
        r#"[[devices]]
id = "plc"
protocol = "modbus_tcp"
address = "127.0.0.1:{}"
poll_interval = "200ms"
max_gap = 60
[[devices.tags]]
name = "a"
table = "holding"
address = 0
[[devices.tags]]
name = "b"
table = "holding"
address = 1
[[devices.tags]]
name = "c"
table = "holding"
address = 5
[[devices.tags]]
name = "missing"
table = "holding"
address = 50
"#,
        modbus.port
    );
    let dir = tempfile::tempdir().unwrap();
    let fields = [
        ("a", "plc.a"),
        ("b", "plc.b"),
        ("c", "plc.c"),
        ("missing", "plc.missing"),
    ];
    write_config(
        &dir.path().join("cfg"),
        &gateway("gw-split", broker.port, &devices),
        &[("p", &product("split", &fields, "every_sample"))],
    );
    let mut agent = Agent::start(&dir.path().join("cfg"), &dir.path().join("data"));
    wait_for("4 product messages", Duration::from_secs(30), || {
        sub.product_messages().len() >= 4
    });
    agent.stop();

    let last = sub.product_messages().last().unwrap().clone();
    let r = &last["records"][0];
    assert_eq!(
        (
            r["fields"]["a"].clone(),
            r["fields"]["b"].clone(),
            r["fields"]["c"].clone()
        ),
        (json!(11), json!(12), json!(15))
    );
    assert_eq!(r["fields"]["missing"], Value::Null);
    assert_eq!(r["quality"]["missing"], "bad:modbus_exception_02_illegal_data_address");
    assert_eq!(r["quality"]["c"], "good");

    // The first poll discovers the holes; afterwards only the learned reads are sent.
    let reqs = modbus.requests();
    let first_full = reqs.iter().position(|r| *r == (3, 0, 51)).expect("first merged read");
    assert_eq!(first_full, 0, "{reqs:?}");
    let steady: Vec<_> = reqs.iter().skip(reqs.len() / 2).collect();
    for r in &steady {
        assert!(
            [(3, 0, 2), (3, 5, 1), (3, 50, 1)].contains(r),
            "unexpected steady-state read {r:?} in {reqs:?}"
        );
    }
}

#[test]
fn dead_and_garbage_devices_never_stall_a_good_one() {
    // A device that accepts connections and never answers; one that answers garbage; one good device.
    let blackhole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let blackhole_port = blackhole.local_addr().unwrap().port();
    let garbage = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let garbage_port = garbage.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in blackhole.incoming().flatten() {
            held.push(s);
        }
    });
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut s in garbage.incoming().flatten() {
            std::thread::spawn(move || {
                // Complete MBAP frames that answer the wrong transaction with the wrong function.
                let mut buf = [0u8; 260];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(b"\xbe\xef\x00\x00\x00\x04\x01\x2b\x01\xff").is_err() {
                        break;
                    }
                }
            });
        }
    });
    let modbus = PyModbus::start(
        &json!({"values": [{"table": "holding", "address": 0, "type": "u16", "value": 1}], "counter": {"address": 10, "period_ms": 20}}),
    );
    let broker = Mosquitto::start(false, "");
    let sub = Subscriber::start(broker.port, "s1/#", "stall-sub");
    let device = |id: &str, port: u16, timeout: &str| {
        format!(
            "[[devices]]\nid = \"{id}\"\nprotocol = \"modbus_tcp\"\naddress = \"127.0.0.1:{port}\"\npoll_interval = \"100ms\"\ntimeout = \"{timeout}\"\n\
             [[devices.tags]]\nname = \"v\"\ntable = \"holding\"\naddress = 10\ntype = \"u32\"\n"
        )
    };
    let devices = device("good", modbus.port, "1s")
        + &device("dead", blackhole_port, "2s")
        + &device("garbage", garbage_port, "1s");
    let dir = tempfile::tempdir().unwrap();
    write_config(
        &dir.path().join("cfg"),
        &gateway("gw-stall", broker.port, &devices),
        &[
            ("good", &product("good", &[("v", "good.v")], "every_sample")),
            ("dead", &product("dead", &[("v", "dead.v")], "every_sample")),
            ("garbage", &product("garbage", &[("v", "garbage.v")], "every_sample")),
        ],
    );
    let mut agent = Agent::start(&dir.path().join("cfg"), &dir.path().join("data"));
    let of = |p: &str| {
        sub.product_messages()
            .into_iter()
            .filter(|m| m["product"] == p)
            .collect::<Vec<_>>()
    };
    wait_for("a timeout from the dead device", Duration::from_secs(30), || {
        of("dead")
            .iter()
            .any(|m| m["records"][0]["quality"]["v"] == "bad:timeout")
    });
    wait_for("bad readings from the garbage device", Duration::from_secs(30), || {
        !of("garbage").is_empty()
    });
    // Over the next 3 s the dead device spends its time in 2 s timeouts; the good one keeps its pace.
    let before = of("good").len();
    std::thread::sleep(Duration::from_secs(3));
    let good = of("good").len() - before;
    assert!(agent.is_running(), "agent died: {}", agent.log());
    agent.stop();
    assert!(
        good >= 15,
        "good device produced only {good} records in 3 s at a 100 ms poll"
    );
    let g = of("garbage");
    let q = g.last().unwrap()["records"][0]["quality"]["v"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(q, "bad:decode", "garbage device quality");
    let counts: Vec<u64> = of("good")
        .iter()
        .filter_map(|m| m["records"][0]["fields"]["v"].as_u64())
        .collect();
    assert!(
        counts.windows(2).all(|w| w[0] <= w[1]),
        "counter goes backwards: {counts:?}"
    );
}
