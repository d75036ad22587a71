use super::*;
use crate::sparkplug::{datatype, Metric, MetricValue};
use prost::Message;
use std::path::Path;

const GATEWAY: &str = r#"
[agent]
id = "gw"
site = "s"
area = "a"
line = "l"
governance = "builtin-defaults"

[[devices]]
id = "broker"
protocol = "mqtt"
url = "mqtt://127.0.0.1:1883"

  [[devices.tags]]
  name = "{line}_{machine}_temp"
  topic = "plant/+line/+machine/state"
  pointer = "/temp"
  timestamp_pointer = "/ts"

  [[devices.tags]]
  name = "{line}_{machine}_mode"
  topic = "plant/+line/+machine/state"
  pointer = "/mode"
  type = "string"

  [[devices.tags]]
  name = "speed"
  topic = "plant/line-1/speed"
  type = "i64"

  [[devices.tags]]
  name = "any_alarm"
  topic = "plant/+/alarm"
  type = "bool"

  [[devices.tags]]
  name = "{dev}_level"
  sparkplug = "G1/edge-1/+dev"
  metric = "Tank/Level"

  [[devices.tags]]
  name = "node_uptime"
  sparkplug = "G1/edge-1"
  metric = "Uptime"
  type = "u64"
"#;

const PRODUCT: &str = r#"
id = "p"
name = "p"
version = "1.0.0"
domain = "d"
owner = "o"

[[fields]]
name = "t1"
source = "broker.line-1_m3_temp"
unit = "Cel"

[[fields]]
name = "mode1"
source = "broker.line-1_m3_mode"

[[fields]]
name = "speed"
source = "broker.speed"
unit = "1/min"

[[fields]]
name = "alarm"
source = "broker.any_alarm"

[[fields]]
name = "level"
source = "broker.tank-a_level"
unit = "m"

[[fields]]
name = "uptime"
source = "broker.node_uptime"
unit = "s"
"#;

fn router() -> (Router, crate::config::Plan) {
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = crate::config::load_texts(
        (Path::new("agent.toml"), GATEWAY),
        None,
        &[(Path::new("p.toml"), PRODUCT)],
        dir.path(),
    )
    .unwrap_or_else(|d| panic!("{d}"));
    (Router::new(0, &plan.devices[0].tags, plan.tags.clone()), plan)
}

fn tag(plan: &crate::config::Plan, name: &str) -> usize {
    plan.tags
        .iter()
        .position(|t| t.name == name)
        .unwrap_or_else(|| panic!("no tag {name}"))
}

fn readings(o: &Outcome) -> Vec<(Millis, usize, Option<Value>, Quality)> {
    o.batches
        .iter()
        .flat_map(|b| {
            b.readings
                .iter()
                .map(move |r| (b.ts, r.tag, r.value.clone(), r.quality))
        })
        .collect()
}

#[test]
fn templates_are_instantiated_by_the_fields_that_name_them() {
    let (r, plan) = router();
    let t = &plan.tags[tag(&plan, "line-1_m3_temp")];
    assert_eq!(config::mqtt(t).map(|m| m.topic.as_str()), Some("plant/line-1/m3/state"));
    let level = &plan.tags[tag(&plan, "tank-a_level")];
    assert!(matches!(&config::mqtt(level).expect("mqtt").payload,
        MqttPayload::Sparkplug { device: Some(d), .. } if d == "tank-a"));
    let mut f = r.filters();
    f.sort();
    assert_eq!(
        f,
        vec![
            "plant/+/+/state",
            "plant/+/alarm",
            "plant/line-1/speed",
            "spBv1.0/G1/+/edge-1/#"
        ]
    );
}

#[test]
fn json_values_and_times_come_from_their_pointers() {
    let (mut r, plan) = router();
    let (temp, mode) = (tag(&plan, "line-1_m3_temp"), tag(&plan, "line-1_m3_mode"));
    let o = r.on_message(
        "plant/line-1/m3/state",
        br#"{"temp": 21.5, "mode": "AUTO", "ts": "2026-11-21T10:00:00.123Z"}"#,
        false,
        5,
    );
    assert!(o.errors.is_empty(), "{:?}", o.errors);
    assert_eq!(
        readings(&o),
        vec![
            (5, mode, Some(Value::Text("AUTO".into())), Quality::Good),
            (1_795_255_200_123, temp, Some(Value::Float(21.5)), Quality::Good),
        ]
    );
    // Another machine on the same filter is nobody's tag here.
    assert_eq!(
        r.on_message("plant/line-1/m4/state", br#"{"temp": 1}"#, false, 5),
        Outcome::default()
    );
    // Epoch seconds are taken as seconds.
    let o = r.on_message("plant/line-1/m3/state", br#"{"temp": 3, "ts": 1795255200.5}"#, false, 5);
    assert!(readings(&o).contains(&(1_795_255_200_500, temp, Some(Value::Float(3.0)), Quality::Good)));
}

#[test]
fn retained_messages_are_last_known_values_not_fresh_ones() {
    let (mut r, plan) = router();
    let o = r.on_message("plant/line-1/speed", b"42", true, 9);
    assert_eq!(
        readings(&o),
        vec![(
            9,
            tag(&plan, "speed"),
            Some(Value::Int(42)),
            Quality::Uncertain(BadReason::Retained)
        )]
    );
    let o = r.on_message("plant/line-1/speed", b" 43\n", false, 10);
    assert_eq!(readings(&o)[0].3, Quality::Good);
}

#[test]
fn garbage_is_reported_and_marks_only_its_own_tags() {
    let (mut r, plan) = router();
    let (temp, mode, speed) = (
        tag(&plan, "line-1_m3_temp"),
        tag(&plan, "line-1_m3_mode"),
        tag(&plan, "speed"),
    );
    let o = r.on_message("plant/line-1/m3/state", b"{not json", false, 1);
    assert_eq!(o.errors.len(), 1, "{:?}", o.errors);
    let bad: Vec<_> = readings(&o).into_iter().map(|(_, t, v, q)| (t, v, q)).collect();
    assert!(bad.contains(&(temp, None, Quality::Bad(BadReason::Decode))));
    assert!(bad.contains(&(mode, None, Quality::Bad(BadReason::Decode))));
    let o = r.on_message(
        "plant/line-1/m3/state",
        br#"{"temp": "hot", "mode": "AUTO", "ts": 1}"#,
        false,
        1,
    );
    assert_eq!(o.errors.len(), 1, "{:?}", o.errors);
    // The error is logged: it says what the value is, never the value (it may be withheld data).
    assert!(o.errors[0].contains("a text of 3 characters"), "{:?}", o.errors);
    assert!(!o.errors[0].contains("hot"), "{:?}", o.errors);
    assert!(
        readings(&o).contains(&(1, mode, Some(Value::Text("AUTO".into())), Quality::Good)),
        "the good field is read"
    );
    let o = r.on_message("plant/line-1/speed", b"\xff\xfe", false, 1);
    assert_eq!(readings(&o), vec![(1, speed, None, Quality::Bad(BadReason::Decode))]);
    let o = r.on_message("plant/line-1/speed", b"OP-0042", false, 1);
    assert_eq!(o.errors.len(), 1, "{:?}", o.errors);
    assert!(!o.errors[0].contains("OP-0042"), "{:?}", o.errors);
    assert!(o.errors[0].contains("a 7-byte payload"), "{:?}", o.errors);
    let o = r.on_message("plant/x/alarm", b"on", false, 1);
    assert_eq!(
        readings(&o),
        vec![(1, tag(&plan, "any_alarm"), Some(Value::Bool(true)), Quality::Good)]
    );
}

fn payload(seq: u64, metrics: Vec<Metric>) -> Vec<u8> {
    sparkplug::encode(seq, 1_000, metrics)
}

use sparkplug::metric;

#[test]
fn sparkplug_births_teach_aliases_and_deaths_make_tags_stale() {
    let (mut r, plan) = router();
    let (level, uptime) = (tag(&plan, "tank-a_level"), tag(&plan, "node_uptime"));
    // Data before any birth: ask for one, read nothing.
    let o = r.on_message("spBv1.0/G1/DDATA/edge-1/tank-a", &payload(7, vec![]), false, 1);
    assert_eq!(
        o.rebirth.as_ref().map(|(t, _)| t.as_str()),
        Some("spBv1.0/G1/NCMD/edge-1")
    );
    let req = Payload::decode(o.rebirth.expect("asked").1.as_slice()).expect("decodes");
    assert_eq!(req.metrics[0].name.as_deref(), Some("Node Control/Rebirth"));
    assert_eq!(req.metrics[0].value, Some(MetricValue::Boolean(true)));
    assert!(o.batches.is_empty());

    let nbirth = payload(
        0,
        vec![
            metric(Some("bdSeq"), 0, datatype::INT64, MetricValue::Long(4)),
            metric(Some("Uptime"), 1, datatype::UINT32, MetricValue::Int(100)),
        ],
    );
    let o = r.on_message("spBv1.0/G1/NBIRTH/edge-1", &nbirth, false, 1);
    assert_eq!(
        readings(&o),
        vec![(1_000, uptime, Some(Value::UInt(100)), Quality::Good)]
    );
    let dbirth = payload(
        1,
        vec![metric(Some("Tank/Level"), 2, datatype::FLOAT, MetricValue::Float(1.5))],
    );
    let o = r.on_message("spBv1.0/G1/DBIRTH/edge-1/tank-a", &dbirth, false, 1);
    assert_eq!(
        readings(&o),
        vec![(1_000, level, Some(Value::Float(1.5)), Quality::Good)]
    );
    let mut m = metric(None, 2, 0, MetricValue::Float(2.25));
    m.timestamp = Some(2_000);
    let o = r.on_message("spBv1.0/G1/DDATA/edge-1/tank-a", &payload(2, vec![m]), false, 1);
    assert_eq!(
        readings(&o),
        vec![(2_000, level, Some(Value::Float(2.25)), Quality::Good)]
    );
    assert!(o.rebirth.is_none() && o.errors.is_empty());

    // A death of an older session is ignored; the current one makes every tag stale.
    let death = |bd| {
        payload(
            0,
            vec![metric(Some("bdSeq"), 0, datatype::INT64, MetricValue::Long(bd))],
        )
    };
    assert!(r
        .on_message("spBv1.0/G1/NDEATH/edge-1", &death(3), false, 5)
        .batches
        .is_empty());
    let o = r.on_message("spBv1.0/G1/NDEATH/edge-1", &death(4), false, 5);
    let mut got = readings(&o);
    got.sort_by_key(|x| x.1);
    let mut want = vec![(5, level, None, Quality::Stale), (5, uptime, None, Quality::Stale)];
    want.sort_by_key(|x| x.1);
    assert_eq!(got, want);
}

#[test]
fn a_sequence_gap_asks_for_a_rebirth_and_is_counted() {
    let (mut r, plan) = router();
    let uptime = tag(&plan, "node_uptime");
    let nbirth = payload(
        0,
        vec![metric(Some("Uptime"), 1, datatype::UINT64, MetricValue::Long(1))],
    );
    r.on_message("spBv1.0/G1/NBIRTH/edge-1", &nbirth, false, 1);
    let o = r.on_message(
        "spBv1.0/G1/NDATA/edge-1",
        &payload(1, vec![metric(None, 1, 0, MetricValue::Long(2))]),
        false,
        1,
    );
    assert!(o.rebirth.is_none() && o.lost == 0);
    let o = r.on_message(
        "spBv1.0/G1/NDATA/edge-1",
        &payload(5, vec![metric(None, 1, 0, MetricValue::Long(6))]),
        false,
        1,
    );
    assert_eq!(o.lost, 3, "seq 2, 3 and 4 are missing");
    assert!(o.rebirth.is_some());
    assert_eq!(
        readings(&o),
        vec![(1_000, uptime, Some(Value::UInt(6)), Quality::Good)],
        "the data still counts"
    );
    // seq wraps at 255.
    for s in 6..=255 {
        r.on_message("spBv1.0/G1/NDATA/edge-1", &payload(s, vec![]), false, 1);
    }
    let o = r.on_message("spBv1.0/G1/NDATA/edge-1", &payload(0, vec![]), false, 1);
    assert_eq!(o.lost, 0);
    // An alias the birth did not announce: a rebirth is due (but not more than once per 2 s).
    let o = r.on_message(
        "spBv1.0/G1/NDATA/edge-1",
        &payload(1, vec![metric(None, 99, 0, MetricValue::Long(6))]),
        false,
        1,
    );
    assert_eq!(o.errors.len(), 1);
    assert!(o.rebirth.is_none(), "asked for one less than 2 s ago");
    // Garbage on a Sparkplug topic: counted, the node's tags bad.
    let o = r.on_message("spBv1.0/G1/NDATA/edge-1", b"\x0a\xff\xff", false, 1);
    assert_eq!(o.errors.len(), 1);
    assert_eq!(readings(&o), vec![(1, uptime, None, Quality::Bad(BadReason::Decode))]);
}

#[test]
fn topic_filters_match_as_mqtt_says() {
    assert!(topic_matches("a/+/c", "a/b/c"));
    assert!(topic_matches("a/+x/c", "a/b/c"));
    assert!(topic_matches("a/#", "a"));
    assert!(topic_matches("a/#", "a/b/c"));
    assert!(!topic_matches("a/+/c", "a/b/c/d"));
    assert!(!topic_matches("a/+", "a"));
    assert!(!topic_matches("a/b", "a/c"));
}

/// A topic segment with a control character (here U+0000, as a hostile publisher could send on a
/// wildcard) is no name of ours: counted as an error and routed nowhere.
#[test]
fn topics_with_control_characters_are_not_routed() {
    let (mut r, _) = router();
    let o = r.on_message("plant/line-1\u{0}/m3/state", br#"{"temp": 21.5}"#, false, 5);
    assert!(o.batches.is_empty());
    assert_eq!(o.errors.len(), 1, "{:?}", o.errors);
    assert!(o.errors[0].contains("control character"), "{:?}", o.errors);
}
