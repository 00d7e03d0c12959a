//! weft-sim: runs the real Weft node code (`weft_node::Node`: engine,
//! crypto, store, gossipsub) for many nodes in one process and measures
//! delivery. The binary (`main.rs`) is a thin layer over this library.
//!
//! - [`scenario`] owns the scenario file: its format, the checks that
//!   name a bad key, and the built-in scenarios;
//! - [`runner`] owns a run: starting the nodes (the one seam where each
//!   node's network configuration, hence its transport, is made),
//!   contacts and conversations, the workload, and what it records;
//! - [`report`] owns what a run writes: `summary.json` and
//!   `messages.csv`, and the statistics behind them.

pub mod report;
pub mod runner;
pub mod scenario;

pub use report::Summary;
pub use runner::{RunOptions, run};
pub use scenario::Scenario;

/// What can go wrong in a run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The scenario file is bad: `file` names it, the message the key.
    #[error("{file}: {message}")]
    Scenario { file: String, message: String },
    /// The command line asks for something this build cannot do.
    #[error("{0}")]
    Usage(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A node failed to start or answered an error during setup.
    #[error("node {node}: {message}")]
    Node { node: String, message: String },
    /// Setup did not finish in time (e.g. a group never reached a member).
    #[error("setup timed out: {0}")]
    Timeout(String),
}

impl SimError {
    /// The process exit code: 2 for the caller's mistakes (a bad scenario
    /// file, an option not built yet), 1 for a failed run.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Scenario { .. } | Self::Usage(_) => 2,
            _ => 1,
        }
    }

    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

/// Reads the scenario `arg` names: a file (a path that exists or ends in
/// `.toml`), or else a built-in scenario's name.
pub fn load_scenario(arg: &str) -> Result<(String, Scenario), SimError> {
    let path = std::path::Path::new(arg);
    if path.exists() || arg.ends_with(".toml") {
        let text = std::fs::read_to_string(path).map_err(|e| SimError::Scenario {
            file: arg.to_string(),
            message: format!("cannot read: {e}"),
        })?;
        let label = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| arg.to_string());
        let scenario = Scenario::parse(&label, &text)?;
        let name = scenario.name.clone().unwrap_or_else(|| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| arg.to_string())
        });
        return Ok((name, scenario));
    }
    match Scenario::built_in(arg) {
        Some(scenario) => Ok((arg.to_string(), scenario?)),
        None => Err(SimError::Usage(format!(
            "no scenario file or built-in scenario named {arg:?} (weft-sim scenarios lists the built-in ones)"
        ))),
    }
}
