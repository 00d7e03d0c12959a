//! The control socket: a Unix socket in the home (mode 0600) on which the
//! daemon serves the JSON API of [`crate::api`], one JSON line per request
//! and per answer. Other `weft` commands are its clients.
//!
//! Whoever talks to it acts as the account (`devices link` lets a device
//! of theirs in), so it serves only the user the daemon runs as: the
//! socket lives in a private directory, is never connectable by others
//! even for an instant, and each client's uid is checked (SO_PEERCRED).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::broadcast;

use crate::api::{ApiError, Event, MAX_REPLY_BYTES, MAX_REQUEST_BYTES, Reply, Request, Response};
use crate::node::{NodeError, NodeHandle};

/// Most clients served at once; more wait in the kernel's backlog.
const MAX_CLIENTS: usize = 64;

/// Held while this process changes its umask, which is per process: two
/// binds at once would otherwise restore each other's masks wrongly.
static UMASK_CHANGE: Mutex<()> = Mutex::new(());

/// A running control socket server. Stops (and removes the socket) when
/// dropped or stopped.
#[derive(Debug)]
pub struct ControlServer {
    task: tokio::task::JoinHandle<()>,
    path: PathBuf,
}

impl ControlServer {
    /// Stops serving and removes the socket.
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves the API of `handle` on a Unix socket at `path`, to this user
/// only. Refuses a `path` whose directory others can read or enter.
pub async fn serve(handle: NodeHandle, path: &Path) -> Result<ControlServer, NodeError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    crate::home::require_private(dir, 0o700)?;
    // A socket left by a daemon that died: nobody answers on it.
    if path.exists() && UnixStream::connect(path).await.is_err() {
        std::fs::remove_file(path)?;
    }
    let listener = bind_private(path)?;
    // 0600 rather than the 0700 the umask left: a socket needs no x bit.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let owner = rustix::process::geteuid().as_raw();
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return;
            };
            let handle = handle.clone();
            tokio::spawn(async move {
                if let Err(e) = serve_client(handle, stream, owner).await {
                    tracing::debug!("control client: {e}");
                }
                drop(permit);
            });
        }
    });
    Ok(ControlServer {
        task,
        path: path.to_path_buf(),
    })
}

/// Binds a listener at `path` whose socket only this user can connect to
/// from the moment it exists.
///
/// bind(2) makes the socket 0777 & !umask: under the usual umask 022 it
/// would be connectable by anyone until a chmod. Two locks close that
/// window: the directory is private (checked by `serve`), and the bind
/// runs under umask 077. The umask is per process, so it is changed only
/// for the bind, under `UMASK_CHANGE`; 077 and not stricter, so that
/// whatever another thread creates in that instant stays usable by us.
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    let _only_us = UMASK_CHANGE.lock().unwrap_or_else(PoisonError::into_inner);
    let previous = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let bound = UnixListener::bind(path);
    rustix::process::umask(previous);
    bound
}

/// Whether the client runs as `owner`; if not, it is told why (before any
/// request is read) and the refusal is logged.
async fn admit(stream: &mut UnixStream, owner: u32) -> std::io::Result<bool> {
    let refusal = match stream.peer_cred() {
        Ok(cred) if cred.uid() == owner => return Ok(true),
        Ok(cred) => {
            let uid = cred.uid();
            tracing::warn!("control socket: refused a client of uid {uid}; it serves uid {owner}");
            format!(
                "refused: this daemon serves only its own user (uid {owner}); you are uid {uid}"
            )
        }
        Err(e) => {
            tracing::warn!("control socket: refused a client whose uid is unknown: {e}");
            format!("refused: this daemon serves only its own user (uid {owner}); yours is unknown")
        }
    };
    let reply = Reply {
        ok: false,
        data: None,
        error: Some(ApiError::failed(refusal)),
    };
    write_line(stream, &reply).await?;
    Ok(false)
}

async fn write_line<T: serde::Serialize>(
    w: &mut (impl AsyncWriteExt + Unpin),
    v: &T,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

/// Reads one line of at most `max` bytes (`what` names it in the error).
async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
    what: &'static str,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    let mut limited = AsyncReadExt::take(r, max as u64 + 1);
    let n = limited.read_until(b'\n', &mut buf).await?;
    if n == 0 {
        return Ok(None);
    }
    if buf.len() > max {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, what));
    }
    Ok(Some(buf))
}

async fn serve_client(
    handle: NodeHandle,
    mut stream: UnixStream,
    owner: u32,
) -> std::io::Result<()> {
    if !admit(&mut stream, owner).await? {
        return Ok(());
    }
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    loop {
        let line = match read_line(&mut r, MAX_REQUEST_BYTES, "request too large").await {
            Ok(Some(line)) => line,
            Ok(None) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                // Say why before hanging up: the rest of the line is unread.
                let reply = Reply {
                    ok: false,
                    data: None,
                    error: Some(ApiError::usage(format!(
                        "request longer than {MAX_REQUEST_BYTES} bytes"
                    ))),
                };
                write_line(&mut w, &reply).await?;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let request: Request = match serde_json::from_slice(&line) {
            Ok(r) => r,
            Err(e) => {
                let reply = Reply {
                    ok: false,
                    data: None,
                    error: Some(ApiError::usage(format!("bad request: {e}"))),
                };
                write_line(&mut w, &reply).await?;
                continue;
            }
        };
        if request == Request::Watch {
            let events = handle.events();
            write_line(
                &mut w,
                &Reply {
                    ok: true,
                    data: None,
                    error: None,
                },
            )
            .await?;
            return stream_events(events, &mut w).await;
        }
        let reply = match handle.call(request).await {
            Ok(response) => Reply {
                ok: true,
                data: Some(response.to_json()),
                error: None,
            },
            Err(e) => Reply {
                ok: false,
                data: None,
                error: Some(e),
            },
        };
        write_line(&mut w, &reply).await?;
    }
}

async fn stream_events(
    mut events: broadcast::Receiver<Event>,
    w: &mut (impl AsyncWriteExt + Unpin),
) -> std::io::Result<()> {
    loop {
        match events.recv().await {
            Ok(ev) => write_line(w, &ev).await?,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!("watch client lagged; {n} events skipped");
            }
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}

/// A client of a daemon's control socket.
#[derive(Debug)]
pub struct ControlClient {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl ControlClient {
    /// Connects; fails if no daemon listens on `path`.
    pub async fn connect(path: &Path) -> Result<Self, NodeError> {
        let stream = UnixStream::connect(path).await?;
        let (r, w) = stream.into_split();
        Ok(Self {
            reader: BufReader::new(r),
            writer: w,
        })
    }

    async fn reply(&mut self) -> Result<Reply, NodeError> {
        let line = read_line(&mut self.reader, MAX_REPLY_BYTES, "reply too large")
            .await?
            .ok_or_else(|| NodeError::Protocol("daemon closed the connection".into()))?;
        serde_json::from_slice(&line).map_err(|e| NodeError::Protocol(e.to_string()))
    }

    pub async fn call(&mut self, request: &Request) -> Result<Response, ApiError> {
        let sent = write_line(&mut self.writer, request).await;
        // A daemon that refuses us says why and hangs up, maybe before we
        // are done writing: its reason beats our broken pipe.
        let reply = match (sent, self.reply().await) {
            (_, Ok(reply)) => reply,
            (Err(e), Err(_)) => return Err(ApiError::failed(format!("control socket: {e}"))),
            (Ok(()), Err(e)) => return Err(e.into()),
        };
        match (reply.ok, reply.data, reply.error) {
            (true, data, _) => {
                Response::from_json(request, data.unwrap_or(serde_json::Value::Null)).map_err(|e| {
                    ApiError::failed(format!("the daemon's answer does not read: {e}"))
                })
            }
            (false, _, Some(e)) => Err(e),
            (false, _, None) => Err(ApiError::failed("daemon reported an unspecified error")),
        }
    }

    /// Starts a `watch` stream; then read events with [`Self::next_event`].
    pub async fn watch(&mut self) -> Result<(), NodeError> {
        let sent = write_line(&mut self.writer, &Request::Watch).await;
        // As in `call`: a refusal's reason beats our broken pipe.
        let reply = match (sent, self.reply().await) {
            (_, Ok(reply)) => reply,
            (Err(e), Err(_)) => return Err(e.into()),
            (Ok(()), Err(e)) => return Err(e),
        };
        if reply.ok {
            Ok(())
        } else {
            Err(NodeError::Protocol(
                reply.error.map(|e| e.message).unwrap_or_default(),
            ))
        }
    }

    /// The next event of a `watch` stream; `None` when the daemon stops.
    pub async fn next_event(&mut self) -> Result<Option<Event>, NodeError> {
        match read_line(&mut self.reader, MAX_REPLY_BYTES, "event too large").await? {
            None => Ok(None),
            Some(line) => serde_json::from_slice(&line)
                .map(Some)
                .map_err(|e| NodeError::Protocol(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// bind(2) makes the socket with mode 0777 & !umask: under the usual
    /// umask 022 anyone could connect until the chmod that follows.
    #[tokio::test]
    async fn the_socket_is_private_from_the_moment_it_is_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weft.sock");
        let usual = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
        let bound = bind_private(&path);
        rustix::process::umask(usual);
        let _listener = bound.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode & 0o077,
            0,
            "the socket was bound with mode {mode:o}: others could connect before the chmod"
        );
    }
}
