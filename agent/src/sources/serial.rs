//! Serial lines (Modbus RTU buses and sensor nodes): their keys and their plan.

use crate::config::raw;
use crate::config::validate::{secs, Ctx};
use crate::sources::SourceError;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parity {
    None,
    Even,
    Odd,
}

/// A serial line.
#[derive(Debug, Clone, PartialEq)]
pub struct SerialPlan {
    pub port: String,
    pub baud: u32,
    pub parity: Parity,
    pub stop_bits: u8,
    pub data_bits: u8,
    /// Modbus RTU: silence kept between frames.
    pub inter_frame: Duration,
}

/// The serial line of a Modbus RTU device or sensor node.
pub(crate) fn serial_line(cx: &mut Ctx, d: &raw::Device, key: &str, default_baud: u32) -> Option<SerialPlan> {
    let Some(port) = &d.port else {
        cx.err(
            &d.protocol,
            format!("{key}.port"),
            format!("a {} device needs `port` (e.g. /dev/ttyUSB0)", d.protocol.get_ref()),
        );
        return None;
    };
    if port.get_ref().is_empty() {
        cx.err(port, format!("{key}.port"), "`port` is empty");
        return None;
    }
    const BAUDS: [u32; 12] = [
        1200, 2400, 4800, 9600, 14_400, 19_200, 38_400, 57_600, 115_200, 230_400, 460_800, 921_600,
    ];
    let baud = match &d.baud {
        Some(b) if BAUDS.contains(b.get_ref()) => *b.get_ref(),
        Some(b) => {
            cx.err(
                b,
                format!("{key}.baud"),
                format!("{} is not a standard baud rate", b.get_ref()),
            )
            .help = Some("1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, ...".into());
            return None;
        }
        None => default_baud,
    };
    let parity = match &d.parity {
        None => Parity::Even,
        Some(p) => cx.choice(
            p,
            &format!("{key}.parity"),
            &[("even", Parity::Even), ("odd", Parity::Odd), ("none", Parity::None)],
        )?,
    };
    let stop_bits = match &d.stop_bits {
        None if parity == Parity::None => 2,
        None => 1,
        Some(s) => cx.range(s, &format!("{key}.stop_bits"), 1, 2)? as u8,
    };
    let data_bits = match &d.data_bits {
        None => 8,
        Some(b) => cx.range(b, &format!("{key}.data_bits"), 7, 8)? as u8,
    };
    // Modbus over serial line, section 2.5.1.1: 3.5 character times between frames, fixed at
    // 1.75 ms above 19200 baud. A character is 11 bits (start, 8 data, parity or a second stop, stop).
    let char_time = Duration::from_secs_f64(11.0 / f64::from(baud));
    let inter_frame = match &d.inter_frame {
        Some(v) => {
            cx.range(&secs(v), &format!("{key}.inter_frame"), 0.0, 1.0);
            v.get_ref().0
        }
        None if baud > 19_200 => Duration::from_micros(1_750),
        None => char_time.mul_f64(3.5),
    };
    Some(SerialPlan {
        port: port.get_ref().clone(),
        baud,
        parity,
        stop_bits,
        data_bits,
        inter_frame,
    })
}

/// Opens a serial line.
pub fn open(s: &SerialPlan) -> Result<tokio_serial::SerialStream, SourceError> {
    use tokio_serial::SerialPortBuilderExt;
    tokio_serial::new(&s.port, s.baud)
        .data_bits(if s.data_bits == 7 {
            tokio_serial::DataBits::Seven
        } else {
            tokio_serial::DataBits::Eight
        })
        .parity(match s.parity {
            Parity::None => tokio_serial::Parity::None,
            Parity::Even => tokio_serial::Parity::Even,
            Parity::Odd => tokio_serial::Parity::Odd,
        })
        .stop_bits(if s.stop_bits == 2 {
            tokio_serial::StopBits::Two
        } else {
            tokio_serial::StopBits::One
        })
        .open_native_async()
        .map_err(|source| SourceError::Serial {
            port: s.port.clone(),
            source,
        })
}
