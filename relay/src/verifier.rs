//! Verification of deposited envelopes, on threads of its own: each
//! envelope must parse as a Weft envelope and carry a valid signature by
//! the device its header names. Neither the swarm task nor the store
//! thread waits for ed25519.
//!
//! Deposits queue on a bounded channel; a thread that wakes takes what is
//! waiting (up to [`CHUNK`] envelopes' worth), so under load one wakeup
//! serves many deposits and the threads rarely sleep.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use weft_proto::crypto::CryptoError;
use weft_proto::crypto::envelope::Envelope;

/// Deposits waiting for a thread. The swarm task's bound on requests in
/// flight is lower, so this is a backstop.
const QUEUE: usize = 16_384;
/// A thread takes jobs until it holds this many envelopes (or the queue
/// is empty), leaving the rest to the others.
const CHUNK: usize = 32;

/// Why a deposit's envelopes were not accepted.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("envelope {index} is not a valid signed Weft envelope: {reason}")]
    Envelope { index: usize, reason: CryptoError },
    #[error("too many deposits are waiting to be verified")]
    Busy,
    #[error("the verifier has stopped")]
    Stopped,
}

/// Checks that each envelope parses as a Weft envelope and carries a
/// valid signature by the device its header names (the sender's device
/// id is its ed25519 key). Stops at the first that does not.
pub fn verify_envelopes(envelopes: &[Vec<u8>]) -> Result<(), VerifyError> {
    for (index, bytes) in envelopes.iter().enumerate() {
        Envelope::decode(bytes)
            .and_then(|envelope| envelope.verify())
            .map_err(|reason| VerifyError::Envelope { index, reason })?;
    }
    Ok(())
}

type Outcome = Result<Vec<Vec<u8>>, VerifyError>;

struct Job {
    envelopes: Vec<Vec<u8>>,
    done: oneshot::Sender<Outcome>,
}

/// A handle to the verifier threads; they stop when every handle is gone.
#[derive(Clone, Debug)]
pub struct Verifier {
    tx: SyncSender<Job>,
}

impl Verifier {
    /// Starts `threads` threads (at least one).
    pub fn spawn(threads: usize) -> std::io::Result<Verifier> {
        let (tx, rx) = sync_channel(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for n in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("relay-verify-{n}"))
                .spawn(move || run(&rx))?;
        }
        Ok(Verifier { tx })
    }

    /// `envelopes` back if every one verifies.
    pub async fn verify(&self, envelopes: Vec<Vec<u8>>) -> Outcome {
        let (done, answer) = oneshot::channel();
        self.tx
            .try_send(Job { envelopes, done })
            .map_err(|e| match e {
                TrySendError::Full(_) => VerifyError::Busy,
                TrySendError::Disconnected(_) => VerifyError::Stopped,
            })?;
        answer.await.map_err(|_| VerifyError::Stopped)?
    }
}

fn run(rx: &Mutex<Receiver<Job>>) {
    let mut jobs = Vec::new();
    loop {
        {
            // Only one thread waits in `recv`; the others wait for the lock.
            let Ok(rx) = rx.lock() else { return };
            let Ok(first) = rx.recv() else { return };
            let mut envelopes = first.envelopes.len();
            jobs.push(first);
            while envelopes < CHUNK {
                let Ok(job) = rx.try_recv() else { break };
                envelopes += job.envelopes.len();
                jobs.push(job);
            }
        }
        for Job { envelopes, done } in jobs.drain(..) {
            let _ = done.send(verify_envelopes(&envelopes).map(|()| envelopes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::crypto::chain::MessageKey;
    use weft_proto::crypto::envelope::seal_chain;
    use weft_proto::ids::RoutingTag;

    fn sealed(seed: &[u8], counter: u64) -> Vec<u8> {
        let device = weft_node::identity::Identity::from_seed(seed, 0).unwrap();
        let key = MessageKey {
            key: [1; 32],
            nonce: [2; 24],
        };
        seal_chain(
            device.device_signing_key(),
            RoutingTag([3; 16]),
            1,
            counter,
            &key,
            b"hello",
        )
        .unwrap()
        .into_bytes()
    }

    fn failing_index(envelopes: &[Vec<u8>]) -> Option<usize> {
        match verify_envelopes(envelopes) {
            Ok(()) => None,
            Err(VerifyError::Envelope { index, .. }) => Some(index),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn only_envelopes_signed_by_the_device_their_header_names_verify() {
        let good = sealed(b"alice", 1);
        let other = sealed(b"mallory", 2);
        assert_eq!(failing_index(&[good.clone(), other.clone()]), None);
        // A flipped bit anywhere: the first bad one is named.
        for i in [0, 20, good.len() / 2, good.len() - 1] {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            assert_eq!(failing_index(&[other.clone(), bad]), Some(1), "byte {i}");
        }
        // Mallory's envelope naming alice's device (the header's sender,
        // after version and tag) as its sender.
        let mut claimed = other.clone();
        claimed[17..49].copy_from_slice(&good[17..49]);
        assert_eq!(failing_index(&[claimed]), Some(0));
        assert_eq!(failing_index(&[b"\x02 not an envelope".to_vec()]), Some(0));
    }

    #[tokio::test]
    async fn every_deposit_gets_its_own_answer() {
        let verifier = Verifier::spawn(2).unwrap();
        let good = sealed(b"alice", 1);
        let mut bad = good.clone();
        bad[30] ^= 1;
        let answers = futures::future::join_all((0..100).map(|n| {
            let v = verifier.clone();
            let deposit = if n % 3 == 0 {
                vec![good.clone(), bad.clone()]
            } else {
                vec![good.clone()]
            };
            async move { v.verify(deposit).await }
        }))
        .await;
        for (n, answer) in answers.into_iter().enumerate() {
            match answer {
                Ok(envelopes) => assert!(n % 3 != 0 && envelopes == vec![good.clone()]),
                Err(VerifyError::Envelope { index: 1, .. }) => assert!(n % 3 == 0),
                Err(e) => panic!("deposit {n}: {e}"),
            }
        }
    }
}
