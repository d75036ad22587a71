//! Modbus source, TCP or RTU: one task per device (for RTU: per bus), polling coalesced reads at the
//! device's interval, one request in flight at a time.
//!
//! In: a Modbus device's plan ([`config::TcpPlan`] or [`config::RtuPlan`]) and the plan's tags. Out: one [`ReadingBatch`] per poll with a reading for
//! every tag, good or bad. A timeout, transport error or garbage response marks the affected tags bad
//! and reconnects with jittered backoff (a late answer on a reused connection could otherwise be taken
//! for the next request's). Exceptions mark only the tags of the refused read bad, after the read has
//! been split as far as it goes (see [`plan`]).
//!
//! On an RTU bus, several unit ids share the line. A unit that does not answer costs one timeout
//! per poll: its tags go bad (`timeout`), the rest of that poll skips it, and the port is reopened
//! so a late answer cannot be taken for the next unit's. The line is kept silent for the
//! inter-frame time before every request.

pub mod config;
pub mod decode;
pub mod plan;

use super::serial::SerialPlan;
use super::{DeviceStats, SourceCtx, SourceError};
use crate::backoff::Backoff;
use crate::model::{now_millis, BadReason, Quality, Reading, ReadingBatch};
use config::{modbus, Polling, RtuPlan, Table, TcpPlan};
use plan::ReadBlock;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::{timeout, Instant, MissedTickBehavior};
use tokio_modbus::client::{Client, Context, Reader};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Slave};
use tracing::{debug, info, warn};

/// Outcome of one read.
enum ReadOutcome {
    Registers(Vec<u16>),
    Bits(Vec<bool>),
    Exception(u8),
    /// The connection is unusable; reconnect.
    Broken(BadReason, String),
}

/// How a Modbus device is reached.
enum Link {
    Tcp(String),
    Rtu(SerialPlan),
}

pub struct ModbusSource {
    ctx: SourceCtx,
    link: Link,
    polling: Polling,
}

impl ModbusSource {
    pub fn tcp(ctx: SourceCtx, plan: TcpPlan) -> ModbusSource {
        ModbusSource {
            ctx,
            link: Link::Tcp(plan.address),
            polling: plan.polling,
        }
    }

    pub fn rtu(ctx: SourceCtx, plan: RtuPlan) -> ModbusSource {
        ModbusSource {
            ctx,
            link: Link::Rtu(plan.serial),
            polling: plan.polling,
        }
    }

    fn address(&self) -> &str {
        match &self.link {
            Link::Tcp(a) => a,
            Link::Rtu(s) => &s.port,
        }
    }

    /// Runs until shutdown or until the pipeline behind it is gone.
    pub async fn run(mut self) {
        let mut blocks = plan::coalesce(&self.polling, &self.ctx.device_tags, &self.ctx.tags);
        info!(device = %self.ctx.id, address = %self.address(), reads = blocks.len(), tags = self.ctx.device_tags.len(), "Modbus device planned");
        let mut backoff = Backoff::new(
            Duration::from_millis(200),
            Duration::from_secs(30).max(self.polling.poll_interval),
        );
        loop {
            if *self.ctx.shutdown.borrow() {
                return;
            }
            let ctx = match self.connect().await {
                Ok(ctx) => ctx,
                Err(e) => {
                    let wait = backoff.next_delay();
                    // One line per backoff step; every poll that could not happen still yields bad readings.
                    warn!(device = %self.ctx.id, error = %e, retry_in = ?wait, attempt = backoff.attempt(), "Modbus connect failed");
                    if !self.emit_all_bad(BadReason::Disconnected).await {
                        return;
                    }
                    if self.sleep_or_shutdown(wait).await {
                        return;
                    }
                    continue;
                }
            };
            backoff.reset();
            self.ctx.stats.connected.store(1, std::sync::atomic::Ordering::Relaxed);
            let reason = self.poll_connected(ctx, &mut blocks).await;
            self.ctx.stats.connected.store(0, std::sync::atomic::Ordering::Relaxed);
            match reason {
                None => return,
                Some(why) => {
                    DeviceStats::inc(&self.ctx.stats.reconnects);
                    let wait = backoff.next_delay();
                    warn!(device = %self.ctx.id, reason = %why, retry_in = ?wait, "Modbus connection dropped");
                    if self.sleep_or_shutdown(wait).await {
                        return;
                    }
                }
            }
        }
    }

    async fn connect(&self) -> Result<Context, SourceError> {
        let address = match &self.link {
            Link::Rtu(serial) => {
                let port = super::serial::open(serial)?;
                return Ok(tokio_modbus::client::rtu::attach_slave(port, Slave(1)));
            }
            Link::Tcp(address) => address,
        };
        // A literal address needs no resolver (which would run on tokio's blocking pool).
        let addr: SocketAddr = match address.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => super::resolve(address).await?,
        };
        let timeout_after = self.polling.timeout;
        match timeout(timeout_after, tokio_modbus::client::tcp::connect_slave(addr, Slave(1))).await {
            Ok(Ok(ctx)) => Ok(ctx),
            Ok(Err(source)) => Err(SourceError::Connect {
                address: address.clone(),
                source,
            }),
            Err(_) => Err(SourceError::ConnectTimeout {
                address: address.clone(),
                after: timeout_after,
            }),
        }
    }

    /// Polls until the connection breaks (returns the reason) or shutdown (returns `None`).
    async fn poll_connected(&mut self, mut ctx: Context, blocks: &mut Vec<ReadBlock>) -> Option<String> {
        let mut ticker = tokio::time::interval_at(Instant::now(), self.polling.poll_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = self.ctx.shutdown.changed() => return None,
            }
            DeviceStats::inc(&self.ctx.stats.polls);
            let ts = now_millis();
            let mut readings = Vec::with_capacity(self.ctx.device_tags.len());
            let mut broken: Option<(BadReason, String)> = None;
            let mut silent: Vec<u8> = Vec::new();
            let mut i = 0;
            while i < blocks.len() {
                if let Some((reason, _)) = &broken {
                    push_bad(&mut readings, &blocks[i].tags, *reason);
                    i += 1;
                    continue;
                }
                if silent.contains(&blocks[i].unit_id) {
                    push_bad(&mut readings, &blocks[i].tags, BadReason::Timeout);
                    i += 1;
                    continue;
                }
                match self.read(&mut ctx, &blocks[i]).await {
                    ReadOutcome::Registers(regs) => {
                        self.decode_block(&blocks[i], Some(&regs), None, &mut readings);
                        i += 1;
                    }
                    ReadOutcome::Bits(bits) => {
                        self.decode_block(&blocks[i], None, Some(&bits), &mut readings);
                        i += 1;
                    }
                    ReadOutcome::Exception(code) => {
                        // Address and value exceptions on a merged read usually mean the read crosses a
                        // hole in the device's map or exceeds its length limit: split and retry now.
                        if matches!(code, 0x02 | 0x03) {
                            if let Some((a, b)) = plan::split(&blocks[i], &self.ctx.tags) {
                                info!(device = %self.ctx.id, start = blocks[i].start, count = blocks[i].count, exception = code,
                                      "device refused a merged read; splitting it for good");
                                blocks.splice(i..=i, [a, b]);
                                continue;
                            }
                        }
                        debug!(device = %self.ctx.id, start = blocks[i].start, exception = code, "Modbus exception");
                        push_bad(&mut readings, &blocks[i].tags, BadReason::ModbusException(code));
                        i += 1;
                    }
                    ReadOutcome::Broken(BadReason::Timeout, _) if matches!(self.link, Link::Rtu(_)) => {
                        // One silent unit on a shared bus: the others still get their turn.
                        let unit = blocks[i].unit_id;
                        debug!(device = %self.ctx.id, unit, "unit did not answer; skipped for the rest of this poll");
                        push_bad(&mut readings, &blocks[i].tags, BadReason::Timeout);
                        silent.push(unit);
                        i += 1;
                        let _ = ctx.disconnect().await;
                        match self.connect().await {
                            Ok(fresh) => ctx = fresh,
                            Err(e) => broken = Some((BadReason::Disconnected, e.to_string())),
                        }
                    }
                    ReadOutcome::Broken(reason, msg) => {
                        push_bad(&mut readings, &blocks[i].tags, reason);
                        broken = Some((reason, msg));
                        i += 1;
                    }
                }
            }
            readings.sort_by_key(|r| r.tag);
            if self
                .ctx
                .out
                .send(ReadingBatch {
                    device: self.ctx.index,
                    ts,
                    readings,
                })
                .await
                .is_err()
            {
                return None;
            }
            if let Some((_, msg)) = broken {
                let _ = ctx.disconnect().await;
                return Some(msg);
            }
        }
    }

    async fn read(&self, ctx: &mut Context, b: &ReadBlock) -> ReadOutcome {
        if let Link::Rtu(serial) = &self.link {
            tokio::time::sleep(serial.inter_frame).await;
        }
        ctx.set_slave(Slave(b.unit_id));
        DeviceStats::inc(&self.ctx.stats.requests);
        let call = async {
            match b.table {
                Table::Holding => ctx
                    .read_holding_registers(b.start, b.count)
                    .await
                    .map(|r| r.map(ReadOutcome::Registers)),
                Table::Input => ctx
                    .read_input_registers(b.start, b.count)
                    .await
                    .map(|r| r.map(ReadOutcome::Registers)),
                Table::Coil => ctx.read_coils(b.start, b.count).await.map(|r| r.map(ReadOutcome::Bits)),
                Table::DiscreteInput => ctx
                    .read_discrete_inputs(b.start, b.count)
                    .await
                    .map(|r| r.map(ReadOutcome::Bits)),
            }
        };
        let outcome = match timeout(self.polling.timeout, call).await {
            Ok(Ok(Ok(outcome))) => outcome,
            Ok(Ok(Err(exception))) => ReadOutcome::Exception(exception_code(exception)),
            Ok(Err(tokio_modbus::Error::Transport(e))) if e.kind() == std::io::ErrorKind::InvalidData => {
                ReadOutcome::Broken(BadReason::Decode, format!("garbage response: {e}"))
            }
            Ok(Err(tokio_modbus::Error::Transport(e))) => ReadOutcome::Broken(BadReason::Disconnected, e.to_string()),
            Ok(Err(tokio_modbus::Error::Protocol(e))) => {
                ReadOutcome::Broken(BadReason::Decode, format!("invalid response: {e}"))
            }
            Err(_) => ReadOutcome::Broken(
                BadReason::Timeout,
                format!("no response within {:?}", self.polling.timeout),
            ),
        };
        if !matches!(outcome, ReadOutcome::Registers(_) | ReadOutcome::Bits(_)) {
            DeviceStats::inc(&self.ctx.stats.errors);
        }
        outcome
    }

    fn decode_block(&self, b: &ReadBlock, regs: Option<&[u16]>, bits: Option<&[bool]>, out: &mut Vec<Reading>) {
        for &ti in &b.tags {
            let t = &self.ctx.tags[ti];
            let Some(m) = modbus(t) else {
                continue;
            };
            let off = usize::from(m.address - b.start);
            let (value, quality) = match (regs, bits) {
                (Some(regs), _) => match regs.get(off..off + usize::from(m.width(t.data_type))) {
                    Some(slice) => decode::decode_registers(t, slice),
                    None => (None, Quality::Bad(BadReason::Decode)),
                },
                (None, Some(bits)) => match bits.get(off) {
                    Some(&bit) => (Some(crate::model::Value::Bool(bit)), Quality::Good),
                    None => (None, Quality::Bad(BadReason::Decode)),
                },
                (None, None) => (None, Quality::Bad(BadReason::Decode)),
            };
            out.push(Reading {
                tag: ti,
                value,
                quality,
            });
        }
    }

    async fn emit_all_bad(&self, reason: BadReason) -> bool {
        self.ctx.send_all_bad(reason).await
    }

    async fn sleep_or_shutdown(&mut self, d: Duration) -> bool {
        super::sleep_or_shutdown(&mut self.ctx.shutdown, d).await
    }
}

fn push_bad(out: &mut Vec<Reading>, tags: &[usize], reason: BadReason) {
    out.extend(tags.iter().map(|&tag| Reading {
        tag,
        value: None,
        quality: Quality::Bad(reason),
    }));
}

fn exception_code(e: ExceptionCode) -> u8 {
    match e {
        ExceptionCode::IllegalFunction => 0x01,
        ExceptionCode::IllegalDataAddress => 0x02,
        ExceptionCode::IllegalDataValue => 0x03,
        ExceptionCode::ServerDeviceFailure => 0x04,
        ExceptionCode::Acknowledge => 0x05,
        ExceptionCode::ServerDeviceBusy => 0x06,
        ExceptionCode::MemoryParityError => 0x08,
        ExceptionCode::GatewayPathUnavailable => 0x0A,
        ExceptionCode::GatewayTargetDevice => 0x0B,
        ExceptionCode::Custom(c) => c,
    }
}
