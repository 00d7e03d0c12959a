//! Attacks on conversations and device bindings by a stranger who holds
//! an invite (or a contact turned hostile), written as the attacker
//! would: envelopes crafted by hand from real keys, handed to an
//! offline node with `deliver`, so every step is deterministic. Each
//! test asserts that the attack fails and that what the victim sends
//! afterwards is sealed to nobody it should not be.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::TestNode;
use weft_node::api::Request;
use weft_node::crypto::envelope::Envelope;
use weft_node::group::{GroupMember, GroupRole, GroupState};
use weft_node::home::Home;
use weft_node::identity::{DeviceCertificate, Identity, Revocation};
use weft_node::ids::{ConversationId, DeviceId};
use weft_node::payload::Payload;

/// The keys a test node named `name` runs with (as `TestNode::start`).
fn identity(name: &str, seed: u64) -> Identity {
    Identity::from_seed(format!("{name}/{seed}").as_bytes(), 0).unwrap()
}

/// A node with no network at all, in a fresh home: it hears only what
/// the test delivers.
async fn offline(name: &str, seed: u64) -> TestNode {
    let dir = tempfile::Builder::new()
        .prefix(&format!("weft-{name}-"))
        .tempdir()
        .unwrap();
    let home = Home::new(dir.path().join("home"));
    home.init_with(&identity(name, seed), name).unwrap();
    TestNode::start_offline(name, dir).await
}

/// Mallory: real keys of her own, envelopes made by hand.
struct Mallory {
    me: Identity,
}

impl Mallory {
    fn new(seed: u64) -> Self {
        Self {
            me: identity("mallory", seed),
        }
    }

    fn invite(&self) -> String {
        self.me
            .invite("Mallory", vec![self.me.certificate().clone()], vec![], 1)
            .unwrap()
    }

    /// Her group state for `id` (epoch `epoch`), with herself as admin
    /// and `others` as members, sealed to `to`'s device.
    fn group_state(
        &self,
        id: ConversationId,
        name: &str,
        epoch: u64,
        others: &[(&Identity, &str)],
        to: &Identity,
    ) -> Vec<u8> {
        let mut members = vec![member(&self.me, "Mallory", GroupRole::Admin)];
        members.extend(
            others
                .iter()
                .map(|(who, name)| member(who, name, GroupRole::Member)),
        );
        let state = GroupState {
            id,
            name: name.into(),
            epoch,
            members,
            routing: [0x77; 32],
        };
        self.sealed(id, to, &Payload::Group(state))
    }

    /// An envelope in `conversation` sealed to `to`'s device (under the
    /// tag of her direct conversation with `to`: the only one she knows).
    fn sealed(&self, conversation: ConversationId, to: &Identity, payload: &Payload) -> Vec<u8> {
        let tag = common::direct_routing(&self.me, to).tag();
        common::seal_by_hand(&self.me, tag, conversation, to, payload)
    }

    /// Sends `victim` (running as `node`) a device list of hers naming
    /// `cert`, in their direct conversation: how many envelopes it took.
    async fn lists_device(
        &self,
        cert: DeviceCertificate,
        node: &TestNode,
        victim: &Identity,
    ) -> u32 {
        let with_her = ConversationId::direct(&victim.user_id(), &self.me.user_id());
        let attack = self.sealed(with_her, victim, &Payload::Devices(vec![cert]));
        node.handle.deliver(vec![attack]).await.unwrap()
    }

    /// Whether any of `envelopes` opens with her device key to more than
    /// public keys for her: a handout key or one-time keys (what a contact
    /// hands to its contacts' devices when their conversation starts).
    fn opens_any(&self, envelopes: &[Vec<u8>]) -> bool {
        envelopes.iter().any(|bytes| {
            Envelope::decode(bytes)
                .unwrap()
                .open_sealed(&self.me.device_id(), self.me.device_dh_secret())
                .is_ok_and(|(_, plain)| {
                    !matches!(
                        Payload::decode(&plain),
                        Some(Payload::HandoutKey(_) | Payload::OneTimeKeys(_))
                    )
                })
        })
    }
}

/// A certificate, signed by `owner`'s user key, claiming `victim`'s
/// device (with `owner`'s own DH key), carrying the only consent the
/// victim's device ever gave: the one to its own account. What an
/// account can make without the device's key.
fn forged_certificate(
    owner: &Identity,
    victim: &DeviceCertificate,
    at_ms: i64,
) -> DeviceCertificate {
    use ed25519_dalek::Signer;
    let user_key = ed25519_dalek::SigningKey::from_bytes(&owner.secrets().user.unwrap());
    let dh = owner.certificate().dh;
    let account_dh = owner.certificate().account_dh;
    let mut signed = b"weft v2 device certificate".to_vec();
    signed.extend_from_slice(&owner.user_id().0);
    signed.extend_from_slice(&victim.device.0);
    signed.extend_from_slice(&dh);
    signed.extend_from_slice(&account_dh);
    signed.extend_from_slice(&at_ms.to_be_bytes());
    DeviceCertificate {
        user: owner.user_id(),
        device: victim.device,
        dh,
        account_dh,
        created_at_ms: at_ms,
        signature: user_key.sign(&signed).to_bytes(),
        consent: victim.consent,
    }
}

fn member(who: &Identity, name: &str, role: GroupRole) -> GroupMember {
    GroupMember {
        user: who.user_id(),
        name: name.into(),
        role,
        devices: vec![who.certificate().clone()],
    }
}

/// Adds the invite as a contact named `name`.
async fn add_invite(node: &TestNode, invite: String, name: &str) {
    node.call(Request::ContactAdd {
        invite,
        name: Some(name.into()),
    })
    .await;
}

/// Every key handout (pairwise-sealed envelope) a stopped node holds.
fn handouts(node: &TestNode) -> Vec<Vec<u8>> {
    node.sealed_envelopes(|_| true)
}

/// Every envelope a stopped node holds: key handouts, then chain-sealed.
fn everything_from(node: &TestNode) -> Vec<Vec<u8>> {
    handouts(node)
        .into_iter()
        .chain(node.chain_envelopes(|_| true))
        .collect()
}

/// `node`'s contact list entry for `alias`.
async fn contact(node: &TestNode, alias: &str) -> serde_json::Value {
    let list = node.call(Request::ContactList).await;
    list.as_array()
        .unwrap()
        .iter()
        .find(|c| c["alias"] == alias)
        .unwrap()
        .clone()
}

/// The conversation kind `node` shows for `id`, if it shows it.
async fn kind_of(node: &TestNode, id: &ConversationId) -> Option<String> {
    let list = node.call(Request::Conversations).await;
    list.as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id.to_string())
        .map(|c| c["kind"].as_str().unwrap().to_string())
}

/// Mallory's group state claiming the id of a direct conversation
/// alice already has with bob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strangers_group_state_cannot_take_over_a_direct_conversation() {
    const SEED: u64 = 40;
    let (alice_id, bob_id) = (identity("alice", SEED), identity("bob", SEED));
    let mut alice = offline("alice", SEED).await;
    let bob = offline("bob", SEED).await;
    alice.add_contact(&bob).await;
    let mallory = Mallory::new(SEED);
    let direct = ConversationId::direct(&alice_id.user_id(), &bob_id.user_id());
    let attack = mallory.group_state(
        direct,
        "bob",
        2,
        &[(&alice_id, "Alice"), (&bob_id, "Bob")],
        &alice_id,
    );
    assert_eq!(
        alice.handle.deliver(vec![attack]).await.unwrap(),
        0,
        "alice accepted mallory's group state for her conversation with bob"
    );
    assert_eq!(kind_of(&alice, &direct).await.as_deref(), Some("direct"));
    alice.send("bob", "for bob only").await;
    alice.stop().await;
    assert!(
        !mallory.opens_any(&handouts(&alice)),
        "alice's next message to bob was sealed to mallory"
    );
}

/// The same before alice has ever spoken to bob: the id must not be
/// taken for a group, or her first message to bob goes to mallory too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strangers_group_state_cannot_claim_a_direct_id_in_advance() {
    const SEED: u64 = 41;
    let (alice_id, bob_id) = (identity("alice", SEED), identity("bob", SEED));
    let mut alice = offline("alice", SEED).await;
    let bob = offline("bob", SEED).await;
    let mallory = Mallory::new(SEED);
    let direct = ConversationId::direct(&alice_id.user_id(), &bob_id.user_id());
    let attack = mallory.group_state(
        direct,
        "bob",
        1,
        &[(&alice_id, "Alice"), (&bob_id, "Bob")],
        &alice_id,
    );
    assert_eq!(
        alice.handle.deliver(vec![attack]).await.unwrap(),
        0,
        "alice accepted a group whose id is her direct conversation with bob"
    );
    alice.add_contact(&bob).await;
    assert_eq!(kind_of(&alice, &direct).await.as_deref(), Some("direct"));
    alice.send("bob", "first words").await;
    alice.stop().await;
    assert!(
        !mallory.opens_any(&handouts(&alice)),
        "alice's first message to bob was sealed to mallory"
    );
}

/// Mallory's group state claiming alice's own account conversation
/// (contacts, blocks, read positions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strangers_group_state_cannot_join_the_account_conversation() {
    const SEED: u64 = 42;
    let alice_id = identity("alice", SEED);
    let mut alice = offline("alice", SEED).await;
    let bob = offline("bob", SEED).await;
    let mallory = Mallory::new(SEED);
    let account = ConversationId::direct(&alice_id.user_id(), &alice_id.user_id());
    let attack = mallory.group_state(account, "alice", 2, &[(&alice_id, "Alice")], &alice_id);
    assert_eq!(
        alice.handle.deliver(vec![attack]).await.unwrap(),
        0,
        "alice accepted a group state for her account conversation"
    );
    // An account change: a new contact, shared with her devices only.
    alice.add_contact(&bob).await;
    alice.stop().await;
    assert!(
        !mallory.opens_any(&handouts(&alice)),
        "alice's account state was sealed to mallory"
    );
}

/// A contact's device list naming bob's device as the contact's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_list_cannot_rebind_another_accounts_device() {
    const SEED: u64 = 43;
    let (alice_id, bob_id) = (identity("alice", SEED), identity("bob", SEED));
    let mut alice = offline("alice", SEED).await;
    let mut bob = offline("bob", SEED).await;
    alice.add_contact(&bob).await;
    bob.add_contact(&alice).await;
    let mallory = Mallory::new(SEED);
    add_invite(&alice, mallory.invite(), "mallory").await;
    // Mallory's user key certifies bob's device (with her own DH key),
    // and she replays the consent bob's device gave his own account.
    let stolen = forged_certificate(&mallory.me, bob_id.certificate(), 5);
    assert_eq!(
        mallory.lists_device(stolen, &alice, &alice_id).await,
        0,
        "alice accepted mallory's certificate for bob's device"
    );
    // Bob still has his device at alice's, and she still reads him.
    let bob_seen = contact(&alice, "bob").await;
    assert_eq!(
        bob_seen["devices"], 1,
        "bob's device moved away: {bob_seen}"
    );
    bob.send("alice", "still me").await;
    bob.stop().await;
    alice.handle.deliver(everything_from(&bob)).await.unwrap();
    alice.expect_text("bob", "still me").await;
    // And what she sends him is sealed to his DH key, not mallory's.
    alice.send("bob", "to the real bob").await;
    alice.stop().await;
    assert!(!mallory.opens_any(&handouts(&alice)));
}

/// A revocation, signed by mallory's user key, of a device alice has
/// never seen: it must not lock bob's device out once alice meets him.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_of_an_unseen_device_does_not_lock_it_out() {
    const SEED: u64 = 44;
    let alice_id = identity("alice", SEED);
    let bob_id = identity("bob", SEED);
    let alice = offline("alice", SEED).await;
    let mut bob = offline("bob", SEED).await;
    let mallory = Mallory::new(SEED);
    add_invite(&alice, mallory.invite(), "mallory").await;
    let with_mallory = ConversationId::direct(&alice_id.user_id(), &mallory.me.user_id());
    let revocation = mallory.me.revoke(&bob_id.device_id(), 5).unwrap();
    let attack = mallory.sealed(with_mallory, &alice_id, &Payload::Revoked(revocation));
    alice.handle.deliver(vec![attack]).await.unwrap();
    // Alice meets bob afterwards, and bob writes to her.
    alice.add_contact(&bob).await;
    bob.add_contact(&alice).await;
    let bob_seen = contact(&alice, "bob").await;
    assert_eq!(
        bob_seen["devices"], 1,
        "bob's device is locked out: {bob_seen}"
    );
    bob.send("alice", "hello alice").await;
    bob.stop().await;
    alice.handle.deliver(everything_from(&bob)).await.unwrap();
    alice.expect_text("bob", "hello alice").await;
}

/// A revocation keeps waiting for the device it names and takes effect
/// when that device is certified by the account that signed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_seen_before_the_device_applies_once_it_is_certified() {
    const SEED: u64 = 45;
    let alice_id = identity("alice", SEED);
    let alice = offline("alice", SEED).await;
    let bob = offline("bob", SEED).await;
    alice.add_contact(&bob).await;
    let bob_id = identity("bob", SEED);
    // Bob's account certifies a phone, then revokes it; alice hears of
    // the revocation before the phone's certificate.
    let phone = Identity::from_seed(b"bob's phone", 0).unwrap();
    let phone_cert: DeviceCertificate = common::certify(&bob_id, &phone, 3);
    let revocation: Revocation = bob_id.revoke(&phone.device_id(), 4).unwrap();
    let direct = ConversationId::direct(&alice_id.user_id(), &bob_id.user_id());
    let tag = common::direct_routing(&bob_id, &alice_id).tag();
    let bob_says =
        |payload: Payload| common::seal_by_hand(&bob_id, tag, direct, &alice_id, &payload);
    alice
        .handle
        .deliver(vec![bob_says(Payload::Revoked(revocation))])
        .await
        .unwrap();
    alice
        .handle
        .deliver(vec![bob_says(Payload::Devices(vec![
            bob_id.certificate().clone(),
            phone_cert,
        ]))])
        .await
        .unwrap();
    let devices = contact(&alice, "bob").await["devices"].clone();
    assert_eq!(devices, 1, "the revoked phone counts as bob's device");
    let _: DeviceId = phone.device_id();
}

/// An account certifying a device it does not hold, sent to a node that
/// has never seen that device: without the device's consent in the
/// certificate, the first account to name a device would keep it, and
/// its real owner could never be heard by that node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_cannot_claim_a_device_it_does_not_hold() {
    const SEED: u64 = 46;
    let (alice_id, carol_id) = (identity("alice", SEED), identity("carol", SEED));
    let mut alice = offline("alice", SEED).await;
    let mut carol = offline("carol", SEED).await;
    let mallory = Mallory::new(SEED);
    add_invite(&alice, mallory.invite(), "mallory").await;
    // Mallory names carol's device as hers before alice ever meets carol.
    let claim = forged_certificate(&mallory.me, carol_id.certificate(), 5);
    assert_eq!(
        mallory.lists_device(claim, &alice, &alice_id).await,
        0,
        "alice took mallory's certificate for a device mallory does not hold"
    );
    // Alice meets carol: her invite is taken, and they talk.
    alice.add_contact(&carol).await;
    carol.add_contact(&alice).await;
    assert_eq!(contact(&alice, "carol").await["devices"], 1);
    carol.send("alice", "it is me").await;
    carol.stop().await;
    alice.handle.deliver(everything_from(&carol)).await.unwrap();
    alice.expect_text("carol", "it is me").await;
    alice.send("carol", "hello carol").await;
    alice.stop().await;
    assert!(!mallory.opens_any(&handouts(&alice)));
}
