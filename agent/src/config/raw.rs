//! Config files as written: serde types that mirror the TOML one to one. `validate` turns them into
//! the typed [`super::Plan`]. Spanned values are the ones a semantic error has to point at.

use super::units::{ByteSize, ConfigDuration};
use serde::Deserialize;
use toml::Spanned;

/// The gateway file (`agent.toml`), owned by the OT engineer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gateway {
    /// Who this agent is and where it stands.
    pub agent: Agent,
    /// The upstream MQTT broker; without it, an in-process broker on loopback is used.
    pub upstream: Option<Upstream>,
    /// The durable buffer between collection and publishing.
    #[serde(default)]
    pub buffer: Buffer,
    /// Device connections and their tags.
    #[serde(default)]
    pub devices: Vec<Device>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agent {
    /// Agent id, unique in the site (used in topics and the MQTT client id).
    pub id: Spanned<String>,
    /// Site, area and line names used in the topic template.
    pub site: Spanned<String>,
    pub area: Spanned<String>,
    pub line: Spanned<String>,
    /// Optional ISA-95 levels above the site and below the line: the `{enterprise}` and `{cell}`
    /// topic placeholders; the enterprise is also part of each product's URN.
    pub enterprise: Option<Spanned<String>>,
    pub cell: Option<Spanned<String>>,
    /// Where the buffer and agent state live. Relative paths are relative to the gateway file.
    pub data_dir: Option<String>,
    /// How often each product's SLIs are published (retained, on `_sli`); default 10s.
    pub sli_interval: Option<Spanned<ConfigDuration>>,
    /// Loopback address of the Prometheus `/metrics` and `/health` endpoint; default
    /// `127.0.0.1:9464`; `off` disables it.
    pub metrics_listen: Option<Spanned<String>>,
    /// `"builtin-defaults"`: run without a governance file, on the built-in rules (the agent warns
    /// at every start). Without it, a config directory must have a governance.toml.
    pub governance: Option<Spanned<String>>,
    /// Reload by itself when the config files change: checked this often, and a change is
    /// reloaded once it has stayed for one more period (an editor's save in several writes, a
    /// copy of several files). Default: off (SIGHUP and `plantmesh reload` only).
    pub watch_config: Option<Spanned<ConfigDuration>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// `mqtt://host:port` or `mqtts://host:port` (TLS).
    pub url: Spanned<String>,
    /// MQTT protocol version: `"3.1.1"` or `"5"`.
    #[serde(default)]
    pub protocol: Option<Spanned<String>>,
    /// MQTT client id; default `plantmesh-{agent.id}`.
    pub client_id: Option<String>,
    pub keep_alive: Option<ConfigDuration>,
    pub username: Option<String>,
    /// Never allowed: secrets are read from a file or the environment.
    pub password: Option<Spanned<toml::Value>>,
    /// File holding the broker password (trailing newline ignored).
    pub password_file: Option<String>,
    /// Environment variable holding the broker password.
    pub password_env: Option<String>,
    /// Let a password cross plain `mqtt://` (readable by anyone on the network); the agent warns
    /// at every start. Default: refused.
    pub allow_insecure_credentials: Option<Spanned<bool>>,
    /// CA certificate(s) (PEM) to verify the broker; default: none, which is an error for `mqtts`.
    pub ca_file: Option<String>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub cert_file: Option<String>,
    pub key_file: Option<Spanned<String>>,
    /// Most messages awaiting PUBACK at once (1..=65535); default 32.
    pub max_inflight: Option<Spanned<u32>>,
    /// Most records in one product message; default 100.
    pub max_records_per_message: Option<Spanned<u32>>,
    /// Most bytes in one product message; default 256KiB.
    pub max_message_bytes: Option<ByteSize>,
    /// Replaced by `backlog_bytes_per_second` (refused with a pointer to it).
    pub backlog_rate: Option<Spanned<toml::Value>>,
    /// A cap on the backlog's bytes per second (a cellular or satellite uplink); default: none, the
    /// backlog drains as fast as the broker acknowledges, live data first.
    pub backlog_bytes_per_second: Option<Spanned<ByteSize>>,
    /// Reconnect backoff bounds; defaults 500ms and 30s.
    pub reconnect_min: Option<ConfigDuration>,
    pub reconnect_max: Option<ConfigDuration>,
    /// Product data as `json` envelopes (default) or as a Sparkplug B edge node (`sparkplug`).
    pub encoding: Option<Spanned<String>>,
    /// Sparkplug B identity, with `encoding = "sparkplug"`.
    pub sparkplug: Option<Spanned<Sparkplug>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sparkplug {
    /// Sparkplug group id; default: the agent's site.
    pub group_id: Option<Spanned<String>>,
    /// Sparkplug edge node id; default: the agent id.
    pub edge_node_id: Option<Spanned<String>>,
    /// Host application id of the primary host: births and data wait for its STATE to be online.
    pub primary_host: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Buffer {
    /// Upper bound of all buffered messages; default 256MiB.
    pub max_bytes: Option<Spanned<ByteSize>>,
    /// The most time a record the broker has not acknowledged waits to be committed; default 200ms.
    pub commit_interval: Option<Spanned<ConfigDuration>>,
    /// `unacknowledged` (default): write only what the broker has not acknowledged within
    /// `commit_interval`; `always`: commit every record before it may be sent.
    pub write: Option<Spanned<String>>,
    /// Free space on the data directory's file system below which a WARN and a metric say so,
    /// before the disk is full; default 64MiB.
    pub free_space_warning: Option<Spanned<ByteSize>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    /// Device id, unique in the gateway file; tags are referenced as `<device>.<tag>`.
    pub id: Spanned<String>,
    /// `modbus_tcp`, `modbus_rtu`, `opcua`, `sensor_node` or `mqtt`.
    pub protocol: Spanned<String>,
    /// MQTT: the device-side broker, `mqtt://host:port` or `mqtts://host:port` (TLS).
    pub url: Option<Spanned<String>>,
    /// MQTT: client id; default `plantmesh-{agent.id}-{device id}`.
    pub client_id: Option<String>,
    /// MQTT over TLS: CA certificate(s) (PEM) to verify the broker.
    pub ca_file: Option<String>,
    /// Modbus TCP: `host:port` of the Modbus TCP server.
    pub address: Option<Spanned<String>>,
    /// Modbus RTU and sensor nodes: the serial port, e.g. `/dev/ttyUSB0`.
    pub port: Option<Spanned<String>>,
    /// Serial line speed; default 19200 (Modbus RTU), 115200 (sensor nodes).
    pub baud: Option<Spanned<u32>>,
    /// Modbus RTU: `even` (default, as the Modbus serial line spec requires), `odd` or `none`.
    pub parity: Option<Spanned<String>>,
    /// Modbus RTU: 1 or 2; default 1 (2 with parity `none`, to keep 11 bits per character).
    pub stop_bits: Option<Spanned<u32>>,
    /// Modbus RTU: 7 or 8; default 8.
    pub data_bits: Option<Spanned<u32>>,
    /// Modbus RTU: silence between frames; default 3.5 characters (1.75 ms above 19200 baud).
    pub inter_frame: Option<Spanned<ConfigDuration>>,
    /// Sensor nodes: no frame for this long marks the node's channels bad (`link_lost`); default 5s.
    pub stale_after: Option<Spanned<ConfigDuration>>,
    /// OPC UA: `opc.tcp://host:port[/path]`.
    pub endpoint: Option<Spanned<String>>,
    /// OPC UA: `Aes256_Sha256_RsaPss` (default), `Aes128_Sha256_RsaOaep`, `Basic256Sha256`, `None`.
    pub security_policy: Option<Spanned<String>>,
    /// OPC UA: `SignAndEncrypt` (default), `Sign`, `None`.
    pub security_mode: Option<Spanned<String>>,
    /// OPC UA: `anonymous` (default), `username`, `x509`.
    pub identity: Option<Spanned<String>>,
    /// OPC UA `username` identity.
    pub username: Option<String>,
    /// Never allowed: secrets are read from a file or the environment.
    pub password: Option<Spanned<toml::Value>>,
    pub password_file: Option<String>,
    pub password_env: Option<String>,
    /// MQTT: let a password cross plain `mqtt://`; OPC UA: let a user identity go over a channel
    /// that is not `SignAndEncrypt`. The agent warns at every start. Default: refused.
    pub allow_insecure_credentials: Option<Spanned<bool>>,
    /// OPC UA `x509` identity: user certificate (DER or PEM) and private key.
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    /// OPC UA: subscription publishing interval; default 1s.
    pub publishing_interval: Option<Spanned<ConfigDuration>>,
    /// OPC UA: `subscription` (default) or `polling` (Read service every poll_interval).
    pub mode: Option<Spanned<String>>,
    /// OPC UA: record time from the `source` (default) or `server` timestamp.
    pub timestamps: Option<Spanned<String>>,
    /// Default unit id for the device's tags (0..=255); default 1.
    pub unit_id: Option<Spanned<u32>>,
    /// Time between polls; default 1s.
    pub poll_interval: Option<Spanned<ConfigDuration>>,
    /// Time to wait for one response; default 1s.
    pub timeout: Option<Spanned<ConfigDuration>>,
    /// Most unused registers (or bits) a coalesced read may span between two tags; default 8 (bits: 64).
    pub max_gap: Option<Spanned<u32>>,
    /// Most registers in one read (1..=125); default 125.
    pub max_registers_per_read: Option<Spanned<u32>>,
    /// Most bits in one read (1..=2000); default 2000.
    pub max_bits_per_read: Option<Spanned<u32>>,
    /// MQTT devices: the largest message taken (default 1MiB); a larger one is counted and skipped.
    pub max_message_bytes: Option<Spanned<ByteSize>>,
    #[serde(default)]
    pub tags: Vec<Tag>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tag {
    /// Tag name, unique in the device.
    pub name: Spanned<String>,
    /// The tag's classification, a class of the governance file: classification belongs to the
    /// source, so every field reading the tag (and every field derived from those) gets this class
    /// or a stricter one.
    pub classification: Option<Spanned<String>>,
    /// Modbus: `holding`, `input`, `coil` or `discrete_input`.
    pub table: Option<Spanned<String>>,
    /// Modbus: zero-based protocol address (0..=65535).
    pub address: Option<Spanned<i64>>,
    /// OPC UA: NodeId, e.g. `ns=2;s=Oven.Zone1`, `i=2258`, `ns=1;g=...`, `ns=1;b=...`. With
    /// `namespace_uri`, write it without `ns=`.
    pub node_id: Option<Spanned<String>>,
    /// OPC UA: namespace URI, resolved to its index at every connect (indexes can change).
    pub namespace_uri: Option<String>,
    /// OPC UA: sampling interval; default: the device's publishing interval.
    pub sampling_interval: Option<Spanned<ConfigDuration>>,
    /// OPC UA: server-side queue size; default 1.
    pub queue_size: Option<Spanned<i64>>,
    /// OPC UA: data change deadband value, with `deadband_type` `absolute` (default) or `percent`.
    pub deadband: Option<Spanned<f64>>,
    pub deadband_type: Option<Spanned<String>>,
    /// OPC UA: the value is a one-dimensional array.
    pub array: Option<bool>,
    /// Modbus value type: bool, u16, i16, u32, i32, u64, i64, f32, f64, string. Default: bool for bit
    /// tables, u16 otherwise. OPC UA: the built-in type name (Boolean, SByte, Byte, Int16, UInt16,
    /// Int32, UInt32, Int64, UInt64, Float, Double, String, DateTime, ByteString, ...); default Double.
    #[serde(rename = "type")]
    pub data_type: Option<Spanned<String>>,
    /// ABCD (big endian), CDAB (word swap), BADC (byte swap), DCBA (little endian); default ABCD.
    pub byte_order: Option<Spanned<String>>,
    /// For `bool` tags in register tables: the bit (0 = least significant).
    pub bit: Option<Spanned<i64>>,
    /// For `string` tags: length in registers (two characters each).
    pub length: Option<Spanned<i64>>,
    /// Overrides the device's unit id.
    pub unit_id: Option<Spanned<u32>>,
    /// value = raw * scale + offset (numeric tags only).
    pub scale: Option<Spanned<f64>>,
    pub offset: Option<f64>,
    /// Sensor nodes: the channel index; default: the channel of this name in the node's hello.
    pub channel: Option<Spanned<u32>>,
    /// MQTT: the topic, or a filter whose `+name` segments are captured into `{name}` in the tag
    /// name (`name = "{line}_temp"`, `topic = "plant/+line/temp"`).
    pub topic: Option<Spanned<String>>,
    /// MQTT: `json` (default with `pointer`), `plain` (the payload is the value) or `sparkplug`.
    pub payload: Option<Spanned<String>>,
    /// MQTT JSON: RFC 6901 pointer to the value, e.g. `/temperature` or `/axes/0/load`.
    pub pointer: Option<Spanned<String>>,
    /// MQTT JSON: pointer to the reading's time (epoch milliseconds, or RFC 3339 text); default:
    /// the time the message arrived.
    pub timestamp_pointer: Option<Spanned<String>>,
    /// MQTT Sparkplug B: `group/edge_node` or `group/edge_node/device`; segments may be `+name`.
    pub sparkplug: Option<Spanned<String>>,
    /// MQTT Sparkplug B: the metric name as its birth certificate announces it.
    pub metric: Option<Spanned<String>>,
}

/// A product file, owned by a domain team.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Product {
    /// Product id (lowercase letters, digits and `-`), unique in the gateway.
    pub id: Spanned<String>,
    pub name: String,
    /// Semantic version `MAJOR.MINOR.PATCH`.
    pub version: Spanned<String>,
    /// Owning domain, e.g. `production`, `quality`.
    pub domain: Spanned<String>,
    /// Owning team.
    pub owner: String,
    /// How to reach the owning team (mail, chat channel).
    #[serde(default)]
    pub contact: String,
    /// `draft`, `active` (default), `deprecated`, `retired`.
    pub status: Option<Spanned<String>>,
    /// What happens to a record that breaks the contract (type, range, required): `flag` (default:
    /// published with the field's quality saying why) or `drop` (counted and reported as a gap).
    pub on_violation: Option<Spanned<String>>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub publish: Publish,
    #[serde(default)]
    pub buffer: ProductBuffer,
    /// The service levels the owning team promises; measured and published on `_sli`.
    #[serde(default)]
    pub service_levels: ServiceLevels,
    pub fields: Vec<Field>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceLevels {
    /// Most age of the newest good value, e.g. "5s".
    pub freshness: Option<Spanned<ConfigDuration>>,
    /// How often a record is expected, e.g. "1s" (default: the publish interval or window, or the
    /// fastest poll of the product's devices).
    pub expected_interval: Option<Spanned<ConfigDuration>>,
    /// Target share of good values per SLI interval, 0..1, e.g. 0.99.
    pub completeness: Option<Spanned<f64>>,
    /// Target 99th percentile of read-to-PUBACK latency, e.g. "2s".
    pub latency_p99: Option<Spanned<ConfigDuration>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Publish {
    /// `every_sample` (default), `on_change`, `interval` or `window`.
    pub mode: Option<Spanned<String>>,
    /// For `interval`: the period.
    pub interval: Option<Spanned<ConfigDuration>>,
    /// For `window`: the tumbling window's length (windows align to multiples of it since the epoch).
    pub window: Option<Spanned<ConfigDuration>>,
    /// MQTT QoS of the product's messages: 1 (default) or 2. QoS 0 is not offered: it would give
    /// up at-least-once delivery.
    pub qos: Option<Spanned<u32>>,
    /// Most records in one message; default: the upstream `max_records_per_message`.
    pub max_records_per_message: Option<Spanned<u32>>,
    /// The Unified Namespace view: beside the product's messages, each field's latest value
    /// retained on `{topic}/{field}` (docs/wire-format.md). Default false.
    pub uns: Option<Spanned<bool>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductBuffer {
    /// This product's share of the buffer; default: the whole buffer.
    pub max_bytes: Option<Spanned<ByteSize>>,
    /// What happens when the share is full: `drop_oldest` (default), `reject_new`, `block`.
    pub full_policy: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Field {
    /// Field name in the product message.
    pub name: Spanned<String>,
    /// `<device>.<tag>` from the gateway file (or `derive` instead).
    pub source: Option<Spanned<String>>,
    /// A derived field: `sum`, `difference`, `product`, `ratio`, `share`, `min`, `max` or `mean`
    /// of the `inputs` (earlier numeric fields of the same product), then `scale` and `offset`.
    pub derive: Option<Spanned<String>>,
    pub inputs: Option<Spanned<Vec<String>>>,
    /// Logical type: `number`, `integer`, `boolean`, `string`. Default: from the tag.
    #[serde(rename = "type")]
    pub logical_type: Option<Spanned<String>>,
    /// Unit (UCUM code, e.g. `Cel`, `bar`, `1`).
    pub unit: Option<Spanned<String>>,
    /// value = tag value * scale + offset.
    pub scale: Option<f64>,
    pub offset: Option<f64>,
    /// For `on_change`: a change smaller than this is not a change (numeric fields).
    pub deadband: Option<Spanned<f64>>,
    /// Classification (a class of the governance file); default: the governance default.
    pub classification: Option<Spanned<String>>,
    /// The edge action for this field, when stricter than its class requires (never weaker).
    pub action: Option<Spanned<String>>,
    /// For `action = "coarsen"`.
    pub step: Option<Spanned<f64>>,
    /// The field must have a good value in every record.
    #[serde(default)]
    pub required: bool,
    /// Valid range `[min, max]` (numeric fields).
    pub range: Option<Spanned<[f64; 2]>>,
    /// For `mode = "window"`: `last` (default), `count`, `sum`, `min`, `max`, `mean`, or `delta` (the
    /// increase of a counter over the window, across rollovers).
    pub aggregate: Option<Spanned<String>>,
    /// For `aggregate = "delta"`: the counter's width (16, 32 or 64); default: from the tag's type.
    pub counter_bits: Option<Spanned<u32>>,
    #[serde(default)]
    pub description: String,
}

impl Field {
    /// The unit as written ("" when none).
    pub fn unit(&self) -> &str {
        self.unit.as_ref().map_or("", |u| u.get_ref().as_str())
    }
}

/// The governance file, owned by the platform group: what each classification requires at the
/// edge, what may go upstream, and what every product contract must say.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Governance {
    /// Topic of product messages: `{site}`, `{area}`, `{line}`, `{domain}`, `{product}`, `{major}`.
    pub topic_template: Option<Spanned<String>>,
    /// Topic of each field's UNS view (`[publish] uns`): the product placeholders, `{topic}` (the
    /// product's topic) and `{field}`; default `{topic}/{field}`.
    pub uns_topic_template: Option<Spanned<String>>,
    /// Classification of fields that do not name one; default `internal`.
    pub default_classification: Option<Spanned<String>>,
    /// Product keys that must be present and non-empty: `description`, `contact`, `status`, `unit`
    /// (on every numeric field).
    #[serde(default)]
    pub required_metadata: Vec<Spanned<String>>,
    /// File with the site secret for pseudonymisation (at least 32 bytes; mode 0600).
    pub pseudonymise_key_file: Option<Spanned<String>>,
    /// Classification levels and the edge action each requires.
    #[serde(default)]
    pub classes: std::collections::BTreeMap<String, Class>,
    /// What may leave the site. Without it nothing does: egress allows only what is written.
    pub egress: Option<Egress>,
    /// Which domains may publish under which topic prefixes.
    #[serde(default)]
    pub domains: Vec<DomainRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Class {
    /// `pass`, `coarsen`, `mask`, `pseudonymise` or `never` (never leaves the site).
    pub action: Spanned<String>,
    /// For `coarsen`: values are rounded to a multiple of this step.
    pub step: Option<Spanned<f64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Egress {
    /// Topic prefixes that may be published to; `"#"` alone: any topic; empty or absent: none.
    #[serde(default)]
    pub allow_topic_prefixes: Vec<Spanned<String>>,
    /// Classifications that may go upstream at all; empty: all but those whose action is `never`.
    #[serde(default)]
    pub allow_classes: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainRule {
    pub domain: Spanned<String>,
    /// Topic prefixes this domain's products must publish under.
    pub topic_prefixes: Vec<Spanned<String>>,
}

impl Device {
    /// Where each protocol-specific key was written (`None`: not written); each device kind reads
    /// some of them and refuses the rest (`sources::Protocol::keys`).
    pub fn written_keys(&self) -> Vec<(&'static str, Option<std::ops::Range<usize>>)> {
        vec![
            ("address", self.address.as_ref().map(Spanned::span)),
            ("port", self.port.as_ref().map(Spanned::span)),
            ("baud", self.baud.as_ref().map(Spanned::span)),
            ("parity", self.parity.as_ref().map(Spanned::span)),
            ("stop_bits", self.stop_bits.as_ref().map(Spanned::span)),
            ("data_bits", self.data_bits.as_ref().map(Spanned::span)),
            ("inter_frame", self.inter_frame.as_ref().map(Spanned::span)),
            ("stale_after", self.stale_after.as_ref().map(Spanned::span)),
            ("endpoint", self.endpoint.as_ref().map(Spanned::span)),
            ("security_policy", self.security_policy.as_ref().map(Spanned::span)),
            ("security_mode", self.security_mode.as_ref().map(Spanned::span)),
            ("identity", self.identity.as_ref().map(Spanned::span)),
            ("password", self.password.as_ref().map(Spanned::span)),
            (
                "publishing_interval",
                self.publishing_interval.as_ref().map(Spanned::span),
            ),
            ("mode", self.mode.as_ref().map(Spanned::span)),
            ("timestamps", self.timestamps.as_ref().map(Spanned::span)),
            ("unit_id", self.unit_id.as_ref().map(Spanned::span)),
            ("poll_interval", self.poll_interval.as_ref().map(Spanned::span)),
            ("timeout", self.timeout.as_ref().map(Spanned::span)),
            ("max_gap", self.max_gap.as_ref().map(Spanned::span)),
            (
                "max_registers_per_read",
                self.max_registers_per_read.as_ref().map(Spanned::span),
            ),
            ("max_bits_per_read", self.max_bits_per_read.as_ref().map(Spanned::span)),
            ("max_message_bytes", self.max_message_bytes.as_ref().map(Spanned::span)),
            ("url", self.url.as_ref().map(Spanned::span)),
            (
                "allow_insecure_credentials",
                self.allow_insecure_credentials.as_ref().map(Spanned::span),
            ),
        ]
    }
}

impl Tag {
    /// Where each protocol-specific key was written (`None`: not written).
    pub fn written_keys(&self) -> Vec<(&'static str, Option<std::ops::Range<usize>>)> {
        vec![
            ("table", self.table.as_ref().map(Spanned::span)),
            ("address", self.address.as_ref().map(Spanned::span)),
            ("node_id", self.node_id.as_ref().map(Spanned::span)),
            ("sampling_interval", self.sampling_interval.as_ref().map(Spanned::span)),
            ("queue_size", self.queue_size.as_ref().map(Spanned::span)),
            ("deadband", self.deadband.as_ref().map(Spanned::span)),
            ("deadband_type", self.deadband_type.as_ref().map(Spanned::span)),
            ("type", self.data_type.as_ref().map(Spanned::span)),
            ("byte_order", self.byte_order.as_ref().map(Spanned::span)),
            ("bit", self.bit.as_ref().map(Spanned::span)),
            ("length", self.length.as_ref().map(Spanned::span)),
            ("unit_id", self.unit_id.as_ref().map(Spanned::span)),
            ("scale", self.scale.as_ref().map(Spanned::span)),
            ("channel", self.channel.as_ref().map(Spanned::span)),
            ("topic", self.topic.as_ref().map(Spanned::span)),
            ("payload", self.payload.as_ref().map(Spanned::span)),
            ("pointer", self.pointer.as_ref().map(Spanned::span)),
            ("timestamp_pointer", self.timestamp_pointer.as_ref().map(Spanned::span)),
            ("sparkplug", self.sparkplug.as_ref().map(Spanned::span)),
            ("metric", self.metric.as_ref().map(Spanned::span)),
        ]
    }
}
