//! Reaching the node for one request: through the control socket of a
//! running daemon, or, with none running, by starting the node offline in
//! this process (local state only; `send` queues), answering, and shutting
//! it down again.

use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use weft_node::api::{ApiError, Request, Response};
use weft_node::control::ControlClient;
use weft_node::home::Home;
use weft_node::{Node, NodeConfig, NodeError};

/// How long to keep trying to reach a daemon that holds the home but does
/// not answer yet (it is starting, or stopping).
const LOCKED_PATIENCE: Duration = Duration::from_secs(5);
const RETRY_EVERY: Duration = Duration::from_millis(100);

/// Fails with a hint unless the home holds an identity.
pub fn require_initialized(home: &Home) -> anyhow::Result<()> {
    if home.is_initialized() {
        Ok(())
    } else {
        Err(not_initialized(home))
    }
}

fn not_initialized(home: &Home) -> anyhow::Error {
    anyhow!(
        "no identity in {}: run `weft init --name NAME` first",
        home.dir().display()
    )
}

/// Turns a node error into the CLI's error. Its message already carries
/// the hint (`run weft init ...`); the exit code follows the API's
/// classification: bad input (a malformed name or invite) is 2, anything
/// else 1.
pub fn node_error(err: NodeError) -> anyhow::Error {
    anyhow::Error::new(ApiError::from(err))
}

/// Connects to the daemon of this home, if one runs.
pub async fn connect_daemon(home: &Home) -> Option<ControlClient> {
    ControlClient::connect(&home.socket_path()).await.ok()
}

/// Answers one request: through the daemon if one runs, otherwise with an
/// offline node started for the purpose.
pub async fn call(home: &Home, request: Request) -> anyhow::Result<Response> {
    let deadline = Instant::now() + LOCKED_PATIENCE;
    loop {
        if let Some(mut client) = connect_daemon(home).await {
            tracing::debug!("answering through the daemon");
            return Ok(client.call(&request).await?);
        }
        require_initialized(home)?;
        let config = NodeConfig::new(home.dir().to_path_buf(), None);
        match Node::start(config).await {
            Ok(node) => {
                tracing::debug!("no daemon: answering with an offline node");
                let reply = node.handle().call(request).await;
                if let Err(err) = node.shutdown().await {
                    // The answer stands (the store commits each change), but
                    // say that the node did not stop cleanly.
                    tracing::warn!("the offline node did not shut down cleanly: {err}");
                }
                return Ok(reply?);
            }
            Err(NodeError::Locked(_)) if Instant::now() < deadline => {
                // A daemon is starting (or another command runs): wait for
                // its control socket.
                tokio::time::sleep(RETRY_EVERY).await;
            }
            Err(err) => {
                return Err(node_error(err))
                    .context("could not open the node (and no daemon answered)");
            }
        }
    }
}
