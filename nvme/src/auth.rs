//! NVMe in-band authentication, DH-HMAC-CHAP (NVM Express Base Specification 2.0, 8.13), the
//! controller's side: the secret representation, the key transformation, the responses, the
//! messages carried by Authentication Send and Receive, and a transaction's state machine.
//!
//! Only the NULL Diffie-Hellman group is offered to hosts (the Linux host offers it; a host
//! that does not is answered with a failure, "DH group unusable"): the exchange authenticates
//! both sides but derives no session key (none is needed without a secure channel).
//!
//! Byte offsets are the specification's, written down from the message layouts of the Linux
//! kernel (`include/linux/nvme.h`, `struct nvmf_auth_dhchap_*`); the interop test is the Linux
//! 6.12 host connecting with `nvme connect --dhchap-secret` (`tests/interop_linux_auth.rs`).

use crate::keytext;
use hmac::Hmac;
use subtle::ConstantTimeEq;

/// The SECP of Authentication Send and Receive for in-band authentication.
pub const SECP: u8 = 0xE9;
/// SPSP0 and SPSP1 of an authentication transaction.
pub const SPSP0: u8 = 0x01;
/// See [`SPSP0`].
pub const SPSP1: u8 = 0x01;

/// `auth_type` of the messages every protocol shares (negotiate, failures).
pub const COMMON_MESSAGES: u8 = 0x00;
/// `auth_type` of DH-HMAC-CHAP's own messages.
pub const DHCHAP_MESSAGES: u8 = 0x01;

/// Message ids (`auth_id`).
pub mod id {
    /// AUTH_Negotiate.
    pub const NEGOTIATE: u8 = 0x00;
    /// DH-HMAC-CHAP_Challenge.
    pub const CHALLENGE: u8 = 0x01;
    /// DH-HMAC-CHAP_Reply.
    pub const REPLY: u8 = 0x02;
    /// DH-HMAC-CHAP_Success1.
    pub const SUCCESS1: u8 = 0x03;
    /// DH-HMAC-CHAP_Success2.
    pub const SUCCESS2: u8 = 0x04;
    /// AUTH_Failure2 (host to controller).
    pub const FAILURE2: u8 = 0xF0;
    /// AUTH_Failure1 (controller to host).
    pub const FAILURE1: u8 = 0xF1;
}

/// The protocol id of DH-HMAC-CHAP in a negotiate's protocol descriptor.
pub const AUTHID_DHCHAP: u8 = 0x01;
/// The NULL DH group.
pub const DHGROUP_NULL: u8 = 0x00;
/// Size of one protocol descriptor in AUTH_Negotiate.
pub const DESCRIPTOR_LEN: usize = 64;
/// Where a descriptor's DH group ids start in its id list (after 30 hash ids).
const DH_IDS_AT: usize = 30;

/// Failure reason codes and explanations (AUTH_Failure1/2).
pub mod failure {
    /// Reason: authentication failed.
    pub const REASON_FAILED: u8 = 0x01;
    /// Explanation: failed.
    pub const FAILED: u8 = 0x01;
    /// Explanation: protocol not usable.
    pub const NOT_USABLE: u8 = 0x02;
    /// Explanation: secure channel concatenation mismatch.
    pub const CONCAT_MISMATCH: u8 = 0x03;
    /// Explanation: hash function not usable.
    pub const HASH_UNUSABLE: u8 = 0x04;
    /// Explanation: DH group not usable.
    pub const DHGROUP_UNUSABLE: u8 = 0x05;
    /// Explanation: incorrect payload.
    pub const INCORRECT_PAYLOAD: u8 = 0x06;
    /// Explanation: incorrect protocol message.
    pub const INCORRECT_PROTOCOL: u8 = 0x07;
}

/// A hash function of DH-HMAC-CHAP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    /// SHA-256 (id 1).
    Sha256 = 1,
    /// SHA-384 (id 2).
    Sha384 = 2,
    /// SHA-512 (id 3).
    Sha512 = 3,
}

impl Hash {
    /// The hash of an id.
    pub fn from_id(id: u8) -> Option<Self> {
        match id {
            1 => Some(Self::Sha256),
            2 => Some(Self::Sha384),
            3 => Some(Self::Sha512),
            _ => None,
        }
    }

    /// Its output length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            Self::Sha256 => 32,
            Self::Sha384 => 48,
            Self::Sha512 => 64,
        }
    }

    /// HMAC of the concatenation of `parts` under `key`.
    pub fn hmac(self, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        match self {
            Self::Sha256 => keytext::hmac::<Hmac<sha2::Sha256>>(key, parts),
            Self::Sha384 => keytext::hmac::<Hmac<sha2::Sha384>>(key, parts),
            Self::Sha512 => keytext::hmac::<Hmac<sha2::Sha512>>(key, parts),
        }
    }
}

/// Why a secret representation is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// Not `DHHC-1:XX:base64:`.
    #[error(
        "not a DH-HMAC-CHAP secret: expected DHHC-1:XX:<base64>: (as `nvme gen-dhchap-key` prints)"
    )]
    Format,
    /// `XX` is not 00 to 03.
    #[error("unknown key transformation {0:?} (00: none, 01: SHA-256, 02: SHA-384, 03: SHA-512)")]
    Transform(String),
    /// The base64 does not decode.
    #[error("the key is not valid base64")]
    Base64,
    /// The key is not 32, 48 or 64 bytes.
    #[error("the key is {0} bytes; it must be 32, 48 or 64 (and its CRC-32)")]
    Length(usize),
    /// The CRC-32 after the key does not match it.
    #[error("the key's CRC-32 does not match: a mistyped secret")]
    Crc,
}

/// A DH-HMAC-CHAP secret: the key and how it is transformed before use.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    /// The transformation hash (`None`: the key is used as it is).
    pub transform: Option<Hash>,
    /// The key (32, 48 or 64 bytes).
    pub key: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("transform", &self.transform)
            .field("key", &format_args!("<{} bytes>", self.key.len()))
            .finish()
    }
}

impl Secret {
    /// Parses the representation `DHHC-1:XX:<base64 of key and its CRC-32>:` (the trailing
    /// colon optional).
    pub fn parse(text: &str) -> Result<Self, SecretError> {
        let (xx, raw) = keytext::split(text, "DHHC-1:").map_err(|e| match e {
            keytext::Bad::Format => SecretError::Format,
            keytext::Bad::Base64 => SecretError::Base64,
        })?;
        let transform = match xx {
            "00" => None,
            "01" => Some(Hash::Sha256),
            "02" => Some(Hash::Sha384),
            "03" => Some(Hash::Sha512),
            other => return Err(SecretError::Transform(other.to_owned())),
        };
        let len = raw.len().saturating_sub(4);
        if raw.len() < 4 || ![32, 48, 64].contains(&len) {
            return Err(SecretError::Length(len));
        }
        if !keytext::crc_matches(&raw, len) {
            return Err(SecretError::Crc);
        }
        Ok(Self {
            transform,
            key: raw[..len].to_vec(),
        })
    }

    /// The representation of this secret.
    pub fn to_text(&self) -> String {
        keytext::encode("DHHC-1:", self.transform.map_or(0, |h| h as u8), &self.key)
    }

    /// The key as used for `nqn` (the host's NQN for the host's secret, the subsystem's for
    /// the controller's): `HMAC(key, nqn || "NVMe-over-Fabrics")` with the transformation hash,
    /// or the key itself.
    pub fn transformed(&self, nqn: &str) -> Vec<u8> {
        match self.transform {
            None => self.key.clone(),
            Some(h) => h.hmac(&self.key, &[nqn.as_bytes(), b"NVMe-over-Fabrics"]),
        }
    }
}

/// The response to challenge `c` (`HMAC(key, c || le32 seq || le16 tid || sc_c || role ||
/// first || 0x00 || second)`): the host's with role `HostHost`, first the host NQN, second the
/// subsystem NQN; the controller's with role `Controller` and the NQNs the other way round.
#[allow(clippy::too_many_arguments)]
pub fn response(
    hash: Hash,
    key: &[u8],
    challenge: &[u8],
    seq: u32,
    tid: u16,
    sc_c: u8,
    role: &[u8],
    first: &str,
    second: &str,
) -> Vec<u8> {
    hash.hmac(
        key,
        &[
            challenge,
            &seq.to_le_bytes(),
            &tid.to_le_bytes(),
            &[sc_c],
            role,
            first.as_bytes(),
            &[0],
            second.as_bytes(),
        ],
    )
}

/// What a negotiate offers, as parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiate {
    /// Transaction id.
    pub tid: u16,
    /// Secure channel concatenation requested.
    pub sc_c: u8,
    /// The hash ids the host offers for DH-HMAC-CHAP.
    pub hashes: Vec<u8>,
    /// The DH group ids it offers.
    pub dhgroups: Vec<u8>,
}

/// A message refused, with the failure explanation to answer it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The failure explanation ([`failure`]).
    pub explanation: u8,
    /// For the log.
    pub why: String,
}

fn refuse(explanation: u8, why: impl Into<String>) -> Refusal {
    Refusal {
        explanation,
        why: why.into(),
    }
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

impl Negotiate {
    /// Parses AUTH_Negotiate.
    pub fn parse(b: &[u8]) -> Result<Self, Refusal> {
        if b.len() < 8 {
            return Err(refuse(
                failure::INCORRECT_PAYLOAD,
                "negotiate shorter than its header",
            ));
        }
        if b[0] != COMMON_MESSAGES || b[1] != id::NEGOTIATE {
            return Err(refuse(
                failure::INCORRECT_PROTOCOL,
                format!(
                    "expected a negotiate, got type {:#04x} id {:#04x}",
                    b[0], b[1]
                ),
            ));
        }
        let napd = usize::from(b[7]);
        if napd == 0 || b.len() < 8 + napd * DESCRIPTOR_LEN {
            return Err(refuse(
                failure::INCORRECT_PAYLOAD,
                format!("{napd} protocol descriptors in {} bytes", b.len()),
            ));
        }
        for d in 0..napd {
            let at = 8 + d * DESCRIPTOR_LEN;
            let desc = &b[at..at + DESCRIPTOR_LEN];
            if desc[0] != AUTHID_DHCHAP {
                continue;
            }
            let (halen, dhlen) = (usize::from(desc[2]), usize::from(desc[3]));
            if halen > DH_IDS_AT || dhlen > DESCRIPTOR_LEN - 4 - DH_IDS_AT {
                return Err(refuse(
                    failure::INCORRECT_PAYLOAD,
                    "id list lengths too large",
                ));
            }
            return Ok(Self {
                tid: u16_at(b, 4),
                sc_c: b[6],
                hashes: desc[4..4 + halen].to_vec(),
                dhgroups: desc[4 + DH_IDS_AT..4 + DH_IDS_AT + dhlen].to_vec(),
            });
        }
        Err(refuse(
            failure::NOT_USABLE,
            "no DH-HMAC-CHAP protocol descriptor",
        ))
    }
}

/// DH-HMAC-CHAP_Challenge (NULL DH group: no DH value).
pub fn challenge(tid: u16, hash: Hash, seq: u32, c1: &[u8]) -> Vec<u8> {
    let mut m = vec![0u8; 16 + c1.len()];
    m[0] = DHCHAP_MESSAGES;
    m[1] = id::CHALLENGE;
    m[4..6].copy_from_slice(&tid.to_le_bytes());
    m[6] = c1.len() as u8;
    m[8] = hash as u8;
    m[9] = DHGROUP_NULL;
    // dhvlen 0 at 10..12.
    m[12..16].copy_from_slice(&seq.to_le_bytes());
    m[16..].copy_from_slice(c1);
    m
}

/// A host's DH-HMAC-CHAP_Reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Transaction id.
    pub tid: u16,
    /// The host's response to the controller's challenge.
    pub r1: Vec<u8>,
    /// The host asks to authenticate the controller (bidirectional): its challenge and
    /// sequence number.
    pub c2: Option<(Vec<u8>, u32)>,
}

impl Reply {
    /// Parses a reply to a challenge of `hash` (NULL DH group: no DH value).
    pub fn parse(b: &[u8], hash: Hash) -> Result<Self, Refusal> {
        if b.len() < 16 {
            return Err(refuse(
                failure::INCORRECT_PAYLOAD,
                "reply shorter than its header",
            ));
        }
        if b[0] != DHCHAP_MESSAGES || b[1] != id::REPLY {
            return Err(refuse(
                failure::INCORRECT_PROTOCOL,
                format!("expected a reply, got type {:#04x} id {:#04x}", b[0], b[1]),
            ));
        }
        let hl = usize::from(b[6]);
        if hl != hash.digest_len() {
            return Err(refuse(
                failure::INCORRECT_PAYLOAD,
                format!("a {hl}-byte response to a {}-byte hash", hash.digest_len()),
            ));
        }
        let dhvlen = usize::from(u16_at(b, 10));
        if dhvlen != 0 {
            return Err(refuse(
                failure::INCORRECT_PAYLOAD,
                "a DH value in the reply to a NULL-group challenge",
            ));
        }
        if b.len() < 16 + 2 * hl {
            return Err(refuse(
                failure::INCORRECT_PAYLOAD,
                "reply shorter than its values",
            ));
        }
        let cvalid = b[8] != 0;
        let seq = u32_at(b, 12);
        Ok(Self {
            tid: u16_at(b, 4),
            r1: b[16..16 + hl].to_vec(),
            c2: cvalid.then(|| (b[16 + hl..16 + 2 * hl].to_vec(), seq)),
        })
    }
}

/// DH-HMAC-CHAP_Success1, with the controller's response when the host asked for one.
pub fn success1(tid: u16, hash: Hash, r2: Option<&[u8]>) -> Vec<u8> {
    let hl = hash.digest_len();
    let mut m = vec![0u8; 16 + hl];
    m[0] = DHCHAP_MESSAGES;
    m[1] = id::SUCCESS1;
    m[4..6].copy_from_slice(&tid.to_le_bytes());
    m[6] = hl as u8;
    if let Some(r2) = r2 {
        m[8] = 1;
        m[16..16 + hl].copy_from_slice(&r2[..hl.min(r2.len())]);
    }
    m
}

/// AUTH_Failure1 with `explanation`.
pub fn failure1(tid: u16, explanation: u8) -> Vec<u8> {
    let mut m = vec![0u8; 8];
    m[0] = COMMON_MESSAGES;
    m[1] = id::FAILURE1;
    m[4..6].copy_from_slice(&tid.to_le_bytes());
    m[6] = failure::REASON_FAILED;
    m[7] = explanation;
    m
}

/// Where one authentication transaction of a queue stands (the controller's side).
#[derive(Debug)]
pub struct Session {
    step: Step,
    tid: u16,
    hash: Hash,
    /// The host's secret, transformed for its NQN.
    host_key: Vec<u8>,
    /// The controller's secret, transformed for the subsystem NQN.
    ctrl_key: Option<Vec<u8>>,
    host_nqn: String,
    subsys_nqn: String,
    c1: Vec<u8>,
    s1: u32,
    /// The message the next Authentication Receive returns.
    outgoing: Option<Vec<u8>>,
}

/// The steps of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Waiting for AUTH_Negotiate.
    Negotiate,
    /// The challenge is ready for the host to receive.
    Challenge,
    /// Waiting for the host's reply.
    Reply,
    /// Success1 is ready.
    Success1,
    /// Waiting for Success2 (bidirectional) or nothing more.
    Success2,
    /// The host is authenticated.
    Done,
    /// Failure1 is ready, or was sent: the transaction failed.
    Failed,
}

/// What a host sent, as the controller takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Go on (a message is ready, or the next is awaited).
    Continue,
    /// The host is authenticated.
    Authenticated,
    /// The transaction failed; a Failure1 is ready (or the host sent a failure).
    Failed(String),
}

impl Session {
    /// A transaction for `host_nqn` on `subsys_nqn` with the host's secret and, for
    /// bidirectional authentication, the controller's.
    pub fn new(host: &Secret, ctrl: Option<&Secret>, host_nqn: &str, subsys_nqn: &str) -> Self {
        Self {
            step: Step::Negotiate,
            tid: 0,
            hash: Hash::Sha256,
            host_key: host.transformed(host_nqn),
            ctrl_key: ctrl.map(|c| c.transformed(subsys_nqn)),
            host_nqn: host_nqn.to_owned(),
            subsys_nqn: subsys_nqn.to_owned(),
            c1: Vec::new(),
            s1: 0,
            outgoing: None,
        }
    }

    /// Where the transaction stands.
    pub fn step(&self) -> Step {
        self.step
    }

    /// Whether a message waits for the host's Authentication Receive.
    pub fn has_outgoing(&self) -> bool {
        self.outgoing.is_some()
    }

    fn fail(&mut self, r: Refusal) -> Outcome {
        self.outgoing = Some(failure1(self.tid, r.explanation));
        self.step = Step::Failed;
        Outcome::Failed(r.why)
    }

    /// Takes the payload of an Authentication Send. `random` fills the challenge; `seq` is the
    /// sequence number to give it (never 0).
    pub fn send(&mut self, msg: &[u8], random: impl FnOnce(&mut [u8]), seq: u32) -> Outcome {
        // A host's failure ends the transaction whatever the step.
        if msg.len() >= 2 && msg[0] == COMMON_MESSAGES && msg[1] == id::FAILURE2 {
            self.step = Step::Failed;
            self.outgoing = None;
            let exp = msg.get(7).copied().unwrap_or(0);
            return Outcome::Failed(format!(
                "the host failed the controller's response (explanation {exp:#04x})"
            ));
        }
        // A negotiate starts a transaction over at any step (a host re-authenticating).
        if msg.len() >= 2 && msg[0] == COMMON_MESSAGES && msg[1] == id::NEGOTIATE {
            self.step = Step::Negotiate;
            self.outgoing = None;
        }
        match self.step {
            Step::Negotiate => {
                let n = match Negotiate::parse(msg) {
                    Ok(n) => n,
                    Err(r) => {
                        self.tid = if msg.len() >= 6 { u16_at(msg, 4) } else { 0 };
                        return self.fail(r);
                    }
                };
                self.tid = n.tid;
                if n.sc_c != 0 {
                    return self.fail(refuse(
                        failure::CONCAT_MISMATCH,
                        "secure channel concatenation asked without TLS",
                    ));
                }
                let Some(hash) = [Hash::Sha256, Hash::Sha384, Hash::Sha512]
                    .into_iter()
                    .find(|h| n.hashes.contains(&(*h as u8)))
                else {
                    return self.fail(refuse(
                        failure::HASH_UNUSABLE,
                        format!("no usable hash among {:?}", n.hashes),
                    ));
                };
                if !n.dhgroups.contains(&DHGROUP_NULL) {
                    return self.fail(refuse(
                        failure::DHGROUP_UNUSABLE,
                        format!("the NULL DH group not among {:?}", n.dhgroups),
                    ));
                }
                self.hash = hash;
                let mut c1 = vec![0u8; hash.digest_len()];
                random(&mut c1);
                self.c1 = c1;
                self.s1 = seq.max(1);
                self.outgoing = Some(challenge(self.tid, hash, self.s1, &self.c1));
                self.step = Step::Challenge;
                Outcome::Continue
            }
            Step::Reply => {
                let r = match Reply::parse(msg, self.hash) {
                    Ok(r) => r,
                    Err(e) => return self.fail(e),
                };
                if r.tid != self.tid {
                    return self.fail(refuse(
                        failure::INCORRECT_PAYLOAD,
                        format!("transaction {} in a reply to {}", r.tid, self.tid),
                    ));
                }
                let expected = response(
                    self.hash,
                    &self.host_key,
                    &self.c1,
                    self.s1,
                    self.tid,
                    0,
                    b"HostHost",
                    &self.host_nqn,
                    &self.subsys_nqn,
                );
                if !bool::from(expected.ct_eq(&r.r1)) {
                    return self.fail(refuse(
                        failure::FAILED,
                        "the host's response does not match its secret",
                    ));
                }
                let r2 = match (&r.c2, &self.ctrl_key) {
                    (None, _) => None,
                    (Some(_), None) => return self.fail(refuse(
                        failure::FAILED,
                        "the host asks to authenticate the controller, which has no secret for it",
                    )),
                    (Some((c2, s2)), Some(key)) => Some(response(
                        self.hash,
                        key,
                        c2,
                        *s2,
                        self.tid,
                        0,
                        b"Controller",
                        &self.subsys_nqn,
                        &self.host_nqn,
                    )),
                };
                self.outgoing = Some(success1(self.tid, self.hash, r2.as_deref()));
                self.step = Step::Success1;
                Outcome::Continue
            }
            Step::Success2 => {
                if msg.len() < 16 || msg[0] != DHCHAP_MESSAGES || msg[1] != id::SUCCESS2 {
                    return self.fail(refuse(failure::INCORRECT_PROTOCOL, "expected success2"));
                }
                if u16_at(msg, 4) != self.tid {
                    return self.fail(refuse(
                        failure::INCORRECT_PAYLOAD,
                        "success2 of another transaction",
                    ));
                }
                self.step = Step::Done;
                Outcome::Authenticated
            }
            Step::Challenge | Step::Success1 | Step::Done | Step::Failed => self.fail(refuse(
                failure::INCORRECT_PROTOCOL,
                format!("a message sent at step {:?}", self.step),
            )),
        }
    }

    /// The payload of an Authentication Receive, if one is due; what it means.
    pub fn receive(&mut self) -> Option<(Vec<u8>, Outcome)> {
        let m = self.outgoing.take()?;
        let outcome = match self.step {
            Step::Challenge => {
                self.step = Step::Reply;
                Outcome::Continue
            }
            Step::Success1 => {
                if m.get(8) == Some(&1) {
                    // Bidirectional: the host answers with success2 (or a failure).
                    self.step = Step::Success2;
                    Outcome::Continue
                } else {
                    self.step = Step::Done;
                    Outcome::Authenticated
                }
            }
            Step::Failed => Outcome::Failed("failure1 sent".into()),
            _ => Outcome::Continue,
        };
        Some((m, outcome))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:0c7a0000-0000-4000-8000-000000000001";
    const SUB: &str = "nqn.2026-12.io.duplex:auth";

    fn negotiate(tid: u16, hashes: &[u8], dh: &[u8]) -> Vec<u8> {
        let mut m = vec![0u8; 8 + DESCRIPTOR_LEN];
        m[4..6].copy_from_slice(&tid.to_le_bytes());
        m[7] = 1;
        m[8] = AUTHID_DHCHAP;
        m[10] = hashes.len() as u8;
        m[11] = dh.len() as u8;
        m[12..12 + hashes.len()].copy_from_slice(hashes);
        m[12 + DH_IDS_AT..12 + DH_IDS_AT + dh.len()].copy_from_slice(dh);
        m
    }

    #[test]
    fn secrets_parse_with_their_crc_and_print_back() {
        let s = Secret {
            transform: Some(Hash::Sha256),
            key: (0..32).collect(),
        };
        let text = s.to_text();
        assert!(text.starts_with("DHHC-1:01:"), "{text}");
        assert_eq!(Secret::parse(&text).unwrap(), s);
        assert_eq!(Secret::parse(text.trim_end_matches(':')).unwrap(), s);
        let mut bad = text.clone().into_bytes();
        bad[12] = if bad[12] == b'A' { b'B' } else { b'A' };
        assert!(Secret::parse(std::str::from_utf8(&bad).unwrap()).is_err());
        assert_eq!(
            Secret::parse("DHHC-1:07:AAAA:"),
            Err(SecretError::Transform("07".into()))
        );
        assert_eq!(Secret::parse("DHHC-2:00:AAAA:"), Err(SecretError::Format));
        assert_eq!(
            Secret::parse("DHHC-1:00:AAAA:"),
            Err(SecretError::Length(0))
        );
        assert!(format!("{s:?}").contains("<32 bytes>"));
    }

    /// A whole bidirectional transaction with the host's side computed from the formulas.
    #[test]
    fn a_transaction_with_the_right_secrets_authenticates_both_ways() {
        let host = Secret::parse(
            &Secret {
                transform: Some(Hash::Sha256),
                key: vec![7; 32],
            }
            .to_text(),
        )
        .unwrap();
        let ctrl = Secret {
            transform: None,
            key: vec![9; 48],
        };
        let mut s = Session::new(&host, Some(&ctrl), HOST, SUB);
        assert_eq!(
            s.send(&negotiate(3, &[1, 2, 3], &[0, 1, 2]), |b| b.fill(0xAB), 77),
            Outcome::Continue
        );
        let (ch, _) = s.receive().unwrap();
        assert_eq!(ch.len(), 16 + 32);
        assert_eq!(
            (ch[0], ch[1], u16_at(&ch, 4), ch[6], ch[8], ch[9]),
            (1, 1, 3, 32, 1, 0)
        );
        assert_eq!(u32_at(&ch, 12), 77);
        let c1 = &ch[16..];
        let r1 = response(
            Hash::Sha256,
            &host.transformed(HOST),
            c1,
            77,
            3,
            0,
            b"HostHost",
            HOST,
            SUB,
        );
        let c2 = [0x5Au8; 32];
        let mut reply = vec![0u8; 16 + 64];
        reply[0] = 1;
        reply[1] = id::REPLY;
        reply[4..6].copy_from_slice(&3u16.to_le_bytes());
        reply[6] = 32;
        reply[8] = 1;
        reply[12..16].copy_from_slice(&99u32.to_le_bytes());
        reply[16..48].copy_from_slice(&r1);
        reply[48..80].copy_from_slice(&c2);
        assert_eq!(s.send(&reply, |_| {}, 0), Outcome::Continue);
        let (ok, outcome) = s.receive().unwrap();
        assert_eq!(
            outcome,
            Outcome::Continue,
            "bidirectional: success2 awaited"
        );
        assert_eq!((ok[1], ok[8]), (id::SUCCESS1, 1));
        let r2 = response(
            Hash::Sha256,
            &ctrl.key,
            &c2,
            99,
            3,
            0,
            b"Controller",
            SUB,
            HOST,
        );
        assert_eq!(&ok[16..48], &r2[..]);
        let mut s2 = vec![0u8; 16];
        s2[0] = 1;
        s2[1] = id::SUCCESS2;
        s2[4..6].copy_from_slice(&3u16.to_le_bytes());
        assert_eq!(s.send(&s2, |_| {}, 0), Outcome::Authenticated);
    }

    /// Vectors computed from the specification's formulas outside this code (Python's hmac,
    /// for this project's review of the Linux source); the secret encodings were checked
    /// against nvme-cli's `gen-dhchap-key`.
    #[test]
    fn responses_match_independently_computed_vectors() {
        let host_nqn = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000001";
        let sub = "nqn.2024-01.io.example:subsys1";
        let hex = |s: &str| -> Vec<u8> {
            (0..s.len() / 2)
                .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
                .collect()
        };
        let host =
            Secret::parse("DHHC-1:01:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:").unwrap();
        assert_eq!(host.key, (0u8..32).collect::<Vec<_>>());
        let kh = host.transformed(host_nqn);
        assert_eq!(
            kh,
            hex("6c7b81cb2a746f74454b1d7140f3153b51ca99459fcef7a86a17f27695b87cd8")
        );
        let ctrl =
            Secret::parse("DHHC-1:00:ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj/jBqb2:").unwrap();
        let kc = ctrl.transformed(sub);
        assert_eq!(kc, (0x20u8..0x40).collect::<Vec<_>>());
        let c1: Vec<u8> = (0xa0..=0xbf).collect();
        let c2: Vec<u8> = (0xc0..=0xdf).collect();
        let r1 = response(
            Hash::Sha256,
            &kh,
            &c1,
            0x1234_5678,
            1,
            0,
            b"HostHost",
            host_nqn,
            sub,
        );
        assert_eq!(
            r1,
            hex("13a9dd13835c767f832909be10c212c6100d924976e2943c1eb48675806c0282")
        );
        let r2 = response(
            Hash::Sha256,
            &kc,
            &c2,
            0x9abc_def0,
            1,
            0,
            b"Controller",
            sub,
            host_nqn,
        );
        assert_eq!(
            r2,
            hex("4ebc9c8c7ffcbc2b804c3ee134d67154abe342ef708db665eca8e9475d2997df")
        );
    }

    #[test]
    fn a_wrong_response_and_bad_negotiates_are_failed_with_failure1() {
        let host = Secret {
            transform: None,
            key: vec![1; 32],
        };
        let mut s = Session::new(&host, None, HOST, SUB);
        s.send(&negotiate(5, &[1], &[0]), |b| b.fill(1), 1);
        s.receive().unwrap();
        let mut reply = vec![0u8; 16 + 64];
        reply[0] = 1;
        reply[1] = id::REPLY;
        reply[4..6].copy_from_slice(&5u16.to_le_bytes());
        reply[6] = 32;
        assert!(matches!(s.send(&reply, |_| {}, 0), Outcome::Failed(_)));
        let (f, _) = s.receive().unwrap();
        assert_eq!(f, vec![0, 0xF1, 0, 0, 5, 0, 1, failure::FAILED]);
        for (m, exp) in [
            (negotiate(1, &[9], &[0]), failure::HASH_UNUSABLE),
            (negotiate(1, &[1], &[1, 2]), failure::DHGROUP_UNUSABLE),
            (vec![0u8; 5], failure::INCORRECT_PAYLOAD),
        ] {
            let mut s = Session::new(&host, None, HOST, SUB);
            assert!(matches!(s.send(&m, |_| {}, 1), Outcome::Failed(_)));
            assert_eq!(s.receive().unwrap().0[7], exp);
        }
    }
}
