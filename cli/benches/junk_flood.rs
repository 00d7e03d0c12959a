//! Junk flood against a real daemon (issue 15, adversarial test 1).
//!
//! Alice and bob are release `weft` daemons (child processes, loopback
//! TCP, mDNS off) that write to each other all along: one message every
//! `FLOOD_PACE_MS` (100), alternately, each timed from the `send` call on
//! the sender's control socket to the `message` event on the receiver's.
//! First without a flood (`FLOOD_QUIET_SECS`, 20), then for
//! `FLOOD_SECS` (60) while mallory, in this process, hands alice
//! `FLOOD_JUNK` (100,000) invalid envelopes at an even pace: garbage after
//! a valid version byte, a genuine envelope with its signature broken,
//! envelopes correctly signed by her own unknown device under the
//! conversation's routing tag, replays of a genuine envelope, and every
//! thousandth an oversized one. They go on every topic alice announces and
//! every tenth straight to her over the direct protocol. Whenever alice
//! drops her, mallory comes back under a fresh peer id (loopback is never
//! banned by address, so nothing stops her coming back; see
//! `node/src/net/offenders.rs`).
//!
//! Reported: honest latency p50/p99/max with and without the flood (the
//! target: flooded p99 at most 3× the quiet one), every honest message
//! delivered once and in order, alice's RSS (sampled every 250 ms; the
//! target: under 100 MB) and CPU, and for each of mallory's peer ids how
//! much junk she handed over and how long alice took to drop her (the
//! target: within 10 s).
//!
//! `cargo bench -p weft-cli --bench junk_flood`. Under `cargo test`
//! (no `--bench`; CI) a small copy runs: 3 s quiet, 5 s of 2,000 junk.
//! Both fail unless every honest message arrived once and in order, alice
//! dropped every peer id within 10 s and her RSS stayed under 100 MB; the
//! latencies are reported, not asserted (timing is for the full run on a
//! quiet machine). Every wait has a deadline; past it the bench fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use weft_e2e::Weft;
use weft_e2e::procfs;
use weft_node::api::{Event, Request, Response};
use weft_node::control::ControlClient;
use weft_node::crypto::chain::SendingChain;
use weft_node::crypto::envelope::{Envelope, MAX_ENVELOPE_BYTES, seal_chain};
use weft_node::home::Home;
use weft_node::identity::Identity;
use weft_node::net::{self, NetCommand, NetConfig, NetEvent};
use weft_node::node::DirectRequest;
use weft_node::{Multiaddr, PeerId};

/// The longest any one wait may take.
const DEADLINE: Duration = Duration::from_secs(30);
const P99_TARGET: f64 = 3.0;
const RSS_TARGET_MB: f64 = 100.0;
const DROP_TARGET: Duration = Duration::from_secs(10);

#[derive(Clone, Copy)]
struct Settings {
    quiet: Duration,
    flood: Duration,
    junk: u64,
    pace: Duration,
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let settings = if full {
        Settings {
            quiet: Duration::from_secs(env_or("FLOOD_QUIET_SECS", 20)),
            flood: Duration::from_secs(env_or("FLOOD_SECS", 60)),
            junk: env_or("FLOOD_JUNK", 100_000),
            pace: Duration::from_millis(env_or("FLOOD_PACE_MS", 100)),
        }
    } else {
        Settings {
            quiet: Duration::from_secs(3),
            flood: Duration::from_secs(5),
            junk: 2_000,
            pace: Duration::from_millis(100),
        }
    };

    let mut alice = Weft::new("alice")?;
    let mut bob = Weft::new("bob")?;
    alice.init()?;
    bob.init()?;
    alice.add_contact(&bob)?;
    bob.add_contact(&alice)?;
    alice.start_daemon(&[])?;
    let alice_addr = alice.daemon()?.dial_addr()?;
    bob.start_daemon(&["--bootstrap", &alice_addr])?;
    let alice_pid = alice.daemon()?.pid();
    let alice_peer: PeerId = alice.daemon()?.peer_id.parse()?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let result = runtime.block_on(run(
        &settings,
        &alice,
        &bob,
        alice_addr.parse()?,
        alice_peer,
        alice_pid,
    ));
    if result.is_err() {
        eprintln!("{}{}", alice.daemon_logs(), bob.daemon_logs());
    }
    result
}

/// One side of the conversation: a control connection to call and one
/// watching events.
struct Side {
    name: &'static str,
    calls: ControlClient,
    events: ControlClient,
}

impl Side {
    async fn connect(name: &'static str, node: &Weft) -> Result<Self> {
        let socket = Home::new(node.home().to_path_buf()).socket_path();
        let calls = ControlClient::connect(&socket).await?;
        let mut events = ControlClient::connect(&socket).await?;
        events.watch().await?;
        Ok(Self {
            name,
            calls,
            events,
        })
    }

    /// Waits for the `message` event of `text`.
    async fn receive(&mut self, text: &str) -> Result<()> {
        let wait = async {
            loop {
                match self.events.next_event().await? {
                    Some(Event::Message(m)) if m.text == text => return Ok(()),
                    Some(_) => {}
                    None => bail!("{}'s daemon stopped", self.name),
                }
            }
        };
        tokio::time::timeout(DEADLINE, wait)
            .await
            .with_context(|| format!("{} to receive {text:?}", self.name))?
    }

    async fn texts_from(&mut self, from: &str) -> Result<Vec<String>> {
        let request = Request::Messages {
            target: from.into(),
            limit: Some(100_000),
            before: None,
        };
        let Response::Messages(messages) = self.calls.call(&request).await? else {
            bail!("messages answered with something else");
        };
        Ok(messages
            .into_iter()
            .filter(|m| !m.outgoing)
            .map(|m| m.text)
            .collect())
    }
}

/// Alice and bob write to each other, one message per `pace`, alternately,
/// for `length`; returns the latencies and the texts each sent, in order.
async fn exchange(
    alice: &mut Side,
    bob: &mut Side,
    prefix: &str,
    length: Duration,
    pace: Duration,
) -> Result<(Vec<Duration>, Vec<String>, Vec<String>)> {
    let mut latencies = Vec::new();
    let (mut by_alice, mut by_bob) = (Vec::new(), Vec::new());
    let mut tick = tokio::time::interval(pace);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = Instant::now() + length;
    let mut n = 0u64;
    while Instant::now() < end {
        tick.tick().await;
        let text = format!("{prefix} {n}");
        let (from, to, sent) = if n.is_multiple_of(2) {
            (&mut *alice, &mut *bob, &mut by_alice)
        } else {
            (&mut *bob, &mut *alice, &mut by_bob)
        };
        let started = Instant::now();
        let send = Request::Send {
            target: to.name.into(),
            text: text.clone(),
            reply_to: None,
        };
        tokio::time::timeout(DEADLINE, from.calls.call(&send))
            .await
            .with_context(|| format!("{} to send {text:?}", from.name))??;
        to.receive(&text).await?;
        latencies.push(started.elapsed());
        sent.push(text);
        n += 1;
    }
    latencies.sort();
    Ok((latencies, by_alice, by_bob))
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// What mallory did, per peer id.
#[derive(Default)]
struct Mallory {
    handed: u64,
    ids: Vec<Identity>,
    /// For each id: junk handed while connected, and the time from her
    /// first junk to alice dropping her (`None`: not dropped by the end).
    runs: Vec<(u64, Option<Duration>)>,
    failed_sends: u64,
}

/// The kinds of junk, in turn.
struct Junk {
    genuine: Vec<u8>,
    tag: weft_node::ids::RoutingTag,
    chain: SendingChain,
    n: u64,
}

impl Junk {
    fn next(&mut self, me: &Identity) -> Vec<u8> {
        let n = self.n;
        self.n += 1;
        if n % 1000 == 999 {
            return vec![self.genuine[0]; MAX_ENVELOPE_BYTES + 1];
        }
        match n % 4 {
            0 => {
                let mut garbage = vec![self.genuine[0]; 64 + (n as usize % 512)];
                garbage[1..9].copy_from_slice(&n.to_be_bytes());
                garbage
            }
            1 => {
                let mut forged = self.genuine.clone();
                let at = forged.len() - 1 - (n as usize % 32);
                forged[at] ^= 0x55;
                forged
            }
            2 => {
                let (counter, key) = self.chain.step().expect("a fresh chain steps");
                seal_chain(
                    me.device_signing_key(),
                    self.tag,
                    1,
                    counter,
                    &key,
                    b"junk from an unknown device",
                )
                .expect("sealing")
                .into_bytes()
            }
            _ => self.genuine.clone(),
        }
    }
}

/// Mallory floods alice for `length`, at an even pace, coming back under
/// a fresh peer id each time she is dropped.
async fn flood(
    settings: &Settings,
    alice_addr: Multiaddr,
    alice_peer: PeerId,
    genuine: Vec<u8>,
) -> Result<Mallory> {
    let mut mallory = Mallory::default();
    let mut junk = Junk {
        tag: Envelope::decode(&genuine)?.header.tag,
        genuine,
        chain: SendingChain::new([0x6d; 32]),
        n: 0,
    };
    const TICK: Duration = Duration::from_millis(10);
    let per_tick = settings.junk as f64 * TICK.as_secs_f64() / settings.flood.as_secs_f64();
    let mut owed = 0.0;
    let mut tick = tokio::time::interval(TICK);
    let end = Instant::now() + settings.flood;
    while Instant::now() < end && mallory.handed < settings.junk {
        let me = Identity::from_seed(format!("mallory/{}", mallory.ids.len()).as_bytes(), 0)?;
        let mut config = NetConfig::loopback();
        config.bootstrap = vec![alice_addr.clone()];
        config.relay_target = 0;
        config.dht_server = false;
        let (net, mut events, task) = net::spawn(me.libp2p_keypair()?, config)?;
        // She learns alice's topics from alice's subscriptions.
        let mut topics = Vec::new();
        let learned = tokio::time::timeout(DEADLINE, async {
            while let Some(event) = events.recv().await {
                if let NetEvent::Subscribed { peer, topic } = event
                    && peer == alice_peer
                {
                    topics.push(topic);
                    return true;
                }
            }
            false
        });
        if !learned.await.unwrap_or(false) {
            bail!("mallory #{} never heard alice's topics", mallory.ids.len());
        }
        let started = Instant::now();
        let mut handed = 0u64;
        let mut dropped = None;
        'connected: while Instant::now() < end && mallory.handed < settings.junk {
            tokio::select! {
                event = events.recv() => match event {
                    Some(NetEvent::Subscribed { peer, topic }) if peer == alice_peer => {
                        topics.push(topic);
                    }
                    Some(NetEvent::Disconnected { peer }) if peer == alice_peer => {
                        dropped = Some(started.elapsed());
                        break 'connected;
                    }
                    Some(_) => {}
                    None => break 'connected,
                },
                _ = tick.tick() => {
                    owed += per_tick;
                    while owed >= 1.0 {
                        owed -= 1.0;
                        let n = junk.n;
                        let data = junk.next(&me);
                        let command = if n % 10 == 9 || data.len() > MAX_ENVELOPE_BYTES {
                            let (reply, _) = tokio::sync::oneshot::channel();
                            NetCommand::Direct {
                                peer: alice_peer,
                                data: postcard::to_stdvec(&DirectRequest::Envelopes(vec![data]))?,
                                reply,
                            }
                        } else {
                            let topic = topics[n as usize % topics.len()].clone();
                            NetCommand::Publish { topic, data }
                        };
                        // Her own node's queue full: that junk is not sent.
                        if net.try_send(command) {
                            handed += 1;
                        } else {
                            mallory.failed_sends += 1;
                        }
                        mallory.handed += 1;
                    }
                }
            }
        }
        mallory.runs.push((handed, dropped));
        mallory.ids.push(me);
        net.shutdown().await;
        task.abort();
    }
    Ok(mallory)
}

async fn run(
    settings: &Settings,
    alice_node: &Weft,
    bob_node: &Weft,
    alice_addr: Multiaddr,
    alice_peer: PeerId,
    alice_pid: u32,
) -> Result<()> {
    let mut alice = Side::connect("alice", alice_node).await?;
    let mut bob = Side::connect("bob", bob_node).await?;
    // The first message is queued until bob has connected and subscribed.
    let first = tokio::time::timeout(DEADLINE * 2, async {
        let send = Request::Send {
            target: "bob".into(),
            text: "before".into(),
            reply_to: None,
        };
        let Response::Sent(sent) = alice.calls.call(&send).await? else {
            bail!("send answered with something else");
        };
        bob.receive("before").await?;
        Ok::<_, anyhow::Error>(sent.id)
    })
    .await
    .context("the first message")??;
    let genuine = weft_node::store::Store::open(&Home::new(bob_node.home().into()).db_path())?
        .db()
        .envelope(&first.parse()?)?
        .context("bob holds the first envelope")?
        .bytes;

    // Warm up (connections, caches) before anything is timed.
    let (_, warm_by_alice, warm_by_bob) = exchange(
        &mut alice,
        &mut bob,
        "warm",
        Duration::from_secs(2),
        settings.pace,
    )
    .await?;
    let (quiet, quiet_by_alice, quiet_by_bob) =
        exchange(&mut alice, &mut bob, "quiet", settings.quiet, settings.pace).await?;

    // Alice's memory, sampled all along the flood.
    let sampling = tokio::spawn(async move {
        let mut peak_kb = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            match procfs::status_kb(alice_pid, "VmRSS") {
                Some(kb) => peak_kb = peak_kb.max(kb),
                None => return peak_kb,
            }
        }
    });
    let cpu_before = procfs::cpu_of(alice_pid);
    let started = Instant::now();
    let flooding = {
        let settings = *settings;
        tokio::spawn(async move { flood(&settings, alice_addr, alice_peer, genuine).await })
    };
    let (flooded, flood_by_alice, flood_by_bob) = exchange(
        &mut alice,
        &mut bob,
        "flooded",
        settings.flood,
        settings.pace,
    )
    .await?;
    let mallory = flooding.await??;
    let took = started.elapsed();
    let cpu = procfs::cpu_of(alice_pid) - cpu_before;
    sampling.abort();
    let peak_rss_kb = match sampling.await {
        Ok(kb) => kb,
        Err(_) => procfs::status_kb(alice_pid, "VmRSS").unwrap_or(0),
    };
    let hwm_kb = procfs::status_kb(alice_pid, "VmHWM").unwrap_or(0);

    let status_started = Instant::now();
    alice.calls.call(&Request::Status).await?;
    let status_ms = ms(status_started.elapsed());

    // Every honest message once, in order, on the other side.
    let mut expected_at_bob = vec!["before".to_string()];
    expected_at_bob.extend(warm_by_alice);
    expected_at_bob.extend(quiet_by_alice.iter().cloned());
    expected_at_bob.extend(flood_by_alice.iter().cloned());
    let mut expected_at_alice = warm_by_bob;
    expected_at_alice.extend(quiet_by_bob.iter().cloned());
    expected_at_alice.extend(flood_by_bob.iter().cloned());
    let at_bob = bob.texts_from("alice").await?;
    let at_alice = alice.texts_from("bob").await?;

    let drops: Vec<Duration> = mallory.runs.iter().filter_map(|r| r.1).collect();
    let slowest_drop = drops.iter().max().copied().unwrap_or_default();
    let undropped = mallory.runs.iter().filter(|r| r.1.is_none()).count();
    let ratio = ms(quantile(&flooded, 0.99)) / ms(quantile(&quiet, 0.99));
    println!(
        "junk flood: {} junk in {took:.1?} by {} peer ids ({} not sent: her own queue full); \
         alice dropped each after {:.2?} at most ({} still connected at the end), \
         median {:.0} junk handed per id",
        mallory.handed,
        mallory.ids.len(),
        mallory.failed_sends,
        slowest_drop,
        undropped,
        {
            let mut per_id: Vec<u64> = mallory.runs.iter().map(|r| r.0).collect();
            per_id.sort();
            per_id.get(per_id.len() / 2).copied().unwrap_or(0)
        }
    );
    println!(
        "honest: quiet {} messages p50 {:.2} ms p99 {:.2} ms max {:.2} ms; \
         flooded {} messages p50 {:.2} ms p99 {:.2} ms max {:.2} ms; p99 ratio {ratio:.2} (target <= {P99_TARGET})",
        quiet.len(),
        ms(quantile(&quiet, 0.5)),
        ms(quantile(&quiet, 0.99)),
        ms(*quiet.last().unwrap()),
        flooded.len(),
        ms(quantile(&flooded, 0.5)),
        ms(quantile(&flooded, 0.99)),
        ms(*flooded.last().unwrap()),
    );
    println!(
        "alice: peak RSS {:.1} MB sampled, VmHWM {:.1} MB (target < {RSS_TARGET_MB} MB); \
         CPU {:.1} s in {took:.1?} ({:.0}% of a core); status answered in {status_ms:.1} ms",
        peak_rss_kb as f64 / 1024.0,
        hwm_kb as f64 / 1024.0,
        cpu.as_secs_f64(),
        100.0 * cpu.as_secs_f64() / took.as_secs_f64(),
    );

    // Why alice banned each peer id, from her log.
    let mut bans = std::collections::BTreeMap::<String, u32>::new();
    for line in alice_node.daemon()?.log().lines() {
        if let Some((_, reason)) = line.split_once("banned for 3600s: ") {
            let reason = reason.split(" peer=").next().unwrap_or(reason);
            *bans.entry(reason.trim().to_string()).or_default() += 1;
        }
    }
    println!("alice's bans: {bans:?}");

    if at_bob != expected_at_bob {
        bail!("bob's messages from alice differ from what she sent: {at_bob:?}");
    }
    if at_alice != expected_at_alice {
        bail!("alice's messages from bob differ from what he sent: {at_alice:?}");
    }
    println!(
        "delivered: {} + {} honest messages, each once, in order",
        at_bob.len(),
        at_alice.len()
    );
    if hwm_kb as f64 / 1024.0 >= RSS_TARGET_MB {
        bail!("alice's RSS peaked at {} kB", hwm_kb);
    }
    if slowest_drop > DROP_TARGET {
        bail!("alice took {slowest_drop:?} to drop a flooder");
    }
    Ok(())
}
