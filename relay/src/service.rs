//! The mailbox service: answers each `/weft/mailbox/1` request from a
//! peer whose id the connection authenticated (noise).
//!
//! [`Service::handle`] does the cheap part at once — rate limit, decode,
//! size limits, registration checks, access rules, a depositor's cool-off
//! — and returns a future for the rest, which the swarm task polls: a
//! deposit's envelopes are verified as signed Weft envelopes by the
//! [`Verifier`] (on threads of its own: neither the swarm task nor the
//! store thread waits for ed25519), then the store does its part. A
//! response is never sent before what it promises is on disk. Every
//! refusal says why (a [`Refusal`] and a message); nothing is dropped
//! silently.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::FutureExt;
use futures::future::BoxFuture;
use libp2p::PeerId;
use weft_proto::crypto::envelope::MAX_ENVELOPE_BYTES;
use weft_proto::mailbox::{
    MAX_DEPOSIT, MAX_FETCH, MailboxId, MailboxRequest, MailboxResponse, Refusal, Registration,
    RegistrationError,
};
use weft_proto::net::MAX_DIRECT_RESPONSE;

use crate::config::Access;
use crate::depositor::{CoolOff, Cooling, Depositor, Source};
use crate::limiter::RateLimiter;
use crate::metrics::RelayMetrics;
use crate::store::{
    AckOutcome, DepositOutcome, FetchOutcome, Full, QuotaKind, RegisterOutcome, StoreError,
    StoreHandle, Unit, WakeTarget,
};
use crate::verifier::{Verifier, VerifyError};
use crate::wakeup;

/// Most peers whose request rate is tracked at once.
const MAX_TRACKED_PEERS: usize = 65_536;
/// Most depositors cooling off at once.
const MAX_COOLING: usize = 65_536;
/// A fetch's envelopes stay this far below the response frame limit.
pub const FETCH_MAX_BYTES: usize = MAX_DIRECT_RESPONSE - 64 * 1024;

/// The service's rules.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    pub access: Access,
    pub requests_per_sec: f64,
    pub request_burst: u32,
    /// Accept wakeup URLs on private or loopback addresses.
    pub allow_private_wakeup: bool,
    /// Threads verifying deposits.
    pub verify_threads: usize,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            access: Access::Open,
            requests_per_sec: 20.0,
            request_burst: 200,
            allow_private_wakeup: false,
            // One per CPU.
            verify_threads: std::thread::available_parallelism().map_or(2, usize::from),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("cannot start the verifier threads: {0}")]
    Verifier(#[from] std::io::Error),
}

/// A request's answer, and whom to wake because of it.
#[derive(Debug)]
pub struct Handled {
    pub response: MailboxResponse,
    pub wake: Option<WakeTarget>,
}

impl Handled {
    fn reply(response: MailboxResponse) -> Self {
        Self {
            response,
            wake: None,
        }
    }
}

/// The mailbox service of one relay. Owned by the swarm task.
#[derive(Debug)]
pub struct Service {
    relay: PeerId,
    config: ServiceConfig,
    store: StoreHandle,
    limiter: RateLimiter<PeerId>,
    verifier: Verifier,
    cool_off: Arc<Mutex<CoolOff>>,
    metrics: RelayMetrics,
    draining: bool,
}

impl Service {
    pub fn new(
        relay: PeerId,
        config: ServiceConfig,
        store: StoreHandle,
        metrics: RelayMetrics,
    ) -> Result<Self, ServiceError> {
        let limiter = RateLimiter::new(
            config.requests_per_sec,
            config.request_burst,
            MAX_TRACKED_PEERS,
        );
        Ok(Self {
            relay,
            verifier: Verifier::spawn(config.verify_threads)?,
            cool_off: Arc::new(Mutex::new(CoolOff::new(MAX_COOLING))),
            config,
            store,
            limiter,
            metrics,
            draining: false,
        })
    }

    /// From now on every request is refused as `Unavailable`.
    pub fn drain(&mut self) {
        self.draining = true;
    }

    pub fn metrics(&self) -> &RelayMetrics {
        &self.metrics
    }

    fn refuse(&self, reason: Refusal, message: impl Into<String>) -> BoxFuture<'static, Handled> {
        self.metrics.refused(reason);
        futures::future::ready(Handled::reply(MailboxResponse::refused(reason, message))).boxed()
    }

    /// Handles one request from `peer` (the connection's authenticated
    /// peer id), connected from `source`, received at `now`; `now_ms` is
    /// the wall clock.
    pub fn handle(
        &mut self,
        peer: PeerId,
        source: Source,
        request: &[u8],
        now: Instant,
        now_ms: i64,
    ) -> BoxFuture<'static, Handled> {
        if self.draining {
            return self.refuse(Refusal::Unavailable, "the relay is shutting down");
        }
        if !self.limiter.allow(&peer, now) {
            return self.refuse(
                Refusal::RateLimited,
                format!(
                    "too many requests: at most {} per second (bursts of {}); try again later",
                    self.config.requests_per_sec, self.config.request_burst
                ),
            );
        }
        let Some(request) = MailboxRequest::decode(request) else {
            return self.refuse(Refusal::BadRequest, "malformed mailbox request");
        };
        match request {
            MailboxRequest::Register(registration) => self.register(peer, *registration, now_ms),
            MailboxRequest::Deposit { mailbox, envelopes } => {
                self.deposit(mailbox, Depositor { peer, source }, envelopes, now, now_ms)
            }
            MailboxRequest::Fetch { after, limit } => self.fetch(peer, after, limit, now_ms),
            MailboxRequest::Ack { up_to } => self.ack(peer, up_to, now_ms),
            MailboxRequest::Wakeup => {
                self.refuse(Refusal::BadRequest, "a relay does not take wakeups")
            }
        }
    }

    fn register(
        &mut self,
        peer: PeerId,
        registration: Registration,
        now_ms: i64,
    ) -> BoxFuture<'static, Handled> {
        let mailbox = match registration.verify(&self.relay, &peer, now_ms) {
            Ok(mailbox) => mailbox,
            Err(RegistrationError::BadUrl) => {
                return self.refuse(Refusal::BadRequest, RegistrationError::BadUrl.to_string());
            }
            Err(e) => return self.refuse(Refusal::Forbidden, format!("registration refused: {e}")),
        };
        if let Some(url) = &registration.wakeup
            && let Err(why) = wakeup::check_url(url, self.config.allow_private_wakeup)
        {
            return self.refuse(Refusal::BadRequest, why);
        }
        // Whether a token must admit the mailbox if it is new.
        let token_ok = match &self.config.access {
            Access::Open => true,
            Access::AllowList(users) => {
                if !users.contains(&registration.certificate.user) {
                    return self.refuse(
                        Refusal::Forbidden,
                        "this relay admits only the users on its allow-list",
                    );
                }
                true
            }
            Access::Invite(tokens) => registration
                .token
                .as_ref()
                .is_some_and(|t| tokens.contains(t)),
        };
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        let ttl_secs = store.limits().mail_ttl.as_secs();
        let wakeup = registration.wakeup;
        async move {
            // The user id was checked above and is not stored: the relay
            // keeps only the opaque mailbox id and the peer binding.
            let result = store
                .call(0, move |db| {
                    if !token_ok && db.mailbox(mailbox)?.is_none() {
                        return Ok(None);
                    }
                    db.register(mailbox, &peer, wakeup.as_deref(), now_ms)
                        .map(Some)
                })
                .await;
            let response = match result {
                Ok(Some(RegisterOutcome::Registered { .. })) => {
                    metrics.registered();
                    return Handled::reply(MailboxResponse::Registered { mailbox, ttl_secs });
                }
                Ok(None) => (
                    Refusal::Forbidden,
                    "this relay admits new mailboxes only with a valid invite token".to_string(),
                ),
                Ok(Some(RegisterOutcome::RelayFull { max })) => (
                    Refusal::Unavailable,
                    format!("this relay holds its maximum of {max} mailboxes; try another relay"),
                ),
                Ok(Some(RegisterOutcome::Conflict)) => (
                    Refusal::Forbidden,
                    "this mailbox is bound to another device".to_string(),
                ),
                Err(e) => storage_failed(&e),
            };
            metrics.refused(response.0);
            Handled::reply(MailboxResponse::refused(response.0, response.1))
        }
        .boxed()
    }

    fn deposit(
        &mut self,
        mailbox: MailboxId,
        depositor: Depositor,
        envelopes: Vec<Vec<u8>>,
        now: Instant,
        now_ms: i64,
    ) -> BoxFuture<'static, Handled> {
        if envelopes.is_empty() {
            return self.refuse(Refusal::BadRequest, "a deposit needs at least one envelope");
        }
        if envelopes.len() > MAX_DEPOSIT {
            return self.refuse(
                Refusal::BadRequest,
                format!(
                    "a deposit holds at most {MAX_DEPOSIT} envelopes, not {}",
                    envelopes.len()
                ),
            );
        }
        if let Some((i, e)) = envelopes
            .iter()
            .enumerate()
            .find(|(_, e)| e.is_empty() || e.len() > MAX_ENVELOPE_BYTES)
        {
            return self.refuse(
                Refusal::BadRequest,
                format!(
                    "envelope {i} is {} bytes; envelopes are 1 to {MAX_ENVELOPE_BYTES} bytes",
                    e.len()
                ),
            );
        }
        let cooling = self
            .cool_off
            .lock()
            .ok()
            .and_then(|c| c.check(&depositor, mailbox, now));
        if let Some(why) = cooling {
            self.metrics.cooled();
            let (reason, message) = cooling_refusal(&depositor, mailbox, why);
            return self.refuse(reason, message);
        }
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        let verifier = self.verifier.clone();
        let cool_off = self.cool_off.clone();
        let cool = move |why| {
            if let Ok(mut c) = cool_off.lock() {
                c.refused(&depositor, mailbox, why, now);
            }
        };
        async move {
            let envelopes = match verifier.verify(envelopes).await {
                Ok(envelopes) => envelopes,
                Err(e) => {
                    let (reason, message) = match e {
                        VerifyError::Envelope { .. } => {
                            metrics.unverified();
                            cool(Cooling::Unverified);
                            (Refusal::BadRequest, format!("{e}; nothing was stored"))
                        }
                        VerifyError::Busy => (
                            Refusal::Unavailable,
                            "the relay is busy; nothing was stored, try again shortly".to_string(),
                        ),
                        VerifyError::Stopped => (
                            Refusal::Unavailable,
                            "the relay is shutting down; nothing was stored".to_string(),
                        ),
                    };
                    metrics.refused(reason);
                    return Handled::reply(MailboxResponse::refused(reason, message));
                }
            };
            let (reason, message) = match store.deposit(mailbox, depositor, envelopes, now_ms).await
            {
                Ok(DepositOutcome::Stored {
                    accepted,
                    new,
                    wake,
                }) => {
                    metrics.deposited(accepted);
                    return Handled {
                        response: MailboxResponse::Deposited { accepted },
                        wake: (new > 0).then_some(wake),
                    };
                }
                Ok(DepositOutcome::NotRegistered) => (
                    Refusal::NotRegistered,
                    format!("no mailbox {mailbox} at this relay"),
                ),
                Ok(DepositOutcome::Full(full)) => (
                    Refusal::MailboxFull,
                    match full {
                        Full::Count { max } => format!(
                            "mailbox {mailbox} is full ({max} envelopes waiting); \
                             nothing was stored, try again later"
                        ),
                        Full::Bytes { max } => format!(
                            "mailbox {mailbox} is full ({max} bytes waiting); \
                             nothing was stored, try again later"
                        ),
                        Full::Relay => {
                            "the relay's storage is full; nothing was stored".to_string()
                        }
                        Full::Depositor {
                            quota,
                            unit,
                            waiting,
                            max,
                        } => {
                            metrics.over_quota(quota);
                            cool(Cooling::Quota(full));
                            quota_message(&depositor, mailbox, quota, unit, waiting, max)
                        }
                    },
                ),
                Err(e) => storage_failed(&e),
            };
            metrics.refused(reason);
            Handled::reply(MailboxResponse::refused(reason, message))
        }
        .boxed()
    }

    fn fetch(
        &mut self,
        peer: PeerId,
        after: u64,
        limit: u32,
        now_ms: i64,
    ) -> BoxFuture<'static, Handled> {
        let limit = limit.clamp(1, MAX_FETCH);
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        async move {
            let (reason, message) = match store
                .fetch(peer, after, limit, FETCH_MAX_BYTES, now_ms)
                .await
            {
                Ok(FetchOutcome::Mail { items, more, .. }) => {
                    metrics.fetched(items.len());
                    return Handled::reply(MailboxResponse::Mail { items, more });
                }
                Ok(FetchOutcome::NotRegistered) => not_registered(),
                Err(e) => storage_failed(&e),
            };
            metrics.refused(reason);
            Handled::reply(MailboxResponse::refused(reason, message))
        }
        .boxed()
    }

    fn ack(&mut self, peer: PeerId, up_to: u64, now_ms: i64) -> BoxFuture<'static, Handled> {
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        async move {
            let (reason, message) = match store.ack(peer, up_to, now_ms).await {
                Ok(AckOutcome::Acked { deleted }) => {
                    metrics.acked();
                    return Handled::reply(MailboxResponse::Acked { deleted });
                }
                Ok(AckOutcome::NotRegistered) => not_registered(),
                Err(e) => storage_failed(&e),
            };
            metrics.refused(reason);
            Handled::reply(MailboxResponse::refused(reason, message))
        }
        .boxed()
    }
}

/// The refusal of a deposit from a depositor that is cooling off.
fn cooling_refusal(depositor: &Depositor, mailbox: MailboxId, why: Cooling) -> (Refusal, String) {
    let secs = CoolOff::PERIOD.as_secs_f64();
    match why {
        Cooling::Quota(Full::Depositor {
            quota,
            unit,
            waiting,
            max,
        }) => (
            Refusal::MailboxFull,
            format!(
                "{} (refused without being checked: this was so less than {secs} s ago)",
                quota_message(depositor, mailbox, quota, unit, waiting, max)
            ),
        ),
        Cooling::Quota(_) | Cooling::Unverified => (
            Refusal::RateLimited,
            format!(
                "peer {} deposited an envelope that did not verify less than {secs} s ago; \
                 its deposits are refused until then, nothing was stored",
                depositor.peer
            ),
        ),
    }
}

/// Says which of a depositor's quotas a deposit would go over, with the
/// configuration key that sets it.
fn quota_message(
    depositor: &Depositor,
    mailbox: MailboxId,
    quota: QuotaKind,
    unit: Unit,
    waiting: u64,
    max: u64,
) -> String {
    let unit = match unit {
        Unit::Envelopes => "envelopes",
        Unit::Bytes => "bytes",
    };
    let (who, whose, key) = match quota {
        QuotaKind::PeerPerMailbox | QuotaKind::Peer => {
            (format!("peer {}", depositor.peer), "peer", "peer")
        }
        QuotaKind::IpPerMailbox | QuotaKind::Ip => {
            (format!("address {}", depositor.source), "address", "ip")
        }
    };
    let (where_, per_mailbox) = match quota {
        QuotaKind::PeerPerMailbox | QuotaKind::IpPerMailbox => {
            (format!("in mailbox {mailbox}"), "_per_mailbox")
        }
        QuotaKind::Peer | QuotaKind::Ip => ("at this relay".to_string(), ""),
    };
    format!(
        "depositor quota: {who} has {waiting} {unit} waiting {where_}, and one {whose} may have \
         at most {max} (storage.max_{unit}_per_{key}{per_mailbox}); nothing was stored, \
         try again once the recipient has fetched some"
    )
}

fn not_registered() -> (Refusal, String) {
    (
        Refusal::NotRegistered,
        "this device has no mailbox at this relay; register first".to_string(),
    )
}

fn storage_failed(e: &StoreError) -> (Refusal, String) {
    tracing::error!("storage failed: {e}");
    let message = match e {
        StoreError::Closed => "the relay is shutting down",
        _ => "the relay's storage failed; nothing was stored",
    };
    (Refusal::Unavailable, message.to_string())
}
