//! Bandwidth limits per connection: [`Throttle`] and the token bucket behind it.

use std::time::Duration;

use tokio::time::Instant;

/// A rate in bytes per second with the burst a token bucket allows on top of it.
///
/// The bucket holds up to `burst` bytes and refills at `bytes_per_second`; a transfer
/// takes from it, and waits while it is empty. Over any interval of length `t` at most
/// `burst + bytes_per_second × t` bytes pass.
///
/// ```
/// use chatter_core::Rate;
///
/// // 1 MB/s, bursts of up to 64 KiB.
/// let rate = Rate::new(1_000_000).burst(64 * 1024);
/// assert_eq!(rate.bytes_per_second(), 1_000_000);
/// assert_eq!(rate.burst_bytes(), 64 * 1024);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    bytes_per_second: u64,
    burst: u64,
}

impl Rate {
    /// `bytes_per_second` (at least 1), with a burst of a tenth of a second's worth, but at
    /// least 16 KiB (one read of the connection).
    pub fn new(bytes_per_second: u64) -> Rate {
        let bytes_per_second = bytes_per_second.max(1);
        Rate {
            bytes_per_second,
            burst: (bytes_per_second / 10).max(MIN_BURST),
        }
    }

    /// Sets the burst: how many bytes may pass at once after a quiet period (at least 1).
    pub fn burst(mut self, bytes: u64) -> Rate {
        self.burst = bytes.max(1);
        self
    }

    /// The sustained rate.
    pub fn bytes_per_second(&self) -> u64 {
        self.bytes_per_second
    }

    /// The burst size.
    pub fn burst_bytes(&self) -> u64 {
        self.burst
    }
}

/// Bandwidth limits of one connection, each direction on its own (as snakeMQ's
/// `Throttle`). Set it for new connections with
/// [`Options::throttle`](crate::Options::throttle), or change it on a live one with
/// [`Connection::set_throttle`](crate::Connection::set_throttle).
///
/// Limits count the bytes on the transport (frames with their headers; on TLS, the
/// plaintext). Receiving slower than the peer sends fills the socket's buffers, and then
/// the peer's: the peer's sends wait, as with any slow reader. Keep the receive rate well
/// above what keepalive needs (a ping every `interval`).
///
/// ```
/// use chatter_core::{Options, Rate, Throttle};
///
/// let options = Options::default().throttle(Throttle {
///     send: Some(Rate::new(10 * 1024 * 1024)),
///     receive: Some(Rate::new(1024 * 1024).burst(256 * 1024)),
/// });
/// # let _ = options;
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Throttle {
    /// Limit on the bytes written to the peer; `None` for no limit.
    pub send: Option<Rate>,
    /// Limit on the bytes read from the peer; `None` for no limit.
    pub receive: Option<Rate>,
}

impl Throttle {
    /// No limit either way.
    pub const NONE: Throttle = Throttle {
        send: None,
        receive: None,
    };
}

/// The smallest default burst: one read chunk of the driver.
const MIN_BURST: u64 = 16 * 1024;

/// A token bucket: `tokens` bytes may pass now; refilled at the rate up to the burst.
#[derive(Debug)]
pub(crate) struct Bucket {
    rate: Rate,
    tokens: u64,
    /// When `tokens` was last brought up to date.
    at: Instant,
}

impl Bucket {
    /// A full bucket.
    pub(crate) fn new(rate: Rate, now: Instant) -> Bucket {
        Bucket {
            rate,
            tokens: rate.burst,
            at: now,
        }
    }

    pub(crate) fn rate(&self) -> Rate {
        self.rate
    }

    /// How many bytes may pass now.
    pub(crate) fn available(&mut self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.at);
        // Whole bytes earned since `at`; `at` moves on by the time those bytes took, so
        // that fractions of a byte are not lost between calls.
        let earned = (elapsed.as_nanos() * self.rate.bytes_per_second as u128 / NANOS) as u64;
        if earned > 0 {
            self.tokens = self.tokens.saturating_add(earned).min(self.rate.burst);
            if self.tokens == self.rate.burst {
                self.at = now;
            } else {
                self.at += nanos_for(earned, self.rate.bytes_per_second);
            }
        }
        self.tokens
    }

    /// Takes `n` bytes that passed (at most what [`available`](Self::available) said).
    pub(crate) fn take(&mut self, n: u64) {
        self.tokens = self.tokens.saturating_sub(n);
    }

    /// When `want` bytes (capped at the burst) will be available.
    pub(crate) fn ready_at(&mut self, now: Instant, want: u64) -> Instant {
        let want = want.clamp(1, self.rate.burst);
        let have = self.available(now);
        if have >= want {
            return now;
        }
        self.at + nanos_for(want - have, self.rate.bytes_per_second)
    }
}

const NANOS: u128 = 1_000_000_000;

/// The time `bytes` take at `rate` bytes per second, rounded up to the nanosecond.
fn nanos_for(bytes: u64, rate: u64) -> Duration {
    let nanos = (bytes as u128 * NANOS).div_ceil(rate as u128);
    Duration::from_nanos(nanos.min(u64::MAX as u128) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_the_rate() {
        let start = Instant::now();
        let mut b = Bucket::new(Rate::new(1000).burst(100), start);
        assert_eq!(b.available(start), 100);
        b.take(100);
        assert_eq!(b.available(start), 0);
        assert_eq!(b.ready_at(start, 50), start + Duration::from_millis(50));
        assert_eq!(b.available(start + Duration::from_millis(10)), 10);
        // Fractions are kept: 1.5 ms then 1.5 ms make 3 bytes, not 2.
        b.take(10);
        let t = start + Duration::from_millis(10);
        assert_eq!(b.available(t + Duration::from_micros(1500)), 1);
        assert_eq!(b.available(t + Duration::from_micros(3000)), 3);
        // Never more than the burst, however long it was quiet.
        assert_eq!(b.available(start + Duration::from_secs(3600)), 100);
    }

    #[test]
    fn over_any_interval_at_most_burst_plus_rate_times_time_passes() {
        let start = Instant::now();
        let mut b = Bucket::new(Rate::new(10_000).burst(1_000), start);
        let mut passed = 0;
        let mut now = start;
        for step in 0..10_000u64 {
            now += Duration::from_micros(37 + step % 50);
            let n = b.available(now).min(123);
            b.take(n);
            passed += n;
        }
        let elapsed = now - start;
        let allowed = 1_000 + (elapsed.as_secs_f64() * 10_000.0) as u64;
        assert!(passed <= allowed, "{passed} > {allowed}");
        assert!(
            passed + 1_000 >= allowed,
            "only {passed} of {allowed} passed"
        );
    }
}
