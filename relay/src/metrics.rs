//! Prometheus metrics of the relay, and the small HTTP server that serves
//! them (`/metrics`, OpenMetrics text) with `/healthz`.
//!
//! The relay's own metrics and libp2p-metrics share one
//! `prometheus_client` registry. [`RelayMetrics`] is a set of shared
//! atomic counters: cloned into the store thread, the service and the
//! wakeup task, usable unregistered (tests).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use weft_proto::mailbox::Refusal;

use crate::store::{QuotaKind, StoreHandle, StoreObserver, Totals};

type Labels = [(&'static str, &'static str); 1];

/// The relay's own metrics.
#[derive(Clone, Debug)]
pub struct RelayMetrics {
    registrations: Counter,
    deposits: Counter,
    deposited_envelopes: Counter,
    fetches: Counter,
    fetched_envelopes: Counter,
    acks: Counter,
    refusals: Family<Labels, Counter>,
    unverified: Counter,
    over_quota: Family<Labels, Counter>,
    cooled: Counter,
    refused_per_ip: Counter,
    wakeups: Family<Labels, Counter>,
    wakeup_failures: Counter,
    mailboxes: Gauge,
    stored_envelopes: Gauge,
    stored_bytes: Gauge,
    batch_size: Histogram,
    batch_seconds: Histogram,
}

impl Default for RelayMetrics {
    fn default() -> Self {
        Self {
            registrations: Counter::default(),
            deposits: Counter::default(),
            deposited_envelopes: Counter::default(),
            fetches: Counter::default(),
            fetched_envelopes: Counter::default(),
            acks: Counter::default(),
            refusals: Family::default(),
            unverified: Counter::default(),
            over_quota: Family::default(),
            cooled: Counter::default(),
            refused_per_ip: Counter::default(),
            wakeups: Family::default(),
            wakeup_failures: Counter::default(),
            mailboxes: Gauge::default(),
            stored_envelopes: Gauge::default(),
            stored_bytes: Gauge::default(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            batch_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
        }
    }
}

/// The label value of a refusal reason.
pub fn reason_label(reason: Refusal) -> &'static str {
    match reason {
        Refusal::BadRequest => "bad_request",
        Refusal::Forbidden => "forbidden",
        Refusal::NotRegistered => "not_registered",
        Refusal::MailboxFull => "mailbox_full",
        Refusal::RateLimited => "rate_limited",
        Refusal::Unavailable => "unavailable",
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl RelayMetrics {
    /// New metrics registered under `weft_relay_` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("weft_relay");
        r.register(
            "registrations",
            "Accepted mailbox registrations (new and renewed)",
            m.registrations.clone(),
        );
        r.register(
            "deposits",
            "Deposit requests stored durably and acknowledged",
            m.deposits.clone(),
        );
        r.register(
            "deposited_envelopes",
            "Envelopes in acknowledged deposits (duplicates included)",
            m.deposited_envelopes.clone(),
        );
        r.register("fetches", "Fetch requests answered", m.fetches.clone());
        r.register(
            "fetched_envelopes",
            "Envelopes handed out by fetches",
            m.fetched_envelopes.clone(),
        );
        r.register("acks", "Acknowledgements handled", m.acks.clone());
        r.register("refusals", "Refused requests by reason", m.refusals.clone());
        r.register(
            "unverified_deposits",
            "Deposits refused because an envelope did not parse or verify",
            m.unverified.clone(),
        );
        r.register(
            "depositor_quota_refusals",
            "Deposits refused by a depositor quota, by quota (peer_per_mailbox, peer, \
             ip_per_mailbox, ip)",
            m.over_quota.clone(),
        );
        r.register(
            "deposits_cooled_off",
            "Deposits refused unchecked, from a depositor refused (by a quota of its own, or for \
             an envelope that did not verify) less than a second before",
            m.cooled.clone(),
        );
        r.register(
            "connections_refused_per_ip",
            "Incoming connections refused because their IP address (IPv6: its /64) already held \
             limits.max_connections_per_ip connections",
            m.refused_per_ip.clone(),
        );
        r.register(
            "wakeups",
            "Wakeups sent, by kind (http: UnifiedPush POST, live: libp2p stream)",
            m.wakeups.clone(),
        );
        r.register(
            "wakeup_failures",
            "UnifiedPush wakeups that failed or were dropped",
            m.wakeup_failures.clone(),
        );
        r.register("mailboxes", "Registered mailboxes", m.mailboxes.clone());
        r.register(
            "stored_envelopes",
            "Envelopes waiting in mailboxes",
            m.stored_envelopes.clone(),
        );
        r.register(
            "stored_bytes",
            "Envelope bytes waiting in mailboxes",
            m.stored_bytes.clone(),
        );
        r.register(
            "store_batch_jobs",
            "Requests committed together in one transaction",
            m.batch_size.clone(),
        );
        r.register(
            "store_batch_seconds",
            "Time to run and commit (fsync) one batch",
            m.batch_seconds.clone(),
        );
        m
    }

    pub fn registered(&self) {
        self.registrations.inc();
    }

    pub fn deposited(&self, envelopes: u32) {
        self.deposits.inc();
        self.deposited_envelopes.inc_by(u64::from(envelopes));
    }

    pub fn fetched(&self, envelopes: usize) {
        self.fetches.inc();
        self.fetched_envelopes.inc_by(envelopes as u64);
    }

    pub fn acked(&self) {
        self.acks.inc();
    }

    pub fn refused(&self, reason: Refusal) {
        self.refusals
            .get_or_create(&[("reason", reason_label(reason))])
            .inc();
    }

    pub fn unverified(&self) {
        self.unverified.inc();
    }

    /// Deposits refused as unverifiable so far (tests).
    pub fn unverified_deposits(&self) -> u64 {
        self.unverified.get()
    }

    pub fn over_quota(&self, quota: QuotaKind) {
        self.over_quota
            .get_or_create(&[("quota", quota.label())])
            .inc();
    }

    pub fn cooled(&self) {
        self.cooled.inc();
    }

    /// Deposits refused unchecked while their depositor cooled off (tests).
    pub fn cooled_off(&self) -> u64 {
        self.cooled.get()
    }

    /// Deposits refused by `quota` so far (tests).
    pub fn quota_refusals(&self, quota: QuotaKind) -> u64 {
        self.over_quota
            .get_or_create(&[("quota", quota.label())])
            .get()
    }

    /// How many refusals of `reason` so far (tests).
    pub fn refusals(&self, reason: Refusal) -> u64 {
        self.refusals
            .get_or_create(&[("reason", reason_label(reason))])
            .get()
    }

    pub fn refused_per_ip(&self) {
        self.refused_per_ip.inc();
    }

    /// Incoming connections refused by the per-IP cap so far (tests).
    pub fn connections_refused_per_ip(&self) -> u64 {
        self.refused_per_ip.get()
    }

    pub fn wakeup_sent(&self, kind: &'static str) {
        self.wakeups.get_or_create(&[("kind", kind)]).inc();
    }

    /// How many wakeups of `kind` so far (tests).
    pub fn wakeups_sent(&self, kind: &'static str) -> u64 {
        self.wakeups.get_or_create(&[("kind", kind)]).get()
    }

    pub fn wakeup_failed(&self) {
        self.wakeup_failures.inc();
    }

    /// How many UnifiedPush wakeups failed or were dropped so far (tests).
    pub fn wakeup_failures(&self) -> u64 {
        self.wakeup_failures.get()
    }

    pub fn set_totals(&self, totals: Totals) {
        self.mailboxes.set(to_i64(totals.mailboxes));
        self.stored_envelopes.set(to_i64(totals.envelopes));
        self.stored_bytes.set(to_i64(totals.bytes));
    }

    pub fn observe_batch(&self, jobs: usize, took: Duration) {
        self.batch_size.observe(jobs as f64);
        self.batch_seconds.observe(took.as_secs_f64());
    }
}

impl StoreObserver for RelayMetrics {
    fn batch(&self, jobs: usize, took: Duration) {
        self.observe_batch(jobs, took);
    }

    fn totals(&self, totals: Totals) {
        self.set_totals(totals);
    }
}

/// What `/healthz` looks at.
#[derive(Clone, Debug)]
pub struct Health {
    pub store: StoreHandle,
    /// Set while the relay drains before exiting.
    pub draining: Arc<AtomicBool>,
}

#[derive(Clone)]
struct HttpState {
    registry: Arc<Registry>,
    health: Health,
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen on {0}: {1}")]
    Bind(String, std::io::Error),
}

/// The running metrics server.
#[derive(Debug)]
pub struct MetricsServer {
    pub addr: SocketAddr,
    shutdown: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// Serves `/metrics` and `/healthz` on `addr` (port 0: any).
    pub async fn start(
        addr: &str,
        registry: Arc<Registry>,
        health: Health,
    ) -> Result<MetricsServer, MetricsError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| MetricsError::Bind(addr.to_string(), e))?;
        let local = listener
            .local_addr()
            .map_err(|e| MetricsError::Bind(addr.to_string(), e))?;
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(healthz))
            .with_state(HttpState { registry, health });
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.await;
                })
                .await;
            if let Err(e) = served {
                tracing::warn!("metrics server stopped: {e}");
            }
        });
        tracing::info!("metrics on http://{local}/metrics");
        Ok(MetricsServer {
            addr: local,
            shutdown,
            task,
        })
    }

    pub async fn stop(self) {
        let _ = self.shutdown.send(());
        let _ = self.task.await;
    }
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "encoding failed\n".to_string(),
        ),
    }
}

async fn healthz(State(state): State<HttpState>) -> impl IntoResponse {
    if state.health.draining.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n");
    }
    // The store thread answers: it is alive and not stuck on the disk.
    match tokio::time::timeout(Duration::from_secs(2), state.health.store.totals()).await {
        Ok(Ok(_)) => (StatusCode::OK, "ok\n"),
        Ok(Err(_)) => (StatusCode::SERVICE_UNAVAILABLE, "storage failed\n"),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "storage is not answering\n",
        ),
    }
}
