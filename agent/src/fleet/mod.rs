//! The mesh seen from the platform's side of the broker: [`catalog`] keeps every product of every
//! agent the catalog index names, [`verify`] checks the delivery promise on what arrives; both
//! without I/O. This file is the I/O: [`Reader`], one MQTT connection that subscribes to the index
//! and to each product's topics as its entry arrives, reconnecting with backoff. Only standard MQTT
//! is used, so a platform needs no other part of plantmesh.

pub mod catalog;
pub mod run;
pub mod verify;

use crate::config::{MqttVersion, SecretRef, UpstreamPlan};
use crate::publish::link::{Link, LinkEvent, LinkOptions};
use catalog::{Fleet, Interest, Seen};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Where and how to reach the broker, as `[upstream]` does.
#[derive(Debug, Clone)]
pub struct Broker {
    /// `mqtt://host[:port]` or `mqtts://host[:port]`.
    pub url: String,
    pub username: Option<String>,
    pub password: Option<SecretRef>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub version: MqttVersion,
    pub client_id: String,
}

impl Broker {
    fn plan(&self) -> Result<UpstreamPlan, String> {
        let (scheme, rest) = self.url.split_once("://").unwrap_or(("mqtt", self.url.as_str()));
        let tls = match scheme {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" | "tls" => true,
            _ => {
                return Err(format!(
                    "--broker `{}` is not an MQTT URL: write mqtt://host:1883 or mqtts://host:8883",
                    self.url
                ))
            }
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (
                h.trim_matches(['[', ']']).to_string(),
                p.parse::<u16>()
                    .map_err(|_| format!("--broker `{}`: `{p}` is not a port number", self.url))?,
            ),
            None => (rest.to_string(), if tls { 8883 } else { 1883 }),
        };
        if tls && self.ca_file.is_none() {
            return Err("--broker mqtts:// needs --ca-file (the CA that signed the broker's certificate)".into());
        }
        Ok(UpstreamPlan {
            host,
            port,
            tls,
            version: self.version,
            client_id: self.client_id.clone(),
            keep_alive: Duration::from_secs(30),
            username: self.username.clone(),
            password: self.password.clone(),
            insecure_credentials: false,
            ca_file: self.ca_file.clone(),
            client_cert: self.client_cert.clone(),
            max_inflight: 16,
            max_records_per_message: 1,
            // Contracts of large products arrive whole.
            max_message_bytes: 64 << 20,
            backlog_bytes_per_second: None,
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(5),
            sparkplug: None,
        })
    }
}

/// What [`Reader::next`] hands out.
#[derive(Debug)]
pub enum Next {
    /// A message on a followed topic, and what it was.
    Message(Seen, Vec<u8>),
    /// Nothing arrived in the time given.
    Idle,
}

/// One connection that follows the catalog index and the products' topics into a [`Fleet`].
pub struct Reader {
    link: Link,
    pub fleet: Fleet,
    /// Every topic followed, subscribed again on every connect.
    topics: Vec<String>,
    unsent: VecDeque<String>,
    pub connected: bool,
    /// Connections made so far.
    pub connects: u64,
    /// The last connection failure, while not connected.
    pub last_error: Option<String>,
    /// When the fleet last changed (a catalog message), for "has it settled".
    pub last_change: Instant,
    backoff: crate::backoff::Backoff,
    retry_at: Option<tokio::time::Instant>,
}

impl Reader {
    /// `keep_session`: keep the broker session across reconnects, so nothing queued for this
    /// reader is lost while it reconnects (`verify`; the session expires 10 minutes after the
    /// last connection with MQTT 5).
    pub fn start(broker: &Broker, interest: Interest, keep_session: bool) -> Result<Reader, String> {
        let plan = broker.plan()?;
        let mut o = LinkOptions::resolve(&plan, String::new(), Vec::new()).map_err(|e| e.to_string())?;
        o.no_will = true;
        o.session_expiry = keep_session.then_some(600);
        // Subscriptions are queued a product at a time, far beyond a publisher's window.
        o.burst = 1 << 14;
        let backoff = crate::backoff::Backoff::new(plan.reconnect_min, plan.reconnect_max);
        Ok(Reader {
            link: Link::new(&o),
            fleet: Fleet::new(interest),
            topics: vec![catalog::INDEX.to_string()],
            unsent: VecDeque::new(),
            connected: false,
            connects: 0,
            last_error: None,
            last_change: Instant::now(),
            backoff,
            retry_at: None,
        })
    }

    fn flush(&mut self) {
        while let Some(t) = self.unsent.front() {
            if self.link.subscribe(t).is_err() {
                return; // the request queue is full: the rest goes on the next call
            }
            self.unsent.pop_front();
        }
    }

    /// The next message on a followed topic, or [`Next::Idle`] after `wait` without one.
    /// Connection failures are retried with backoff and kept in `last_error`.
    pub async fn next(&mut self, wait: Duration) -> Next {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(at) = self.retry_at {
                if tokio::time::timeout_at(deadline, tokio::time::sleep_until(at))
                    .await
                    .is_err()
                {
                    return Next::Idle;
                }
                self.retry_at = None;
                self.link.reconnect();
            }
            self.flush();
            let ev = match tokio::time::timeout_at(deadline, self.link.poll()).await {
                Err(_) => return Next::Idle,
                Ok(ev) => ev,
            };
            match ev {
                Ok(LinkEvent::Connected) => {
                    self.connected = true;
                    self.connects += 1;
                    self.last_error = None;
                    self.backoff.reset();
                    self.unsent = self.topics.iter().cloned().collect();
                }
                Ok(LinkEvent::Message { topic, payload }) => {
                    let (seen, subscribe) = self.fleet.message(&topic, &payload);
                    for t in subscribe {
                        self.topics.push(t.clone());
                        self.unsent.push_back(t);
                    }
                    if seen == Seen::Catalog {
                        self.last_change = Instant::now();
                    }
                    if seen != Seen::Other {
                        return Next::Message(seen, payload);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if self.connected || self.last_error.is_none() {
                        eprintln!("broker connection: {e}; reconnecting");
                    }
                    self.connected = false;
                    self.last_error = Some(e.to_string());
                    self.retry_at = Some(tokio::time::Instant::now() + self.backoff.next_delay());
                }
            }
        }
    }

    /// Ends the connection cleanly.
    pub fn stop(&self) {
        self.link.disconnect();
    }
}
