//! Handler slots and the backlog of received requests that wait for one.
//!
//! A connection runs at most [`PeerOptions::max_concurrent_handlers`] handlers at once.
//! A call or signal that arrives while every slot is taken waits here, as the bytes it
//! arrived in (its envelope decoded once, its parts remembered as ranges), *holding its
//! flow-control credit*: the credit goes back to the sender only when the request was
//! handled or dropped. So the backlog of a connection never holds more than the
//! connection's `receive_window` of requests (each counted as its frame body + 64 bytes),
//! and a sender that outpaces the handlers waits for credit instead of growing the
//! receiver's memory.
//!
//! A freed slot goes to the oldest waiting call first, then to the oldest waiting signal:
//! a backlog of signals never delays a call by more than the handlers already running.
//! With [`PeerOptions::ordered_signals`], signals run one at a time, in arrival order.
//! A request whose deadline or TTL passes while it waits is answered (calls: deadline
//! exceeded) or dropped and counted (signals), and its credit given back, at that time.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use chatter_core::proto::IdBuildHasher;
use chatter_core::Conversation;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::dedup::Admitted;
use super::lock;
use crate::context::CallContext;
use crate::wire::{AckStatus, Name};
#[cfg(doc)]
use crate::PeerOptions;

/// A received request waiting for a handler slot.
pub(super) struct Waiting {
    pub(super) kind: Kind,
    /// The whole envelope, as received.
    pub(super) payload: Bytes,
    pub(super) object: Range<usize>,
    pub(super) method: Range<usize>,
    pub(super) args: Range<usize>,
    /// The context map (kinds 9 to 11), if any.
    pub(super) context: Option<Range<usize>>,
    /// The call's deadline or the signal's TTL, as an instant.
    pub(super) expires: Instant,
    /// Flow-control credit held until the request is done with.
    pub(super) credit: u32,
}

pub(super) enum Kind {
    Call(Conversation),
    Signal,
    /// A reliable signal admitted by the duplicate table, acknowledged when done.
    Reliable(Admitted),
    /// Ordered mode: a duplicate of a reliable signal still running (on an earlier
    /// connection); it keeps its place in the order until the first copy finished, then
    /// is acknowledged with that copy's outcome.
    Duplicate {
        stream: u64,
        seq: u64,
        outcome: oneshot::Receiver<AckStatus>,
    },
}

impl Waiting {
    /// Remembers the parts of `payload` that the decoded envelope borrowed. `None` if a
    /// part is not inside `payload` (cannot happen with the envelope decoder; checked
    /// rather than trusted).
    pub(super) fn new(
        kind: Kind,
        payload: &Bytes,
        parts: (Name<'_>, Name<'_>, &[u8]),
        context: Option<&[u8]>,
        expires: Instant,
        credit: u32,
    ) -> Option<Waiting> {
        let (object, method, args) = parts;
        Some(Waiting {
            kind,
            object: range_in(payload, object.as_bytes())?,
            method: range_in(payload, method.as_bytes())?,
            args: range_in(payload, args)?,
            context: match context {
                Some(context) => Some(range_in(payload, context)?),
                None => None,
            },
            // A copy: the payload may be a slice of the run of messages it arrived with,
            // which would stay alive with it after the others gave their credit back (a
            // tiny waiting signal could keep megabytes). Waiting is the slow path.
            payload: Bytes::copy_from_slice(payload),
            expires,
            credit,
        })
    }

    /// The envelope, as kept.
    pub(super) fn payload(&self) -> &Bytes {
        &self.payload
    }

    pub(super) fn object(&self) -> Name<'_> {
        Name(&self.payload[self.object.clone()])
    }

    pub(super) fn method(&self) -> Name<'_> {
        Name(&self.payload[self.method.clone()])
    }

    pub(super) fn args(&self) -> &[u8] {
        &self.payload[self.args.clone()]
    }

    /// The context for the handler of this request, made on `inner`'s connection.
    pub(super) fn context(&self, inner: &super::Inner, signal: bool) -> Option<CallContext> {
        let context = self.context.clone().map(|range| &self.payload[range]);
        let names = (self.object(), self.method());
        inner.context(&self.payload, names, signal, self.expires, context)
    }

    fn is_call(&self) -> bool {
        matches!(self.kind, Kind::Call(_))
    }
}

/// Where `part` lies in `whole`, if it is a subslice of it.
fn range_in(whole: &[u8], part: &[u8]) -> Option<Range<usize>> {
    let start = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (end <= whole.len()).then_some(start..end)
}

/// The requests waiting for a slot, by key (the conversation's first id: unique on a
/// connection), in arrival order per class, and by expiry.
#[derive(Default)]
struct Backlog {
    items: HashMap<u64, Waiting, IdBuildHasher>,
    calls: VecDeque<u64>,
    signals: VecDeque<u64>,
    /// Keys by expiry; entries of items that left otherwise are skipped, and compacted
    /// away when they outnumber the items.
    expiry: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Ordered mode: a signal handler runs.
    ordered_busy: bool,
}

impl Backlog {
    /// The next request to run: the oldest call, else the oldest signal (in ordered mode,
    /// only while no signal runs).
    fn pop(&mut self, ordered: bool) -> Option<Waiting> {
        while let Some(key) = self.calls.pop_front() {
            if let Some(item) = self.items.remove(&key) {
                return Some(item);
            }
        }
        if ordered && self.ordered_busy {
            return None;
        }
        while let Some(key) = self.signals.pop_front() {
            if let Some(item) = self.items.remove(&key) {
                if ordered {
                    self.ordered_busy = true;
                }
                return Some(item);
            }
        }
        None
    }

    fn push(&mut self, key: u64, item: Waiting) {
        self.expiry.push(Reverse((item.expires, key)));
        if item.is_call() {
            self.calls.push_back(key);
        } else {
            self.signals.push_back(key);
        }
        self.items.insert(key, item);
        self.compact();
    }

    /// Drops the index entries of items that left, once they outnumber the items (so the
    /// indexes stay within a constant factor of the backlog).
    fn compact(&mut self) {
        let live = self.items.len();
        let items = &self.items;
        if self.expiry.len() > 2 * live + 64 {
            self.expiry
                .retain(|Reverse((_, key))| items.contains_key(key));
        }
        if self.calls.len() + self.signals.len() > 2 * live + 64 {
            self.calls.retain(|key| items.contains_key(key));
            self.signals.retain(|key| items.contains_key(key));
        }
    }

    fn next_expiry(&mut self) -> Option<Instant> {
        while let Some(Reverse((at, key))) = self.expiry.peek() {
            if self.items.contains_key(key) {
                return Some(*at);
            }
            self.expiry.pop();
        }
        None
    }
}

/// The handler slots of a connection and the backlog waiting for them.
pub(super) struct Slots {
    /// Allocated when a first request waits: most connections never need it, and it would
    /// add 100-odd bytes to each.
    backlog: Mutex<Option<Box<Backlog>>>,
    /// Free slots. Above zero only while nothing waits: a slot given back goes to the next
    /// waiting request if there is one (under the backlog's lock), and a request waits
    /// only after finding none free (under the lock too). The receive task's fast path
    /// takes one without the lock.
    free: AtomicUsize,
    /// How many requests wait (a gauge for stats, and the receive task's hint).
    waiting: AtomicUsize,
    ordered: bool,
}

impl Slots {
    pub(super) fn new(slots: usize, ordered: bool) -> Slots {
        Slots {
            backlog: Mutex::default(),
            free: AtomicUsize::new(slots),
            waiting: AtomicUsize::new(0),
            ordered,
        }
    }

    /// Takes a free slot, if one is free and nothing waits for one.
    pub(super) fn try_take(&self) -> bool {
        self.free
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Gives back a slot taken by the receive task for a handler it ran inline. Only the
    /// receive task adds to the backlog, so if nothing waits now, nothing can start
    /// waiting before the slot is back.
    pub(super) fn give_back_inline(&self) -> Option<Waiting> {
        if self.waiting.load(Ordering::Acquire) == 0 {
            self.free.fetch_add(1, Ordering::AcqRel);
            return None;
        }
        self.give_back(false)
    }

    /// A handler finished (`ordered_signal`: it was a signal in ordered mode): hands its
    /// slot to the next waiting request, returned to run, or frees it.
    pub(super) fn give_back(&self, ordered_signal: bool) -> Option<Waiting> {
        let mut guard = lock(&self.backlog);
        let Some(backlog) = guard.as_mut() else {
            self.free.fetch_add(1, Ordering::AcqRel);
            return None;
        };
        if ordered_signal {
            backlog.ordered_busy = false;
        }
        let next = backlog.pop(self.ordered);
        match &next {
            Some(_) => {
                self.waiting.fetch_sub(1, Ordering::AcqRel);
            }
            None => {
                if backlog.items.is_empty() && !backlog.ordered_busy {
                    // The burst is over: give its memory back (the indexes keep their
                    // peak capacity otherwise).
                    *guard = None;
                }
                self.free.fetch_add(1, Ordering::AcqRel);
            }
        }
        next
    }

    /// Queues a request that found no free slot (or, in ordered mode, a signal). Returns
    /// requests that can start now: a slot came free meanwhile, or the request may run
    /// at once (ordered mode with the lane free). The caller runs each in a task that owns
    /// a slot.
    pub(super) fn wait(&self, key: u64, item: Waiting, start: &mut Vec<Waiting>) {
        let mut guard = lock(&self.backlog);
        let backlog = guard.get_or_insert_with(Box::default);
        backlog.push(key, item);
        self.waiting.fetch_add(1, Ordering::AcqRel);
        self.start_free(backlog, start);
    }

    /// Starts waiting requests while slots are free.
    fn start_free(&self, backlog: &mut Backlog, start: &mut Vec<Waiting>) {
        while self.try_take() {
            match backlog.pop(self.ordered) {
                Some(item) => {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    start.push(item);
                }
                None => {
                    self.free.fetch_add(1, Ordering::AcqRel);
                    break;
                }
            }
        }
    }

    /// Takes out a waiting call (cancelled by its caller). Only a call: a cancel cannot
    /// name a signal.
    pub(super) fn remove_call(&self, key: u64) -> Option<Waiting> {
        let mut guard = lock(&self.backlog);
        let items = &mut guard.as_mut()?.items;
        if !items.get(&key)?.is_call() {
            return None;
        }
        let item = items.remove(&key)?;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        Some(item)
    }

    /// Takes out the waiting requests whose deadline or TTL passed by `now`.
    pub(super) fn expired(&self, now: Instant) -> Vec<Waiting> {
        let mut guard = lock(&self.backlog);
        let mut out = Vec::new();
        let Some(backlog) = guard.as_mut() else {
            return out;
        };
        while let Some(Reverse((at, key))) = backlog.expiry.peek().copied() {
            if at > now {
                break;
            }
            backlog.expiry.pop();
            if let Some(item) = backlog.items.remove(&key) {
                out.push(item);
            }
        }
        self.waiting.fetch_sub(out.len(), Ordering::AcqRel);
        out
    }

    /// When the next waiting request expires.
    pub(super) fn next_expiry(&self) -> Option<Instant> {
        if self.waiting.load(Ordering::Acquire) == 0 {
            return None;
        }
        lock(&self.backlog).as_mut()?.next_expiry()
    }

    /// Takes out every waiting request matching `take` (at close).
    pub(super) fn drain(&self, mut take: impl FnMut(&Waiting) -> bool) -> Vec<Waiting> {
        let mut guard = lock(&self.backlog);
        let Some(backlog) = guard.as_mut() else {
            return Vec::new();
        };
        let keys: Vec<u64> = backlog
            .items
            .iter()
            .filter(|(_, item)| take(item))
            .map(|(key, _)| *key)
            .collect();
        let mut out: Vec<Waiting> = keys
            .into_iter()
            .filter_map(|key| backlog.items.remove(&key))
            .collect();
        out.sort_by_key(|item| item.expires);
        self.waiting.fetch_sub(out.len(), Ordering::AcqRel);
        out
    }

    /// Requests waiting for a slot now.
    pub(super) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }
}
