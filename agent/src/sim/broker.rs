//! The embedded MQTT broker (rumqttd) used when no upstream broker is configured.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Starts rumqttd on loopback (port 1883 when free, else any free port) and waits until it accepts
/// connections. rumqttd has no shutdown API; it lives as long as the process.
pub fn start(preferred_port: u16) -> Result<SocketAddr, String> {
    let port = match TcpListener::bind(("127.0.0.1", preferred_port)) {
        Ok(l) => l.local_addr().map_err(|e| e.to_string())?.port(),
        Err(_) => TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port(),
    };
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let text = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 1000
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "{addr}"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 1048576
max_inflight_count = 500
dynamic_filters = true

"#
    );
    let config: rumqttd::Config = toml::from_str(&text).map_err(|e| format!("embedded broker config: {e}"))?;
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(addr);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("embedded broker did not start listening on {addr}"))
}
