//! Stranger vs relay (issue 15, adversarial test 3): a non-member
//! deposits at a victim's mailbox as fast as it can, from one address
//! under many fresh peer ids, with envelopes it signed itself (which the
//! relay cannot tell from honest mail) and some that do not verify. The
//! victim's honest mail is still accepted and delivered, the stranger
//! never holds more of the mailbox than its address's share, and the
//! relay's resident memory and disk stay within their configured limits.
//!
//! The real `weft-relay` binary runs as a child process on loopback; the
//! stranger dials from 127.0.0.2, the honest sender from 127.0.0.3, the
//! victim from 127.0.0.1. The victim stays connected and fetches and
//! acknowledges everything it gets (the junk too: a node does, after
//! rejecting it), which frees the stranger's share for more. Deadlines,
//! not sleeps; the monitor samples memory, disk and what the relay holds
//! every 50 ms.
//!
//! `cargo test -p weft-relay --test stranger` floods for 3 s (CI).
//! `STRANGER_SECS=60 cargo test --release -p weft-relay --test stranger
//! -- --nocapture` is the longer run whose figures are in
//! docs/performance.md; both print what they measured.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/client.rs"]
mod client;
#[path = "support/envelopes.rs"]
mod envelopes;
#[path = "support/process.rs"]
mod process;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use client::MailboxClient;
use envelopes::{device, forged, sealed};
use libp2p::Multiaddr;
use libp2p::request_response::OutboundRequestId;
use process::RelayProcess;
use weft_node::identity::Identity;
use weft_node::mailbox::{MAX_FETCH, MailboxId, MailboxRequest, MailboxResponse, Refusal};

const STRANGER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const FRIEND_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

/// The limits under test (the defaults scaled down, so that a few
/// seconds of flood reach them).
const MAX_MEMORY_MB: u64 = 128;
const MAX_TOTAL_BYTES: u64 = 32 * 1024 * 1024;
const IP_PER_MAILBOX_ENVELOPES: u64 = 500;
const CONFIG: &str = r#"
[storage]
max_envelopes_per_mailbox = 5000
max_bytes_per_mailbox = 16777216
max_total_bytes = 33554432
max_envelopes_per_peer_per_mailbox = 200
max_bytes_per_peer_per_mailbox = 1048576
max_envelopes_per_peer = 1000
max_bytes_per_peer = 4194304
max_envelopes_per_ip_per_mailbox = 500
max_bytes_per_ip_per_mailbox = 2097152
max_envelopes_per_ip = 2000
max_bytes_per_ip = 8388608

[limits]
max_memory_mb = 128

[dht]
advertise = false

[wakeup]
http = false
live_min_interval_ms = 250
"#;

/// Fresh peer ids the stranger uses at once, each on its connection.
const SYBILS: usize = 8;
/// Deposits each keeps in flight.
const WINDOW: usize = 8;
/// Envelopes per stranger deposit, and their size.
const JUNK_PER_DEPOSIT: usize = 32;
const JUNK_BYTES: usize = 1024;
/// Envelopes each sybil signs before the flood.
const JUNK_POOL: usize = 1024;
/// One honest envelope every this long.
/// (10 a second: a chatty sender, within the default 20 requests a
/// second the relay allows a peer.)
const HONEST_EVERY: Duration = Duration::from_millis(100);
const HONEST_BYTES: usize = 600;
/// The victim fetches at least this often (and when woken).
const VICTIM_POLL: Duration = Duration::from_millis(250);
/// How long the end may take once the flood has stopped.
const DRAIN: Duration = Duration::from_secs(60);

fn flood_time() -> Duration {
    let secs = std::env::var("STRANGER_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    Duration::from_secs(secs)
}

/// What one side of the flood saw.
#[derive(Debug, Default)]
struct Tally {
    deposits: u64,
    envelopes: u64,
    accepted_envelopes: u64,
    refused: HashMap<&'static str, u64>,
    /// Ack latency of accepted deposits.
    latencies: Vec<Duration>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.deposits += other.deposits;
        self.envelopes += other.envelopes;
        self.accepted_envelopes += other.accepted_envelopes;
        for (k, v) in other.refused {
            *self.refused.entry(k).or_default() += v;
        }
        self.latencies.extend(other.latencies);
    }

    fn note(&mut self, response: &MailboxResponse, envelopes: usize, took: Duration) {
        match response {
            MailboxResponse::Deposited { .. } => {
                self.accepted_envelopes += envelopes as u64;
                self.latencies.push(took);
            }
            MailboxResponse::Refused { reason, message } => {
                let key = match reason {
                    Refusal::BadRequest => "bad request (unverifiable)",
                    Refusal::MailboxFull if message.contains("without being checked") => {
                        "depositor quota (cooling off, unchecked)"
                    }
                    Refusal::MailboxFull if message.contains("depositor quota") => {
                        "depositor quota"
                    }
                    Refusal::MailboxFull => "mailbox or relay full",
                    Refusal::RateLimited if message.contains("did not verify") => {
                        "cooling off after an unverifiable deposit"
                    }
                    Refusal::RateLimited => "rate limited",
                    Refusal::Unavailable => "unavailable",
                    Refusal::Forbidden | Refusal::NotRegistered => "other",
                };
                *self.refused.entry(key).or_default() += 1;
            }
            other => panic!("unexpected answer to a deposit: {other:?}"),
        }
    }

    /// The `p` quantile of the latencies (sorted by `add`'s caller).
    fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[i]
    }
}

/// A sybil's envelopes, signed before the flood and used in turn: once
/// the victim has acknowledged one, depositing it again stores it again,
/// so the pool is as good as fresh envelopes and costs no signing.
fn junk_pool(me: &Identity) -> (Vec<Vec<u8>>, Vec<u8>) {
    let pool = (0..JUNK_POOL as u64)
        .map(|n| sealed(me, n, JUNK_BYTES))
        .collect();
    (pool, forged(me, JUNK_POOL as u64, JUNK_BYTES))
}

/// One of the stranger's peer ids: deposits as fast as the relay
/// answers, `WINDOW` at a time, until `end`. Every eighth deposit has an
/// envelope that does not verify, last (so the relay verifies the rest
/// first).
async fn sybil(
    me: Identity,
    (pool, bad): (Vec<Vec<u8>>, Vec<u8>),
    relay: Multiaddr,
    mailbox: MailboxId,
    end: Instant,
) -> Tally {
    let mut client =
        MailboxClient::connect(me.libp2p_keypair().unwrap(), &relay, Some(STRANGER_IP))
            .await
            .unwrap();
    let mut tally = Tally::default();
    let mut in_flight: HashMap<OutboundRequestId, (Instant, usize)> = HashMap::new();
    let mut next = 0usize;
    let deadline = tokio::time::Instant::from_std(end + DRAIN);
    loop {
        while Instant::now() < end && in_flight.len() < WINDOW {
            tally.deposits += 1;
            let mut junk: Vec<Vec<u8>> = (0..JUNK_PER_DEPOSIT)
                .map(|_| {
                    next = (next + 1) % pool.len();
                    pool[next].clone()
                })
                .collect();
            if tally.deposits % 8 == 0 {
                junk[JUNK_PER_DEPOSIT - 1] = bad.clone();
            }
            tally.envelopes += junk.len() as u64;
            let id = client.send(&MailboxRequest::Deposit {
                mailbox,
                envelopes: junk,
            });
            in_flight.insert(id, (Instant::now(), JUNK_PER_DEPOSIT));
        }
        if in_flight.is_empty() {
            return tally;
        }
        if let Some((id, response)) = client.next(deadline).await.unwrap() {
            let (sent, count) = in_flight.remove(&id).expect("an answer to a request sent");
            tally.note(&response, count, sent.elapsed());
        }
    }
}

/// The honest sender: one envelope per deposit, every
/// [`HONEST_EVERY`], until `end`. Returns what the relay accepted.
async fn friend(relay: Multiaddr, mailbox: MailboxId, end: Instant) -> (Tally, Vec<Vec<u8>>) {
    let me = device("friend");
    let mut client = MailboxClient::connect(me.libp2p_keypair().unwrap(), &relay, Some(FRIEND_IP))
        .await
        .unwrap();
    let mut tally = Tally::default();
    let mut sent = Vec::new();
    let mut pace = tokio::time::interval(HONEST_EVERY);
    let mut n = 0;
    while Instant::now() < end {
        pace.tick().await;
        n += 1;
        let envelope = sealed(&me, n, HONEST_BYTES);
        tally.deposits += 1;
        tally.envelopes += 1;
        let started = Instant::now();
        let response = client
            .call(&MailboxRequest::Deposit {
                mailbox,
                envelopes: vec![envelope.clone()],
            })
            .await
            .unwrap();
        tally.note(&response, 1, started.elapsed());
        if matches!(response, MailboxResponse::Deposited { .. }) {
            sent.push(envelope);
        }
    }
    (tally, sent)
}

/// The victim: fetches and acknowledges whatever arrives until it holds
/// every envelope of `honest` (told once the honest sender is done) and
/// the flood is over. Like a node, it fetches when woken (or every
/// [`VICTIM_POLL`]) and, when the relay's rate limit refuses it, tries
/// again at the next turn. Returns what it fetched, and how often it was
/// rate limited.
async fn victim(
    mut client: MailboxClient,
    honest: tokio::sync::oneshot::Receiver<Vec<Vec<u8>>>,
    end: Instant,
) -> (HashSet<Vec<u8>>, u64) {
    let mut honest = honest;
    let mut want: Option<HashSet<Vec<u8>>> = None;
    let mut got = HashSet::new();
    let mut after = 0;
    let mut unacked = None;
    let mut rate_limited = 0;
    let deadline = tokio::time::Instant::from_std(end + DRAIN);
    loop {
        if want.is_none()
            && let Ok(sent) = honest.try_recv()
        {
            want = Some(sent.into_iter().collect());
        }
        if let Some(want) = &want
            && Instant::now() >= end
            && unacked.is_none()
            && want.is_subset(&got)
        {
            return (got, rate_limited);
        }
        let mut idle = false;
        if let Some(up_to) = unacked {
            match client.call(&MailboxRequest::Ack { up_to }).await.unwrap() {
                MailboxResponse::Acked { .. } => unacked = None,
                MailboxResponse::Refused {
                    reason: Refusal::RateLimited,
                    ..
                } => {
                    rate_limited += 1;
                    idle = true;
                }
                other => panic!("ack refused: {other:?}"),
            }
        }
        if !idle {
            let fetch = MailboxRequest::Fetch {
                after,
                limit: MAX_FETCH,
            };
            match client.call(&fetch).await.unwrap() {
                MailboxResponse::Mail { items, more } => {
                    if let Some((last, _)) = items.last() {
                        after = *last;
                        unacked = Some(after);
                    }
                    idle = !more && unacked.is_none();
                    got.extend(items.into_iter().map(|(_, e)| e));
                }
                MailboxResponse::Refused {
                    reason: Refusal::RateLimited,
                    ..
                } => {
                    rate_limited += 1;
                    idle = true;
                }
                other => panic!("fetch refused: {other:?}"),
            }
        }
        if idle {
            // Until a wakeup, or the next poll.
            let wakeups = client.wakeups + 1;
            let until = (tokio::time::Instant::now() + VICTIM_POLL).min(deadline);
            let _ = client.wait_for_wakeups(wakeups, until).await;
            assert!(
                tokio::time::Instant::now() < deadline,
                "the honest mail was not all delivered in time"
            );
        }
    }
}

/// Highest readings of the relay while the flood runs.
#[derive(Debug, Default, Clone, Copy)]
struct Peaks {
    rss_kib: u64,
    disk: u64,
    stored_envelopes: f64,
    stored_bytes: f64,
    samples: u64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_flooding_a_mailbox_does_not_keep_out_honest_mail_or_exhaust_the_relay() {
    let flood = flood_time();
    let dir = tempfile::tempdir().unwrap();
    let relay = Arc::new(RelayProcess::start(CONFIG, &dir.path().join("relay")));
    let (_, idle_hwm) = relay.rss_kib();

    // The victim registers and stays connected.
    let me = device("victim");
    let mut victim_client = MailboxClient::connect(me.libp2p_keypair().unwrap(), &relay.addr, None)
        .await
        .unwrap();
    let mailbox = victim_client.register(&me).await.unwrap();

    // The monitor, on a thread of its own (it reads /proc and /metrics).
    let stop = Arc::new(AtomicBool::new(false));
    let monitor = {
        let relay = relay.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peaks = Peaks::default();
            let mut tick = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let (rss, _) = relay.rss_kib();
                peaks.rss_kib = peaks.rss_kib.max(rss);
                peaks.disk = peaks.disk.max(relay.disk_bytes());
                peaks.stored_envelopes = peaks
                    .stored_envelopes
                    .max(relay.metric("weft_relay_stored_envelopes"));
                peaks.stored_bytes = peaks
                    .stored_bytes
                    .max(relay.metric("weft_relay_stored_bytes"));
                peaks.samples += 1;
                tick += Duration::from_millis(50);
                std::thread::sleep(tick.saturating_duration_since(Instant::now()));
            }
            peaks
        })
    };

    // The stranger, on a thread and runtime of its own (as if on its own
    // machine, but for the CPU it shares), signs first.
    let sybils: Vec<(Identity, _)> = (0..SYBILS)
        .map(|n| {
            let me = device(&format!("stranger {n}"));
            let pool = junk_pool(&me);
            (me, pool)
        })
        .collect();
    let started = Instant::now();
    let end = started + flood;
    let stranger_thread = {
        let addr = relay.addr.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let tasks: Vec<_> = sybils
                    .into_iter()
                    .map(|(me, pool)| tokio::spawn(sybil(me, pool, addr.clone(), mailbox, end)))
                    .collect();
                let mut stranger = Tally::default();
                for t in tasks {
                    stranger.add(t.await.unwrap());
                }
                stranger
            })
        })
    };
    let (honest_tx, honest_rx) = tokio::sync::oneshot::channel();
    let victim_task = tokio::spawn(victim(victim_client, honest_rx, end));
    let (mut honest, sent) = friend(relay.addr.clone(), mailbox, end).await;
    let _ = honest_tx.send(sent.clone());
    let stranger = stranger_thread.join().unwrap();
    let (got, victim_rate_limited) = victim_task.await.unwrap();
    let delivered_at = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let peaks = monitor.join().unwrap();
    let (rss_end, hwm) = relay.rss_kib();
    let unverified = relay.metric("weft_relay_unverified_deposits_total");
    let cooled = relay.metric("weft_relay_deposits_cooled_off_total");
    let quota_refusals: Vec<(String, f64)> = ["peer_per_mailbox", "peer", "ip_per_mailbox", "ip"]
        .iter()
        .map(|q| {
            let name = format!("weft_relay_depositor_quota_refusals_total{{quota=\"{q}\"}}");
            (q.to_string(), relay.metric(&name))
        })
        .collect();
    let relay_cpu = relay.cpu();

    let stranger_refused: u64 = stranger.refused.values().sum();
    honest.latencies.sort_unstable();
    println!(
        "stranger vs relay: flood of {:.0} s, {SYBILS} peer ids from {STRANGER_IP} keeping \
         {WINDOW} deposits of {JUNK_PER_DEPOSIT} x {JUNK_BYTES} B in flight each",
        flood.as_secs_f64()
    );
    println!(
        "  stranger: {} deposits ({} envelopes) attempted, {} accepted ({} envelopes), {} refused: {:?}",
        stranger.deposits,
        stranger.envelopes,
        stranger.latencies.len(),
        stranger.accepted_envelopes,
        stranger_refused,
        stranger.refused
    );
    println!(
        "  relay counted: unverified deposits {unverified}, depositor quota refusals \
         {quota_refusals:?}, refused unchecked while cooling off {cooled}"
    );
    println!(
        "  honest: {} sent (one every {} ms), {} accepted, {} refused {:?}, ack p50 {:.1} ms, \
         p99 {:.1} ms, max {:.1} ms; {} of {} delivered to the victim, all by {:.1} s \
         (its fetches and acks were rate limited {} times)",
        honest.deposits,
        HONEST_EVERY.as_millis(),
        honest.accepted_envelopes,
        honest.refused.values().sum::<u64>(),
        honest.refused,
        ms(honest.percentile(0.5)),
        ms(honest.percentile(0.99)),
        ms(honest.percentile(1.0)),
        sent.iter().filter(|e| got.contains(*e)).count(),
        sent.len(),
        delivered_at.as_secs_f64(),
        victim_rate_limited
    );
    println!(
        "  relay: RSS peak {:.1} MiB (VmHWM {:.1} MiB; idle {:.1}; at the end {:.1}), limit {MAX_MEMORY_MB} MiB; \
         database files peak {:.1} MiB, max_total_bytes {:.0} MiB; stored peak {} envelopes, \
         {:.2} MiB; CPU {:.1} s; {} samples",
        peaks.rss_kib as f64 / 1024.0,
        hwm as f64 / 1024.0,
        idle_hwm as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        peaks.disk as f64 / 1048576.0,
        MAX_TOTAL_BYTES as f64 / 1048576.0,
        peaks.stored_envelopes,
        peaks.stored_bytes / 1048576.0,
        relay_cpu.as_secs_f64(),
        peaks.samples
    );

    // Honest mail: all accepted, all delivered.
    assert_eq!(
        honest.accepted_envelopes, honest.deposits,
        "honest deposits refused: {:?}",
        honest.refused
    );
    assert!(honest.deposits > 0);
    assert!(
        sent.iter().all(|e| got.contains(e)),
        "honest mail missing at the victim"
    );
    // The stranger was held to its share and told why.
    assert!(
        stranger
            .refused
            .get("depositor quota")
            .copied()
            .unwrap_or(0)
            > 0,
        "{:?}",
        stranger.refused
    );
    assert!(stranger.refused.contains_key("bad request (unverifiable)"));
    assert!(unverified > 0.0);
    assert!(cooled > 0.0);
    // What the relay held never exceeded the stranger's address's share
    // of the mailbox plus the honest mail.
    assert!(
        peaks.stored_envelopes <= (IP_PER_MAILBOX_ENVELOPES + honest.deposits) as f64,
        "the relay held {} envelopes",
        peaks.stored_envelopes
    );
    assert!(peaks.stored_bytes <= MAX_TOTAL_BYTES as f64);
    // Memory and disk within the configured limits.
    assert!(
        peaks.rss_kib.max(hwm) <= MAX_MEMORY_MB * 1024,
        "RSS {} KiB over {MAX_MEMORY_MB} MiB",
        peaks.rss_kib.max(hwm)
    );
    assert!(
        peaks.disk <= MAX_TOTAL_BYTES,
        "the database files took {} bytes, over max_total_bytes",
        peaks.disk
    );
}
