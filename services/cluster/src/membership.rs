//! Membership: what this node believes of its peer, from two independent heartbeats — the
//! interconnect (the cluster services' own TCP link, a separate network from the hosts') and
//! the drives (each node's datapath writes its heartbeat slot on the drives; each reads the
//! peer's). A pure model: no clock, no I/O; the service feeds it observations with the time
//! (milliseconds of a monotonic clock) and acts on the transitions it returns.
//!
//! The rule (design section 7, "by construction, not by luck"):
//!
//! | interconnect | drives      | the peer is             | this node does                        |
//! |--------------|-------------|-------------------------|---------------------------------------|
//! | beats        | any         | [`PeerState::Alive`]    | normal service                        |
//! | silent       | beats       | [`PeerState::LinkDown`] | no takeover; config changes refused; alert |
//! | silent       | silent      | [`PeerState::Dead`]     | fence the peer, then take over        |
//! | never heard  | never heard | [`PeerState::Unknown`]  | nothing (a node never takes over a peer it never saw) |
//!
//! "Silent" means silent for the dead time: one late beat is not a death. The peer is dead only
//! when *both* have been silent for the dead time, so an interconnect cut alone never starts a
//! takeover, and a peer frozen (SIGSTOP) or hung stops both and is fenced. A peer heard with a
//! new boot number rebooted: its old key must be gone (it was fenced) before it may join again,
//! which the join handshake checks, not this model.
//!
//! A restarting cluster service must not look like a dead node: the interconnect goes silent
//! while the peer's cluster service restarts, but its datapath keeps writing the disk heartbeat,
//! so the peer is only [`PeerState::LinkDown`] for that time.

/// What this node believes of its peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerState {
    /// Never heard of on either heartbeat.
    Unknown,
    /// The interconnect beats.
    Alive,
    /// The interconnect has been silent for the dead time, but the peer's disk heartbeat goes
    /// on: it is alive and serving; the link (or its cluster service) is down.
    LinkDown,
    /// Both heartbeats have been silent for the dead time.
    Dead,
}

impl PeerState {
    /// A name for logs and `duplexctl cluster status`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Alive => "alive",
            Self::LinkDown => "interconnect-down",
            Self::Dead => "dead",
        }
    }
}

/// The last time a heartbeat was heard, and from which boot of the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Heard {
    /// When (ms); `None`: never.
    pub at: Option<u64>,
    /// The peer's boot number in it (the interconnect says; the disk slot too).
    pub boot: u64,
    /// The peer's counter (beat sequence number; disk slot counter).
    pub counter: u64,
}

/// One change of the peer's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// Before.
    pub from: PeerState,
    /// After.
    pub to: PeerState,
    /// The peer's boot then (the key to fence, with its node id).
    pub boot: u64,
}

/// The membership model of one node.
#[derive(Clone, Debug)]
pub struct Membership {
    dead_ms: u64,
    /// Whether the peer's disk heartbeat is read at all. Without it, a silent interconnect
    /// cannot tell death from a cut link, so the peer is never declared dead.
    disk_heartbeat: bool,
    state: PeerState,
    link: Heard,
    disk: Heard,
}

impl Membership {
    /// A model declaring the peer's heartbeats silent after `dead_ms` without news.
    pub fn new(dead_ms: u64) -> Self {
        Self {
            dead_ms: dead_ms.max(1),
            disk_heartbeat: true,
            state: PeerState::Unknown,
            link: Heard::default(),
            disk: Heard::default(),
        }
    }

    /// A model for a node that reads no disk heartbeat: a silent interconnect makes the peer
    /// [`PeerState::LinkDown`], never [`PeerState::Dead`] (no takeover without the second
    /// witness).
    pub fn without_disk_heartbeat(mut self) -> Self {
        self.disk_heartbeat = false;
        self
    }

    /// The state now (as of the last call).
    pub fn state(&self) -> PeerState {
        self.state
    }

    /// The interconnect's last beat.
    pub fn link(&self) -> Heard {
        self.link
    }

    /// The disk heartbeat's last change.
    pub fn disk(&self) -> Heard {
        self.disk
    }

    /// The peer's boot number as last heard (0: never).
    pub fn peer_boot(&self) -> u64 {
        match (self.link.at, self.disk.at) {
            (Some(l), Some(d)) if d > l => self.disk.boot,
            (Some(_), _) => self.link.boot,
            (None, Some(_)) => self.disk.boot,
            (None, None) => 0,
        }
    }

    /// A beat arrived over the interconnect at `now`: sequence `seq` of boot `boot`.
    pub fn link_beat(&mut self, now: u64, boot: u64, seq: u64) -> Option<Transition> {
        self.link = Heard {
            at: Some(now),
            boot,
            counter: seq,
        };
        self.settle(now)
    }

    /// The peer's disk heartbeat slot was read at `now`: counter `counter`, boot `boot`. Only a
    /// change counts as a beat (a dead node's slot keeps its last value).
    pub fn disk_read(&mut self, now: u64, boot: u64, counter: u64) -> Option<Transition> {
        let changed =
            self.disk.at.is_none() || self.disk.boot != boot || self.disk.counter != counter;
        if changed && counter != 0 {
            self.disk = Heard {
                at: Some(now),
                boot,
                counter,
            };
        }
        self.settle(now)
    }

    /// Time passed: re-evaluates the state at `now`.
    pub fn tick(&mut self, now: u64) -> Option<Transition> {
        self.settle(now)
    }

    fn fresh(&self, h: Heard, now: u64) -> bool {
        h.at.is_some_and(|at| now.saturating_sub(at) < self.dead_ms)
    }

    fn settle(&mut self, now: u64) -> Option<Transition> {
        let link = self.fresh(self.link, now);
        let disk = self.fresh(self.disk, now);
        let heard = self.link.at.is_some() || self.disk.at.is_some();
        let to = match (link, disk) {
            (true, _) => PeerState::Alive,
            (false, true) => PeerState::LinkDown,
            (false, false) if heard && !self.disk_heartbeat => PeerState::LinkDown,
            (false, false) if heard => PeerState::Dead,
            (false, false) => PeerState::Unknown,
        };
        if to == self.state {
            return None;
        }
        let t = Transition {
            from: self.state,
            to,
            boot: self.peer_boot(),
        };
        self.state = to;
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEAD: u64 = 1000;

    fn to(t: Option<Transition>) -> Option<PeerState> {
        t.map(|t| t.to)
    }

    #[test]
    fn a_peer_never_heard_is_never_dead() {
        let mut m = Membership::new(DEAD);
        assert_eq!(to(m.tick(0)), None);
        assert_eq!(to(m.tick(1_000_000)), None);
        assert_eq!(m.state(), PeerState::Unknown);
    }

    #[test]
    fn the_interconnect_alone_going_silent_is_not_a_death() {
        let mut m = Membership::new(DEAD);
        assert_eq!(to(m.link_beat(0, 7, 1)), Some(PeerState::Alive));
        assert_eq!(to(m.disk_read(0, 7, 1)), None);
        // The link stops; the disk heartbeat goes on.
        for t in (100..5000).step_by(100) {
            let tr = m.disk_read(t, 7, t);
            if t < DEAD {
                assert_eq!(tr, None, "at {t}");
            } else if t == DEAD {
                assert_eq!(to(tr), Some(PeerState::LinkDown));
            } else {
                assert_eq!(tr, None, "at {t}");
            }
        }
        assert_eq!(m.state(), PeerState::LinkDown);
        // The link comes back.
        assert_eq!(to(m.link_beat(5000, 7, 2)), Some(PeerState::Alive));
    }

    #[test]
    fn both_silent_for_the_dead_time_is_a_death_and_names_the_boot_to_fence() {
        let mut m = Membership::new(DEAD);
        m.link_beat(0, 7, 1);
        m.disk_read(0, 7, 1);
        // A slot that keeps its value is silence.
        for t in (100..DEAD).step_by(100) {
            assert_eq!(m.disk_read(t, 7, 1), None, "at {t}");
        }
        let t = m.disk_read(DEAD, 7, 1).expect("a transition");
        assert_eq!(
            (t.from, t.to, t.boot),
            (PeerState::Alive, PeerState::Dead, 7)
        );
        // One late beat just under the dead time is not a death.
        let mut m = Membership::new(DEAD);
        m.link_beat(0, 7, 1);
        m.disk_read(0, 7, 1);
        assert_eq!(m.tick(DEAD - 1), None);
        assert_eq!(to(m.link_beat(DEAD - 1, 7, 2)), None);
        assert_eq!(m.tick(2 * DEAD - 2), None);
        assert_eq!(to(m.tick(2 * DEAD - 1)), Some(PeerState::Dead));
    }

    #[test]
    fn a_disk_heartbeat_alone_keeps_a_peer_alive_that_the_link_never_reached() {
        let mut m = Membership::new(DEAD);
        assert_eq!(to(m.disk_read(0, 9, 5)), Some(PeerState::LinkDown));
        assert_eq!(to(m.disk_read(DEAD - 1, 9, 6)), None);
        assert_eq!(to(m.tick(2 * DEAD - 1)), Some(PeerState::Dead));
        // A counter of 0 is an empty slot, not a beat.
        let mut m = Membership::new(DEAD);
        assert_eq!(m.disk_read(0, 0, 0), None);
        assert_eq!(m.state(), PeerState::Unknown);
    }

    #[test]
    fn without_the_disk_heartbeat_a_silent_link_is_never_a_death() {
        let mut m = Membership::new(DEAD).without_disk_heartbeat();
        m.link_beat(0, 7, 1);
        assert_eq!(to(m.tick(DEAD)), Some(PeerState::LinkDown));
        assert_eq!(m.tick(100 * DEAD), None);
        assert_eq!(to(m.link_beat(100 * DEAD, 7, 2)), Some(PeerState::Alive));
    }

    #[test]
    fn a_rebooted_peer_is_heard_with_its_new_boot() {
        let mut m = Membership::new(DEAD);
        m.link_beat(0, 7, 1);
        assert_eq!(to(m.tick(DEAD)), Some(PeerState::Dead));
        let t = m.link_beat(DEAD + 5000, 8, 1).expect("back");
        assert_eq!((t.to, t.boot), (PeerState::Alive, 8));
        assert_eq!(m.peer_boot(), 8);
    }
}
