//! plantmesh sensor-node firmware library: reads sensors over I2C and sends their readings to the
//! agent as framed messages on a serial line (see `plantmesh_protocol::link`).
//!
//! Portable: generic over embedded-hal 1.0 ([`I2c`], [`DelayNs`]) and an `embedded-hal-nb` serial
//! writer, so a board crate only wires its peripherals in. `no_std`, no allocator, and panic-free on
//! any sensor or bus data: a sensor that NACKs, times out, fails its CRC or reports an open loop
//! becomes a `Fault` frame for its channel; the other channels keep reporting. Each cycle ends with
//! one `Samples` frame.
//!
//! Channels, in order: `temperature` (0.01 Cel) and `humidity` (0.01 %) when an SHT3x is fitted,
//! then one channel per 4-20 mA loop on the ADS1115 (0.001 of the loop's unit).
#![no_std]

pub mod ads1115;
pub mod sht3x;
#[cfg(feature = "sim")]
pub mod sim;

use ads1115::{Ads1115, Loop};
use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::I2c;
use heapless::{String, Vec};
use protocol::link::{self, ChannelInfo, ChannelKind, Fault, Frame, Hello, Message, Sample, MAX_CHANNELS, MAX_FRAME};
use sht3x::Sht3x;

/// Most 4-20 mA loops (the ADS1115 has four single-ended inputs).
pub const MAX_LOOPS: usize = 4;

/// A 4-20 mA loop channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopChannel {
    pub adc: Loop,
    /// Tag name the agent gives the channel (`[a-z0-9_]`, at most 16 bytes).
    pub name: &'static str,
    /// UCUM unit (at most 12 bytes).
    pub unit: &'static str,
}

/// What a node has fitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub node_id: u32,
    pub firmware: [u8; 3],
    /// SHT3x I2C address, when fitted.
    pub sht3x: Option<u8>,
    /// ADS1115 I2C address, when fitted.
    pub ads1115: Option<u8>,
    pub loops: Vec<LoopChannel, MAX_LOOPS>,
    /// A hello every this many cycles (and at boot), so an agent started later learns the channels.
    pub hello_every: u32,
}

/// What the node did, for a board's status LED or debug output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeStats {
    pub frames: u32,
    pub faults: u32,
    /// Frames the serial writer refused (dropped; the agent sees the gap in `seq`).
    pub write_errors: u32,
}

pub struct Node<I, D, S> {
    i2c: I,
    delay: D,
    serial: S,
    cfg: NodeConfig,
    seq: u32,
    cycles: u32,
    pub stats: NodeStats,
}

impl<I, D, S> Node<I, D, S>
where
    I: I2c,
    D: DelayNs,
    S: embedded_hal_nb::serial::Write<u8>,
{
    pub fn new(i2c: I, delay: D, serial: S, cfg: NodeConfig) -> Self {
        Node {
            i2c,
            delay,
            serial,
            cfg,
            seq: 0,
            cycles: 0,
            stats: NodeStats::default(),
        }
    }

    /// The channels this node announces.
    pub fn channels(&self) -> Vec<ChannelInfo, MAX_CHANNELS> {
        let mut out = Vec::new();
        if self.cfg.sht3x.is_some() {
            let _ = out.push(info(0, ChannelKind::Temperature, "temperature", "Cel", 0.01));
            let _ = out.push(info(1, ChannelKind::Humidity, "humidity", "%", 0.01));
        }
        if self.cfg.ads1115.is_some() {
            for l in &self.cfg.loops {
                let index = out.len() as u8;
                let _ = out.push(info(index, ChannelKind::Loop4To20mA, l.name, l.unit, 0.001));
            }
        }
        out
    }

    /// Announces the node and its channels.
    pub fn hello(&mut self, uptime_ms: u32) {
        let msg = Message::Hello(Hello {
            node_id: self.cfg.node_id,
            firmware: self.cfg.firmware,
            channels: self.channels(),
        });
        self.send(uptime_ms, msg);
    }

    /// One measurement cycle: a hello when due, every channel read, one `Fault` frame per channel
    /// that could not be read, then one `Samples` frame with what could.
    pub fn cycle(&mut self, uptime_ms: u32) {
        if self.cycles.is_multiple_of(self.cfg.hello_every.max(1)) {
            self.hello(uptime_ms);
        }
        self.cycles = self.cycles.wrapping_add(1);
        let mut samples: Vec<Sample, MAX_CHANNELS> = Vec::new();
        let mut faults: Vec<Fault, MAX_CHANNELS> = Vec::new();
        let mut next = 0u8;
        if let Some(addr) = self.cfg.sht3x {
            match Sht3x::new(addr).measure(&mut self.i2c, &mut self.delay) {
                Ok(m) => {
                    let _ = samples.push(Sample {
                        channel: 0,
                        raw: m.centi_celsius,
                    });
                    let _ = samples.push(Sample {
                        channel: 1,
                        raw: m.centi_percent_rh,
                    });
                }
                Err(code) => {
                    let _ = faults.push(Fault { channel: 0, code });
                    let _ = faults.push(Fault { channel: 1, code });
                }
            }
            next = 2;
        }
        if let Some(addr) = self.cfg.ads1115 {
            let adc = Ads1115::new(addr);
            for i in 0..self.cfg.loops.len() {
                let l = self.cfg.loops[i];
                let channel = next + i as u8;
                match adc
                    .read(&mut self.i2c, &mut self.delay, l.adc.input)
                    .and_then(|raw| l.adc.value_milli(raw))
                {
                    Ok(raw) => {
                        let _ = samples.push(Sample { channel, raw });
                    }
                    Err(code) => {
                        let _ = faults.push(Fault { channel, code });
                    }
                }
            }
        }
        // Faults first, then the samples: a `Samples` frame (empty when nothing could be read) ends
        // every cycle, so the agent publishes each cycle once, faults included.
        for f in faults {
            self.stats.faults = self.stats.faults.wrapping_add(1);
            self.send(uptime_ms, Message::Fault(f));
        }
        self.send(uptime_ms, Message::Samples(samples));
    }

    /// Says the node is alive when it has nothing else to say.
    pub fn heartbeat(&mut self, uptime_ms: u32) {
        self.send(uptime_ms, Message::Heartbeat);
    }

    /// The bus and the serial writer, between cycles (a board may share them; a simulation
    /// changes what its simulated sensors read).
    pub fn parts_mut(&mut self) -> (&mut I, &mut S) {
        (&mut self.i2c, &mut self.serial)
    }

    /// The node's parts back (a board may need its bus or UART for something else).
    pub fn release(self) -> (I, D, S) {
        (self.i2c, self.delay, self.serial)
    }

    fn send(&mut self, uptime_ms: u32, msg: Message) {
        let frame = Frame {
            seq: self.seq,
            uptime_ms,
            msg,
        };
        // The sequence number counts frames attempted, so a frame lost here shows as a gap.
        self.seq = self.seq.wrapping_add(1);
        let mut buf = [0u8; MAX_FRAME];
        let Ok(n) = link::encode(&frame, &mut buf) else {
            self.stats.write_errors = self.stats.write_errors.wrapping_add(1);
            return;
        };
        for b in &buf[..n] {
            if nb::block!(self.serial.write(*b)).is_err() {
                self.stats.write_errors = self.stats.write_errors.wrapping_add(1);
                return;
            }
        }
        let _ = nb::block!(self.serial.flush());
        self.stats.frames = self.stats.frames.wrapping_add(1);
    }
}

fn info(index: u8, kind: ChannelKind, name: &str, unit: &str, scale: f32) -> ChannelInfo {
    ChannelInfo {
        index,
        kind,
        name: truncated(name),
        unit: truncated(unit),
        scale,
        offset: 0.0,
    }
}

/// As much of `s` as fits, cut at a character boundary.
fn truncated<const N: usize>(s: &str) -> String<N> {
    let mut out = String::new();
    for c in s.chars() {
        if out.push(c).is_err() {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use embedded_hal::i2c::{ErrorKind, NoAcknowledgeSource};
    use embedded_hal_mock::eh1::delay::NoopDelay;
    use embedded_hal_mock::eh1::i2c::{Mock as I2cMock, Transaction as I2cT};
    use embedded_hal_mock::eh1::serial::{Mock as SerialMock, Transaction as SerialT};
    use std::vec;
    use std::vec::Vec as StdVec;

    fn config() -> NodeConfig {
        NodeConfig {
            node_id: 0x00C0_FFEE,
            firmware: [0, 1, 0],
            sht3x: Some(0x44),
            ads1115: Some(0x48),
            loops: Vec::from_slice(&[LoopChannel {
                adc: Loop {
                    input: 0,
                    shunt_milliohm: 165_000,
                    at_4ma_milli: 0,
                    at_20ma_milli: 10_000,
                },
                name: "pressure",
                unit: "bar",
            }])
            .unwrap(),
            hello_every: 10,
        }
    }

    fn sht_reply(t: u16, rh: u16) -> StdVec<u8> {
        let [a, b] = t.to_be_bytes();
        let [c, d] = rh.to_be_bytes();
        vec![a, b, sht3x::crc8(&[a, b]), c, d, sht3x::crc8(&[c, d])]
    }

    fn adc_reads(counts: i16) -> [I2cT; 3] {
        [
            I2cT::write(0x48, vec![0x01, 0xC3, 0x83]),
            I2cT::write_read(0x48, vec![0x01], vec![0xC3, 0x83]),
            I2cT::write_read(0x48, vec![0x00], counts.to_be_bytes().to_vec()),
        ]
    }

    /// The exact bytes a frame is on the wire, as serial mock expectations.
    fn on_wire(frames: &[Frame]) -> StdVec<SerialT<u8>> {
        let mut out = StdVec::new();
        for f in frames {
            let mut buf = [0u8; MAX_FRAME];
            let n = link::encode(f, &mut buf).unwrap();
            out.push(SerialT::write_many(&buf[..n]));
            out.push(SerialT::flush());
        }
        out
    }

    #[test]
    fn a_cycle_sends_hello_then_samples_of_every_channel() {
        // 12 mA across 165 Ω = 1.98 V = 15840 counts: 5.000 bar.
        let mut i2c = I2cMock::new(
            &[
                vec![
                    I2cT::write(0x44, vec![0x24, 0x00]),
                    I2cT::read(0x44, sht_reply(0x6666, 0x8000)),
                ],
                adc_reads(15_840).to_vec(),
            ]
            .concat(),
        );
        let node_probe = Node::new(I2cMock::new(&[]), NoopDelay, SerialMock::new(&[]), config());
        let hello = Frame {
            seq: 0,
            uptime_ms: 1_000,
            msg: Message::Hello(Hello {
                node_id: 0x00C0_FFEE,
                firmware: [0, 1, 0],
                channels: node_probe.channels(),
            }),
        };
        let (mut a, _, mut b) = node_probe.release();
        a.done();
        b.done();
        let samples = Frame {
            seq: 1,
            uptime_ms: 1_000,
            msg: Message::Samples(
                Vec::from_slice(&[
                    Sample { channel: 0, raw: 2500 },
                    Sample { channel: 1, raw: 5000 },
                    Sample { channel: 2, raw: 5000 },
                ])
                .unwrap(),
            ),
        };
        let mut serial = SerialMock::new(&on_wire(&[hello, samples]));
        let mut node = Node::new(i2c.clone(), NoopDelay, serial.clone(), config());
        node.cycle(1_000);
        assert_eq!(
            node.stats,
            NodeStats {
                frames: 2,
                faults: 0,
                write_errors: 0
            }
        );
        i2c.done();
        serial.done();
    }

    #[test]
    fn sensor_errors_become_fault_frames_and_the_other_channels_still_report() {
        let mut cfg = config();
        cfg.loops
            .push(LoopChannel {
                name: "flow",
                ..cfg.loops[0]
            })
            .unwrap();
        cfg.loops[1].adc.input = 1;
        let mut crc_broken = sht_reply(0x6666, 0x8000);
        crc_broken[5] ^= 1;
        // The SHT3x CRC fails (both its channels), loop 0 is open (0 mA), loop 1's ADC NACKs.
        let mut i2c = I2cMock::new(
            &[
                vec![I2cT::write(0x44, vec![0x24, 0x00]), I2cT::read(0x44, crc_broken)],
                adc_reads(0).to_vec(),
                vec![I2cT::write(0x48, vec![0x01, 0xD3, 0x83])
                    .with_error(ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address))],
            ]
            .concat(),
        );
        let fault = |seq, channel, code| Frame {
            seq,
            uptime_ms: 5,
            msg: Message::Fault(Fault { channel, code }),
        };
        let mut serial = SerialMock::new(&on_wire(&[
            fault(0, 0, link::FaultCode::SensorCrc),
            fault(1, 1, link::FaultCode::SensorCrc),
            fault(2, 2, link::FaultCode::WireBreak),
            fault(3, 3, link::FaultCode::Nack),
            Frame {
                seq: 4,
                uptime_ms: 5,
                msg: Message::Samples(Vec::new()),
            },
        ]));
        let mut node = Node::new(i2c.clone(), NoopDelay, serial.clone(), cfg);
        node.cycles = 1; // not a hello cycle
        node.cycle(5);
        assert_eq!(node.stats.faults, 4);
        assert_eq!(node.stats.frames, 5);
        i2c.done();
        serial.done();
    }

    #[test]
    fn a_failing_serial_port_drops_the_frame_and_the_seq_shows_it() {
        let mut buf = [0u8; MAX_FRAME];
        link::encode(
            &Frame {
                seq: 0,
                uptime_ms: 1,
                msg: Message::Heartbeat,
            },
            &mut buf,
        )
        .unwrap();
        let mut serial = SerialMock::new(&[SerialT::write_error(
            buf[0],
            nb::Error::Other(embedded_hal_nb::serial::ErrorKind::Overrun),
        )]);
        let cfg = NodeConfig {
            sht3x: None,
            ads1115: None,
            ..config()
        };
        let mut node = Node::new(I2cMock::new(&[]), NoopDelay, serial.clone(), cfg);
        node.heartbeat(1);
        assert_eq!(node.stats.write_errors, 1);
        assert_eq!(node.seq, 1, "the lost frame used its seq");
        let (mut i2c, _, _) = node.release();
        i2c.done();
        serial.done();
    }

    #[test]
    fn long_names_are_cut_not_panicked_on() {
        let s: String<4> = truncated("température");
        assert_eq!(s.as_str(), "temp");
        let s: String<3> = truncated("°C!");
        assert_eq!(s.as_str(), "°C", "cut at a character boundary");
    }
}
