//! The per-connection limit on warnings the other side's messages cause (malformed or
//! refused requests, stream protocol errors, signals that cannot be delivered). Each such
//! message costs a log line, so without a limit a hostile peer floods the logs at the
//! rate it sends (one line per 20-byte message). What the connection does with the
//! message (answer, skip, close) does not depend on it.

use std::sync::atomic::{AtomicU64, Ordering};

/// How many of a connection's warnings are logged before the limit applies.
pub(super) const LOGGED_IN_FULL: u64 = 8;

/// Counts a connection's warnings and says which to log: the first
/// [`LOGGED_IN_FULL`], then the 16th, 32nd, 64th, … (each with the count so far), so a
/// connection logs at most 68 lines whatever it sends. The receive task summarises the
/// rest once when the connection ended ([`suppressed`](Self::suppressed)).
#[derive(Debug, Default)]
pub(super) struct Warnings {
    seen: AtomicU64,
}

impl Warnings {
    /// Counts a warning: `Some(count so far)` if it is to be logged. An add and two
    /// comparisons.
    pub(super) fn admit(&self) -> Option<u64> {
        let n = self.seen.fetch_add(1, Ordering::Relaxed) + 1;
        (n <= LOGGED_IN_FULL || n.is_power_of_two()).then_some(n)
    }

    /// How many warnings were counted and not logged.
    pub(super) fn suppressed(&self) -> u64 {
        let n = self.seen.load(Ordering::Relaxed);
        n - logged(n)
    }
}

/// How many of the first `n` warnings [`Warnings::admit`] let through.
fn logged(n: u64) -> u64 {
    if n <= LOGGED_IN_FULL {
        n
    } else {
        // The powers of two in (LOGGED_IN_FULL, n]; LOGGED_IN_FULL is one.
        LOGGED_IN_FULL + u64::from(n.ilog2() - LOGGED_IN_FULL.ilog2())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_ones_then_each_power_of_two_and_the_rest_counted() {
        let w = Warnings::default();
        let admitted: Vec<u64> = (0..100_000).filter_map(|_| w.admit()).collect();
        let expected: Vec<u64> = (1..=8)
            .chain([16, 32, 64, 128, 256, 512, 1024, 2048, 4096])
            .chain([8192, 16384, 32768, 65536])
            .collect();
        assert_eq!(admitted, expected);
        assert_eq!(w.suppressed(), 100_000 - expected.len() as u64);
        for n in [0, 1, 8, 9, 15, 16, 17, 1 << 20, u64::MAX] {
            let counted = (1..=n.min(1 << 20))
                .filter(|&k| k <= LOGGED_IN_FULL || k.is_power_of_two())
                .count() as u64;
            if n <= 1 << 20 {
                assert_eq!(logged(n), counted, "{n}");
            }
        }
        assert_eq!(logged(u64::MAX), LOGGED_IN_FULL + 63 - 3);
    }
}
