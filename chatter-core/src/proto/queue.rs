//! A FIFO queue that keeps its first item inline: the protocol's event and message queues
//! hold one item at a time on most connections (the hello's `Connected` event, a request
//! or its reply), and a `VecDeque` allocates on its first push (about 500 bytes for four
//! events, as many for four messages). A second item waiting goes to the `VecDeque`.

use std::collections::VecDeque;

/// See the [module docs](self).
#[derive(Debug)]
pub(super) struct Queue<T> {
    /// The oldest item, when it is here: only filled while `rest` is empty.
    first: Option<T>,
    /// The items after `first` (or all of them, once `first` was taken while these
    /// waited).
    rest: VecDeque<T>,
}

impl<T> Default for Queue<T> {
    fn default() -> Self {
        Queue {
            first: None,
            rest: VecDeque::new(),
        }
    }
}

impl<T> Queue<T> {
    pub(super) fn push_back(&mut self, item: T) {
        if self.first.is_none() && self.rest.is_empty() {
            self.first = Some(item);
        } else {
            self.rest.push_back(item);
        }
    }

    pub(super) fn pop_front(&mut self) -> Option<T> {
        self.first.take().or_else(|| self.rest.pop_front())
    }

    pub(super) fn front(&self) -> Option<&T> {
        self.first.as_ref().or_else(|| self.rest.front())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_fifo_order_like_a_vecdeque_and_allocates_only_for_a_second_item() {
        let mut queue = Queue::default();
        let mut model = VecDeque::new();
        // A fixed pseudo-random mix of pushes and pops, runs of each included.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for next in 0..10_000u32 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            if state % 5 < 3 {
                queue.push_back(next);
                model.push_back(next);
            } else {
                assert_eq!(queue.pop_front(), model.pop_front());
            }
            assert_eq!(queue.front(), model.front());
        }
        while let Some(item) = model.pop_front() {
            assert_eq!(queue.pop_front(), Some(item));
        }
        assert_eq!(queue.pop_front(), None);

        let mut one = Queue::default();
        for item in 0..3 {
            one.push_back(item);
            assert_eq!(one.pop_front(), Some(item));
        }
        assert_eq!(one.rest.capacity(), 0, "one item at a time stays inline");
    }
}
