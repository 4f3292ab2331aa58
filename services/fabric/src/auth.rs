//! In-band authentication of a queue (DH-HMAC-CHAP, the controller's side; the protocol is
//! `duplex_nvme::auth`). A host allowed on a subsystem with secrets must authenticate every
//! queue it connects: its Connect is answered with ATR (authentication required) in dword 0,
//! then the host runs a transaction of Authentication Send and Receive commands on that queue;
//! until it succeeds every other command there but Property Get/Set is answered Authentication
//! Required (with DNR). A failed transaction is answered with AUTH_Failure1 and leaves the queue
//! unauthenticated (the host gives up: Linux fails the connect with "key rejected"). A host may
//! authenticate an authenticated queue again (a new negotiate); its commands go on meanwhile.
//!
//! The secrets are unsealed from the export table at Connect (and at a new negotiate) with the
//! array's secrets key; a host whose secrets this node cannot unseal (another key) is refused at
//! Connect, with a log line saying why.

use std::rc::Rc;
use std::sync::Arc;

use duplex_nvme::auth::{self, Outcome, Secret, Session};
use duplex_nvme::cmd::Sqe;
use duplex_nvme::status::{generic, specific};

use crate::command::{DataIn, Reply};
use crate::queue::{Queue, Role};
use crate::subsystem::Subsystem;

/// Where a queue's authentication stands.
#[derive(Debug, Default)]
pub enum QueueAuth {
    /// No secret for this host: nothing to do.
    #[default]
    NotRequired,
    /// A transaction is running, or due.
    Pending {
        /// The transaction.
        session: Box<Session>,
        /// The queue had authenticated before (a host authenticating again): its commands
        /// go on meanwhile.
        reauth: bool,
    },
    /// The host authenticated on this queue.
    Authenticated,
    /// The last transaction failed.
    Failed,
}

impl QueueAuth {
    /// Whether commands may run.
    pub fn allows_commands(&self) -> bool {
        matches!(
            self,
            Self::NotRequired | Self::Authenticated | Self::Pending { reauth: true, .. }
        )
    }
}

/// Connect dword 0: authentication required (AUTHREQ.ATR).
pub const CONNECT_ATR: u32 = 1 << 17;
/// The largest Authentication Send payload taken (a reply with the largest hash and a DH value
/// of the largest group is under 1.2 KiB).
pub const MAX_SEND: u32 = 8192;
/// The largest Authentication Receive buffer filled.
pub const MAX_RECEIVE: u32 = 8192;

/// At Connect of `hostnqn` to `subsys` on `q`: a session when the host must authenticate,
/// `None` when it need not, or the refusal.
pub fn begin(q: &Queue, subsys: &Subsystem, hostnqn: &str) -> Result<Option<Session>, Reply> {
    let Some(sealed) = subsys.sealed_secrets(hostnqn) else {
        return Ok(None);
    };
    let target = &q.shared.target;
    let unsealed = match target.secrets_key() {
        None => Err("this node has no secrets key ([secrets] key_file): it cannot check the host's DH-HMAC-CHAP secret".to_owned()),
        Some(key) => duplex_ondisk::secrets::unseal(key, &subsys.nqn, hostnqn, &sealed)
            .map_err(|e| e.to_string())
            .and_then(|keys| {
                let Some(h) = keys.dhchap else {
                    return Ok(None);
                };
                let host = Secret::parse(&h).map_err(|e| e.to_string())?;
                let ctrl = keys
                    .dhchap_ctrl
                    .map(|c| Secret::parse(&c))
                    .transpose()
                    .map_err(|e| e.to_string())?;
                Ok(Some((host, ctrl)))
            }),
    };
    match unsealed {
        // Only a TLS PSK for this host: no in-band authentication.
        Ok(None) => Ok(None),
        Ok(Some((host, ctrl))) => Ok(Some(Session::new(
            &host,
            ctrl.as_ref(),
            hostnqn,
            &subsys.nqn,
        ))),
        Err(why) => {
            let msg = format!(
                "host {hostnqn} refused on {}: its secrets cannot be used here: {why}",
                subsys.nqn
            );
            q.shared.warn(q.peer, &msg);
            target.count_host(true, "secrets-unusable");
            target.host_event(duplex_ipc::control::EventLevel::Error, "host-refused", &msg);
            // The host NQN, at byte 512 of the Connect data.
            Err(crate::conn::bad_data(specific::CONNECT_INVALID_HOST, 512))
        }
    }
}

/// Checks SECP, SPSP0 and SPSP1 (dword 10) and the length (dword 11) against the SGL's.
fn check_fields(sqe: &Sqe, max: u32) -> Result<u32, Reply> {
    let [_, spsp0, spsp1, secp] = sqe.cdw10.to_le_bytes();
    if secp != auth::SECP || spsp0 != auth::SPSP0 || spsp1 != auth::SPSP1 {
        return Err(Reply::status(generic::INVALID_FIELD));
    }
    let len = sqe.cdw11;
    if len == 0 || len > max {
        return Err(Reply::status(generic::INVALID_FIELD));
    }
    if sqe.sgl().length != len {
        return Err(Reply::status(generic::SGL_INVALID_DATA));
    }
    Ok(len)
}

fn is_negotiate(msg: &[u8]) -> bool {
    msg.len() >= 2 && msg[0] == auth::COMMON_MESSAGES && msg[1] == auth::id::NEGOTIATE
}

/// Authentication Send on `q`.
pub async fn send(q: &Rc<Queue>, sqe: Sqe, data: DataIn) -> Reply {
    if let Err(r) = check_fields(&sqe, MAX_SEND) {
        return r;
    }
    let msg = match q.host_data(sqe.cid, data).await {
        Ok(d) => d,
        Err(s) => return Reply::status(s),
    };
    let mut random = [0u8; 64];
    if let Err(e) = getrandom::fill(&mut random) {
        tracing::error!(error = %e, "no random bytes for a DH-HMAC-CHAP challenge");
        return Reply::status(generic::INTERNAL);
    }
    let random = |buf: &mut [u8]| {
        let n = buf.len().min(random.len());
        buf[..n].copy_from_slice(&random[..n]);
    };
    let seq = q.shared.target.next_auth_seq();
    let state = std::mem::take(&mut *q.auth.borrow_mut());
    let (mut session, reauth) = match state {
        QueueAuth::NotRequired => return Reply::status(generic::INVALID_FIELD),
        QueueAuth::Pending { session, reauth } => (session, reauth),
        // A new negotiate on a queue done or failed: a host authenticating again.
        QueueAuth::Authenticated | QueueAuth::Failed if is_negotiate(&msg) => {
            let was = matches!(state, QueueAuth::Authenticated);
            let ctrl = match &*q.role.borrow() {
                Role::Admin(c) | Role::Io(c, _) => Arc::clone(c),
                Role::Unconnected => return Reply::status(generic::SEQUENCE),
            };
            match begin(q, &ctrl.subsys, &ctrl.hostnqn) {
                Ok(Some(s)) => (Box::new(s), was),
                Ok(None) | Err(_) => {
                    *q.auth.borrow_mut() = QueueAuth::Failed;
                    return Reply::status(generic::INVALID_FIELD);
                }
            }
        }
        other => {
            *q.auth.borrow_mut() = other;
            return Reply::status(generic::SEQUENCE);
        }
    };
    let outcome = session.send(&msg, random, seq);
    let failure_due = session.has_outgoing();
    *q.auth.borrow_mut() = QueueAuth::Pending { session, reauth };
    match outcome {
        Outcome::Continue => {}
        Outcome::Authenticated => authenticated(q),
        Outcome::Failed(why) => {
            failed(q, &why);
            if !failure_due {
                // The host failed us (failure2): nothing more to send.
                *q.auth.borrow_mut() = QueueAuth::Failed;
            }
        }
    }
    Reply::ok(0)
}

/// Authentication Receive on `q`: the message due, zero-filled to the host's buffer.
pub fn receive(q: &Rc<Queue>, sqe: &Sqe) -> Reply {
    let al = match check_fields(sqe, MAX_RECEIVE) {
        Ok(al) => al,
        Err(r) => return r,
    };
    let mut state = q.auth.borrow_mut();
    let QueueAuth::Pending { session, .. } = &mut *state else {
        return Reply::status(generic::SEQUENCE);
    };
    let Some((msg, outcome)) = session.receive() else {
        return Reply::status(generic::SEQUENCE);
    };
    drop(state);
    if msg.len() > al as usize {
        *q.auth.borrow_mut() = QueueAuth::Failed;
        return Reply::status(generic::INVALID_FIELD);
    }
    match outcome {
        Outcome::Continue => {}
        Outcome::Authenticated => authenticated(q),
        // The failure was said when it happened; the host has its Failure1 now.
        Outcome::Failed(_) => *q.auth.borrow_mut() = QueueAuth::Failed,
    }
    let mut data = msg;
    data.resize(al as usize, 0);
    Reply::data(data)
}

fn authenticated(q: &Queue) {
    *q.auth.borrow_mut() = QueueAuth::Authenticated;
    tracing::info!(peer = %q.peer, qid = q.qid.get(), "host authenticated (DH-HMAC-CHAP)");
}

fn failed(q: &Queue, why: &str) {
    let msg = format!(
        "authentication failed on queue {} (DH-HMAC-CHAP): {why}",
        q.qid.get()
    );
    q.shared.warn(q.peer, &msg);
    let target = &q.shared.target;
    target.count_host(true, "auth-failed");
    target.host_event(
        duplex_ipc::control::EventLevel::Warning,
        "host-refused",
        &format!("{msg} (from {})", q.peer),
    );
}
