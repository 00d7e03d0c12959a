//! `weft-relay`: runs a relay in the foreground until SIGTERM or SIGINT,
//! then drains and exits 0. `weft-relay init-config` prints an example
//! configuration. See docs/relay.md.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::json;
use tracing_subscriber::EnvFilter;
use weft_relay::Relay;
use weft_relay::config::{self, Config, Overrides};

#[derive(Debug, Parser)]
#[command(
    name = "weft-relay",
    version,
    about = "Weft relay: mailboxes, circuit relay, bootstrap"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The TOML configuration file (env WEFT_RELAY_CONFIG).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// A libp2p listen address; repeat for several (env WEFT_RELAY_LISTEN).
    #[arg(long, value_name = "MULTIADDR")]
    listen: Vec<String>,
    /// Where the key and the database live (env WEFT_RELAY_DATA).
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Address of /metrics and /healthz, or "off" (env WEFT_RELAY_METRICS).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// JSON logs, and a JSON ready line on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a documented example configuration.
    InitConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::InitConfig) = cli.command {
        print!("{}", config::EXAMPLE);
        return ExitCode::SUCCESS;
    }
    let overrides = Overrides {
        config: cli.config,
        listen: cli.listen,
        data: cli.data,
        metrics: cli.metrics,
        json: cli.json,
    };
    let config = match Config::load(&overrides, |k| std::env::var(k).ok()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let report = report(&e);
            tracing::error!("{report}");
            eprintln!("error: {report}");
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line. The relay's errors name their
/// source in their own message too, so a cause already said is skipped.
fn report(error: &anyhow::Error) -> String {
    let mut said = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if text.is_empty() || said.contains(&text) {
            continue;
        }
        if !said.is_empty() {
            said.push_str(": ");
        }
        said.push_str(&text);
    }
    said
}

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    let _ = if config.json() {
        builder.json().try_init()
    } else {
        use std::io::IsTerminal;
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
}

async fn run(config: Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Before anything starts: a signal during start-up still drains.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let data = config.data_dir(|k| std::env::var(k).ok());
    let relay = Relay::start(&config, &data).await?;
    let listen: Vec<String> = relay.listen().iter().map(ToString::to_string).collect();
    if config.json() {
        let line = json!({
            "event": "ready",
            "peer_id": relay.peer_id().to_string(),
            "listen": listen,
            "metrics": relay.metrics_addr().map(|a| a.to_string()),
            "data": data.display().to_string(),
        });
        out(&line.to_string());
    } else {
        let mut text = format!("weft-relay is running.\npeer id  {}\n", relay.peer_id());
        for addr in &listen {
            text.push_str(&format!("listen   {addr}/p2p/{}\n", relay.peer_id()));
        }
        if let Some(addr) = relay.metrics_addr() {
            text.push_str(&format!("metrics  http://{addr}/metrics\n"));
        }
        text.push_str(&format!("data     {}", data.display()));
        out(&text);
    }
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    relay.shutdown().await;
    if config.json() {
        out(&json!({"event": "stopped"}).to_string());
    }
    Ok(())
}

/// Writes a line to stdout and flushes it. A closed stdout (the reader
/// went away) is not a reason to stop serving, nor to panic.
fn out(line: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
}
