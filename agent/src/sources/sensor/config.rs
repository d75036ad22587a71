//! Sensor nodes in the gateway file: a serial port and, optionally, channels named or scaled by
//! hand. Channels a product uses but no tag declares are added from the product files
//! ([`skimmed_tag`]), matched by name against the node's hello at run time.

use crate::config::validate::{secs, Ctx, DeviceInput, TagTable};
use crate::config::DataType;
use crate::sources::serial::{serial_line, Parity, SerialPlan};
use crate::sources::{DeviceKind, DevicePlan, TagKind, TagPlan};
use std::collections::HashSet;
use std::time::Duration;

/// Device keys a sensor node reads (beside `id`, `protocol`, `tags`).
pub const DEVICE_KEYS: &[&str] = &["port", "baud", "stale_after"];

/// Tag keys of sensor-node channels (beside `name`, `offset`).
pub const TAG_KEYS: &[&str] = &["channel", "scale"];

/// A sensor node on a serial line.
#[derive(Debug, Clone, PartialEq)]
pub struct SensorDevicePlan {
    pub serial: SerialPlan,
    /// No frame for this long: the node's channels go bad (`link_lost`).
    pub stale_after: Duration,
}

/// A channel of a sensor node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SensorTagPlan {
    /// The channel index, or `None` to find the channel by the tag's name in the node's hello.
    pub channel: Option<u8>,
}

/// The lineage of a sensor-node channel (the descriptor adds device and tag).
pub fn lineage(s: &SensorTagPlan, device: &DeviceKind) -> serde_json::Value {
    serde_json::json!({
        "protocol": "sensor_node",
        "port": device.address(),
        "channel": s.channel,
    })
}

pub(crate) fn device(cx: &mut Ctx, input: &DeviceInput, table: &mut TagTable) -> Option<DevicePlan> {
    let (d, key, di) = (input.raw, input.key, input.index);
    let mut serial = serial_line(cx, d, key, 115_200)?;
    // The link frames itself (COBS); 8N1 is what MCU UARTs and USB CDC default to.
    serial.parity = Parity::None;
    serial.stop_bits = 1;
    let stale_after = d.stale_after.as_ref().map_or(Duration::from_secs(5), |v| {
        cx.range(&secs(v), &format!("{key}.stale_after"), 0.1, 3600.0);
        v.get_ref().0
    });
    let id = d.id.get_ref().clone();
    let mut tags = Vec::new();
    let mut names = HashSet::new();
    for (ti, t) in d.tags.iter().enumerate() {
        let key = format!("{key}.tags[{ti}]");
        if !table.declare(cx, &mut names, &id, t, &key) {
            continue;
        }
        let channel = match &t.channel {
            Some(c) => Some(cx.range(c, &format!("{key}.channel"), 0, protocol::link::MAX_CHANNELS as u32 - 1)? as u8),
            None => None,
        };
        let scale = match &t.scale {
            Some(s) if *s.get_ref() == 0.0 || !s.get_ref().is_finite() => {
                cx.err(s, format!("{key}.scale"), "scale must be a finite, non-zero number");
                continue;
            }
            Some(s) => *s.get_ref(),
            None => 1.0,
        };
        tags.push(table.tags.len());
        table
            .tags
            .push(tag(di, t.name.get_ref(), channel, scale, t.offset.unwrap_or(0.0)));
    }
    Some(DevicePlan {
        id,
        tags: tags.into(),
        kind: DeviceKind::Sensor(SensorDevicePlan { serial, stale_after }),
    })
}

/// The tag a product field `<node>.<name>` adds when no tag declares that channel; `None` for a
/// name no node can announce (the product's own check reports the dangling source).
pub(crate) fn skimmed_tag(device: usize, name: &str) -> Option<TagPlan> {
    let valid_name = !name.is_empty()
        && name.len() <= 16
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    valid_name.then(|| tag(device, name, None, 1.0, 0.0))
}

fn tag(device: usize, name: &str, channel: Option<u8>, scale: f64, offset: f64) -> TagPlan {
    TagPlan {
        device_index: crate::sources::device_index(device),
        name: name.into(),
        data_type: DataType::F64,
        scale,
        offset,
        kind: TagKind::Sensor(SensorTagPlan { channel }),
    }
}
