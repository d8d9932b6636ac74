//! The wakers of a task that polls two futures: a connection's driver and the future
//! attached to its connection ([`Connection::attach`](crate::Connection::attach)).
//!
//! Each of the two gets a waker of its own. Woken while the task is polling (the one
//! woken by the other: the driver delivering messages to the attached future, or the
//! attached future queueing output for the driver), a waker only marks its future to be
//! polled again in the same poll of the task; woken at any other time, it also wakes the
//! task. So the two hand work to each other without a round of the scheduler, and the
//! task is polled once for what the other side of the connection sent, not once more
//! for each hand-over.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Wake, Waker};

/// One future's waker: see the module's documentation.
#[derive(Debug, Default)]
pub(crate) struct Signal {
    /// Set while the task polls (by [`Signals::enter`], cleared by [`Signals::leave`]).
    polling: AtomicBool,
    /// The future was woken and has not been polled since.
    woken: AtomicBool,
    /// The task's own waker, woken when this one is woken outside a poll.
    task: Mutex<Option<Waker>>,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Ordered with `leave`: either the poll sees `woken` after clearing `polling`, or
        // this sees `polling` cleared and wakes the task (both may: one spare poll).
        self.woken.store(true, Ordering::SeqCst);
        if !self.polling.load(Ordering::SeqCst) {
            let task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(task) = task.as_ref() {
                task.wake_by_ref();
            }
        }
    }
}

impl Signal {
    /// Whether the future was woken since the last call; clears it.
    pub(crate) fn take(&self) -> bool {
        self.woken.swap(false, Ordering::SeqCst)
    }
}

/// The two wakers of a connection's task, made when a future is attached to it.
#[derive(Debug)]
pub(crate) struct Signals {
    pub(crate) driver: Arc<Signal>,
    pub(crate) attached: Arc<Signal>,
    /// The task's waker as last given to the signals.
    task: Option<Waker>,
}

impl Signals {
    pub(crate) fn new() -> Self {
        Signals {
            driver: Arc::default(),
            attached: Arc::default(),
            task: None,
        }
    }

    /// The driver's waker.
    pub(crate) fn driver_waker(&self) -> Waker {
        Waker::from(self.driver.clone())
    }

    /// The attached future's waker.
    pub(crate) fn attached_waker(&self) -> Waker {
        Waker::from(self.attached.clone())
    }

    /// The task starts a poll with `task` as its waker: wakes of either future only mark
    /// it until [`leave`](Self::leave).
    pub(crate) fn enter(&mut self, task: &Waker) {
        if !self.task.as_ref().is_some_and(|t| t.will_wake(task)) {
            self.task = Some(task.clone());
            for signal in [&self.driver, &self.attached] {
                *signal.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(task.clone());
            }
        }
        self.driver.polling.store(true, Ordering::SeqCst);
        self.attached.polling.store(true, Ordering::SeqCst);
    }

    /// The task ends a poll: from now on a wake of either future wakes the task. Returns
    /// which of the two were woken since they were last polled (driver, attached).
    pub(crate) fn leave(&self) -> (bool, bool) {
        self.driver.polling.store(false, Ordering::SeqCst);
        self.attached.polling.store(false, Ordering::SeqCst);
        (self.driver.take(), self.attached.take())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_wake_during_a_poll_marks_and_a_wake_outside_one_wakes_the_task() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let task = Waker::from(count.clone());
        let mut signals = Signals::new();
        let (driver, attached) = (signals.driver_waker(), signals.attached_waker());

        signals.enter(&task);
        attached.wake_by_ref();
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            0,
            "not the task, during a poll"
        );
        assert_eq!(signals.leave(), (false, true));

        driver.wake_by_ref();
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            1,
            "the task, outside a poll"
        );
        signals.enter(&task);
        assert_eq!(signals.leave(), (true, false), "and the driver is marked");
        assert_eq!(signals.leave(), (false, false), "once");
    }
}
