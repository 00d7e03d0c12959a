//! A mailbox client over libp2p TCP (noise, yamux, `/weft/mailbox/1`
//! with the direct protocol's framing), as a device or a depositor speaks
//! to a relay: one connection, requests pipelined, answers matched by id,
//! the relay's wakeups answered. It may dial from a chosen loopback
//! address (127.0.0.2, …), so that tests can play peers on different IP
//! addresses on one machine.

// Shared by several test and bench targets, each using part of it.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{DialOpts, ListenerId, Transport, TransportError, TransportEvent};
use libp2p::core::upgrade::Version;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, noise, tcp, yamux};
use weft_node::identity::Identity;
use weft_node::mailbox::{
    MAILBOX_PROTOCOL, MailboxId, MailboxRequest, MailboxResponse, Registration,
};
use weft_node::net::DirectCodec;

/// The longest one request or dial may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// TCP dialing from a chosen source address (libp2p's TCP transport
/// binds dials to its listen port, never to a chosen address).
struct BoundTcp {
    source: IpAddr,
}

fn socket_addr(addr: &Multiaddr) -> Option<SocketAddr> {
    let mut ip = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(IpAddr::V4(a)),
            Protocol::Ip6(a) => ip = Some(IpAddr::V6(a)),
            Protocol::Tcp(port) => return ip.map(|ip| SocketAddr::new(ip, port)),
            _ => {}
        }
    }
    None
}

impl Transport for BoundTcp {
    type Output = tcp::tokio::TcpStream;
    type Error = std::io::Error;
    type ListenerUpgrade = futures::future::Pending<Result<Self::Output, Self::Error>>;
    type Dial = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn listen_on(
        &mut self,
        _id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        Err(TransportError::MultiaddrNotSupported(addr))
    }

    fn remove_listener(&mut self, _id: ListenerId) -> bool {
        false
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        _opts: DialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        let Some(target) = socket_addr(&addr) else {
            return Err(TransportError::MultiaddrNotSupported(addr));
        };
        let source = self.source;
        Ok(async move {
            let socket = match source {
                IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            socket.bind(SocketAddr::new(source, 0))?;
            let stream = socket.connect(target).await?;
            stream.set_nodelay(true)?;
            Ok(tcp::tokio::TcpStream(stream))
        }
        .boxed())
    }

    fn poll(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        Poll::Pending
    }
}

/// One connection to a relay, speaking the mailbox protocol.
pub struct MailboxClient {
    swarm: Swarm<request_response::Behaviour<DirectCodec>>,
    pub relay: PeerId,
    /// Wakeups the relay sent over this connection.
    pub wakeups: u64,
}

impl MailboxClient {
    /// Dials `relay` (an address ending with `/p2p/<relay>`) as `key`,
    /// from `source` if given; returns once connected.
    pub async fn connect(
        key: libp2p::identity::Keypair,
        relay: &Multiaddr,
        source: Option<IpAddr>,
    ) -> Result<MailboxClient> {
        let Some(Protocol::P2p(relay_id)) = relay.iter().last() else {
            bail!("{relay} does not end with /p2p/<peer id>");
        };
        let noise = noise::Config::new(&key)?;
        let transport = match source {
            Some(source) => BoundTcp { source }
                .upgrade(Version::V1Lazy)
                .authenticate(noise)
                .multiplex(yamux::Config::default())
                .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
                .boxed(),
            None => tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                .upgrade(Version::V1Lazy)
                .authenticate(noise)
                .multiplex(yamux::Config::default())
                .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
                .boxed(),
        };
        let behaviour = request_response::Behaviour::with_codec(
            DirectCodec,
            [(StreamProtocol::new(MAILBOX_PROTOCOL), ProtocolSupport::Full)],
            request_response::Config::default()
                .with_request_timeout(REQUEST_TIMEOUT)
                .with_max_concurrent_streams(256),
        );
        let swarm = Swarm::new(
            transport,
            behaviour,
            key.public().to_peer_id(),
            libp2p::swarm::Config::with_tokio_executor()
                .with_idle_connection_timeout(REQUEST_TIMEOUT),
        );
        let mut client = MailboxClient {
            swarm,
            relay: relay_id,
            wakeups: 0,
        };
        client.swarm.dial(relay.clone())?;
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        while !client.swarm.is_connected(&relay_id) {
            client.next(deadline).await?;
        }
        Ok(client)
    }

    /// Handles one swarm event before `deadline`: answers wakeups, fails
    /// on a failed request or a lost connection, returns an answer.
    pub async fn next(
        &mut self,
        deadline: tokio::time::Instant,
    ) -> Result<Option<(OutboundRequestId, MailboxResponse)>> {
        let event = tokio::time::timeout_at(deadline, self.swarm.select_next_some())
            .await
            .map_err(|_| anyhow!("no answer before the deadline"))?;
        match event {
            SwarmEvent::Behaviour(request_response::Event::Message { message, .. }) => {
                match message {
                    request_response::Message::Request {
                        request, channel, ..
                    } => {
                        ensure!(
                            MailboxRequest::decode(&request) == Some(MailboxRequest::Wakeup),
                            "the relay sent something other than a wakeup"
                        );
                        self.wakeups += 1;
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .send_response(channel, MailboxResponse::Ok.encode());
                    }
                    request_response::Message::Response {
                        request_id,
                        response,
                    } => {
                        let response =
                            MailboxResponse::decode(&response).context("malformed response")?;
                        return Ok(Some((request_id, response)));
                    }
                }
            }
            SwarmEvent::Behaviour(request_response::Event::OutboundFailure { error, .. }) => {
                bail!("request failed: {error}")
            }
            SwarmEvent::OutgoingConnectionError { error, .. } => bail!("dial failed: {error}"),
            SwarmEvent::ConnectionClosed { peer_id, cause, .. } if peer_id == self.relay => {
                bail!("the relay closed the connection: {cause:?}")
            }
            _ => {}
        }
        Ok(None)
    }

    pub fn send(&mut self, request: &MailboxRequest) -> OutboundRequestId {
        self.send_encoded(request.encode())
    }

    pub fn send_encoded(&mut self, request: Vec<u8>) -> OutboundRequestId {
        let relay = self.relay;
        self.swarm.behaviour_mut().send_request(&relay, request)
    }

    /// Sends `request` and waits for its answer.
    pub async fn call(&mut self, request: &MailboxRequest) -> Result<MailboxResponse> {
        let id = self.send(request);
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        loop {
            match self.next(deadline).await? {
                Some((r, response)) if r == id => return Ok(response),
                Some((_, response)) => bail!("an answer to nothing asked: {response:?}"),
                None => {}
            }
        }
    }

    /// Sends all `requests` at once; returns their answers in order.
    pub async fn call_all(&mut self, requests: &[MailboxRequest]) -> Result<Vec<MailboxResponse>> {
        let ids: Vec<OutboundRequestId> = requests.iter().map(|r| self.send(r)).collect();
        let mut answers: Vec<Option<MailboxResponse>> = vec![None; ids.len()];
        let mut left = ids.len();
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        while left > 0 {
            if let Some((id, response)) = self.next(deadline).await? {
                let i = ids
                    .iter()
                    .position(|r| *r == id)
                    .ok_or_else(|| anyhow!("an answer to nothing asked: {response:?}"))?;
                ensure!(answers[i].is_none(), "two answers to one request");
                answers[i] = Some(response);
                left -= 1;
            }
        }
        Ok(answers.into_iter().flatten().collect())
    }

    /// Registers `device` (whose key this connection must be) for a
    /// mailbox.
    pub async fn register(&mut self, device: &Identity) -> Result<MailboxId> {
        let registration = Registration::new(device, &self.relay, weft_node::now_ms(), None, None);
        match self
            .call(&MailboxRequest::Register(Box::new(registration)))
            .await?
        {
            MailboxResponse::Registered { mailbox, .. } => Ok(mailbox),
            other => bail!("registration refused: {other:?}"),
        }
    }

    /// Waits until the relay has sent at least `n` wakeups in all, or
    /// `deadline`.
    pub async fn wait_for_wakeups(&mut self, n: u64, deadline: tokio::time::Instant) -> Result<()> {
        while self.wakeups < n {
            if let Some((_, response)) = self.next(deadline).await? {
                bail!("an answer to nothing asked: {response:?}");
            }
        }
        Ok(())
    }
}
