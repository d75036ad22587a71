//! Simulated sensors on a simulated I2C bus, answering as the datasheets say the real parts do
//! (commands, pointer registers, the OS bit, CRC-8 words, NACKs), so the drivers run unchanged on a
//! host: the demo plant's sensor node and end-to-end tests use them. Faults can be injected.

use crate::sht3x;
use embedded_hal::i2c::{ErrorKind, ErrorType, I2c, NoAcknowledgeSource, Operation};

/// An SHT3x at its address.
#[derive(Debug, Clone)]
pub struct SimSht3x {
    pub address: u8,
    pub celsius: f32,
    pub percent_rh: f32,
    /// Corrupt the humidity word's CRC.
    pub corrupt_crc: bool,
    /// Do not answer at all (a missing or dead sensor).
    pub absent: bool,
    measuring: bool,
}

impl SimSht3x {
    pub fn new(address: u8) -> Self {
        SimSht3x {
            address,
            celsius: 21.0,
            percent_rh: 45.0,
            corrupt_crc: false,
            absent: false,
            measuring: false,
        }
    }

    fn reply(&self) -> [u8; 6] {
        let raw = |x: f32, lo: f32, span: f32| (((x - lo) / span).clamp(0.0, 1.0) * 65535.0 + 0.5) as u16;
        let [a, b] = raw(self.celsius, -45.0, 175.0).to_be_bytes();
        let [c, d] = raw(self.percent_rh, 0.0, 100.0).to_be_bytes();
        let mut crc = sht3x::crc8(&[c, d]);
        if self.corrupt_crc {
            crc ^= 0x5A;
        }
        [a, b, sht3x::crc8(&[a, b]), c, d, crc]
    }
}

/// An ADS1115 with a 4-20 mA loop through a shunt on each input.
#[derive(Debug, Clone)]
pub struct SimAds1115 {
    pub address: u8,
    /// Loop current per input, µA.
    pub loop_ua: [i64; 4],
    pub shunt_milliohm: u32,
    pub absent: bool,
    config: u16,
    pointer: u8,
}

impl SimAds1115 {
    pub fn new(address: u8, shunt_milliohm: u32) -> Self {
        SimAds1115 {
            address,
            loop_ua: [12_000; 4],
            shunt_milliohm,
            absent: false,
            config: 0x8583,
            pointer: 0,
        }
    }

    fn conversion(&self) -> i16 {
        let input = usize::from((self.config >> 12) & 0b11);
        let uv = self.loop_ua[input] * i64::from(self.shunt_milliohm) / 1_000;
        (uv / crate::ads1115::UV_PER_LSB).clamp(i64::from(i16::MIN), i64::from(i16::MAX)) as i16
    }
}

/// The bus: one optional part of each kind.
#[derive(Debug, Clone, Default)]
pub struct SimBus {
    pub sht3x: Option<SimSht3x>,
    pub ads1115: Option<SimAds1115>,
}

impl ErrorType for SimBus {
    type Error = ErrorKind;
}

const NACK: ErrorKind = ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address);

impl I2c for SimBus {
    fn transaction(&mut self, address: u8, operations: &mut [Operation<'_>]) -> Result<(), Self::Error> {
        if let Some(s) = self.sht3x.as_mut().filter(|s| s.address == address && !s.absent) {
            for op in operations {
                match op {
                    Operation::Write(bytes) if *bytes == sht3x::CMD_MEASURE_HIGH => s.measuring = true,
                    Operation::Write(bytes) if *bytes == sht3x::CMD_SOFT_RESET => s.measuring = false,
                    Operation::Write(_) => return Err(ErrorKind::Other),
                    // No conversion started: the sensor NACKs its read header.
                    Operation::Read(_) if !s.measuring => return Err(NACK),
                    Operation::Read(buf) => {
                        let reply = s.reply();
                        for (b, r) in buf.iter_mut().zip(reply.iter().chain(core::iter::repeat(&0xFF))) {
                            *b = *r;
                        }
                        s.measuring = false;
                    }
                }
            }
            return Ok(());
        }
        if let Some(a) = self.ads1115.as_mut().filter(|a| a.address == address && !a.absent) {
            for op in operations {
                match op {
                    Operation::Write(bytes) => match **bytes {
                        [pointer] if pointer <= 3 => a.pointer = pointer,
                        [pointer, hi, lo] if pointer <= 3 => {
                            a.pointer = pointer;
                            if pointer == 1 {
                                // Single shot: the conversion completes at once here; OS reads 1.
                                a.config = u16::from_be_bytes([hi, lo]) | 0x8000;
                            }
                        }
                        _ => return Err(ErrorKind::Other),
                    },
                    Operation::Read(buf) => {
                        let word = match a.pointer {
                            0 => a.conversion().to_be_bytes(),
                            1 => a.config.to_be_bytes(),
                            _ => [0, 0],
                        };
                        for (b, w) in buf.iter_mut().zip(word.iter().chain(core::iter::repeat(&0xFF))) {
                            *b = *w;
                        }
                    }
                }
            }
            return Ok(());
        }
        Err(NACK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ads1115::{Ads1115, Loop};
    use crate::sht3x::Sht3x;
    use embedded_hal_mock::eh1::delay::NoopDelay;
    use protocol::link::FaultCode;

    #[test]
    fn the_drivers_read_the_simulated_parts() {
        let mut bus = SimBus {
            sht3x: Some(SimSht3x::new(0x44)),
            ads1115: Some(SimAds1115::new(0x48, 165_000)),
        };
        let m = Sht3x::new(0x44).measure(&mut bus, &mut NoopDelay).unwrap();
        assert_eq!((m.centi_celsius, m.centi_percent_rh), (2100, 4500));
        let l = Loop {
            input: 2,
            shunt_milliohm: 165_000,
            at_4ma_milli: 0,
            at_20ma_milli: 16_000,
        };
        bus.ads1115.as_mut().unwrap().loop_ua[2] = 10_000;
        let raw = Ads1115::new(0x48).read(&mut bus, &mut NoopDelay, 2).unwrap();
        assert_eq!(l.value_milli(raw), Ok(6_000));
        bus.ads1115.as_mut().unwrap().loop_ua[2] = 0;
        let raw = Ads1115::new(0x48).read(&mut bus, &mut NoopDelay, 2).unwrap();
        assert_eq!(l.value_milli(raw), Err(FaultCode::WireBreak));
        bus.sht3x.as_mut().unwrap().corrupt_crc = true;
        assert_eq!(
            Sht3x::new(0x44).measure(&mut bus, &mut NoopDelay),
            Err(FaultCode::SensorCrc)
        );
        bus.sht3x.as_mut().unwrap().absent = true;
        assert_eq!(Sht3x::new(0x44).measure(&mut bus, &mut NoopDelay), Err(FaultCode::Nack));
    }
}
