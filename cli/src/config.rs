//! `config.toml` in the home: the node's timings and limits. Every key is
//! optional and the file itself too (then all defaults apply); an unknown
//! key or a bad value is an error naming the file and the key, so a typo
//! never silently leaves a default in place.
//!
//! ```toml
//! [presence]
//! heartbeat_secs = 30          # presence heartbeats to connected contacts
//! typing_secs = 5              # how long a typing indicator lasts
//!
//! [outbox]
//! expiry_days = 30             # give up on unacknowledged messages after
//! retry_base_secs = 2          # first retry delay (doubles each time)
//! retry_max_secs = 600         # longest retry delay
//!
//! [sync]
//! interval_secs = 60           # how often conversations are compared
//!
//! [receipts]
//! read_receipts_max_group = 256  # larger groups send no read receipts
//!
//! [keys]
//! skipped_key_max_age_days = 30  # how long the key of a message that has
//!                                # not arrived (or came out of order) is
//!                                # kept; then it can no longer be read
//! handout_key_rotation_days = 7  # how often this device's handout key
//!                                # (what key handouts are sealed to) is
//!                                # replaced; a replaced one is erased
//!                                # skipped_key_max_age_days later
//! one_time_keys = 4              # one-time handout keys kept issued to
//!                                # each device this one talks with (0 to
//!                                # 16; 0: handouts use the handout key)
//!
//! [relays]
//! target = 2                   # relays to use; more are looked for in the
//!                              # DHT while fewer are configured (0: never)
//! ```

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde::Deserialize;
use weft_node::node::Settings;

/// The file's name in the home.
pub const FILE_NAME: &str = "config.toml";

/// Longest accepted duration setting: a year (keeps timer arithmetic far
/// from overflowing).
const MAX_SECS: u64 = 365 * 24 * 3600;
const MAX_DAYS: u64 = 3650;

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FileConfig {
    presence: PresenceSection,
    outbox: OutboxSection,
    sync: SyncSection,
    receipts: ReceiptsSection,
    keys: KeysSection,
    relays: RelaysSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct KeysSection {
    skipped_key_max_age_days: Option<u64>,
    handout_key_rotation_days: Option<u64>,
    one_time_keys: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RelaysSection {
    target: Option<usize>,
}

/// Most relays a device may aim for (each holds a reservation and a
/// mailbox).
const MAX_RELAY_TARGET: usize = 8;

/// What `config.toml` sets.
#[derive(Clone, Debug)]
pub struct FileSettings {
    pub node: Settings,
    /// Relays to use in all (see `NetConfig::relay_target`).
    pub relay_target: usize,
}

impl Default for FileSettings {
    fn default() -> Self {
        Self {
            node: Settings::default(),
            relay_target: weft_node::NetConfig::new(Vec::new()).relay_target,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PresenceSection {
    heartbeat_secs: Option<u64>,
    typing_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct OutboxSection {
    expiry_days: Option<u64>,
    retry_base_secs: Option<u64>,
    retry_max_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct SyncSection {
    interval_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ReceiptsSection {
    read_receipts_max_group: Option<usize>,
}

/// The settings of the node in `home`: `home/config.toml` applied over the
/// defaults, or the defaults if there is no such file.
pub fn load(home: &Path) -> anyhow::Result<FileSettings> {
    let path = home.join(FILE_NAME);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Ok(FileSettings::default());
        }
        Err(err) => {
            return Err(err).with_context(|| format!("could not read {}", path.display()));
        }
    };
    parse(&text).with_context(|| format!("invalid configuration in {}", path.display()))
}

/// The settings a `config.toml` text describes.
pub fn parse(text: &str) -> anyhow::Result<FileSettings> {
    let file: FileConfig = toml::from_str(text).map_err(|err| anyhow!(describe(&err, text)))?;
    let mut s = Settings::default();
    let secs = |key: &str, value: Option<u64>, default: Duration| -> anyhow::Result<Duration> {
        match value {
            None => Ok(default),
            Some(v) if (1..=MAX_SECS).contains(&v) => Ok(Duration::from_secs(v)),
            Some(v) => bail!("{key} = {v}: must be between 1 and {MAX_SECS} seconds"),
        }
    };
    s.heartbeat = secs(
        "presence.heartbeat_secs",
        file.presence.heartbeat_secs,
        s.heartbeat,
    )?;
    s.typing_ttl = secs(
        "presence.typing_secs",
        file.presence.typing_secs,
        s.typing_ttl,
    )?;
    if let Some(days) = file.outbox.expiry_days {
        if !(1..=MAX_DAYS).contains(&days) {
            bail!("outbox.expiry_days = {days}: must be between 1 and {MAX_DAYS} days");
        }
        s.outbox_expiry = Duration::from_secs(days * 24 * 3600);
    }
    s.retry_base = secs(
        "outbox.retry_base_secs",
        file.outbox.retry_base_secs,
        s.retry_base,
    )?;
    s.retry_max = secs(
        "outbox.retry_max_secs",
        file.outbox.retry_max_secs,
        s.retry_max,
    )?;
    if s.retry_base > s.retry_max {
        bail!(
            "outbox.retry_base_secs ({}) must not exceed outbox.retry_max_secs ({}{})",
            s.retry_base.as_secs(),
            s.retry_max.as_secs(),
            if file.outbox.retry_max_secs.is_none() {
                ", the default"
            } else {
                ""
            }
        );
    }
    s.sync_interval = secs(
        "sync.interval_secs",
        file.sync.interval_secs,
        s.sync_interval,
    )?;
    if let Some(max) = file.receipts.read_receipts_max_group {
        s.read_receipts_max_group = max;
    }
    if let Some(days) = file.keys.skipped_key_max_age_days {
        if !(1..=MAX_DAYS).contains(&days) {
            bail!("keys.skipped_key_max_age_days = {days}: must be between 1 and {MAX_DAYS} days");
        }
        s.skipped_key_max_age = Duration::from_secs(days * 24 * 3600);
    }
    if let Some(days) = file.keys.handout_key_rotation_days {
        if !(1..=MAX_DAYS).contains(&days) {
            bail!("keys.handout_key_rotation_days = {days}: must be between 1 and {MAX_DAYS} days");
        }
        s.handout_key_rotation = Duration::from_secs(days * 24 * 3600);
    }
    if let Some(n) = file.keys.one_time_keys {
        let most = weft_node::identity::MAX_ONE_TIME_KEYS;
        if n > most {
            bail!("keys.one_time_keys = {n}: must be between 0 and {most}");
        }
        s.one_time_keys = n;
    }
    let mut out = FileSettings {
        node: s,
        ..FileSettings::default()
    };
    if let Some(target) = file.relays.target {
        if target > MAX_RELAY_TARGET {
            bail!("relays.target = {target}: must be at most {MAX_RELAY_TARGET}");
        }
        out.relay_target = target;
    }
    Ok(out)
}

/// A TOML or schema error as one message: what is wrong, and where (line
/// and, when the error points into a table, the dotted key).
fn describe(err: &toml::de::Error, text: &str) -> String {
    let message = err.message().trim_end();
    let Some(span) = err.span() else {
        return message.to_string();
    };
    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
    match key_at(text, span.start) {
        Some(key) => format!("{key} (line {line}): {message}"),
        None => format!("line {line}: {message}"),
    }
}

/// The dotted key whose `key = value` line holds byte `at`, with the
/// `[table]` it is in: a best effort for error messages.
fn key_at(text: &str, at: usize) -> Option<String> {
    let mut table = String::new();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let end = offset + line.len();
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            table = trimmed
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or_default()
                .trim()
                .to_string();
            if (offset..end).contains(&at) {
                return Some(table);
            }
        } else if (offset..end).contains(&at) {
            let key = trimmed.split('=').next()?.trim();
            if key.is_empty() || key.starts_with('#') {
                return None;
            }
            return Some(if table.is_empty() {
                key.to_string()
            } else {
                format!("{table}.{key}")
            });
        }
        offset = end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_defaults() -> anyhow::Result<()> {
        let s = parse("")?.node;
        let d = Settings::default();
        assert_eq!(s.heartbeat, d.heartbeat);
        assert_eq!(s.read_receipts_max_group, d.read_receipts_max_group);
        assert_eq!(s.skipped_key_max_age, Duration::from_secs(30 * 24 * 3600));
        Ok(())
    }

    #[test]
    fn good_file() -> anyhow::Result<()> {
        let s = parse(
            "# timings\n[presence]\nheartbeat_secs = 10\ntyping_secs = 3\n\n[outbox]\n\
             expiry_days = 7\nretry_base_secs = 1\nretry_max_secs = 120\n\n[sync]\n\
             interval_secs = 15\n\n[receipts]\nread_receipts_max_group = 50\n\n\
             [keys]\nskipped_key_max_age_days = 9\nhandout_key_rotation_days = 2\n\
             one_time_keys = 0\n\n\
             [relays]\ntarget = 3\n",
        )?;
        assert_eq!(s.relay_target, 3);
        let s = s.node;
        assert_eq!(s.heartbeat, Duration::from_secs(10));
        assert_eq!(s.typing_ttl, Duration::from_secs(3));
        assert_eq!(s.outbox_expiry, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(s.retry_base, Duration::from_secs(1));
        assert_eq!(s.retry_max, Duration::from_secs(120));
        assert_eq!(s.sync_interval, Duration::from_secs(15));
        assert_eq!(s.read_receipts_max_group, 50);
        assert_eq!(s.skipped_key_max_age, Duration::from_secs(9 * 24 * 3600));
        assert_eq!(s.handout_key_rotation, Duration::from_secs(2 * 24 * 3600));
        assert_eq!(s.one_time_keys, 0);
        Ok(())
    }

    #[test]
    fn partial_file_keeps_other_defaults() -> anyhow::Result<()> {
        let s = parse("[sync]\ninterval_secs = 5\n")?.node;
        assert_eq!(s.sync_interval, Duration::from_secs(5));
        assert_eq!(s.heartbeat, Settings::default().heartbeat);
        Ok(())
    }

    fn error(text: &str) -> String {
        match parse(text) {
            Ok(s) => panic!("accepted {text:?}: {:?}", s.node),
            Err(err) => format!("{err:#}"),
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = error("[presence]\nheartbeat_sec = 10\n");
        assert!(err.contains("heartbeat_sec"), "{err}");
        assert!(err.contains("line 2"), "{err}");
        let err = error("[presense]\nheartbeat_secs = 10\n");
        assert!(err.contains("presense"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let err = error("[outbox]\nretry_max_secs = \"ten\"\n");
        assert!(err.contains("outbox.retry_max_secs"), "{err}");
        let err = error("[presence]\nheartbeat_secs = -1\n");
        assert!(err.contains("presence.heartbeat_secs"), "{err}");
        let err = error("[presence]\nheartbeat_secs = 0\n");
        assert!(err.contains("presence.heartbeat_secs"), "{err}");
        let err = error("[outbox]\nretry_base_secs = 900\n");
        assert!(err.contains("retry_base_secs"), "{err}");
        let err = error("[keys]\nskipped_key_max_age_days = 0\n");
        assert!(err.contains("keys.skipped_key_max_age_days"), "{err}");
        let err = error("[keys]\nhandout_key_rotation_days = 0\n");
        assert!(err.contains("keys.handout_key_rotation_days"), "{err}");
        let err = error("[keys]\none_time_keys = 17\n");
        assert!(err.contains("keys.one_time_keys"), "{err}");
        let err = error("[relays]\ntarget = 9\n");
        assert!(err.contains("relays.target"), "{err}");
        let err = error("[sync\ninterval_secs = 1\n");
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn missing_file_is_the_defaults() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let s = load(dir.path())?;
        assert_eq!(s.node.sync_interval, Settings::default().sync_interval);
        std::fs::write(dir.path().join(FILE_NAME), "[sync]\nbogus = 1\n")?;
        let err = format!(
            "{:#}",
            load(dir.path()).err().unwrap_or_else(|| anyhow!(""))
        );
        assert!(
            err.contains(FILE_NAME) && err.contains("sync.bogus"),
            "{err}"
        );
        Ok(())
    }
}
