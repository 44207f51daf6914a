//! Two network namespaces joined by a veth pair, so that a test can run real TCP between a
//! shipper (namespace A) and a receiver (namespace B) through a link it impairs with
//! `tc qdisc ... netem` or takes down with `ip link set down`.
//!
//! A socket belongs to the namespace of the thread that created it. The test's own threads
//! never change namespace: every socket is made on a short-lived thread that entered A or B
//! with `setns(2)` ([`in_netns`]), and is then used from anywhere.
//!
//! Invariants:
//! 1. Names are unique per process and per pair (pid and a counter), so tests running in
//!    parallel, in one process or several, never touch each other's namespaces. The
//!    addresses can be the same in every pair: each pair is a world of its own.
//! 2. A [`NetPair`] deletes both namespaces when dropped, also when the test panics;
//!    deleting a namespace destroys the veth end inside it, and its peer with it.
//! 3. A [`NsListener`] stops its accept loop from inside namespace B (the loop is woken
//!    by a connection to its own address, which only B can reach), before the pair goes.
//!
//! Where this cannot run (not root, no `ip`/`tc`, namespaces refused, no `sch_netem`),
//! [`pair_or_skip`] prints a loud `SKIP netem:` line and the test returns, unless the
//! environment asks for these tests (`TIDEMARK_REQUIRE_NETNS=1`): then it fails.

use std::fs::File;
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::Duration;

use nix::sched::{CloneFlags, setns};
use tidemark_sync::apply::{Listener, Receiver};

/// The shipper's address, in namespace A.
pub const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The receiver's address, in namespace B.
pub const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

/// What went wrong setting up or driving the namespaces.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetnsError {
    /// A tool could not be started at all.
    #[error("cannot run `{program}` (Debian package iproute2)")]
    Spawn {
        /// The program.
        program: String,
        /// Why it did not start.
        #[source]
        source: io::Error,
    },
    /// A command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr, trimmed.
        stderr: String,
    },
    /// A thread could not enter a namespace.
    #[error("cannot enter network namespace {ns} (/run/netns/{ns})")]
    Enter {
        /// The namespace.
        ns: String,
        /// The error from open(2) or setns(2).
        #[source]
        source: io::Error,
    },
    /// No thread could be started to enter a namespace.
    #[error("cannot start a thread to enter network namespace {ns}")]
    Thread {
        /// The namespace.
        ns: String,
        /// The error from the spawn.
        #[source]
        source: io::Error,
    },
    /// The receiver's listener could not be set up inside B.
    #[error("cannot listen on {addr} in network namespace {ns}")]
    Listen {
        /// The namespace.
        ns: String,
        /// The address.
        addr: SocketAddrV4,
        /// The error from bind(2) or the receiver.
        #[source]
        source: io::Error,
    },
    /// Namespaces need root here.
    #[error("not root (effective uid {uid}); network namespaces need CAP_SYS_ADMIN")]
    NotRoot {
        /// The effective uid.
        uid: u32,
    },
}

/// One end of the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The source's namespace.
    A,
    /// The target's namespace.
    B,
}

/// Runs a command and fails with its stderr if it does not succeed.
fn run(program: &str, args: &[&str]) -> Result<String, NetnsError> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| NetnsError::Spawn { program: program.to_owned(), source })?;
    if !out.status.success() {
        return Err(NetnsError::Command {
            command: format!("{program} {}", args.join(" ")),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `f` on a new thread that entered network namespace `ns`, and returns its result.
/// Sockets `f` creates live in `ns`; the calling thread stays where it is. A panic in `f`
/// is carried over to the caller.
pub fn in_netns<R, F>(ns: &str, f: F) -> Result<R, NetnsError>
where
    R: Send + 'static,
    F: FnOnce() -> R + Send + 'static,
{
    let name = ns.to_owned();
    let joined = thread::Builder::new()
        .name(format!("netns-{ns}"))
        .spawn(move || {
            let enter = || -> io::Result<()> {
                let file = File::open(format!("/run/netns/{name}"))?;
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
            };
            enter().map_err(|source| NetnsError::Enter { ns: name, source })?;
            Ok(f())
        })
        .map_err(|source| NetnsError::Thread { ns: ns.to_owned(), source })?
        .join();
    match joined {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Namespaces A and B, joined by a veth pair (`ADDR_A/24` in A, `ADDR_B/24` in B), up.
/// Deleted on drop.
#[derive(Debug)]
pub struct NetPair {
    ns_a: String,
    ns_b: String,
    dev_a: String,
    dev_b: String,
}

impl NetPair {
    /// Creates the pair. On failure, whatever was created is deleted again.
    pub fn create() -> Result<Self, NetnsError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let (pid, n) = (std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        // Interface names hold at most 15 bytes: "tm", pid (<= 7 digits), "x", n, "a" or "b".
        let pair = Self {
            ns_a: format!("tidemark-{pid}-{n}-a"),
            ns_b: format!("tidemark-{pid}-{n}-b"),
            dev_a: format!("tm{pid}x{n}a"),
            dev_b: format!("tm{pid}x{n}b"),
        };
        // From here on, dropping `pair` cleans up what exists.
        run("ip", &["netns", "add", &pair.ns_a])?;
        run("ip", &["netns", "add", &pair.ns_b])?;
        run("ip", &["link", "add", &pair.dev_a, "type", "veth", "peer", "name", &pair.dev_b])?;
        run("ip", &["link", "set", &pair.dev_a, "netns", &pair.ns_a])
            .and_then(|_| run("ip", &["link", "set", &pair.dev_b, "netns", &pair.ns_b]))
            .inspect_err(|_| {
                // An end still outside the namespaces would outlive them: delete the pair.
                let _ = run("ip", &["link", "del", &pair.dev_b])
                    .or_else(|_| run("ip", &["-n", &pair.ns_a, "link", "del", &pair.dev_a]));
            })?;
        for (ns, dev, addr) in
            [(&pair.ns_a, &pair.dev_a, ADDR_A), (&pair.ns_b, &pair.dev_b, ADDR_B)]
        {
            run("ip", &["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
            run("ip", &["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(pair)
    }

    /// The namespace of `side`.
    pub fn ns(&self, side: Side) -> &str {
        match side {
            Side::A => &self.ns_a,
            Side::B => &self.ns_b,
        }
    }

    /// The veth end in `side`.
    pub fn dev(&self, side: Side) -> &str {
        match side {
            Side::A => &self.dev_a,
            Side::B => &self.dev_b,
        }
    }

    /// Sets the root qdisc of both veth ends to `netem <spec>` (created or replaced), so
    /// both directions are impaired alike. `spec` is netem's argument list, e.g.
    /// `"loss 5% delay 20ms 10ms reorder 25% 50%"`.
    pub fn netem(&self, spec: &str) -> Result<(), NetnsError> {
        for side in [Side::A, Side::B] {
            self.netem_on(side, spec)?;
        }
        Ok(())
    }

    /// Sets the root qdisc of one veth end (the traffic leaving `side`) to `netem <spec>`.
    pub fn netem_on(&self, side: Side, spec: &str) -> Result<(), NetnsError> {
        let mut args = vec!["-n", self.ns(side), "qdisc", "replace", "dev", self.dev(side)];
        args.extend(["root", "netem"]);
        args.extend(spec.split_whitespace());
        run("tc", &args).map(drop)
    }

    /// Packets the root qdisc of `side` dropped so far (`tc -s qdisc show`), if it says.
    pub fn qdisc_drops(&self, side: Side) -> Result<Option<u64>, NetnsError> {
        let out = run("tc", &["-n", self.ns(side), "-s", "qdisc", "show", "dev", self.dev(side)])?;
        Ok(parse_drops(&out))
    }

    /// Takes A's veth end administratively down or up. Down, the peer loses its carrier
    /// too and A has no route to B: connections fail at once, open sessions stall.
    pub fn set_link(&self, up: bool) -> Result<(), NetnsError> {
        let state = if up { "up" } else { "down" };
        run("ip", &["-n", &self.ns_a, "link", "set", "dev", &self.dev_a, state]).map(drop)
    }

    /// A TCP listener on `ADDR_B` (any port) inside B, accepted by `receiver`.
    pub fn listen(&self, receiver: &Receiver) -> Result<NsListener, NetnsError> {
        let r = receiver.clone();
        let addr = SocketAddrV4::new(ADDR_B, 0);
        let listener = in_netns(&self.ns_b, move || r.listen(TcpListener::bind(addr)?))?
            .map_err(|source| NetnsError::Listen { ns: self.ns_b.clone(), addr, source })?;
        Ok(NsListener {
            listener: Some(listener),
            receiver: receiver.clone(),
            ns: self.ns_b.clone(),
        })
    }

    /// A shipper connector: each call connects to `target` from a thread inside A (with
    /// `timeout`, Nagle off).
    pub fn connector(
        &self,
        target: SocketAddr,
        timeout: Duration,
    ) -> impl FnMut() -> io::Result<TcpStream> + Send + 'static {
        let ns = self.ns_a.clone();
        move || {
            in_netns(&ns, move || {
                let stream = TcpStream::connect_timeout(&target, timeout)?;
                stream.set_nodelay(true)?;
                Ok(stream)
            })
            .map_err(io::Error::other)?
        }
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for ns in [&self.ns_a, &self.ns_b] {
            // A namespace that was never created is fine; anything else is left behind and
            // said so (a leftover is harmless to other runs: names are unique).
            if let Err(e) = run("ip", &["netns", "del", ns]) {
                if !e.to_string().contains("No such file") {
                    eprintln!("netns cleanup: {e}");
                }
            }
        }
    }
}

/// `dropped N` from `tc -s qdisc show` output (the first qdisc listed).
pub fn parse_drops(tc_output: &str) -> Option<u64> {
    let at = tc_output.find("dropped ")? + "dropped ".len();
    let digits: String = tc_output[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// A receiver's listener inside namespace B. Stopping it (or dropping it) shuts the
/// receiver's session down and stops the accept loop from inside B.
#[derive(Debug)]
pub struct NsListener {
    listener: Option<Listener>,
    receiver: Receiver,
    ns: String,
}

impl NsListener {
    /// The address sources connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.as_ref().expect("listening").local_addr()
    }

    /// Shuts the receiver's session down and stops accepting; returns once every session
    /// thread ended.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        let Some(listener) = self.listener.take() else { return };
        self.receiver.shutdown();
        // The listener travels through a channel so that, if the thread cannot enter B, it
        // is not dropped there (its drop would wait for a wake-up that cannot arrive).
        let (tx, rx) = std::sync::mpsc::channel();
        tx.send(listener).expect("the receiving end is here");
        let stopped = in_netns(&self.ns, move || {
            if let Ok(l) = rx.try_recv() {
                l.stop();
            }
        });
        if let Err(e) = stopped {
            // Leave the accept thread blocked instead (the test failed anyway).
            eprintln!("cannot stop the listener inside {}: {e}", self.ns);
            std::mem::forget(tx);
        }
    }
}

impl Drop for NsListener {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// True when the environment demands these tests run (`TIDEMARK_REQUIRE_NETNS`).
pub fn required() -> bool {
    let on =
        |var: &str| std::env::var(var).is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"));
    // Not `CI`: the CI machines' kernel has namespaces but no `sch_netem`, so there the
    // netem tests skip loudly; a machine that must run them sets this variable.
    on("TIDEMARK_REQUIRE_NETNS")
}

/// Why this machine cannot run the namespace tests, if it cannot; `Ok` with the pair
/// otherwise. With `netem`, the pair's link also accepted a netem qdisc.
pub fn try_pair(netem: bool) -> Result<NetPair, String> {
    let uid = std::fs::metadata("/proc/self").map_err(|e| format!("/proc/self: {e}"))?.uid();
    if uid != 0 {
        return Err(NetnsError::NotRoot { uid }.to_string());
    }
    for tool in ["ip", "tc"] {
        run(tool, &["-V"]).map_err(|e| error_chain(&e))?;
    }
    let pair = NetPair::create().map_err(|e| error_chain(&e))?;
    if netem {
        pair.netem_on(Side::A, "delay 1ms").map_err(|e| {
            format!(
                "sch_netem is not available (kernel needs CONFIG_NET_SCH_NETEM or the sch_netem \
                 module): {}",
                error_chain(&e)
            )
        })?;
    }
    Ok(pair)
}

/// [`try_pair`], or a loud `SKIP netem:` line and `None` where it cannot run; a panic
/// instead of the skip when [`required`].
pub fn pair_or_skip(test: &str, netem: bool) -> Option<NetPair> {
    match try_pair(netem) {
        Ok(pair) => Some(pair),
        Err(reason) if required() => {
            panic!("{test}: namespaces required (TIDEMARK_REQUIRE_NETNS) but: {reason}")
        }
        Err(reason) => {
            // Straight to the stream: the test harness captures `eprintln!` of passing tests.
            let _ = writeln!(io::stderr(), "SKIP netem: {test}: {reason}");
            None
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    tidemark_sync::ship::error_chain(e)
}
