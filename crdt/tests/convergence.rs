//! Convergence: five replicas (alice's phone, laptop and tablet, bob,
//! carol) make random concurrent edits, deletions, reactions, pins and
//! group changes on one shard, and alice's three devices change the
//! account state, while changes travel between random pairs in random
//! order (some duplicated, some ahead of what they depend on). After a
//! final exchange every replica's materialised view is identical.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use weft_crdt::{AccountState, Annotations, EditRef};

const REPLICAS: usize = 5;
const ALICE_DEVICES: usize = 3;
const MESSAGES: u8 = 6;

fn user_of(replica: usize) -> [u8; 32] {
    match replica {
        0..ALICE_DEVICES => [0xa1; 32],
        3 => [0xb0; 32],
        _ => [0xc0; 32],
    }
}

#[derive(Clone, Debug)]
enum Op {
    Edit {
        by: usize,
        message: u8,
        hlc: u64,
    },
    Delete {
        by: usize,
        message: u8,
    },
    React {
        by: usize,
        message: u8,
        emoji: u8,
        on: bool,
    },
    Pin {
        by: usize,
        message: u8,
        on: bool,
    },
    Rename {
        by: usize,
        name: u8,
    },
    Contact {
        by: usize,
        user: u8,
        add: bool,
    },
    Block {
        by: usize,
        user: u8,
        on: bool,
    },
    Read {
        by: usize,
        hlc: u64,
    },
    Mute {
        by: usize,
        on: bool,
    },
    /// Send `from`'s changes that `to` lacks, in shuffled order.
    Exchange {
        from: usize,
        to: usize,
        seed: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let r = 0..REPLICAS;
    let a = 0..ALICE_DEVICES;
    prop_oneof![
        (r.clone(), 0..MESSAGES, 1..1000u64).prop_map(|(by, message, hlc)| Op::Edit {
            by,
            message,
            hlc
        }),
        (r.clone(), 0..MESSAGES).prop_map(|(by, message)| Op::Delete { by, message }),
        (r.clone(), 0..MESSAGES, 0..3u8, any::<bool>()).prop_map(|(by, message, emoji, on)| {
            Op::React {
                by,
                message,
                emoji,
                on,
            }
        }),
        (r.clone(), 0..MESSAGES, any::<bool>()).prop_map(|(by, message, on)| Op::Pin {
            by,
            message,
            on
        }),
        (r.clone(), 0..4u8).prop_map(|(by, name)| Op::Rename { by, name }),
        (a.clone(), 0..4u8, any::<bool>()).prop_map(|(by, user, add)| Op::Contact {
            by,
            user,
            add
        }),
        (a.clone(), 0..4u8, any::<bool>()).prop_map(|(by, user, on)| Op::Block { by, user, on }),
        (a.clone(), 1..1000u64).prop_map(|(by, hlc)| Op::Read { by, hlc }),
        (a, any::<bool>()).prop_map(|(by, on)| Op::Mute { by, on }),
        (r.clone(), r, any::<u64>()).prop_map(|(from, to, seed)| Op::Exchange { from, to, seed }),
    ]
}

struct World {
    shards: Vec<Annotations>,
    accounts: Vec<AccountState>,
}

/// A small deterministic shuffle (xorshift), so a failing case replays.
fn shuffle<T>(items: &mut [T], mut seed: u64) {
    for i in (1..items.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        items.swap(i, (seed % (i as u64 + 1)) as usize);
    }
}

impl World {
    fn new() -> Self {
        let device = |i: usize| format!("device-{i}").into_bytes();
        Self {
            shards: (0..REPLICAS)
                .map(|i| Annotations::new(&device(i)))
                .collect(),
            accounts: (0..ALICE_DEVICES)
                .map(|i| AccountState::new(&device(i)))
                .collect(),
        }
    }

    fn run(&mut self, op: &Op) {
        let conv = [9u8; 16];
        // Failures here are refusals of no-op changes ("nothing changed"),
        // which are fine to ignore: the op changed nothing.
        let _ = match *op {
            Op::Edit { by, message, hlc } => {
                // Only the sender edits: messages are "sent" round robin.
                if user_of(by) != user_of(message as usize % REPLICAS) {
                    return;
                }
                self.shards[by].edit(
                    &[message; 16],
                    EditRef {
                        hlc,
                        edit: vec![by as u8, message],
                    },
                )
            }
            Op::Delete { by, message } => self.shards[by].delete(&[message; 16]),
            Op::React {
                by,
                message,
                emoji,
                on,
            } => {
                let emoji = ["👍", "🎉", "😂"][emoji as usize];
                self.shards[by].react(&[message; 16], &user_of(by), emoji, on)
            }
            Op::Pin { by, message, on } => self.shards[by].pin(&[message; 16], on),
            Op::Rename { by, name } => self.shards[by].set_group("name", &format!("group {name}")),
            Op::Contact { by, user, add } => {
                if add {
                    self.accounts[by]
                        .add_contact(
                            &[user; 32],
                            &format!("friend {user}"),
                            &format!("weft1{user}"),
                        )
                        .map(|_| Vec::new())
                } else {
                    self.accounts[by]
                        .remove_contact(&[user; 32])
                        .map(|_| Vec::new())
                }
            }
            Op::Block { by, user, on } => {
                self.accounts[by].block(&[user; 32], on).map(|_| Vec::new())
            }
            Op::Read { by, hlc } => self.accounts[by].mark_read(&conv, hlc).map(|_| Vec::new()),
            Op::Mute { by, on } => self.accounts[by].set_muted(&conv, on).map(|_| Vec::new()),
            Op::Exchange { from, to, seed } => {
                self.exchange(from, to, seed);
                Ok(Vec::new())
            }
        };
    }

    fn exchange(&mut self, from: usize, to: usize, seed: u64) {
        if from == to {
            return;
        }
        let heads = self.shards[to].doc().heads();
        let mut changes = self.shards[from].doc().changes_since(&heads);
        // Out of order, with one repeated.
        shuffle(&mut changes, seed | 1);
        if let Some(first) = changes.first().cloned() {
            changes.push(first);
        }
        for c in changes {
            let (inspected, _) = Annotations::inspect(&c).expect("a change we made");
            self.shards[to].apply(inspected).expect("applies");
        }
        if from < ALICE_DEVICES && to < ALICE_DEVICES {
            let heads = self.accounts[to].doc().heads();
            let mut changes = self.accounts[from].doc().changes_since(&heads);
            shuffle(&mut changes, seed | 1);
            for c in changes {
                let inspected = AccountState::inspect(&c).expect("a change we made");
                self.accounts[to].apply(inspected).expect("applies");
            }
        }
    }

    fn heal(&mut self) {
        for _ in 0..2 {
            for from in 0..REPLICAS {
                for to in 0..REPLICAS {
                    self.exchange(from, to, (from * 31 + to) as u64);
                }
            }
        }
    }
}

#[test]
fn every_replica_converges_on_one_history_and_one_account_state() {
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: 48,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &[42; 32]),
    );
    runner
        .run(&proptest::collection::vec(op(), 1..120), |ops| {
            let mut world = World::new();
            for op in &ops {
                world.run(op);
            }
            world.heal();
            let first = world.shards[0].view();
            for (i, shard) in world.shards.iter().enumerate() {
                prop_assert_eq!(&shard.view(), &first, "replica {} differs", i);
            }
            let account = world.accounts[0].view();
            for (i, acc) in world.accounts.iter().enumerate() {
                prop_assert_eq!(&acc.view(), &account, "alice's device {} differs", i);
            }
            // Saved and loaded, a replica shows the same.
            let bytes = world.shards[3].save();
            let loaded = Annotations::load(&bytes, b"reloaded").expect("loads");
            prop_assert_eq!(loaded.view(), first);
            Ok(())
        })
        .unwrap();
}
