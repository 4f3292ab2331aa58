//! duplex-bench: an NVMe/TCP load generator in the spirit of spdk_nvme_perf and fio.
//!
//! * [`pattern`]: the verify mode's block contents: every block carries its LBA, the run's seed
//!   and a generation number in a header, and bytes derived from them; a read checks all three.
//! * [`worker`]: one worker = one thread (optionally pinned) = one I/O queue, keeping
//!   `queue_depth` commands in flight over its own slice of the namespace.
//! * [`multipath`]: `--paths`: a host following ANA over several controllers, retrying path
//!   errors on another path, measuring the pause of a failover.
//! * `main.rs`: arguments, the controller (admin queue, keep alive), workers, progress on a TTY,
//!   the report (text or JSON).

pub mod multipath;
pub mod pattern;
pub mod worker;

/// Parses sizes like `4k`, `4KiB`, `128k`, `1M`, `512` (binary units).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 4k, 128KiB, 1M)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        u => return Err(format!("{s:?}: unknown unit {u:?} (use k, M, G)")),
    };
    n.checked_mul(1 << shift)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("{s:?} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("128KiB"), Ok(131072));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("0").is_err());
        assert!(parse_size("4q").is_err());
        assert!(parse_size("k").is_err());
    }
}
