//! Backlog drain into a real Mosquitto (with a subscriber). Prints records/s and MB/s drained, live
//! read-to-PUBACK p99 during the drain, agent CPU and RSS.
//! - `DRAIN_MODE=outage` (default): the real agent runs with the broker down while 100 Modbus banks
//!   polled every 10 ms feed 20 products, until DRAIN_RECORDS are buffered (messages of the few
//!   records of one commit); then the banks stop, the broker comes up, and the backlog drains beside
//!   one live product (merged into large messages before its first send).
//! - `DRAIN_MODE=restart`: a buffer prebuilt with DRAIN_RECORDS in messages of
//!   DRAIN_RECORDS_PER_MESSAGE (4), as an agent that stopped during an outage leaves it; the agent
//!   is started on it with the broker up (messages of an earlier run are never merged: they may
//!   have been sent before the stop).
//!
//! Run: `cargo bench -p plantmesh --bench drain`. Settings (environment): DRAIN_RECORDS (1000000),
//! DRAIN_PRODUCTS (20, restart mode), DRAIN_BYTES_PER_SECOND (unset: no cap; e.g. 125kB for a
//! 1 Mbit/s uplink; with a cap the run stops after DRAIN_SECONDS, default 30).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark that fails stops with its location"
)]

use plantmesh::buffer::{Batch, NewMessage, Store};
use plantmesh::govern::Treatment;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn scrape(port: u16) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut out = String::new();
    let _ = std::io::Read::read_to_string(&mut s, &mut out);
    out
}

fn proc_stat(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    (ticks, rss)
}

fn simulate(bin: &str, banks: usize) -> (Kill, Vec<String>) {
    let mut sim = Kill(
        Command::new(bin)
            .args(["simulate", "--devices", &banks.to_string(), "--registers", "10"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut addrs = Vec::new();
    for line in BufReader::new(sim.0.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("SIM ") {
            addrs.push(rest.split_whitespace().nth(1).unwrap().to_string());
            if addrs.len() == banks {
                break;
            }
        }
    }
    (sim, addrs)
}

fn device(id: &str, addr: &str, poll: &str) -> String {
    let mut d = format!(
        "[[devices]]\nid = \"{id}\"\nprotocol = \"modbus_tcp\"\naddress = \"{addr}\"\npoll_interval = \"{poll}\"\n"
    );
    for r in 0..10 {
        d += &format!("[[devices.tags]]\nname = \"r{r}\"\ntable = \"holding\"\naddress = {r}\n");
    }
    d
}

fn product(id: &str, fields: &[(String, String)]) -> String {
    let mut p = format!(
        "id = \"{id}\"\nname = \"{id}\"\nversion = \"1.0.0\"\ndomain = \"bench\"\nowner = \"bench\"\n[buffer]\nmax_bytes = \"1GiB\"\n"
    );
    for (name, source) in fields {
        p += &format!("[[fields]]\nname = \"{name}\"\nsource = \"{source}\"\n");
    }
    p
}

fn broker(dir: &std::path::Path, port: u16) -> (Kill, Kill) {
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n"),
    )
    .unwrap();
    let mosquitto = ["/usr/sbin/mosquitto", "mosquitto"]
        .into_iter()
        .find(|m| {
            Command::new(m)
                .arg("-h")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok()
        })
        .expect("mosquitto (scripts/test.sh installs it)");
    let b = Kill(
        Command::new(mosquitto)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(300));
    let sub = Kill(
        Command::new("mosquitto_sub")
            .args(["-p", &port.to_string(), "-t", "bench/#", "-q", "1"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(200));
    (b, sub)
}

fn main() {
    let records: u64 = env("DRAIN_RECORDS", 1_000_000);
    let cap: Option<String> = std::env::var("DRAIN_BYTES_PER_SECOND").ok();
    let seconds: u64 = env("DRAIN_SECONDS", 30);
    let outage = std::env::var("DRAIN_MODE").map_or(true, |m| m != "restart");
    let bin = env!("CARGO_BIN_EXE_plantmesh");
    let dir = tempfile::tempdir().unwrap();
    let (cfg, data) = (dir.path().join("cfg"), dir.path().join("data"));
    std::fs::create_dir_all(cfg.join("products")).unwrap();
    std::fs::create_dir_all(&data).unwrap();
    let broker_port = free_port();
    let metrics_port = free_port();
    let mut gw = format!(
        "[agent]\nid = \"gw-drain\"\nsite = \"bench\"\narea = \"a\"\nline = \"l\"\ngovernance = \"builtin-defaults\"\n\
         metrics_listen = \"127.0.0.1:{metrics_port}\"\n\
         [upstream]\nurl = \"mqtt://127.0.0.1:{broker_port}\"\nprotocol = \"5\"\nreconnect_min = \"200ms\"\nreconnect_max = \"1s\"\n"
    );
    if let Some(c) = &cap {
        gw += &format!("backlog_bytes_per_second = \"{c}\"\n");
    }
    gw += "[buffer]\nmax_bytes = \"8GiB\"\n";
    // Live data: one bank polled every second, its own product.
    let (_live_sim, live) = simulate(bin, 1);
    gw += &device("live", &live[0], "1s");
    let live_fields: Vec<(String, String)> = (0..10).map(|r| (format!("r{r}"), format!("live.r{r}"))).collect();
    std::fs::write(cfg.join("products/live.toml"), product("live", &live_fields)).unwrap();

    let backlog_records;
    let mut backlog_bytes = 0u64;
    let agent;
    if outage {
        // 100 banks every 10 ms, five per product: 10,000 records/s while the broker is down.
        let (sim, banks) = simulate(bin, 100);
        for (i, addr) in banks.iter().enumerate() {
            gw += &device(&format!("d{i}"), addr, "10ms");
        }
        for p in 0..20 {
            let fields: Vec<(String, String)> = (0..5)
                .flat_map(|k| {
                    let d = p * 5 + k;
                    (0..2).map(move |r| (format!("d{d}_r{r}"), format!("d{d}.r{r}")))
                })
                .collect();
            std::fs::write(
                cfg.join(format!("products/p{p}.toml")),
                product(&format!("p{p}"), &fields),
            )
            .unwrap();
        }
        std::fs::write(cfg.join("agent.toml"), &gw).unwrap();
        agent = start_agent(bin, &cfg, &data);
        let built = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let m = scrape(metrics_port);
            let accepted = metric(&m, "plantmesh_records_accepted_total").unwrap_or(0.0) as u64;
            if accepted >= records {
                break;
            }
            assert!(built.elapsed() < Duration::from_secs(900), "the backlog did not build");
        }
        drop(sim); // the outage is over: the banks stop, the live product goes on
        std::thread::sleep(Duration::from_secs(2));
        let m = scrape(metrics_port);
        backlog_records = metric(&m, "plantmesh_records_accepted_total").unwrap_or(0.0) as u64;
        backlog_bytes = metric(&m, "plantmesh_buffer_pending_bytes").unwrap_or(0.0) as u64;
        println!(
            "backlog: {backlog_records} records, {:.1} MB buffered by the agent in {:.1} s with the broker down",
            backlog_bytes as f64 / 1e6,
            built.elapsed().as_secs_f64()
        );
    } else {
        let products: usize = env("DRAIN_PRODUCTS", 20);
        let per_message: u64 = env("DRAIN_RECORDS_PER_MESSAGE", 4);
        let (sim, banks) = simulate(bin, products);
        for (i, addr) in banks.iter().enumerate() {
            gw += &device(&format!("d{i}"), addr, "1s");
            let fields: Vec<(String, String)> = (0..10).map(|r| (format!("r{r}"), format!("d{i}.r{r}"))).collect();
            std::fs::write(
                cfg.join(format!("products/p{i}.toml")),
                product(&format!("p{i}"), &fields),
            )
            .unwrap();
        }
        std::fs::write(cfg.join("agent.toml"), &gw).unwrap();
        let plan = plantmesh::config::load(std::slice::from_ref(&cfg)).unwrap();
        let built = Instant::now();
        let (mut store, _) = Store::open(&data.join("buffer.redb"), 8 << 30, 4 << 20).unwrap();
        let treatments: Vec<Treatment> = plan.products.iter().map(Treatment::of).collect();
        store
            .record_treatments(plan.products.iter().map(|p| p.key.as_str()).zip(&treatments))
            .unwrap();
        let record = |n: u64| {
            format!(
                "{{\"ts\":\"2026-11-21T10:00:00.123Z\",\"fields\":{{\"r0\":{n},\"r1\":12,\"r2\":3,\"r3\":4,\"r4\":1042,\"r5\":3,\"r6\":17,\"r7\":0,\"r8\":99,\"r9\":4}},\"quality\":{{\"r0\":\"good\",\"r1\":\"good\",\"r2\":\"good\",\"r3\":\"good\",\"r4\":\"good\",\"r5\":\"good\",\"r6\":\"good\",\"r7\":\"good\",\"r8\":\"good\",\"r9\":\"good\"}}}}"
            )
        };
        let created = plantmesh::model::now_millis() - 3_600_000;
        let messages = records / per_message;
        let mut written = 0u64;
        let bulk: Vec<usize> = (0..plan.products.len())
            .filter(|&i| plan.products[i].id != "live")
            .collect();
        while written < messages {
            let mut batch = Batch::default();
            for _ in 0..10_000.min(messages - written) {
                let i = bulk[(written % bulk.len() as u64) as usize];
                let p = &plan.products[i];
                let body: Vec<String> = (0..per_message).map(|k| record(written * per_message + k)).collect();
                let body = format!("[{}]", body.join(",")).into_bytes();
                backlog_bytes += body.len() as u64;
                batch.appends.push(NewMessage {
                    product: store.key(&p.key),
                    created,
                    records: per_message as u32,
                    topic: p.topic.clone(),
                    version: p.version.clone(),
                    governance: treatments[i].fingerprint(),
                    body,
                });
                written += 1;
            }
            store.commit(batch).unwrap();
        }
        drop(store);
        drop(sim);
        backlog_records = messages * per_message;
        println!(
            "backlog: {backlog_records} records in {messages} messages of {per_message}, {:.1} MB, prebuilt in {:.1} s",
            backlog_bytes as f64 / 1e6,
            built.elapsed().as_secs_f64()
        );
        agent = start_agent(bin, &cfg, &data);
    }

    // Counted from before the broker comes up: the drain may be over in well under a second.
    let acked0 = metric(&scrape(metrics_port), "plantmesh_records_acked_total").unwrap_or(0.0);
    let pid = agent.0.id();
    let clk = 100.0; // USER_HZ on Linux
    let start = Instant::now();
    let (t0, _) = proc_stat(pid);
    let _broker = broker(dir.path(), broker_port);
    let mut peak_rss = 0;
    let mut last = Instant::now();
    let (acked, p99) = loop {
        std::thread::sleep(Duration::from_millis(250));
        let m = scrape(metrics_port);
        let acked = metric(&m, "plantmesh_records_acked_total").unwrap_or(0.0) - acked0;
        peak_rss = peak_rss.max(proc_stat(pid).1);
        if last.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "  {:.0} s: {acked:.0} records acknowledged",
                start.elapsed().as_secs_f64()
            );
            last = Instant::now();
        }
        let done = acked >= backlog_records as f64;
        let out_of_time = cap.is_some() && start.elapsed() >= Duration::from_secs(seconds);
        if done || out_of_time || start.elapsed() > Duration::from_secs(900) {
            break (acked, metric(&m, "plantmesh_publish_latency_ms{quantile=\"0.99\"}"));
        }
    };
    let wall = start.elapsed().as_secs_f64();
    let (t1, _) = proc_stat(pid);
    let bytes = acked / backlog_records.max(1) as f64 * backlog_bytes as f64;
    println!(
        "drain ({}{}): {acked:.0} records in {wall:.1} s = {:.0} records/s, {:.2} MB/s; live p99 {} ms; agent CPU {:.0} % of a core, peak RSS {:.1} MiB",
        if outage { "outage" } else { "restart" },
        cap.as_ref().map_or(String::new(), |c| format!(", backlog_bytes_per_second = {c}")),
        acked / wall,
        bytes / wall / 1e6,
        p99.map_or("-".into(), |v| format!("{v:.0}")),
        (t1 - t0) as f64 / clk / wall * 100.0,
        peak_rss as f64 / 1024.0
    );
}

fn start_agent(bin: &str, cfg: &std::path::Path, data: &std::path::Path) -> Kill {
    Kill(
        Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(cfg)
            .arg("--data-dir")
            .arg(data)
            .env("PLANTMESH_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}
