//! End-to-end durable deposits: many clients over libp2p TCP (loopback)
//! to the real `weft-relay` binary, each waiting for its deposit's ack.
//! Target: at least 5,000 durable envelopes acknowledged per second with
//! 128 clients; ack latency p50/p99 reported.
//!
//! The relay is the release binary (`CARGO_BIN_EXE_weft-relay`) as a
//! child process (killed on drop) with the default configuration but for
//! the per-peer request rate (20/s would cap each client), so the normal
//! path: every envelope is parsed and its signature verified, depositor
//! and mailbox quotas are counted, and a deposit is acknowledged only
//! after its batch's commit (WAL, `synchronous=FULL`: an fsync). Its
//! database is on the machine's disk (the target directory).
//!
//! 64 device identities register a mailbox each and go away. Then each
//! client (its own identity: the peer id of its connection is its device
//! key) dials the relay, and once all are connected the clock starts:
//! each sends its deposits — envelopes sealed beforehand with weft-proto
//! by its own device key, 1 KiB each, to the mailboxes in turn — keeping
//! `DEPOSIT_E2E_WINDOW` (default 1) in flight, and times each from send
//! to answer. Every answer must be `Deposited`. After the run the relay
//! is killed with SIGKILL and its database is opened: every acknowledged
//! envelope must be in it.
//!
//! `cargo bench -p weft-relay --bench deposit_e2e`. `DEPOSIT_E2E_CLIENTS`
//! (128), `DEPOSIT_E2E_ENVELOPES` (64,000), `DEPOSIT_E2E_PER_REQUEST` (1)
//! and `DEPOSIT_E2E_WINDOW` (1) change the load. Under
//! `cargo test --benches` (no `--bench`) it runs 8 clients and 400
//! envelopes as a smoke test. Every wait has a deadline (60 s per
//! answer); past it the bench stops with an error.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/client.rs"]
mod client;
mod common;
#[path = "../tests/support/envelopes.rs"]
mod envelopes;
#[path = "../tests/support/process.rs"]
mod process;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use client::MailboxClient;
use common::{loadavg, utc_now};
use futures::future::join_all;
use libp2p::request_response::OutboundRequestId;
use process::{RelayProcess, cpu_of, threads_cpu};
use weft_node::identity::Identity;
use weft_node::mailbox::{MAX_DEPOSIT, MailboxId, MailboxRequest, MailboxResponse};

const MAILBOXES: usize = 64;
const ENVELOPE_BYTES: usize = 1024;
const TARGET_PER_SEC: f64 = 5_000.0;
/// The longest any one answer may take.
const DEADLINE: Duration = Duration::from_secs(60);
const CONFIG: &str = "[limits]\nrequests_per_sec = 1000000.0\nrequest_burst = 1000000\n";

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Load {
    clients: usize,
    envelopes: usize,
    per_request: usize,
    window: usize,
}

/// One client's run: envelopes acknowledged, and each deposit's latency.
struct ClientRun {
    acked: u64,
    latencies: Vec<Duration>,
}

async fn client_run(
    mut client: MailboxClient,
    mut requests: Vec<Vec<u8>>,
    window: usize,
) -> Result<ClientRun> {
    let mut run = ClientRun {
        acked: 0,
        latencies: Vec::with_capacity(requests.len()),
    };
    let mut in_flight: HashMap<OutboundRequestId, Instant> = HashMap::new();
    let mut next = 0;
    loop {
        while in_flight.len() < window && next < requests.len() {
            let request = std::mem::take(&mut requests[next]);
            next += 1;
            in_flight.insert(client.send_encoded(request), Instant::now());
        }
        if in_flight.is_empty() {
            return Ok(run);
        }
        let deadline = tokio::time::Instant::now() + DEADLINE;
        if let Some((id, response)) = client.next(deadline).await? {
            let sent = in_flight
                .remove(&id)
                .context("an answer to nothing asked")?;
            run.latencies.push(sent.elapsed());
            match response {
                MailboxResponse::Deposited { accepted } => run.acked += u64::from(accepted),
                other => bail!("deposit not accepted: {other:?}"),
            }
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn run(load: Load) -> Result<bool> {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))?;
    let data = dir.path().join("relay");
    let relay = RelayProcess::start(CONFIG, &data);

    // The devices register and go away.
    let mut mailboxes: Vec<MailboxId> = Vec::with_capacity(MAILBOXES);
    for m in 0..MAILBOXES {
        let device = Identity::from_seed(format!("e2e device {m}").as_bytes(), 0)?;
        let mut c = MailboxClient::connect(device.libp2p_keypair()?, &relay.addr, None).await?;
        mailboxes.push(c.register(&device).await?);
    }

    // The clients connect and seal their envelopes, before the clock.
    let per_client = load.envelopes.div_ceil(load.clients);
    let identities: Vec<Identity> = (0..load.clients)
        .map(|c| Identity::from_seed(format!("e2e client {c}").as_bytes(), 0))
        .collect::<Result<_, _>>()?;
    let clients = join_all(identities.iter().map(|id| {
        let addr = relay.addr.clone();
        async move { MailboxClient::connect(id.libp2p_keypair()?, &addr, None).await }
    }))
    .await
    .into_iter()
    .collect::<Result<Vec<_>>>()?;
    let sealing = Instant::now();
    let mut sealed_total = 0usize;
    let work: Vec<Vec<Vec<u8>>> = identities
        .iter()
        .enumerate()
        .map(|(c, id)| {
            let mine = per_client.min(load.envelopes.saturating_sub(c * per_client));
            sealed_total += mine;
            (0..mine)
                .collect::<Vec<_>>()
                .chunks(load.per_request)
                .enumerate()
                .map(|(r, chunk)| {
                    MailboxRequest::Deposit {
                        mailbox: mailboxes[(c + r) % MAILBOXES],
                        envelopes: chunk
                            .iter()
                            .map(|&i| envelopes::sealed(id, i as u64, ENVELOPE_BYTES))
                            .collect(),
                    }
                    .encode()
                })
                .collect()
        })
        .collect();
    println!(
        "  {} clients connected; {sealed_total} envelopes sealed in {:.1} s (not timed)",
        clients.len(),
        sealing.elapsed().as_secs_f64()
    );

    let relay_cpu = relay.cpu();
    let relay_threads = threads_cpu(relay.pid());
    let own_cpu = cpu_of(std::process::id());
    let load_before = loadavg();
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .zip(work)
        .map(|(client, requests)| tokio::spawn(client_run(client, requests, load.window)))
        .collect();
    let mut acked = 0u64;
    let mut latencies = Vec::new();
    for t in tasks {
        let r = t.await??;
        acked += r.acked;
        latencies.extend(r.latencies);
    }
    let took = started.elapsed();
    let relay_cpu = relay.cpu().saturating_sub(relay_cpu);
    let by_thread: Vec<String> = threads_cpu(relay.pid())
        .into_iter()
        .map(|(name, cpu)| {
            let before = relay_threads.get(&name).copied().unwrap_or_default();
            (name, cpu.saturating_sub(before))
        })
        .filter(|(_, cpu)| !cpu.is_zero())
        .map(|(name, cpu)| format!("{name} {:.2} s", cpu.as_secs_f64()))
        .collect();
    let own_cpu = cpu_of(std::process::id()).saturating_sub(own_cpu);
    latencies.sort_unstable();
    let rate = acked as f64 / took.as_secs_f64();
    let batches = relay.metric("weft_relay_store_batch_jobs_count");
    let batch_jobs = relay.metric("weft_relay_store_batch_jobs_sum");
    let batch_secs = relay.metric("weft_relay_store_batch_seconds_sum");
    let stored = relay.metric("weft_relay_stored_envelopes");
    let (rss, hwm) = relay.rss_kib();

    // Durable: kill the relay outright and count what its database holds.
    drop(relay);
    let db = rusqlite::Connection::open(data.join("relay.db"))?;
    let on_disk: i64 = db.query_row("SELECT count(*) FROM mail", [], |r| r.get(0))?;

    let ok = rate >= TARGET_PER_SEC;
    println!(
        "  {acked} envelopes of {ENVELOPE_BYTES} B acknowledged in {:.2} s = {rate:.0} durable envelopes/s \
         ({} per request, {} clients, {} in flight each; load {load_before} before, {} after)",
        took.as_secs_f64(),
        load.per_request,
        load.clients,
        load.window,
        loadavg()
    );
    println!(
        "  ack latency (send -> answer, {} deposits): p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.9)),
        ms(percentile(&latencies, 0.99)),
        ms(percentile(&latencies, 1.0))
    );
    println!(
        "  relay CPU {:.2} s ({:.2} cores), clients' CPU {:.2} s ({:.2} cores); {batches:.0} store \
         batches, {:.1} jobs and {:.1} ms each on average; relay RSS {:.1} MiB (peak {:.1})",
        relay_cpu.as_secs_f64(),
        relay_cpu.as_secs_f64() / took.as_secs_f64(),
        own_cpu.as_secs_f64(),
        own_cpu.as_secs_f64() / took.as_secs_f64(),
        batch_jobs / batches.max(1.0),
        batch_secs * 1e3 / batches.max(1.0),
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    println!("  relay CPU by thread: {}", by_thread.join(", "));
    println!(
        "  durability: the relay reported {stored:.0} stored; after SIGKILL its database holds {on_disk}"
    );
    println!(
        "  target: >= {TARGET_PER_SEC:.0} durable envelopes/s: {rate:.0} {}",
        if ok { "PASS" } else { "FAIL" }
    );
    if on_disk as u64 != acked || stored as u64 != acked {
        bail!(
            "acknowledged {acked}, but the relay stored {stored} and its database holds {on_disk}"
        );
    }
    Ok(ok)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not.
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let load = Load {
        clients: env_or("DEPOSIT_E2E_CLIENTS", if benchmarking { 128 } else { 8 }).max(1),
        envelopes: env_or(
            "DEPOSIT_E2E_ENVELOPES",
            if benchmarking { 64_000 } else { 400 },
        ),
        per_request: env_or("DEPOSIT_E2E_PER_REQUEST", 1).clamp(1, MAX_DEPOSIT),
        window: env_or("DEPOSIT_E2E_WINDOW", 1).clamp(1, 32),
    };
    if !benchmarking {
        println!("smoke test (no --bench): not a measurement");
    }
    println!(
        "deposit e2e bench: {} UTC, load {}, {} CPUs",
        utc_now(),
        loadavg(),
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    match runtime.block_on(run(load)) {
        Ok(_) => {}
        Err(e) => {
            println!("deposit e2e: FAIL, did not complete: {e:#}");
            std::process::exit(1);
        }
    }
}
