//! A simulated press-line PLC served over real Modbus TCP (tokio-modbus server) on loopback.
//!
//! Register map (unit id 1):
//! - holding 0-1: cycle counter (u32, ABCD); 2-3: good parts (u32, ABCD); 4: scrap parts (u16)
//! - input 0-1: die temperature (f32, CDAB); 2-3: hydraulic oil temperature (f32, CDAB)
//! - holding 20-23: operator badge (string, 8 characters); 30-31: recipe set point (f32, ABCD)
//! - coil 0: running
//!
//! Every 500 ms while running the press completes a cycle (about 4 % scrap); it stops for a few
//! seconds every minute, as a real press does for a die check.

use std::future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_modbus::prelude::*;
use tokio_modbus::server::tcp::{accept_tcp_connection, Server};

#[derive(Default)]
struct Memory {
    holding: Vec<u16>,
    input: Vec<u16>,
    coils: Vec<bool>,
}

#[derive(Clone)]
struct PlcService(Arc<Mutex<Memory>>);

fn slice<T: Clone>(v: &[T], addr: u16, n: u16) -> Result<Vec<T>, ExceptionCode> {
    let (a, n) = (usize::from(addr), usize::from(n));
    v.get(a..a + n)
        .map(<[T]>::to_vec)
        .ok_or(ExceptionCode::IllegalDataAddress)
}

impl tokio_modbus::server::Service for PlcService {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = future::Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let m = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        future::ready(match req {
            Request::ReadHoldingRegisters(a, n) => slice(&m.holding, a, n).map(Response::ReadHoldingRegisters),
            Request::ReadInputRegisters(a, n) => slice(&m.input, a, n).map(Response::ReadInputRegisters),
            Request::ReadCoils(a, n) => slice(&m.coils, a, n).map(Response::ReadCoils),
            _ => Err(ExceptionCode::IllegalFunction),
        })
    }
}

fn put_u32(regs: &mut [u16], at: usize, v: u32) {
    regs[at] = (v >> 16) as u16;
    regs[at + 1] = v as u16;
}

fn put_f32_cdab(regs: &mut [u16], at: usize, v: f32) {
    let b = v.to_bits();
    regs[at] = b as u16;
    regs[at + 1] = (b >> 16) as u16;
}

/// Starts the PLC on `bind` (port 0 for any free port); returns the bound address.
pub async fn start(bind: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    let mem = Arc::new(Mutex::new(Memory {
        holding: vec![0; 32],
        input: vec![0; 8],
        coils: vec![false; 8],
    }));
    let sim = mem.clone();
    tokio::spawn(async move {
        let (mut cycles, mut good, mut scrap) = (0u32, 0u32, 0u16);
        let mut t = 0.0f32;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            t += 0.5;
            let running = (t % 60.0) < 52.0;
            if running {
                cycles = cycles.wrapping_add(1);
                if fastrand::u8(0..100) < 4 {
                    scrap = scrap.wrapping_add(1);
                } else {
                    good = good.wrapping_add(1);
                }
            }
            let die = 182.0 + 6.0 * (t / 40.0).sin() + fastrand::f32() * 0.4 - if running { 0.0 } else { 3.0 };
            let oil = 48.0 + 2.0 * (t / 90.0).sin() + fastrand::f32() * 0.1;
            let mut m = sim.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            put_u32(&mut m.holding, 0, cycles);
            put_u32(&mut m.holding, 2, good);
            m.holding[4] = scrap;
            // Shifts change operator every 30 s; the recipe set point is the plant's know-how.
            let badge = ["OP-0042\0", "OP-0107\0", "OP-0311\0"][((t / 30.0) as usize) % 3].as_bytes();
            for (i, pair) in badge.chunks(2).enumerate() {
                m.holding[20 + i] = u16::from_be_bytes([pair[0], pair[1]]);
            }
            put_u32(&mut m.holding, 30, 187.5f32.to_bits());
            put_f32_cdab(&mut m.input, 0, die);
            put_f32_cdab(&mut m.input, 2, oil);
            m.coils[0] = running;
        }
    });
    serve(listener, mem);
    Ok(addr)
}

/// A plain register bank for load tests: `registers` holding registers whose values change every
/// 100 ms (register i holds `(i + tick) mod 65536`), served on `bind`.
pub async fn start_bank(bind: SocketAddr, registers: u16) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    let mem = Arc::new(Mutex::new(Memory {
        holding: vec![0; usize::from(registers)],
        input: Vec::new(),
        coils: Vec::new(),
    }));
    let sim = mem.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut n = 0u16;
        loop {
            tick.tick().await;
            n = n.wrapping_add(1);
            let mut m = sim.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for (i, r) in m.holding.iter_mut().enumerate() {
                *r = (i as u16).wrapping_add(n);
            }
        }
    });
    serve(listener, mem);
    Ok(addr)
}

/// Serves `mem` over Modbus TCP on `listener` until the runtime stops.
fn serve(listener: TcpListener, mem: Arc<Mutex<Memory>>) {
    let server = Server::new(listener);
    tokio::spawn(async move {
        let new_service = move |_addr: SocketAddr| Ok(Some(PlcService(mem.clone())));
        let on_connected = move |stream, addr| {
            let new_service = new_service.clone();
            async move { accept_tcp_connection(stream, addr, new_service) }
        };
        let on_error = |e| tracing::debug!(error = %e, "simulated device connection error");
        if let Err(e) = server.serve(&on_connected, on_error).await {
            tracing::error!(error = %e, "simulated device stopped");
        }
    });
}
