//! Sensor-link codec cost on the host: encode and decode per frame (`cargo bench -p plantmesh-protocol`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark that fails stops with its location"
)]

use plantmesh_protocol::link::{
    decode_raw, encode, ChannelInfo, ChannelKind, Frame, Hello, Message, Sample, MAX_FRAME,
};
use std::hint::black_box;
use std::time::Instant;

fn time(name: &str, frame: &Frame) {
    const N: u32 = 1_000_000;
    let mut buf = [0u8; MAX_FRAME];
    let t = Instant::now();
    let mut n = 0;
    for _ in 0..N {
        n = encode(black_box(frame), &mut buf).unwrap();
    }
    let enc = t.elapsed().as_nanos() as f64 / f64::from(N);
    let t = Instant::now();
    for _ in 0..N {
        let mut b = buf;
        black_box(decode_raw(&mut b[..n - 1]).unwrap());
    }
    let dec = t.elapsed().as_nanos() as f64 / f64::from(N);
    println!("{name:<28} {n:>4} bytes on the wire   encode {enc:>7.1} ns   decode {dec:>7.1} ns");
}

fn main() {
    let samples = Frame {
        seq: 123_456,
        uptime_ms: 86_400_000,
        msg: Message::Samples(
            [(0, 2150), (1, 4530), (2, 6012), (3, 1987)]
                .iter()
                .map(|&(channel, raw)| Sample { channel, raw })
                .collect(),
        ),
    };
    let hello = Frame {
        seq: 0,
        uptime_ms: 12,
        msg: Message::Hello(Hello {
            node_id: 0x0050_1CE0,
            firmware: [0, 1, 0],
            channels: (0..4u8)
                .map(|i| ChannelInfo {
                    index: i,
                    kind: ChannelKind::Loop4To20mA,
                    name: "line_pressure".try_into().unwrap(),
                    unit: "bar".try_into().unwrap(),
                    scale: 0.001,
                    offset: 0.0,
                })
                .collect(),
        }),
    };
    time("samples (4 channels)", &samples);
    time("hello (4 channels)", &hello);
    time(
        "heartbeat",
        &Frame {
            seq: 9,
            uptime_ms: 9,
            msg: Message::Heartbeat,
        },
    );
}
