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

/// Parses one file into its raw type; a syntax or type error becomes one located diagnostic.
pub(crate) fn parse<T: DeserializeOwned>(src: &Source) -> Result<T, Diagnostic> {
    let de = toml::Deserializer::parse(src.text).map_err(|e| toml_error(src, &e, String::new()))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string().replace(".$__serde_spanned_private_value", "");
        toml_error(src, e.inner(), if path == "." { String::new() } else { path })
    })
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
