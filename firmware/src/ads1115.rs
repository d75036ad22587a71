//! TI ADS1115 16-bit ADC, from the datasheet (SBAS444D, 2018), used for 4-20 mA loops through a
//! shunt resistor.
//!
//! Single-shot conversions of one input against GND: write the config register (pointer 0x01) with
//! OS = 1 (start), MUX = 1xx (AINx vs GND), PGA = 001 (±4.096 V, 125 µV per LSB), MODE = 1
//! (single shot), DR = 100 (128 SPS, 7.8 ms), comparator off (QUE = 11); wait; poll OS until it reads
//! 1 (idle); read the conversion register (pointer 0x00) as a big-endian two's-complement word.
//! Loop current = V / R_shunt. Below 3.8 mA the loop is open (NAMUR NE 43: wire break or dead
//! transmitter); above 20.5 mA, or at the ADC's full scale, it is over range.

use crate::sht3x::fault;
use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::{Error as _, I2c};
use protocol::link::FaultCode;

/// ADDR pin to GND.
pub const DEFAULT_ADDRESS: u8 = 0x48;
const REG_CONVERSION: u8 = 0x00;
const REG_CONFIG: u8 = 0x01;
/// 1 / 128 SPS = 7.8 ms; the datasheet allows up to 10 % slower oscillators.
pub const CONVERSION_MS: u32 = 9;
/// Extra 1 ms polls of the OS bit before giving up.
const POLLS: u32 = 3;
/// Microvolts per LSB at PGA ±4.096 V.
pub const UV_PER_LSB: i64 = 125;
/// Loop current limits in µA (NAMUR NE 43 measuring range).
pub const WIRE_BREAK_UA: i64 = 3_800;
pub const OVER_RANGE_UA: i64 = 20_500;

/// The config word that starts a single-shot conversion of `input` (0..=3) against GND.
pub const fn config_word(input: u8) -> u16 {
    let os = 1 << 15;
    let mux = (0b100 | (input as u16 & 0b11)) << 12;
    let pga = 0b001 << 9;
    let mode = 1 << 8;
    let dr = 0b100 << 5;
    let que = 0b11;
    os | mux | pga | mode | dr | que
}

pub struct Ads1115 {
    pub address: u8,
}

impl Ads1115 {
    pub const fn new(address: u8) -> Self {
        Ads1115 { address }
    }

    /// One single-shot conversion of `input` (0..=3), in raw counts.
    pub fn read<I: I2c, D: DelayNs>(&self, i2c: &mut I, delay: &mut D, input: u8) -> Result<i16, FaultCode> {
        let [hi, lo] = config_word(input).to_be_bytes();
        i2c.write(self.address, &[REG_CONFIG, hi, lo])
            .map_err(|e| fault(e.kind()))?;
        delay.delay_ms(CONVERSION_MS);
        let mut word = [0u8; 2];
        let mut polls = 0;
        loop {
            i2c.write_read(self.address, &[REG_CONFIG], &mut word)
                .map_err(|e| fault(e.kind()))?;
            if word[0] & 0x80 != 0 {
                break;
            }
            polls += 1;
            if polls > POLLS {
                return Err(FaultCode::NotReady);
            }
            delay.delay_ms(1);
        }
        i2c.write_read(self.address, &[REG_CONVERSION], &mut word)
            .map_err(|e| fault(e.kind()))?;
        Ok(i16::from_be_bytes(word))
    }
}

/// A 4-20 mA loop on one ADC input, scaled to engineering units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loop {
    pub input: u8,
    /// Shunt resistance in milliohms (e.g. 165 000 for 165 Ω: 20 mA -> 3.3 V).
    pub shunt_milliohm: u32,
    /// Engineering value at 4 mA and at 20 mA, in thousandths of the channel's unit.
    pub at_4ma_milli: i32,
    pub at_20ma_milli: i32,
}

impl Loop {
    /// Raw ADC counts -> loop current in µA.
    pub fn current_ua(&self, raw: i16) -> i64 {
        let uv = i64::from(raw) * UV_PER_LSB;
        // I[µA] = V[µV] / R[Ω] = V[µV] * 1000 / R[mΩ]
        uv * 1_000 / i64::from(self.shunt_milliohm.max(1))
    }

    /// Raw ADC counts -> engineering value in thousandths, or why there is none.
    pub fn value_milli(&self, raw: i16) -> Result<i32, FaultCode> {
        if raw == i16::MAX {
            return Err(FaultCode::OverRange);
        }
        let ua = self.current_ua(raw);
        if ua < WIRE_BREAK_UA {
            return Err(FaultCode::WireBreak);
        }
        if ua > OVER_RANGE_UA {
            return Err(FaultCode::OverRange);
        }
        let span = i64::from(self.at_20ma_milli) - i64::from(self.at_4ma_milli);
        let v = i64::from(self.at_4ma_milli) + (ua - 4_000) * span / 16_000;
        i32::try_from(v).map_err(|_| FaultCode::OverRange)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use embedded_hal::i2c::{ErrorKind, NoAcknowledgeSource};
    use embedded_hal_mock::eh1::delay::NoopDelay;
    use embedded_hal_mock::eh1::i2c::{Mock, Transaction};
    use std::vec;

    const PRESSURE: Loop = Loop {
        input: 0,
        shunt_milliohm: 165_000,
        at_4ma_milli: 0,
        at_20ma_milli: 10_000, // 0..10 bar
    };

    /// Counts for a loop current in µA across 165 Ω.
    fn counts(ua: i64) -> i16 {
        (ua * 165 / UV_PER_LSB) as i16
    }

    #[test]
    fn config_words_match_the_datasheet_fields() {
        // OS=1 MUX=100 (AIN0/GND) PGA=001 MODE=1 | DR=100 COMP_MODE=0 POL=0 LAT=0 QUE=11.
        assert_eq!(config_word(0), 0b1100_0011_1000_0011);
        assert_eq!(config_word(0), 0xC383);
        assert_eq!(config_word(3), 0xF383);
    }

    #[test]
    fn a_conversion_is_started_polled_and_read() {
        let mut i2c = Mock::new(&[
            Transaction::write(0x48, vec![0x01, 0xD3, 0x83]),
            // Still converting (OS = 0), then done (OS = 1).
            Transaction::write_read(0x48, vec![0x01], vec![0x53, 0x83]),
            Transaction::write_read(0x48, vec![0x01], vec![0xD3, 0x83]),
            Transaction::write_read(0x48, vec![0x00], vec![0x2A, 0xF8]),
        ]);
        let raw = Ads1115::new(0x48).read(&mut i2c, &mut NoopDelay, 1).unwrap();
        assert_eq!(raw, 0x2AF8);
        i2c.done();
    }

    #[test]
    fn a_converter_that_never_finishes_or_answers_is_a_fault() {
        let busy = Transaction::write_read(0x48, vec![0x01], vec![0x43, 0x83]);
        let mut i2c = Mock::new(&[
            Transaction::write(0x48, vec![0x01, 0xC3, 0x83]),
            busy.clone(),
            busy.clone(),
            busy.clone(),
            busy,
            Transaction::write(0x48, vec![0x01, 0xC3, 0x83])
                .with_error(ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address)),
        ]);
        let adc = Ads1115::new(0x48);
        assert_eq!(adc.read(&mut i2c, &mut NoopDelay, 0), Err(FaultCode::NotReady));
        assert_eq!(adc.read(&mut i2c, &mut NoopDelay, 0), Err(FaultCode::Nack));
        i2c.done();
    }

    #[test]
    fn loop_currents_scale_and_limits_follow_namur() {
        assert_eq!(PRESSURE.value_milli(counts(4_000)), Ok(0));
        assert_eq!(PRESSURE.value_milli(counts(12_000)), Ok(5_000));
        assert_eq!(PRESSURE.value_milli(counts(20_000)), Ok(10_000));
        // Between 3.8 and 4 mA: still a measurement (slightly below the range start).
        assert!(PRESSURE.value_milli(counts(3_900)).unwrap() < 0);
        assert_eq!(PRESSURE.value_milli(counts(3_700)), Err(FaultCode::WireBreak));
        assert_eq!(PRESSURE.value_milli(0), Err(FaultCode::WireBreak));
        assert_eq!(PRESSURE.value_milli(-5), Err(FaultCode::WireBreak));
        assert_eq!(PRESSURE.value_milli(counts(21_000)), Err(FaultCode::OverRange));
        assert_eq!(PRESSURE.value_milli(i16::MAX), Err(FaultCode::OverRange));
        // Any raw value: no panic, a value or a fault.
        for raw in i16::MIN..=i16::MAX {
            let _ = PRESSURE.value_milli(raw);
        }
        let zero_shunt = Loop {
            shunt_milliohm: 0,
            ..PRESSURE
        };
        for raw in [i16::MIN, -1, 0, 1, i16::MAX] {
            let _ = zero_shunt.value_milli(raw);
        }
    }
}
