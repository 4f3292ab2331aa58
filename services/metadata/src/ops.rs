//! The configuration changes operators ask for, as pure functions: each takes a pool's
//! configuration and returns the changed one, or a one-line error that says what is wrong
//! (the store then commits the result; a refused change writes nothing).
//!
//! Volumes are thick: `create_volume` allocates the whole size at once, first fit over the
//! pool's free space in 1 MiB units (a volume may span several free ranges: one extent each);
//! `resize_volume` only grows (appending extents), since shrinking under a host that may use
//! the blocks loses data.
//!
//! Subsystems are cluster-wide and copied into every pool; namespaces live in the pool of
//! their volume. Checks that span pools (a name or NSID used in another pool) take what the
//! other pools hold as arguments.

use duplex_ondisk::records::{MAX_NQN_LEN, MAX_NSID};
use duplex_ondisk::{Extent, Namespace, PoolConfig, Subsystem, Uuid, Volume};

/// Allocation unit of volume extents on the pool.
pub const ALLOC_UNIT: u64 = 1 << 20;

/// Why a change is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// An argument is not valid.
    #[error("{0}")]
    InvalidArgument(String),
    /// What it names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// What it creates exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// It is in use.
    #[error("{0}")]
    InUse(String),
    /// Not enough free space.
    #[error("{0}")]
    NoSpace(String),
}

/// Checks an NQN's syntax (NVMe base specification 4.7: `nqn.yyyy-mm.reverse-domain:...`, or
/// the UUID form), at most 223 bytes.
pub fn check_nqn(what: &str, nqn: &str) -> Result<(), OpError> {
    let bad = |why: &str| Err(OpError::InvalidArgument(format!("{what} {nqn:?}: {why}")));
    if nqn.len() > MAX_NQN_LEN {
        return bad("longer than 223 bytes");
    }
    let Some(rest) = nqn.strip_prefix("nqn.") else {
        return bad("does not start with \"nqn.\"");
    };
    if nqn.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return bad("contains spaces or control characters");
    }
    if let Some(uuid) = rest.strip_prefix("2014-08.org.nvmexpress:uuid:") {
        if uuid.len() == 36 {
            return Ok(());
        }
        return bad("malformed UUID form");
    }
    let date_ok = rest.len() > 8
        && rest.as_bytes()[..4].iter().all(u8::is_ascii_digit)
        && rest.as_bytes()[4] == b'-'
        && rest.as_bytes()[5..7].iter().all(u8::is_ascii_digit)
        && rest.as_bytes()[7] == b'.';
    if !date_ok {
        return bad("expected nqn.yyyy-mm.<reverse domain>");
    }
    Ok(())
}

/// Checks a pool or volume name: 1..=64 bytes of letters, digits, `-`, `_`, `.`.
pub fn check_name(what: &str, name: &str) -> Result<(), OpError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(OpError::InvalidArgument(format!(
            "{what} name {name:?}: 1 to 64 letters, digits, '-', '_' or '.'"
        )));
    }
    Ok(())
}

/// Bytes the pool offers for volumes.
pub fn capacity(cfg: &PoolConfig) -> u64 {
    cfg.capacity_bytes().unwrap_or(0) / ALLOC_UNIT * ALLOC_UNIT
}

/// Byte ranges `[start, end)` of the pool used by volumes, sorted.
fn used(cfg: &PoolConfig) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = cfg
        .volumes
        .iter()
        .flat_map(|v| {
            let bs = u64::from(v.block_size);
            v.extents.iter().map(move |e| {
                let start = e.pool_block * bs;
                // Round the end up to the allocation unit: the tail of an extent's last unit
                // is not handed to another volume.
                let end = (start + e.blocks * bs).div_ceil(ALLOC_UNIT) * ALLOC_UNIT;
                (start, end)
            })
        })
        .collect();
    out.sort_unstable();
    out
}

/// Free byte ranges of the pool, sorted, in whole allocation units.
fn free_ranges(cfg: &PoolConfig) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = 0;
    for (s, e) in used(cfg) {
        if s > at {
            out.push((at, s));
        }
        at = at.max(e);
    }
    let cap = capacity(cfg);
    if cap > at {
        out.push((at, cap));
    }
    out
}

/// Free bytes of the pool.
pub fn free_bytes(cfg: &PoolConfig) -> u64 {
    free_ranges(cfg).iter().map(|(s, e)| e - s).sum()
}

/// Allocates `bytes` (whole blocks of `bs`) first fit; returns extents starting at volume
/// block `first_block`.
fn allocate(
    cfg: &PoolConfig,
    bytes: u64,
    bs: u32,
    first_block: u64,
) -> Result<Vec<Extent>, OpError> {
    let free = free_bytes(cfg);
    let units = bytes.div_ceil(ALLOC_UNIT) * ALLOC_UNIT;
    if units > free {
        return Err(OpError::NoSpace(format!(
            "pool {} has {} free, {} needed",
            cfg.pool.name,
            human(free),
            human(units)
        )));
    }
    let bs = u64::from(bs);
    let mut left = bytes;
    let mut vblock = first_block;
    let mut out = Vec::new();
    for (s, e) in free_ranges(cfg) {
        if left == 0 {
            break;
        }
        let take = left.min(e - s);
        out.push(Extent {
            volume_block: vblock,
            pool_block: s / bs,
            blocks: take / bs,
        });
        vblock += take / bs;
        left -= take;
    }
    Ok(out)
}

/// Sizes for messages: `1.5 GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A new thick volume of `size_bytes` (whole blocks of `block_size`). `taken_names` holds the
/// volume names of the other pools (names are unique in the cluster).
pub fn create_volume(
    cfg: &PoolConfig,
    name: &str,
    size_bytes: u64,
    block_size: u32,
    uuid: Uuid,
    nguid: [u8; 16],
    taken_names: &[String],
) -> Result<PoolConfig, OpError> {
    check_name("Volume", name)?;
    if cfg.volumes.iter().any(|v| v.name == name) || taken_names.iter().any(|n| n == name) {
        return Err(OpError::AlreadyExists(format!("volume {name} exists")));
    }
    if !matches!(block_size, 512 | 4096) {
        return Err(OpError::InvalidArgument(format!(
            "block size {block_size} (512 or 4096)"
        )));
    }
    if size_bytes == 0 || size_bytes % u64::from(block_size) != 0 {
        return Err(OpError::InvalidArgument(format!(
            "volume size {size_bytes} is not a positive multiple of the {block_size}-byte block"
        )));
    }
    let extents = allocate(cfg, size_bytes, block_size, 0)?;
    let mut out = cfg.clone();
    out.volumes.push(Volume {
        name: name.to_owned(),
        uuid,
        nguid,
        size_blocks: size_bytes / u64::from(block_size),
        block_size,
        flags: 0,
        parent: Uuid::NIL,
        extents,
    });
    Ok(out)
}

fn volume_index(cfg: &PoolConfig, name: &str) -> Result<usize, OpError> {
    cfg.volumes
        .iter()
        .position(|v| v.name == name)
        .ok_or_else(|| OpError::NotFound(format!("no volume {name}")))
}

/// Grows a volume to `size_bytes` (the same size is a no-op; smaller is refused).
pub fn resize_volume(cfg: &PoolConfig, name: &str, size_bytes: u64) -> Result<PoolConfig, OpError> {
    let i = volume_index(cfg, name)?;
    let v = &cfg.volumes[i];
    let bs = u64::from(v.block_size);
    let now = v.size_blocks * bs;
    if size_bytes < now {
        return Err(OpError::InvalidArgument(format!(
            "volume {name} is {}: shrinking would cut off data a host may use",
            human(now)
        )));
    }
    if size_bytes % bs != 0 {
        return Err(OpError::InvalidArgument(format!(
            "volume size {size_bytes} is not a multiple of the {bs}-byte block"
        )));
    }
    if size_bytes == now {
        return Ok(cfg.clone());
    }
    let more = allocate(cfg, size_bytes - now, v.block_size, v.size_blocks)?;
    let mut out = cfg.clone();
    let v = &mut out.volumes[i];
    v.extents.extend(more);
    v.size_blocks = size_bytes / bs;
    Ok(out)
}

/// Deletes a volume that no namespace exports.
pub fn delete_volume(cfg: &PoolConfig, name: &str) -> Result<PoolConfig, OpError> {
    let i = volume_index(cfg, name)?;
    let uuid = cfg.volumes[i].uuid;
    if let Some(ns) = cfg.namespaces.iter().find(|n| n.volume_uuid == uuid) {
        return Err(OpError::InUse(format!(
            "volume {name} is exported as namespace {} of {}: remove the namespace first",
            ns.nsid, ns.subsystem_nqn
        )));
    }
    let mut out = cfg.clone();
    out.volumes.remove(i);
    Ok(out)
}

/// Adds a subsystem (to this pool's copy of the cluster's subsystems).
pub fn create_subsystem(
    cfg: &PoolConfig,
    nqn: &str,
    serial: &str,
    model: &str,
) -> Result<PoolConfig, OpError> {
    check_nqn("Subsystem NQN", nqn)?;
    if cfg.subsystems.iter().any(|s| s.nqn == nqn) {
        return Err(OpError::AlreadyExists(format!("subsystem {nqn} exists")));
    }
    let mut out = cfg.clone();
    out.subsystems.push(Subsystem {
        nqn: nqn.to_owned(),
        allow_any_host: false,
        hosts: Vec::new(),
        serial: serial.to_owned(),
        model: model.to_owned(),
    });
    Ok(out)
}

fn subsystem_index(cfg: &PoolConfig, nqn: &str) -> Result<usize, OpError> {
    cfg.subsystems
        .iter()
        .position(|s| s.nqn == nqn)
        .ok_or_else(|| OpError::NotFound(format!("no subsystem {nqn}")))
}

/// Deletes a subsystem without namespaces (in this pool; the caller checks the others).
pub fn delete_subsystem(cfg: &PoolConfig, nqn: &str) -> Result<PoolConfig, OpError> {
    let i = subsystem_index(cfg, nqn)?;
    if let Some(ns) = cfg.namespaces.iter().find(|n| n.subsystem_nqn == nqn) {
        return Err(OpError::InUse(format!(
            "subsystem {nqn} has namespace {}: remove its namespaces first",
            ns.nsid
        )));
    }
    let mut out = cfg.clone();
    out.subsystems.remove(i);
    out.host_secrets.retain(|x| x.subnqn != nqn);
    Ok(out)
}

/// Exports volume `volume` of this pool as namespace `nsid` (or the lowest free one) of
/// subsystem `nqn`. `taken_nsids` holds the subsystem's NSIDs in other pools. Returns the
/// change and the NSID.
pub fn add_namespace(
    cfg: &PoolConfig,
    nqn: &str,
    volume: &str,
    nsid: Option<u32>,
    ana_group: u32,
    taken_nsids: &[u32],
) -> Result<(PoolConfig, u32), OpError> {
    subsystem_index(cfg, nqn)?;
    let v = &cfg.volumes[volume_index(cfg, volume)?];
    if let Some(ns) = cfg.namespaces.iter().find(|n| n.volume_uuid == v.uuid) {
        return Err(OpError::InUse(format!(
            "volume {volume} is already namespace {} of {}",
            ns.nsid, ns.subsystem_nqn
        )));
    }
    let used = |id: u32| {
        taken_nsids.contains(&id)
            || cfg
                .namespaces
                .iter()
                .any(|n| n.subsystem_nqn == nqn && n.nsid == id)
    };
    let nsid = match nsid {
        Some(id) if !(1..=MAX_NSID).contains(&id) => {
            return Err(OpError::InvalidArgument(format!(
                "namespace id {id} (1..={MAX_NSID})"
            )));
        }
        Some(id) if used(id) => {
            return Err(OpError::AlreadyExists(format!(
                "subsystem {nqn} has a namespace {id}"
            )));
        }
        Some(id) => id,
        None => (1..=MAX_NSID).find(|&id| !used(id)).ok_or_else(|| {
            OpError::NoSpace(format!("subsystem {nqn} has {MAX_NSID} namespaces"))
        })?,
    };
    let mut out = cfg.clone();
    out.namespaces.push(Namespace {
        subsystem_nqn: nqn.to_owned(),
        nsid,
        volume_uuid: v.uuid,
        ana_group,
    });
    Ok((out, nsid))
}

/// Removes namespace `nsid` of subsystem `nqn` (from this pool).
pub fn remove_namespace(cfg: &PoolConfig, nqn: &str, nsid: u32) -> Result<PoolConfig, OpError> {
    let i = cfg
        .namespaces
        .iter()
        .position(|n| n.subsystem_nqn == nqn && n.nsid == nsid)
        .ok_or_else(|| OpError::NotFound(format!("subsystem {nqn} has no namespace {nsid}")))?;
    let mut out = cfg.clone();
    out.namespaces.remove(i);
    // Its reservation state goes with it (a namespace added again starts with none).
    out.reservations
        .retain(|r| !(r.subnqn == nqn && r.nsid == nsid));
    Ok(out)
}

/// Allows host `host` to connect to subsystem `nqn`.
pub fn allow_host(
    cfg: &PoolConfig,
    nqn: &str,
    host: &str,
    sealed: Option<&[u8]>,
) -> Result<PoolConfig, OpError> {
    check_nqn("Host NQN", host)?;
    let i = subsystem_index(cfg, nqn)?;
    let mut out = cfg.clone();
    let s = &mut out.subsystems[i];
    let allowed = s.hosts.iter().any(|h| h == host);
    match sealed {
        None if allowed => {
            let with = if cfg
                .host_secrets
                .iter()
                .any(|h| h.subnqn == nqn && h.hostnqn == host)
            {
                " (with DH-HMAC-CHAP secrets or a TLS PSK: deny it and allow it again to drop them)"
            } else {
                ""
            };
            return Err(OpError::AlreadyExists(format!(
                "host {host} is already allowed on {nqn}{with}"
            )));
        }
        None => s.hosts.push(host.to_owned()),
        Some(sealed) => {
            if !allowed {
                s.hosts.push(host.to_owned());
            }
            // Set, or replaced.
            out.host_secrets
                .retain(|h| !(h.subnqn == nqn && h.hostnqn == host));
            out.host_secrets.push(duplex_ondisk::records::HostSecret {
                subnqn: nqn.to_owned(),
                hostnqn: host.to_owned(),
                sealed: sealed.to_vec(),
            });
        }
    }
    Ok(out)
}

/// Withdraws host `host`'s access to subsystem `nqn`.
pub fn deny_host(cfg: &PoolConfig, nqn: &str, host: &str) -> Result<PoolConfig, OpError> {
    let i = subsystem_index(cfg, nqn)?;
    let mut out = cfg.clone();
    let s = &mut out.subsystems[i];
    let Some(h) = s.hosts.iter().position(|h| h == host) else {
        return Err(OpError::NotFound(format!(
            "host {host} is not allowed on {nqn}"
        )));
    };
    s.hosts.remove(h);
    // Its secrets go with it.
    out.host_secrets
        .retain(|x| !(x.subnqn == nqn && x.hostnqn == host));
    Ok(out)
}

/// Lets any host connect to subsystem `nqn` (or only the allowed ones).
pub fn allow_any_host(cfg: &PoolConfig, nqn: &str, any: bool) -> Result<PoolConfig, OpError> {
    let i = subsystem_index(cfg, nqn)?;
    let mut out = cfg.clone();
    out.subsystems[i].allow_any_host = any;
    Ok(out)
}
