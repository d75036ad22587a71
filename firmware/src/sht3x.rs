//! Sensirion SHT3x (SHT30/31/35) temperature and humidity sensor, from the datasheet
//! ("Datasheet SHT3x-DIS", version 7, 2022).
//!
//! Single-shot mode without clock stretching: write the 16-bit command, wait for the conversion,
//! read six bytes `T_msb T_lsb CRC RH_msb RH_lsb CRC`. Each word carries a CRC-8 (polynomial 0x31,
//! init 0xFF, no reflection, no final XOR; CRC(0xBEEF) = 0x92). While converting, the sensor NACKs
//! its read header. T = -45 + 175 * S_T / 65535 °C; RH = 100 * S_RH / 65535 %.

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::{Error as _, ErrorKind, I2c};
use protocol::link::FaultCode;

/// ADDR pin low; 0x45 with ADDR high.
pub const DEFAULT_ADDRESS: u8 = 0x44;
/// Single shot, high repeatability, clock stretching disabled.
pub const CMD_MEASURE_HIGH: [u8; 2] = [0x24, 0x00];
/// Soft reset.
pub const CMD_SOFT_RESET: [u8; 2] = [0x30, 0xA2];
/// Longest high-repeatability conversion (datasheet table 4: 15.5 ms), rounded up.
pub const MEASURE_MS: u32 = 16;

/// One measurement in hundredths: centi-degrees Celsius and centi-percent relative humidity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    pub centi_celsius: i32,
    pub centi_percent_rh: i32,
}

pub struct Sht3x {
    pub address: u8,
}

impl Sht3x {
    pub const fn new(address: u8) -> Self {
        Sht3x { address }
    }

    /// Starts a conversion, waits for it, reads and checks it.
    pub fn measure<I: I2c, D: DelayNs>(&self, i2c: &mut I, delay: &mut D) -> Result<Measurement, FaultCode> {
        i2c.write(self.address, &CMD_MEASURE_HIGH)
            .map_err(|e| fault(e.kind()))?;
        delay.delay_ms(MEASURE_MS);
        let mut buf = [0u8; 6];
        i2c.read(self.address, &mut buf).map_err(|e| match e.kind() {
            // A NACK on the read header means the conversion is not done.
            ErrorKind::NoAcknowledge(_) => FaultCode::NotReady,
            k => fault(k),
        })?;
        let t = word(&buf[0..3])?;
        let rh = word(&buf[3..6])?;
        Ok(Measurement {
            centi_celsius: convert(t, 17_500, -4_500),
            centi_percent_rh: convert(rh, 10_000, 0),
        })
    }
}

/// I2C error -> fault code.
pub(crate) fn fault(kind: ErrorKind) -> FaultCode {
    match kind {
        ErrorKind::NoAcknowledge(_) => FaultCode::Nack,
        _ => FaultCode::Bus,
    }
}

/// A checked 16-bit word from `msb lsb crc`.
fn word(b: &[u8]) -> Result<u16, FaultCode> {
    match b {
        [msb, lsb, c] if crc8(&[*msb, *lsb]) == *c => Ok(u16::from_be_bytes([*msb, *lsb])),
        _ => Err(FaultCode::SensorCrc),
    }
}

/// `offset + span * raw / 65535`, in hundredths, rounded to nearest, in integers only.
fn convert(raw: u16, span: i32, offset: i32) -> i32 {
    let scaled = (i64::from(raw) * i64::from(span) + 32_767) / 65_535;
    offset + scaled as i32
}

/// The SHT3x CRC-8 (datasheet section 4.12).
pub fn crc8(data: &[u8]) -> u8 {
    let mut crc: u8 = 0xFF;
    for b in data {
        crc ^= b;
        for _ in 0..8 {
            crc = if crc & 0x80 != 0 { (crc << 1) ^ 0x31 } else { crc << 1 };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use embedded_hal::i2c::NoAcknowledgeSource;
    use embedded_hal_mock::eh1::delay::NoopDelay;
    use embedded_hal_mock::eh1::i2c::{Mock, Transaction};
    use std::vec;

    fn reply(t: u16, rh: u16) -> std::vec::Vec<u8> {
        let [a, b] = t.to_be_bytes();
        let [c, d] = rh.to_be_bytes();
        vec![a, b, crc8(&[a, b]), c, d, crc8(&[c, d])]
    }

    #[test]
    fn crc_matches_the_datasheet_example() {
        assert_eq!(crc8(&[0xBE, 0xEF]), 0x92);
    }

    #[test]
    fn converts_per_the_datasheet_formulas() {
        // S_T = 0x6666 (26214): -45 + 175 * 26214 / 65535 = 24.9996 °C; S_RH = 0x8000: 50.0008 %.
        let mut i2c = Mock::new(&[
            Transaction::write(0x44, vec![0x24, 0x00]),
            Transaction::read(0x44, reply(0x6666, 0x8000)),
        ]);
        let m = Sht3x::new(0x44).measure(&mut i2c, &mut NoopDelay).unwrap();
        assert_eq!(
            m,
            Measurement {
                centi_celsius: 2500,
                centi_percent_rh: 5000
            }
        );
        // The ends of the range.
        i2c.update_expectations(&[
            Transaction::write(0x44, vec![0x24, 0x00]),
            Transaction::read(0x44, reply(0, 0xFFFF)),
        ]);
        let m = Sht3x::new(0x44).measure(&mut i2c, &mut NoopDelay).unwrap();
        assert_eq!((m.centi_celsius, m.centi_percent_rh), (-4500, 10000));
        i2c.done();
    }

    #[test]
    fn a_bad_crc_a_nack_and_a_busy_sensor_are_faults() {
        let mut bad = reply(0x6666, 0x8000);
        bad[5] ^= 1;
        let mut i2c = Mock::new(&[
            Transaction::write(0x44, vec![0x24, 0x00]),
            Transaction::read(0x44, bad),
            Transaction::write(0x44, vec![0x24, 0x00])
                .with_error(ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address)),
            Transaction::write(0x44, vec![0x24, 0x00]),
            Transaction::read(0x44, vec![0; 6]).with_error(ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address)),
            Transaction::write(0x44, vec![0x24, 0x00]).with_error(ErrorKind::ArbitrationLoss),
        ]);
        let s = Sht3x::new(0x44);
        assert_eq!(s.measure(&mut i2c, &mut NoopDelay), Err(FaultCode::SensorCrc));
        assert_eq!(s.measure(&mut i2c, &mut NoopDelay), Err(FaultCode::Nack));
        assert_eq!(s.measure(&mut i2c, &mut NoopDelay), Err(FaultCode::NotReady));
        assert_eq!(s.measure(&mut i2c, &mut NoopDelay), Err(FaultCode::Bus));
        i2c.done();
    }
}
