//! NVMe/TCP over TLS 1.3 with a pre-shared key (NVMe/TCP Transport Specification 1.0c §3.6,
//! TP 8018): the configured key's interchange format, the PSK identities hosts present, and the
//! derivation of the retained key, the identity digest and the TLS PSK from it. Pure code: the
//! TLS itself is OpenSSL's (the fabric's secure channel, built on this).
//!
//! Two derivations are in use: the one the specification's HKDF-Expand-Label describes (RFC
//! 8446's `HkdfLabel`, as SPDK and libnvme from 1.16 compute it), and the one libnvme up to 1.15
//! computed (what nvme-cli 2.x puts in a Linux host's keyring: the label's length bytes left out
//! and the length little-endian) — [`Variant`]. A target tells them apart by a version 1
//! identity's digest (it is computed from the retained key, which differs); a version 0
//! identity carries nothing to tell them apart.

use base64::Engine as _;
use hmac::Hmac;

use crate::keytext;

/// The hash of a PSK (and with it the TLS 1.3 cipher suite).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PskHash {
    /// SHA-256: TLS_AES_128_GCM_SHA256, 32-byte keys.
    Sha256 = 1,
    /// SHA-384: TLS_AES_256_GCM_SHA384, 48-byte keys.
    Sha384 = 2,
}

impl PskHash {
    /// The output length, and the length of keys of this hash.
    pub fn digest_len(self) -> usize {
        match self {
            Self::Sha256 => 32,
            Self::Sha384 => 48,
        }
    }

    fn of_id(id: u8) -> Option<Self> {
        match id {
            1 => Some(Self::Sha256),
            2 => Some(Self::Sha384),
            _ => None,
        }
    }

    fn hmac(self, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        match self {
            Self::Sha256 => keytext::hmac::<Hmac<sha2::Sha256>>(key, parts),
            Self::Sha384 => keytext::hmac::<Hmac<sha2::Sha384>>(key, parts),
        }
    }

    /// HKDF-Extract with a zero salt, then HKDF-Expand of `info` to `len` bytes.
    fn hkdf(self, ikm: &[u8], info: &[u8], len: usize) -> Vec<u8> {
        let mut okm = vec![0u8; len];
        let ok = match self {
            Self::Sha256 => hkdf::Hkdf::<sha2::Sha256>::new(None, ikm)
                .expand(info, &mut okm)
                .is_ok(),
            Self::Sha384 => hkdf::Hkdf::<sha2::Sha384>::new(None, ikm)
                .expand(info, &mut okm)
                .is_ok(),
        };
        // Expanding at most one hash length cannot fail.
        if ok {
            okm
        } else {
            Vec::new()
        }
    }
}

/// Which HKDF-Expand-Label a host computes (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// RFC 8446's `HkdfLabel` (the specification; SPDK; libnvme ≥ 1.16).
    Rfc,
    /// libnvme ≤ 1.15 (nvme-cli 2.x).
    Compat,
}

/// Why a configured key or an identity is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsKeyError {
    /// Not `NVMeTLSkey-1:HH:base64:`.
    #[error(
        "not an NVMe TLS key: expected NVMeTLSkey-1:HH:<base64>: (as `nvme gen-tls-key` prints)"
    )]
    Format,
    /// `HH` is not 00, 01 or 02.
    #[error("unknown PSK hash {0:?} (00: none, 01: SHA-256, 02: SHA-384)")]
    Hash(String),
    /// The base64 does not decode.
    #[error("the key is not valid base64")]
    Base64,
    /// The key's length does not fit its hash.
    #[error("the key is {0} bytes; it must be 32 (SHA-256) or 48 (SHA-384)")]
    Length(usize),
    /// The CRC-32 after the key does not match.
    #[error("the key's CRC-32 does not match: a mistyped key")]
    Crc,
    /// Not an NVMe PSK identity.
    #[error(
        "not an NVMe/TCP PSK identity (NVMe0R0H host subsystem, or NVMe1R0H host subsystem digest)"
    )]
    Identity,
}

/// A configured PSK in the interchange format.
#[derive(Clone, PartialEq, Eq)]
pub struct ConfiguredKey {
    /// `HH`: the hash the retained key is derived with (`None`: 00, the key is the retained
    /// key).
    pub hash: Option<PskHash>,
    /// The key (32 or 48 bytes).
    pub key: Vec<u8>,
}

impl std::fmt::Debug for ConfiguredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfiguredKey")
            .field("hash", &self.hash)
            .field("key", &format_args!("<{} bytes>", self.key.len()))
            .finish()
    }
}

impl ConfiguredKey {
    /// Parses `NVMeTLSkey-1:HH:<base64 of key and its CRC-32>:`.
    pub fn parse(text: &str) -> Result<Self, TlsKeyError> {
        let (hh, raw) = keytext::split(text, "NVMeTLSkey-1:").map_err(|e| match e {
            keytext::Bad::Format => TlsKeyError::Format,
            keytext::Bad::Base64 => TlsKeyError::Base64,
        })?;
        let hash = match hh {
            "00" => None,
            "01" => Some(PskHash::Sha256),
            "02" => Some(PskHash::Sha384),
            other => return Err(TlsKeyError::Hash(other.to_owned())),
        };
        let len = raw.len().saturating_sub(4);
        let fits = match hash {
            None => len == 32 || len == 48,
            Some(h) => len == h.digest_len(),
        };
        if raw.len() < 4 || !fits {
            return Err(TlsKeyError::Length(len));
        }
        if !keytext::crc_matches(&raw, len) {
            return Err(TlsKeyError::Crc);
        }
        Ok(Self {
            hash,
            key: raw[..len].to_vec(),
        })
    }

    /// The interchange representation of this key.
    pub fn to_text(&self) -> String {
        keytext::encode("NVMeTLSkey-1:", self.hash.map_or(0, |h| h as u8), &self.key)
    }

    /// The hash of the TLS PSK: the configured one, or by key length for `00`.
    pub fn psk_hash(&self) -> PskHash {
        self.hash.unwrap_or(if self.key.len() == 48 {
            PskHash::Sha384
        } else {
            PskHash::Sha256
        })
    }

    /// The retained PSK for `hostnqn`.
    pub fn retained(&self, hostnqn: &str, variant: Variant) -> Vec<u8> {
        match self.hash {
            None => self.key.clone(),
            Some(h) => h.hkdf(
                &self.key,
                &label(variant, h.digest_len(), b"HostNQN", hostnqn.as_bytes()),
                h.digest_len(),
            ),
        }
    }
}

/// The HKDF-Expand-Label info of `label` with `context` for `len` bytes.
fn label(variant: Variant, len: usize, label: &[u8], context: &[u8]) -> Vec<u8> {
    let mut info = Vec::with_capacity(4 + 6 + label.len() + context.len());
    let full: Vec<u8> = [b"tls13 ".as_slice(), label].concat();
    match variant {
        Variant::Rfc => {
            info.extend_from_slice(&(len as u16).to_be_bytes());
            info.push(full.len() as u8);
            info.extend_from_slice(&full);
            info.push(context.len() as u8);
            info.extend_from_slice(context);
        }
        Variant::Compat => {
            info.extend_from_slice(&(len as u16).to_le_bytes());
            info.extend_from_slice(&full);
            info.extend_from_slice(context);
        }
    }
    info
}

/// A PSK identity as a host presents it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// 0 (TCP 1.0c) or 1 (TP 8018: with a digest).
    pub version: u8,
    /// The hash (and cipher suite).
    pub hash: PskHash,
    /// The host's NQN.
    pub hostnqn: String,
    /// The subsystem's NQN.
    pub subnqn: String,
    /// Version 1: the base64 digest of the retained key, host and subsystem.
    pub digest: Option<String>,
}

impl Identity {
    /// Parses `NVMe0R0H <hostnqn> <subnqn>` or `NVMe1R0H <hostnqn> <subnqn> <digest>` (retained
    /// keys only: `G`, keys generated by authentication, are not taken).
    pub fn parse(text: &str) -> Result<Self, TlsKeyError> {
        // The v0 TLS PSK's context is the identity, its length one byte.
        if text.len() > 255 {
            return Err(TlsKeyError::Identity);
        }
        let mut parts = text.split(' ');
        let head = parts.next().ok_or(TlsKeyError::Identity)?;
        let b = head.as_bytes();
        if b.len() != 8 || &b[..4] != b"NVMe" || b[5] != b'R' || b[6] != b'0' {
            return Err(TlsKeyError::Identity);
        }
        let version = match b[4] {
            b'0' => 0,
            b'1' => 1,
            _ => return Err(TlsKeyError::Identity),
        };
        let hash = PskHash::of_id(b[7].wrapping_sub(b'0')).ok_or(TlsKeyError::Identity)?;
        let hostnqn = parts.next().ok_or(TlsKeyError::Identity)?.to_owned();
        let subnqn = parts.next().ok_or(TlsKeyError::Identity)?.to_owned();
        let digest = if version == 1 {
            Some(parts.next().ok_or(TlsKeyError::Identity)?.to_owned())
        } else {
            None
        };
        if parts.next().is_some() || !hostnqn.starts_with("nqn.") || !subnqn.starts_with("nqn.") {
            return Err(TlsKeyError::Identity);
        }
        Ok(Self {
            version,
            hash,
            hostnqn,
            subnqn,
            digest,
        })
    }

    /// The identity's text.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "NVMe{}R0{} {} {}",
            self.version, self.hash as u8, self.hostnqn, self.subnqn
        );
        if let Some(d) = &self.digest {
            s.push(' ');
            s.push_str(d);
        }
        s
    }
}

/// The version 1 digest: base64 of `HMAC(retained, hostnqn ‖ " " ‖ subnqn ‖ " " ‖
/// "NVMe-over-Fabrics")`.
pub fn digest(hash: PskHash, retained: &[u8], hostnqn: &str, subnqn: &str) -> String {
    let mac = hash.hmac(
        retained,
        &[
            hostnqn.as_bytes(),
            b" ",
            subnqn.as_bytes(),
            b" ",
            b"NVMe-over-Fabrics",
        ],
    );
    base64::engine::general_purpose::STANDARD.encode(mac)
}

/// The TLS PSK of `identity` from the retained key: HKDF-Expand-Label("nvme-tls-psk") with
/// the identity itself (version 0) or `"HH digest"` (version 1) as the context.
pub fn tls_psk(identity: &Identity, retained: &[u8], variant: Variant) -> Vec<u8> {
    let h = identity.hash;
    let context = match &identity.digest {
        Some(d) => format!("{:02} {d}", h as u8),
        None => identity.to_text(),
    };
    h.hkdf(
        retained,
        &label(variant, h.digest_len(), b"nvme-tls-psk", context.as_bytes()),
        h.digest_len(),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const KEY: &str = "5512DBB6737D0106F65975B773DFB011FFC344BCF442E2DD6D8BC4870B5D5B03";
    const HOST: &str = "nqn.psk-test-host";
    const SUB: &str = "nqn.psk-test-subsys";

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len() / 2)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
            .collect()
    }

    fn interchange(hh: &str, key: &[u8]) -> String {
        ConfiguredKey {
            hash: match hh {
                "01" => Some(PskHash::Sha256),
                "02" => Some(PskHash::Sha384),
                _ => None,
            },
            key: key.to_vec(),
        }
        .to_text()
    }

    /// The digests of libnvme's own test data (`test/psk.c`), for both derivations: they pin
    /// the retained key's derivation and the digest.
    #[test]
    fn digests_match_libnvme_test_data() {
        let k = ConfiguredKey::parse(&interchange("01", &hex(KEY))).unwrap();
        let rfc = k.retained(HOST, Variant::Rfc);
        assert_eq!(
            digest(PskHash::Sha256, &rfc, HOST, SUB),
            "iSbjiStwJ/1TrTvDlt2fjFmzvsytOJelidNnA+X5lEU="
        );
        let compat = k.retained(HOST, Variant::Compat);
        assert_eq!(
            digest(PskHash::Sha256, &compat, HOST, SUB),
            "66GuqV08TsAGII39teWUfwQwizjv06Jy8jOcX3NAAzM="
        );
    }

    #[test]
    fn keys_and_identities_parse_and_refuse_what_is_wrong() {
        let k = ConfiguredKey::parse(&interchange("01", &hex(KEY))).unwrap();
        assert_eq!(k.psk_hash(), PskHash::Sha256);
        assert!(matches!(
            ConfiguredKey::parse(&interchange("02", &hex(KEY))),
            Err(TlsKeyError::Length(32))
        ));
        let mut bad = interchange("01", &hex(KEY)).into_bytes();
        bad[20] = if bad[20] == b'A' { b'B' } else { b'A' };
        assert!(ConfiguredKey::parse(std::str::from_utf8(&bad).unwrap()).is_err());
        let id = Identity::parse(&format!("NVMe0R01 {HOST} {SUB}")).unwrap();
        assert_eq!(
            (id.version, id.hash, id.digest.as_deref()),
            (0, PskHash::Sha256, None)
        );
        assert_eq!(id.to_text(), format!("NVMe0R01 {HOST} {SUB}"));
        let v1 = Identity::parse(&format!("NVMe1R02 {HOST} {SUB} abc=")).unwrap();
        assert_eq!((v1.version, v1.hash), (1, PskHash::Sha384));
        for bad in [
            format!("NVMe0G01 {HOST} {SUB}"),
            format!("NVMe0R03 {HOST} {SUB}"),
            format!("NVMe1R01 {HOST} {SUB}"),
            format!("NVMe0R01 {HOST}"),
            "x".into(),
        ] {
            assert!(Identity::parse(&bad).is_err(), "{bad}");
        }
    }

    /// The TLS PSK computed outside this code from the same formulas (RFC variant, version 0);
    /// not yet confirmed by a live host.
    #[test]
    fn tls_psk_matches_the_formula_computed_outside() {
        let k = ConfiguredKey::parse(&interchange("01", &hex(KEY))).unwrap();
        let id = Identity::parse(&format!("NVMe0R01 {HOST} {SUB}")).unwrap();
        let psk = tls_psk(&id, &k.retained(HOST, Variant::Rfc), Variant::Rfc);
        assert_eq!(
            psk,
            hex("05c6503551ad136e6ee32e6eeb3f6d500b69701d84ec71e328f65c7f51566f68")
        );
    }
}
