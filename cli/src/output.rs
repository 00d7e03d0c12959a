//! Output: writing results to stdout (one compact JSON value per line with
//! `--json`) and rendering the node's views for people: aligned tables,
//! chat-style message lines with local times, short ids, QR codes.
//!
//! Renderers take the node's typed views and return text. Every string a
//! peer controls goes through [`terminal_safe`] on its way to people;
//! `--json` output keeps it exact.

use std::io::Write;
use std::sync::OnceLock;

use serde::Serialize;
use time::{OffsetDateTime, UtcOffset};
use weft_node::api::{
    ContactView, ConversationView, DeviceView, Event, GroupView, IdView, MemberView, MessageView,
    PeerView, PresenceView, PrivacyView, Progress, ReadView, RelayView, RevokedView, SendView,
    StatusView, TypingView,
};

static LOCAL_OFFSET: OnceLock<UtcOffset> = OnceLock::new();

/// Records the local UTC offset. Call it while the process is still single
/// threaded (before the runtime starts): only then can it be read safely.
pub fn init_local_offset() {
    let offset = UtcOffset::current_local_offset().unwrap_or(UtcOffset::UTC);
    let _ = LOCAL_OFFSET.set(offset);
}

fn local_offset() -> UtcOffset {
    LOCAL_OFFSET.get().copied().unwrap_or(UtcOffset::UTC)
}

/// Writes text to stdout, adding a final newline if it has none.
pub fn out(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    if !text.ends_with('\n') {
        stdout.write_all(b"\n")?;
    }
    stdout.flush()?;
    Ok(())
}

/// Writes one value to stdout as one line of compact JSON.
pub fn out_json(value: &impl Serialize) -> anyhow::Result<()> {
    out(&serde_json::to_string(value)?)
}

/// Whether stdout is a terminal (for QR codes and other niceties).
pub fn stdout_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal()
}

/// What a character that must not reach the terminal is shown as.
const REPLACEMENT: char = '\u{fffd}';
/// What a tab is shown as (a terminal's own tab stops would misalign).
const TAB: &str = "    ";

/// Text made safe to print on a terminal: control characters (ESC and so
/// CSI and OSC sequences, 8-bit CSI, carriage returns, line breaks) and
/// bidi controls become U+FFFD, a tab becomes spaces. So text from a peer
/// cannot drive the terminal (write the clipboard, erase or move lines),
/// pass for a line of its own, or reorder what is shown.
pub fn terminal_safe(text: &str) -> String {
    let mut safe = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\t' => safe.push_str(TAB),
            c if weft_node::identity::is_display_control(c) => safe.push(REPLACEMENT),
            c => safe.push(c),
        }
    }
    safe
}

/// Text of several lines made safe the same way, each line on its own:
/// the line breaks stay, and the lines after the first are indented by
/// `indent`, so that none passes for a line of the output's own.
fn terminal_safe_lines(text: &str, indent: &str) -> String {
    text.split('\n')
        .map(|line| terminal_safe(line.strip_suffix('\r').unwrap_or(line)))
        .collect::<Vec<_>>()
        .join(&format!("\n{indent}"))
}

/// Pretty JSON, the rendering of an answer no renderer expects. JSON
/// escapes C0 controls but not C1 or bidi ones, hence
/// [`terminal_safe_lines`].
pub fn pretty(value: &impl Serialize) -> String {
    let json = serde_json::to_string_pretty(value).unwrap_or_default();
    terminal_safe_lines(&json, "")
}

/// The first characters of a long id, enough to tell ids apart by eye.
pub fn short(id: &str) -> String {
    const KEEP: usize = 8;
    if id.chars().count() <= KEEP + 1 {
        id.to_string()
    } else {
        let head: String = id.chars().take(KEEP).collect();
        format!("{head}…")
    }
}

/// A libp2p peer id, shortened at the end (they all start alike).
pub fn short_peer(id: &str) -> String {
    const KEEP: usize = 8;
    let n = id.chars().count();
    if n <= KEEP + 1 {
        id.to_string()
    } else {
        let tail: String = id.chars().skip(n - KEEP).collect();
        format!("…{tail}")
    }
}

/// A timestamp (milliseconds since the Unix epoch; seconds are accepted
/// too) in local time: `12:01` today, `2026-11-28 12:01` otherwise.
pub fn time_of(ts: i64) -> String {
    let nanos = if ts.abs() < 100_000_000_000 {
        i128::from(ts) * 1_000_000_000
    } else {
        i128::from(ts) * 1_000_000
    };
    let Ok(utc) = OffsetDateTime::from_unix_timestamp_nanos(nanos) else {
        return ts.to_string();
    };
    let offset = local_offset();
    let t = utc.to_offset(offset);
    let today = OffsetDateTime::now_utc().to_offset(offset).date();
    let format = if t.date() == today {
        time::macros::format_description!("[hour]:[minute]")
    } else {
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]")
    };
    t.format(&format).unwrap_or_else(|_| ts.to_string())
}

/// Aligned columns: a header row and rows, two spaces apart, the last
/// column not padded. Cells are made [`terminal_safe`].
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| terminal_safe(cell)).collect())
        .collect();
    let cols = headers.len();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate().take(cols) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let mut push_row = |cells: Vec<&str>| {
        let mut line = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                let pad = widths[i].saturating_sub(cell.chars().count()) + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    };
    push_row(headers.to_vec());
    for row in &rows {
        push_row(row.iter().map(String::as_str).collect());
    }
    text
}

/// `key  value` lines with the keys aligned (values made
/// [`terminal_safe`], each of their lines).
fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let indent = " ".repeat(width + 2);
    let mut text = String::new();
    for (key, value) in pairs {
        let value = terminal_safe_lines(value, &indent);
        text.push_str(&format!("{key:<width$}  {value}\n"));
    }
    text
}

/// A QR code of `data` in unicode half blocks, or `None` if it does not
/// fit in a QR code.
pub fn qr(data: &str) -> Option<String> {
    use qrcode::render::unicode::Dense1x2;
    let code = qrcode::QrCode::new(data.as_bytes()).ok()?;
    Some(
        code.render::<Dense1x2>()
            .dark_color(Dense1x2::Light)
            .light_color(Dense1x2::Dark)
            .quiet_zone(true)
            .build(),
    )
}

/// `weft id` and `weft init`.
pub fn id(v: IdView) -> String {
    fields(&[
        ("name", v.name),
        ("user id", v.user_id),
        ("device id", v.device_id),
        ("peer id", v.peer_id),
        ("invite", v.invite),
    ])
}

/// `weft status`.
pub fn status(v: StatusView) -> String {
    let state = if v.online {
        "online (daemon running)".to_string()
    } else {
        "offline (no daemon running; start one with `weft daemon`)".to_string()
    };
    let listen = if v.listen.is_empty() {
        "-".to_string()
    } else {
        v.listen.join("\n")
    };
    let relays = if v.relays.is_empty() {
        "none".to_string()
    } else {
        v.relays.join(", ")
    };
    let outbox = match v.outbox {
        0 => "empty".to_string(),
        1 => "1 message waiting".to_string(),
        n => format!("{n} messages waiting"),
    };
    let mut text = fields(&[
        ("peer id", v.peer_id),
        ("state", state),
        ("listen", listen),
        ("relays", relays),
        ("outbox", outbox),
        ("peers", format!("{} connected", v.peers.len())),
    ]);
    if !v.peers.is_empty() {
        text.push('\n');
        text.push_str(&peers(&v.peers));
    }
    text
}

fn peers(peers: &[PeerView]) -> String {
    let rows: Vec<Vec<String>> = peers
        .iter()
        .map(|p| vec![p.peer_id.clone(), p.source.clone(), p.addrs.join(" ")])
        .collect();
    table(&["PEER", "FOUND VIA", "ADDRESSES"], &rows)
}

/// `weft contact list`.
pub fn contacts(list: Vec<ContactView>) -> String {
    if list.is_empty() {
        return "No contacts yet. Add one with `weft contact add INVITE`.".to_string();
    }
    let rows: Vec<Vec<String>> = list
        .into_iter()
        .map(|c| {
            vec![
                c.alias,
                c.name,
                c.devices.to_string(),
                if c.blocked { "blocked" } else { "" }.to_string(),
                c.user_id,
            ]
        })
        .collect();
    table(&["ALIAS", "NAME", "DEVICES", "BLOCKED", "USER ID"], &rows)
}

/// `weft contact add`.
pub fn contact_added(c: ContactView) -> String {
    if c.alias == c.name {
        format!(
            "Added contact {} ({}).",
            terminal_safe(&c.alias),
            short(&c.user_id)
        )
    } else {
        format!(
            "Added contact {} ({}, {}).",
            terminal_safe(&c.alias),
            terminal_safe(&c.name),
            short(&c.user_id)
        )
    }
}

/// `weft send`.
pub fn sent(v: SendView, target: &str) -> String {
    let note = if v.status == "queued" {
        " (it goes out once the daemon runs and the recipient is reachable)"
    } else {
        ""
    };
    format!("Message to {target}: {}{note}\nid {}", v.status, v.id)
}

/// `weft group create`.
pub fn group_created(g: GroupView) -> String {
    format!(
        "Created group {} with {} member{}.\nid {}",
        terminal_safe(&g.name),
        g.members,
        plural(g.members),
        g.id
    )
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// `weft group list`.
pub fn groups(list: Vec<GroupView>) -> String {
    if list.is_empty() {
        return "No groups yet. Create one with `weft group create NAME`.".to_string();
    }
    let rows: Vec<Vec<String>> = list
        .into_iter()
        .map(|g| {
            vec![
                g.name,
                g.members.to_string(),
                g.role,
                g.epoch.to_string(),
                g.id,
            ]
        })
        .collect();
    table(&["NAME", "MEMBERS", "ROLE", "EPOCH", "ID"], &rows)
}

/// `weft group members`.
pub fn members(list: Vec<MemberView>) -> String {
    member_table(&list)
}

fn member_table(list: &[MemberView]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|m| {
            vec![
                m.name.clone(),
                m.role.clone(),
                m.devices.to_string(),
                m.user_id.clone(),
            ]
        })
        .collect();
    table(&["NAME", "ROLE", "DEVICES", "USER ID"], &rows)
}

/// `weft conversations`.
pub fn conversations(list: Vec<ConversationView>) -> String {
    if list.is_empty() {
        return "No conversations yet.".to_string();
    }
    let rows: Vec<Vec<String>> = list
        .into_iter()
        .map(|c| {
            vec![
                c.name,
                c.kind,
                if c.unread == 0 {
                    String::new()
                } else {
                    c.unread.to_string()
                },
                c.last_message_at.map(time_of).unwrap_or_default(),
                c.id,
            ]
        })
        .collect();
    table(&["NAME", "KIND", "UNREAD", "LAST", "ID"], &rows)
}

/// `weft messages`.
pub fn messages(list: Vec<MessageView>, with_ids: bool) -> String {
    if list.is_empty() {
        return "No messages.".to_string();
    }
    let mut text = String::new();
    for m in &list {
        if with_ids {
            text.push_str(&m.id);
            text.push_str("  ");
        }
        text.push_str(&message_line(m));
        text.push('\n');
    }
    text
}

/// `weft devices list`.
pub fn devices(list: Vec<DeviceView>) -> String {
    let rows: Vec<Vec<String>> = list
        .into_iter()
        .map(|d| {
            let state = if d.current {
                "this device"
            } else if d.connected {
                "connected"
            } else {
                "away"
            };
            vec![d.device_id, state.to_string(), d.peer_id]
        })
        .collect();
    table(&["DEVICE", "STATE", "PEER"], &rows)
}

/// `weft devices revoke`.
pub fn revoked(v: RevokedView) -> String {
    let rekeyed = v.conversations_rekeyed;
    format!(
        "Revoked {}. It can no longer act for this account; new keys \
         will be used in {rekeyed} conversation{} from the next message on.",
        v.device_id,
        if rekeyed == 1 { "" } else { "s" }
    )
}

/// `weft edit`, `delete`, `react`: the message as it is now.
pub fn changed(m: MessageView, what: &str) -> String {
    format!("{what}: {}", message_line(&m))
}

/// `weft read`: how many messages were marked read.
pub fn marked_read(v: ReadView, target: &str) -> String {
    let read = v.read;
    let note = if read > 0 && !v.receipts_sent {
        " (no read receipts: the group is too large)"
    } else {
        ""
    };
    format!(
        "Marked {read} message{} read in {target}{note}",
        plural(usize::try_from(read).unwrap_or(usize::MAX))
    )
}

/// `weft presence`: `bob: online`, `bob: offline, last seen 14:02`.
pub fn presence(v: PresenceView, target: &str) -> String {
    let name = terminal_safe(if v.name.is_empty() { target } else { &v.name });
    match (v.online, v.last_seen) {
        (true, _) => format!("{name}: online"),
        (false, Some(at)) => format!("{name}: offline, last seen {}", time_of(at)),
        (false, None) => format!("{name}: offline, never seen"),
    }
}

/// `weft typing`: whom the indicator reached.
pub fn typing(v: TypingView, target: &str) -> String {
    let told = v.told;
    let what = if v.typing {
        "are typing"
    } else {
        "stopped typing"
    };
    if told == 0 {
        format!(
            "Nobody in {target} was told that you {what}: no member you share your \
             presence with is online."
        )
    } else {
        format!(
            "Told {told} device{} in {target} that you {what}.",
            plural(usize::try_from(told).unwrap_or(usize::MAX))
        )
    }
}

/// `weft relay list`.
pub fn relays(list: Vec<RelayView>) -> String {
    if list.is_empty() {
        return "No relays: start the daemon with --relay MULTIADDR, or --bootstrap a peer of a network with relays.".to_string();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|r| {
            vec![
                short_peer(&r.peer_id),
                if r.connected { "connected" } else { "away" }.to_string(),
                r.mailbox
                    .as_deref()
                    .map_or("not registered".to_string(), short),
                r.fetched.to_string(),
                r.found.clone(),
                r.addr.clone(),
            ]
        })
        .collect();
    table(
        &["RELAY", "STATE", "MAILBOX", "FETCHED", "FROM", "ADDRESS"],
        &rows,
    )
}

/// `weft privacy`: who sees this user's presence and typing.
pub fn privacy(v: PrivacyView, changed: bool) -> String {
    let who = match v.presence.as_str() {
        "everyone" => "everyone",
        "contacts" => "your contacts",
        "nobody" => "nobody",
        other => other,
    };
    let now = if changed { "now " } else { "" };
    format!(
        "Your presence and typing are {now}shown to {who} ({}).",
        v.presence
    )
}

/// One message as a chat line: `[12:01] Alice: hello (delivered)`. The
/// status is shown for this user's own messages; the text's further lines
/// are indented under its first.
pub fn message_line(m: &MessageView) -> String {
    let mut line = format!(
        "[{}] {}: ",
        time_of(m.sent_at),
        terminal_safe(&m.sender_name)
    );
    let indent = " ".repeat(line.chars().count());
    if let Some(reply) = &m.reply_to {
        line.push_str(&format!("↪ {} ", short(reply)));
    }
    if m.deleted {
        line.push_str("(message deleted)");
    } else {
        line.push_str(&terminal_safe_lines(&m.text, &indent));
    }
    if m.edited && !m.deleted {
        line.push_str(" (edited)");
    }
    if m.outgoing {
        line.push_str(&format!(" ({})", outgoing_status(m)));
    }
    if !m.reactions.is_empty() {
        let reactions: Vec<String> = m
            .reactions
            .iter()
            .map(|(emoji, users)| format!("{} {}", terminal_safe(emoji), users.len()))
            .collect();
        line.push_str("  ");
        line.push_str(&reactions.join("  "));
    }
    line
}

/// How far a message got with its recipients, for groups (more than one
/// recipient): `delivered to 2 of 4, read by 1 of 4`. `status` stands when
/// there is only one recipient or nobody has the message yet.
pub fn progress_text(progress: &Progress, status: &str) -> String {
    let Progress {
        recipients,
        delivered,
        read,
    } = *progress;
    if recipients <= 1 || delivered == 0 {
        status.to_string()
    } else if read >= recipients {
        format!("read by all {recipients}")
    } else if read > 0 {
        format!("delivered to {delivered} of {recipients}, read by {read} of {recipients}")
    } else {
        format!("delivered to {delivered} of {recipients}")
    }
}

/// The status of an outgoing message; in groups, how many members got it
/// (from the node's progress, or else by counting the receipts).
fn outgoing_status(m: &MessageView) -> String {
    if let Some(progress) = &m.progress {
        return progress_text(progress, &m.status);
    }
    match &m.receipts {
        Some(receipts) if !receipts.is_empty() => {
            let total = receipts.len();
            let read = receipts.iter().filter(|r| r.status == "read").count();
            let delivered = receipts
                .iter()
                .filter(|r| r.status == "delivered" || r.status == "read")
                .count();
            if read == total {
                "read".to_string()
            } else if read > 0 {
                format!("read by {read}/{total}")
            } else if delivered > 0 {
                format!("delivered to {delivered}/{total}")
            } else {
                m.status.clone()
            }
        }
        _ => m.status.clone(),
    }
}

/// A user's name (made [`terminal_safe`]), or their short id if they
/// have none.
fn display_name(name: &str, user_id: &str) -> String {
    if name.is_empty() {
        short(user_id)
    } else {
        terminal_safe(name)
    }
}

/// One event of `weft watch` as a line for people. `conversation_name`
/// turns a conversation id into its name where known.
pub fn event_line(event: &Event, conversation_name: &dyn Fn(&str) -> Option<String>) -> String {
    let conv = |id: &str| conversation_name(id).map_or_else(|| short(id), |n| terminal_safe(&n));
    match event {
        Event::Message(m) => format!("{}  {}", conv(&m.conversation), message_line(m)),
        Event::Updated(m) => format!("{}  changed: {}", conv(&m.conversation), message_line(m)),
        Event::Status {
            id,
            conversation,
            status,
            progress,
        } => match progress.filter(|p| p.recipients > 1 && p.delivered > 0) {
            Some(p) => format!(
                "{}  message {}: {}",
                conv(conversation),
                short(id),
                progress_text(&p, status)
            ),
            None => format!("{}  message {} is {status}", conv(conversation), short(id)),
        },
        Event::Presence {
            user_id,
            name,
            online,
            ..
        } => {
            let name = display_name(name, user_id);
            if *online {
                format!("{name} is online")
            } else {
                format!("{name} went offline")
            }
        }
        Event::Typing {
            conversation,
            user_id,
            name,
            typing,
        } => {
            let name = display_name(name, user_id);
            let place = conv(conversation);
            if *typing && place == name {
                // A direct conversation is named after the contact.
                format!("{name} is typing…")
            } else if *typing {
                format!("{name} is typing in {place}…")
            } else {
                format!("{name} stopped typing")
            }
        }
        Event::Member {
            conversation,
            name,
            epoch,
            members,
            active,
        } => {
            let name = if name.is_empty() {
                conv(conversation)
            } else {
                terminal_safe(name)
            };
            if *active {
                let names: Vec<String> = members.iter().map(|m| terminal_safe(&m.name)).collect();
                format!("{name}  members now: {} (epoch {epoch})", names.join(", "))
            } else {
                format!("{name}  you are no longer a member")
            }
        }
        Event::Peer { peer_id, connected } => format!(
            "peer {} {}",
            short_peer(peer_id),
            if *connected {
                "connected"
            } else {
                "disconnected"
            }
        ),
        Event::Device {
            event: kind,
            device_id,
        } => match kind.as_str() {
            "linked" => format!("device {} joined the account", short(device_id)),
            "revoked" => format!("device {} was revoked", short(device_id)),
            // Compact JSON escapes C0 controls, not C1 or bidi ones.
            _ => terminal_safe(&serde_json::to_string(event).unwrap_or_default()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A view from the JSON the contract gives it.
    fn v<T: serde::de::DeserializeOwned>(json: serde_json::Value) -> T {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn short_ids() {
        assert_eq!(short("abc"), "abc");
        assert_eq!(short("0123456789abcdef"), "01234567…");
        assert_eq!(short_peer("12D3KooWABCDEFGHIJ"), "…CDEFGHIJ");
    }

    #[test]
    fn fields_align_multiline_values() {
        let text = fields(&[("a", "1\n2".into()), ("long", "3".into())]);
        assert_eq!(text, "a     1\n      2\nlong  3\n");
    }

    #[test]
    fn table_aligns() {
        let t = table(
            &["A", "BB"],
            &[
                vec!["long cell".into(), "x".into()],
                vec!["s".into(), "y".into()],
            ],
        );
        assert_eq!(t, "A          BB\nlong cell  x\ns          y\n");
    }

    #[test]
    fn message_lines() {
        let m = MessageView {
            id: "ab".repeat(16),
            conversation: "cd".repeat(16),
            sender: "user".into(),
            sender_name: "Alice".into(),
            text: "hello".into(),
            sent_at: 0,
            status: "delivered".into(),
            reply_to: None,
            edited: false,
            deleted: false,
            reactions: Default::default(),
            receipts: None,
            progress: None,
            hlc: 0,
            outgoing: true,
        };
        let line = message_line(&m);
        assert!(line.ends_with("Alice: hello (delivered)"), "{line}");
        assert!(line.starts_with('['));
        let incoming = MessageView {
            outgoing: false,
            ..m
        };
        assert!(message_line(&incoming).ends_with("Alice: hello"));
    }

    #[test]
    fn outgoing_group_messages_show_progress() {
        let m = MessageView {
            id: "ab".repeat(16),
            conversation: "cd".repeat(16),
            sender: "user".into(),
            sender_name: "Alice".into(),
            text: "hello".into(),
            sent_at: 0,
            status: "sent".into(),
            reply_to: None,
            edited: false,
            deleted: false,
            reactions: Default::default(),
            receipts: Some(vec![]),
            progress: Some(Progress {
                recipients: 4,
                delivered: 2,
                read: 1,
            }),
            hlc: 1,
            outgoing: true,
        };
        let line = message_line(&m);
        assert!(
            line.ends_with("(delivered to 2 of 4, read by 1 of 4)"),
            "{line}"
        );
        let nobody = MessageView {
            progress: Some(Progress {
                recipients: 4,
                delivered: 0,
                read: 0,
            }),
            ..m.clone()
        };
        assert!(message_line(&nobody).ends_with("(sent)"));
        let direct = MessageView {
            status: "delivered".into(),
            progress: Some(Progress {
                recipients: 1,
                delivered: 1,
                read: 0,
            }),
            ..m
        };
        assert!(message_line(&direct).ends_with("(delivered)"));
    }

    #[test]
    fn progress_texts() {
        let p = |recipients, delivered, read| Progress {
            recipients,
            delivered,
            read,
        };
        assert_eq!(progress_text(&p(4, 2, 0), "sent"), "delivered to 2 of 4");
        assert_eq!(
            progress_text(&p(4, 3, 2), "sent"),
            "delivered to 3 of 4, read by 2 of 4"
        );
        assert_eq!(progress_text(&p(4, 4, 4), "read"), "read by all 4");
        assert_eq!(progress_text(&p(4, 0, 0), "relayed"), "relayed");
        assert_eq!(progress_text(&p(1, 1, 1), "read"), "read");
    }

    #[test]
    fn read_presence_typing_privacy() {
        let read = v(json!({"conversation": "c", "unread": 0, "read": 3, "receipts_sent": true}));
        assert_eq!(marked_read(read, "bob"), "Marked 3 messages read in bob");
        let one = v(json!({"conversation": "c", "unread": 0, "read": 1, "receipts_sent": true}));
        assert_eq!(marked_read(one, "bob"), "Marked 1 message read in bob");
        let big = v(json!({"conversation": "c", "unread": 0, "read": 2, "receipts_sent": false}));
        assert!(marked_read(big, "g").starts_with("Marked 2 messages read in g ("));

        let online = v(json!({"user_id": "u1", "name": "bob", "online": true, "last_seen": 5}));
        assert_eq!(presence(online, "b"), "bob: online");
        let seen = v(json!({"user_id": "u1", "name": "bob", "online": false, "last_seen": 0}));
        assert_eq!(
            presence(seen, "b"),
            format!("bob: offline, last seen {}", time_of(0))
        );
        let never = v(json!({"user_id": "u1", "name": "bob", "online": false, "last_seen": null}));
        assert_eq!(presence(never, "b"), "bob: offline, never seen");

        let told = v(json!({"conversation": "c", "typing": true, "told": 2}));
        assert_eq!(
            typing(told, "g"),
            "Told 2 devices in g that you are typing."
        );
        let stopped = v(json!({"conversation": "c", "typing": false, "told": 1}));
        assert_eq!(
            typing(stopped, "bob"),
            "Told 1 device in bob that you stopped typing."
        );
        let nobody = v(json!({"conversation": "c", "typing": true, "told": 0}));
        assert!(typing(nobody, "bob").starts_with("Nobody in bob"));

        let p = v(json!({"presence": "contacts"}));
        assert_eq!(
            privacy(p, false),
            "Your presence and typing are shown to your contacts (contacts)."
        );
        assert!(privacy(v(json!({"presence": "nobody"})), true).contains("now shown to nobody"));
    }

    #[test]
    fn presence_typing_status_events() {
        let names = |id: &str| (id == "conv1").then(|| "friends".to_string());
        let online = v(
            json!({"type": "presence", "user_id": "u1", "name": "bob", "online": true,
            "last_seen": 1}),
        );
        assert_eq!(event_line(&online, &names), "bob is online");
        let offline = v(
            json!({"type": "presence", "user_id": "u1", "name": "bob", "online": false,
            "last_seen": 1}),
        );
        assert_eq!(event_line(&offline, &names), "bob went offline");
        let typing = v(
            json!({"type": "typing", "conversation": "conv1", "user_id": "u1",
            "name": "bob", "typing": true}),
        );
        assert_eq!(event_line(&typing, &names), "bob is typing in friends…");
        let direct = v(
            json!({"type": "typing", "conversation": "conv2", "user_id": "u1",
            "name": "bob", "typing": true}),
        );
        let direct_names = |_: &str| Some("bob".to_string());
        assert_eq!(event_line(&direct, &direct_names), "bob is typing…");
        let stopped = v(
            json!({"type": "typing", "conversation": "conv1", "user_id": "u1",
            "name": "bob", "typing": false}),
        );
        assert_eq!(event_line(&stopped, &names), "bob stopped typing");
        let status = v(
            json!({"type": "status", "id": "m1", "conversation": "conv1",
            "status": "delivered", "progress": {"recipients": 4, "delivered": 2, "read": 1}}),
        );
        assert_eq!(
            event_line(&status, &names),
            "friends  message m1: delivered to 2 of 4, read by 1 of 4"
        );
        let plain = v(
            json!({"type": "status", "id": "m1", "conversation": "conv1",
            "status": "delivered"}),
        );
        assert_eq!(
            event_line(&plain, &names),
            "friends  message m1 is delivered"
        );
    }

    #[test]
    fn an_unknown_device_event_shows_as_json() {
        let e = Event::Device {
            event: "surprise".into(),
            device_id: "d1".into(),
        };
        assert!(event_line(&e, &|_| None).contains("surprise"));
    }

    /// What a hostile peer puts in a message: an OSC 52 clipboard write,
    /// CSI sequences that erase the line, a carriage return and a forged
    /// next line, an 8-bit CSI, a tab, and a right-to-left override.
    const HOSTILE_TEXT: &str = "\u{1b}]52;c;cm0gLXJmIH4=\u{7}hi\u{1b}[2K\r[09:00] Alice: \
        trust him\n[09:01] Alice: my key is\u{9b}8m secret\tok \u{202e}fdp.exe\u{2066}";
    const HOSTILE_NAME: &str = "\u{1b}]0;title\u{7}Mal\u{202e}lory\u{200f}";

    /// The characters of `text` that must never reach a terminal: every
    /// control but the line break, and the bidi controls.
    fn raw_controls(text: &str) -> Vec<char> {
        text.chars()
            .filter(|&c| {
                (c.is_control() && c != '\n')
                    || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
                    || matches!(c, '\u{200e}' | '\u{200f}' | '\u{61c}')
            })
            .collect()
    }

    fn hostile_message() -> MessageView {
        MessageView {
            id: "ab".repeat(16),
            conversation: "cd".repeat(16),
            sender: "ef".repeat(32),
            sender_name: HOSTILE_NAME.into(),
            text: HOSTILE_TEXT.into(),
            sent_at: 0,
            status: "delivered".into(),
            reply_to: None,
            edited: true,
            deleted: false,
            reactions: [("\u{1b}[5m👍\u{202e}".to_string(), vec!["ef".repeat(32)])].into(),
            receipts: None,
            progress: None,
            hlc: 0,
            outgoing: false,
        }
    }

    #[test]
    fn terminal_safe_replaces_controls_only() {
        assert_eq!(terminal_safe("Zoë 👩‍💻 نور"), "Zoë 👩‍💻 نور");
        assert_eq!(terminal_safe("a\u{1b}[2Kb\u{9b}c\u{7f}"), "a�[2Kb�c�");
        assert_eq!(terminal_safe("a\tb\nc\rd"), "a    b�c�d");
        assert_eq!(terminal_safe("\u{202e}ab\u{2066}\u{200f}"), "�ab��");
        assert_eq!(
            terminal_safe_lines("one\r\ntwo\n\u{1b}three", "  "),
            "one\n  two\n  �three"
        );
    }

    #[test]
    fn peer_text_reaches_the_terminal_without_controls() {
        let m = hostile_message();
        let event = Event::Message(m.clone());
        let hostile_conversation = |_: &str| Some(HOSTILE_NAME.to_string());
        let rendered = [
            ("message line", message_line(&m)),
            ("messages", messages(vec![m.clone()], true)),
            ("edited", changed(m.clone(), "Edited")),
            ("watch", event_line(&event, &hostile_conversation)),
            (
                "contacts",
                contacts(v(
                    json!([{"alias": HOSTILE_NAME, "user_id": "u", "name": HOSTILE_NAME,
                    "blocked": false, "devices": 1}]),
                )),
            ),
            (
                "contact added",
                contact_added(v(
                    json!({"alias": "mal", "user_id": "u", "name": HOSTILE_NAME,
                    "blocked": false, "devices": 1}),
                )),
            ),
            (
                "groups",
                groups(v(
                    json!([{"id": "g", "name": HOSTILE_NAME, "members": 2, "role": "member",
                    "epoch": 1}]),
                )),
            ),
            (
                "members",
                members(v(
                    json!([{"user_id": "u", "name": HOSTILE_NAME, "role": "member",
                    "devices": 1}]),
                )),
            ),
            (
                "conversations",
                conversations(v(json!([{"id": "c", "kind": "group", "name": HOSTILE_NAME,
                    "unread": 0, "last_message_at": null}]))),
            ),
            (
                "presence",
                presence(
                    v(json!({"user_id": "u", "name": HOSTILE_NAME, "online": true,
                    "last_seen": null})),
                    "mal",
                ),
            ),
            (
                "typing event",
                event_line(
                    &v::<Event>(
                        json!({"type": "typing", "conversation": "c", "user_id": "u",
                    "name": HOSTILE_NAME, "typing": true}),
                    ),
                    &hostile_conversation,
                ),
            ),
            (
                "presence event",
                event_line(
                    &v::<Event>(
                        json!({"type": "presence", "user_id": "u", "name": HOSTILE_NAME,
                    "online": true, "last_seen": 1}),
                    ),
                    &hostile_conversation,
                ),
            ),
            (
                "member event",
                event_line(
                    &v::<Event>(
                        json!({"type": "member", "conversation": "c", "name": HOSTILE_NAME,
                    "active": true, "epoch": 2, "members": [{"user_id": "u",
                    "name": HOSTILE_NAME, "role": "member", "devices": 1}]}),
                    ),
                    &hostile_conversation,
                ),
            ),
            ("unknown shape", pretty(&json!({"surprise": HOSTILE_TEXT}))),
        ];
        for (what, text) in &rendered {
            assert_eq!(raw_controls(text), Vec::<char>::new(), "{what}: {text:?}");
            assert!(!text.contains('\u{1b}'), "{what}: ESC in {text:?}");
        }
        // The forged line after the text's line break stays visibly part
        // of the message: indented, never at the start of a line.
        let line = message_line(&m);
        assert!(
            line.lines().skip(1).all(|l| l.starts_with(' ')),
            "a line of the text passes for a message: {line:?}"
        );
        // `--json` keeps every byte.
        let json_line = serde_json::to_string(&m).unwrap();
        let back: MessageView = serde_json::from_str(&json_line).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn qr_renders() {
        let code = qr("weft1example").unwrap_or_default();
        assert!(code.contains('█') || code.contains('▀') || code.contains('▄'));
    }

    #[test]
    fn times() {
        let epoch = time_of(0);
        assert_eq!(epoch.len(), "1970-01-01 00:00".len(), "{epoch}");
        assert_eq!(time_of(i64::MAX), i64::MAX.to_string());
    }
}
