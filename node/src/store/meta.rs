//! Every key of the `meta` table (small values this device keeps outside
//! the other tables), in one place so that no two parts of the node pick
//! the same name.

/// The display name of this device's user (UTF-8).
pub const NAME: &str = "display_name";
/// This device still has to fetch the account's history (set when it is
/// linked; holds the window start in ms, decimal).
pub const HISTORY_NEEDED: &str = "history_needed";
/// The account's invite, for a device without the user key.
pub const ACCOUNT_INVITE: &str = "account_invite";
/// Who sees this user's presence and typing (`everyone`, `contacts`,
/// `nobody`).
pub const PRESENCE_SHARE: &str = "presence_share";
/// The push (wakeup) endpoint registered at relays.
pub const PUSH_URL: &str = "push_url";
/// Relays found through the DHT: lines `<seen ms> <addr>`.
pub const RELAYS_FOUND: &str = "relays_found";
/// The relays the last daemon was started with, one address per line:
/// what an invite made offline names.
pub const RELAYS_USED: &str = "relays_used";
/// When the last key expiry pass ran (big-endian unix ms).
pub const KEYS_EXPIRED_AT: &str = "keys_expired_at";
