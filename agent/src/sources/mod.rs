//! Sources: one task per device connection, each turning polls into [`ReadingBatch`]es.
//!
//! A source never stalls another: each device runs in its own task with its own timeouts and
//! reconnect backoff. A bad device produces readings with a bad quality (exception code, timeout,
//! disconnect, decode failure), never an error that stops the pipeline.

pub mod backoff;
pub mod modbus;
pub mod mqtt;
pub mod opcua;
pub mod sensor;

use crate::model::ReadingBatch;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one device, shared with the status view and metrics.
#[derive(Debug, Default)]
pub struct DeviceStats {
    pub polls: AtomicU64,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub reconnects: AtomicU64,
    /// 1 while connected.
    pub connected: AtomicU64,
    /// Sensor nodes: frames that failed their CRC (also counted in `errors`).
    pub crc_errors: AtomicU64,
    /// Sensor nodes: frames lost on the link (gaps in the node's sequence numbers).
    pub lost_frames: AtomicU64,
    /// Sensor nodes: restarts seen (sequence or uptime going back).
    pub reboots: AtomicU64,
}

impl DeviceStats {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Where sources send what they read.
pub type BatchSender = tokio::sync::mpsc::Sender<ReadingBatch>;

/// A batch marking every tag of a device bad for `reason` (no connection, session lost...), stamped now.
pub fn all_bad(device: usize, tags: &[usize], reason: crate::model::BadReason) -> ReadingBatch {
    let readings = tags
        .iter()
        .map(|&tag| crate::model::Reading {
            tag,
            value: None,
            quality: crate::model::Quality::Bad(reason),
        })
        .collect();
    ReadingBatch {
        device,
        ts: crate::model::now_millis(),
        readings,
    }
}

/// Sends [`all_bad`] for a device; false when the pipeline behind it is gone.
pub async fn send_all_bad(out: &BatchSender, device: usize, tags: &[usize], reason: crate::model::BadReason) -> bool {
    out.send(all_bad(device, tags, reason)).await.is_ok()
}

/// Sleeps for `d`; true when shutdown was requested meanwhile.
pub async fn sleep_or_shutdown(shutdown: &mut tokio::sync::watch::Receiver<bool>, d: std::time::Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    }
}
