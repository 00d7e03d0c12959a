//! The local API: requests a client (the `weft` CLI, scripts, tests) sends
//! to a node, the typed [`Response`] it gets back, and the events `watch`
//! streams. In process they are Rust values; JSON appears only on the
//! control socket, where the field names are the contract of docs/cli.md.
//!
//! On the control socket each request is one JSON line; each answer is one
//! JSON line `{"ok":true,"data":...}` or `{"ok":false,"error":{...}}`; a
//! `watch` request is answered by one `{"ok":true,"data":null}` line and
//! then one event per line.

use serde::{Deserialize, Serialize};

/// Longest request line accepted on the control socket.
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;
/// Longest reply or event line a control client reads: a page of
/// messages is far longer than any request (up to 10,000 messages; 64
/// MiB holds 10,000 of about 6 KiB each, and a longer page is refused
/// with a clear error, not cut short).
pub const MAX_REPLY_BYTES: usize = 64 * 1024 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Id,
    Status,
    ContactAdd {
        invite: String,
        #[serde(default)]
        name: Option<String>,
    },
    ContactList,
    ContactRemove {
        alias: String,
    },
    ContactBlock {
        alias: String,
    },
    ContactUnblock {
        alias: String,
    },
    Send {
        target: String,
        text: String,
        #[serde(default)]
        reply_to: Option<String>,
    },
    GroupCreate {
        name: String,
        #[serde(default)]
        members: Vec<String>,
    },
    GroupAdd {
        group: String,
        member: String,
    },
    GroupRemove {
        group: String,
        member: String,
    },
    GroupAdmin {
        group: String,
        member: String,
    },
    GroupLeave {
        group: String,
    },
    GroupList,
    GroupMembers {
        group: String,
    },
    Conversations,
    Messages {
        target: String,
        #[serde(default)]
        limit: Option<usize>,
        #[serde(default)]
        before: Option<String>,
    },
    Read {
        target: String,
    },
    /// A one-time code that links a new device to this account.
    DevicesLink,
    /// This account's devices.
    DevicesList,
    /// Revoke one of this account's devices (by id or a unique prefix).
    DevicesRevoke {
        device: String,
    },
    /// Replace the text of one of this user's messages.
    Edit {
        id: String,
        text: String,
    },
    /// Delete a message (this user's own, or any in a group this user
    /// administers) for everyone: its text goes, a tombstone stays.
    Delete {
        id: String,
    },
    /// Add (or, with `remove`, take back) a reaction.
    React {
        id: String,
        emoji: String,
        #[serde(default)]
        remove: bool,
    },
    /// Whether a contact is online, and when they were last seen.
    Presence {
        target: String,
    },
    /// Tells the conversation's members this user is (or stopped) typing.
    Typing {
        target: String,
        #[serde(default = "yes")]
        typing: bool,
    },
    /// The relays this device keeps a mailbox at, and their state.
    RelayList,
    /// Registers a UnifiedPush-compatible endpoint that relays POST a
    /// content-free wakeup to when mail arrives while this device is away.
    PushRegister {
        url: String,
    },
    PushUnregister,
    /// Shows, or with `presence` set changes, who sees this user's
    /// presence and typing: `everyone`, `contacts` or `nobody`.
    Privacy {
        #[serde(default)]
        presence: Option<String>,
    },
    Watch,
}

fn yes() -> bool {
    true
}

/// Whether a failure is the caller's (exit code 2) or the node's (1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Bad usage or bad input: malformed invite, unknown contact, too large.
    Usage,
    /// The command failed: storage, network, internal.
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Usage,
            message: message.into(),
        }
    }

    pub fn failed(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Failed,
            message: message.into(),
        }
    }

    /// The process exit code the contract gives this error.
    pub fn exit_code(&self) -> i32 {
        match self.kind {
            ErrorKind::Usage => 2,
            ErrorKind::Failed => 1,
        }
    }
}

/// One answer line on the control socket.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdView {
    pub user_id: String,
    pub device_id: String,
    pub peer_id: String,
    pub name: String,
    pub invite: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerView {
    pub peer_id: String,
    /// How it was found: `mdns`, `dht`, `relay`, `manual` or `inbound`.
    pub source: String,
    pub addrs: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusView {
    pub peer_id: String,
    pub listen: Vec<String>,
    pub peers: Vec<PeerView>,
    pub relays: Vec<String>,
    /// Whether a daemon answered (false: local state only).
    pub online: bool,
    pub outbox: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactView {
    pub alias: String,
    pub user_id: String,
    pub name: String,
    pub blocked: bool,
    pub devices: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendView {
    pub id: String,
    pub conversation: String,
    pub status: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationView {
    pub id: String,
    /// `direct` or `group`.
    pub kind: String,
    pub name: String,
    pub unread: u32,
    pub last_message_at: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptView {
    pub user_id: String,
    pub name: String,
    /// `sent` (nothing acknowledged yet), `delivered` or `read`.
    pub status: String,
    /// When the furthest acknowledgement arrived (unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<i64>,
}

/// How far a message has got with its recipients (users other than the
/// sender): "delivered to 3 of 5, read by 2 of 5".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub recipients: u32,
    pub delivered: u32,
    pub read: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceView {
    pub user_id: String,
    pub name: String,
    pub online: bool,
    /// When a device of theirs was last heard from (unix ms), if ever.
    pub last_seen: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayView {
    pub peer_id: String,
    pub addr: String,
    /// How the device came to use it: `config` (`--relay`) or `dht`.
    pub found: String,
    pub connected: bool,
    /// This device's mailbox id there, once registered.
    pub mailbox: Option<String>,
    /// Envelopes fetched from it since the daemon started.
    pub fetched: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrivacyView {
    /// Who sees this user's presence and typing.
    pub presence: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageView {
    pub id: String,
    pub conversation: String,
    pub sender: String,
    pub sender_name: String,
    pub text: String,
    pub sent_at: i64,
    /// `queued`, `sent`, `relayed`, `delivered` or `read`.
    pub status: String,
    pub reply_to: Option<String>,
    pub edited: bool,
    pub deleted: bool,
    /// Emoji to the user ids that reacted with it.
    pub reactions: std::collections::BTreeMap<String, Vec<String>>,
    /// Per member, for groups; absent for direct conversations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipts: Option<Vec<ReceiptView>>,
    /// For this user's own messages: how many recipients have it, and
    /// have read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// The conversation order: the sender's hybrid logical clock.
    pub hlc: u64,
    /// Whether this device's user sent it.
    pub outgoing: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupView {
    pub id: String,
    pub name: String,
    pub members: usize,
    /// This user's role: `admin` or `member`.
    pub role: String,
    pub epoch: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    pub user_id: String,
    pub name: String,
    /// `admin` or `member`.
    pub role: String,
    pub devices: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkCodeView {
    /// The one-time code a new device joins with (`weft init --link`).
    pub code: String,
    /// When the code stops working (unix ms).
    pub expires_at: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceView {
    pub device_id: String,
    pub peer_id: String,
    /// When the device was certified (unix ms).
    pub created_at: i64,
    /// Whether it is the device answering.
    pub current: bool,
    pub connected: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedView {
    pub device_id: String,
    pub revoked: bool,
    /// Conversations that got a fresh key because of it.
    pub conversations_rekeyed: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeftView {
    pub conversation: String,
    pub left: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadView {
    pub conversation: String,
    pub unread: u32,
    /// Messages newly marked read.
    pub read: u64,
    pub receipts_sent: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypingView {
    pub conversation: String,
    pub typing: bool,
    /// Devices told.
    pub told: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushView {
    /// The endpoint now registered (`None` after `unregister`).
    pub push: Option<String>,
    /// Connected relays sent the new registration.
    pub relays_told: u64,
}

/// The answer to a [`Request`]: one variant per shape of answer. On the
/// control socket it is the reply's `data`, serialized without a tag;
/// [`Response::from_json`] reads it back knowing the request it answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Response {
    Id(IdView),
    Status(StatusView),
    /// `contact_add`, `contact_remove`, `contact_block`, `contact_unblock`.
    Contact(ContactView),
    Contacts(Vec<ContactView>),
    Sent(SendView),
    Group(GroupView),
    Groups(Vec<GroupView>),
    /// `group_members`, and the membership after `group_add`,
    /// `group_remove` and `group_admin`.
    Members(Vec<MemberView>),
    Left(LeftView),
    Conversations(Vec<ConversationView>),
    Messages(Vec<MessageView>),
    /// The message after `edit`, `delete` or `react`.
    Message(MessageView),
    Read(ReadView),
    LinkCode(LinkCodeView),
    Devices(Vec<DeviceView>),
    Revoked(RevokedView),
    Presence(PresenceView),
    Typing(TypingView),
    Relays(Vec<RelayView>),
    Push(PushView),
    Privacy(PrivacyView),
    /// `watch` was accepted: events follow on the stream.
    Watching,
}

impl Response {
    /// Reads the `data` of a control-socket reply to `request`.
    pub fn from_json(request: &Request, data: serde_json::Value) -> serde_json::Result<Self> {
        use serde_json::from_value as view;
        Ok(match request {
            Request::Id => Self::Id(view(data)?),
            Request::Status => Self::Status(view(data)?),
            Request::ContactAdd { .. }
            | Request::ContactRemove { .. }
            | Request::ContactBlock { .. }
            | Request::ContactUnblock { .. } => Self::Contact(view(data)?),
            Request::ContactList => Self::Contacts(view(data)?),
            Request::Send { .. } => Self::Sent(view(data)?),
            Request::GroupCreate { .. } => Self::Group(view(data)?),
            Request::GroupList => Self::Groups(view(data)?),
            Request::GroupAdd { .. }
            | Request::GroupRemove { .. }
            | Request::GroupAdmin { .. }
            | Request::GroupMembers { .. } => Self::Members(view(data)?),
            Request::GroupLeave { .. } => Self::Left(view(data)?),
            Request::Conversations => Self::Conversations(view(data)?),
            Request::Messages { .. } => Self::Messages(view(data)?),
            Request::Edit { .. } | Request::Delete { .. } | Request::React { .. } => {
                Self::Message(view(data)?)
            }
            Request::Read { .. } => Self::Read(view(data)?),
            Request::DevicesLink => Self::LinkCode(view(data)?),
            Request::DevicesList => Self::Devices(view(data)?),
            Request::DevicesRevoke { .. } => Self::Revoked(view(data)?),
            Request::Presence { .. } => Self::Presence(view(data)?),
            Request::Typing { .. } => Self::Typing(view(data)?),
            Request::RelayList => Self::Relays(view(data)?),
            Request::PushRegister { .. } | Request::PushUnregister => Self::Push(view(data)?),
            Request::Privacy { .. } => Self::Privacy(view(data)?),
            Request::Watch => Self::Watching,
        })
    }

    /// The answer as the JSON of the contract (the control socket's `data`).
    pub fn to_json(&self) -> serde_json::Value {
        // Every view is plain data with string keys: serializing cannot fail.
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// The name of this shape of answer, for errors.
    fn shape(&self) -> &'static str {
        match self {
            Self::Id(_) => "id",
            Self::Status(_) => "status",
            Self::Contact(_) => "contact",
            Self::Contacts(_) => "contacts",
            Self::Sent(_) => "sent",
            Self::Group(_) => "group",
            Self::Groups(_) => "groups",
            Self::Members(_) => "members",
            Self::Left(_) => "left",
            Self::Conversations(_) => "conversations",
            Self::Messages(_) => "messages",
            Self::Message(_) => "message",
            Self::Read(_) => "read",
            Self::LinkCode(_) => "link code",
            Self::Devices(_) => "devices",
            Self::Revoked(_) => "revoked",
            Self::Presence(_) => "presence",
            Self::Typing(_) => "typing",
            Self::Relays(_) => "relays",
            Self::Push(_) => "push",
            Self::Privacy(_) => "privacy",
            Self::Watching => "watching",
        }
    }
}

/// `let id: IdView = handle.request(Request::Id).await?`: each view is
/// taken out of the variant that carries it.
macro_rules! response_views {
    ($($variant:ident => $view:ty),* $(,)?) => {$(
        impl TryFrom<Response> for $view {
            type Error = ApiError;
            fn try_from(response: Response) -> Result<Self, ApiError> {
                match response {
                    Response::$variant(view) => Ok(view),
                    other => Err(ApiError::failed(format!(
                        "the node answered with {} where {} was expected",
                        other.shape(),
                        stringify!($view)
                    ))),
                }
            }
        }
    )*};
}

response_views! {
    Id => IdView,
    Status => StatusView,
    Contact => ContactView,
    Contacts => Vec<ContactView>,
    Sent => SendView,
    Group => GroupView,
    Groups => Vec<GroupView>,
    Members => Vec<MemberView>,
    Left => LeftView,
    Conversations => Vec<ConversationView>,
    Messages => Vec<MessageView>,
    Message => MessageView,
    Read => ReadView,
    LinkCode => LinkCodeView,
    Devices => Vec<DeviceView>,
    Revoked => RevokedView,
    Presence => PresenceView,
    Typing => TypingView,
    Relays => Vec<RelayView>,
    Push => PushView,
    Privacy => PrivacyView,
}

/// What `watch` streams. `type` names the kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A message was stored (received, or sent from this device).
    Message(MessageView),
    /// A stored message changed: edited, deleted, or its reactions.
    Updated(MessageView),
    /// A message's status changed (for this user's own messages, also
    /// when a recipient acknowledged it).
    Status {
        id: String,
        conversation: String,
        status: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        progress: Option<Progress>,
    },
    /// A contact came online or went offline.
    Presence {
        user_id: String,
        name: String,
        online: bool,
        last_seen: Option<i64>,
    },
    /// A member started or stopped typing (stops by itself after a few
    /// seconds).
    Typing {
        conversation: String,
        user_id: String,
        name: String,
        typing: bool,
    },
    /// A group's membership changed.
    Member {
        conversation: String,
        name: String,
        epoch: u64,
        members: Vec<MemberView>,
        /// Whether this user is still a member.
        active: bool,
    },
    /// A peer connected or disconnected.
    Peer { peer_id: String, connected: bool },
    /// A device joined this account (`event` is `linked`).
    Device { event: String, device_id: String },
}

impl Event {
    /// The conversation the event is about, if any.
    pub fn conversation(&self) -> Option<&str> {
        match self {
            Self::Message(m) | Self::Updated(m) => Some(&m.conversation),
            Self::Status { conversation, .. }
            | Self::Typing { conversation, .. }
            | Self::Member { conversation, .. } => Some(conversation),
            Self::Presence { .. } | Self::Peer { .. } | Self::Device { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_json_shape() {
        let r: Request =
            serde_json::from_str(r#"{"cmd":"send","target":"bob","text":"hi"}"#).unwrap();
        assert_eq!(
            r,
            Request::Send {
                target: "bob".into(),
                text: "hi".into(),
                reply_to: None
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"send","target":"bob"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"nope"}"#).is_err());
    }

    proptest! {
        #[test]
        fn request_decoder_never_panics(s in ".{0,200}") {
            let _ = serde_json::from_str::<Request>(&s);
        }

        #[test]
        fn request_decoder_survives_bytes(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = serde_json::from_slice::<Request>(&b);
        }
    }
}
