//! Modbus TCP and RTU devices in the gateway file: their keys, their validation, and their plans.
//!
//! A Modbus device names a connection (`address` for TCP, a serial line for RTU), how it is polled
//! (`poll_interval`, `timeout`, coalescing limits) and tags by table, address, type and byte order.
//! Two tags may not share a register except bool tags on different bits of it.

use crate::config::raw;
use crate::config::validate::{secs, Ctx, DeviceInput, TagTable};
use crate::config::DataType;
use crate::sources::serial::{serial_line, SerialPlan};
use crate::sources::{DeviceKind, DevicePlan, TagKind, TagPlan};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;
use toml::Spanned;

/// Device keys a Modbus TCP device reads (beside `id`, `protocol`, `tags`).
pub const TCP_DEVICE_KEYS: &[&str] = &[
    "address",
    "unit_id",
    "poll_interval",
    "timeout",
    "max_gap",
    "max_registers_per_read",
    "max_bits_per_read",
];

/// Device keys a Modbus RTU device reads (`address` only to say that RTU takes `port`).
pub const RTU_DEVICE_KEYS: &[&str] = &[
    "address",
    "port",
    "baud",
    "parity",
    "stop_bits",
    "data_bits",
    "inter_frame",
    "unit_id",
    "poll_interval",
    "timeout",
    "max_gap",
    "max_registers_per_read",
    "max_bits_per_read",
];

/// Tag keys of Modbus tags (beside `name`, `offset`).
pub const TAG_KEYS: &[&str] = &[
    "table",
    "address",
    "type",
    "byte_order",
    "bit",
    "length",
    "unit_id",
    "scale",
];

/// A Modbus TCP server.
#[derive(Debug, Clone)]
pub struct TcpPlan {
    /// `host:port`.
    pub address: String,
    pub polling: Polling,
}

/// A Modbus RTU bus: one serial line, one or more unit ids on it.
#[derive(Debug, Clone)]
pub struct RtuPlan {
    pub serial: SerialPlan,
    pub polling: Polling,
}

/// How a Modbus device is polled, TCP or RTU alike.
#[derive(Debug, Clone)]
pub struct Polling {
    pub poll_interval: Duration,
    pub timeout: Duration,
    /// Most unused registers (bits) a coalesced read may span between two tags.
    pub max_gap_registers: u16,
    pub max_gap_bits: u16,
    pub max_registers_per_read: u16,
    pub max_bits_per_read: u16,
}

/// The four Modbus data tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Coil,
    DiscreteInput,
    Holding,
    Input,
}

impl Table {
    pub fn is_bits(self) -> bool {
        matches!(self, Table::Coil | Table::DiscreteInput)
    }

    /// The name config files and lineage write.
    pub fn as_str(self) -> &'static str {
        match self {
            Table::Coil => "coil",
            Table::DiscreteInput => "discrete_input",
            Table::Holding => "holding",
            Table::Input => "input",
        }
    }
}

/// Byte and word order of multi-register values, named by where bytes A (most significant) to D land.
/// ABCD: big-endian words, most significant word first. CDAB: words swapped. BADC: bytes swapped in
/// each word. DCBA: both (little endian). For 64-bit values "words swapped" reverses all four words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteOrder {
    Abcd,
    Cdab,
    Badc,
    Dcba,
}

impl ByteOrder {
    /// The name config files write.
    pub fn as_str(self) -> &'static str {
        match self {
            ByteOrder::Abcd => "ABCD",
            ByteOrder::Cdab => "CDAB",
            ByteOrder::Badc => "BADC",
            ByteOrder::Dcba => "DCBA",
        }
    }
    pub fn swaps_words(self) -> bool {
        matches!(self, ByteOrder::Cdab | ByteOrder::Dcba)
    }
    pub fn swaps_bytes(self) -> bool {
        matches!(self, ByteOrder::Badc | ByteOrder::Dcba)
    }
}

/// Where a Modbus tag's value sits: 8 bytes, kept inline in every [`TagPlan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModbusTagPlan {
    pub unit_id: u8,
    pub table: Table,
    pub address: u16,
    pub byte_order: ByteOrder,
    /// For bool tags in register tables.
    pub bit: Option<u8>,
}

impl ModbusTagPlan {
    /// Registers (or bits) a value of `data_type` occupies starting at `address`.
    pub fn width(&self, data_type: DataType) -> u16 {
        if self.table.is_bits() {
            1
        } else {
            data_type.registers()
        }
    }
}

/// The Modbus part of a tag; `None` for a tag of another kind (a Modbus device has none).
pub fn modbus(tag: &TagPlan) -> Option<&ModbusTagPlan> {
    match &tag.kind {
        TagKind::Modbus(m) => Some(m),
        _ => None,
    }
}

/// The lineage of a Modbus tag (the descriptor adds device and tag).
pub fn lineage(m: &ModbusTagPlan, device: &DeviceKind) -> serde_json::Value {
    serde_json::json!({
        "protocol": device.protocol().as_str(),
        "port": match device {
            DeviceKind::ModbusRtu(r) => Some(&r.serial.port),
            _ => None,
        },
        "unit_id": m.unit_id,
        "table": m.table.as_str(),
        "address": m.address,
    })
}

/// A Modbus TCP device.
pub(crate) fn tcp_device(cx: &mut Ctx, input: &DeviceInput, table: &mut TagTable) -> Option<DevicePlan> {
    let (d, key) = (input.raw, input.key);
    let Some(address_s) = &d.address else {
        cx.err(
            &d.protocol,
            format!("{key}.address"),
            "a modbus_tcp device needs `address` (host:port)",
        );
        return None;
    };
    let address = tcp_address(cx, address_s, key);
    let (polling, tags) = polling_and_tags(cx, input, table);
    Some(DevicePlan {
        id: d.id.get_ref().clone(),
        tags: tags.into(),
        kind: DeviceKind::ModbusTcp(TcpPlan { address, polling }),
    })
}

/// A Modbus RTU bus.
pub(crate) fn rtu_device(cx: &mut Ctx, input: &DeviceInput, table: &mut TagTable) -> Option<DevicePlan> {
    let (d, key) = (input.raw, input.key);
    if let Some(a) = &d.address {
        cx.err(
            a,
            format!("{key}.address"),
            "a modbus_rtu device has `port`, not `address`",
        )
        .help = Some("e.g. port = \"/dev/ttyUSB0\"".into());
    }
    let serial = serial_line(cx, d, key, 19_200)?;
    let (polling, tags) = polling_and_tags(cx, input, table);
    Some(DevicePlan {
        id: d.id.get_ref().clone(),
        tags: tags.into(),
        kind: DeviceKind::ModbusRtu(RtuPlan { serial, polling }),
    })
}

/// What TCP and RTU devices share: polling settings and tags.
fn polling_and_tags(cx: &mut Ctx, input: &DeviceInput, table: &mut TagTable) -> (Polling, Vec<usize>) {
    let (d, key, di) = (input.raw, input.key, input.index);
    let unit_id = d
        .unit_id
        .as_ref()
        .and_then(|u| cx.range(u, &format!("{key}.unit_id"), 0, 255))
        .unwrap_or(1) as u8;
    let poll_interval = d.poll_interval.as_ref().map_or(Duration::from_secs(1), |v| {
        cx.range(&secs(v), &format!("{key}.poll_interval"), 0.01, 86_400.0);
        v.get_ref().0
    });
    let timeout = d.timeout.as_ref().map_or(Duration::from_secs(1), |v| {
        cx.range(&secs(v), &format!("{key}.timeout"), 0.01, 60.0);
        v.get_ref().0
    });
    let max_gap = d
        .max_gap
        .as_ref()
        .and_then(|v| cx.range(v, &format!("{key}.max_gap"), 0, 124));
    let max_regs = d
        .max_registers_per_read
        .as_ref()
        .and_then(|v| cx.range(v, &format!("{key}.max_registers_per_read"), 1, 125))
        .unwrap_or(125) as u16;
    let max_bits = d
        .max_bits_per_read
        .as_ref()
        .and_then(|v| cx.range(v, &format!("{key}.max_bits_per_read"), 1, 2000))
        .unwrap_or(2000) as u16;
    let polling = Polling {
        poll_interval,
        timeout,
        max_gap_registers: max_gap.unwrap_or(8) as u16,
        max_gap_bits: max_gap.map_or(64, |g| g * 8) as u16,
        max_registers_per_read: max_regs,
        max_bits_per_read: max_bits,
    };
    let mut device_tags = Vec::new();
    let mut names = HashSet::new();
    let mut spans: Vec<(usize, std::ops::Range<usize>, String)> = Vec::new();
    for (ti, t) in d.tags.iter().enumerate() {
        let key = format!("{key}.tags[{ti}]");
        table.declare(cx, &mut names, d.id.get_ref(), t, &key);
        if let Some(tag) = tag_plan(cx, t, &key, di, unit_id, max_regs) {
            let span = t.address.as_ref().map_or(0..0, Spanned::span);
            spans.push((table.tags.len(), span, format!("{key}.address")));
            device_tags.push(table.tags.len());
            table.tags.push(tag);
        }
    }
    check_overlaps(cx, &table.tags, &spans);
    (polling, device_tags)
}

fn tag_plan(cx: &mut Ctx, t: &raw::Tag, key: &str, device: usize, unit_id: u8, max_regs: u16) -> Option<TagPlan> {
    use DataType::*;
    let (Some(table_s), Some(address_s)) = (&t.table, &t.address) else {
        cx.err(&t.name, key.to_string(), "a modbus_tcp tag needs `table` and `address`");
        return None;
    };
    let table = cx.choice(
        table_s,
        &format!("{key}.table"),
        &[
            ("holding", Table::Holding),
            ("input", Table::Input),
            ("coil", Table::Coil),
            ("discrete_input", Table::DiscreteInput),
        ],
    )?;
    let address = cx.range(address_s, &format!("{key}.address"), 0, 65_535)? as u16;
    let type_options: [(&str, DataType); 10] = [
        ("bool", Bool),
        ("u16", U16),
        ("i16", I16),
        ("u32", U32),
        ("i32", I32),
        ("u64", U64),
        ("i64", I64),
        ("f32", F32),
        ("f64", F64),
        ("string", Text(0)),
    ];
    let mut data_type = match &t.data_type {
        Some(v) => {
            let data_type = cx.choice(v, &format!("{key}.type"), &type_options)?;
            if table.is_bits() && data_type != Bool {
                cx.err(
                    v,
                    format!("{key}.type"),
                    "coils and discrete inputs hold bits: the type must be `bool`",
                );
                return None;
            }
            data_type
        }
        None if table.is_bits() => Bool,
        None => U16,
    };
    let bit = match &t.bit {
        Some(b) if data_type == Bool && !table.is_bits() => Some(cx.range(b, &format!("{key}.bit"), 0, 15)? as u8),
        Some(b) => {
            cx.err(
                b,
                format!("{key}.bit"),
                "`bit` applies only to bool tags in holding or input registers",
            );
            return None;
        }
        None if data_type == Bool && !table.is_bits() => {
            cx.err(
                &t.name,
                format!("{key}.bit"),
                "a bool tag in a register table needs `bit` (0..=15)",
            );
            return None;
        }
        None => None,
    };
    match (&t.length, data_type) {
        (Some(l), Text(_)) => data_type = Text(cx.range(l, &format!("{key}.length"), 1, i64::from(max_regs))? as u16),
        (None, Text(_)) => {
            cx.err(
                &t.name,
                format!("{key}.length"),
                "a string tag needs `length` (in registers, two characters each)",
            );
            return None;
        }
        (Some(l), _) => {
            cx.err(l, format!("{key}.length"), "`length` applies only to string tags");
            return None;
        }
        (None, _) => {}
    }
    let byte_order = match &t.byte_order {
        None => ByteOrder::Abcd,
        Some(v) => {
            let order = cx.choice(
                v,
                &format!("{key}.byte_order"),
                &[
                    ("ABCD", ByteOrder::Abcd),
                    ("CDAB", ByteOrder::Cdab),
                    ("BADC", ByteOrder::Badc),
                    ("DCBA", ByteOrder::Dcba),
                ],
            )?;
            if table.is_bits() || data_type == Bool {
                cx.err(v, format!("{key}.byte_order"), "byte_order has no meaning for bits");
                return None;
            }
            if order.swaps_words() && (data_type.registers() == 1 || matches!(data_type, Text(_))) {
                cx.err(
                    v,
                    format!("{key}.byte_order"),
                    "word order has no meaning for single-register and string values",
                )
                .help = Some("use ABCD or BADC".into());
                return None;
            }
            order
        }
    };
    let numeric = !matches!(data_type, Bool | Text(_));
    let scale = match &t.scale {
        Some(s) if !numeric => {
            cx.err(s, format!("{key}.scale"), "scale applies only to numeric tags");
            return None;
        }
        Some(s) if *s.get_ref() == 0.0 || !s.get_ref().is_finite() => {
            cx.err(s, format!("{key}.scale"), "scale must be a finite, non-zero number");
            return None;
        }
        Some(s) => *s.get_ref(),
        None => 1.0,
    };
    let tag_unit = t
        .unit_id
        .as_ref()
        .map(|u| cx.range(u, &format!("{key}.unit_id"), 0, 255).unwrap_or(0) as u8);
    let modbus = ModbusTagPlan {
        unit_id: tag_unit.unwrap_or(unit_id),
        table,
        address,
        byte_order,
        bit,
    };
    let width = modbus.width(data_type);
    if u32::from(address) + u32::from(width) > 65_536 {
        cx.err(
            address_s,
            format!("{key}.address"),
            format!("the value ends past address 65535 ({width} registers from {address})"),
        );
        return None;
    }
    Some(TagPlan {
        device_index: crate::sources::device_index(device),
        name: t.name.get_ref().into(),
        data_type,
        scale,
        offset: t.offset.unwrap_or(0.0),
        kind: TagKind::Modbus(modbus),
    })
}

/// Two tags of one device may not share a register (or coil), except bool tags on different bits
/// of a register; reading a register whole and its bits separately is allowed.
fn check_overlaps(cx: &mut Ctx, tags: &[TagPlan], spans: &[(usize, std::ops::Range<usize>, String)]) {
    let mut by_area: BTreeMap<(u8, Table), Vec<usize>> = BTreeMap::new();
    for (i, _, _) in spans {
        if let Some(m) = modbus(&tags[*i]) {
            by_area.entry((m.unit_id, m.table)).or_default().push(*i);
        }
    }
    let span_of: HashMap<usize, (std::ops::Range<usize>, String)> =
        spans.iter().map(|(i, s, k)| (*i, (s.clone(), k.clone()))).collect();
    for list in by_area.values() {
        for (n, &a) in list.iter().enumerate() {
            for &b in &list[..n] {
                let (Some(ma), Some(mb)) = (modbus(&tags[a]), modbus(&tags[b])) else {
                    continue;
                };
                let (ta, tb) = (&tags[a], &tags[b]);
                let (wa, wb) = (ma.width(ta.data_type), mb.width(tb.data_type));
                let overlap = ma.address < mb.address + wb && mb.address < ma.address + wa;
                if !overlap {
                    continue;
                }
                let conflict = match (ma.bit, mb.bit) {
                    (Some(x), Some(y)) => x == y,
                    (Some(_), None) | (None, Some(_)) => false,
                    (None, None) => true,
                };
                if conflict {
                    let (span, key) = span_of[&a].clone();
                    let d = cx.src.at(
                        span,
                        key,
                        format!(
                            "tag `{}` (address {}, {} register(s)) overlaps tag `{}` (address {}, {} register(s)) in the same table",
                            ta.name, ma.address, wa, tb.name, mb.address, wb
                        ),
                    );
                    cx.problems.push(d);
                }
            }
        }
    }
}

/// A Modbus TCP `host:port` (port 502 when omitted).
fn tcp_address(cx: &mut Ctx, address_s: &Spanned<String>, key: &str) -> String {
    let address = address_s.get_ref().clone();
    if address
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
    {
        address
    } else if !address.is_empty() && !address.contains(':') {
        format!("{address}:502")
    } else {
        let msg = format!("`{address}` is not host:port");
        cx.err(address_s, format!("{key}.address"), msg).help = Some("e.g. \"192.168.10.5:502\"".into());
        address
    }
}
