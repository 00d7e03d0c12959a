//! Crash soak with the real binaries: a sending daemon (alice), a
//! receiving daemon (bob) and the relay both use are killed with SIGKILL
//! at seeded random points, one per round, while a loop sends messages
//! from alice to bob; a killed receiver sometimes stays down for the next
//! round, so that alice's messages wait in her outbox and at the relay.
//! After the last restart nothing acknowledged may be lost, nothing may
//! arrive twice, and both devices show the messages in the same order.
//!
//! The seed is printed; `WEFT_CRASH_SEED=N` repeats a run and
//! `WEFT_SOAK_KILLS=N` sets the number of kills (CI: 20). `tests/soak N
//! SEED` runs a long one. Build the binaries first (`cargo build
//! --workspace --bins`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde_json::Value;
use weft_e2e::relay::Relay;
use weft_e2e::{Cli, Weft, wait_until};

/// Kills (one per round) when `WEFT_SOAK_KILLS` is not set.
const DEFAULT_KILLS: usize = 20;
/// How long catching up after the last restart may take.
const CATCH_UP: Duration = Duration::from_secs(60);
/// The seed when `WEFT_CRASH_SEED` is not set.
const DEFAULT_SEED: u64 = 0x5eed_c4a5_0001;
/// The most messages `weft messages` answers at once.
const PAGE: usize = 10_000;
const LIMIT: &str = "10000";

/// Who is killed in a round.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Victim {
    /// Alice's daemon, the sender: what it acknowledged must survive.
    Sender,
    /// Bob's daemon, the receiver; with `stays_down` he comes back only
    /// after the next round's kill, so alice's messages wait for him.
    Receiver { stays_down: bool },
    /// The relay: deposits it acknowledged must survive.
    Relay,
}

/// One of the three, the receiver only if `receiver_up`.
fn victim(rng: &mut Rng, receiver_up: bool) -> Victim {
    let choices: u64 = if receiver_up { 3 } else { 2 };
    match rng.next() % choices {
        0 => Victim::Sender,
        1 => Victim::Relay,
        _ => Victim::Receiver {
            stays_down: rng.next().is_multiple_of(2),
        },
    }
}

/// splitmix64: a tiny, seeded, good-enough generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A duration of `lo..hi` milliseconds.
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo))
    }
}

fn kills() -> anyhow::Result<usize> {
    match std::env::var("WEFT_SOAK_KILLS") {
        Ok(text) => text
            .trim()
            .parse()
            .with_context(|| format!("WEFT_SOAK_KILLS={text} is not a count")),
        Err(_) => Ok(DEFAULT_KILLS),
    }
}

fn seed() -> anyhow::Result<u64> {
    match std::env::var("WEFT_CRASH_SEED") {
        Ok(text) => text
            .trim()
            .parse()
            .with_context(|| format!("WEFT_CRASH_SEED={text} is not a u64")),
        Err(_) => Ok(DEFAULT_SEED),
    }
}

/// One `send` of the sender loop and how it ended.
#[derive(Debug)]
struct Attempt {
    text: String,
    /// The message id, if the command exited 0 with one.
    acked: Option<String>,
    /// The status `send` reported (acknowledged sends).
    status: String,
    /// Exit code and stderr of a failed send.
    failure: Option<(Option<i32>, String)>,
    /// When the command started and ended.
    began: Instant,
    ended: Instant,
    /// Relative to the kill of its round (set after the round).
    phase: &'static str,
}

impl Attempt {
    /// Whether the daemon was killed before, during or after this send.
    fn phase_of(&self, killed: Instant) -> &'static str {
        if self.ended < killed {
            "before the kill"
        } else if self.began > killed {
            "after the kill"
        } else {
            "racing the kill"
        }
    }
}

/// Sends `crash-ROUND-N` to bob in a loop until `stop` is set.
fn sender(
    cli: Cli,
    round: usize,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<anyhow::Result<Vec<Attempt>>> {
    thread::spawn(move || {
        let mut attempts = Vec::new();
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) {
            n += 1;
            let text = format!("crash-{round}-{n}");
            let began = Instant::now();
            let out = cli.run(&["--json", "send", "bob", &text])?;
            let ended = Instant::now();
            let reply = (out.code == Some(0))
                .then(|| serde_json::from_str::<Value>(out.stdout.trim()).ok())
                .flatten();
            let id = reply
                .as_ref()
                .and_then(|r| r["id"].as_str())
                .map(str::to_string);
            match id {
                Some(id) => attempts.push(Attempt {
                    text,
                    acked: Some(id),
                    status: reply
                        .as_ref()
                        .and_then(|r| r["status"].as_str())
                        .unwrap_or_default()
                        .to_string(),
                    failure: None,
                    began,
                    ended,
                    phase: "",
                }),
                None if out.code == Some(0) => {
                    bail!("send {text} exited 0 without an id: {}", out.stdout)
                }
                None => attempts.push(Attempt {
                    text,
                    acked: None,
                    status: String::new(),
                    failure: Some((out.code, out.stderr)),
                    began,
                    ended,
                    phase: "",
                }),
            }
        }
        Ok(attempts)
    })
}

/// The whole history with `target`, in order: `weft --json messages`
/// answers at most 10,000 at a time, so older pages are read with
/// `--before` the oldest one read.
fn history(w: &Weft, target: &str) -> anyhow::Result<Vec<Value>> {
    let mut all: Vec<Value> = Vec::new();
    loop {
        let mut args = vec!["messages", target, "--limit", LIMIT];
        let oldest = all
            .first()
            .and_then(|m| m["id"].as_str())
            .map(str::to_string);
        if let Some(id) = &oldest {
            args.extend(["--before", id.as_str()]);
        }
        let page = match w.json(&args)? {
            Value::Array(list) => list,
            other => bail!("{}: messages is not an array: {other}", w.name),
        };
        let full = page.len() == PAGE;
        all.splice(0..0, page);
        if !full {
            return Ok(all);
        }
    }
}

fn text_of(m: &Value) -> &str {
    m["text"].as_str().unwrap_or_default()
}

/// How often each text occurs.
fn counts(list: &[Value]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for m in list {
        *counts.entry(text_of(m).to_string()).or_default() += 1;
    }
    counts
}

/// Whether `text` is `crash-ROUND-N` of one of `rounds` rounds.
fn is_crash_text(text: &str, rounds: usize) -> bool {
    let mut parts = text.split('-');
    parts.next() == Some("crash")
        && parts
            .next()
            .is_some_and(|r| r.parse::<usize>().is_ok_and(|r| r < rounds))
        && parts
            .next()
            .is_some_and(|n| n.parse::<usize>().is_ok_and(|n| n > 0))
        && parts.next().is_none()
}

#[test]
fn sigkilled_sender_receiver_and_relay_lose_nothing_and_double_nothing() -> anyhow::Result<()> {
    let started = Instant::now();
    let seed = seed()?;
    let rounds = kills()?;
    eprintln!("crash soak: {rounds} kills, seed {seed} (WEFT_CRASH_SEED={seed} repeats this run)");
    let mut rng = Rng(seed);

    // The relay keeps its port and data directory across its restarts.
    let relay_data = tempfile::Builder::new()
        .prefix("weft-soak-relay-")
        .tempdir()
        .context("creating the relay's data directory")?;
    let mut relay = Some(Relay::start_in(relay_data.path())?);
    let relay_port = relay
        .as_ref()
        .map(Relay::tcp_port)
        .transpose()?
        .unwrap_or(0);
    let relay_addr = relay.as_ref().map(|r| r.addr.clone()).unwrap_or_default();

    let mut alice = Weft::new("alice")?;
    let mut bob = Weft::new("bob")?;
    alice.init()?;
    bob.init()?;
    bob.start_daemon(&["--relay", &relay_addr])?;
    alice.start_daemon(&["--relay", &relay_addr])?;
    // Invites made while the daemons run carry the relay circuit address.
    alice.add_contact(&bob)?;
    bob.add_contact(&alice)?;
    alice.stop_daemon()?;
    let alice_user = alice.user_id()?;

    let mut attempts: Vec<Attempt> = Vec::new();
    let mut kills_of = BTreeMap::<&str, usize>::new();
    let mut bob_back_after_round: Option<usize> = None;
    for round in 0..rounds {
        if relay.is_none() {
            relay = Some(Relay::start_at(relay_port, relay_data.path())?);
        }
        if bob.daemon().is_err() && bob_back_after_round.is_none_or(|r| r < round) {
            bob.start_daemon(&["--relay", &relay_addr])?;
            bob_back_after_round = None;
        }
        if alice.daemon().is_err() {
            let mut args = vec!["--relay".to_string(), relay_addr.clone()];
            if let Ok(daemon) = bob.daemon() {
                args.extend(["--bootstrap".to_string(), daemon.dial_addr()?]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            alice.start_daemon(&args)?;
        }

        let stop = Arc::new(AtomicBool::new(false));
        let loop_handle = sender(alice.cli(), round, stop.clone());
        // The random kill point.
        thread::sleep(rng.millis(100, 600));
        let victim = victim(&mut rng, bob.daemon().is_ok());
        let status = match victim {
            Victim::Sender => alice.kill_daemon_hard()?,
            Victim::Receiver { stays_down } => {
                if stays_down {
                    bob_back_after_round = Some(round + 1);
                }
                bob.kill_daemon_hard()?
            }
            Victim::Relay => match relay.take() {
                Some(mut r) => r.kill_hard()?,
                None => bail!("the relay was down at its kill"),
            },
        };
        let killed = Instant::now();
        *kills_of
            .entry(match victim {
                Victim::Sender => "sender",
                Victim::Receiver { .. } => "receiver",
                Victim::Relay => "relay",
            })
            .or_default() += 1;
        // Let the loop run on a little after the kill.
        thread::sleep(rng.millis(0, 150));
        stop.store(true, Ordering::SeqCst);
        let mut round_attempts = loop_handle
            .join()
            .map_err(|_| anyhow!("the sender thread panicked"))?
            .with_context(|| format!("seed {seed}, round {round}: the sender loop"))?;
        for a in &mut round_attempts {
            a.phase = a.phase_of(killed);
        }
        let acked = round_attempts.iter().filter(|a| a.acked.is_some()).count();
        let queued = round_attempts
            .iter()
            .filter(|a| a.acked.is_some() && a.status == "queued")
            .count();
        eprintln!(
            "round {round} (killed {victim:?}): {} sends, {acked} acknowledged ({queued} \
             queued), {status}",
            round_attempts.len(),
        );
        attempts.extend(round_attempts);
    }
    eprintln!("crash soak: kills {kills_of:?}");

    // Everyone back for good.
    if relay.is_none() {
        relay = Some(Relay::start_at(relay_port, relay_data.path())?);
    }
    if bob.daemon().is_err() {
        bob.start_daemon(&["--relay", &relay_addr])?;
    }
    if alice.daemon().is_err() {
        let bob_addr = bob.daemon()?.dial_addr()?;
        alice.start_daemon(&["--relay", &relay_addr, "--bootstrap", &bob_addr])?;
    }

    let acked: BTreeMap<&str, &str> = attempts
        .iter()
        .filter_map(|a| a.acked.as_deref().map(|id| (a.text.as_str(), id)))
        .collect();
    anyhow::ensure!(
        acked.len() >= rounds,
        "seed {seed}: only {} of {} sends were acknowledged; the test exercised too little",
        acked.len(),
        attempts.len()
    );
    // On failure: what each text went through, alice's view of it, and
    // both nodes' daemon logs.
    let report = |what: &str, err: anyhow::Error| {
        let on_alice = history(&alice, "bob").unwrap_or_default();
        let on_bob: BTreeSet<String> = history(&bob, "alice")
            .unwrap_or_default()
            .iter()
            .map(|m| text_of(m).to_string())
            .collect();
        let mut lines = Vec::new();
        for a in &attempts {
            if on_bob.contains(&a.text) && a.acked.is_some() {
                continue;
            }
            let mine = on_alice.iter().find(|m| text_of(m) == a.text);
            lines.push(format!(
                "  {}: {}, {}; on bob: {}; alice's copy: {}",
                a.text,
                a.phase,
                match (&a.acked, &a.failure) {
                    (Some(id), _) => format!("acknowledged {id} ({})", a.status),
                    (None, Some((code, _))) => format!("failed (exit {code:?})"),
                    (None, None) => "?".to_string(),
                },
                on_bob.contains(&a.text),
                mine.map_or("none".to_string(), |m| format!(
                    "{} {}",
                    m["id"], m["status"]
                )),
            ));
        }
        anyhow!(
            "seed {seed}: {what}: {err:#}\nsends not (acknowledged and delivered):\n{}\n{}\n{}\n--- relay ---\n{}",
            lines.join("\n"),
            alice.daemon_logs(),
            bob.daemon_logs(),
            relay.as_ref().map(Relay::log).unwrap_or_default()
        )
    };

    // Catch-up: bob has every acknowledged text, and every message in
    // alice's history (acknowledged or committed before a kill cut the
    // reply) has left her queue.
    wait_until("bob to have every acknowledged message", CATCH_UP, || {
        let have: BTreeSet<String> = history(&bob, "alice")?
            .iter()
            .map(|m| text_of(m).to_string())
            .collect();
        let missing: Vec<&&str> = acked.keys().filter(|t| !have.contains(**t)).collect();
        if missing.is_empty() {
            Ok(Some(()))
        } else {
            Err(anyhow!(
                "bob still lacks {} acknowledged: {missing:?}",
                missing.len()
            ))
        }
    })
    .map_err(|err| report("lost messages", err))?;
    wait_until("alice's queue to drain", CATCH_UP, || {
        let queued: Vec<String> = history(&alice, "bob")?
            .iter()
            .filter(|m| m["status"] == "queued")
            .map(|m| text_of(m).to_string())
            .collect();
        if queued.is_empty() {
            Ok(Some(()))
        } else {
            Err(anyhow!(
                "alice still has {} queued: {queued:?}",
                queued.len()
            ))
        }
    })
    .map_err(|err| report("alice's outbox does not drain", err))?;

    let on_bob = history(&bob, "alice")?;
    let on_alice = history(&alice, "bob")?;
    let bob_counts = counts(&on_bob);
    let alice_counts = counts(&on_alice);
    let attempted: BTreeSet<&str> = attempts.iter().map(|a| a.text.as_str()).collect();
    let mut problems = Vec::new();

    // (1) every acknowledged text is on bob exactly once, with its id.
    for (text, id) in &acked {
        match bob_counts.get(*text).copied().unwrap_or(0) {
            1 => {
                let got = on_bob.iter().find(|m| text_of(m) == *text);
                if let Some(m) = got.filter(|m| m["id"] != *id) {
                    problems.push(format!(
                        "bob has {text} under id {} but send answered {id}",
                        m["id"]
                    ));
                }
            }
            n => problems.push(format!("bob has acknowledged {text} {n} times")),
        }
    }
    // (2) no text and no id twice on bob.
    for (text, n) in &bob_counts {
        if *n > 1 {
            problems.push(format!("bob has {text} {n} times"));
        }
    }
    let mut ids = BTreeMap::<String, usize>::new();
    for m in &on_bob {
        *ids.entry(m["id"].to_string()).or_default() += 1;
    }
    for (id, n) in ids.iter().filter(|(_, n)| **n > 1) {
        problems.push(format!("bob has id {id} {n} times"));
    }
    // (3) alice's history has every acknowledged text exactly once, and
    // nothing twice; everything in it reached bob.
    for text in acked.keys() {
        let n = alice_counts.get(*text).copied().unwrap_or(0);
        if n != 1 {
            problems.push(format!("alice's history has acknowledged {text} {n} times"));
        }
    }
    for (text, n) in &alice_counts {
        if *n > 1 {
            problems.push(format!("alice's history has {text} {n} times"));
        }
        if !bob_counts.contains_key(text) {
            problems.push(format!(
                "{text} is in alice's history (unacknowledged) but never reached bob"
            ));
        }
    }
    // (4) everything bob has was sent by alice in this test.
    for m in &on_bob {
        let text = text_of(m);
        if m["sender"] != alice_user.as_str() || !is_crash_text(text, rounds) {
            problems.push(format!("bob has a message not from alice's loop: {m}"));
        } else if !attempted.contains(text) {
            problems.push(format!("bob has {text}, which was never sent"));
        }
    }

    // (5) both devices show the messages they both have in the same
    // order. (Bob may have more: a send racing the kill can leave before
    // its commit and be lost from alice's history with an error to the
    // user; docs/architecture.md, "Counter reservations".)
    let order = |list: &[Value], other: &BTreeMap<String, usize>| -> Vec<String> {
        list.iter()
            .map(|m| text_of(m).to_string())
            .filter(|t| is_crash_text(t, rounds) && other.contains_key(t))
            .collect()
    };
    let (alice_order, bob_order) = (order(&on_alice, &bob_counts), order(&on_bob, &alice_counts));
    if let Some(at) = alice_order.iter().zip(&bob_order).position(|(a, b)| a != b) {
        problems.push(format!(
            "alice and bob show the messages in different orders from #{at}: alice {:?}, bob {:?}",
            &alice_order[at..(at + 5).min(alice_order.len())],
            &bob_order[at..(at + 5).min(bob_order.len())],
        ));
    }

    let unacked_delivered = bob_counts
        .keys()
        .filter(|t| !acked.contains_key(t.as_str()))
        .count();
    eprintln!(
        "crash soak: {} sends, {} acknowledged; bob has {} ({} unacknowledged but \
         delivered), alice has {}; {} problems (lost, doubled or out of order); {:?}",
        attempts.len(),
        acked.len(),
        on_bob.len(),
        unacked_delivered,
        on_alice.len(),
        problems.len(),
        started.elapsed()
    );
    if !problems.is_empty() {
        let failures: Vec<String> = attempts
            .iter()
            .filter_map(|a| {
                a.failure
                    .as_ref()
                    .map(|(code, err)| format!("{} exit {code:?}: {}", a.text, err.trim()))
            })
            .collect();
        bail!(
            "seed {seed}: {} problems:\n{}\nfailed sends:\n{}\n{}\n{}",
            problems.len(),
            problems.join("\n"),
            failures.join("\n"),
            alice.daemon_logs(),
            bob.daemon_logs()
        );
    }

    alice.stop_daemon()?;
    bob.stop_daemon()?;
    Ok(())
}
