//! Real peers for the end-to-end tests: Mosquitto, a pymodbus server, the `plantmesh` binary.
//! Ports are chosen free on loopback; every process is killed when its handle drops.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support: a failure fails the test that called it"
)]
#![allow(dead_code)]

pub mod plant;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The `plantmesh` binary next to this test's target directory, built if missing.
pub fn plantmesh_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("plantmesh");
    if !bin.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "plantmesh", "--bin", "plantmesh"])
            .status()
            .unwrap();
        assert!(status.success(), "building plantmesh failed");
    }
    bin
}

pub fn python() -> PathBuf {
    let p = std::env::var_os("PLANTMESH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"));
    assert!(
        p.exists(),
        "no Python with pymodbus at {}: run scripts/test.sh (it creates .venv)",
        p.display()
    );
    p
}

pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Lines a child prints on stdout, collected by a thread.
#[derive(Clone, Default)]
pub struct Lines(pub Arc<Mutex<Vec<String>>>);

impl Lines {
    pub fn follow(&self, out: impl std::io::Read + Send + 'static) {
        let lines = self.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
    }
    pub fn snapshot(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

fn kill(child: &mut Child, signal: &str) {
    let _ = Command::new("kill").args([signal, &child.id().to_string()]).status();
}

pub struct Mosquitto {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    persistence: bool,
}

impl Mosquitto {
    /// `persistence`: keep sessions and queued messages across restarts (stopped with SIGTERM).
    pub fn start(persistence: bool, extra: &str) -> Mosquitto {
        let mut m = Mosquitto {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            persistence,
        };
        let conf = m.dir.path().join("mosquitto.conf");
        let d = m.dir.path().display();
        std::fs::write(
            &conf,
            format!(
                "user root\npersistence {persistence}\npersistence_location {d}/\nlog_dest file {d}/mosquitto.log\nlog_type all\n\
                 max_queued_messages 1000000\nlistener {} 127.0.0.1\n{}\n",
                m.port,
                if extra.is_empty() { "allow_anonymous true" } else { extra }
            ),
        )
        .unwrap();
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("mosquitto");
        let child = Command::new(bin)
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (apt-get install mosquitto; scripts/test.sh does it)");
        self.child = Some(child);
        let port = self.port;
        wait_for("mosquitto to listen", Duration::from_secs(10), || port_open(port));
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// SIGTERM (mosquitto saves its persistence file) and wait for exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(&mut c, "-TERM");
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `mosquitto_sub` with a persistent session at QoS 1: sees everything, across broker restarts.
pub struct Subscriber {
    child: Child,
    pub lines: Lines,
}

impl Subscriber {
    pub fn start(port: u16, topic: &str, id: &str) -> Subscriber {
        Self::start_with(port, topic, id, &[])
    }

    /// With extra `mosquitto_sub` arguments (credentials, protocol version).
    pub fn start_with(port: u16, topic: &str, id: &str, extra: &[&str]) -> Subscriber {
        let port = port.to_string();
        let mut child = Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-t",
                topic,
                "-v",
                "-q",
                "1",
                "-c",
                "-i",
                id,
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto_sub");
        let lines = Lines::default();
        lines.follow(child.stdout.take().unwrap());
        Subscriber { child, lines }
    }

    /// `(topic, payload JSON)` of everything received.
    pub fn messages(&self) -> Vec<(String, serde_json::Value)> {
        self.lines
            .snapshot()
            .iter()
            .filter_map(|l| l.split_once(' '))
            .filter_map(|(t, p)| serde_json::from_str(p).ok().map(|v| (t.to_string(), v)))
            .collect()
    }

    /// `(topic, payload)` of everything received, the payload as it arrived.
    pub fn raw(&self) -> Vec<(String, String)> {
        self.lines
            .snapshot()
            .iter()
            .filter_map(|l| l.split_once(' '))
            .map(|(t, p)| (t.to_string(), p.to_string()))
            .collect()
    }

    /// Product messages only (not descriptors, gaps, status or UNS field values).
    pub fn product_messages(&self) -> Vec<serde_json::Value> {
        self.messages()
            .into_iter()
            .filter(|(t, v)| !t.contains("/_") && v.get("records").is_some())
            .map(|(_, v)| v)
            .collect()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct PyModbus {
    child: Child,
    pub port: u16,
    pub lines: Lines,
    _spec: tempfile::NamedTempFile,
    /// RTU: the socat process joining the two ptys, and the agent's end of the line.
    serial: Option<(Child, tempfile::TempDir)>,
}

impl PyModbus {
    /// SIGKILL, then serve again on the same port with the same spec.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (child, lines) = serve(self.port.to_string().as_ref(), self._spec.path());
        self.child = child;
        self.lines = lines;
        let port = self.port;
        wait_for("pymodbus server port", Duration::from_secs(20), || port_open(port));
    }

    /// SIGKILL: the device is gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PyModbus {
    pub fn start(spec: &serde_json::Value) -> PyModbus {
        let spec_file = spec_file(spec);
        let port = free_port();
        let (child, lines) = serve(port.to_string().as_ref(), spec_file.path());
        wait_for("pymodbus server port", Duration::from_secs(20), || port_open(port));
        PyModbus {
            child,
            port,
            lines,
            _spec: spec_file,
            serial: None,
        }
    }

    /// The same server speaking Modbus RTU (19200 8N2) on one end of a pty pair joined by socat;
    /// [`PyModbus::serial_port`] is the other end, for the agent.
    pub fn start_rtu(spec: &serde_json::Value) -> PyModbus {
        let spec_file = spec_file(spec);
        let dir = tempfile::tempdir().unwrap();
        let (server_end, agent_end) = (dir.path().join("server"), dir.path().join("agent"));
        let socat = Command::new("socat")
            .arg(format!("pty,raw,echo=0,link={}", server_end.display()))
            .arg(format!("pty,raw,echo=0,link={}", agent_end.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat (apt install socat)");
        wait_for("the socat pty pair", Duration::from_secs(10), || {
            server_end.exists() && agent_end.exists()
        });
        let (child, lines) = serve(server_end.as_os_str(), spec_file.path());
        PyModbus {
            child,
            port: 0,
            lines,
            _spec: spec_file,
            serial: Some((socat, dir)),
        }
    }

    /// The agent's end of an RTU server's line.
    pub fn serial_port(&self) -> PathBuf {
        self.serial.as_ref().expect("an RTU server").1.path().join("agent")
    }

    /// `(function, address, count)` of every request so far.
    pub fn requests(&self) -> Vec<(u8, u16, u16)> {
        self.lines
            .snapshot()
            .iter()
            .filter_map(|l| {
                let mut it = l.strip_prefix("REQ ")?.split(' ').map(|x| x.parse::<u32>().ok());
                Some((it.next()?? as u8, it.next()?? as u16, it.next()?? as u16))
            })
            .collect()
    }
}

fn spec_file(spec: &serde_json::Value) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), spec.to_string()).unwrap();
    f
}

/// tests/peers/modbus_server.py on a TCP port or a serial port, once it says it is ready.
fn serve(at: &std::ffi::OsStr, spec: &Path) -> (Child, Lines) {
    let mut child = Command::new(python())
        .arg(repo_root().join("tests/peers/modbus_server.py"))
        .arg(at)
        .arg(spec)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let lines = Lines::default();
    lines.follow(child.stdout.take().unwrap());
    let l = lines.clone();
    wait_for("pymodbus server", Duration::from_secs(20), || {
        l.snapshot().iter().any(|x| x.starts_with("READY"))
    });
    (child, lines)
}

impl Drop for PyModbus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some((socat, _)) = self.serial.as_mut() {
            let _ = socat.kill();
            let _ = socat.wait();
        }
    }
}

/// The real agent binary on a config directory.
pub struct Agent {
    pub child: Option<Child>,
    env: Vec<(String, String)>,
    pub config: PathBuf,
    pub data_dir: PathBuf,
    pub stderr: PathBuf,
}

impl Agent {
    pub fn start(config: &Path, data_dir: &Path) -> Agent {
        let stderr = data_dir.with_extension(format!(
            "log-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut a = Agent {
            child: None,
            env: Vec::new(),
            config: config.into(),
            data_dir: data_dir.into(),
            stderr,
        };
        a.spawn();
        a
    }

    /// With its log at `log` (not beside the data directory: on a disk the test fills, say).
    pub fn start_logging_to(config: &Path, data_dir: &Path, log: &Path) -> Agent {
        let mut a = Agent {
            child: None,
            env: Vec::new(),
            config: config.into(),
            data_dir: data_dir.into(),
            stderr: log.into(),
        };
        a.spawn();
        a
    }

    /// With extra environment variables for the agent process only.
    pub fn start_with_env(config: &Path, data_dir: &Path, env: &[(&str, &str)]) -> Agent {
        let mut a = Agent {
            child: None,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            config: config.into(),
            data_dir: data_dir.into(),
            stderr: data_dir.with_extension("log"),
        };
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr)
            .unwrap();
        let child = Command::new(plantmesh_bin())
            .args(["run", "--config"])
            .arg(&self.config)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env("PLANTMESH_LOG", "info,rumqttd=off")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn sigkill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(&mut c, "-KILL");
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: a graceful stop.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        kill(&mut c, "-TERM");
        c.wait().unwrap()
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none());
        self.spawn();
    }

    /// The epoch of the agent's current (or last) start, from the copy kept beside the buffer.
    pub fn epoch(&self) -> Option<u64> {
        std::fs::read_to_string(self.data_dir.join("buffer.redb.epoch"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Waits for the start after one with epoch `after` and returns its epoch (always larger).
    pub fn next_epoch(&self, after: Option<u64>) -> u64 {
        let mut e = None;
        wait_for("the agent's next epoch", Duration::from_secs(30), || {
            e = self.epoch().filter(|&e| Some(e) > after);
            e.is_some()
        });
        e.unwrap()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Pending messages in the buffer, via `plantmesh buffer export` (agent must be stopped).
    /// The address of the agent's `/metrics` endpoint, from its log.
    pub fn metrics_addr(&self) -> String {
        let mut addr = None;
        wait_for("the metrics endpoint", Duration::from_secs(10), || {
            addr = self.log().lines().find_map(|l| {
                l.split("metrics on http://")
                    .nth(1)
                    .map(|r| r.split('/').next().unwrap().to_string())
            });
            addr.is_some()
        });
        addr.unwrap()
    }

    pub fn export(&self) -> Vec<serde_json::Value> {
        let out = Command::new(plantmesh_bin())
            .args(["buffer", "export", "--data-dir"])
            .arg(&self.data_dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "buffer export failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- last lines of the agent log ({}) ---", self.stderr.display());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Copies a directory tree (a config to edit).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// A child process killed if the test fails before it stops the process itself.
pub struct KillOnDrop(pub Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the broker retains under `filter` now: `(topic, payload)` of each retained message, as a
/// subscriber arriving now gets them (an empty retained message clears its topic: nothing).
pub fn retained(port: u16, filter: &str) -> Vec<(String, String)> {
    let out = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            filter,
            "-v",
            "--retained-only",
            "-W",
            "2",
        ])
        .output()
        .expect("mosquitto_sub");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(t, p)| (t.to_string(), p.to_string()))
        .collect()
}

/// Writes a config directory: agent.toml plus products/<name>.toml.
pub fn write_config(dir: &Path, gateway: &str, products: &[(&str, &str)]) {
    std::fs::create_dir_all(dir.join("products")).unwrap();
    std::fs::write(dir.join("agent.toml"), gateway).unwrap();
    for (name, text) in products {
        std::fs::write(dir.join("products").join(format!("{name}.toml")), text).unwrap();
    }
}

/// The python asyncua OPC UA server (tests/peers/opcua_server.py).
pub struct PyOpcUa {
    child: Option<Child>,
    pub port: u16,
    pub lines: Lines,
    spec: tempfile::NamedTempFile,
}

impl PyOpcUa {
    pub fn start(spec: &serde_json::Value) -> PyOpcUa {
        let spec_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(spec_file.path(), spec.to_string()).unwrap();
        let mut s = PyOpcUa {
            child: None,
            port: free_port(),
            lines: Lines::default(),
            spec: spec_file,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        self.lines = Lines::default();
        let mut child = Command::new(python())
            .arg(repo_root().join("tests/peers/opcua_server.py"))
            .arg(self.port.to_string())
            .arg(self.spec.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.lines.follow(child.stdout.take().unwrap());
        self.child = Some(child);
        let l = self.lines.clone();
        wait_for("the OPC UA server", Duration::from_secs(30), || {
            l.snapshot().iter().any(|x| x.starts_with("READY"))
        });
    }

    pub fn endpoint(&self) -> String {
        format!("opc.tcp://127.0.0.1:{}/plantmesh/test", self.port)
    }

    /// SIGKILL, as a crash or power cut would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The latest `(subscriptions, sessions)` the server reported.
    pub fn counts(&self) -> Option<(usize, usize)> {
        self.lines.snapshot().iter().rev().find_map(|l| {
            let mut it = l.strip_prefix("SUBS ")?.split(" SESSIONS ");
            Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
        })
    }
}

impl Drop for PyOpcUa {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Validates JSON documents against a schema file with python `jsonschema`; panics with the errors.
pub fn validate_json(schema: &Path, docs: &[serde_json::Value]) {
    use std::io::Write;
    let mut child = Command::new(python())
        .arg(repo_root().join("tests/peers/validate_json.py"))
        .arg(schema)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for d in docs {
        writeln!(stdin, "{d}").unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schema validation failed:\n{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report.lines().filter(|l| *l == "ok").count(), docs.len(), "{report}");
}

/// One HTTP GET against the agent's telemetry endpoint; the whole response.
pub fn scrape(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The value of one metric line (`name{labels}`) in a Prometheus text exposition.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The Python Sparkplug B peer (tests/peers/sparkplug_peer.py): an edge node driven through its
/// stdin, or a decoder printing what it receives.
pub struct SparkplugPeer {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    pub lines: Lines,
}

impl SparkplugPeer {
    fn spawn(args: &[String]) -> SparkplugPeer {
        let mut child = Command::new(python())
            .arg(repo_root().join("tests/peers/sparkplug_peer.py"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python sparkplug peer");
        let lines = Lines::default();
        lines.follow(child.stdout.take().unwrap());
        let stdin = child.stdin.take();
        SparkplugPeer { child, stdin, lines }
    }

    /// An edge node `group/node` with one device, not yet connected.
    pub fn node(port: u16, group: &str, node: &str, device: &str) -> SparkplugPeer {
        Self::spawn(&[
            "node".into(),
            "--port".into(),
            port.to_string(),
            "--group".into(),
            group.into(),
            "--node".into(),
            node.into(),
            "--device".into(),
            device.into(),
        ])
    }

    /// A decoder subscribed to `topic`, ready once the broker acknowledged the subscription.
    pub fn decoder(port: u16, topic: &str, id: &str) -> SparkplugPeer {
        Self::decoder_with(port, topic, id, &[])
    }

    /// With extra arguments (`--persistent`: a session kept across reconnects).
    pub fn decoder_with(port: u16, topic: &str, id: &str, extra: &[&str]) -> SparkplugPeer {
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        args.extend([
            "decode".into(),
            "--port".into(),
            port.to_string(),
            "--topic".into(),
            topic.into(),
            "--id".into(),
            id.into(),
        ]);
        args.rotate_left(extra.len());
        let p = Self::spawn(&args);
        p.wait_line("SUBSCRIBED", Duration::from_secs(30));
        p
    }

    /// Sends one command and waits until the peer prints `ack` once more than before.
    pub fn command(&mut self, cmd: serde_json::Value, ack: &str) {
        use std::io::Write;
        let before = self.count(ack);
        let stdin = self.stdin.as_mut().expect("a node peer");
        writeln!(stdin, "{cmd}").unwrap();
        stdin.flush().unwrap();
        wait_for(
            &format!("{ack} from the Sparkplug peer"),
            Duration::from_secs(30),
            || self.count(ack) > before,
        );
    }

    pub fn count(&self, line: &str) -> usize {
        self.lines.snapshot().iter().filter(|l| *l == line).count()
    }

    pub fn wait_line(&self, line: &str, timeout: Duration) {
        wait_for(&format!("{line} from the Sparkplug peer"), timeout, || {
            self.count(line) > 0
        });
    }

    /// Decoded messages: `{"topic", "retain", "payload" | "error" | "text"}`.
    pub fn messages(&self) -> Vec<serde_json::Value> {
        self.lines
            .snapshot()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SparkplugPeer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Publishes one message with `mosquitto_pub` (`-r`: retained).
pub fn mqtt_pub(port: u16, topic: &str, payload: &[u8], retain: bool) {
    use std::io::Write;
    let mut child = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", topic, "-q", "1", "-s"])
        .args(if retain { &["-r"][..] } else { &[][..] })
        .stdin(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub");
    child.stdin.take().unwrap().write_all(payload).unwrap();
    assert!(child.wait().unwrap().success(), "mosquitto_pub to {topic}");
}

/// Runs the Sparkplug peer once (`rebirth`, `state`) and waits for it.
pub fn sparkplug_once(args: &[&str]) {
    let status = Command::new(python())
        .arg(repo_root().join("tests/peers/sparkplug_peer.py"))
        .args(args)
        .status()
        .expect("python sparkplug peer");
    assert!(status.success(), "sparkplug_peer.py {args:?}");
}

/// A TCP proxy in front of a broker that counts the connections made through it: each one is
/// accepted, then forwarded to `target` (closed at once when the target refuses, or while the
/// proxy is closed: an uplink outage with the broker itself up).
pub struct Proxy {
    pub port: u16,
    pub accepted: Arc<std::sync::atomic::AtomicUsize>,
    /// Connections the target accepted.
    pub forwarded: Arc<std::sync::atomic::AtomicUsize>,
    open: Arc<std::sync::atomic::AtomicBool>,
    live: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    pub fn start(target: u16) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let forwarded = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let live: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
        let (a, f, o, l) = (accepted.clone(), forwarded.clone(), open.clone(), live.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                a.fetch_add(1, Ordering::SeqCst);
                if !o.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", target)) else {
                    continue; // dropped: the agent sees its connection closed
                };
                f.fetch_add(1, Ordering::SeqCst);
                l.lock().unwrap().push(client.try_clone().unwrap());
                let pipe = |mut from: std::net::TcpStream, mut to: std::net::TcpStream| {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                };
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(server, client);
            }
        });
        Proxy {
            port,
            accepted,
            forwarded,
            open,
            live,
        }
    }

    /// Closed: every connection through it is cut, and new ones are dropped once accepted.
    pub fn set_open(&self, open: bool) {
        self.open.store(open, std::sync::atomic::Ordering::SeqCst);
        if !open {
            for c in self.live.lock().unwrap().drain(..) {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    pub fn counts(&self) -> (usize, usize) {
        use std::sync::atomic::Ordering;
        (
            self.accepted.load(Ordering::SeqCst),
            self.forwarded.load(Ordering::SeqCst),
        )
    }
}

/// A test length from the environment (long runs behind a variable, a short one in CI).
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Headless Chromium (Debian's package; scripts/test.sh installs it) on a page: the DOM after
/// `budget_ms` of the page's own time (its scripts run, its fetches complete), and a screenshot
/// into `target/test-artifacts/<shot>.png` when `shot` is given. Flags as this machine needs them:
/// no sandbox as root, no GPU, no background connections to hosts it cannot reach.
pub fn chromium(url: &str, budget_ms: u32, shot: Option<&str>) -> String {
    let bin = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("chromium (apt-get install chromium; scripts/test.sh does it)");
    let profile = tempfile::tempdir().unwrap();
    let base = |c: &mut Command| {
        c.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,2000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .stderr(Stdio::null());
    };
    if let Some(name) = shot {
        let dir = repo_root().join("target/test-artifacts");
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = Command::new(bin);
        base(&mut c);
        let status = c
            .arg(format!("--screenshot={}", dir.join(format!("{name}.png")).display()))
            .arg(url)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "chromium --screenshot {url}");
    }
    let mut c = Command::new(bin);
    base(&mut c);
    let out = c.arg("--dump-dom").arg(url).output().unwrap();
    assert!(out.status.success(), "chromium --dump-dom {url}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the first element with `class="<class>"` after `anchor` in `html` (a DOM dump).
pub fn text_after(html: &str, anchor: &str, class: &str) -> Option<String> {
    let at = html.find(anchor)?;
    let rest = &html[at..];
    let open = rest.find(&format!("class=\"{class}\""))?;
    let rest = &rest[open..];
    let start = rest.find('>')? + 1;
    let end = rest[start..].find('<')? + start;
    Some(rest[start..end].to_string())
}

/// `plantmesh simulate --devices n --registers r`: that many register banks, each on its own
/// loopback port; their addresses. The simulator stops when the handle drops.
pub fn simulate(devices: usize, registers: usize) -> (KillOnDrop, Vec<String>) {
    let mut child = Command::new(plantmesh_bin())
        .args([
            "simulate",
            "--devices",
            &devices.to_string(),
            "--registers",
            &registers.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("plantmesh simulate");
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut addresses = Vec::new();
    for line in out.lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("SIM ") {
            addresses.push(rest.split_whitespace().nth(1).unwrap().to_string());
            if addresses.len() == devices {
                break;
            }
        }
    }
    assert_eq!(addresses.len(), devices, "the simulator started every device");
    (KillOnDrop(child), addresses)
}
