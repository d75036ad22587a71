//! Registers and bits -> values, for every data type and byte order.

use super::config::{modbus, ByteOrder};
use crate::config::DataType;
use crate::model::{BadReason, Quality, Value};
use crate::sources::TagPlan;

/// Writes the bytes of `regs` into `out` (two per register) in most-significant-first order, after
/// undoing the device's byte and word order.
fn ordered_bytes(regs: &[u16], order: ByteOrder, out: &mut [u8]) {
    let n = regs.len();
    for (i, w) in regs.iter().enumerate() {
        let at = 2 * if order.swaps_words() { n - 1 - i } else { i };
        let [hi, lo] = w.to_be_bytes();
        out[at..at + 2].copy_from_slice(&if order.swaps_bytes() { [lo, hi] } else { [hi, lo] });
    }
}

/// Decodes one tag from the registers it occupies (`regs.len() == tag.width()`).
pub fn decode_registers(tag: &TagPlan, regs: &[u16]) -> (Option<Value>, Quality) {
    let Some(m) = modbus(tag) else {
        return (None, Quality::Bad(BadReason::Decode));
    };
    if regs.len() != usize::from(m.width(tag.data_type)) {
        return (None, Quality::Bad(BadReason::Decode));
    }
    if let Some(bit) = m.bit {
        return (Some(Value::Bool(regs[0] >> bit & 1 == 1)), Quality::Good);
    }
    // Numbers span at most 4 registers: their bytes stay on the stack (this runs for every register
    // of every poll); only text may be longer.
    let mut small = [0u8; 8];
    let mut long = Vec::new();
    let b: &mut [u8] = if regs.len() <= 4 {
        &mut small[..2 * regs.len()]
    } else {
        long.resize(2 * regs.len(), 0);
        &mut long
    };
    ordered_bytes(regs, m.byte_order, b);
    let b = &*b;
    let raw = match tag.data_type {
        DataType::Array => return (None, Quality::Bad(BadReason::Decode)),
        DataType::Bool => Value::Bool(regs[0] != 0),
        DataType::U16 => Value::UInt(u64::from(u16::from_be_bytes([b[0], b[1]]))),
        DataType::I16 => Value::Int(i64::from(i16::from_be_bytes([b[0], b[1]]))),
        DataType::U32 => Value::UInt(u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))),
        DataType::I32 => Value::Int(i64::from(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))),
        DataType::F32 => Value::Float(f64::from(f32::from_be_bytes([b[0], b[1], b[2], b[3]]))),
        DataType::U64 => Value::UInt(u64::from_be_bytes(eight(b))),
        DataType::I64 => Value::Int(i64::from_be_bytes(eight(b))),
        DataType::F64 => Value::Float(f64::from_be_bytes(eight(b))),
        DataType::Text(_) => {
            let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
            return match std::str::from_utf8(&b[..end]) {
                Ok(s) => (Some(Value::Text(s.trim_end().to_string())), Quality::Good),
                Err(_) => (None, Quality::Bad(BadReason::Decode)),
            };
        }
    };
    scale(tag, raw)
}

/// The first eight bytes of a 64-bit value (its width was checked: four registers).
fn eight(b: &[u8]) -> [u8; 8] {
    let mut out = [0u8; 8];
    out.copy_from_slice(&b[..8]);
    out
}

/// Applies the tag's scale and offset; a non-finite result (a NaN from the device) is a bad reading.
pub fn scale(tag: &TagPlan, raw: Value) -> (Option<Value>, Quality) {
    if let Value::Float(f) = raw {
        if !f.is_finite() {
            return (None, Quality::Bad(BadReason::Decode));
        }
    }
    if tag.scale == 1.0 && tag.offset == 0.0 {
        return (Some(raw), Quality::Good);
    }
    match raw.as_f64() {
        Some(x) => (Some(Value::Float(x * tag.scale + tag.offset)), Quality::Good),
        None => (Some(raw), Quality::Good),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::modbus::config::{ModbusTagPlan, Table};
    use crate::sources::TagKind;

    fn tag(data_type: DataType, byte_order: ByteOrder) -> TagPlan {
        TagPlan {
            device_index: 0,
            name: "t".into(),
            data_type,
            scale: 1.0,
            offset: 0.0,
            kind: TagKind::Modbus(ModbusTagPlan {
                unit_id: 1,
                table: Table::Holding,
                address: 0,
                byte_order,
                bit: None,
            }),
        }
    }

    fn set_bit(t: &mut TagPlan, bit: u8) {
        if let TagKind::Modbus(m) = &mut t.kind {
            m.bit = Some(bit);
        }
    }

    /// Registers as a device with the given order would hold the big-endian bytes `be`.
    fn encode(be: &[u8], order: ByteOrder) -> Vec<u16> {
        let mut words: Vec<u16> = be
            .chunks(2)
            .map(|c| {
                if order.swaps_bytes() {
                    u16::from_le_bytes([c[0], c[1]])
                } else {
                    u16::from_be_bytes([c[0], c[1]])
                }
            })
            .collect();
        if order.swaps_words() {
            words.reverse();
        }
        words
    }

    const ORDERS: [ByteOrder; 4] = [ByteOrder::Abcd, ByteOrder::Cdab, ByteOrder::Badc, ByteOrder::Dcba];

    #[test]
    fn known_float_layouts() {
        // 123.456f32 = 0x42F6E979: A=42 B=F6 C=E9 D=79.
        let cases = [
            (ByteOrder::Abcd, [0x42F6, 0xE979]),
            (ByteOrder::Cdab, [0xE979, 0x42F6]),
            (ByteOrder::Badc, [0xF642, 0x79E9]),
            (ByteOrder::Dcba, [0x79E9, 0xF642]),
        ];
        for (order, regs) in cases {
            let (v, q) = decode_registers(&tag(DataType::F32, order), &regs);
            assert_eq!(q, Quality::Good);
            assert_eq!(v, Some(Value::Float(f64::from(123.456f32))), "{order:?}");
        }
    }

    #[test]
    fn every_type_round_trips_in_every_order() {
        for order in ORDERS {
            let regs = encode(&(-123_456_789i32).to_be_bytes(), order);
            assert_eq!(
                decode_registers(&tag(DataType::I32, order), &regs).0,
                Some(Value::Int(-123_456_789))
            );
            let regs = encode(&4_000_000_000u32.to_be_bytes(), order);
            assert_eq!(
                decode_registers(&tag(DataType::U32, order), &regs).0,
                Some(Value::UInt(4_000_000_000))
            );
            let regs = encode(&(-9_000_000_000_000i64).to_be_bytes(), order);
            assert_eq!(
                decode_registers(&tag(DataType::I64, order), &regs).0,
                Some(Value::Int(-9_000_000_000_000))
            );
            let regs = encode(&18_000_000_000_000_000u64.to_be_bytes(), order);
            assert_eq!(
                decode_registers(&tag(DataType::U64, order), &regs).0,
                Some(Value::UInt(18_000_000_000_000_000))
            );
            let regs = encode(&(-2.5e300f64).to_be_bytes(), order);
            assert_eq!(
                decode_registers(&tag(DataType::F64, order), &regs).0,
                Some(Value::Float(-2.5e300))
            );
        }
        for order in [ByteOrder::Abcd, ByteOrder::Badc] {
            let regs = encode(&(-2i16).to_be_bytes(), order);
            assert_eq!(
                decode_registers(&tag(DataType::I16, order), &regs).0,
                Some(Value::Int(-2))
            );
            let regs = encode(&65_000u16.to_be_bytes(), order);
            assert_eq!(
                decode_registers(&tag(DataType::U16, order), &regs).0,
                Some(Value::UInt(65_000))
            );
            let regs = encode(b"PRESS-7\0", order);
            assert_eq!(
                decode_registers(&tag(DataType::Text(4), order), &regs).0,
                Some(Value::Text("PRESS-7".into()))
            );
        }
    }

    #[test]
    fn bits_scale_and_bad_values() {
        let mut t = tag(DataType::Bool, ByteOrder::Abcd);
        set_bit(&mut t, 3);
        assert_eq!(decode_registers(&t, &[0b1000]).0, Some(Value::Bool(true)));
        assert_eq!(decode_registers(&t, &[0b0111]).0, Some(Value::Bool(false)));

        let mut t = tag(DataType::I16, ByteOrder::Abcd);
        t.scale = 0.1;
        t.offset = -40.0;
        assert_eq!(decode_registers(&t, &[655]).0, Some(Value::Float(655.0 * 0.1 - 40.0)));

        let nan = encode(&f32::NAN.to_be_bytes(), ByteOrder::Abcd);
        assert_eq!(
            decode_registers(&tag(DataType::F32, ByteOrder::Abcd), &nan).1,
            Quality::Bad(BadReason::Decode)
        );
        assert_eq!(
            decode_registers(&tag(DataType::F32, ByteOrder::Abcd), &[1]).1,
            Quality::Bad(BadReason::Decode)
        );
        let invalid_utf8 = [0xFFFEu16, 0x0000];
        assert_eq!(
            decode_registers(&tag(DataType::Text(2), ByteOrder::Abcd), &invalid_utf8).1,
            Quality::Bad(BadReason::Decode)
        );
    }
}
