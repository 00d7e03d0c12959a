//! Harness for the end-to-end tests: runs the real `weft` binary as child
//! processes, each node in its own temporary home, loopback only, mDNS off.
//!
//! Rules it keeps: unique temp homes; port 0 everywhere (the daemon's ready
//! line tells the real address); child processes are killed on drop;
//! waiting is always for a condition with a deadline, never a fixed sleep.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde_json::Value;

/// How long a condition may take to become true.
pub const DEADLINE: Duration = Duration::from_secs(30);
/// How often a condition is checked.
pub const POLL: Duration = Duration::from_millis(100);
/// How long one non-daemon command may run before it counts as hung.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The `weft` binary next to the test executable
/// (`target/<profile>/deps/<test>` → `target/<profile>/weft`).
pub fn weft_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("unexpected test executable path {}", exe.display()))?;
    let bin = profile_dir.join(format!("weft{}", std::env::consts::EXE_SUFFIX));
    if !bin.is_file() {
        bail!(
            "{} is missing: build the binaries first: cargo build --workspace",
            bin.display()
        );
    }
    Ok(bin)
}

/// Waits until `check` returns `Some`, polling every 100 ms, for at most
/// `timeout`. Errors from `check` count as "not yet"; the last one is
/// reported if time runs out.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(err) => last_error = Some(err),
        }
        if Instant::now() >= deadline {
            return Err(match last_error {
                Some(err) => err.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        thread::sleep(POLL);
    }
}

/// What one finished command printed, and how it exited.
#[derive(Debug)]
pub struct Output {
    /// Exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Fails, with everything printed, unless the exit code is `code`.
    pub fn expect_code(self, code: i32, what: &str) -> anyhow::Result<Self> {
        if self.code == Some(code) {
            Ok(self)
        } else {
            bail!(
                "{what}: expected exit code {code}, got {:?}\nstdout: {}\nstderr: {}",
                self.code,
                self.stdout,
                self.stderr
            )
        }
    }
}

/// A running `weft daemon`.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    /// The peer id from the ready line.
    pub peer_id: String,
    /// The listen addresses from the ready line.
    pub listen: Vec<String>,
    /// Further stdout lines (the ready line is consumed).
    pub lines: mpsc::Receiver<String>,
    log: PathBuf,
}

impl Daemon {
    /// The first listen address with the `/p2p/` suffix, to dial it.
    pub fn dial_addr(&self) -> anyhow::Result<String> {
        let addr = self
            .listen
            .first()
            .ok_or_else(|| anyhow!("the daemon listens nowhere"))?;
        Ok(format!("{addr}/p2p/{}", self.peer_id))
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The daemon's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A running command that streams lines (`weft watch`); killed on drop.
#[derive(Debug)]
pub struct Stream {
    child: Child,
    /// Its stdout, line by line.
    pub stdout: mpsc::Receiver<String>,
    /// Its stderr, line by line.
    pub stderr: mpsc::Receiver<String>,
}

impl Stream {
    /// Waits (up to 30 s) for a stdout line that `matches`, skipping others.
    pub fn wait_for_line(
        &self,
        what: &str,
        matches: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        wait_for(&self.stdout, what, matches)
    }

    /// Waits (up to 30 s) for a stderr line that `matches`.
    pub fn wait_for_stderr(
        &self,
        what: &str,
        matches: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        wait_for(&self.stderr, what, matches)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(
    lines: &mpsc::Receiver<String>,
    what: &str,
    matches: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if matches(&line) => return Ok(line),
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => bail!("timed out waiting for {what}"),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bail!("the stream ended before {what}")
            }
        }
    }
}

/// Sends the lines of a pipe to a channel, on a thread.
/// Waits for a started `weft` command (killed after [`COMMAND_TIMEOUT`])
/// and collects what it printed.
fn finish(mut child: Child, who: &str, args: &[&str]) -> anyhow::Result<Output> {
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{who}: weft {args:?} hung for {COMMAND_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    Ok(Output {
        code: status.code(),
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

fn lines_of<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let Some(pipe) = pipe else { return };
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// One node: a temporary home and, optionally, its running daemon.
#[derive(Debug)]
pub struct Weft {
    pub name: String,
    bin: PathBuf,
    root: tempfile::TempDir,
    home: PathBuf,
    daemon: Option<Daemon>,
    daemons_started: usize,
}

impl Weft {
    /// A node with a fresh, empty home.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let bin = weft_bin()?;
        let root = tempfile::Builder::new()
            .prefix(&format!("weft-e2e-{name}-"))
            .tempdir()
            .context("creating a temporary home")?;
        let home = root.path().join("home");
        Ok(Self {
            name: name.to_string(),
            bin,
            root,
            home,
            daemon: None,
            daemons_started: 0,
        })
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.bin);
        command
            .arg("--home")
            .arg(&self.home)
            .args(args)
            .env_remove("WEFT_HOME");
        command
    }

    /// Runs `weft --home HOME ARGS...` to completion (killed after 60 s).
    pub fn run(&self, args: &[&str]) -> anyhow::Result<Output> {
        self.run_with_stdin(args, None)
    }

    /// Like [`Weft::run`], feeding `stdin` to the command.
    pub fn run_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<Output> {
        let mut child = self
            .command(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running weft {args:?}"))?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes())?;
        }
        finish(child, &self.name, args)
    }

    /// Starts a long-running command (`watch`), streaming its output.
    pub fn spawn(&self, args: &[&str]) -> anyhow::Result<Stream> {
        let mut child = self
            .command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running weft {args:?}"))?;
        let stdout = lines_of(child.stdout.take());
        let stderr = lines_of(child.stderr.take());
        Ok(Stream {
            child,
            stdout,
            stderr,
        })
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let what = format!("{}: weft {args:?}", self.name);
        Ok(self.run(args)?.expect_code(0, &what)?.stdout)
    }

    /// Runs `weft --json ARGS...`, which must succeed and print exactly one
    /// JSON value.
    pub fn json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let stdout = self.ok(&full)?;
        let mut lines = stdout.lines().filter(|l| !l.trim().is_empty());
        let first = lines
            .next()
            .ok_or_else(|| anyhow!("{}: weft {args:?} printed nothing", self.name))?;
        if lines.next().is_some() {
            bail!(
                "{}: weft {args:?} printed more than one line: {stdout}",
                self.name
            );
        }
        serde_json::from_str(first)
            .with_context(|| format!("{}: weft {args:?} printed no JSON: {first}", self.name))
    }

    /// `weft init --name NAME`, returning the id JSON.
    pub fn init(&self) -> anyhow::Result<Value> {
        self.json(&["init", "--name", &self.name])
    }

    /// The invite string from `weft id`.
    pub fn invite(&self) -> anyhow::Result<String> {
        let id = self.json(&["id"])?;
        id["invite"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("{}: no invite in {id}", self.name))
    }

    /// The user id from `weft id`.
    pub fn user_id(&self) -> anyhow::Result<String> {
        let id = self.json(&["id"])?;
        id["user_id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("{}: no user_id in {id}", self.name))
    }

    /// Adds `other` as a contact under its name, from its invite.
    pub fn add_contact(&self, other: &Weft) -> anyhow::Result<Value> {
        let invite = other.invite()?;
        self.json(&["contact", "add", &invite, "--name", &other.name])
    }

    /// Starts `weft --json daemon --listen /ip4/127.0.0.1/tcp/0 --no-mdns
    /// EXTRA...` and waits for its ready line.
    pub fn start_daemon(&mut self, extra: &[&str]) -> anyhow::Result<&Daemon> {
        let mut args = vec!["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"];
        args.extend_from_slice(extra);
        self.launch_daemon(None, &args)
    }

    /// Starts `ip netns exec NETNS weft --json daemon ARGS...` (no listen
    /// address or mDNS flag of its own: `args` says everything) and waits
    /// for its ready line. `ip netns exec` execs, so the child is the
    /// daemon itself: [`Weft::stop_daemon`] and the drop-time kill reach it.
    /// The control socket lives in the home, on the shared filesystem, so
    /// every other command runs from outside the namespace as usual.
    pub fn start_daemon_in(&mut self, netns: &str, args: &[&str]) -> anyhow::Result<&Daemon> {
        self.launch_daemon(Some(netns), args)
    }

    fn launch_daemon(&mut self, netns: Option<&str>, extra: &[&str]) -> anyhow::Result<&Daemon> {
        if self.daemon.is_some() {
            bail!("{}: a daemon is already running", self.name);
        }
        self.daemons_started += 1;
        let log = self
            .root
            .path()
            .join(format!("daemon-{}.log", self.daemons_started));
        let log_file = std::fs::File::create(&log)?;
        let mut args = vec!["--json", "daemon"];
        args.extend_from_slice(extra);
        let mut command = match netns {
            None => self.command(&args),
            Some(netns) => {
                let mut command = Command::new("ip");
                command
                    .args(["netns", "exec", netns])
                    .arg(&self.bin)
                    .arg("--home")
                    .arg(&self.home)
                    .args(&args)
                    .env_remove("WEFT_HOME");
                command
            }
        };
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .spawn()
            .with_context(|| format!("{}: starting the daemon", self.name))?;
        let lines = lines_of(child.stdout.take());
        let ready = match lines.recv_timeout(DEADLINE) {
            Ok(line) => line,
            Err(err) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{}: the daemon printed no ready line ({err}); its log:\n{}",
                    self.name,
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        let ready: Value = serde_json::from_str(&ready)
            .with_context(|| format!("{}: ready line is not JSON: {ready}", self.name))?;
        if ready["event"] != "ready" {
            bail!("{}: first line is not the ready event: {ready}", self.name);
        }
        let peer_id = ready["peer_id"]
            .as_str()
            .ok_or_else(|| anyhow!("no peer_id in {ready}"))?
            .to_string();
        let listen = ready["listen"]
            .as_array()
            .ok_or_else(|| anyhow!("no listen in {ready}"))?
            .iter()
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect();
        Ok(self.daemon.insert(Daemon {
            child,
            peer_id,
            listen,
            lines,
            log,
        }))
    }

    /// Stops `other`'s daemon and waits until this node's daemon no longer
    /// lists it among its peers.
    pub fn see_stop(&self, other: &mut Weft) -> anyhow::Result<()> {
        other.stop_daemon()?;
        let peer = other.json(&["id"])?["peer_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        wait_until(
            &format!("{} to see {} go", self.name, other.name),
            DEADLINE,
            || {
                let status = self.json(&["status"])?;
                let still = status["peers"]
                    .as_array()
                    .is_some_and(|p| p.iter().any(|p| p["peer_id"] == peer.as_str()));
                Ok((!still).then_some(()))
            },
        )
    }

    /// The running daemon.
    pub fn daemon(&self) -> anyhow::Result<&Daemon> {
        self.daemon
            .as_ref()
            .ok_or_else(|| anyhow!("{}: no daemon running", self.name))
    }

    /// Stops the daemon with SIGTERM and waits (up to 30 s) for it to exit
    /// cleanly.
    pub fn stop_daemon(&mut self) -> anyhow::Result<()> {
        let Some(mut daemon) = self.daemon.take() else {
            return Ok(());
        };
        let pid = daemon.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .context("running kill")?;
        if !sent.success() {
            bail!("{}: kill -TERM {pid} failed", self.name);
        }
        let status = wait_until("the daemon to exit", DEADLINE, || {
            Ok(daemon.child.try_wait()?)
        });
        match status {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => bail!(
                "{}: the daemon exited with {status}; its log:\n{}",
                self.name,
                daemon.log()
            ),
            Err(err) => {
                let _ = daemon.child.kill();
                let _ = daemon.child.wait();
                Err(err)
            }
        }
    }

    /// `weft --json messages TARGET` as a list.
    pub fn messages(&self, target: &str) -> anyhow::Result<Vec<Value>> {
        match self.json(&["messages", target])? {
            Value::Array(list) => Ok(list),
            other => bail!("{}: messages is not an array: {other}", self.name),
        }
    }

    /// Waits (polling `messages`) until a message with `text` is in the
    /// conversation `target`, and returns it.
    pub fn wait_for_message(&self, target: &str, text: &str) -> anyhow::Result<Value> {
        let what = format!("{} to see \"{text}\" in {target}", self.name);
        wait_until(&what, DEADLINE, || {
            Ok(self
                .messages(target)?
                .into_iter()
                .find(|m| m["text"] == text))
        })
        .map_err(|err| {
            let log = self.daemon.as_ref().map(Daemon::log).unwrap_or_default();
            err.context(format!("{}'s daemon log:\n{log}", self.name))
        })
    }
}

/// Runs one-off commands of a node; cheap to clone and usable from other
/// threads (a sender loop while the test kills the daemon, say).
#[derive(Clone, Debug)]
pub struct Cli {
    pub name: String,
    bin: PathBuf,
    home: PathBuf,
}

impl Cli {
    /// Runs `weft --home HOME ARGS...` to completion (killed after 60 s).
    pub fn run(&self, args: &[&str]) -> anyhow::Result<Output> {
        let child = Command::new(&self.bin)
            .arg("--home")
            .arg(&self.home)
            .args(args)
            .env_remove("WEFT_HOME")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running weft {args:?}"))?;
        finish(child, &self.name, args)
    }
}

impl Weft {
    /// A [`Cli`] for this node's home, to run commands from another thread.
    pub fn cli(&self) -> Cli {
        Cli {
            name: self.name.clone(),
            bin: self.bin.clone(),
            home: self.home.clone(),
        }
    }

    /// Kills the daemon with SIGKILL (a crash: no shutdown, the lock file
    /// and control socket stay behind), waits for it to be gone and
    /// forgets it, so that [`Weft::start_daemon`] can start another.
    /// Returns how it exited. Without a daemon, fails.
    pub fn kill_daemon_hard(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let Some(mut daemon) = self.daemon.take() else {
            bail!("{}: no daemon to kill", self.name);
        };
        // On Unix, `Child::kill` sends SIGKILL.
        daemon
            .child
            .kill()
            .with_context(|| format!("{}: killing the daemon", self.name))?;
        daemon
            .child
            .wait()
            .with_context(|| format!("{}: waiting for the killed daemon", self.name))
    }

    /// The stderr of every daemon this node has run, oldest first, each
    /// under a header (for failure reports).
    pub fn daemon_logs(&self) -> String {
        let mut text = String::new();
        for n in 1..=self.daemons_started {
            let path = self.root.path().join(format!("daemon-{n}.log"));
            let log = std::fs::read_to_string(&path).unwrap_or_default();
            text.push_str(&format!("--- {} daemon #{n} ---\n{log}", self.name));
            if !log.ends_with('\n') {
                text.push('\n');
            }
        }
        text
    }
}

impl Drop for Weft {
    fn drop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            let _ = daemon.child.kill();
            let _ = daemon.child.wait();
        }
    }
}

/// Reads a pipe to the end on a thread.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}

/// Two network namespaces joined by a veth pair, for tests that need real,
/// isolated interfaces (mDNS, links going down). Needs root and iproute2.
/// What `/proc` says of a process: its memory and CPU time.
pub mod procfs {
    use std::collections::BTreeMap;
    use std::time::Duration;

    /// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`, …); `None`
    /// once the process is gone.
    pub fn status_kb(pid: u32, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status.lines().find_map(|line| {
            let value = line.strip_prefix(field)?.strip_prefix(':')?;
            value.trim().trim_end_matches("kB").trim().parse().ok()
        })
    }

    /// CPU time (user + system) of process `pid`, from `/proc/PID/stat`.
    pub fn cpu_of(pid: u32) -> Duration {
        cpu_in(&format!("/proc/{pid}/stat"))
    }

    /// CPU time of each thread of process `pid`, summed by thread name.
    pub fn threads_cpu(pid: u32) -> BTreeMap<String, Duration> {
        let mut by_name = BTreeMap::new();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return by_name;
        };
        for task in tasks.flatten() {
            let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            let cpu = cpu_in(&task.path().join("stat").to_string_lossy());
            *by_name.entry(name.trim().to_string()).or_default() += cpu;
        }
        by_name
    }

    fn cpu_in(stat_path: &str) -> Duration {
        let stat = std::fs::read_to_string(stat_path).unwrap_or_default();
        // Fields after the command (which may hold spaces), from field 3.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // utime and stime are fields 14 and 15: 11 and 12 after the command.
        let total = ticks(11) + ticks(12);
        // USER_HZ is 100 on Linux.
        Duration::from_millis(total * 10)
    }
}

pub mod netns {
    use std::process::Command;
    use std::sync::atomic::{AtomicU32, Ordering};

    use anyhow::{Context, bail};

    /// Runs `ip ARGS...`, failing with its stderr.
    pub fn ip(args: &[&str]) -> anyhow::Result<()> {
        ip_stdout(args).map(drop)
    }

    /// Runs `ip ARGS...`, failing with its stderr; returns its stdout.
    pub fn ip_stdout(args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("ip")
            .args(args)
            .output()
            .context("running ip")?;
        if !out.status.success() {
            bail!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Namespaces made by this process so far (names stay unique when
    /// several tests of one binary run at once).
    static MADE: AtomicU32 = AtomicU32::new(0);

    /// Two namespaces, `names[0]` and `names[1]`, each holding one end of a
    /// veth pair (`veths[i]`, address `addrs[i]`/24) and an up loopback.
    /// Both are deleted on drop, and the veth pair with them.
    #[derive(Debug)]
    pub struct Netns {
        pub names: [String; 2],
        pub veths: [String; 2],
        /// The IPv4 address of each veth end, without the prefix length.
        pub addrs: [String; 2],
    }

    impl Netns {
        /// Creates the namespaces and the veth pair, addresses on, links up.
        /// With `multicast`, the veths also carry multicast (mDNS): the
        /// flag on and a 224.0.0.0/4 route through them.
        pub fn create(multicast: bool) -> anyhow::Result<Self> {
            // Unique per run: interface names are at most 15 bytes.
            let made = MADE.fetch_add(1, Ordering::Relaxed);
            let low = u64::from(rand_byte().wrapping_add(made as u8));
            let tag = format!("{:x}", (std::process::id() as u64) << 8 | low);
            let names = [format!("weft-a-{tag}"), format!("weft-b-{tag}")];
            let veths = [format!("wa{tag}"), format!("wb{tag}")];
            let subnet = 1 + (std::process::id().wrapping_add(made) % 250);
            let addrs = [1, 2].map(|host| format!("10.213.{subnet}.{host}"));
            // Built first, so that a failure half way still cleans up.
            let ns = Netns {
                names: names.clone(),
                veths: veths.clone(),
                addrs: addrs.clone(),
            };
            ip(&["netns", "add", &names[0]])?;
            ip(&["netns", "add", &names[1]])?;
            ip(&[
                "link", "add", &veths[0], "type", "veth", "peer", "name", &veths[1],
            ])?;
            ip(&["link", "set", &veths[0], "netns", &names[0]])?;
            ip(&["link", "set", &veths[1], "netns", &names[1]])?;
            for i in 0..2 {
                let (n, dev) = (&names[i], &veths[i]);
                ip(&[
                    "-n",
                    n,
                    "addr",
                    "add",
                    &format!("{}/24", addrs[i]),
                    "dev",
                    dev,
                ])?;
                if multicast {
                    ip(&["-n", n, "link", "set", dev, "up", "multicast", "on"])?;
                } else {
                    ip(&["-n", n, "link", "set", dev, "up"])?;
                }
                ip(&["-n", n, "link", "set", "lo", "up"])?;
                if multicast {
                    ip(&["-n", n, "route", "add", "224.0.0.0/4", "dev", dev])?;
                }
            }
            Ok(ns)
        }

        /// [`Netns::create`], or `None` after saying why the test `test`
        /// skips where namespaces cannot be made (no root, no iproute2).
        /// Under CI (`CI` set) that is an error instead: CI must run
        /// `what` (say, "the mDNS test") for real.
        pub fn create_or_skip(
            test: &str,
            what: &str,
            multicast: bool,
        ) -> anyhow::Result<Option<Self>> {
            match Self::create(multicast) {
                Ok(ns) => Ok(Some(ns)),
                Err(e) if std::env::var_os("CI").is_none() => {
                    eprintln!(
                        "skipping {test}: cannot create network namespaces ({e:#}); it needs root and iproute2"
                    );
                    Ok(None)
                }
                Err(e) => Err(e.context(format!(
                    "CI must run {what}: cannot create network namespaces"
                ))),
            }
        }

        /// Runs `ip -n NAMESPACE ARGS...` in namespace `side` (0 or 1).
        pub fn ip(&self, side: usize, args: &[&str]) -> anyhow::Result<()> {
            self.ip_stdout(side, args).map(drop)
        }

        /// Like [`Netns::ip`], returning what it printed.
        pub fn ip_stdout(&self, side: usize, args: &[&str]) -> anyhow::Result<String> {
            let mut full = vec!["-n", self.names[side].as_str()];
            full.extend_from_slice(args);
            ip_stdout(&full)
        }

        /// The state (`INCOMPLETE`, `FAILED`, `REACHABLE`...) of the
        /// neighbour (ARP) entry that namespace `side` holds for the other
        /// end's address, if any. An `INCOMPLETE` or `FAILED` entry while
        /// the other end is down shows that something tried to reach it.
        pub fn neighbour_state(&self, side: usize) -> anyhow::Result<Option<String>> {
            let (dev, peer) = (&self.veths[side], &self.addrs[1 - side]);
            let out = self.ip_stdout(side, &["neigh", "show", "to", peer, "dev", dev])?;
            Ok(out
                .split_whitespace()
                .last()
                .filter(|s| s.chars().all(|c| c.is_ascii_uppercase()))
                .map(str::to_string))
        }

        /// Forgets namespace `side`'s neighbour entry for the other end.
        pub fn flush_neighbour(&self, side: usize) -> anyhow::Result<()> {
            let (dev, peer) = (&self.veths[side], &self.addrs[1 - side]);
            self.ip(side, &["neigh", "flush", "to", peer, "dev", dev])
        }

        /// Sets a sysctl (`net.ipv4.tcp_retries2`, say) inside namespace
        /// `side` only: network sysctls are per namespace.
        pub fn sysctl(&self, side: usize, key: &str, value: &str) -> anyhow::Result<()> {
            let path = format!("/proc/sys/{}", key.replace('.', "/"));
            let out = Command::new("ip")
                .args(["netns", "exec", &self.names[side], "sh", "-c"])
                .arg(r#"printf '%s\n' "$2" > "$1""#)
                .args(["sh", &path, value])
                .output()
                .context("running ip netns exec sh")?;
            if !out.status.success() {
                bail!(
                    "{}: setting {key} = {value}: {}",
                    self.names[side],
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(())
        }

        /// Takes the veth of namespace `side` down and removes its address,
        /// as when an interface vanishes.
        pub fn link_down(&self, side: usize) -> anyhow::Result<()> {
            let dev = self.veths[side].as_str();
            self.ip(side, &["link", "set", dev, "down"])?;
            self.ip(side, &["addr", "flush", "dev", dev])
        }

        /// Undoes [`Netns::link_down`]: the address back, the link up.
        pub fn link_up(&self, side: usize) -> anyhow::Result<()> {
            let dev = self.veths[side].as_str();
            let addr = format!("{}/24", self.addrs[side]);
            self.ip(side, &["addr", "add", &addr, "dev", dev])?;
            self.ip(side, &["link", "set", dev, "up"])
        }
    }

    /// A veth pair between namespace `side` of a [`Netns`] and the test
    /// process's own namespace: an in-process peer (a bare libp2p swarm)
    /// reaches the daemon in that namespace from an address of its own,
    /// `host_addr`, with no other traffic. The subnet (10.215.N.0/24) is
    /// one the host does not use yet. Deleting the host end on drop
    /// deletes the pair (as does deleting the namespace).
    #[derive(Debug)]
    pub struct HostLink {
        /// The host end, in the test process's namespace.
        pub host_dev: String,
        /// The address of the host end (no prefix length).
        pub host_addr: String,
        /// The address of the namespace end (no prefix length).
        pub ns_addr: String,
        /// The namespace end's device.
        pub ns_dev: String,
    }

    impl Netns {
        /// Links namespace `side` to the test process's namespace (see
        /// [`HostLink`]).
        pub fn link_to_host(&self, side: usize) -> anyhow::Result<HostLink> {
            let tag = self.veths[side]
                .get(2..)
                .context("veth names start with two letters")?;
            let (host_dev, ns_dev) = (format!("wh{tag}"), format!("wn{tag}"));
            // One link at a time in this process, so that two tests do not
            // pick the same free subnet; other processes start elsewhere
            // (at this one's namespaces' subnet number).
            let _one_at_a_time = HOST_LINKS.lock().unwrap_or_else(|e| e.into_inner());
            let used =
                ip_stdout(&["-4", "-o", "addr", "show"])? + &ip_stdout(&["-4", "route", "show"])?;
            let start: u32 = self.addrs[side]
                .split('.')
                .nth(2)
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(std::process::id);
            let subnet = (0..250)
                .map(|i| 1 + (start + i) % 250)
                .find(|n| !used.contains(&format!("10.215.{n}.")))
                .context("no free 10.215.N.0/24 subnet on the host")?;
            let link = HostLink {
                host_dev: host_dev.clone(),
                host_addr: format!("10.215.{subnet}.2"),
                ns_addr: format!("10.215.{subnet}.1"),
                ns_dev: ns_dev.clone(),
            };
            ip(&[
                "link", "add", &host_dev, "type", "veth", "peer", "name", &ns_dev,
            ])?;
            ip(&["link", "set", &ns_dev, "netns", &self.names[side]])?;
            let ns_cidr = format!("{}/24", link.ns_addr);
            self.ip(side, &["addr", "add", &ns_cidr, "dev", &ns_dev])?;
            self.ip(side, &["link", "set", &ns_dev, "up"])?;
            let host_cidr = format!("{}/24", link.host_addr);
            ip(&["addr", "add", &host_cidr, "dev", &host_dev])?;
            ip(&["link", "set", &host_dev, "up"])?;
            Ok(link)
        }
    }

    /// IPv6 on a [`HostLink`]: one /64 (`fd57:eef7:215:N::/64`, N being
    /// the link's own IPv4 subnet number, so unique like it) with pairs of
    /// addresses: the host dials `ns_addrs[i]` from `host_addrs[i]` (a
    /// route per pair says so), so that a process of the host can come
    /// from many addresses of one /64 (libp2p's TCP transport lets the
    /// kernel pick the source).
    #[derive(Debug)]
    pub struct HostLinkV6 {
        /// The /64's first four groups (`fd57:eef7:215:N`).
        pub prefix: String,
        /// The namespace end's addresses (`PREFIX::d:1`, `PREFIX::d:2`...).
        pub ns_addrs: Vec<String>,
        /// The host end's addresses (`PREFIX::a:1`, `PREFIX::a:2`...).
        pub host_addrs: Vec<String>,
    }

    impl Netns {
        /// Adds `pairs` pairs of IPv6 addresses to `link` (made by
        /// [`Netns::link_to_host`] for namespace `side`), without duplicate
        /// address detection (usable at once), and a route for each (see
        /// [`HostLinkV6`]). They go with the link.
        pub fn add_ipv6(
            &self,
            side: usize,
            link: &HostLink,
            pairs: u16,
        ) -> anyhow::Result<HostLinkV6> {
            let subnet = link
                .host_addr
                .split('.')
                .nth(2)
                .context("an IPv4 host address")?;
            let prefix = format!("fd57:eef7:215:{subnet}");
            let mut v6 = HostLinkV6 {
                prefix: prefix.clone(),
                ns_addrs: Vec::new(),
                host_addrs: Vec::new(),
            };
            for n in 1..=pairs {
                let (ns_addr, host_addr) =
                    (format!("{prefix}::d:{n:x}"), format!("{prefix}::a:{n:x}"));
                let ns_cidr = format!("{ns_addr}/64");
                self.ip(
                    side,
                    &["addr", "add", &ns_cidr, "dev", &link.ns_dev, "nodad"],
                )?;
                let host_cidr = format!("{host_addr}/64");
                ip(&["addr", "add", &host_cidr, "dev", &link.host_dev, "nodad"])?;
                let to = format!("{ns_addr}/128");
                ip(&[
                    "-6",
                    "route",
                    "add",
                    &to,
                    "dev",
                    &link.host_dev,
                    "src",
                    &host_addr,
                ])?;
                v6.ns_addrs.push(ns_addr);
                v6.host_addrs.push(host_addr);
            }
            Ok(v6)
        }
    }

    /// Held while a [`HostLink`] is being made.
    static HOST_LINKS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    impl Drop for HostLink {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["link", "del", &self.host_dev])
                .output();
        }
    }

    fn rand_byte() -> u8 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        (t % 251) as u8
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            for n in &self.names {
                let _ = ip(&["netns", "del", n]);
            }
            // Only there if creation failed before moving it: deleting a
            // namespace deletes the veth ends inside it.
            let _ = Command::new("ip")
                .args(["link", "del", &self.veths[0]])
                .output();
        }
    }
}

/// A real `weft-relay` as a child process, for offline delivery tests.
pub mod relay {
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, ExitStatus, Stdio};
    use std::sync::mpsc;
    use std::time::Duration;

    use anyhow::{Context, anyhow, bail};
    use serde_json::Value;

    use super::{DEADLINE, lines_of};

    /// The `weft-relay` binary next to the test executable.
    pub fn relay_bin() -> anyhow::Result<PathBuf> {
        let exe = std::env::current_exe().context("locating the test executable")?;
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .ok_or_else(|| anyhow!("unexpected test executable path {}", exe.display()))?;
        let bin = dir.join(format!("weft-relay{}", std::env::consts::EXE_SUFFIX));
        if !bin.is_file() {
            bail!(
                "{} is missing: build the binaries first: cargo build --workspace",
                bin.display()
            );
        }
        Ok(bin)
    }

    /// A running relay (`weft-relay --json`, loopback only, metrics on a
    /// free port), killed on drop. Its stderr goes to a log file.
    #[derive(Debug)]
    pub struct Relay {
        child: Child,
        /// The peer id from the ready line.
        pub peer_id: String,
        /// Its TCP address with the `/p2p/<peer id>` suffix, for
        /// `weft daemon --relay`.
        pub addr: String,
        /// The listen addresses from the ready line.
        pub listen: Vec<String>,
        /// The metrics server's address (`host:port`), if it runs.
        pub metrics: Option<String>,
        /// The data directory (`relay.key`, `relay.db`).
        pub data: PathBuf,
        /// Further stdout lines (the ready line is consumed).
        pub lines: mpsc::Receiver<String>,
        log: PathBuf,
        _root: tempfile::TempDir,
        _data: Option<tempfile::TempDir>,
    }

    impl Relay {
        /// A relay on a free port with a fresh, temporary data directory.
        pub fn start() -> anyhow::Result<Self> {
            let data = tempfile::Builder::new()
                .prefix("weft-relay-")
                .tempdir()
                .context("creating the relay's data directory")?;
            let path = data.path().to_path_buf();
            Self::launch(Launch::default(), "/ip4/127.0.0.1/tcp/0", &path, Some(data))
        }

        /// A relay on a free port with the data directory `data_dir`,
        /// which outlives it: starting another relay there later (with
        /// [`Relay::start_at`] on [`Relay::tcp_port`]) is a restart (same
        /// `relay.key`, same database).
        pub fn start_in(data_dir: &Path) -> anyhow::Result<Self> {
            Self::launch(Launch::default(), "/ip4/127.0.0.1/tcp/0", data_dir, None)
        }

        /// A relay on TCP `port` of 127.0.0.1 with the data directory
        /// `data_dir`, which outlives it, as [`Relay::start_in`].
        pub fn start_at(port: u16, data_dir: &Path) -> anyhow::Result<Self> {
            Self::launch(
                Launch::default(),
                &format!("/ip4/127.0.0.1/tcp/{port}"),
                data_dir,
                None,
            )
        }

        /// The TCP port the relay listens on, from its ready line.
        pub fn tcp_port(&self) -> anyhow::Result<u16> {
            let port = self
                .addr
                .split('/')
                .skip_while(|part| *part != "tcp")
                .nth(1)
                .ok_or_else(|| anyhow!("no tcp port in {}", self.addr))?;
            port.parse()
                .with_context(|| format!("tcp port {port:?} in {}", self.addr))
        }

        /// A relay with a fresh, temporary data directory, run inside the
        /// network namespace `netns` (`ip netns exec`, which execs: the
        /// child is the relay itself) listening on `listen`, with the
        /// config file `config_toml`. Its metrics server is off: it would
        /// listen inside the namespace, out of the test's reach.
        pub fn start_in_netns(
            netns: &str,
            listen: &str,
            config_toml: &str,
        ) -> anyhow::Result<Self> {
            let data = tempfile::Builder::new()
                .prefix("weft-relay-")
                .tempdir()
                .context("creating the relay's data directory")?;
            let config = data.path().join("relay.toml");
            std::fs::write(&config, config_toml).context("writing the relay's config")?;
            let path = data.path().join("data");
            let launch = Launch {
                netns: Some(netns),
                config: Some(&config),
            };
            Self::launch(launch, listen, &path, Some(data))
        }

        fn launch(
            how: Launch<'_>,
            listen: &str,
            data_dir: &Path,
            owned: Option<tempfile::TempDir>,
        ) -> anyhow::Result<Self> {
            let root = tempfile::Builder::new()
                .prefix("weft-relay-log-")
                .tempdir()
                .context("creating a directory for the relay's log")?;
            let log = root.path().join("relay.log");
            let log_file = std::fs::File::create(&log)?;
            let mut command = match how.netns {
                None => Command::new(relay_bin()?),
                Some(netns) => {
                    let mut command = Command::new("ip");
                    command.args(["netns", "exec", netns]).arg(relay_bin()?);
                    command
                }
            };
            let metrics = if how.netns.is_some() {
                "off"
            } else {
                "127.0.0.1:0"
            };
            command.args(["--json", "--listen", listen, "--metrics", metrics]);
            if let Some(config) = how.config {
                command.arg("--config").arg(config);
            }
            let mut child = command
                .arg("--data")
                .arg(data_dir)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::from(log_file))
                .spawn()
                .context("starting weft-relay")?;
            let lines = lines_of(child.stdout.take());
            let ready = loop {
                let line = match lines.recv_timeout(DEADLINE) {
                    Ok(line) => line,
                    Err(err) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        bail!(
                            "weft-relay printed no ready line ({err}); its log:\n{}",
                            std::fs::read_to_string(&log).unwrap_or_default()
                        );
                    }
                };
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v["event"] == "ready"
                {
                    break v;
                }
            };
            let peer_id = ready["peer_id"]
                .as_str()
                .ok_or_else(|| anyhow!("no peer_id in {ready}"))?
                .to_string();
            let listen: Vec<String> = ready["listen"]
                .as_array()
                .ok_or_else(|| anyhow!("no listen in {ready}"))?
                .iter()
                .filter_map(|a| a.as_str().map(str::to_string))
                .collect();
            let tcp = listen
                .iter()
                .find(|a| a.contains("/tcp/"))
                .ok_or_else(|| anyhow!("no tcp listen address in {ready}"))?;
            let addr = if tcp.contains("/p2p/") {
                tcp.clone()
            } else {
                format!("{tcp}/p2p/{peer_id}")
            };
            let metrics = ready["metrics"].as_str().map(str::to_string);
            Ok(Self {
                child,
                peer_id,
                addr,
                listen,
                metrics,
                data: data_dir.to_path_buf(),
                lines,
                log,
                _root: root,
                _data: owned,
            })
        }

        /// Kills the relay with SIGKILL (a crash: no drain, nothing
        /// flushed beyond what it already committed) and waits for it to be
        /// gone. Returns how it exited.
        pub fn kill_hard(&mut self) -> anyhow::Result<ExitStatus> {
            // On Unix, `Child::kill` sends SIGKILL.
            self.child.kill().context("killing weft-relay")?;
            self.child
                .wait()
                .context("waiting for the killed weft-relay")
        }

        /// The relay's stderr so far (JSON log lines).
        pub fn log(&self) -> String {
            std::fs::read_to_string(&self.log).unwrap_or_default()
        }

        /// `GET /metrics` from the metrics server: the OpenMetrics text.
        pub fn metrics_text(&self) -> anyhow::Result<String> {
            let addr = self
                .metrics
                .as_deref()
                .ok_or_else(|| anyhow!("the relay runs no metrics server"))?;
            // No proxy from the environment: the server is on loopback.
            let agent = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(10)))
                .http_status_as_error(false)
                .proxy(None)
                .build()
                .new_agent();
            let mut response = agent
                .get(&format!("http://{addr}/metrics"))
                .call()
                .with_context(|| format!("GET /metrics from the metrics server at {addr}"))?;
            if response.status() != 200 {
                bail!("GET /metrics: {}", response.status());
            }
            response
                .body_mut()
                .read_to_string()
                .context("reading the /metrics body")
        }

        /// The value of the metric sample `name` (without labels, as
        /// `weft_relay_stored_envelopes`), if the relay reports it.
        pub fn metric(&self, name: &str) -> anyhow::Result<Option<f64>> {
            let text = self.metrics_text()?;
            for line in text.lines() {
                if let Some(value) = line
                    .strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(' '))
                {
                    let value = value
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .parse()
                        .with_context(|| format!("metric line {line}"))?;
                    return Ok(Some(value));
                }
            }
            Ok(None)
        }
    }

    /// Where and how [`Relay::launch`] runs the relay.
    #[derive(Debug, Default)]
    struct Launch<'a> {
        netns: Option<&'a str>,
        config: Option<&'a Path>,
    }

    impl Drop for Relay {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Three network namespaces in a star, for NAT-like tests: a hub `R` and
/// two spokes `A` and `B`, each joined to the hub by its own veth pair and
/// subnet. The hub has one more address, [`Hub::service`] (a /32 on its
/// loopback), which both spokes reach through their default route via the
/// hub; the hub forwards nothing (`ip_forward=0`), so the spokes cannot
/// reach each other. Needs root and iproute2.
pub mod netns_hub {
    use std::process::Command;
    use std::sync::atomic::{AtomicU32, Ordering};

    use anyhow::{Context, bail};

    use crate::netns::ip;

    /// Namespaces made by this process so far (names stay unique).
    static MADE: AtomicU32 = AtomicU32::new(0);

    /// Index of the hub in [`Hub::names`].
    pub const HUB: usize = 0;
    /// Index of spoke A.
    pub const A: usize = 1;
    /// Index of spoke B.
    pub const B: usize = 2;

    /// The three namespaces, deleted (with their veths) on drop.
    #[derive(Debug)]
    pub struct Hub {
        /// Namespace names: hub, A, B.
        pub names: [String; 3],
        /// The address of each namespace on its link: for the hub its
        /// address towards A; for A and B their own (no prefix length).
        pub addrs: [String; 3],
        /// The hub's address towards B.
        pub hub_b_addr: String,
        /// The hub's address both spokes reach.
        pub service: String,
        veths: Vec<String>,
    }

    impl Hub {
        /// Creates the namespaces, links, addresses and routes.
        pub fn create() -> anyhow::Result<Self> {
            let made = MADE.fetch_add(1, Ordering::Relaxed);
            let tag = format!(
                "{:x}",
                (u64::from(std::process::id()) << 8) | u64::from(made & 0xff)
            );
            let names = [
                format!("weft-r-{tag}"),
                format!("weft-a-{tag}"),
                format!("weft-b-{tag}"),
            ];
            // Hub end first, then spoke end, per pair.
            let veths = vec![
                format!("hra{tag}"),
                format!("ha{tag}"),
                format!("hrb{tag}"),
                format!("hb{tag}"),
            ];
            let hub = Hub {
                names: names.clone(),
                addrs: [
                    "10.214.1.1".into(),
                    "10.214.1.2".into(),
                    "10.214.2.2".into(),
                ],
                hub_b_addr: "10.214.2.1".into(),
                service: "10.214.0.1".into(),
                veths: veths.clone(),
            };
            for n in &names {
                ip(&["netns", "add", n])?;
                ip(&["-n", n, "link", "set", "lo", "up"])?;
            }
            let pairs = [
                (A, &veths[0], &veths[1], &hub.addrs[HUB], &hub.addrs[A]),
                (B, &veths[2], &veths[3], &hub.hub_b_addr, &hub.addrs[B]),
            ];
            for (spoke, hub_end, spoke_end, hub_addr, spoke_addr) in pairs {
                ip(&[
                    "link", "add", hub_end, "type", "veth", "peer", "name", spoke_end,
                ])?;
                ip(&["link", "set", hub_end, "netns", &names[HUB]])?;
                ip(&["link", "set", spoke_end, "netns", &names[spoke]])?;
                let (h, s) = (&names[HUB], &names[spoke]);
                ip(&[
                    "-n",
                    h,
                    "addr",
                    "add",
                    &format!("{hub_addr}/24"),
                    "dev",
                    hub_end,
                ])?;
                ip(&[
                    "-n",
                    s,
                    "addr",
                    "add",
                    &format!("{spoke_addr}/24"),
                    "dev",
                    spoke_end,
                ])?;
                ip(&["-n", h, "link", "set", hub_end, "up"])?;
                ip(&["-n", s, "link", "set", spoke_end, "up"])?;
                ip(&["-n", s, "route", "add", "default", "via", hub_addr])?;
            }
            ip(&[
                "-n",
                &names[HUB],
                "addr",
                "add",
                &format!("{}/32", hub.service),
                "dev",
                "lo",
            ])?;
            hub.sysctl(HUB, "net.ipv4.ip_forward", "0")?;
            Ok(hub)
        }

        /// [`Hub::create`], or `None` after saying why `test` skips where
        /// namespaces cannot be made; under CI (`CI` set) an error.
        pub fn create_or_skip(test: &str, what: &str) -> anyhow::Result<Option<Self>> {
            match Self::create() {
                Ok(hub) => Ok(Some(hub)),
                Err(e) if std::env::var_os("CI").is_none() => {
                    eprintln!(
                        "skipping {test}: cannot create network namespaces ({e:#}); it needs root and iproute2"
                    );
                    Ok(None)
                }
                Err(e) => Err(e.context(format!(
                    "CI must run {what}: cannot create network namespaces"
                ))),
            }
        }

        /// Sets a sysctl inside namespace `ns` only.
        pub fn sysctl(&self, ns: usize, key: &str, value: &str) -> anyhow::Result<()> {
            let path = format!("/proc/sys/{}", key.replace('.', "/"));
            let out = Command::new("ip")
                .args(["netns", "exec", &self.names[ns], "sh", "-c"])
                .arg(r#"printf '%s\n' "$2" > "$1""#)
                .args(["sh", &path, value])
                .output()
                .context("running ip netns exec sh")?;
            if !out.status.success() {
                bail!(
                    "{}: setting {key} = {value}: {}",
                    self.names[ns],
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(())
        }

        /// Whether a TCP connection from namespace `ns` to `addr:port`
        /// succeeds within 3 seconds (bash's `/dev/tcp`).
        pub fn tcp_reachable(&self, ns: usize, addr: &str, port: u16) -> anyhow::Result<bool> {
            let out = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &self.names[ns],
                    "timeout",
                    "3",
                    "bash",
                    "-c",
                ])
                .arg(r#"exec 3<>"/dev/tcp/$1/$2""#)
                .args(["bash", addr, &port.to_string()])
                .output()
                .context("running ip netns exec timeout bash")?;
            Ok(out.status.success())
        }
    }

    impl Drop for Hub {
        fn drop(&mut self) {
            for n in &self.names {
                let _ = ip(&["netns", "del", n]);
            }
            // Only there if creation failed before moving them.
            for v in &self.veths {
                let _ = Command::new("ip").args(["link", "del", v]).output();
            }
        }
    }
}

/// Reading invites as bytes (`weft1` + base32), in which their addresses
/// appear as plain strings.
pub mod invite {
    use anyhow::{Context, anyhow};
    use data_encoding::BASE32_NOPAD;

    /// The bytes of an invite (`weft1` + base32), in which its addresses
    /// appear as plain strings. Decoded as `weft_proto` decodes invites:
    /// RFC 4648 base32 without padding, any case.
    pub fn invite_bytes(invite: &str) -> anyhow::Result<Vec<u8>> {
        let compact: String = invite.chars().filter(|c| !c.is_whitespace()).collect();
        let body = compact
            .strip_prefix("weft1")
            .ok_or_else(|| anyhow!("not an invite: {invite}"))?;
        BASE32_NOPAD
            .decode(body.to_ascii_uppercase().as_bytes())
            .with_context(|| format!("invite is not base32: {invite}"))
    }

    /// Whether `haystack` contains `needle`.
    pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn invite_bytes_reads_base32_of_either_case() -> anyhow::Result<()> {
            // "foobar" in RFC 4648 base32, without padding.
            assert_eq!(invite_bytes("weft1MZXW6YTBOI")?, b"foobar");
            assert_eq!(invite_bytes("weft1mzxw6ytboi")?, b"foobar");
            assert!(invite_bytes("weft1mzxw1").is_err());
            assert!(invite_bytes("mzxw6ytboi").is_err());
            Ok(())
        }
    }
}
