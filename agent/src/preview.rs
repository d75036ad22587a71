//! `plantmesh preview`: a product's mapping and governance on recorded input, offline.
//!
//! Input: CSV with a header `ts,<device>.<tag>,...` (ts as RFC 3339 or milliseconds since the epoch;
//! an empty cell means no value in that row; no quoted commas). Each row is one poll of the devices
//! it names. Output: every message that would be published (topic and envelope, one record per
//! message), each followed by why fields were altered, withheld or flagged. Without the site
//! secret (not readable here), pseudonyms use a throwaway key and say so.

use crate::config::{DataType, EdgeAction, Plan};
use crate::govern::{Decision, Governor};
use crate::map::Mapper;
use crate::model::{BadReason, Millis, Quality, Reading, ReadingBatch, Value};
use crate::publish::envelope::RecordEncoder;
use std::collections::BTreeMap;
use std::fmt::Write as _;

pub fn preview_csv(plan: &Plan, only: Option<&str>, csv: &str) -> Result<String, String> {
    let mut out = String::new();
    let key = match &plan.governance.key_file {
        Some(path) => match crate::govern::read_key(path) {
            Ok(k) => Some(k),
            Err(e) => {
                let _ = writeln!(out, "# pseudonyms below use a throwaway key: {e}");
                Some(b"plantmesh preview: a throwaway key, not the site's".to_vec())
            }
        },
        None => None,
    };
    let governor = Governor::new(plan, key).map_err(|e| e.to_string())?;
    let encoders: Vec<RecordEncoder> = plan.products.iter().map(RecordEncoder::new).collect();
    if let Some(id) = only {
        if !plan.products.iter().any(|p| p.id == id) {
            return Err(format!("no product `{id}` in this config"));
        }
    }
    let mut lines = csv.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<String> = lines
        .next()
        .ok_or("the CSV is empty")?
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    if header.first().map(String::as_str) != Some("ts") {
        return Err("the CSV header must start with `ts`, then <device>.<tag> columns".into());
    }
    let by_ref: BTreeMap<String, usize> = (0..plan.tags.len()).map(|i| (plan.tag_ref(i), i)).collect();
    let mut columns = Vec::new();
    for (c, name) in header.iter().enumerate().skip(1) {
        let tag = *by_ref
            .get(name)
            .ok_or_else(|| format!("column {} `{name}` is not a tag of the gateway file", c + 1))?;
        columns.push(tag);
    }
    let mut mapper = Mapper::new(plan);
    let mut counts = crate::govern::Counts::default();
    let mut seq: BTreeMap<usize, u64> = BTreeMap::new();
    for (row, line) in lines.enumerate() {
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        let ts = parse_ts(cells[0]).ok_or_else(|| format!("row {}: `{}` is not a timestamp", row + 2, cells[0]))?;
        // One batch per device named in the row.
        let mut batches: BTreeMap<usize, Vec<Reading>> = BTreeMap::new();
        for (c, &tag) in columns.iter().enumerate() {
            let cell = cells.get(c + 1).copied().unwrap_or("");
            let t = &plan.tags[tag];
            let (value, quality) = if cell.is_empty() {
                (None, Quality::Bad(BadReason::NoValue))
            } else {
                match parse_value(cell, t.data_type) {
                    Some(v) => crate::sources::modbus::decode::scale(t, v),
                    None => {
                        return Err(format!(
                            "row {}, column `{}`: `{cell}` is not a {:?} value",
                            row + 2,
                            header[c + 1],
                            t.data_type
                        ))
                    }
                }
            };
            batches
                .entry(t.device)
                .or_default()
                .push(Reading { tag, value, quality });
        }
        let mut records = Vec::new();
        for (device, readings) in batches {
            mapper.on_batch(&ReadingBatch { device, ts, readings }, &mut records);
        }
        mapper.on_tick(ts, &mut records);
        for (pi, record) in records {
            let p = &plan.products[pi];
            if only.is_some_and(|id| id != p.id) {
                continue;
            }
            let n = seq.entry(pi).or_insert(0);
            *n += 1;
            match governor.apply(pi, record, &mut counts) {
                Decision::Drop { rule } => {
                    let _ = writeln!(
                        out,
                        "# {} record at {}: dropped ({rule}: on_violation = \"drop\")",
                        p.id,
                        crate::model::format_rfc3339_millis(ts)
                    );
                }
                Decision::Publish(g) => {
                    let body = format!("[{}]", String::from_utf8_lossy(&encoders[pi].encode(&g)));
                    let _ = writeln!(
                        out,
                        "{} {{\"product\":\"{}\",\"version\":\"{}\",\"agent\":\"{}\",\"epoch\":0,\"seq\":{n},\"historical\":false,\"records\":{body}}}",
                        p.topic, p.id, p.version, plan.agent.id
                    );
                    for (fi, f) in p.fields.iter().enumerate() {
                        let why = match f.action {
                            EdgeAction::Pass => None,
                            EdgeAction::Never => {
                                Some(format!("withheld: class `{}` never leaves the site", f.classification))
                            }
                            EdgeAction::Mask => Some(format!("masked (null): class `{}`", f.classification)),
                            EdgeAction::Pseudonymise => Some(format!("pseudonymised: class `{}`", f.classification)),
                            EdgeAction::Coarsen(step) => Some(format!("coarsened to a multiple of {step}")),
                        };
                        if let Some(why) = why {
                            let _ = writeln!(out, "#   {}: {why}", f.name);
                        }
                        if let Some((_, _, q)) = g.fields.iter().find(|(i, _, _)| *i == fi) {
                            if matches!(q, Quality::Bad(BadReason::OutOfRange | BadReason::RequiredMissing)) {
                                let _ = writeln!(
                                    out,
                                    "#   {}: flagged {} (contract)",
                                    f.name,
                                    crate::model::quality_text(*q)
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

fn parse_ts(s: &str) -> Option<Millis> {
    if let Ok(ms) = s.parse::<u64>() {
        return Some(ms);
    }
    // RFC 3339 UTC: 2026-11-21T10:00:00[.123]Z
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, dd) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    let ms: i64 = format!("{frac:0<3}")[..3].parse().ok()?;
    // Days from civil (H. Hinnant).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000) + ms).ok()
}

fn parse_value(cell: &str, t: DataType) -> Option<Value> {
    Some(match t {
        DataType::Bool => Value::Bool(match cell {
            "true" | "1" => true,
            "false" | "0" => false,
            _ => return None,
        }),
        DataType::U16 | DataType::U32 | DataType::U64 => Value::UInt(cell.parse().ok()?),
        DataType::I16 | DataType::I32 | DataType::I64 => Value::Int(cell.parse().ok()?),
        DataType::F32 | DataType::F64 => Value::Float(cell.parse().ok()?),
        DataType::Text(_) => Value::Text(cell.to_string()),
        DataType::Array => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(parse_ts("1795255200123"), Some(1_795_255_200_123));
        assert_eq!(parse_ts("2026-11-21T10:00:00.123Z"), Some(1_795_255_200_123));
        assert_eq!(parse_ts("2026-11-21T10:00:00Z"), Some(1_795_255_200_000));
        assert_eq!(parse_ts("yesterday"), None);
    }
}
