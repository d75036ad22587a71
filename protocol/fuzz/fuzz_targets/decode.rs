//! The sensor-link decoder on arbitrary bytes: it must never panic, every frame it accepts must
//! survive a round trip through the encoder, and a good frame after garbage and a delimiter always
//! decodes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plantmesh_protocol::link::{encode, Decoder, Frame, Message, MAX_FRAME};

fuzz_target!(|data: &[u8]| {
    let mut d = Decoder::default();
    for &b in data {
        if let Some(Ok(frame)) = d.push(b) {
            let mut buf = [0u8; MAX_FRAME];
            let n = encode(&frame, &mut buf).expect("a decoded frame encodes");
            let mut again = Decoder::default();
            let back: Vec<_> = buf[..n].iter().filter_map(|b| again.push(*b)).collect();
            assert_eq!(back, vec![Ok(frame)]);
        }
    }
    // Resynchronisation: after a delimiter, a good frame always decodes.
    let good = Frame { seq: 42, uptime_ms: 7, msg: Message::Heartbeat };
    let mut buf = [0u8; MAX_FRAME];
    let n = encode(&good, &mut buf).unwrap();
    let mut last = None;
    for &b in core::iter::once(&0u8).chain(&buf[..n]) {
        if let Some(r) = d.push(b) {
            last = Some(r);
        }
    }
    assert_eq!(last, Some(Ok(good)));
});
