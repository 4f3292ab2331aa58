//! Host reservations (NVM Express Base Specification 2.0, 8.19): Reservation Register, Acquire,
//! Release and Report, the Reservation Persistence feature, and reservation notices.
//!
//! The state of a namespace's reservation is the cluster's, kept with its pool on the drives by
//! the metadata service (ONDISK record 10), so that it is the same through either controller
//! and survives a fabric crash, a restart and a takeover. A change (Register, Acquire, Release,
//! Set Features Reservation Persistence) is therefore a round trip: the fabric sends the
//! host's command on the reservation channel ([`duplex_ipc::resv`]); the metadata service
//! applies the reservation model to the kept state, commits it to the pool's drives, publishes
//! the export table and answers with the state after it. The fabric takes that state at once
//! (every I/O command after the completion meets it), raises the notices the model names and
//! completes the host's command with the model's status. Report is answered here, from the
//! state the export table (or the last answer) gave.
//!
//! One change is in flight at a time (the channel's order is the commit order); a change the
//! metadata service does not answer within [`crate::resv_channel::CALL_PATIENCE`] completes with Command
//! Interrupted, which the host retries. Whether it was carried out the host learns from a
//! Report (as after any interrupted command).
//!
//! Preempt and Abort: commands of the preempted hosts that have not reached the datapath when
//! the new state is taken are refused with Reservation Conflict (every I/O command is checked
//! when it starts and again once its data has arrived); commands already in the datapath
//! complete (they were admitted under the state before the preempt).

use std::rc::Rc;
use std::sync::Arc;

use duplex_ipc::resv::{ResvCommand, ResvReply, ResvRequest};
use duplex_nvme::cmd::Sqe;
use duplex_nvme::resv::{opc, Acquire, Register, Release, Report, Reservations};
use duplex_nvme::status::{generic, path, Status};

use crate::command::{DataIn, Reply};
use crate::controller::Controller;
use crate::queue::Queue;
use crate::resv_channel::CallError;
use crate::subsystem::Namespace;

/// Command Interrupted (generic 21h, retryable): no answer in time.
const COMMAND_INTERRUPTED: Status = Status::new(0, 0x21);
/// Largest data buffer a reservation command may carry.
const MAX_RESV_DATA: usize = 4096;

/// Whether `opcode` is a reservation command.
pub fn is_reservation(opcode: u8) -> bool {
    matches!(
        opcode,
        opc::REGISTER | opc::REPORT | opc::ACQUIRE | opc::RELEASE
    )
}

/// Executes reservation command `sqe` on namespace `ns` (its path and ANA state checked by the
/// caller).
pub async fn execute(
    q: &Rc<Queue>,
    ctrl: &Arc<Controller>,
    ns: &Namespace,
    sqe: &Sqe,
    data: DataIn,
) -> Reply {
    // Only exported namespaces keep reservation state (with their pool); those of the node
    // config's static subsystems do not support reservations.
    if !ctrl.subsys.exported || q.shared.target.resv_client().is_none() {
        return Reply::status(generic::INVALID_OPCODE);
    }
    if sqe.opcode == opc::REPORT {
        if !matches!(data, DataIn::None) {
            return Reply::status(generic::INVALID_FIELD);
        }
        return report(q, ns, sqe);
    }
    if sqe.sgl().length as usize > MAX_RESV_DATA {
        return Reply::status(generic::SGL_LENGTH);
    }
    let data = match q.host_data(sqe.cid, data).await {
        Ok(d) => d,
        Err(s) => return Reply::status(s),
    };
    // The command checked here first (reserved values, short data, no host identifier): a
    // malformed one costs no round trip, and gets its error while the metadata service is
    // away too.
    let checked = match sqe.opcode {
        opc::REGISTER => Register::decode(sqe.cdw10, &data).map(|_| ()),
        opc::ACQUIRE => Acquire::decode(sqe.cdw10, &data).map(|_| ()),
        _ => Release::decode(sqe.cdw10, &data).map(|_| ()),
    };
    if let Err(status) = checked {
        return Reply::status(status);
    }
    if ctrl.hostid == [0; 16] {
        q.shared.note(
            q.peer,
            "reservation command from a host without a host identifier refused",
        );
        return Reply::status(generic::INVALID_FIELD);
    }
    let command = match sqe.opcode {
        opc::REGISTER => ResvCommand::Register {
            cdw10: sqe.cdw10,
            data: cut(data, 16),
        },
        opc::ACQUIRE => ResvCommand::Acquire {
            cdw10: sqe.cdw10,
            data: cut(data, 16),
        },
        _ => ResvCommand::Release {
            cdw10: sqe.cdw10,
            data: cut(data, 8),
        },
    };
    change(q, ctrl, ns, command).await.into()
}

/// The data the model reads (the rest of a longer buffer is the host's padding).
fn cut(mut data: Vec<u8>, n: usize) -> Vec<u8> {
    data.truncate(n);
    data
}

fn report(q: &Queue, ns: &Namespace, sqe: &Sqe) -> Reply {
    let r = Report::decode(sqe.cdw10, sqe.cdw11);
    let len = (r.len as usize).min(sqe.sgl().length as usize);
    if len > crate::command::MAX_TRANSFER {
        return Reply::status(generic::INVALID_FIELD);
    }
    let model = q.shared.target.reservation(&ns.nguid).unwrap_or_default();
    match model.report(r.eds, len) {
        Ok(mut b) => {
            b.resize(len, 0);
            Reply::data(b)
        }
        Err(s) => Reply::status(s),
    }
}

/// Carries a change to the metadata service and takes its answer.
pub async fn change(
    q: &Rc<Queue>,
    ctrl: &Arc<Controller>,
    ns: &Namespace,
    command: ResvCommand,
) -> Status {
    let target = &q.shared.target;
    let Some(client) = target.resv_client() else {
        q.shared.note(
            q.peer,
            "reservation command refused: this node keeps no reservation state",
        );
        return generic::INVALID_OPCODE;
    };
    let name = command.name();
    let request = ResvRequest {
        subnqn: ctrl.subsys.nqn.clone(),
        nsid: ns.nsid,
        host_id: ctrl.hostid,
        // The dynamic controller model: Reservation Report shows FFFFh.
        cntlid: 0xFFFF,
        command,
    };
    match client.call(&request).await {
        Ok(ResvReply::Done(done)) => {
            let status = Status(done.status);
            if status.is_success() {
                target.take_reservation(ns.nguid, &done.state);
                for n in &done.notices {
                    target.reservation_notice(&ctrl.subsys, ns.nsid, n.to.host_id, n.kind);
                }
                tracing::info!(cntlid = ctrl.cntlid, host = %ctrl.hostnqn, nsid = ns.nsid, command = name,
                    generation = done.state.generation, rtype = done.state.rtype,
                    aborted_hosts = done.aborts.len(), "reservation changed");
            } else {
                q.shared.note(
                    q.peer,
                    &format!(
                        "reservation {name} on namespace {} refused: {status}",
                        ns.nsid
                    ),
                );
            }
            status
        }
        Ok(ResvReply::NotOwner) => {
            // The export table says this path serves the namespace, the drives say the peer
            // owns its pool: a move or takeover is under way. The host retries.
            q.shared.note(
                q.peer,
                &format!(
                    "reservation {name} on namespace {}: the pool is the peer's now",
                    ns.nsid
                ),
            );
            path::ANA_TRANSITION
        }
        Ok(ResvReply::Error(e)) => {
            // The commit failed, the service restarted under it, or the node is joining: it
            // may or may not have been carried out; the host retries (and can Report).
            q.shared.warn(
                q.peer,
                &format!(
                    "reservation {name} on namespace {} not carried out: {e}",
                    ns.nsid
                ),
            );
            COMMAND_INTERRUPTED
        }
        Err(CallError::Timeout) => {
            q.shared.warn(q.peer, &format!("reservation {name} on namespace {}: the metadata service did not answer in time", ns.nsid));
            COMMAND_INTERRUPTED
        }
        Err(CallError::Channel(e)) => {
            q.shared.warn(
                q.peer,
                &format!(
                    "reservation {name} on namespace {}: the reservation channel failed: {e}",
                    ns.nsid
                ),
            );
            COMMAND_INTERRUPTED
        }
    }
}

/// The reservation model of a namespace as this fabric has it (none: no state yet).
pub fn model_of(q: &Queue, ns: &Namespace) -> Reservations {
    q.shared.target.reservation(&ns.nguid).unwrap_or_default()
}
