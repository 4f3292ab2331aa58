//! Sizes as operators write and read them: `512`, `4k`, `64K`, `10m`, `10G`, `1t` in, `1.5G` out
//! (powers of 1024; `k` and `K` alike).

use duplex_ipc::config::{MAX_CHUNK_BYTES, MIN_CHUNK_BYTES};

/// Unit letters, each 1024 times the one before.
const UNITS: [char; 6] = ['K', 'M', 'G', 'T', 'P', 'E'];

/// Why a size was refused (one line, for `duplexctl: invalid value ... : <this>`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Not a number with an optional unit.
    #[error("not a size: a whole number of bytes with an optional k, m, g or t (powers of 1024), e.g. 4k or 10G")]
    Syntax,
    /// More than 2^64 - 1 bytes.
    #[error("too large: at most 16 EiB - 1")]
    TooLarge,
    /// Zero.
    #[error("must be more than 0")]
    Zero,
    /// A chunk that is not a power of two in 4k..=1m.
    #[error("a chunk is a power of two from 4k to 1m")]
    Chunk,
}

/// Parses a size: digits, then optionally one of `k`, `m`, `g`, `t` (either case), powers of
/// 1024. Zero is refused.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let (digits, shift) = match text.char_indices().last() {
        Some((at, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                _ => return Err(SizeError::Syntax),
            };
            (&text[..at], shift)
        }
        _ => (text, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SizeError::Syntax);
    }
    let number: u64 = digits.parse().map_err(|_| SizeError::TooLarge)?;
    let bytes = number
        .checked_mul(1_u64 << shift)
        .ok_or(SizeError::TooLarge)?;
    if bytes == 0 {
        return Err(SizeError::Zero);
    }
    Ok(bytes)
}

/// Parses a pool's chunk: a size that is a power of two from 4 KiB to 1 MiB.
pub fn parse_chunk(text: &str) -> Result<u32, SizeError> {
    let bytes = parse_size(text)?;
    if !bytes.is_power_of_two()
        || bytes < u64::from(MIN_CHUNK_BYTES)
        || bytes > u64::from(MAX_CHUNK_BYTES)
    {
        return Err(SizeError::Chunk);
    }
    u32::try_from(bytes).map_err(|_| SizeError::Chunk)
}

/// A size for people: `512B`, `64K`, `10G` when exact; otherwise three significant digits,
/// cut (never rounded up): `1.50G`, `15.7G`, `931G`.
pub fn human_bytes(bytes: u64) -> String {
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes >> (10 * (unit + 1)) >= 1024 {
        unit += 1;
    }
    let scale = 1_u128 << (10 * (unit + 1));
    let letter = UNITS[unit];
    let value = u128::from(bytes);
    if value % scale == 0 {
        return format!("{}{letter}", value / scale);
    }
    let hundredths = value * 100 / scale;
    if hundredths < 1000 {
        format!("{}.{:02}{letter}", hundredths / 100, hundredths % 100)
    } else if hundredths < 10_000 {
        format!("{}.{}{letter}", hundredths / 100, hundredths % 100 / 10)
    } else {
        format!("{}{letter}", hundredths / 100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_powers_of_1024() {
        for (text, want) in [
            ("512", 512),
            ("4k", 4096),
            ("64K", 65_536),
            ("10m", 10 << 20),
            ("10G", 10 << 30),
            ("1t", 1 << 40),
            ("1T", 1 << 40),
            ("007", 7),
        ] {
            assert_eq!(parse_size(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn bad_sizes_are_refused() {
        for text in [
            "", "k", "10x", "1.5G", "-1", "+1", " 1", "1 G", "1GB", "1GiB", "1e9", "G10", "0x10",
            "１",
        ] {
            assert_eq!(parse_size(text), Err(SizeError::Syntax), "{text:?}");
        }
        assert_eq!(parse_size("0"), Err(SizeError::Zero));
        assert_eq!(parse_size("0k"), Err(SizeError::Zero));
        assert_eq!(parse_size("16777216t"), Err(SizeError::TooLarge));
        assert_eq!(parse_size("99999999999999999999"), Err(SizeError::TooLarge));
    }

    #[test]
    fn chunks_are_powers_of_two_from_4k_to_1m() {
        assert_eq!(parse_chunk("4k"), Ok(4096));
        assert_eq!(parse_chunk("64K"), Ok(65_536));
        assert_eq!(parse_chunk("1m"), Ok(1 << 20));
        assert_eq!(parse_chunk("1048576"), Ok(1 << 20));
        for text in ["2k", "2m", "48k", "4097", "1g"] {
            assert_eq!(parse_chunk(text), Err(SizeError::Chunk), "{text}");
        }
        assert_eq!(parse_chunk("64x"), Err(SizeError::Syntax));
    }

    #[test]
    fn sizes_print_short_and_never_round_up() {
        for (bytes, want) in [
            (0, "0B"),
            (512, "512B"),
            (1023, "1023B"),
            (1024, "1K"),
            (65_536, "64K"),
            (1536, "1.50K"),
            (10 << 30, "10G"),
            ((3 << 29) + 1, "1.50G"),
            (16_857_874_432, "15.7G"),
            ((1 << 30) - 1, "1023M"),
            (999_653_638_144, "931G"),
            (1 << 40, "1T"),
            (u64::MAX, "15.9E"),
        ] {
            assert_eq!(human_bytes(bytes), want, "{bytes}");
        }
    }
}
