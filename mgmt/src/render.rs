//! What duplexctl prints: tables for people, one JSON document for scripts.
//!
//! JSON field names are snake_case and stable (documented in `docs/OPERATOR.md`); numbers are
//! raw (milliseconds, pids with 0 for "none"), text is as the supervisor sent it. The human
//! forms humanise durations and replace control characters in text that came from the node, so
//! that nothing printed can drive the terminal.

use duplex_ipc::admin::{NodeStatus, ServiceInfo};
use serde::Serialize;

use crate::client::human_duration;

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
    let mut widths = HEADER.map(str::len);
    for row in &rows {
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
    line(&HEADER.map(String::from));
    for row in &rows {
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

#[cfg(test)]
mod tests {
    use super::*;
    use duplex_ipc::admin::ServiceState;

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
}
