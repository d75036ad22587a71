//! A deliberately small HTTP/1.1 responder for the agent's read-only endpoints (metrics, health,
//! the status page and its JSON) and `plantmesh catalog --serve`: one GET per connection, answered
//! by a function of the path; any other method is refused. Nothing served can change anything.

use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One answer.
pub struct Response {
    pub status: &'static str,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(status: &'static str, body: String) -> Response {
        Response {
            status,
            content_type: "text/plain; version=0.0.4",
            body: body.into_bytes(),
        }
    }

    pub fn json(body: String) -> Response {
        Response {
            status: "200 OK",
            content_type: "application/json",
            body: body.into_bytes(),
        }
    }
}

/// Answers a path.
pub type Handler = Arc<dyn Fn(&str) -> Response + Send + Sync>;

/// Binds and serves in the background; returns the bound address.
pub async fn serve(addr: std::net::SocketAddr, handler: Handler) -> std::io::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                // Read the whole request head (a request can arrive in several segments; answering
                // early and closing would reset the connection under the client's remaining writes).
                let mut buf = Vec::with_capacity(1024);
                let mut chunk = [0u8; 1024];
                let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
                    match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
                        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                        Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let request = String::from_utf8_lossy(&buf);
                let mut words = request.split_whitespace();
                let method = words.next().unwrap_or("");
                let target = words.next().unwrap_or("/");
                let path = target.split(['?', '#']).next().unwrap_or("/");
                let r = if method == "GET" || method == "HEAD" {
                    handler(path)
                } else {
                    Response::text("405 Method Not Allowed", "read-only: GET only\n".into())
                };
                let head = format!(
                    "HTTP/1.1 {}\r\ncontent-type: {}\r\ncontent-length: {}\r\ncache-control: no-store\r\nx-content-type-options: nosniff\r\nconnection: close\r\n\r\n",
                    r.status,
                    r.content_type,
                    r.body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                if method != "HEAD" {
                    let _ = stream.write_all(&r.body).await;
                }
            });
        }
    });
    Ok(bound)
}
