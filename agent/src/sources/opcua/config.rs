//! OPC UA devices in the gateway file: endpoint, security, identity, subscription or polling, and
//! tags by NodeId. Their keys, their validation, and their plans.

use crate::config::validate::{secs, Ctx, DeviceInput, TagTable};
use crate::config::{DataType, SecretRef};
use crate::sources::{DeviceKind, DevicePlan, TagKind, TagPlan};
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

/// Device keys an OPC UA device reads (beside `id`, `protocol`, `tags`; `password` only to refuse it).
pub const DEVICE_KEYS: &[&str] = &[
    "endpoint",
    "security_policy",
    "security_mode",
    "identity",
    "password",
    "publishing_interval",
    "mode",
    "timestamps",
    "poll_interval",
    "timeout",
    "allow_insecure_credentials",
];

/// Tag keys of OPC UA tags (beside `name`, `namespace_uri`, `array`, `offset`).
pub const TAG_KEYS: &[&str] = &[
    "node_id",
    "sampling_interval",
    "queue_size",
    "deadband",
    "deadband_type",
    "type",
    "scale",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpcUaSecurityMode {
    None,
    Sign,
    SignAndEncrypt,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpcUaIdentity {
    Anonymous,
    UserName { user: String, password: SecretRef },
    X509 { cert: PathBuf, key: PathBuf },
}

#[derive(Debug, Clone)]
pub struct OpcUaDevicePlan {
    pub endpoint: String,
    /// OPC UA security policy name as in the spec, e.g. `Aes256_Sha256_RsaPss`, `None`.
    pub security_policy: String,
    pub security_mode: OpcUaSecurityMode,
    pub identity: OpcUaIdentity,
    pub publishing_interval: Duration,
    /// Read service every `poll_interval` instead of a subscription.
    pub polling: bool,
    pub poll_interval: Duration,
    /// Time to wait for one response (a connect gets twice as long).
    pub timeout: Duration,
    /// Record time from the server timestamp instead of the source timestamp.
    pub server_timestamp: bool,
    /// A user identity over a channel that is not `SignAndEncrypt`, as `allow_insecure_credentials`
    /// allowed: warned at every start.
    pub insecure_credentials: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Deadband {
    Absolute(f64),
    Percent(f64),
}

#[derive(Debug, Clone)]
pub struct OpcUaTagPlan {
    /// The NodeId as written (with `ns=` unless `namespace_uri` is set).
    pub node_id: String,
    pub namespace_uri: Option<String>,
    pub sampling_interval: Duration,
    pub queue_size: u32,
    pub deadband: Option<Deadband>,
    /// The OPC UA built-in type name the tag is declared with.
    pub type_name: String,
}

/// The lineage of an OPC UA tag (the descriptor adds device and tag).
pub fn lineage(o: &OpcUaTagPlan, device: &DeviceKind) -> serde_json::Value {
    serde_json::json!({
        "protocol": "opcua",
        "endpoint": device.address(),
        "node_id": o.node_id,
        "namespace_uri": o.namespace_uri,
        "type": o.type_name,
    })
}

/// The OPC UA part of a tag; `None` for a tag of another kind (an OPC UA device has none).
pub fn opcua(tag: &TagPlan) -> Option<&OpcUaTagPlan> {
    match &tag.kind {
        TagKind::OpcUa(o) => Some(o),
        _ => None,
    }
}

/// The OPC UA security policies plantmesh offers, by their names in the OPC UA specification.
pub const OPCUA_POLICIES: [&str; 4] = [
    "Aes256_Sha256_RsaPss",
    "Aes128_Sha256_RsaOaep",
    "Basic256Sha256",
    "None",
];

/// OPC UA built-in types a tag may be declared with, and the value type each gives.
const OPCUA_TYPES: [(&str, DataType); 17] = [
    ("Boolean", DataType::Bool),
    ("SByte", DataType::I64),
    ("Byte", DataType::U64),
    ("Int16", DataType::I64),
    ("UInt16", DataType::U64),
    ("Int32", DataType::I64),
    ("UInt32", DataType::U64),
    ("Int64", DataType::I64),
    ("UInt64", DataType::U64),
    ("Float", DataType::F64),
    ("Double", DataType::F64),
    ("String", DataType::Text(0)),
    ("DateTime", DataType::Text(0)),
    ("ByteString", DataType::Text(0)),
    ("Guid", DataType::Text(0)),
    ("LocalizedText", DataType::Text(0)),
    ("StatusCode", DataType::U64),
];

pub(crate) fn device(cx: &mut Ctx, input: &DeviceInput, table: &mut TagTable) -> Option<DevicePlan> {
    let (d, key, di, base) = (input.raw, input.key, input.index, input.base);
    let Some(endpoint) = &d.endpoint else {
        cx.err(
            &d.protocol,
            format!("{key}.endpoint"),
            "an opcua device needs `endpoint` (opc.tcp://host:port[/path])",
        );
        return None;
    };
    if !cx.no_userinfo(endpoint, &format!("{key}.endpoint")) || !cx.printable(endpoint, &format!("{key}.endpoint")) {
        return None;
    }
    let url = endpoint.get_ref();
    let host_port = url
        .strip_prefix("opc.tcp://")
        .map(|r| r.split('/').next().unwrap_or_default());
    if !host_port.is_some_and(|hp| {
        hp.rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
    }) {
        cx.err(
            endpoint,
            format!("{key}.endpoint"),
            format!("`{url}` is not an OPC UA endpoint URL"),
        )
        .help = Some("write opc.tcp://host:port[/path], e.g. \"opc.tcp://10.0.0.5:4840\"".into());
    }
    let policy = match &d.security_policy {
        None => "Aes256_Sha256_RsaPss".to_string(),
        Some(p) => {
            let options: Vec<(&str, &str)> = OPCUA_POLICIES.iter().map(|p| (*p, *p)).collect();
            cx.choice(p, &format!("{key}.security_policy"), &options)?.to_string()
        }
    };
    let default_mode = if policy == "None" {
        OpcUaSecurityMode::None
    } else {
        OpcUaSecurityMode::SignAndEncrypt
    };
    let mode = match &d.security_mode {
        None => default_mode,
        Some(m) => cx.choice(
            m,
            &format!("{key}.security_mode"),
            &[
                ("SignAndEncrypt", OpcUaSecurityMode::SignAndEncrypt),
                ("Sign", OpcUaSecurityMode::Sign),
                ("None", OpcUaSecurityMode::None),
            ],
        )?,
    };
    if (policy == "None") != (mode == OpcUaSecurityMode::None) {
        let at = d
            .security_mode
            .as_ref()
            .or(d.security_policy.as_ref())
            .unwrap_or(endpoint);
        cx.err(
            at,
            format!("{key}.security_mode"),
            "security_policy `None` goes with security_mode `None`, and only with it",
        );
    }
    if let Some(p) = &d.password {
        cx.err(
            p,
            format!("{key}.password"),
            "inline secret: `password` is not allowed in config",
        )
        .help = Some("put the password in a file (password_file) or the environment (password_env)".into());
    }
    let identity = match &d.identity {
        None => OpcUaIdentity::Anonymous,
        Some(i) => match cx.choice(
            i,
            &format!("{key}.identity"),
            &[("anonymous", 0), ("username", 1), ("x509", 2)],
        )? {
            0 => OpcUaIdentity::Anonymous,
            1 => {
                let password = match (&d.password_file, &d.password_env) {
                    (Some(f), None) => SecretRef::File(base.join(f)),
                    (None, Some(e)) => SecretRef::Env(e.clone()),
                    _ => {
                        cx.err(
                            i,
                            format!("{key}.identity"),
                            "identity `username` needs `username` and one of `password_file`, `password_env`",
                        );
                        return None;
                    }
                };
                let Some(user) = d.username.clone() else {
                    cx.err(i, format!("{key}.username"), "identity `username` needs `username`");
                    return None;
                };
                OpcUaIdentity::UserName { user, password }
            }
            _ => match (&d.cert_file, &d.key_file) {
                (Some(c), Some(k)) => OpcUaIdentity::X509 {
                    cert: base.join(c),
                    key: base.join(k),
                },
                _ => {
                    cx.err(
                        i,
                        format!("{key}.identity"),
                        "identity `x509` needs `cert_file` and `key_file`",
                    );
                    return None;
                }
            },
        },
    };
    let publishing_interval = d.publishing_interval.as_ref().map_or(Duration::from_secs(1), |v| {
        cx.range(&secs(v), &format!("{key}.publishing_interval"), 0.01, 3600.0);
        v.get_ref().0
    });
    let polling = match &d.mode {
        None => false,
        Some(m) => cx.choice(m, &format!("{key}.mode"), &[("subscription", false), ("polling", true)])?,
    };
    let server_timestamp = match &d.timestamps {
        None => false,
        Some(m) => cx.choice(m, &format!("{key}.timestamps"), &[("source", false), ("server", true)])?,
    };
    let poll_interval = d.poll_interval.as_ref().map_or(Duration::from_secs(1), |v| {
        cx.range(&secs(v), &format!("{key}.poll_interval"), 0.01, 86_400.0);
        v.get_ref().0
    });
    let timeout = d.timeout.as_ref().map_or(Duration::from_secs(5), |v| {
        cx.range(&secs(v), &format!("{key}.timeout"), 0.1, 120.0);
        v.get_ref().0
    });
    // A password (or a user certificate's proof) is only as safe as the channel it crosses.
    let insecure = identity != OpcUaIdentity::Anonymous && mode != OpcUaSecurityMode::SignAndEncrypt;
    let allow_insecure = d.allow_insecure_credentials.as_ref().is_some_and(|a| *a.get_ref());
    if insecure && !allow_insecure {
        let at = d.identity.as_ref().unwrap_or(endpoint);
        cx.err(
            at,
            format!("{key}.identity"),
            format!(
                "a user identity over security_mode `{}` is not encrypted on the way to the server",
                match mode {
                    OpcUaSecurityMode::None => "None",
                    OpcUaSecurityMode::Sign => "Sign",
                    OpcUaSecurityMode::SignAndEncrypt => "SignAndEncrypt",
                }
            ),
        )
        .help = Some(
            "use security_mode = \"SignAndEncrypt\", or set allow_insecure_credentials = true to accept that".into(),
        );
    }
    let id = d.id.get_ref().clone();
    let plan = OpcUaDevicePlan {
        endpoint: url.clone(),
        security_policy: policy,
        security_mode: mode,
        identity,
        publishing_interval,
        polling,
        poll_interval,
        timeout,
        server_timestamp,
        insecure_credentials: insecure,
    };
    let mut tags = Vec::new();
    let mut names = HashSet::new();
    for (ti, t) in d.tags.iter().enumerate() {
        let key = format!("{key}.tags[{ti}]");
        table.declare(cx, &mut names, &id, t, &key);
        let Some(node) = &t.node_id else {
            cx.err(
                &t.name,
                format!("{key}.node_id"),
                "an opcua tag needs `node_id`, e.g. \"ns=2;s=Oven.Zone1\"",
            );
            continue;
        };
        let text = node.get_ref();
        if t.namespace_uri.is_some() && text.starts_with("ns=") {
            cx.err(
                node,
                format!("{key}.node_id"),
                "with `namespace_uri`, write the NodeId without `ns=`",
            );
            continue;
        }
        if text.parse::<opcua::types::NodeId>().is_err() {
            cx.err(node, format!("{key}.node_id"), format!("`{text}` is not a NodeId")).help =
                Some("forms: i=2258, ns=2;s=Oven.Zone1, ns=1;g=09087e75-8e5e-499b-954f-f2a9603db28a, ns=1;b=M/RbKBsRVkePCePcx24oRA==".into());
            continue;
        }
        let (type_name, data_type) = match &t.data_type {
            None => ("Double".to_string(), DataType::F64),
            Some(ty) => {
                let Some((n, dt)) = cx.choice(ty, &format!("{key}.type"), &OPCUA_TYPES.map(|(n, dt)| (n, (n, dt))))
                else {
                    continue;
                };
                (n.to_string(), dt)
            }
        };
        let deadband = match (&t.deadband, &t.deadband_type) {
            (None, None) => None,
            (None, Some(dt)) => {
                cx.err(dt, format!("{key}.deadband_type"), "`deadband_type` needs `deadband`");
                None
            }
            (Some(v), dt) => {
                let x = *v.get_ref();
                if !(x.is_finite() && x >= 0.0) {
                    cx.err(v, format!("{key}.deadband"), "deadband must be a finite number >= 0");
                }
                match dt {
                    None => Some(Deadband::Absolute(x)),
                    Some(dt) => match cx.choice(
                        dt,
                        &format!("{key}.deadband_type"),
                        &[("absolute", false), ("percent", true)],
                    ) {
                        Some(true) if x > 100.0 => {
                            cx.err(v, format!("{key}.deadband"), "a percent deadband is at most 100");
                            None
                        }
                        Some(true) => Some(Deadband::Percent(x)),
                        Some(false) => Some(Deadband::Absolute(x)),
                        None => None,
                    },
                }
            }
        };
        let queue_size = t
            .queue_size
            .as_ref()
            .and_then(|q| cx.range(q, &format!("{key}.queue_size"), 1, 10_000))
            .unwrap_or(1) as u32;
        let sampling_interval = t.sampling_interval.as_ref().map_or(publishing_interval, |v| {
            cx.range(&secs(v), &format!("{key}.sampling_interval"), 0.0, 3600.0);
            v.get_ref().0
        });
        let numeric = matches!(data_type, DataType::I64 | DataType::U64 | DataType::F64);
        let is_array = t.array.unwrap_or(false);
        let scale = match &t.scale {
            Some(s) if !numeric || is_array => {
                cx.err(s, format!("{key}.scale"), "scale applies only to numeric scalar tags");
                continue;
            }
            Some(s) => *s.get_ref(),
            None => 1.0,
        };
        tags.push(table.tags.len());
        table.tags.push(TagPlan {
            device_index: crate::sources::device_index(di),
            name: t.name.get_ref().into(),
            data_type: if is_array { DataType::Array } else { data_type },
            scale,
            offset: t.offset.unwrap_or(0.0),
            kind: TagKind::OpcUa(Box::new(OpcUaTagPlan {
                node_id: text.clone(),
                namespace_uri: t.namespace_uri.clone(),
                sampling_interval,
                queue_size,
                deadband,
                type_name,
            })),
        });
    }
    Some(DevicePlan {
        id,
        tags: tags.into(),
        kind: DeviceKind::OpcUa(plan),
    })
}
