//! A private network namespace per test, for real partitions: [`Netns::create`] makes a namespace joined to this
//! one by a veth pair on its own /30 of 10.200.0.0/16 (private, and only on the two ends this test created), so a
//! process run inside it ([`Netns::command`]) reaches servers of this namespace through [`Netns::host_ip`], over
//! a link the test can [`cut`](Netns::cut) (packets silently dropped both ways, as in a real partition: no reset,
//! no error) and [`heal`](Netns::heal). Dropping the [`Netns`] deletes the namespace and with it the veth pair;
//! a watchdog does the same if the test process dies without running destructors.
//!
//! Creating a namespace needs root and `ip` (iproute2). Where either is missing, [`Netns::create`] returns
//! [`NetnsError::Unavailable`] saying why, so the test can report that it skipped rather than pass silently.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::guard::{Watchdog, euid, run};

/// Why a namespace could not be made.
#[derive(Debug)]
pub enum NetnsError {
    /// This machine or user cannot create namespaces (not root, no `ip`): skip the test and say why.
    Unavailable(String),
    /// It should have worked and did not: fail the test.
    Failed(anyhow::Error),
}

impl std::fmt::Display for NetnsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unavailable(why) => write!(f, "network namespaces unavailable: {why}"),
            Self::Failed(e) => write!(f, "cannot set up a network namespace: {e:#}"),
        }
    }
}

impl std::error::Error for NetnsError {}

/// Namespaces made by this process so far, so two in one test binary get different names and subnets.
static MADE: AtomicU32 = AtomicU32::new(0);

/// A network namespace with a veth link to this one, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// The veth end in this (the test's) namespace; the one inside is `peer`.
    host_if: String,
    peer_if: String,
    host_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
    watchdog: Option<Watchdog>,
}

impl Netns {
    /// Whether namespaces can be made here; the reason when they cannot.
    pub fn check_available() -> Result<(), String> {
        if euid() != Some(0) {
            return Err("creating network namespaces needs root".into());
        }
        match Command::new("ip").arg("-V").output() {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(format!("`ip -V` failed with {}", o.status)),
            Err(e) => Err(format!("cannot run `ip` (iproute2): {e}")),
        }
    }

    /// A new namespace `ferry-<pid>-<n>`, its veth pair up and addressed (.1 here, .2 inside, on one /30 of
    /// 10.200.0.0/16 picked from the pid and a counter, skipping any already on this machine's interfaces), and
    /// loopback up inside.
    pub fn create() -> Result<Self, NetnsError> {
        Self::check_available().map_err(NetnsError::Unavailable)?;
        let n = MADE.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name = format!("ferry-{pid}-{n}");
        // Interface names are at most 15 bytes.
        let tag = format!("{:x}", (pid.wrapping_mul(64).wrapping_add(n)) & 0xff_ffff);
        let (host_if, peer_if) = (format!("fyh{tag}"), format!("fyn{tag}"));
        let (host_ip, ns_ip) = free_subnet(pid, n).map_err(NetnsError::Failed)?;
        run(Command::new("ip").args(["netns", "add", &name]))
            .map_err(|e| NetnsError::Unavailable(format!("`ip netns add` refused: {e:#}")))?;
        // From here on, Drop (or the watchdog, if this process dies) deletes the namespace.
        let mut ns = Self {
            watchdog: Some(Watchdog::spawn(
                "ip netns del \"$1\" 2>/dev/null; ip link del \"$2\" 2>/dev/null",
                &[&name, &host_if],
            )),
            name,
            host_if,
            peer_if,
            host_ip,
            ns_ip,
        };
        ns.wire().map_err(NetnsError::Failed)?;
        Ok(ns)
    }

    fn wire(&mut self) -> anyhow::Result<()> {
        let (name, h, p) = (&self.name, &self.host_if, &self.peer_if);
        let host_cidr = format!("{}/30", self.host_ip);
        let ns_cidr = format!("{}/30", self.ns_ip);
        run(Command::new("ip").args([
            "link", "add", h, "type", "veth", "peer", "name", p, "netns", name,
        ]))?;
        run(Command::new("ip").args(["addr", "add", &host_cidr, "dev", h]))?;
        run(Command::new("ip").args(["link", "set", h, "up"]))?;
        let inside = |args: &[&str]| {
            run(Command::new("ip")
                .args(["netns", "exec", name, "ip"])
                .args(args))
        };
        inside(&["addr", "add", &ns_cidr, "dev", p])?;
        inside(&["link", "set", p, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(())
    }

    /// The namespace's name (`ip netns exec NAME …`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This namespace's end of the link: where a process inside reaches servers of the test's namespace (bind
    /// them to this address, or to all).
    pub fn host_ip(&self) -> Ipv4Addr {
        self.host_ip
    }

    /// The address inside the namespace.
    pub fn ns_ip(&self) -> Ipv4Addr {
        self.ns_ip
    }

    /// `program` to be run inside the namespace (`ip netns exec NAME program`); add its arguments, environment
    /// and stdio as usual. Killing the returned child kills `program` itself (`ip netns exec` execs it).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Partition: take this end of the link down. Packets either way are dropped without a word (the end inside
    /// keeps its address and routes, so its connections see only silence, as across a real partition).
    pub fn cut(&self) -> anyhow::Result<()> {
        run(Command::new("ip").args(["link", "set", &self.host_if, "down"]))?;
        Ok(())
    }

    /// End the partition: the link comes back up with its address, and connections kept open resume.
    pub fn heal(&self) -> anyhow::Result<()> {
        // The address stays on a link that is down (only its route goes), so up is all it takes.
        run(Command::new("ip").args(["link", "set", &self.host_if, "up"]))?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys the end inside, and a veth pair goes with either end.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        if let Some(mut w) = self.watchdog.take() {
            w.disarm();
        }
    }
}

/// A /30 of 10.200.0.0/16 no interface of this machine uses, starting from one picked by `pid` and `n`: its .1
/// and .2.
fn free_subnet(pid: u32, n: u32) -> anyhow::Result<(Ipv4Addr, Ipv4Addr)> {
    let used = run(Command::new("ip").args(["-o", "-4", "addr", "show"]))?;
    let used = String::from_utf8_lossy(&used.stdout).into_owned();
    let start = pid.wrapping_mul(7).wrapping_add(n.wrapping_mul(131)) % 16_384;
    for k in 0..16_384u32 {
        let i = (start + k) % 16_384;
        let (a, b) = ((i / 64) as u8, ((i % 64) * 4) as u8);
        let host = Ipv4Addr::new(10, 200, a, b + 1);
        let inside = Ipv4Addr::new(10, 200, a, b + 2);
        if !used.contains(&format!("inet {host}/")) && !used.contains(&format!("inet {inside}/")) {
            return Ok((host, inside));
        }
    }
    anyhow::bail!("every /30 of 10.200.0.0/16 is in use")
}
