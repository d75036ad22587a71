//! PUBACK correlation, with no I/O.
//!
//! `Link::publish()` returns no packet id: the connection (`link/state.rs`) assigns one as it
//! writes, strictly in the order requests were queued, and reports each as `Written(pkid)`. So:
//! every request we queue goes to the back of `queued`; each `Written(pkid)` takes the front and
//! binds it to that pkid; `PubAck(pkid)` resolves the binding. The invariants that make this exact:
//! (1) every publish of the session goes through this table, in queue order; (2) the session is
//! clean, so on a disconnect everything queued or in flight is dropped (nothing is retransmitted
//! behind our back) and we [`Inflight::reset`]; (3) we never queue while disconnected.

use std::collections::{HashMap, VecDeque};

/// What a publish carried.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Sent<M> {
    /// A buffered product message; acknowledging it deletes it from the buffer.
    Message(M),
    /// A buffered gap event.
    Gap(u64),
    /// A product's descriptor (index into the announced products): stored as the last published
    /// contract on PUBACK.
    Descriptor(usize),
    /// Anything else (status, SLIs): nothing to do on PUBACK.
    Control,
}

#[derive(Debug)]
pub struct Inflight<M> {
    queued: VecDeque<Sent<M>>,
    by_pkid: HashMap<u16, Sent<M>>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum CorrelationError {
    /// A packet was written that we did not queue: the invariants above are broken.
    UnexpectedOutgoing(u16),
    /// A pkid was bound twice without a PUBACK in between.
    PkidInUse(u16),
}

impl<M: Clone> Default for Inflight<M> {
    fn default() -> Self {
        Inflight {
            queued: VecDeque::new(),
            by_pkid: HashMap::new(),
        }
    }
}

impl<M: Clone> Inflight<M> {
    /// Records a publish handed to the client.
    pub fn queued(&mut self, s: Sent<M>) {
        self.queued.push_back(s);
    }

    /// The client wrote the oldest queued publish under `pkid` (0 for QoS 0).
    pub fn written(&mut self, pkid: u16) -> Result<(), CorrelationError> {
        let s = self
            .queued
            .pop_front()
            .ok_or(CorrelationError::UnexpectedOutgoing(pkid))?;
        if pkid == 0 {
            return Ok(());
        }
        if self.by_pkid.insert(pkid, s).is_some() {
            return Err(CorrelationError::PkidInUse(pkid));
        }
        Ok(())
    }

    /// The broker acknowledged `pkid`: what it carried, if it was ours.
    pub fn acked(&mut self, pkid: u16) -> Option<Sent<M>> {
        self.by_pkid.remove(&pkid)
    }

    /// Everything queued or awaiting PUBACK (to be sent again on the next connection).
    pub fn reset(&mut self) -> Vec<Sent<M>> {
        let mut all: Vec<Sent<M>> = self.by_pkid.drain().map(|(_, s)| s).collect();
        all.extend(self.queued.drain(..));
        all
    }

    /// Publishes not yet acknowledged.
    pub fn len(&self) -> usize {
        self.queued.len() + self.by_pkid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, s: &Sent<M>) -> bool
    where
        M: PartialEq,
    {
        self.queued.contains(s) || self.by_pkid.values().any(|v| v == s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_in_queue_order_and_survives_out_of_order_acks() {
        let mut f: Inflight<u32> = Inflight::default();
        f.queued(Sent::Control);
        f.queued(Sent::Message(10));
        f.queued(Sent::Message(11));
        f.queued(Sent::Gap(7));
        f.written(1).unwrap();
        f.written(2).unwrap();
        f.written(3).unwrap();
        assert_eq!(f.acked(3), Some(Sent::Message(11)));
        f.written(4).unwrap();
        assert_eq!(f.acked(2), Some(Sent::Message(10)));
        assert_eq!(f.acked(2), None, "a duplicate PUBACK resolves nothing");
        assert_eq!(f.acked(4), Some(Sent::Gap(7)));
        assert_eq!(f.acked(1), Some(Sent::Control));
        assert!(f.is_empty());
    }

    #[test]
    fn pkids_are_reused_after_ack() {
        let mut f: Inflight<u32> = Inflight::default();
        f.queued(Sent::Message(1));
        f.written(1).unwrap();
        f.queued(Sent::Message(2));
        assert_eq!(f.written(1), Err(CorrelationError::PkidInUse(1)));
        let mut f: Inflight<u32> = Inflight::default();
        f.queued(Sent::Message(1));
        f.written(1).unwrap();
        assert_eq!(f.acked(1), Some(Sent::Message(1)));
        f.queued(Sent::Message(2));
        f.written(1).unwrap();
        assert_eq!(f.acked(1), Some(Sent::Message(2)));
    }

    #[test]
    fn reset_returns_everything_unacknowledged() {
        let mut f: Inflight<u32> = Inflight::default();
        for m in 0..4 {
            f.queued(Sent::Message(m));
        }
        f.written(1).unwrap();
        f.written(2).unwrap();
        assert_eq!(f.acked(1), Some(Sent::Message(0)));
        let mut left = f.reset();
        left.sort_by_key(|s| match s {
            Sent::Message(m) => *m,
            _ => 99,
        });
        assert_eq!(left, vec![Sent::Message(1), Sent::Message(2), Sent::Message(3)]);
        assert!(f.is_empty());
        assert_eq!(f.written(5), Err(CorrelationError::UnexpectedOutgoing(5)));
    }
}
