//! What duplexctl prints: tables for people, one JSON document for scripts.
//!
//! JSON field names are snake_case and stable (documented in `docs/OPERATOR.md`); numbers are
//! raw (milliseconds, bytes, pids with 0 for "none"), text is as the node sent it. The human
//! forms humanise durations and sizes and replace control characters in text that came from the
//! node, so that nothing printed can drive the terminal.

use duplex_ipc::admin::{NodeStatus, ServiceInfo};
use duplex_ipc::config::{
    ConfigRequest, Done, DriveInfo, DriveState, PoolInfo, PoolIntegrity, PoolState, SubsystemInfo,
    VolumeInfo,
};
use serde::Serialize;

use crate::client::human_duration;
use crate::units::human_bytes;

/// One row of `service list --json`.
#[derive(Debug, Serialize)]
pub struct ServiceJson<'a> {
    /// Service name.
    pub name: &'a str,
    /// `service` or `datapath`.
    pub kind: &'static str,
    /// `starting`, `running`, `backoff`, `failed` or `stopped`.
    pub state: &'static str,
    /// Process id; 0 when no process runs.
    pub pid: u32,
    /// 1 on the first start, +1 on every start after.
    pub generation: u64,
    /// Starts after the first.
    pub restarts: u32,
    /// Since the current process was spawned; 0 when none runs.
    pub uptime_ms: u64,
    /// Times the watchdog found it hung.
    pub hangs: u32,
    /// How the previous process ended; empty if none did.
    pub last_exit: &'a str,
    /// From the previous process's death to the current one being ready; 0 if none yet.
    pub last_restart_ms: u64,
}

/// `service list --json`.
#[derive(Debug, Serialize)]
pub struct ServicesJson<'a> {
    /// The service table, in the supervisor's start order.
    pub services: Vec<ServiceJson<'a>>,
}

/// `status --json`.
#[derive(Debug, Serialize)]
pub struct StatusJson<'a> {
    /// The node's name.
    pub node: &'a str,
    /// duplexd's pid.
    pub supervisor_pid: u32,
    /// Since duplexd started.
    pub uptime_ms: u64,
    /// The datapath died: the node does not serve.
    pub failed: bool,
    /// Services running.
    pub services_running: u32,
    /// Services in the table.
    pub services_total: u32,
    /// Whether services run under their seccomp policies.
    pub sandbox: bool,
}

/// `service restart|crash --json`.
#[derive(Debug, Serialize)]
pub struct MessageJson<'a> {
    /// What was done, for humans.
    pub message: &'a str,
    /// True when the request took mgmt itself down before it could answer.
    pub mgmt_went_down: bool,
}

fn kind(s: &ServiceInfo) -> &'static str {
    if s.datapath {
        "datapath"
    } else {
        "service"
    }
}

/// The JSON form of a service table.
pub fn services_json(services: &[ServiceInfo]) -> ServicesJson<'_> {
    ServicesJson {
        services: services
            .iter()
            .map(|s| ServiceJson {
                name: &s.name,
                kind: kind(s),
                state: s.state.name(),
                pid: s.pid,
                generation: s.generation,
                restarts: s.restarts,
                uptime_ms: s.uptime_ms,
                hangs: s.hangs,
                last_exit: &s.last_exit,
                last_restart_ms: s.last_restart_ms,
            })
            .collect(),
    }
}

/// The JSON form of a node status.
pub fn status_json(s: &NodeStatus) -> StatusJson<'_> {
    StatusJson {
        node: &s.node,
        supervisor_pid: s.supervisor_pid,
        uptime_ms: s.uptime_ms,
        failed: s.failed,
        services_running: s.services_running,
        services_total: s.services_total,
        sandbox: s.sandbox,
    }
}

/// Text from the node made safe to print: control characters become `?`.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn ms(ms: u64) -> String {
    human_duration(std::time::Duration::from_millis(ms))
}

/// The service table for people.
pub fn services_table(services: &[ServiceInfo]) -> String {
    const HEADER: [&str; 9] = [
        "NAME",
        "KIND",
        "STATE",
        "PID",
        "GEN",
        "RESTARTS",
        "HANGS",
        "UPTIME",
        "LAST-EXIT",
    ];
    let dash = |present: bool, text: String| if present { text } else { "-".into() };
    let rows: Vec<[String; 9]> = services
        .iter()
        .map(|s| {
            [
                printable(&s.name),
                kind(s).into(),
                s.state.name().into(),
                dash(s.pid != 0, s.pid.to_string()),
                s.generation.to_string(),
                s.restarts.to_string(),
                s.hangs.to_string(),
                dash(s.pid != 0, ms(s.uptime_ms)),
                dash(!s.last_exit.is_empty(), printable(&s.last_exit)),
            ]
        })
        .collect();
    table(&HEADER, &rows)
}

/// A table: a header line, then one line per row, columns two spaces apart, the last column
/// not padded (it may hold free text).
fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let pad = w - cell.chars().count();
                text.push_str(cell);
                text.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&header.map(String::from));
    for row in rows {
        line(row);
    }
    out
}

/// The node summary for people.
pub fn status_text(s: &NodeStatus) -> String {
    let state = if s.failed {
        "FAILED (the datapath died; the node does not serve)"
    } else {
        "serving"
    };
    let sandbox = if s.sandbox {
        "on (services run under their seccomp policies)"
    } else {
        "OFF (development switch DUPLEX_SANDBOX=off)"
    };
    format!(
        "node:       {}\nstate:      {state}\nsupervisor: duplexd pid {}, up {}\nservices:   {} of {} running\nsandbox:    {sandbox}\n",
        printable(&s.node),
        s.supervisor_pid,
        ms(s.uptime_ms),
        s.services_running,
        s.services_total,
    )
}

/// `drive list --json`.
#[derive(Debug, Serialize)]
pub struct DrivesJson<'a> {
    /// Every drive.
    pub drives: &'a [DriveInfo],
}

/// `pool list --json`.
#[derive(Debug, Serialize)]
pub struct PoolsJson<'a> {
    /// Every pool.
    pub pools: &'a [PoolInfo],
}

/// `pool show --json`.
#[derive(Debug, Serialize)]
pub struct PoolJson<'a> {
    /// The pool.
    pub pool: &'a PoolInfo,
}

/// `volume list --json`.
#[derive(Debug, Serialize)]
pub struct VolumesJson<'a> {
    /// Every volume.
    pub volumes: &'a [VolumeInfo],
}

/// `subsystem list --json`.
#[derive(Debug, Serialize)]
pub struct SubsystemsJson<'a> {
    /// Every subsystem.
    pub subsystems: &'a [SubsystemInfo],
}

/// The `--json` answer of a storage change.
#[derive(Debug, Serialize)]
pub struct DoneJson {
    /// What was done, one line (the metadata service's words, or duplexctl's when it gave none).
    pub message: String,
    /// `namespace add`: the nsid assigned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nsid: Option<u32>,
    /// `pool create`, `volume create`: the UUID created.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
}

/// `-` for what is absent.
fn or_dash(present: bool, text: impl FnOnce() -> String) -> String {
    if present {
        text()
    } else {
        "-".into()
    }
}

/// The drive table for people.
pub fn drives_table(drives: &[DriveInfo]) -> String {
    const HEADER: [&str; 10] = [
        "NAME", "STATE", "POOL", "SLOT", "CKSUM", "SIZE", "BLOCK", "MODEL", "SERIAL", "ADDRESS",
    ];
    let rows: Vec<[String; 10]> = drives
        .iter()
        .map(|d| {
            let seen = d.state != DriveState::Missing;
            [
                printable(&d.name),
                d.state.name().into(),
                or_dash(!d.pool.is_empty(), || printable(&d.pool)),
                or_dash(!d.pool.is_empty(), || d.slot.to_string()),
                or_dash(seen, || d.integrity_errors.to_string()),
                or_dash(seen, || human_bytes(d.capacity_bytes)),
                or_dash(seen && d.block_size != 0, || d.block_size.to_string()),
                or_dash(!d.model.is_empty(), || printable(&d.model)),
                or_dash(!d.serial.is_empty(), || printable(&d.serial)),
                or_dash(!d.address.is_empty(), || printable(&d.address)),
            ]
        })
        .collect();
    table(&HEADER, &rows)
}

/// Allocated bytes and percent of capacity (`-` for an empty pool).
fn usage(p: &PoolInfo) -> (u64, String) {
    let used = p.capacity_bytes.saturating_sub(p.free_bytes);
    let percent = if p.capacity_bytes == 0 {
        "-".into()
    } else {
        format!("{}%", u128::from(used) * 100 / u128::from(p.capacity_bytes))
    };
    (used, percent)
}

/// The pool table for people (like `zpool list`).
pub fn pools_table(pools: &[PoolInfo]) -> String {
    const HEADER: [&str; 10] = [
        "NAME", "RAID", "SIZE", "ALLOC", "FREE", "CAP", "CHUNK", "MEMBERS", "STATE", "OWNER",
    ];
    let rows: Vec<[String; 10]> = pools
        .iter()
        .map(|p| {
            let (used, percent) = usage(p);
            [
                printable(&p.name),
                p.raid.name().into(),
                human_bytes(p.capacity_bytes),
                human_bytes(used),
                human_bytes(p.free_bytes),
                percent,
                human_bytes(u64::from(p.chunk_bytes)),
                p.members.len().to_string(),
                p.state.name().into(),
                format!("node {}", u64::from(p.owner_node) + 1),
            ]
        })
        .collect();
    table(&HEADER, &rows)
}

/// One pool for people (like `zpool status`): the pool, its state and a member table.
pub fn pool_text(p: &PoolInfo) -> String {
    let (used, percent) = usage(p);
    let mut out = format!(
        "  pool: {}\n  uuid: {}\n state: {}\n",
        printable(&p.name),
        printable(&p.uuid),
        p.state.name()
    );
    match p.state {
        PoolState::Online => {}
        PoolState::Degraded => out.push_str(
            "status: a member is failed, missing or rebuilding: the pool serves with less redundancy than configured\n",
        ),
        PoolState::Offline => out.push_str(
            "status: the pool does not serve: too many members are lost, or it is not imported\n",
        ),
    }
    out.push_str(&format!(
        "  raid: {}, chunk {}\n  size: {} ({} allocated, {} free, {percent} used)\n owner: node {} (epoch {}, generation {})\n\n",
        p.raid.name(),
        human_bytes(u64::from(p.chunk_bytes)),
        human_bytes(p.capacity_bytes),
        human_bytes(used),
        human_bytes(p.free_bytes),
        u64::from(p.owner_node) + 1,
        p.epoch,
        p.generation,
    ));
    let percent_of = |done: u64| {
        (u128::from(done.min(p.member_bytes)) * 100)
            .checked_div(u128::from(p.member_bytes))
            .unwrap_or(0)
    };
    // Long work under way (or last done) goes above the members, as `zpool status` has it.
    let mut work = String::new();
    if let Some((slot, done)) = p.rebuild {
        let drive = p
            .members
            .iter()
            .find(|m| m.slot == slot)
            .map_or_else(|| "-".to_owned(), |m| printable(&m.drive));
        work.push_str(&format!(
            "rebuild: slot {slot} ({drive}): {} of {} rebuilt ({}%)\n",
            human_bytes(done),
            human_bytes(p.member_bytes),
            percent_of(done)
        ));
        work.push_str(&job_line(
            p.jobs.rebuild_rate,
            p.jobs.rebuild_eta_ms,
            p.jobs.rate_limit,
            percent_of(done),
        ));
        if p.jobs.rebuild_from > 0 || p.jobs.rebuild_checkpoint > 0 {
            work.push_str(&format!(
                "         resumed from {}, checkpoint on the drives at {}\n",
                human_bytes(p.jobs.rebuild_from),
                human_bytes(p.jobs.rebuild_checkpoint)
            ));
        }
    }
    if let Some(s) = p.scrub {
        let head = if s.done_bytes >= p.member_bytes {
            "finished".to_owned()
        } else {
            format!(
                "{} of {} checked ({}%)",
                human_bytes(s.done_bytes),
                human_bytes(p.member_bytes),
                percent_of(s.done_bytes)
            )
        };
        work.push_str(&format!(
            "  scrub: {head}: {} mismatches, {} repaired, {} not checkable\n",
            s.mismatches, s.repaired, s.skipped
        ));
        if s.done_bytes < p.member_bytes {
            work.push_str(&job_line(
                p.jobs.scrub_rate,
                p.jobs.scrub_eta_ms,
                p.jobs.rate_limit,
                percent_of(s.done_bytes),
            ));
        }
    }
    let i = p.integrity;
    if i != PoolIntegrity::default() {
        work.push_str(&format!(
            " integrity: {} reads served from a good copy, {} bad copies rewritten, {} blocks with no good copy\n",
            i.recovered, i.healed, i.unrecoverable
        ));
    }
    if !p.spares.is_empty() {
        let names: Vec<String> = p.spares.iter().map(|d| printable(d)).collect();
        work.push_str(&format!(" spares: {}\n", names.join(", ")));
    }
    if !work.is_empty() {
        // Before the blank line that precedes the member table.
        out.pop();
        out.push_str(&work);
        out.push('\n');
    }
    const HEADER: [&str; 4] = ["SLOT", "DRIVE", "STATE", "DRIVE-UUID"];
    let rows: Vec<[String; 4]> = p
        .members
        .iter()
        .map(|m| {
            [
                m.slot.to_string(),
                or_dash(!m.drive.is_empty(), || printable(&m.drive)),
                m.state.name().into(),
                or_dash(!m.drive_uuid.is_empty(), || printable(&m.drive_uuid)),
            ]
        })
        .collect();
    for line in table(&HEADER, &rows).lines() {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The volume table for people.
pub fn volumes_table(volumes: &[VolumeInfo]) -> String {
    const HEADER: [&str; 6] = ["NAME", "POOL", "SIZE", "BLOCK", "NGUID", "EXPORTS"];
    let rows: Vec<[String; 6]> = volumes
        .iter()
        .map(|v| {
            let exports = v
                .exports
                .iter()
                .map(|e| format!("{} nsid {}", printable(&e.nqn), e.nsid))
                .collect::<Vec<_>>()
                .join(", ");
            [
                printable(&v.name),
                printable(&v.pool),
                human_bytes(v.size_bytes),
                v.block_size.to_string(),
                or_dash(!v.nguid.is_empty(), || printable(&v.nguid)),
                or_dash(!exports.is_empty(), || exports),
            ]
        })
        .collect();
    table(&HEADER, &rows)
}

/// The subsystem table for people: namespaces as `nsid:volume`, hosts as `any` or their NQNs.
pub fn subsystems_table(subsystems: &[SubsystemInfo]) -> String {
    const HEADER: [&str; 3] = ["NQN", "NAMESPACES", "HOSTS"];
    let rows: Vec<[String; 3]> = subsystems
        .iter()
        .map(|s| {
            let namespaces = s
                .namespaces
                .iter()
                .map(|n| format!("{}:{}", n.nsid, printable(&n.volume)))
                .collect::<Vec<_>>()
                .join(",");
            let listed = s
                .hosts
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    if s.hosts_authenticate.get(i).copied().unwrap_or(false) {
                        format!("{} (DH-HMAC-CHAP)", printable(h))
                    } else {
                        printable(h)
                    }
                })
                .collect::<Vec<_>>()
                .join(", ");
            let hosts = match (s.allow_any_host, listed.is_empty()) {
                (true, true) => "any".into(),
                (true, false) => format!("any (also listed: {listed})"),
                (false, true) => "none".into(),
                (false, false) => listed,
            };
            [
                printable(&s.nqn),
                or_dash(!namespaces.is_empty(), || namespaces),
                hosts,
            ]
        })
        .collect();
    table(&HEADER, &rows)
}

/// What duplexctl says a change did when the metadata service said nothing.
fn fallback(request: &ConfigRequest, done: &Done) -> String {
    match request {
        ConfigRequest::CreatePool { name, .. } => format!("created pool {name}"),
        ConfigRequest::DestroyPool { name, .. } => format!("destroyed pool {name}"),
        ConfigRequest::ImportPool { pool, .. } => format!("imported pool {pool}"),
        ConfigRequest::MovePool { name, node } => format!("moved pool {name} to node {node}"),
        ConfigRequest::ScrubPool(name) => {
            format!(
                "scrub of pool {name} started (`duplexctl pool show {name}`: progress, findings)"
            )
        }
        ConfigRequest::ReplaceMember { pool, old, new } => {
            format!("pool {pool}: {old} replaced by {new}, rebuilding")
        }
        ConfigRequest::AddSpare { pool, drive } => {
            format!("pool {pool}: {drive} is a hot spare")
        }
        ConfigRequest::SetPoolRate { pool, rate: 0 } => {
            format!("pool {pool}: rebuilds and scrubs yield to host I/O")
        }
        ConfigRequest::SetPoolRate { pool, rate } => {
            format!(
                "pool {pool}: rebuilds and scrubs at most {}/s",
                human_bytes(*rate)
            )
        }
        ConfigRequest::CreateVolume { name, pool, .. } => {
            format!("created volume {name} in pool {pool}")
        }
        ConfigRequest::ResizeVolume { name, size_bytes } => {
            format!("resized volume {name} to {}", human_bytes(*size_bytes))
        }
        ConfigRequest::DeleteVolume(name) => format!("deleted volume {name}"),
        ConfigRequest::CreateSubsystem(nqn) => format!("created subsystem {nqn}"),
        ConfigRequest::DeleteSubsystem(nqn) => format!("deleted subsystem {nqn}"),
        ConfigRequest::AddNamespace { nqn, volume, .. } => {
            format!("added namespace {} of {nqn}: volume {volume}", done.nsid)
        }
        ConfigRequest::RemoveNamespace { nqn, nsid } => {
            format!("removed namespace {nsid} of {nqn}")
        }
        ConfigRequest::AllowHost { nqn, host_nqn, .. } => {
            format!("allowed host {host_nqn} on {nqn}")
        }
        ConfigRequest::DenyHost { nqn, host_nqn } => format!("denied host {host_nqn} on {nqn}"),
        ConfigRequest::AllowAnyHost { nqn, any: true } => format!("{nqn} now admits any host"),
        ConfigRequest::AllowAnyHost { nqn, any: false } => {
            format!("{nqn} now admits only its allowed hosts")
        }
        ConfigRequest::ListDrives
        | ConfigRequest::ListPools
        | ConfigRequest::ShowPool(_)
        | ConfigRequest::ListVolumes
        | ConfigRequest::ListVolumesAfter(_)
        | ConfigRequest::ListSubsystems => format!("{}: done", request.kind_name()),
    }
}

/// The one line a change prints: the metadata service's message, on one line and printable,
/// or duplexctl's own when it gave none.
pub fn done_line(request: &ConfigRequest, done: &Done) -> String {
    let message = crate::server::one_line(&done.message);
    let message = if message.is_empty() {
        fallback(request, done)
    } else {
        message
    };
    printable(&message)
}

/// The JSON form of a change.
pub fn done_json(request: &ConfigRequest, done: &Done) -> DoneJson {
    DoneJson {
        message: done_line(request, done),
        nsid: matches!(request, ConfigRequest::AddNamespace { .. }).then_some(done.nsid),
        uuid: (!done.uuid.is_empty()).then(|| done.uuid.clone()),
    }
}

/// `duplexctl cluster status`: the cluster service's report (its JSON, with the generation of
/// the process that wrote it), as JSON or as lines for people. `Err` if the report is not the
/// JSON object the service writes.
///
/// `pools` is what the metadata service lists (`Err`: why not): each pool's owner and epoch,
/// added to the report as `pools` (`owner` is the node id).
pub fn cluster_status(
    generation: u64,
    report: &str,
    pools: Result<&[PoolInfo], String>,
    json: bool,
) -> Result<String, String> {
    let mut v: serde_json::Value = serde_json::from_str(report)
        .map_err(|e| format!("the cluster service's report is not JSON: {e}"))?;
    let Some(obj) = v.as_object_mut() else {
        return Err("the cluster service's report is not a JSON object".into());
    };
    obj.insert("generation".into(), generation.into());
    let node = obj.get("node").and_then(serde_json::Value::as_u64);
    obj.insert(
        "pools".into(),
        match &pools {
            Ok(list) => serde_json::Value::Array(
                list.iter()
                    .map(|p| {
                        let owner = u64::from(p.owner_node) + 1;
                        serde_json::json!({
                            "name": p.name,
                            "owner": owner,
                            "epoch": p.epoch,
                            "state": p.state.name(),
                            "here": if Some(owner) == node { "owner" } else { "standby" },
                        })
                    })
                    .collect(),
            ),
            Err(why) => serde_json::json!({ "error": why }),
        },
    );
    if json {
        let mut text = serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?;
        text.push('\n');
        return Ok(text);
    }
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => printable(s),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let peer = &v["peer"];
    let ago = |v: &serde_json::Value| match v.as_u64() {
        Some(ms) => format!("{ms} ms ago"),
        None => "never".into(),
    };
    let mut out = format!(
        "array {}: node {} boot {} (cluster service generation {generation})\n\
         peer: node {} boot {} at {}: {}\n\
         interconnect: last beat heard {}, link to the peer {}\n\
         disk heartbeat: {}\n\
         takeover: {}\n",
        s(&v["cluster"]),
        s(&v["node"]),
        s(&v["boot"]),
        s(&peer["node"]),
        s(&peer["boot"]),
        s(&peer["address"]),
        s(&peer["state"]),
        ago(&peer["link_heard_ms_ago"]),
        s(&v["link_out"]),
        s(&v["disk_heartbeat"]),
        s(&v["takeover"]),
    );
    match v["joined"].as_bool() {
        Some(true) => out.push_str("join: joined (this node serves its pools)\n"),
        Some(false) => out.push_str(
            "join: waiting (this node serves none of its pools until the peer acknowledges it or is found dead)\n",
        ),
        None => {}
    }
    match v["drives"]["list"].as_array() {
        Some(list) => {
            for d in list {
                let keys: Vec<String> = d["keys"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|k| {
                        format!(
                            "node {} boot {}{}",
                            s(&k["node"]),
                            s(&k["boot"]),
                            if k["holder"] == true { " (holder)" } else { "" }
                        )
                    })
                    .collect();
                out.push_str(&match d["error"].as_str() {
                    Some(e) => format!("drive {}: not read: {}\n", s(&d["name"]), printable(e)),
                    None => format!(
                        "drive {}: {}; keys: {}\n",
                        s(&d["name"]),
                        s(&d["reservation"]),
                        if keys.is_empty() {
                            "none".into()
                        } else {
                            keys.join(", ")
                        }
                    ),
                });
            }
        }
        None => out.push_str("drives: reservations not read yet\n"),
    }
    match &pools {
        Ok([]) => out.push_str("pools: none\n"),
        Ok(list) => {
            for p in *list {
                let owner = u64::from(p.owner_node) + 1;
                out.push_str(&format!(
                    "pool {}: owner node {} (epoch {}), {}{}\n",
                    printable(&p.name),
                    owner,
                    p.epoch,
                    p.state.name(),
                    if Some(owner) == node {
                        ", served here"
                    } else {
                        ", standby here"
                    }
                ));
            }
        }
        Err(why) => out.push_str(&format!("pools: {}\n", printable(why))),
    }
    Ok(out)
}

/// `duplexctl cluster events`: the events of the cluster service's report, oldest first, one
/// line each (`SEQ TIME LEVEL KIND: MESSAGE`), or as JSON (`{"events": [...]}`).
pub fn cluster_events(report: &str, json: bool) -> Result<String, String> {
    let v: serde_json::Value = serde_json::from_str(report)
        .map_err(|e| format!("the cluster service's report is not JSON: {e}"))?;
    let events = v["events"].as_array().cloned().unwrap_or_default();
    if json {
        let mut text = serde_json::to_string_pretty(&serde_json::json!({ "events": events }))
            .map_err(|e| e.to_string())?;
        text.push('\n');
        return Ok(text);
    }
    if events.is_empty() {
        return Ok("no events\n".into());
    }
    let mut out = String::new();
    for e in &events {
        let ms = e["at_unix_ms"].as_u64().unwrap_or(0);
        let secs = ms / 1000;
        let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
        out.push_str(&format!(
            "{:>4} {h:02}:{m:02}:{s:02}.{:03} {:<7} {}: {}\n",
            e["seq"].as_u64().unwrap_or(0),
            ms % 1000,
            printable(e["level"].as_str().unwrap_or("?")),
            printable(e["kind"].as_str().unwrap_or("?")),
            printable(e["message"].as_str().unwrap_or("")),
        ));
    }
    Ok(out)
}

/// What `duplexctl status` gathers besides the node summary: the cluster service's report
/// (`None`: no cluster service, a single node), the pools (or why they could not be listed),
/// and the node's events (for the alerts of the last hour).
#[derive(Debug)]
pub struct Screen<'a> {
    /// The node summary.
    pub status: &'a NodeStatus,
    /// The cluster service's report (JSON), if the node is a cluster member.
    pub cluster: Option<serde_json::Value>,
    /// The pools, or why not.
    pub pools: Result<Vec<PoolInfo>, String>,
    /// The node's events, oldest first.
    pub events: Vec<serde_json::Value>,
    /// Now (ms since the Unix epoch).
    pub now_ms: u64,
}

/// One pool as `duplexctl status` shows it.
#[derive(Debug, Serialize)]
pub struct ScreenPool {
    name: String,
    raid: &'static str,
    state: &'static str,
    /// Whether this node serves it (owns it).
    served_here: bool,
    /// The ANA state of its namespaces on this node's ports.
    ana: &'static str,
    /// Rebuild progress (percent), if one runs.
    rebuild_percent: Option<u64>,
    /// Scrub progress (percent), if one runs.
    scrub_percent: Option<u64>,
}

impl Screen<'_> {
    fn node_id(&self) -> Option<u64> {
        self.cluster.as_ref().and_then(|c| c["node"].as_u64())
    }

    fn pools(&self) -> Vec<ScreenPool> {
        let me = self.node_id();
        self.pools
            .as_ref()
            .map(|list| {
                list.iter()
                    .map(|p| {
                        let served_here = me.is_none_or(|n| u64::from(p.owner_node) + 1 == n);
                        let percent = |done: u64| {
                            (p.member_bytes > 0).then(|| {
                                u64::try_from(u128::from(done) * 100 / u128::from(p.member_bytes))
                                    .unwrap_or(100)
                            })
                        };
                        ScreenPool {
                            name: printable(&p.name),
                            raid: p.raid.name(),
                            state: p.state.name(),
                            served_here,
                            ana: if !served_here || p.state == PoolState::Offline {
                                "inaccessible"
                            } else {
                                "optimized"
                            },
                            rebuild_percent: p.rebuild.and_then(|(_, done)| percent(done)),
                            scrub_percent: p
                                .scrub
                                .as_ref()
                                .filter(|s| s.done_bytes < p.member_bytes)
                                .and_then(|s| percent(s.done_bytes)),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// What needs the operator now, most serious first.
    fn alerts(&self) -> Vec<String> {
        let mut out = Vec::new();
        let s = self.status;
        if s.failed {
            out.push("the node FAILED: its datapath died and it serves nothing".to_owned());
        }
        if s.services_running < s.services_total {
            out.push(format!(
                "{} of {} services are not running (`duplexctl service list`)",
                s.services_total - s.services_running,
                s.services_total
            ));
        }
        if !s.sandbox {
            out.push("the sandbox is OFF (development switch)".to_owned());
        }
        if let Some(c) = &self.cluster {
            let state = c["peer"]["state"].as_str().unwrap_or("unknown");
            if state != "alive" {
                out.push(format!(
                    "peer node {} is {}",
                    c["peer"]["node"].as_u64().unwrap_or(0),
                    printable(state)
                ));
            }
            if c["disk"]["fenced"] == true {
                out.push(
                    "this node is FENCED off its drives: it serves nothing until restarted"
                        .to_owned(),
                );
            }
        }
        match &self.pools {
            Ok(list) => {
                for p in list {
                    match p.state {
                        PoolState::Online => {}
                        PoolState::Degraded => out.push(format!(
                            "pool {} is degraded{}",
                            printable(&p.name),
                            if p.rebuild.is_some() {
                                " (rebuilding)"
                            } else {
                                ""
                            }
                        )),
                        PoolState::Offline => {
                            out.push(format!("pool {} is OFFLINE", printable(&p.name)))
                        }
                    }
                }
            }
            Err(why) => out.push(format!("the pools cannot be listed: {}", printable(why))),
        }
        out
    }

    /// Warnings and errors among the events of the last hour.
    fn recent(&self) -> (usize, usize) {
        let since = self.now_ms.saturating_sub(3_600_000);
        let recent = self
            .events
            .iter()
            .filter(|e| e["at_unix_ms"].as_u64().unwrap_or(0) >= since);
        let (mut warnings, mut errors) = (0, 0);
        for e in recent {
            match e["level"].as_str() {
                Some("warning") => warnings += 1,
                Some("error") => errors += 1,
                _ => {}
            }
        }
        (warnings, errors)
    }

    /// The screen for people (in the spirit of `pcs status` and `zpool status -x`).
    pub fn text(&self) -> String {
        let mut out = status_text(self.status);
        match &self.cluster {
            Some(c) => out.push_str(&format!(
                "cluster:    node {} of {}; peer node {} {}\n",
                c["node"].as_u64().unwrap_or(0),
                printable(c["cluster"].as_str().unwrap_or("?")),
                c["peer"]["node"].as_u64().unwrap_or(0),
                printable(c["peer"]["state"].as_str().unwrap_or("unknown")),
            )),
            None => out.push_str("cluster:    none (a single node)\n"),
        }
        let pools = self.pools();
        if pools.is_empty() {
            out.push_str("pools:      none\n");
        } else {
            out.push_str("pools:\n");
            for p in &pools {
                let mut line = format!(
                    "  {:<16} {:<6} {:<9} {}",
                    p.name,
                    p.raid,
                    p.state.to_uppercase(),
                    if p.served_here {
                        "served here (ANA optimized)"
                    } else {
                        "standby here (ANA inaccessible)"
                    }
                );
                if let Some(r) = p.rebuild_percent {
                    line.push_str(&format!("  rebuild {r}%"));
                }
                if let Some(r) = p.scrub_percent {
                    line.push_str(&format!("  scrub {r}%"));
                }
                out.push_str(&line);
                out.push('\n');
            }
        }
        let alerts = self.alerts();
        if alerts.is_empty() {
            out.push_str("alerts:     none\n");
        } else {
            out.push_str("alerts:\n");
            for a in &alerts {
                out.push_str(&format!("  - {a}\n"));
            }
        }
        let (w, e) = self.recent();
        out.push_str(&format!(
            "events:     {w} warnings, {e} errors in the last hour (`duplexctl events`)\n"
        ));
        out
    }

    /// The screen as one JSON document: the node summary's fields, then `cluster`, `pools`,
    /// `alerts`, `recent_warnings`, `recent_errors`.
    pub fn json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(status_json(self.status)).unwrap_or_default();
        let (w, e) = self.recent();
        if let Some(m) = v.as_object_mut() {
            m.insert(
                "cluster".into(),
                self.cluster.as_ref().map_or(serde_json::Value::Null, |c| {
                    serde_json::json!({
                        "node": c["node"],
                        "peer": c["peer"]["node"],
                        "peer_state": c["peer"]["state"],
                        "fenced": c["disk"]["fenced"],
                    })
                }),
            );
            m.insert(
                "pools".into(),
                serde_json::to_value(self.pools()).unwrap_or_default(),
            );
            m.insert(
                "alerts".into(),
                serde_json::to_value(self.alerts()).unwrap_or_default(),
            );
            m.insert("recent_warnings".into(), w.into());
            m.insert("recent_errors".into(), e.into());
        }
        v
    }
}

/// `duplexctl events`: one line per event (`SEQ DATE TIME LEVEL SOURCE KIND: MESSAGE`, UTC).
pub fn node_events(events: &[serde_json::Value]) -> String {
    let mut out = String::new();
    for e in events {
        let ms = e["at_unix_ms"].as_u64().unwrap_or(0);
        let secs = ms / 1000;
        let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
        let (y, mo, d) = civil_date(secs / 86400);
        out.push_str(&format!(
            "{:>6} {y:04}-{mo:02}-{d:02} {h:02}:{m:02}:{s:02}.{:03} {:<7} {:<9} {}: {}\n",
            e["seq"].as_u64().unwrap_or(0),
            ms % 1000,
            printable(e["level"].as_str().unwrap_or("?")),
            printable(e["source"].as_str().unwrap_or("?")),
            printable(e["kind"].as_str().unwrap_or("?")),
            printable(e["message"].as_str().unwrap_or("")),
        ));
    }
    out
}

/// The proleptic Gregorian date of day `days` since 1970-01-01.
fn civil_date(days: u64) -> (i64, u32, u32) {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Whether `pool show` draws progress bars (duplexctl sets it when stdout is a terminal).
static PROGRESS_BARS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Draw progress bars in `pool show` (for a terminal).
pub fn set_progress_bars(on: bool) {
    PROGRESS_BARS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// A running job's rate, time left and limit (and a bar on a terminal).
fn job_line(rate: u64, eta_ms: u64, limit: u64, percent: u128) -> String {
    let mut line = String::from("         ");
    if PROGRESS_BARS.load(std::sync::atomic::Ordering::Relaxed) {
        let filled = usize::try_from(percent.min(100) * 30 / 100).unwrap_or(30);
        line.push_str(&format!(
            "[{}{}] ",
            "#".repeat(filled),
            ".".repeat(30 - filled)
        ));
    }
    if rate == 0 {
        line.push_str("rate not measured yet");
    } else {
        line.push_str(&format!("{}/s", human_bytes(rate)));
    }
    if eta_ms != u64::MAX {
        line.push_str(&format!(", {} left", eta_text(eta_ms)));
    }
    if limit == 0 {
        line.push_str(" (rate: auto, yields to host I/O)\n");
    } else {
        line.push_str(&format!(" (rate limit {}/s)\n", human_bytes(limit)));
    }
    line
}

/// `1h02m`, `3m05s`, `12s`.
fn eta_text(ms: u64) -> String {
    let s = ms.div_ceil(1000);
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use duplex_ipc::admin::ServiceState;
    use duplex_ipc::config::examples;

    fn service(name: &str, pid: u32, last_exit: &str) -> ServiceInfo {
        ServiceInfo {
            name: name.into(),
            datapath: name == "datapath",
            state: if pid == 0 {
                ServiceState::Backoff
            } else {
                ServiceState::Running
            },
            pid,
            generation: 2,
            restarts: 1,
            uptime_ms: 61_000,
            hangs: 0,
            last_exit: last_exit.into(),
            last_restart_ms: 12,
        }
    }

    #[test]
    fn table_aligns_and_dashes_what_is_absent() {
        let table = services_table(&[
            service("datapath", 4242, ""),
            service("fabric\u{1b}", 0, "signal 9 (SIGKILL)"),
        ]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines,
            [
                "NAME      KIND      STATE    PID   GEN  RESTARTS  HANGS  UPTIME  LAST-EXIT",
                "datapath  datapath  running  4242  2    1         0      1m01s   -",
                "fabric?   service   backoff  -     2    1         0      -       signal 9 (SIGKILL)",
            ]
        );
    }

    #[test]
    fn json_uses_the_documented_names() {
        let list = [service("mgmt", 7, "exit status 3")];
        let v = serde_json::to_value(services_json(&list)).expect("json");
        let row = &v["services"][0];
        for key in [
            "name",
            "kind",
            "state",
            "pid",
            "generation",
            "restarts",
            "uptime_ms",
            "hangs",
            "last_exit",
            "last_restart_ms",
        ] {
            assert!(row.get(key).is_some(), "{key} missing in {row}");
        }
        assert_eq!(row["last_exit"], "exit status 3");
        assert_eq!(row["kind"], "service");
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    #[test]
    fn drive_table_dashes_what_a_free_or_missing_drive_lacks() {
        let mut missing = examples::drive("d9", "tank", 3, DriveState::Missing);
        missing.address.clear();
        missing.model.clear();
        missing.serial.clear();
        missing.block_size = 0;
        let mut bad = examples::drive("d0", "tank", 0, DriveState::Active);
        bad.integrity_errors = 17;
        let table = drives_table(&[
            bad,
            examples::drive("d1\u{1b}", "", 0, DriveState::Free),
            missing,
        ]);
        assert_eq!(
            lines(&table),
            [
                "NAME  STATE    POOL  SLOT  CKSUM  SIZE  BLOCK  MODEL             SERIAL   ADDRESS",
                "d0    active   tank  0     17     1G    4096   duplex-drive-sim  SIM-d0   vfio-user:drives/d0-a.sock",
                "d1?   free     -     -     0      1G    4096   duplex-drive-sim  SIM-d1?  vfio-user:drives/d1?-a.sock",
                "d9    missing  tank  3     -      -     -      -                 -        -",
            ]
        );
    }

    #[test]
    fn pool_table_is_like_zpool_list() {
        let mut empty = examples::pool("scratch", 1);
        empty.capacity_bytes = 0;
        empty.free_bytes = 0;
        empty.state = PoolState::Offline;
        let table = pools_table(&[examples::pool("tank", 2), empty]);
        assert_eq!(
            lines(&table),
            [
                "NAME     RAID   SIZE  ALLOC  FREE  CAP  CHUNK  MEMBERS  STATE     OWNER",
                "tank     raid1  1G    256M   768M  25%  64K    2        degraded  node 1",
                "scratch  raid1  0B    0B     0B    -    64K    1        offline   node 1",
            ]
        );
    }

    #[test]
    fn pool_show_is_like_zpool_status() {
        let text = pool_text(&examples::pool("tank", 2));
        assert_eq!(
            lines(&text),
            [
                "  pool: tank",
                "  uuid: 0b1e5c7a-2f4d-4e8a-9c3b-5d6e7f809a1b",
                " state: degraded",
                "status: a member is failed, missing or rebuilding: the pool serves with less redundancy than configured",
                "  raid: raid1, chunk 64K",
                "  size: 1G (256M allocated, 768M free, 25% used)",
                " owner: node 1 (epoch 3, generation 42)",
                " integrity: 5 reads served from a good copy, 4 bad copies rewritten, 1 blocks with no good copy",
                "",
                "  SLOT  DRIVE  STATE   DRIVE-UUID",
                "  0     d0     active  6f0c1d2e-3a4b-4c5d-8e9f-0a1b2c3d4e00",
                "  1     d1     failed  6f0c1d2e-3a4b-4c5d-8e9f-0a1b2c3d4e01",
            ]
        );
        let mut online = examples::pool("tank", 1);
        online.state = PoolState::Online;
        assert!(!pool_text(&online).contains("status:"));
        // A rebuild and a scrub under way.
        let text = pool_text(&examples::pool("tank", 3));
        let l = lines(&text);
        assert_eq!(
            l[7], "rebuild: slot 2 (d2): 128M of 512M rebuilt (25%)",
            "{text}"
        );
        assert_eq!(
            l[8], "         64M/s, 6s left (rate: auto, yields to host I/O)",
            "{text}"
        );
        assert_eq!(
            l[9], "         resumed from 0B, checkpoint on the drives at 96M",
            "{text}"
        );
        assert_eq!(
            l[10], "  scrub: 256M of 512M checked (50%): 1 mismatches, 1 repaired, 0 not checkable",
            "{text}"
        );
        assert_eq!(
            l[11], "         rate not measured yet (rate: auto, yields to host I/O)",
            "{text}"
        );
        assert!(l[12].starts_with(" integrity: 5 reads"), "{text}");
        assert_eq!(l[13], " spares: d9", "{text}");
        assert_eq!(l[14], "", "{text}");
        // On a terminal, a bar; an operator's rate is said.
        set_progress_bars(true);
        let mut p = examples::pool("tank", 3);
        p.jobs.rate_limit = 50 << 20;
        p.jobs.rebuild_eta_ms = 3_723_000;
        let text = pool_text(&p);
        set_progress_bars(false);
        assert_eq!(
            lines(&text)[8],
            "         [#######.......................] 64M/s, 1h02m left (rate limit 50M/s)",
            "{text}"
        );
    }

    #[test]
    fn volume_and_subsystem_tables() {
        let mut unexported = examples::volume("vol1");
        unexported.exports.clear();
        unexported.size_bytes = 10 << 30;
        let table = volumes_table(&[examples::volume("vol0"), unexported]);
        assert_eq!(
            lines(&table),
            [
                "NAME  POOL  SIZE  BLOCK  NGUID                             EXPORTS",
                "vol0  tank  256M  4096   00112233445566778899aabbccddeeff  nqn.2026-11.io.duplex:vol0 nsid 1",
                "vol1  tank  10G   4096   00112233445566778899aabbccddeeff  -",
            ]
        );
        let mut open = examples::subsystem("nqn.2026-11.io.duplex:b");
        open.allow_any_host = true;
        open.hosts.clear();
        open.hosts_authenticate.clear();
        open.namespaces.clear();
        let mut closed = examples::subsystem("nqn.2026-11.io.duplex:c");
        closed.hosts.clear();
        closed.hosts_authenticate.clear();
        let table =
            subsystems_table(&[examples::subsystem("nqn.2026-11.io.duplex:a"), open, closed]);
        assert_eq!(
            lines(&table),
            [
                "NQN                      NAMESPACES  HOSTS",
                "nqn.2026-11.io.duplex:a  1:vol0      nqn.2014-08.org.nvmexpress:uuid:host-a (DH-HMAC-CHAP)",
                "nqn.2026-11.io.duplex:b  -           any",
                "nqn.2026-11.io.duplex:c  1:vol0      none",
            ]
        );
    }

    #[test]
    fn empty_lists_are_a_header() {
        assert_eq!(drives_table(&[]).lines().count(), 1);
        assert_eq!(pools_table(&[]).lines().count(), 1);
        assert_eq!(volumes_table(&[]).lines().count(), 1);
        assert_eq!(subsystems_table(&[]).lines().count(), 1);
    }

    #[test]
    fn a_change_prints_one_line() {
        let add = ConfigRequest::AddNamespace {
            nqn: "nqn.2026-11.io.duplex:a".into(),
            volume: "vol0".into(),
            nsid: 0,
        };
        let said = Done {
            message: "added namespace 3 of nqn.2026-11.io.duplex:a\n(volume vol0)\u{7}".into(),
            nsid: 3,
            uuid: String::new(),
        };
        assert_eq!(
            done_line(&add, &said),
            "added namespace 3 of nqn.2026-11.io.duplex:a (volume vol0)"
        );
        let silent = Done {
            nsid: 3,
            ..Done::default()
        };
        assert_eq!(
            done_line(&add, &silent),
            "added namespace 3 of nqn.2026-11.io.duplex:a: volume vol0"
        );
        let v = serde_json::to_value(done_json(&add, &silent)).expect("json");
        assert_eq!(v["nsid"], 3);
        assert!(v.get("uuid").is_none(), "{v}");
        let create = ConfigRequest::CreatePool {
            name: "tank".into(),
            raid: duplex_ipc::config::RaidLevel::Raid1,
            drives: vec!["d0".into(), "d1".into()],
            chunk_bytes: 0,
        };
        let made = Done {
            uuid: "0b1e5c7a-2f4d-4e8a-9c3b-5d6e7f809a1b".into(),
            ..Done::default()
        };
        let v = serde_json::to_value(done_json(&create, &made)).expect("json");
        assert_eq!(v["message"], "created pool tank");
        assert_eq!(v["uuid"], "0b1e5c7a-2f4d-4e8a-9c3b-5d6e7f809a1b");
        assert!(v.get("nsid").is_none(), "{v}");
    }

    #[test]
    fn storage_json_uses_the_documented_names() {
        let pools = [examples::pool("tank", 2)];
        let v = serde_json::to_value(PoolsJson { pools: &pools }).expect("json");
        let pool = &v["pools"][0];
        for key in [
            "name",
            "uuid",
            "raid",
            "chunk_bytes",
            "capacity_bytes",
            "free_bytes",
            "state",
            "generation",
            "epoch",
            "owner_node",
            "members",
        ] {
            assert!(pool.get(key).is_some(), "{key} missing in {pool}");
        }
        assert_eq!(pool["raid"], "raid1");
        assert_eq!(pool["state"], "degraded");
        assert_eq!(pool["members"][1]["state"], "failed");
        assert_eq!(
            pool["members"][1]["drive_uuid"],
            "6f0c1d2e-3a4b-4c5d-8e9f-0a1b2c3d4e01"
        );
        let drives = [examples::drive("d0", "", 0, DriveState::Free)];
        let v = serde_json::to_value(DrivesJson { drives: &drives }).expect("json");
        assert_eq!(v["drives"][0]["state"], "free");
        assert_eq!(v["drives"][0]["capacity_bytes"], 1_u64 << 30);
        let volumes = [examples::volume("vol0")];
        let v = serde_json::to_value(VolumesJson { volumes: &volumes }).expect("json");
        assert_eq!(v["volumes"][0]["exports"][0]["nsid"], 1);
        let subsystems = [examples::subsystem("nqn.2026-11.io.duplex:a")];
        let v = serde_json::to_value(SubsystemsJson {
            subsystems: &subsystems,
        })
        .expect("json");
        assert_eq!(v["subsystems"][0]["allow_any_host"], false);
        assert_eq!(v["subsystems"][0]["namespaces"][0]["ana_group"], 1);
    }

    #[test]
    fn cluster_status_reads_the_report_and_refuses_what_is_not_one() {
        let report = r#"{"cluster":"duplex","node":1,"boot":17,"peer":{"node":2,"boot":5,"address":"127.0.0.1:7400","state":"alive","link_heard_ms_ago":40},"link_out":"up","disk_heartbeat":"not written yet","drives":{"round":41,"list":[{"name":"d0","reservation":"Exclusive Access - Registrants Only","error":null,"keys":[{"key":"0x0001000000000011","node":1,"boot":17,"holder":true},{"key":"0x0002000000000005","node":2,"boot":5,"holder":false}]},{"name":"d1","reservation":"none","error":"unreachable: pulled","keys":[]}]}}"#;
        let mut tank = examples::pool("tank", 2);
        tank.owner_node = 0;
        tank.epoch = 3;
        let mut other = examples::pool("other", 2);
        other.owner_node = 1;
        let pools = [tank, other];
        let text = cluster_status(3, report, Ok(&pools), false).expect("text");
        assert!(
            text.starts_with("array duplex: node 1 boot 17 (cluster service generation 3)"),
            "{text}"
        );
        assert!(
            text.contains("peer: node 2 boot 5 at 127.0.0.1:7400: alive"),
            "{text}"
        );
        assert!(
            text.contains("last beat heard 40 ms ago, link to the peer up"),
            "{text}"
        );
        assert!(
            text.contains("drive d0: Exclusive Access - Registrants Only; keys: node 1 boot 17 (holder), node 2 boot 5\n"),
            "{text}"
        );
        assert!(
            text.contains("drive d1: not read: unreachable: pulled"),
            "{text}"
        );
        assert!(
            text.contains("pool tank: owner node 1 (epoch 3), degraded, served here\n"),
            "{text}"
        );
        assert!(text.contains("pool other: owner node 2"), "{text}");
        assert!(text.contains("standby here"), "{text}");
        let v: serde_json::Value =
            serde_json::from_str(&cluster_status(3, report, Ok(&pools), true).expect("json"))
                .expect("JSON");
        assert_eq!(v["generation"], 3);
        assert_eq!(v["peer"]["state"], "alive");
        assert_eq!(v["pools"][0]["owner"], 1);
        assert_eq!(v["pools"][0]["epoch"], 3);
        assert_eq!(v["pools"][0]["here"], "owner");
        assert_eq!(v["pools"][1]["here"], "standby");
        assert_eq!(v["drives"]["list"][0]["keys"][0]["holder"], true);
        let never = r#"{"cluster":"duplex","node":1,"boot":17,"peer":{"state":"unknown","link_heard_ms_ago":null}}"#;
        let text =
            cluster_status(1, never, Err("no metadata service".into()), false).expect("text");
        assert!(text.contains("last beat heard never"), "{text}");
        assert!(text.contains("drives: reservations not read yet"), "{text}");
        assert!(text.contains("pools: no metadata service"), "{text}");
        assert!(cluster_status(1, "not json", Ok(&[]), false).is_err());
        let with = r#"{"events":[{"seq":1,"at_unix_ms":3723004,"level":"info","kind":"started","message":"cluster service started"},{"seq":2,"at_unix_ms":3724500,"level":"warning","kind":"peer-interconnect-down","message":"the interconnect\u0007 is down"}]}"#;
        assert_eq!(
            cluster_events(with, false).expect("text"),
            "   1 01:02:03.004 info    started: cluster service started\n   2 01:02:04.500 warning peer-interconnect-down: the interconnect? is down\n"
        );
        let v: serde_json::Value =
            serde_json::from_str(&cluster_events(with, true).expect("json")).expect("JSON");
        assert_eq!(v["events"][1]["kind"], "peer-interconnect-down");
        assert_eq!(cluster_events(never, false).expect("text"), "no events\n");
        assert!(cluster_events("not json", false).is_err());
        assert!(cluster_status(1, "[1, 2]", Ok(&[]), false).is_err());
    }

    #[test]
    fn node_events_are_one_line_each_with_their_utc_date_and_printable() {
        let v: serde_json::Value = serde_json::from_str(
            r#"[{"seq":1,"at_unix_ms":1796400000000,"node":"n1","source":"duplexd","level":"info","kind":"node-started","message":"duplexd started node n1"},{"seq":12,"at_unix_ms":1796400001500,"node":"n1","source":"cluster","level":"warning","kind":"takeover","message":"taking over\u0007 the peer"}]"#,
        )
        .expect("JSON");
        let text = node_events(v.as_array().expect("array"));
        assert_eq!(
            text,
            "     1 2026-12-04 16:00:00.000 info    duplexd   node-started: duplexd started node n1\n    12 2026-12-04 16:00:01.500 warning cluster   takeover: taking over? the peer\n"
        );
        // Leap years and month ends.
        assert_eq!(civil_date(0), (1970, 1, 1));
        assert_eq!(civil_date(11_016), (2000, 2, 29));
        assert_eq!(civil_date(20_819), (2027, 1, 1));
    }
}
