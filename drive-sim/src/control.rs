//! The control socket of a running simulator: fault injection, power and presence, status.
//!
//! A Unix stream socket; each request is one line of JSON, answered by one line of JSON.
//!
//! | request | effect | answer |
//! |---|---|---|
//! | `{"op":"status"}` | | `powered`, `present`, `cached_blocks`, `write_seq` (writes executed, drive-wide), `port_writes` (per port's controller: `cntlid`, `writes`, `last_seq`), `preempts` (the newest 64 registrations removed by Acquire: `by_cntlid`, `victims`, `write_seq` then, `seq` its number among all), `sockets`, `faults` (with ids), `reservation` (generation, type, registrants) |
//! | `{"op":"inject","fault":{"kind":...}}` | adds a [`Fault`] | `id` |
//! | `{"op":"clear","id":N}` / `{"op":"clear"}` | removes one fault / all | `cleared` |
//! | `{"op":"power_cut"}` | loses the write cache, ports vanish | `lost_blocks` |
//! | `{"op":"power_on"}` | power back, ports back | |
//! | `{"op":"pull"}` / `{"op":"insert"}` | ports vanish / come back (data kept) | |
//! | `{"op":"pull","port":N}` / `{"op":"insert","port":N}` | port N's cable pulled / plugged back (the drive and its other port go on) | |
//! | `{"op":"flush"}` | destages the write cache | |
//! | `{"op":"rot","lba":N,"bit":B}` | the medium rots: bit B of block N inverted, its metadata kept | |
//!
//! Every answer has `"ok": true`, or `"ok": false` and `"error"`. A line longer than
//! [`MAX_LINE`] or that is not a request is answered with an error; the connection goes on.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::drive::Fault;
use crate::lock;
use crate::port::Ports;

/// Longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;

/// A control request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// State of the drive.
    Status,
    /// Add a fault.
    Inject {
        /// The fault.
        fault: Fault,
    },
    /// Remove one fault (`id`) or all.
    Clear {
        /// The fault's id; all faults when absent.
        #[serde(default)]
        id: Option<u64>,
    },
    /// Cut the power.
    PowerCut,
    /// Restore the power.
    PowerOn,
    /// Pull the drive (ports vanish), or with `port` that port's cable alone.
    Pull {
        /// One port (from 0); the whole drive when absent.
        #[serde(default)]
        port: Option<usize>,
    },
    /// Insert the drive again, or with `port` plug that port back in.
    Insert {
        /// One port (from 0); the whole drive when absent.
        #[serde(default)]
        port: Option<usize>,
    },
    /// Destage the write cache.
    Flush,
    /// The medium rots: one bit of block `lba` inverted, its metadata unchanged
    /// ([`crate::Drive::rot`]).
    Rot {
        /// The block.
        lba: u64,
        /// The bit within it.
        #[serde(default)]
        bit: u32,
    },
}

/// Carries out one request.
pub fn handle(ports: &Mutex<Ports>, req: Request) -> Value {
    let mut p = lock(ports);
    let drive = p.drive().clone();
    let r: Result<Value, String> = match req {
        Request::Status => {
            let resv = drive.reservations();
            let (write_seq, port_writes) = drive.port_writes();
            let faults: Vec<Value> = drive
                .faults()
                .into_iter()
                .map(|(id, f)| json!({"id": id, "fault": f}))
                .collect();
            Ok(json!({
                "powered": drive.is_powered(),
                "present": p.present(),
                "cached_blocks": drive.cached_blocks(),
                "write_seq": write_seq,
                "port_writes": port_writes,
                "preempts": drive.preempts(),
                "sockets": p.sockets(),
                "ports_present": p.ports_present(),
                "faults": faults,
                "reservation": {
                    "generation": resv.generation(),
                    "type": resv.rtype().map(|t| format!("{t:?}")),
                    "holder": resv.holder().map(|h| format!("{h:?}")),
                    "registrants": resv.registrants().iter().map(|r| json!({
                        "host": format!("{:?}", r.host), "cntlid": r.cntlid, "key": r.key,
                    })).collect::<Vec<_>>(),
                },
            }))
        }
        Request::Inject { fault } => {
            tracing::info!(?fault, "fault injected");
            Ok(json!({"id": drive.inject(fault)}))
        }
        Request::Clear { id: Some(id) } => Ok(json!({"cleared": drive.clear_fault(id)})),
        Request::Clear { id: None } => {
            drive.clear_faults();
            Ok(json!({"cleared": true}))
        }
        Request::PowerCut => {
            let report = drive.power_cut();
            p.pull();
            tracing::warn!(lost_blocks = report.lost_blocks, "power cut");
            Ok(json!({"lost_blocks": report.lost_blocks}))
        }
        Request::PowerOn => {
            drive.power_on();
            p.insert().map(|()| json!({})).map_err(|e| e.to_string())
        }
        Request::Pull { port: None } => {
            p.pull();
            Ok(json!({}))
        }
        Request::Pull { port: Some(i) } => p.pull_port(i).map(|()| json!({})),
        Request::Insert { port: None } => p.insert().map(|()| json!({})).map_err(|e| e.to_string()),
        Request::Insert { port: Some(i) } => p.insert_port(i).map(|()| json!({})),
        Request::Flush => drive
            .destage()
            .map(|()| json!({}))
            .map_err(|e| e.to_string()),
        Request::Rot { lba, bit } => drive
            .rot(lba, bit)
            .map(|()| json!({}))
            .map_err(|e| e.to_string()),
    };
    match r {
        Ok(mut v) => {
            if let Some(o) = v.as_object_mut() {
                o.insert("ok".into(), Value::Bool(true));
            }
            v
        }
        Err(e) => json!({"ok": false, "error": e}),
    }
}

/// Answers one request line.
pub fn answer_line(ports: &Mutex<Ports>, line: &str) -> Value {
    match serde_json::from_str::<Request>(line) {
        Ok(req) => handle(ports, req),
        Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
    }
}

/// Serves the control socket until the listener fails (a thread per connection).
pub fn serve_control(listener: UnixListener, ports: Arc<Mutex<Ports>>) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let ports = ports.clone();
                let spawned = std::thread::Builder::new()
                    .name("control".into())
                    .spawn(move || connection(stream, &ports));
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot serve a control connection");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                return;
            }
        }
    }
}

fn connection(stream: UnixStream, ports: &Mutex<Ports>) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        let n = match (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(n) => n,
            Err(_) => return,
        };
        if n == 0 {
            return;
        }
        let answer = if line.len() > MAX_LINE {
            // Skip the rest of the overlong line.
            if !line.ends_with(b"\n") {
                loop {
                    let buf = match reader.fill_buf() {
                        Ok(b) if !b.is_empty() => b,
                        _ => return,
                    };
                    if let Some(i) = buf.iter().position(|&b| b == b'\n') {
                        reader.consume(i + 1);
                        break;
                    }
                    let n = buf.len();
                    reader.consume(n);
                }
            }
            json!({"ok": false, "error": format!("request longer than {MAX_LINE} bytes")})
        } else {
            match std::str::from_utf8(&line) {
                Ok(s) if s.trim().is_empty() => continue,
                Ok(s) => answer_line(ports, s.trim()),
                Err(_) => json!({"ok": false, "error": "request is not UTF-8"}),
            }
        };
        let mut text = answer.to_string();
        text.push('\n');
        if out.write_all(text.as_bytes()).is_err() {
            return;
        }
    }
}

/// Sends one request to a control socket and returns the answer (the CLI's and tests' side).
pub fn request(socket: &std::path::Path, req: &Request) -> std::io::Result<Value> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(s)
        .take(MAX_LINE as u64 * 16)
        .read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(std::io::Error::other)
}
