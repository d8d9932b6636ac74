//! Metrics through the [`metrics`](https://docs.rs/metrics) facade, with the `metrics`
//! feature (off by default): the counters of [`PeerStats`](crate::PeerStats) and two
//! latency histograms. Without the feature, everything here is a no-op of size zero.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `chatter_rpc_call_duration_seconds` | histogram: a call, from its creation to its result, on the caller's side | `object`, `method`, `outcome` |
//! | `chatter_rpc_handler_duration_seconds` | histogram: a handler, from its start to its end, on the callee's side | `object`, `method`, `kind` (`call`, `signal`, `reliable`), `outcome` |
//! | `chatter_rpc_<counter>_total` | counter, one per [`PeerStats`](crate::PeerStats) field but `requests_waiting` (`chatter_rpc_connects_total`, `chatter_rpc_signals_sent_total`, `chatter_rpc_calls_received_total`, …; see [`COUNTERS`]) | none: summed over the process's peers |
//!
//! `outcome` is `ok`, `app_error` or the failure (`deadline_exceeded`, `cancelled`,
//! `remote_panic`, …), as in the spans. Install the recorder (a Prometheus exporter, for
//! example) before making peers: a peer takes its counters from the recorder installed
//! when it is made. Every handler is timed: run in place, continued in a task, run
//! after waiting for a slot, or a reliable signal's.
//!
//! ```
//! use chatter_rpc::telemetry::{CALL_DURATION, COUNTERS};
//!
//! assert_eq!(CALL_DURATION, "chatter_rpc_call_duration_seconds");
//! let calls = COUNTERS.iter().find(|(field, _)| *field == "calls_received");
//! assert_eq!(calls, Some(&("calls_received", "chatter_rpc_calls_received_total")));
//! ```

#[cfg(feature = "metrics")]
use std::time::Duration;

/// The histogram of call durations on the caller's side.
pub const CALL_DURATION: &str = "chatter_rpc_call_duration_seconds";
/// The histogram of handler durations on the callee's side.
pub const HANDLER_DURATION: &str = "chatter_rpc_handler_duration_seconds";

/// The counters, by [`PeerStats`](crate::PeerStats) field: `(field, metric name)`.
pub const COUNTERS: &[(&str, &str)] = &[
    ("connects", "chatter_rpc_connects_total"),
    ("signals_queued", "chatter_rpc_signals_queued_total"),
    ("signals_sent", "chatter_rpc_signals_sent_total"),
    ("signals_resent", "chatter_rpc_signals_resent_total"),
    (
        "signals_acknowledged",
        "chatter_rpc_signals_acknowledged_total",
    ),
    ("signals_expired", "chatter_rpc_signals_expired_total"),
    ("signals_dropped", "chatter_rpc_signals_dropped_total"),
    ("signals_rejected", "chatter_rpc_signals_rejected_total"),
    (
        "signals_failed_remotely",
        "chatter_rpc_signals_failed_remotely_total",
    ),
    ("signals_delivered", "chatter_rpc_signals_delivered_total"),
    (
        "signals_expired_on_arrival",
        "chatter_rpc_signals_expired_on_arrival_total",
    ),
    ("signals_failed", "chatter_rpc_signals_failed_total"),
    ("calls_received", "chatter_rpc_calls_received_total"),
    ("handler_panics", "chatter_rpc_handler_panics_total"),
];

/// The metric name of the counter of `field` (a [`COUNTERS`] entry).
#[cfg(feature = "metrics")]
pub(crate) fn counter_name(field: &str) -> &'static str {
    COUNTERS
        .iter()
        .find(|(f, _)| *f == field)
        .map_or("chatter_rpc_unknown_total", |(_, name)| name)
}

/// When something timed began: an instant with the feature, nothing without.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timer {
    #[cfg(feature = "metrics")]
    start: tokio::time::Instant,
}

impl Timer {
    /// Starts timing (reads the clock only with the feature).
    #[inline(always)]
    pub(crate) fn start() -> Timer {
        Timer {
            #[cfg(feature = "metrics")]
            start: tokio::time::Instant::now(),
        }
    }

    /// Records a call's duration in [`CALL_DURATION`].
    #[inline(always)]
    pub(crate) fn call_finished(&self, object: &str, method: &str, outcome: &'static str) {
        #[cfg(feature = "metrics")]
        record(
            CALL_DURATION,
            self.start.elapsed(),
            [("object", object), ("method", method), ("outcome", outcome)],
        );
        #[cfg(not(feature = "metrics"))]
        let _ = (object, method, outcome);
    }

    /// Records a handler's duration in [`HANDLER_DURATION`].
    #[inline(always)]
    pub(crate) fn handled(
        &self,
        (object, method): (&[u8], &[u8]),
        kind: &'static str,
        outcome: &'static str,
    ) {
        #[cfg(feature = "metrics")]
        {
            let name = |n: &[u8]| String::from_utf8_lossy(n).into_owned();
            let (object, method) = (name(object), name(method));
            record(
                HANDLER_DURATION,
                self.start.elapsed(),
                [
                    ("object", &object),
                    ("method", &method),
                    ("kind", kind),
                    ("outcome", outcome),
                ],
            );
        }
        #[cfg(not(feature = "metrics"))]
        let _ = (object, method, kind, outcome);
    }
}

/// A [`Timer`] with the names of the handler it times, for a handler that continues
/// in a task (the names are copied only with the feature).
#[derive(Debug)]
pub(crate) struct HandlerTimer {
    #[cfg(feature = "metrics")]
    timer: Timer,
    #[cfg(feature = "metrics")]
    names: (Vec<u8>, Vec<u8>),
}

impl HandlerTimer {
    #[inline(always)]
    pub(crate) fn new(timer: Timer, (object, method): (&[u8], &[u8])) -> HandlerTimer {
        #[cfg(not(feature = "metrics"))]
        let _ = (timer, object, method);
        HandlerTimer {
            #[cfg(feature = "metrics")]
            timer,
            #[cfg(feature = "metrics")]
            names: (object.to_vec(), method.to_vec()),
        }
    }

    /// Records the handler's duration in [`HANDLER_DURATION`].
    #[inline(always)]
    pub(crate) fn handled(&self, kind: &'static str, outcome: &'static str) {
        #[cfg(feature = "metrics")]
        self.timer
            .handled((&self.names.0, &self.names.1), kind, outcome);
        #[cfg(not(feature = "metrics"))]
        let _ = (kind, outcome);
    }
}

#[cfg(feature = "metrics")]
#[cold]
#[inline(never)]
fn record<const N: usize>(
    name: &'static str,
    elapsed: Duration,
    labels: [(&'static str, &str); N],
) {
    let labels: Vec<metrics::Label> = labels
        .iter()
        .map(|(k, v)| metrics::Label::new(*k, (*v).to_owned()))
        .collect();
    metrics::histogram!(name, labels).record(elapsed.as_secs_f64());
}
