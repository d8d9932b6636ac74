//! The receiving half of reliable signals (`[3, stream, seq, ..]`): admission through the
//! duplicate table (`dedup.rs`), and acknowledgements after the handler finished. The
//! sending half is the peer's outbox (`signals.rs`).

use std::sync::Arc;

use std::time::Duration;

use chatter_core::{Msg, SendError, SendOptions};
use tokio::sync::oneshot;

use super::backlog::{Kind, Waiting};
use super::dedup::{admit, Admit};
use super::serve::Batch;
use super::{after, bump, Inner};
use crate::context::CallContext;
use crate::service::{CatchUnwind, Handlers};
use crate::wire::{self, AckStatus, Name};

impl Inner {
    /// A reliable signal arrived: run it unless it is a duplicate, then acknowledge it.
    /// As a plain signal, it waits for a handler slot holding its credit; the credit goes
    /// back once the acknowledgement was sent.
    pub(super) fn on_reliable(
        self: &Arc<Self>,
        msg: &Msg,
        (stream, seq): (u64, u64),
        ttl: Duration,
        parts: (Name<'_>, Name<'_>, &[u8]),
        context: Option<&[u8]>,
        batch: &mut Batch,
    ) {
        let credit = msg.credit();
        let conv = msg.conversation;
        let ordered = self.peer.options.ordered_signals;
        let kind = match admit(stream, seq) {
            Admit::New(admitted) => Kind::Reliable(admitted),
            // In ordered mode the duplicate keeps its place in the order: what comes after
            // it waits until the first copy finished.
            Admit::Running(outcome) if ordered => Kind::Duplicate {
                stream,
                seq,
                outcome,
            },
            Admit::Running(outcome) => {
                let kind = Kind::Duplicate {
                    stream,
                    seq,
                    outcome,
                };
                let Some(mut item) =
                    Waiting::new(kind, &msg.payload, parts, context, after(ttl), credit)
                else {
                    batch.release += u64::from(credit);
                    return;
                };
                let inner = self.clone();
                // Needs no handler slot unless the first copy is abandoned. Holds the
                // duplicate's credit, so a peer can have at most receive_window / (64 +
                // its size) of these per connection, each a task of a few hundred bytes
                // plus a copy of the signal (the tests measured the copies held within the
                // window: `duplicate_reliable_signals_run_once_and_are_held_within_the_window`;
                // about 630 bytes a copy in all, SECURITY.md).
                tokio::spawn(async move {
                    let Kind::Duplicate { outcome, .. } =
                        std::mem::replace(&mut item.kind, Kind::Signal)
                    else {
                        unreachable!("made as a duplicate")
                    };
                    let release = inner.run_duplicate(stream, seq, outcome, &item).await;
                    inner.conn.release(release);
                });
                return;
            }
            Admit::Done(status) => {
                batch.release += self.acknowledge(stream, seq, status, credit);
                return;
            }
        };
        let item = Waiting::new(kind, &msg.payload, parts, context, after(ttl), credit);
        self.wait(conv, false, item, credit, batch);
    }

    /// A reliable signal whose context is over `max_metadata_bytes`: not run, and
    /// acknowledged *failed* (PROTOCOL.md, "Reliable signals"), so that the sender
    /// settles it instead of re-sending it until its TTL runs out. It goes through the
    /// duplicate table like any other: a copy of a signal already done is acknowledged
    /// with that outcome, one of a signal running with the running copy's. Returns the
    /// credit to give back now.
    #[cold]
    #[inline(never)]
    pub(super) fn reliable_too_large(
        self: &Arc<Self>,
        (stream, seq): (u64, u64),
        what: &str,
        credit: u32,
    ) -> u64 {
        if let Some(warnings) = self.warnings.admit() {
            tracing::warn!(
                peer = %self.conn.remote_address(),
                stream,
                seq,
                error = what,
                warnings,
                "reliable signal refused: metadata too large"
            );
        }
        let status = match admit(stream, seq) {
            Admit::New(admitted) => {
                bump(&self.peer.stats.signals_failed);
                admitted.finish(AckStatus::Failed);
                AckStatus::Failed
            }
            Admit::Done(status) => status,
            Admit::Running(outcome) => {
                // Waits for the running copy's outcome, as a duplicate does; if that copy
                // is abandoned, this one cannot run in its place. Bound: the task keeps
                // this copy's flow-control credit until it ends (the `release` below), so
                // a peer sending such copies faster than the first one finishes waits for
                // credit once they fill `receive_window`: at most `receive_window` / 64
                // such tasks per connection, about 630 bytes each (docs/SECURITY.md, "6 ×
                // the window"). Each ends when the running copy finishes or is dropped
                // (its sender then goes, and `outcome` fails).
                let inner = self.clone();
                tokio::spawn(async move {
                    let status = outcome.await.unwrap_or(AckStatus::Failed);
                    let release = inner.acknowledge(stream, seq, status, credit);
                    inner.conn.release(release);
                });
                return 0;
            }
        };
        self.acknowledge(stream, seq, status, credit)
    }

    /// A copy of a reliable signal that was running when this one arrived: acknowledged
    /// with the first copy's outcome. If the first copy was abandoned instead (its
    /// connection closed before it ran), this copy runs in its place. Returns the credit
    /// to give back now.
    pub(super) async fn run_duplicate(
        &self,
        stream: u64,
        seq: u64,
        mut outcome: oneshot::Receiver<AckStatus>,
        item: &Waiting,
    ) -> u64 {
        loop {
            if let Ok(status) = (&mut outcome).await {
                return self.acknowledge(stream, seq, status, item.credit);
            }
            match admit(stream, seq) {
                Admit::Running(next) => outcome = next,
                Admit::Done(status) => return self.acknowledge(stream, seq, status, item.credit),
                Admit::New(admitted) => {
                    if tokio::time::Instant::now() >= item.expires {
                        admitted.finish(AckStatus::Expired);
                        return self.acknowledge(stream, seq, AckStatus::Expired, item.credit);
                    }
                    // Boxed: the handler's state is made only in this rare case, so a
                    // copy that just waits for the first one's outcome stays small.
                    let Some(status) = Box::pin(self.run_reliable(item)).await else {
                        admitted.abandon();
                        return u64::from(item.credit);
                    };
                    admitted.finish(status);
                    return self.acknowledge(stream, seq, status, item.credit);
                }
            }
        }
    }

    /// Sends the acknowledgement of a reliable signal now, or queues it holding the
    /// signal's credit. Returns the credit to give back now.
    pub(super) fn acknowledge(&self, stream: u64, seq: u64, status: AckStatus, credit: u32) -> u64 {
        let ack = wire::encode_ack(stream, seq, status);
        match self.conn.try_send(&ack, SendOptions::new()) {
            Err(SendError::WouldBlock) => {
                self.queue_holding(ack, SendOptions::new(), credit);
                0
            }
            _ => u64::from(credit),
        }
    }

    /// Runs a reliable signal's handler (the caller owns a handler slot and checked the
    /// TTL). `None` if the connection closed before it could start (hosted objects are
    /// dropped at close): the sender re-sends it.
    pub(super) async fn run_reliable(&self, item: &Waiting) -> Option<AckStatus> {
        let (object, method) = (item.object(), item.method());
        if self.conn.is_closed() && self.lookup_name(object).is_none() {
            return None;
        }
        // As a plain signal that waited (`run_waiting`), with an outcome to acknowledge.
        let mut handlers = Handlers::new();
        if !self.start_signal(object, method, item.args(), None, &mut handlers) {
            // The connection may have closed between the check above and the lookup (a
            // peer made from a connection drops its objects at the close): then the
            // sender re-sends it, rather than learning of a failure that was not its.
            if self.conn.is_closed() {
                return None;
            }
            return Some(AckStatus::Failed);
        }
        bump(&self.peer.stats.signals_delivered);
        let handler = CatchUnwind(handlers.signal_mut());
        let cx = item.context(self, true);
        let (traced, timer) = self.waiting_span("reliable", item, cx.as_ref(), None);
        let run = CallContext::scope(cx, handler);
        let result = tracing::Instrument::instrument(run, traced.span()).await;
        let (status, outcome) = match result {
            Ok(()) => (AckStatus::Handled, "ok"),
            Err(_) => (AckStatus::Failed, "remote_panic"),
        };
        if let Some(traced) = &traced.0 {
            traced.handled(outcome);
        }
        timer.handled((object.as_bytes(), method.as_bytes()), "reliable", outcome);
        self.signal_result(result, object, method);
        Some(status)
    }
}
