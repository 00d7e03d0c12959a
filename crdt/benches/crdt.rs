//! The annotation documents at conversation scale.
//!
//! - `apply_10000_remote_changes`: 10,000 changes from two other devices
//!   (reactions and edits, each its own change as it would arrive in its
//!   own envelope), inspected and applied to a replica that has none of
//!   them. Target (issue 4): under 1 s.
//! - `open_latest_shard_and_page_50`: a conversation of 100,000 messages
//!   over a year (one message every ~5 minutes), one in five annotated,
//!   sharded by 30-day period: load the latest shard from its saved bytes
//!   and read the annotations of the latest 50 messages. Target (with the
//!   node's SQLite page, measured in the node): under 50 ms in all.
//! - `load_shard_of_10000_annotations`: one full shard from bytes.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::Criterion;
use weft_crdt::{Annotations, EditRef, ShardKey};

fn message_id(i: u64) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&i.to_be_bytes());
    id
}

/// 10,000 changes by two remote devices.
fn remote_changes(n: usize) -> Vec<Vec<u8>> {
    let mut bob = Annotations::new(&[0xb0; 32]);
    let mut carol = Annotations::new(&[0xc0; 32]);
    let mut out = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let m = message_id(i / 2);
        let change = if i % 2 == 0 {
            bob.react(&m, &[0xb0; 32], "👍", true).unwrap()
        } else {
            carol
                .edit(
                    &m,
                    EditRef {
                        hlc: i,
                        edit: message_id(i).to_vec(),
                    },
                )
                .unwrap()
        };
        out.push(change);
    }
    out
}

/// Inspects each change (as the node does, to check its author), then
/// applies them in one batch.
fn apply_all(changes: &[Vec<u8>]) -> Annotations {
    let mut me = Annotations::new(&[0xa1; 32]);
    let inspected = changes
        .iter()
        .map(|c| Annotations::inspect(c).unwrap().0)
        .collect();
    me.apply_batch(inspected).unwrap();
    me
}

/// The saved shards of a 100,000-message conversation, oldest first, and
/// the (shard, message ids) of the latest 50.
/// Saved shards, oldest first.
type Saved = Vec<(ShardKey, Vec<u8>)>;

fn year_of_messages() -> (Saved, Vec<[u8; 16]>) {
    let conv = [7u8; 32];
    let start = 1_700_000_000_000u64;
    let step = 365 * 24 * 3600 * 1000 / 100_000; // ~5 minutes
    let mut shards: Vec<(ShardKey, Annotations)> = Vec::new();
    for i in 0..100_000u64 {
        let hlc = start + i * step;
        let key = ShardKey::of_message(conv, hlc);
        if shards.last().is_none_or(|(k, _)| *k != key) {
            shards.push((key, Annotations::new(&[0xa1; 32])));
        }
        if i % 5 == 0 {
            let (_, shard) = shards.last_mut().unwrap();
            shard
                .react(&message_id(i), &[0xa1; 32], "👍", true)
                .unwrap();
        }
    }
    let latest: Vec<[u8; 16]> = (100_000 - 50..100_000).map(message_id).collect();
    let saved = shards.into_iter().map(|(k, mut s)| (k, s.save())).collect();
    (saved, latest)
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();

    let changes = remote_changes(10_000);
    let t = Instant::now();
    let replica = apply_all(&changes);
    eprintln!(
        "apply 10,000 remote changes: {:.0} ms once (target < 1000 ms); {} messages annotated",
        t.elapsed().as_secs_f64() * 1e3,
        replica.view().messages.len()
    );
    c.bench_function("apply_10000_remote_changes", |b| {
        b.iter(|| black_box(apply_all(&changes)))
    });

    let (shards, latest) = year_of_messages();
    let (key, bytes) = shards.last().unwrap();
    eprintln!(
        "100,000 messages in {} shards; the latest (period {}) is {} KiB",
        shards.len(),
        key.period,
        bytes.len() / 1024
    );
    c.bench_function("open_latest_shard_and_page_50", |b| {
        b.iter(|| {
            let shard = Annotations::load(bytes, &[0xa1; 32]).unwrap();
            let page: Vec<_> = latest.iter().map(|m| shard.message(m)).collect();
            black_box(page)
        })
    });

    let mut big = Annotations::new(&[0xa1; 32]);
    for i in 0..10_000u64 {
        big.react(&message_id(i), &[0xa1; 32], "👍", true).unwrap();
    }
    let big = big.save();
    eprintln!(
        "a shard of 10,000 annotations: {} KiB saved",
        big.len() / 1024
    );
    c.bench_function("load_shard_of_10000_annotations", |b| {
        b.iter(|| black_box(Annotations::load(&big, &[0xa1; 32]).unwrap()))
    });
    c.final_summary();
}
