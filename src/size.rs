//! Byte sizes on the command line: `4096`, `512MiB`, `10GiB`, `1TiB`, `64K`, `2GB`.
//!
//! Binary units (powers of 1024): `KiB`/`MiB`/`GiB`/`TiB`/`PiB` and the short forms
//! `K`/`M`/`G`/`T`/`P`. Decimal units (powers of 1000): `KB`/`MB`/`GB`/`TB`/`PB`.
//! `B` (or nothing) means bytes. Units are case-insensitive and may be separated from
//! the number by spaces; the number is a whole number (`_` allowed as a separator).

use std::fmt;
use std::str::FromStr;

/// A size in bytes, parsed from a human-friendly string (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

/// Why a size string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseSizeError {
    /// Nothing (or only spaces) was given.
    #[error("empty size")]
    Empty,
    /// The text does not start with a whole number.
    #[error("size {0:?} does not start with a whole number (like 4096 or 10GiB)")]
    NoNumber(String),
    /// The unit after the number is not known.
    #[error(
        "size {input:?} has unknown unit {unit:?} (use B, K/KiB, M/MiB, G/GiB, T/TiB, P/PiB, or KB/MB/GB/TB/PB)"
    )]
    UnknownUnit {
        /// The whole input.
        input: String,
        /// The unit that was not understood.
        unit: String,
    },
    /// The size does not fit in 64 bits.
    #[error("size {0:?} is too large")]
    Overflow(String),
}

/// Parses a size such as `512MiB`, `10GiB`, `4096` or `2GB` into bytes.
pub fn parse_size(input: &str) -> Result<u64, ParseSizeError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(ParseSizeError::Empty);
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '_'))
        .unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let digits: String = digits.chars().filter(|&c| c != '_').collect();
    if digits.is_empty() {
        return Err(ParseSizeError::NoNumber(input.to_owned()));
    }
    let number: u64 = digits
        .parse()
        .map_err(|_| ParseSizeError::Overflow(input.to_owned()))?;
    let unit = unit.trim_start();
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "p" | "pib" => 1 << 50,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "pb" => 1_000_000_000_000_000,
        _ => {
            return Err(ParseSizeError::UnknownUnit {
                input: input.to_owned(),
                unit: unit.to_owned(),
            });
        }
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| ParseSizeError::Overflow(input.to_owned()))
}

impl FromStr for ByteSize {
    type Err = ParseSizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_size(s).map(ByteSize)
    }
}

impl fmt::Display for ByteSize {
    /// Shows the largest binary unit that divides the size exactly (`10GiB`, `4096B`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 5] = [
            ("PiB", 1 << 50),
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        for (name, unit) in UNITS {
            if self.0 >= unit && self.0.is_multiple_of(unit) {
                return write!(f, "{}{name}", self.0 / unit);
            }
        }
        write!(f, "{}B", self.0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn plain_bytes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size(" 1_048_576 "), Ok(1 << 20));
    }

    #[test]
    fn binary_units() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("3M"), Ok(3 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("1P"), Ok(1 << 50));
        assert_eq!(parse_size("1 gib"), Ok(1 << 30));
    }

    #[test]
    fn decimal_units() {
        assert_eq!(parse_size("1KB"), Ok(1_000));
        assert_eq!(parse_size("5MB"), Ok(5_000_000));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("1TB"), Ok(1_000_000_000_000));
        assert_eq!(parse_size("1 gb"), Ok(1_000_000_000));
    }

    #[test]
    fn bad_input() {
        assert_eq!(parse_size(""), Err(ParseSizeError::Empty));
        assert_eq!(parse_size("   "), Err(ParseSizeError::Empty));
        assert!(matches!(
            parse_size("GiB"),
            Err(ParseSizeError::NoNumber(_))
        ));
        assert!(matches!(parse_size("-1"), Err(ParseSizeError::NoNumber(_))));
        assert!(matches!(
            parse_size("1.5GiB"),
            Err(ParseSizeError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_size("10XB"),
            Err(ParseSizeError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_size("10 GiB extra"),
            Err(ParseSizeError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(ParseSizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("16384PiB"),
            Err(ParseSizeError::Overflow(_))
        ));
    }

    #[test]
    fn error_messages_are_clear() {
        let e = parse_size("10XB").unwrap_err().to_string();
        assert!(e.contains("unknown unit \"XB\""), "{e}");
    }

    #[test]
    fn from_str_and_display() {
        let s: ByteSize = "10GiB".parse().unwrap();
        assert_eq!(s.bytes(), 10 << 30);
        assert_eq!(s.to_string(), "10GiB");
        assert_eq!(ByteSize(4097).to_string(), "4097B");
        assert_eq!(ByteSize(0).to_string(), "0B");
        assert_eq!(ByteSize(1536).to_string(), "1536B");
        assert_eq!(ByteSize(3 << 10).to_string(), "3KiB");
    }
}
