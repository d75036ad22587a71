//! The `plantmesh` command line.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use plantmesh::config;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "plantmesh", version, about = "Edge agent for factory-floor data products")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent. Without --config (and without PLANTMESH_CONFIG) it runs the demo plant.
    Run {
        /// Config directory (agent.toml, products/, governance.toml) or files.
        #[arg(short, long, env = "PLANTMESH_CONFIG", value_delimiter = ',')]
        config: Vec<PathBuf>,
        /// Overrides agent.data_dir.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Show the live status view (default: on for the demo).
        #[arg(long)]
        view: bool,
    },
    /// Reload the running agent's configuration (what SIGHUP does), printing what changed and every
    /// error; exits non-zero if anything was refused. Talks to the agent over
    /// `<data_dir>/control.sock` (only the agent's user may).
    Reload {
        /// The agent's config (to find its data_dir).
        #[arg(short, long, env = "PLANTMESH_CONFIG", value_delimiter = ',')]
        config: Vec<PathBuf>,
        /// The agent's data directory (default: agent.data_dir of the config).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Validate config offline; prints every problem as file:line:column and exits non-zero.
    Check {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Fail on a named file (password_file, ca_file, cert_file, key_file,
        /// pseudonymise_key_file) that is missing, unreadable or, holding a secret, readable by
        /// group or others; without it they are warnings (the config may be checked off the gateway).
        #[arg(long)]
        strict: bool,
        /// Overrides agent.data_dir (where the last published contracts are kept).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Write what a central platform ingests, offline (no broker, no devices): each product's ODCS
    /// data contract, or the gateway's AsyncAPI document.
    Export {
        #[command(subcommand)]
        what: Export,
    },
    /// Run the demo plant: a simulated press-line PLC over Modbus TCP, two products, an embedded broker.
    Demo {
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Publish to this MQTT broker (HOST:PORT, plain MQTT 3.1.1, no credentials) instead of an
        /// embedded one, e.g. a local Mosquitto to look at the demo with other tools.
        #[arg(long, value_name = "HOST:PORT")]
        broker: Option<String>,
    },
    /// Browse an OPC UA server and print proposed tag definitions (progress on stderr).
    Discover {
        /// opc.tcp://host:port[/path]
        endpoint: String,
        /// Aes256_Sha256_RsaPss, Aes128_Sha256_RsaOaep, Basic256Sha256 or None.
        #[arg(long, default_value = "Aes256_Sha256_RsaPss")]
        security_policy: String,
        /// SignAndEncrypt, Sign or None (default: SignAndEncrypt, or None with policy None).
        #[arg(long)]
        security_mode: Option<String>,
        #[arg(long)]
        username: Option<String>,
        /// Environment variable holding the password.
        #[arg(long)]
        password_env: Option<String>,
        /// File holding the password.
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// Start node (default: the Objects folder, i=85).
        #[arg(long)]
        start: Option<String>,
        #[arg(long, default_value_t = 10)]
        max_depth: usize,
        /// Where discover keeps its certificate and trusted/rejected server certificates (pki-discover/).
        #[arg(long, default_value = "/var/lib/plantmesh")]
        data_dir: PathBuf,
        /// Device id to use in the proposal.
        #[arg(long, default_value = "opcua-1")]
        device_id: String,
    },
    /// Run the products' mapping and governance on recorded input (CSV: ts,<device>.<tag>,...) and
    /// print what would be published, and why fields were altered, withheld or flagged.
    Preview {
        /// Config directory or files (not with --demo).
        #[arg(short, long, value_delimiter = ',', required_unless_present = "demo")]
        config: Vec<PathBuf>,
        /// Recorded tag values (CSV: ts,<device>.<tag>,...). Without it, the config's devices are
        /// polled live (read-only) for --seconds.
        #[arg(long, conflicts_with = "demo")]
        input: Option<PathBuf>,
        /// Preview the demo plant's products on its simulated devices.
        #[arg(long, conflicts_with = "config")]
        demo: bool,
        /// How long to watch live devices.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Only this product.
        #[arg(long)]
        product: Option<String>,
    },
    /// Print the audit trail: config loads (with their hash) and each run's governance counts.
    Audit {
        #[arg(long, default_value = "/var/lib/plantmesh")]
        data_dir: PathBuf,
    },
    /// The fleet's products as a platform sees them on a broker: URN, owner, domain, version,
    /// status, agent online or offline, the last SLIs against their targets, drops and gap events.
    /// Reads only the catalog index and each product's retained documents (standard MQTT).
    Catalog {
        #[command(flatten)]
        broker: BrokerArgs,
        /// One JSON document (with --watch: one per change, a line each).
        #[arg(long)]
        json: bool,
        /// Keep it live: reprint on every change.
        #[arg(long)]
        watch: bool,
        /// Serve the catalog page (and its JSON on /api/state) on this address; keeps running.
        #[arg(long, value_name = "ADDR")]
        serve: Option<std::net::SocketAddr>,
        /// Only products whose URN or id matches (`*` matches anything).
        #[arg(long, value_name = "URN|FILTER")]
        product: Option<String>,
        /// The longest to wait for the retained documents to settle (without --watch).
        #[arg(long, default_value = "30s")]
        wait: String,
    },
    /// The consumer's side of the delivery promise: follows product messages and gap events,
    /// deduplicates by (URN, epoch, seq), and reports what was delivered, duplicated (and whether
    /// copies were identical), announced as lost, and missing unexplained. Exit status 1 on an
    /// unexplained hole or differing copies.
    Verify {
        #[command(flatten)]
        broker: BrokerArgs,
        /// Only products whose URN or id matches (`*` matches anything).
        #[arg(long, value_name = "URN|FILTER")]
        product: Option<String>,
        /// How long to watch (then up to 30 s more while holes still close); default: until
        /// interrupted (Ctrl-C), then report.
        #[arg(long = "for", value_name = "DURATION")]
        duration: Option<String>,
        /// The report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Inspect a buffer (the agent must not be running on it).
    Buffer {
        #[command(subcommand)]
        action: BufferAction,
    },
    /// Serve the simulated press-line PLC over Modbus TCP until interrupted; with --devices, that
    /// many plain register banks instead (for load tests), each on its own loopback port.
    Simulate {
        #[arg(long, default_value = "127.0.0.1:5020")]
        listen: std::net::SocketAddr,
        /// Serve this many register banks on free loopback ports (prints `SIM <n> <address>` lines).
        #[arg(long)]
        devices: Option<u16>,
        /// Holding registers per bank.
        #[arg(long, default_value_t = 100)]
        registers: u16,
        /// Serve an OPC UA server with this many Double items (prints `SIM-OPCUA <endpoint>`).
        #[arg(long)]
        opcua_items: Option<usize>,
        /// How often every OPC UA item changes.
        #[arg(long, default_value = "100ms")]
        opcua_interval: String,
        /// Run a sensor node (the firmware library on simulated sensors) on a new pty instead;
        /// prints `SIM-SENSOR <pty path>`.
        #[arg(long)]
        sensor_node: bool,
        /// With --sensor-node: also make this symlink to the pty (a stable path for a config).
        #[arg(long, requires = "sensor_node")]
        link: Option<PathBuf>,
        /// With --sensor-node: milliseconds between measurement cycles (0: back to back).
        #[arg(long, default_value_t = 1000, requires = "sensor_node")]
        interval_ms: u64,
        /// With --sensor-node: one piece of link garbage every this many cycles (prints `GARBAGE <kind>`).
        #[arg(long, default_value_t = 0, requires = "sensor_node")]
        garbage_every: u32,
        /// With --sensor-node: stop after this many cycles, stay silent 3 s, then close the pty
        /// (0: run until killed).
        #[arg(long, default_value_t = 0, requires = "sensor_node")]
        cycles: u32,
        /// With --sensor-node: the tank-level loop is open (0 mA) this many cycles out of every 30.
        #[arg(long, default_value_t = 0, requires = "sensor_node")]
        wire_breaks: u32,
        /// With --sensor-node: skip the sensors' conversion waits (for benchmarks).
        #[arg(long, requires = "sensor_node")]
        no_delays: bool,
    },
}

#[derive(Subcommand)]
enum Export {
    /// Each product's ODCS v3 data contract (what the agent retains on `{topic}/_contract`), as
    /// DIR/<product>.v<major>.odcs.json.
    Contracts {
        dir: PathBuf,
        #[command(flatten)]
        source: ExportSource,
    },
    /// The gateway's AsyncAPI 3.1 document (what the agent retains on
    /// `{site}/_agents/{agent}/asyncapi`), on standard output.
    Asyncapi {
        #[command(flatten)]
        source: ExportSource,
    },
}

#[derive(clap::Args)]
struct ExportSource {
    /// Config directory or files.
    #[arg(short, long, value_delimiter = ',', required_unless_present = "demo")]
    config: Vec<PathBuf>,
    /// The embedded demo plant's config.
    #[arg(long, conflicts_with = "config")]
    demo: bool,
}

impl ExportSource {
    fn plan(&self) -> Result<config::Plan, String> {
        if self.demo {
            return demo_config(&std::env::temp_dir().join("plantmesh-export")).map_err(|e| format!("{e:#}"));
        }
        config::load(&self.config).map_err(|d| format!("{d}\n{} problem(s) found", d.0.len()))
    }
}

fn export(what: &Export) -> ExitCode {
    match what {
        Export::Asyncapi { source } => match source.plan() {
            Ok(plan) => {
                let doc = plantmesh::catalog::asyncapi::document(&plan);
                match serde_json::to_string_pretty(&doc) {
                    Ok(text) => {
                        println!("{text}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("plantmesh export asyncapi: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Export::Contracts { dir, source } => {
            let plan = match source.plan() {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            match plantmesh::catalog::odcs::write_contracts(&plan, dir) {
                Ok(files) => {
                    for f in &files {
                        println!("{}", f.display());
                    }
                    eprintln!("{} contract(s) written to {}", files.len(), dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("plantmesh export contracts: {}: {e}", dir.display());
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// How `catalog` and `verify` reach the broker (as `[upstream]` does).
#[derive(clap::Args)]
struct BrokerArgs {
    /// mqtt://host[:port] or mqtts://host[:port].
    #[arg(long, value_name = "URL")]
    broker: String,
    #[arg(long)]
    username: Option<String>,
    /// File holding the password (owner-only, like every secret file).
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// Environment variable holding the password.
    #[arg(long)]
    password_env: Option<String>,
    /// The CA that signed the broker's certificate (mqtts://).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Client certificate, with --key-file.
    #[arg(long, requires = "key_file")]
    cert_file: Option<PathBuf>,
    #[arg(long, requires = "cert_file")]
    key_file: Option<PathBuf>,
    /// MQTT version: 5 or 3.1.1.
    #[arg(long, default_value = "5")]
    protocol: String,
    /// Client id (default: plantmesh-<command>-<process id>).
    #[arg(long)]
    client_id: Option<String>,
}

impl BrokerArgs {
    fn broker(&self, command: &str) -> Result<plantmesh::fleet::Broker, String> {
        use plantmesh::config::{MqttVersion, SecretRef};
        let version = match self.protocol.as_str() {
            "5" => MqttVersion::V5,
            "3.1.1" | "3" | "4" => MqttVersion::V311,
            other => return Err(format!("--protocol `{other}`: write 5 or 3.1.1")),
        };
        let password = match (&self.password_file, &self.password_env) {
            (Some(_), Some(_)) => return Err("set one of --password-file and --password-env, not both".into()),
            (Some(f), None) => Some(SecretRef::File(f.clone())),
            (None, Some(e)) => Some(SecretRef::Env(e.clone())),
            (None, None) => None,
        };
        Ok(plantmesh::fleet::Broker {
            url: self.broker.clone(),
            username: self.username.clone(),
            password,
            ca_file: self.ca_file.clone(),
            client_cert: self.cert_file.clone().zip(self.key_file.clone()),
            version,
            client_id: self
                .client_id
                .clone()
                .unwrap_or_else(|| format!("plantmesh-{command}-{}", std::process::id())),
        })
    }
}

/// `catalog` and `verify`: exit 0, 1 (verify found a broken promise) or 2 (could not run).
fn fleet_command(command: Command) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("plantmesh: {e}");
            return ExitCode::from(2);
        }
    };
    let duration =
        |text: &str, flag: &str| config::units::parse_duration(text).map_err(|e| format!("{flag} `{text}`: {e}"));
    let result: Result<bool, String> = rt.block_on(async {
        match command {
            Command::Catalog {
                broker,
                json,
                watch,
                serve,
                product,
                wait,
            } => {
                let o = plantmesh::fleet::run::CatalogOptions {
                    json,
                    watch,
                    serve,
                    wait: duration(&wait, "--wait")?,
                    filter: product,
                };
                plantmesh::fleet::run::catalog(&broker.broker("catalog")?, &o)
                    .await
                    .map(|()| true)
            }
            Command::Verify {
                broker,
                product,
                duration: d,
                json,
            } => {
                let o = plantmesh::fleet::run::VerifyOptions {
                    filter: product,
                    duration: d.as_deref().map(|t| duration(t, "--for")).transpose()?,
                    json,
                };
                plantmesh::fleet::run::verify(&broker.broker("verify")?, &o).await
            }
            _ => Ok(true),
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("plantmesh: {e}");
            ExitCode::from(2)
        }
    }
}

#[derive(Subcommand)]
enum BufferAction {
    /// Pending messages, gap events and drop counters.
    Stats {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Every pending message as one JSON line: product, epoch, seq, records.
    Export {
        #[arg(long)]
        data_dir: PathBuf,
    },
}

/// One-shot commands end quietly on a closed pipe (`plantmesh check | head`), as shell tools do. The
/// agent itself keeps SIGPIPE ignored: a dead socket must be an error it handles, not its death.
#[allow(unsafe_code)]
fn die_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: called before any thread is started; restores the default disposition of one signal.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// A panic stops the agent (the service manager restarts it and the durable buffer replays),
/// rather than one task dying while the rest limps on; except inside
/// [`plantmesh::buffer::recover::contain`], where redb reads a damaged file that may hold any
/// bytes and a panic is one more kind of damage.
fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if plantmesh::buffer::recover::contained() {
            return;
        }
        report(info);
        std::process::abort();
    }));
}

fn main() -> ExitCode {
    allocator::limit_arenas();
    abort_on_panic();
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Some(Command::Check { .. } | Command::Buffer { .. } | Command::Audit { .. } | Command::Export { .. })
            | Some(Command::Preview { input: Some(_), .. })
    ) {
        die_on_closed_pipe();
    }
    match cli.command {
        Some(Command::Check {
            paths,
            data_dir,
            strict,
        }) => check(&paths, data_dir.as_deref(), strict),
        Some(Command::Export { what }) => export(&what),
        Some(command @ (Command::Catalog { .. } | Command::Verify { .. })) => {
            die_on_closed_pipe();
            fleet_command(command)
        }
        Some(Command::Reload { config, data_dir }) => reload(&config, data_dir),
        Some(Command::Simulate {
            sensor_node: true,
            link,
            interval_ms,
            garbage_every,
            cycles,
            wire_breaks,
            no_delays,
            ..
        }) => sensor_node(link, interval_ms, garbage_every, cycles, wire_breaks, no_delays),
        Some(Command::Preview {
            config,
            input: Some(input),
            product,
            ..
        }) => {
            let plan = match config::load(&config) {
                Ok(p) => p,
                Err(d) => {
                    eprintln!("{d}");
                    return ExitCode::FAILURE;
                }
            };
            let csv = match std::fs::read_to_string(&input) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("plantmesh: cannot read {}: {e}", input.display());
                    return ExitCode::FAILURE;
                }
            };
            match plantmesh::preview::preview_csv(&plan, product.as_deref(), &csv) {
                Ok(out) => {
                    print!("{out}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("plantmesh: {}: {e}", input.display());
                    ExitCode::FAILURE
                }
            }
        }
        command => {
            init_logging();
            match run_async(command) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("plantmesh: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PLANTMESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=off,rumqttc=warn"));
    // Colours only on a terminal: journald and log files get plain text.
    use std::io::IsTerminal;
    // A log that cannot be written (stderr a file on a full disk) is not reported on stderr
    // again: that report would panic, and a panic stops the agent.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .init();
}

/// Asks the running agent to reload; prints its report.
fn reload(config: &[PathBuf], data_dir: Option<PathBuf>) -> ExitCode {
    use std::io::{Read, Write};
    let Some(data_dir) = data_dir.or_else(|| data_dir_of(config)) else {
        eprintln!("plantmesh reload: give --data-dir, or --config with an agent.toml that sets agent.data_dir");
        return ExitCode::from(2);
    };
    let socket = data_dir.join("control.sock");
    let mut stream = match std::os::unix::net::UnixStream::connect(&socket) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "plantmesh reload: cannot reach the agent at {}: {e} (is it running, and are you its user?)",
                socket.display()
            );
            return ExitCode::from(2);
        }
    };
    let mut answer = String::new();
    if let Err(e) = stream
        .write_all(b"reload\n")
        .and_then(|()| stream.read_to_string(&mut answer))
    {
        eprintln!("plantmesh reload: {e}");
        return ExitCode::from(2);
    }
    let (status, text) = answer.split_once('\n').unwrap_or((answer.as_str(), ""));
    print!("{text}");
    if status == "ok" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `agent.data_dir` of the gateway file among `paths`, read leniently: a reload must find the
/// agent even when the file it is asked to load is broken.
fn data_dir_of(paths: &[PathBuf]) -> Option<PathBuf> {
    let files = paths.iter().flat_map(|p| {
        if p.is_dir() {
            vec![p.join("agent.toml")]
        } else {
            vec![p.clone()]
        }
    });
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        let Ok(value) = text.parse::<toml::Table>() else {
            // A broken file: look for the key by line.
            if let Some(dir) = text.lines().find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == "data_dir").then(|| v.trim().trim_matches('"').to_string())
            }) {
                return Some(PathBuf::from(dir));
            }
            continue;
        };
        if let Some(dir) = value
            .get("agent")
            .and_then(|a| a.get("data_dir"))
            .and_then(|d| d.as_str())
        {
            return Some(PathBuf::from(dir));
        }
    }
    None
}

fn check(paths: &[PathBuf], data_dir: Option<&std::path::Path>, strict: bool) -> ExitCode {
    let texts = match config::read(paths) {
        Ok(t) => t,
        Err(d) => {
            eprintln!("{d}");
            eprintln!("{} problem(s) found", d.0.len());
            return ExitCode::FAILURE;
        }
    };
    let files = config::files::check(&texts);
    let result = match config::validate_texts(&texts, data_dir) {
        Err(mut d) if strict => {
            d.0.extend(files.iter().cloned());
            Err(d)
        }
        Ok(_) if strict && !files.is_empty() => Err(config::diag::Diagnostics(files.clone())),
        other => other,
    };
    if !strict {
        for d in &files {
            eprintln!("{}", d.warning());
        }
        if !files.is_empty() {
            eprintln!(
                "{} named file(s) not usable here: `plantmesh run` refuses to start on them, `check --strict` fails",
                files.len()
            );
        }
    }
    match result {
        Ok(plan) => {
            println!(
                "ok: {} device(s), {} tag(s), {} product(s); config hash {}",
                plan.devices.len(),
                plan.tags.len(),
                plan.products.len(),
                plan.config_hash
            );
            for p in &plan.products {
                println!(
                    "  {} v{} ({}, {} fields) -> {}",
                    p.id,
                    p.version,
                    p.domain,
                    p.fields.len(),
                    p.topic
                );
            }
            for p in &plan.retired {
                println!(
                    "  {} v{} retired: not run; its retained documents are cleared",
                    p.id, p.version
                );
            }
            ExitCode::SUCCESS
        }
        Err(d) => {
            eprintln!("{d}");
            eprintln!("{} problem(s) found", d.0.len());
            ExitCode::FAILURE
        }
    }
}

fn run_async(command: Option<Command>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match command {
            None => demo(None, None).await,
            Some(Command::Demo { data_dir, broker }) => demo(data_dir, broker).await,
            Some(Command::Run { config, data_dir, view }) if !config.is_empty() => {
                let texts = config::read(&config).map_err(|d| anyhow::anyhow!("invalid config:\n{d}"))?;
                // A file the config names that cannot be used fails the start like a bad key.
                let files = config::files::check(&texts);
                let plan = match config::validate_texts(&texts, data_dir.as_deref()) {
                    Ok(plan) if files.is_empty() => plan,
                    Ok(_) => anyhow::bail!("invalid config:\n{}", config::diag::Diagnostics(files)),
                    Err(mut d) => {
                        d.0.extend(files);
                        anyhow::bail!("invalid config:\n{d}")
                    }
                };
                // What a reload puts a refused product file back to: kept on disk, not in memory.
                let mut applied = plantmesh::reload::Applied::new(&plan.agent.data_dir);
                applied.keep(&texts);
                drop(texts);
                let source = plantmesh::runtime::ConfigSource {
                    paths: config,
                    data_dir,
                    applied,
                    trim: allocator::trim,
                };
                // Parsing a large config leaves freed memory behind; hand it back before running.
                allocator::trim();
                tracing::info!(agent = %plan.agent.id, config_hash = %plan.config_hash, files = plan.files.len(), "config loaded");
                plantmesh::runtime::run(plan, Some(source), view, |r| {
                    if view {
                        plantmesh::view::spawn(r)
                    }
                    // Start-up (building every product's state, the first polls and commits) leaves
                    // freed memory scattered behind; hand it back once things have settled, and
                    // then every 10 s: records and their JSON (tens of KiB at a thousand fields)
                    // are carved out of that free memory in turn and leave it resident once
                    // freed. At 10,000 tags, 6 MiB of the heap was free and 1.4 MiB of that
                    // resident 20 s after the last trim; a trim walks ~150 free chunks, well
                    // under a millisecond (scripts/footprint.sh measures RSS and CPU).
                    tokio::spawn(async {
                        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                        let mut every = tokio::time::interval(std::time::Duration::from_secs(10));
                        loop {
                            every.tick().await;
                            allocator::trim();
                        }
                    });
                })
                .await?;
                Ok(())
            }
            Some(Command::Run { data_dir, .. }) => demo(data_dir, None).await,
            Some(Command::Buffer { action }) => buffer(action),
            Some(Command::Audit { data_dir }) => {
                let entries = plantmesh::audit::read(&data_dir).with_context(|| format!("reading {}/audit.jsonl", data_dir.display()))?;
                for e in entries {
                    println!("{e}");
                }
                Ok(())
            }
            Some(Command::Discover {
                endpoint,
                security_policy,
                security_mode,
                username,
                password_env,
                password_file,
                start,
                max_depth,
                data_dir,
                device_id,
            }) => {
                use plantmesh::config::{OpcUaIdentity, OpcUaSecurityMode, SecretRef};
                if plantmesh::sources::opcua::security_policy(&security_policy).is_none() {
                    bail!("unknown security policy `{security_policy}`: use Aes256_Sha256_RsaPss, Aes128_Sha256_RsaOaep, Basic256Sha256 or None");
                }
                let security_mode = match security_mode.as_deref() {
                    None if security_policy == "None" => OpcUaSecurityMode::None,
                    None | Some("SignAndEncrypt") => OpcUaSecurityMode::SignAndEncrypt,
                    Some("Sign") => OpcUaSecurityMode::Sign,
                    Some("None") => OpcUaSecurityMode::None,
                    Some(other) => bail!("unknown security mode `{other}`: use SignAndEncrypt, Sign or None"),
                };
                if security_mode == OpcUaSecurityMode::None {
                    tracing::warn!("OPC UA security is None: traffic is neither signed nor encrypted");
                }
                let identity = match (username, password_env, password_file) {
                    (None, None, None) => OpcUaIdentity::Anonymous,
                    (Some(user), Some(env), None) => OpcUaIdentity::UserName { user, password: SecretRef::Env(env) },
                    (Some(user), None, Some(file)) => OpcUaIdentity::UserName { user, password: SecretRef::File(file) },
                    _ => bail!("--username needs exactly one of --password-env, --password-file"),
                };
                let options = plantmesh::discover::Options {
                    endpoint,
                    security_policy,
                    security_mode,
                    identity,
                    start,
                    max_depth,
                    pki_dir: data_dir.join("pki-discover"),
                    application_uri: "urn:plantmesh:discover".into(),
                    device_id,
                };
                let proposal = plantmesh::discover::discover(&options).await.map_err(|e| anyhow::anyhow!(e))?;
                print!("{proposal}");
                Ok(())
            }
            Some(Command::Simulate { listen, devices, registers, opcua_items, opcua_interval, .. }) => {
                simulate(listen, devices, registers, opcua_items, &opcua_interval).await
            }
            Some(Command::Preview {
                config,
                demo: live_demo,
                seconds,
                product,
                ..
            }) => {
                let seconds = std::time::Duration::from_secs(seconds);
                let print = |s: &str| print!("{s}");
                if live_demo {
                    let dir = tempfile_dir("plantmesh-preview")?;
                    let (plan, _sims) = demo_plan(&dir, None).await?;
                    eprintln!("previewing the demo plant for {}s; nothing is published", seconds.as_secs());
                    plantmesh::preview::preview_live(&plan, product.as_deref(), seconds, print)
                        .await
                        .map_err(|e| anyhow::anyhow!(e))?;
                    let _ = std::fs::remove_dir_all(&dir);
                } else {
                    let plan = config::load(&config).map_err(|d| anyhow::anyhow!("invalid config:\n{d}"))?;
                    eprintln!("polling the config's devices for {}s; nothing is published", seconds.as_secs());
                    plantmesh::preview::preview_live(&plan, product.as_deref(), seconds, print)
                        .await
                        .map_err(|e| anyhow::anyhow!(e))?;
                }
                Ok(())
            }
            Some(Command::Check { .. } | Command::Reload { .. } | Command::Export { .. } | Command::Catalog { .. } | Command::Verify { .. }) => {
                unreachable!("handled before the runtime starts")
            }
        }
    })
}

#[cfg(feature = "simulators")]
const DEMO_GATEWAY: &str = include_str!("../../configs/demo/agent.toml");
#[cfg(feature = "simulators")]
const DEMO_GOVERNANCE: &str = include_str!("../../configs/demo/governance.toml");
#[cfg(feature = "simulators")]
const DEMO_PRODUCTS: [(&str, &str); 6] = [
    (
        "products/production/press-rate.toml",
        include_str!("../../configs/demo/products/production/press-rate.toml"),
    ),
    (
        "products/production/press-output.toml",
        include_str!("../../configs/demo/products/production/press-output.toml"),
    ),
    (
        "products/quality/oven-profile.toml",
        include_str!("../../configs/demo/products/quality/oven-profile.toml"),
    ),
    (
        "products/quality/press-temperatures.toml",
        include_str!("../../configs/demo/products/quality/press-temperatures.toml"),
    ),
    (
        "products/utilities/pump-room.toml",
        include_str!("../../configs/demo/products/utilities/pump-room.toml"),
    ),
    (
        "products/production/packing-output.toml",
        include_str!("../../configs/demo/products/production/packing-output.toml"),
    ),
];

/// `plantmesh simulate --sensor-node`: the firmware library on simulated sensors, on a new pty.
#[cfg(feature = "simulators")]
fn sensor_node(
    link: Option<PathBuf>,
    interval_ms: u64,
    garbage_every: u32,
    cycles: u32,
    wire_breaks: u32,
    no_delays: bool,
) -> ExitCode {
    use plantmesh::sim::sensor;
    use std::io::Write;
    let pty = match sensor::open_pty(link.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("plantmesh: cannot open a pty: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("SIM-SENSOR {}", pty.path.display());
    let _ = std::io::stdout().flush();
    let opts = sensor::SensorNodeOptions {
        interval: std::time::Duration::from_millis(interval_ms),
        garbage_every,
        cycles,
        wire_breaks,
        no_delays,
    };
    let master = match pty.master.try_clone_native() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("cannot clone the pty master: {e}");
            return ExitCode::from(2);
        }
    };
    sensor::run_node(master, &opts, |kind| {
        println!("GARBAGE {kind}");
        let _ = std::io::stdout().flush();
    });
    // A node that stopped measuring but is still plugged in: the reader sees silence, not a hang-up
    // (which would also discard what it has not read yet).
    std::thread::sleep(std::time::Duration::from_secs(3));
    drop(pty);
    ExitCode::SUCCESS
}

#[cfg(not(feature = "simulators"))]
fn sensor_node(_: Option<PathBuf>, _: u64, _: u32, _: u32, _: u32, _: bool) -> ExitCode {
    eprintln!("plantmesh: this build has no simulators (feature `simulators`)");
    ExitCode::FAILURE
}

/// A fresh private directory under the system's temporary directory.
fn tempfile_dir(prefix: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(feature = "simulators")]
async fn demo(data_dir: Option<PathBuf>, broker: Option<String>) -> anyhow::Result<()> {
    let data_dir = data_dir.unwrap_or_else(|| std::env::temp_dir().join("plantmesh-demo"));
    let (plan, _sims) = demo_plan(&data_dir, broker.as_deref()).await?;
    plantmesh::runtime::run(plan, None, true, plantmesh::view::spawn).await?;
    Ok(())
}

/// The demo plant's embedded config, as it is written (its devices at the addresses in the file).
#[cfg(feature = "simulators")]
fn demo_config(data_dir: &std::path::Path) -> anyhow::Result<config::Plan> {
    use std::path::Path;
    let products: Vec<(&Path, &str)> = DEMO_PRODUCTS.iter().map(|(p, t)| (Path::new(*p), *t)).collect();
    config::load_texts(
        (Path::new("configs/demo/agent.toml"), DEMO_GATEWAY),
        Some((Path::new("configs/demo/governance.toml"), DEMO_GOVERNANCE)),
        &products,
        data_dir,
    )
    .map_err(|d| anyhow::anyhow!("embedded demo config is invalid:\n{d}"))
}

#[cfg(not(feature = "simulators"))]
fn demo_config(_: &std::path::Path) -> anyhow::Result<config::Plan> {
    bail!("this build has no demo plant (feature `simulators`)")
}

/// The demo plant: its embedded config, with its simulated PLC and oven started and wired in. The
/// simulators run while the returned guard lives.
#[cfg(feature = "simulators")]
async fn demo_plan(
    data_dir: &std::path::Path,
    broker: Option<&str>,
) -> anyhow::Result<(config::Plan, plantmesh::sim::oven::SimServer)> {
    use plantmesh::config::DeviceKind;
    let data_dir = data_dir.to_path_buf();
    let mut plan = demo_config(&data_dir)?;
    // The demo's site secret: 32 random bytes, created once, readable by its owner only.
    let key = data_dir.join("site.key");
    if !key.exists() {
        use std::io::Read;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        std::fs::create_dir_all(&data_dir)?;
        let mut secret = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut secret)?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key)?;
        std::io::Write::write_all(&mut f, &secret)?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    }
    plan.governance.key_file = Some(key);
    let plc = plantmesh::sim::plc::start("127.0.0.1:0".parse()?)
        .await
        .context("starting the simulated PLC")?;
    let oven = plantmesh::sim::oven::start_oven(&data_dir.join("sim-pki"))
        .await
        .map_err(|e| anyhow::anyhow!("starting the simulated oven: {e}"))?;
    // The sensor node: the firmware library on simulated parts, writing into a pty for the life of
    // the process (its tank-level loop breaks for 3 s in every 30, to show a sensor fault).
    let pty = plantmesh::sim::sensor::open_pty(None).context("opening a pty for the simulated sensor node")?;
    let node_port = pty.path.display().to_string();
    let master = pty.master.try_clone_native().context("cloning the pty")?;
    std::thread::Builder::new()
        .name("sim-sensor-node".into())
        .spawn(move || {
            let _pty = pty;
            let opts = plantmesh::sim::sensor::SensorNodeOptions {
                wire_breaks: 3,
                ..Default::default()
            };
            plantmesh::sim::sensor::run_node(master, &opts, |_| {});
        })?;
    if let Some(b) = broker {
        let (host, port) = b
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
            .filter(|(h, _)| !h.is_empty())
            .with_context(|| format!("--broker {b}: expected HOST:PORT, e.g. 127.0.0.1:1883"))?;
        let mut u = plantmesh::runtime::local_upstream(port, format!("plantmesh-{}", plan.agent.id));
        u.host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        plan.upstream = Some(u);
    }
    // The packaging machine speaks MQTT to the demo's broker, the embedded one unless --broker
    // (started here rather than by the runtime, so the machine has it to publish to).
    let broker = match &plan.upstream {
        Some(u) => (u.host.clone(), u.port),
        None => {
            let addr = plantmesh::runtime::start_embedded_broker().map_err(|e| anyhow::anyhow!("{e}"))?;
            plan.upstream = Some(plantmesh::runtime::local_upstream(
                addr.port(),
                format!("plantmesh-{}", plan.agent.id),
            ));
            (addr.ip().to_string(), addr.port())
        }
    };
    tokio::spawn(plantmesh::sim::packer::run(
        broker.0.clone(),
        broker.1,
        "machines/packaging".into(),
        "wrapper-1".into(),
    ));
    for d in &mut plan.devices {
        match &mut d.kind {
            DeviceKind::Mqtt(m) => {
                m.broker.host = broker.0.clone();
                m.broker.port = broker.1;
            }
            DeviceKind::Sensor(s) => s.serial.port = node_port.clone(),
            DeviceKind::ModbusRtu(r) => r.serial.port = node_port.clone(),
            DeviceKind::OpcUa(o) => o.endpoint = oven.endpoint.clone(),
            DeviceKind::ModbusTcp(t) => t.address = plc.to_string(),
        }
    }
    tracing::info!(oven = %oven.endpoint, "demo plant: simulated curing oven on OPC UA");
    tracing::info!(plc = %plc, data_dir = %data_dir.display(), "demo plant: simulated press-line PLC on Modbus TCP");
    tracing::info!(port = %node_port, "demo plant: simulated sensor node on a pty");
    tracing::info!(broker = %format!("{}:{}", broker.0, broker.1), "demo plant: simulated flow wrapper publishing JSON over MQTT");
    Ok((plan, oven))
}

#[cfg(not(feature = "simulators"))]
async fn demo(_: Option<PathBuf>, _: Option<String>) -> anyhow::Result<()> {
    bail!("no config given (--config or PLANTMESH_CONFIG), and this build has no demo plant (feature `simulators`)")
}

#[cfg(not(feature = "simulators"))]
async fn demo_plan(_: &std::path::Path, _: Option<&str>) -> anyhow::Result<(config::Plan, ())> {
    bail!("this build has no demo plant (feature `simulators`)")
}

#[cfg(feature = "simulators")]
async fn simulate(
    listen: std::net::SocketAddr,
    devices: Option<u16>,
    registers: u16,
    opcua_items: Option<usize>,
    opcua_interval: &str,
) -> anyhow::Result<()> {
    use std::io::Write;
    let _bank = match opcua_items {
        Some(n) => {
            let every = plantmesh::config::units::parse_duration(opcua_interval).map_err(|e| anyhow::anyhow!(e))?;
            let dir = std::env::temp_dir().join(format!("plantmesh-sim-{}", std::process::id()));
            let bank = plantmesh::sim::oven::start_bank(&dir, n, every)
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            println!("SIM-OPCUA {} {} items every {opcua_interval}", bank.endpoint, n);
            Some(bank)
        }
        None => None,
    };
    match devices {
        None => {
            let addr = plantmesh::sim::plc::start(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            println!("simulated press-line PLC serving Modbus TCP on {addr} (Ctrl-C stops)");
        }
        Some(n) => {
            for i in 0..n {
                let addr = plantmesh::sim::plc::start_bank((listen.ip(), 0).into(), registers).await?;
                println!("SIM {i} {addr}");
            }
        }
    }
    std::io::stdout().flush()?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

#[cfg(not(feature = "simulators"))]
async fn simulate(_: std::net::SocketAddr, _: Option<u16>, _: u16, _: Option<usize>, _: &str) -> anyhow::Result<()> {
    bail!("this build has no simulators (feature `simulators`)")
}

fn buffer(action: BufferAction) -> anyhow::Result<()> {
    let dir = match &action {
        BufferAction::Stats { data_dir } | BufferAction::Export { data_dir } => data_dir.clone(),
    };
    let path = dir.join("buffer.redb");
    if !path.exists() {
        bail!("no buffer at {}", path.display());
    }
    let reader = plantmesh::buffer::Store::open_reader(&path)
        .with_context(|| format!("opening {} (is the agent still running?)", path.display()))?;
    let products = reader.products()?;
    match action {
        BufferAction::Stats { .. } => {
            println!("buffer {}: {} pending message(s)", path.display(), reader.len()?);
            for &p in &products {
                let msgs = reader.read_after(p, None, usize::MAX)?;
                let records: u64 = msgs.iter().map(|m| u64::from(m.records)).sum();
                let (first, last) = (msgs.first().map(|m| m.id), msgs.last().map(|m| m.id));
                println!(
                    "  {}: {} messages, {records} records, from {first:?} to {last:?}",
                    reader.name(p),
                    msgs.len()
                );
            }
            for (p, reason, n) in reader.drops()? {
                println!("  dropped {p} ({reason}): {n} records");
            }
            println!("  gap events awaiting upstream: {}", reader.gaps(usize::MAX)?.len());
        }
        BufferAction::Export { .. } => {
            let mut out = std::io::stdout().lock();
            for &p in &products {
                for m in reader.read_after(p, None, usize::MAX)? {
                    let records: serde_json::Value = serde_json::from_slice(&m.body).unwrap_or(serde_json::Value::Null);
                    let line = serde_json::json!({"product": &*m.name, "epoch": m.id.epoch, "seq": m.id.seq, "last_seq": m.last_seq, "created": m.created, "topic": m.topic, "records": records});
                    use std::io::Write;
                    writeln!(out, "{line}")?;
                }
            }
        }
    }
    Ok(())
}

/// glibc allocator settings for a long-running gateway process. By default glibc gives each thread
/// that allocates its own arena (up to 8 per core), and keeps freed memory (for instance, what
/// parsing a large config left behind) mapped. One arena: RSS at 100,000 points/s 20.9 -> 18.7 MiB
/// at the same CPU (`scripts/bench-e2e.sh 10 1000 100ms`).
mod allocator {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    pub fn limit_arenas() {
        // SAFETY: mallopt only changes allocator parameters; called once, before any other thread exists.
        unsafe {
            // One arena for all threads: a second one (the setting until now) kept its own freed
            // memory for 1-2 MiB more RSS and bought no measurable CPU at 100,000 points/s
            // (scripts/bench-e2e.sh 10 1000 100ms: 0.48 against 0.50 core-ms per 1000 points).
            libc::mallopt(libc::M_ARENA_MAX, 1);
            // Blocks of 16 KiB and more (a record of a thousand fields, its JSON, a poll's
            // registers) come from mmap and go back to the kernel when freed, instead of staying
            // in an arena. Setting it also stops glibc from raising the threshold on its own.
            // 32 -> 16 KiB: 10,000 tags at 1 s, RSS 14.0-14.3 -> 13.7-13.9 MiB at the same CPU
            // (0.9-1.1 % of a core; FOOTPRINT_AGENT=target/gateway/plantmesh scripts/footprint.sh).
            libc::mallopt(libc::M_MMAP_THRESHOLD, 16 * 1024);
        }
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    pub fn trim() {
        // SAFETY: malloc_trim releases free heap pages to the kernel; it is thread-safe and has no
        // preconditions.
        unsafe {
            libc::malloc_trim(0);
        }
    }

    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    pub fn limit_arenas() {}

    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    pub fn trim() {}
}
