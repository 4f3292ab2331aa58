//! Subsystems and their namespaces and allowed hosts, and the ports that serve them: what
//! hosts connect to, apart from who is connected (the controllers, [`crate::target`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use duplex_ipc::exports::{ExportNamespace, ExportSubsystem, MAX_NSID};
use duplex_ipc::topology::{ListenerKind, SubsystemSpec, Topology};
use duplex_nvme::spec::DISCOVERY_NQN;

use crate::cells::Locked;

/// A namespace as the fabric serves it (a copy: commands keep the one they started with).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Namespace {
    /// Namespace id.
    pub nsid: u32,
    /// The datapath volume serving it (`IoDesc.volume`).
    pub volume: u32,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Size in logical blocks.
    pub blocks: u64,
    /// NGUID.
    pub nguid: [u8; 16],
    /// UUID.
    pub uuid: [u8; 16],
    /// ANA group.
    pub ana_group: u32,
}

impl Namespace {
    pub(crate) fn from_export(n: &ExportNamespace) -> Self {
        Self {
            nsid: n.nsid,
            volume: n.volume,
            block_size: n.block_size,
            blocks: n.blocks,
            nguid: n.nguid,
            uuid: n.uuid,
            ana_group: n.ana_group,
        }
    }
}

/// Who may connect to a subsystem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Access {
    allow_any_host: bool,
    hosts: HashSet<String>,
    /// The sealed keys of the hosts that have any (DH-HMAC-CHAP secrets, TLS PSK).
    secrets: std::collections::HashMap<String, Vec<u8>>,
}

/// An NVM subsystem, or the discovery subsystem.
#[derive(Debug)]
pub struct Subsystem {
    /// NQN.
    pub nqn: String,
    /// Serial number.
    pub serial: String,
    /// Model number.
    pub model: String,
    /// The discovery subsystem.
    pub discovery: bool,
    /// From the export table: its hosts and namespaces change at run time.
    pub exported: bool,
    access: Locked<Access>,
    /// Namespaces by id (ascending); replaced whole when the export table changes them.
    namespaces: Locked<Arc<[Namespace]>>,
}

impl Subsystem {
    /// Whether `hostnqn` may connect.
    pub fn allows(&self, hostnqn: &str) -> bool {
        let a = self.access.lock();
        a.allow_any_host || a.hosts.contains(hostnqn)
    }

    /// Every host's sealed keys (DH-HMAC-CHAP secrets, TLS PSK).
    pub fn all_sealed_secrets(&self) -> Vec<(String, Vec<u8>)> {
        let a = self.access.lock();
        a.secrets
            .iter()
            .map(|(h, s)| (h.clone(), s.clone()))
            .collect()
    }

    /// The sealed keys of `hostnqn` (DH-HMAC-CHAP secrets, TLS PSK), when it has any.
    pub fn sealed_secrets(&self, hostnqn: &str) -> Option<Vec<u8>> {
        self.access.lock().secrets.get(hostnqn).cloned()
    }

    /// The namespace `nsid`, if it is active now.
    pub fn namespace(&self, nsid: u32) -> Option<Namespace> {
        let namespaces = self.namespaces.lock();
        namespaces
            .binary_search_by_key(&nsid, |n| n.nsid)
            .ok()
            .and_then(|i| namespaces.get(i).copied())
    }

    /// The active namespaces now, ascending by id.
    pub fn namespaces(&self) -> Arc<[Namespace]> {
        Arc::clone(&self.namespaces.lock())
    }

    /// The largest namespace id this subsystem may ever report (Identify Controller NN): the
    /// highest one for a static subsystem, [`MAX_NSID`] for an exported one (namespaces come
    /// and go).
    pub fn max_nsid(&self) -> u32 {
        if self.exported {
            MAX_NSID
        } else {
            self.namespaces
                .lock()
                .iter()
                .map(|n| n.nsid)
                .max()
                .unwrap_or(0)
        }
    }

    /// Replaces who may connect; whether that changed anything.
    pub(crate) fn set_access(&self, access: Access) -> bool {
        let mut now = self.access.lock();
        let changed = *now != access;
        if changed {
            *now = access;
        }
        changed
    }

    /// Replaces the namespaces; the ids added, removed or changed (ascending).
    pub(crate) fn replace_namespaces(&self, mut namespaces: Vec<Namespace>) -> Vec<u32> {
        namespaces.sort_by_key(|n| n.nsid);
        let changed = changed_nsids(&self.namespaces(), &namespaces);
        if !changed.is_empty() {
            *self.namespaces.lock() = namespaces.into();
        }
        changed
    }

    /// The discovery subsystem: any host, no namespaces.
    pub(crate) fn discovery(serial: String) -> Self {
        let mut s = Self::new(
            DISCOVERY_NQN.to_owned(),
            serial,
            "duplex discovery".to_owned(),
            Access {
                allow_any_host: true,
                hosts: HashSet::new(),
                secrets: std::collections::HashMap::new(),
            },
            Vec::new(),
            false,
        );
        s.discovery = true;
        s
    }

    pub(crate) fn new(
        nqn: String,
        serial: String,
        model: String,
        access: Access,
        mut namespaces: Vec<Namespace>,
        exported: bool,
    ) -> Self {
        namespaces.sort_by_key(|n| n.nsid);
        Self {
            nqn,
            serial,
            model,
            discovery: false,
            exported,
            access: Locked::new(access),
            namespaces: Locked::new(namespaces.into()),
        }
    }

    pub(crate) fn from_spec(s: &SubsystemSpec, topo: &Topology) -> Self {
        let namespaces = s
            .namespaces
            .iter()
            .filter_map(|n| {
                let v = topo.volume(n.volume)?;
                Some(Namespace {
                    nsid: n.nsid,
                    volume: v.id,
                    block_size: v.block_size,
                    blocks: v.blocks,
                    nguid: n.nguid,
                    uuid: n.uuid,
                    ana_group: topo.ana_group,
                })
            })
            .collect();
        let access = Access {
            allow_any_host: s.allow_any_host,
            hosts: s.hosts.iter().cloned().collect(),
            secrets: std::collections::HashMap::new(),
        };
        Self::new(
            s.nqn.clone(),
            s.serial.clone(),
            s.model.clone(),
            access,
            namespaces,
            false,
        )
    }

    pub(crate) fn from_export(e: &ExportSubsystem) -> Self {
        Self::new(
            e.nqn.clone(),
            e.serial.clone(),
            e.model.clone(),
            export_access(e),
            e.namespaces.iter().map(Namespace::from_export).collect(),
            true,
        )
    }
}

pub(crate) fn export_access(e: &ExportSubsystem) -> Access {
    Access {
        allow_any_host: e.allow_any_host,
        hosts: e.hosts.iter().cloned().collect(),
        secrets: e
            .secrets
            .iter()
            .map(|x| (x.host.clone(), x.sealed.clone()))
            .collect(),
    }
}

/// The namespace ids that differ between two sorted lists: added, removed, or with any
/// attribute changed.
fn changed_nsids(old: &[Namespace], new: &[Namespace]) -> Vec<u32> {
    let old_by_id: HashMap<u32, &Namespace> = old.iter().map(|n| (n.nsid, n)).collect();
    let new_ids: HashSet<u32> = new.iter().map(|n| n.nsid).collect();
    let mut out: Vec<u32> = new
        .iter()
        .filter(|n| old_by_id.get(&n.nsid) != Some(n))
        .map(|n| n.nsid)
        .chain(
            old.iter()
                .map(|n| n.nsid)
                .filter(|id| !new_ids.contains(id)),
        )
        .collect();
    out.sort_unstable();
    out
}

/// A listening port as the discovery log reports it.
#[derive(Clone, Debug)]
pub struct Port {
    /// Port id (1-based, in listener order).
    pub id: u16,
    /// IP address.
    pub addr: std::net::SocketAddr,
    /// What it serves.
    pub kind: ListenerKind,
    /// Hosts must connect over TLS (the connection opens with a TLS 1.3 PSK handshake).
    pub tls: bool,
}
