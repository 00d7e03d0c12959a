//! The simulator's network: a libp2p transport ([`SimTransport`]) that
//! carries connections between the nodes of one process, like libp2p's
//! memory transport (listen on and dial `/memory/N`), but through a link
//! model ([`Links`]) the simulator supplies: every byte written reaches
//! the other end only after the link's latency plus a seeded jitter, no
//! faster than the link's bandwidth (a serialisation delay per write,
//! FIFO per direction), and a link that is down refuses dials and resets
//! the connections over it.
//!
//! [`SimNetwork`] is the handle all nodes of one simulation share (the
//! listeners, the link model, the seed); each swarm builds its own
//! [`SimTransport`] from it. Delays are kept with tokio's clock, so the
//! runtime that polls a connection drives its timers (real time unless
//! that runtime's clock is paused).
//!
//! What is modelled and what is not:
//! - Loss is not modelled: the connections are TCP-like streams that lose
//!   no bytes; a lossy link is a link with more latency or jitter.
//! - A link going down *resets* the connections over it (both ends see
//!   `ConnectionReset`), at the next write or read over it or when the
//!   simulator calls [`SimNetwork::apply_links`]; bytes in flight are
//!   lost with the connection. Stalling instead would only delay the same
//!   outcome by libp2p's ping timeout, and make partitions slower to
//!   show.
//! - Link parameters are read at each write, so a change applies to the
//!   bytes written after it.
//! - A node's identity in the link model is its first listen port; a
//!   transport that dials before listening gets an ephemeral id
//!   (≥ [`EPHEMERAL_BASE`]).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures::channel::mpsc;
use futures::future::{Ready, ready};
use futures::{AsyncRead, AsyncWrite, Stream};
use libp2p::core::transport::{DialOpts, ListenerId, Transport, TransportError, TransportEvent};
use libp2p::multiaddr::{Multiaddr, Protocol};
use tokio::time::{Instant, Sleep};

/// Ids from here on are given to transports that dial before they listen
/// and to `/memory/0` listeners.
pub const EPHEMERAL_BASE: u64 = 1 << 48;

/// How many bytes a bandwidth-limited direction queues before its writer
/// waits (a socket's send buffer).
const SEND_BUFFER: u64 = 256 * 1024;

/// One direction of a link, as the simulator models it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkParams {
    /// One-way delay of every byte.
    pub latency: Duration,
    /// An extra delay uniform in `[0, jitter]`, drawn per write from the
    /// simulation's seed (bytes stay in order).
    pub jitter: Duration,
    /// Bytes per second; 0 is unlimited.
    pub bandwidth_bytes_per_sec: u64,
    /// A link that is down refuses dials and resets connections.
    pub up: bool,
}

impl LinkParams {
    /// An up link with `latency`, no jitter, unlimited bandwidth.
    pub fn latency(latency: Duration) -> Self {
        Self {
            latency,
            jitter: Duration::ZERO,
            bandwidth_bytes_per_sec: 0,
            up: true,
        }
    }
}

impl Default for LinkParams {
    fn default() -> Self {
        Self::latency(Duration::ZERO)
    }
}

/// The simulator's link model: the link from the node with id `from` to
/// the one with id `to` (their listen ports). Called at each dial and
/// each write, from the nodes' threads.
pub trait Links: Send + Sync + 'static {
    fn link(&self, from: u64, to: u64) -> LinkParams;
}

/// A simple [`Links`]: one default and per-pair overrides, changeable
/// while the simulation runs (tests, small scenarios).
#[derive(Debug, Default)]
pub struct LinkTable {
    inner: Mutex<TableInner>,
}

/// The default and the overrides by (from, to).
type TableInner = (LinkParams, HashMap<(u64, u64), LinkParams>);

impl LinkTable {
    pub fn new(default: LinkParams) -> Self {
        Self {
            inner: Mutex::new((default, HashMap::new())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, TableInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_default(&self, params: LinkParams) {
        self.lock().0 = params;
    }

    /// Sets both directions between `a` and `b`.
    pub fn set_link(&self, a: u64, b: u64, params: LinkParams) {
        let mut inner = self.lock();
        inner.1.insert((a, b), params);
        inner.1.insert((b, a), params);
    }

    /// Takes the link between `a` and `b` up or down (both directions),
    /// keeping its other parameters.
    pub fn set_up(&self, a: u64, b: u64, up: bool) {
        let mut inner = self.lock();
        let default = inner.0;
        for key in [(a, b), (b, a)] {
            inner.1.entry(key).or_insert(default).up = up;
        }
    }
}

impl Links for LinkTable {
    fn link(&self, from: u64, to: u64) -> LinkParams {
        let inner = self.lock();
        inner.1.get(&(from, to)).copied().unwrap_or(inner.0)
    }
}

/// Why a simulated dial or listen failed.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("nothing listens on /memory/{0}")]
    Unreachable(u64),
    #[error("link {from} -> {to} is down")]
    LinkDown { from: u64, to: u64 },
    #[error("/memory/{0} is already listened on")]
    AddrInUse(u64),
}

/// The network all nodes of one simulation share: cheap to clone.
#[derive(Clone)]
pub struct SimNetwork {
    shared: Arc<NetShared>,
}

struct NetShared {
    seed: u64,
    links: Arc<dyn Links>,
    state: Mutex<NetState>,
}

#[derive(Default)]
struct NetState {
    listeners: HashMap<u64, mpsc::UnboundedSender<Incoming>>,
    next_ephemeral: u64,
    /// Connections opened so far per (dialer, listener): seeds their
    /// jitter.
    dials: HashMap<(u64, u64), u64>,
    live: Vec<Weak<ConnShared>>,
}

impl fmt::Debug for SimNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimNetwork")
            .field("seed", &self.shared.seed)
            .finish_non_exhaustive()
    }
}

impl PartialEq for SimNetwork {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

impl Eq for SimNetwork {}

impl SimNetwork {
    /// A network whose links `links` models, with jitter drawn from
    /// `seed`.
    pub fn new(seed: u64, links: Arc<dyn Links>) -> Self {
        Self {
            shared: Arc::new(NetShared {
                seed,
                links,
                state: Mutex::new(NetState {
                    next_ephemeral: EPHEMERAL_BASE,
                    ..NetState::default()
                }),
            }),
        }
    }

    pub fn seed(&self) -> u64 {
        self.shared.seed
    }

    pub fn links(&self) -> &Arc<dyn Links> {
        &self.shared.links
    }

    fn state(&self) -> MutexGuard<'_, NetState> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A transport for one swarm on this network.
    pub fn transport(&self) -> SimTransport {
        SimTransport {
            net: self.clone(),
            local: None,
            listeners: Vec::new(),
            events: VecDeque::new(),
            waker: None,
        }
    }

    /// Resets every open connection whose link the model now says is
    /// down; the number reset. Call after taking links down, so idle
    /// connections notice too.
    pub fn apply_links(&self) -> usize {
        let live: Vec<Arc<ConnShared>> = {
            let mut state = self.state();
            state.live.retain(|w| w.strong_count() > 0);
            state.live.iter().filter_map(Weak::upgrade).collect()
        };
        let mut reset = 0;
        for conn in live {
            let down = !self.shared.links.link(conn.dialer, conn.listener).up
                || !self.shared.links.link(conn.listener, conn.dialer).up;
            if down && !conn.reset.load(Ordering::Acquire) {
                conn.reset();
                reset += 1;
            }
        }
        reset
    }

    /// How many connections are open.
    pub fn open_connections(&self) -> usize {
        let mut state = self.state();
        state.live.retain(|w| w.strong_count() > 0);
        state.live.len()
    }

    fn ephemeral(state: &mut NetState) -> u64 {
        loop {
            let id = state.next_ephemeral;
            state.next_ephemeral += 1;
            if !state.listeners.contains_key(&id) {
                return id;
            }
        }
    }
}

/// A dialer's connection on its way to a listener.
struct Incoming {
    from: u64,
    conn: SimConnection,
}

/// `/memory/N`, optionally followed by `/p2p/...`.
fn memory_port(addr: &Multiaddr) -> Option<u64> {
    let mut protocols = addr.iter();
    match protocols.next() {
        Some(Protocol::Memory(port)) => match protocols.next() {
            None | Some(Protocol::P2p(_)) => Some(port),
            _ => None,
        },
        _ => None,
    }
}

fn memory_addr(port: u64) -> Multiaddr {
    Multiaddr::empty().with(Protocol::Memory(port))
}

struct Listener {
    id: ListenerId,
    port: u64,
    incoming: mpsc::UnboundedReceiver<Incoming>,
}

/// One swarm's transport on a [`SimNetwork`].
pub struct SimTransport {
    net: SimNetwork,
    /// This node's id in the link model.
    local: Option<u64>,
    listeners: Vec<Listener>,
    events: VecDeque<TransportEvent<Ready<Result<SimConnection, SimError>>, SimError>>,
    waker: Option<Waker>,
}

impl fmt::Debug for SimTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimTransport")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl SimTransport {
    fn local_id(&mut self) -> u64 {
        if let Some(id) = self.local {
            return id;
        }
        let id = SimNetwork::ephemeral(&mut self.net.state());
        self.local = Some(id);
        id
    }

    fn push(&mut self, event: TransportEvent<Ready<Result<SimConnection, SimError>>, SimError>) {
        self.events.push_back(event);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

impl Drop for SimTransport {
    fn drop(&mut self) {
        let mut state = self.net.state();
        for l in &self.listeners {
            state.listeners.remove(&l.port);
        }
    }
}

impl Transport for SimTransport {
    type Output = SimConnection;
    type Error = SimError;
    type ListenerUpgrade = Ready<Result<SimConnection, SimError>>;
    type Dial = Ready<Result<SimConnection, SimError>>;

    fn listen_on(
        &mut self,
        id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<SimError>> {
        let Some(port) = memory_port(&addr) else {
            return Err(TransportError::MultiaddrNotSupported(addr));
        };
        let (tx, rx) = mpsc::unbounded();
        let port = {
            let mut state = self.net.state();
            let port = if port == 0 {
                SimNetwork::ephemeral(&mut state)
            } else {
                port
            };
            if state.listeners.contains_key(&port) {
                return Err(TransportError::Other(SimError::AddrInUse(port)));
            }
            state.listeners.insert(port, tx);
            port
        };
        if self.local.is_none() {
            self.local = Some(port);
        }
        self.listeners.push(Listener {
            id,
            port,
            incoming: rx,
        });
        self.push(TransportEvent::NewAddress {
            listener_id: id,
            listen_addr: memory_addr(port),
        });
        Ok(())
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        let Some(i) = self.listeners.iter().position(|l| l.id == id) else {
            return false;
        };
        let l = self.listeners.remove(i);
        self.net.state().listeners.remove(&l.port);
        self.push(TransportEvent::ListenerClosed {
            listener_id: id,
            reason: Ok(()),
        });
        true
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        _opts: DialOpts,
    ) -> Result<Self::Dial, TransportError<SimError>> {
        let Some(to) = memory_port(&addr) else {
            return Err(TransportError::MultiaddrNotSupported(addr));
        };
        let from = self.local_id();
        let links = &self.net.shared.links;
        if !links.link(from, to).up || !links.link(to, from).up {
            return Ok(ready(Err(SimError::LinkDown { from, to })));
        }
        let mut state = self.net.state();
        let Some(listener) = state.listeners.get(&to).cloned() else {
            return Ok(ready(Err(SimError::Unreachable(to))));
        };
        let n = state.dials.entry((from, to)).or_insert(0);
        *n += 1;
        let seed = mix(self.net.shared.seed ^ mix(from) ^ mix(to.rotate_left(32)) ^ mix(*n));
        let shared = Arc::new(ConnShared {
            dialer: from,
            listener: to,
            reset: AtomicBool::new(false),
            pipes: [Mutex::new(Pipe::default()), Mutex::new(Pipe::default())],
        });
        if state.live.len() >= 64 && state.live.len().is_power_of_two() {
            state.live.retain(|w| w.strong_count() > 0);
        }
        state.live.push(Arc::downgrade(&shared));
        drop(state);
        let ours = SimConnection::new(self.net.clone(), shared.clone(), true, seed);
        let theirs = SimConnection::new(self.net.clone(), shared, false, mix(seed));
        if listener
            .unbounded_send(Incoming { from, conn: theirs })
            .is_err()
        {
            return Ok(ready(Err(SimError::Unreachable(to))));
        }
        Ok(ready(Ok(ours)))
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, SimError>> {
        if let Some(event) = self.events.pop_front() {
            return Poll::Ready(event);
        }
        for l in &mut self.listeners {
            if let Poll::Ready(Some(Incoming { from, conn })) =
                Pin::new(&mut l.incoming).poll_next(cx)
            {
                return Poll::Ready(TransportEvent::Incoming {
                    listener_id: l.id,
                    upgrade: ready(Ok(conn)),
                    local_addr: memory_addr(l.port),
                    send_back_addr: memory_addr(from),
                });
            }
        }
        self.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// splitmix64's finaliser: seeds and jitter.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What both ends of a connection share: one pipe per direction
/// (`pipes[0]` dialer → listener).
struct ConnShared {
    dialer: u64,
    listener: u64,
    reset: AtomicBool,
    pipes: [Mutex<Pipe>; 2],
}

impl ConnShared {
    fn pipe(&self, i: usize) -> MutexGuard<'_, Pipe> {
        self.pipes[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Breaks the connection: both ends' next read and write fail.
    fn reset(&self) {
        self.reset.store(true, Ordering::Release);
        for i in 0..2 {
            let mut p = self.pipe(i);
            for w in [p.reader.take(), p.writer.take()].into_iter().flatten() {
                w.wake();
            }
        }
    }
}

struct Chunk {
    at: Instant,
    data: Vec<u8>,
    read: usize,
}

/// One direction of a connection: the bytes in flight and when each
/// write arrives.
#[derive(Default)]
struct Pipe {
    queue: VecDeque<Chunk>,
    /// When the link has serialised everything written so far.
    free_at: Option<Instant>,
    /// When the last write arrives (arrivals stay in order).
    last_arrival: Option<Instant>,
    /// The writer closed: the reader sees the end at this time.
    eof_at: Option<Instant>,
    reader_gone: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

/// One end of a simulated connection: reads what the other end wrote
/// once the link delivered it.
pub struct SimConnection {
    net: SimNetwork,
    shared: Arc<ConnShared>,
    /// Ids of this end and the other, in the link model.
    local: u64,
    remote: u64,
    /// The pipe this end writes to (the other reads from `1 - out`).
    out: usize,
    rng: u64,
    read_sleep: Option<Pin<Box<Sleep>>>,
    write_sleep: Option<Pin<Box<Sleep>>>,
}

impl fmt::Debug for SimConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimConnection")
            .field("local", &self.local)
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

fn reset_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "simulated link down")
}

impl SimConnection {
    fn new(net: SimNetwork, shared: Arc<ConnShared>, dialer: bool, seed: u64) -> Self {
        let (local, remote, out) = if dialer {
            (shared.dialer, shared.listener, 0)
        } else {
            (shared.listener, shared.dialer, 1)
        };
        Self {
            net,
            shared,
            local,
            remote,
            out,
            rng: seed,
            read_sleep: None,
            write_sleep: None,
        }
    }

    fn jitter(&mut self, max: Duration) -> Duration {
        if max.is_zero() {
            return Duration::ZERO;
        }
        self.rng = mix(self.rng);
        let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.rng % nanos.saturating_add(1))
    }

    /// Polls a sleep until `at`, (re)armed as needed; true when it is
    /// due.
    fn sleep_until(slot: &mut Option<Pin<Box<Sleep>>>, at: Instant, cx: &mut Context<'_>) -> bool {
        match slot {
            Some(s) if s.deadline() == at => {}
            Some(s) => s.as_mut().reset(at),
            None => *slot = Some(Box::pin(tokio::time::sleep_until(at))),
        }
        match slot {
            Some(s) => s.as_mut().poll(cx).is_ready(),
            None => true,
        }
    }

    fn link_down(&self) -> bool {
        !self.net.shared.links.link(self.local, self.remote).up
    }
}

impl AsyncRead for SimConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            if this.shared.reset.load(Ordering::Acquire) {
                return Poll::Ready(Err(reset_error()));
            }
            let now = Instant::now();
            let due = {
                let mut pipe = this.shared.pipe(1 - this.out);
                let mut n = 0;
                while n < buf.len() {
                    let Some(chunk) = pipe.queue.front_mut() else {
                        break;
                    };
                    if chunk.at > now {
                        break;
                    }
                    let take = (chunk.data.len() - chunk.read).min(buf.len() - n);
                    buf[n..n + take].copy_from_slice(&chunk.data[chunk.read..chunk.read + take]);
                    chunk.read += take;
                    n += take;
                    if chunk.read == chunk.data.len() {
                        pipe.queue.pop_front();
                    }
                }
                if n > 0 || buf.is_empty() {
                    if let Some(w) = pipe.writer.take() {
                        w.wake();
                    }
                    return Poll::Ready(Ok(n));
                }
                match (pipe.queue.front(), pipe.eof_at) {
                    (Some(chunk), _) => Some(chunk.at),
                    (None, Some(eof)) if eof <= now => return Poll::Ready(Ok(0)),
                    (None, Some(eof)) => Some(eof),
                    (None, None) => {
                        pipe.reader = Some(cx.waker().clone());
                        None
                    }
                }
            };
            let Some(at) = due else {
                return Poll::Pending;
            };
            if !Self::sleep_until(&mut this.read_sleep, at, cx) {
                // Also woken by a reset.
                this.shared.pipe(1 - this.out).reader = Some(cx.waker().clone());
                return Poll::Pending;
            }
            if this.link_down() {
                this.shared.reset();
            }
        }
    }
}

impl AsyncWrite for SimConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.shared.reset.load(Ordering::Acquire) {
            return Poll::Ready(Err(reset_error()));
        }
        let params = this.net.shared.links.link(this.local, this.remote);
        if !params.up {
            this.shared.reset();
            return Poll::Ready(Err(reset_error()));
        }
        let now = Instant::now();
        let bandwidth = params.bandwidth_bytes_per_sec;
        {
            let pipe = this.shared.pipe(this.out);
            if pipe.reader_gone {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            if pipe.eof_at.is_some() {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            // A full send buffer: wait until the link drained enough.
            if bandwidth > 0
                && let Some(free) = pipe.free_at
            {
                let buffered = Duration::from_secs_f64(SEND_BUFFER as f64 / bandwidth as f64);
                if free > now + buffered {
                    let at = free - buffered;
                    drop(pipe);
                    if !Self::sleep_until(&mut this.write_sleep, at, cx) {
                        this.shared.pipe(this.out).writer = Some(cx.waker().clone());
                        return Poll::Pending;
                    }
                }
            }
        }
        let jitter = this.jitter(params.jitter);
        let mut pipe = this.shared.pipe(this.out);
        let start = pipe.free_at.map_or(now, |f| f.max(now));
        let serialise = if bandwidth > 0 {
            Duration::from_secs_f64(buf.len() as f64 / bandwidth as f64)
        } else {
            Duration::ZERO
        };
        let departs = start + serialise;
        pipe.free_at = Some(departs);
        let arrives = departs + params.latency + jitter;
        let arrives = pipe.last_arrival.map_or(arrives, |l| l.max(arrives));
        pipe.last_arrival = Some(arrives);
        pipe.queue.push_back(Chunk {
            at: arrives,
            data: buf.to_vec(),
            read: 0,
        });
        if let Some(w) = pipe.reader.take() {
            w.wake();
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.shared.reset.load(Ordering::Acquire) {
            return Poll::Ready(Err(reset_error()));
        }
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.close_out();
        Poll::Ready(Ok(()))
    }
}

impl SimConnection {
    /// Ends this end's direction: the other end reads its end after the
    /// last byte (or the link's latency).
    fn close_out(&self) {
        let latency = self.net.shared.links.link(self.local, self.remote).latency;
        let mut pipe = self.shared.pipe(self.out);
        if pipe.eof_at.is_none() {
            let now = Instant::now();
            let at = pipe
                .last_arrival
                .map_or(now + latency, |l| l.max(now + latency));
            pipe.eof_at = Some(at);
            if let Some(w) = pipe.reader.take() {
                w.wake();
            }
        }
    }
}

impl Drop for SimConnection {
    fn drop(&mut self) {
        self.close_out();
        let mut pipe = self.shared.pipe(1 - self.out);
        pipe.reader_gone = true;
        if let Some(w) = pipe.writer.take() {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::future::poll_fn;
    use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
    use libp2p::core::Endpoint;
    use libp2p::core::transport::PortUse;
    use libp2p::swarm::SwarmEvent;
    use libp2p::{Swarm, identity::Keypair, ping};
    use tokio::time::Instant;

    use super::*;
    use crate::transport::{SwarmConfig, TransportKind, build_swarm};

    const DEADLINE: Duration = Duration::from_secs(20);

    fn opts() -> DialOpts {
        DialOpts {
            role: Endpoint::Dialer,
            port_use: PortUse::Reuse,
        }
    }

    /// A connection from a transport listening on `/memory/1` to one
    /// listening on `/memory/2`: (dialer's end, listener's end).
    async fn raw_pair(net: &SimNetwork) -> (SimConnection, SimConnection, SimTransport) {
        let mut a = net.transport();
        let mut b = net.transport();
        a.listen_on(ListenerId::next(), memory_addr(1)).unwrap();
        b.listen_on(ListenerId::next(), memory_addr(2)).unwrap();
        let ours = a.dial(memory_addr(2), opts()).unwrap().await.unwrap();
        loop {
            match poll_fn(|cx| Pin::new(&mut b).poll(cx)).await {
                TransportEvent::Incoming {
                    upgrade,
                    send_back_addr,
                    ..
                } => {
                    assert_eq!(send_back_addr, memory_addr(1));
                    return (ours, upgrade.await.unwrap(), b);
                }
                TransportEvent::NewAddress { .. } => {}
                _ => panic!("unexpected event"),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_arrive_after_the_latency_and_no_faster_than_the_bandwidth() {
        let links = Arc::new(LinkTable::new(LinkParams {
            bandwidth_bytes_per_sec: 1 << 20,
            ..LinkParams::latency(Duration::from_millis(50))
        }));
        let net = SimNetwork::new(7, links);
        let (mut a, mut b, _keep) = raw_pair(&net).await;
        let start = Instant::now();
        let data: Vec<u8> = (0..1u32 << 20).map(|i| i as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(16 * 1024) {
                a.write_all(chunk).await.unwrap();
            }
            a.close().await.unwrap();
            a
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        let took = start.elapsed();
        assert_eq!(got, data);
        // 1 MiB at 1 MiB/s, then the last byte's 50 ms.
        assert!(took >= Duration::from_millis(1050), "{took:?}");
        assert!(took < Duration::from_millis(1100), "{took:?}");
        drop(writer.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_is_reproducible_from_the_seed() {
        async fn arrivals(seed: u64) -> Vec<Duration> {
            let links = Arc::new(LinkTable::new(LinkParams {
                jitter: Duration::from_millis(30),
                ..LinkParams::latency(Duration::from_millis(10))
            }));
            let net = SimNetwork::new(seed, links);
            let (mut a, mut b, _keep) = raw_pair(&net).await;
            let start = Instant::now();
            let mut times = Vec::new();
            for i in 0..20u8 {
                a.write_all(&[i]).await.unwrap();
                let mut byte = [0u8];
                b.read_exact(&mut byte).await.unwrap();
                assert_eq!(byte[0], i);
                let t = start.elapsed();
                assert!(t >= Duration::from_millis(10));
                times.push(t);
            }
            times
        }
        let one = arrivals(1).await;
        assert_eq!(one, arrivals(1).await);
        assert_ne!(one, arrivals(2).await);
    }

    #[tokio::test]
    async fn dials_to_nothing_or_over_a_down_link_fail() {
        let links = Arc::new(LinkTable::default());
        let net = SimNetwork::new(0, links.clone());
        let mut a = net.transport();
        a.listen_on(ListenerId::next(), memory_addr(1)).unwrap();
        let mut b = net.transport();
        assert!(matches!(
            b.listen_on(ListenerId::next(), memory_addr(1)),
            Err(TransportError::Other(SimError::AddrInUse(1)))
        ));
        b.listen_on(ListenerId::next(), memory_addr(2)).unwrap();
        assert!(matches!(
            a.dial(memory_addr(3), opts()).unwrap().await,
            Err(SimError::Unreachable(3))
        ));
        links.set_up(1, 2, false);
        assert!(matches!(
            a.dial(memory_addr(2), opts()).unwrap().await,
            Err(SimError::LinkDown { from: 1, to: 2 })
        ));
        assert!(
            a.dial("/ip4/1.2.3.4/tcp/1".parse().unwrap(), opts())
                .is_err()
        );
    }

    fn ping_swarm(net: &SimNetwork, port: u64) -> Swarm<ping::Behaviour> {
        let config = SwarmConfig {
            transport: TransportKind::Simulated(net.clone()),
            idle_connection_timeout: Duration::from_secs(60),
            bandwidth_metrics: None,
        };
        let behaviour = ping::Behaviour::new(
            ping::Config::new()
                .with_interval(Duration::from_millis(300))
                .with_timeout(Duration::from_secs(5)),
        );
        let mut swarm = build_swarm(Keypair::generate_ed25519(), config, |_| behaviour).unwrap();
        swarm.listen_on(memory_addr(port)).unwrap();
        swarm
    }

    /// Two ping swarms on `/memory/1` and `/memory/2`, the first dialing
    /// the second; the second runs in a task.
    fn connected_pair(net: &SimNetwork) -> Swarm<ping::Behaviour> {
        let mut a = ping_swarm(net, 1);
        let mut b = ping_swarm(net, 2);
        let b_peer = *b.local_peer_id();
        tokio::spawn(async move {
            loop {
                b.select_next_some().await;
            }
        });
        a.dial(memory_addr(2).with(Protocol::P2p(b_peer))).unwrap();
        a
    }

    #[tokio::test]
    async fn a_ping_over_the_simulated_network_takes_twice_the_latency() {
        let links = Arc::new(LinkTable::new(LinkParams::latency(Duration::from_millis(
            50,
        ))));
        let net = SimNetwork::new(1, links);
        let mut a = connected_pair(&net);
        let mut rtts = Vec::new();
        tokio::time::timeout(DEADLINE, async {
            while rtts.len() < 3 {
                if let SwarmEvent::Behaviour(ping::Event { result, .. }) =
                    a.select_next_some().await
                {
                    rtts.push(result.unwrap());
                }
            }
        })
        .await
        .unwrap();
        for rtt in &rtts[1..] {
            assert!(*rtt >= Duration::from_millis(100), "{rtts:?}");
            assert!(*rtt < Duration::from_millis(150), "{rtts:?}");
        }
    }

    #[tokio::test]
    async fn a_link_going_down_closes_the_connection_and_fails_dials() {
        let links = Arc::new(LinkTable::new(LinkParams::latency(Duration::from_millis(
            5,
        ))));
        let net = SimNetwork::new(1, links.clone());
        let mut a = connected_pair(&net);
        let b_peer = tokio::time::timeout(DEADLINE, async {
            loop {
                if let SwarmEvent::ConnectionEstablished { peer_id, .. } =
                    a.select_next_some().await
                {
                    return peer_id;
                }
            }
        })
        .await
        .unwrap();
        links.set_up(1, 2, false);
        assert_eq!(net.apply_links(), 1);
        tokio::time::timeout(DEADLINE, async {
            loop {
                if let SwarmEvent::ConnectionClosed { peer_id, .. } = a.select_next_some().await {
                    assert_eq!(peer_id, b_peer);
                    return;
                }
            }
        })
        .await
        .unwrap();
        a.dial(memory_addr(2).with(Protocol::P2p(b_peer))).unwrap();
        tokio::time::timeout(DEADLINE, async {
            loop {
                match a.select_next_some().await {
                    SwarmEvent::OutgoingConnectionError { .. } => return,
                    SwarmEvent::ConnectionEstablished { .. } => panic!("dialed a down link"),
                    _ => {}
                }
            }
        })
        .await
        .unwrap();
    }
}
