//! plantmesh sensor node on a Raspberry Pi Pico (RP2040).
//!
//! Wiring: SHT3x (0x44) and ADS1115 (0x48, ADDR to GND) on I2C0, SDA GP4 (pin 6), SCL GP5 (pin 7),
//! 3V3 and GND; 4-20 mA loops through 165 Ω shunts to ADS1115 AIN0 (line pressure, 0-10 bar) and
//! AIN1 (tank level, 0-4 m). Frames leave on UART0 TX GP0 (pin 1), 115200 8N1, to a USB-serial
//! adapter on the gateway. The on-board LED (GP25) toggles every cycle. One cycle per second.
#![no_std]
#![no_main]

use embedded_hal::digital::StatefulOutputPin;
use fugit::RateExtU32;
use panic_halt as _;
use plantmesh_firmware::ads1115::Loop;
use plantmesh_firmware::{LoopChannel, Node, NodeConfig};
use rp2040_hal::{self as hal, pac, Clock};

/// The second-stage boot loader for the Pico's W25Q080 flash.
#[link_section = ".boot2"]
#[used]
pub static BOOT2: [u8; 256] = rp2040_boot2::BOOT_LOADER_W25Q080;

const XOSC_HZ: u32 = 12_000_000;
const CYCLE_MS: u32 = 1_000;

const NODE_ID: u32 = node_id();

#[hal::entry]
fn main() -> ! {
    let mut p = pac::Peripherals::take().unwrap();
    let mut watchdog = hal::Watchdog::new(p.WATCHDOG);
    let clocks = hal::clocks::init_clocks_and_plls(
        XOSC_HZ,
        p.XOSC,
        p.CLOCKS,
        p.PLL_SYS,
        p.PLL_USB,
        &mut p.RESETS,
        &mut watchdog,
    )
    .ok()
    .unwrap();
    let sio = hal::Sio::new(p.SIO);
    let pins = hal::gpio::Pins::new(p.IO_BANK0, p.PADS_BANK0, sio.gpio_bank0, &mut p.RESETS);
    let mut led = pins.gpio25.into_push_pull_output();
    let timer = hal::Timer::new(p.TIMER, &mut p.RESETS, &clocks);

    let i2c = hal::I2C::i2c0(
        p.I2C0,
        pins.gpio4.reconfigure(),
        pins.gpio5.reconfigure(),
        100.kHz(),
        &mut p.RESETS,
        clocks.system_clock.freq(),
    );
    let uart_pins = (
        pins.gpio0.into_function::<hal::gpio::FunctionUart>(),
        pins.gpio1.into_function::<hal::gpio::FunctionUart>(),
    );
    let uart = hal::uart::UartPeripheral::new(p.UART0, uart_pins, &mut p.RESETS)
        .enable(
            hal::uart::UartConfig::new(115_200.Hz(), hal::uart::DataBits::Eight, None, hal::uart::StopBits::One),
            clocks.peripheral_clock.freq(),
        )
        .unwrap();

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
    let mut loops = heapless::Vec::new();
    let _ = loops.push(lp(0, "line_pressure", "bar", 10_000));
    let _ = loops.push(lp(1, "tank_level", "m", 4_000));
    let cfg = NodeConfig {
        node_id: NODE_ID,
        firmware: [0, 1, 0],
        sht3x: Some(plantmesh_firmware::sht3x::DEFAULT_ADDRESS),
        ads1115: Some(plantmesh_firmware::ads1115::DEFAULT_ADDRESS),
        loops,
        hello_every: 30,
    };
    let mut node = Node::new(i2c, timer, uart, cfg);
    let mut next = timer.get_counter().ticks();
    loop {
        let now_us = timer.get_counter().ticks();
        node.cycle((now_us / 1_000) as u32);
        let _ = led.toggle();
        next += u64::from(CYCLE_MS) * 1_000;
        while timer.get_counter().ticks() < next {
            cortex_m::asm::nop();
        }
    }
}

/// The node id, set per board at build time (`PLANTMESH_NODE_ID=0x1234 scripts/build-firmware.sh`;
/// decimal or 0x-hex); 1 when unset.
const fn node_id() -> u32 {
    match option_env!("PLANTMESH_NODE_ID") {
        Some(s) => parse_u32(s.as_bytes()),
        None => 1,
    }
}

const fn parse_u32(b: &[u8]) -> u32 {
    let (radix, mut i) = if b.len() > 2 && b[0] == b'0' && (b[1] == b'x' || b[1] == b'X') {
        (16, 2)
    } else {
        (10, 0)
    };
    let mut n: u32 = 0;
    while i < b.len() {
        let d = match b[i] {
            c @ b'0'..=b'9' => (c - b'0') as u32,
            c @ b'a'..=b'f' => (c - b'a' + 10) as u32,
            c @ b'A'..=b'F' => (c - b'A' + 10) as u32,
            _ => panic!("PLANTMESH_NODE_ID is not a number"),
        };
        if d >= radix {
            panic!("PLANTMESH_NODE_ID is not a number");
        }
        n = n.wrapping_mul(radix).wrapping_add(d);
        i += 1;
    }
    n
}
