//! Sensor-node source: frames from a node's serial port (USB CDC or UART) become readings.
//!
//! In: a sensor node's plan ([`config::SensorDevicePlan`]: a serial port). Out: one [`ReadingBatch`] per node cycle (each cycle
//! ends with a `Samples` frame; `Fault` frames before it mark their channels bad with the node's
//! reason). Channels are mapped from the node's hello: a tag names its channel by index, or by name
//! as the hello announces it; a channel's value is `raw * scale + offset` from the hello, then the
//! tag's own scale and offset. Lost frames (gaps in `seq`), reboots (`seq` or uptime going back),
//! and bytes that were not frames (bad CRC, bad COBS, oversized, truncated) are counted; the decoder
//! resynchronises at the next 0x00. No frame for `stale_after` marks every channel `link_lost`.

pub mod config;

use super::serial::open;
use super::{DeviceStats, SourceCtx, TagKind, TagPlan};
use crate::backoff::Backoff;
use crate::model::{now_millis, BadReason, Quality, Reading, ReadingBatch, Value};
use protocol::link::{ChannelInfo, Decoder, Frame, FrameError, Message};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tracing::{debug, info, warn};

pub struct SensorSource {
    pub ctx: SourceCtx,
    pub plan: config::SensorDevicePlan,
}

/// What the agent knows of a node, learned from its frames.
#[derive(Debug, Default)]
pub struct NodeState {
    node_id: Option<u32>,
    channels: Vec<ChannelInfo>,
    /// Per channel: scale and offset as the decimals the node meant (`0.01`, not `0.0099999998`).
    factors: Vec<(f64, f64)>,
    /// Tag index -> channel index in `channels`, once a hello was seen.
    mapping: HashMap<usize, usize>,
    last_seq: Option<u32>,
    last_uptime: u32,
    /// Faults reported in the current cycle: channel -> reason.
    faults: HashMap<u8, BadReason>,
    /// Tags whose channel the hello did not announce (reported once per hello).
    unmapped_reported: bool,
}

/// What one frame changed, for counters and logs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FrameEffects {
    pub lost: u64,
    pub reboot: bool,
    /// Samples before any hello: the channels are not known yet.
    pub unmapped_samples: bool,
}

impl NodeState {
    /// Applies one frame; returns the readings of a finished cycle (a `Samples` frame), if any.
    pub fn on_frame(
        &mut self,
        device_tags: &[usize],
        tags: &[TagPlan],
        frame: Frame,
        effects: &mut FrameEffects,
    ) -> Option<Vec<Reading>> {
        if let Some(last) = self.last_seq {
            let ahead = frame.seq.wrapping_sub(last);
            if frame.uptime_ms < self.last_uptime || ahead == 0 || ahead > u32::MAX / 2 {
                effects.reboot = true;
            } else {
                effects.lost = u64::from(ahead - 1);
            }
        }
        self.last_seq = Some(frame.seq);
        self.last_uptime = frame.uptime_ms;
        match frame.msg {
            Message::Hello(h) => {
                self.node_id = Some(h.node_id);
                self.channels = h.channels.into_iter().collect();
                self.factors = self
                    .channels
                    .iter()
                    .map(|c| (decimal(c.scale), decimal(c.offset)))
                    .collect();
                self.mapping.clear();
                self.unmapped_reported = false;
                for &ti in device_tags {
                    let t = &tags[ti];
                    let found = match &t.kind {
                        TagKind::Sensor(config::SensorTagPlan { channel: Some(index) }) => {
                            self.channels.iter().position(|c| c.index == *index)
                        }
                        _ => self.channels.iter().position(|c| c.name.as_str() == t.name),
                    };
                    if let Some(c) = found {
                        self.mapping.insert(ti, c);
                    }
                }
                None
            }
            Message::Fault(f) => {
                self.faults.insert(f.channel, BadReason::Sensor(f.code));
                None
            }
            Message::Heartbeat => None,
            Message::Samples(samples) => {
                let faults = std::mem::take(&mut self.faults);
                if self.node_id.is_none() {
                    effects.unmapped_samples = true;
                    return None;
                }
                let readings = device_tags
                    .iter()
                    .map(|&ti| {
                        let t = &tags[ti];
                        let (value, quality) =
                            match self.mapping.get(&ti).map(|&c| (&self.channels[c], self.factors[c])) {
                                None => (None, Quality::Bad(BadReason::NoValue)),
                                Some((ch, (scale, offset))) => match samples.iter().find(|s| s.channel == ch.index) {
                                    Some(s) => {
                                        let v = (f64::from(s.raw) * scale + offset) * t.scale + t.offset;
                                        if v.is_finite() {
                                            (Some(Value::Float(v)), Quality::Good)
                                        } else {
                                            (None, Quality::Bad(BadReason::Decode))
                                        }
                                    }
                                    None => (
                                        None,
                                        Quality::Bad(faults.get(&ch.index).copied().unwrap_or(BadReason::NoValue)),
                                    ),
                                },
                            };
                        Reading {
                            tag: ti,
                            value,
                            quality,
                        }
                    })
                    .collect();
                Some(readings)
            }
        }
    }

    /// Tags whose channel the last hello did not announce, once per hello.
    fn take_unmapped(&mut self, device_tags: &[usize], tags: &[TagPlan]) -> Vec<String> {
        if self.node_id.is_none() || self.unmapped_reported {
            return Vec::new();
        }
        self.unmapped_reported = true;
        device_tags
            .iter()
            .filter(|ti| !self.mapping.contains_key(ti))
            .map(|&ti| tags[ti].name.to_string())
            .collect()
    }
}

impl SensorSource {
    pub async fn run(mut self) {
        let serial = self.plan.serial.clone();
        let stale_after = self.plan.stale_after;
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        info!(device = %self.ctx.id, port = %serial.port, baud = serial.baud, tags = self.ctx.device_tags.len(), "sensor node link");
        loop {
            if *self.ctx.shutdown.borrow() {
                return;
            }
            let port = match open(&serial) {
                Ok(p) => p,
                Err(e) => {
                    let wait = backoff.next_delay();
                    warn!(device = %self.ctx.id, port = %serial.port, error = %e, retry_in = ?wait, "cannot open the sensor node's port");
                    if !self.emit_all_bad(BadReason::Disconnected).await || self.sleep_or_shutdown(wait).await {
                        return;
                    }
                    continue;
                }
            };
            backoff.reset();
            self.ctx.stats.connected.store(1, Ordering::Relaxed);
            let why = self.read_frames(port, stale_after).await;
            self.ctx.stats.connected.store(0, Ordering::Relaxed);
            match why {
                None => return,
                Some(e) => {
                    DeviceStats::inc(&self.ctx.stats.reconnects);
                    warn!(device = %self.ctx.id, error = %e, "sensor node port closed; reopening");
                    if !self.emit_all_bad(BadReason::Disconnected).await
                        || self.sleep_or_shutdown(backoff.next_delay()).await
                    {
                        return;
                    }
                }
            }
        }
    }

    /// Reads until the port fails (returns why) or shutdown (`None`).
    async fn read_frames(&mut self, mut port: tokio_serial::SerialStream, stale_after: Duration) -> Option<String> {
        let mut decoder = Decoder::default();
        let mut state = NodeState::default();
        let mut buf = [0u8; 1024];
        let mut silent_since = tokio::time::Instant::now();
        let mut stale_reported = false;
        loop {
            let deadline = silent_since + stale_after;
            let n = tokio::select! {
                r = port.read(&mut buf) => match r {
                    Ok(0) => return Some("end of stream".into()),
                    Ok(n) => n,
                    Err(e) => return Some(e.to_string()),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    // Silence: the node is gone, or the cable is. Say so every stale_after.
                    if !stale_reported {
                        warn!(device = %self.ctx.id, after = ?stale_after, "no frame from the sensor node");
                        stale_reported = true;
                    }
                    if !self.emit_all_bad(BadReason::LinkLost).await {
                        return None;
                    }
                    silent_since = tokio::time::Instant::now();
                    continue;
                }
                _ = self.ctx.shutdown.changed() => return None,
            };
            for &b in &buf[..n] {
                let Some(result) = decoder.push(b) else {
                    continue;
                };
                match result {
                    Ok(frame) => {
                        silent_since = tokio::time::Instant::now();
                        stale_reported = false;
                        DeviceStats::inc(&self.ctx.stats.polls);
                        if !self.on_frame(&mut state, frame).await {
                            return None;
                        }
                    }
                    Err(e) => {
                        DeviceStats::inc(&self.ctx.stats.errors);
                        if e == FrameError::Crc {
                            DeviceStats::inc(&self.ctx.stats.crc_errors);
                        }
                        debug!(device = %self.ctx.id, error = ?e, "bytes on the link that were not a frame");
                    }
                }
            }
        }
    }

    /// Handles one frame; false when the pipeline is gone.
    async fn on_frame(&mut self, state: &mut NodeState, frame: Frame) -> bool {
        let is_hello = matches!(frame.msg, Message::Hello(_));
        let seq = frame.seq;
        let mut effects = FrameEffects::default();
        let readings = state.on_frame(&self.ctx.device_tags, &self.ctx.tags, frame, &mut effects);
        if effects.lost > 0 {
            self.ctx.stats.lost_frames.fetch_add(effects.lost, Ordering::Relaxed);
            debug!(device = %self.ctx.id, lost = effects.lost, seq, "frames lost on the link");
        }
        if effects.reboot {
            DeviceStats::inc(&self.ctx.stats.reboots);
            info!(device = %self.ctx.id, seq, "the sensor node restarted");
        }
        if is_hello {
            info!(device = %self.ctx.id, node_id = format!("{:08x}", state.node_id.unwrap_or(0)),
                  channels = ?state.channels.iter().map(|c| format!("{}:{} [{}]", c.index, c.name, c.unit)).collect::<Vec<_>>(),
                  "sensor node announced itself");
            let unmapped = state.take_unmapped(&self.ctx.device_tags, &self.ctx.tags);
            if !unmapped.is_empty() {
                warn!(device = %self.ctx.id, tags = ?unmapped, "the node announces no channel for these tags");
            }
        }
        if effects.unmapped_samples {
            debug!(device = %self.ctx.id, "samples before the node's hello: skipped until it announces its channels");
        }
        match readings {
            Some(readings) => self
                .ctx
                .out
                .send(ReadingBatch {
                    device: self.ctx.index,
                    ts: now_millis(),
                    readings,
                })
                .await
                .is_ok(),
            None => true,
        }
    }

    async fn emit_all_bad(&self, reason: BadReason) -> bool {
        self.ctx.send_all_bad(reason).await
    }

    async fn sleep_or_shutdown(&mut self, d: Duration) -> bool {
        super::sleep_or_shutdown(&mut self.ctx.shutdown, d).await
    }
}

/// An `f32` as the shortest decimal that reads back as it (what the sender wrote), in `f64`.
fn decimal(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use protocol::link::{ChannelKind, Fault, FaultCode, Hello, Sample};
    use std::path::Path;

    fn plan() -> config::Plan {
        let gw = r#"
[agent]
id = "gw"
site = "s"
area = "a"
line = "l"
governance = "builtin-defaults"
[[devices]]
id = "node"
protocol = "sensor_node"
port = "/dev/null"
  [[devices.tags]]
  name = "loop_bar"
  channel = 2
  scale = 1000.0
"#;
        let p = r#"
id = "p"
name = "P"
version = "1.0.0"
domain = "d"
owner = "o"
[[fields]]
name = "t"
source = "node.temperature"
unit = "Cel"
[[fields]]
name = "p"
source = "node.loop_bar"
unit = "mbar"
[[fields]]
name = "missing"
source = "node.vibration"
"#;
        config::load_texts(
            (Path::new("agent.toml"), gw),
            None,
            &[(Path::new("p.toml"), p)],
            Path::new("/tmp"),
        )
        .unwrap()
    }

    fn hello(seq: u32) -> Frame {
        let ch = |index, name: &str, unit: &str, scale| ChannelInfo {
            index,
            kind: ChannelKind::Other,
            name: name.try_into().unwrap(),
            unit: unit.try_into().unwrap(),
            scale,
            offset: 0.0,
        };
        Frame {
            seq,
            uptime_ms: seq * 1000,
            msg: Message::Hello(Hello {
                node_id: 7,
                firmware: [0, 1, 0],
                channels: [ch(0, "temperature", "Cel", 0.01), ch(2, "pressure", "bar", 0.001)]
                    .into_iter()
                    .collect(),
            }),
        }
    }

    fn samples(seq: u32, s: &[(u8, i32)]) -> Frame {
        Frame {
            seq,
            uptime_ms: seq * 1000,
            msg: Message::Samples(s.iter().map(|&(channel, raw)| Sample { channel, raw }).collect()),
        }
    }

    #[test]
    fn channels_map_by_name_or_index_and_faults_carry_their_reason() {
        let plan = plan();
        let d = &plan.devices[0].tags;
        let mut st = NodeState::default();
        let mut fx = FrameEffects::default();
        // Before the hello nothing can be mapped.
        assert_eq!(st.on_frame(d, &plan.tags, samples(0, &[(0, 2150)]), &mut fx), None);
        assert!(fx.unmapped_samples);
        st.on_frame(d, &plan.tags, hello(1), &mut FrameEffects::default());
        let r = st
            .on_frame(
                d,
                &plan.tags,
                samples(2, &[(0, 2150), (2, 4250)]),
                &mut FrameEffects::default(),
            )
            .unwrap();
        let by_name = |r: &[Reading], name: &str| r.iter().find(|x| plan.tags[x.tag].name == name).cloned().unwrap();
        assert_eq!(by_name(&r, "temperature").value, Some(Value::Float(21.5)));
        // Channel 2 by index, 4.25 bar scaled by the tag to 4250 mbar.
        let v = by_name(&r, "loop_bar").value.unwrap().as_f64().unwrap();
        assert!((v - 4250.0).abs() < 1e-6, "{v}");
        assert_eq!(by_name(&r, "vibration").quality, Quality::Bad(BadReason::NoValue));
        // A fault, then a cycle without that channel.
        st.on_frame(
            d,
            &plan.tags,
            Frame {
                seq: 3,
                uptime_ms: 3000,
                msg: Message::Fault(Fault {
                    channel: 2,
                    code: FaultCode::WireBreak,
                }),
            },
            &mut FrameEffects::default(),
        );
        let r = st
            .on_frame(d, &plan.tags, samples(4, &[(0, 2150)]), &mut FrameEffects::default())
            .unwrap();
        assert_eq!(
            by_name(&r, "loop_bar").quality,
            Quality::Bad(BadReason::Sensor(FaultCode::WireBreak))
        );
        assert_eq!(by_name(&r, "temperature").quality, Quality::Good);
        assert_eq!(st.take_unmapped(d, &plan.tags), vec!["vibration".to_string()]);
    }

    #[test]
    fn gaps_and_reboots_are_told_apart() {
        let plan = plan();
        let d = &plan.devices[0].tags;
        let mut st = NodeState::default();
        st.on_frame(d, &plan.tags, hello(10), &mut FrameEffects::default());
        let mut fx = FrameEffects::default();
        st.on_frame(d, &plan.tags, samples(14, &[]), &mut fx);
        assert_eq!(
            fx,
            FrameEffects {
                lost: 3,
                ..Default::default()
            }
        );
        let mut fx = FrameEffects::default();
        st.on_frame(d, &plan.tags, hello(0), &mut fx);
        assert!(fx.reboot, "seq and uptime went back");
        // Wrapping seq is not a reboot.
        st.last_seq = Some(u32::MAX);
        st.last_uptime = 5;
        let mut fx = FrameEffects::default();
        st.on_frame(
            d,
            &plan.tags,
            Frame {
                seq: 0,
                uptime_ms: 6,
                msg: Message::Heartbeat,
            },
            &mut fx,
        );
        assert_eq!(fx, FrameEffects::default());
    }
}
