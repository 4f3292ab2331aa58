//! Host secrets at rest: a host's DH-HMAC-CHAP secrets and TLS PSK are kept on the drives (record 11,
//! [`crate::records::HostSecret`]) sealed with the array's secrets key, a 256-bit key both
//! controllers are given in their node config (`[secrets] key_file`) and that is never on the
//! drives: whoever reads a drive learns which hosts have secrets, not the secrets.
//!
//! Sealed layout: version (1 byte, 1), key id (8 bytes: the first bytes of
//! `SHA-256("duplex secrets key" || key)`, so a wrong key is told apart from a corrupt blob),
//! nonce (12 bytes, random), then ChaCha20-Poly1305 of `host secret || 0x00 || controller
//! secret [|| 0x00 || TLS PSK]` (each possibly empty; blobs sealed before TLS end after the
//! controller's secret) with the 16-byte tag, the associated data binding it to its place:
//! `"duplex host secrets v1" || 0x00 || subsystem NQN || 0x00 || host NQN`.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use sha2::Digest;

/// The sealed format's version byte.
pub const SEALED_VERSION: u8 = 1;
/// Bytes before the ciphertext: version, key id, nonce.
pub const SEALED_HEADER: usize = 1 + 8 + 12;
/// The AEAD tag's length.
pub const TAG_LEN: usize = 16;

/// Why secrets cannot be sealed or unsealed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretsError {
    /// The key file's contents are not 64 hex digits.
    #[error("a secrets key is 64 hexadecimal digits (32 bytes), e.g. from `od -An -tx1 -N32 /dev/urandom | tr -d ' \\n'`")]
    KeyFormat,
    /// Sealed with another key.
    #[error("the secrets were sealed with another secrets key (key id {sealed}, this node's {ours}): both controllers need the same [secrets] key_file")]
    WrongKey {
        /// The key id in the blob.
        sealed: String,
        /// This node's key id.
        ours: String,
    },
    /// The blob is not a sealed secret, or was altered.
    #[error("the sealed secrets are corrupt or do not belong to this host and subsystem")]
    Corrupt,
}

/// The array's secrets key.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretsKey([u8; 32]);

impl std::fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretsKey(id {})", hex(&self.id()))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl SecretsKey {
    /// The key of 32 bytes.
    pub fn from_bytes(b: [u8; 32]) -> Self {
        Self(b)
    }

    /// The key written as 64 hexadecimal digits (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<Self, SecretsError> {
        let t = text.trim();
        if t.len() != 64 || !t.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(SecretsError::KeyFormat);
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&t[2 * i..2 * i + 2], 16)
                .map_err(|_| SecretsError::KeyFormat)?;
        }
        Ok(Self(out))
    }

    /// The key's bytes.
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key's id (not secret): what a sealed blob names its key by.
    pub fn id(&self) -> [u8; 8] {
        let d = sha2::Sha256::new()
            .chain_update(b"duplex secrets key")
            .chain_update(self.0)
            .finalize();
        let mut id = [0u8; 8];
        id.copy_from_slice(&d[..8]);
        id
    }
}

fn aad(subnqn: &str, hostnqn: &str) -> Vec<u8> {
    let mut a = b"duplex host secrets v1\0".to_vec();
    a.extend_from_slice(subnqn.as_bytes());
    a.push(0);
    a.extend_from_slice(hostnqn.as_bytes());
    a
}

/// What is sealed for one host on one subsystem, in the standard representations.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct HostKeys {
    /// The host's DH-HMAC-CHAP secret (`DHHC-1:..`).
    pub dhchap: Option<String>,
    /// The controller's DH-HMAC-CHAP secret (bidirectional authentication).
    pub dhchap_ctrl: Option<String>,
    /// The configured TLS PSK (`NVMeTLSkey-1:..`).
    pub tls_psk: Option<String>,
}

impl std::fmt::Debug for HostKeys {
    /// Never the secrets themselves.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |o: &Option<String>| o.as_ref().map(|_| "<secret>");
        f.debug_struct("HostKeys")
            .field("dhchap", &shown(&self.dhchap))
            .field("dhchap_ctrl", &shown(&self.dhchap_ctrl))
            .field("tls_psk", &shown(&self.tls_psk))
            .finish()
    }
}

/// Seals `keys` for `hostnqn` on `subnqn` under `key` with `nonce` (random, never reused with
/// the key).
pub fn seal(
    key: &SecretsKey,
    subnqn: &str,
    hostnqn: &str,
    keys: &HostKeys,
    nonce: [u8; 12],
) -> Vec<u8> {
    let part = |o: &Option<String>| o.as_deref().unwrap_or("").as_bytes().to_vec();
    let mut plain = part(&keys.dhchap);
    plain.push(0);
    plain.extend_from_slice(&part(&keys.dhchap_ctrl));
    if keys.tls_psk.is_some() {
        plain.push(0);
        plain.extend_from_slice(&part(&keys.tls_psk));
    }
    let cipher = ChaCha20Poly1305::new(Key::from_slice(&key.0));
    let aad = aad(subnqn, hostnqn);
    // Encryption of a message this small under a valid key cannot fail.
    let sealed = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &plain,
                aad: &aad,
            },
        )
        .unwrap_or_default();
    let mut out = Vec::with_capacity(SEALED_HEADER + sealed.len());
    out.push(SEALED_VERSION);
    out.extend_from_slice(&key.id());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

/// The keys sealed in `sealed` for `hostnqn` on `subnqn`.
pub fn unseal(
    key: &SecretsKey,
    subnqn: &str,
    hostnqn: &str,
    sealed: &[u8],
) -> Result<HostKeys, SecretsError> {
    check_sealed(sealed).map_err(|_| SecretsError::Corrupt)?;
    if sealed[1..9] != key.id() {
        return Err(SecretsError::WrongKey {
            sealed: hex(&sealed[1..9]),
            ours: hex(&key.id()),
        });
    }
    let cipher = ChaCha20Poly1305::new(Key::from_slice(&key.0));
    let plain = cipher
        .decrypt(
            Nonce::from_slice(&sealed[9..SEALED_HEADER]),
            Payload {
                msg: &sealed[SEALED_HEADER..],
                aad: &aad(subnqn, hostnqn),
            },
        )
        .map_err(|_| SecretsError::Corrupt)?;
    let text = String::from_utf8(plain).map_err(|_| SecretsError::Corrupt)?;
    let mut parts = text.split('\0');
    let some = |p: Option<&str>| p.filter(|p| !p.is_empty()).map(str::to_owned);
    let keys = HostKeys {
        dhchap: some(parts.next()),
        dhchap_ctrl: some(parts.next()),
        tls_psk: some(parts.next()),
    };
    let usable = (keys.dhchap.is_some() || keys.tls_psk.is_some())
        && (keys.dhchap_ctrl.is_none() || keys.dhchap.is_some());
    if parts.next().is_some() || !usable {
        return Err(SecretsError::Corrupt);
    }
    Ok(keys)
}

/// Whether `sealed` has the shape of a sealed blob (version, length); why not.
pub fn check_sealed(sealed: &[u8]) -> Result<(), String> {
    if sealed.len() < SEALED_HEADER + TAG_LEN + 2 {
        return Err(format!("{} sealed bytes, too few", sealed.len()));
    }
    if sealed.len() > crate::records::MAX_SEALED_SECRET_BYTES {
        return Err(format!("{} sealed bytes, too many", sealed.len()));
    }
    if sealed[0] != SEALED_VERSION {
        return Err(format!(
            "sealed format version {}, not {SEALED_VERSION}",
            sealed[0]
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_with_the_key_for_their_place() {
        let key = SecretsKey::from_hex(&"0f".repeat(32)).unwrap();
        let other = SecretsKey::from_bytes([1; 32]);
        let both = HostKeys {
            dhchap: Some("DHHC-1:00:abc:".into()),
            dhchap_ctrl: Some("DHHC-1:01:def:".into()),
            tls_psk: None,
        };
        let s = seal(&key, "nqn.s", "nqn.h", &both, [7; 12]);
        assert!(!s.windows(5).any(|w| w == b"DHHC-"), "no clear text");
        assert_eq!(unseal(&key, "nqn.s", "nqn.h", &s).unwrap(), both);
        assert!(matches!(
            unseal(&other, "nqn.s", "nqn.h", &s),
            Err(SecretsError::WrongKey { .. })
        ));
        assert_eq!(
            unseal(&key, "nqn.s", "nqn.other", &s),
            Err(SecretsError::Corrupt)
        );
        let mut flipped = s.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(
            unseal(&key, "nqn.s", "nqn.h", &flipped),
            Err(SecretsError::Corrupt)
        );
        let host_only = HostKeys {
            dhchap: Some("DHHC-1:00:abc:".into()),
            ..HostKeys::default()
        };
        let one = seal(&key, "nqn.s", "nqn.h", &host_only, [8; 12]);
        assert_eq!(unseal(&key, "nqn.s", "nqn.h", &one).unwrap(), host_only);
        let tls = HostKeys {
            tls_psk: Some("NVMeTLSkey-1:01:xyz:".into()),
            ..HostKeys::default()
        };
        let t = seal(&key, "nqn.s", "nqn.h", &tls, [9; 12]);
        assert!(!t.windows(6).any(|w| w == b"NVMeTL"), "no clear text");
        assert_eq!(unseal(&key, "nqn.s", "nqn.h", &t).unwrap(), tls);
        // Nothing usable sealed (a controller's secret alone) is a corrupt blob.
        let ctrl_only = HostKeys {
            dhchap_ctrl: Some("DHHC-1:01:def:".into()),
            ..HostKeys::default()
        };
        let c = seal(&key, "nqn.s", "nqn.h", &ctrl_only, [10; 12]);
        assert_eq!(
            unseal(&key, "nqn.s", "nqn.h", &c),
            Err(SecretsError::Corrupt)
        );
        assert_eq!(SecretsKey::from_hex("zz"), Err(SecretsError::KeyFormat));
        assert!(!format!("{key:?}").contains("0f0f0f"));
    }
}
