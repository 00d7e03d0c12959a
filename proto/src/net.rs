//! Weft's libp2p protocol names, and the framing of its direct and
//! mailbox protocols: one length-prefixed byte string each way (`u32`
//! big-endian length, then the bytes). What the bytes mean is in the
//! node's direct exchanges and in [`crate::mailbox`] (docs/protocol.md).

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p_request_response::Codec;
use libp2p_swarm::StreamProtocol;

pub const DIRECT_PROTOCOL: &str = "/weft/direct/1";
/// Kademlia's protocol name: Weft's own DHT, never the public IPFS one.
pub const KAD_PROTOCOL: &str = "/weft/kad/1.0.0";
pub const IDENTIFY_PROTOCOL: &str = "/weft/1.0.0";
/// The DNS-SD service type Weft nodes advertise on the LAN.
pub const MDNS_SERVICE: &str = "_weft._udp.local.";
/// The DHT key relays provide.
pub const RELAY_PROVIDER_KEY: &[u8] = b"/weft/relays/1";
/// Largest request: a batch of envelopes.
pub const MAX_DIRECT_REQUEST: usize = 8 * 1024 * 1024;
/// Largest response: a batch of envelopes during catch-up.
pub const MAX_DIRECT_RESPONSE: usize = 8 * 1024 * 1024;

#[derive(Clone, Copy, Debug, Default)]
pub struct DirectCodec;

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T, max: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds {max}"),
        ));
    }
    // Grown as bytes arrive, not allocated up front: a peer that only
    // announces a large frame costs nothing.
    let mut buf = Vec::with_capacity(len.min(64 * 1024));
    io.take(len as u64).read_to_end(&mut buf).await?;
    if buf.len() != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("frame ended after {} of {len} bytes", buf.len()),
        ));
    }
    Ok(buf)
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    data: &[u8],
    max: usize,
) -> io::Result<()> {
    if data.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "frame too large",
        ));
    }
    io.write_all(&(data.len() as u32).to_be_bytes()).await?;
    io.write_all(data).await?;
    io.close().await
}

impl Codec for DirectCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, MAX_DIRECT_REQUEST).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, MAX_DIRECT_RESPONSE).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req, MAX_DIRECT_REQUEST).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res, MAX_DIRECT_RESPONSE).await
    }
}
