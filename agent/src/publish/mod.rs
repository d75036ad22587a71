//! Publish: buffered messages -> upstream MQTT at QoS 1, deleted only on their own PUBACK.
//!
//! In: the buffer (read side) and its commit notifications. Out: product messages, retained
//! descriptors and status, gap events; acknowledgements back to the buffer.
//!
//! Delivery: a message is deleted from the buffer only when the PUBACK for the packet that carried it
//! arrives (see [`inflight`] for how packet ids are matched). On a disconnect, everything
//! unacknowledged is sent again on the next connection, so duplicates are limited to the in-flight
//! window (`max_inflight`).
//!
//! Backlog policy (live first): on every connect the newest pending message of each product marks the
//! end of its backlog. Messages after that mark are *live* and are sent first, as fast as the window
//! allows, with `historical: false`. The backlog is sent in order beside them with
//! `historical: true`, as fast as the broker acknowledges but never in the quarter of the window kept
//! for live messages (and at most `backlog_bytes_per_second` when set), so a long outage never delays live
//! data by the length of the outage. Order is kept within each of the two streams; consumers order by
//! `(epoch, seq)`.

pub mod envelope;
pub mod inflight;
pub mod link;
pub mod sparkplug;
mod stats;
pub mod uns;
mod visits;

pub use stats::{Histogram, PublishStats};

use crate::backoff::Backoff;
use crate::buffer::{BufferHandle, GapReason, MessageId, ProductKey, Reader, StoredMessage};
use inflight::{Inflight, Sent};
use link::{Link, LinkError, LinkEvent, LinkOptions};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

type Key = (ProductKey, MessageId);

/// A product as the publisher announces it.
#[derive(Clone)]
pub struct Announced {
    /// The product's buffer key (`{id}.v{major}`).
    pub id: String,
    /// QoS of its messages.
    pub qos: crate::config::Qos,
    pub descriptor_topic: String,
    /// Where its SLI document is retained (cleared with the descriptor when the product is removed).
    pub sli_topic: String,
    /// Builds the descriptor when it is published (on each connect), instead of holding it: with
    /// thousands of fields it is hundreds of KiB per product.
    pub descriptor: std::sync::Arc<dyn Fn() -> Vec<u8> + Send + Sync>,
    /// Builds the product's other retained documents, `(topic, payload)`: its ODCS contract and its
    /// catalog index entry. Published after the descriptor, cleared with it.
    pub documents: std::sync::Arc<dyn Fn() -> Vec<(String, Vec<u8>)> + Send + Sync>,
    /// The product's name in the fleet ([`crate::config::urn`]), an MQTT 5 user property of each of
    /// its messages.
    pub urn: Arc<str>,
    /// Fingerprint of the governance treatment its records get now.
    pub governance: u64,
    /// Builds that treatment, when a message governed under another one must be judged against it.
    pub treatment: std::sync::Arc<dyn Fn() -> crate::govern::Treatment + Send + Sync>,
}

impl std::fmt::Debug for Announced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Announced")
            .field("id", &self.id)
            .field("qos", &self.qos)
            .finish()
    }
}

/// Why the publisher stopped. Connection failures are not among them: it reconnects by itself.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// A request could not be queued on the broker connection.
    #[error("upstream: {0}")]
    Link(#[from] LinkError),
    /// The buffer could not be read.
    #[error(transparent)]
    Buffer(#[from] crate::buffer::BufferError),
    #[error("cannot store the Sparkplug bdSeq in {}: {source}", path.display())]
    BdSeq {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// The products announced, indexed by buffer key: every message and acknowledgement finds its
/// product in one lookup, not a search.
pub struct Products {
    list: Vec<Announced>,
    keys: Vec<ProductKey>,
    by_key: HashMap<ProductKey, usize>,
}

impl Products {
    /// `reader` gives each product its key.
    pub fn new(list: Vec<Announced>, reader: &Reader) -> Products {
        let keys: Vec<ProductKey> = list.iter().map(|p| reader.key(&p.id)).collect();
        let by_key = keys.iter().enumerate().map(|(i, &k)| (k, i)).collect();
        Products { list, keys, by_key }
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The index of the product with this key.
    pub fn index(&self, key: ProductKey) -> Option<usize> {
        self.by_key.get(&key).copied()
    }

    /// The key of each product, in order.
    pub fn keys(&self) -> &[ProductKey] {
        &self.keys
    }

    pub fn get(&self, i: usize) -> Option<&Announced> {
        self.list.get(i)
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Announced> {
        self.list.iter()
    }
}

pub struct Publisher {
    pub options: LinkOptions,
    pub reader: Reader,
    pub buffer: BufferHandle,
    pub products: Products,
    pub agent_id: String,
    pub status_topic: String,
    pub online: Vec<u8>,
    pub offline: Vec<u8>,
    pub stats: Arc<PublishStats>,
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Checked again just before every publish (fail closed).
    pub egress: Egress,
    /// Where acknowledged descriptors are kept (see [`crate::config::contract`]); `None`: not kept.
    pub contracts_dir: Option<std::path::PathBuf>,
    /// Retained documents to publish when connected (SLIs): `(topic, payload)`; dropped while
    /// disconnected (the next interval's document replaces them).
    pub retained: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    /// Publish product data as a Sparkplug B edge node instead of JSON envelopes.
    pub sparkplug: Option<SparkplugOut>,
    /// The UNS view of the products that ask for one: sent after live messages, before backlog.
    pub uns: Option<Arc<uns::Board>>,
    /// Reloads: what is announced changes in place ([`Change`]).
    pub changes: tokio::sync::mpsc::UnboundedReceiver<Change>,
    /// Per product slot: removed from the config by a reload (its backlog still drains).
    pub retired: Vec<bool>,
    /// Retired slots whose retained descriptor and SLI are still to be cleared once drained.
    pub clearing: Vec<usize>,
    /// Products the config says are retired, `(buffer key, their retained topics)`: cleared once
    /// their backlog (drained as that of any product not in the config) is delivered.
    pub leftovers: Vec<(String, Vec<String>)>,
    /// The gateway's AsyncAPI document, `(topic, builder)`: retained on every connect and reload.
    pub asyncapi: Option<(String, Document)>,
    /// The ledger of products with retained documents ([`crate::catalog::ledger`]); `None`: none kept.
    pub ledger: Option<std::path::PathBuf>,
}

/// Builds a retained document when it is published.
pub type Document = Arc<dyn Fn() -> Vec<u8> + Send + Sync>;

/// A reload's change to what the publisher announces. Slots keep their places: `products` is the
/// whole table, the current slots first (maybe changed), then new ones.
pub struct Change {
    pub products: Vec<Announced>,
    /// Per slot: its product left the config. Its backlog drains, then its retained descriptor
    /// and SLI are cleared (an empty retained message on each).
    pub retired: Vec<bool>,
    /// Slots whose descriptor is published now (new or changed).
    pub announce: Vec<usize>,
    pub egress: Egress,
    pub online: Vec<u8>,
    pub offline: Vec<u8>,
    /// The AsyncAPI document of the new config.
    pub asyncapi: Option<Document>,
    /// `Some`: the upstream connection changed; reconnect once with these.
    pub options: Option<LinkOptions>,
}

/// The Sparkplug B encoding and where its `bdSeq` is kept.
pub struct SparkplugOut {
    pub encoder: sparkplug::Encoder,
    pub bd_seq_file: std::path::PathBuf,
}

/// What may go upstream, as the governance file and the valid contracts say.
#[derive(Debug, Clone, Default)]
pub struct Egress {
    /// Topic prefixes allowed (`""`: any); empty: none.
    pub topic_prefixes: Vec<String>,
    /// Products with a valid contract in the running config.
    pub products: HashSet<String>,
}

impl Egress {
    pub fn allows(&self, product: &str, topic: &str) -> bool {
        let valid = self.products.contains(product)
            // Messages buffered before products were keyed by major (`{id}`, no `.v`): still the
            // product's, on the topic they were stored with.
            || (crate::config::split_product_key(product).1.is_none()
                && self.products.iter().any(|k| crate::config::split_product_key(k).0 == product));
        valid && self.topic_prefixes.iter().any(|p| topic.starts_with(p.as_str()))
    }
}

#[derive(Default, Clone, Copy)]
struct Cursor {
    live_after: Option<MessageId>,
    backlog_after: Option<MessageId>,
    backlog_end: Option<MessageId>,
}

struct Session {
    inflight: Inflight<Key>,
    /// In flight: records, read time and whether it is backlog (`historical`), of each message.
    sent: HashMap<Key, (u32, u64, bool)>,
    gaps_sent: HashSet<u64>,
    cursors: HashMap<ProductKey, Cursor>,
    tokens: f64,
    last_refill: Instant,
    sp: SpSession,
    /// Whether messages of a product governed under a treatment (fingerprint) other than today's
    /// may go: judged once per pair ([`crate::govern::Treatment::covers`]).
    verdicts: HashMap<(ProductKey, u64), bool>,
    /// Backlog merges asked for at connect and not yet done: the product's backlog waits.
    merging: HashMap<ProductKey, u64>,
    /// Products that may have live messages after their cursor: those staged to since they were
    /// last read to the end ([`crate::buffer::Live::take_fresh`]), and every product at connect.
    ready: visits::Visits,
    /// Products with backlog not yet sent (`backlog_end` set).
    backlogged: visits::Visits,
}

/// The Sparkplug side of a session: data goes out at QoS 0, so delivery is confirmed by a barrier.
/// After a batch of DDATA the publisher sends an UNSUBSCRIBE (of a topic it never subscribed to);
/// MQTT keeps a connection's packets in order, so its UNSUBACK proves the broker received every
/// DDATA written before it on this very connection. Only then do their records leave the buffer.
#[derive(Default)]
struct SpSession {
    /// Births sent (and the primary host, if any, is online).
    born: bool,
    host_online: bool,
    bd_seq: u64,
    /// The seq of the next message (0..=255; NBIRTH is 0).
    seq: u64,
    /// Written since the last barrier.
    pending: Vec<Key>,
    /// Sent barriers, oldest first, with the messages each confirms.
    barriers: std::collections::VecDeque<Vec<Key>>,
}

/// Merge request tokens, unique in the process.
static MERGE_TOKENS: AtomicU64 = AtomicU64::new(1);

impl Session {
    fn merge_token(&mut self, product: ProductKey) -> u64 {
        let token = MERGE_TOKENS.fetch_add(1, Ordering::Relaxed);
        self.merging.insert(product, token);
        token
    }

    /// The products with live messages to send, or with backlog (`historical`).
    fn visits(&mut self, historical: bool) -> &mut visits::Visits {
        if historical {
            &mut self.backlogged
        } else {
            &mut self.ready
        }
    }

    /// A product's cursor in this session; it is visited by the next fill.
    fn track(&mut self, product: ProductKey, cursor: Cursor) {
        if cursor.backlog_end.is_some() {
            self.backlogged.mark(product);
        }
        self.ready.mark(product);
        self.cursors.insert(product, cursor);
    }

    /// Messages not yet confirmed: awaiting PUBACK, or (Sparkplug) a barrier.
    fn busy(&self) -> usize {
        self.inflight.len() + self.sp.unconfirmed()
    }
}

impl SpSession {
    fn next_seq(&mut self) -> u64 {
        let s = self.seq;
        self.seq = (self.seq + 1) % 256;
        s
    }

    fn unconfirmed(&self) -> usize {
        self.pending.len() + self.barriers.iter().map(Vec::len).sum::<usize>()
    }
}

/// The topic of the delivery barrier (never subscribed to; see [`SpSession`]).
fn barrier_topic(e: &sparkplug::Encoder) -> String {
    format!("{}/_barrier/{}", crate::sparkplug::NAMESPACE, e.node)
}

impl Publisher {
    /// A new connection. In Sparkplug mode every connection has its own `bdSeq`, stored before the
    /// CONNECT, and its NDEATH as the will.
    fn new_link(&mut self) -> Result<(Link, u64), PublishError> {
        let Some(sp) = &self.sparkplug else {
            return Ok((Link::new(&self.options), 0));
        };
        let bd_seq = sparkplug::next_bd_seq(&sp.bd_seq_file).map_err(|source| PublishError::BdSeq {
            path: sp.bd_seq_file.clone(),
            source,
        })?;
        self.options.will_topic = sp.encoder.topic(crate::sparkplug::Kind::NDeath, None);
        self.options.will_payload = sp.encoder.ndeath(bd_seq);
        self.options.will_retain = false;
        Ok((Link::new(&self.options), bd_seq))
    }

    /// NBIRTH, then a DBIRTH per product; the sequence starts again at 0.
    fn births(&self, link: &Link, s: &mut Session) -> Result<(), PublishError> {
        let Some(sp) = &self.sparkplug else { return Ok(()) };
        let e = &sp.encoder;
        s.sp.seq = 0;
        let seq = s.sp.next_seq();
        debug_assert_eq!(seq, 0);
        link.publish_at_most_once(&e.topic(crate::sparkplug::Kind::NBirth, None), e.nbirth(s.sp.bd_seq))?;
        s.inflight.queued(Sent::Control);
        for key in e.devices() {
            let seq = s.sp.next_seq();
            if let Some(payload) = e.dbirth(key, seq) {
                link.publish_at_most_once(&e.topic(crate::sparkplug::Kind::DBirth, Some(key)), payload)?;
                s.inflight.queued(Sent::Control);
            }
        }
        s.sp.born = true;
        info!(group = %e.group, edge_node = %e.node, bd_seq = s.sp.bd_seq, devices = e.devices().count(), "Sparkplug births published");
        Ok(())
    }

    /// A command or host state on the Sparkplug session. `Ok(true)`: the host went offline, so the
    /// session must end (NDEATH sent) and start again.
    fn on_sparkplug_message(
        &self,
        link: &Link,
        s: &mut Session,
        topic: &str,
        payload: &[u8],
    ) -> Result<bool, PublishError> {
        let Some(sp) = &self.sparkplug else { return Ok(false) };
        let e = &sp.encoder;
        if topic == e.topic(crate::sparkplug::Kind::NCmd, None) {
            let rebirth = <crate::sparkplug::Payload as prost::Message>::decode(payload).is_ok_and(|p| {
                p.metrics.iter().any(|m| {
                    m.name.as_deref() == Some(crate::sparkplug::REBIRTH_METRIC)
                        && m.value == Some(crate::sparkplug::MetricValue::Boolean(true))
                })
            });
            if rebirth && (s.sp.born || e.primary_host.is_none()) {
                info!("Sparkplug rebirth requested");
                self.births(link, s)?;
            }
            return Ok(false);
        }
        if let Some(host) = &e.primary_host {
            if topic == crate::sparkplug::state_topic(host) {
                // Sparkplug 3.0: {"online": bool, "timestamp": ms}; earlier hosts wrote ONLINE/OFFLINE.
                let online = serde_json::from_slice::<serde_json::Value>(payload)
                    .ok()
                    .and_then(|v| v["online"].as_bool())
                    .unwrap_or(payload == b"ONLINE");
                let was = s.sp.host_online;
                s.sp.host_online = online;
                if online && !s.sp.born {
                    info!(host = %host, "primary host online");
                    self.births(link, s)?;
                } else if !online && was && s.sp.born {
                    warn!(host = %host, "primary host offline: ending the Sparkplug session until it is back");
                    link.publish(
                        &e.topic(crate::sparkplug::Kind::NDeath, None),
                        false,
                        e.ndeath(s.sp.bd_seq),
                        vec![],
                    )?;
                    s.inflight.queued(Sent::Control);
                    s.sp.born = false;
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// A message the broker has: counted and timed (the caller hands the acknowledgement to the
    /// buffer, which deletes it).
    /// Latency is measured on live messages only: a backlog message's age is the outage, which
    /// freshness and completeness report, not the read-to-PUBACK latency of the pipeline.
    fn delivered(&self, key: &Key, records: u32, created: u64, historical: bool) {
        self.stats.messages_acked.fetch_add(1, Ordering::Relaxed);
        self.stats
            .records_acked
            .fetch_add(u64::from(records), Ordering::Relaxed);
        if !historical {
            let product = self.products.index(key.0);
            self.stats
                .record_latency(product, crate::model::now_millis().saturating_sub(created));
        }
    }

    pub async fn run(mut self) -> Result<(), PublishError> {
        let u = self.options.upstream.clone();
        let mut backoff = Backoff::new(u.reconnect_min, u.reconnect_max);
        let (mut link, mut bd_seq) = self.new_link()?;
        let mut connected = false;
        let mut session = self.new_session();
        // Acknowledged but maybe not yet deleted: skip them until two commits have passed.
        let mut acked: HashMap<Key, u64> = HashMap::new();
        let mut acked_gaps: HashMap<u64, u64> = HashMap::new();
        let mut pruned_at = u64::MAX;
        let mut notify = self.buffer.notify.clone();
        let mut refill = tokio::time::interval(Duration::from_millis(100));
        // After a stall (a backoff sleep), one tick, not a burst of the ones missed.
        refill.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping: Option<Instant> = None;
        let mut dirty = true;
        let mut read_failed = Instant::now()
            .checked_sub(Duration::from_secs(60))
            .unwrap_or_else(Instant::now);
        // Acknowledged by the broker, not yet handed to the buffer.
        let mut unflushed: Vec<Key> = Vec::new();
        let mut held = 0;
        loop {
            // While the broker's answers keep coming, take them all first: one hand-off to the
            // writer and one fill per burst of PUBACKs, not per PUBACK (bounded, so a steady
            // stream still fills).
            let burst = link.pending() && held < link::EVENT_QUEUE;
            if burst {
                held += 1;
            } else {
                held = 0;
                if !unflushed.is_empty() {
                    self.buffer.ack_all(unflushed.clone());
                    // Read after the acknowledgements were handed to the writer (see
                    // `BufferStats::generation`).
                    let generation = self.buffer.stats.generation.load(Ordering::SeqCst);
                    acked.extend(unflushed.drain(..).map(|k| (k, generation)));
                }
            }
            if !burst && connected && stopping.is_none() && std::mem::take(&mut dirty) {
                let generation = self.buffer.stats.generation.load(Ordering::Relaxed);
                // Once per generation, not per acknowledgement: thousands of them a second.
                if generation != pruned_at {
                    acked.retain(|_, g| *g + 2 > generation);
                    acked_gaps.retain(|_, g| *g + 2 > generation);
                    pruned_at = generation;
                }
                if !self.clearing.is_empty() || !self.leftovers.is_empty() {
                    if let Err(e) = self.clear_retired(&link, &mut session) {
                        warn!(error = %e, "cannot check whether removed products have drained; retrying");
                    }
                }
                match self.fill(&link, &mut session, &mut acked, &acked_gaps) {
                    // The buffer could not be read (storage failing, the file being reopened):
                    // live data staged in memory and the rest wait for the next tick.
                    Err(PublishError::Buffer(e)) => {
                        if read_failed.elapsed() > Duration::from_secs(10) {
                            warn!(error = %e, "cannot read the buffer; retrying");
                            read_failed = Instant::now();
                        }
                    }
                    other => other?,
                }
            }
            if let Some(since) = stopping.filter(|_| !burst) {
                let settled = session.inflight.is_empty() && session.sp.unconfirmed() == 0;
                if settled || since.elapsed() > Duration::from_secs(3) || !connected {
                    if connected {
                        if let Some(sp) = &self.sparkplug {
                            // A clean stop sends no will: the death certificate goes out by hand.
                            let e = &sp.encoder;
                            let _ = link.publish(
                                &e.topic(crate::sparkplug::Kind::NDeath, None),
                                false,
                                e.ndeath(bd_seq),
                                vec![],
                            );
                        }
                        let _ = link.publish(&self.status_topic, true, self.offline.clone(), vec![]);
                        link.disconnect();
                        // Let the event loop write the offline status and DISCONNECT.
                        let deadline = Instant::now() + Duration::from_secs(2);
                        while Instant::now() < deadline {
                            match tokio::time::timeout(Duration::from_millis(500), link.poll()).await {
                                Ok(Ok(_)) => continue,
                                _ => break,
                            }
                        }
                    }
                    let s = &self.stats;
                    info!(
                        messages_acked = s.messages_acked.load(Ordering::Relaxed),
                        records_acked = s.records_acked.load(Ordering::Relaxed),
                        dead_lettered = s.dead_lettered.load(Ordering::Relaxed),
                        connects = s.connects.load(Ordering::Relaxed),
                        latency_p50_ms = s.latency_quantile(0.5).unwrap_or(0),
                        latency_p99_ms = s.latency_quantile(0.99).unwrap_or(0),
                        "publisher stopped"
                    );
                    return Ok(());
                }
            }
            tokio::select! {
                ev = link.poll() => match ev {
                    Ok(LinkEvent::Connected) => {
                        connected = true;
                        backoff.reset();
                        self.stats.connected.store(1, Ordering::Relaxed);
                        // Before anything is read: from here on, new messages may be sent at once.
                        self.buffer.stats.upstream_sessions.fetch_add(1, Ordering::SeqCst);
                        self.buffer.stats.upstream_connected.store(true, Ordering::SeqCst);
                        self.stats.connects.fetch_add(1, Ordering::Relaxed);
                        session = self.new_session();
                        session.sp.bd_seq = bd_seq;
                        dirty = true;
                        self.on_connect(&link, &mut session)?;
                        if let Some(sp) = &self.sparkplug {
                            let e = &sp.encoder;
                            link.subscribe(&e.topic(crate::sparkplug::Kind::NCmd, None))?;
                            match &e.primary_host {
                                Some(host) => link.subscribe(&crate::sparkplug::state_topic(host))?,
                                None => self.births(&link, &mut session)?,
                            }
                        }
                        info!(broker = %format!("{}:{}", u.host, u.port), "connected upstream");
                    }
                    Ok(LinkEvent::Written(pkid)) => {
                        if let Err(e) = session.inflight.written(pkid) {
                            // Cannot happen while the invariants hold; recover by starting a clean session.
                            error!(error = ?e, "PUBACK correlation lost; reconnecting with a clean session");
                            (link, bd_seq) = self.new_link()?;
                            connected = false;
                            self.stats.connected.store(0, Ordering::Relaxed);
                        self.buffer.stats.upstream_connected.store(false, Ordering::SeqCst);
                        }
                    }
                    Ok(LinkEvent::PubAck { pkid, failure }) => {
                        dirty = true;
                        match session.inflight.acked(pkid) {
                            Some(Sent::Message(key)) => {
                                let (records, created, historical) = session.sent.remove(&key).unwrap_or((0, 0, false));
                                match failure {
                                    None => {
                                        self.delivered(&key, records, created, historical);
                                        unflushed.push(key);
                                    }
                                    Some(code) => {
                                        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                                        error!(product = %self.reader.name(key.0), epoch = key.1.epoch, seq = key.1.seq, reason = format!("0x{code:02x}"),
                                               "broker refused the message; dead-lettered locally");
                                        self.buffer.dead_letter(key.0, key.1, GapReason::BrokerRejected(code));
                                        // Read after the dead letter was handed to the writer
                                        // (see `BufferStats::generation`).
                                        acked.insert(key, self.buffer.stats.generation.load(Ordering::SeqCst));
                                    }
                                }
                            }
                            Some(Sent::Gap(id)) => {
                                session.gaps_sent.remove(&id);
                                self.buffer.gap_ack(id);
                                acked_gaps.insert(id, self.buffer.stats.generation.load(Ordering::SeqCst));
                            }
                            Some(Sent::Descriptor(i)) if failure.is_some() => {
                                // Not published: the contract consumers rely on is still the last one stored.
                                if let Some(p) = self.products.get(i) {
                                    error!(product = %p.id, reason = format!("0x{:02x}", failure.unwrap_or(0)), "the broker refused the product's descriptor");
                                }
                            }
                            Some(Sent::Descriptor(i)) => {
                                // The contract consumers now rely on: later configs are checked against it.
                                if let (Some(dir), Some(p)) = (&self.contracts_dir, self.products.get(i)) {
                                    if let Err(e) = crate::config::contract::save(dir, &p.id, &(p.descriptor)()) {
                                        warn!(product = %p.id, error = %e, "cannot store the published descriptor");
                                    }
                                }
                            }
                            Some(Sent::Control) | None => {}
                        }
                    }
                    Ok(LinkEvent::UnsubAck) => {
                        // A Sparkplug barrier: everything written before it is with the broker.
                        dirty = true;
                        for key in session.sp.barriers.pop_front().unwrap_or_default() {
                            let (records, created, historical) = session.sent.remove(&key).unwrap_or((0, 0, false));
                            self.delivered(&key, records, created, historical);
                            unflushed.push(key);
                        }
                    }
                    Ok(LinkEvent::Message { topic, payload }) => {
                        dirty = true;
                        if self.on_sparkplug_message(&link, &mut session, &topic, &payload)? {
                            link.disconnect();
                        }
                    }
                    Err(e) => {
                        let session_ended = connected || self.stats.connected.load(Ordering::Relaxed) == 1;
                        let unacked = session.inflight.reset();
                        self.stats.resent.fetch_add(unacked.len() as u64, Ordering::Relaxed);
                        if connected {
                            warn!(error = %e, unacknowledged = unacked.len(), "upstream connection lost; unacknowledged messages stay buffered");
                        }
                        connected = false;
                        self.stats.connected.store(0, Ordering::Relaxed);
                        self.buffer.stats.upstream_connected.store(false, Ordering::SeqCst);
                        if stopping.is_some() {
                            continue;
                        }
                        let wait = backoff.next_delay();
                        warn!(broker = %format!("{}:{}", u.host, u.port), error = %e, retry_in = ?wait, attempt = backoff.attempt(), "upstream connect failed");
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = self.shutdown.changed() => { stopping = Some(Instant::now()); }
                        }
                        // A session that was up ends its bdSeq: the next CONNECT carries a new one
                        // (a connect that failed keeps it, its will never reached the broker).
                        if self.sparkplug.is_some() && stopping.is_none() && session_ended {
                            (link, bd_seq) = self.new_link()?;
                        } else {
                            // One connection attempt per wait: the event loop waits for this.
                            link.reconnect();
                        }
                    }
                },
                Some(change) = self.changes.recv() => {
                    dirty = true;
                    if self.change(change, connected.then_some(&link), &mut session)? {
                        // The upstream connection changed: one reconnect, everything unacknowledged
                        // is sent again from the buffer on the new connection.
                        let unacked = session.inflight.reset();
                        self.stats.resent.fetch_add(unacked.len() as u64, Ordering::Relaxed);
                        link.disconnect();
                        (link, bd_seq) = self.new_link()?;
                        connected = false;
                        self.stats.connected.store(0, Ordering::Relaxed);
                        self.buffer.stats.upstream_connected.store(false, Ordering::SeqCst);
                        info!(broker = %format!("{}:{}", self.options.upstream.host, self.options.upstream.port), "upstream settings reloaded: reconnecting");
                    }
                }
                Some((topic, payload)) = self.retained.recv() => {
                    if connected && stopping.is_none() && link.publish(&topic, true, payload, vec![]).is_ok() {
                        session.inflight.queued(Sent::Control);
                    }
                }
                _ = notify.changed() => dirty = true,
                _ = refill.tick() => dirty = true,
                _ = self.shutdown.changed(), if stopping.is_none() => {
                    stopping = Some(Instant::now());
                }
            }
        }
    }

    /// Takes a reload's [`Change`]; true when the upstream connection must be made again.
    fn change(&mut self, c: Change, link: Option<&Link>, s: &mut Session) -> Result<bool, PublishError> {
        let before = self.products.len();
        self.products = Products::new(c.products, &self.reader);
        for i in 0..self.products.len() {
            let retired = c.retired.get(i).copied().unwrap_or(false);
            let was = self.retired.get(i).copied().unwrap_or(false);
            if retired && !was && !self.clearing.contains(&i) {
                self.clearing.push(i);
            }
            if !retired {
                self.clearing.retain(|&x| x != i);
            }
        }
        self.retired = c.retired;
        self.egress = c.egress;
        self.online = c.online;
        self.offline = c.offline;
        if let (Some((_, doc)), Some(new)) = (&mut self.asyncapi, c.asyncapi) {
            *doc = new;
        }
        // Treatments may have changed: judge buffered messages again.
        s.verdicts.clear();
        if let Some(link) = link {
            link.publish(&self.status_topic, true, self.online.clone(), vec![])?;
            s.inflight.queued(Sent::Control);
            self.publish_asyncapi(link, s)?;
            for &i in &c.announce {
                self.announce(link, s, i)?;
            }
            // New slots get cursors as a connect would give them (their backlog, if the buffer
            // held one from an earlier run, drains beside their live messages).
            for i in before..self.products.len() {
                let p = self.products.keys()[i];
                if !s.cursors.contains_key(&p) {
                    let end = self.reader.last_id(p)?;
                    s.track(
                        p,
                        Cursor {
                            live_after: end,
                            backlog_after: None,
                            backlog_end: end,
                        },
                    );
                }
            }
        }
        Ok(match c.options {
            Some(options) => {
                self.options = options;
                true
            }
            None => false,
        })
    }

    /// Clears the retained descriptor and SLI of each removed product whose backlog has drained.
    fn clear_retired(&mut self, link: &Link, s: &mut Session) -> Result<(), PublishError> {
        let mut i = 0;
        while i < self.leftovers.len() {
            let key = self.reader.key(&self.leftovers[i].0);
            if !self.drained(key, s)? {
                i += 1;
                continue;
            }
            let (id, topics) = self.leftovers.swap_remove(i);
            for topic in topics {
                link.publish(&topic, true, Vec::new(), vec![])?;
                s.inflight.queued(Sent::Control);
            }
            info!(product = %id, "product no longer in the config drained: its retained descriptor, contract, catalog entry and SLI are cleared");
            self.forget(&id);
        }
        i = 0;
        while i < self.clearing.len() {
            let slot = self.clearing[i];
            let (Some(&key), Some(p)) = (self.products.keys().get(slot), self.products.get(slot)) else {
                self.clearing.swap_remove(i);
                continue;
            };
            if !self.drained(key, s)? {
                i += 1;
                continue;
            }
            let others = (p.documents)().into_iter().map(|(topic, _)| topic);
            for topic in [p.descriptor_topic.clone(), p.sli_topic.clone()]
                .into_iter()
                .chain(others)
            {
                link.publish(&topic, true, Vec::new(), vec![])?;
                s.inflight.queued(Sent::Control);
            }
            info!(product = %p.id, "removed product drained: its retained descriptor, contract, catalog entry and SLI are cleared");
            let id = p.id.clone();
            self.forget(&id);
            self.clearing.swap_remove(i);
        }
        Ok(())
    }

    /// Publishes product `i`'s retained documents: the descriptor first (its PUBACK stores it as
    /// the last published contract), then the ODCS contract and the catalog entry. All of them are
    /// queued before any of the product's messages of this session.
    fn announce(&self, link: &Link, s: &mut Session, i: usize) -> Result<(), PublishError> {
        let Some(p) = self.products.get(i) else {
            return Ok(());
        };
        link.publish(&p.descriptor_topic, true, (p.descriptor)(), vec![])?;
        s.inflight.queued(Sent::Descriptor(i));
        for (topic, payload) in (p.documents)() {
            link.publish(&topic, true, payload, vec![])?;
            s.inflight.queued(Sent::Control);
        }
        Ok(())
    }

    /// Retains the AsyncAPI document, when it fits in a message.
    fn publish_asyncapi(&self, link: &Link, s: &mut Session) -> Result<(), PublishError> {
        let Some((topic, build)) = &self.asyncapi else {
            return Ok(());
        };
        let doc = build();
        if doc.is_empty() {
            let most = self.options.upstream.max_message_bytes;
            warn!(max_message_bytes = most, "the AsyncAPI document is larger than a message may be: not retained (plantmesh export asyncapi prints it)");
            return Ok(());
        }
        link.publish(topic, true, doc, vec![])?;
        s.inflight.queued(Sent::Control);
        Ok(())
    }

    /// Takes a product whose retained documents were cleared off the ledger.
    fn forget(&self, key: &str) {
        if let Some(file) = &self.ledger {
            if let Err(e) = crate::catalog::ledger::update(file, |e| {
                e.remove(key);
            }) {
                warn!(file = %file.display(), error = %e, "cannot update the ledger of retained documents");
            }
        }
    }

    /// Nothing of the product is left to deliver: nothing buffered, nothing live, nothing in flight.
    fn drained(&self, key: ProductKey, s: &Session) -> Result<bool, PublishError> {
        Ok(self.reader.last_id(key)?.is_none()
            && self.buffer.live.after(key, None, 1).0.is_empty()
            && !s.sent.keys().any(|k| k.0 == key))
    }

    fn new_session(&self) -> Session {
        Session {
            inflight: Inflight::default(),
            sent: HashMap::new(),
            gaps_sent: HashSet::new(),
            cursors: HashMap::new(),
            tokens: 0.0,
            last_refill: Instant::now(),
            sp: SpSession::default(),
            verdicts: HashMap::new(),
            merging: HashMap::new(),
            ready: visits::Visits::default(),
            backlogged: visits::Visits::default(),
        }
    }

    fn on_connect(&self, link: &Link, s: &mut Session) -> Result<(), PublishError> {
        link.publish(&self.status_topic, true, self.online.clone(), vec![])?;
        s.inflight.queued(Sent::Control);
        self.publish_asyncapi(link, s)?;
        if let Some(b) = &self.uns {
            b.resend();
        }
        for i in 0..self.products.len() {
            if self.retired.get(i).copied().unwrap_or(false) {
                continue; // still retained at the broker until it is cleared
            }
            self.announce(link, s, i)?;
        }
        let mut products: Vec<ProductKey> = self.products.keys().to_vec();
        let announced: HashSet<ProductKey> = products.iter().copied().collect();
        for p in self.reader.products()? {
            if !announced.contains(&p) {
                products.push(p);
            }
        }
        for p in products {
            let end = self.reader.last_id(p)?;
            s.track(
                p,
                Cursor {
                    live_after: end,
                    backlog_after: None,
                    backlog_end: end,
                },
            );
            // What was written while the upstream was down becomes large messages before its first
            // send; the product's backlog waits for that (live data does not). A product with
            // nothing buffered has nothing to merge.
            if end.is_some() {
                let token = s.merge_token(p);
                self.buffer.merge_backlog(p, end, token);
            }
        }
        Ok(())
    }

    /// Keeps a message locally instead of sending it: dead-lettered with a gap event for `reason`.
    fn refuse(&self, acked: &mut HashMap<Key, u64>, key: Key, reason: GapReason) {
        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        self.buffer.dead_letter(key.0, key.1, reason);
        acked.insert(key, self.buffer.stats.generation.load(Ordering::Relaxed));
    }

    /// True when `m` was governed at least as strictly as today's rules govern its product: under
    /// today's treatment, or under one kept in the buffer that covers it. A message of unknown or
    /// unreadable treatment, or of a product not in the config, is not (fail closed).
    fn governed_now(
        &self,
        verdicts: &mut HashMap<(ProductKey, u64), bool>,
        m: &StoredMessage,
    ) -> Result<bool, PublishError> {
        let Some(now) = self.products.index(m.product).and_then(|i| self.products.get(i)) else {
            return Ok(false);
        };
        if m.governance == now.governance {
            return Ok(true);
        }
        if let Some(&v) = verdicts.get(&(m.product, m.governance)) {
            return Ok(v);
        }
        let then = self.reader.treatment(m.product, m.governance)?;
        let verdict = then.is_some_and(|t| t.covers(&(now.treatment)()));
        if !verdict {
            warn!(product = %m.name, "governance of this product is stricter now than when some of its buffered messages were written: those are dead-lettered (gap reason governance_changed)");
        }
        verdicts.insert((m.product, m.governance), verdict);
        Ok(verdict)
    }

    /// Queues as much as the window allows: gap events, then live messages, then backlog under its rate.
    fn fill(
        &self,
        link: &Link,
        s: &mut Session,
        acked: &mut HashMap<Key, u64>,
        acked_gaps: &HashMap<u64, u64>,
    ) -> Result<(), PublishError> {
        let window = usize::from(self.options.upstream.max_inflight);
        let now = Instant::now();
        // The backlog's byte budget, when the uplink is capped: refilled at the cap, at most one
        // second's (or one message's) worth saved up.
        if let Some(cap) = self.options.upstream.backlog_bytes_per_second {
            let cap = cap as f64;
            let most = cap.max(self.options.upstream.max_message_bytes as f64);
            s.tokens = (s.tokens + now.duration_since(s.last_refill).as_secs_f64() * cap).min(most);
        }
        s.last_refill = now;
        if s.busy() >= window {
            return Ok(());
        }
        let gaps = if self.buffer.stats.pending_gaps.load(Ordering::Relaxed) > 0 {
            self.reader.gaps(window)?
        } else {
            Vec::new()
        };
        for (id, g) in gaps {
            if s.busy() >= window {
                return Ok(());
            }
            if s.gaps_sent.contains(&id) || acked_gaps.contains_key(&id) {
                continue;
            }
            let (payload, product) = envelope::gap_payload(&g, &self.agent_id);
            if link
                .publish(&g.topic, false, payload, vec![("product".into(), product)])
                .is_err()
            {
                return Ok(());
            }
            s.inflight.queued(Sent::Gap(id));
            s.gaps_sent.insert(id);
        }
        if self.sparkplug.is_some() && !s.sp.born {
            // No data before the births (or while the primary host is offline): it stays buffered.
            return Ok(());
        }
        for p in self.buffer.live.take_fresh() {
            s.ready.mark(p);
        }
        for historical in [false, true] {
            if historical {
                // The UNS view between the two: after live messages, never in the quarter of
                // the window kept for them; each cell only its newest value.
                self.send_uns(link, s, window - window / 4)?;
            }
            // Only products with something to send: new live messages, or backlog not yet sent,
            // each visited once per fill at most, in turn (`visits.rs`): a fill costs what it
            // sends, not the number of products.
            // Live first: the backlog leaves a quarter of the window to live messages, so one that
            // arrives mid-drain is sent at once rather than after an acknowledgement.
            let limit = if historical { window - window / 4 } else { window };
            let capped = self.options.upstream.backlog_bytes_per_second.is_some();
            // Passes while the window has room and the last pass sent something: each pass gives
            // every queued product its share of the room.
            let mut pass = true;
            while std::mem::take(&mut pass) && s.busy() < limit {
                let before = s.busy();
                let queued = if historical { s.backlogged.len() } else { s.ready.len() };
                let share = (limit.saturating_sub(s.busy()) / queued.max(1)).max(1);
                for _ in 0..queued {
                    if s.busy() >= limit || (historical && capped && s.tokens <= 0.0) {
                        break;
                    }
                    let Some(name) = s.visits(historical).next() else { break };
                    let budget = limit.saturating_sub(s.busy()).min(share);
                    let Some(&c) = s.cursors.get(&name) else {
                        // Not (yet) in this session: its cursor, when made, marks it again.
                        s.visits(historical).leave(name);
                        continue;
                    };
                    let (after, end) = if historical {
                        (c.backlog_after, c.backlog_end)
                    } else {
                        (c.live_after, None)
                    };
                    if historical && end.is_none() {
                        s.visits(historical).leave(name);
                        continue;
                    }
                    if historical {
                        if let Some(&token) = s.merging.get(&name) {
                            let merged = self
                                .buffer
                                .stats
                                .merged
                                .lock()
                                .is_ok_and(|m| m.get(&name) >= Some(&token));
                            if !merged {
                                s.visits(historical).back(name);
                                continue;
                            }
                            s.merging.remove(&name);
                        }
                    }
                    let msgs = self.read(name, after, budget, historical)?;
                    if historical && msgs.first().is_none_or(|m| Some(m.id) > end) {
                        // Backlog fully sent (what is left of it was acknowledged meanwhile).
                        s.visits(historical).leave(name);
                        if let Some(c) = s.cursors.get_mut(&name) {
                            c.backlog_end = None;
                        }
                        continue;
                    }
                    if msgs.len() < budget && !historical {
                        // All there is now: visited again when the writer stages more.
                        s.visits(historical).leave(name);
                    } else {
                        s.visits(historical).back(name);
                    }
                    for m in msgs {
                        if historical && Some(m.id) > end {
                            break;
                        }
                        let key = (m.product, m.id);
                        if let Some(cursor) = s.cursors.get_mut(&name) {
                            // A merged message stands for its seqs up to `last_seq`.
                            let through = MessageId {
                                epoch: m.id.epoch,
                                seq: m.last_seq,
                            };
                            if historical {
                                cursor.backlog_after = Some(through);
                            } else {
                                cursor.live_after = Some(through);
                            }
                        }
                        if acked.contains_key(&key) || s.sent.contains_key(&key) {
                            continue;
                        }
                        if !self.egress.allows(&m.name, &m.topic) {
                            // Fail closed: a message buffered under an older config (a product since
                            // removed, a topic no longer allowed) is kept locally, never sent.
                            warn!(product = %m.name, topic = %m.topic, epoch = m.id.epoch, seq = m.id.seq,
                          "egress denied just before publishing; dead-lettered locally");
                            self.refuse(acked, key, GapReason::EgressDenied);
                            continue;
                        }
                        if !self.governed_now(&mut s.verdicts, &m)? {
                            tracing::debug!(product = %m.name, epoch = m.id.epoch, seq = m.id.seq,
                          "buffered under governance weaker than today's; dead-lettered locally");
                            self.refuse(acked, key, GapReason::GovernanceChanged);
                            continue;
                        }
                        if let Some(sp) = &self.sparkplug {
                            let e = &sp.encoder;
                            let topic = e.topic(crate::sparkplug::Kind::DData, Some(&m.name));
                            if !self.egress.allows(&m.name, &topic) {
                                warn!(product = %m.name, topic = %topic, "egress denied just before publishing; dead-lettered locally");
                                self.refuse(acked, key, GapReason::EgressDenied);
                                continue;
                            }
                            let seq = s.sp.next_seq();
                            let payload = match e.ddata(&m.name, &m.body, seq, historical) {
                                Ok(p) => p,
                                Err(why) => {
                                    error!(product = %m.name, epoch = m.id.epoch, seq = m.id.seq, error = %why, "cannot encode as Sparkplug; dead-lettered locally");
                                    self.refuse(acked, key, GapReason::SparkplugEncoding);
                                    continue;
                                }
                            };
                            let payload_len = payload.len();
                            link.publish_at_most_once(&topic, payload)?;
                            s.inflight.queued(Sent::Control);
                            s.sp.pending.push(key);
                            s.sent.insert(key, (m.records, m.created, historical));
                            if historical && capped {
                                s.tokens -= payload_len as f64;
                            }
                            continue;
                        }
                        let payload = envelope::encode_message(&m, &self.agent_id, historical);
                        let announced = self.products.index(m.product).and_then(|i| self.products.get(i));
                        let mut props = vec![
                            (
                                "product".to_string(),
                                crate::config::split_product_key(&m.name).0.to_string(),
                            ),
                            ("version".to_string(), m.version.clone()),
                            ("epoch".to_string(), m.id.epoch.to_string()),
                            ("seq".to_string(), m.id.seq.to_string()),
                            ("last_seq".to_string(), m.last_seq.to_string()),
                            ("historical".to_string(), historical.to_string()),
                        ];
                        // A product no longer in the config (its backlog draining) has no URN here.
                        if let Some(p) = announced {
                            props.push(("urn".to_string(), p.urn.to_string()));
                        }
                        let qos = announced.map_or(crate::config::Qos::AtLeastOnce, |p| p.qos);
                        let payload_len = payload.len();
                        link.publish_qos(&m.topic, qos, false, payload, props)?;
                        s.inflight.queued(Sent::Message(key));
                        s.sent.insert(key, (m.records, m.created, historical));
                        if historical && capped {
                            s.tokens -= payload_len as f64;
                        }
                    }
                }
                pass = s.busy() > before;
            }
        }
        self.barrier(link, s)?;
        Ok(())
    }

    /// Sends pending UNS values while fewer than `limit` messages are unconfirmed: retained, at
    /// QoS 1 (the window counts them; their PUBACK only frees room).
    fn send_uns(&self, link: &Link, s: &mut Session, limit: usize) -> Result<(), PublishError> {
        let Some(board) = &self.uns else { return Ok(()) };
        while s.busy() < limit {
            let updates = board.take(limit - s.busy());
            if updates.is_empty() {
                break;
            }
            for u in updates {
                link.publish(&u.topic, true, u.payload, vec![])?;
                s.inflight.queued(Sent::Control);
                self.stats.uns_sent.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Up to `limit` messages of `product` after `after`: the backlog from redb; live messages
    /// from redb as far as they were committed in this run, then those still staged in memory.
    fn read(
        &self,
        product: ProductKey,
        after: Option<MessageId>,
        limit: usize,
        historical: bool,
    ) -> Result<Vec<Arc<StoredMessage>>, PublishError> {
        let (staged, committed) = if historical {
            (Vec::new(), true)
        } else {
            self.buffer.live.after(product, after, limit)
        };
        let mut msgs: Vec<Arc<StoredMessage>> = if committed {
            self.reader
                .read_after(product, after, limit)?
                .into_iter()
                .map(Arc::new)
                .collect()
        } else {
            Vec::new()
        };
        let last = msgs.last().map(|m| m.id).or(after);
        let room = limit.saturating_sub(msgs.len());
        msgs.extend(staged.into_iter().filter(|m| Some(m.id) > last).take(room));
        Ok(msgs)
    }

    /// Sends a delivery barrier for the Sparkplug messages written since the last one.
    fn barrier(&self, link: &Link, s: &mut Session) -> Result<(), PublishError> {
        if let (Some(sp), false) = (&self.sparkplug, s.sp.pending.is_empty()) {
            link.unsubscribe(&barrier_topic(&sp.encoder))?;
            let keys = std::mem::take(&mut s.sp.pending);
            s.sp.barriers.push_back(keys);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Egress;

    #[test]
    fn egress_allows_configured_products_and_their_pre_major_keys_only() {
        let e = Egress {
            topic_prefixes: vec!["plant/".into()],
            products: ["press.v1".to_string()].into_iter().collect(),
        };
        assert!(e.allows("press.v1", "plant/press/v1"));
        assert!(e.allows("press", "plant/press/v1"), "buffered before keys had majors");
        assert!(!e.allows("press.v2", "plant/press/v2"), "a major not configured");
        assert!(!e.allows("other", "plant/other/v1"));
        assert!(!e.allows("press.v1", "elsewhere/press/v1"), "outside the allow-list");
    }
}
