//! Sparkplug B (Eclipse Sparkplug 3.0): the payload and the topic namespace, shared by the MQTT
//! source (devices that speak Sparkplug) and the Sparkplug upstream encoding.
//!
//! The payload is the specification's protobuf `Payload` message (proto2). Only the parts plantmesh
//! reads or writes are declared here, with the specification's field numbers; anything else in a
//! payload (data sets, templates, metadata, extensions) is skipped by the decoder, as protobuf does
//! with unknown fields.

use crate::model::Value;

/// The topic namespace of Sparkplug B.
pub const NAMESPACE: &str = "spBv1.0";

#[derive(Clone, PartialEq, prost::Message)]
pub struct Payload {
    /// Milliseconds since the epoch (UTC) when the message was sent.
    #[prost(uint64, optional, tag = "1")]
    pub timestamp: Option<u64>,
    #[prost(message, repeated, tag = "2")]
    pub metrics: Vec<Metric>,
    /// 0..=255, one more per message of an edge node (NBIRTH is 0).
    #[prost(uint64, optional, tag = "3")]
    pub seq: Option<u64>,
    #[prost(string, optional, tag = "4")]
    pub uuid: Option<String>,
    #[prost(bytes = "vec", optional, tag = "5")]
    pub body: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Metric {
    /// On births (and in DATA messages of edge nodes that use no aliases).
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(uint64, optional, tag = "2")]
    pub alias: Option<u64>,
    /// Acquisition time, milliseconds since the epoch (UTC).
    #[prost(uint64, optional, tag = "3")]
    pub timestamp: Option<u64>,
    #[prost(uint32, optional, tag = "4")]
    pub datatype: Option<u32>,
    #[prost(bool, optional, tag = "5")]
    pub is_historical: Option<bool>,
    #[prost(bool, optional, tag = "6")]
    pub is_transient: Option<bool>,
    #[prost(bool, optional, tag = "7")]
    pub is_null: Option<bool>,
    #[prost(message, optional, tag = "9")]
    pub properties: Option<PropertySet>,
    #[prost(oneof = "MetricValue", tags = "10, 11, 12, 13, 14, 15, 16")]
    pub value: Option<MetricValue>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum MetricValue {
    #[prost(uint32, tag = "10")]
    Int(u32),
    #[prost(uint64, tag = "11")]
    Long(u64),
    #[prost(float, tag = "12")]
    Float(f32),
    #[prost(double, tag = "13")]
    Double(f64),
    #[prost(bool, tag = "14")]
    Boolean(bool),
    #[prost(string, tag = "15")]
    String(String),
    #[prost(bytes = "vec", tag = "16")]
    Bytes(Vec<u8>),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PropertySet {
    #[prost(string, repeated, tag = "1")]
    pub keys: Vec<String>,
    #[prost(message, repeated, tag = "2")]
    pub values: Vec<PropertyValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PropertyValue {
    #[prost(uint32, optional, tag = "1")]
    pub r#type: Option<u32>,
    #[prost(bool, optional, tag = "2")]
    pub is_null: Option<bool>,
    #[prost(oneof = "PropertyValueKind", tags = "3, 4, 5, 6, 7, 8, 9")]
    pub value: Option<PropertyValueKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum PropertyValueKind {
    #[prost(uint32, tag = "3")]
    Int(u32),
    #[prost(uint64, tag = "4")]
    Long(u64),
    #[prost(float, tag = "5")]
    Float(f32),
    #[prost(double, tag = "6")]
    Double(f64),
    #[prost(bool, tag = "7")]
    Boolean(bool),
    #[prost(string, tag = "8")]
    String(String),
    #[prost(message, tag = "9")]
    PropertySet(PropertySet),
}

/// Sparkplug data type codes (the specification's `DataType` enumeration).
pub mod datatype {
    pub const INT8: u32 = 1;
    pub const INT16: u32 = 2;
    pub const INT32: u32 = 3;
    pub const INT64: u32 = 4;
    pub const UINT8: u32 = 5;
    pub const UINT16: u32 = 6;
    pub const UINT32: u32 = 7;
    pub const UINT64: u32 = 8;
    pub const FLOAT: u32 = 9;
    pub const DOUBLE: u32 = 10;
    pub const BOOLEAN: u32 = 11;
    pub const STRING: u32 = 12;
    pub const DATETIME: u32 = 13;
    pub const TEXT: u32 = 14;
    pub const UUID: u32 = 15;
    pub const PROPERTY_SET: u32 = 20;
}

/// A metric's value as plantmesh reads it, by the metric's data type; `None` for a null metric and
/// `Err` for a value that does not fit its type, or a type plantmesh does not read (data sets,
/// templates, files, bytes, arrays).
pub fn value_of(m: &Metric, datatype: u32) -> Result<Option<Value>, String> {
    use datatype::*;
    if m.is_null == Some(true) {
        return Ok(None);
    }
    let v = match (datatype, &m.value) {
        (INT8 | INT16 | INT32, Some(MetricValue::Int(x))) => Value::Int(i64::from(*x as i32)),
        (INT64, Some(MetricValue::Long(x))) => Value::Int(*x as i64),
        (UINT8 | UINT16 | UINT32, Some(MetricValue::Int(x))) => Value::UInt(u64::from(*x)),
        (UINT64 | DATETIME, Some(MetricValue::Long(x))) => Value::UInt(*x),
        (FLOAT, Some(MetricValue::Float(x))) => Value::Float(f64::from(*x)),
        (DOUBLE, Some(MetricValue::Double(x))) => Value::Float(*x),
        (BOOLEAN, Some(MetricValue::Boolean(b))) => Value::Bool(*b),
        (STRING | TEXT | UUID, Some(MetricValue::String(s))) => Value::Text(s.clone()),
        (_, None) => return Err("metric has neither a value nor is_null".into()),
        // The kind, never the value: it may be data governance withholds, and errors are logged.
        (t, Some(v)) => {
            return Err(format!(
                "data type {t} with a value of the wrong kind ({})",
                value_kind(v)
            ))
        }
    };
    Ok(Some(v))
}

fn value_kind(v: &MetricValue) -> &'static str {
    match v {
        MetricValue::Int(_) => "int",
        MetricValue::Long(_) => "long",
        MetricValue::Float(_) => "float",
        MetricValue::Double(_) => "double",
        MetricValue::Boolean(_) => "boolean",
        MetricValue::String(_) => "string",
        _ => "other",
    }
}

/// The Sparkplug data type and value that carry a plantmesh value (numbers as Int64, UInt64 or
/// Double; text as String).
pub fn metric_value(v: &Value) -> (u32, MetricValue) {
    match v {
        Value::Bool(b) => (datatype::BOOLEAN, MetricValue::Boolean(*b)),
        Value::Int(i) => (datatype::INT64, MetricValue::Long(*i as u64)),
        Value::UInt(u) => (datatype::UINT64, MetricValue::Long(*u)),
        Value::Float(f) => (datatype::DOUBLE, MetricValue::Double(*f)),
        Value::Text(s) => (datatype::STRING, MetricValue::String(s.clone())),
        Value::Array(_) => (datatype::STRING, MetricValue::String(v.to_json().to_string())),
    }
}

/// A property value of a property set.
pub fn property(key: &str, v: PropertyValueKind) -> (String, PropertyValue) {
    let t = match &v {
        PropertyValueKind::Int(_) => datatype::INT32,
        PropertyValueKind::Long(_) => datatype::INT64,
        PropertyValueKind::Float(_) => datatype::FLOAT,
        PropertyValueKind::Double(_) => datatype::DOUBLE,
        PropertyValueKind::Boolean(_) => datatype::BOOLEAN,
        PropertyValueKind::String(_) => datatype::STRING,
        PropertyValueKind::PropertySet(_) => datatype::PROPERTY_SET,
    };
    (
        key.to_string(),
        PropertyValue {
            r#type: Some(t),
            is_null: None,
            value: Some(v),
        },
    )
}

/// Builds a property set from `(key, value)` pairs.
pub fn property_set(items: impl IntoIterator<Item = (String, PropertyValue)>) -> PropertySet {
    let (keys, values) = items.into_iter().unzip();
    PropertySet { keys, values }
}

/// The message types of the Sparkplug topic namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    NBirth,
    NDeath,
    DBirth,
    DDeath,
    NData,
    DData,
    NCmd,
    DCmd,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::NBirth => "NBIRTH",
            Kind::NDeath => "NDEATH",
            Kind::DBirth => "DBIRTH",
            Kind::DDeath => "DDEATH",
            Kind::NData => "NDATA",
            Kind::DData => "DDATA",
            Kind::NCmd => "NCMD",
            Kind::DCmd => "DCMD",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        [
            Kind::NBirth,
            Kind::NDeath,
            Kind::DBirth,
            Kind::DDeath,
            Kind::NData,
            Kind::DData,
            Kind::NCmd,
            Kind::DCmd,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// A topic of an edge node or device: `spBv1.0/{group}/{kind}/{node}[/{device}]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic<'a> {
    pub group: &'a str,
    pub kind: Kind,
    pub node: &'a str,
    pub device: Option<&'a str>,
}

impl<'a> Topic<'a> {
    /// Parses an edge-node or device topic; `None` for anything else (STATE, other namespaces).
    pub fn parse(topic: &'a str) -> Option<Topic<'a>> {
        let mut parts = topic.split('/');
        if parts.next()? != NAMESPACE {
            return None;
        }
        let group = parts.next()?;
        let kind = Kind::parse(parts.next()?)?;
        let node = parts.next()?;
        let device = parts.next();
        if parts.next().is_some() || group.is_empty() || node.is_empty() {
            return None;
        }
        let device_kind = matches!(kind, Kind::DBirth | Kind::DDeath | Kind::DData | Kind::DCmd);
        if device_kind != device.is_some() {
            return None;
        }
        Some(Topic {
            group,
            kind,
            node,
            device,
        })
    }
}

/// The topic of a message of an edge node (`device: None`) or one of its devices.
pub fn topic(group: &str, kind: Kind, node: &str, device: Option<&str>) -> String {
    match device {
        Some(d) => format!("{NAMESPACE}/{group}/{}/{node}/{d}", kind.as_str()),
        None => format!("{NAMESPACE}/{group}/{}/{node}", kind.as_str()),
    }
}

/// The STATE topic of a primary host application (Sparkplug 3.0).
pub fn state_topic(host_id: &str) -> String {
    format!("{NAMESPACE}/STATE/{host_id}")
}

/// A metric as an edge node writes it: named and typed on a birth (`name: Some`), by alias alone
/// in data.
pub fn metric(name: Option<&str>, alias: u64, datatype: u32, value: MetricValue) -> Metric {
    Metric {
        name: name.map(str::to_string),
        alias: Some(alias),
        datatype: name.map(|_| datatype),
        value: Some(value),
        ..Default::default()
    }
}

/// An encoded payload: message `seq`, sent at `ts`.
pub fn encode(seq: u64, ts: u64, metrics: Vec<Metric>) -> Vec<u8> {
    use prost::Message;
    Payload {
        timestamp: Some(ts),
        seq: Some(seq),
        metrics,
        ..Default::default()
    }
    .encode_to_vec()
}

/// The metric an NCMD carries to ask an edge node to publish its births again.
pub const REBIRTH_METRIC: &str = "Node Control/Rebirth";

/// An NCMD payload asking for a rebirth.
pub fn rebirth_request(now: u64) -> Vec<u8> {
    use prost::Message;
    Payload {
        timestamp: Some(now),
        metrics: vec![Metric {
            name: Some(REBIRTH_METRIC.into()),
            timestamp: Some(now),
            datatype: Some(datatype::BOOLEAN),
            value: Some(MetricValue::Boolean(true)),
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn topics_parse_and_build() {
        let t = Topic::parse("spBv1.0/plant/DDATA/edge-1/filler").expect("device topic");
        assert_eq!(
            t,
            Topic {
                group: "plant",
                kind: Kind::DData,
                node: "edge-1",
                device: Some("filler")
            }
        );
        assert_eq!(
            topic("plant", Kind::DData, "edge-1", Some("filler")),
            "spBv1.0/plant/DDATA/edge-1/filler"
        );
        assert_eq!(
            Topic::parse("spBv1.0/plant/NBIRTH/edge-1").map(|t| t.kind),
            Some(Kind::NBirth)
        );
        for bad in [
            "spBv1.0/plant/NBIRTH/edge-1/dev",
            "spBv1.0/plant/DDATA/edge-1",
            "spBv1.0/STATE/host",
            "spAv1.0/plant/NDATA/edge",
            "spBv1.0/plant/XDATA/edge",
            "spBv1.0/plant/DDATA/edge/dev/extra",
        ] {
            assert_eq!(Topic::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn values_follow_their_data_type() {
        let m = |v| Metric {
            value: Some(v),
            ..Default::default()
        };
        use datatype::*;
        assert_eq!(
            value_of(&m(MetricValue::Int(u32::MAX)), INT32),
            Ok(Some(Value::Int(-1)))
        );
        assert_eq!(
            value_of(&m(MetricValue::Int(u32::MAX)), UINT32),
            Ok(Some(Value::UInt(4_294_967_295)))
        );
        assert_eq!(
            value_of(&m(MetricValue::Long(u64::MAX)), INT64),
            Ok(Some(Value::Int(-1)))
        );
        assert_eq!(
            value_of(&m(MetricValue::Float(1.5)), FLOAT),
            Ok(Some(Value::Float(1.5)))
        );
        assert_eq!(
            value_of(&m(MetricValue::Boolean(true)), BOOLEAN),
            Ok(Some(Value::Bool(true)))
        );
        assert!(
            value_of(&m(MetricValue::Double(1.0)), INT32).is_err(),
            "wrong kind for the type"
        );
        assert!(
            value_of(&m(MetricValue::Bytes(vec![1])), 17).is_err(),
            "bytes are not read"
        );
        let null = Metric {
            is_null: Some(true),
            ..Default::default()
        };
        assert_eq!(value_of(&null, DOUBLE), Ok(None));
        for v in [
            Value::Int(-5),
            Value::UInt(7),
            Value::Float(2.25),
            Value::Bool(false),
            Value::Text("x".into()),
        ] {
            let (t, mv) = metric_value(&v);
            assert_eq!(value_of(&m(mv), t), Ok(Some(v)));
        }
    }

    #[test]
    fn the_payload_round_trips_and_matches_the_specified_wire_numbers() {
        let p = Payload {
            timestamp: Some(1),
            seq: Some(2),
            metrics: vec![Metric {
                alias: Some(3),
                datatype: Some(datatype::DOUBLE),
                value: Some(MetricValue::Double(0.5)),
                ..Default::default()
            }],
            ..Default::default()
        };
        let bytes = p.encode_to_vec();
        // timestamp (1, varint) = 1; metrics (2, len); inside: alias (2) = 3, datatype (4) = 10,
        // double_value (13, fixed64); seq (3) = 2.
        let mut expect = vec![0x08, 0x01, 0x12, 13, 0x10, 0x03, 0x20, 0x0a, 0x69];
        expect.extend_from_slice(&0.5f64.to_le_bytes());
        expect.extend_from_slice(&[0x18, 0x02]);
        assert_eq!(bytes, expect);
        assert_eq!(Payload::decode(bytes.as_slice()).expect("decodes"), p);
        assert!(Payload::decode(&[0x12, 0xff, 0x01][..]).is_err(), "truncated");
    }
}
