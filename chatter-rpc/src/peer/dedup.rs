//! The duplicate table of reliable signals (`[3, stream, seq, ..]`), per sender stream and
//! sequence number.
//!
//! It keeps, per sender stream, the highest sequence number accepted so far. A sender
//! sends a stream's signals in sequence order and re-sends unacknowledged ones in the same
//! order after a reconnect, so anything at or below that mark was already accepted: it is
//! not run again, only acknowledged again (after the first copy finished, with the first
//! copy's outcome). A signal accepted but left unrun when its connection closed is
//! *abandoned*: its re-sent copy is accepted as new. The table lives in this process
//! (shared by every peer of it), holds at most [`MAX_STREAMS`] streams (the least recently
//! used of those with no signal running is forgotten first; when every one has one
//! running, a signal on a further stream is handled without being remembered), and is lost when the process exits: a signal whose
//! acknowledgement was lost *and* whose receiver restarted is run again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Mutex, OnceLock};

use tokio::sync::oneshot;

use super::lock;
use crate::wire::AckStatus;

/// How many sender streams the duplicate table remembers.
pub(crate) const MAX_STREAMS: usize = 4096;
/// How many non-`Handled` outcomes are remembered per stream (for re-acknowledgements).
const MAX_EXCEPTIONS: usize = 1024;
/// How many abandoned signals are remembered per stream (see [`Admitted::abandon`]);
/// beyond, the stream is forgotten.
const MAX_ABANDONED: usize = 1024;

#[derive(Default)]
struct Streams {
    map: HashMap<u64, StreamState>,
    tick: u64,
    /// The last pass over the table found every stream running a signal, and none has
    /// finished since: no pass can find one to forget.
    all_running: bool,
    /// Passes over the table made to forget streams (for tests).
    passes: u64,
}

/// How many streams one pass over a full table forgets (the least recently used of those
/// with no signal running): a pass costs the whole table, so a peer that sends each
/// signal on a new stream makes one per this many signals, not one per signal (each under
/// the process's lock).
const FORGET_AT_ONCE: usize = MAX_STREAMS / 16;

impl Streams {
    /// Makes room for a new stream in a full table: forgets the [`FORGET_AT_ONCE`] least
    /// recently used streams with no signal running. False if every stream has one.
    fn make_room(&mut self) -> bool {
        if self.all_running {
            return false;
        }
        self.passes += 1;
        let mut idle: Vec<(u64, u64)> = self
            .map
            .iter()
            .filter(|(_, s)| s.running.is_empty())
            .map(|(k, s)| (s.used, *k))
            .collect();
        if idle.is_empty() {
            self.all_running = true;
            return false;
        }
        let n = FORGET_AT_ONCE.min(idle.len());
        if n < idle.len() {
            idle.select_nth_unstable(n - 1);
        }
        for (_, k) in &idle[..n] {
            self.map.remove(k);
        }
        true
    }
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

impl StreamState {
    /// A running signal finished or was abandoned: once none runs, the map's memory goes
    /// back (a burst of signals waiting for handler slots could leave it large, kept for
    /// as long as the table keeps the stream).
    fn running_done(&mut self) {
        if self.running.is_empty() && self.running.capacity() > 0 {
            self.running = HashMap::new();
        }
    }
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
    admit_in(&mut lock(streams()), stream, seq)
}

fn admit_in(all: &mut Streams, stream: u64, seq: u64) -> Admit {
    all.tick += 1;
    let tick = all.tick;
    // Every stream remembered has a signal running (a peer can make that so with signals
    // on as many streams, waiting for a handler slot): this one is handled as on a stream
    // the table forgot, rather than growing the table past its bound, an entry per stream
    // that it would keep once the signals finished.
    if !all.map.contains_key(&stream) && all.map.len() >= MAX_STREAMS && !all.make_room() {
        return Admit::New(Admitted {
            stream,
            seq,
            tracked: false,
            done: false,
        });
    }
    let st = all.map.entry(stream).or_default();
    st.used = tick;
    // Running first: a stream forgotten while signals of it ran (see `abandon`) does not
    // start a copy of a running one.
    if let Some(waiters) = st.running.get_mut(&seq) {
        let (tx, rx) = oneshot::channel();
        waiters.push(tx);
        return Admit::Running(rx);
    }
    if seq > st.high || st.abandoned.remove(&seq) {
        st.high = st.high.max(seq);
        st.running.insert(seq, Vec::new());
        return Admit::New(Admitted {
            stream,
            seq,
            tracked: true,
            done: false,
        });
    }
    let status = st
        .exceptions
        .iter()
        .find(|(s, _)| *s == seq)
        .map_or(AckStatus::Handled, |(_, st)| *st);
    Admit::Done(status)
}

fn complete(stream: u64, seq: u64, status: AckStatus) {
    let waiters = complete_in(&mut lock(streams()), stream, seq, status);
    for w in waiters {
        let _ = w.send(status);
    }
}

/// Records the outcome of `(stream, seq)`; returns who waits for it.
fn complete_in(
    all: &mut Streams,
    stream: u64,
    seq: u64,
    status: AckStatus,
) -> Vec<oneshot::Sender<AckStatus>> {
    let Some(st) = all.map.get_mut(&stream) else {
        return Vec::new();
    };
    let waiters = st.running.remove(&seq).unwrap_or_default();
    st.running_done();
    if status != AckStatus::Handled {
        if st.exceptions.len() >= MAX_EXCEPTIONS {
            st.exceptions.pop_front();
        }
        st.exceptions.push_back((seq, status));
    }
    if st.running.is_empty() {
        all.all_running = false;
    }
    waiters
}

/// An admitted reliable signal: completes as `Failed` if dropped before it finished.
pub(super) struct Admitted {
    pub(super) stream: u64,
    pub(super) seq: u64,
    /// In the table (else admitted without being remembered: its outcome is not kept).
    tracked: bool,
    done: bool,
}

impl Admitted {
    pub(super) fn finish(mut self, status: AckStatus) {
        self.done = true;
        if self.tracked {
            complete(self.stream, self.seq, status);
        }
    }

    /// The signal will not run here after all (its connection closed while it waited for
    /// a handler slot): the sender, which was not acknowledged, re-sends it, and that copy
    /// is accepted as new. Copies waiting for this one's outcome get none (they are not
    /// acknowledged either).
    pub(super) fn abandon(mut self) {
        self.done = true;
        if !self.tracked {
            return;
        }
        let mut all = lock(streams());
        let Some(st) = all.map.get_mut(&self.stream) else {
            return;
        };
        st.running.remove(&self.seq);
        st.running_done();
        let idle = st.running.is_empty();
        if st.abandoned.len() < MAX_ABANDONED {
            st.abandoned.insert(self.seq);
        } else {
            // Too many to remember: the stream is forgotten, as an evicted one is, so
            // that every re-sent copy runs (none is taken for a duplicate and lost).
            st.high = 0;
            st.abandoned = HashSet::new();
            st.exceptions = VecDeque::new();
        }
        if idle {
            all.all_running = false;
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if !self.done && self.tracked {
            complete(self.stream, self.seq, AckStatus::Failed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that sends each reliable signal on a new stream: once the table is full,
    /// making room takes a pass over the whole table (under the process's lock). Before,
    /// every new stream made one (4 096 entries visited per signal); now one pass forgets
    /// `FORGET_AT_ONCE` streams, least recently used first.
    #[test]
    fn new_streams_in_a_full_table_cost_a_pass_per_batch_not_per_signal() {
        let mut table = Streams::default();
        let admit_and_finish = |table: &mut Streams, stream: u64| {
            let Admit::New(mut admitted) = admit_in(table, stream, 1) else {
                panic!("new")
            };
            admitted.done = true;
            complete_in(table, stream, 1, AckStatus::Handled);
        };
        let count = MAX_STREAMS as u64;
        for stream in 0..count {
            admit_and_finish(&mut table, stream);
        }
        assert_eq!(table.passes, 0);
        // Stream 0 is used again: it is the most recently used now.
        assert!(matches!(
            admit_in(&mut table, 0, 1),
            Admit::Done(AckStatus::Handled)
        ));
        let batch = FORGET_AT_ONCE as u64;
        for stream in count..count + batch {
            admit_and_finish(&mut table, stream);
        }
        // The least recently used went first: stream 0, used again, outlived the others
        // of its time.
        assert_eq!(table.passes, 1);
        assert!(table.map.contains_key(&0));
        assert!(!table.map.contains_key(&1));
        for stream in count + batch..2 * count {
            admit_and_finish(&mut table, stream);
        }
        assert!(table.map.len() <= MAX_STREAMS);
        assert_eq!(
            table.passes, 16,
            "one pass per {FORGET_AT_ONCE} new streams"
        );

        // Every stream running: one pass finds that out, later new streams make none until
        // one finished.
        let mut table = Streams::default();
        let mut running = Vec::new();
        for stream in 0..count {
            let Admit::New(mut admitted) = admit_in(&mut table, stream, 1) else {
                panic!("new")
            };
            admitted.done = true;
            running.push(admitted);
        }
        for stream in count..count + 100 {
            let Admit::New(mut admitted) = admit_in(&mut table, stream, 1) else {
                panic!("new, not remembered")
            };
            assert!(!admitted.tracked);
            admitted.done = true;
        }
        assert_eq!(table.passes, 1);
        complete_in(&mut table, 5, 1, AckStatus::Handled);
        let Admit::New(mut admitted) = admit_in(&mut table, 2 * count, 1) else {
            panic!("new")
        };
        assert!(admitted.tracked);
        admitted.done = true;
        assert_eq!(table.passes, 2);
    }
}
