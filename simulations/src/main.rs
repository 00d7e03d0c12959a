//! `weft-sim`: the command line over the `weft_sim` library (see
//! docs/cli.md, section `weft-sim`, and simulations/README.md).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use weft_sim::scenario::BUILT_IN;
use weft_sim::{RunOptions, SimError};

#[derive(Debug, Parser)]
#[command(
    name = "weft-sim",
    version,
    about = "Network simulation experiments on the real Weft node code"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the built-in scenarios, one line each.
    Scenarios,
    /// Run a scenario (a TOML file or a built-in scenario's name).
    Run {
        /// SCENARIO.toml or the name of a built-in scenario.
        scenario: String,
        /// Where summary.json and messages.csv go.
        #[arg(long)]
        out: PathBuf,
        /// Overrides the scenario's seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Also run bare gossipsub on the same workload (not built yet).
        #[arg(long)]
        baseline: bool,
    },
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-sim: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn run(cli: Cli) -> Result<(), SimError> {
    match cli.command {
        Command::Scenarios => {
            for (name, description, _) in BUILT_IN {
                println!("{name:<12} {description}");
            }
            Ok(())
        }
        Command::Run {
            scenario,
            out,
            seed,
            baseline,
        } => {
            if baseline {
                return Err(SimError::Usage(
                    "`--baseline` is not built yet (bare gossipsub comes in a later increment)"
                        .into(),
                ));
            }
            let (label, scenario) = weft_sim::load_scenario(&scenario)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| SimError::Usage(format!("cannot start the runtime: {e}")))?;
            let options = RunOptions {
                out: out.clone(),
                seed,
                progress: true,
            };
            let summary = runtime.block_on(weft_sim::run(&label, &scenario, &options))?;
            eprintln!(
                "weft-sim: {} messages, delivery ratio {}, latency p50 {} ms p99 {} ms; wrote {}",
                summary.messages,
                summary.delivery_ratio,
                summary.latency_ms.p50,
                summary.latency_ms.p99,
                out.display()
            );
            Ok(())
        }
    }
}
