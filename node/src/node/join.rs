//! The new device's side of linking (`weft init --link CODE`): make device
//! keys, reach the linking device, prove the code, and write the home with
//! the certificate it grants. See `crate::link` for the exchange.

use std::time::Duration;

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;

use super::engine::{DirectRequest, DirectResponse};
use super::{NodeError, now_ms};
use crate::api::IdView;
use crate::home::Home;
use crate::identity::{Identity, IdentityError, SecretKeys, peer_id_of, random_bytes};
use crate::link::{LinkCode, LinkRequest, proof};
use crate::net::{NetCommand, NetConfig, NetEvent, PeerSource};
use crate::store::meta;

/// How long the linking device has to answer.
const LINK_TIMEOUT: Duration = Duration::from_secs(30);

/// Links a new device into `home` with `code`, over a network configured
/// by `net` (its listeners are only for the exchange). `name` is this
/// device's copy of the account's display name, if given; else the
/// account's. History sent at or after `history_since_ms` comes from the
/// account's other devices (0: all of it).
pub async fn link_device(
    home: &Home,
    code: &str,
    name: Option<&str>,
    history_since_ms: i64,
    net: NetConfig,
) -> Result<IdView, NodeError> {
    if home.is_initialized() {
        return Err(NodeError::AlreadyInitialized(home.dir().to_path_buf()));
    }
    let code = LinkCode::decode(code)?;
    // Before the code is spent: an open home would get no keys anyway.
    home.create_dir()?;
    let secrets = SecretKeys {
        user: None,
        device: random_bytes()?,
        device_dh: random_bytes()?,
        // Replaced by the account's key from the grant.
        account_dh: [0; 32],
    };
    let device_key = ed25519_dalek::SigningKey::from_bytes(&secrets.device);
    let device = crate::ids::DeviceId(device_key.verifying_key().to_bytes());
    let dh = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(secrets.device_dh))
        .to_bytes();
    let keypair = libp2p::identity::Keypair::ed25519_from_bytes(secrets.device)
        .map_err(|_| IdentityError::Malformed("device key rejected by libp2p"))?;
    let linker = peer_id_of(&code.device);
    let addrs: Vec<Multiaddr> = code
        .addrs
        .iter()
        .filter_map(|a| a.parse::<Multiaddr>().ok())
        .filter(|a| matches!(a.iter().last(), Some(Protocol::P2p(p)) if p == linker))
        .collect();
    if addrs.is_empty() {
        return Err(IdentityError::LinkCode("it names no address of the linking device").into());
    }
    let (handle, mut events, _task) = crate::net::spawn(keypair, net)?;
    let outcome = tokio::time::timeout(LINK_TIMEOUT, async {
        handle
            .send(NetCommand::Dial {
                peer: linker,
                addrs: addrs.clone(),
                source: PeerSource::Manual,
            })
            .await?;
        while let Some(event) = events.recv().await {
            if matches!(event, NetEvent::Connected { peer, .. } if peer == linker) {
                break;
            }
        }
        let request = DirectRequest::Link(LinkRequest {
            device,
            dh,
            proof: proof(&code.secret, &device, &dh),
            consent: crate::identity::DeviceCertificate::consent(&device_key, &code.user, &dh),
        });
        let (reply, mut rx) = tokio::sync::oneshot::channel();
        handle
            .send(NetCommand::Direct {
                peer: linker,
                data: postcard::to_stdvec(&request).unwrap_or_default(),
                reply,
            })
            .await?;
        // Keep draining events so the network task never blocks on them.
        let answer = loop {
            tokio::select! {
                answer = &mut rx => break answer,
                _ = events.recv() => {}
            }
        };
        Ok::<_, NodeError>(answer)
    })
    .await;
    handle.shutdown().await;
    let bytes = match outcome {
        Err(_) => {
            return Err(NodeError::Protocol(
                "the linking device did not answer within 30 s: is its daemon running, and the code fresh?"
                    .into(),
            ));
        }
        Ok(Err(e)) => return Err(e),
        Ok(Ok(Err(_))) => return Err(NodeError::Stopped),
        Ok(Ok(Ok(Err(e)))) => {
            return Err(NodeError::Protocol(format!(
                "could not reach the linking device: {e}"
            )));
        }
        Ok(Ok(Ok(Ok(bytes)))) => bytes,
    };
    let grant = match postcard::from_bytes::<DirectResponse>(&bytes) {
        Ok(DirectResponse::Linked(grant)) => grant,
        Ok(DirectResponse::Refused(why)) => {
            return Err(NodeError::Protocol(format!(
                "the linking device refused: {why}"
            )));
        }
        _ => {
            return Err(NodeError::Protocol(
                "an unexpected answer to the link request".into(),
            ));
        }
    };
    if grant.certificate.user != code.user {
        return Err(NodeError::Protocol(
            "the linking device certified us for another account".into(),
        ));
    }
    let mut secrets = secrets;
    secrets.account_dh = grant.account_dh;
    // Checks the certificate (both signatures) and that the account key
    // is the one it names.
    let identity = Identity::from_secrets(&secrets, Some(grant.certificate.clone()), now_ms())?;
    let name = name.unwrap_or(&grant.name);
    let view = home.init_linked(&identity, name, &grant.invite)?;
    // Remember where the linking device is, and that history is to come.
    let store = crate::store::Store::open(&home.db_path())?;
    let db = store.db();
    for addr in &addrs {
        db.upsert_peer_addr(&linker.to_string(), &addr.to_string(), now_ms())?;
    }
    // The account's other devices, from the invite the user key signed.
    let invite = crate::identity::Invite::decode(&grant.invite)?;
    for cert in invite
        .devices
        .iter()
        .filter(|c| c.device != identity.device_id())
    {
        db.bind_device(&cert.device, &cert.user, &cert.to_bytes())?;
    }
    db.set_meta(
        meta::HISTORY_NEEDED,
        history_since_ms.max(0).to_string().as_bytes(),
    )?;
    Ok(view)
}
