//! Several devices per account with real processes: alice links a second
//! device with `weft devices link` / `weft init --link`; it receives her
//! history and new messages; what it sends reaches bob and shows on her
//! first device as hers; revoked with `weft devices revoke`, it stops.

use serde_json::Value;
use weft_e2e::{DEADLINE, Weft, wait_until};

fn has_text(ms: &[Value], text: &str) -> bool {
    ms.iter().any(|m| m["text"] == text)
}

#[test]
fn link_a_second_device_receive_on_both_and_send_from_it() -> anyhow::Result<()> {
    let mut alice = Weft::new("alice")?;
    let mut bob = Weft::new("bob")?;
    let mut phone = Weft::new("alice-phone")?;
    alice.init()?;
    bob.init()?;
    alice.start_daemon(&[])?;
    let alice_addr = alice.daemon()?.dial_addr()?;
    bob.start_daemon(&["--bootstrap", &alice_addr])?;
    alice.add_contact(&bob)?;
    bob.add_contact(&alice)?;
    alice.ok(&["send", "bob", "sent before the phone"])?;
    bob.wait_for_message("alice", "sent before the phone")?;

    // `devices link` prints the code first, and waits for the join.
    let link = alice.spawn(&["--json", "devices", "link"])?;
    let first = link.wait_for_line("the link code", |l| l.contains("\"code\""))?;
    let code: Value = serde_json::from_str(&first)?;
    let code = code["code"].as_str().unwrap_or_default().to_string();
    let joined = phone.json(&["init", "--link", &code])?;
    assert_eq!(joined["user_id"], alice.json(&["id"])?["user_id"]);
    let last = link.wait_for_line("the join", |l| l.contains("\"linked\""))?;
    let last: Value = serde_json::from_str(&last)?;
    assert_eq!(last["device_id"], joined["device_id"]);
    // The code works once.
    let mut again = Weft::new("again")?;
    again
        .run(&["init", "--link", &code])?
        .expect_code(1, "a used code")?;
    let _ = &mut again;
    // A typo is bad input.
    let mut typo = code.clone();
    typo.replace_range(12..13, if &code[12..13] == "a" { "b" } else { "a" });
    Weft::new("typo")?
        .run(&["init", "--link", &typo])?
        .expect_code(2, "a mistyped code")?;

    phone.start_daemon(&["--bootstrap", &alice_addr])?;
    // History from the first device.
    wait_until("the phone to get the history", DEADLINE, || {
        Ok(has_text(&phone.messages("bob")?, "sent before the phone").then_some(()))
    })?;
    let devices = alice.json(&["devices", "list"])?;
    assert_eq!(devices.as_array().map(Vec::len), Some(2), "{devices}");

    // To alice: both devices.
    bob.ok(&["send", "alice", "to both of you"])?;
    alice.wait_for_message("bob", "to both of you")?;
    phone.wait_for_message("bob", "to both of you")?;

    // From the phone: bob gets it; the first device shows it as alice's.
    phone.ok(&["send", "bob", "from the phone"])?;
    bob.wait_for_message("alice", "from the phone")?;
    let m = alice.wait_for_message("bob", "from the phone")?;
    assert_eq!(m["outgoing"], true);
    assert_eq!(m["sender"], joined["user_id"]);

    // Revocation: only the first device (it holds the user key) can.
    let phone_id = joined["device_id"].as_str().unwrap_or_default().to_string();
    phone
        .run(&["devices", "revoke", &phone_id])?
        .expect_code(2, "revoking from a linked device")?;
    let revoked = alice.json(&["devices", "revoke", &phone_id])?;
    assert_eq!(revoked["revoked"], true, "{revoked}");
    let devices = alice.json(&["devices", "list"])?;
    assert_eq!(devices.as_array().map(Vec::len), Some(1), "{devices}");
    // Bob hears of it; the phone learns it was revoked and stops sending.
    wait_until("bob to hear of the revocation", DEADLINE, || {
        let contacts = bob.json(&["contact", "list"])?;
        let devices = contacts
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["alias"] == "alice"))
            .and_then(|c| c["devices"].as_u64());
        Ok((devices == Some(1)).then_some(()))
    })?;
    wait_until("the phone to know it was revoked", DEADLINE, || {
        let out = phone.run(&["send", "bob", "from a revoked phone"])?;
        Ok(out.stderr.contains("revoked").then_some(()))
    })?;
    bob.ok(&["send", "alice", "after the revocation"])?;
    alice.wait_for_message("bob", "after the revocation")?;
    let got = phone.messages("bob")?;
    assert!(!has_text(&got, "after the revocation"), "{got:?}");
    assert!(!has_text(&bob.messages("alice")?, "from a revoked phone"));
    Ok(())
}
