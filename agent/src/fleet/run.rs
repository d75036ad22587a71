//! `plantmesh catalog` and `plantmesh verify`: a [`Reader`] on the broker, its fleet printed, served
//! or checked.

use super::catalog::{Interest, Seen};
use super::verify::Verifier;
use super::{Broker, Next, Reader};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How `plantmesh catalog` shows the fleet.
#[derive(Debug, Clone)]
pub struct CatalogOptions {
    pub json: bool,
    pub watch: bool,
    /// Serve the page and its JSON here (implies watching).
    pub serve: Option<std::net::SocketAddr>,
    /// One-shot: the longest to wait for the retained documents to settle.
    pub wait: Duration,
    /// Only products whose URN or id matches.
    pub filter: Option<String>,
}

/// The fleet's JSON document, as `--json` prints it and the page polls it.
fn document(reader: &Reader) -> serde_json::Value {
    serde_json::json!({
        "kind": "fleet",
        "ts": crate::model::format_rfc3339_millis(crate::model::now_millis()),
        "connected": reader.connected,
        "products": reader.fleet.rows(),
    })
}

/// The catalog's quiet time: the fleet is taken as complete once nothing changed for this long.
const SETTLED: Duration = Duration::from_millis(1500);

/// Runs `plantmesh catalog`. `Err`: the broker could not be used at all.
pub async fn catalog(broker: &Broker, o: &CatalogOptions) -> Result<(), String> {
    let started = Instant::now();
    let mut reader = Reader::start(
        broker,
        Interest {
            filter: o.filter.clone(),
            data: false,
        },
        false,
    )?;
    let shown = Arc::new(Mutex::new(document(&reader)));
    if let Some(addr) = o.serve {
        let doc = shown.clone();
        let bound = crate::http::serve(
            addr,
            Arc::new(move |path: &str| match path {
                "/api/state" => {
                    let body = doc.lock().map(|d| d.to_string()).unwrap_or_default();
                    crate::http::Response::json(body)
                }
                _ => crate::page::respond(path),
            }),
        )
        .await
        .map_err(|e| format!("--serve {addr}: cannot listen: {e}"))?;
        eprintln!("catalog page on http://{bound}/");
    }
    let live = o.watch || o.serve.is_some();
    let mut printed_at = None::<Instant>;
    let mut printed_change = None::<Instant>;
    let (mut served_at, mut served_change) = (None::<Instant>, None::<Instant>);
    loop {
        let _ = reader.next(Duration::from_millis(250)).await;
        // The served document: rebuilt at most once a second, when the fleet changed (a row per
        // product; rebuilding it on every message of a thousand products would be quadratic).
        if o.serve.is_some()
            && served_change != Some(reader.last_change)
            && served_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            if let Ok(mut d) = shown.lock() {
                *d = document(&reader);
            }
            served_change = Some(reader.last_change);
            served_at = Some(Instant::now());
        }
        if !live {
            let settled = reader.connected && reader.last_change.elapsed() >= SETTLED && started.elapsed() >= SETTLED;
            if settled || started.elapsed() >= o.wait {
                if !reader.connected && reader.connects == 0 {
                    return Err(format!(
                        "cannot reach the broker {}: {}",
                        broker.url,
                        reader.last_error.as_deref().unwrap_or("no answer")
                    ));
                }
                if !settled {
                    eprintln!(
                        "the catalog was still changing after {:?}; printing what arrived",
                        o.wait
                    );
                }
                print(&reader, o.json);
                reader.stop();
                return Ok(());
            }
            continue;
        }
        // Live: reprint when the fleet changed, at most every 2 s (a status page, not a log).
        let due = printed_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(2));
        if o.watch && due && printed_change != Some(reader.last_change) && reader.connected {
            if !o.json {
                use std::io::IsTerminal;
                if std::io::stdout().is_terminal() {
                    print!("\x1b[H\x1b[2J");
                }
            }
            print(&reader, o.json);
            printed_change = Some(reader.last_change);
            printed_at = Some(Instant::now());
        } else if printed_at.is_none() {
            printed_at = Some(Instant::now());
        }
    }
}

fn print(reader: &Reader, json: bool) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = if json {
        writeln!(out, "{}", document(reader))
    } else {
        write!(out, "{}", reader.fleet.table())
    };
    let _ = out.flush();
}

/// How `plantmesh verify` runs.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub filter: Option<String>,
    /// How long to watch; `None`: until interrupted.
    pub duration: Option<Duration>,
    pub json: bool,
}

/// Runs `plantmesh verify`: `Ok(true)` when every seq was delivered or announced and every copy
/// was identical.
pub async fn verify(broker: &Broker, o: &VerifyOptions) -> Result<bool, String> {
    let started = Instant::now();
    let mut reader = Reader::start(
        broker,
        Interest {
            filter: o.filter.clone(),
            data: true,
        },
        true,
    )?;
    let mut v = Verifier::new();
    let mut progress = Instant::now();
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    // While settling: (holes, when they last shrank), when settling began, when last checked.
    let mut settling: Option<(u64, Instant)> = None;
    let mut settle_start: Option<Instant> = None;
    let mut checked: Option<Instant> = None;
    loop {
        let next = tokio::select! {
            n = reader.next(Duration::from_millis(500)) => n,
            _ = &mut interrupted => break,
        };
        match next {
            Next::Message(Seen::Data(urn), payload) => {
                v.message(&urn, &payload);
            }
            Next::Message(Seen::Gap(urn), payload) => {
                v.gap(&urn, &payload);
            }
            _ => {}
        }
        if progress.elapsed() >= Duration::from_secs(10) {
            let r = v.report();
            eprintln!(
                "verify: {:.0} s, {} product(s), {} message(s), {} seq(s) delivered, {} hole seq(s) so far{}",
                started.elapsed().as_secs_f64(),
                reader.fleet.len(),
                r.messages,
                r.delivered,
                r.hole_seqs,
                if reader.connected { "" } else { ", broker not connected" }
            );
            progress = Instant::now();
        }
        let Some(d) = o.duration else { continue };
        if started.elapsed() < d {
            continue;
        }
        // Past the time asked for: what is still on its way (a backlog draining beside live
        // data, a product's backlog after a reconnect) may close a hole. Go on while holes remain
        // and the last 5 s closed some; 30 s at most.
        if checked.is_some_and(|t: Instant| t.elapsed() < Duration::from_millis(500)) {
            continue;
        }
        checked = Some(Instant::now());
        let holes = v.report().hole_seqs;
        let (was, since) = *settling.get_or_insert((holes, Instant::now()));
        if holes < was {
            settling = Some((holes, Instant::now()));
        }
        let at = *settle_start.get_or_insert_with(Instant::now);
        if holes == 0 || since.elapsed() >= Duration::from_secs(5) || at.elapsed() >= Duration::from_secs(30) {
            break;
        }
    }
    reader.stop();
    if reader.connects == 0 {
        return Err(format!(
            "cannot reach the broker {}: {}",
            broker.url,
            reader.last_error.as_deref().unwrap_or("no answer")
        ));
    }
    let r = v.report();
    let secs = started.elapsed().as_secs_f64();
    if o.json {
        println!("{}", serde_json::to_string(&r).unwrap_or_default());
    } else {
        print!("{}", r.text());
        println!(
            "{} product(s) followed for {secs:.0} s; {}",
            reader.fleet.len(),
            if r.ok() { "OK" } else { "FAILED" }
        );
    }
    Ok(r.ok())
}
