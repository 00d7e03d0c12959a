//! Durable deposits per second through the service, without the network:
//! encoded `MailboxRequest::Deposit`s of real signed envelopes handed to
//! the `Service`, verified (on the blocking pool), stored by the store
//! thread (WAL, `synchronous=FULL`, group commit, default depositor
//! quotas) and acknowledged only after the commit. Then a device's fetch
//! of a 10,000-envelope backlog. `benches/deposit_e2e.rs` measures
//! deposits over TCP to the real binary.
//!
//! `cargo bench -p weft-relay --bench deposit` (no criterion: it prints
//! its numbers, and PASS/FAIL against the target of at least 5,000 durable
//! envelopes acknowledged per second). `DEPOSIT_BENCH_ENVELOPES` and
//! `DEPOSIT_BENCH_CLIENTS` change the load. Every wait has a deadline
//! (120 s); past it the bench panics. The backlog fetch here goes through
//! the service only; `benches/fetch.rs` measures it over TCP.

mod common;
#[path = "../tests/support/envelopes.rs"]
mod envelopes;
use common::{loadavg, utc_now};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use tokio::sync::Mutex;
use weft_node::mailbox::{MailboxId, MailboxRequest, MailboxResponse};
use weft_relay::config::Access;
use weft_relay::depositor::Source;
use weft_relay::metrics::RelayMetrics;
use weft_relay::service::{Service, ServiceConfig};
use weft_relay::store::{Store, StoreHandle, StoreLimits};

const ENVELOPE_BYTES: usize = 1024;
const MAILBOXES: u32 = 64;
/// Durable envelopes acknowledged per second, at least.
const TARGET_PER_SEC: f64 = 5_000.0;
/// The longest any wait may take.
const DEADLINE: Duration = Duration::from_secs(120);

/// Awaits `f`, panicking if it takes longer than [`DEADLINE`].
async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {} s", DEADLINE.as_secs()))
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Signed envelope `n` (distinct: no dedup between them).
fn envelope(sender: &weft_node::identity::Identity, n: u64) -> Vec<u8> {
    envelopes::sealed(sender, n, ENVELOPE_BYTES)
}

/// Depositor `n`'s own address.
fn source(n: usize) -> Source {
    Source::V4([10, 1, (n >> 8) as u8, n as u8])
}

fn mailbox(n: u32) -> MailboxId {
    let mut id = [0u8; 16];
    id[..4].copy_from_slice(&n.to_be_bytes());
    MailboxId(id)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    runtime.block_on(run());
}

async fn run() {
    let total = env_or("DEPOSIT_BENCH_ENVELOPES", 50_000);
    let clients = env_or("DEPOSIT_BENCH_CLIENTS", 128);
    println!("deposit bench: {} UTC, load {}", utc_now(), loadavg());
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap_or_else(|e| panic!("tempdir: {e}"));
    let limits = StoreLimits {
        max_envelopes: 1_000_000,
        max_bytes: 4 * 1024 * 1024 * 1024,
        ..StoreLimits::default()
    };
    let store =
        Store::open(&dir.path().join("relay.db"), limits).unwrap_or_else(|e| panic!("open: {e}"));
    let metrics = RelayMetrics::default();
    let store = StoreHandle::spawn(store, metrics.clone()).unwrap_or_else(|e| panic!("{e}"));
    let relay = PeerId::random();
    let devices: Vec<PeerId> = (0..MAILBOXES).map(|_| PeerId::random()).collect();
    for (n, device) in devices.iter().enumerate() {
        within(
            "register",
            store.register(mailbox(n as u32), *device, None, weft_node::now_ms()),
        )
        .await
        .unwrap_or_else(|e| panic!("register: {e}"));
    }
    let config = ServiceConfig {
        access: Access::Open,
        requests_per_sec: 1e9,
        request_burst: u32::MAX,
        allow_private_wakeup: false,
        ..ServiceConfig::default()
    };
    let sender = envelopes::device("deposit bench sender");
    let service = Service::new(relay, config, store.clone(), metrics.clone())
        .unwrap_or_else(|e| panic!("service: {e}"));
    let service = Arc::new(Mutex::new(service));

    for per_request in [1usize, 16] {
        let requests = total / per_request;
        // Sealed before the clock starts: the bench times the relay.
        let encoded: Vec<Vec<Vec<u8>>> = (0..clients)
            .map(|c| {
                (c..requests)
                    .step_by(clients)
                    .map(|r| {
                        let base = (per_request * r) as u64 + (per_request as u64) * 1_000_000_000;
                        MailboxRequest::Deposit {
                            mailbox: mailbox((r as u32) % MAILBOXES),
                            envelopes: (0..per_request as u64)
                                .map(|i| envelope(&sender, base + i))
                                .collect(),
                        }
                        .encode()
                    })
                    .collect()
            })
            .collect();
        let started = Instant::now();
        let mut tasks = Vec::new();
        for (c, requests) in encoded.into_iter().enumerate() {
            let service = service.clone();
            tasks.push(tokio::spawn(async move {
                let depositor = PeerId::random();
                let mut acked = 0usize;
                for request in requests {
                    let pending = within("the service", service.lock()).await.handle(
                        depositor,
                        source(c),
                        &request,
                        Instant::now(),
                        weft_node::now_ms(),
                    );
                    match within("a deposit", pending).await.response {
                        MailboxResponse::Deposited { accepted } => acked += accepted as usize,
                        other => panic!("deposit refused: {other:?}"),
                    }
                }
                acked
            }));
        }
        let mut acked = 0;
        for t in tasks {
            acked += within("a client", t)
                .await
                .unwrap_or_else(|e| panic!("client: {e}"));
        }
        let took = started.elapsed();
        let rate = acked as f64 / took.as_secs_f64();
        println!(
            "durable deposits ({per_request} envelope(s) of {ENVELOPE_BYTES} B per request, \
             {clients} clients): {acked} envelopes acknowledged in {:.2} s = {rate:.0} envelopes/s",
            took.as_secs_f64(),
        );
        println!(
            "  target: >= {TARGET_PER_SEC:.0} envelopes/s acknowledged: {rate:.0} {} (load {})",
            if rate >= TARGET_PER_SEC {
                "PASS"
            } else {
                "FAIL"
            },
            loadavg()
        );
    }

    // A device comes back to a backlog of 10,000 envelopes: fetch in
    // pages, acknowledge each page.
    let device = devices[0];
    let backlog = 10_000usize;
    let mut deposited = 0;
    let mut n = 5_000_000_000u64;
    let mailbox0 = mailbox(0);
    // Empty mailbox 0 first.
    within("ack", store.ack(device, u64::MAX, weft_node::now_ms()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    while deposited < backlog {
        let batch: Vec<Vec<u8>> = (0..250.min(backlog - deposited))
            .map(|_| {
                n += 1;
                envelope(&sender, n)
            })
            .collect();
        // The backlog's senders: 250 envelopes each, within every quota.
        let other = PeerId::random();
        let other_source = source(1000 + deposited / 250);
        deposited += batch.len();
        let request = MailboxRequest::Deposit {
            mailbox: mailbox0,
            envelopes: batch,
        }
        .encode();
        let pending = within("the service", service.lock()).await.handle(
            other,
            other_source,
            &request,
            Instant::now(),
            weft_node::now_ms(),
        );
        assert!(matches!(
            within("a deposit", pending).await.response,
            MailboxResponse::Deposited { .. }
        ));
    }
    let started = Instant::now();
    let mut after = 0;
    let mut fetched = 0;
    loop {
        let request = MailboxRequest::Fetch {
            after,
            limit: weft_node::mailbox::MAX_FETCH,
        }
        .encode();
        let pending = within("the service", service.lock()).await.handle(
            device,
            source(0),
            &request,
            Instant::now(),
            weft_node::now_ms(),
        );
        let response = within("a fetch", pending).await.response;
        // The bytes that would go on the wire.
        let wire = response.encode();
        let Some(MailboxResponse::Mail { items, more }) = MailboxResponse::decode(&wire) else {
            panic!("fetch failed: {response:?}");
        };
        fetched += items.len();
        if let Some((last, _)) = items.last() {
            after = *last;
            let ack = MailboxRequest::Ack { up_to: after }.encode();
            let pending = within("the service", service.lock()).await.handle(
                device,
                source(0),
                &ack,
                Instant::now(),
                weft_node::now_ms(),
            );
            assert!(matches!(
                within("an ack", pending).await.response,
                MailboxResponse::Acked { .. }
            ));
        }
        if !more {
            break;
        }
    }
    let took = started.elapsed();
    assert_eq!(fetched, backlog);
    println!(
        "backlog fetch through the service (no network): {fetched} envelopes fetched and \
         acknowledged in {:.3} s{}",
        took.as_secs_f64(),
        if took < Duration::from_secs(1) {
            ""
        } else {
            " (over 1 s!)"
        }
    );
    within("closing the store", store.close()).await;
}
