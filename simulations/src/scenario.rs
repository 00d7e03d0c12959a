//! The scenario file (TOML): what a run simulates, how it is read and
//! checked, and the built-in scenarios. Unknown keys are refused by name
//! (`scenario.toml: unknown key "workload.rate_per_sec"`); sections that
//! later increments will implement (link model, churn, partitions,
//! relays) are refused by name too, never silently ignored.

use serde::Deserialize;

use crate::SimError;

/// A whole scenario.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// A short name (defaults to the file's stem).
    #[serde(default)]
    pub name: Option<String>,
    /// One line saying what the scenario is for.
    #[serde(default)]
    pub description: Option<String>,
    /// Seeds identities, topology, conversations and the workload.
    #[serde(default)]
    pub seed: u64,
    /// How long the workload sends, in seconds.
    pub duration_secs: u64,
    /// How long after the last send the run waits for deliveries to
    /// finish before it stops counting.
    #[serde(default = "default_drain_secs")]
    pub drain_secs: u64,
    pub nodes: Nodes,
    #[serde(default)]
    pub conversations: Vec<Conversations>,
    pub workload: Workload,
}

fn default_drain_secs() -> u64 {
    30
}

/// `[nodes]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nodes {
    /// Accounts (users); each runs `devices_per_account` nodes.
    pub accounts: usize,
    /// Only 1 in this increment.
    #[serde(default = "one")]
    pub devices_per_account: usize,
}

fn one() -> usize {
    1
}

/// `[[conversations]]`: `count` conversations of one `kind`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conversations {
    pub kind: ConversationKind,
    /// How many such conversations (distinct account pairs for `direct`).
    #[serde(default = "one")]
    pub count: usize,
    /// Members of each group, its creator included (`group` only).
    #[serde(default)]
    pub size: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConversationKind {
    Direct,
    Group,
}

/// `[workload]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Messages per second each sender sends (a sender: every account in
    /// at least one conversation), each to one of its conversations
    /// picked at random.
    pub messages_per_sec: f64,
    /// Size of each message's text in bytes.
    #[serde(default = "default_message_bytes")]
    pub message_bytes: usize,
    /// Whether each recipient marks a conversation read when a message
    /// arrives (sends read receipts).
    #[serde(default)]
    pub read_receipts: bool,
}

fn default_message_bytes() -> usize {
    100
}

/// Known keys, per table, for the error that names an unknown one.
const TOP: &[&str] = &[
    "name",
    "description",
    "seed",
    "duration_secs",
    "drain_secs",
    "nodes",
    "conversations",
    "workload",
];
const NODES: &[&str] = &["accounts", "devices_per_account"];
const CONVERSATIONS: &[&str] = &["kind", "count", "size"];
const WORKLOAD: &[&str] = &["messages_per_sec", "message_bytes", "read_receipts"];
/// Sections of the scenario format that later increments build.
pub const NOT_YET: &[&str] = &["link", "churn", "partitions", "relays"];

/// Built-in scenarios: name, one-line description, TOML text.
pub const BUILT_IN: &[(&str, &str, &str)] = &[(
    "lan-10",
    "10 nodes on a LAN (memory transport), 4 direct pairs and a group of 5, 20 s (CI smoke)",
    include_str!("../scenarios/lan-10.toml"),
)];

impl Scenario {
    /// Reads a scenario's text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Scenario, SimError> {
        let bad = |message: String| SimError::Scenario {
            file: file.to_string(),
            message,
        };
        let table: toml::Table = toml::from_str(text).map_err(|e| bad(toml_message(&e)))?;
        check_keys(&table).map_err(bad)?;
        let scenario: Scenario = toml::from_str(text).map_err(|e| bad(toml_message(&e)))?;
        scenario.validate().map_err(bad)?;
        Ok(scenario)
    }

    /// A built-in scenario by name.
    pub fn built_in(name: &str) -> Option<Result<Scenario, SimError>> {
        BUILT_IN
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(n, _, text)| Scenario::parse(n, text))
    }

    fn validate(&self) -> Result<(), String> {
        if self.nodes.accounts < 2 {
            return Err("\"nodes.accounts\" must be at least 2".into());
        }
        if self.nodes.devices_per_account != 1 {
            return Err(
                "\"nodes.devices_per_account\" other than 1 is not supported yet (linked devices come in a later increment)"
                    .into(),
            );
        }
        if self.duration_secs == 0 {
            return Err("\"duration_secs\" must be at least 1".into());
        }
        let rate = self.workload.messages_per_sec;
        if !(rate.is_finite() && rate > 0.0 && rate <= 1000.0) {
            return Err("\"workload.messages_per_sec\" must be above 0 and at most 1000".into());
        }
        if self.workload.message_bytes == 0 || self.workload.message_bytes > 60_000 {
            return Err("\"workload.message_bytes\" must be between 1 and 60000".into());
        }
        let accounts = self.nodes.accounts;
        for (i, c) in self.conversations.iter().enumerate() {
            match (c.kind, c.size) {
                (ConversationKind::Direct, Some(_)) => {
                    return Err(format!(
                        "\"conversations[{i}].size\" is only for kind = \"group\""
                    ));
                }
                (ConversationKind::Direct, None) => {
                    let pairs = accounts * (accounts - 1) / 2;
                    let wanted: usize = self
                        .conversations
                        .iter()
                        .filter(|c| c.kind == ConversationKind::Direct)
                        .map(|c| c.count)
                        .sum();
                    if wanted > pairs {
                        return Err(format!(
                            "\"conversations[{i}].count\": {wanted} direct pairs in all, but {accounts} accounts make only {pairs}"
                        ));
                    }
                }
                (ConversationKind::Group, None) => {
                    return Err(format!(
                        "\"conversations[{i}].size\" is missing (a group's members, its creator included)"
                    ));
                }
                (ConversationKind::Group, Some(size)) => {
                    if size < 2 || size > accounts {
                        return Err(format!(
                            "\"conversations[{i}].size\" must be between 2 and nodes.accounts ({accounts})"
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// toml's message, on one line, with where it is.
fn toml_message(e: &toml::de::Error) -> String {
    e.to_string().trim().replace('\n', "\n  ")
}

/// Refuses unknown keys and sections not built yet, naming the key.
fn check_keys(table: &toml::Table) -> Result<(), String> {
    for (key, value) in table {
        if NOT_YET.contains(&key.as_str()) {
            return Err(format!(
                "\"{key}\" is not supported yet (a later increment of weft-sim builds it); remove the section to run"
            ));
        }
        if !TOP.contains(&key.as_str()) {
            return Err(format!("unknown key \"{key}\""));
        }
        match (key.as_str(), value) {
            ("nodes", toml::Value::Table(t)) => known(t, "nodes", NODES)?,
            ("workload", toml::Value::Table(t)) => known(t, "workload", WORKLOAD)?,
            ("conversations", toml::Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    if let toml::Value::Table(t) = item {
                        known(t, &format!("conversations[{i}]"), CONVERSATIONS)?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn known(table: &toml::Table, path: &str, keys: &[&str]) -> Result<(), String> {
    match table.keys().find(|k| !keys.contains(&k.as_str())) {
        Some(k) => Err(format!("unknown key \"{path}.{k}\"")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const GOOD: &str = r#"
seed = 7
duration_secs = 5
[nodes]
accounts = 4
[[conversations]]
kind = "direct"
count = 2
[[conversations]]
kind = "group"
size = 3
[workload]
messages_per_sec = 0.5
message_bytes = 64
read_receipts = true
"#;

    fn error(text: &str) -> String {
        Scenario::parse("scenario.toml", text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_good_file_is_read() {
        let s = Scenario::parse("scenario.toml", GOOD).unwrap();
        assert_eq!(s.seed, 7);
        assert_eq!(s.nodes.accounts, 4);
        assert_eq!(s.nodes.devices_per_account, 1);
        assert_eq!(s.conversations.len(), 2);
        assert_eq!(s.conversations[1].size, Some(3));
        assert!(s.workload.read_receipts);
        assert_eq!(s.drain_secs, 30);
    }

    #[test]
    fn an_unknown_key_is_named() {
        let text = GOOD.replace("message_bytes = 64", "rate_per_sec = 3");
        let e = error(&text);
        assert_eq!(e, "scenario.toml: unknown key \"workload.rate_per_sec\"");
        let e = error(&format!("colour = 1\n{GOOD}"));
        assert!(e.contains("unknown key \"colour\""), "{e}");
        let e = error(&GOOD.replace("count = 2", "count = 2\npairs = 1"));
        assert!(e.contains("unknown key \"conversations[0].pairs\""), "{e}");
    }

    #[test]
    fn sections_not_built_yet_are_named() {
        for section in NOT_YET {
            let e = error(&format!("{GOOD}\n[{section}]\nx = 1\n"));
            assert!(e.starts_with("scenario.toml: "), "{e}");
            assert!(
                e.contains(&format!("\"{section}\" is not supported yet")),
                "{e}"
            );
        }
        let e = error(&GOOD.replace("accounts = 4", "accounts = 4\ndevices_per_account = 2"));
        assert!(e.contains("nodes.devices_per_account"), "{e}");
    }

    #[test]
    fn bad_values_are_named_with_the_file() {
        let e = error(&GOOD.replace("accounts = 4", "accounts = \"four\""));
        assert!(e.starts_with("scenario.toml: "), "{e}");
        let e = error(&GOOD.replace("size = 3", "size = 9"));
        assert!(e.contains("conversations[1].size"), "{e}");
        let e = error("duration_secs = [");
        assert!(e.starts_with("scenario.toml: "), "{e}");
    }

    #[test]
    fn built_ins_parse() {
        for (name, _, _) in BUILT_IN {
            Scenario::built_in(name).unwrap().unwrap();
        }
        assert!(Scenario::built_in("nope").is_none());
    }
}
