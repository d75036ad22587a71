//! The Unified Namespace view of a product: each field's latest value on its own retained topic,
//! `{product topic}/{field}` or the governance file's `uns_topic_template`, beside the product's
//! message stream (`[publish] uns = true`).
//!
//! In: governed records from the produce stage ([`Board::update`]): only what governance lets
//! leave, so a withheld field has no topic at all, a masked one carries `null` and a pseudonymised
//! one its pseudonym, exactly as in the product message. Out: to the publisher, the cells with a
//! value newer than the one last sent ([`Board::take`]). A cell holds the newest value only: when a
//! field changes faster than the link can carry, the values in between are never sent.
//!
//! Current state, not a record: the product stream stays the durable, gap-accounted history. The
//! topics of fields that are gone or withheld since (a reload, or a config changed between runs)
//! are cleared at the broker: the topics published are kept in `<data_dir>/uns-topics.json`.

use crate::config::{EdgeAction, Plan};
use crate::govern::Governed;
use crate::model::{format_rfc3339_millis, QualityText};
use crate::publish::envelope::write_value;
use std::collections::{BTreeSet, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use tracing::warn;

/// One field's topic and its newest payload not yet sent.
struct Cell {
    topic: Arc<str>,
    /// Shared by the fields of a product with the same unit: the payload names it.
    unit: Arc<String>,
    pending: Option<Vec<u8>>,
    /// The last payload taken, sent again on every new connection (the broker may have lost it).
    sent: Option<Arc<[u8]>>,
}

#[derive(Default)]
struct Inner {
    /// Per product of the current plan, per field: its cell (`None`: no UNS view, or withheld).
    products: Vec<Vec<Option<usize>>>,
    cells: Vec<Cell>,
    /// Cells with a pending payload, each once, oldest first.
    queue: VecDeque<usize>,
    /// Retained topics to clear (empty retained payload): fields gone or withheld since.
    clear: Vec<Arc<str>>,
}

/// One message of the view, for the publisher: `payload` empty clears the retained topic.
pub struct Update {
    pub topic: Arc<str>,
    pub payload: Vec<u8>,
}

/// The latest value of every field of every product with a UNS view.
pub struct Board {
    inner: Mutex<Inner>,
    /// `<data_dir>/uns-topics.json`: every topic that may hold a retained value of ours.
    file: PathBuf,
}

impl Board {
    /// The view of `plan`'s products; the topics an earlier run left that `plan` no longer has
    /// are cleared on the next connect.
    pub fn new(plan: &Plan) -> Arc<Board> {
        let file = plan.agent.data_dir.join("uns-topics.json");
        let before = read_topics(&file);
        let board = Board {
            inner: Mutex::new(Inner::default()),
            file,
        };
        if plan.products.iter().any(|p| p.uns) || !before.is_empty() {
            board.reconfigure(plan, before);
        }
        Arc::new(board)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes a new plan (a reload): cells of fields still published keep their state; topics no
    /// longer published are cleared.
    pub fn reload(&self, plan: &Plan) {
        let before: BTreeSet<String> = self.lock().cells.iter().map(|c| c.topic.to_string()).collect();
        if plan.products.iter().any(|p| p.uns) || !before.is_empty() {
            self.reconfigure(plan, before);
        }
    }

    fn reconfigure(&self, plan: &Plan, before: BTreeSet<String>) {
        let mut inner = self.lock();
        let old: Vec<Cell> = std::mem::take(&mut inner.cells);
        let mut old_by_topic: std::collections::HashMap<Arc<str>, Cell> =
            old.into_iter().map(|c| (c.topic.clone(), c)).collect();
        let mut products = Vec::with_capacity(plan.products.len());
        let mut cells = Vec::new();
        let mut queue = VecDeque::new();
        for p in &plan.products {
            let mut fields = vec![None; p.fields.len()];
            if p.uns {
                for (i, f) in p.fields.iter().enumerate() {
                    // Nothing of a withheld field: not even its topic.
                    if f.action == EdgeAction::Never {
                        continue;
                    }
                    let topic: Arc<str> = field_topic(&p.uns_topic, &f.name).into();
                    if !plan.governance.allow_topic_prefixes.is_empty()
                        && !plan
                            .governance
                            .allow_topic_prefixes
                            .iter()
                            .any(|a| topic.starts_with(a.as_str()))
                    {
                        warn!(product = %p.id, field = %f.name, topic = %topic, "egress does not allow this UNS topic; the field has no UNS view");
                        continue;
                    }
                    let cell = match old_by_topic.remove(&topic) {
                        Some(mut c) => {
                            c.unit = f.unit.clone();
                            if c.pending.is_some() {
                                queue.push_back(cells.len());
                            }
                            c
                        }
                        None => Cell {
                            topic,
                            unit: f.unit.clone(),
                            pending: None,
                            sent: None,
                        },
                    };
                    fields[i] = Some(cells.len());
                    cells.push(cell);
                }
            }
            products.push(fields);
        }
        let now: BTreeSet<String> = cells.iter().map(|c| c.topic.to_string()).collect();
        inner
            .clear
            .extend(before.difference(&now).map(|t| Arc::from(t.as_str())));
        inner.products = products;
        inner.cells = cells;
        inner.queue = queue;
        // Every topic that may hold a value of ours, until it is cleared.
        let mut keep = now;
        keep.extend(inner.clear.iter().map(|t| t.to_string()));
        drop(inner);
        if let Err(e) = write_topics(&self.file, &keep) {
            warn!(file = %self.file.display(), error = %e, "cannot store the UNS topics (a topic withheld before the next start may keep its last value at the broker)");
        }
    }

    /// The newest values of product `product` (an index into the current plan): only the fields
    /// governance let through, each replacing what its cell had pending.
    pub fn update(&self, product: usize, record: &Governed) {
        let mut inner = self.lock();
        let Inner {
            products, cells, queue, ..
        } = &mut *inner;
        let Some(fields) = products.get(product) else { return };
        if fields.iter().all(Option::is_none) {
            return;
        }
        let ts = format_rfc3339_millis(record.ts);
        for (field, value, quality) in &record.fields {
            let Some(&Some(c)) = fields.get(*field) else { continue };
            let cell = &mut cells[c];
            let mut out = Vec::with_capacity(64);
            out.extend_from_slice(b"{\"value\":");
            write_value(&mut out, value.as_ref());
            out.extend_from_slice(b",\"ts\":\"");
            out.extend_from_slice(ts.as_bytes());
            out.extend_from_slice(b"\",\"quality\":\"");
            if quality.is_good() {
                out.extend_from_slice(b"good");
            } else {
                let _ = write!(out, "{}", QualityText(*quality));
            }
            out.extend_from_slice(b"\"");
            if !cell.unit.is_empty() {
                out.extend_from_slice(b",\"unit\":");
                let _ = serde_json::to_writer(&mut out, cell.unit.as_str());
            }
            out.push(b'}');
            if cell.pending.replace(out).is_none() {
                queue.push_back(c);
            }
        }
    }

    /// Up to `limit` messages to send now: clears first, then the oldest pending cells.
    pub fn take(&self, limit: usize) -> Vec<Update> {
        let mut inner = self.lock();
        let mut out = Vec::new();
        let clearing = !inner.clear.is_empty();
        while out.len() < limit {
            let Some(topic) = inner.clear.pop() else { break };
            out.push(Update {
                topic,
                payload: Vec::new(),
            });
        }
        if clearing && inner.clear.is_empty() {
            // Every clear is on its way: from now on only the current topics may hold our values.
            let keep: BTreeSet<String> = inner.cells.iter().map(|c| c.topic.to_string()).collect();
            if let Err(e) = write_topics(&self.file, &keep) {
                warn!(file = %self.file.display(), error = %e, "cannot store the UNS topics");
            }
        }
        while out.len() < limit {
            let Some(c) = inner.queue.pop_front() else { break };
            let cell = &mut inner.cells[c];
            if let Some(payload) = cell.pending.take() {
                cell.sent = Some(payload.as_slice().into());
                out.push(Update {
                    topic: cell.topic.clone(),
                    payload,
                });
            }
        }
        out
    }

    /// A new connection: every value sent before goes again (a publish in flight when the last
    /// connection dropped may never have reached the broker); a newer pending one stays as it is.
    pub fn resend(&self) {
        let mut inner = self.lock();
        let Inner { cells, queue, .. } = &mut *inner;
        for (i, c) in cells.iter_mut().enumerate() {
            if c.pending.is_none() {
                if let Some(sent) = &c.sent {
                    c.pending = Some(sent.to_vec());
                    queue.push_back(i);
                }
            }
        }
    }

    /// Whether anything waits to be sent.
    pub fn is_empty(&self) -> bool {
        let inner = self.lock();
        inner.queue.is_empty() && inner.clear.is_empty()
    }
}

/// A field's topic in the view.
/// The UNS topic of `field` in a product whose UNS topic is `uns_topic` (`{field}` standing
/// for the name).
pub fn field_topic(uns_topic: &str, field: &str) -> String {
    uns_topic.replace("{field}", field)
}

fn read_topics(file: &Path) -> BTreeSet<String> {
    std::fs::read(file)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn write_topics(file: &Path, topics: &BTreeSet<String>) -> std::io::Result<()> {
    let body = serde_json::to_vec(topics).map_err(std::io::Error::other)?;
    crate::fsutil::write_atomic(file, &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Quality, Value};

    const GATEWAY: &str = r#"
[agent]
id = "gw-1"
site = "s"
area = "a"
line = "l"
governance = "builtin-defaults"

[[devices]]
id = "plc"
protocol = "modbus_tcp"
address = "127.0.0.1:5020"

  [[devices.tags]]
  name = "count"
  table = "holding"
  address = 0

  [[devices.tags]]
  name = "setpoint"
  table = "holding"
  address = 1
"#;

    /// A product of `count` and `setpoint` (classified `setpoint_class`), with `uns` as given.
    fn plan(dir: &Path, uns: bool, setpoint_class: &str) -> Plan {
        let product = format!(
            "id = \"press\"\nname = \"Press\"\nversion = \"1.0.0\"\ndomain = \"production\"\nowner = \"o\"\n\
             [publish]\nuns = {uns}\n\
             [[fields]]\nname = \"count\"\nsource = \"plc.count\"\nunit = \"1\"\n\
             [[fields]]\nname = \"setpoint\"\nsource = \"plc.setpoint\"\nclassification = \"{setpoint_class}\"\n"
        );
        let cfg = dir.join("cfg");
        std::fs::create_dir_all(cfg.join("products")).unwrap();
        std::fs::write(cfg.join("agent.toml"), GATEWAY).unwrap();
        std::fs::write(cfg.join("products/press.toml"), product).unwrap();
        let texts = crate::config::read(&[cfg]).unwrap();
        // The data directory exists before anything runs (the buffer is in it).
        std::fs::create_dir_all(dir.join("data")).unwrap();
        crate::config::validate_texts(&texts, Some(&dir.join("data"))).unwrap()
    }

    fn record(ts: u64, count: i64, setpoint: i64) -> Governed {
        Governed {
            ts,
            fields: vec![
                (0, Some(Value::Int(count)), Quality::Good),
                (1, Some(Value::Int(setpoint)), Quality::Good),
            ],
        }
    }

    fn sent(updates: &[Update]) -> Vec<(String, serde_json::Value)> {
        updates
            .iter()
            .map(|u| {
                let v = if u.payload.is_empty() {
                    serde_json::Value::Null
                } else {
                    serde_json::from_slice(&u.payload).unwrap()
                };
                (u.topic.to_string(), v)
            })
            .collect()
    }

    #[test]
    fn each_field_sends_its_newest_value_and_a_withheld_field_has_no_topic() {
        let dir = tempfile::tempdir().unwrap();
        let plan = plan(dir.path(), true, "restricted");
        let board = Board::new(&plan);
        // Three records before the link has room: only the newest values go, once each. The
        // restricted set point is offered to the board all the same: it has no cell to take it.
        for (ts, n) in [(1_000, 1), (2_000, 2), (3_000, 3)] {
            board.update(0, &record(ts, n, 99));
        }
        let out = sent(&board.take(10));
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].0, "s/a/l/production/press/v1/count");
        assert_eq!(out[0].1["value"], 3);
        assert_eq!(out[0].1["quality"], "good");
        assert_eq!(out[0].1["unit"], "1");
        assert_eq!(out[0].1["ts"], "1970-01-01T00:00:03.000Z");
        assert!(board.take(10).is_empty(), "nothing new, nothing sent");
        // A new connection sends the current state again.
        board.resend();
        assert_eq!(sent(&board.take(10)).len(), 1);
    }

    #[test]
    fn a_reload_that_withholds_a_field_clears_its_retained_topic() {
        let dir = tempfile::tempdir().unwrap();
        let board = Board::new(&plan(dir.path(), true, "internal"));
        board.update(0, &record(1_000, 1, 42));
        assert_eq!(sent(&board.take(10)).len(), 2);
        board.reload(&plan(dir.path(), true, "restricted"));
        let out = sent(&board.take(10));
        assert_eq!(
            out,
            [(
                "s/a/l/production/press/v1/setpoint".to_string(),
                serde_json::Value::Null
            )],
            "the set point's last value is cleared at the broker"
        );
        board.update(0, &record(2_000, 2, 43));
        let out = sent(&board.take(10));
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(out[0].0.ends_with("/count"));
    }

    #[test]
    fn a_start_clears_what_an_earlier_run_left_and_this_config_no_longer_publishes() {
        let dir = tempfile::tempdir().unwrap();
        {
            let board = Board::new(&plan(dir.path(), true, "internal"));
            board.update(0, &record(1_000, 1, 42));
            assert_eq!(board.take(10).len(), 2);
        }
        // The agent stopped; the set point was classified restricted meanwhile.
        let board = Board::new(&plan(dir.path(), true, "restricted"));
        let out = sent(&board.take(10));
        assert_eq!(
            out,
            [(
                "s/a/l/production/press/v1/setpoint".to_string(),
                serde_json::Value::Null
            )]
        );
        // The view switched off entirely: every topic it had is cleared.
        let board = Board::new(&plan(dir.path(), false, "restricted"));
        let out = sent(&board.take(10));
        assert_eq!(
            out,
            [("s/a/l/production/press/v1/count".to_string(), serde_json::Value::Null)]
        );
        let board = Board::new(&plan(dir.path(), false, "restricted"));
        assert!(board.take(10).is_empty(), "cleared once, not at every start");
    }
}
