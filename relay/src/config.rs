//! The relay's configuration: a TOML file (unknown keys are errors),
//! `WEFT_RELAY_*` environment variables and command-line flags, in that
//! order of increasing precedence over the built-in defaults.
//!
//! [`EXAMPLE`] is what `weft-relay init-config` prints: every key with its
//! default and what it does. A test checks that it parses to
//! [`Config::default`].

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};
use weft_proto::ids::UserId;

use crate::store::{DepositorQuotas, Quota, StoreLimits};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("bad config file {0}: {1}")]
    Parse(PathBuf, String),
    #[error("bad {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// How logs (stderr) and events (stdout) are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// Who may register a mailbox.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccessMode {
    /// Anyone.
    #[default]
    Open,
    /// Devices certified by a user id in `allow_users`.
    AllowList,
    /// Devices presenting one of `invite_tokens` (once, when the mailbox
    /// is created).
    Invite,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    pub mode: AccessMode,
    /// User ids (base58), for `mode = "allow-list"`.
    pub allow_users: Vec<String>,
    /// Tokens, for `mode = "invite"`.
    pub invite_tokens: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub mail_ttl_days: u64,
    pub max_envelopes_per_mailbox: u64,
    pub max_bytes_per_mailbox: u64,
    pub max_mailboxes: u64,
    pub max_total_bytes: u64,
    pub mailbox_expiry_days: u64,
    pub sweep_interval_secs: u64,
    /// Per-depositor quotas (0: no limit), see [`DepositorQuotas`].
    pub max_envelopes_per_peer_per_mailbox: u64,
    pub max_bytes_per_peer_per_mailbox: u64,
    pub max_envelopes_per_peer: u64,
    pub max_bytes_per_peer: u64,
    pub max_envelopes_per_ip_per_mailbox: u64,
    pub max_bytes_per_ip_per_mailbox: u64,
    pub max_envelopes_per_ip: u64,
    pub max_bytes_per_ip: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        let l = StoreLimits::default();
        let d = l.depositors;
        Self {
            mail_ttl_days: l.mail_ttl.as_secs() / 86_400,
            max_envelopes_per_mailbox: l.max_envelopes,
            max_bytes_per_mailbox: l.max_bytes,
            max_mailboxes: l.max_mailboxes,
            max_total_bytes: l.max_total_bytes,
            mailbox_expiry_days: l.mailbox_expiry.as_secs() / 86_400,
            sweep_interval_secs: 300,
            max_envelopes_per_peer_per_mailbox: d.peer_per_mailbox.envelopes,
            max_bytes_per_peer_per_mailbox: d.peer_per_mailbox.bytes,
            max_envelopes_per_peer: d.peer.envelopes,
            max_bytes_per_peer: d.peer.bytes,
            max_envelopes_per_ip_per_mailbox: d.ip_per_mailbox.envelopes,
            max_bytes_per_ip_per_mailbox: d.ip_per_mailbox.bytes,
            max_envelopes_per_ip: d.ip.envelopes,
            max_bytes_per_ip: d.ip.bytes,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Mailbox requests per second one peer may make, on average.
    pub requests_per_sec: f64,
    /// Mailbox requests one peer may make in a burst.
    pub request_burst: u32,
    pub max_connections: u32,
    pub max_connections_per_peer: u32,
    /// Established incoming connections one IP address (IPv6: its /64)
    /// may hold (0: no limit), see `weft_proto::ip_limits`.
    pub max_connections_per_ip: u32,
    /// Apply `max_connections_per_ip` to loopback too (off: local
    /// proxies, tools and tests share 127.0.0.1).
    pub limit_loopback_per_ip: bool,
    pub max_pending_incoming: u32,
    /// New connections are refused while the process uses more than this
    /// (MiB; 0: no limit).
    pub max_memory_mb: u64,
    pub idle_timeout_secs: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            requests_per_sec: 20.0,
            request_burst: 200,
            max_connections: 10_000,
            max_connections_per_peer: 4,
            max_connections_per_ip: 64,
            limit_loopback_per_ip: false,
            max_pending_incoming: 256,
            max_memory_mb: 1024,
            idle_timeout_secs: 600,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitRelayConfig {
    pub enabled: bool,
    pub max_reservations: usize,
    pub max_reservations_per_peer: usize,
    pub reservation_duration_secs: u64,
    pub max_circuits: usize,
    pub max_circuits_per_peer: usize,
    pub max_circuit_duration_secs: u64,
    pub max_circuit_bytes: u64,
}

impl Default for CircuitRelayConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_reservations: 1024,
            max_reservations_per_peer: 4,
            reservation_duration_secs: 3600,
            max_circuits: 256,
            max_circuits_per_peer: 4,
            max_circuit_duration_secs: 120,
            max_circuit_bytes: 128 * 1024,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutonatConfig {
    pub enabled: bool,
    pub only_global_ips: bool,
}

impl Default for AutonatConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            only_global_ips: true,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DhtConfig {
    /// Announce this relay in the DHT, so that nodes find it.
    pub advertise: bool,
    /// Peers (other relays, with `/p2p/`) to join the DHT through.
    pub bootstrap: Vec<String>,
}

impl Default for DhtConfig {
    fn default() -> Self {
        Self {
            advertise: true,
            bootstrap: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WakeupConfig {
    /// POST to UnifiedPush endpoints (live wakeups are always on).
    pub http: bool,
    pub min_interval_secs: u64,
    pub live_min_interval_ms: u64,
    pub max_per_sec: u32,
    pub timeout_secs: u64,
    pub concurrency: usize,
    pub allow_private_hosts: bool,
}

impl Default for WakeupConfig {
    fn default() -> Self {
        Self {
            http: true,
            min_interval_secs: 30,
            live_min_interval_ms: 1000,
            max_per_sec: 50,
            timeout_secs: 10,
            concurrency: 16,
            allow_private_hosts: false,
        }
    }
}

/// The whole configuration (the TOML file's shape).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: Vec<String>,
    pub external_addresses: Vec<String>,
    pub data: Option<PathBuf>,
    pub metrics: String,
    pub log_format: LogFormat,
    pub log_level: String,
    pub access: AccessConfig,
    pub storage: StorageConfig,
    pub limits: LimitsConfig,
    pub circuit_relay: CircuitRelayConfig,
    pub autonat: AutonatConfig,
    pub dht: DhtConfig,
    pub wakeup: WakeupConfig,
}

/// The relay's default TCP and QUIC port.
pub const DEFAULT_PORT: u16 = 4040;
/// The default metrics address (loopback only).
pub const DEFAULT_METRICS: &str = "127.0.0.1:9740";

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: vec![
                format!("/ip4/0.0.0.0/tcp/{DEFAULT_PORT}"),
                format!("/ip4/0.0.0.0/udp/{DEFAULT_PORT}/quic-v1"),
            ],
            external_addresses: Vec::new(),
            data: None,
            metrics: DEFAULT_METRICS.into(),
            log_format: LogFormat::Human,
            log_level: "info".into(),
            access: AccessConfig::default(),
            storage: StorageConfig::default(),
            limits: LimitsConfig::default(),
            circuit_relay: CircuitRelayConfig::default(),
            autonat: AutonatConfig::default(),
            dht: DhtConfig::default(),
            wakeup: WakeupConfig::default(),
        }
    }
}

/// What `weft-relay init-config` prints.
pub const EXAMPLE: &str = r#"# weft-relay configuration (TOML).
#
# Every key is optional: the values below are the defaults. Unknown keys
# are errors. Precedence: command-line flags > WEFT_RELAY_* environment
# variables > this file > defaults.

# libp2p listen addresses (env WEFT_RELAY_LISTEN, comma-separated;
# flag --listen, repeatable).
listen = ["/ip4/0.0.0.0/tcp/4040", "/ip4/0.0.0.0/udp/4040/quic-v1"]

# Addresses other peers reach this relay at, announced to them (circuit
# relay reservations carry them). Empty: the listen addresses are
# announced as they come up. Set this behind NAT or port forwarding,
# e.g. ["/dns4/relay.example.org/tcp/4040"]. (env WEFT_RELAY_EXTERNAL)
external_addresses = []

# Where the relay keeps relay.key (its identity) and relay.db.
# Default: $STATE_DIRECTORY (systemd), else the platform data directory.
# (env WEFT_RELAY_DATA, flag --data)
# data = "/var/lib/weft-relay"

# Address of the HTTP server for /metrics (Prometheus) and /healthz;
# "off" disables it. (env WEFT_RELAY_METRICS, flag --metrics)
metrics = "127.0.0.1:9740"

# "human" or "json". With "json" (or the --json flag) logs on stderr are
# JSON lines and the first stdout line is
# {"event":"ready","peer_id":...,"listen":[...]}. (env WEFT_RELAY_LOG_FORMAT)
log_format = "human"

# A tracing filter, e.g. "info" or "weft_relay=debug,info"; RUST_LOG
# overrides it. (env WEFT_RELAY_LOG_LEVEL)
log_level = "info"

[access]
# Who may register a mailbox: "open" (anyone), "allow-list" (devices
# certified by one of allow_users), "invite" (devices presenting one of
# invite_tokens when their mailbox is created). Depositing mail for a
# registered mailbox is always open; every envelope deposited must verify
# as a signed Weft envelope. (env WEFT_RELAY_ACCESS for the mode)
mode = "open"
# User ids (base58, as `weft id` prints them).
allow_users = []
invite_tokens = []

[storage]
# How long mail waits for its device before it is deleted unread.
mail_ttl_days = 14
# Per-mailbox quotas: a deposit that does not fit is refused whole, with
# a MailboxFull error to the sender.
max_envelopes_per_mailbox = 10000
max_bytes_per_mailbox = 67108864
# Most registered mailboxes.
max_mailboxes = 100000
# Most envelope bytes on this relay in all (0: no limit).
max_total_bytes = 10737418240
# A mailbox whose device has not registered, fetched or acknowledged for
# this long is removed with its mail.
mailbox_expiry_days = 90
# How often expired mail and mailboxes are swept.
sweep_interval_secs = 300
# Per-depositor quotas: what one depositor may have waiting here
# (deposited, and not yet fetched and acknowledged, or expired), so that
# one stranger cannot fill someone's mailbox or the relay. A depositor is
# counted as the peer id of the connection it deposits on and, since
# fresh peer ids cost nothing, also as the IP address it connects from
# (IPv6: its /64). A deposit over any of them is refused whole with a
# MailboxFull error naming the quota, and for the next second that
# depositor's deposits there are refused the same way without being
# verified. 0: no limit.
# One peer id, in one mailbox (a tenth of a mailbox) and in all (a device
# writing to a big group whose members are away deposits for each).
max_envelopes_per_peer_per_mailbox = 1000
max_bytes_per_peer_per_mailbox = 8388608
max_envelopes_per_peer = 50000
max_bytes_per_peer = 268435456
# One address, in one mailbox (a quarter of a mailbox: devices behind one
# NAT share it) and in all (a tenth of max_total_bytes).
max_envelopes_per_ip_per_mailbox = 2500
max_bytes_per_ip_per_mailbox = 16777216
max_envelopes_per_ip = 100000
max_bytes_per_ip = 1073741824

[limits]
# Per-peer token bucket for mailbox requests: refill rate and size. A
# peer over it gets RateLimited.
requests_per_sec = 20.0
request_burst = 200
# Connection limits.
max_connections = 10000
max_connections_per_peer = 4
max_pending_incoming = 256
# Established incoming connections one IP address may hold (IPv6: one
# /64), so that one machine cannot take every slot with fresh peer ids;
# past it a connection is refused as it arrives (a warning in the log,
# weft_relay_connections_refused_per_ip_total in the metrics). 64 leaves
# room for the devices of a household or an office behind one NAT.
# 0: no limit.
max_connections_per_ip = 64
# Loopback (127.0.0.0/8, ::1) is exempt unless this is true: a reverse
# proxy or tunnel on this host makes every device come from 127.0.0.1.
limit_loopback_per_ip = false
# New connections are refused while the relay's resident memory is over
# this many MiB (0: no limit).
max_memory_mb = 1024
# Idle connections are closed after this long.
idle_timeout_secs = 600

[circuit_relay]
# Circuit relay v2 (lets NATed peers be reached; they then try DCUtR hole
# punching). Circuits are short and small: for reaching a peer, not for
# carrying mail.
enabled = true
max_reservations = 1024
max_reservations_per_peer = 4
reservation_duration_secs = 3600
max_circuits = 256
max_circuits_per_peer = 4
max_circuit_duration_secs = 120
max_circuit_bytes = 131072

[autonat]
# Answer AutoNAT (v1 and v2) probes: tell peers whether they are
# reachable.
enabled = true
# Only dial back peers observed at global IP addresses.
only_global_ips = true

[dht]
# Kademlia (/weft/kad/1.0.0) runs in server mode: the relay is a bootstrap
# node. With advertise, it also announces itself as a relay in the DHT, so
# that nodes find it without being told its address. (env
# WEFT_RELAY_ADVERTISE = true or false)
advertise = true
# Other relays to join the DHT through (multiaddrs ending with /p2p/),
# so that a community's relays know each other. (env WEFT_RELAY_BOOTSTRAP,
# comma-separated)
bootstrap = []

[wakeup]
# POST a content-free wakeup to a device's UnifiedPush endpoint when mail
# arrives while it is not connected. (A connected device is told over its
# libp2p connection instead; that is always on.)
http = true
# At most one UnifiedPush wakeup per mailbox per this many seconds (more
# mail meanwhile is covered by one wakeup at the end of the interval).
min_interval_secs = 30
# The same for wakeups over a live connection.
live_min_interval_ms = 1000
# At most this many UnifiedPush POSTs per second in all.
max_per_sec = 50
timeout_secs = 10
# POSTs in flight at once.
concurrency = 16
# Allow endpoints on loopback, private or link-local addresses (off: a
# device cannot make the relay POST into the operator's network).
allow_private_hosts = false
"#;

/// Command-line values that override the environment and the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub listen: Vec<String>,
    pub data: Option<PathBuf>,
    pub metrics: Option<String>,
    pub json: bool,
}

fn split_list(value: &str) -> Vec<String> {
    value
        .split([',', ' ', '\n', '\t'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

impl Config {
    /// Parses a TOML file's text.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse(path.to_path_buf(), e.to_string()))
    }

    /// The configuration from defaults, the file (`--config` or
    /// `WEFT_RELAY_CONFIG`), the environment (`env`) and the flags, each
    /// overriding the one before; then checked.
    pub fn load(
        flags: &Overrides,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let path = flags
            .config
            .clone()
            .or_else(|| env("WEFT_RELAY_CONFIG").map(PathBuf::from));
        let mut config = match &path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError::Read(path.clone(), e))?;
                Config::from_toml(&text, path)?
            }
            None => Config::default(),
        };
        config.apply_env(&env)?;
        config.apply_flags(flags);
        config.check()?;
        Ok(config)
    }

    fn apply_env(&mut self, env: &impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = env("WEFT_RELAY_LISTEN") {
            self.listen = split_list(&v);
        }
        if let Some(v) = env("WEFT_RELAY_EXTERNAL") {
            self.external_addresses = split_list(&v);
        }
        if let Some(v) = env("WEFT_RELAY_BOOTSTRAP") {
            self.dht.bootstrap = split_list(&v);
        }
        if let Some(v) = env("WEFT_RELAY_ADVERTISE") {
            self.dht.advertise = match v.as_str() {
                "true" => true,
                "false" => false,
                _ => return Err(invalid("WEFT_RELAY_ADVERTISE", "true or false")),
            };
        }
        if let Some(v) = env("WEFT_RELAY_DATA") {
            self.data = Some(PathBuf::from(v));
        }
        if let Some(v) = env("WEFT_RELAY_METRICS") {
            self.metrics = v;
        }
        if let Some(v) = env("WEFT_RELAY_LOG_FORMAT") {
            self.log_format = match v.as_str() {
                "human" => LogFormat::Human,
                "json" => LogFormat::Json,
                _ => return Err(invalid("WEFT_RELAY_LOG_FORMAT", "human or json")),
            };
        }
        if let Some(v) = env("WEFT_RELAY_LOG_LEVEL") {
            self.log_level = v;
        }
        if let Some(v) = env("WEFT_RELAY_ACCESS") {
            self.access.mode = match v.as_str() {
                "open" => AccessMode::Open,
                "allow-list" => AccessMode::AllowList,
                "invite" => AccessMode::Invite,
                _ => {
                    return Err(invalid("WEFT_RELAY_ACCESS", "open, allow-list or invite"));
                }
            };
        }
        Ok(())
    }

    fn apply_flags(&mut self, flags: &Overrides) {
        if !flags.listen.is_empty() {
            self.listen = flags.listen.clone();
        }
        if let Some(data) = &flags.data {
            self.data = Some(data.clone());
        }
        if let Some(metrics) = &flags.metrics {
            self.metrics = metrics.clone();
        }
        if flags.json {
            self.log_format = LogFormat::Json;
        }
    }

    /// Checks every value that can be wrong.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.listen_addrs()?;
        self.external_addrs()?;
        self.bootstrap_addrs()?;
        self.metrics_addr()?;
        self.access()?;
        if self.listen.is_empty() {
            return Err(invalid("listen", "at least one address is needed"));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            return Err(invalid("log_level", format!("{:?}: {e}", self.log_level)));
        }
        let s = &self.storage;
        if s.mail_ttl_days == 0 || s.mailbox_expiry_days == 0 || s.sweep_interval_secs == 0 {
            return Err(invalid(
                "storage",
                "mail_ttl_days, mailbox_expiry_days and sweep_interval_secs must be positive",
            ));
        }
        if s.max_envelopes_per_mailbox == 0 || s.max_bytes_per_mailbox == 0 {
            return Err(invalid("storage", "mailbox quotas must be positive"));
        }
        let l = &self.limits;
        if !(l.requests_per_sec.is_finite() && l.requests_per_sec > 0.0) || l.request_burst == 0 {
            return Err(invalid(
                "limits",
                "requests_per_sec and request_burst must be positive",
            ));
        }
        let w = &self.wakeup;
        if w.max_per_sec == 0 || w.concurrency == 0 || w.timeout_secs == 0 {
            return Err(invalid(
                "wakeup",
                "max_per_sec, concurrency and timeout_secs must be positive",
            ));
        }
        Ok(())
    }

    pub fn json(&self) -> bool {
        self.log_format == LogFormat::Json
    }

    pub fn listen_addrs(&self) -> Result<Vec<Multiaddr>, ConfigError> {
        parse_addrs("listen", &self.listen)
    }

    pub fn external_addrs(&self) -> Result<Vec<Multiaddr>, ConfigError> {
        parse_addrs("external_addresses", &self.external_addresses)
    }

    /// The DHT bootstrap peers, each with its peer id.
    pub fn bootstrap_addrs(&self) -> Result<Vec<(libp2p::PeerId, Multiaddr)>, ConfigError> {
        parse_addrs("dht.bootstrap", &self.dht.bootstrap)?
            .into_iter()
            .map(|addr| match addr.iter().last() {
                Some(libp2p::multiaddr::Protocol::P2p(peer)) => Ok((peer, addr)),
                _ => Err(invalid(
                    "dht.bootstrap",
                    format!("{addr} does not end with /p2p/<peer id>"),
                )),
            })
            .collect()
    }

    /// The metrics address, or `None` when off.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        let m = self.metrics.trim();
        if m.is_empty() || m == "off" {
            return Ok(None);
        }
        m.parse()
            .map(Some)
            .map_err(|e| invalid("metrics", format!("{m:?}: {e} (want IP:PORT or \"off\")")))
    }

    /// The data directory: configured, else `$STATE_DIRECTORY`, else the
    /// platform's data directory for weft-relay.
    pub fn data_dir(&self, env: impl Fn(&str) -> Option<String>) -> PathBuf {
        if let Some(d) = &self.data {
            return d.clone();
        }
        if let Some(d) = env("STATE_DIRECTORY")
            && let Some(first) = d.split(':').next()
            && !first.is_empty()
        {
            return PathBuf::from(first);
        }
        directories::ProjectDirs::from("", "", "weft-relay")
            .map(|p| p.data_dir().to_path_buf())
            .unwrap_or_else(|| PathBuf::from("weft-relay-data"))
    }

    /// Who may register.
    pub fn access(&self) -> Result<Access, ConfigError> {
        Ok(match self.access.mode {
            AccessMode::Open => Access::Open,
            AccessMode::AllowList => {
                let mut users = HashSet::new();
                for u in &self.access.allow_users {
                    let id: UserId = u
                        .parse()
                        .map_err(|e| invalid("access.allow_users", format!("{u:?}: {e}")))?;
                    users.insert(id);
                }
                Access::AllowList(users)
            }
            AccessMode::Invite => {
                if self.access.invite_tokens.iter().any(|t| t.is_empty()) {
                    return Err(invalid("access.invite_tokens", "empty token"));
                }
                Access::Invite(self.access.invite_tokens.iter().cloned().collect())
            }
        })
    }

    pub fn store_limits(&self) -> StoreLimits {
        let s = &self.storage;
        StoreLimits {
            max_envelopes: s.max_envelopes_per_mailbox,
            max_bytes: s.max_bytes_per_mailbox,
            max_mailboxes: s.max_mailboxes,
            max_total_bytes: s.max_total_bytes,
            mail_ttl: Duration::from_secs(s.mail_ttl_days.saturating_mul(86_400)),
            mailbox_expiry: Duration::from_secs(s.mailbox_expiry_days.saturating_mul(86_400)),
            depositors: DepositorQuotas {
                peer_per_mailbox: Quota {
                    envelopes: s.max_envelopes_per_peer_per_mailbox,
                    bytes: s.max_bytes_per_peer_per_mailbox,
                },
                peer: Quota {
                    envelopes: s.max_envelopes_per_peer,
                    bytes: s.max_bytes_per_peer,
                },
                ip_per_mailbox: Quota {
                    envelopes: s.max_envelopes_per_ip_per_mailbox,
                    bytes: s.max_bytes_per_ip_per_mailbox,
                },
                ip: Quota {
                    envelopes: s.max_envelopes_per_ip,
                    bytes: s.max_bytes_per_ip,
                },
            },
        }
    }
}

fn parse_addrs(key: &'static str, addrs: &[String]) -> Result<Vec<Multiaddr>, ConfigError> {
    addrs
        .iter()
        .map(|a| {
            a.parse::<Multiaddr>()
                .map_err(|e| invalid(key, format!("{a:?}: {e}")))
        })
        .collect()
}

/// Who may register a mailbox, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    Open,
    AllowList(HashSet<UserId>),
    Invite(HashSet<String>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn the_example_is_the_defaults() {
        let parsed = Config::from_toml(EXAMPLE, Path::new("example")).unwrap();
        assert_eq!(parsed, Config::default());
        parsed.check().unwrap();
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = Config::from_toml("listn = []\n", Path::new("x")).unwrap_err();
        assert!(err.to_string().contains("listn"), "{err}");
        let err = Config::from_toml("[storage]\nttl = 3\n", Path::new("x")).unwrap_err();
        assert!(err.to_string().contains("ttl"), "{err}");
    }

    #[test]
    fn flags_beat_env_beat_file_beat_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relay.toml");
        std::fs::write(
            &file,
            "listen = [\"/ip4/127.0.0.1/tcp/1\"]\nmetrics = \"127.0.0.1:1\"\n\
             data = \"/file\"\nlog_level = \"debug\"\n[storage]\nmail_ttl_days = 3\n",
        )
        .unwrap();
        let flags = Overrides {
            config: Some(file.clone()),
            ..Overrides::default()
        };
        // File over defaults.
        let c = Config::load(&flags, env_of(&[])).unwrap();
        assert_eq!(c.listen, vec!["/ip4/127.0.0.1/tcp/1"]);
        assert_eq!(c.storage.mail_ttl_days, 3);
        assert_eq!(c.limits, LimitsConfig::default());
        // Env over file.
        let env = env_of(&[
            (
                "WEFT_RELAY_LISTEN",
                "/ip4/127.0.0.1/tcp/2,/ip4/127.0.0.1/tcp/3",
            ),
            ("WEFT_RELAY_METRICS", "off"),
            ("WEFT_RELAY_DATA", "/env"),
        ]);
        let c = Config::load(&flags, &env).unwrap();
        assert_eq!(
            c.listen,
            vec!["/ip4/127.0.0.1/tcp/2", "/ip4/127.0.0.1/tcp/3"]
        );
        assert_eq!(c.metrics_addr().unwrap(), None);
        assert_eq!(c.data, Some(PathBuf::from("/env")));
        assert_eq!(c.log_level, "debug");
        // Flags over env.
        let flags = Overrides {
            config: Some(file),
            listen: vec!["/ip4/127.0.0.1/tcp/4".into()],
            data: Some("/flag".into()),
            metrics: Some("127.0.0.1:0".into()),
            json: true,
        };
        let c = Config::load(&flags, &env).unwrap();
        assert_eq!(c.listen, vec!["/ip4/127.0.0.1/tcp/4"]);
        assert_eq!(c.data, Some(PathBuf::from("/flag")));
        assert_eq!(c.metrics, "127.0.0.1:0");
        assert!(c.json());
        // The config file may come from the environment too.
        let c = Config::load(&Overrides::default(), env_of(&[])).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn bad_values_are_refused_with_their_key() {
        let bad = |toml: &str| {
            let c = Config::from_toml(toml, Path::new("x")).unwrap();
            c.check().unwrap_err().to_string()
        };
        assert!(bad("listen = [\"nonsense\"]").contains("listen"));
        assert!(bad("metrics = \"localhost\"").contains("metrics"));
        assert!(
            bad("[access]\nmode = \"allow-list\"\nallow_users = [\"x\"]").contains("allow_users")
        );
        assert!(bad("[limits]\nrequests_per_sec = 0.0").contains("limits"));
        assert!(bad("log_level = \"=\"").contains("log_level"));
        let err = Config::from_toml("[access]\nmode = \"closed\"", Path::new("x")).unwrap_err();
        assert!(err.to_string().contains("closed"), "{err}");
    }

    #[test]
    fn data_dir_prefers_config_then_systemd_state_directory() {
        let mut c = Config::default();
        let env = env_of(&[("STATE_DIRECTORY", "/var/lib/weft-relay")]);
        assert_eq!(c.data_dir(&env), PathBuf::from("/var/lib/weft-relay"));
        c.data = Some("/d".into());
        assert_eq!(c.data_dir(&env), PathBuf::from("/d"));
    }
}
