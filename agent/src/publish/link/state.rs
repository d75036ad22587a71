//! One MQTT session's state, with no I/O: requests and the broker's packets in, bytes to write and
//! events out. [`super::conn`] moves the bytes.
//!
//! Everything taken between two socket writes is encoded into one buffer and goes out in one write:
//! a burst of a thousand PUBLISH packets costs one system call, not a thousand (the client this
//! replaces flushed after every request, and that flush was most of the agent's CPU).

use super::wire::{Accepted, Incoming, Wire};
use super::{LinkError, LinkEvent};
use bytes::{Bytes, BytesMut};
use std::collections::HashSet;

/// What the link asks of the connection, in the order it asked.
#[derive(Debug)]
pub enum Request {
    Publish {
        topic: String,
        qos: u8,
        retain: bool,
        payload: Bytes,
        props: Vec<(String, String)>,
    },
    Subscribe(String),
    Unsubscribe(String),
    Disconnect,
}

impl Request {
    /// Whether it takes one of the broker's receive slots (a PUBLISH at QoS 1 or 2).
    fn counts(&self) -> bool {
        matches!(self, Request::Publish { qos, .. } if *qos > 0)
    }
}

/// What a packet id is in use for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    Free,
    /// QoS 1 PUBLISH, waiting for PUBACK.
    Publish1,
    /// QoS 2 PUBLISH, waiting for PUBREC.
    Publish2,
    /// QoS 2 after PUBREC: PUBREL sent, waiting for PUBCOMP.
    Released,
    Subscribe,
    Unsubscribe,
}

pub type Event = Result<LinkEvent, LinkError>;

/// MQTT 5 reason code "Packet too large".
pub const PACKET_TOO_LARGE: u8 = 0x95;

pub struct Session {
    wire: Wire,
    /// QoS 1 and 2 publishes in flight at once: ours, or the broker's Receive Maximum if lower.
    window: usize,
    in_flight: usize,
    /// The broker's packet limit for what we send.
    max_packet: Option<u32>,
    ids: Vec<Use>,
    next_id: u16,
    /// QoS 2 messages from the broker, delivered, waiting for its PUBREL.
    received2: HashSet<u16>,
    ping_outstanding: bool,
    /// Bytes to write.
    pub out: BytesMut,
    /// Events for the link.
    pub events: Vec<Event>,
    /// Why the session must end (the failure is the last event).
    ended: Option<String>,
}

impl Session {
    /// A session after `accepted`; `max_outgoing`: our own limit on a packet (MQTT 3.1.1 has no
    /// way to learn the broker's).
    pub fn new(wire: Wire, accepted: &Accepted, max_inflight: u16, max_outgoing: Option<u32>) -> Session {
        let window = accepted
            .receive_max
            .filter(|&r| r > 0)
            .map_or(max_inflight, |r| r.min(max_inflight));
        let max_packet = match (accepted.max_packet, max_outgoing) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Session {
            wire,
            window: usize::from(window.max(1)),
            in_flight: 0,
            max_packet,
            ids: vec![Use::Free; 1 << 16],
            next_id: 0,
            received2: HashSet::new(),
            ping_outstanding: false,
            out: BytesMut::with_capacity(64 * 1024),
            events: Vec::new(),
            ended: None,
        }
    }

    /// Whether `r` can be written now; a QoS 1 or 2 publish waits for a receive slot (and
    /// everything queued after it waits with it: requests go out in order).
    pub fn has_room(&self, r: &Request) -> bool {
        !r.counts() || self.in_flight < self.window
    }

    /// The session has ended: the reason, once; the caller writes what is left and closes.
    pub fn take_end(&mut self) -> Option<String> {
        self.ended.take()
    }

    pub fn ended(&self) -> bool {
        self.ended.is_some()
    }

    fn end(&mut self, why: String) {
        if self.ended.is_none() {
            self.ended = Some(why);
        }
    }

    fn id(&mut self, purpose: Use) -> Option<u16> {
        // At most the window plus a few subscriptions are in use, so this finds one at once.
        for _ in 0..u16::MAX {
            self.next_id = self.next_id.checked_add(1).unwrap_or(1);
            let i = usize::from(self.next_id);
            if self.ids[i] == Use::Free {
                self.ids[i] = purpose;
                return Some(self.next_id);
            }
        }
        None
    }

    fn encoded(&mut self, r: Result<(), String>) {
        if let Err(e) = r {
            self.end(format!("cannot encode a packet: {e}"));
        }
    }

    /// Takes one request (the caller checked [`has_room`](Session::has_room)).
    pub fn request(&mut self, r: Request) {
        if self.ended() {
            return;
        }
        let wire = self.wire;
        match r {
            Request::Publish {
                topic,
                qos,
                retain,
                payload,
                props,
            } => {
                let pkid = if qos == 0 {
                    0
                } else {
                    let purpose = if qos == 1 { Use::Publish1 } else { Use::Publish2 };
                    match self.id(purpose) {
                        Some(id) => id,
                        None => return self.end("no packet id is free".into()),
                    }
                };
                let size = payload.len();
                match wire.publish(topic, qos, retain, pkid, payload, props, self.max_packet, &mut self.out) {
                    Ok(()) => {
                        if qos > 0 {
                            self.in_flight += 1;
                        }
                        self.events.push(Ok(LinkEvent::Written(pkid)));
                    }
                    // Over the broker's packet limit: the broker would refuse it, and sending
                    // it again on the next connection would fail the same way. It is refused
                    // here as the broker would (0x95, packet too large), so the session goes on
                    // and the publisher accounts for it (a product message is dead-lettered
                    // with a gap event).
                    // QoS 0 (Sparkplug) has no acknowledgement to carry a refusal: the next
                    // barrier would count it delivered. So the session ends, as it always did.
                    Err((topic, e)) if qos == 0 => {
                        self.end(format!("cannot send a QoS 0 message on {topic}: {e}"));
                    }
                    Err((topic, e)) => {
                        tracing::error!(topic = %topic, payload_bytes = size, error = %e, "a message is over the broker's packet limit: not sent");
                        self.ids[usize::from(pkid)] = Use::Free;
                        self.events.push(Ok(LinkEvent::Written(pkid)));
                        self.events.push(Ok(LinkEvent::PubAck {
                            pkid,
                            failure: Some(PACKET_TOO_LARGE),
                        }));
                    }
                }
            }
            Request::Subscribe(filter) => match self.id(Use::Subscribe) {
                Some(id) => {
                    let r = wire.subscribe(id, &filter, &mut self.out);
                    self.encoded(r);
                }
                None => self.end("no packet id is free".into()),
            },
            Request::Unsubscribe(filter) => match self.id(Use::Unsubscribe) {
                Some(id) => {
                    let r = wire.unsubscribe(id, &filter, &mut self.out);
                    self.encoded(r);
                }
                None => self.end("no packet id is free".into()),
            },
            Request::Disconnect => {
                let r = wire.disconnect(&mut self.out);
                self.encoded(r);
                self.end("the agent ended the connection".into());
            }
        }
    }

    /// The keep-alive timer: a PINGREQ, or the end when the last one had no answer.
    pub fn ping(&mut self) {
        if self.ping_outstanding {
            return self.end("the broker did not answer a PINGREQ within the keep-alive".into());
        }
        self.ping_outstanding = true;
        let r = self.wire.pingreq(&mut self.out);
        self.encoded(r);
    }

    fn release(&mut self, pkid: u16, expected: &[Use], what: &str) -> bool {
        let i = usize::from(pkid);
        if pkid == 0 || !expected.contains(&self.ids[i]) {
            self.end(format!(
                "the broker sent {what} for packet id {pkid}, which is not waiting for one"
            ));
            return false;
        }
        self.ids[i] = Use::Free;
        true
    }

    /// One packet from the broker.
    pub fn incoming(&mut self, p: Incoming) {
        if self.ended() {
            return;
        }
        let wire = self.wire;
        match p {
            Incoming::Publish {
                topic,
                payload,
                qos,
                pkid,
            } => {
                let first = qos < 2 || self.received2.insert(pkid);
                if first {
                    self.events.push(Ok(LinkEvent::Message {
                        topic,
                        payload: payload.to_vec(),
                    }));
                }
                let r = match qos {
                    0 => Ok(()),
                    1 => wire.puback(pkid, &mut self.out),
                    _ => wire.pubrec(pkid, &mut self.out),
                };
                self.encoded(r);
            }
            Incoming::PubAck { pkid, failure } => {
                if self.release(pkid, &[Use::Publish1], "PUBACK") {
                    self.in_flight -= 1;
                    self.events.push(Ok(LinkEvent::PubAck { pkid, failure }));
                }
            }
            Incoming::PubRec { pkid, failure } => {
                let i = usize::from(pkid);
                if pkid == 0 || self.ids[i] != Use::Publish2 {
                    return self.end(format!(
                        "the broker sent PUBREC for packet id {pkid}, which is not waiting for one"
                    ));
                }
                match failure {
                    // A refusal ends the exchange (MQTT 5).
                    Some(_) => {
                        self.ids[i] = Use::Free;
                        self.in_flight -= 1;
                        self.events.push(Ok(LinkEvent::PubAck { pkid, failure }));
                    }
                    None => {
                        self.ids[i] = Use::Released;
                        let r = wire.pubrel(pkid, &mut self.out);
                        self.encoded(r);
                    }
                }
            }
            Incoming::PubComp(pkid) => {
                if self.release(pkid, &[Use::Released], "PUBCOMP") {
                    self.in_flight -= 1;
                    self.events.push(Ok(LinkEvent::PubAck { pkid, failure: None }));
                }
            }
            Incoming::PubRel(pkid) => {
                self.received2.remove(&pkid);
                let r = wire.pubcomp(pkid, &mut self.out);
                self.encoded(r);
            }
            Incoming::SubAck(pkid) => {
                self.release(pkid, &[Use::Subscribe], "SUBACK");
            }
            Incoming::UnsubAck(pkid) => {
                if self.release(pkid, &[Use::Unsubscribe], "UNSUBACK") {
                    self.events.push(Ok(LinkEvent::UnsubAck));
                }
            }
            Incoming::PingResp => self.ping_outstanding = false,
            Incoming::Disconnect(reason) => self.end(format!("the broker ended the connection: {reason}")),
            Incoming::ConnAck(_) | Incoming::Refused(_) => self.end("the broker sent a second CONNACK".into()),
            Incoming::Unexpected(what) => self.end(format!("the broker sent {what}, which a client is never sent")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(qos: u8) -> Request {
        Request::Publish {
            topic: "t".into(),
            qos,
            retain: false,
            payload: Bytes::from_static(b"{}"),
            props: vec![],
        }
    }

    fn session(window: u16, receive_max: Option<u16>) -> Session {
        let a = Accepted {
            receive_max,
            ..Default::default()
        };
        Session::new(Wire::V5, &a, window, None)
    }

    /// Decodes what the session wrote, as a broker would read it.
    fn written(s: &mut Session, wire: Wire) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = std::mem::take(&mut s.out);
        while !buf.is_empty() {
            // rumqttc's reader refuses an MQTT 5 DISCONNECT of remaining length 0, which the
            // standard allows (reason 0x00) and mosquitto takes.
            if buf[..2] == [0xE0, 0] {
                let _ = buf.split_to(2);
                out.push("Disconnect".into());
                continue;
            }
            let p = match wire {
                Wire::V4 => format!("{:?}", rumqttc::mqttbytes::v4::Packet::read(&mut buf, 1 << 20).unwrap()),
                Wire::V5 => format!(
                    "{:?}",
                    rumqttc::v5::mqttbytes::v5::Packet::read(&mut buf, None).unwrap()
                ),
            };
            out.push(p.split(['(', ' ']).next().unwrap().to_string());
        }
        out
    }

    #[test]
    fn a_burst_is_one_buffer_in_order() {
        let mut s = session(100, None);
        for _ in 0..50 {
            s.request(publish(1));
        }
        s.request(Request::Unsubscribe("barrier".into()));
        s.request(publish(0));
        let kinds = written(&mut s, Wire::V5);
        assert_eq!(kinds.len(), 52);
        assert!(kinds[..50].iter().all(|k| k == "Publish"));
        assert_eq!(kinds[50], "Unsubscribe");
        let ids: Vec<_> = s.events.iter().map(|e| e.as_ref().unwrap()).collect();
        assert_eq!(ids[0], &LinkEvent::Written(1));
        assert_eq!(ids[49], &LinkEvent::Written(50));
        assert_eq!(ids[50], &LinkEvent::Written(0), "QoS 0 has no packet id");
    }

    #[test]
    fn the_window_is_ours_or_the_brokers_receive_maximum() {
        let mut s = session(64, Some(2));
        assert!(s.has_room(&publish(1)));
        s.request(publish(1));
        s.request(publish(2));
        assert!(!s.has_room(&publish(1)));
        assert!(s.has_room(&publish(0)), "QoS 0 takes no receive slot");
        assert!(s.has_room(&Request::Subscribe("x".into())));
        s.incoming(Incoming::PubAck { pkid: 1, failure: None });
        assert!(s.has_room(&publish(1)));
        assert_eq!(session(8, None).window, 8);
        assert_eq!(
            session(8, Some(0)).window,
            8,
            "0 is not a valid Receive Maximum: ignored"
        );
    }

    #[test]
    fn qos2_completes_on_pubcomp_and_a_refusal_in_pubrec_ends_it() {
        let mut s = session(10, None);
        s.request(publish(2));
        s.request(publish(2));
        s.events.clear();
        s.out.clear();
        s.incoming(Incoming::PubRec { pkid: 1, failure: None });
        assert_eq!(written(&mut s, Wire::V5), ["PubRel"]);
        assert!(s.events.is_empty(), "not delivered before PUBCOMP");
        s.incoming(Incoming::PubComp(1));
        s.incoming(Incoming::PubRec {
            pkid: 2,
            failure: Some(0x97),
        });
        let ev: Vec<_> = s.events.drain(..).map(Result::unwrap).collect();
        assert_eq!(
            ev,
            [
                LinkEvent::PubAck { pkid: 1, failure: None },
                LinkEvent::PubAck {
                    pkid: 2,
                    failure: Some(0x97)
                }
            ]
        );
        assert_eq!(s.in_flight, 0);
        assert!(s.out.is_empty(), "no PUBREL after a refusal");
    }

    #[test]
    fn an_ack_for_nothing_in_flight_ends_the_session() {
        // A broker (or a path) that confuses packet ids must not make us delete a message it does
        // not have: the session ends, and everything unacknowledged is sent again.
        let mut s = session(10, None);
        s.request(publish(1));
        s.incoming(Incoming::PubAck { pkid: 7, failure: None });
        assert!(s.take_end().unwrap().contains("packet id 7"));
        let mut s = session(10, None);
        s.request(publish(1));
        s.incoming(Incoming::PubAck { pkid: 1, failure: None });
        s.incoming(Incoming::PubAck { pkid: 1, failure: None });
        assert!(s.ended(), "a second PUBACK for one publish");
        let mut s = session(10, None);
        s.request(publish(1));
        s.incoming(Incoming::PubComp(1));
        assert!(s.ended(), "PUBCOMP for a QoS 1 publish");
    }

    #[test]
    fn packet_ids_skip_those_in_use_and_wrap_past_zero() {
        let mut s = session(u16::MAX, None);
        s.request(publish(1)); // id 1 stays in flight
        for _ in 0..70_000u32 {
            s.request(publish(1));
            let Some(Ok(LinkEvent::Written(id))) = s.events.pop() else {
                panic!("not written")
            };
            assert_ne!(id, 0);
            assert_ne!(id, 1, "id 1 is still in flight");
            s.incoming(Incoming::PubAck {
                pkid: id,
                failure: None,
            });
            s.events.clear();
            s.out.clear();
        }
        assert!(!s.ended());
        assert_eq!(s.in_flight, 1);
    }

    #[test]
    fn messages_from_the_broker_are_acknowledged_and_qos2_delivered_once() {
        for wire in [Wire::V4, Wire::V5] {
            let mut s = Session::new(wire, &Accepted::default(), 10, None);
            let msg = |qos, pkid| Incoming::Publish {
                topic: "a/b".into(),
                payload: Bytes::from_static(b"x"),
                qos,
                pkid,
            };
            s.incoming(msg(0, 0));
            s.incoming(msg(1, 5));
            s.incoming(msg(2, 6));
            s.incoming(msg(2, 6)); // resent before our PUBREC arrived
            s.incoming(Incoming::PubRel(6));
            assert_eq!(s.events.len(), 3);
            assert_eq!(written(&mut s, wire), ["PubAck", "PubRec", "PubRec", "PubComp"]);
        }
    }

    #[test]
    fn an_unanswered_ping_ends_the_session_and_disconnect_is_written_last() {
        let mut s = session(10, None);
        s.ping();
        s.incoming(Incoming::PingResp);
        s.ping();
        assert!(!s.ended());
        s.ping();
        assert!(s.take_end().unwrap().contains("PINGREQ"));
        let mut s = session(10, None);
        s.request(publish(1));
        s.request(Request::Disconnect);
        s.request(publish(1));
        assert_eq!(written(&mut s, Wire::V5), ["Publish", "Disconnect"]);
        assert!(s.ended());
    }

    #[test]
    fn a_packet_over_the_brokers_limit_is_refused_and_the_session_goes_on() {
        let a = Accepted {
            max_packet: Some(100),
            ..Default::default()
        };
        let mut s = Session::new(Wire::V5, &a, 10, None);
        let big = |qos| Request::Publish {
            topic: "t".into(),
            qos,
            retain: false,
            payload: Bytes::from(vec![b'x'; 200]),
            props: vec![],
        };
        s.request(big(1));
        s.request(publish(1));
        assert!(!s.ended());
        let ev: Vec<_> = s.events.drain(..).map(Result::unwrap).collect();
        assert_eq!(
            ev,
            [
                LinkEvent::Written(1),
                LinkEvent::PubAck {
                    pkid: 1,
                    failure: Some(PACKET_TOO_LARGE)
                },
                LinkEvent::Written(2),
            ]
        );
        assert_eq!(s.in_flight, 1);
        assert_eq!(written(&mut s, Wire::V5), ["Publish"], "only the one that fits");
        // A QoS 0 message has no PUBACK to refuse it with: reported written, a Sparkplug barrier
        // would count it delivered. The session ends instead, and nothing is reported written.
        s.request(big(0));
        assert!(s.take_end().unwrap().contains("QoS 0"));
        assert!(s.events.is_empty());
    }
}
