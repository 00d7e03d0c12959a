//! A device comes back to a backlog at its relay and fetches it, over a
//! real network path (target: 10,000 envelopes in < 1 s).
//!
//! The real relay (`weft_relay::Relay::start`, default configuration:
//! default rate limits and mailbox quotas, but no per-mailbox depositor
//! quotas, since one depositor plays the many senders of a backlog;
//! SQLite on the machine's disk) listens
//! on loopback TCP, on its own 2-worker runtime as the binary has. The
//! device and the depositor are libp2p clients on another runtime (TCP,
//! noise, yamux) speaking `/weft/mailbox/1` with `weft_node::mailbox`
//! frames and `weft_node::net::DirectCodec`.
//!
//! 1. The device (`Identity::from_seed`) connects, registers
//!    (`Registration::new`) and goes away.
//! 2. A depositor deposits 10,000 distinct signed envelopes of 300 bytes
//!    into its mailbox (40 deposits of 250, pipelined; the relay verifies
//!    each), all acknowledged (durably stored).
//! 3. The device comes back with a fresh connection and fetches
//!    everything, acknowledging every page, until the mailbox is empty.
//!    Timed from the dial until the last `Ack` is answered (the target's
//!    number), and until a last `Fetch` answers that nothing is left.
//!
//! Step 3 runs in two ways, each on a fresh backlog of 10,000:
//!
//! - **as weft-node does** (`engine/relay.rs`): pages of 512; when a page
//!   arrives the `Ack` for it and the `Fetch` for the next page are sent
//!   together;
//! - **one request at a time**: pages of 1,024 (`MAX_FETCH`); `Fetch`,
//!   wait, `Ack`, wait.
//!
//! Each is checked: every envelope once, in cursor order, byte for byte
//! what was deposited (the pipelined deposits may be stored in any order
//! among themselves), and the relay's store holds nothing for the
//! mailbox afterwards. Every wait has a deadline (60 s); a run that does
//! not complete prints why and exits non-zero.
//!
//! `cargo bench -p weft-relay --bench fetch` (prints its numbers;
//! `FETCH_BENCH_ENVELOPES` changes the backlog). Under
//! `cargo test --benches` (no `--bench` argument) it runs with 1,000 as a
//! smoke test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/client.rs"]
mod client;
mod common;
#[path = "../tests/support/envelopes.rs"]
mod envelopes;
use client::MailboxClient;
use common::{loadavg, utc_now};
use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use libp2p::{Multiaddr, PeerId};
use weft_node::identity::Identity;
use weft_node::mailbox::{MAX_DEPOSIT, MAX_FETCH, MailboxId, MailboxRequest, MailboxResponse};
use weft_relay::store::StoreHandle;
use weft_relay::{Config, Relay};

/// The longest any wait may take.
const DEADLINE: Duration = Duration::from_secs(60);
const TARGET: Duration = Duration::from_secs(1);
const ENVELOPE_BYTES: usize = 300;
/// Envelopes per deposit while setting up the backlog.
const DEPOSIT_BATCH: usize = 250;
/// weft-node's page size (`FETCH_PAGE` in `node/src/node/engine/relay.rs`).
const NODE_PAGE: u32 = 512;

const _: () = assert!(DEPOSIT_BATCH <= MAX_DEPOSIT);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

/// `n` distinct signed envelopes (no two alike, so none is deduplicated
/// away; the relay verifies each).
fn envelopes(seed: u64, n: usize) -> Vec<Vec<u8>> {
    let sender = envelopes::device("fetch bench sender");
    (0..n as u64)
        .map(|i| envelopes::sealed(&sender, seed << 32 | i, ENVELOPE_BYTES))
        .collect()
}

#[derive(Clone, Copy, Debug)]
enum Pattern {
    /// Pages of 512; the ack of a page and the next fetch sent together.
    LikeNode,
    /// Pages of 1,024; fetch, wait, ack, wait.
    OneAtATime,
}

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Pattern::LikeNode => "as weft-node does (pages of 512, ack + next fetch together)",
            Pattern::OneAtATime => "one request at a time (pages of 1,024: fetch, wait, ack, wait)",
        }
    }
}

struct Measured {
    pattern: Pattern,
    load: String,
    deposit: Duration,
    connect: Duration,
    /// Dial until the last ack was answered.
    acked: Duration,
    /// Dial until a final fetch answered that nothing is left.
    empty: Duration,
    pages: u32,
    fetched: usize,
    deleted: u64,
    /// Live wakeups the device got meanwhile (none expected: the mail
    /// was deposited while it was away).
    wakeups: u64,
}

/// What one fetch pass collected.
#[derive(Default)]
struct Pass {
    items: Vec<(u64, Vec<u8>)>,
    pages: u32,
    deleted: u64,
}

fn take_page(pass: &mut Pass, response: MailboxResponse) -> Result<(Option<u64>, bool)> {
    let MailboxResponse::Mail { items, more } = response else {
        bail!("fetch refused: {response:?}");
    };
    pass.pages += 1;
    let up_to = items.last().map(|(c, _)| *c);
    pass.items.extend(items);
    Ok((up_to, more))
}

fn take_ack(pass: &mut Pass, response: MailboxResponse) -> Result<()> {
    let MailboxResponse::Acked { deleted } = response else {
        bail!("ack refused: {response:?}");
    };
    pass.deleted += u64::from(deleted);
    Ok(())
}

/// weft-node's way: when a page arrives, its ack and the next fetch go
/// out together.
async fn fetch_like_node(device: &mut MailboxClient) -> Result<Pass> {
    let mut pass = Pass::default();
    let mut fetch = Some(device.send(&MailboxRequest::Fetch {
        after: 0,
        limit: NODE_PAGE,
    }));
    let mut acks = HashSet::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while fetch.is_some() || !acks.is_empty() {
        let Some((id, response)) = device.next(deadline).await? else {
            continue;
        };
        if fetch == Some(id) {
            fetch = None;
            let (up_to, more) = take_page(&mut pass, response)?;
            if let Some(up_to) = up_to {
                acks.insert(device.send(&MailboxRequest::Ack { up_to }));
                if more {
                    fetch = Some(device.send(&MailboxRequest::Fetch {
                        after: up_to,
                        limit: NODE_PAGE,
                    }));
                }
            }
        } else if acks.remove(&id) {
            take_ack(&mut pass, response)?;
        } else {
            bail!("an answer to nothing asked: {response:?}");
        }
    }
    Ok(pass)
}

async fn fetch_one_at_a_time(device: &mut MailboxClient) -> Result<Pass> {
    let mut pass = Pass::default();
    let mut after = 0;
    loop {
        let response = device
            .call(&MailboxRequest::Fetch {
                after,
                limit: MAX_FETCH,
            })
            .await?;
        let (up_to, more) = take_page(&mut pass, response)?;
        if let Some(up_to) = up_to {
            let response = device.call(&MailboxRequest::Ack { up_to }).await?;
            take_ack(&mut pass, response)?;
            after = up_to;
        }
        if !more {
            return Ok(pass);
        }
    }
}

async fn mailbox_count(store: &StoreHandle, mailbox: MailboxId) -> Result<u64> {
    let info = tokio::time::timeout(DEADLINE, store.mailbox(mailbox))
        .await
        .map_err(|_| anyhow!("the store did not answer within {} s", DEADLINE.as_secs()))??
        .ok_or_else(|| anyhow!("the mailbox is gone"))?;
    Ok(info.envelopes)
}

/// The relay, the device and its mailbox there.
struct Setup {
    addr: Multiaddr,
    store: StoreHandle,
    device: Identity,
    mailbox: MailboxId,
    backlog: usize,
}

async fn measure(setup: &Setup, pattern: Pattern, seed: u64) -> Result<Measured> {
    let Setup {
        ref addr,
        ref store,
        ref device,
        mailbox,
        backlog,
    } = *setup;
    // The backlog, deposited while the device is away.
    let sent = envelopes(seed, backlog);
    let started = Instant::now();
    let mut depositor =
        MailboxClient::connect(libp2p::identity::Keypair::generate_ed25519(), addr, None).await?;
    let deposits: Vec<MailboxRequest> = sent
        .chunks(DEPOSIT_BATCH)
        .map(|chunk| MailboxRequest::Deposit {
            mailbox,
            envelopes: chunk.to_vec(),
        })
        .collect();
    let answers = depositor.call_all(&deposits).await?;
    for (request, answer) in deposits.iter().zip(&answers) {
        let MailboxRequest::Deposit { envelopes, .. } = request else {
            unreachable!()
        };
        ensure!(
            *answer
                == MailboxResponse::Deposited {
                    accepted: envelopes.len() as u32
                },
            "deposit not accepted: {answer:?}"
        );
    }
    let deposit = started.elapsed();
    drop(depositor);
    let held = mailbox_count(store, mailbox).await?;
    ensure!(
        held == backlog as u64,
        "the relay holds {held} envelopes, not {backlog}"
    );

    // The device comes back.
    let load = loadavg();
    let key = device.libp2p_keypair()?;
    let started = Instant::now();
    let mut client = MailboxClient::connect(key, addr, None).await?;
    let connect = started.elapsed();
    let pass = match pattern {
        Pattern::LikeNode => fetch_like_node(&mut client).await?,
        Pattern::OneAtATime => fetch_one_at_a_time(&mut client).await?,
    };
    let acked = started.elapsed();
    let last = client
        .call(&MailboxRequest::Fetch {
            after: 0,
            limit: MAX_FETCH,
        })
        .await?;
    let empty = started.elapsed();
    ensure!(
        last == MailboxResponse::Mail {
            items: Vec::new(),
            more: false
        },
        "the mailbox is not empty after the fetch: {last:?}"
    );
    let wakeups = client.wakeups;

    // Everything once, in order, as deposited; nothing left at the relay.
    ensure!(
        pass.items.len() == backlog,
        "fetched {} envelopes, not {backlog}",
        pass.items.len()
    );
    ensure!(
        pass.items.windows(2).all(|w| w[0].0 < w[1].0),
        "cursors out of order"
    );
    // The pipelined deposits may be stored in any order among themselves.
    let mut got: Vec<&Vec<u8>> = pass.items.iter().map(|(_, e)| e).collect();
    let mut want: Vec<&Vec<u8>> = sent.iter().collect();
    got.sort_unstable();
    want.sort_unstable();
    ensure!(
        got == want,
        "fetched envelopes differ from the deposited ones"
    );
    ensure!(
        pass.deleted == backlog as u64,
        "acks deleted {}, not {backlog}",
        pass.deleted
    );
    let held = mailbox_count(store, mailbox).await?;
    ensure!(held == 0, "the relay still holds {held} envelopes");
    drop(client);
    Ok(Measured {
        pattern,
        load,
        deposit,
        connect,
        acked,
        empty,
        pages: pass.pages,
        fetched: pass.items.len(),
        deleted: pass.deleted,
        wakeups,
    })
}

async fn run(relay: PeerId, addr: Multiaddr, store: StoreHandle, backlog: usize) -> Result<()> {
    let device = Identity::from_seed(b"weft-relay fetch bench device", weft_node::now_ms())?;
    let mailbox = {
        let mut client = MailboxClient::connect(device.libp2p_keypair()?, &addr, None).await?;
        client.register(&device).await?
        // The device goes away.
    };
    ensure!(mailbox == MailboxId::of(&device.device_id(), &relay));
    let setup = Setup {
        addr,
        store,
        device,
        mailbox,
        backlog,
    };
    let mut failed = false;
    for (n, pattern) in [Pattern::LikeNode, Pattern::OneAtATime]
        .into_iter()
        .enumerate()
    {
        let m = measure(&setup, pattern, n as u64)
            .await
            .with_context(|| pattern.name())?;
        let ok = m.acked < TARGET;
        failed |= !ok;
        println!("backlog fetch, {} (load {}):", m.pattern.name(), m.load);
        println!(
            "  setup: {backlog} envelopes of {ENVELOPE_BYTES} B deposited and acknowledged in {:.0} ms",
            ms(m.deposit)
        );
        println!(
            "  {} envelopes in {} pages, {} deleted by acks; dial -> connected {:.1} ms, \
             -> all acknowledged {:.1} ms, -> confirmed empty {:.1} ms",
            m.fetched,
            m.pages,
            m.deleted,
            ms(m.connect),
            ms(m.acked),
            ms(m.empty)
        );
        if m.wakeups > 0 {
            println!("  (the device got {} live wakeup(s) meanwhile)", m.wakeups);
        }
        println!(
            "  target: {backlog} fetched and acknowledged in < {} ms (from the dial): {:.1} ms {}",
            TARGET.as_millis(),
            ms(m.acked),
            verdict(ok)
        );
    }
    if failed {
        println!("backlog fetch: FAIL (see above)");
    }
    Ok(())
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not.
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let backlog = std::env::var("FETCH_BENCH_ENVELOPES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benchmarking { 10_000 } else { 1_000 });
    if !benchmarking {
        println!("smoke test (no --bench): {backlog} envelopes, not a measurement");
    }
    println!(
        "fetch bench: {} UTC, load {}, backlog {backlog}",
        utc_now(),
        loadavg()
    );
    let relay_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut config = Config {
        listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
        metrics: "off".into(),
        ..Config::default()
    };
    // One depositor makes the whole backlog, which in life comes from
    // many: its per-mailbox shares would stop it at 1,000.
    config.storage.max_envelopes_per_peer_per_mailbox = 0;
    config.storage.max_bytes_per_peer_per_mailbox = 0;
    config.storage.max_envelopes_per_ip_per_mailbox = 0;
    config.storage.max_bytes_per_ip_per_mailbox = 0;
    let relay = relay_rt
        .block_on(async { tokio::time::timeout(DEADLINE, Relay::start(&config, dir.path())).await })
        .expect("the relay did not start within the deadline")
        .expect("the relay did not start");
    let addr = relay.listen()[0]
        .clone()
        .with(libp2p::multiaddr::Protocol::P2p(relay.peer_id()));
    let result = client_rt.block_on(run(relay.peer_id(), addr, relay.store().clone(), backlog));
    let stopped =
        relay_rt.block_on(async { tokio::time::timeout(DEADLINE, relay.shutdown()).await });
    if let Err(e) = result {
        println!("backlog fetch: FAIL, did not complete: {e:#}");
        std::process::exit(1);
    }
    if stopped.is_err() {
        println!("the relay did not stop within {} s", DEADLINE.as_secs());
        std::process::exit(1);
    }
}
