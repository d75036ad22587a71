//! Free space on the data directory's file system: watched so that a WARN and a metric come
//! before the disk is full (`[buffer] free_space_warning`), not after.

use crate::buffer::BufferStats;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Bytes an unprivileged process may still write on the file system holding `path`.
#[allow(unsafe_code)]
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: an all-zero `statvfs` is a valid value of that plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a struct statvfs may write to.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    #[allow(clippy::useless_conversion, reason = "the fields are 32 bits wide on armv7")]
    (rc == 0).then(|| u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize)))
}

/// Checks every `every` and keeps `stats.disk_free_bytes` and `stats.disk_low` current; logs a
/// WARN when free space falls below `warning`, and when it is back above.
pub async fn watch(dir: PathBuf, warning: u64, stats: Arc<BufferStats>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let Some(free) = free_bytes(&dir) else { continue };
        stats.disk_free_bytes.store(free, Ordering::Relaxed);
        let low = free < warning;
        if stats.disk_low.swap(low, Ordering::Relaxed) != low {
            if low {
                tracing::warn!(path = %dir.display(), free_bytes = free, warning_below = warning,
                    "data directory is nearly full: once it is, nothing new is made durable (live data goes on from memory)");
            } else {
                tracing::info!(path = %dir.display(), free_bytes = free, "data directory has room again");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_free_space_of_a_real_directory_is_known() {
        let dir = tempfile::tempdir().unwrap();
        assert!(super::free_bytes(dir.path()).is_some_and(|f| f > 0));
        assert_eq!(super::free_bytes(&dir.path().join("missing")), None);
    }
}
