//! Map: readings -> product records. Pure and synchronous: no I/O, no clocks (time comes in).
//!
//! In: [`ReadingBatch`]es from sources, and ticks for interval products. Out: `(product, Record)`
//! pairs. Each product keeps the latest value and quality of each field; a record carries all of its
//! fields (a field never seen yet is `bad:no_value`) and the read time of the batch that produced it.
//! Publish modes: `every_sample` emits on every batch that touches the product; `on_change` when a
//! field moves by more than its deadband, changes quality, or on the first sample; `interval` emits
//! the latest values once per period.

use crate::config::{Aggregate, FieldPlan, FieldSource, LogicalType, Plan, PublishMode};
use crate::model::{BadReason, Millis, Quality, ReadingBatch, Record, Value};
use std::time::Duration;

type Cell = (Option<Value>, Quality);

struct ProductState {
    fields: std::sync::Arc<[FieldPlan]>,
    mode: PublishMode,
    current: Vec<Cell>,
    last_emitted: Option<Vec<Cell>>,
    latest_ts: Millis,
    next_due: Option<Millis>,
    seen_any: bool,
    /// Window products: one accumulator per field.
    acc: Vec<Acc>,
    /// The product has derived fields (computed before every record).
    derived: bool,
    /// Touched by the batch being applied (a mark, not a search: a batch of a device feeding
    /// 1,000 one-field products would otherwise cost 500,000 comparisons).
    touched: bool,
}

/// A field's samples in the current window.
#[derive(Debug, Clone, Default)]
struct Acc {
    n: u64,
    sum: f64,
    min: f64,
    max: f64,
    last: Option<Value>,
    /// Counter value at the previous good sample (kept across windows).
    prev_counter: Option<u64>,
    delta: u64,
}

impl Acc {
    fn add(&mut self, v: &Value, aggregate: Aggregate) {
        let x = v.as_f64().unwrap_or(0.0);
        if self.n == 0 {
            self.min = x;
            self.max = x;
        }
        self.n += 1;
        self.sum += x;
        self.min = self.min.min(x);
        self.max = self.max.max(x);
        self.last = Some(v.clone());
        if let Aggregate::Delta { bits } = aggregate {
            let c = match v {
                Value::UInt(u) => *u,
                Value::Int(i) => *i as u64,
                other => other.as_f64().unwrap_or(0.0).max(0.0) as u64,
            };
            let modulus: u128 = 1u128 << bits;
            let c = (u128::from(c) % modulus) as u64;
            if let Some(p) = self.prev_counter {
                // A decrease is a rollover: the counter wrapped at 2^bits.
                let d = if c >= p {
                    u128::from(c - p)
                } else {
                    modulus - u128::from(p) + u128::from(c)
                };
                self.delta = self.delta.saturating_add(d as u64);
            }
            self.prev_counter = Some(c);
        }
    }

    /// The field's value for the window that just closed.
    fn result(&self, f: &FieldPlan) -> Option<Value> {
        let integer = f.logical_type == LogicalType::Integer;
        let number = |x: f64| {
            if integer {
                Value::Int(x.round() as i64)
            } else {
                Value::Float(x)
            }
        };
        match f.aggregate {
            Aggregate::Count => Some(Value::UInt(self.n)),
            _ if self.n == 0 => None,
            Aggregate::Last => self.last.clone(),
            Aggregate::Sum => Some(number(self.sum)),
            Aggregate::Min => Some(number(self.min)),
            Aggregate::Max => Some(number(self.max)),
            Aggregate::Mean => Some(Value::Float(self.sum / self.n as f64)),
            Aggregate::Delta { .. } => Some(Value::UInt(self.delta)),
        }
    }

    fn reset(&mut self) {
        *self = Acc {
            prev_counter: self.prev_counter,
            ..Acc::default()
        };
    }
}

/// The mapping of every product, with the state `on_change` and `interval` need.
pub struct Mapper {
    products: Vec<ProductState>,
    /// The (product, field) pairs each tag feeds: tag `t`'s are `feeds[feed_start[t]..feed_start[t + 1]]`
    /// (one table, not a vector per tag: at 10,000 tags that is most of the mapper's memory).
    feeds: Vec<(u32, u32)>,
    feed_start: Vec<u32>,
}

impl Mapper {
    pub fn new(plan: &Plan) -> Self {
        let mut pairs: Vec<(usize, u32, u32)> = Vec::new();
        let products = plan
            .products
            .iter()
            .enumerate()
            .map(|(pi, p)| {
                for (fi, f) in p.fields.iter().enumerate() {
                    if let Some(tag) = f.source.tag() {
                        pairs.push((tag, pi as u32, fi as u32));
                    }
                }
                ProductState {
                    fields: p.fields.clone(),
                    mode: p.publish,
                    current: vec![(None, Quality::Bad(BadReason::NoValue)); p.fields.len()],
                    last_emitted: None,
                    latest_ts: 0,
                    next_due: None,
                    seen_any: false,
                    // Only windows aggregate: other products keep no accumulators.
                    acc: if matches!(p.publish, PublishMode::Window(_)) {
                        vec![Acc::default(); p.fields.len()]
                    } else {
                        Vec::new()
                    },
                    derived: p.fields.iter().any(|f| f.source.tag().is_none()),
                    touched: false,
                }
            })
            .collect();
        pairs.sort_unstable();
        let mut feed_start = Vec::with_capacity(plan.tags.len() + 1);
        let mut at = 0;
        for tag in 0..=plan.tags.len() {
            while at < pairs.len() && pairs[at].0 < tag {
                at += 1;
            }
            feed_start.push(at as u32);
        }
        let feeds = pairs.into_iter().map(|(_, p, f)| (p, f)).collect();
        Mapper {
            products,
            feeds,
            feed_start,
        }
    }

    /// Takes over the state of products a reload left unchanged: `pairs` of `(index here, index
    /// in old)`. Their last values, last emitted record and open window go on as if there had been
    /// no reload.
    pub fn carry_over(&mut self, old: &mut Mapper, pairs: &[(usize, usize)]) {
        for &(new, was) in pairs {
            let (Some(n), Some(o)) = (self.products.get_mut(new), old.products.get_mut(was)) else {
                continue;
            };
            if n.current.len() != o.current.len() || n.acc.len() != o.acc.len() || n.mode != o.mode {
                continue;
            }
            n.current = std::mem::take(&mut o.current);
            n.last_emitted = o.last_emitted.take();
            n.latest_ts = o.latest_ts;
            n.next_due = o.next_due;
            n.seen_any = o.seen_any;
            n.acc = std::mem::take(&mut o.acc);
        }
    }

    /// Applies one poll's readings; pushes the records it produces.
    pub fn on_batch(&mut self, batch: &ReadingBatch, out: &mut Vec<(usize, Record)>) {
        let mut touched: Vec<usize> = Vec::new();
        for r in &batch.readings {
            let next = r.tag.saturating_add(1);
            let (Some(&from), Some(&to)) = (self.feed_start.get(r.tag), self.feed_start.get(next)) else {
                continue;
            };
            for &(pi, fi) in &self.feeds[from as usize..to as usize] {
                let (pi, fi) = (pi as usize, fi as usize);
                let p = &mut self.products[pi];
                let field = &p.fields[fi];
                p.current[fi] = match (&r.value, r.quality) {
                    (Some(v), q) => match convert(field, v) {
                        Some(v) => (Some(v), q),
                        None => (None, Quality::Bad(BadReason::Decode)),
                    },
                    (None, q) => (None, q),
                };
                if let (PublishMode::Window(_), (Some(v), q)) = (p.mode, &p.current[fi]) {
                    if q.is_good() {
                        let aggregate = p.fields[fi].aggregate;
                        let v = v.clone();
                        p.acc[fi].add(&v, aggregate);
                    }
                }
                p.latest_ts = p.latest_ts.max(batch.ts);
                p.seen_any = true;
                if !p.touched {
                    p.touched = true;
                    touched.push(pi);
                }
            }
        }
        for pi in touched {
            let p = &mut self.products[pi];
            p.touched = false;
            if p.derived {
                derive(&p.fields, &mut p.current);
            }
            let emit = match p.mode {
                PublishMode::EverySample => true,
                PublishMode::OnChange => p
                    .last_emitted
                    .as_ref()
                    .is_none_or(|last| changed(&p.fields, last, &p.current)),
                PublishMode::Interval(_) | PublishMode::Window(_) => false,
            };
            if emit {
                if p.mode == PublishMode::OnChange {
                    p.last_emitted = Some(p.current.clone());
                }
                out.push((
                    pi,
                    Record {
                        ts: batch.ts,
                        fields: p.current.clone(),
                    },
                ));
            }
        }
    }

    /// Emits the records of interval and window products that are due at `now`.
    pub fn on_tick(&mut self, now: Millis, out: &mut Vec<(usize, Record)>) {
        for (pi, p) in self.products.iter_mut().enumerate() {
            if let PublishMode::Window(w) = p.mode {
                // Tumbling windows aligned to multiples of their length; the record's time is the
                // window's end. A window without a good sample still yields a record (count 0,
                // qualities saying why), so gaps in production are visible.
                let w = (w.as_millis() as u64).max(1);
                let end = *p.next_due.get_or_insert((now / w + 1) * w);
                if now < end {
                    continue;
                }
                let fields = p
                    .fields
                    .iter()
                    .zip(&p.acc)
                    .zip(&p.current)
                    .map(|((f, acc), (_, q))| match acc.result(f) {
                        Some(v) if acc.n > 0 || f.aggregate == Aggregate::Count => (Some(v), Quality::Good),
                        _ => (
                            None,
                            if q.is_good() {
                                Quality::Bad(BadReason::NoValue)
                            } else {
                                *q
                            },
                        ),
                    })
                    .collect::<Vec<Cell>>();
                let mut fields = fields;
                if p.derived {
                    derive(&p.fields, &mut fields);
                }
                out.push((pi, Record { ts: end, fields }));
                p.acc.iter_mut().for_each(Acc::reset);
                p.next_due = Some(end + w * ((now - end) / w + 1));
                continue;
            }
            let PublishMode::Interval(period) = p.mode else {
                continue;
            };
            let period = period.as_millis() as u64;
            let due = *p.next_due.get_or_insert(now + period);
            if now < due || !p.seen_any {
                continue;
            }
            // Keep the phase; skip periods missed while the process was stalled.
            p.next_due = Some(due + period * ((now - due) / period + 1));
            out.push((
                pi,
                Record {
                    ts: p.latest_ts,
                    fields: p.current.clone(),
                },
            ));
        }
    }

    /// When the next interval product is due (for the caller's timer).
    pub fn next_tick(&self) -> Option<Duration> {
        self.products
            .iter()
            .filter_map(|p| match p.mode {
                PublishMode::Interval(d) | PublishMode::Window(d) => Some(d),
                _ => None,
            })
            .min()
            .map(|d| (d / 4).max(Duration::from_millis(5)))
    }
}

/// Computes the derived fields of a record from its other fields (in field order, so a derived field
/// may use an earlier derived one). A missing input leaves no value, with that input's quality; an
/// operation without a result (division by zero) leaves no value, `bad:no_value`; otherwise the
/// quality is the first input quality that is not good, or good.
fn derive(fields: &[FieldPlan], cells: &mut [Cell]) {
    let mut xs = Vec::new();
    for (i, f) in fields.iter().enumerate() {
        let FieldSource::Derived(d) = &f.source else {
            continue;
        };
        xs.clear();
        let mut quality = Quality::Good;
        let mut missing = None;
        for &input in &d.inputs {
            let (v, q) = &cells[input];
            match v.as_ref().and_then(Value::as_f64) {
                Some(x) => xs.push(x),
                None => {
                    missing.get_or_insert(if q.is_good() {
                        Quality::Bad(BadReason::NoValue)
                    } else {
                        *q
                    });
                }
            }
            if !q.is_good() && quality.is_good() {
                quality = *q;
            }
        }
        cells[i] = match missing {
            Some(q) => (None, q),
            None => match d.op.apply(&xs) {
                None => (None, Quality::Bad(BadReason::NoValue)),
                Some(x) => (Some(Value::Float(x * f.scale() + f.offset())), quality),
            },
        };
    }
}

/// Tag value -> field value: the field's scale and offset, then its logical type.
fn convert(field: &FieldPlan, v: &Value) -> Option<Value> {
    let identity = field.scale() == 1.0 && field.offset() == 0.0;
    match field.logical_type {
        LogicalType::Boolean => matches!(v, Value::Bool(_)).then(|| v.clone()),
        LogicalType::String => matches!(v, Value::Text(_)).then(|| v.clone()),
        LogicalType::Array => matches!(v, Value::Array(_)).then(|| v.clone()),
        LogicalType::Integer if identity => match v {
            Value::Int(_) | Value::UInt(_) => Some(v.clone()),
            _ => None,
        },
        LogicalType::Integer | LogicalType::Number => {
            let x = v.as_f64()? * field.scale() + field.offset();
            x.is_finite().then_some(Value::Float(x))
        }
    }
}

fn changed(fields: &[FieldPlan], last: &[Cell], now: &[Cell]) -> bool {
    fields
        .iter()
        .zip(last.iter().zip(now))
        .any(|(f, ((lv, lq), (nv, nq)))| {
            if lq != nq {
                return true;
            }
            match (lv, nv) {
                (Some(a), Some(b)) => match (a.as_f64(), b.as_f64()) {
                    (Some(x), Some(y)) if !matches!(a, Value::Bool(_)) => {
                        (x - y).abs() > f.deadband() || (f.deadband() == 0.0 && x != y)
                    }
                    _ => a != b,
                },
                (None, None) => false,
                _ => true,
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use crate::model::Reading;
    use std::path::Path;

    const GATEWAY: &str = r#"
[agent]
id = "gw"
site = "s"
area = "a"
line = "l"
governance = "builtin-defaults"
[[devices]]
id = "plc"
protocol = "modbus_tcp"
address = "127.0.0.1:502"
  [[devices.tags]]
  name = "temp"
  table = "holding"
  address = 0
  type = "f32"
  [[devices.tags]]
  name = "count"
  table = "holding"
  address = 2
"#;

    fn product(mode: &str) -> String {
        format!(
            r#"
id = "p"
name = "P"
version = "1.0.0"
domain = "production"
owner = "team"
[publish]
{mode}
[[fields]]
name = "temp"
source = "plc.temp"
deadband = 0.5
[[fields]]
name = "count"
source = "plc.count"
"#
        )
    }

    fn mapper(mode: &str) -> Mapper {
        let p = product(mode);
        let plan = config::load_texts(
            (Path::new("agent.toml"), GATEWAY),
            None,
            &[(Path::new("p.toml"), &p)],
            Path::new("/tmp"),
        )
        .unwrap();
        Mapper::new(&plan)
    }

    fn batch(ts: Millis, temp: f64, count: u64) -> ReadingBatch {
        ReadingBatch {
            device: 0,
            ts,
            readings: vec![
                Reading {
                    tag: 0,
                    value: Some(Value::Float(temp)),
                    quality: Quality::Good,
                },
                Reading {
                    tag: 1,
                    value: Some(Value::UInt(count)),
                    quality: Quality::Good,
                },
            ],
        }
    }

    #[test]
    fn every_sample_emits_each_batch_with_read_time() {
        let mut m = mapper("mode = \"every_sample\"");
        let mut out = Vec::new();
        m.on_batch(&batch(1000, 20.0, 1), &mut out);
        m.on_batch(&batch(2000, 20.0, 1), &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].1.ts, 2000);
        assert_eq!(out[0].1.fields[1], (Some(Value::UInt(1)), Quality::Good));
    }

    #[test]
    fn on_change_respects_deadband_and_quality() {
        let mut m = mapper("mode = \"on_change\"");
        let mut out = Vec::new();
        m.on_batch(&batch(1, 20.0, 1), &mut out); // first sample
        m.on_batch(&batch(2, 20.4, 1), &mut out); // within deadband
        m.on_batch(&batch(3, 20.6, 1), &mut out); // 0.6 from last emitted
        m.on_batch(&batch(4, 20.6, 2), &mut out); // integer change, deadband 0
        let bad = ReadingBatch {
            device: 0,
            ts: 5,
            readings: vec![Reading {
                tag: 0,
                value: None,
                quality: Quality::Bad(BadReason::Timeout),
            }],
        };
        m.on_batch(&bad, &mut out); // quality change
        m.on_batch(&bad, &mut out); // no change
        let ts: Vec<Millis> = out.iter().map(|(_, r)| r.ts).collect();
        assert_eq!(ts, vec![1, 3, 4, 5]);
        assert_eq!(out[3].1.fields[0], (None, Quality::Bad(BadReason::Timeout)));
    }

    #[test]
    fn interval_emits_latest_once_per_period() {
        let mut m = mapper("mode = \"interval\"\ninterval = \"1s\"");
        let mut out = Vec::new();
        m.on_tick(0, &mut out); // arms the timer; nothing seen yet
        m.on_batch(&batch(100, 20.0, 1), &mut out);
        m.on_batch(&batch(600, 21.0, 2), &mut out);
        assert!(out.is_empty());
        m.on_tick(999, &mut out);
        assert!(out.is_empty());
        m.on_tick(1000, &mut out);
        m.on_tick(1500, &mut out);
        m.on_tick(3200, &mut out); // missed 2000: one record, next due 4000
        m.on_tick(3999, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].1.ts, 600);
        assert_eq!(out[0].1.fields[0].0, Some(Value::Float(21.0)));
    }

    const COUNTER_GATEWAY: &str = r#"
[agent]
id = "gw"
site = "s"
area = "a"
line = "l"
governance = "builtin-defaults"
[[devices]]
id = "plc"
protocol = "modbus_tcp"
address = "127.0.0.1:502"
  [[devices.tags]]
  name = "good"
  table = "holding"
  address = 0
  type = "u16"
  [[devices.tags]]
  name = "temp"
  table = "holding"
  address = 2
  type = "f32"
"#;

    fn window_mapper() -> Mapper {
        let p = r#"
id = "rate"
name = "Rate"
version = "1.0.0"
domain = "production"
owner = "team"
[publish]
mode = "window"
window = "1m"
[[fields]]
name = "good_per_min"
source = "plc.good"
aggregate = "delta"
[[fields]]
name = "samples"
source = "plc.temp"
aggregate = "count"
[[fields]]
name = "temp_mean"
source = "plc.temp"
aggregate = "mean"
[[fields]]
name = "temp_max"
source = "plc.temp"
aggregate = "max"
[[fields]]
name = "temp_spread"
derive = "difference"
inputs = ["temp_max", "temp_mean"]
unit = "K"
[[fields]]
name = "parts_per_sample"
derive = "ratio"
inputs = ["good_per_min", "samples"]
unit = "1"
"#;
        let plan = config::load_texts(
            (Path::new("agent.toml"), COUNTER_GATEWAY),
            None,
            &[(Path::new("p.toml"), p)],
            Path::new("/tmp"),
        )
        .unwrap();
        Mapper::new(&plan)
    }

    fn counter_batch(ts: Millis, good: u64, temp: f64) -> ReadingBatch {
        ReadingBatch {
            device: 0,
            ts,
            readings: vec![
                Reading {
                    tag: 0,
                    value: Some(Value::UInt(good)),
                    quality: Quality::Good,
                },
                Reading {
                    tag: 1,
                    value: Some(Value::Float(temp)),
                    quality: Quality::Good,
                },
            ],
        }
    }

    #[test]
    fn windows_aggregate_and_counters_roll_over() {
        let mut m = window_mapper();
        let mut out = Vec::new();
        let t0: Millis = 1_800_000_000_000; // a minute boundary (divisible by 60,000)
        m.on_tick(t0 + 1, &mut out); // arms: the window ends at t0 + 60 s
                                     // A 16-bit counter wrapping: 65_530 -> 65_535 -> 4 is 5 + 5 = 10 parts.
        m.on_batch(&counter_batch(t0 + 1_000, 65_530, 20.0), &mut out);
        m.on_batch(&counter_batch(t0 + 2_000, 65_535, 22.0), &mut out);
        m.on_batch(&counter_batch(t0 + 3_000, 4, 30.0), &mut out);
        assert!(out.is_empty(), "nothing before the window closes");
        m.on_tick(t0 + 60_000, &mut out);
        assert_eq!(out.len(), 1);
        let r = &out[0].1;
        assert_eq!(r.ts, t0 + 60_000, "stamped with the window's end");
        assert_eq!(r.fields[0], (Some(Value::UInt(10)), Quality::Good));
        assert_eq!(r.fields[1], (Some(Value::UInt(3)), Quality::Good));
        assert_eq!(r.fields[2], (Some(Value::Float(24.0)), Quality::Good));
        assert_eq!(r.fields[3], (Some(Value::Float(30.0)), Quality::Good));
        // Derived from the window's aggregates.
        assert_eq!(r.fields[4], (Some(Value::Float(6.0)), Quality::Good));
        assert_eq!(r.fields[5], (Some(Value::Float(10.0 / 3.0)), Quality::Good));
        // The next window continues the counter from where it stood.
        m.on_batch(&counter_batch(t0 + 61_000, 9, 25.0), &mut out);
        m.on_tick(t0 + 120_000, &mut out);
        assert_eq!(out[1].1.fields[0], (Some(Value::UInt(5)), Quality::Good));
        // A window without samples: count 0, the rest says there was no value.
        m.on_tick(t0 + 180_000, &mut out);
        assert_eq!(out[2].1.fields[1], (Some(Value::UInt(0)), Quality::Good));
        assert_eq!(out[2].1.fields[0], (None, Quality::Bad(BadReason::NoValue)));
        assert_eq!(out[2].1.fields[5], (None, Quality::Bad(BadReason::NoValue)));
    }

    #[test]
    fn derived_fields_follow_their_inputs_quality_and_have_no_value_without_a_result() {
        let p = r#"
id = "p"
name = "P"
version = "1.0.0"
domain = "production"
owner = "team"
[[fields]]
name = "scrap"
source = "plc.count"
[[fields]]
name = "good"
source = "plc.temp"
[[fields]]
name = "scrap_rate"
derive = "share"
inputs = ["scrap", "good"]
unit = "%"
scale = 100.0
"#;
        let plan = config::load_texts(
            (Path::new("agent.toml"), GATEWAY),
            None,
            &[(Path::new("p.toml"), p)],
            Path::new("/tmp"),
        )
        .unwrap();
        let mut m = Mapper::new(&plan);
        let mut out = Vec::new();
        m.on_batch(&batch(1, 95.0, 5), &mut out);
        assert_eq!(out[0].1.fields[2], (Some(Value::Float(5.0)), Quality::Good));
        // Nothing produced yet: no share to speak of.
        m.on_batch(&batch(2, 0.0, 0), &mut out);
        assert_eq!(out[1].1.fields[2], (None, Quality::Bad(BadReason::NoValue)));
        // An input that could not be read: its reason carries over.
        let mut b = batch(3, 95.0, 5);
        b.readings[0] = Reading {
            tag: 0,
            value: None,
            quality: Quality::Bad(BadReason::Timeout),
        };
        m.on_batch(&b, &mut out);
        assert_eq!(out[2].1.fields[2], (None, Quality::Bad(BadReason::Timeout)));
    }

    #[test]
    fn fields_never_seen_are_no_value() {
        let mut m = mapper("mode = \"every_sample\"");
        let mut out = Vec::new();
        let only_count = ReadingBatch {
            device: 0,
            ts: 7,
            readings: vec![Reading {
                tag: 1,
                value: Some(Value::UInt(3)),
                quality: Quality::Good,
            }],
        };
        m.on_batch(&only_count, &mut out);
        assert_eq!(out[0].1.fields[0], (None, Quality::Bad(BadReason::NoValue)));
    }
}
