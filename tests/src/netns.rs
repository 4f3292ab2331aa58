//! Network namespaces for the two-controller tests: every endpoint in a namespace the test
//! created, none in the machine's own (a cable pulled there would send the traffic out of the
//! machine's default route).
//!
//! [`Net::new`] makes three namespaces — the host `h`, controller `a`, controller `b` — and
//! three cables (veth pairs), each end made directly inside its namespace:
//!
//! | cable | ends | addresses |
//! |---|---|---|
//! | host–a | `h:toa` – `a:host` | 10.0.1.1 – 10.0.1.2 |
//! | host–b | `h:tob` – `b:host` | 10.0.2.1 – 10.0.2.2 |
//! | interconnect | `a:ic` – `b:ic` | 10.0.3.1 – 10.0.3.2 |
//!
//! A cable is pulled with `ip link set down` on both ends ([`Net::pull`]) and plugged back
//! ([`Net::plug`]). Dropping the [`Net`] deletes the namespaces (and with them the cables);
//! the processes in them are the test's to end first (they are, by their `KillOnDrop`s).
//! Requires root (the suite runs as root; see README).

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A cable between two namespaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cable {
    /// The host to controller a.
    HostA,
    /// The host to controller b.
    HostB,
    /// The interconnect between the controllers.
    Interconnect,
}

/// Addresses inside the namespaces.
pub mod addr {
    /// Controller a on the host network.
    pub const A_HOST: &str = "10.0.1.2";
    /// Controller b on the host network.
    pub const B_HOST: &str = "10.0.2.2";
    /// Controller a on the interconnect.
    pub const A_PEER: &str = "10.0.3.1";
    /// Controller b on the interconnect.
    pub const B_PEER: &str = "10.0.3.2";
}

/// Three namespaces and their cables. See the module docs.
#[derive(Debug)]
pub struct Net {
    /// The host's namespace.
    pub h: String,
    /// Controller a's.
    pub a: String,
    /// Controller b's.
    pub b: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Net {
    /// Creates the namespaces and cables (names unique to this process and call).
    pub fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "dx{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let net = Self {
            h: format!("{id}-h"),
            a: format!("{id}-a"),
            b: format!("{id}-b"),
        };
        for ns in [&net.h, &net.a, &net.b] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let cable = |x: &str, xdev: &str, xaddr: &str, y: &str, ydev: &str, yaddr: &str| {
            ip(&[
                "link", "add", "dev", xdev, "netns", x, "type", "veth", "peer", "name", ydev,
                "netns", y,
            ]);
            ip(&["-n", x, "addr", "add", &format!("{xaddr}/24"), "dev", xdev]);
            ip(&["-n", y, "addr", "add", &format!("{yaddr}/24"), "dev", ydev]);
            ip(&["-n", x, "link", "set", xdev, "up"]);
            ip(&["-n", y, "link", "set", ydev, "up"]);
        };
        cable(&net.h, "toa", "10.0.1.1", &net.a, "host", addr::A_HOST);
        cable(&net.h, "tob", "10.0.2.1", &net.b, "host", addr::B_HOST);
        cable(&net.a, "ic", addr::A_PEER, &net.b, "ic", addr::B_PEER);
        net
    }

    fn ends(&self, c: Cable) -> [(&str, &str); 2] {
        match c {
            Cable::HostA => [(&self.h, "toa"), (&self.a, "host")],
            Cable::HostB => [(&self.h, "tob"), (&self.b, "host")],
            Cable::Interconnect => [(&self.a, "ic"), (&self.b, "ic")],
        }
    }

    /// Pulls cable `c` (both ends down).
    pub fn pull(&self, c: Cable) {
        for (ns, dev) in self.ends(c) {
            ip(&["-n", ns, "link", "set", dev, "down"]);
        }
    }

    /// Plugs cable `c` back in.
    pub fn plug(&self, c: Cable) {
        for (ns, dev) in self.ends(c) {
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
    }

    /// `ip netns exec NS` as a command prefix.
    pub fn exec(ns: &str) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), ns.into()]
    }
}

impl Default for Net {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.h, &self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Runs `f` on a thread that has entered network namespace `ns` (a thread's sockets live in
/// its namespace): the test's own code as a host in the host namespace.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(move || {
            let file = std::fs::File::open(&path).expect("the namespace exists");
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("the namespace thread")
    })
}
