//! Log sequence numbers: a position in the source's write-ahead log, as PostgreSQL's `pg_lsn`.
//!
//! The text form is two hexadecimal numbers of one to eight digits each, `X/Y`, the high and
//! low 32 bits. Parsing is exactly as strict as `pg_lsn_in` (pg_lsn.c): no sign, no spaces,
//! no `0x`, nothing after the second number; either case of hex digit is accepted. Rendering
//! matches PostgreSQL's `%X/%X`: uppercase, no leading zeros, so a round trip is lossless for
//! every value and canonical output compares equal to what the server prints.

use std::fmt;
use std::str::FromStr;

/// Longest hex component PostgreSQL accepts (`MAXPG_LSNCOMPONENT`).
const MAX_COMPONENT_DIGITS: usize = 8;

/// A WAL position. Ordered like the log; [`Lsn::INVALID`] (`0/0`) means "none".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// `0/0`, PostgreSQL's `InvalidXLogRecPtr`.
    pub const INVALID: Lsn = Lsn(0);

    /// True for any position but [`Lsn::INVALID`].
    pub fn is_valid(self) -> bool {
        self != Lsn::INVALID
    }
}

impl From<u64> for Lsn {
    fn from(v: u64) -> Lsn {
        Lsn(v)
    }
}

impl From<Lsn> for u64 {
    fn from(lsn: Lsn) -> u64 {
        lsn.0
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// Text that is not an LSN. The message mirrors PostgreSQL's and quotes at most 64
/// characters of the input (LSNs are never secret, but the input may be anything).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid input syntax for type pg_lsn: \"{0}\"")]
pub struct ParseLsnError(String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Lsn, ParseLsnError> {
        let err = || ParseLsnError(s.chars().take(64).collect());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let component = |part: &str| -> Result<u64, ParseLsnError> {
            // from_str_radix alone would accept a leading '+'.
            if part.is_empty()
                || part.len() > MAX_COMPONENT_DIGITS
                || !part.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Err(err());
            }
            u64::from_str_radix(part, 16).map_err(|_| err())
        };
        Ok(Lsn((component(hi)? << 32) | component(lo)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsn(s: &str) -> Lsn {
        match s.parse() {
            Ok(l) => l,
            Err(e) => panic!("{s:?}: {e}"),
        }
    }

    #[test]
    fn parses_postgres_forms() {
        assert_eq!(lsn("0/0"), Lsn::INVALID);
        assert!(!Lsn::INVALID.is_valid());
        assert_eq!(lsn("0/1A2B3C4"), Lsn(0x1A2B3C4));
        assert_eq!(lsn("16/B374D848"), Lsn(0x16_B374_D848));
        assert_eq!(lsn("16/b374d848"), Lsn(0x16_B374_D848), "lower case");
        assert_eq!(
            lsn("00000001/00000002"),
            Lsn((1 << 32) | 2),
            "leading zeros"
        );
        assert_eq!(lsn("FFFFFFFF/FFFFFFFF"), Lsn(u64::MAX));
    }

    #[test]
    fn displays_like_postgres() {
        assert_eq!(Lsn::INVALID.to_string(), "0/0");
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn(1 << 32).to_string(), "1/0");
        assert_eq!(Lsn(u64::MAX).to_string(), "FFFFFFFF/FFFFFFFF");
    }

    #[test]
    fn round_trips() {
        let mut v: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..1000 {
            v = v.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            for value in [v, v >> 32, v & 0xFFFF_FFFF, v >> 61] {
                let l = Lsn(value);
                assert_eq!(lsn(&l.to_string()), l);
            }
        }
        // Canonical text survives the reverse trip too.
        for s in ["0/0", "1/0", "0/1", "ABCDEF01/23456789"] {
            assert_eq!(lsn(s).to_string(), s);
        }
    }

    #[test]
    fn ordering_follows_the_log() {
        assert!(lsn("0/FFFFFFFF") < lsn("1/0"));
        assert!(lsn("1/10") > lsn("1/F"));
        assert_eq!(Lsn::from(5u64), Lsn(5));
        assert_eq!(u64::from(Lsn(5)), 5);
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "",
            "/",
            "0",
            "0/",
            "/0",
            "0//0",
            "0/0/0",
            " 0/0",
            "0/0 ",
            "0 /0",
            "+1/0",
            "0/+1",
            "-1/0",
            "0x1/0",
            "G/0",
            "123456789/0",
            "0/123456789",
            "１/0",
            "0/0\0",
            "0.1/0",
        ] {
            let parsed = bad.parse::<Lsn>();
            assert!(parsed.is_err(), "{bad:?} parsed as {parsed:?}");
        }
        let err = "nope".parse::<Lsn>().err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("invalid input syntax for type pg_lsn: \"nope\"")
        );
        let long = "x".repeat(1000);
        let shown = long.parse::<Lsn>().err().map(|e| e.to_string());
        assert!(shown.is_some_and(|m| m.len() < 120));
    }
}
