//! One MQTT connection, 3.1.1 or 5, behind one small interface, so the publisher's logic is written
//! once. Sessions are always clean (see `inflight`): the buffer, not the broker session, is what makes
//! delivery at-least-once.

use crate::config::{MqttVersion, Qos, UpstreamPlan};
use bytes::Bytes;
use rumqttc::{Outgoing, TlsConfiguration, Transport};
use std::time::Duration;

/// The MQTT 5 reason code of a refused PUBACK or PUBREC (`None`: accepted).
macro_rules! failure_code {
    ($r:ident, $reason:expr) => {
        match $reason {
            $r::Success | $r::NoMatchingSubscribers => None,
            $r::UnspecifiedError => Some(0x80),
            $r::ImplementationSpecificError => Some(0x83),
            $r::NotAuthorized => Some(0x87),
            $r::TopicNameInvalid => Some(0x90),
            $r::PacketIdentifierInUse => Some(0x91),
            $r::QuotaExceeded => Some(0x97),
            $r::PayloadFormatInvalid => Some(0x99),
        }
    };
}

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
    Other,
}

/// The connection: a client to queue requests on, and the events of its event loop. The event
/// loop runs on a task of its own and is never cancelled mid-connect (rumqttc's `EventLoop::poll`
/// is not cancel-safe while it connects: a `select!` that drops it opens a new TCP connection on
/// the next poll, a storm of half-open connections per reconnect). After a failure the task waits
/// for [`Link::reconnect`]: the caller's backoff decides when the next connection is made.
pub struct Link {
    client: Client,
    events: tokio::sync::mpsc::Receiver<Result<LinkEvent, LinkError>>,
    resume: std::sync::Arc<tokio::sync::Notify>,
    driver: tokio::task::JoinHandle<()>,
}

enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl Drop for Link {
    fn drop(&mut self) {
        // The event loop (and its connection) goes with the link.
        self.driver.abort();
    }
}

/// Events the driver may queue before it waits for the caller.
pub const EVENT_QUEUE: usize = 256;

type EventTx = tokio::sync::mpsc::Sender<Result<LinkEvent, LinkError>>;

/// Hands one event to the link; after a failure, waits for [`Link::reconnect`]. False when the
/// link is gone.
async fn forward(tx: &EventTx, resume: &tokio::sync::Notify, ev: Result<LinkEvent, LinkError>) -> bool {
    if matches!(ev, Ok(LinkEvent::Other)) {
        return true;
    }
    let failed = ev.is_err();
    if tx.send(ev).await.is_err() {
        return false;
    }
    if failed {
        resume.notified().await;
    }
    true
}

async fn drive_v4(mut e: Box<rumqttc::EventLoop>, tx: EventTx, resume: std::sync::Arc<tokio::sync::Notify>) {
    while forward(&tx, &resume, event_v4(e.poll().await)).await {}
}

async fn drive_v5(mut e: Box<rumqttc::v5::EventLoop>, tx: EventTx, resume: std::sync::Arc<tokio::sync::Notify>) {
    while forward(&tx, &resume, event_v5(e.poll().await)).await {}
}

enum EventLoop {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

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
    /// The connection failed or dropped (rumqttc's event loop: MQTT 3.1.1 or 5); reconnect.
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
        let transport = match &o.tls {
            Some(tls) => Transport::tls_with_config(tls.clone()),
            None => Transport::tcp(),
        };
        // No Nagle: a PUBLISH goes out when it is written, not when the previous one is
        // acknowledged at the TCP level (40 ms with delayed ACKs), which is most of a live record's
        // latency budget.
        // What the broker may send: subscriptions (Sparkplug commands; a catalog reader's
        // contracts) of up to a megabyte, or the largest message this link would send itself.
        let incoming = (1usize << 20).max(u.max_message_bytes + 4096);
        let network = || {
            let mut n = rumqttc::NetworkOptions::new();
            n.set_tcp_nodelay(true);
            n
        };
        match u.version {
            MqttVersion::V311 => {
                let mut opts = rumqttc::MqttOptions::new(&u.client_id, &u.host, u.port);
                opts.set_keep_alive(u.keep_alive.max(Duration::from_secs(1)))
                    .set_clean_session(o.session_expiry.is_none())
                    .set_inflight(u.max_inflight)
                    .set_max_packet_size(incoming, u.max_message_bytes + 4096)
                    .set_transport(transport);
                if !o.no_will {
                    opts.set_last_will(rumqttc::LastWill::new(
                        &o.will_topic,
                        o.will_payload.clone(),
                        rumqttc::QoS::AtLeastOnce,
                        o.will_retain,
                    ));
                }
                if let (Some(user), Some(pass)) = (&u.username, &o.password) {
                    opts.set_credentials(user, pass);
                } else if let Some(user) = &u.username {
                    opts.set_credentials(user, "");
                }
                let (c, mut e) = rumqttc::AsyncClient::new(opts, cap);
                e.set_network_options(network());
                Link::start(Client::V4(c), EventLoop::V4(Box::new(e)))
            }
            MqttVersion::V5 => {
                let mut opts = rumqttc::v5::MqttOptions::new(&u.client_id, &u.host, u.port);
                opts.set_keep_alive(u.keep_alive.max(Duration::from_secs(5)))
                    .set_clean_start(o.session_expiry.is_none())
                    .set_session_expiry_interval(o.session_expiry)
                    .set_outgoing_inflight_upper_limit(u.max_inflight)
                    .set_max_packet_size(Some(incoming as u32))
                    .set_network_options(network())
                    .set_transport(transport);
                if !o.no_will {
                    opts.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
                        &o.will_topic,
                        o.will_payload.clone(),
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                        o.will_retain,
                        None,
                    ));
                }
                if let Some(user) = &u.username {
                    opts.set_credentials(user, o.password.clone().unwrap_or_default());
                }
                let (c, e) = rumqttc::v5::AsyncClient::new(opts, cap);
                Link::start(Client::V5(c), EventLoop::V5(Box::new(e)))
            }
        }
    }

    fn start(client: Client, events: EventLoop) -> Link {
        let (tx, rx) = tokio::sync::mpsc::channel(EVENT_QUEUE);
        let resume = std::sync::Arc::new(tokio::sync::Notify::new());
        let r = resume.clone();
        let driver = match events {
            EventLoop::V4(e) => tokio::spawn(drive_v4(e, tx, r)),
            EventLoop::V5(e) => tokio::spawn(drive_v5(e, tx, r)),
        };
        Link {
            client,
            events: rx,
            resume,
            driver,
        }
    }

    /// The next event. Cancel-safe: the event loop runs on its own task.
    pub async fn poll(&mut self) -> Result<LinkEvent, LinkError> {
        match self.events.recv().await {
            Some(ev) => ev,
            None => Err(LinkError::Connection("the connection's event loop stopped".into())),
        }
    }

    /// Whether events are waiting: [`poll`](Link::poll) would answer at once.
    pub fn pending(&self) -> bool {
        !self.events.is_empty()
    }

    /// After a failed [`poll`](Link::poll): let the event loop make its next connection attempt.
    pub fn reconnect(&self) {
        self.resume.notify_one();
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
        let exactly_once = qos == Qos::ExactlyOnce;
        match &self.client {
            Client::V4(c) => c
                .try_publish(
                    topic,
                    if exactly_once {
                        rumqttc::QoS::ExactlyOnce
                    } else {
                        rumqttc::QoS::AtLeastOnce
                    },
                    retain,
                    payload,
                )
                .map_err(|e| LinkError::Request(e.to_string())),
            Client::V5(c) => {
                let properties = rumqttc::v5::mqttbytes::v5::PublishProperties {
                    user_properties: props,
                    content_type: Some("application/json".into()),
                    ..Default::default()
                };
                c.try_publish_with_properties(
                    topic,
                    if exactly_once {
                        rumqttc::v5::mqttbytes::QoS::ExactlyOnce
                    } else {
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce
                    },
                    retain,
                    Bytes::from(payload),
                    properties,
                )
                .map_err(|e| LinkError::Request(e.to_string()))
            }
        }
    }

    /// Queues a QoS 0 publish (Sparkplug data and births), not retained.
    pub fn publish_at_most_once(&self, topic: &str, payload: Vec<u8>) -> Result<(), LinkError> {
        match &self.client {
            Client::V4(c) => c
                .try_publish(topic, rumqttc::QoS::AtMostOnce, false, payload)
                .map_err(|e| LinkError::Request(e.to_string())),
            Client::V5(c) => c
                .try_publish(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtMostOnce,
                    false,
                    Bytes::from(payload),
                )
                .map_err(|e| LinkError::Request(e.to_string())),
        }
    }

    pub fn subscribe(&self, filter: &str) -> Result<(), LinkError> {
        match &self.client {
            Client::V4(c) => c
                .try_subscribe(filter, rumqttc::QoS::AtLeastOnce)
                .map_err(|e| LinkError::Request(e.to_string())),
            Client::V5(c) => c
                .try_subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                .map_err(|e| LinkError::Request(e.to_string())),
        }
    }

    pub fn unsubscribe(&self, filter: &str) -> Result<(), LinkError> {
        match &self.client {
            Client::V4(c) => c.try_unsubscribe(filter).map_err(|e| LinkError::Request(e.to_string())),
            Client::V5(c) => c.try_unsubscribe(filter).map_err(|e| LinkError::Request(e.to_string())),
        }
    }

    pub fn disconnect(&self) {
        match &self.client {
            Client::V4(c) => {
                let _ = c.try_disconnect();
            }
            Client::V5(c) => {
                let _ = c.try_disconnect();
            }
        }
    }
}

fn event_v4(ev: Result<rumqttc::Event, rumqttc::ConnectionError>) -> Result<LinkEvent, LinkError> {
    match ev.map_err(|e| LinkError::Connection(e.to_string()))? {
        rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) => Ok(LinkEvent::Connected),
        rumqttc::Event::Incoming(rumqttc::Packet::PubAck(a)) => Ok(LinkEvent::PubAck {
            pkid: a.pkid,
            failure: None,
        }),
        // QoS 2 ends with PUBCOMP; the broker has the message once and for all.
        rumqttc::Event::Incoming(rumqttc::Packet::PubComp(c)) => Ok(LinkEvent::PubAck {
            pkid: c.pkid,
            failure: None,
        }),
        rumqttc::Event::Outgoing(Outgoing::Publish(pkid)) => Ok(LinkEvent::Written(pkid)),
        rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => Ok(LinkEvent::Message {
            topic: p.topic,
            payload: p.payload.to_vec(),
        }),
        rumqttc::Event::Incoming(rumqttc::Packet::UnsubAck(_)) => Ok(LinkEvent::UnsubAck),
        _ => Ok(LinkEvent::Other),
    }
}

fn event_v5(ev: Result<rumqttc::v5::Event, rumqttc::v5::ConnectionError>) -> Result<LinkEvent, LinkError> {
    match ev.map_err(|e| LinkError::Connection(e.to_string()))? {
        rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::ConnAck(_)) => Ok(LinkEvent::Connected),
        rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(a)) => {
            use rumqttc::v5::mqttbytes::v5::PubAckReason as R;
            Ok(LinkEvent::PubAck {
                pkid: a.pkid,
                failure: failure_code!(R, a.reason),
            })
        }
        // QoS 2: a refusal comes in PUBREC (and ends the exchange); success in PUBCOMP.
        rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubRec(a)) => {
            use rumqttc::v5::mqttbytes::v5::PubRecReason as R;
            match failure_code!(R, a.reason) {
                Some(code) => Ok(LinkEvent::PubAck {
                    pkid: a.pkid,
                    failure: Some(code),
                }),
                None => Ok(LinkEvent::Other),
            }
        }
        rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubComp(c)) => Ok(LinkEvent::PubAck {
            pkid: c.pkid,
            failure: None,
        }),
        rumqttc::v5::Event::Outgoing(Outgoing::Publish(pkid)) => Ok(LinkEvent::Written(pkid)),
        rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::Publish(p)) => Ok(LinkEvent::Message {
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            payload: p.payload.to_vec(),
        }),
        rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::UnsubAck(_)) => Ok(LinkEvent::UnsubAck),
        _ => Ok(LinkEvent::Other),
    }
}
