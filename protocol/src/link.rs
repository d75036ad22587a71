//! The sensor-node link: frames from a node's serial port to the agent (byte-level spec in
//! `docs/wire-format.md`, section "Sensor-node link").
//!
//! A frame on the wire is `COBS(VERSION ++ postcard(Frame) ++ crc16(VERSION ++ postcard(Frame))) ++ 0x00`,
//! with the CRC little endian (CRC-16/IBM-SDLC, the X.25 CRC). Every frame carries the node's sequence
//! number and uptime, so the agent sees lost frames (a gap in `seq`) and reboots (`seq` or uptime going
//! back, or a new hello). Encoding needs no allocator; decoding is a byte-at-a-time state machine that
//! never panics, bounds its buffer, and resynchronises at the next 0x00 after any error.

use heapless::{String, Vec};
use serde::{Deserialize, Serialize};

/// The frame format version, the first byte inside every frame.
pub const VERSION: u8 = 1;
/// Most channels one node announces.
pub const MAX_CHANNELS: usize = 8;
/// Largest `VERSION ++ postcard(Frame) ++ crc` a node may send.
pub const MAX_RAW: usize = 512;
/// Largest frame on the wire, delimiter included.
pub const MAX_FRAME: usize = cobs::max_encoding_length(MAX_RAW) + 1;

const CRC: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_IBM_SDLC);

/// One frame: the node's sequence number and uptime, and what it says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Frame {
    /// Counts every frame the node sends since it booted, from 0; wraps at 2^32.
    pub seq: u32,
    /// Milliseconds since the node booted; wraps after ~49 days.
    pub uptime_ms: u32,
    pub msg: Message,
}

// No allocator to box the hello in; one 536-byte enum on the stack is affordable even on an M0.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Sent at boot and every few minutes: who the node is and what its channels mean.
    Hello(Hello),
    /// One reading per channel that could be read this cycle.
    Samples(Vec<Sample, MAX_CHANNELS>),
    /// Sent when there is nothing else to say, so silence means a dead link.
    Heartbeat,
    /// A channel could not be read (the agent marks it bad with this reason).
    Fault(Fault),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Unique per node (e.g. from the MCU's unique id).
    pub node_id: u32,
    /// Firmware version `[major, minor, patch]`.
    pub firmware: [u8; 3],
    pub channels: Vec<ChannelInfo, MAX_CHANNELS>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelInfo {
    pub index: u8,
    pub kind: ChannelKind,
    /// Name the agent gives the channel's tag (`[a-z0-9_]`).
    pub name: String<16>,
    /// UCUM unit of `raw * scale + offset`.
    pub unit: String<12>,
    pub scale: f32,
    pub offset: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChannelKind {
    Temperature,
    Humidity,
    /// A 4-20 mA loop, scaled to engineering units.
    Loop4To20mA,
    Voltage,
    Vibration,
    Pressure,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    pub channel: u8,
    /// The value is `raw * scale + offset` of the channel.
    pub raw: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    pub channel: u8,
    pub code: FaultCode,
}

/// Why a channel could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FaultCode {
    /// The sensor did not acknowledge its address.
    Nack,
    /// Any other bus error.
    Bus,
    /// The sensor's own CRC over its data did not match.
    SensorCrc,
    /// A 4-20 mA loop below 3.8 mA: the wire is broken (or the transmitter dead).
    WireBreak,
    /// Above the channel's measuring range (a 4-20 mA loop above 20.5 mA, an ADC at full scale).
    OverRange,
    /// The sensor had no conversion ready in time.
    NotReady,
}

impl FaultCode {
    pub const fn name(self) -> &'static str {
        match self {
            FaultCode::Nack => "nack",
            FaultCode::Bus => "bus",
            FaultCode::SensorCrc => "sensor_crc",
            FaultCode::WireBreak => "wire_break",
            FaultCode::OverRange => "over_range",
            FaultCode::NotReady => "not_ready",
        }
    }
}

/// Why an encode failed (only a frame larger than [`MAX_RAW`], which a node's fixed-size messages
/// cannot reach).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge;

/// Encodes `frame` into `out` (at least [`MAX_FRAME`] bytes), delimiter included; returns the length.
pub fn encode(frame: &Frame, out: &mut [u8]) -> Result<usize, TooLarge> {
    let mut raw = [0u8; MAX_RAW];
    raw[0] = VERSION;
    let body = postcard::to_slice(frame, &mut raw[1..MAX_RAW - 2]).map_err(|_| TooLarge)?;
    let n = 1 + body.len();
    let crc = CRC.checksum(&raw[..n]).to_le_bytes();
    raw[n..n + 2].copy_from_slice(&crc);
    let len = cobs::try_encode(&raw[..n + 2], out).map_err(|_| TooLarge)?;
    *out.get_mut(len).ok_or(TooLarge)? = 0;
    Ok(len + 1)
}

/// Why bytes between two delimiters were not a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameError {
    /// More than [`MAX_FRAME`] bytes without a delimiter: dropped up to the next one.
    Oversized,
    /// Not valid COBS.
    Cobs,
    /// Shorter than a version byte and a CRC.
    Truncated,
    /// The CRC did not match.
    Crc,
    /// A frame version this decoder does not know.
    Version(u8),
    /// The CRC matched, but the payload is not a frame (a sender bug, not line noise).
    Payload,
}

/// Reassembles frames from a byte stream.
pub struct Decoder {
    buf: [u8; MAX_FRAME],
    len: usize,
    /// Set after an oversized run: bytes are dropped until the next delimiter.
    skipping: bool,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            buf: [0; MAX_FRAME],
            len: 0,
            skipping: false,
        }
    }
}

impl Decoder {
    /// Feeds one byte; at a delimiter, returns what the bytes since the last one were. Empty runs
    /// (two delimiters in a row, used by senders to flush a receiver) return nothing.
    pub fn push(&mut self, byte: u8) -> Option<Result<Frame, FrameError>> {
        if byte != 0 {
            if self.skipping {
                return None;
            }
            if self.len == self.buf.len() {
                self.len = 0;
                self.skipping = true;
                return Some(Err(FrameError::Oversized));
            }
            self.buf[self.len] = byte;
            self.len += 1;
            return None;
        }
        let n = core::mem::take(&mut self.len);
        if core::mem::take(&mut self.skipping) || n == 0 {
            return None;
        }
        Some(decode_raw(&mut self.buf[..n]))
    }
}

/// Decodes the bytes between two delimiters (in place).
pub fn decode_raw(bytes: &mut [u8]) -> Result<Frame, FrameError> {
    let n = cobs::decode_in_place(bytes).map_err(|_| FrameError::Cobs)?;
    let raw = bytes.get(..n).ok_or(FrameError::Cobs)?;
    if raw.len() < 3 {
        return Err(FrameError::Truncated);
    }
    let (body, crc) = raw.split_at(raw.len() - 2);
    if CRC.checksum(body).to_le_bytes() != [crc[0], crc[1]] {
        return Err(FrameError::Crc);
    }
    if body[0] != VERSION {
        return Err(FrameError::Version(body[0]));
    }
    match postcard::take_from_bytes::<Frame>(&body[1..]) {
        Ok((frame, [])) => Ok(frame),
        _ => Err(FrameError::Payload),
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use proptest::prelude::*;
    use std::vec::Vec as StdVec;

    fn channel(i: u8) -> ChannelInfo {
        ChannelInfo {
            index: i,
            kind: ChannelKind::Loop4To20mA,
            name: String::try_from("pressure_in").unwrap(),
            unit: String::try_from("bar").unwrap(),
            scale: 0.001,
            offset: 0.0,
        }
    }

    fn wire(frames: &[Frame]) -> StdVec<u8> {
        let mut out = StdVec::new();
        for f in frames {
            let mut buf = [0u8; MAX_FRAME];
            let n = encode(f, &mut buf).unwrap();
            out.extend_from_slice(&buf[..n]);
        }
        out
    }

    fn decode_all(bytes: &[u8]) -> StdVec<Result<Frame, FrameError>> {
        let mut d = Decoder::default();
        bytes.iter().filter_map(|b| d.push(*b)).collect()
    }

    fn any_frame() -> impl Strategy<Value = Frame> {
        let msg = prop_oneof![
            Just(Message::Heartbeat),
            (0u8..8, any::<i32>()).prop_map(|(c, raw)| {
                let mut v = Vec::new();
                for i in 0..=c {
                    v.push(Sample {
                        channel: i,
                        raw: raw.wrapping_add(i32::from(i)),
                    })
                    .unwrap();
                }
                Message::Samples(v)
            }),
            (any::<u32>(), 0u8..=8).prop_map(|(node_id, n)| {
                Message::Hello(Hello {
                    node_id,
                    firmware: [1, 2, 3],
                    channels: (0..n).map(channel).collect(),
                })
            }),
            (any::<u8>(), 0usize..6).prop_map(|(channel, c)| {
                let code = [
                    FaultCode::Nack,
                    FaultCode::Bus,
                    FaultCode::SensorCrc,
                    FaultCode::WireBreak,
                    FaultCode::OverRange,
                    FaultCode::NotReady,
                ][c];
                Message::Fault(Fault { channel, code })
            }),
        ];
        (any::<u32>(), any::<u32>(), msg).prop_map(|(seq, uptime_ms, msg)| Frame { seq, uptime_ms, msg })
    }

    proptest! {
        #[test]
        fn every_frame_round_trips(frames in proptest::collection::vec(any_frame(), 1..20)) {
            let bytes = wire(&frames);
            prop_assert!(bytes.iter().filter(|b| **b == 0).count() == frames.len(), "0x00 only as delimiter");
            let got: StdVec<Frame> = decode_all(&bytes).into_iter().map(Result::unwrap).collect();
            prop_assert_eq!(got, frames);
        }

        #[test]
        fn garbage_never_panics_and_the_next_good_frame_decodes(
            noise in proptest::collection::vec(any::<u8>(), 0..2000),
            frame in any_frame(),
        ) {
            // Noise straight into two good frames: at most the first is lost to
            // resynchronisation (it merges with the noise before it), never the second.
            let mut bytes = noise.clone();
            let good = wire(&[frame.clone(), frame.clone()]);
            bytes.extend_from_slice(&good);
            let out = decode_all(&bytes);
            prop_assert_eq!(out.last().cloned(), Some(Ok(frame)));
        }

        #[test]
        fn a_flipped_bit_is_never_a_different_frame(frame in any_frame(), at in any::<usize>(), bit in 0u8..8) {
            let mut bytes = wire(core::slice::from_ref(&frame));
            let i = at % (bytes.len() - 1);
            bytes[i] ^= 1 << bit;
            for f in decode_all(&bytes).into_iter().flatten() {
                prop_assert_eq!(f, frame.clone());
            }
        }
    }

    #[test]
    fn errors_are_named() {
        let f = Frame {
            seq: 7,
            uptime_ms: 1000,
            msg: Message::Heartbeat,
        };
        let mut bytes = wire(core::slice::from_ref(&f));
        // Bad CRC.
        let mut bad = bytes.clone();
        bad[2] ^= 0x40;
        assert_eq!(decode_all(&bad), [Err(FrameError::Crc)]);
        // Truncated: the tail of a frame after a delimiter.
        assert_eq!(decode_all(&[0x02, 0x01, 0x00]), [Err(FrameError::Truncated)]);
        // Oversized: reported once, then the next frame decodes.
        let mut long = std::vec![0x55u8; MAX_FRAME + 10];
        long.push(0);
        long.extend_from_slice(&bytes);
        assert_eq!(decode_all(&long), [Err(FrameError::Oversized), Ok(f.clone())]);
        // A future version, with a valid CRC.
        let mut raw = [0u8; MAX_RAW];
        raw[0] = 9;
        let body = postcard::to_slice(&f, &mut raw[1..]).unwrap().len();
        let crc = CRC.checksum(&raw[..1 + body]).to_le_bytes();
        raw[1 + body..3 + body].copy_from_slice(&crc);
        let mut enc = [0u8; MAX_FRAME];
        let n = cobs::encode(&raw[..3 + body], &mut enc);
        assert_eq!(decode_all(&[&enc[..n], &[0]].concat()), [Err(FrameError::Version(9))]);
        // Two delimiters in a row are nothing.
        bytes.insert(0, 0);
        assert_eq!(decode_all(&bytes), [Ok(f)]);
    }

    #[test]
    fn the_largest_hello_fits() {
        let hello = Frame {
            seq: u32::MAX,
            uptime_ms: u32::MAX,
            msg: Message::Hello(Hello {
                node_id: u32::MAX,
                firmware: [255; 3],
                channels: (0..MAX_CHANNELS as u8)
                    .map(|i| ChannelInfo {
                        name: String::try_from("abcdefghijklmnop").unwrap(),
                        unit: String::try_from("abcdefghijkl").unwrap(),
                        ..channel(i)
                    })
                    .collect(),
            }),
        };
        let mut buf = [0u8; MAX_FRAME];
        let n = encode(&hello, &mut buf).unwrap();
        assert!(n <= MAX_FRAME);
        assert_eq!(decode_all(&buf[..n]), [Ok(hello)]);
    }
}
