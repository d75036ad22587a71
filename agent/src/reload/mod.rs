//! Reload, the configuration side: which new configuration to run, and what changed. Pure: no
//! tasks, no I/O beyond reading the config files (the runtime applies the result, see
//! [`crate::runtime`]).
//!
//! Ownership decides what a mistake blocks. The gateway file (devices, agent, upstream) and the
//! governance file belong to the plant: if either is wrong, or changes something only a restart
//! can change, nothing changes. Product files belong to domain teams and stand alone: a product
//! file that became invalid is put back to the text it had when it was last applied (or left out,
//! when it is new), every other change goes ahead, and the refusal is reported with each problem's
//! `file:line:column`.

use crate::config::{self, Diagnostic, Diagnostics, Plan, Texts};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A configuration chosen by [`load_isolated`].
#[derive(Debug)]
pub struct Loaded {
    pub plan: Plan,
    /// The texts `plan` was validated from (refused product files at their previous text).
    pub texts: Texts,
    /// Product files refused, with their problems; their products run on as they were.
    pub refused: Vec<(PathBuf, Diagnostics)>,
}

/// The product file texts the running plan was validated from: what a refused file is put back
/// to. Kept on disk in `<data_dir>/applied/`, not in memory (at 10,000 tags they are most of a
/// megabyte), and each checked against the hash of the text running before it is used.
#[derive(Debug, Clone)]
pub struct Applied {
    dir: PathBuf,
    /// Each product file running, and the FNV-1a hash of its text.
    running: HashMap<PathBuf, u64>,
}

impl Applied {
    pub fn new(data_dir: &Path) -> Applied {
        Applied {
            dir: data_dir.join("applied"),
            running: HashMap::new(),
        }
    }

    fn copy(&self, path: &Path) -> PathBuf {
        let name = config::fnv1a64(&[path.as_os_str().as_encoded_bytes()]);
        self.dir.join(format!("{name:016x}.toml"))
    }

    /// `texts` run from now on. A copy that cannot be written is logged; should that file be
    /// refused later, the whole reload is (its previous text is not at hand).
    pub fn keep(&mut self, texts: &Texts) {
        if let Err(e) = std::fs::create_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot keep the applied product files: a reload that refuses one of them refuses everything");
        }
        let mut wanted = std::collections::HashSet::new();
        self.running.clear();
        for (path, text) in &texts.products {
            let copy = self.copy(path);
            let hash = config::fnv1a64(&[text.as_bytes()]);
            self.running.insert(path.clone(), hash);
            wanted.insert(copy.clone());
            let same = std::fs::read(&copy).is_ok_and(|b| config::fnv1a64(&[&b]) == hash);
            if !same {
                if let Err(e) = crate::fsutil::write_atomic(&copy, text.as_bytes()) {
                    tracing::warn!(file = %path.display(), error = %e, "cannot keep the applied text of this product file: a reload that refuses it refuses everything");
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                if !wanted.contains(&e.path()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    /// Whether `path` is a product file of the running plan.
    pub fn runs(&self, path: &Path) -> bool {
        self.running.contains_key(path)
    }

    /// The running text of `path`, if its copy is there and intact.
    pub fn text(&self, path: &Path) -> Option<String> {
        let hash = *self.running.get(path)?;
        let text = std::fs::read_to_string(self.copy(path)).ok()?;
        (config::fnv1a64(&[text.as_bytes()]) == hash).then_some(text)
    }
}

/// Reads and validates the configuration at `paths`, isolating product files: each whose new text
/// does not validate runs on its text in `previous`. `Err`: nothing may change (the gateway or
/// governance file is wrong, a file cannot be read, or refusing product files does not make the
/// rest valid); every problem is in it.
pub fn load_isolated(paths: &[PathBuf], data_dir: Option<&Path>, previous: &Applied) -> Result<Loaded, Diagnostics> {
    let mut texts = config::read(paths)?;
    // A named file that cannot be used refuses the reload, as it refuses a start.
    let files = config::files::check(&texts);
    if !files.is_empty() {
        let mut all = config::validate_texts(&texts, data_dir)
            .err()
            .map(|d| d.0)
            .unwrap_or_default();
        all.extend(files);
        return Err(Diagnostics(all));
    }
    let mut refused: Vec<(PathBuf, Diagnostics)> = Vec::new();
    // Each round refuses at least one more file, so this ends.
    loop {
        let problems = match config::validate_texts(&texts, data_dir) {
            Ok(plan) => return Ok(Loaded { plan, texts, refused }),
            Err(d) => d,
        };
        let mut by_file: HashMap<PathBuf, Vec<Diagnostic>> = HashMap::new();
        for d in &problems.0 {
            by_file.entry(d.file.clone()).or_default().push(d.clone());
        }
        let product_files: Vec<&PathBuf> = texts.products.iter().map(|(p, _)| p).collect();
        let isolable = by_file.keys().all(|f| product_files.contains(&f))
            && by_file.keys().all(|f| !refused.iter().any(|(r, _)| r == f));
        if !isolable {
            let mut all = problems.0;
            for (_, d) in refused {
                all.extend(d.0);
            }
            all.dedup();
            return Err(Diagnostics(all));
        }
        let mut files: Vec<(PathBuf, Vec<Diagnostic>)> = by_file.into_iter().collect();
        files.sort_by(|a, b| a.0.cmp(&b.0));
        for (file, diagnostics) in files {
            if previous.runs(&file) {
                let Some(old) = previous.text(&file) else {
                    let mut all = diagnostics;
                    all.push(Diagnostic {
                        file: file.clone(),
                        line: 0,
                        column: 0,
                        key: String::new(),
                        message: "cannot put this file back to the version running (its copy in <data_dir>/applied/ is missing or stale): nothing changes".into(),
                        help: Some("fix the file, or restart the agent".into()),
                    });
                    return Err(Diagnostics(all));
                };
                if let Some(t) = texts.products.iter_mut().find(|(p, _)| *p == file) {
                    t.1 = old;
                }
            } else {
                texts.products.retain(|(p, _)| *p != file);
            }
            refused.push((file, Diagnostics(diagnostics)));
        }
    }
}

/// A fingerprint of the config files at `paths` as the file system lists them (names, sizes,
/// modification times), for `agent.watch_config`: cheap enough to take every second, and it
/// changes when any file is written, added or removed.
pub fn files_signature(paths: &[PathBuf]) -> u64 {
    let set = match config::FileSet::discover(paths) {
        Ok(set) => set,
        Err(d) => return config::fnv1a64(&[d.to_string().as_bytes()]),
    };
    let mut parts: Vec<Vec<u8>> = Vec::new();
    for path in set
        .gateway
        .iter()
        .chain(set.governance.iter())
        .chain(set.products.iter())
    {
        let mut part = path.as_os_str().as_encoded_bytes().to_vec();
        if let Ok(m) = std::fs::metadata(path) {
            let modified = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            part.extend_from_slice(format!("|{}|{modified}", m.len()).as_bytes());
        }
        parts.push(part);
    }
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    config::fnv1a64(&refs)
}

/// What a reload changes, by what it restarts.
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    /// Devices by id: `(old index, new index)` of those whose settings and tags are the same.
    pub devices_kept: Vec<(usize, usize)>,
    /// `(old index, new index)`: the device's task restarts.
    pub devices_changed: Vec<(usize, usize)>,
    /// New indexes.
    pub devices_added: Vec<usize>,
    /// Old indexes.
    pub devices_removed: Vec<usize>,
    /// Products by key: `(old index, new index)`.
    pub products_kept: Vec<(usize, usize)>,
    /// Kept products whose descriptor, topic, limits or governance changed: new indexes.
    pub products_changed: Vec<usize>,
    pub products_added: Vec<usize>,
    pub products_removed: Vec<usize>,
    /// Kept products with the same fields and publish mode: `(new, old)`; their state carries over.
    pub same_state: Vec<(usize, usize)>,
    /// The upstream connection's settings changed: one reconnect.
    pub upstream: bool,
    /// Nothing at all changed.
    pub none: bool,
}

/// What identifies a device's behaviour: its settings and its tags (not their places in the table).
fn device_fingerprint(plan: &Plan, d: usize) -> String {
    let device = &plan.devices[d];
    let mut s = format!("{:?}", device.kind);
    for &t in device.tags.iter() {
        let tag = &plan.tags[t];
        s.push_str(&format!(
            "|{}:{:?}:{}:{}:{:?}",
            tag.name, tag.data_type, tag.scale, tag.offset, tag.kind
        ));
    }
    s
}

/// What a product announces and how it is buffered and governed: any difference re-plans it.
fn product_fingerprint(plan: &Plan, p: usize) -> (Vec<u8>, String, u64) {
    let product = &plan.products[p];
    let settings = format!(
        "{}|{:?}|{:?}|{}|{:?}|{:?}|{}|{}",
        product.topic,
        product.qos,
        product.max_records_per_message,
        product.max_bytes,
        product.full_policy,
        product.publish,
        product.uns,
        product.uns_topic
    );
    (
        crate::publish::envelope::descriptor(plan, product),
        settings,
        crate::govern::Treatment::of(product).fingerprint(),
    )
}

/// Upstream settings a reconnect applies, and those only a restart can (they shape messages
/// already numbered, or Sparkplug births).
fn upstream_parts(plan: &Plan) -> (String, String) {
    match &plan.upstream {
        None => (String::new(), "embedded broker".into()),
        Some(u) => {
            let restart = format!(
                "{}|{}|{:?}",
                u.max_records_per_message, u.max_message_bytes, u.sparkplug
            );
            let mut connection = u.clone();
            connection.max_records_per_message = 0;
            connection.max_message_bytes = 0;
            connection.sparkplug = None;
            (format!("{connection:?}"), restart)
        }
    }
}

/// Compares the running plan with a new one. `Err`: the new one changes what only a restart can
/// change (each problem names the key, in the gateway file).
pub fn diff(old: &Plan, new: &Plan, gateway: &(PathBuf, String)) -> Result<Changes, Diagnostics> {
    let mut problems = Vec::new();
    let mut restart = |table: &str, what: &str| {
        let (line, column) = locate(&gateway.1, table);
        problems.push(Diagnostic {
            file: gateway.0.clone(),
            line,
            column,
            key: table.to_string(),
            message: format!("{what} changed: this takes a restart, a reload cannot change it in place"),
            help: Some(
                "restart the agent (systemctl restart plantmesh), or put the old value back to reload the rest".into(),
            ),
        });
    };
    let (a, n) = (&old.agent, &new.agent);
    for (key, changed) in [
        ("agent.id", a.id != n.id),
        ("agent.site", a.site != n.site),
        ("agent.area", a.area != n.area),
        ("agent.line", a.line != n.line),
        ("agent.enterprise", a.enterprise != n.enterprise),
        ("agent.cell", a.cell != n.cell),
        ("agent.data_dir", a.data_dir != n.data_dir),
        ("agent.metrics_listen", a.metrics_listen != n.metrics_listen),
        ("agent.sli_interval", a.sli_interval != n.sli_interval),
        ("agent.watch_config", a.watch_config != n.watch_config),
    ] {
        if changed {
            restart(key, key);
        }
    }
    if format!("{:?}", old.buffer) != format!("{:?}", new.buffer) {
        restart("buffer", "[buffer]");
    }
    let (old_up, old_restart) = upstream_parts(old);
    let (new_up, new_restart) = upstream_parts(new);
    if old_restart != new_restart {
        restart(
            "upstream",
            "[upstream] max_records_per_message, max_message_bytes, sparkplug or its presence",
        );
    }

    let mut c = Changes {
        upstream: old_up != new_up,
        ..Changes::default()
    };
    let old_devices: HashMap<&str, usize> = old
        .devices
        .iter()
        .enumerate()
        .map(|(i, d)| (d.id.as_str(), i))
        .collect();
    for (j, d) in new.devices.iter().enumerate() {
        match old_devices.get(d.id.as_str()) {
            Some(&i) if device_fingerprint(old, i) == device_fingerprint(new, j) => c.devices_kept.push((i, j)),
            Some(&i) => c.devices_changed.push((i, j)),
            None => c.devices_added.push(j),
        }
    }
    let new_devices: HashMap<&str, usize> = new
        .devices
        .iter()
        .enumerate()
        .map(|(i, d)| (d.id.as_str(), i))
        .collect();
    c.devices_removed = (0..old.devices.len())
        .filter(|&i| !new_devices.contains_key(old.devices[i].id.as_str()))
        .collect();

    let old_products: HashMap<&str, usize> = old
        .products
        .iter()
        .enumerate()
        .map(|(i, p)| (p.key.as_str(), i))
        .collect();
    for (j, p) in new.products.iter().enumerate() {
        match old_products.get(p.key.as_str()) {
            Some(&i) => {
                c.products_kept.push((i, j));
                if product_fingerprint(old, i) != product_fingerprint(new, j) {
                    c.products_changed.push(j);
                }
                let q = &old.products[i];
                let names = |x: &config::ProductPlan| x.fields.iter().map(|f| f.name.clone()).collect::<Vec<_>>();
                if q.publish == p.publish && names(q) == names(p) {
                    c.same_state.push((j, i));
                }
            }
            None => c.products_added.push(j),
        }
    }
    let new_products: HashMap<&str, usize> = new
        .products
        .iter()
        .enumerate()
        .map(|(i, p)| (p.key.as_str(), i))
        .collect();
    c.products_removed = (0..old.products.len())
        .filter(|&i| !new_products.contains_key(old.products[i].key.as_str()))
        .collect();
    let products_differ =
        !c.products_changed.is_empty() || !c.products_added.is_empty() || !c.products_removed.is_empty();
    if products_differ && new.upstream.as_ref().is_some_and(|u| u.sparkplug.is_some()) {
        restart(
            "upstream.sparkplug",
            "with the Sparkplug encoding the births describe every product: the products",
        );
    }
    c.none = !products_differ
        && c.devices_changed.is_empty()
        && c.devices_added.is_empty()
        && c.devices_removed.is_empty()
        && !c.upstream
        && old.governance.allow_topic_prefixes == new.governance.allow_topic_prefixes;
    if problems.is_empty() {
        Ok(c)
    } else {
        Err(Diagnostics(problems))
    }
}

/// The line and column of a table header (`[buffer]`), or of the key's own line; (0, 0) if absent.
fn locate(text: &str, table: &str) -> (usize, usize) {
    let header = format!("[{table}]");
    let (parent, key) = table.split_once('.').unwrap_or((table, ""));
    let parent_header = format!("[{parent}]");
    let mut in_parent = false;
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if t == header {
            return (n + 1, line.find('[').unwrap_or(0) + 1);
        }
        if t.starts_with('[') {
            in_parent = t == parent_header;
        } else if in_parent && !key.is_empty() && t.split('=').next().is_some_and(|k| k.trim() == key) {
            return (n + 1, line.find(key).unwrap_or(0) + 1);
        }
    }
    (0, 0)
}

#[cfg(test)]
mod tests;
