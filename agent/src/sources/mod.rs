//! Sources: one task per device connection, each turning polls into [`ReadingBatch`]es.
//!
//! In: a [`DevicePlan`] (its kind says which protocol and carries that protocol's settings) and the
//! plan's tag table. Out: [`ReadingBatch`]es on a channel to the produce stage, one per poll or
//! message, with a reading (value or bad quality) for every tag concerned.
//!
//! A source never stalls another: each device runs in its own task with its own timeouts and
//! reconnect backoff. A bad device produces readings with a bad quality (exception code, timeout,
//! disconnect, decode failure), never an error that stops the pipeline.
//!
//! Each device kind has a room of its own, `sources/<kind>/`: `config.rs` holds the kind's keys,
//! their validation into its plan types, and the plan types; `mod.rs` holds the task. Adding a kind
//! is a new room plus one variant in [`Protocol`], [`DeviceKind`] and [`TagKind`] and their `match`es.

pub mod modbus;
pub mod mqtt;
pub mod opcua;
pub mod sensor;
pub mod serial;

use crate::config::validate::{Ctx, DeviceInput, TagTable};
use crate::config::DataType;
use crate::model::ReadingBatch;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// The device kinds a gateway file may name in `protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    ModbusTcp,
    ModbusRtu,
    OpcUa,
    SensorNode,
    Mqtt,
}

impl Protocol {
    /// Every kind, by the name config files write.
    pub const ALL: [(&'static str, Protocol); 5] = [
        ("modbus_tcp", Protocol::ModbusTcp),
        ("modbus_rtu", Protocol::ModbusRtu),
        ("opcua", Protocol::OpcUa),
        ("sensor_node", Protocol::SensorNode),
        ("mqtt", Protocol::Mqtt),
    ];

    /// The name config files and lineage write.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::ModbusTcp => "modbus_tcp",
            Protocol::ModbusRtu => "modbus_rtu",
            Protocol::OpcUa => "opcua",
            Protocol::SensorNode => "sensor_node",
            Protocol::Mqtt => "mqtt",
        }
    }

    /// Validates a device of this kind into its plan, its tags into `table`; `None` when it is
    /// invalid (every problem reported in `cx`).
    pub(crate) fn validate(self, cx: &mut Ctx, input: &DeviceInput, table: &mut TagTable) -> Option<DevicePlan> {
        match self {
            Protocol::ModbusTcp => modbus::config::tcp_device(cx, input, table),
            Protocol::ModbusRtu => modbus::config::rtu_device(cx, input, table),
            Protocol::OpcUa => opcua::config::device(cx, input, table),
            Protocol::SensorNode => sensor::config::device(cx, input, table),
            Protocol::Mqtt => mqtt::config::device(cx, input, table),
        }
    }

    /// The protocol-specific device and tag keys this kind reads; any other one written is refused.
    pub fn keys(self) -> (&'static [&'static str], &'static [&'static str]) {
        match self {
            Protocol::ModbusTcp => (modbus::config::TCP_DEVICE_KEYS, modbus::config::TAG_KEYS),
            Protocol::ModbusRtu => (modbus::config::RTU_DEVICE_KEYS, modbus::config::TAG_KEYS),
            Protocol::OpcUa => (opcua::config::DEVICE_KEYS, opcua::config::TAG_KEYS),
            Protocol::SensorNode => (sensor::config::DEVICE_KEYS, sensor::config::TAG_KEYS),
            Protocol::Mqtt => (mqtt::config::DEVICE_KEYS, mqtt::config::TAG_KEYS),
        }
    }
}

/// One device connection, validated.
#[derive(Debug, Clone)]
pub struct DevicePlan {
    pub id: String,
    /// Indexes into [`crate::config::Plan::tags`].
    pub tags: Arc<[usize]>,
    pub kind: DeviceKind,
}

/// What a device is, with the settings of its protocol.
#[derive(Debug, Clone)]
pub enum DeviceKind {
    ModbusTcp(modbus::config::TcpPlan),
    ModbusRtu(modbus::config::RtuPlan),
    OpcUa(opcua::config::OpcUaDevicePlan),
    Sensor(sensor::config::SensorDevicePlan),
    Mqtt(mqtt::config::MqttDevicePlan),
}

impl DeviceKind {
    pub fn protocol(&self) -> Protocol {
        match self {
            DeviceKind::ModbusTcp(_) => Protocol::ModbusTcp,
            DeviceKind::ModbusRtu(_) => Protocol::ModbusRtu,
            DeviceKind::OpcUa(_) => Protocol::OpcUa,
            DeviceKind::Sensor(_) => Protocol::SensorNode,
            DeviceKind::Mqtt(_) => Protocol::Mqtt,
        }
    }

    /// Where the device is reached: `host:port`, a serial port or an endpoint URL.
    pub fn address(&self) -> String {
        match self {
            DeviceKind::ModbusTcp(p) => p.address.clone(),
            DeviceKind::ModbusRtu(p) => p.serial.port.clone(),
            DeviceKind::OpcUa(p) => p.endpoint.clone(),
            DeviceKind::Sensor(p) => p.serial.port.clone(),
            DeviceKind::Mqtt(p) => format!("{}:{}", p.broker.host, p.broker.port),
        }
    }

    /// How often the device can yield a new value at best: the expected record interval of a
    /// product that publishes every sample of it.
    pub fn sample_interval(&self) -> Duration {
        match self {
            DeviceKind::ModbusTcp(p) => p.polling.poll_interval,
            DeviceKind::ModbusRtu(p) => p.polling.poll_interval,
            DeviceKind::OpcUa(p) if p.polling => p.poll_interval,
            DeviceKind::OpcUa(p) => p.publishing_interval,
            DeviceKind::Sensor(p) => p.stale_after,
            DeviceKind::Mqtt(_) => Duration::from_secs(1),
        }
    }
}

/// One tag of one device, validated: what every kind has, and the kind's own part.
#[derive(Debug, Clone)]
pub struct TagPlan {
    /// The device's index in the plan ([`TagPlan::device`]); 4 bytes, so that it shares a word with
    /// `data_type` (64 bytes a tag, not 72: a plan holds one per tag).
    pub device_index: u32,
    pub name: smol_str::SmolStr,
    pub data_type: DataType,
    /// value = raw * scale + offset (numeric tags only).
    pub scale: f64,
    pub offset: f64,
    pub kind: TagKind,
}

/// A device's index as a [`TagPlan`] keeps it (a config has far fewer than 2^32 devices).
pub(crate) fn device_index(device: usize) -> u32 {
    // Unreachable in practice: 2^32 devices would not fit in memory as a config.
    u32::try_from(device).unwrap_or(u32::MAX)
}

/// Where a tag's value is found on its device.
#[derive(Debug, Clone)]
pub enum TagKind {
    /// Modbus TCP and RTU: inline, it is small and the most common kind.
    Modbus(modbus::config::ModbusTagPlan),
    OpcUa(Box<opcua::config::OpcUaTagPlan>),
    Sensor(sensor::config::SensorTagPlan),
    Mqtt(Box<mqtt::config::MqttTagPlan>),
}

impl TagPlan {
    /// The tag's device: an index into the plan's devices.
    pub fn device(&self) -> usize {
        self.device_index as usize
    }

    /// Where the tag's value comes from, for the descriptor's lineage (docs/wire-format.md).
    pub fn lineage(&self, device: &DevicePlan) -> serde_json::Value {
        let mut l = match &self.kind {
            TagKind::Modbus(m) => modbus::config::lineage(m, &device.kind),
            TagKind::OpcUa(o) => opcua::config::lineage(o, &device.kind),
            TagKind::Sensor(s) => sensor::config::lineage(s, &device.kind),
            TagKind::Mqtt(m) => mqtt::config::lineage(m, &device.kind),
        };
        l["device"] = serde_json::json!(device.id);
        l["tag"] = serde_json::json!(self.name);
        l
    }
}

/// Counters of one device, shared with the status view and metrics.
#[derive(Debug, Default)]
pub struct DeviceStats {
    pub polls: AtomicU64,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub reconnects: AtomicU64,
    /// 1 while connected.
    pub connected: AtomicU64,
    /// Sensor nodes: frames that failed their CRC (also counted in `errors`).
    pub crc_errors: AtomicU64,
    /// Sensor nodes: frames lost on the link (gaps in the node's sequence numbers).
    pub lost_frames: AtomicU64,
    /// Sensor nodes: restarts seen (sequence or uptime going back).
    pub reboots: AtomicU64,
    /// MQTT devices: messages over `max_message_bytes`, skipped (also counted in `errors`).
    pub oversize: AtomicU64,
}

impl DeviceStats {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Why a source could not reach its device. Never fatal: the source marks the device's tags bad,
/// logs this once per backoff step, and tries again.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot resolve {address}: {source}")]
    Resolve { address: String, source: std::io::Error },
    #[error("{address} resolves to no address")]
    NoAddress { address: String },
    #[error("{source}")]
    Connect { address: String, source: std::io::Error },
    #[error("no connection within {after:?}")]
    ConnectTimeout { address: String, after: Duration },
    #[error("cannot open serial port {port}: {source}")]
    Serial { port: String, source: tokio_serial::Error },
    #[error("cannot set up the OPC UA client: {0}")]
    OpcUaClient(String),
    #[error("cannot set up the device broker connection: {0}")]
    Broker(String),
}

/// The first address `host:port` resolves to.
pub async fn resolve(address: &str) -> Result<std::net::SocketAddr, SourceError> {
    match tokio::net::lookup_host(address).await {
        Ok(mut addrs) => addrs.next().ok_or_else(|| SourceError::NoAddress {
            address: address.to_string(),
        }),
        Err(source) => Err(SourceError::Resolve {
            address: address.to_string(),
            source,
        }),
    }
}

/// Where sources send what they read.
pub type BatchSender = mpsc::Sender<ReadingBatch>;

/// What every source takes, whatever its kind.
pub struct SourceCtx {
    /// The device's index in the plan (readings name it).
    pub index: usize,
    /// The device id, for logs.
    pub id: String,
    /// The device's tags: indexes into `tags`.
    pub device_tags: Arc<[usize]>,
    /// Every tag of the plan, shared.
    pub tags: Arc<[TagPlan]>,
    pub stats: Arc<DeviceStats>,
    pub out: BatchSender,
    pub shutdown: watch::Receiver<bool>,
}

impl SourceCtx {
    /// Sends [`all_bad`] for every tag of the device; false when the pipeline behind it is gone.
    pub async fn send_all_bad(&self, reason: crate::model::BadReason) -> bool {
        send_all_bad(&self.out, self.index, &self.device_tags, reason).await
    }
}

/// What the OPC UA sources share: the agent's application instance identity.
pub struct OpcUaIdentityFiles {
    pub pki_dir: std::path::PathBuf,
    pub application_uri: String,
}

/// Starts the task of one device.
pub fn spawn(device: &DevicePlan, ctx: SourceCtx, opcua: &OpcUaIdentityFiles) -> tokio::task::JoinHandle<()> {
    match &device.kind {
        DeviceKind::ModbusTcp(p) => tokio::spawn(modbus::ModbusSource::tcp(ctx, p.clone()).run()),
        DeviceKind::ModbusRtu(p) => tokio::spawn(modbus::ModbusSource::rtu(ctx, p.clone()).run()),
        DeviceKind::OpcUa(p) => tokio::spawn(
            opcua::OpcUaSource {
                ctx,
                plan: p.clone(),
                pki_dir: opcua.pki_dir.clone(),
                application_uri: opcua.application_uri.clone(),
            }
            .run(),
        ),
        DeviceKind::Sensor(p) => tokio::spawn(sensor::SensorSource { ctx, plan: p.clone() }.run()),
        DeviceKind::Mqtt(p) => tokio::spawn(mqtt::MqttSource { ctx, plan: p.clone() }.run()),
    }
}

/// A batch marking every tag of a device bad for `reason` (no connection, session lost...), stamped now.
pub fn all_bad(device: usize, tags: &[usize], reason: crate::model::BadReason) -> ReadingBatch {
    let readings = tags
        .iter()
        .map(|&tag| crate::model::Reading {
            tag,
            value: None,
            quality: crate::model::Quality::Bad(reason),
        })
        .collect();
    ReadingBatch {
        device,
        ts: crate::model::now_millis(),
        readings,
    }
}

/// Sends [`all_bad`] for a device; false when the pipeline behind it is gone.
pub async fn send_all_bad(out: &BatchSender, device: usize, tags: &[usize], reason: crate::model::BadReason) -> bool {
    out.send(all_bad(device, tags, reason)).await.is_ok()
}

/// Sleeps for `d`; true when shutdown was requested meanwhile.
pub async fn sleep_or_shutdown(shutdown: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    }
}
