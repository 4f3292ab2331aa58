//! The host's side of in-band authentication (DH-HMAC-CHAP, NULL DH group): what
//! `nvme connect --dhchap-secret [--dhchap-ctrl-secret]` does on each queue, for tests and
//! tools that reach duplex without the Linux host. The protocol is `duplex_nvme::auth`.

use duplex_nvme::auth::{self, id, Hash, Secret};
use duplex_nvme::cmd::Sqe;
use duplex_nvme::spec::{admin, fctype};

use crate::queue::{Data, Queue};
use crate::{HostError, Result};

/// Why authentication failed, as the host sees it.
fn fail(what: impl Into<String>) -> HostError {
    HostError::Unexpected(format!("authentication: {}", what.into()))
}

/// An Authentication Send (`send`) or Receive of `len` bytes.
pub fn auth_sqe(send: bool, len: u32) -> Sqe {
    let mut sqe = Sqe {
        opcode: admin::FABRICS,
        // The fabrics command type is byte 4 (where the namespace id is elsewhere).
        nsid: u32::from(if send {
            fctype::AUTH_SEND
        } else {
            fctype::AUTH_RECV
        }),
        ..Sqe::default()
    };
    sqe.cdw10 = u32::from_le_bytes([0, auth::SPSP0, auth::SPSP1, auth::SECP]);
    sqe.cdw11 = len;
    sqe
}

/// AUTH_Negotiate offering the hashes `hashes` and the NULL DH group.
pub fn negotiate(tid: u16, hashes: &[u8], dhgroups: &[u8]) -> Vec<u8> {
    let mut m = vec![0u8; 8 + auth::DESCRIPTOR_LEN];
    m[4..6].copy_from_slice(&tid.to_le_bytes());
    m[7] = 1;
    m[8] = auth::AUTHID_DHCHAP;
    m[10] = hashes.len() as u8;
    m[11] = dhgroups.len() as u8;
    m[12..12 + hashes.len()].copy_from_slice(hashes);
    m[42..42 + dhgroups.len()].copy_from_slice(dhgroups);
    m
}

fn send(q: &mut Queue, msg: Vec<u8>) -> Result<()> {
    let len = msg.len() as u32;
    q.execute(auth_sqe(true, len), Data::Out(msg))?.ok()?;
    Ok(())
}

fn receive(q: &mut Queue) -> Result<Vec<u8>> {
    Ok(q.execute(auth_sqe(false, 4096), Data::In(4096))?.ok()?.data)
}

/// Authenticates queue `q` (just connected, [`Queue::auth_required`]) as `hostnqn` on
/// `subnqn` with `host`'s secret; with `ctrl`, the controller too. `tid` names the
/// transaction, `c2` is the host's challenge to the controller.
pub fn authenticate(
    q: &mut Queue,
    subnqn: &str,
    hostnqn: &str,
    host: &Secret,
    ctrl: Option<&Secret>,
    tid: u16,
    c2: &[u8; 64],
) -> Result<()> {
    send(q, negotiate(tid, &[1, 2, 3], &[auth::DHGROUP_NULL]))?;
    let ch = receive(q)?;
    if ch.len() >= 8 && ch[1] == id::FAILURE1 {
        return Err(fail(format!(
            "the controller refused the negotiate (explanation {:#04x})",
            ch[7]
        )));
    }
    if ch.len() < 16 || ch[0] != auth::DHCHAP_MESSAGES || ch[1] != id::CHALLENGE {
        return Err(fail("no challenge"));
    }
    let hash = Hash::from_id(ch[8]).ok_or_else(|| fail("an unknown hash"))?;
    let hl = usize::from(ch[6]);
    if hl != hash.digest_len() || ch[9] != auth::DHGROUP_NULL || ch.len() < 16 + hl {
        return Err(fail("a challenge this host cannot answer"));
    }
    if u16::from_le_bytes([ch[4], ch[5]]) != tid {
        return Err(fail("a challenge of another transaction"));
    }
    let s1 = u32::from_le_bytes([ch[12], ch[13], ch[14], ch[15]]);
    let c1 = &ch[16..16 + hl];
    let r1 = auth::response(
        hash,
        &host.transformed(hostnqn),
        c1,
        s1,
        tid,
        0,
        b"HostHost",
        hostnqn,
        subnqn,
    );
    let s2: u32 = 0x5EED_0001;
    let mut reply = vec![0u8; 16 + 2 * hl];
    reply[0] = auth::DHCHAP_MESSAGES;
    reply[1] = id::REPLY;
    reply[4..6].copy_from_slice(&tid.to_le_bytes());
    reply[6] = hl as u8;
    reply[8] = u8::from(ctrl.is_some());
    reply[12..16].copy_from_slice(&s2.to_le_bytes());
    reply[16..16 + hl].copy_from_slice(&r1);
    let c2 = &c2[..hl];
    if ctrl.is_some() {
        reply[16 + hl..16 + 2 * hl].copy_from_slice(c2);
    }
    send(q, reply)?;
    let ok = receive(q)?;
    if ok.len() >= 8 && ok[1] == id::FAILURE1 {
        return Err(fail(format!(
            "the controller failed this host (explanation {:#04x})",
            ok[7]
        )));
    }
    if ok.len() < 16 || ok[1] != id::SUCCESS1 || usize::from(ok[6]) != hl {
        return Err(fail("no success1"));
    }
    if let Some(ctrl) = ctrl {
        let expected = auth::response(
            hash,
            &ctrl.transformed(subnqn),
            c2,
            s2,
            tid,
            0,
            b"Controller",
            subnqn,
            hostnqn,
        );
        if ok[8] & 1 == 0 || ok.len() < 16 + hl || ok[16..16 + hl] != expected[..] {
            let mut f2 = vec![0u8; 8];
            f2[1] = id::FAILURE2;
            f2[4..6].copy_from_slice(&tid.to_le_bytes());
            f2[6] = auth::failure::REASON_FAILED;
            f2[7] = auth::failure::FAILED;
            send(q, f2)?;
            return Err(fail("the controller's response does not match its secret"));
        }
        let mut s2m = vec![0u8; 16];
        s2m[0] = auth::DHCHAP_MESSAGES;
        s2m[1] = id::SUCCESS2;
        s2m[4..6].copy_from_slice(&tid.to_le_bytes());
        send(q, s2m)?;
    }
    Ok(())
}
