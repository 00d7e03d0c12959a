//! Crash test with the real binaries: alice's daemon is killed with SIGKILL
//! at seeded random points, many times, while a loop sends messages to bob
//! through it; in some rounds bob is down, so the messages wait in alice's
//! outbox. After the last restart nothing acknowledged may be lost and
//! nothing may arrive twice.
//!
//! The seed is printed; `WEFT_CRASH_SEED=N` repeats a run. Build the
//! binaries first (`cargo build --workspace --bins`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde_json::Value;
use weft_e2e::{Cli, Weft, wait_until};

/// Crash rounds.
const ROUNDS: usize = 12;
/// How long catching up after the last restart may take.
const CATCH_UP: Duration = Duration::from_secs(60);
/// The seed when `WEFT_CRASH_SEED` is not set.
const DEFAULT_SEED: u64 = 0x5eed_c4a5_0001;
/// More than any history this test builds.
const LIMIT: &str = "10000";

/// What bob's daemon does in a round.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Bob {
    /// Runs throughout.
    Up,
    /// Is stopped before alice's daemon starts and comes back while alice
    /// still sends (her outbox drains to him, then she is killed).
    BackBeforeKill,
    /// Is stopped before alice's daemon starts and comes back only after
    /// she was killed: her queue has to survive the crash.
    BackAfterKill,
}

fn bob_in(round: usize) -> Bob {
    match round {
        2 | 8 => Bob::BackBeforeKill,
        5 | 10 => Bob::BackAfterKill,
        _ => Bob::Up,
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

/// `weft --json messages TARGET --limit 10000`.
fn history(w: &Weft, target: &str) -> anyhow::Result<Vec<Value>> {
    match w.json(&["messages", target, "--limit", LIMIT])? {
        Value::Array(list) => Ok(list),
        other => bail!("{}: messages is not an array: {other}", w.name),
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

/// Whether `text` is `crash-ROUND-N`.
fn is_crash_text(text: &str) -> bool {
    let mut parts = text.split('-');
    parts.next() == Some("crash")
        && parts
            .next()
            .is_some_and(|r| r.parse::<usize>().is_ok_and(|r| r < ROUNDS))
        && parts
            .next()
            .is_some_and(|n| n.parse::<usize>().is_ok_and(|n| n > 0))
        && parts.next().is_none()
}

#[test]
fn sigkilled_sender_loses_nothing_and_sends_nothing_twice() -> anyhow::Result<()> {
    let started = Instant::now();
    let seed = seed()?;
    eprintln!("crash test: seed {seed} (WEFT_CRASH_SEED={seed} repeats this run)");
    let mut rng = Rng(seed);

    let mut alice = Weft::new("alice")?;
    let mut bob = Weft::new("bob")?;
    alice.init()?;
    bob.init()?;
    alice.add_contact(&bob)?;
    bob.add_contact(&alice)?;
    let alice_user = alice.user_id()?;
    bob.start_daemon(&[])?;

    let mut attempts: Vec<Attempt> = Vec::new();
    for round in 0..ROUNDS {
        let bob_mode = bob_in(round);
        if bob_mode != Bob::Up {
            bob.stop_daemon()?;
        }
        // Alice learns bob's (new) address from the command line.
        match bob.daemon() {
            Ok(daemon) => {
                let boot = daemon.dial_addr()?;
                alice.start_daemon(&["--bootstrap", &boot])?;
            }
            Err(_) => {
                alice.start_daemon(&[])?;
            }
        }
        let alice_addr = alice.daemon()?.dial_addr()?;

        let stop = Arc::new(AtomicBool::new(false));
        let loop_handle = sender(alice.cli(), round, stop.clone());
        // The random kill point.
        thread::sleep(rng.millis(100, 600));
        if bob_mode == Bob::BackBeforeKill {
            // Bob comes back while alice sends: her outbox drains to him.
            bob.start_daemon(&["--bootstrap", &alice_addr])?;
            thread::sleep(rng.millis(0, 300));
        }
        let status = alice.kill_daemon_hard()?;
        let killed = Instant::now();
        // Let the loop run on a little against the dead daemon (its sends
        // fail or are answered by an offline node the CLI starts).
        thread::sleep(rng.millis(0, 150));
        stop.store(true, Ordering::SeqCst);
        let mut round_attempts = loop_handle
            .join()
            .map_err(|_| anyhow!("the sender thread panicked"))?
            .with_context(|| format!("seed {seed}, round {round}: the sender loop"))?;
        if bob_mode == Bob::BackAfterKill {
            // Alice is down; she finds bob in the next round.
            bob.start_daemon(&[])?;
        }
        for a in &mut round_attempts {
            a.phase = a.phase_of(killed);
        }
        let acked = round_attempts.iter().filter(|a| a.acked.is_some()).count();
        let after_kill = round_attempts
            .iter()
            .filter(|a| a.acked.is_some() && a.phase != "before the kill")
            .count();
        let queued = round_attempts
            .iter()
            .filter(|a| a.acked.is_some() && a.status == "queued")
            .count();
        eprintln!(
            "round {round} (bob {bob_mode:?}): {} sends, {acked} acknowledged ({queued} \
             queued, {after_kill} during or after the kill), daemon {status}",
            round_attempts.len(),
        );
        attempts.extend(round_attempts);
    }

    // Alice's daemon for good; bob runs.
    let bob_addr = bob.daemon()?.dial_addr()?;
    alice.start_daemon(&["--bootstrap", &bob_addr])?;

    let acked: BTreeMap<&str, &str> = attempts
        .iter()
        .filter_map(|a| a.acked.as_deref().map(|id| (a.text.as_str(), id)))
        .collect();
    anyhow::ensure!(
        acked.len() >= ROUNDS,
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
            "seed {seed}: {what}: {err:#}\nsends not (acknowledged and delivered):\n{}\n{}\n{}",
            lines.join("\n"),
            alice.daemon_logs(),
            bob.daemon_logs()
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
        if m["sender"] != alice_user.as_str() || !is_crash_text(text) {
            problems.push(format!("bob has a message not from alice's loop: {m}"));
        } else if !attempted.contains(text) {
            problems.push(format!("bob has {text}, which was never sent"));
        }
    }

    let unacked_delivered = bob_counts
        .keys()
        .filter(|t| !acked.contains_key(t.as_str()))
        .count();
    eprintln!(
        "crash test: {} sends, {} acknowledged; bob has {} ({} unacknowledged but \
         delivered), alice has {}; {:?}",
        attempts.len(),
        acked.len(),
        on_bob.len(),
        unacked_delivered,
        on_alice.len(),
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
