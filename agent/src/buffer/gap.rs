//! Why records were lost: the reason every gap event and drop counter carries.

/// The reason of a gap event, as the wire (`_gaps`, `_sli` drops) and the buffer file write it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", from = "String")]
pub enum GapReason {
    /// A `drop_oldest` product's share was full: its oldest messages were deleted.
    BufferFullDropOldest,
    /// A `block` product's share was full: records were not taken.
    BufferFullBlocked,
    /// A `reject_new` product's share was full: the new message was refused.
    BufferFullRejectNew,
    /// The whole buffer was full.
    BufferFull,
    /// The buffer writer was too far behind to take more records.
    WriterOverload,
    /// Records governance dropped for breaking their contract (`on_violation = "drop"`).
    ContractViolation,
    /// A message the egress allow-list no longer admits, dead-lettered just before publishing.
    EgressDenied,
    /// A message governed under older rules that treated a field more weakly than the rules now
    /// do, dead-lettered just before publishing.
    GovernanceChanged,
    /// A message that could not be encoded as Sparkplug B.
    SparkplugEncoding,
    /// The broker refused the message (MQTT 5 reason code >= 0x80).
    BrokerRejected(u8),
    /// The agent stopped without a clean shutdown (power cut, SIGKILL, panic) while these seqs
    /// were numbered but neither committed nor known to be acknowledged: each was either
    /// delivered before the crash or lost with it. The count of records is not known (0).
    Crash,
    /// Storage failed (disk full, I/O errors) while the broker did not acknowledge: messages held
    /// in memory beyond its bound were dropped before any commit could take them. Each was
    /// either delivered before (keep it) or lost.
    StorageUnavailable,
    /// The buffer file was found damaged at start and moved aside: every message of the product
    /// in `epoch` or an earlier epoch that was not received by the end of the replay (of what
    /// could be salvaged) is lost. `to_seq` is `u64::MAX` (the whole epoch) and the count is not
    /// known (0).
    BufferCorrupt,
    /// A reason this build does not know (written by another version).
    Other(String),
}

impl GapReason {
    pub fn as_str(&self) -> std::borrow::Cow<'static, str> {
        use std::borrow::Cow::Borrowed;
        match self {
            GapReason::BufferFullDropOldest => Borrowed("buffer_full_drop_oldest"),
            GapReason::BufferFullBlocked => Borrowed("buffer_full_blocked"),
            GapReason::BufferFullRejectNew => Borrowed("buffer_full_reject_new"),
            GapReason::BufferFull => Borrowed("buffer_full"),
            GapReason::WriterOverload => Borrowed("writer_overload"),
            GapReason::ContractViolation => Borrowed("contract_violation"),
            GapReason::EgressDenied => Borrowed("egress_denied"),
            GapReason::GovernanceChanged => Borrowed("governance_changed"),
            GapReason::SparkplugEncoding => Borrowed("sparkplug_encoding"),
            GapReason::BrokerRejected(code) => format!("broker_rejected_0x{code:02x}").into(),
            GapReason::Crash => Borrowed("crash"),
            GapReason::BufferCorrupt => Borrowed("buffer_corrupt"),
            GapReason::StorageUnavailable => Borrowed("storage_unavailable"),
            GapReason::Other(s) => s.clone().into(),
        }
    }

    pub fn parse(s: &str) -> GapReason {
        match s {
            "buffer_full_drop_oldest" => GapReason::BufferFullDropOldest,
            "buffer_full_blocked" => GapReason::BufferFullBlocked,
            "buffer_full_reject_new" => GapReason::BufferFullRejectNew,
            "buffer_full" => GapReason::BufferFull,
            "writer_overload" => GapReason::WriterOverload,
            "contract_violation" => GapReason::ContractViolation,
            "egress_denied" => GapReason::EgressDenied,
            "governance_changed" => GapReason::GovernanceChanged,
            "sparkplug_encoding" => GapReason::SparkplugEncoding,
            "crash" => GapReason::Crash,
            "buffer_corrupt" => GapReason::BufferCorrupt,
            "storage_unavailable" => GapReason::StorageUnavailable,
            _ => match s.strip_prefix("broker_rejected_0x").map(|h| u8::from_str_radix(h, 16)) {
                Some(Ok(code)) => GapReason::BrokerRejected(code),
                _ => GapReason::Other(s.to_string()),
            },
        }
    }
}

impl std::fmt::Display for GapReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.as_str())
    }
}

impl From<GapReason> for String {
    fn from(r: GapReason) -> String {
        r.as_str().into_owned()
    }
}

impl From<String> for GapReason {
    fn from(s: String) -> GapReason {
        GapReason::parse(&s)
    }
}

impl PartialEq<&str> for GapReason {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_reads_back_as_written() {
        let all = [
            GapReason::BufferFullDropOldest,
            GapReason::BufferFullBlocked,
            GapReason::BufferFullRejectNew,
            GapReason::BufferFull,
            GapReason::WriterOverload,
            GapReason::ContractViolation,
            GapReason::EgressDenied,
            GapReason::GovernanceChanged,
            GapReason::SparkplugEncoding,
            GapReason::BrokerRejected(0x97),
            GapReason::Crash,
            GapReason::BufferCorrupt,
            GapReason::StorageUnavailable,
            GapReason::Other("from_a_newer_agent".into()),
        ];
        for r in all {
            assert_eq!(GapReason::parse(&r.as_str()), r);
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
            assert_eq!(serde_json::from_str::<GapReason>(&json).unwrap(), r);
        }
        assert_eq!(GapReason::BrokerRejected(0x87).as_str(), "broker_rejected_0x87");
    }
}
