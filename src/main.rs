//! The `veil` command: a thin shell over the library.

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use veil::pki;
use veil::policy::{self, Policy};
use veil::relay::Relay;
use veil::relay::config::RelayConfig;
use veil::sidecar::{Reloader, Settings, Sidecar, SidecarConfig};
use veil::socks5::passwords;
use veil::tunnel::TunnelConfig;

/// EX_USAGE: a configuration error. systemd units list it in RestartPreventExitStatus.
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "veil",
    version,
    about = "A policy-enforcing UDP privacy sidecar for calling apps"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a relay and a sidecar in one process on loopback, with fresh certificates and the
    /// built-in default policy, and print how to try it.
    Up {
        /// Address of the SOCKS5 listener.
        #[arg(long, default_value = "127.0.0.1:1080")]
        listen: SocketAddr,
        /// Networks the embedded relay may send to although they are special-purpose ranges
        /// (e.g. a lab network); repeatable.
        #[arg(long)]
        allow: Vec<ipnet::IpNet>,
    },
    /// Run the sidecar: a SOCKS5 server that applies the per-user policy to every flow and
    /// tunnels `relay` verdicts to the relay.
    Sidecar {
        /// The sidecar configuration file; flags below override its values.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address of the SOCKS5 listener (loopback unless --passwords is given).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Policy directory (default.toml, users/, groups/). Reloaded on SIGHUP.
        #[arg(long)]
        policy_dir: Option<PathBuf>,
        /// File of `NAME:HASH` lines (from `veil passwd`); makes every client log in.
        #[arg(long)]
        passwords: Option<PathBuf>,
        /// The `veil status` control socket (default /run/veil/control).
        #[arg(long)]
        control: Option<PathBuf>,
    },
    /// Run the relay: MASQUE CONNECT-UDP (with bind) and CONNECT over HTTP/3.
    Relay {
        /// The relay configuration file.
        #[arg(long, default_value = "/etc/veil/relay.toml")]
        config: PathBuf,
    },
    /// Run CMD in your confined network view (the sidecar starts it as you; without a view or
    /// without the daemon nothing runs). Exits with CMD's status.
    Run {
        /// The sidecar's launch socket.
        #[arg(long, default_value = veil::confine::launch::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<std::ffi::OsString>,
    },
    /// Ask the running sidecar what it is doing (root only).
    Status {
        /// The sidecar's control socket.
        #[arg(long, default_value = veil::control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Check a policy directory with the daemon's own loader; exit 0 if good, 64 if not.
    Check {
        /// The policy directory.
        #[arg(default_value = "/etc/veil/policies")]
        dir: PathBuf,
    },
    /// Read a password on standard input and print a `NAME:HASH` line for a password file.
    Passwd {
        /// The user name the line is for.
        user: String,
    },
    /// Install or remove the kernel firewall of transparent interception.
    Firewall {
        #[command(subcommand)]
        action: FirewallAction,
    },
    /// Write a private CA, a relay certificate and sidecar client certificates to DIR.
    Pki {
        /// Where to write ca.crt, ca.key, relay.crt, relay.key and NAME.crt/NAME.key per client.
        dir: PathBuf,
        /// Name (DNS name or IP address) the relay's certificate is for; repeatable.
        #[arg(long = "relay-name", required = true)]
        relay_names: Vec<String>,
        /// Name of a sidecar client certificate to make; repeatable.
        #[arg(long = "client")]
        clients: Vec<String>,
    },
}

#[derive(Subcommand)]
enum FirewallAction {
    /// Install (or atomically replace) the table for the managed users of a sidecar config;
    /// with no daemon running, their UDP is dropped (the early-boot state).
    Install {
        /// The sidecar configuration file.
        #[arg(long, default_value = "/etc/veil/sidecar.toml")]
        config: PathBuf,
    },
    /// Remove veil's table and policy routing.
    Remove {
        /// The fwmark the table was installed with.
        #[arg(long, default_value_t = veil::firewall::DEFAULT_MARK)]
        mark: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Check { dir } => check(&dir),
        Cmd::Passwd { user } => report(passwd(&user).map(|line| println!("{line}"))),
        Cmd::Pki {
            dir,
            relay_names,
            clients,
        } => report(write_pki(&dir, &relay_names, &clients)),
        Cmd::Firewall { action } => report(firewall(action)),
        Cmd::Run { socket, command } => match veil::confine::launch::run(&socket, command) {
            Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
            Err(e) => {
                eprintln!("veil run: {e}");
                ExitCode::from(127)
            }
        },
        Cmd::Status { socket } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let result = runtime.map_err(anyhow::Error::from).and_then(|rt| {
                rt.block_on(veil::control::request_status(&socket))
                    .with_context(|| format!("asking the sidecar at {}", socket.display()))
            });
            match result {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("veil status: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        command => {
            init_tracing();
            veil::raise_open_file_limit();
            // One thread: the sidecar serves one machine's calls, and saves the cross-thread
            // wake-ups a multi-threaded runtime pays on every packet (measured: ~15 % CPU and
            // ~40 % round-trip time in the data-path benchmark). The relay spreads its
            // connections over threads of its own, one runtime each (`threads` in its config).
            let mut builder = tokio::runtime::Builder::new_current_thread();
            let runtime = match builder.enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("veil: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = runtime.block_on(async {
                match command {
                    Cmd::Up { listen, allow } => up(listen, allow).await,
                    Cmd::Sidecar {
                        config,
                        listen,
                        policy_dir,
                        passwords,
                        control,
                    } => sidecar(config, listen, policy_dir, passwords, control).await,
                    Cmd::Relay { config } => relay(&config).await,
                    _ => Ok(()),
                }
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e:#}");
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
    }
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("veil: {e:#}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VEIL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn load_policy(dir: &Path) -> Result<Policy, policy::PolicyErrors> {
    policy::load_dir(dir, running_as_root())
}

fn check(dir: &Path) -> ExitCode {
    match load_policy(dir) {
        Ok(p) => {
            let list = |names: Vec<&str>| {
                if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                }
            };
            println!(
                "{}: ok: {} rules; user files: {}; group files: {}{}",
                dir.display(),
                p.rule_count(),
                list(p.users()),
                list(p.groups()),
                if running_as_root() {
                    "; ownership checked"
                } else {
                    "; ownership not checked (not root)"
                }
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            eprintln!("{}: {} error(s)", dir.display(), errors.0.len());
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn passwd(user: &str) -> anyhow::Result<String> {
    if user.is_empty() || user.len() > 255 || user.contains(':') {
        bail!("user name must be 1 to 255 bytes without ':'");
    }
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .context("reading the password")?;
    let password = input.trim_end_matches(['\r', '\n']);
    if password.is_empty() || password.len() > 255 {
        bail!("password must be 1 to 255 bytes");
    }
    let hash = passwords::hash_password(password.as_bytes())
        .map_err(|e| anyhow::anyhow!("hashing: {e}"))?;
    Ok(format!("{user}:{hash}"))
}

fn write_pki(dir: &Path, relay_names: &[String], clients: &[String]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let set = pki::generate(relay_names, clients)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let write = |name: &str, text: &str, mode: u32| -> anyhow::Result<()> {
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
        std::io::Write::write_all(&mut f, text.as_bytes())?;
        Ok(())
    };
    write("ca.crt", &set.ca_cert_pem, 0o644)?;
    write("ca.key", &set.ca_key_pem, 0o600)?;
    write("relay.crt", &set.relay.cert_pem, 0o644)?;
    write("relay.key", &set.relay.key_pem, 0o600)?;
    for (name, id) in &set.clients {
        write(&format!("{name}.crt"), &id.cert_pem, 0o644)?;
        write(&format!("{name}.key"), &id.key_pem, 0o600)?;
    }
    println!(
        "wrote a CA, a relay certificate and {} client certificate(s) to {}",
        set.clients.len(),
        dir.display()
    );
    Ok(())
}

fn firewall(action: FirewallAction) -> anyhow::Result<()> {
    match action {
        FirewallAction::Install { config } => {
            let settings = SidecarConfig::load(&config).map_err(anyhow::Error::msg)?;
            let t = settings
                .transparent
                .context("the sidecar config has no [transparent] section")?;
            let own = veil::sidecar::managed::own_cgroup();
            let i = veil::sidecar::managed::resolve(&t, &veil::sidecar::managed::System, &own)?;
            veil::firewall::install(&i)?;
            println!("veil firewall installed: managed users' UDP leaves only through veil");
        }
        FirewallAction::Remove { mark } => {
            veil::firewall::remove(mark)?;
            println!("veil firewall removed");
        }
    }
    Ok(())
}

async fn sidecar(
    config_file: Option<PathBuf>,
    listen: Option<SocketAddr>,
    policy_dir: Option<PathBuf>,
    passwords: Option<PathBuf>,
    control: Option<PathBuf>,
) -> anyhow::Result<()> {
    let mut config = match &config_file {
        Some(path) => SidecarConfig::load(path).map_err(anyhow::Error::msg)?,
        // No file: every setting at its default, as an empty file gives.
        None => SidecarConfig::parse(Path::new("/etc/veil/sidecar.toml"), "")
            .map_err(anyhow::Error::msg)?,
    };
    config.listen = listen.unwrap_or(config.listen);
    config.policy_dir = policy_dir.unwrap_or(config.policy_dir);
    config.passwords = passwords.or(config.passwords);
    config.control = control.or(config.control);
    let policy = match load_policy(&config.policy_dir) {
        Ok(p) => p,
        Err(errors) => {
            for e in &errors.0 {
                error!(error = %e, "invalid policy");
            }
            bail!(
                "policy {} is invalid ({} errors), not starting",
                config.policy_dir.display(),
                errors.0.len()
            );
        }
    };
    let sidecar = Sidecar::bind(Settings::from_config(&config)?, policy).await?;
    serve(sidecar, Some(config.policy_dir)).await
}

/// Runs `sidecar` until SIGTERM or SIGINT, reloading the policy in `policy_dir` on SIGHUP.
async fn serve(sidecar: Sidecar, policy_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let reloader = sidecar.reloader();
    let stop = CancellationToken::new();
    let run = tokio::spawn(sidecar.run(stop.clone().cancelled_owned()));
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => match &policy_dir {
                Some(dir) => reload(&reloader, dir).await,
                None => info!("SIGHUP ignored: the built-in policy has nothing to reload"),
            },
        }
    }
    stop.cancel();
    let _ = run.await;
    Ok(())
}

/// Loads the policy in `dir` and reloads the sidecar with it; a bad policy, or a firewall that
/// cannot be applied, leaves the running policy and ruleset in place.
async fn reload(reloader: &Reloader, dir: &Path) {
    // Parsed and compiled on a blocking thread: the sidecar has one runtime thread, and a large
    // policy would stall every flow while it parses.
    let loaded = tokio::task::spawn_blocking({
        let dir = dir.to_owned();
        move || load_policy(&dir)
    })
    .await
    .unwrap_or_else(|e| {
        Err(policy::PolicyErrors(vec![policy::LoadError::Path {
            path: dir.display().to_string(),
            message: format!("loading failed: {e}"),
        }]))
    });
    match loaded {
        Ok(p) => {
            let _ = veil::notify::reloading();
            match reloader.reload(p) {
                Ok(generation) => info!(generation, dir = %dir.display(), "policy reloaded"),
                Err(e) => {
                    error!(error = %e, "policy reload refused: the firewall could not be applied; the running policy and ruleset stay")
                }
            }
            let _ = veil::notify::notify("READY=1");
        }
        Err(errors) => {
            for e in &errors.0 {
                warn!(error = %e, "policy reload refused");
            }
            warn!(dir = %dir.display(), errors = errors.0.len(), "policy reload refused, the running policy stays");
        }
    }
}

async fn relay(path: &Path) -> anyhow::Result<()> {
    let config = RelayConfig::load(path)?;
    let (certs, key) = pki::identity_from_files(&config.certificate, &config.private_key)?;
    let ca = pki::certificates_from_file(&config.client_ca)?;
    let der = key.secret_der().to_vec();
    let tls = pki::server_config(certs, key, &ca)?;
    let threads = config.threads;
    let relay = Relay::bind(config, tls, |shard, shards| {
        pki::relay_endpoint_config(&der, shard, shards)
    })?;
    info!(listen = %relay.local_addr()?, threads, "veil relay ready");
    let handle = relay.handle();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(relay.run(shutdown.clone()));
    let _ = veil::notify::notify("READY=1\nSTATUS=serving");
    tokio::spawn(veil::notify::watchdog(shutdown.clone()));
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    info!("shutting down");
    let _ = veil::notify::notify("STOPPING=1");
    shutdown.cancel();
    let _ = run.await;
    for (name, value) in handle.counters().snapshot() {
        info!(counter = name, value, "final count");
    }
    Ok(())
}

/// A relay and a sidecar in one process, on loopback, with fresh certificates and the
/// built-in policy.
async fn up(listen: SocketAddr, allow: Vec<ipnet::IpNet>) -> anyhow::Result<()> {
    let policy = policy::embedded_default()
        .map_err(|e| anyhow::anyhow!("built-in policy is invalid:\n{e}"))?;
    let set = pki::generate(
        &["localhost".to_owned(), "127.0.0.1".to_owned()],
        &["veil-up".to_owned()],
    )?;
    let ca = pki::certificates(&set.ca_cert_pem, "generated CA")?;
    let relay_key = pki::private_key(&set.relay.key_pem, "generated relay key")?;
    let endpoint_config = pki::relay_endpoint_config(relay_key.secret_der(), 0, 1);
    let tls = pki::server_config(
        pki::certificates(&set.relay.cert_pem, "generated relay certificate")?,
        relay_key,
        &ca,
    )?;
    let relay = Relay::bind(RelayConfig::embedded(allow), tls, |_, _| {
        endpoint_config.clone()
    })?;
    let relay_addr = relay.local_addr()?;
    let relay_stop = CancellationToken::new();
    tokio::spawn(relay.run(relay_stop.clone()));
    let _relay_stop = relay_stop.drop_guard();
    let (_, client) = set.clients.first().context("generated client identity")?;
    let mut settings = Settings::new(listen);
    settings.tunnel = Some(TunnelConfig {
        relay: relay_addr,
        server_name: "localhost".to_owned(),
        client: pki::client_config(
            &ca,
            pki::certificates(&client.cert_pem, "generated client certificate")?,
            pki::private_key(&client.key_pem, "generated client key")?,
        )?,
    });
    let sidecar = Sidecar::bind(settings, policy).await?;
    println!(
        "veil is up: SOCKS5 on {listen}, relay on {relay_addr} (QUIC, fresh certificates), built-in default policy.\n\
         `relay` verdicts leave from the relay's address; private networks go direct; nothing is ever sent\n\
         direct that the policy says to relay. Try it (PySocks: pip install PySocks==1.7.1):\n  \
         python3 -c \"import socks,socket; s=socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM); \
         s.set_proxy(socks.SOCKS5,'{}',{}); s.settimeout(2); s.sendto(b'hi',('192.168.1.10',7)); print('sent')\"\n  \
         curl --socks5 {listen} http://10.0.0.1/",
        listen.ip(),
        listen.port()
    );
    serve(sidecar, None).await
}
