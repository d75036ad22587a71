//! OPC UA source: one session per endpoint; monitored items on one subscription (or the Read service
//! at the poll interval, for servers with broken subscriptions).
//!
//! In: an OPC UA device's plan ([`config::OpcUaDevicePlan`]) and its tags. Out: [`ReadingBatch`]es, one per distinct timestamp of
//! the data changes received together; the record time is the source timestamp (or the server
//! timestamp when configured). Qualities come from the StatusCode of each value, by name.
//!
//! Recovery: the client library gets one immediate reconnect attempt (it reactivates the session
//! and transfers its subscriptions when the server is still there, e.g. after a network blip); the
//! tags are bad while the connection is down. If that attempt fails (the server restarted or is
//! gone) the session ends and this source builds a new one after a jittered backoff: namespace URIs
//! resolved again (indexes change between server restarts), subscriptions and every monitored item
//! created again. A NodeId the server does not know makes that one tag bad.
//!
//! Security: the application instance certificate is created on first start under
//! `<data_dir>/pki` (one per agent) with the agent's ApplicationUri. Server certificates are never trusted
//! automatically: an unknown one is stored in `rejected/` and the log gives the `mv` that trusts it.

pub mod config;

use super::{DeviceStats, SourceCtx, TagPlan};
use crate::backoff::Backoff;
use crate::model::{now_millis, BadReason, Millis, Quality, Reading, ReadingBatch, Value};
use config::{opcua, Deadband, OpcUaDevicePlan, OpcUaIdentity, OpcUaSecurityMode};
use opcua::client::{
    Client, ClientBuilder, IdentityToken, MonitoredItemMap, OnSubscriptionNotificationCore, Password, Session,
    SessionPollResult,
};
use opcua::crypto::{CertificateStore, SecurityPolicy};
use opcua::types::{
    DataChangeFilter, DataChangeNotification, DataChangeTrigger, DataValue, DeadbandType, ExtensionObject,
    MessageSecurityMode, MonitoredItemCreateRequest, MonitoringMode, MonitoringParameters, NodeId, NotificationMessage,
    ReadValueId, StatusCode, TimestampsToReturn, UserTokenPolicy, VariableId, Variant,
};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

pub struct OpcUaSource {
    pub ctx: SourceCtx,
    pub plan: OpcUaDevicePlan,
    /// This device's PKI directory (own certificate, trusted/, rejected/).
    pub pki_dir: PathBuf,
    /// The ApplicationUri of this agent's certificate.
    pub application_uri: String,
}

/// How the session's event-loop task ended, for logs.
fn lost(status: Result<StatusCode, tokio::task::JoinError>) -> String {
    format!(
        "connection lost: {}",
        status.map_or_else(|e| e.to_string(), |s| s.to_string())
    )
}

/// Forwards each notification message of a subscription whole: the data changes of one Publish
/// response, by client handle.
struct Notifications(mpsc::UnboundedSender<Vec<(u32, DataValue)>>);

impl OnSubscriptionNotificationCore for Notifications {
    fn on_subscription_notification(&mut self, notification: NotificationMessage, _items: MonitoredItemMap<'_>) {
        let mut changes = Vec::new();
        for obj in notification.notification_data.into_iter().flatten() {
            if let Some(dc) = obj.into_inner_as::<DataChangeNotification>() {
                changes.extend(
                    dc.monitored_items
                        .into_iter()
                        .flatten()
                        .map(|n| (n.client_handle, n.value)),
                );
            }
        }
        if !changes.is_empty() {
            let _ = self.0.send(changes);
        }
    }
}

/// Most monitored items on one subscription.
const ITEMS_PER_SUBSCRIPTION: usize = 1000;

/// How a session ended.
enum Ended {
    Shutdown,
    Lost(String),
}

impl OpcUaSource {
    pub async fn run(mut self) {
        let o = self.plan.clone();
        if o.security_mode == OpcUaSecurityMode::None {
            warn!(device = %self.ctx.id, endpoint = %o.endpoint,
                  "OPC UA security is None: traffic to this server is neither signed nor encrypted");
        }
        if o.insecure_credentials {
            warn!(device = %self.ctx.id, endpoint = %o.endpoint,
                  "the user identity goes to this server unencrypted (allow_insecure_credentials = true)");
        }
        let mut client = match build_client(&self.ctx.id, &o, &self.pki_dir, &self.application_uri) {
            Ok(c) => c,
            Err(e) => {
                error!(device = %self.ctx.id, error = %e, "cannot set up the OPC UA client");
                let _ = self.emit_all_bad(BadReason::Disconnected).await;
                return;
            }
        };
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut known_rejected = rejected_files(&self.pki_dir);
        loop {
            if *self.ctx.shutdown.borrow() {
                return;
            }
            let ended = self.session(&mut client, &o, &mut backoff).await;
            self.ctx.stats.connected.store(0, std::sync::atomic::Ordering::Relaxed);
            let why = match ended {
                Ended::Shutdown => return,
                Ended::Lost(why) => why,
            };
            // A server certificate we do not trust lands in rejected/: say exactly how to trust it.
            for file in rejected_files(&self.pki_dir).difference(&known_rejected) {
                let trusted = self.pki_dir.join("trusted");
                error!(device = %self.ctx.id, endpoint = %o.endpoint, certificate = %file,
                    "the server's certificate is not trusted; after checking it, trust it with: mv '{}' '{}/'",
                    self.pki_dir.join("rejected").join(file).display(), trusted.display());
            }
            known_rejected = rejected_files(&self.pki_dir);
            DeviceStats::inc(&self.ctx.stats.reconnects);
            let wait = backoff.next_delay();
            warn!(device = %self.ctx.id, endpoint = %o.endpoint, reason = %why, retry_in = ?wait, attempt = backoff.attempt(),
                  "OPC UA session ended");
            if !self.emit_all_bad(BadReason::Disconnected).await {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.ctx.shutdown.changed() => return,
            }
        }
    }

    async fn session(&mut self, client: &mut Client, o: &OpcUaDevicePlan, backoff: &mut Backoff) -> Ended {
        let Some(policy) = security_policy(&o.security_policy) else {
            return Ended::Lost(format!("unsupported security policy {}", o.security_policy));
        };
        let mode = mode_of(o.security_mode);
        let identity = match identity_token(&o.identity) {
            Ok(i) => i,
            Err(e) => return Ended::Lost(e),
        };
        let endpoint = (o.endpoint.as_str(), policy.to_str(), mode, UserTokenPolicy::anonymous());
        let connect = client.connect_to_matching_endpoint(endpoint, identity);
        let (session, event_loop) = match tokio::time::timeout(self.plan.timeout * 2, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Ended::Lost(connect_failure(client, o, &e.to_string(), Selector::Config).await),
            Err(_) => {
                return Ended::Lost(format!(
                    "no answer from {} within {:?}",
                    o.endpoint,
                    self.plan.timeout * 2
                ))
            }
        };
        // Drive the session's event loop ourselves: a lost connection the library recovers by itself
        // (server still reachable: the session is reactivated and its subscriptions transferred) is
        // reported here, so the tags go bad while it lasts; a failed reconnect ends the task, and
        // then this source builds a new session.
        let (events_tx, mut events) = mpsc::unbounded_channel::<SessionPollResult>();
        let mut handle = tokio::spawn(async move {
            use futures::TryStreamExt;
            let stream = event_loop.enter();
            tokio::pin!(stream);
            loop {
                match stream.try_next().await {
                    Ok(Some(ev @ (SessionPollResult::ConnectionLost(_) | SessionPollResult::Reconnected(_)))) => {
                        let _ = events_tx.send(ev);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break StatusCode::Good,
                    Err(e) => break e,
                }
            }
        });
        let connected = tokio::select! {
            ok = session.wait_for_connection() => ok,
            status = &mut handle => return Ended::Lost(format!("connection failed: {}", status.map_or_else(|e| e.to_string(), |s| s.to_string()))),
            _ = self.ctx.shutdown.changed() => { handle.abort(); return Ended::Shutdown; }
        };
        if !connected {
            let status = handle.await.map_or_else(|e| e.to_string(), |s| s.to_string());
            return Ended::Lost(format!("connection failed: {status}"));
        }
        backoff.reset();
        self.ctx.stats.connected.store(1, std::sync::atomic::Ordering::Relaxed);
        info!(device = %self.ctx.id, endpoint = %o.endpoint, policy = %o.security_policy, mode = ?o.security_mode, "OPC UA session active");

        let result = self.serve(&session, o, &mut handle, &mut events).await;
        // Close the session on the server (best effort) so nothing is left behind there.
        if !handle.is_finished() {
            let _ = tokio::time::timeout(Duration::from_secs(2), session.disconnect()).await;
        }
        handle.abort();
        result
    }

    /// Runs subscriptions (or polling) on an active session until it ends.
    async fn serve(
        &mut self,
        session: &Arc<Session>,
        o: &OpcUaDevicePlan,
        handle: &mut tokio::task::JoinHandle<StatusCode>,
        events: &mut mpsc::UnboundedReceiver<SessionPollResult>,
    ) -> Ended {
        let nodes = match self.resolve(session).await {
            Ok(n) => n,
            Err(e) => return Ended::Lost(e),
        };
        // Tags whose NodeId cannot be resolved are bad from the start; the rest are monitored.
        let mut bad: Vec<Reading> = Vec::new();
        let mut monitored: Vec<(usize, NodeId)> = Vec::new();
        for (tag, node) in nodes {
            match node {
                Ok(n) => monitored.push((tag, n)),
                Err(status) => bad.push(Reading {
                    tag,
                    value: None,
                    quality: Quality::Bad(BadReason::OpcUa(status.bits())),
                }),
            }
        }
        let ts = if o.server_timestamp {
            TimestampsToReturn::Server
        } else {
            TimestampsToReturn::Both
        };
        if o.polling {
            if !self.send_bad(bad).await {
                return Ended::Shutdown;
            }
            return self.poll(session, o, &monitored, ts, handle, events).await;
        }

        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<(u32, DataValue)>>();
        // At most ITEMS_PER_SUBSCRIPTION monitored items per subscription: servers bound the
        // notifications queued per subscription and clients keep a few Publish requests in flight
        // per subscription, so large tag sets are spread over several.
        let mut subscriptions = Vec::new();
        let mut created = 0usize;
        for group in monitored.chunks(ITEMS_PER_SUBSCRIPTION) {
            let callback = Notifications(tx.clone());
            let subscription = match session
                .create_subscription(o.publishing_interval, 60, 10, 0, 0, true, callback)
                .await
            {
                Ok(id) => id,
                Err(e) => return Ended::Lost(format!("CreateSubscription failed: {e}")),
            };
            subscriptions.push(subscription);
            let requests: Vec<MonitoredItemCreateRequest> = group
                .iter()
                .filter_map(|(tag, node)| self.monitored_item(*tag, node))
                .collect();
            match session.create_monitored_items(subscription, ts, requests).await {
                Ok(results) => {
                    for r in results {
                        let tag = r.requested_parameters.client_handle as usize - 1;
                        if r.result.status_code.is_bad() {
                            warn!(device = %self.ctx.id, tag = %self.ctx.tags[tag].name, node = %r.item_to_monitor.node_id,
                                  status = %r.result.status_code, "monitored item refused; the tag is bad");
                            bad.push(Reading {
                                tag,
                                value: None,
                                quality: Quality::Bad(BadReason::OpcUa(r.result.status_code.bits())),
                            });
                        } else {
                            created += 1;
                        }
                    }
                }
                Err(e) => return Ended::Lost(format!("CreateMonitoredItems failed: {e}")),
            }
        }
        drop(tx);
        info!(device = %self.ctx.id, subscriptions = ?subscriptions, monitored_items = created, bad_tags = bad.len(), "OPC UA subscription created");
        if !self.send_bad(bad).await {
            return Ended::Shutdown;
        }
        loop {
            tokio::select! {
                message = rx.recv() => {
                    let Some(message) = message else { return Ended::Lost("subscription callback closed".into()) };
                    // Servers spread one sampling instant over several Publish responses (and several
                    // subscriptions): collect briefly, then group by timestamp, so a product gets one record
                    // per change instant of its device rather than one per fragment.
                    let mut changes = message;
                    let window = (o.publishing_interval / 4).min(Duration::from_millis(25));
                    let until = tokio::time::Instant::now() + window;
                    while changes.len() < 200_000 {
                        match tokio::time::timeout_at(until, rx.recv()).await {
                            Ok(Some(more)) => changes.extend(more),
                            _ => break,
                        }
                    }
                    DeviceStats::inc(&self.ctx.stats.polls);
                    let mut readings: Vec<(Millis, Reading)> = changes
                        .iter()
                        .filter_map(|(h, dv)| {
                            let tag = (*h as usize).checked_sub(1)?;
                            self.ctx.tags.get(tag).map(|t| reading(tag, t, dv, o.server_timestamp))
                        })
                        .collect();
                    // Stable: each tag's values keep their order.
                    readings.sort_by_key(|(ts, _)| *ts);
                    for batch in group_by_time(self.ctx.index, readings) {
                        if !self.send(batch).await {
                            return Ended::Shutdown;
                        }
                    }
                }
                status = &mut *handle => {
                    return Ended::Lost(lost(status));
                }
                Some(ev) = events.recv() => {
                    if !self.on_session_event(ev).await {
                        return Ended::Shutdown;
                    }
                }
                _ = self.ctx.shutdown.changed() => return Ended::Shutdown,
            }
        }
    }

    /// Connection lost and recovered by the client library itself (see `session`).
    async fn on_session_event(&mut self, ev: SessionPollResult) -> bool {
        match ev {
            SessionPollResult::ConnectionLost(status) => {
                warn!(device = %self.ctx.id, %status, "OPC UA connection lost; reconnecting");
                self.ctx.stats.connected.store(0, std::sync::atomic::Ordering::Relaxed);
                DeviceStats::inc(&self.ctx.stats.reconnects);
                self.emit_all_bad(BadReason::Disconnected).await
            }
            SessionPollResult::Reconnected(mode) => {
                info!(device = %self.ctx.id, ?mode, "OPC UA session recovered");
                self.ctx.stats.connected.store(1, std::sync::atomic::Ordering::Relaxed);
                true
            }
            _ => true,
        }
    }

    async fn poll(
        &mut self,
        session: &Arc<Session>,
        o: &OpcUaDevicePlan,
        monitored: &[(usize, NodeId)],
        ts: TimestampsToReturn,
        handle: &mut tokio::task::JoinHandle<StatusCode>,
        events: &mut mpsc::UnboundedReceiver<SessionPollResult>,
    ) -> Ended {
        let read_ids: Vec<ReadValueId> = monitored.iter().map(|(_, n)| ReadValueId::from(n.clone())).collect();
        let mut ticker = tokio::time::interval(self.plan.poll_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                status = &mut *handle => {
                    return Ended::Lost(lost(status));
                }
                Some(ev) = events.recv() => {
                    if !self.on_session_event(ev).await {
                        return Ended::Shutdown;
                    }
                    continue;
                }
                _ = self.ctx.shutdown.changed() => return Ended::Shutdown,
            }
            DeviceStats::inc(&self.ctx.stats.polls);
            let mut readings = Vec::with_capacity(read_ids.len());
            for (chunk_ids, chunk_tags) in read_ids.chunks(1000).zip(monitored.chunks(1000)) {
                DeviceStats::inc(&self.ctx.stats.requests);
                match tokio::time::timeout(self.plan.timeout, session.read(chunk_ids, ts, 0.0)).await {
                    Ok(Ok(values)) => {
                        for ((tag, _), dv) in chunk_tags.iter().zip(values) {
                            readings.push(reading(*tag, &self.ctx.tags[*tag], &dv, o.server_timestamp));
                        }
                    }
                    Ok(Err(e)) => return Ended::Lost(format!("Read failed: {e}")),
                    Err(_) => return Ended::Lost(format!("Read timed out after {:?}", self.plan.timeout)),
                }
            }
            for batch in group_by_time(self.ctx.index, readings) {
                if !self.send(batch).await {
                    return Ended::Shutdown;
                }
            }
        }
    }

    /// Resolves every tag's NodeId, looking namespace URIs up in the server's NamespaceArray.
    async fn resolve(&self, session: &Arc<Session>) -> Result<Vec<(usize, Result<NodeId, StatusCode>)>, String> {
        let needs_uris = self
            .ctx
            .device_tags
            .iter()
            .any(|&t| opcua(&self.ctx.tags[t]).is_some_and(|o| o.namespace_uri.is_some()));
        let namespaces: Vec<String> = if needs_uris {
            let id = ReadValueId::from(NodeId::from(VariableId::Server_NamespaceArray));
            let values = session
                .read(&[id], TimestampsToReturn::Neither, 0.0)
                .await
                .map_err(|e| format!("reading the NamespaceArray failed: {e}"))?;
            match values.first().and_then(|v| v.value.clone()) {
                Some(Variant::Array(a)) => a
                    .values
                    .iter()
                    .map(|v| match v {
                        Variant::String(s) => s.as_ref().to_string(),
                        _ => String::new(),
                    })
                    .collect(),
                _ => return Err("the server returned no NamespaceArray".into()),
            }
        } else {
            Vec::new()
        };
        Ok(self
            .ctx
            .device_tags
            .iter()
            .filter_map(|&t| {
                let o = opcua(&self.ctx.tags[t])?;
                let text = match &o.namespace_uri {
                    None => Ok(o.node_id.clone()),
                    Some(uri) => match namespaces.iter().position(|n| n == uri) {
                        Some(i) => Ok(format!("ns={i};{}", o.node_id)),
                        None => {
                            warn!(device = %self.ctx.id, tag = %self.ctx.tags[t].name, namespace_uri = %uri, "the server has no such namespace; the tag is bad");
                            Err(StatusCode::BadNodeIdUnknown)
                        }
                    },
                };
                Some((t, text.and_then(|s| s.parse::<NodeId>().map_err(|_| StatusCode::BadNodeIdInvalid))))
            })
            .collect())
    }

    fn monitored_item(&self, tag: usize, node: &NodeId) -> Option<MonitoredItemCreateRequest> {
        let o = opcua(&self.ctx.tags[tag])?;
        let filter = match o.deadband {
            None => ExtensionObject::null(),
            Some(d) => {
                let (kind, value) = match d {
                    Deadband::Absolute(v) => (DeadbandType::Absolute, v),
                    Deadband::Percent(v) => (DeadbandType::Percent, v),
                };
                ExtensionObject::from_message(DataChangeFilter {
                    trigger: DataChangeTrigger::StatusValue,
                    deadband_type: kind as u32,
                    deadband_value: value,
                })
            }
        };
        Some(MonitoredItemCreateRequest {
            item_to_monitor: ReadValueId::from(node.clone()),
            monitoring_mode: MonitoringMode::Reporting,
            requested_parameters: MonitoringParameters {
                // Handle 0 means "assign one" to the client library: tags are numbered from 1.
                client_handle: tag as u32 + 1,
                sampling_interval: o.sampling_interval.as_secs_f64() * 1000.0,
                filter,
                queue_size: o.queue_size,
                discard_oldest: true,
            },
        })
    }

    async fn send(&self, batch: ReadingBatch) -> bool {
        self.ctx.out.send(batch).await.is_ok()
    }

    /// Reports the tags that could not be monitored or resolved (nothing to send: true).
    async fn send_bad(&self, readings: Vec<Reading>) -> bool {
        readings.is_empty()
            || self
                .send(ReadingBatch {
                    device: self.ctx.index,
                    ts: now_millis(),
                    readings,
                })
                .await
    }

    async fn emit_all_bad(&self, reason: BadReason) -> bool {
        self.send(super::all_bad(self.ctx.index, &self.ctx.device_tags, reason))
            .await
    }
}

/// The OPC UA client for one device: its own PKI directory, no automatic reconnects (see module docs).
pub fn build_client(
    device_id: &str,
    o: &OpcUaDevicePlan,
    pki_dir: &std::path::Path,
    application_uri: &str,
) -> Result<Client, String> {
    // Devices share the agent's application instance certificate: the first client creates it, the
    // others must not race it.
    static CREATE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = CREATE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    std::fs::create_dir_all(pki_dir).map_err(|e| format!("cannot create {}: {e}", pki_dir.display()))?;
    ClientBuilder::new()
        .application_name("plantmesh")
        .application_uri(application_uri)
        .product_uri("urn:plantmesh")
        .create_sample_keypair(true)
        .pki_dir(pki_dir)
        .trust_server_certs(false)
        .verify_server_certs(true)
        .session_retry_limit(0)
        .session_timeout(60_000)
        .session_name(format!("plantmesh {device_id}"))
        .request_timeout(o.timeout)
        // A publish response carries up to queue_size notifications per monitored item of a
        // subscription: the default decoding limit (1,000 array elements) is far too small.
        .max_array_length(1_000_000)
        .max_message_size(256 << 20)
        .max_chunk_count(0)
        .publish_timeout(o.publishing_interval * 4 + o.timeout)
        .client()
        .map_err(|e| e.join("; "))
}

/// The policy named as in the OPC UA specification (config uses those names; the client library
/// spells some with dashes).
pub fn security_policy(name: &str) -> Option<SecurityPolicy> {
    Some(match name {
        "None" => SecurityPolicy::None,
        "Aes256_Sha256_RsaPss" => SecurityPolicy::Aes256Sha256RsaPss,
        "Aes128_Sha256_RsaOaep" => SecurityPolicy::Aes128Sha256RsaOaep,
        "Basic256Sha256" => SecurityPolicy::Basic256Sha256,
        _ => return None,
    })
}

/// How an endpoint is chosen: in a device's section of agent.toml, or with `plantmesh discover`'s
/// flags. Messages about a missing endpoint say which to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selector {
    Config,
    Flags,
}

/// The config name of a policy (the inverse of [`security_policy`]).
fn policy_name(p: SecurityPolicy) -> &'static str {
    match p {
        SecurityPolicy::None => "None",
        SecurityPolicy::Aes256Sha256RsaPss => "Aes256_Sha256_RsaPss",
        SecurityPolicy::Aes128Sha256RsaOaep => "Aes128_Sha256_RsaOaep",
        SecurityPolicy::Basic256Sha256 => "Basic256Sha256",
        other => other.to_str(),
    }
}

fn mode_name(m: MessageSecurityMode) -> &'static str {
    match m {
        MessageSecurityMode::None => "None",
        MessageSecurityMode::Sign => "Sign",
        MessageSecurityMode::SignAndEncrypt => "SignAndEncrypt",
        _ => "Invalid",
    }
}

/// What a failed connect to `o`'s endpoint means and what to do about it. The server is asked
/// once more, for its endpoints: when that fails too, the server cannot be reached (a refused
/// connection says so, not "no matching endpoint"); when it answers, the endpoints it offers are
/// listed with the settings that select one. `error` is what the connect reported.
pub async fn connect_failure(client: &Client, o: &OpcUaDevicePlan, error: &str, how: Selector) -> String {
    let asked = format!("{} / {}", o.security_policy, mode_name(mode_of(o.security_mode)));
    let ask = client.get_server_endpoints_from_url(o.endpoint.as_str());
    let offered = match tokio::time::timeout(Duration::from_secs(10), ask).await {
        Err(_) => {
            return format!(
                "no answer from {} within 10s: is it the server's address and port?",
                o.endpoint
            )
        }
        Ok(Err(e)) => return unreachable(&o.endpoint, &format!("{e}; {error}")),
        Ok(Ok(offered)) => offered,
    };
    let wanted = security_policy(&o.security_policy);
    let matching = offered.iter().any(|ep| {
        Some(SecurityPolicy::from_uri(ep.security_policy_uri.as_ref())) == wanted
            && ep.security_mode == mode_of(o.security_mode)
    });
    if matching || offered.is_empty() {
        return format!("cannot connect to {} ({asked}): {error}", o.endpoint);
    }
    let mut list: Vec<(&'static str, &'static str)> = offered
        .iter()
        .map(|ep| {
            (
                policy_name(SecurityPolicy::from_uri(ep.security_policy_uri.as_ref())),
                mode_name(ep.security_mode),
            )
        })
        .collect();
    list.sort_unstable();
    list.dedup();
    let shown: Vec<String> = list.iter().map(|(p, m)| format!("{p} / {m}")).collect();
    let (p, m) = list.iter().find(|(p, _)| *p != "None").copied().unwrap_or(list[0]);
    let select = match how {
        Selector::Flags => format!("--security-policy {p} --security-mode {m}"),
        Selector::Config => format!("security_policy = \"{p}\" and security_mode = \"{m}\" in the device's section"),
    };
    let mut text = format!(
        "{} offers no endpoint with {asked}; it offers: {}. Select one with {select}",
        o.endpoint,
        shown.join(", ")
    );
    if p == "None" {
        text.push_str(
            " (None is neither signed nor encrypted: anyone on the network path can read and change \
             what is sent; use it only on a network nothing else reaches, and prefer enabling a \
             secure policy on the server)",
        );
    }
    text
}

fn mode_of(m: OpcUaSecurityMode) -> MessageSecurityMode {
    match m {
        OpcUaSecurityMode::None => MessageSecurityMode::None,
        OpcUaSecurityMode::Sign => MessageSecurityMode::Sign,
        OpcUaSecurityMode::SignAndEncrypt => MessageSecurityMode::SignAndEncrypt,
    }
}

/// A server that could not be reached, said plainly.
fn unreachable(endpoint: &str, error: &str) -> String {
    let lower = error.to_ascii_lowercase();
    if lower.contains("connection refused") || lower.contains("os error 111") {
        format!("cannot connect to {endpoint}: connection refused (nothing listens there: is the server running, and the port right?)")
    } else if lower.contains("failed to lookup") || lower.contains("name or service not known") {
        format!("cannot connect to {endpoint}: the host name does not resolve")
    } else {
        format!("cannot reach {endpoint}: {error}")
    }
}

pub fn identity_token(identity: &OpcUaIdentity) -> Result<IdentityToken, String> {
    Ok(match identity {
        OpcUaIdentity::Anonymous => IdentityToken::Anonymous,
        OpcUaIdentity::UserName { user, password } => IdentityToken::UserName(user.clone(), Password(password.read()?)),
        OpcUaIdentity::X509 { cert, key } => {
            let c = CertificateStore::read_cert(cert)
                .map_err(|e| format!("cannot read user certificate {}: {e}", cert.display()))?;
            let k =
                CertificateStore::read_pkey(key).map_err(|e| format!("cannot read user key {}: {e}", key.display()))?;
            IdentityToken::X509(Box::new(c), Box::new(k))
        }
    })
}

fn rejected_files(pki_dir: &std::path::Path) -> HashSet<String> {
    std::fs::read_dir(pki_dir.join("rejected"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// One data value as a reading with its time.
fn reading(tag: usize, plan: &TagPlan, dv: &DataValue, server_ts: bool) -> (Millis, Reading) {
    let when = if server_ts {
        dv.server_timestamp
    } else {
        dv.source_timestamp.or(dv.server_timestamp)
    };
    let ts = when.map_or_else(now_millis, |t| t.as_chrono().timestamp_millis().max(0) as u64);
    let status = dv.status.unwrap_or(StatusCode::Good);
    let converted = dv.value.as_ref().and_then(variant_value);
    let (value, quality) = if status.is_bad() {
        (None, Quality::Bad(BadReason::OpcUa(status.bits())))
    } else {
        match converted {
            None if dv.value.is_none() || matches!(dv.value, Some(Variant::Empty)) => {
                (None, Quality::Bad(BadReason::NoValue))
            }
            None => (None, Quality::Bad(BadReason::Decode)),
            Some(v) => {
                let (v, q) = super::modbus::decode::scale(plan, v);
                if status.is_uncertain() && q.is_good() {
                    (v, Quality::Uncertain(BadReason::OpcUa(status.bits())))
                } else {
                    (v, q)
                }
            }
        }
    };
    (ts, Reading { tag, value, quality })
}

/// A Variant as a plantmesh value: numbers as numbers, DateTime as RFC 3339, ByteString as base64.
pub fn variant_value(v: &Variant) -> Option<Value> {
    Some(match v {
        Variant::Empty => return None,
        Variant::Boolean(b) => Value::Bool(*b),
        Variant::SByte(x) => Value::Int(i64::from(*x)),
        Variant::Int16(x) => Value::Int(i64::from(*x)),
        Variant::Int32(x) => Value::Int(i64::from(*x)),
        Variant::Int64(x) => Value::Int(*x),
        Variant::Byte(x) => Value::UInt(u64::from(*x)),
        Variant::UInt16(x) => Value::UInt(u64::from(*x)),
        Variant::UInt32(x) => Value::UInt(u64::from(*x)),
        Variant::UInt64(x) => Value::UInt(*x),
        Variant::Float(x) => Value::Float(f64::from(*x)),
        Variant::Double(x) => Value::Float(*x),
        Variant::String(s) => Value::Text(s.as_ref().to_string()),
        Variant::DateTime(d) => Value::Text(crate::model::format_rfc3339_millis(
            d.as_chrono().timestamp_millis().max(0) as u64,
        )),
        Variant::Guid(g) => Value::Text(g.to_string()),
        Variant::ByteString(b) => Value::Text(b.as_base64()),
        Variant::StatusCode(s) => Value::UInt(u64::from(s.bits())),
        Variant::LocalizedText(t) => Value::Text(t.text.as_ref().to_string()),
        Variant::QualifiedName(q) => Value::Text(q.name.as_ref().to_string()),
        Variant::NodeId(n) => Value::Text(n.to_string()),
        Variant::Array(a) => Value::Array(a.values.iter().filter_map(variant_value).collect()),
        _ => return None,
    })
}

/// Consecutive readings with the same time form one batch.
fn group_by_time(device: usize, readings: Vec<(Millis, Reading)>) -> Vec<ReadingBatch> {
    let mut out: Vec<ReadingBatch> = Vec::new();
    for (ts, r) in readings {
        match out.last_mut() {
            Some(b) if b.ts == ts => b.readings.push(r),
            _ => out.push(ReadingBatch {
                device,
                ts,
                readings: vec![r],
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_configurable_policy_is_known_to_the_client_library() {
        for name in [
            "None",
            "Aes256_Sha256_RsaPss",
            "Aes128_Sha256_RsaOaep",
            "Basic256Sha256",
        ] {
            let p = security_policy(name).unwrap();
            assert_ne!(p, SecurityPolicy::Unknown);
            assert!(!p.to_str().is_empty(), "{name}");
        }
        assert!(security_policy("Basic128Rsa15").is_none());
    }

    #[test]
    fn variants_become_values() {
        assert_eq!(variant_value(&Variant::Float(1.5)), Some(Value::Float(1.5)));
        assert_eq!(variant_value(&Variant::UInt64(u64::MAX)), Some(Value::UInt(u64::MAX)));
        assert_eq!(variant_value(&Variant::SByte(-3)), Some(Value::Int(-3)));
        assert_eq!(variant_value(&Variant::from("x")), Some(Value::Text("x".into())));
        assert_eq!(
            variant_value(&Variant::ByteString(opcua::types::ByteString::from(vec![1u8, 2, 3]))),
            Some(Value::Text("AQID".into()))
        );
        assert_eq!(variant_value(&Variant::Empty), None);
        let arr = Variant::from(vec![1i32, 2, 3]);
        assert_eq!(
            variant_value(&arr),
            Some(Value::Array(vec![Value::Int(1), Value::Int(2), Value::Int(3)]))
        );
    }

    #[test]
    fn consecutive_equal_times_share_a_batch() {
        let r = |tag| Reading {
            tag,
            value: None,
            quality: Quality::Good,
        };
        let b = group_by_time(0, vec![(1, r(0)), (1, r(1)), (2, r(2)), (1, r(3))]);
        let shape: Vec<(u64, usize)> = b.iter().map(|b| (b.ts, b.readings.len())).collect();
        assert_eq!(shape, vec![(1, 2), (2, 1), (1, 1)]);
    }
}
