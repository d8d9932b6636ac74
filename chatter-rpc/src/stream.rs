//! Typed streams (work in progress, issue 16; see `docs/design/streams.md`).
//!
//! This module holds the parts of streams that do not depend on a connection: the local
//! channel (`channel`, `Sender`, `Receiver`), the error type, and the per-stream flow
//! control arithmetic that both ends of a remote stream use ([`Window`] on the reading
//! side, [`Credit`] on the writing side). The peer does not route stream envelopes yet.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::sync::mpsc;

/// Why a stream ended early, as its reader sees it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The connection the stream ran on closed.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The other end cancelled the stream (for example its reader was dropped).
    #[error("stream cancelled")]
    Cancelled,
    /// No item arrived within the stream's idle timeout.
    #[error("no item within the stream's idle timeout")]
    IdleTimeout,
    /// The code that fed the stream on the other side panicked.
    #[error("remote stream producer panicked: {0}")]
    RemotePanic(String),
    /// An item could not be decoded as the stream's item type.
    #[error("bad stream item: {0}")]
    BadItem(String),
    /// The other side broke the stream protocol (for example it sent beyond its credit).
    #[error("stream protocol error: {0}")]
    Protocol(String),
}

/// Makes a stream: items sent into the [`Sender`] come out of the [`Receiver`], in order.
/// At most `capacity` items wait in between; [`Sender::send`] waits for room beyond that.
///
/// Either end can be passed to or returned from a `#[remote]` method (work in progress);
/// used locally, the pair is a bounded channel.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use chatter_rpc::stream;
///
/// let (tx, mut rx) = stream::channel(4);
/// tokio::spawn(async move {
///     for i in 0..3u32 {
///         tx.send(i).await.unwrap();
///     }
/// });
/// let mut got = Vec::new();
/// while let Some(item) = rx.recv().await {
///     got.push(item.unwrap());
/// }
/// assert_eq!(got, [0, 1, 2]);
/// # }
/// ```
///
/// # Panics
///
/// If `capacity` is 0.
pub fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let (tx, rx) = mpsc::channel(capacity);
    (
        Sender {
            inner: SenderInner::Local(tx),
        },
        Receiver {
            inner: ReceiverInner::Local(rx),
        },
    )
}

/// The writing end of a stream. Dropping it ends the stream normally.
pub struct Sender<T> {
    inner: SenderInner<T>,
}

enum SenderInner<T> {
    Local(mpsc::Sender<T>),
}

/// The item a [`Sender`] could not deliver because the reading end is gone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the stream's reader is gone")]
pub struct Closed<T>(pub T);

impl<T> Sender<T> {
    /// Sends one item, waiting while the stream's buffer (or, for a remote stream, its
    /// window) is full. Fails, handing the item back, once the reader is gone.
    pub async fn send(&self, item: T) -> Result<(), Closed<T>> {
        match &self.inner {
            SenderInner::Local(tx) => tx.send(item).await.map_err(|e| Closed(e.0)),
        }
    }

    /// True once the reading end is gone: a producer can stop early.
    pub fn is_closed(&self) -> bool {
        match &self.inner {
            SenderInner::Local(tx) => tx.is_closed(),
        }
    }

    /// Waits until the reading end is gone.
    pub async fn closed(&self) {
        match &self.inner {
            SenderInner::Local(tx) => tx.closed().await,
        }
    }
}

impl<T> fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender")
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

type BoxStream<T> = Pin<Box<dyn futures_core::Stream<Item = T> + Send>>;

/// The reading end of a stream: a [`futures_core::Stream`] of `Result<T, StreamError>`
/// that ends (`None`) when the writer finished, after an `Err` when it did not.
pub struct Receiver<T> {
    inner: ReceiverInner<T>,
}

enum ReceiverInner<T> {
    Local(mpsc::Receiver<T>),
    Boxed(BoxStream<T>),
}

impl<T> Receiver<T> {
    /// A receiver that yields the items of any stream, for a handler that has its items
    /// as a stream already (no task and no channel needed).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let mut rx = chatter_rpc::stream::Receiver::from_stream(
    ///     futures::stream::iter(["a", "b"]),
    /// );
    /// assert_eq!(rx.recv().await, Some(Ok("a")));
    /// assert_eq!(rx.recv().await, Some(Ok("b")));
    /// assert_eq!(rx.recv().await, None);
    /// # }
    /// ```
    pub fn from_stream(stream: impl futures_core::Stream<Item = T> + Send + 'static) -> Self {
        Receiver {
            inner: ReceiverInner::Boxed(Box::pin(stream)),
        }
    }

    /// The next item, `None` once the stream ended normally.
    pub async fn recv(&mut self) -> Option<Result<T, StreamError>> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<T, StreamError>>> {
        match &mut self.inner {
            ReceiverInner::Local(rx) => rx.poll_recv(cx).map(|item| item.map(Ok)),
            ReceiverInner::Boxed(stream) => stream.as_mut().poll_next(cx).map(|i| i.map(Ok)),
        }
    }
}

impl<T> futures_core::Stream for Receiver<T> {
    type Item = Result<T, StreamError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // `Receiver` holds no self-references: it is `Unpin`.
        self.get_mut().poll_recv(cx)
    }
}

impl<T> fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.inner {
            ReceiverInner::Local(_) => "local",
            ReceiverInner::Boxed(_) => "stream",
        };
        f.debug_struct("Receiver")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

/// The reading side's account of one remote stream: the items that arrived and wait to
/// be read (at most `window` bytes of cost), and the credit to grant back.
///
/// The writer may have at most `window` bytes outstanding (the initial grant); the reader
/// grants what was read, in steps of at least half the window, so that a grant costs one
/// message per half window. An item that would take the buffer beyond the window is the
/// writer's protocol violation.
// Used once the peer routes streams (a later step of issue 16).
#[allow(dead_code)]
#[derive(Debug)]
pub(crate) struct Window<I> {
    window: u64,
    held: u64,
    read_ungranted: u64,
    items: VecDeque<(I, u64)>,
    waker: Option<Waker>,
}

/// A writer sent more than the reader granted.
#[allow(dead_code)]
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Overrun {
    pub(crate) held: u64,
    pub(crate) cost: u64,
    pub(crate) window: u64,
}

#[allow(dead_code)]
impl<I> Window<I> {
    pub(crate) fn new(window: u64) -> Self {
        Window {
            window,
            held: 0,
            read_ungranted: 0,
            items: VecDeque::new(),
            waker: None,
        }
    }

    /// An item arrived. Returns the waker of a reader waiting for it.
    pub(crate) fn push(&mut self, item: I, cost: u64) -> Result<Option<Waker>, Overrun> {
        let outstanding = self.held + self.read_ungranted;
        if outstanding.saturating_add(cost) > self.window {
            return Err(Overrun {
                held: outstanding,
                cost,
                window: self.window,
            });
        }
        self.held += cost;
        self.items.push_back((item, cost));
        Ok(self.waker.take())
    }

    /// Takes the next item, or registers `waker` for the next push. The second value is
    /// credit to grant the writer now, if any.
    pub(crate) fn pop(&mut self, waker: &Waker) -> (Option<I>, Option<u64>) {
        let Some((item, cost)) = self.items.pop_front() else {
            self.waker = Some(waker.clone());
            return (None, None);
        };
        self.held -= cost;
        self.read_ungranted += cost;
        let grant = (self.read_ungranted >= self.window.div_ceil(2))
            .then(|| std::mem::take(&mut self.read_ungranted));
        (Some(item), grant)
    }

    /// Bytes of cost waiting to be read: never above the window.
    pub(crate) fn held(&self) -> u64 {
        self.held
    }
}

/// The writing side's account of one remote stream: what the reader granted and the
/// writer has not used yet.
#[allow(dead_code)]
#[derive(Debug, Default)]
pub(crate) struct Credit {
    available: u64,
    waker: Option<Waker>,
}

#[allow(dead_code)]
impl Credit {
    pub(crate) fn new(initial: u64) -> Self {
        Credit {
            available: initial,
            waker: None,
        }
    }

    /// The reader granted `bytes` more. Returns the waker of a writer waiting for it.
    pub(crate) fn grant(&mut self, bytes: u64) -> Option<Waker> {
        self.available = self.available.saturating_add(bytes);
        self.waker.take()
    }

    /// Takes `cost` if the grant covers it; otherwise registers `waker` and returns false.
    /// An item costs at most the whole window, so a writer with nothing outstanding can
    /// always send once the reader caught up.
    pub(crate) fn try_take(&mut self, cost: u64, waker: &Waker) -> bool {
        if cost <= self.available {
            self.available -= cost;
            true
        } else {
            self.waker = Some(waker.clone());
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_holds_at_most_its_size_and_grants_in_half_window_steps() {
        let waker = Waker::noop();
        let mut w = Window::new(100);
        assert!(w.push("a", 40).unwrap().is_none());
        assert!(w.push("b", 40).unwrap().is_none());
        // 80 held: 30 more would be 110 > 100.
        assert_eq!(
            w.push("c", 30).err(),
            Some(Overrun {
                held: 80,
                cost: 30,
                window: 100
            })
        );
        assert_eq!(w.held(), 80);
        // Reading 40 grants nothing yet (below half the window)...
        assert_eq!(w.pop(waker), (Some("a"), None));
        // ...and the writer still may not exceed what was granted: 40 unread + 40 read
        // but not granted back.
        assert!(w.push("c", 30).is_err());
        // Reading 80 in all grants 80 at once.
        assert_eq!(w.pop(waker), (Some("b"), Some(80)));
        assert_eq!(w.held(), 0);
        assert!(w.push("c", 100).is_ok());
        assert_eq!(w.pop(waker), (Some("c"), Some(100)));
        assert_eq!(w.pop(waker), (None, None));
    }

    #[test]
    fn credit_is_taken_only_when_it_covers_the_cost() {
        let waker = Waker::noop();
        let mut c = Credit::new(50);
        assert!(c.try_take(30, waker));
        assert!(!c.try_take(30, waker));
        assert!(c.grant(10).is_some(), "the waiting writer is woken");
        assert!(c.try_take(30, waker));
        assert!(!c.try_take(1, waker));
    }

    #[tokio::test]
    async fn a_local_channel_delivers_in_order_and_ends_when_the_sender_drops() {
        let (tx, mut rx) = channel(2);
        let feed = tokio::spawn(async move {
            for i in 0..10 {
                tx.send(i).await.unwrap();
            }
        });
        let mut got = Vec::new();
        while let Some(item) = rx.recv().await {
            got.push(item.unwrap());
        }
        feed.await.unwrap();
        assert_eq!(got, (0..10).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_sender_learns_that_the_receiver_is_gone() {
        let (tx, rx) = channel(1);
        assert!(!tx.is_closed());
        drop(rx);
        assert!(tx.is_closed());
        tx.closed().await;
        assert_eq!(tx.send(7).await, Err(Closed(7)));
    }
}
