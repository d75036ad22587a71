//! The connection's I/O: TCP (and TLS), CONNECT, then one loop that reads the broker's packets,
//! takes the link's requests and writes whatever the [`Session`] encoded in one write.
//!
//! It runs on a task of its own, so nothing cancels it mid-connect. After a failure it reports the
//! error and waits for [`super::Link::reconnect`]: the caller's backoff decides when the next
//! connection is made. Requests still queued then belong to the connection that failed (the link
//! queues nothing while disconnected) and are dropped: sessions are clean, and the buffer sends
//! again whatever was not acknowledged.

use super::state::{Event, Request, Session};
use super::wire::{Accepted, Connect, Incoming, Wire};
use super::{LinkError, LinkEvent};
use bytes::BytesMut;
use rumqttc::tokio_rustls::rustls;
use rumqttc::TlsConfiguration;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};

/// TCP, TLS and CONNACK together must take no longer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes encoded before they are written (more waits for the next write).
const WRITE_CHUNK: usize = 256 * 1024;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Everything a connection attempt needs, resolved once.
pub struct Settings {
    pub wire: Wire,
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub keep_alive: Duration,
    pub clean: bool,
    pub session_expiry: Option<u32>,
    pub max_incoming: u32,
    /// Our own limit on an outgoing packet (MQTT 5 brokers may set a lower one).
    pub max_outgoing: Option<u32>,
    pub max_inflight: u16,
    /// (topic, payload, retain).
    pub will: Option<(String, Vec<u8>, bool)>,
    pub login: Option<(String, String)>,
    pub tls: Option<TlsConfiguration>,
}

pub struct Driver {
    pub settings: Settings,
    pub requests: mpsc::Receiver<Request>,
    pub events: mpsc::Sender<Vec<Event>>,
    pub resume: Arc<Notify>,
}

fn failed(why: impl Into<String>) -> LinkError {
    LinkError::Connection(why.into())
}

impl Driver {
    pub async fn run(mut self) {
        loop {
            let err = match self.connect().await {
                Ok((io, buf, accepted)) => {
                    if self.events.send(vec![Ok(LinkEvent::Connected)]).await.is_err() {
                        return;
                    }
                    match self.session(io, buf, &accepted).await {
                        Some(e) => e,
                        None => return, // the link is gone
                    }
                }
                Err(e) => e,
            };
            if self.events.send(vec![Err(err)]).await.is_err() {
                return;
            }
            self.resume.notified().await;
            while self.requests.try_recv().is_ok() {}
        }
    }

    async fn connect(&self) -> Result<(Box<dyn Io>, BytesMut, Accepted), LinkError> {
        let s = &self.settings;
        match tokio::time::timeout(CONNECT_TIMEOUT, self.connect_inner()).await {
            Ok(r) => r,
            Err(_) => Err(failed(format!(
                "no CONNACK from {}:{} within {CONNECT_TIMEOUT:?}",
                s.host, s.port
            ))),
        }
    }

    async fn connect_inner(&self) -> Result<(Box<dyn Io>, BytesMut, Accepted), LinkError> {
        let s = &self.settings;
        let tcp = tokio::net::TcpStream::connect((s.host.as_str(), s.port))
            .await
            .map_err(|e| failed(format!("cannot connect to {}:{}: {e}", s.host, s.port)))?;
        // No Nagle: a PUBLISH goes out when it is written, not when the previous one is
        // acknowledged at the TCP level (40 ms with delayed ACKs).
        tcp.set_nodelay(true)
            .map_err(|e| failed(format!("cannot set TCP_NODELAY: {e}")))?;
        let mut io: Box<dyn Io> = match &s.tls {
            None => Box::new(tcp),
            Some(t) => Box::new(tls_connect(t, &s.host, tcp).await?),
        };
        let mut out = BytesMut::new();
        let c = Connect {
            client_id: &s.client_id,
            keep_alive: u16::try_from(s.keep_alive.as_secs()).unwrap_or(u16::MAX),
            clean: s.clean,
            session_expiry: s.session_expiry,
            max_incoming: s.max_incoming,
            will: s.will.as_ref().map(|(t, p, r)| (t.as_str(), p.as_slice(), *r)),
            login: s.login.as_ref().map(|(u, p)| (u.as_str(), p.as_str())),
        };
        s.wire.connect(&c, &mut out).map_err(failed)?;
        io.write_all(&out)
            .await
            .map_err(|e| failed(format!("cannot send CONNECT: {e}")))?;
        io.flush()
            .await
            .map_err(|e| failed(format!("cannot send CONNECT: {e}")))?;
        let mut buf = BytesMut::with_capacity(16 * 1024);
        loop {
            match s.wire.read(&mut buf, s.max_incoming).map_err(failed)? {
                Some(Incoming::ConnAck(a)) => return Ok((io, buf, a)),
                Some(Incoming::Refused(why)) => {
                    return Err(failed(format!("the broker refused the connection: {why}")))
                }
                Some(other) => return Err(failed(format!("the broker answered CONNECT with {other:?}"))),
                None => {}
            }
            match io.read_buf(&mut buf).await {
                Ok(0) => return Err(failed("the broker closed the connection before CONNACK")),
                Ok(_) => {}
                Err(e) => return Err(failed(format!("reading CONNACK: {e}"))),
            }
        }
    }

    /// Runs one session until it fails; `None` when the link is gone.
    async fn session(&mut self, mut io: Box<dyn Io>, mut buf: BytesMut, accepted: &Accepted) -> Option<LinkError> {
        let st = &self.settings;
        let wire = st.wire;
        let max_incoming = st.max_incoming;
        let mut s = Session::new(wire, accepted, st.max_inflight, st.max_outgoing);
        let keep_alive = accepted
            .keep_alive
            .map_or(st.keep_alive, |k| Duration::from_secs(u64::from(k)))
            .max(Duration::from_secs(1));
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + keep_alive, keep_alive);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut held: Option<Request> = None;
        // What arrived with the CONNACK.
        let mut read_closed: Option<String> = None;
        let mut fresh = !buf.is_empty();
        loop {
            if !fresh {
                if buf.capacity() - buf.len() < 4096 {
                    buf.reserve(16 * 1024);
                }
                tokio::select! {
                    r = io.read_buf(&mut buf) => match r {
                        Ok(0) => read_closed = Some("the broker closed the connection".into()),
                        Ok(_) => {}
                        Err(e) => read_closed = Some(format!("reading from the broker: {e}")),
                    },
                    r = self.requests.recv(), if held.is_none() => match r {
                        Some(r) => held = Some(r),
                        None => return None,
                    },
                    _ = ping.tick() => s.ping(),
                }
            }
            fresh = false;
            loop {
                match wire.read(&mut buf, max_incoming) {
                    Ok(Some(p)) => s.incoming(p),
                    Ok(None) => break,
                    Err(e) => {
                        read_closed.get_or_insert(e);
                        break;
                    }
                }
            }
            // Everything queued, in order, while the broker has room and the write is not too big.
            while !s.ended() && s.out.len() < WRITE_CHUNK {
                let r = match held.take() {
                    Some(r) => r,
                    None => match self.requests.try_recv() {
                        Ok(r) => r,
                        Err(_) => break,
                    },
                };
                if !s.has_room(&r) {
                    held = Some(r);
                    break;
                }
                s.request(r);
            }
            if !s.out.is_empty() {
                let w = io.write_all(&s.out).await.and(io.flush().await);
                s.out.clear();
                if let Err(e) = w {
                    read_closed.get_or_insert(format!("writing to the broker: {e}"));
                }
            }
            let end = s.take_end().or(read_closed.take());
            if !s.events.is_empty() && self.events.send(std::mem::take(&mut s.events)).await.is_err() {
                return None;
            }
            if let Some(why) = end {
                let _ = io.shutdown().await;
                return Some(failed(why));
            }
        }
    }
}

async fn tls_connect(
    t: &TlsConfiguration,
    host: &str,
    tcp: tokio::net::TcpStream,
) -> Result<rumqttc::tokio_rustls::client::TlsStream<tokio::net::TcpStream>, LinkError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let config = match t {
        TlsConfiguration::Simple { ca, alpn, client_auth } => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca) {
                let c = c.map_err(|e| failed(format!("the CA file: {e}")))?;
                roots.add(c).map_err(|e| failed(format!("the CA file: {e}")))?;
            }
            if roots.is_empty() {
                return Err(failed("the CA file holds no certificate"));
            }
            let b = rustls::ClientConfig::builder().with_root_certificates(roots);
            let mut config = match client_auth {
                Some((cert, key)) => {
                    let chain = CertificateDer::pem_slice_iter(cert)
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| failed(format!("the client certificate: {e}")))?;
                    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| failed(format!("the client key: {e}")))?;
                    b.with_client_auth_cert(chain, key)
                        .map_err(|e| failed(format!("the client certificate: {e}")))?
                }
                None => b.with_no_client_auth(),
            };
            if let Some(a) = alpn {
                config.alpn_protocols = a.clone();
            }
            Arc::new(config)
        }
        TlsConfiguration::Rustls(c) => c.clone(),
    };
    let name =
        ServerName::try_from(host.to_string()).map_err(|e| failed(format!("{host} is not a TLS server name: {e}")))?;
    rumqttc::tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| failed(format!("TLS handshake with {host}: {e}")))
}

#[cfg(test)]
mod tests {
    //! The connection against a broker on a real socket that answers in awkward ways (the e2e
    //! suites run it against Mosquitto).
    use super::super::{Link, LinkEvent, LinkOptions};
    use crate::config::MqttVersion;
    use bytes::BytesMut;
    use rumqttc::v5::mqttbytes::v5::{ConnAck, ConnAckProperties, ConnectReturnCode, Packet, PubAck};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    fn link(port: u16, max_inflight: u16) -> Link {
        let mut plan = crate::runtime::local_upstream(port, "conn-test".into());
        plan.version = MqttVersion::V5;
        plan.max_inflight = max_inflight;
        let mut o = LinkOptions::resolve(&plan, "status".into(), b"offline".to_vec()).unwrap();
        o.burst = 1000;
        Link::new(&o)
    }

    /// The broker's side: reads whole packets, counting the reads that returned data.
    struct Broker {
        s: TcpStream,
        buf: BytesMut,
        reads: usize,
    }

    impl Broker {
        async fn accept(l: &TcpListener) -> Broker {
            Broker {
                s: l.accept().await.unwrap().0,
                buf: BytesMut::new(),
                reads: 0,
            }
        }

        async fn packet(&mut self) -> Packet {
            loop {
                if !self.buf.is_empty() {
                    match Packet::read(&mut self.buf, None) {
                        Ok(p) => return p,
                        Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
                self.buf.reserve(1 << 16);
                assert_ne!(self.s.read_buf(&mut self.buf).await.unwrap(), 0, "the client closed");
                self.reads += 1;
            }
        }

        /// Writes `p` a byte at a time: every packet arrives split.
        async fn trickle(&mut self, p: Packet) {
            let mut out = BytesMut::new();
            p.write(&mut out, None).unwrap();
            for b in out.iter() {
                self.s.write_all(&[*b]).await.unwrap();
                self.s.flush().await.unwrap();
            }
        }

        async fn connack(&mut self, receive_max: Option<u16>) {
            assert!(matches!(self.packet().await, Packet::Connect(..)));
            let props = ConnAckProperties {
                session_expiry_interval: None,
                receive_max,
                max_qos: None,
                retain_available: None,
                max_packet_size: None,
                assigned_client_identifier: None,
                topic_alias_max: None,
                reason_string: None,
                user_properties: vec![],
                wildcard_subscription_available: None,
                subscription_identifiers_available: None,
                shared_subscription_available: None,
                server_keep_alive: None,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            };
            self.trickle(Packet::ConnAck(ConnAck {
                session_present: false,
                code: ConnectReturnCode::Success,
                properties: Some(props),
            }))
            .await;
        }

        async fn publish_id(&mut self) -> u16 {
            let p = tokio::time::timeout(std::time::Duration::from_secs(10), self.packet()).await;
            match p.expect("no PUBLISH within 10 s") {
                Packet::Publish(p) => p.pkid,
                other => panic!("expected PUBLISH, got {other:?}"),
            }
        }
    }

    async fn next(l: &mut Link) -> LinkEvent {
        tokio::time::timeout(std::time::Duration::from_secs(10), l.poll())
            .await
            .expect("no event within 10 s")
            .expect("the connection failed")
    }

    #[tokio::test]
    async fn a_burst_goes_out_in_few_writes_and_split_answers_are_read_whole() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut link = link(l.local_addr().unwrap().port(), 1000);
        let mut b = Broker::accept(&l).await;
        b.connack(None).await;
        assert_eq!(next(&mut link).await, LinkEvent::Connected);
        for i in 0..300 {
            link.publish(&format!("t/{i}"), false, vec![b'x'; 40], vec![]).unwrap();
        }
        let mut ids = Vec::new();
        for _ in 0..300 {
            ids.push(b.publish_id().await);
        }
        // One write per request would arrive as hundreds of reads.
        assert!(b.reads <= 10, "300 publishes arrived in {} reads", b.reads);
        for &id in &ids {
            b.trickle(Packet::PubAck(PubAck::new(id, None))).await;
        }
        let mut written = Vec::new();
        let mut acked = Vec::new();
        while acked.len() < 300 {
            match next(&mut link).await {
                LinkEvent::Written(id) => written.push(id),
                LinkEvent::PubAck { pkid, failure: None } => acked.push(pkid),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            written, ids,
            "written in the order queued, under the ids the broker saw"
        );
        assert_eq!(acked, ids);
    }

    #[tokio::test]
    async fn the_brokers_receive_maximum_holds_publishes_back() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut link = link(l.local_addr().unwrap().port(), 64);
        let mut b = Broker::accept(&l).await;
        b.connack(Some(2)).await;
        assert_eq!(next(&mut link).await, LinkEvent::Connected);
        for _ in 0..5 {
            link.publish("t", false, b"1".to_vec(), vec![]).unwrap();
        }
        let first = [b.publish_id().await, b.publish_id().await];
        // Nothing more until an acknowledgement frees a slot.
        let more = tokio::time::timeout(std::time::Duration::from_millis(300), b.packet()).await;
        assert!(more.is_err(), "a third publish beyond Receive Maximum 2: {more:?}");
        b.trickle(Packet::PubAck(PubAck::new(first[0], None))).await;
        let third = b.publish_id().await;
        assert!(!first.contains(&third));
    }

    #[tokio::test]
    async fn an_ack_for_a_packet_not_in_flight_ends_the_connection() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut link = link(l.local_addr().unwrap().port(), 8);
        let mut b = Broker::accept(&l).await;
        b.connack(None).await;
        assert_eq!(next(&mut link).await, LinkEvent::Connected);
        link.publish("t", false, b"1".to_vec(), vec![]).unwrap();
        let id = b.publish_id().await;
        b.trickle(Packet::PubAck(PubAck::new(id.wrapping_add(7), None))).await;
        assert_eq!(next(&mut link).await, LinkEvent::Written(id));
        let err = tokio::time::timeout(std::time::Duration::from_secs(10), link.poll())
            .await
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("not waiting"), "{err}");
        // The next attempt waits for the caller, and requests left from the failed session are
        // not sent on the next one.
        link.publish("stale", false, b"1".to_vec(), vec![]).unwrap();
        link.reconnect();
        let mut b = Broker::accept(&l).await;
        b.connack(None).await;
        assert_eq!(next(&mut link).await, LinkEvent::Connected);
        link.publish("fresh", false, b"2".to_vec(), vec![]).unwrap();
        match b.packet().await {
            Packet::Publish(p) => assert_eq!(&p.topic[..], b"fresh"),
            other => panic!("{other:?}"),
        }
    }
}
