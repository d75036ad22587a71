//! `check` never panics, whatever the files say: gateway, product and governance files generated
//! from their own vocabulary (every key, right and wrong values, classes that exist and do not,
//! derivations over each other), so that the generator reaches validation and not only the parser.
//! `PLANTMESH_CONFIG_CASES` sets the number of cases (default 256).

use crate::config::load_texts;
use proptest::prelude::*;
use std::path::Path;

const CLASSES: [&str; 5] = ["public", "internal", "personal", "restricted", "coarse"];
const ACTIONS: [&str; 7] = ["pass", "passs", "coarsen", "pseudonymise", "mask", "never", ""];
const PROTOCOLS: [&str; 6] = ["modbus_tcp", "modbus_rtu", "opcua", "sensor_node", "mqtt", "modbus"];

/// A TOML value of some type for any key: often right, often wrong.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\"1s\"".to_string()),
        Just("\"x\"".to_string()),
        Just("\"\"".to_string()),
        Just("\"opc.tcp://127.0.0.1:4840\"".to_string()),
        Just("\"mqtt://u:p@127.0.0.1:1883\"".to_string()),
        Just("\"127.0.0.1:502\"".to_string()),
        Just("\"ns=2;s=A\"".to_string()),
        Just("\"a/+b/c\"".to_string()),
        Just("\"s\\u0000x\"".to_string()),
        (-3i64..70_000).prop_map(|n| n.to_string()),
        prop_oneof![Just(0.0f64), Just(-1.0), Just(0.0001), Just(10.0), Just(1e308)].prop_map(|x| format!("{x:?}")),
        any::<bool>().prop_map(|b| b.to_string()),
        Just("[1.0, 0.0]".to_string()),
    ]
}

fn key_value(keys: &'static [&'static str]) -> impl Strategy<Value = String> {
    (prop::sample::select(keys), value()).prop_map(|(k, v)| format!("{k} = {v}\n"))
}

const DEVICE_KEYS: &[&str] = &[
    "address",
    "port",
    "baud",
    "parity",
    "stop_bits",
    "data_bits",
    "inter_frame",
    "stale_after",
    "endpoint",
    "security_policy",
    "security_mode",
    "identity",
    "username",
    "password_env",
    "publishing_interval",
    "mode",
    "timestamps",
    "unit_id",
    "poll_interval",
    "timeout",
    "max_gap",
    "max_registers_per_read",
    "url",
    "allow_insecure_credentials",
];
const TAG_KEYS: &[&str] = &[
    "table",
    "address",
    "node_id",
    "sampling_interval",
    "queue_size",
    "deadband",
    "type",
    "byte_order",
    "bit",
    "length",
    "unit_id",
    "scale",
    "channel",
    "topic",
    "payload",
    "pointer",
    "sparkplug",
    "metric",
    "classification",
];

fn tag(i: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(key_value(TAG_KEYS), 0..5)
        .prop_map(move |kvs| format!("  [[devices.tags]]\n  name = \"t{i}\"\n{}", kvs.concat()))
}

fn device(i: usize) -> impl Strategy<Value = String> {
    (
        prop::sample::select(&PROTOCOLS[..]),
        prop::collection::vec(key_value(DEVICE_KEYS), 0..5),
        prop::collection::vec((0..4usize).prop_flat_map(tag), 0..4),
    )
        .prop_map(move |(protocol, kvs, tags)| {
            format!(
                "[[devices]]\nid = \"d{i}\"\nprotocol = \"{protocol}\"\n{}{}",
                kvs.concat(),
                tags.concat()
            )
        })
}

/// A valid device `d0` with tags `t0`..`t3` (so that product fields reach governance), each maybe
/// classified, then devices of any kind with any keys.
fn gateway() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(prop::option::of(prop::sample::select(&CLASSES[..])), 4),
        prop::collection::vec((1..3usize).prop_flat_map(device), 0..3),
    )
        .prop_map(|(classes, devices)| {
            let mut d0 = String::from("[[devices]]\nid = \"d0\"\nprotocol = \"modbus_tcp\"\naddress = \"127.0.0.1:502\"\n");
            for (t, class) in classes.iter().enumerate() {
                d0 += &format!("  [[devices.tags]]\n  name = \"t{t}\"\n  table = \"holding\"\n  address = {t}\n");
                if let Some(c) = class {
                    d0 += &format!("  classification = \"{c}\"\n");
                }
            }
            format!(
                "[agent]\nid = \"gw\"\nsite = \"s\"\narea = \"a\"\nline = \"l\"\n[upstream]\nurl = \"mqtt://127.0.0.1:1883\"\n{d0}{}",
                devices.concat()
            )
        })
}

fn class_table() -> impl Strategy<Value = String> {
    (
        prop::sample::select(&CLASSES[..]),
        prop::sample::select(&ACTIONS[..]),
        prop::option::of(prop_oneof![Just(0.0f64), Just(10.0), Just(0.5), Just(-2.0)]),
    )
        .prop_map(|(c, a, step)| {
            let step = step.map_or(String::new(), |s| format!("step = {s:?}\n"));
            format!("[classes.{c}]\naction = \"{a}\"\n{step}")
        })
}

fn governance() -> impl Strategy<Value = Option<String>> {
    prop::option::of(
        (
            prop::collection::vec(class_table(), 0..5),
            prop::sample::select(&CLASSES[..]),
            prop::collection::vec(prop::sample::select(&CLASSES[..]), 0..3),
            any::<bool>(),
            prop::sample::select(
                &[
                    "",
                    "allow_topic_prefixes = [\"#\"]\n",
                    "allow_topic_prefixes = [\"s/\"]\n",
                    "allow_topic_prefixes = [\"\"]\n",
                ][..],
            ),
            any::<bool>(),
        )
            .prop_map(|(classes, default, allowed, key, prefixes, egress)| {
                // Class names repeat across tables: TOML refuses a duplicate table, which must be a
                // located error too.
                let allowed: Vec<String> = allowed.iter().map(|c| format!("\"{c}\"")).collect();
                let egress = if egress {
                    format!("[egress]\n{prefixes}allow_classes = [{}]\n", allowed.join(", "))
                } else {
                    String::new()
                };
                format!(
                    "default_classification = \"{default}\"\n{}{}{egress}",
                    if key { "pseudonymise_key_file = \"k\"\n" } else { "" },
                    classes.concat(),
                )
            }),
    )
}

fn field(i: usize) -> impl Strategy<Value = String> {
    (
        prop_oneof![
            (0..2usize, 0..5usize).prop_map(|(d, t)| format!("source = \"d{d}.t{t}\"\n")),
            (
                prop::sample::select(&["max", "sum", "ratio", "mean", "share"][..]),
                prop::collection::vec(0..6usize, 0..4)
            )
                .prop_map(|(op, inputs)| {
                    let inputs: Vec<String> = inputs.iter().map(|n| format!("\"f{n}\"")).collect();
                    format!("derive = \"{op}\"\ninputs = [{}]\nunit = \"1\"\n", inputs.join(", "))
                }),
        ],
        prop::option::of(prop::sample::select(&CLASSES[..])),
        prop::option::of(prop::sample::select(&ACTIONS[..])),
        prop::option::of(prop_oneof![Just(0.0001f64), Just(10.0), Just(20.0), Just(-1.0)]),
        prop::option::of(prop::sample::select(&["last", "max", "delta", "count", "nope"][..])),
    )
        .prop_map(move |(src, class, action, step, aggregate)| {
            let mut f = format!("[[fields]]\nname = \"f{i}\"\n{src}");
            if let Some(c) = class {
                f += &format!("classification = \"{c}\"\n");
            }
            if let Some(a) = action {
                f += &format!("action = \"{a}\"\n");
            }
            if let Some(s) = step {
                f += &format!("step = {s:?}\n");
            }
            if let Some(a) = aggregate {
                f += &format!("aggregate = \"{a}\"\n");
            }
            f
        })
}

fn product(i: usize) -> impl Strategy<Value = String> {
    (
        prop::collection::vec((0..6usize).prop_flat_map(field), 0..6),
        prop::sample::select(&["every_sample", "window", "interval", "on_change"][..]),
    )
        .prop_map(move |(fields, mode)| {
            let publish = match mode {
                "window" => "[publish]\nmode = \"window\"\nwindow = \"1s\"\n",
                "interval" => "[publish]\nmode = \"interval\"\ninterval = \"1s\"\n",
                "on_change" => "[publish]\nmode = \"on_change\"\n",
                _ => "",
            };
            format!(
                "id = \"p{i}\"\nname = \"P\"\nversion = \"1.0.0\"\ndomain = \"d\"\nowner = \"o\"\n{publish}{}",
                fields.concat()
            )
        })
}

fn cases() -> u32 {
    std::env::var("PLANTMESH_CONFIG_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn check_never_panics(
        gw in gateway(),
        gov in governance(),
        builtin in prop::bool::weighted(0.8),
        products in prop::collection::vec((0..3usize).prop_flat_map(product), 0..3),
    ) {
        let named: Vec<(String, String)> =
            products.iter().enumerate().map(|(i, p)| (format!("p{i}.toml"), p.clone())).collect();
        let texts: Vec<(&Path, &str)> = named.iter().map(|(n, t)| (Path::new(n.as_str()), t.as_str())).collect();
        // Without a governance file the gateway mostly says so by name, so validation goes deeper.
        let gw = match (&gov, builtin) {
            (None, true) => gw.replacen("line = \"l\"\n", "line = \"l\"\ngovernance = \"builtin-defaults\"\n", 1),
            _ => gw,
        };
        let result = load_texts(
            (Path::new("agent.toml"), &gw),
            gov.as_deref().map(|g| (Path::new("governance.toml"), g)),
            &texts,
            Path::new("/nonexistent"),
        );
        // Either a plan or located problems; the point is that we got here.
        if let Err(d) = result {
            prop_assert!(!d.0.is_empty());
        }
    }
}
