//! The command line of `weft`: clap definitions of the global options and
//! of every command. The names, flags and meanings follow the contract in
//! `shared/spec/cli.md`; this module only describes them, `commands` runs
//! them.

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand};

/// Weft: a peer-to-peer, end-to-end encrypted mesh messenger.
///
/// Run `weft init --name NAME` once, then `weft daemon` to go online. Other
/// commands talk to the running daemon, or work on local state when none
/// runs (`send` then queues the message until the daemon is up).
#[derive(Debug, Parser)]
#[command(name = "weft", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,

    #[command(subcommand)]
    pub command: Command,
}

/// Options every command accepts.
#[derive(Debug, Args)]
pub struct Global {
    /// Where this node keeps its keys, database and control socket.
    /// [default: the platform data directory]
    #[arg(long, env = "WEFT_HOME", global = true, value_name = "DIR")]
    pub home: Option<PathBuf>,

    /// Machine-readable output: one JSON value, or one JSON object per line
    /// for streams.
    #[arg(long, global = true)]
    pub json: bool,

    /// More log output on stderr (repeat for more); RUST_LOG overrides.
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,

    /// Less log output on stderr (repeat for none).
    #[arg(short, long, action = ArgAction::Count, global = true, conflicts_with = "verbose")]
    pub quiet: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create this device's identity (refuses if one exists).
    Init(InitArgs),

    /// Print this device's ids and the invite others feed to `contact add`.
    Id,

    /// Run the node in the foreground until SIGINT or SIGTERM.
    Daemon(DaemonArgs),

    /// Print the node's peer id, listen addresses, peers and relays.
    Status,

    /// Manage contacts.
    #[command(subcommand)]
    Contact(ContactCommand),

    /// Send a text message to a contact or a group.
    Send(SendArgs),

    /// Manage groups.
    #[command(subcommand)]
    Group(GroupCommand),

    /// List conversations.
    Conversations,

    /// Print the messages of a conversation, oldest first.
    Messages(MessagesArgs),

    /// Replace the text of one of your messages, for everyone.
    Edit {
        /// The message id (`weft messages TARGET --json` shows ids).
        id: String,
        /// The new text.
        text: String,
    },

    /// Delete a message for everyone: yours, or any in a group you
    /// administer. Its text is removed from every device; a tombstone stays.
    Delete {
        /// The message id.
        id: String,
    },

    /// React to a message with an emoji (again with --remove to take it back).
    React {
        /// The message id.
        id: String,
        /// One emoji (at most 32 bytes).
        emoji: String,
        /// Take the reaction back.
        #[arg(long)]
        remove: bool,
    },

    /// Mark a conversation read and send read receipts.
    Read {
        /// Contact alias, group name, user id or conversation id.
        target: String,
    },

    /// Whether a contact is online, and when they were last seen.
    Presence {
        /// Contact alias or user id.
        target: String,
    },

    /// Tell a conversation's members that you are typing (or, with
    /// `--stop`, that you stopped).
    Typing(TypingArgs),

    /// Show who sees your presence and typing; with `--presence`, change it.
    Privacy(PrivacyArgs),

    /// Relays this device keeps a mailbox at (`weft daemon --relay`).
    #[command(subcommand)]
    Relay(RelayCommand),

    /// This account's devices: link a new one, list them.
    #[command(subcommand)]
    Devices(DevicesCommand),

    /// Push wakeups: relays POST a content-free wakeup to this endpoint
    /// when mail arrives while this device is away.
    #[command(subcommand)]
    Push(PushCommand),

    /// Stream events from the running daemon until interrupted.
    Watch,

    /// Run a self-contained demonstration: three nodes in temporary homes
    /// on loopback exchange direct and group messages.
    Demo,

    /// Print a shell completion script.
    Completions {
        /// The shell to generate completions for.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// The display name others see.
    #[arg(long, required_unless_present = "link", conflicts_with = "link")]
    pub name: Option<String>,

    /// Join an existing account with a code from `weft devices link`.
    #[arg(long, value_name = "CODE")]
    pub link: Option<String>,

    /// With --link: fetch only the last N days of history (default: all).
    #[arg(long, value_name = "N", requires = "link")]
    pub history_days: Option<u32>,
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Address to listen on (repeatable).
    /// [default: /ip4/0.0.0.0/tcp/0 and /ip4/0.0.0.0/udp/0/quic-v1]
    #[arg(long, value_name = "MULTIADDR")]
    pub listen: Vec<String>,

    /// Do not discover peers on the local network with mDNS.
    #[arg(long)]
    pub no_mdns: bool,

    /// Peer to connect to at start, with its /p2p/ suffix (repeatable).
    #[arg(long, value_name = "MULTIADDR")]
    pub bootstrap: Vec<String>,

    /// Relay to use for mailboxes and reachability (repeatable; not
    /// supported yet).
    #[arg(long, value_name = "MULTIADDR")]
    pub relay: Vec<String>,
}

#[derive(Debug, Args)]
pub struct TypingArgs {
    /// Contact alias, group name, user id or conversation id.
    pub target: String,
    /// Say that you stopped typing instead.
    #[arg(long)]
    pub stop: bool,
}

/// Who may see this user's presence and typing.
pub const PRESENCE_MODES: [&str; 3] = ["everyone", "contacts", "nobody"];

#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
    /// Print a one-time code (and QR) for a new device, then wait until it
    /// has joined (`weft init --link CODE` there). Needs the daemon.
    Link,
    /// List this account's devices.
    List,
    /// Revoke a device: it gets nothing sent after, and cannot act for
    /// the account.
    Revoke {
        /// The device id (`weft devices list`).
        device_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum RelayCommand {
    /// List the relays and this device's mailbox state at each.
    List,
}

#[derive(Debug, Subcommand)]
pub enum PushCommand {
    /// Register a UnifiedPush-compatible endpoint URL with the relays.
    Register {
        /// The endpoint (http or https).
        url: String,
    },
    /// Stop push wakeups.
    Unregister,
}

#[derive(Debug, Args)]
pub struct PrivacyArgs {
    /// Who sees your presence (online, last seen) and typing.
    #[arg(long, value_name = "WHO", value_parser = PRESENCE_MODES)]
    pub presence: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ContactCommand {
    /// Add a contact from the invite string they gave you.
    Add {
        /// The invite (`weft id` prints it).
        invite: String,
        /// The alias you refer to them by [default: their name].
        #[arg(long, value_name = "ALIAS")]
        name: Option<String>,
    },
    /// List contacts.
    List,
    /// Remove a contact.
    Remove {
        /// The contact's alias.
        alias: String,
    },
    /// Block a contact: their messages are dropped.
    Block {
        /// The contact's alias.
        alias: String,
    },
    /// Unblock a contact.
    Unblock {
        /// The contact's alias.
        alias: String,
    },
}

#[derive(Debug, Args)]
pub struct SendArgs {
    /// Contact alias, group name, user id or conversation id.
    pub target: String,
    /// The message; `-` reads it from standard input.
    pub text: String,
    /// Id of the message this one replies to.
    #[arg(long, value_name = "MSGID")]
    pub reply_to: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Create a group, optionally with members.
    Create {
        /// The group's name.
        name: String,
        /// A contact to add (repeatable).
        #[arg(long = "member", value_name = "ALIAS")]
        members: Vec<String>,
    },
    /// Add a contact to a group.
    Add {
        /// Group name or conversation id.
        group: String,
        /// The contact's alias.
        alias: String,
    },
    /// Remove a member from a group.
    Remove {
        /// Group name or conversation id.
        group: String,
        /// The member's alias.
        alias: String,
    },
    /// Make a member an admin of a group.
    Admin {
        /// Group name or conversation id.
        group: String,
        /// The member's alias.
        alias: String,
    },
    /// Leave a group.
    Leave {
        /// Group name or conversation id.
        group: String,
    },
    /// List the groups you are in.
    List,
    /// List a group's members.
    Members {
        /// Group name or conversation id.
        group: String,
    },
}

#[derive(Debug, Args)]
pub struct MessagesArgs {
    /// Contact alias, group name, user id or conversation id.
    pub target: String,
    /// At most this many messages (the most recent).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Only messages before this one.
    #[arg(long, value_name = "MSGID")]
    pub before: Option<String>,
    /// Also print each message's id (human output).
    #[arg(long)]
    pub ids: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_after_subcommand() -> Result<(), clap::Error> {
        let cli = Cli::try_parse_from(["weft", "messages", "bob", "--json", "--limit", "5"])?;
        assert!(cli.global.json);
        assert!(matches!(
            cli.command,
            Command::Messages(MessagesArgs { limit: Some(5), .. })
        ));
        Ok(())
    }

    #[test]
    fn privacy_modes_are_checked() -> Result<(), clap::Error> {
        let cli = Cli::try_parse_from(["weft", "privacy", "--presence", "contacts"])?;
        assert!(matches!(
            cli.command,
            Command::Privacy(PrivacyArgs { presence: Some(ref p) }) if p == "contacts"
        ));
        let cli = Cli::try_parse_from(["weft", "privacy"])?;
        assert!(matches!(
            cli.command,
            Command::Privacy(PrivacyArgs { presence: None })
        ));
        let bad = Cli::try_parse_from(["weft", "privacy", "--presence", "friends"]);
        assert!(matches!(bad, Err(ref e) if e.exit_code() == 2));
        Ok(())
    }

    #[test]
    fn init_needs_name_or_link() {
        assert!(Cli::try_parse_from(["weft", "init"]).is_err());
        assert!(Cli::try_parse_from(["weft", "init", "--name", "a", "--link", "b"]).is_err());
    }
}
