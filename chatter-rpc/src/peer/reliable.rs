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

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{after, bump, lock, Inner};
use crate::service::{BoxFuture, CatchUnwind, Dispatch, Handlers, Service};
use crate::wire::{self, AckStatus, Incoming};

/// How many sender streams the duplicate table remembers.
pub(crate) const MAX_STREAMS: usize = 4096;
/// How many non-`Handled` outcomes are remembered per stream (for re-acknowledgements).
const MAX_EXCEPTIONS: usize = 1024;

#[derive(Default)]
struct Streams {
    map: HashMap<u64, StreamState>,
    tick: u64,
}

struct StreamState {
    /// Highest sequence number accepted.
    high: u64,
    /// Accepted, handler not finished yet: who waits for the outcome.
    running: HashMap<u64, Vec<oneshot::Sender<AckStatus>>>,
    /// Recent outcomes other than `Handled`.
    exceptions: VecDeque<(u64, AckStatus)>,
    /// Ordered mode: this stream's handlers, run one after another in sequence order
    /// whichever connection brought them (so a re-sent signal on a new connection cannot
    /// overtake one still queued from the old connection).
    queue: Option<mpsc::UnboundedSender<BoxFuture<()>>>,
    used: u64,
}

enum Admit {
    /// New: run this (already queued in ordered mode).
    New(Option<BoxFuture<()>>),
    Running(oneshot::Receiver<AckStatus>),
    Done(AckStatus),
}

fn streams() -> &'static Mutex<Streams> {
    static STREAMS: OnceLock<Mutex<Streams>> = OnceLock::new();
    STREAMS.get_or_init(Mutex::default)
}

fn admit(stream: u64, seq: u64, ordered: bool, handler: impl FnOnce() -> BoxFuture<()>) -> Admit {
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
    let st = all.map.entry(stream).or_insert_with(|| StreamState {
        high: 0,
        running: HashMap::new(),
        exceptions: VecDeque::new(),
        queue: None,
        used: 0,
    });
    st.used = tick;
    if seq > st.high {
        st.high = seq;
        st.running.insert(seq, Vec::new());
        if !ordered {
            return Admit::New(Some(handler()));
        }
        let queue = st.queue.get_or_insert_with(|| {
            let (tx, mut rx) = mpsc::unbounded_channel::<BoxFuture<()>>();
            tokio::spawn(async move {
                while let Some(fut) = rx.recv().await {
                    fut.await;
                }
            });
            tx
        });
        // A dead worker (runtime shutting down): hand the handler back rather than drop
        // it under this lock (its drop guard takes the lock).
        return match queue.send(handler()) {
            Ok(()) => Admit::New(None),
            Err(back) => Admit::New(Some(back.0)),
        };
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

/// Completes an admitted signal as `Failed` if its task is dropped before it finished.
struct Admitted {
    stream: u64,
    seq: u64,
    done: bool,
}

impl Admitted {
    fn finish(mut self, status: AckStatus) {
        self.done = true;
        complete(self.stream, self.seq, status);
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
    /// Runs a received signal's handler: in its own task, or in this peer's ordered queue.
    pub(super) fn spawn_signal(
        self: &Arc<Self>,
        fut: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        if !self.peer.options.ordered_signals {
            tokio::spawn(fut);
            return;
        }
        let queue = self.ordered.get_or_init(|| {
            let (tx, mut rx) = mpsc::unbounded_channel::<BoxFuture<()>>();
            tokio::spawn(async move {
                while let Some(fut) = rx.recv().await {
                    fut.await;
                }
            });
            tx
        });
        let _ = queue.send(Box::pin(fut));
    }

    /// A reliable signal arrived: run it unless it is a duplicate, then acknowledge it.
    pub(super) fn on_reliable(self: &Arc<Self>, payload: Bytes) {
        let Ok(Incoming::Reliable {
            stream,
            seq,
            object,
            ttl,
            ..
        }) = wire::decode_incoming(&payload)
        else {
            return;
        };
        let expires = after(ttl);
        // Looked up now, so that the handler runs even if this connection drops meanwhile
        // (the signal is already marked as received).
        let service = self.lookup_name(object);
        let inner = self.clone();
        let handler = move || -> BoxFuture<()> {
            let admitted = Admitted {
                stream,
                seq,
                done: false,
            };
            Box::pin(async move {
                let status = run_reliable(&inner, service, &payload, expires).await;
                admitted.finish(status);
                inner.send_soon(wire::encode_ack(stream, seq, status), Default::default());
            })
        };
        match admit(stream, seq, self.peer.options.ordered_signals, handler) {
            Admit::New(Some(run)) => {
                tokio::spawn(run);
            }
            Admit::New(None) => {}
            Admit::Running(rx) => {
                let inner = self.clone();
                tokio::spawn(async move {
                    if let Ok(status) = rx.await {
                        inner.send_soon(wire::encode_ack(stream, seq, status), Default::default());
                    }
                });
            }
            Admit::Done(status) => {
                self.send_soon(wire::encode_ack(stream, seq, status), Default::default());
            }
        }
    }
}

async fn run_reliable(
    inner: &Inner,
    service: Option<Arc<dyn Service>>,
    payload: &[u8],
    expires: Instant,
) -> AckStatus {
    let Ok(Incoming::Reliable {
        object,
        method,
        args,
        ..
    }) = wire::decode_incoming(payload)
    else {
        return AckStatus::Failed;
    };
    // A closed semaphore (the connection went away) does not stop an accepted signal.
    let permit = tokio::time::timeout_at(expires, inner.handlers.acquire()).await;
    if permit.is_err() || Instant::now() > expires {
        bump(&inner.peer.stats.signals_expired_on_arrival);
        return AckStatus::Expired;
    }
    let failed = |why: &str| {
        tracing::warn!("chatter-rpc: signal `{object}.{method}` not delivered: {why}");
        bump(&inner.peer.stats.signals_failed);
        AckStatus::Failed
    };
    let Some(service) = service else {
        return failed("no such object");
    };
    let mut handlers = Handlers::new();
    let dispatch = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        service.__dispatch(method.as_bytes(), args, &mut handlers)
    }));
    match dispatch {
        Ok(Dispatch::Signal) => {
            bump(&inner.peer.stats.signals_delivered);
            match CatchUnwind(handlers.signal_mut()).await {
                Ok(()) => AckStatus::Handled,
                Err(message) => {
                    bump(&inner.peer.stats.handler_panics);
                    failed(&format!("handler panicked: {message}"))
                }
            }
        }
        Ok(Dispatch::Call) => failed("the method is a call, not a signal"),
        Ok(Dispatch::NoSuchMethod) => failed("no such method"),
        Ok(Dispatch::BadArguments(what)) => failed(&what),
        Err(_) => {
            bump(&inner.peer.stats.handler_panics);
            failed("argument decoding panicked")
        }
    }
}
