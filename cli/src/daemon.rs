//! `weft daemon`: runs the node with networking in the foreground, serves
//! the control socket other commands talk to, announces itself once it
//! accepts commands (`{"event":"ready",...}` with `--json`), and shuts down
//! gracefully on SIGINT or SIGTERM. Timings and limits come from
//! `config.toml` in the home, if there is one (see `config`).

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use weft_node::api::{IdView, Request};
use weft_node::home::Home;
use weft_node::node::Settings;
use weft_node::{Multiaddr, NetConfig, Node, NodeConfig, NodeError, NodeHandle};

use crate::cli::DaemonArgs;
use crate::error::usage;
use crate::{client, config, output};

const DEFAULT_LISTEN: [&str; 2] = ["/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic-v1"];
/// How long to wait for a process that holds the home (a command answering
/// offline) to let go, and for the listeners to come up.
const START_PATIENCE: Duration = Duration::from_secs(5);

/// Parses `--listen`/`--bootstrap`/`--relay` values, naming the flag in the
/// error (exit code 2).
pub fn parse_addrs(flag: &str, values: &[String]) -> anyhow::Result<Vec<Multiaddr>> {
    values
        .iter()
        .map(|value| {
            value
                .trim()
                .parse::<Multiaddr>()
                .map_err(|err| usage(format!("--{flag} {value}: not a valid multiaddr: {err}")))
        })
        .collect()
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(home: &Home, args: DaemonArgs, json: bool) -> anyhow::Result<()> {
    client::require_initialized(home)?;
    let file = config::load(home.dir())?;
    let (settings, relay_target) = (file.node, file.relay_target);
    let listen = if args.listen.is_empty() {
        DEFAULT_LISTEN.iter().map(|a| a.to_string()).collect()
    } else {
        args.listen
    };
    let listen = parse_addrs("listen", &listen)?;
    let bootstrap = parse_addrs("bootstrap", &args.bootstrap)?;
    let relays = parse_addrs("relay", &args.relay)?;
    if let Some(bad) = relays
        .iter()
        .find(|a| !matches!(a.iter().last(), Some(weft_node::net::AddrProtocol::P2p(_))))
    {
        anyhow::bail!(weft_node::api::ApiError::usage(format!(
            "--relay {bad}: the address must end with /p2p/<the relay's peer id>"
        )));
    }
    let mdns = !args.no_mdns;
    let net = move || {
        let mut net = NetConfig::new(listen.clone());
        net.bootstrap = bootstrap.clone();
        net.relays = relays.clone();
        net.relay_target = relay_target;
        net.mdns = mdns;
        net
    };

    // Installed first, so that a signal during start-up still stops cleanly.
    let mut signals = Signals::install()?;
    if client::connect_daemon(home).await.is_some() {
        anyhow::bail!("a daemon is already running for {}", home.dir().display());
    }
    let node = start(home, net, &settings).await?;
    let handle = node.handle();
    let result = serve_until_signal(home, &handle, json, &mut signals).await;
    let stopped = node
        .shutdown()
        .await
        .map_err(client::node_error)
        .context("shutting the node down");
    result?;
    stopped?;
    if json {
        output::out_json(&json!({"event": "stopped"}))?;
    } else {
        eprintln!("weft: daemon stopped");
    }
    Ok(())
}

/// Starts the node, waiting a little if a command holds the home offline.
async fn start(
    home: &Home,
    net: impl Fn() -> NetConfig,
    settings: &Settings,
) -> anyhow::Result<Node> {
    let deadline = Instant::now() + START_PATIENCE;
    loop {
        let mut config = NodeConfig::new(home.dir().to_path_buf(), Some(net()));
        config.settings = settings.clone();
        match Node::start(config).await {
            Ok(node) => return Ok(node),
            Err(NodeError::Locked(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => {
                return Err(client::node_error(err)).context("could not start the node");
            }
        }
    }
}

/// Serves the control socket, announces readiness, and waits for a signal.
async fn serve_until_signal(
    home: &Home,
    handle: &NodeHandle,
    json: bool,
    signals: &mut Signals,
) -> anyhow::Result<()> {
    let server = weft_node::control::serve(handle.clone(), &home.socket_path())
        .await
        .map_err(client::node_error)
        .context("could not serve the control socket")?;
    let id: IdView = handle.request(Request::Id).await?;
    let listen = listen_addrs(handle).await;
    if json {
        output::out_json(&json!({
            "event": "ready",
            "peer_id": id.peer_id,
            "listen": listen,
            "user_id": id.user_id,
            "name": id.name,
            "home": home.dir().display().to_string(),
        }))?;
    } else {
        let mut text = format!(
            "Weft daemon of {} is running.\npeer id  {}\n",
            id.name, id.peer_id
        );
        for (i, addr) in listen.iter().enumerate() {
            let key = if i == 0 { "listen " } else { "       " };
            text.push_str(&format!("{key}  {addr}\n"));
        }
        text.push_str("Press Ctrl-C to stop.");
        output::out(&text)?;
    }
    signals.wait().await?;
    tracing::info!("signal received: shutting down");
    server.stop();
    Ok(())
}

/// The addresses the node listens on, waiting briefly for the listeners.
async fn listen_addrs(handle: &NodeHandle) -> Vec<String> {
    let deadline = Instant::now() + START_PATIENCE;
    loop {
        let addrs = handle.listen_addrs().await;
        if !addrs.is_empty() || Instant::now() >= deadline {
            return addrs.iter().map(ToString::to_string).collect();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGINT (Ctrl-C) and SIGTERM, the signals that stop the daemon.
struct Signals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                interrupt: signal(SignalKind::interrupt())
                    .context("installing the SIGINT handler")?,
                terminate: signal(SignalKind::terminate())
                    .context("installing the SIGTERM handler")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Waits for SIGINT or SIGTERM.
    async fn wait(&mut self) -> anyhow::Result<()> {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        #[cfg(not(unix))]
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addrs_parse_or_fail_as_usage() {
        let ok = parse_addrs("listen", &["/ip4/127.0.0.1/tcp/0".to_string()]);
        assert!(matches!(ok.as_deref(), Ok([_])));
        let bad = parse_addrs("listen", &["not an addr".to_string()]);
        assert!(matches!(bad, Err(ref e) if crate::error::exit_code(e) == 2));
    }
}
