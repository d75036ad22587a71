//! Types shared by the plantmesh agent and the sensor-node firmware: qualities, and the sensor-node
//! link's frames ([`link`]).
//!
//! `no_std`, no allocator: everything here fits on a small MCU. The agent uses the same
//! quality vocabulary for every source (Modbus, OPC UA, MQTT, sensor nodes), so a reading's quality
//! means the same thing wherever it came from.
#![no_std]
#![forbid(unsafe_code)]

pub mod link;

use core::fmt;
use serde::{Deserialize, Serialize};

/// How far a reading can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Quality {
    /// The device answered with a value that decoded cleanly.
    Good,
    /// No usable value: the reason says why.
    Bad(BadReason),
    /// The last good value is older than the source's freshness limit.
    Stale,
    /// A value the source itself marks as uncertain (OPC UA `Uncertain*` status codes).
    Uncertain(BadReason),
}

/// Why a reading is bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum BadReason {
    /// The device answered with a Modbus exception (the function's exception code).
    ModbusException(u8),
    /// The device did not answer within the configured timeout.
    Timeout,
    /// No connection to the device.
    Disconnected,
    /// The device answered, but the answer could not be decoded (wrong length, invalid text, NaN...).
    Decode,
    /// A frame failed its CRC check.
    Crc,
    /// The source has not delivered a value for this tag yet.
    NoValue,
    /// An OPC UA StatusCode (the full 32-bit code).
    OpcUa(u32),
    /// Outside the valid range of the product contract.
    OutOfRange,
    /// A field the product contract requires has no good value.
    RequiredMissing,
    /// A sensor node reported the channel faulty.
    Sensor(link::FaultCode),
    /// A sensor node's frames stopped arriving, or some were lost.
    LinkLost,
    /// A retained MQTT message, delivered on subscribing: a last known value, not a fresh reading.
    Retained,
}

impl Quality {
    /// True for [`Quality::Good`].
    pub const fn is_good(self) -> bool {
        matches!(self, Quality::Good)
    }
}

impl fmt::Display for Quality {
    /// The wire form used in product messages: `good`, `stale`, or `bad:<reason>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Quality::Good => f.write_str("good"),
            Quality::Stale => f.write_str("stale"),
            Quality::Bad(reason) => write!(f, "bad:{reason}"),
            Quality::Uncertain(reason) => write!(f, "uncertain:{reason}"),
        }
    }
}

impl fmt::Display for BadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadReason::ModbusException(code) => {
                write!(f, "modbus_exception_{code:02x}")?;
                match modbus_exception_name(*code) {
                    Some(name) => write!(f, "_{name}"),
                    None => Ok(()),
                }
            }
            BadReason::Timeout => f.write_str("timeout"),
            BadReason::Disconnected => f.write_str("disconnected"),
            BadReason::Decode => f.write_str("decode"),
            BadReason::Crc => f.write_str("crc"),
            BadReason::NoValue => f.write_str("no_value"),
            BadReason::OpcUa(code) => write!(f, "opcua_0x{code:08x}"),
            BadReason::OutOfRange => f.write_str("out_of_range"),
            BadReason::RequiredMissing => f.write_str("required_missing"),
            BadReason::Sensor(code) => write!(f, "sensor_{}", code.name()),
            BadReason::LinkLost => f.write_str("link_lost"),
            BadReason::Retained => f.write_str("retained"),
        }
    }
}

/// The name of a standard Modbus exception code (Modbus Application Protocol v1.1b3, section 7).
pub const fn modbus_exception_name(code: u8) -> Option<&'static str> {
    Some(match code {
        0x01 => "illegal_function",
        0x02 => "illegal_data_address",
        0x03 => "illegal_data_value",
        0x04 => "server_device_failure",
        0x05 => "acknowledge",
        0x06 => "server_device_busy",
        0x08 => "memory_parity_error",
        0x0A => "gateway_path_unavailable",
        0x0B => "gateway_target_device_failed_to_respond",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::string::ToString;

    #[test]
    fn wire_names_are_stable() {
        assert_eq!(Quality::Good.to_string(), "good");
        assert_eq!(Quality::Stale.to_string(), "stale");
        assert_eq!(Quality::Bad(BadReason::Timeout).to_string(), "bad:timeout");
        assert_eq!(
            Quality::Bad(BadReason::ModbusException(2)).to_string(),
            "bad:modbus_exception_02_illegal_data_address"
        );
        assert_eq!(
            Quality::Bad(BadReason::ModbusException(0x7f)).to_string(),
            "bad:modbus_exception_7f"
        );
    }
}
