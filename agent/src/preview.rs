//! `plantmesh preview`: a product's mapping and governance on recorded input, offline, or on live
//! devices (the demo plant's, or a real config's, polled read-only for a while), publishing nothing.
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

/// Mapping and governance of every product, writing what would be published and why.
pub struct Previewer<'a> {
    plan: &'a Plan,
    only: Option<&'a str>,
    governor: Governor,
    encoders: Vec<RecordEncoder>,
    mapper: Mapper,
    counts: crate::govern::Counts,
    seq: BTreeMap<usize, u64>,
    pub out: String,
}

impl<'a> Previewer<'a> {
    pub fn new(plan: &'a Plan, only: Option<&'a str>) -> Result<Self, String> {
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
        if let Some(id) = only {
            if !plan.products.iter().any(|p| p.id == id) {
                return Err(format!("no product `{id}` in this config"));
            }
        }
        Ok(Previewer {
            plan,
            only,
            governor: Governor::new(plan, key).map_err(|e| e.to_string())?,
            encoders: plan.products.iter().map(RecordEncoder::new).collect(),
            mapper: Mapper::new(plan),
            counts: crate::govern::Counts::default(),
            seq: BTreeMap::new(),
            out,
        })
    }

    /// One poll of one device.
    pub fn batch(&mut self, b: &ReadingBatch) {
        let mut records = Vec::new();
        self.mapper.on_batch(b, &mut records);
        self.emit(b.ts, records);
    }

    /// Time passes (interval and window products).
    pub fn tick(&mut self, now: Millis) {
        let mut records = Vec::new();
        self.mapper.on_tick(now, &mut records);
        self.emit(now, records);
    }

    fn emit(&mut self, ts: Millis, records: Vec<(usize, crate::model::Record)>) {
        let (plan, out) = (self.plan, &mut self.out);
        for (pi, record) in records {
            let p = &plan.products[pi];
            if self.only.is_some_and(|id| id != p.id) {
                continue;
            }
            let n = self.seq.entry(pi).or_insert(0);
            *n += 1;
            match self.governor.apply(pi, record, &mut self.counts) {
                Decision::Drop { rule } => {
                    let _ = writeln!(
                        out,
                        "# {} record at {}: dropped ({rule}: on_violation = \"drop\")",
                        p.id,
                        crate::model::format_rfc3339_millis(ts)
                    );
                }
                Decision::Publish(g) => {
                    let body = format!("[{}]", String::from_utf8_lossy(&self.encoders[pi].encode(&g)));
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
}

pub fn preview_csv(plan: &Plan, only: Option<&str>, csv: &str) -> Result<String, String> {
    let mut preview = Previewer::new(plan, only)?;
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
                .entry(t.device())
                .or_default()
                .push(Reading { tag, value, quality });
        }
        for (device, readings) in batches {
            preview.batch(&ReadingBatch { device, ts, readings });
        }
        preview.tick(ts);
    }
    Ok(preview.out)
}

/// Previews on live devices: polls them (read-only) for `duration` and prints as messages come.
pub async fn preview_live(
    plan: &Plan,
    only: Option<&str>,
    duration: std::time::Duration,
    mut print: impl FnMut(&str),
) -> Result<(), String> {
    let mut preview = Previewer::new(plan, only)?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (sources, _) = crate::runtime::spawn_sources(plan, tx, &stop_rx);
    let deadline = tokio::time::Instant::now() + duration;
    let mut ticker = tokio::time::interval(std::time::Duration::from_millis(100));
    loop {
        tokio::select! {
            b = rx.recv() => match b {
                Some(b) => preview.batch(&b),
                None => break,
            },
            _ = ticker.tick() => preview.tick(crate::model::now_millis()),
            _ = tokio::time::sleep_until(deadline) => break,
        }
        if !preview.out.is_empty() {
            print(&preview.out);
            preview.out.clear();
        }
    }
    let _ = stop_tx.send(true);
    for s in sources {
        let _ = s.await;
    }
    Ok(())
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
