//! The secrets-key region: the array's secrets key (`[secrets] key_file` of the node config),
//! which seals hosts' DH-HMAC-CHAP secrets on the drives, handed by duplexd to the services
//! that seal (metadata) and unseal (fabric) them as a sealed memfd: kind `Plain`, `params[0]`
//! the tag `SECRETK\x01`, `params[1..5]` the key's 32 bytes (little-endian words). Never on a
//! drive, never in a log.
//!
//! The mgmt-key region is the same with the tag `MGMTKEY\x01`: the key of the remote management
//! listener (`[mgmt] key_file`), handed to mgmt alone, which proves it in TLS 1.3 (PSK) to
//! `duplexctl --connect`.

use std::os::fd::OwnedFd;

use crate::region::{Region, RegionError, RegionKind, HEADER_SIZE};

/// The resource name of the secrets-key region.
pub const SECRETS_KEY_RESOURCE: &str = "secrets-key";
const TAG: u64 = u64::from_le_bytes(*b"SECRETK\x01");
/// The resource-name prefix of mgmt's remote management listeners (TCP, TLS with the mgmt key).
pub const REMOTE_LISTENER_PREFIX: &str = "remote:";
/// The resource name of the mgmt-key region.
pub const MGMT_KEY_RESOURCE: &str = "mgmt-key";
const MGMT_TAG: u64 = u64::from_le_bytes(*b"MGMTKEY\x01");

/// Supervisor side: a region holding the secrets key `key`.
pub fn create(key: &[u8; 32]) -> Result<Region, RegionError> {
    create_tagged("secrets-key", TAG, key)
}

/// Service side: the secrets key in a handed-over region.
pub fn attach(fd: OwnedFd) -> Result<[u8; 32], RegionError> {
    attach_tagged(fd, TAG, "secrets-key")
}

/// Supervisor side: a region holding the mgmt key `key`.
pub fn create_mgmt(key: &[u8; 32]) -> Result<Region, RegionError> {
    create_tagged("mgmt-key", MGMT_TAG, key)
}

/// mgmt's side: the mgmt key in a handed-over region.
pub fn attach_mgmt(fd: OwnedFd) -> Result<[u8; 32], RegionError> {
    attach_tagged(fd, MGMT_TAG, "mgmt-key")
}

fn create_tagged(name: &str, tag: u64, key: &[u8; 32]) -> Result<Region, RegionError> {
    let mut params = [tag, 0, 0, 0, 0];
    for (i, chunk) in key.chunks_exact(8).enumerate() {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        params[1 + i] = u64::from_le_bytes(w);
    }
    Region::create(name, RegionKind::Plain, HEADER_SIZE, params)
}

fn attach_tagged(fd: OwnedFd, tag: u64, what: &str) -> Result<[u8; 32], RegionError> {
    let region = Region::attach(fd, RegionKind::Plain)?;
    let params = region.params();
    if params[0] != tag {
        return Err(RegionError::BadLayout(format!("not a {what} region")));
    }
    let mut key = [0u8; 32];
    for (i, chunk) in key.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&params[1 + i].to_le_bytes());
    }
    Ok(key)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_key_crosses_intact() {
        let key: [u8; 32] = std::array::from_fn(|i| i as u8 * 7);
        let r = create(&key).unwrap();
        assert_eq!(attach(r.try_clone_fd().unwrap()).unwrap(), key);
        let other = Region::create("x", RegionKind::Plain, HEADER_SIZE, [1, 2, 3, 4, 5]).unwrap();
        assert!(attach(other.try_clone_fd().unwrap()).is_err());
        let m = create_mgmt(&key).unwrap();
        assert_eq!(attach_mgmt(m.try_clone_fd().unwrap()).unwrap(), key);
        // A key handed for one use is not taken for the other.
        assert!(attach(m.try_clone_fd().unwrap()).is_err());
        assert!(attach_mgmt(r.try_clone_fd().unwrap()).is_err());
    }
}
