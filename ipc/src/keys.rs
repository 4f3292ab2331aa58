//! The secrets-key region: the array's secrets key (`[secrets] key_file` of the node config),
//! which seals hosts' DH-HMAC-CHAP secrets on the drives, handed by duplexd to the services
//! that seal (metadata) and unseal (fabric) them as a sealed memfd: kind `Plain`, `params[0]`
//! the tag `SECRETK\x01`, `params[1..5]` the key's 32 bytes (little-endian words). Never on a
//! drive, never in a log.

use std::os::fd::OwnedFd;

use crate::region::{Region, RegionError, RegionKind, HEADER_SIZE};

/// The resource name of the secrets-key region.
pub const SECRETS_KEY_RESOURCE: &str = "secrets-key";
const TAG: u64 = u64::from_le_bytes(*b"SECRETK\x01");

/// Supervisor side: a region holding `key`.
pub fn create(key: &[u8; 32]) -> Result<Region, RegionError> {
    let mut params = [TAG, 0, 0, 0, 0];
    for (i, chunk) in key.chunks_exact(8).enumerate() {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        params[1 + i] = u64::from_le_bytes(w);
    }
    Region::create("secrets-key", RegionKind::Plain, HEADER_SIZE, params)
}

/// Service side: the key in a handed-over region.
pub fn attach(fd: OwnedFd) -> Result<[u8; 32], RegionError> {
    let region = Region::attach(fd, RegionKind::Plain)?;
    let params = region.params();
    if params[0] != TAG {
        return Err(RegionError::BadLayout("not a secrets-key region".into()));
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
    }
}
