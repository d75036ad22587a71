//! The upstream broker connection (`[upstream]`), also used for the device-side broker of MQTT devices.

use super::*;
use toml::Spanned;

pub(crate) fn upstream_plan(
    cx: &mut Ctx,
    u: raw::Upstream,
    agent_id: &str,
    site: &str,
    base: &Path,
    key: &str,
) -> Option<UpstreamPlan> {
    if !cx.no_userinfo(&u.url, &format!("{key}.url")) || !cx.printable(&u.url, &format!("{key}.url")) {
        return None;
    }
    if let Some(id) = &u.client_id {
        if let Some(c) = id.chars().find(|c| c.is_control()) {
            cx.whole(
                format!("{key}.client_id"),
                format!(
                    "`{}` contains the control character U+{:04X}, which no client id may hold",
                    id.escape_debug(),
                    u32::from(c)
                ),
            );
        }
    }
    let url = u.url.get_ref().as_str();
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let tls = match scheme {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" | "tls" => true,
        _ => {
            cx.err(&u.url, format!("{key}.url"), format!("`{url}` is not an MQTT URL"))
                .help = Some("write mqtt://host:1883 or mqtts://host:8883".into());
            return None;
        }
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => match p.parse::<u16>() {
            Ok(p) => (h.trim_matches(['[', ']']).to_string(), p),
            Err(_) => {
                cx.err(&u.url, format!("{key}.url"), format!("`{p}` is not a port number"));
                return None;
            }
        },
        None => (rest.to_string(), if tls { 8883 } else { 1883 }),
    };
    let version = match &u.protocol {
        None => MqttVersion::V5,
        Some(v) => cx.choice(
            v,
            &format!("{key}.protocol"),
            &[("5", MqttVersion::V5), ("3.1.1", MqttVersion::V311)],
        )?,
    };
    if let Some(p) = &u.password {
        cx.err(
            p,
            format!("{key}.password"),
            "inline secret: `password` is not allowed in config",
        )
        .help = Some("put the password in a file (password_file) or the environment (password_env)".into());
    }
    let password = match (&u.password_file, &u.password_env) {
        (Some(_), Some(_)) => {
            cx.whole(key, "set one of password_file and password_env, not both");
            None
        }
        (Some(f), None) => Some(SecretRef::File(base.join(f))),
        (None, Some(e)) => Some(SecretRef::Env(e.clone())),
        (None, None) => None,
    };
    if password.is_some() && u.username.is_none() {
        cx.whole(format!("{key}.username"), "a password is configured but no username");
    }
    let allow_insecure = u.allow_insecure_credentials.as_ref().is_some_and(|a| *a.get_ref());
    if password.is_some() && !tls && !allow_insecure {
        cx.err(
            &u.url,
            format!("{key}.url"),
            "a password over plain mqtt:// crosses the network readable by anyone on it",
        )
        .help = Some("use mqtts:// (with ca_file), or set allow_insecure_credentials = true to accept that".into());
    }
    let client_cert = match (&u.cert_file, &u.key_file) {
        (Some(c), Some(k)) => Some((base.join(c), base.join(k.get_ref()))),
        (None, None) => None,
        _ => {
            cx.whole(key, "mutual TLS needs both cert_file and key_file");
            None
        }
    };
    if !tls && (u.ca_file.is_some() || client_cert.is_some()) {
        cx.err(
            &u.url,
            format!("{key}.url"),
            "TLS files are set but the URL is not mqtts://",
        );
    }
    let max_inflight = u
        .max_inflight
        .as_ref()
        .and_then(|v| cx.range(v, &format!("{key}.max_inflight"), 1, 65_535))
        .unwrap_or(32) as u16;
    let max_records = u
        .max_records_per_message
        .as_ref()
        .and_then(|v| cx.range(v, &format!("{key}.max_records_per_message"), 1, 100_000))
        .unwrap_or(100) as usize;
    if let Some(v) = &u.backlog_rate {
        cx.err(
            v,
            format!("{key}.backlog_rate"),
            "`backlog_rate` (messages per second) is gone: the backlog drains as fast as the broker acknowledges, live data first",
        )
        .help = Some("to cap an uplink, set backlog_bytes_per_second (e.g. \"125kB\" for 1 Mbit/s)".into());
    }
    let backlog_bytes_per_second = u.backlog_bytes_per_second.as_ref().and_then(|v| {
        let b = Spanned::new(v.span(), v.get_ref().0);
        cx.range(&b, &format!("{key}.backlog_bytes_per_second"), 1_000, 1 << 40)
    });
    let reconnect_min = u.reconnect_min.map_or(Duration::from_millis(500), |d| d.0);
    let reconnect_max = u.reconnect_max.map_or(Duration::from_secs(30), |d| d.0);
    if reconnect_min > reconnect_max || reconnect_min.is_zero() {
        cx.whole(
            format!("{key}.reconnect_min"),
            "reconnect_min must be non-zero and at most reconnect_max",
        );
    }
    let sparkplug = match &u.encoding {
        None => None,
        Some(e) => match cx.choice(e, &format!("{key}.encoding"), &[("json", false), ("sparkplug", true)])? {
            false => None,
            true => {
                let id = |cx: &mut Ctx, v: &Option<Spanned<String>>, k: &str, default: &str| match v {
                    None => default.to_string(),
                    Some(v) => {
                        cx.name(v, &format!("{key}.sparkplug.{k}"), true);
                        v.get_ref().clone()
                    }
                };
                let sp = u.sparkplug.as_ref().map(Spanned::get_ref);
                let group_id = id(cx, &sp.and_then(|s| s.group_id.clone()), "group_id", site);
                let edge_node_id = id(cx, &sp.and_then(|s| s.edge_node_id.clone()), "edge_node_id", agent_id);
                let primary_host = sp
                    .and_then(|s| s.primary_host.clone())
                    .map(|h| id(cx, &Some(h), "primary_host", ""));
                Some(SparkplugPlan {
                    group_id,
                    edge_node_id,
                    primary_host,
                })
            }
        },
    };
    if let (Some(s), None) = (&u.sparkplug, &sparkplug) {
        cx.err(
            s,
            format!("{key}.sparkplug"),
            "a [sparkplug] table without encoding = \"sparkplug\"",
        );
    }
    // The MQTT client refuses a shorter keep-alive (and would stop the agent): MQTT 5 at 5 s,
    // 3.1.1 at 1 s. A broker sends an agent's `offline` will 1.5 keep-alives after its last packet.
    let keep_alive = u.keep_alive.map_or(Duration::from_secs(30), |d| d.0);
    let least = if version == MqttVersion::V5 { 5 } else { 1 };
    if keep_alive < Duration::from_secs(least) {
        cx.whole(
            format!("{key}.keep_alive"),
            format!(
                "{keep_alive:?} is shorter than MQTT {} allows here: at least \"{least}s\"",
                if version == MqttVersion::V5 { "5" } else { "3.1.1" }
            ),
        );
    }
    Some(UpstreamPlan {
        sparkplug,
        host,
        port,
        tls,
        version,
        client_id: u.client_id.clone().unwrap_or_else(|| format!("plantmesh-{agent_id}")),
        keep_alive,
        username: u.username.clone(),
        insecure_credentials: password.is_some() && !tls,
        password,
        ca_file: u.ca_file.as_ref().map(|f| base.join(f)),
        client_cert,
        max_inflight,
        max_records_per_message: max_records,
        max_message_bytes: u
            .max_message_bytes
            .map_or(256 << 10, |b| b.0.clamp(1024, 256 << 20) as usize),
        backlog_bytes_per_second,
        reconnect_min,
        reconnect_max,
    })
}
