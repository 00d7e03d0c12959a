//! Push wakeups: telling a device that mail has arrived, without saying
//! anything about the mail.
//!
//! A device connected to the relay gets `MailboxRequest::Wakeup` over its
//! connection (the swarm task sends it); one that is away and registered
//! a UnifiedPush endpoint gets an empty HTTP POST there ([`HttpWaker`]).
//! Both are coalesced per mailbox ([`Coalescer`]): the first mail wakes
//! at once, more mail within the interval is covered by one wakeup at its
//! end. UnifiedPush POSTs are also limited relay-wide (a token bucket in
//! the swarm task), go straight to the endpoint (never through a proxy
//! named in the environment) and only to public addresses, checked on
//! each resolved address, unless the operator allows private ones.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc};
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};
use weft_proto::mailbox::MailboxId;

use crate::metrics::RelayMetrics;
use crate::store::WakeTarget;

/// UnifiedPush POSTs waiting to be sent.
const HTTP_QUEUE: usize = 1024;

/// Per-mailbox coalescing of wakeups.
#[derive(Debug)]
pub struct Coalescer {
    interval: Duration,
    slots: HashMap<MailboxId, Slot>,
}

#[derive(Debug)]
struct Slot {
    last: Instant,
    pending: Option<WakeTarget>,
}

impl Coalescer {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            slots: HashMap::new(),
        }
    }

    /// Mail arrived for `target`: `Some` to wake now (the caller sends it
    /// and calls [`Coalescer::sent`], or [`Coalescer::defer`]s it), `None`
    /// if a wakeup went out within the interval (one follows at its end).
    pub fn arrived(&mut self, target: WakeTarget, now: Instant) -> Option<WakeTarget> {
        match self.slots.get_mut(&target.mailbox) {
            Some(slot) if now.saturating_duration_since(slot.last) < self.interval => {
                slot.pending = Some(target);
                None
            }
            _ => Some(target),
        }
    }

    /// A wakeup for `mailbox` went out at `now`.
    pub fn sent(&mut self, mailbox: MailboxId, now: Instant) {
        self.slots.insert(
            mailbox,
            Slot {
                last: now,
                pending: None,
            },
        );
    }

    /// A wakeup could not go out now: send it at the next [`Coalescer::due`].
    pub fn defer(&mut self, target: WakeTarget) {
        match self.slots.get_mut(&target.mailbox) {
            Some(slot) => slot.pending = Some(target),
            None => {
                let mailbox = target.mailbox;
                // Due at once: `last` an interval ago.
                let last = Instant::now()
                    .checked_sub(self.interval)
                    .unwrap_or_else(Instant::now);
                self.slots.insert(
                    mailbox,
                    Slot {
                        last,
                        pending: Some(target),
                    },
                );
            }
        }
    }

    /// The wakeups whose interval is over and that had mail meanwhile
    /// (taken out: send or defer each). Forgets idle mailboxes.
    pub fn due(&mut self, now: Instant) -> Vec<WakeTarget> {
        let interval = self.interval;
        let mut due = Vec::new();
        self.slots.retain(|_, slot| {
            let over = now.saturating_duration_since(slot.last) >= interval;
            if over && let Some(target) = slot.pending.take() {
                due.push(target);
            }
            !over || slot.pending.is_some()
        });
        due
    }

    pub fn tracked(&self) -> usize {
        self.slots.len()
    }
}

/// Whether a wakeup URL may be used: http(s), no user info, and (unless
/// `allow_private`) not an address that [`is_public`] refuses nor a local
/// name. Names are checked again when resolved, by the sender.
pub fn check_url(url: &str, allow_private: bool) -> Result<(), &'static str> {
    let uri: axum::http::Uri = url.parse().map_err(|_| "the wakeup URL does not parse")?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err("the wakeup URL is not http or https"),
    }
    let authority = uri.authority().ok_or("the wakeup URL has no host")?;
    if authority.as_str().contains('@') {
        return Err("the wakeup URL carries user information");
    }
    if allow_private {
        return Ok(());
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        if !is_public(ip) {
            return Err("the wakeup URL points at a private or loopback address");
        }
        return Ok(());
    }
    let host = host.to_ascii_lowercase();
    let host = host.trim_end_matches('.');
    if host == "localhost"
        || host.ends_with(".localhost")
        || host.ends_with(".local")
        || host.ends_with(".internal")
        || !host.contains('.')
    {
        return Err("the wakeup URL points at a local host name");
    }
    Ok(())
}

/// Whether a wakeup may go to `ip`: a global unicast address, by the IANA
/// IPv4 and IPv6 special-purpose address registries. IPv6 forms that
/// carry an IPv4 address (IPv4-mapped, IPv4-compatible, NAT64 `64:ff9b::/96`,
/// 6to4) are judged by that IPv4 address, since that is where they lead.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_multicast()
        // "This network", 0.0.0.0/8.
        || a == 0
        // Shared address space (carrier-grade NAT), 100.64.0.0/10.
        || (a == 100 && (64..128).contains(&b))
        // IETF protocol assignments (DS-Lite, NAT64 discovery...), 192.0.0.0/24.
        || (a == 192 && b == 0 && c == 0)
        // Deprecated 6to4 relay anycast, 192.88.99.0/24.
        || (a == 192 && b == 88 && c == 99)
        // Benchmarking, 198.18.0.0/15.
        || (a == 198 && (b == 18 || b == 19))
        // Reserved, 240.0.0.0/4.
        || a >= 240)
}

/// The IPv4 address an IPv6 address leads to, for the forms that embed
/// one: IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`
/// (deprecated, but a kernel may still tunnel it), NAT64 `64:ff9b::a.b.c.d`
/// and 6to4 `2002:aabb:ccdd::/48`.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let v4 = |hi: u16, lo: u16| {
        let [a, b] = hi.to_be_bytes();
        let [c, d] = lo.to_be_bytes();
        Ipv4Addr::new(a, b, c, d)
    };
    match s {
        [0, 0, 0, 0, 0, 0xffff, hi, lo] | [0, 0, 0, 0, 0, 0, hi, lo] => Some(v4(hi, lo)),
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(v4(hi, lo)),
        [0x2002, hi, lo, ..] => Some(v4(hi, lo)),
        _ => None,
    }
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    // Only 2000::/3 is global unicast: everything else is special or
    // reserved (::/8 with loopback and unspecified, 64:ff9b:1::/48 local
    // NAT64, discard-only 100::/64, 5f00::/16, unique-local fc00::/7,
    // link-local fe80::/10, site-local fec0::/10, multicast ff00::/8).
    (s[0] & 0xe000) == 0x2000
        // IETF protocol assignments (Teredo 2001::/32, benchmarking,
        // ORCHID...), 2001::/23.
        && !(s[0] == 0x2001 && s[1] < 0x0200)
        // Documentation, 2001:db8::/32 and 3fff::/20.
        && !(s[0] == 0x2001 && s[1] == 0x0db8)
        && !(s[0] == 0x3fff && s[1] < 0x1000)
}

/// Resolves names like the default resolver, then drops every address
/// that is not public: a device cannot make the relay POST into the
/// operator's network through a name either.
#[derive(Debug)]
struct PublicOnly(DefaultResolver);

impl Resolver for PublicOnly {
    fn resolve(
        &self,
        uri: &axum::http::Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let all = self.0.resolve(uri, config, timeout)?;
        let mut public = self.empty();
        for addr in all.iter().filter(|a| is_public(a.ip())) {
            public.push(*addr);
        }
        if public.is_empty() {
            Err(ureq::Error::HostNotFound)
        } else {
            Ok(public)
        }
    }
}

/// Settings of the UnifiedPush sender.
#[derive(Clone, Debug)]
pub struct HttpWakerConfig {
    pub timeout: Duration,
    pub concurrency: usize,
    pub allow_private: bool,
}

/// The task that POSTs UnifiedPush wakeups (blocking `ureq` calls on
/// tokio's blocking pool, at most `concurrency` at once).
#[derive(Clone, Debug)]
pub struct HttpWaker {
    tx: mpsc::Sender<String>,
}

impl HttpWaker {
    pub fn spawn(config: HttpWakerConfig, metrics: RelayMetrics) -> HttpWaker {
        let (tx, rx) = mpsc::channel(HTTP_QUEUE);
        tokio::spawn(run(config, rx, metrics));
        HttpWaker { tx }
    }

    /// Queues a POST to `url`; `false` if the queue is full.
    pub fn wake(&self, url: String) -> bool {
        self.tx.try_send(url).is_ok()
    }
}

async fn run(config: HttpWakerConfig, mut rx: mpsc::Receiver<String>, metrics: RelayMetrics) {
    let agent_config = ureq::Agent::config_builder()
        // Never a proxy from the environment (`ALL_PROXY`, `HTTPS_PROXY`,
        // `HTTP_PROXY`): through one, the address filter would see the
        // proxy's address, and the proxy would reach the target for us.
        .proxy(None)
        .timeout_global(Some(config.timeout))
        .max_redirects(0)
        .http_status_as_error(true)
        .user_agent(format!("weft-relay/{}", env!("CARGO_PKG_VERSION")))
        .build();
    let agent = if config.allow_private {
        ureq::Agent::new_with_config(agent_config)
    } else {
        ureq::Agent::with_parts(
            agent_config,
            DefaultConnector::default(),
            PublicOnly(DefaultResolver::default()),
        )
    };
    let agent = Arc::new(agent);
    let permits = Arc::new(Semaphore::new(config.concurrency.max(1)));
    while let Some(url) = rx.recv().await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let agent = agent.clone();
        let metrics = metrics.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            // Content-free: an empty body. TTL and Urgency are the Web
            // Push headers UnifiedPush servers understand.
            let result = agent
                .post(&url)
                .header("TTL", "86400")
                .header("Urgency", "high")
                .header("Content-Type", "application/octet-stream")
                .send_empty();
            match result {
                Ok(_) => metrics.wakeup_sent("http"),
                Err(e) => {
                    metrics.wakeup_failed();
                    tracing::debug!("wakeup POST failed: {e}");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::PeerId;

    fn target(n: u8) -> WakeTarget {
        WakeTarget {
            mailbox: MailboxId([n; 16]),
            peer: PeerId::random(),
            wakeup: Some("https://push.example/x".into()),
        }
    }

    #[test]
    fn the_first_wakeup_goes_at_once_and_later_ones_coalesce_to_one() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(Duration::from_secs(10));
        let t = target(1);
        assert_eq!(c.arrived(t.clone(), t0), Some(t.clone()));
        c.sent(t.mailbox, t0);
        for s in 1..5 {
            assert_eq!(c.arrived(t.clone(), t0 + Duration::from_secs(s)), None);
        }
        assert!(c.due(t0 + Duration::from_secs(9)).is_empty());
        let due = c.due(t0 + Duration::from_secs(10));
        assert_eq!(due, vec![t.clone()]);
        c.sent(t.mailbox, t0 + Duration::from_secs(10));
        // Nothing more arrived: nothing more is due, and the slot goes.
        assert!(c.due(t0 + Duration::from_secs(30)).is_empty());
        assert_eq!(c.tracked(), 0);
        // Another mailbox is independent.
        let u = target(2);
        assert_eq!(c.arrived(u.clone(), t0), Some(u.clone()));
        // A deferred one is due at the next look.
        c.defer(u.clone());
        assert_eq!(c.due(Instant::now()), vec![u]);
    }

    #[test]
    fn wakeup_urls_must_be_public_http() {
        assert!(check_url("https://push.example.org/up/abc", false).is_ok());
        assert!(check_url("http://203.0.114.1:8080/x", false).is_ok());
        for bad in [
            "ftp://push.example.org/x",
            "https://user:pw@push.example.org/x",
            "http://127.0.0.1:8080/x",
            "http://10.1.2.3/x",
            "http://192.168.1.1/x",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/x",
            "http://[fd00::1]/x",
            "http://[::ffff:127.0.0.1]/x",
            "http://localhost:9740/metrics",
            "http://metrics/x",
            "http://printer.local/x",
            "not a url",
        ] {
            assert!(check_url(bad, false).is_err(), "{bad}");
        }
        assert!(check_url("http://127.0.0.1:8080/x", true).is_ok());
        assert!(check_url("ftp://127.0.0.1/x", true).is_err());
    }

    /// Every special-purpose address (IANA's IPv4 and IPv6 registries,
    /// multicast, reserved) and every IPv6 form that embeds a blocked IPv4
    /// address is refused: as a literal in a URL and as a resolved address.
    #[test]
    fn special_purpose_and_embedded_addresses_are_not_public() {
        let blocked = [
            // IPv4
            "0.0.0.0",
            "0.1.2.3",
            "10.1.2.3",
            "100.64.0.1",
            "100.127.255.254",
            "127.0.0.1",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.254",
            "192.0.0.1",
            "192.0.0.9",
            "192.0.0.170",
            "192.0.2.1",
            "192.88.99.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.19.255.254",
            "198.51.100.1",
            "203.0.113.1",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            // IPv6
            "::",
            "::1",
            "ff02::1",
            "fe80::1",
            "fec0::1",
            "feff::1",
            "fc00::1",
            "fd00::1",
            "100::1",
            "100::ffff:ffff:ffff:ffff",
            "100:0:0:1::1",
            "2001::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "2001:2::1",
            "2001:10::1",
            "2001:db8::1",
            "3fff::1",
            "5f00::1",
            "64:ff9b:1::a00:1",
            "64:ff9b:1::808:808",
            // IPv4-mapped
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:192.0.0.1",
            // IPv4-compatible
            "::127.0.0.1",
            "::10.0.0.1",
            "::169.254.169.254",
            "::192.168.1.1",
            "::192.0.0.1",
            // SIIT IPv4-translated, ::ffff:0:0:0/96
            "::ffff:0:8.8.8.8",
            // NAT64
            "64:ff9b::127.0.0.1",
            "64:ff9b::10.0.0.1",
            "64:ff9b::169.254.169.254",
            "64:ff9b::192.0.0.1",
            // 6to4
            "2002:7f00:1::1",
            "2002:a00:1::1",
            "2002:a9fe:a9fe::1",
            "2002:c000:1::1",
        ];
        let accepted: Vec<&str> = blocked
            .iter()
            .copied()
            .filter(|a| is_public(a.parse().unwrap()))
            .collect();
        assert!(accepted.is_empty(), "accepted as public: {accepted:?}");
        let bracketed = |a: &str| {
            if a.contains(':') {
                format!("http://[{a}]:8080/up")
            } else {
                format!("http://{a}:8080/up")
            }
        };
        for a in blocked {
            assert!(check_url(&bracketed(a), false).is_err(), "{a}");
        }

        // Global unicast stays allowed, also when embedded.
        for a in [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.1",
            "172.32.0.1",
            "192.0.1.1",
            "198.20.0.1",
            "2606:4700:4700::1111",
            "2a00:1450:4001::1",
            "2001:200::1",
            "::ffff:8.8.8.8",
            "::8.8.8.8",
            "64:ff9b::8.8.8.8",
            "2002:808:808::1",
        ] {
            assert!(is_public(a.parse().unwrap()), "{a}");
            assert!(check_url(&bracketed(a), false).is_ok(), "{a}");
        }
    }
}
