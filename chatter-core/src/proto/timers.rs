//! Conversation timers: armed by a send, cancelled by the next message in the conversation.
//!
//! Almost every timer is armed with the same timeout as the one before it (an RPC layer
//! uses one deadline per client), so deadlines mostly arrive in order. Those go to the back
//! of a queue indexed by arming order: arming, cancelling and firing are O(1), with no
//! allocation per timer. A deadline earlier than the queue's last one goes to an ordered
//! map instead (what all timers used before: about 450 instructions per insert and as many
//! per remove). A cancelled queue entry leaves a hole that is dropped once it reaches the
//! front; a long-lived timer at the front that holds back too many holes is moved to the
//! map, so the queue stays within twice the live timers (plus a constant).

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use super::ConversationId;

/// Where a timer is, to cancel it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TimerKey {
    /// In the queue, at this arming index.
    Queue(u64),
    /// In the map, under this key.
    Map(Instant, u64),
}

/// A timer in the queue: its deadline, arming order (ties fire in arming order) and
/// conversation.
#[derive(Debug, Clone, Copy)]
struct Armed {
    deadline: Instant,
    seq: u64,
    conversation: ConversationId,
}

/// The set of armed conversation timers. See the [module docs](self).
#[derive(Debug, Default)]
pub(super) struct Timers {
    /// Entries in arming order with non-decreasing deadlines; `None` for cancelled ones.
    /// The front entry, if any, is always armed.
    queue: VecDeque<Option<Armed>>,
    /// The arming index of `queue[0]`.
    base: u64,
    /// Armed entries in `queue`.
    live: usize,
    /// The deadline of the queue's last entry (armed or not), while the queue is not empty.
    last: Option<Instant>,
    /// Timers that did not fit the queue's order, by (deadline, seq).
    map: BTreeMap<(Instant, u64), ConversationId>,
    /// Arming order across both, so that equal deadlines fire in the order they were armed.
    seq: u64,
}

/// Holes the queue may hold beyond its live entries before the front entry moves to the map.
const SLACK: usize = 64;

impl Timers {
    /// Arms a timer for `conversation` at `deadline`. Call [`compact`](Self::compact)
    /// afterwards.
    pub(super) fn insert(&mut self, deadline: Instant, conversation: ConversationId) -> TimerKey {
        self.seq += 1;
        let seq = self.seq;
        if self.last.is_some_and(|last| deadline < last) {
            self.map.insert((deadline, seq), conversation);
            return TimerKey::Map(deadline, seq);
        }
        let index = self.base + self.queue.len() as u64;
        self.queue.push_back(Some(Armed {
            deadline,
            seq,
            conversation,
        }));
        self.live += 1;
        self.last = Some(deadline);
        TimerKey::Queue(index)
    }

    /// Bounds the holes in the queue: while there are too many, the (armed) front entry
    /// moves to the map and `relocate` is told its new key.
    pub(super) fn compact(&mut self, mut relocate: impl FnMut(ConversationId, TimerKey)) {
        while self.queue.len() > 2 * self.live + SLACK {
            if let Some(Some(front)) = self.queue.pop_front() {
                self.base += 1;
                self.live -= 1;
                self.map
                    .insert((front.deadline, front.seq), front.conversation);
                relocate(front.conversation, TimerKey::Map(front.deadline, front.seq));
            }
            self.drop_holes();
        }
    }

    /// Cancels a timer that is armed.
    pub(super) fn remove(&mut self, key: TimerKey) {
        match key {
            TimerKey::Queue(index) => {
                let Some(slot) = index
                    .checked_sub(self.base)
                    .and_then(|i| self.queue.get_mut(i as usize))
                else {
                    return;
                };
                if slot.take().is_some() {
                    self.live -= 1;
                    self.drop_holes();
                }
            }
            TimerKey::Map(deadline, seq) => {
                self.map.remove(&(deadline, seq));
            }
        }
    }

    /// The earliest deadline.
    pub(super) fn first(&self) -> Option<Instant> {
        let queued = self.front().map(|a| a.deadline);
        let mapped = self.map.keys().next().map(|k| k.0);
        match (queued, mapped) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Takes the earliest timer due at `now` (in deadline, then arming order).
    pub(super) fn pop_due(&mut self, now: Instant) -> Option<ConversationId> {
        let queued = self.front().map(|a| (a.deadline, a.seq));
        let mapped = self.map.keys().next().copied();
        let from_queue = match (queued, mapped) {
            (Some(q), Some(m)) => q < m,
            (q, _) => q.is_some(),
        };
        if from_queue {
            let front = self.front()?;
            if front.deadline > now {
                return None;
            }
            let conversation = front.conversation;
            self.queue.pop_front();
            self.base += 1;
            self.live -= 1;
            self.drop_holes();
            Some(conversation)
        } else {
            let entry = self.map.first_entry()?;
            if entry.key().0 > now {
                return None;
            }
            Some(entry.remove())
        }
    }

    /// Cancels every timer.
    pub(super) fn clear(&mut self) {
        self.base += self.queue.len() as u64;
        self.queue = VecDeque::new();
        self.live = 0;
        self.last = None;
        self.map.clear();
    }

    fn front(&self) -> Option<&Armed> {
        self.queue.front().and_then(Option::as_ref)
    }

    /// Drops cancelled entries from the front, so that the front entry is armed.
    fn drop_holes(&mut self) {
        while let Some(None) = self.queue.front() {
            self.queue.pop_front();
            self.base += 1;
        }
        if self.queue.is_empty() {
            self.last = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn conv(first: u64) -> ConversationId {
        ConversationId { owner: true, first }
    }

    fn drain(timers: &mut Timers, now: Instant) -> Vec<u64> {
        std::iter::from_fn(|| timers.pop_due(now))
            .map(|c| c.first)
            .collect()
    }

    #[test]
    fn fire_in_deadline_then_arming_order_across_queue_and_map() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut timers = Timers::default();
        timers.insert(at(10), conv(1));
        timers.insert(at(20), conv(2));
        // Earlier than the last: goes to the map.
        assert!(matches!(timers.insert(at(5), conv(3)), TimerKey::Map(..)));
        timers.insert(at(20), conv(4));
        timers.insert(at(10), conv(5));
        assert_eq!(timers.first(), Some(at(5)));
        assert_eq!(drain(&mut timers, at(4)), Vec::<u64>::new());
        assert_eq!(drain(&mut timers, at(10)), vec![3, 1, 5]);
        assert_eq!(timers.first(), Some(at(20)));
        assert_eq!(drain(&mut timers, at(30)), vec![2, 4]);
        assert_eq!(timers.first(), None);
    }

    #[test]
    fn cancelled_timers_do_not_fire_and_holes_are_dropped() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut timers = Timers::default();
        let a = timers.insert(at(1), conv(1));
        let b = timers.insert(at(2), conv(2));
        let c = timers.insert(at(3), conv(3));
        timers.remove(b);
        timers.remove(a);
        assert_eq!(timers.queue.len(), 1);
        assert_eq!(timers.first(), Some(at(3)));
        timers.remove(c);
        assert!(timers.queue.is_empty());
        assert_eq!(timers.first(), None);
        // Removing twice, or after a clear, is harmless.
        timers.remove(c);
        let d = timers.insert(at(4), conv(4));
        timers.clear();
        timers.remove(d);
        assert_eq!(timers.pop_due(at(100)), None);
    }

    #[test]
    fn a_long_lived_front_timer_moves_to_the_map() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut timers = Timers::default();
        let mut moved = Vec::new();
        let mut slow = timers.insert(at(1_000), conv(0));
        for i in 1..=1_000u64 {
            let key = timers.insert(at(1_000 + i), conv(i));
            timers.compact(|c, k| {
                moved.push(c.first);
                if c.first == 0 {
                    slow = k;
                }
            });
            timers.remove(key);
            // Within the bound set at the insert, less the one just cancelled.
            assert!(timers.queue.len() <= 2 * (timers.live + 1) + SLACK);
        }
        assert_eq!(moved, vec![0]);
        assert!(matches!(slow, TimerKey::Map(..)));
        assert_eq!(timers.first(), Some(at(1_000)));
        timers.remove(slow);
        assert_eq!(timers.first(), None);
    }
}
