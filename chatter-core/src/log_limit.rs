//! The limit on log lines that a peer's input can cause.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counts the warnings a peer's input causes and says which to log: the first
/// [`LOGGED_IN_FULL`](Self::LOGGED_IN_FULL), then the 16th, 32nd, 64th, … (each with the
/// count so far), so that at most 68 lines are logged however many warnings there are.
/// Without a limit a hostile peer floods the log at the rate it sends.
///
/// chatter uses one per server for handshake failures ([`Server::rejected`]) and one per
/// connection in chatter-rpc for malformed or refused requests; an application can use
/// one for warnings of its own that a peer can cause.
///
/// [`Server::rejected`]: crate::Server::rejected
///
/// ```
/// use chatter_core::LogLimit;
///
/// let limit = LogLimit::default();
/// let logged = (0..1000).filter(|_| limit.admit().is_some()).count();
/// assert_eq!(logged, 8 + 6); // 1..=8, then 16, 32, 64, 128, 256, 512
/// assert_eq!(limit.count(), 1000);
/// assert_eq!(limit.suppressed(), 1000 - 14);
/// ```
#[derive(Debug, Default)]
pub struct LogLimit {
    seen: AtomicU64,
}

impl LogLimit {
    /// How many warnings are logged before the limit applies.
    pub const LOGGED_IN_FULL: u64 = 8;

    /// Counts a warning: `Some(count so far)` if it is to be logged. An add and two
    /// comparisons.
    pub fn admit(&self) -> Option<u64> {
        let n = self.seen.fetch_add(1, Ordering::Relaxed) + 1;
        (n <= Self::LOGGED_IN_FULL || n.is_power_of_two()).then_some(n)
    }

    /// How many warnings were counted, logged or not.
    pub fn count(&self) -> u64 {
        self.seen.load(Ordering::Relaxed)
    }

    /// How many warnings were counted and not logged.
    pub fn suppressed(&self) -> u64 {
        let n = self.count();
        n - logged(n)
    }
}

/// How many of the first `n` warnings [`LogLimit::admit`] let through.
fn logged(n: u64) -> u64 {
    if n <= LogLimit::LOGGED_IN_FULL {
        n
    } else {
        // The powers of two in (LOGGED_IN_FULL, n]; LOGGED_IN_FULL is one.
        LogLimit::LOGGED_IN_FULL + u64::from(n.ilog2() - LogLimit::LOGGED_IN_FULL.ilog2())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_ones_then_each_power_of_two_and_the_rest_counted() {
        let w = LogLimit::default();
        let admitted: Vec<u64> = (0..100_000).filter_map(|_| w.admit()).collect();
        let expected: Vec<u64> = (1..=8)
            .chain([16, 32, 64, 128, 256, 512, 1024, 2048, 4096])
            .chain([8192, 16384, 32768, 65536])
            .collect();
        assert_eq!(admitted, expected);
        assert_eq!(w.suppressed(), 100_000 - expected.len() as u64);
        for n in [0, 1, 8, 9, 15, 16, 17, 1 << 20, u64::MAX] {
            let counted = (1..=n.min(1 << 20))
                .filter(|&k| k <= LogLimit::LOGGED_IN_FULL || k.is_power_of_two())
                .count() as u64;
            if n <= 1 << 20 {
                assert_eq!(logged(n), counted, "{n}");
            }
        }
        assert_eq!(logged(u64::MAX), LogLimit::LOGGED_IN_FULL + 63 - 3);
    }
}
