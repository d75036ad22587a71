//! Configuration: three kinds of file, parsed into raw serde types and validated into one typed [`Plan`].
//! Device kinds validate their own keys in their rooms under `sources/`; this module holds what is
//! shared (agent, buffer, upstream, products, governance) and puts the plan together.
//!
//! In: a config directory (`agent.toml`, `products/**/*.toml`, optional `governance.toml`) or a list of
//! files. Out: a [`Plan`] the runtime builds from, or [`Diagnostics`] naming every problem at
//! `file:line:column` with its key path and, where one exists, a suggestion. Validation never stops at
//! the first problem: an engineer fixing a file sees all of them at once.

pub mod contract;
pub mod diag;
#[cfg(test)]
mod docs_tests;
pub mod files;
pub mod raw;
mod ucum;
pub mod units;
pub(crate) mod validate;

pub use diag::{Diagnostic, Diagnostics};
// The device side of a plan lives with the sources, each kind in its room.
pub use crate::sources::modbus::config::{ByteOrder, Table};
pub use crate::sources::mqtt::config::{MqttDevicePlan, MqttPayload, MqttTagPlan};
pub use crate::sources::opcua::config::{Deadband, OpcUaDevicePlan, OpcUaIdentity, OpcUaSecurityMode, OpcUaTagPlan};
pub use crate::sources::serial::{Parity, SerialPlan};
pub use crate::sources::{DeviceKind, DevicePlan, Protocol, TagKind, TagPlan};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The default topic template for product messages (DESIGN.md section 4).
pub const DEFAULT_TOPIC_TEMPLATE: &str = "{site}/{area}/{line}/{domain}/{product}/v{major}";
/// The UNS view's topic of a field: under the product's own topic.
pub const DEFAULT_UNS_TOPIC_TEMPLATE: &str = "{topic}/{field}";

/// Everything the runtime needs, validated.
#[derive(Debug, Clone)]
pub struct Plan {
    pub agent: AgentPlan,
    /// `None`: run the in-process broker on loopback.
    pub upstream: Option<UpstreamPlan>,
    pub buffer: BufferPlan,
    pub devices: Vec<DevicePlan>,
    /// Every tag of every device; devices and fields refer to tags by index into this table.
    /// Shared with the sources rather than copied.
    pub tags: std::sync::Arc<[TagPlan]>,
    pub products: Vec<ProductPlan>,
    /// Products whose file says `status = "retired"`: not run; their retained descriptor, contract,
    /// catalog entry and SLI are cleared once their backlog has drained.
    pub retired: Vec<ProductPlan>,
    /// The platform's rules, as every product was checked against them.
    pub governance: GovernancePlan,
    /// Hash of every config file's bytes, in path order (FNV-1a 64, hex); reported in the status topic.
    pub config_hash: String,
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct AgentPlan {
    pub id: String,
    pub site: String,
    pub area: String,
    pub line: String,
    /// `None`: not set (the URN says `_`; a template with `{enterprise}` is refused).
    pub enterprise: Option<String>,
    pub cell: Option<String>,
    pub data_dir: PathBuf,
    pub sli_interval: Duration,
    /// `Some`: check the config files this often and reload a change that stayed one period.
    pub watch_config: Option<Duration>,
    /// `None`: no metrics endpoint.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// `metrics_listen` was set in the config: an address that cannot be bound fails the start
    /// (a supervisor probing `/health` would find nothing). The default address, when taken (a
    /// second agent on the host), is logged as an error and the agent runs without it.
    pub metrics_required: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttVersion {
    V311,
    V5,
}

#[derive(Debug, Clone)]
pub struct UpstreamPlan {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub version: MqttVersion,
    pub client_id: String,
    pub keep_alive: Duration,
    pub username: Option<String>,
    pub password: Option<SecretRef>,
    /// A password over plain MQTT, as `allow_insecure_credentials` allowed: warned at every start.
    pub insecure_credentials: bool,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub max_inflight: u16,
    pub max_records_per_message: usize,
    pub max_message_bytes: usize,
    /// Cap on the backlog's bytes per second; `None`: as fast as the broker acknowledges.
    pub backlog_bytes_per_second: Option<u64>,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// `Some`: product data goes out as a Sparkplug B edge node instead of JSON envelopes.
    pub sparkplug: Option<SparkplugPlan>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SparkplugPlan {
    pub group_id: String,
    pub edge_node_id: String,
    pub primary_host: Option<String>,
}

/// Where a secret is read from at start; never the secret itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    File(PathBuf),
    Env(String),
}

impl SecretRef {
    /// Reads the secret. A file must be readable by its owner only, like every key file.
    pub fn read(&self) -> Result<String, String> {
        match self {
            SecretRef::File(path) => {
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    let meta = std::fs::metadata(path)
                        .map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?;
                    let mode = meta.permissions().mode();
                    if mode & 0o077 != 0 {
                        return Err(format!(
                            "secret file {} is readable by group or others (mode {:o}); run: chmod 600 {}",
                            path.display(),
                            mode & 0o777,
                            path.display()
                        ));
                    }
                }
                std::fs::read_to_string(path)
                    .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
                    .map_err(|e| format!("cannot read secret file {}: {e}", path.display()))
            }
            SecretRef::Env(var) => {
                std::env::var(var).map_err(|_| format!("environment variable {var} (a secret reference) is not set"))
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct BufferPlan {
    pub max_bytes: u64,
    pub commit_interval: Duration,
    /// `[buffer] write = "always"`: every record is committed before it may be sent.
    pub commit_before_send: bool,
    /// `[buffer] free_space_warning`: bytes free on the data directory's file system below which
    /// the agent warns (and `plantmesh_buffer_disk_low` is 1).
    pub free_space_warning: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    Bool,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
    /// Fixed length in registers (Modbus); any text (OPC UA).
    Text(u16),
    /// A one-dimensional array (OPC UA).
    Array,
}

impl DataType {
    /// The name config files write (`f32`, `string`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "bool",
            DataType::U16 => "u16",
            DataType::I16 => "i16",
            DataType::U32 => "u32",
            DataType::I32 => "i32",
            DataType::U64 => "u64",
            DataType::I64 => "i64",
            DataType::F32 => "f32",
            DataType::F64 => "f64",
            DataType::Text(_) => "string",
            DataType::Array => "array",
        }
    }

    /// Registers one value occupies (1 for bits).
    pub fn registers(self) -> u16 {
        match self {
            DataType::Bool | DataType::U16 | DataType::I16 => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
            DataType::U64 | DataType::I64 | DataType::F64 => 4,
            DataType::Text(n) => n,
            DataType::Array => 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogicalType {
    Number,
    Integer,
    Boolean,
    String,
    Array,
}

impl LogicalType {
    pub fn as_str(self) -> &'static str {
        match self {
            LogicalType::Number => "number",
            LogicalType::Integer => "integer",
            LogicalType::Boolean => "boolean",
            LogicalType::String => "string",
            LogicalType::Array => "array",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PublishMode {
    /// A record for every poll of the product's devices.
    EverySample,
    /// A record when a field changes by more than its deadband, or its quality changes.
    OnChange,
    /// The latest values at a fixed period.
    Interval(Duration),
    /// One record per tumbling window, fields aggregated (see [`Aggregate`]).
    Window(Duration),
}

/// How a field is aggregated over a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    Last,
    Count,
    Sum,
    Min,
    Max,
    Mean,
    /// A counter's increase over the window; a decrease is a rollover at 2^bits.
    Delta {
        bits: u32,
    },
}

impl Aggregate {
    pub fn name(self) -> &'static str {
        match self {
            Aggregate::Last => "last",
            Aggregate::Count => "count",
            Aggregate::Sum => "sum",
            Aggregate::Min => "min",
            Aggregate::Max => "max",
            Aggregate::Mean => "mean",
            Aggregate::Delta { .. } => "delta",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullPolicy {
    /// Stop taking new records for the product and count what was not taken.
    Block,
    /// Delete the product's oldest messages to make room.
    DropOldest,
    /// Refuse the new message.
    RejectNew,
}

impl FullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            FullPolicy::Block => "block",
            FullPolicy::DropOldest => "drop_oldest",
            FullPolicy::RejectNew => "reject_new",
        }
    }
}

/// What a classification requires at the edge, from least to most strict.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EdgeAction {
    /// Leaves as it is.
    Pass,
    /// Rounded to a multiple of the step.
    Coarsen(f64),
    /// Replaced by a keyed hash (HMAC-SHA-256 with the site secret): linkable, not readable.
    Pseudonymise,
    /// The key is published, the value never (null).
    Mask,
    /// Never leaves the site: not even the key.
    Never,
}

impl EdgeAction {
    /// True when `self` treats a value at least as strictly as `other`: a higher rank, or the same
    /// action; for `coarsen`, a step that is a whole multiple of the other's (rounding to 10 after
    /// rounding to 5 reveals nothing more; rounding to 0.0001 reveals the value).
    pub fn at_least(self, other: EdgeAction) -> bool {
        match (self, other) {
            (EdgeAction::Coarsen(a), EdgeAction::Coarsen(b)) => whole_multiple(a, b),
            _ => self.rank() >= other.rank(),
        }
    }

    /// The stricter of two treatments; `None` for two coarsenings neither of whose steps is a whole
    /// multiple of the other's (no one of them covers both).
    pub fn stricter(self, other: EdgeAction) -> Option<EdgeAction> {
        if self.at_least(other) {
            Some(self)
        } else if other.at_least(self) {
            Some(other)
        } else {
            None
        }
    }

    /// Strictness rank: a product may choose a higher rank than its class requires, never a lower.
    pub fn rank(self) -> u8 {
        match self {
            EdgeAction::Pass => 0,
            EdgeAction::Coarsen(_) => 1,
            EdgeAction::Pseudonymise => 2,
            EdgeAction::Mask => 3,
            EdgeAction::Never => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            EdgeAction::Pass => "pass",
            EdgeAction::Coarsen(_) => "coarsen",
            EdgeAction::Pseudonymise => "pseudonymise",
            EdgeAction::Mask => "mask",
            EdgeAction::Never => "never",
        }
    }
}

/// True when `a` is a whole multiple of `b` (both > 0), to a relative 1e-9.
fn whole_multiple(a: f64, b: f64) -> bool {
    let q = a / b;
    q.is_finite() && q >= 1.0 - 1e-9 && (q - q.round()).abs() <= 1e-9 * q
}

/// The governance file, validated.
#[derive(Debug, Clone)]
pub struct GovernancePlan {
    /// Classification -> required edge action.
    pub classes: BTreeMap<String, EdgeAction>,
    pub default_class: String,
    /// Topic prefixes that may be published to; empty: none; `""` (written `"#"`): any.
    pub allow_topic_prefixes: Vec<String>,
    /// Classifications allowed upstream at all (others are treated as `never`).
    pub allow_classes: Option<Vec<String>>,
    /// The site secret for pseudonymisation (read at start, not at check).
    pub key_file: Option<PathBuf>,
    /// The governance file, if there is one (for messages and the audit).
    pub file: Option<PathBuf>,
}

impl Default for GovernancePlan {
    /// The built-in rules (`[agent] governance = "builtin-defaults"`): public and internal pass,
    /// confidential is masked, restricted never leaves; any topic.
    fn default() -> Self {
        GovernancePlan {
            classes: BTreeMap::from([
                ("public".to_string(), EdgeAction::Pass),
                ("internal".to_string(), EdgeAction::Pass),
                ("confidential".to_string(), EdgeAction::Mask),
                ("restricted".to_string(), EdgeAction::Never),
            ]),
            default_class: "internal".into(),
            allow_topic_prefixes: vec![String::new()],
            allow_classes: None,
            key_file: None,
            file: None,
        }
    }
}

impl GovernancePlan {
    /// True when the egress allow-list admits `topic`.
    pub fn allows_topic(&self, topic: &str) -> bool {
        self.allow_topic_prefixes.iter().any(|p| topic.starts_with(p.as_str()))
    }
}

/// MQTT QoS of a product's messages. QoS 0 is not offered: it would give up at-least-once delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    AtLeastOnce,
    ExactlyOnce,
}

impl Qos {
    /// The QoS level on the wire (and in the descriptor's binding).
    pub fn level(self) -> u8 {
        match self {
            Qos::AtLeastOnce => 1,
            Qos::ExactlyOnce => 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnViolation {
    /// Publish, with the field's quality saying what is wrong.
    Flag,
    /// Drop the record, count it, report it as a gap.
    Drop,
}

#[derive(Debug, Clone)]
pub struct ProductPlan {
    pub id: String,
    /// `{id}.v{major}`: what the buffer, publisher and metrics key the product by, so two major
    /// versions of one product can run side by side during a migration.
    pub key: String,
    pub name: String,
    pub version: String,
    pub major: u64,
    pub domain: String,
    pub owner: String,
    pub contact: String,
    pub status: String,
    pub description: String,
    pub on_violation: OnViolation,
    pub publish: PublishMode,
    pub max_bytes: u64,
    pub full_policy: FullPolicy,
    /// Shared: the mapper and the governor hold the same fields, not copies.
    pub fields: std::sync::Arc<[FieldPlan]>,
    pub topic: String,
    pub qos: Qos,
    /// Each field's latest value retained on its own topic too (`[publish] uns`).
    pub uns: bool,
    /// The UNS topic of this product's fields, `{field}` standing for the field's name
    /// (governance `uns_topic_template` with the product's placeholders filled in).
    pub uns_topic: String,
    /// Most records per message, when the product sets fewer than the upstream default.
    pub max_records_per_message: Option<usize>,
    pub service_levels: ServiceLevelPlan,
    pub file: PathBuf,
}

/// What the owning team promises about a product; `None`: no promise.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceLevelPlan {
    pub freshness: Option<Duration>,
    /// Always known: declared, or derived from the publish mode and the devices' poll intervals.
    pub expected_interval: Duration,
    pub completeness: Option<f64>,
    pub latency_p99: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct FieldPlan {
    pub name: smol_str::SmolStr,
    /// Where the value comes from.
    pub source: FieldSource,
    pub logical_type: LogicalType,
    /// Shared by the fields of a product that have the same unit.
    pub unit: SharedStr,
    /// Shared by the fields of a product that have the same class.
    pub classification: SharedStr,
    /// The action that applies: the class's, or a stricter one the product chose (or `never` when
    /// the class may not go upstream at all).
    pub action: EdgeAction,
    pub required: bool,
    /// For window products.
    pub aggregate: Aggregate,
    /// Scale, offset, deadband, range and description, boxed and only when one is set: most fields
    /// set none, and a plan holds one `FieldPlan` per field of every product (96 bytes, not 136:
    /// 400 KB less at 10,000 fields).
    pub shape: Option<Box<FieldShape>>,
}

/// The parts of a field most fields leave at their defaults (see [`FieldPlan::shape`]).
#[derive(Debug, Clone, PartialEq)]
pub struct FieldShape {
    /// value = raw * scale + offset.
    pub scale: f64,
    pub offset: f64,
    pub deadband: f64,
    pub range: Option<(f64, f64)>,
    pub description: Box<str>,
}

impl Default for FieldShape {
    fn default() -> Self {
        FieldShape {
            scale: 1.0,
            offset: 0.0,
            deadband: 0.0,
            range: None,
            description: "".into(),
        }
    }
}

impl FieldShape {
    /// `None` for the defaults: nothing is allocated for them.
    pub fn boxed(self) -> Option<Box<FieldShape>> {
        (self != FieldShape::default()).then(|| Box::new(self))
    }
}

impl FieldPlan {
    pub fn scale(&self) -> f64 {
        self.shape.as_ref().map_or(1.0, |s| s.scale)
    }

    pub fn offset(&self) -> f64 {
        self.shape.as_ref().map_or(0.0, |s| s.offset)
    }

    pub fn deadband(&self) -> f64 {
        self.shape.as_ref().map_or(0.0, |s| s.deadband)
    }

    /// The contract's valid range `(min, max)`, if it sets one.
    pub fn range(&self) -> Option<(f64, f64)> {
        self.shape.as_ref().and_then(|s| s.range)
    }

    pub fn description(&self) -> &str {
        self.shape.as_ref().map_or("", |s| &s.description)
    }
}

/// A string many fields of a plan share (a unit, a class). `Arc<String>` is one pointer wide where
/// `Arc<str>` is two, and a plan holds one per field of every product (10,000 fields: 160 KB less).
pub type SharedStr = std::sync::Arc<String>;

/// The buffer key of a product version (see [`ProductPlan::key`]).
pub fn product_key(id: &str, major: u64) -> String {
    format!("{id}.v{major}")
}

/// `(id, major)` of a buffer key; keys of older buffers (no `.v`) are taken as the id.
/// The product's name in the fleet (docs/wire-format.md, "Identity and duplicates"):
/// `urn:plantmesh:{enterprise}:{site}:{agent}:{product}:v{major}`, `_` for an enterprise not set.
/// Each part is percent-encoded beyond `A-Z a-z 0-9 - . _ ~` (RFC 8141 leaves `:` to the
/// namespace; here it separates the parts, so a `:` inside a name is encoded too).
pub fn urn(agent: &AgentPlan, product: &str, major: u64) -> String {
    fn part(out: &mut String, s: &str) {
        use std::fmt::Write;
        for b in s.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                out.push(b as char);
            } else {
                let _ = write!(out, "%{b:02X}"); // writing to a String cannot fail
            }
        }
    }
    let mut out = String::from("urn:plantmesh:");
    match &agent.enterprise {
        Some(e) => part(&mut out, e),
        None => out.push('_'),
    }
    for p in [&agent.site, &agent.id, product] {
        out.push(':');
        part(&mut out, p);
    }
    out.push_str(&format!(":v{major}"));
    out
}

pub fn split_product_key(key: &str) -> (&str, Option<u64>) {
    match key.rsplit_once(".v") {
        Some((id, major)) => match major.parse() {
            Ok(m) => (id, Some(m)),
            Err(_) => (key, None),
        },
        None => (key, None),
    }
}

/// Where a field's value comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldSource {
    /// A device tag: index into [`Plan::tags`].
    Tag(usize),
    /// Computed from earlier fields of the same record.
    Derived(Box<Derivation>),
}

impl FieldSource {
    /// The tag, for fields read from a device.
    pub fn tag(&self) -> Option<usize> {
        match self {
            FieldSource::Tag(t) => Some(*t),
            FieldSource::Derived(_) => None,
        }
    }
}

/// A derived field: one of a fixed set of operations over earlier fields of the record.
#[derive(Debug, Clone, PartialEq)]
pub struct Derivation {
    pub op: DeriveOp,
    /// Indexes of the input fields in the product (all before this field).
    pub inputs: Vec<usize>,
}

/// The operations a derived field may use. A fixed set rather than an expression language: every
/// operation has a defined unit rule, a defined result on division by zero (no value, `bad:no_value`),
/// and nothing to parse, evaluate or sandbox on the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeriveOp {
    /// a + b + ...
    Sum,
    /// a - b
    Difference,
    /// a * b * ...
    Product,
    /// a / b
    Ratio,
    /// a / (a + b + ...): e.g. scrap rate = scrap / (scrap + good).
    Share,
    Min,
    Max,
    Mean,
}

impl DeriveOp {
    pub const ALL: [(&'static str, DeriveOp); 8] = [
        ("sum", DeriveOp::Sum),
        ("difference", DeriveOp::Difference),
        ("product", DeriveOp::Product),
        ("ratio", DeriveOp::Ratio),
        ("share", DeriveOp::Share),
        ("min", DeriveOp::Min),
        ("max", DeriveOp::Max),
        ("mean", DeriveOp::Mean),
    ];

    pub fn name(self) -> &'static str {
        DeriveOp::ALL.iter().find(|(_, o)| *o == self).map_or("", |(n, _)| n)
    }

    /// How many inputs the operation takes: `(min, max)`.
    pub fn arity(self) -> (usize, usize) {
        match self {
            DeriveOp::Difference | DeriveOp::Ratio => (2, 2),
            _ => (2, 16),
        }
    }

    /// The result of the operation, `None` where it has none (division by zero, non-finite).
    pub fn apply(self, xs: &[f64]) -> Option<f64> {
        let (lo, hi) = self.arity();
        if xs.len() < lo || xs.len() > hi {
            return None;
        }
        let r = match self {
            DeriveOp::Sum => xs.iter().sum(),
            DeriveOp::Difference => xs[0] - xs[1],
            DeriveOp::Product => xs.iter().product(),
            DeriveOp::Ratio => {
                if xs[1] == 0.0 {
                    return None;
                }
                xs[0] / xs[1]
            }
            DeriveOp::Share => {
                let total: f64 = xs.iter().sum();
                if total == 0.0 {
                    return None;
                }
                xs[0] / total
            }
            DeriveOp::Min => xs.iter().copied().fold(f64::INFINITY, f64::min),
            DeriveOp::Max => xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            DeriveOp::Mean => xs.iter().sum::<f64>() / xs.len() as f64,
        };
        r.is_finite().then_some(r)
    }
}

#[cfg(test)]
pub fn test_field(name: &str, logical_type: LogicalType) -> FieldPlan {
    FieldPlan {
        name: name.into(),
        source: FieldSource::Tag(0),
        logical_type,
        unit: SharedStr::default(),
        classification: SharedStr::new("internal".into()),
        action: EdgeAction::Pass,
        required: false,
        aggregate: Aggregate::Last,
        shape: None,
    }
}

#[cfg(test)]
pub fn test_product(fields: Vec<FieldPlan>) -> ProductPlan {
    ProductPlan {
        id: "p".into(),
        key: "p.v1".into(),
        name: "p".into(),
        version: "1.0.0".into(),
        major: 1,
        domain: "d".into(),
        owner: "o".into(),
        contact: String::new(),
        status: "active".into(),
        on_violation: OnViolation::Flag,
        description: String::new(),
        publish: PublishMode::EverySample,
        max_bytes: 1,
        full_policy: FullPolicy::DropOldest,
        fields: fields.into(),
        topic: "t".into(),
        qos: Qos::AtLeastOnce,
        uns: false,
        uns_topic: "t/{field}".into(),
        max_records_per_message: None,
        service_levels: ServiceLevelPlan::default(),
        file: Default::default(),
    }
}

impl Plan {
    /// `<device>.<tag>` of a tag index.
    pub fn tag_ref(&self, tag: usize) -> String {
        let t = &self.tags[tag];
        format!("{}.{}", self.devices[t.device()].id, t.name)
    }
}

/// Config files found for a load.
#[derive(Debug, Default)]
pub struct FileSet {
    pub gateway: Option<PathBuf>,
    pub governance: Option<PathBuf>,
    pub products: Vec<PathBuf>,
}

impl FileSet {
    /// Directories are read as a config directory; files are sorted by kind: `governance.toml` by
    /// name, a file with an `[agent]` table as the gateway file, anything else as a product.
    pub fn discover(paths: &[PathBuf]) -> Result<FileSet, Diagnostics> {
        let mut set = FileSet::default();
        let mut problems = Vec::new();
        for path in paths {
            if path.is_dir() {
                let gateway = path.join("agent.toml");
                if gateway.is_file() {
                    set.add_gateway(gateway, &mut problems);
                }
                let governance = path.join("governance.toml");
                if governance.is_file() {
                    set.governance = Some(governance);
                }
                let products = path.join("products");
                if products.is_dir() {
                    collect_toml(&products, &mut set.products);
                }
            } else if path.is_file() {
                if path.file_name().is_some_and(|n| n == "governance.toml") {
                    set.governance = Some(path.clone());
                } else if std::fs::read_to_string(path).is_ok_and(|t| looks_like_gateway(&t)) {
                    set.add_gateway(path.clone(), &mut problems);
                } else {
                    set.products.push(path.clone());
                }
            } else {
                problems.push(Diagnostic {
                    file: path.clone(),
                    line: 0,
                    column: 0,
                    key: String::new(),
                    message: "no such file or directory".into(),
                    help: None,
                });
            }
        }
        set.products.sort();
        if set.gateway.is_none() && problems.is_empty() {
            let file = paths.first().cloned().unwrap_or_default();
            problems.push(Diagnostic {
                file,
                line: 0,
                column: 0,
                key: String::new(),
                message:
                    "no gateway file: expected agent.toml in the config directory, or a file with an [agent] table"
                        .into(),
                help: None,
            });
        }
        if problems.is_empty() {
            Ok(set)
        } else {
            Err(Diagnostics(problems))
        }
    }

    fn add_gateway(&mut self, path: PathBuf, problems: &mut Vec<Diagnostic>) {
        if let Some(first) = &self.gateway {
            problems.push(Diagnostic {
                file: path,
                line: 0,
                column: 0,
                key: String::new(),
                message: format!("a second gateway file; the first is {}", first.display()),
                help: Some("give one agent.toml per gateway".into()),
            });
        } else {
            self.gateway = Some(path);
        }
    }
}

fn looks_like_gateway(text: &str) -> bool {
    text.lines().any(|l| l.trim() == "[agent]")
}

fn collect_toml(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_toml(&path, out);
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path);
        }
    }
}

/// Loads and validates config from directories and files (see [`FileSet::discover`]).
pub fn load(paths: &[PathBuf]) -> Result<Plan, Diagnostics> {
    load_with(paths, None)
}

/// [`load`], with `agent.data_dir` overridden (it holds the last published contracts that product
/// versions are checked against).
pub fn load_with(paths: &[PathBuf], data_dir: Option<&Path>) -> Result<Plan, Diagnostics> {
    validate_texts(&read(paths)?, data_dir)
}

/// The bytes of a configuration, file by file: what a reload validates, and what it falls back to
/// for a product file that became invalid.
#[derive(Debug, Clone, PartialEq)]
pub struct Texts {
    pub gateway: (PathBuf, String),
    pub governance: Option<(PathBuf, String)>,
    pub products: Vec<(PathBuf, String)>,
}

/// Reads the files of a config (see [`FileSet::discover`]).
pub fn read(paths: &[PathBuf]) -> Result<Texts, Diagnostics> {
    let set = FileSet::discover(paths)?;
    let mut problems = Vec::new();
    let mut read = |path: &PathBuf| match std::fs::read_to_string(path) {
        Ok(text) => Some((path.clone(), text)),
        Err(e) => {
            problems.push(Diagnostic {
                file: path.clone(),
                line: 0,
                column: 0,
                key: String::new(),
                message: format!("cannot read: {e}"),
                help: None,
            });
            None
        }
    };
    let gateway = set.gateway.as_ref().and_then(&mut read);
    let governance = set.governance.as_ref().and_then(&mut read);
    let products: Vec<(PathBuf, String)> = set.products.iter().filter_map(&mut read).collect();
    match gateway {
        Some(gateway) if problems.is_empty() => Ok(Texts {
            gateway,
            governance,
            products,
        }),
        _ => Err(Diagnostics(problems)),
    }
}

/// Validates texts read by [`read`].
pub fn validate_texts(texts: &Texts, data_dir: Option<&Path>) -> Result<Plan, Diagnostics> {
    validate::validate(&texts.gateway, texts.governance.as_ref(), &texts.products, data_dir)
}

/// Loads config from in-memory texts (the embedded demo plant). Paths are only used in messages.
pub fn load_texts(
    gateway: (&Path, &str),
    governance: Option<(&Path, &str)>,
    products: &[(&Path, &str)],
    data_dir: &Path,
) -> Result<Plan, Diagnostics> {
    let gw = (gateway.0.to_path_buf(), gateway.1.to_string());
    let gov = governance.map(|(p, t)| (p.to_path_buf(), t.to_string()));
    let products: Vec<(PathBuf, String)> = products.iter().map(|(p, t)| (p.to_path_buf(), t.to_string())).collect();
    validate::validate(&gw, gov.as_ref(), &products, Some(data_dir))
}

/// FNV-1a, 64 bit: a stable fingerprint of config bytes (identity, not security).
pub fn fnv1a64(chunks: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for chunk in chunks {
        for b in *chunk {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod edge_action_tests {
    use super::EdgeAction::*;

    #[test]
    fn stricter_means_a_higher_rank_or_a_coarser_whole_multiple_step() {
        assert!(Never.at_least(Pseudonymise) && Mask.at_least(Coarsen(10.0)) && Pass.at_least(Pass));
        assert!(!Pass.at_least(Coarsen(1.0)) && !Pseudonymise.at_least(Mask));
        assert!(Coarsen(20.0).at_least(Coarsen(10.0)) && Coarsen(10.0).at_least(Coarsen(10.0)));
        assert!(
            Coarsen(0.3).at_least(Coarsen(0.1)),
            "float steps: 0.3 is three times 0.1"
        );
        assert!(!Coarsen(0.0001).at_least(Coarsen(10.0)) && !Coarsen(15.0).at_least(Coarsen(10.0)));
        assert_eq!(Coarsen(10.0).stricter(Coarsen(20.0)), Some(Coarsen(20.0)));
        assert_eq!(Coarsen(4.0).stricter(Coarsen(10.0)), None);
        assert_eq!(Pass.stricter(Mask), Some(Mask));
    }
}

#[cfg(test)]
mod plan_memory_tests {
    use super::*;

    #[test]
    fn fields_with_the_same_unit_or_class_share_one_copy() {
        let gateway =
            "[agent]\nid = \"gw\"\nsite = \"s\"\narea = \"a\"\nline = \"l\"\ngovernance = \"builtin-defaults\"\n\
            [[devices]]\nid = \"plc\"\nprotocol = \"modbus_tcp\"\naddress = \"127.0.0.1:502\"\n\
            [[devices.tags]]\nname = \"a\"\ntable = \"holding\"\naddress = 0\n\
            [[devices.tags]]\nname = \"b\"\ntable = \"holding\"\naddress = 1\n\
            [[devices.tags]]\nname = \"c\"\ntable = \"holding\"\naddress = 2\n";
        let product = "id = \"p\"\nname = \"P\"\nversion = \"1.0.0\"\ndomain = \"d\"\nowner = \"o\"\n\
            [[fields]]\nname = \"a\"\nsource = \"plc.a\"\nunit = \"Cel\"\n\
            [[fields]]\nname = \"b\"\nsource = \"plc.b\"\nunit = \"Cel\"\n\
            [[fields]]\nname = \"c\"\nsource = \"plc.c\"\nunit = \"bar\"\n";
        let plan = load_texts(
            (Path::new("agent.toml"), gateway),
            None,
            &[(Path::new("p.toml"), product)],
            Path::new("/tmp"),
        )
        .unwrap();
        let f = &plan.products[0].fields;
        assert_eq!(
            (f[0].unit.as_str(), f[1].unit.as_str(), f[2].unit.as_str()),
            ("Cel", "Cel", "bar")
        );
        assert!(std::sync::Arc::ptr_eq(&f[0].unit, &f[1].unit));
        assert!(!std::sync::Arc::ptr_eq(&f[1].unit, &f[2].unit));
        assert!(f
            .iter()
            .all(|x| std::sync::Arc::ptr_eq(&x.classification, &f[0].classification)));
    }

    /// A plan holds one `FieldPlan` per field of every product and one `TagPlan` per tag, for the
    /// life of the agent: at 10,000 tags every 8 bytes here is 80 KB of RSS (scripts/footprint.sh).
    /// Grow them only on purpose, and move rarely set data behind a `Box` instead.
    #[test]
    fn per_field_and_per_tag_plans_stay_small() {
        assert!(
            std::mem::size_of::<FieldPlan>() <= 136,
            "FieldPlan: {} bytes",
            std::mem::size_of::<FieldPlan>()
        );
        assert!(
            std::mem::size_of::<TagPlan>() <= 80,
            "TagPlan: {} bytes",
            std::mem::size_of::<TagPlan>()
        );
        assert_eq!(std::mem::size_of::<FieldSource>(), 16);
        assert_eq!(std::mem::size_of::<SharedStr>(), 8);
    }

    /// Names of up to 23 bytes live inside the plan, with no heap block of their own.
    #[test]
    fn short_names_are_inline() {
        let f = test_field("oven_zone_3_temperature", LogicalType::Number);
        assert_eq!(f.name.len(), 23);
        assert!(!f.name.is_heap_allocated());
        let f = test_field("a_much_longer_field_name_than_most", LogicalType::Number);
        assert!(f.name.is_heap_allocated());
        assert_eq!(&*f.name, "a_much_longer_field_name_than_most");
    }
}
