//! One MQTT connection, 3.1.1 or 5, behind one small interface, so the publisher's logic is written
//! once. Sessions are always clean (see `inflight`): the buffer, not the broker session, is what makes
//! delivery at-least-once.
//!
//! `wire` encodes and decodes packets (rumqttc's codecs), `state` is the session with no I/O
//! (packet ids, the broker's receive window, acknowledgements), `conn` moves the bytes: whatever
//! was queued between two writes goes out in one.

mod conn;
mod state;
mod wire;

use crate::config::{MqttVersion, Qos, UpstreamPlan};
use bytes::Bytes;
use rumqttc::TlsConfiguration;
use state::{Event, Request};
use std::collections::VecDeque;
use std::time::Duration;

/// What the connection reports.
#[derive(Debug, PartialEq, Eq)]
pub enum LinkEvent {
    Connected,
    /// A publish was written under this packet id.
    Written(u16),
    /// The broker acknowledged a publish; `Some(code)` is an MQTT 5 failure reason (>= 0x80).
    PubAck {
        pkid: u16,
        failure: Option<u8>,
    },
    /// A message on a topic we subscribed to (Sparkplug commands and host STATE).
    Message {
        topic: String,
        payload: Vec<u8>,
    },
    /// The broker acknowledged an UNSUBSCRIBE: everything written before it reached the broker.
    UnsubAck,
}

/// The connection: requests go to its driver (a task of its own, see `conn`), events come back in
/// batches (all a read or a write produced) and are handed out one at a time.
pub struct Link {
    requests: tokio::sync::mpsc::Sender<Request>,
    events: tokio::sync::mpsc::Receiver<Vec<Event>>,
    ready: VecDeque<Event>,
    resume: std::sync::Arc<tokio::sync::Notify>,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        // The driver (and its connection) goes with the link.
        self.driver.abort();
    }
}

/// Events [`Link::pending`] lets a caller take in one burst before it does other work.
pub const EVENT_QUEUE: usize = 256;

/// Connection settings resolved at start (secrets read, TLS files loaded).
pub struct LinkOptions {
    pub upstream: UpstreamPlan,
    pub password: Option<String>,
    pub tls: Option<TlsConfiguration>,
    pub will_topic: String,
    pub will_payload: Vec<u8>,
    /// The status will is retained; a Sparkplug NDEATH is not.
    pub will_retain: bool,
    /// Requests queued at once on connect beyond the window: a descriptor (and, for Sparkplug, a
    /// DBIRTH) per product.
    pub burst: usize,
    /// Keep the broker session across reconnects (a subscriber that must not miss what the broker
    /// queued while it was away: `plantmesh verify`); with MQTT 5 it expires this many seconds
    /// after the connection ends. `None`: a clean session, as the publisher always uses.
    pub session_expiry: Option<u32>,
    /// No will at all (a reader of the broker has no status of its own).
    pub no_will: bool,
}

/// What went wrong on the broker connection, or setting it up.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A secret reference (password file or variable) could not be read.
    #[error("{0}")]
    Secret(String),
    #[error("mqtts:// needs ca_file (the CA that signed the broker's certificate)")]
    NoCaFile,
    #[error("cannot read {what} {}: {source}", path.display())]
    ReadFile {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("client key {} is readable by group or others (mode {mode:o}); run: chmod 600 {}", path.display(), path.display())]
    KeyReadable { path: std::path::PathBuf, mode: u32 },
    /// The connection failed or dropped; reconnect.
    #[error("{0}")]
    Connection(String),
    /// A request could not be queued (the client's queue is full or its event loop gone).
    #[error("{0}")]
    Request(String),
}

fn read_file(what: &'static str, path: &std::path::Path) -> Result<Vec<u8>, LinkError> {
    std::fs::read(path).map_err(|source| LinkError::ReadFile {
        what,
        path: path.to_path_buf(),
        source,
    })
}

impl LinkOptions {
    /// Reads secrets and TLS files; every problem names the file.
    pub fn resolve(
        upstream: &UpstreamPlan,
        will_topic: String,
        will_payload: Vec<u8>,
    ) -> Result<LinkOptions, LinkError> {
        let password = upstream
            .password
            .as_ref()
            .map(|s| s.read())
            .transpose()
            .map_err(LinkError::Secret)?;
        let tls = if upstream.tls {
            let ca = match &upstream.ca_file {
                Some(f) => read_file("CA file", f)?,
                None => return Err(LinkError::NoCaFile),
            };
            let client_auth = match &upstream.client_cert {
                Some((cert, key)) => {
                    check_private(key)?;
                    Some((read_file("client certificate", cert)?, read_file("client key", key)?))
                }
                None => None,
            };
            Some(TlsConfiguration::Simple {
                ca,
                alpn: None,
                client_auth,
            })
        } else {
            None
        };
        Ok(LinkOptions {
            upstream: upstream.clone(),
            password,
            tls,
            will_topic,
            will_payload,
            will_retain: true,
            burst: 0,
            session_expiry: None,
            no_will: false,
        })
    }
}

/// Refuses a key file that others can read.
fn check_private(path: &std::path::Path) -> Result<(), LinkError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|source| LinkError::ReadFile {
            what: "client key",
            path: path.to_path_buf(),
            source,
        })?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(LinkError::KeyReadable {
                path: path.to_path_buf(),
                mode: meta.permissions().mode() & 0o777,
            });
        }
    }
    Ok(())
}

impl Link {
    pub fn new(o: &LinkOptions) -> Link {
        let u = &o.upstream;
        // Room for a full window (and, for Sparkplug, a barrier per message at the most), the
        // connect burst and control messages, so queuing never fails.
        let cap = 2 * usize::from(u.max_inflight) + o.burst + 64;
        // What the broker may send: subscriptions (Sparkplug commands; a catalog reader's
        // contracts) of up to a megabyte, or the largest message this link would send itself.
        let incoming = (1usize << 20).max(u.max_message_bytes + 4096);
        let (wire, keep_alive) = match u.version {
            MqttVersion::V311 => (wire::Wire::V4, u.keep_alive.max(Duration::from_secs(1))),
            MqttVersion::V5 => (wire::Wire::V5, u.keep_alive.max(Duration::from_secs(5))),
        };
        let settings = conn::Settings {
            wire,
            host: u.host.clone(),
            port: u.port,
            client_id: u.client_id.clone(),
            keep_alive,
            clean: o.session_expiry.is_none(),
            session_expiry: o.session_expiry.filter(|_| wire == wire::Wire::V5),
            max_incoming: u32::try_from(incoming).unwrap_or(u32::MAX),
            // Only the broker's limit (MQTT 5 CONNACK): `max_message_bytes` bounds product messages
            // when they are formed, but a descriptor of a wide product may be larger, and the
            // broker takes it.
            max_outgoing: None,
            max_inflight: u.max_inflight,
            will: (!o.no_will).then(|| (o.will_topic.clone(), o.will_payload.clone(), o.will_retain)),
            login: u
                .username
                .as_ref()
                .map(|user| (user.clone(), o.password.clone().unwrap_or_default())),
            tls: o.tls.clone(),
        };
        let (requests, rx) = tokio::sync::mpsc::channel(cap);
        let (tx, events) = tokio::sync::mpsc::channel(64);
        let resume = std::sync::Arc::new(tokio::sync::Notify::new());
        let driver = conn::Driver {
            settings,
            requests: rx,
            events: tx,
            resume: resume.clone(),
        };
        Link {
            requests,
            events,
            ready: VecDeque::new(),
            resume,
            driver: tokio::spawn(driver.run()),
        }
    }

    /// The next event. Cancel-safe: the connection runs on its own task, and a batch taken from it
    /// is kept here.
    pub async fn poll(&mut self) -> Result<LinkEvent, LinkError> {
        loop {
            if let Some(ev) = self.ready.pop_front() {
                return ev;
            }
            match self.events.recv().await {
                Some(batch) => self.ready.extend(batch),
                None => return Err(LinkError::Connection("the connection's event loop stopped".into())),
            }
        }
    }

    /// Whether events are waiting: [`poll`](Link::poll) would answer at once.
    pub fn pending(&self) -> bool {
        !self.ready.is_empty() || !self.events.is_empty()
    }

    /// After a failed [`poll`](Link::poll): let the connection make its next attempt.
    pub fn reconnect(&self) {
        self.resume.notify_one();
    }

    fn request(&self, r: Request) -> Result<(), LinkError> {
        self.requests.try_send(r).map_err(|e| {
            LinkError::Request(match e {
                tokio::sync::mpsc::error::TrySendError::Full(_) => "the connection's request queue is full".into(),
                tokio::sync::mpsc::error::TrySendError::Closed(_) => "the connection's event loop stopped".into(),
            })
        })
    }

    /// Queues a QoS 1 publish. MQTT 5 carries `props` as user properties.
    pub fn publish(
        &self,
        topic: &str,
        retain: bool,
        payload: Vec<u8>,
        props: Vec<(String, String)>,
    ) -> Result<(), LinkError> {
        self.publish_qos(topic, Qos::AtLeastOnce, retain, payload, props)
    }

    /// Queues a publish at QoS 1 or 2.
    pub fn publish_qos(
        &self,
        topic: &str,
        qos: Qos,
        retain: bool,
        payload: Vec<u8>,
        props: Vec<(String, String)>,
    ) -> Result<(), LinkError> {
        self.request(Request::Publish {
            topic: topic.to_string(),
            qos: if qos == Qos::ExactlyOnce { 2 } else { 1 },
            retain,
            payload: Bytes::from(payload),
            props,
        })
    }

    /// Queues a QoS 0 publish (Sparkplug data and births), not retained.
    pub fn publish_at_most_once(&self, topic: &str, payload: Vec<u8>) -> Result<(), LinkError> {
        self.request(Request::Publish {
            topic: topic.to_string(),
            qos: 0,
            retain: false,
            payload: Bytes::from(payload),
            props: vec![],
        })
    }

    pub fn subscribe(&self, filter: &str) -> Result<(), LinkError> {
        self.request(Request::Subscribe(filter.to_string()))
    }

    pub fn unsubscribe(&self, filter: &str) -> Result<(), LinkError> {
        self.request(Request::Unsubscribe(filter.to_string()))
    }

    pub fn disconnect(&self) {
        let _ = self.request(Request::Disconnect);
    }
}
