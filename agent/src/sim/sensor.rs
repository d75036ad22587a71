//! A simulated sensor node: the firmware library's `Node`, compiled for the host, reading simulated
//! SHT3x and ADS1115 parts (which answer as the datasheets say) and writing its frames into a pty,
//! where the agent reads them as it would a USB-serial port. Optionally injects link garbage.

use firmware::ads1115::Loop;
use firmware::sim::{SimAds1115, SimBus, SimSht3x};
use firmware::{LoopChannel, Node, NodeConfig};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What the simulated node does.
#[derive(Debug, Clone)]
pub struct SensorNodeOptions {
    pub interval: Duration,
    /// Every this many cycles, one piece of link garbage (0: never).
    pub garbage_every: u32,
    /// Stop after this many cycles (0: run forever).
    pub cycles: u32,
    /// Channel 3 (`tank_level`) reads an open loop in this many cycles out of 30 (0: never).
    pub wire_breaks: u32,
    /// Skip the sensors' conversion waits (the simulated parts are ready at once): frames as fast
    /// as `interval` allows, for benchmarks.
    pub no_delays: bool,
}

impl Default for SensorNodeOptions {
    fn default() -> Self {
        SensorNodeOptions {
            interval: Duration::from_secs(1),
            garbage_every: 0,
            cycles: 0,
            wire_breaks: 0,
            no_delays: false,
        }
    }
}

/// The kinds of garbage injected, in turn; each is exactly one thing the agent cannot decode.
pub const GARBAGE: [&str; 5] = [
    "random_bytes",
    "truncated_frame",
    "bad_crc",
    "oversized",
    "noise_into_frame",
];

/// A serial writer over any `std::io::Write` (the pty), for the firmware's `Node`.
pub struct IoSerial<W>(pub W);

impl<W: Write> embedded_hal_nb::serial::ErrorType for IoSerial<W> {
    type Error = embedded_hal_nb::serial::ErrorKind;
}

impl<W: Write> embedded_hal_nb::serial::Write<u8> for IoSerial<W> {
    fn write(&mut self, word: u8) -> nb::Result<(), Self::Error> {
        self.0
            .write_all(&[word])
            .map_err(|_| nb::Error::Other(embedded_hal_nb::serial::ErrorKind::Other))
    }

    fn flush(&mut self) -> nb::Result<(), Self::Error> {
        self.0
            .flush()
            .map_err(|_| nb::Error::Other(embedded_hal_nb::serial::ErrorKind::Other))
    }
}

/// Sleeps on the host for the drivers' conversion waits (or not at all, when `false`).
pub struct HostDelay(pub bool);

impl embedded_hal::delay::DelayNs for HostDelay {
    fn delay_ns(&mut self, ns: u32) {
        if self.0 {
            std::thread::sleep(Duration::from_nanos(u64::from(ns)));
        }
    }
}

/// The demo node: an SHT3x and two 4-20 mA loops (line pressure 0-10 bar, tank level 0-4 m).
pub fn demo_config() -> NodeConfig {
    let lp = |input, name, unit, hi| LoopChannel {
        adc: Loop {
            input,
            shunt_milliohm: 165_000,
            at_4ma_milli: 0,
            at_20ma_milli: hi,
        },
        name,
        unit,
    };
    NodeConfig {
        node_id: 0x0050_1CE0,
        firmware: [0, 1, 0],
        sht3x: Some(firmware::sht3x::DEFAULT_ADDRESS),
        ads1115: Some(firmware::ads1115::DEFAULT_ADDRESS),
        loops: [lp(0, "line_pressure", "bar", 10_000), lp(1, "tank_level", "m", 4_000)]
            .into_iter()
            .collect(),
        hello_every: 30,
    }
}

/// A pty pair whose slave side the agent opens by path; `link`, if given, is a symlink to it.
pub struct Pty {
    pub master: serialport::TTYPort,
    /// Held open so the slave never hangs up while the agent reopens it.
    _slave: serialport::TTYPort,
    pub path: PathBuf,
}

/// Opens a pty pair for a simulated node.
pub fn open_pty(link: Option<&Path>) -> std::io::Result<Pty> {
    use serialport::SerialPort;
    let (master, slave) = serialport::TTYPort::pair().map_err(std::io::Error::other)?;
    let path = PathBuf::from(
        slave
            .name()
            .ok_or_else(|| std::io::Error::other("the pty has no name"))?,
    );
    if let Some(link) = link {
        let _ = std::fs::remove_file(link);
        std::os::unix::fs::symlink(&path, link)?;
    }
    Ok(Pty {
        master,
        _slave: slave,
        path,
    })
}

/// Runs the node on the calling thread, writing to `out`; `report` hears of each garbage injection.
pub fn run_node<W: Write>(out: W, opts: &SensorNodeOptions, mut report: impl FnMut(&str)) {
    let bus = SimBus {
        sht3x: Some(SimSht3x::new(firmware::sht3x::DEFAULT_ADDRESS)),
        ads1115: Some(SimAds1115::new(firmware::ads1115::DEFAULT_ADDRESS, 165_000)),
    };
    let mut node = Node::new(bus, HostDelay(!opts.no_delays), IoSerial(out), demo_config());
    let start = Instant::now();
    let mut next = start;
    let mut cycle: u32 = 0;
    let mut garbage = 0usize;
    loop {
        let t = start.elapsed().as_secs_f32();
        let (bus, serial) = node.parts_mut();
        if let Some(s) = bus.sht3x.as_mut() {
            s.celsius = 22.0 + 3.0 * (t / 60.0).sin();
            s.percent_rh = 40.0 + 5.0 * (t / 90.0).cos();
        }
        if let Some(a) = bus.ads1115.as_mut() {
            // 4-20 mA: pressure around 6 bar, level slowly filling and emptying.
            a.loop_ua[0] = (4_000.0 + 16_000.0 * (0.6 + 0.05 * (t / 7.0).sin())) as i64;
            let open = opts.wire_breaks > 0 && cycle % 30 < opts.wire_breaks;
            a.loop_ua[1] = if open {
                0
            } else {
                (4_000.0 + 16_000.0 * (0.5 + 0.4 * (t / 120.0).sin())) as i64
            };
        }
        if opts.garbage_every > 0 && cycle > 0 && cycle.is_multiple_of(opts.garbage_every) {
            let kind = GARBAGE[garbage % GARBAGE.len()];
            garbage += 1;
            let _ = serial.0.write_all(&garbage_bytes(kind));
            let _ = serial.0.flush();
            report(kind);
        }
        node.cycle(start.elapsed().as_millis() as u32);
        cycle += 1;
        if opts.cycles > 0 && cycle >= opts.cycles {
            return;
        }
        next += opts.interval;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
}

/// One piece of garbage of `kind`: each is exactly one undecodable run on the link. All but
/// `noise_into_frame` end with a delimiter; that one runs into the next frame, which is lost with it.
pub fn garbage_bytes(kind: &str) -> Vec<u8> {
    use protocol::link::{encode, Frame, Message, MAX_FRAME};
    let frame = Frame {
        seq: 0,
        uptime_ms: 0,
        msg: Message::Heartbeat,
    };
    let mut buf = [0u8; MAX_FRAME];
    let n = encode(&frame, &mut buf).unwrap_or(0);
    let nonzero = |len: usize| (0..len).map(|_| fastrand::u8(1..=255)).collect::<Vec<u8>>();
    match kind {
        "random_bytes" => [nonzero(40), vec![0]].concat(),
        "truncated_frame" => [&buf[..n / 2], &[0]].concat(),
        "bad_crc" => {
            let mut b = buf[..n].to_vec();
            // Flip a bit of the last encoded byte (part of the CRC), keeping it non-zero.
            let i = n.saturating_sub(2);
            b[i] = if b[i] == 0x01 { 0x03 } else { b[i] ^ 0x01 };
            b
        }
        "oversized" => [nonzero(MAX_FRAME + 200), vec![0]].concat(),
        _ => nonzero(25),
    }
}
