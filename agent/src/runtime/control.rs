//! The control socket: `plantmesh reload` asks the running agent to reload and prints its report.
//!
//! A Unix socket at `<data_dir>/control.sock`, mode 0600: only the agent's own user (and root) may
//! connect, so the file system's permissions are the authentication. One request per connection:
//! the client writes `reload\n`, the agent answers with the report's text after a first line
//! `ok` or `refused`, and closes.

use super::Report;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

/// The socket's path in a data directory.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("control.sock")
}

/// Listens in `data_dir`; each reload request arrives on the returned channel with where to send
/// its report. A socket that cannot be made is logged, and reloads stay possible by SIGHUP.
pub fn listen(data_dir: &Path) -> mpsc::Receiver<oneshot::Sender<Report>> {
    let (tx, rx) = mpsc::channel(4);
    let path = path(data_dir);
    // A socket left by an earlier run (killed) would make the bind fail.
    let _ = std::fs::remove_file(&path);
    // 0600 whatever the umask (the service runs with 0077, and the data directory is 0750).
    let listener = tokio::net::UnixListener::bind(&path).and_then(|l| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(l)
    });
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot create the control socket: `plantmesh reload` will not reach this agent (SIGHUP still reloads)");
            return rx;
        }
    };
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut line = String::new();
                if BufReader::new(read).read_line(&mut line).await.is_err() || line.trim() != "reload" {
                    let _ = write.write_all(b"refused\nunknown request (expected: reload)\n").await;
                    return;
                }
                let (reply, report) = oneshot::channel();
                if tx.send(reply).await.is_err() {
                    return;
                }
                let text = match report.await {
                    Ok(r) => format!("{}\n{}", if r.refused() { "refused" } else { "ok" }, r.text()),
                    Err(_) => "refused\nthe agent is stopping\n".into(),
                };
                let _ = write.write_all(text.as_bytes()).await;
            });
        }
    });
    rx
}
