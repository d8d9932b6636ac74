//! The receiving half of reliable signals (`[3, stream, seq, ..]`): duplicate detection by
//! sender stream and sequence number, acknowledgements after the handler finished, and the
//! ordered (one at a time, in arrival order) signal mode. The sending half is the peer's
//! outbox (`signals.rs`).
//!
//! Duplicate detection keeps, per sender stream, the highest sequence number accepted so
//! far. A sender sends a stream's signals in sequence order and re-sends unacknowledged
//! ones in the same order after a reconnect, so anything at or below that mark was
//! already accepted: it is not run again, only acknowledged again (after the first copy
//! finished, with the first copy's outcome). The table lives in this process (shared by
//! every peer of it), holds at most [`MAX_STREAMS`] streams (the least recently used is
//! forgotten first), and is lost when the process exits: a signal whose acknowledgement
//! was lost *and* whose receiver restarted is run again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

use std::time::Duration;

use chatter_core::{Msg, SendError, SendOptions};
use tokio::sync::oneshot;

use super::backlog::{Kind, Waiting};
use super::serve::Batch;
use super::{after, bump, lock, Inner};
use crate::service::{CatchUnwind, Dispatch, Handlers};
use crate::wire::{self, AckStatus, Name};

/// How many sender streams the duplicate table remembers.
pub(crate) const MAX_STREAMS: usize = 4096;
/// How many non-`Handled` outcomes are remembered per stream (for re-acknowledgements).
const MAX_EXCEPTIONS: usize = 1024;
/// How many abandoned signals are remembered per stream (see [`Admitted::abandon`]).
const MAX_ABANDONED: usize = 65_536;

#[derive(Default)]
struct Streams {
    map: HashMap<u64, StreamState>,
    tick: u64,
}

#[derive(Default)]
struct StreamState {
    /// Highest sequence number accepted.
    high: u64,
    /// Accepted, handler not finished yet: who waits for the outcome.
    running: HashMap<u64, Vec<oneshot::Sender<AckStatus>>>,
    /// Recent outcomes other than `Handled`.
    exceptions: VecDeque<(u64, AckStatus)>,
    /// Accepted, then dropped unrun because their connection closed while they waited
    /// for a handler slot: a re-sent copy is accepted as new.
    abandoned: HashSet<u64>,
    used: u64,
}

/// What the duplicate table says about an arriving reliable signal.
pub(super) enum Admit {
    /// New: run it, then [`finish`](Admitted::finish) it.
    New(Admitted),
    /// A copy is running: acknowledge with its outcome when it arrives.
    Running(oneshot::Receiver<AckStatus>),
    /// Done before: acknowledge again with this outcome.
    Done(AckStatus),
}

fn streams() -> &'static Mutex<Streams> {
    static STREAMS: OnceLock<Mutex<Streams>> = OnceLock::new();
    STREAMS.get_or_init(Mutex::default)
}

pub(super) fn admit(stream: u64, seq: u64) -> Admit {
    let mut all = lock(streams());
    all.tick += 1;
    let tick = all.tick;
    if !all.map.contains_key(&stream) && all.map.len() >= MAX_STREAMS {
        let idle = all
            .map
            .iter()
            .filter(|(_, s)| s.running.is_empty())
            .min_by_key(|(_, s)| s.used)
            .map(|(k, _)| *k);
        if let Some(k) = idle {
            all.map.remove(&k);
        }
    }
    let st = all.map.entry(stream).or_default();
    st.used = tick;
    if seq > st.high || st.abandoned.remove(&seq) {
        st.high = st.high.max(seq);
        st.running.insert(seq, Vec::new());
        return Admit::New(Admitted {
            stream,
            seq,
            done: false,
        });
    }
    if let Some(waiters) = st.running.get_mut(&seq) {
        let (tx, rx) = oneshot::channel();
        waiters.push(tx);
        return Admit::Running(rx);
    }
    let status = st
        .exceptions
        .iter()
        .find(|(s, _)| *s == seq)
        .map_or(AckStatus::Handled, |(_, st)| *st);
    Admit::Done(status)
}

fn complete(stream: u64, seq: u64, status: AckStatus) {
    let mut all = lock(streams());
    let Some(st) = all.map.get_mut(&stream) else {
        return;
    };
    let waiters = st.running.remove(&seq).unwrap_or_default();
    if status != AckStatus::Handled {
        if st.exceptions.len() >= MAX_EXCEPTIONS {
            st.exceptions.pop_front();
        }
        st.exceptions.push_back((seq, status));
    }
    drop(all);
    for w in waiters {
        let _ = w.send(status);
    }
}

/// An admitted reliable signal: completes as `Failed` if dropped before it finished.
pub(super) struct Admitted {
    pub(super) stream: u64,
    pub(super) seq: u64,
    done: bool,
}

impl Admitted {
    pub(super) fn finish(mut self, status: AckStatus) {
        self.done = true;
        complete(self.stream, self.seq, status);
    }

    /// The signal will not run here after all (its connection closed while it waited for
    /// a handler slot): the sender, which was not acknowledged, re-sends it, and that copy
    /// is accepted as new. Copies waiting for this one's outcome get none (they are not
    /// acknowledged either).
    pub(super) fn abandon(mut self) {
        self.done = true;
        let mut all = lock(streams());
        let Some(st) = all.map.get_mut(&self.stream) else {
            return;
        };
        st.running.remove(&self.seq);
        if st.abandoned.len() < MAX_ABANDONED {
            st.abandoned.insert(self.seq);
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if !self.done {
            complete(self.stream, self.seq, AckStatus::Failed);
        }
    }
}

impl Inner {
    /// A reliable signal arrived: run it unless it is a duplicate, then acknowledge it.
    /// As a plain signal, it waits for a handler slot holding its credit; the credit goes
    /// back once the acknowledgement was sent.
    pub(super) fn on_reliable(
        self: &Arc<Self>,
        msg: &Msg,
        stream: u64,
        seq: u64,
        ttl: Duration,
        parts: (Name<'_>, Name<'_>, &[u8]),
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
                let Some(mut item) = Waiting::new(kind, &msg.payload, parts, after(ttl), credit)
                else {
                    batch.release += u64::from(credit);
                    return;
                };
                let inner = self.clone();
                // Needs no handler slot unless the first copy is abandoned; holds the
                // duplicate's credit, so a peer cannot make these pile up beyond its window.
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
        let item = Waiting::new(kind, &msg.payload, parts, after(ttl), credit);
        self.wait(conv, false, item, credit, batch);
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
                    let Some(status) = self.run_reliable(item).await else {
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
        let failed = |why: &str| {
            tracing::warn!("chatter-rpc: signal `{object}.{method}` not delivered: {why}");
            bump(&self.peer.stats.signals_failed);
            AckStatus::Failed
        };
        let Some(service) = self.lookup_name(object) else {
            if self.conn.is_closed() {
                return None;
            }
            return Some(failed("no such object"));
        };
        let mut handlers = Handlers::new();
        let dispatch = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            service.__dispatch(method.as_bytes(), item.args(), &mut handlers)
        }));
        Some(match dispatch {
            Ok(Dispatch::Signal) => {
                bump(&self.peer.stats.signals_delivered);
                match CatchUnwind(handlers.signal_mut()).await {
                    Ok(()) => AckStatus::Handled,
                    Err(message) => {
                        bump(&self.peer.stats.handler_panics);
                        failed(&format!("handler panicked: {message}"))
                    }
                }
            }
            Ok(Dispatch::Call) => failed("the method is a call, not a signal"),
            Ok(Dispatch::NoSuchMethod) => failed("no such method"),
            Ok(Dispatch::BadArguments(what)) => failed(&what),
            Err(_) => {
                bump(&self.peer.stats.handler_panics);
                failed("argument decoding panicked")
            }
        })
    }
}
