//! Request coalescing: the tags of a device merged into as few reads as the protocol and the device
//! allow. Tags of one unit id and table are sorted by address and merged while the gap between them is
//! at most `max_gap` and the read stays within the device's maximum length (125 registers or 2000 bits
//! by the protocol). When a device refuses a merged read with an address or value exception, the read is
//! split at its widest gap and the split is kept for the life of the process: the device's limits are
//! learned once, not rediscovered every poll.

use super::config::{modbus, ModbusTagPlan, Polling, Table};
use crate::sources::TagPlan;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadBlock {
    pub unit_id: u8,
    pub table: Table,
    pub start: u16,
    pub count: u16,
    /// Indexes into the plan's tag table, in address order.
    pub tags: Vec<usize>,
}

/// Merges a device's tags into reads.
pub fn coalesce(device: &Polling, device_tags: &[usize], tags: &[TagPlan]) -> Vec<ReadBlock> {
    // (tag, its Modbus part, its width), sorted by where it sits.
    let mut sorted: Vec<(usize, &ModbusTagPlan, u16)> = device_tags
        .iter()
        .filter_map(|&i| modbus(&tags[i]).map(|m| (i, m, m.width(tags[i].data_type))))
        .collect();
    sorted.sort_by_key(|&(_, m, width)| (m.unit_id, m.table, m.address, width));
    let mut blocks: Vec<ReadBlock> = Vec::new();
    for (i, t, width) in sorted {
        let (max_len, max_gap) = if t.table.is_bits() {
            (device.max_bits_per_read, device.max_gap_bits)
        } else {
            (device.max_registers_per_read, device.max_gap_registers)
        };
        let end = u32::from(t.address) + u32::from(width);
        if let Some(b) = blocks.last_mut() {
            let b_end = u32::from(b.start) + u32::from(b.count);
            let same_area = b.unit_id == t.unit_id && b.table == t.table;
            let gap_ok = u32::from(t.address) <= b_end + u32::from(max_gap);
            let new_end = b_end.max(end);
            if same_area && gap_ok && new_end - u32::from(b.start) <= u32::from(max_len) {
                b.count = (new_end - u32::from(b.start)) as u16;
                b.tags.push(i);
                continue;
            }
        }
        blocks.push(ReadBlock {
            unit_id: t.unit_id,
            table: t.table,
            start: t.address,
            count: width,
            tags: vec![i],
        });
    }
    blocks
}

/// Splits a refused block in two at its widest gap between tags; `None` for a block that cannot be
/// split (all its tags start at one address).
pub fn split(block: &ReadBlock, tags: &[TagPlan]) -> Option<(ReadBlock, ReadBlock)> {
    // (address, width) of each tag of the block.
    let at = |i: usize| modbus(&tags[i]).map_or((0, 0), |m| (m.address, m.width(tags[i].data_type)));
    let starts: Vec<u16> = block.tags.iter().map(|&i| at(i).0).collect();
    // Candidate cut points: between tag k-1 and tag k where the address changes.
    let mut best: Option<(usize, i64)> = None;
    let mut reach = u32::from(starts[0]) + u32::from(at(block.tags[0]).1);
    for k in 1..block.tags.len() {
        let (address, width) = at(block.tags[k]);
        if address != starts[k - 1] {
            let gap = i64::from(address) - reach as i64;
            // Prefer the widest gap, then the most even split.
            let balance = -(k as i64 - block.tags.len() as i64 / 2).abs();
            let score = gap * 1000 + balance;
            if best.is_none_or(|(_, s)| score > s) {
                best = Some((k, score));
            }
        }
        reach = reach.max(u32::from(address) + u32::from(width));
    }
    let (k, _) = best?;
    let make = |ids: &[usize]| {
        let start = ids.iter().map(|&i| at(i).0).min().unwrap_or(0);
        let end = ids
            .iter()
            .map(|&i| u32::from(at(i).0) + u32::from(at(i).1))
            .max()
            .unwrap_or(0);
        ReadBlock {
            unit_id: block.unit_id,
            table: block.table,
            start,
            count: (end - u32::from(start)) as u16,
            tags: ids.to_vec(),
        }
    };
    Some((make(&block.tags[..k]), make(&block.tags[k..])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ByteOrder, DataType};
    use crate::sources::TagKind;
    use std::time::Duration;

    fn t(table: Table, address: u16, data_type: DataType) -> TagPlan {
        TagPlan {
            device_index: 0,
            name: format!("t{address}").into(),
            data_type,
            scale: 1.0,
            offset: 0.0,
            kind: TagKind::Modbus(ModbusTagPlan {
                unit_id: 1,
                table,
                address,
                byte_order: ByteOrder::Abcd,
                bit: None,
            }),
        }
    }

    fn device(n: usize, max_gap: u16, max_regs: u16) -> (Polling, Vec<usize>) {
        let polling = Polling {
            poll_interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            max_gap_registers: max_gap,
            max_gap_bits: max_gap * 8,
            max_registers_per_read: max_regs,
            max_bits_per_read: 2000,
        };
        (polling, (0..n).collect())
    }

    fn coalesce(device: &(Polling, Vec<usize>), tags: &[TagPlan]) -> Vec<ReadBlock> {
        super::coalesce(&device.0, &device.1, tags)
    }

    #[test]
    fn merges_within_gap_and_length() {
        let tags = vec![
            t(Table::Holding, 0, DataType::U32),
            t(Table::Holding, 2, DataType::U16),
            t(Table::Holding, 10, DataType::F32), // gap of 7 after register 2
            t(Table::Holding, 40, DataType::U16), // gap too wide
            t(Table::Input, 0, DataType::U16),    // other table
            t(Table::Coil, 5, DataType::Bool),
            t(Table::Coil, 60, DataType::Bool), // bit gap 54 <= 64
        ];
        let blocks = coalesce(&device(tags.len(), 8, 125), &tags);
        let shape: Vec<(Table, u16, u16)> = blocks.iter().map(|b| (b.table, b.start, b.count)).collect();
        assert_eq!(
            shape,
            vec![
                (Table::Coil, 5, 56),
                (Table::Holding, 0, 12),
                (Table::Holding, 40, 1),
                (Table::Input, 0, 1)
            ]
        );
    }

    #[test]
    fn respects_max_length_and_unit_ids() {
        let mut tags: Vec<TagPlan> = (0..130).map(|a| t(Table::Holding, a, DataType::U16)).collect();
        if let TagKind::Modbus(m) = &mut tags[129].kind {
            m.unit_id = 2;
        }
        let blocks = coalesce(&device(tags.len(), 0, 125), &tags);
        let shape: Vec<(u8, u16, u16)> = blocks.iter().map(|b| (b.unit_id, b.start, b.count)).collect();
        assert_eq!(shape, vec![(1, 0, 125), (1, 125, 4), (2, 129, 1)]);
    }

    #[test]
    fn split_at_widest_gap_until_single_tags() {
        let tags = vec![
            t(Table::Holding, 0, DataType::U16),
            t(Table::Holding, 1, DataType::U16),
            t(Table::Holding, 6, DataType::U32),
            t(Table::Holding, 8, DataType::U16),
        ];
        let blocks = coalesce(&device(tags.len(), 8, 125), &tags);
        assert_eq!(blocks.len(), 1);
        let (a, b) = split(&blocks[0], &tags).unwrap();
        assert_eq!((a.start, a.count, b.start, b.count), (0, 2, 6, 3));
        let (c, d) = split(&a, &tags).unwrap();
        assert_eq!((c.tags.clone(), d.tags.clone()), (vec![0], vec![1]));
        assert!(split(&c, &tags).is_none());
    }
}
