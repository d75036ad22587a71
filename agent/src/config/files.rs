//! The files a configuration names (broker and device credentials, TLS certificates and keys, the
//! pseudonymisation key): each must exist and be readable, and one holding a secret must be
//! readable by its owner only (as the agent requires when it reads it). `plantmesh check` reports what is wrong as warnings (the
//! config may be checked on another machine than the gateway), errors with `--strict`; `run`
//! refuses to start on any of them, with the same message.

use super::diag::{Diagnostic, Source};
use super::Texts;
use std::path::Path;

/// The keys whose value is a file path, and whether the file holds a secret.
const FILE_KEYS: &[(&str, bool)] = &[
    ("password_file", true),
    ("key_file", true),
    ("pseudonymise_key_file", true),
    ("ca_file", false),
    ("cert_file", false),
];

/// Every problem with a file the configuration names, located at the key that names it.
pub fn check(texts: &Texts) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let files = std::iter::once(&texts.gateway)
        .chain(texts.governance.as_ref())
        .chain(&texts.products);
    for (path, text) in files {
        let src = Source { path, text };
        let (root, errors) = toml::de::DeTable::parse_recoverable(text);
        if !errors.is_empty() {
            continue; // reported by the validation; its keys are not to be trusted
        }
        let base = path.parent().unwrap_or(Path::new("."));
        walk(&src, base, root.get_ref(), "", &mut out);
    }
    out.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
    out
}

fn walk(src: &Source, base: &Path, table: &toml::de::DeTable<'_>, at: &str, out: &mut Vec<Diagnostic>) {
    use toml::de::DeValue;
    for (k, v) in table.iter() {
        let key = if at.is_empty() {
            k.get_ref().to_string()
        } else {
            format!("{at}.{}", k.get_ref())
        };
        match v.get_ref() {
            DeValue::Table(t) => walk(src, base, t, &key, out),
            DeValue::Array(a) => {
                for (i, item) in a.iter().enumerate() {
                    if let DeValue::Table(t) = item.get_ref() {
                        walk(src, base, t, &format!("{key}[{i}]"), out);
                    }
                }
            }
            DeValue::String(s) => {
                if let Some(&(_, secret)) = FILE_KEYS.iter().find(|(name, _)| *name == k.get_ref().as_ref()) {
                    if let Some(problem) = problem(&base.join(s.as_ref()), secret) {
                        let mut d = src.at(v.span(), key, problem.0);
                        d.help = Some(problem.1);
                        out.push(d);
                    }
                }
            }
            _ => {}
        }
    }
}

/// What is wrong with one named file, and what to do about it.
fn problem(file: &Path, secret: bool) -> Option<(String, String)> {
    let shown = file.display();
    let meta = match std::fs::metadata(file) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Some((
                format!("`{shown}` does not exist"),
                "create it, or correct the path (a relative path is relative to the file that names it)".into(),
            ))
        }
        Err(e) => {
            return Some((
                format!("`{shown}` cannot be read: {e}"),
                "let the agent's user reach it (every directory on the way needs x)".into(),
            ))
        }
    };
    if !meta.is_file() {
        return Some((
            format!("`{shown}` is not a file"),
            "name the file itself, not its directory".into(),
        ));
    }
    if let Err(e) = std::fs::File::open(file) {
        return Some((
            format!("`{shown}` cannot be read: {e}"),
            "give the agent's user read access (chown or chmod)".into(),
        ));
    }
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Some((
                format!("`{shown}` holds a secret but is readable by group or others (mode {mode:03o})"),
                format!("chmod 600 {shown}: the agent refuses a secret anyone but its user may read"),
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = secret;
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(dir: &Path, gateway: &str) -> Texts {
        Texts {
            gateway: (dir.join("agent.toml"), gateway.to_string()),
            governance: None,
            products: Vec::new(),
        }
    }

    #[test]
    fn a_missing_file_is_named_at_its_key_and_a_present_one_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("ca.pem"), "x").expect("write");
        let t = texts(
            dir.path(),
            "[agent]\nid = \"gw\"\n[upstream]\nurl = \"mqtts://b:8883\"\nca_file = \"ca.pem\"\npassword_file = \"missing.txt\"\n",
        );
        let found = check(&t);
        assert_eq!(found.len(), 1, "{found:?}");
        let d = &found[0];
        assert_eq!((d.line, d.column, d.key.as_str()), (6, 17, "upstream.password_file"));
        assert!(
            d.message.contains("missing.txt") && d.message.contains("does not exist"),
            "{d}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_secret_others_may_read_is_refused_a_certificate_is_not() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        for f in ["site.key", "cert.pem"] {
            let p = dir.path().join(f);
            std::fs::write(&p, "x").expect("write");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        }
        let t = texts(
            dir.path(),
            "[[devices]]\nid = \"d\"\ncert_file = \"cert.pem\"\nkey_file = \"site.key\"\n",
        );
        let found = check(&t);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].key, "devices[0].key_file");
        assert!(found[0].message.contains("mode 644"), "{}", found[0]);
        std::fs::set_permissions(dir.path().join("site.key"), std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(check(&t).is_empty());
    }
}
