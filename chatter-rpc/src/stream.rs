//! Typed streams: a [`Receiver`] passed to or returned from a `#[remote]` method carries
//! any number of items between peers, with flow control per stream.
//!
//! One pair of types serves every shape, on both sides of a connection: a method returns a
//! `Receiver<T>` (server streaming), takes one as an argument (client streaming), or both.
//! [`channel`] makes a [`Sender`]/[`Receiver`] pair; a handler returns or a caller passes
//! the receiving end and feeds the other. This is remoc's shape rather than tonic's
//! per-shape request and response types: one type to learn, the callee's code for a client
//! stream reads like the caller's for a server stream, and a `Receiver` made by
//! [`channel`] or [`Receiver::from_stream`] works in a unit test without any connection.
//! `Receiver<T>` is a [`futures_core::Stream`] of `Result<T, StreamError>`.
//!
//! ```ignore
//! #[remote]
//! pub trait Files {
//!     /// Server streaming.
//!     async fn watch(&self, dir: String) -> Result<Receiver<Event>, FsError>;
//!     /// Client streaming.
//!     async fn upload(&self, name: String, data: Receiver<Bytes>) -> Result<u64, FsError>;
//!     /// Both.
//!     async fn chat(&self, input: Receiver<Line>) -> Receiver<Line>;
//! }
//! ```
//!
//! # What a stream promises
//!
//! - **Order, exactly once, or an error.** Items arrive in the order they were sent, each
//!   once; a stream that ends early ends with one `Err` saying why, then `None`:
//!   [`StreamError::ConnectionLost`] (the connection closed; a stream lives on one
//!   connection and is never resumed, also through a reconnecting peer),
//!   [`StreamError::Cancelled`] (the other side gave up), [`StreamError::RemotePanic`]
//!   (the code feeding it panicked), [`StreamError::IdleTimeout`],
//!   [`StreamError::BadItem`] (an item that does not decode as `T`; the rest of the stream
//!   is dropped, unless [`Receiver::keep_after_bad_items`]) or [`StreamError::Protocol`]. A normal end is `None` with no error.
//!   Application errors in the middle of a stream are items: use `Receiver<Result<T, E>>`.
//! - **Dropping either end stops the other promptly.** Dropping a `Receiver` tells its
//!   writer to stop (a [`Sender::send`] then fails with [`Closed`], and
//!   [`Sender::closed`] resolves); dropping the `Sender` ends the stream normally.
//! - **The call's deadline covers opening only**: the handler must return its `Receiver`
//!   (or, for a method taking a stream, start) within the deadline; the open stream then
//!   runs until its end, a cancel, the connection's close or the reader's idle timeout
//!   ([`Receiver::set_idle_timeout`]).
//! - **Flow control per stream.** Each stream has a window
//!   ([`PeerOptions::stream_window`](crate::PeerOptions::stream_window), 1 MiB by
//!   default): the writer sends at most that many bytes the reader has not read yet, so a
//!   slow reader stalls its own stream only; other streams, calls and signals on the same
//!   connection keep flowing. What streams hold per connection is bounded by
//!   `max_streams × stream_window` ([`PeerOptions::max_streams`](crate::PeerOptions::max_streams),
//!   64) on the serving side, plus one window per stream the application opened as a
//!   caller.
//! - **Large payloads**: an item is one message, at most `max_frame_size` and the window;
//!   send large data as a stream of chunks (`bytes::Bytes`, `serde_bytes::ByteBuf`).
//!
//! The wire format is in `chatter-rpc/PROTOCOL.md`, "Streams".

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
    /// The reader fell further behind than the writer keeps for it, and the writer ended
    /// the stream (a broker's subscription with the policy `SlowSubscriber::End`).
    #[error("stream ended: the reader fell too far behind: {0}")]
    Lagged(String),
}

/// Makes a stream: items sent into the [`Sender`] come out of the [`Receiver`], in order.
/// At most `capacity` items wait in between; [`Sender::send`] waits for room beyond that.
///
/// The receiving end can be passed to or returned from a `#[remote]` method; used locally,
/// the pair is a bounded channel.
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
    let panicked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    (
        Sender {
            inner: SenderInner::Local(tx),
            panicked: panicked.clone(),
        },
        Receiver::new(ReceiverInner::Local(rx, panicked)),
    )
}

/// The writing end of a stream. Dropping it ends the stream normally.
pub struct Sender<T> {
    inner: SenderInner<T>,
    /// Set when the sender is dropped by a panic: the reader then gets
    /// [`StreamError::RemotePanic`] instead of a normal end.
    panicked: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.panicked
                .store(true, std::sync::atomic::Ordering::Release);
        }
    }
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
    /// The idle timeout, once set (boxed: most receivers have none).
    idle: Option<Box<Idle>>,
}

enum ReceiverInner<T> {
    Local(
        mpsc::Receiver<T>,
        std::sync::Arc<std::sync::atomic::AtomicBool>,
    ),
    Boxed(BoxStream<T>),
    Remote(RemoteReceiver<T>),
    /// Ended early (idle timeout, writer panicked): only `None` from now on.
    Ended,
}

/// A receiver's idle timeout and its timer.
struct Idle {
    timeout: std::time::Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
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
        Receiver::new(ReceiverInner::Boxed(Box::pin(stream)))
    }

    fn new(inner: ReceiverInner<T>) -> Self {
        Receiver { inner, idle: None }
    }

    /// Ends the stream with [`StreamError::IdleTimeout`] when no item arrives within
    /// `timeout` of the previous one (or of this call); `None` turns it off. For a remote
    /// stream the writer is told to stop, as when the receiver is dropped. The timer runs
    /// on tokio's clock (its paused clock in tests).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// use std::time::Duration;
    /// use chatter_rpc::stream::{self, StreamError};
    ///
    /// let (tx, mut rx) = stream::channel::<u32>(4);
    /// rx.set_idle_timeout(Some(Duration::from_secs(5)));
    /// tx.send(1).await.unwrap();
    /// assert_eq!(rx.recv().await, Some(Ok(1)));
    /// // Nothing more within 5 s:
    /// assert_eq!(rx.recv().await, Some(Err(StreamError::IdleTimeout)));
    /// assert_eq!(rx.recv().await, None);
    /// # drop(tx);
    /// # }
    /// ```
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, when `timeout` is `Some`.
    pub fn set_idle_timeout(&mut self, timeout: Option<std::time::Duration>) {
        self.idle = timeout.map(|timeout| {
            Box::new(Idle {
                timeout,
                sleep: Box::pin(tokio::time::sleep(timeout)),
            })
        });
    }

    /// The next item, `None` once the stream ended normally.
    ///
    /// An error (`Some(Err(_))`) ends the stream too, and is the only sign that it was cut
    /// short: a loop written `while let Some(Ok(item)) = rx.recv().await` takes a lost
    /// connection or an item of the wrong type for the end. Match the error:
    ///
    /// ```
    /// # use chatter_rpc::stream::{Receiver, StreamError};
    /// async fn total(mut rx: Receiver<u64>) -> Result<u64, StreamError> {
    ///     let mut sum = 0;
    ///     while let Some(item) = rx.recv().await {
    ///         sum += item?;
    ///     }
    ///     Ok(sum)
    /// }
    /// ```
    pub async fn recv(&mut self) -> Option<Result<T, StreamError>> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<T, StreamError>>> {
        let polled = match &mut self.inner {
            ReceiverInner::Local(rx, panicked) => match rx.poll_recv(cx) {
                Poll::Ready(None) if panicked.load(std::sync::atomic::Ordering::Acquire) => {
                    self.inner = ReceiverInner::Ended;
                    let what = "the stream's writer panicked".to_owned();
                    return Poll::Ready(Some(Err(StreamError::RemotePanic(what))));
                }
                polled => polled.map(|item| item.map(Ok)),
            },
            ReceiverInner::Boxed(stream) => stream.as_mut().poll_next(cx).map(|i| i.map(Ok)),
            ReceiverInner::Remote(remote) => remote.poll_recv(cx),
            ReceiverInner::Ended => Poll::Ready(None),
        };
        let Some(idle) = &mut self.idle else {
            return polled;
        };
        match polled {
            Poll::Ready(Some(Ok(item))) => {
                let next = tokio::time::Instant::now() + idle.timeout;
                idle.sleep.as_mut().reset(next);
                Poll::Ready(Some(Ok(item)))
            }
            Poll::Pending if std::future::Future::poll(idle.sleep.as_mut(), cx).is_ready() => {
                // Dropping a remote end tells its writer to stop.
                self.inner = ReceiverInner::Ended;
                self.idle = None;
                Poll::Ready(Some(Err(StreamError::IdleTimeout)))
            }
            other => other,
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
            ReceiverInner::Local(..) => "local",
            ReceiverInner::Boxed(_) => "stream",
            ReceiverInner::Remote(_) => "remote",
            ReceiverInner::Ended => "ended",
        };
        f.debug_struct("Receiver")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

/// What a remote stream's reading end asks of the connection it came over: more credit
/// for the writer, or the end of the stream (its reader was dropped or failed).
pub(crate) trait RemoteEnd: Send + Sync {
    /// Grants the writer `bytes` more (a one-shot message; never blocks).
    fn grant(&self, bytes: u64);
    /// Tells the writer to stop: the reader is gone.
    fn cancel(&self);
}

/// The items of a remote stream that arrived and wait to be read, shared between the
/// peer's receive task (which pushes) and the [`Receiver`] (which reads).
#[derive(Debug)]
pub(crate) struct Inbox {
    state: std::sync::Mutex<InboxState>,
}

#[derive(Debug)]
struct InboxState {
    window: Window<bytes::Bytes>,
    /// How the writer ended the stream, once it did.
    end: Option<Result<(), StreamError>>,
}

impl Inbox {
    pub(crate) fn new(window: u64) -> Self {
        Inbox {
            state: std::sync::Mutex::new(InboxState {
                window: Window::new(window),
                end: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, InboxState> {
        // A panic while holding this lock leaves consistent state (each update is one
        // step), so a poisoned lock is used as is.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A message of `items` arrived in `payload`: each item queued for the reader, or none
    /// when the message goes beyond the writer's credit (the caller then fails the stream
    /// with a protocol error). The message costs [`cost`]`(payload, count)`, which its
    /// first item carries with its header.
    pub(crate) fn push_items(
        &self,
        payload: &bytes::Bytes,
        items: crate::wire::stream::Items<'_>,
    ) -> Result<(), Overrun> {
        let total = cost(payload.len(), items.count());
        // The envelope's header: what the payload holds beyond its items' values.
        let mut header = (payload.len() - items.values_len()) as u64;
        let waker = {
            let mut state = self.lock();
            state.window.reserve(total)?;
            // A small payload is copied: it is a slice of the run of messages it arrived
            // with (or of the read buffer), whose connection credit goes back as soon as
            // the items are here. Kept as a slice, one tiny item would keep the whole run
            // alive (a hostile writer puts each beside a large message the peer drops:
            // 16 KiB held for 67 bytes of window); the copy makes the window bound the
            // memory. A payload of `SHARE_AT_LEAST` bytes or more is kept as it is: the
            // allocation it shares is at most about twice its size (chatter-core slices
            // only such runs), and copying it would cost a pass over every byte.
            let copy = if payload.len() < chatter_core::proto::SHARE_AT_LEAST {
                bytes::Bytes::copy_from_slice(payload)
            } else {
                payload.clone()
            };
            // The items are the payload's last bytes, back to back.
            let mut at = payload.len() - items.values_len();
            for item in items.iter() {
                let of_item = cost(item.len(), 1) + std::mem::take(&mut header);
                state.window.queue(copy.slice(at..at + item.len()), of_item);
                at += item.len();
            }
            state.window.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// One item of `cost` arrived (tests: what `push_items` does per item).
    #[cfg(test)]
    pub(crate) fn push(&self, item: bytes::Bytes, cost: u64) -> Result<(), Overrun> {
        let waker = self.lock().window.push(item, cost)?;
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// The writer ended the stream (`Ok`) or it failed. The first end counts.
    pub(crate) fn finish(&self, end: Result<(), StreamError>) {
        let waker = {
            let mut state = self.lock();
            if state.end.is_some() {
                return;
            }
            state.end = Some(end);
            state.window.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Bytes of cost waiting to be read.
    #[cfg(test)]
    pub(crate) fn held(&self) -> u64 {
        self.lock().window.held()
    }
}

/// The reading end of a remote stream: items decoded as `T` when read.
struct RemoteReceiver<T> {
    inbox: std::sync::Arc<Inbox>,
    end: std::sync::Arc<dyn RemoteEnd>,
    /// Set once the stream ended for the reader (its end or error was returned).
    done: bool,
    /// An item that does not decode is an error item, and the stream goes on
    /// ([`Receiver::keep_after_bad_items`]).
    keep_after_bad: bool,
    /// `T`'s decoder, chosen where `T: DeserializeOwned` is known, so that `Receiver<T>`
    /// itself needs no bound.
    decode: fn(bytes::Bytes) -> Result<T, crate::wire::WireError>,
}

impl<T: serde::de::DeserializeOwned + 'static> Receiver<T> {
    /// The reading end of a remote stream whose items the peer pushes into `inbox`.
    pub(crate) fn remote(inbox: std::sync::Arc<Inbox>, end: std::sync::Arc<dyn RemoteEnd>) -> Self {
        Receiver::new(ReceiverInner::Remote(RemoteReceiver {
            inbox,
            end,
            done: false,
            keep_after_bad: false,
            decode: decode_item::<T>,
        }))
    }
}

impl<T> Receiver<T> {
    /// Makes an item that does not decode as `T` an error item
    /// ([`StreamError::BadItem`]) after which the stream goes on, instead of the end of the
    /// stream (the default, which also stops the writer). For streams whose items come
    /// from many writers, where one writer's bad item should not end it for the others: a
    /// broker's subscription is one. Only a remote stream can have bad items.
    pub fn keep_after_bad_items(mut self) -> Self {
        if let ReceiverInner::Remote(remote) = &mut self.inner {
            remote.keep_after_bad = true;
        }
        self
    }
}

/// Decodes a stream item. A `Bytes` item encoded as `bin` (as `Bytes` encodes) is a slice
/// of the received frame, not a copy: serde's `Bytes` copies (`Bytes::copy_from_slice`),
/// which took a third of the reader's CPU time moving 64 KiB chunks (BENCHMARKS.md,
/// stream workloads).
fn decode_item<T: serde::de::DeserializeOwned + 'static>(
    item: bytes::Bytes,
) -> Result<T, crate::wire::WireError> {
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<bytes::Bytes>() {
        if let Some(at) = bin_data(&item) {
            // Moved, not sliced: no reference count goes up and down.
            let mut data = item;
            bytes::Buf::advance(&mut data, at);
            let mut out = Some(data);
            let out = (&mut out as &mut dyn std::any::Any).downcast_mut::<Option<T>>();
            // `T` is `Bytes`: the downcast cannot fail.
            return out
                .and_then(Option::take)
                .ok_or_else(|| crate::wire::WireError("a Bytes item that is not Bytes".into()));
        }
    }
    crate::wire::decode_value::<T>(&item)
}

/// Where the data of `item` starts, if it is exactly one MessagePack `bin`.
fn bin_data(item: &[u8]) -> Option<usize> {
    let (at, len) = match *item {
        [0xc4, n, ..] => (2, usize::from(n)),
        [0xc5, a, b, ..] => (3, usize::from(u16::from_be_bytes([a, b]))),
        [0xc6, a, b, c, d, ..] => (5, u32::from_be_bytes([a, b, c, d]) as usize),
        _ => return None,
    };
    (item.len().checked_sub(at) == Some(len)).then_some(at)
}

impl<T> RemoteReceiver<T> {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<T, StreamError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let (item, grant, end) = {
            let mut state = self.inbox.lock();
            let (item, grant) = state.window.pop(cx.waker());
            let end = if item.is_none() {
                state.end.take()
            } else {
                None
            };
            (item, grant, end)
        };
        if let Some(bytes) = grant {
            self.end.grant(bytes);
        }
        match (item, end) {
            (Some(item), _) => match (self.decode)(item) {
                Ok(value) => Poll::Ready(Some(Ok(value))),
                Err(e) if self.keep_after_bad => Poll::Ready(Some(Err(StreamError::BadItem(e.0)))),
                Err(e) => {
                    // The rest of the stream is of no use: stop the writer.
                    self.done = true;
                    self.end.cancel();
                    Poll::Ready(Some(Err(StreamError::BadItem(e.0))))
                }
            },
            (None, Some(Ok(()))) => {
                self.done = true;
                Poll::Ready(None)
            }
            (None, Some(Err(e))) => {
                self.done = true;
                Poll::Ready(Some(Err(e)))
            }
            (None, None) => Poll::Pending,
        }
    }
}

impl<T> Drop for RemoteReceiver<T> {
    fn drop(&mut self) {
        if !self.done && self.inbox.lock().end.is_none() {
            self.end.cancel();
        }
    }
}

/// The reading side's account of one remote stream: the items that arrived and wait to
/// be read (at most `window` bytes of cost), and the credit to grant back.
///
/// The writer may have at most `window` bytes outstanding (the initial grant); the reader
/// grants what was read, in steps of at least half the window, so that a grant costs one
/// message per half window. An item that would take the buffer beyond the window is the
/// writer's protocol violation.
#[derive(Debug)]
pub(crate) struct Window<I> {
    window: u64,
    held: u64,
    read_ungranted: u64,
    items: VecDeque<(I, u64)>,
    waker: Option<Waker>,
}

/// A writer sent more than the reader granted.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Overrun {
    pub(crate) held: u64,
    pub(crate) cost: u64,
    pub(crate) window: u64,
}

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
    #[cfg(test)]
    pub(crate) fn push(&mut self, item: I, cost: u64) -> Result<Option<Waker>, Overrun> {
        self.reserve(cost)?;
        self.queue(item, cost);
        Ok(self.waker.take())
    }

    /// Room for `cost` more bytes of items, or the writer's overrun.
    pub(crate) fn reserve(&mut self, cost: u64) -> Result<(), Overrun> {
        let outstanding = self.held + self.read_ungranted;
        if outstanding.saturating_add(cost) > self.window {
            return Err(Overrun {
                held: outstanding,
                cost,
                window: self.window,
            });
        }
        self.held += cost;
        Ok(())
    }

    /// Queues an item whose `cost` was [reserved](Self::reserve).
    pub(crate) fn queue(&mut self, item: I, cost: u64) {
        self.items.push_back((item, cost));
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
    #[cfg(test)]
    pub(crate) fn held(&self) -> u64 {
        self.held
    }
}

/// The writing side's account of one remote stream: what the reader granted and the
/// writer has not used yet.
#[derive(Debug, Default)]
pub(crate) struct Credit {
    available: u64,
    waker: Option<Waker>,
}

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

/// The writing side of a remote stream as the peer sees it: the reader's grants and
/// whether the reader is gone, shared between the peer's receive task (which applies
/// grants and cancels) and the forwarder (which waits for credit).
#[derive(Debug)]
pub(crate) struct Outlet {
    window: u64,
    state: std::sync::Mutex<OutletState>,
}

#[derive(Debug)]
struct OutletState {
    credit: Credit,
    cancelled: bool,
    /// The task waiting in [`Outlet::cancelled`].
    cancel_waker: Option<Waker>,
}

impl Outlet {
    /// A stream whose reader's window is `window` bytes (the largest item it takes) and
    /// that granted `initial` bytes to start with.
    pub(crate) fn new(window: u64, initial: u64) -> Self {
        Outlet {
            window,
            state: std::sync::Mutex::new(OutletState {
                credit: Credit::new(initial),
                cancelled: false,
                cancel_waker: None,
            }),
        }
    }

    /// Resolves once the reader is gone.
    pub(crate) async fn cancelled(&self) {
        std::future::poll_fn(|cx| {
            let mut state = self.lock();
            if state.cancelled {
                Poll::Ready(())
            } else {
                state.cancel_waker = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutletState> {
        // Each update is one step: a poisoned lock holds consistent state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The reader granted `bytes` more.
    pub(crate) fn grant(&self, bytes: u64) {
        let waker = self.lock().credit.grant(bytes);
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// The reader is gone (it cancelled, or the connection closed).
    pub(crate) fn cancel(&self) {
        let wakers = {
            let mut state = self.lock();
            state.cancelled = true;
            [state.credit.waker.take(), state.cancel_waker.take()]
        };
        for waker in wakers.into_iter().flatten() {
            waker.wake();
        }
    }

    /// Takes all the credit the reader granted and the writer has not used yet (for a
    /// writer that spends it item by item without a lock, and gives the rest back with
    /// [`refund`](Self::refund)); nothing once the reader is gone.
    pub(crate) fn take_all(&self) -> u64 {
        let mut state = self.lock();
        if state.cancelled {
            return 0;
        }
        std::mem::take(&mut state.credit.available)
    }

    /// Gives back credit taken with [`take_all`](Self::take_all) and not used.
    pub(crate) fn refund(&self, bytes: u64) {
        if bytes > 0 {
            let mut state = self.lock();
            state.credit.available = state.credit.available.saturating_add(bytes);
        }
    }

    /// Waits until the reader's grant covers `cost`, and takes it.
    pub(crate) async fn take(&self, cost: u64) -> Result<(), StreamError> {
        if cost > self.window {
            return Err(StreamError::Protocol(format!(
                "an item of {cost} bytes (with overhead) cannot fit the reader's window of {} bytes",
                self.window
            )));
        }
        std::future::poll_fn(|cx| {
            let mut state = self.lock();
            if state.cancelled {
                Poll::Ready(Err(StreamError::Cancelled))
            } else if state.credit.try_take(cost, cx.waker()) {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

/// The cost against a stream's window of a message of `items` items whose payload is
/// `payload_len` bytes: its length plus, per item, the 64 bytes chatter-core counts for a
/// message's header (chatter-core PROTOCOL.md §8.1), so that a batch costs what its items
/// sent one by one would, less their envelopes' headers.
pub(crate) fn cost(payload_len: usize, items: u32) -> u64 {
    u64::try_from(payload_len)
        .unwrap_or(u64::MAX)
        .saturating_add(64 * u64::from(items))
}

/// What a stream handler resolves to (see [`StreamReply`](crate::service::StreamReply)).
pub(crate) enum Reply {
    /// The call ends with this reply.
    Done(crate::wire::Payload),
    /// The call opens a result stream of these encoded items.
    Open(ItemSource),
}

/// The items of a stream to send, each encoded when it is pulled, so that the forwarder
/// that sends them is not generic.
pub(crate) type ItemSource = Pin<Box<dyn EncodeItems>>;

/// A source of items that encodes each one as it is pulled.
pub(crate) trait EncodeItems: Send {
    /// Polls for the next item and appends its MessagePack value to `out`: `Some(Ok(()))`
    /// when it did (and nothing else otherwise), `Some(Err)` when the source failed or the
    /// item would not encode, `None` at the end.
    fn poll_encode(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut Vec<u8>,
    ) -> Poll<Option<Result<(), StreamError>>>;
}

/// The items of `rx`, encoded as MessagePack values.
pub(crate) fn encoded<T: serde::Serialize + Send + 'static>(rx: Receiver<T>) -> ItemSource {
    struct Encoded<T>(Receiver<T>);
    impl<T: serde::Serialize + Send> EncodeItems for Encoded<T> {
        fn poll_encode(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            out: &mut Vec<u8>,
        ) -> Poll<Option<Result<(), StreamError>>> {
            let item = std::task::ready!(self.get_mut().0.poll_recv(cx));
            Poll::Ready(item.map(|item| {
                let mark = out.len();
                item.and_then(|item| {
                    crate::wire::value(out, &item).map_err(|e| {
                        out.truncate(mark);
                        StreamError::BadItem(e.0)
                    })
                })
            }))
        }
    }
    Box::pin(Encoded(rx))
}

/// A stream call's parts while it is dispatched: the handler the generated code put in
/// place, and what the serving path set up for an argument stream.
#[derive(Default)]
pub(crate) struct StreamParts {
    /// The handler, once dispatched.
    pub(crate) handler: Option<crate::service::BoxFuture<crate::service::StreamReply>>,
    /// Set by the serving path before dispatch: how an argument stream reaches the caller
    /// (grants, stop) and its window. `None` for a call that did not come as a stream call.
    pub(crate) setup: Option<InputSetup>,
    /// The argument stream's inbox, made when the handler asked for its argument stream.
    pub(crate) inbox: Option<std::sync::Arc<Inbox>>,
}

/// How the serving path lets a handler's argument stream talk to the caller.
pub(crate) struct InputSetup {
    /// The most the caller may have outstanding: the argument stream's window.
    pub(crate) window: u64,
    /// Grants and stop, sent in the call's conversation.
    pub(crate) end: std::sync::Arc<dyn RemoteEnd>,
}

impl StreamParts {
    /// The handler's argument stream: remote for a stream call, failing at once otherwise.
    pub(crate) fn input<T: serde::de::DeserializeOwned + Send + 'static>(&mut self) -> Receiver<T> {
        match &self.setup {
            Some(setup) if self.inbox.is_none() => {
                let inbox = std::sync::Arc::new(Inbox::new(setup.window));
                self.inbox = Some(inbox.clone());
                Receiver::remote(inbox, setup.end.clone())
            }
            Some(_) => failed(StreamError::Protocol(
                "a method can take at most one argument stream".into(),
            )),
            None => failed(StreamError::Protocol(
                "the caller opened no argument stream: a method with a stream must be called as a stream call (envelope kind 12)".into(),
            )),
        }
    }
}

/// A receiver whose stream failed before it began.
fn failed<T: Send + 'static>(error: StreamError) -> Receiver<T> {
    let inbox = Inbox::new(0);
    inbox.finish(Err(error));
    struct Nobody;
    impl RemoteEnd for Nobody {
        fn grant(&self, _: u64) {}
        fn cancel(&self) {}
    }
    Receiver::new(ReceiverInner::Remote(RemoteReceiver {
        inbox: std::sync::Arc::new(inbox),
        end: std::sync::Arc::new(Nobody),
        done: false,
        keep_after_bad: false,
        decode: |_| Err(crate::wire::WireError("no items".into())),
    }))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    #[derive(Default)]
    struct End {
        granted: AtomicU64,
        cancelled: AtomicUsize,
    }

    impl RemoteEnd for End {
        fn grant(&self, bytes: u64) {
            self.granted.fetch_add(bytes, Ordering::Relaxed);
        }
        fn cancel(&self) {
            self.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn remote<T: serde::de::DeserializeOwned + 'static>(
        window: u64,
    ) -> (Arc<Inbox>, Arc<End>, Receiver<T>) {
        let (inbox, end) = (Arc::new(Inbox::new(window)), Arc::new(End::default()));
        let rx = Receiver::remote(inbox.clone(), end.clone());
        (inbox, end, rx)
    }

    fn item(v: u32) -> bytes::Bytes {
        let mut w = Vec::new();
        chatter_msgpack::encode(&mut w, &v).unwrap();
        bytes::Bytes::from(w)
    }

    #[tokio::test(start_paused = true)]
    async fn an_outlet_gives_credit_within_the_grant_and_refuses_items_over_the_window() {
        let outlet = Arc::new(Outlet::new(140, 140));
        outlet.take(67).await.unwrap();
        outlet.take(67).await.unwrap();
        let waiting = tokio::spawn({
            let outlet = outlet.clone();
            async move { outlet.take(67).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "waits for a grant");
        outlet.grant(67);
        assert_eq!(waiting.await.unwrap(), Ok(()));
        let over = outlet.take(141).await;
        assert!(matches!(over, Err(StreamError::Protocol(ref m)) if m.contains("window")));
    }

    #[tokio::test(start_paused = true)]
    async fn cancelling_an_outlet_wakes_its_writer() {
        let outlet = Arc::new(Outlet::new(100, 0));
        let taking = tokio::spawn({
            let outlet = outlet.clone();
            async move { outlet.take(10).await }
        });
        let watching = tokio::spawn({
            let outlet = outlet.clone();
            async move { outlet.cancelled().await }
        });
        tokio::task::yield_now().await;
        outlet.cancel();
        assert_eq!(taking.await.unwrap(), Err(StreamError::Cancelled));
        watching.await.unwrap();
    }

    #[tokio::test]
    async fn a_remote_receiver_reads_in_order_grants_what_it_read_and_ends() {
        let (inbox, end, mut rx) = remote::<u32>(200);
        for i in 0..3 {
            inbox.push(item(i), 64).unwrap();
        }
        // A fourth would exceed the window: the writer's fault.
        assert!(inbox.push(item(3), 64).is_err());
        assert_eq!(inbox.held(), 192);
        assert_eq!(rx.recv().await, Some(Ok(0)));
        assert_eq!(end.granted.load(Ordering::Relaxed), 0);
        assert_eq!(rx.recv().await, Some(Ok(1)));
        // 128 read: at least half the window, granted back in one message.
        assert_eq!(end.granted.load(Ordering::Relaxed), 128);
        inbox.finish(Ok(()));
        assert_eq!(rx.recv().await, Some(Ok(2)));
        assert_eq!(rx.recv().await, None);
        assert_eq!(rx.recv().await, None);
        drop(rx);
        assert_eq!(end.cancelled.load(Ordering::Relaxed), 0, "ended normally");
    }

    #[tokio::test]
    async fn a_batch_is_read_as_its_items_and_costs_its_payload_plus_64_each() {
        let batch = |values: &[u32]| {
            let mut batch = crate::wire::stream::ItemBatch::new();
            for v in values {
                crate::wire::value(batch.buf(), v).unwrap();
                batch.added();
            }
            bytes::Bytes::from(batch.payload().to_vec())
        };
        let push = |inbox: &Inbox, payload: &bytes::Bytes| {
            let Ok(crate::wire::stream::StreamMsg::Items(items)) =
                crate::wire::stream::decode_stream_msg(payload)
            else {
                panic!("not items")
            };
            inbox.push_items(payload, items)
        };
        // `94 03 00 01 02`: 5 + 3 * 64 = 197; the window of 300 takes it, and then no
        // message of two more (4 + 2 * 64 = 132), whole or in part.
        let (inbox, end, mut rx) = remote::<u32>(300);
        push(&inbox, &batch(&[0, 1, 2])).unwrap();
        assert_eq!(inbox.held(), 197);
        let over = push(&inbox, &batch(&[3, 4])).unwrap_err();
        assert_eq!((over.held, over.cost), (197, 132));
        assert_eq!(inbox.held(), 197, "nothing of a refused message is kept");
        assert_eq!(rx.recv().await, Some(Ok(0)));
        // The first item carried the header: 2 + 1 + 64.
        assert_eq!(inbox.held(), 130);
        assert_eq!(end.granted.load(Ordering::Relaxed), 0);
        assert_eq!(rx.recv().await, Some(Ok(1)));
        // 67 + 65 = 132 read, not yet half the window.
        assert_eq!(end.granted.load(Ordering::Relaxed), 0);
        assert_eq!(rx.recv().await, Some(Ok(2)));
        assert_eq!(
            end.granted.load(Ordering::Relaxed),
            197,
            "all of it, once read"
        );
        assert_eq!(inbox.held(), 0);
        inbox.finish(Ok(()));
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn a_bytes_item_is_a_slice_of_the_frame_not_a_copy() {
        let (inbox, _end, mut rx) = remote::<bytes::Bytes>(1 << 20);
        let mut frame = Vec::new();
        chatter_msgpack::encode(&mut frame, &bytes::Bytes::from(vec![7u8; 300])).unwrap();
        let frame = bytes::Bytes::from(frame);
        inbox.push(frame.clone(), 400).unwrap();
        let item = rx.recv().await.unwrap().unwrap();
        assert_eq!(item, vec![7u8; 300]);
        assert_eq!(
            item.as_ptr(),
            frame[3..].as_ptr(),
            "bin16: data after 3 bytes"
        );
        // Not a bin (an array of integers): decoded (copied) as serde does.
        let (inbox, _end, mut rx) = remote::<bytes::Bytes>(1 << 20);
        inbox
            .push(bytes::Bytes::from_static(b"\x92\x01\x02"), 64)
            .unwrap();
        assert_eq!(
            rx.recv().await,
            Some(Ok(bytes::Bytes::from_static(&[1, 2])))
        );
        assert_eq!(bin_data(b"\xc4\x02ab"), Some(2));
        assert_eq!(bin_data(b"\xc4\x02abc"), None, "a value after the bin");
        assert_eq!(bin_data(b"\xc4\x03ab"), None, "cut short");
    }

    #[tokio::test]
    async fn a_reader_waiting_for_an_item_is_woken_by_the_push() {
        let (inbox, _end, mut rx) = remote::<u32>(1000);
        let read = tokio::spawn(async move { rx.recv().await });
        tokio::task::yield_now().await;
        inbox.push(item(7), 64).unwrap();
        assert_eq!(read.await.unwrap(), Some(Ok(7)));
    }

    #[tokio::test]
    async fn an_error_end_is_returned_once_and_dropping_early_cancels() {
        let (inbox, end, mut rx) = remote::<u32>(1000);
        inbox.finish(Err(StreamError::Cancelled));
        inbox.finish(Ok(()));
        assert_eq!(rx.recv().await, Some(Err(StreamError::Cancelled)));
        assert_eq!(rx.recv().await, None);

        let (inbox, end2, rx) = remote::<u32>(1000);
        inbox.push(item(1), 64).unwrap();
        drop(rx);
        assert_eq!(end2.cancelled.load(Ordering::Relaxed), 1);
        assert_eq!(end.cancelled.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn an_item_of_the_wrong_type_fails_the_stream_and_stops_the_writer() {
        let (inbox, end, mut rx) = remote::<u32>(1000);
        inbox.push(bytes::Bytes::from_static(b"\xa1x"), 64).unwrap();
        inbox.push(item(2), 64).unwrap();
        assert!(matches!(
            rx.recv().await,
            Some(Err(StreamError::BadItem(_)))
        ));
        assert_eq!(rx.recv().await, None);
        assert_eq!(end.cancelled.load(Ordering::Relaxed), 1);
    }

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
