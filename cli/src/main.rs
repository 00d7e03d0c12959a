//! `weft`: the command-line binary of the Weft node for individuals. It
//! parses the command line, sets up logging (stderr only), and runs the
//! command; all the logic lives in the `weft-node` library. Exit codes
//! follow the contract: 0 success, 1 failure, 2 bad usage or input.

mod cli;
mod client;
mod commands;
mod config;
mod daemon;
mod demo;
mod error;
mod output;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // Usage errors exit 2 here, with clap's message.
    let cli = cli::Cli::parse();
    init_logging(&cli);
    // Read while the process still has a single thread: only then can the
    // local UTC offset be determined safely.
    output::init_local_offset();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: could not start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(commands::run(cli));
    // Do not wait for stray blocking tasks (a stdin reader, say).
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if error::is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(u8::try_from(error::exit_code(&err)).unwrap_or(1))
        }
    }
}

/// Logs go to stderr: `RUST_LOG` if set, else a level from `-v`/`-q`
/// (warnings by default; the daemon also reports its own progress).
fn init_logging(cli: &cli::Cli) {
    let base: i16 = match cli.command {
        cli::Command::Daemon(_) => 1,
        _ => 0,
    };
    let level = base + i16::from(cli.global.verbose) - i16::from(cli.global.quiet);
    let directive = match level {
        i16::MIN..=-2 => "off".to_string(),
        -1 => "error".to_string(),
        // Kademlia warns about routine conditions (no peers to bootstrap
        // from yet); those are only interesting when asked for.
        0 => "warn,libp2p_kad=error".to_string(),
        1 => "warn,libp2p_kad=error,weft=info,weft_node=info".to_string(),
        2 => "info,weft=debug,weft_node=debug".to_string(),
        3 => "debug,weft=trace,weft_node=trace".to_string(),
        _ => "trace".to_string(),
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(directive));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .try_init();
}
