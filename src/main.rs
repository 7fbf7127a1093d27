//! The `veil` command: a thin shell over the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use veil::policy::{self, Policy};
use veil::socks5::passwords::{self, PasswordFile};
use veil::socks5::server::{Config, Server};

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
    /// Run the sidecar with the built-in default policy on 127.0.0.1:1080 and print how to try it.
    Up {
        /// Address of the SOCKS5 listener.
        #[arg(long, default_value = "127.0.0.1:1080")]
        listen: SocketAddr,
    },
    /// Run the sidecar: a SOCKS5 server that applies the per-user policy to every flow.
    Sidecar {
        /// Address of the SOCKS5 listener (loopback unless --passwords is given).
        #[arg(long, default_value = "127.0.0.1:1080")]
        listen: SocketAddr,
        /// Policy directory (default.toml, users/, groups/). Reloaded on SIGHUP.
        #[arg(long, default_value = "/etc/veil/policies")]
        policy_dir: PathBuf,
        /// File of `NAME:HASH` lines (from `veil passwd`); makes every client log in.
        #[arg(long)]
        passwords: Option<PathBuf>,
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Check { dir } => check(&dir),
        Cmd::Passwd { user } => match passwd(&user) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("veil passwd: {e:#}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Cmd::Up { listen } => {
            init_tracing();
            let policy = match policy::embedded_default() {
                Ok(p) => p,
                Err(e) => {
                    error!("built-in policy is invalid:\n{e}");
                    return ExitCode::FAILURE;
                }
            };
            run_daemon(Config::new(listen), policy, None, true)
        }
        Cmd::Sidecar {
            listen,
            policy_dir,
            passwords,
        } => {
            init_tracing();
            let mut config = Config::new(listen);
            if let Some(path) = passwords {
                match PasswordFile::load(&path) {
                    Ok(file) => config.passwords = Some(file),
                    Err(e) => {
                        error!("{e}");
                        return ExitCode::from(EXIT_CONFIG);
                    }
                }
            }
            let policy = match load_policy(&policy_dir) {
                Ok(p) => p,
                Err(e) => {
                    error!(
                        "policy {} is invalid, not starting:\n{e}",
                        policy_dir.display()
                    );
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            run_daemon(config, policy, Some(policy_dir), false)
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
        anyhow::bail!("user name must be 1 to 255 bytes without ':'");
    }
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .context("reading the password")?;
    let password = input.trim_end_matches(['\r', '\n']);
    if password.is_empty() || password.len() > 255 {
        anyhow::bail!("password must be 1 to 255 bytes");
    }
    let hash = passwords::hash_password(password.as_bytes())
        .map_err(|e| anyhow::anyhow!("hashing: {e}"))?;
    Ok(format!("{user}:{hash}"))
}

fn run_daemon(
    config: Config,
    policy: Policy,
    policy_dir: Option<PathBuf>,
    banner: bool,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("veil: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config, policy, policy_dir, banner)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

async fn serve(
    config: Config,
    policy: Policy,
    policy_dir: Option<PathBuf>,
    banner: bool,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let server = Server::bind(config, policy).await?;
    let addr = server.local_addr()?;
    let handle = server.handle();
    info!(listen = %addr, "veil sidecar ready (SOCKS5)");
    if banner {
        println!(
            "veil is up: SOCKS5 on {addr} with the built-in default policy.\n\
             No relay is configured yet, so `relay` verdicts are dropped (fail closed).\n\
             Try it:\n  python3 -c \"import socks,socket; s=socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM); \
             s.set_proxy(socks.SOCKS5,'{}',{}); s.settimeout(2); s.sendto(b'hi',('192.168.1.10',7))\"\n  \
             curl --socks5 {addr} http://10.0.0.1/",
            addr.ip(),
            addr.port()
        );
    }
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(server.run(shutdown.clone()));
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => match &policy_dir {
                Some(dir) => match load_policy(dir) {
                    Ok(p) => {
                        let generation = handle.reload(p);
                        info!(generation, dir = %dir.display(), "policy reloaded");
                    }
                    Err(errors) => {
                        for e in &errors.0 {
                            warn!(error = %e, "policy reload refused");
                        }
                        warn!(dir = %dir.display(), errors = errors.0.len(), "policy reload refused, the running policy stays");
                    }
                },
                None => info!("SIGHUP ignored: the built-in policy has nothing to reload"),
            },
        }
    }
    info!("shutting down");
    shutdown.cancel();
    let _ = run.await;
    for (name, value) in handle.counters().snapshot() {
        info!(counter = name, value, "final count");
    }
    Ok(())
}
