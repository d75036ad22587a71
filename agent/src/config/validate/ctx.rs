//! The validation toolkit every part of the config uses, the device kinds' rooms included: a
//! [`Ctx`] that records located problems, parsing into raw types, and the generic refusal of keys
//! that do not belong to a device's kind.

use crate::config::diag::{closest, Diagnostic, Source};
use crate::config::{raw, units};
use crate::sources::{Protocol, TagPlan};
use serde::de::DeserializeOwned;
use std::collections::HashSet;
use std::path::Path;
use toml::Spanned;

/// Parses one file into its raw type and reports every problem of it, not only the first: each
/// syntax error (the parser recovers past them), then each unknown key and each value of the wrong
/// type or form, which is taken out so that the rest of the file is still read. Returns the raw
/// value of what remains when that is complete (a required key missing stops it), so the file's
/// own checks run too; the caller fails the load on any problem pushed. What was taken out is
/// added to `taken_out` too (see [`consequences`]).
pub(crate) fn parse<T: DeserializeOwned>(
    src: &Source,
    problems: &mut Vec<Diagnostic>,
    taken_out: &mut Vec<Diagnostic>,
) -> Option<T> {
    let (mut root, syntax) = toml::de::DeTable::parse_recoverable(src.text);
    if !syntax.is_empty() {
        // What follows a syntax error may be read differently than it was meant: report those
        // errors (all of them) and check nothing else of this file.
        problems.extend(syntax.iter().map(|e| toml_error(src, e, String::new())));
        return None;
    }
    // Each further round reads the file again without what earlier rounds took out (a file has
    // a few problems, and is read once a start or reload).
    let mut taken: Vec<Vec<Step>> = Vec::new();
    for _ in 0..MAX_PROBLEMS_PER_FILE {
        let e = match serde_path_to_error::deserialize::<_, T>(toml::de::Deserializer::from(root)) {
            Ok(v) => return Some(v),
            Err(e) => e,
        };
        let steps = steps(e.path());
        let key = key_of(&steps);
        let d = toml_error(src, e.inner(), key);
        let message = e.inner().message().to_string();
        // The value to take out: the unknown key itself, or the value of the wrong form.
        let mut path = steps;
        if let Some(word) = message
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
        {
            if path.last() != Some(&Step::Key(word.to_string())) {
                path.push(Step::Key(word.to_string()));
            }
        } else if message.starts_with("missing field") {
            // A table without a key it needs cannot be read further.
            problems.push(d);
            return None;
        }
        if taken.contains(&path) {
            return None; // reported already, and taking it out did not help: stop, not loop
        }
        if path.is_empty() {
            problems.push(d);
            return None;
        }
        taken_out.push(d.clone());
        problems.push(d);
        taken.push(path);
        root = toml::de::DeTable::parse_recoverable(src.text).0;
        for path in &taken {
            take_out(root.get_mut(), path);
        }
    }
    None
}

/// Takes out of `problems` what only follows from a value [`parse`] took out: a problem of the
/// table that held it (`devices[0].tags[0]` "needs `address`" once `devices[0].tags[0].address =
/// "zero"` was reported and taken out). The problem reported for the value itself stays.
pub(crate) fn consequences(problems: &mut Vec<Diagnostic>, taken_out: &[Diagnostic]) {
    problems.retain(|d| {
        !taken_out.iter().any(|t| {
            t != d
                && t.file == d.file
                && !d.key.is_empty()
                && t.key.len() > d.key.len()
                && t.key.starts_with(&d.key)
                && matches!(t.key.as_bytes()[d.key.len()], b'.' | b'[')
        })
    });
}

/// Problems reported of one file before the rest of it is left unchecked.
const MAX_PROBLEMS_PER_FILE: usize = 50;

/// One step of a path into a TOML document.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

fn steps(path: &serde_path_to_error::Path) -> Vec<Step> {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|s| match s {
            Segment::Map { key } if key.starts_with("$__serde_spanned_private") => None,
            Segment::Map { key } => Some(Step::Key(key.clone())),
            Segment::Seq { index } => Some(Step::Index(*index)),
            Segment::Enum { .. } | Segment::Unknown => None,
        })
        .collect()
}

/// `devices[0].tags[3].address` of a path.
fn key_of(steps: &[Step]) -> String {
    let mut out = String::new();
    for s in steps {
        match s {
            Step::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Takes the value at `path` out of `table`.
fn take_out(table: &mut toml::de::DeTable<'_>, path: &[Step]) {
    use toml::de::DeValue;
    let Some((Step::Key(first), mut rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        table.remove(first.as_str());
        return;
    }
    let Some(mut value) = table.get_mut(first.as_str()) else {
        return;
    };
    loop {
        match (rest.split_first(), value.get_mut()) {
            (Some((Step::Index(i), tail)), DeValue::Array(a)) if !tail.is_empty() => {
                let Some(v) = a.get_mut(*i) else { return };
                value = v;
                rest = tail;
            }
            (Some((Step::Key(k), tail)), DeValue::Table(t)) => {
                if tail.is_empty() {
                    t.remove(k.as_str());
                    return;
                }
                let Some(v) = t.get_mut(k.as_str()) else { return };
                value = v;
                rest = tail;
            }
            _ => return,
        }
    }
}

fn toml_error(src: &Source, e: &toml::de::Error, key: String) -> Diagnostic {
    let span = e.span().unwrap_or(0..0);
    let message = e.message().trim().to_string();
    let mut d = src.at(span, key, message.clone());
    // serde's messages: "unknown field `pol_interval`, expected one of `a`, `b`" and
    // "unknown variant `x`, expected ...": suggest the nearest expected name.
    for prefix in ["unknown field `", "unknown variant `"] {
        if let Some(rest) = message.strip_prefix(prefix) {
            let word = rest.split('`').next().unwrap_or_default();
            let expected: Vec<&str> = rest.split('`').skip(2).step_by(2).collect();
            if prefix.starts_with("unknown field") {
                d.message = format!("unknown key `{word}`");
            }
            d.help = Some(match closest(word, expected.iter().copied()) {
                Some(best) => format!("did you mean `{best}`?"),
                None => format!("expected one of: {}", expected.join(", ")),
            });
            if word == "password" {
                d.message = "inline secret: `password` is not allowed in config".into();
                d.help = Some("put the password in a file (password_file) or the environment (password_env)".into());
            }
        }
    }
    d
}

pub(crate) struct Ctx<'a> {
    pub src: Source<'a>,
    pub problems: &'a mut Vec<Diagnostic>,
}

impl Ctx<'_> {
    pub fn err<T>(&mut self, v: &Spanned<T>, key: impl Into<String>, msg: impl Into<String>) -> &mut Diagnostic {
        let d = self.src.at(v.span(), key, msg);
        self.problems.push(d);
        let last = self.problems.len() - 1;
        &mut self.problems[last]
    }

    pub fn whole(&mut self, key: impl Into<String>, msg: impl Into<String>) {
        let d = self.src.whole_file(key, msg);
        self.problems.push(d);
    }

    /// Parses a spanned string against a fixed vocabulary, suggesting the nearest word.
    pub fn choice<T: Copy>(&mut self, v: &Spanned<String>, key: &str, options: &[(&str, T)]) -> Option<T> {
        if let Some((_, t)) = options.iter().find(|(name, _)| *name == v.get_ref().as_str()) {
            return Some(*t);
        }
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        let help = match closest(v.get_ref(), names.iter().copied()) {
            Some(best) => format!("did you mean `{best}`?"),
            None => format!("expected one of: {}", names.join(", ")),
        };
        self.err(v, key, format!("invalid value `{}`", v.get_ref())).help = Some(help);
        None
    }

    pub fn range<T: PartialOrd + Copy + std::fmt::Display>(
        &mut self,
        v: &Spanned<T>,
        key: &str,
        lo: T,
        hi: T,
    ) -> Option<T> {
        let x = *v.get_ref();
        if x < lo || x > hi {
            self.err(v, key, format!("{x} is out of range: allowed {lo}..={hi}"));
            None
        } else {
            Some(x)
        }
    }

    pub fn name(&mut self, v: &Spanned<String>, key: &str, allow_dot: bool) {
        let s = v.get_ref();
        if !self.printable(v, key) {
            return;
        }
        let bad = s.is_empty()
            || s.chars()
                .any(|c| c.is_whitespace() || matches!(c, '/' | '+' | '#' | '{' | '}'))
            || (!allow_dot && s.contains('.'));
        if bad {
            self.err(
                v,
                key,
                format!(
                    "`{s}` is not a valid name: it must be non-empty, without spaces, `/`, `+`, `#`, braces{}",
                    if allow_dot { "" } else { " or `.`" }
                ),
            );
        }
    }
}

impl Ctx<'_> {
    /// Refuses text with a control character (C0, DEL, C1, U+0000): such text in a topic segment,
    /// client id or file name makes brokers refuse the connection, or means something else.
    pub fn printable(&mut self, v: &Spanned<String>, key: &str) -> bool {
        match v.get_ref().chars().find(|c| c.is_control()) {
            None => true,
            Some(c) => {
                let msg = format!(
                    "`{}` contains the control character U+{:04X}, which no name, topic, client id or file name may hold",
                    v.get_ref().escape_debug(),
                    u32::from(c)
                );
                self.err(v, key, msg);
                false
            }
        }
    }

    /// Refuses a URL that carries user info (`scheme://user:password@host`): a secret in the
    /// config, which would also be logged and published with the URL. The message never echoes it.
    pub fn no_userinfo(&mut self, v: &Spanned<String>, key: &str) -> bool {
        let url = v.get_ref();
        let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if !authority.contains('@') {
            return true;
        }
        self.err(
            v,
            key,
            "credentials in the URL (user info before `@`) are not allowed in config",
        )
        .help = Some(
            "give the user as `username` and the password in a file (password_file) or the environment (password_env)"
                .into(),
        );
        false
    }
}

pub(crate) fn secs(d: &Spanned<units::ConfigDuration>) -> Spanned<f64> {
    Spanned::new(d.span(), d.get_ref().0.as_secs_f64())
}

/// What a device kind's validator is given.
pub(crate) struct DeviceInput<'a> {
    pub raw: &'a raw::Device,
    /// The device's key path, `devices[N]`.
    pub key: &'a str,
    /// The device's index in the plan.
    pub index: usize,
    /// The gateway file's directory: relative paths are relative to it.
    pub base: &'a Path,
    pub agent_id: &'a str,
}

/// The plan's tag table as the device validators fill it.
#[derive(Default)]
pub(crate) struct TagTable {
    pub tags: Vec<TagPlan>,
    /// Every tag written, valid or not: a product pointing at an invalid tag is not a second error.
    pub declared: HashSet<String>,
    /// MQTT tags with captures, instantiated by the product fields that name them.
    pub templates: Vec<crate::sources::mqtt::config::Template>,
    /// The classification the gateway file gives a tag, by tag index.
    pub classes: std::collections::HashMap<usize, Spanned<String>>,
}

impl TagTable {
    /// Checks a tag's name, records it as declared, and refuses a second tag of that name in its
    /// device (`names`: the device's names so far); false for such a duplicate.
    pub fn declare(
        &mut self,
        cx: &mut Ctx,
        names: &mut HashSet<String>,
        device: &str,
        t: &raw::Tag,
        key: &str,
    ) -> bool {
        cx.name(&t.name, &format!("{key}.name"), false);
        self.declared.insert(format!("{device}.{}", t.name.get_ref()));
        if names.insert(t.name.get_ref().clone()) {
            return true;
        }
        let msg = format!("duplicate tag name `{}` in device `{device}`", t.name.get_ref());
        cx.err(&t.name, format!("{key}.name"), msg);
        false
    }
}

/// Reports every protocol-specific key of a device or its tags that its kind does not read.
pub(crate) fn refuse_foreign_keys(cx: &mut Ctx, d: &raw::Device, key: &str, protocol: Protocol) {
    let (device_keys, tag_keys) = protocol.keys();
    let mut refuse = |written: Vec<(&'static str, Option<std::ops::Range<usize>>)>, allowed: &[&str], key: &str| {
        for (name, span) in written {
            if let Some(span) = span.filter(|_| !allowed.contains(&name)) {
                let d = cx.src.at(
                    span,
                    format!("{key}.{name}"),
                    format!("`{name}` does not apply to {} devices", protocol.as_str()),
                );
                cx.problems.push(d);
            }
        }
    };
    refuse(d.written_keys(), device_keys, key);
    for (ti, t) in d.tags.iter().enumerate() {
        refuse(t.written_keys(), tag_keys, &format!("{key}.tags[{ti}]"));
    }
}
