//! MQTT 3.1.1 and 5 packets, in the few shapes the link uses, over rumqttc's codecs
//! (`rumqttc::mqttbytes`): one place that knows the two versions apart.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::QoS as QoS4;
use rumqttc::v5::mqttbytes::{v5, QoS as QoS5};

/// What the broker sent, in the form the state machine needs.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    ConnAck(Accepted),
    /// The broker refused the connection (its reason, as text).
    Refused(String),
    Publish {
        topic: String,
        payload: Bytes,
        qos: u8,
        pkid: u16,
    },
    /// `failure`: an MQTT 5 reason code >= 0x80.
    PubAck {
        pkid: u16,
        failure: Option<u8>,
    },
    PubRec {
        pkid: u16,
        failure: Option<u8>,
    },
    PubRel(u16),
    PubComp(u16),
    SubAck(u16),
    UnsubAck(u16),
    PingResp,
    /// MQTT 5: the broker ends the session, with its reason.
    Disconnect(String),
    /// Anything a client is never sent (CONNECT, SUBSCRIBE, ...) or that we do not take (AUTH).
    Unexpected(&'static str),
}

/// What a CONNACK granted (MQTT 5 properties; 3.1.1 grants nothing beyond success).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Accepted {
    pub session_present: bool,
    /// Publishes at QoS 1 and 2 the broker takes at once (MQTT 5 Receive Maximum).
    pub receive_max: Option<u16>,
    /// The largest packet the broker takes.
    pub max_packet: Option<u32>,
    /// The keep-alive the broker wants instead of ours.
    pub keep_alive: Option<u16>,
}

/// How the CONNECT is made.
pub struct Connect<'a> {
    pub client_id: &'a str,
    pub keep_alive: u16,
    pub clean: bool,
    pub session_expiry: Option<u32>,
    /// The largest packet we take (MQTT 5 tells the broker).
    pub max_incoming: u32,
    /// (topic, payload, retain), always QoS 1.
    pub will: Option<(&'a str, &'a [u8], bool)>,
    pub login: Option<(&'a str, &'a str)>,
}

/// A failure to encode or decode, as text for the connection error.
pub type WireError = String;

/// One protocol version's encoder and decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    V4,
    V5,
}

fn qos4(q: u8) -> QoS4 {
    match q {
        0 => QoS4::AtMostOnce,
        1 => QoS4::AtLeastOnce,
        _ => QoS4::ExactlyOnce,
    }
}

fn qos5(q: u8) -> QoS5 {
    match q {
        0 => QoS5::AtMostOnce,
        1 => QoS5::AtLeastOnce,
        _ => QoS5::ExactlyOnce,
    }
}

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

impl Wire {
    pub fn connect(self, c: &Connect<'_>, out: &mut BytesMut) -> Result<(), WireError> {
        match self {
            Wire::V4 => {
                let mut p = v4::Connect::new(c.client_id);
                p.keep_alive = c.keep_alive;
                p.clean_session = c.clean;
                p.last_will = c
                    .will
                    .map(|(t, m, r)| v4::LastWill::new(t, m.to_vec(), QoS4::AtLeastOnce, r));
                p.login = c.login.map(|(u, pw)| v4::Login::new(u, pw));
                write4(&v4::Packet::Connect(p), out, usize::MAX)
            }
            Wire::V5 => {
                let mut props = v5::ConnectProperties::new();
                props.session_expiry_interval = c.session_expiry;
                props.max_packet_size = Some(c.max_incoming);
                let p = v5::Connect {
                    keep_alive: c.keep_alive,
                    client_id: c.client_id.to_string(),
                    clean_start: c.clean,
                    properties: Some(props),
                };
                let will = c
                    .will
                    .map(|(t, m, r)| v5::LastWill::new(t, m.to_vec(), QoS5::AtLeastOnce, r, None));
                let login = c.login.map(|(u, pw)| v5::Login::new(u, pw));
                write5(&v5::Packet::Connect(p, will, login), out, None)
            }
        }
    }

    /// A PUBLISH; MQTT 5 marks the payload JSON and carries `props` as user properties (3.1.1 has
    /// nowhere to put them). `max`: the broker's packet limit. A failure gives the topic back (for
    /// the caller's report).
    #[allow(clippy::too_many_arguments)]
    pub fn publish(
        self,
        topic: String,
        qos: u8,
        retain: bool,
        pkid: u16,
        payload: Bytes,
        props: Vec<(String, String)>,
        max: Option<u32>,
        out: &mut BytesMut,
    ) -> Result<(), (String, WireError)> {
        match self {
            Wire::V4 => {
                let p = v4::Publish {
                    dup: false,
                    qos: qos4(qos),
                    retain,
                    topic,
                    pkid,
                    payload,
                };
                let p = v4::Packet::Publish(p);
                write4(&p, out, max.map_or(usize::MAX, |m| m as usize)).map_err(|e| match p {
                    v4::Packet::Publish(p) => (p.topic, e),
                    _ => (String::new(), e),
                })
            }
            Wire::V5 => {
                let properties = v5::PublishProperties {
                    user_properties: props,
                    content_type: Some("application/json".into()),
                    ..Default::default()
                };
                let p = v5::Publish {
                    dup: false,
                    qos: qos5(qos),
                    retain,
                    topic: Bytes::from(topic.into_bytes()),
                    pkid,
                    payload,
                    properties: Some(properties),
                };
                let p = v5::Packet::Publish(p);
                write5(&p, out, max).map_err(|e| match p {
                    v5::Packet::Publish(p) => (String::from_utf8_lossy(&p.topic).into_owned(), e),
                    _ => (String::new(), e),
                })
            }
        }
    }

    pub fn puback(self, pkid: u16, out: &mut BytesMut) -> Result<(), WireError> {
        match self {
            Wire::V4 => write4(&v4::Packet::PubAck(v4::PubAck::new(pkid)), out, usize::MAX),
            Wire::V5 => write5(&v5::Packet::PubAck(v5::PubAck::new(pkid, None)), out, None),
        }
    }

    pub fn pubrec(self, pkid: u16, out: &mut BytesMut) -> Result<(), WireError> {
        match self {
            Wire::V4 => write4(&v4::Packet::PubRec(v4::PubRec::new(pkid)), out, usize::MAX),
            Wire::V5 => write5(&v5::Packet::PubRec(v5::PubRec::new(pkid, None)), out, None),
        }
    }

    pub fn pubrel(self, pkid: u16, out: &mut BytesMut) -> Result<(), WireError> {
        match self {
            Wire::V4 => write4(&v4::Packet::PubRel(v4::PubRel::new(pkid)), out, usize::MAX),
            Wire::V5 => write5(&v5::Packet::PubRel(v5::PubRel::new(pkid, None)), out, None),
        }
    }

    pub fn pubcomp(self, pkid: u16, out: &mut BytesMut) -> Result<(), WireError> {
        match self {
            Wire::V4 => write4(&v4::Packet::PubComp(v4::PubComp::new(pkid)), out, usize::MAX),
            Wire::V5 => write5(&v5::Packet::PubComp(v5::PubComp::new(pkid, None)), out, None),
        }
    }

    /// A SUBSCRIBE of one filter at QoS 1.
    pub fn subscribe(self, pkid: u16, filter: &str, out: &mut BytesMut) -> Result<(), WireError> {
        match self {
            Wire::V4 => {
                let mut p = v4::Subscribe::new(filter, QoS4::AtLeastOnce);
                p.pkid = pkid;
                write4(&v4::Packet::Subscribe(p), out, usize::MAX)
            }
            Wire::V5 => {
                let mut p = v5::Subscribe::new(v5::Filter::new(filter, QoS5::AtLeastOnce), None);
                p.pkid = pkid;
                write5(&v5::Packet::Subscribe(p), out, None)
            }
        }
    }

    pub fn unsubscribe(self, pkid: u16, filter: &str, out: &mut BytesMut) -> Result<(), WireError> {
        match self {
            Wire::V4 => {
                let mut p = v4::Unsubscribe::new(filter);
                p.pkid = pkid;
                write4(&v4::Packet::Unsubscribe(p), out, usize::MAX)
            }
            Wire::V5 => {
                let mut p = v5::Unsubscribe::new(filter, None);
                p.pkid = pkid;
                write5(&v5::Packet::Unsubscribe(p), out, None)
            }
        }
    }

    pub fn pingreq(self, out: &mut BytesMut) -> Result<(), WireError> {
        match self {
            Wire::V4 => write4(&v4::Packet::PingReq, out, usize::MAX),
            Wire::V5 => write5(&v5::Packet::PingReq(v5::PingReq), out, None),
        }
    }

    pub fn disconnect(self, out: &mut BytesMut) -> Result<(), WireError> {
        match self {
            Wire::V4 => write4(&v4::Packet::Disconnect, out, usize::MAX),
            Wire::V5 => write5(
                &v5::Packet::Disconnect(v5::Disconnect::new(v5::DisconnectReasonCode::NormalDisconnection)),
                out,
                None,
            ),
        }
    }

    /// The next whole packet in `buf` (taken out of it); `None` until one has arrived whole.
    pub fn read(self, buf: &mut BytesMut, max: u32) -> Result<Option<Incoming>, WireError> {
        if buf.is_empty() {
            return Ok(None);
        }
        match self {
            Wire::V4 => match v4::Packet::read(buf, max as usize) {
                Ok(p) => Ok(Some(incoming4(p))),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
                Err(e) => Err(format!("malformed packet from the broker: {e}")),
            },
            Wire::V5 => match v5::Packet::read(buf, Some(max)) {
                Ok(p) => Ok(Some(incoming5(p))),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
                Err(e) => Err(format!("malformed packet from the broker: {e}")),
            },
        }
    }
}

fn write4(p: &v4::Packet, out: &mut BytesMut, max: usize) -> Result<(), WireError> {
    p.write(out, max).map(drop).map_err(|e| e.to_string())
}

fn write5(p: &v5::Packet, out: &mut BytesMut, max: Option<u32>) -> Result<(), WireError> {
    p.write(out, max).map(drop).map_err(|e| e.to_string())
}

fn incoming4(p: v4::Packet) -> Incoming {
    match p {
        v4::Packet::ConnAck(a) if a.code == v4::ConnectReturnCode::Success => Incoming::ConnAck(Accepted {
            session_present: a.session_present,
            ..Default::default()
        }),
        v4::Packet::ConnAck(a) => Incoming::Refused(format!("{:?}", a.code)),
        v4::Packet::Publish(p) => Incoming::Publish {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos as u8,
            pkid: p.pkid,
        },
        v4::Packet::PubAck(a) => Incoming::PubAck {
            pkid: a.pkid,
            failure: None,
        },
        v4::Packet::PubRec(a) => Incoming::PubRec {
            pkid: a.pkid,
            failure: None,
        },
        v4::Packet::PubRel(a) => Incoming::PubRel(a.pkid),
        v4::Packet::PubComp(a) => Incoming::PubComp(a.pkid),
        v4::Packet::SubAck(a) => Incoming::SubAck(a.pkid),
        v4::Packet::UnsubAck(a) => Incoming::UnsubAck(a.pkid),
        v4::Packet::PingResp => Incoming::PingResp,
        v4::Packet::Connect(_) => Incoming::Unexpected("CONNECT"),
        v4::Packet::Subscribe(_) => Incoming::Unexpected("SUBSCRIBE"),
        v4::Packet::Unsubscribe(_) => Incoming::Unexpected("UNSUBSCRIBE"),
        v4::Packet::PingReq => Incoming::Unexpected("PINGREQ"),
        v4::Packet::Disconnect => Incoming::Unexpected("DISCONNECT"),
    }
}

fn incoming5(p: v5::Packet) -> Incoming {
    match p {
        v5::Packet::ConnAck(a) if a.code == v5::ConnectReturnCode::Success => {
            let p = a.properties.as_ref();
            Incoming::ConnAck(Accepted {
                session_present: a.session_present,
                receive_max: p.and_then(|p| p.receive_max),
                max_packet: p.and_then(|p| p.max_packet_size),
                keep_alive: p.and_then(|p| p.server_keep_alive),
            })
        }
        v5::Packet::ConnAck(a) => Incoming::Refused(format!("{:?}", a.code)),
        v5::Packet::Publish(p) => Incoming::Publish {
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            payload: p.payload,
            qos: p.qos as u8,
            pkid: p.pkid,
        },
        v5::Packet::PubAck(a) => {
            use v5::PubAckReason as R;
            Incoming::PubAck {
                pkid: a.pkid,
                failure: failure_code!(R, a.reason),
            }
        }
        v5::Packet::PubRec(a) => {
            use v5::PubRecReason as R;
            Incoming::PubRec {
                pkid: a.pkid,
                failure: failure_code!(R, a.reason),
            }
        }
        v5::Packet::PubRel(a) => Incoming::PubRel(a.pkid),
        v5::Packet::PubComp(a) => Incoming::PubComp(a.pkid),
        v5::Packet::SubAck(a) => Incoming::SubAck(a.pkid),
        v5::Packet::UnsubAck(a) => Incoming::UnsubAck(a.pkid),
        v5::Packet::PingResp(_) => Incoming::PingResp,
        v5::Packet::Disconnect(d) => Incoming::Disconnect(format!("{:?}", d.reason_code)),
        v5::Packet::Auth(_) => Incoming::Unexpected("AUTH"),
        v5::Packet::Connect(..) => Incoming::Unexpected("CONNECT"),
        v5::Packet::Subscribe(_) => Incoming::Unexpected("SUBSCRIBE"),
        v5::Packet::Unsubscribe(_) => Incoming::Unexpected("UNSUBSCRIBE"),
        v5::Packet::PingReq(_) => Incoming::Unexpected("PINGREQ"),
    }
}
