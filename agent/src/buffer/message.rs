//! A buffered message: its identity, the bytes it is stored as (formats 1 and 2), and the merge
//! of a run of backlog messages into one before its first send.

use super::ProductKey;
use crate::model::Millis;
use std::sync::Arc;

/// Bytes of bookkeeping counted per message on top of its value (key and page overhead, roughly).
pub(super) const PER_MESSAGE_OVERHEAD: u64 = 48;

/// Identity of a message within its product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId {
    pub epoch: u64,
    pub seq: u64,
}

/// A message as stored and as read back for publishing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub product: ProductKey,
    /// The product version's name, `{id}.v{major}`.
    pub name: Arc<str>,
    pub id: MessageId,
    pub created: Millis,
    pub records: u32,
    pub topic: String,
    pub version: String,
    /// Fingerprint of the governance treatment the records were governed under
    /// ([`crate::govern::Treatment`]); [`crate::govern::treatment::UNKNOWN`] for messages of
    /// format 1, written before messages carried one.
    pub governance: u64,
    /// The last seq this message stands for: its own, or, for backlog messages merged into one
    /// before their first send, the seq of the last one merged (`id.seq..=last_seq`).
    pub last_seq: u64,
    /// The JSON array of records.
    pub body: Vec<u8>,
}

/// The checksum of a format 3 value: it binds the bytes to their key, so that a page read at the
/// wrong place does not pass for another message.
fn checksum(name: &str, id: MessageId, bytes: &[u8]) -> u64 {
    crate::config::fnv1a64(&[
        name.as_bytes(),
        &[0],
        &id.epoch.to_le_bytes(),
        &id.seq.to_le_bytes(),
        bytes,
    ])
}

impl StoredMessage {
    /// Format 3: `3, created u64, records u32, governance u64, last_seq u64, topic (u16 length),
    /// version (u8 length), body, checksum u64` (FNV-1a 64 of the key, `name`, epoch and seq, and
    /// everything before it), little-endian. Format 2 is the same without the checksum; format 1 is `1, created, records,
    /// topic, version, body` (no governance, `last_seq` its own seq).
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(40 + self.topic.len() + self.version.len() + self.body.len());
        v.push(3u8); // format version
        v.extend(self.created.to_le_bytes());
        v.extend(self.records.to_le_bytes());
        v.extend(self.governance.to_le_bytes());
        v.extend(self.last_seq.to_le_bytes());
        v.extend((self.topic.len() as u16).to_le_bytes());
        v.extend(self.topic.as_bytes());
        v.push(self.version.len() as u8);
        v.extend(self.version.as_bytes());
        v.extend(&self.body);
        v.extend(checksum(&self.name, self.id, &v).to_le_bytes());
        v
    }

    /// Whether a stored value is as it was written, under this key: its checksum matches
    /// (formats 1 and 2 have none, and are taken as they are). Checked when a damaged file is
    /// salvaged.
    pub(super) fn intact(name: &str, id: MessageId, b: &[u8]) -> bool {
        match (b.first(), b.len().checked_sub(8)) {
            (Some(3), Some(end)) if end > 0 => b[end..] == checksum(name, id, &b[..end]).to_le_bytes(),
            (Some(1 | 2), _) => true,
            _ => false,
        }
    }

    pub(super) fn decode(product: ProductKey, name: &Arc<str>, id: MessageId, b: &[u8]) -> Option<StoredMessage> {
        let b = match b.first() {
            Some(3) => b.get(..b.len().checked_sub(8)?)?,
            _ => b,
        };
        let (governance, last_seq, t) = match b.first() {
            Some(1) => (crate::govern::treatment::UNKNOWN, id.seq, 13),
            Some(2 | 3) => (
                u64::from_le_bytes(b.get(13..21)?.try_into().ok()?),
                u64::from_le_bytes(b.get(21..29)?.try_into().ok()?).max(id.seq),
                29,
            ),
            _ => return None,
        };
        let created = u64::from_le_bytes(b.get(1..9)?.try_into().ok()?);
        let records = u32::from_le_bytes(b.get(9..13)?.try_into().ok()?);
        let tl = usize::from(u16::from_le_bytes(b.get(t..t + 2)?.try_into().ok()?));
        let topic = std::str::from_utf8(b.get(t + 2..t + 2 + tl)?).ok()?.to_string();
        let vl = usize::from(*b.get(t + 2 + tl)?);
        let vs = t + 3 + tl;
        let version = std::str::from_utf8(b.get(vs..vs + vl)?).ok()?.to_string();
        Some(StoredMessage {
            product,
            name: name.clone(),
            id,
            created,
            records,
            topic,
            version,
            governance,
            last_seq,
            body: b.get(vs + vl..)?.to_vec(),
        })
    }

    pub(super) fn size(&self) -> u64 {
        (40 + self.topic.len() + self.version.len() + self.body.len() + self.name.len()) as u64 + PER_MESSAGE_OVERHEAD
    }
}

/// A message to append; the store gives it its `(epoch, seq)`.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub product: ProductKey,
    pub created: Millis,
    pub records: u32,
    pub topic: String,
    pub version: String,
    /// See [`StoredMessage::governance`].
    pub governance: u64,
    pub body: Vec<u8>,
}

impl StoredMessage {
    /// One message standing for a run of consecutive messages of one stream (each following the
    /// last, one topic, version and treatment; at least two): the first's id, the last's
    /// `last_seq`, every record in order. `None` for anything else.
    pub(super) fn merge(parts: &[StoredMessage]) -> Option<StoredMessage> {
        let whole = parts.len() >= 2
            && parts.windows(2).all(|w| {
                w[1].id.epoch == w[0].id.epoch
                    && w[1].id.seq == w[0].last_seq + 1
                    && w[1].topic == w[0].topic
                    && w[1].version == w[0].version
                    && w[1].governance == w[0].governance
            });
        if !whole {
            return None;
        }
        let mut body = Vec::with_capacity(parts.iter().map(|m| m.body.len()).sum());
        for (i, m) in parts.iter().enumerate() {
            let inner = m
                .body
                .strip_prefix(b"[")
                .and_then(|b| b.strip_suffix(b"]"))
                .unwrap_or(&[]);
            body.push(if i == 0 { b'[' } else { b',' });
            body.extend_from_slice(inner);
        }
        body.push(b']');
        let (first, last) = (&parts[0], &parts[parts.len() - 1]);
        Some(StoredMessage {
            product: first.product,
            name: first.name.clone(),
            id: first.id,
            created: parts.iter().map(|m| m.created).min().unwrap_or(first.created),
            records: parts.iter().map(|m| m.records).sum(),
            topic: first.topic.clone(),
            version: first.version.clone(),
            governance: first.governance,
            last_seq: last.last_seq,
            body,
        })
    }
}
