//! What the DH-HMAC-CHAP secret representation (`DHHC-1:`, [`crate::auth`]) and the NVMe/TCP
//! PSK interchange format (`NVMeTLSkey-1:`, [`crate::tls`]) share: `PREFIX:HH:<base64 of the
//! key and its CRC-32, little-endian>:` (the trailing colon optional), and HMAC over parts.

use base64::Engine as _;
use hmac::Mac;

/// Why a representation does not even have the shape.
pub(crate) enum Bad {
    /// Not `PREFIX:HH:base64:`.
    Format,
    /// The base64 does not decode.
    Base64,
}

/// `HH` and the decoded bytes (key and CRC) of `text`, which must start with `prefix`.
pub(crate) fn split<'a>(text: &'a str, prefix: &str) -> Result<(&'a str, Vec<u8>), Bad> {
    let rest = text.strip_prefix(prefix).ok_or(Bad::Format)?;
    let (hh, rest) = rest.split_once(':').ok_or(Bad::Format)?;
    let b64 = rest.strip_suffix(':').unwrap_or(rest);
    if hh.len() != 2 || b64.is_empty() || b64.contains(':') {
        return Err(Bad::Format);
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| Bad::Base64)?;
    Ok((hh, raw))
}

/// Whether the 4 bytes after the first `len` of `raw` are their CRC-32 (little-endian).
pub(crate) fn crc_matches(raw: &[u8], len: usize) -> bool {
    raw.len() == len + 4 && crc32fast::hash(&raw[..len]).to_le_bytes() == raw[len..]
}

/// The representation of `key` with `hh`.
pub(crate) fn encode(prefix: &str, hh: u8, key: &[u8]) -> String {
    let mut raw = key.to_vec();
    raw.extend_from_slice(&crc32fast::hash(key).to_le_bytes());
    format!(
        "{prefix}{hh:02}:{}:",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// HMAC with `M` of the concatenation of `parts` under `key`.
pub(crate) fn hmac<M: Mac + hmac::digest::KeyInit>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    // HMAC takes a key of any length: this never fails.
    let Ok(mut m) = <M as hmac::digest::KeyInit>::new_from_slice(key) else {
        return Vec::new();
    };
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}
