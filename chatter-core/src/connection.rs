//! [`Connection`]: the async handle, and the driver task that moves its bytes.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::{Instant, Sleep};

use crate::address::LazyAddress;
use crate::error::{CloseCause, CloseCode, ConnectionClosed, DecodeError, SendError};
use crate::proto::{frame, ConversationId, Event as ProtoEvent, Protocol, SendArgs, SendRefused};
use crate::server::Handoff;
use crate::throttle::{Bucket, Rate, Throttle};
#[cfg(feature = "tls")]
use crate::tls::CertificateDer;
use crate::{Address, Options};

/// A conversation on one connection: who opened it and the id of its first message.
///
/// Returned by [`Connection::send`] and carried by every received [`Msg`]; pass it in
/// [`SendOptions::conversation`] to continue the conversation. Two conversations are equal
/// when they are the same conversation on the same connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Conversation {
    connection: u64,
    id: ConversationId,
}

impl Conversation {
    /// True when this side opened the conversation.
    pub fn is_owner(&self) -> bool {
        self.id.owner
    }

    /// The id of the conversation's first message, in its owner's id sequence.
    pub fn first_id(&self) -> u64 {
        self.id.first
    }

    /// The protocol-level id (without the connection).
    pub fn id(&self) -> ConversationId {
        self.id
    }
}

/// How to send a message. [`SendOptions::new`] is a one-shot message: it opens a new
/// conversation and ends it (`last` and `token` set, no timeout), as in hat.chatter.
///
/// ```
/// # use std::time::Duration;
/// # use chatter_core::SendOptions;
/// // Open a conversation, pass the turn to the peer, and hear back within 5 s:
/// let request = SendOptions::new().last(false).timeout(Duration::from_secs(5));
/// # let _ = request;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendOptions {
    conversation: Option<Conversation>,
    last: bool,
    token: bool,
    timeout: Option<Duration>,
    reserve: u64,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions::new()
    }
}

impl SendOptions {
    /// A one-shot message in a new conversation.
    pub fn new() -> Self {
        SendOptions {
            conversation: None,
            last: true,
            token: true,
            timeout: None,
            reserve: 0,
        }
    }

    /// Send only while at least `bytes` of the peer's receive window stay free after this
    /// message (default 0): otherwise the send waits (or
    /// [`try_send`](Connection::try_send) fails with [`SendError::WouldBlock`]) as for a
    /// full window. When nothing is in flight the message goes whatever its size.
    ///
    /// For keeping part of the window for more urgent messages: chatter-rpc sends replies
    /// with no reserve, calls with a quarter of the window and signals with half
    /// ([`Connection::peer_window`]), so that a backlog of signals the receiver is slow to
    /// handle never takes the whole window from calls and replies.
    pub fn reserve(mut self, bytes: u64) -> Self {
        self.reserve = bytes;
        self
    }

    /// Send in an existing conversation instead of opening one.
    pub fn conversation(mut self, conversation: Conversation) -> Self {
        self.conversation = Some(conversation);
        self
    }

    /// Whether this message ends the conversation (default true).
    pub fn last(mut self, last: bool) -> Self {
        self.last = last;
        self
    }

    /// Whether this message passes the turn to the peer (default true; ignored with `last`).
    pub fn token(mut self, token: bool) -> Self {
        self.token = token;
        self
    }

    /// Report a timeout (see [`Connection::next_timeout`]) if the peer sends nothing in the
    /// conversation for this long. Ignored with `last`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// A received message.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Msg {
    /// The conversation, from this side's point of view.
    pub conversation: Conversation,
    /// This message opened a conversation the peer started.
    pub first: bool,
    /// This message ended the conversation.
    pub last: bool,
    /// The peer passed the turn: this side may send in the conversation.
    pub token: bool,
    /// The raw payload (MessagePack when sent with [`Connection::send`]).
    pub payload: Bytes,
    /// Its flow-control cost (frame body + 64 bytes).
    credit: u32,
}

impl Msg {
    /// The flow-control credit this message costs the sender: its frame body plus 64
    /// bytes. Messages taken with [`Connection::next_events_holding`] hold it until it is
    /// given back with [`Connection::release`].
    pub fn credit(&self) -> u32 {
        self.credit
    }

    /// Decodes the payload as `T` with [`codec::decode`](crate::codec::decode): as
    /// `rmp_serde::from_slice` would, but values nested deeper than
    /// [`codec::MAX_DEPTH`](crate::codec::MAX_DEPTH) levels are refused with
    /// [`DepthLimitExceeded`](crate::codec::DecodeError::DepthLimitExceeded), so a peer
    /// cannot make the decoder overflow the stack.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        crate::codec::decode(&self.payload).map_err(|source| DecodeError {
            type_name: std::any::type_name::<T>(),
            source,
        })
    }
}

/// What a connection holds in memory for its peer, from [`Connection::buffered`].
///
/// Whatever the peer does, each part stays within a bound set by [`Options`]
/// (`docs/SECURITY.md` at the workspace root adds them up):
///
/// - `read` ≤ 2 × (`max_frame_size` + 4) + 64 KiB: a frame larger than a read chunk is read
///   into a buffer that grows as its bytes arrive (64 KiB at first, then up to twice what
///   arrived), never reserved from its length prefix alone;
/// - `received` ≤ `receive_window`: flow control (the peer may not send more before this
///   side takes messages); the allocations behind those messages are at most about twice
///   that (small messages are copied out of the read buffer, not sliced from it);
/// - `output` ≤ `send_buffer` + the largest message the application sends + 64 bytes: a
///   send waits while `send_buffer` bytes wait to be written (whatever window the peer
///   announced), and the control frames a peer's input calls for are coalesced (one pong
///   for any number of pings, one window update for all released credit), so a peer that
///   sends and never reads cannot grow it. Reading never stops for output: two peers
///   exchanging large messages would otherwise wait on each other forever.
///
///   The buffers that hold the output take up to twice it (they grow by doubling), and
///   are not freed between large messages: while messages above 64 KiB go on, each is
///   kept for the next once written (unless more than 256 KiB of it was left unused), and
///   both are freed once the connection has written nothing above 64 KiB for 1 s.
///   Otherwise, as for a connection that never sent a large message, a buffer with more
///   than 64 KiB left unused is freed once written. So they hold no more than the output
///   needed, at most a second after the last large message, and an idle connection no
///   more than one that never sent a large message.
///
/// A `max_frame_size` or `receive_window` below 4096 counts as 4096 here: every peer
/// accepts that much of early messages ([`proto::EARLY_CREDIT`](crate::proto::EARLY_CREDIT)),
/// whatever it announced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Buffered {
    /// Capacity of the read buffer (partial frames and bytes not parsed yet).
    pub read: usize,
    /// Flow-control bytes of received messages the application has not taken yet (each
    /// message counted as its frame body plus 64 bytes).
    pub received: u64,
    /// Bytes waiting to be written to the peer.
    pub output: usize,
    /// For tests: the room left in the protocol's output buffer (which trades places with
    /// the driver's write buffer at each of its rounds), as `BytesMut::capacity` counts
    /// it; 0 once a connection that sent large messages has been quiet for a second.
    #[doc(hidden)]
    pub output_room: usize,
}

impl Buffered {
    /// `read`, `received` and `output` added up.
    pub fn total(&self) -> u64 {
        self.read as u64 + self.received + self.output as u64
    }
}

/// Either kind of thing [`Connection::next_event`] returns.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// A message arrived.
    Message(Msg),
    /// The peer sent nothing in this conversation within the timeout of this side's last
    /// message in it.
    Timeout(Conversation),
}

/// A connection to a peer. Cheap to clone; all clones share one connection, which closes
/// when [`close`](Self::close) is called or the last clone is dropped.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use chatter_core::{connect, Options, SendOptions};
///
/// let conn = connect("tcp://127.0.0.1:7000", Options::default()).await?;
/// let conv = conn.send(&("hello", 1), SendOptions::new().last(false)).await?;
/// let reply = conn.receive().await?;
/// assert_eq!(reply.conversation, conv);
/// let text: String = reply.decode()?;
/// # let _ = text;
/// conn.close().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Connection {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("local", self.local_address())
            .field("remote", self.remote_address())
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Sends `value`, encoded with MessagePack (structs as maps), and returns the
    /// conversation it belongs to. Waits while the peer's receive window is full.
    pub async fn send<T: Serialize + ?Sized>(
        &self,
        value: &T,
        options: SendOptions,
    ) -> Result<Conversation, SendError> {
        let mut payload = Vec::new();
        crate::codec::encode(&mut payload, value)?;
        self.send_bytes(&payload, options).await
    }

    /// Sends raw payload bytes. Waits while the peer's receive window is full.
    pub async fn send_bytes(
        &self,
        payload: &[u8],
        options: SendOptions,
    ) -> Result<Conversation, SendError> {
        let shared = self.shared();
        // Register for a wake-up only once credit ran out: most sends never wait.
        match shared.send(payload, options) {
            Err(SendError::WouldBlock) => {}
            other => return other,
        }
        loop {
            let _waiting = shared.writable.register();
            let mut writable = pin!(shared.writable.notified());
            writable.as_mut().enable();
            match shared.send(payload, options) {
                Err(SendError::WouldBlock) => writable.await,
                other => return other,
            }
        }
    }

    /// [`send_bytes`](Self::send_bytes) of a message made anew for each attempt: `make`
    /// is called before each try (once if there is credit now, again each time credit
    /// arrives), so a message can say how long it waited, for example a request whose
    /// deadline travels as the time left. Waits while the peer's receive window is full.
    ///
    /// ```
    /// use std::time::{Duration, Instant};
    /// use chatter_core::{connect, listen, Options, SendOptions};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let server = listen("tcp://127.0.0.1:0", Options::default()).await?;
    /// let conn = connect(&server.addresses()[0], Options::default()).await?;
    /// let deadline = Instant::now() + Duration::from_secs(5);
    /// conn.send_made(|| {
    ///     let left = deadline.saturating_duration_since(Instant::now());
    ///     let message = (left.as_millis() as u64).to_be_bytes();
    ///     (message, SendOptions::new())
    /// })
    /// .await?;
    /// # Ok(()) }
    /// ```
    pub async fn send_made<P: AsRef<[u8]>>(
        &self,
        mut make: impl FnMut() -> (P, SendOptions),
    ) -> Result<Conversation, SendError> {
        let shared = self.shared();
        loop {
            let _waiting = shared.writable.register();
            let mut writable = pin!(shared.writable.notified());
            writable.as_mut().enable();
            let (payload, options) = make();
            match shared.send(payload.as_ref(), options) {
                Err(SendError::WouldBlock) => writable.await,
                other => return other,
            }
        }
    }

    /// Sends raw payload bytes if the peer's receive window has room now; otherwise fails
    /// with [`SendError::WouldBlock`].
    pub fn try_send(
        &self,
        payload: &[u8],
        options: SendOptions,
    ) -> Result<Conversation, SendError> {
        self.shared().send(payload, options)
    }

    /// The next message. After the connection closed, messages that arrived before the
    /// close are still returned; then the close cause.
    // Returns the future of `next` itself: an `async fn` around it would add a state
    // machine that only forwards the poll and moves the message once more.
    pub fn receive(&self) -> impl Future<Output = Result<Msg, ConnectionClosed>> + '_ {
        self.next(Inner::pop_message)
    }

    /// The next conversation timeout (see [`SendOptions::timeout`]). No timeout fires
    /// after the connection closed.
    pub async fn next_timeout(&self) -> Result<Conversation, ConnectionClosed> {
        self.next(|inner| inner.timeouts.pop_front()).await
    }

    /// The next message or timeout, whichever comes first.
    pub async fn next_event(&self) -> Result<Event, ConnectionClosed> {
        self.next(|inner| {
            inner
                .pop_message()
                .map(Event::Message)
                .or_else(|| inner.timeouts.pop_front().map(Event::Timeout))
        })
        .await
    }

    /// Waits for the next message or timeout, then appends it and every other one available
    /// now (at most `max` in all, at least one) to `events`, in the order
    /// [`next_event`](Self::next_event) would return them. Returns how many it appended.
    ///
    /// The same as calling `next_event` until nothing is ready, but with one lock and one
    /// wake-up registration per batch instead of per message: for a receive loop that
    /// handles messages as fast as they arrive. The flow-control credit of the messages is
    /// given back when they are taken, as with `next_event`.
    ///
    /// ```
    /// use chatter_core::{connect, listen, Event, Options, SendOptions};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let server = listen("tcp://127.0.0.1:0", Options::default()).await?;
    /// let a = connect(&server.addresses()[0], Options::default()).await?;
    /// let b = server.accept().await.expect("open");
    /// for i in 0..5u8 {
    ///     a.send_bytes(&[i], SendOptions::new()).await?;
    /// }
    /// let mut events = Vec::new();
    /// while events.len() < 5 {
    ///     b.next_events(&mut events, 3).await?;
    /// }
    /// let payloads: Vec<u8> = events
    ///     .iter()
    ///     .map(|e| match e {
    ///         Event::Message(m) => m.payload[0],
    ///         other => panic!("{other:?}"),
    ///     })
    ///     .collect();
    /// assert_eq!(payloads, [0, 1, 2, 3, 4]);
    /// # Ok(()) }
    /// ```
    pub async fn next_events(
        &self,
        events: &mut Vec<Event>,
        max: usize,
    ) -> Result<usize, ConnectionClosed> {
        let max = max.max(1);
        self.next(|inner| inner.take_events(events, max, Inner::pop_message))
            .await
    }

    /// [`next_events`](Self::next_events), except that the messages' flow-control credit is
    /// *not* given back when they are taken: the peer's window stays used by them until
    /// the application calls [`release`](Self::release) with their
    /// [`credit`](Msg::credit), for example once it has handled them. `release` bytes are
    /// given back first (the same as calling `release` before, without a second lock).
    ///
    /// This is end-to-end backpressure: a peer can send no more than the receive window
    /// ahead of what the application finished with. Give every message's credit back
    /// exactly once; credit never released stops the peer for good (releasing more than
    /// was received is ignored).
    ///
    /// ```
    /// use chatter_core::{connect, listen, Event, Options, SendOptions};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let server = listen("tcp://127.0.0.1:0", Options::default()).await?;
    /// let a = connect(&server.addresses()[0], Options::default()).await?;
    /// let b = server.accept().await.expect("open");
    /// a.send_bytes(b"work", SendOptions::new()).await?;
    /// let mut events = Vec::new();
    /// b.next_events_holding(&mut events, 16, 0).await?;
    /// let Event::Message(msg) = &events[0] else { unreachable!() };
    /// assert_eq!(b.buffered().received, u64::from(msg.credit())); // still held
    /// b.release(u64::from(msg.credit())); // done with it: the peer may send more
    /// assert_eq!(b.buffered().received, 0);
    /// # Ok(()) }
    /// ```
    pub async fn next_events_holding(
        &self,
        events: &mut Vec<Event>,
        max: usize,
        release: u64,
    ) -> Result<usize, ConnectionClosed> {
        let max = max.max(1);
        let mut release = release;
        self.next(|inner| {
            if release > 0 {
                inner.release(std::mem::take(&mut release));
            }
            inner.take_events(events, max, Inner::pop_message_holding)
        })
        .await
    }

    /// Gives back the flow-control credit of messages taken with
    /// [`next_events_holding`](Self::next_events_holding): `bytes` is the sum of their
    /// [`credit`](Msg::credit)s. The peer learns of it in a window frame (one for credit
    /// released in quick succession).
    pub fn release(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let shared = self.shared();
        let mut inner = shared.lock();
        let was_idle = !inner.proto.has_output();
        inner.release(bytes);
        let wake = inner.driver_wake(was_idle);
        drop(inner);
        if let Some(w) = wake {
            w.wake();
        }
    }

    /// The most flow-control credit the peer grants this side: its announced receive
    /// window (before its hello, the early credit of 4096 bytes). See
    /// [`SendOptions::reserve`].
    pub fn peer_window(&self) -> u64 {
        self.shared().lock().proto.peer_window()
    }

    /// This side's address.
    pub fn local_address(&self) -> &Address {
        self.shared().local.get()
    }

    /// The peer's address.
    pub fn remote_address(&self) -> &Address {
        self.shared().remote.get()
    }

    /// The certificate chain the peer presented (DER, leaf first), on TLS connections
    /// where it presented one; `None` on other transports.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.shared().peer_certificates.as_deref()
    }

    /// Closes the connection: the peer sees [`CloseCause::Peer`], pending sends fail, and
    /// no conversation timeout fires afterwards. Returns when the transport is closed: the
    /// peer acknowledged the close by closing its side, or [`Options::close_linger`] passed.
    pub async fn close(&self) {
        self.shared()
            .close(CloseCode::Normal, "closed by peer application");
        self.wait_state(|inner| inner.finished.then_some(())).await;
    }

    /// Closes the connection like [`close`](Self::close), telling the peer why: for example
    /// [`CloseCode::ProtocolError`] when a layer above detected a violation of its own
    /// protocol. The reason is cut to fit the peer's frame limit.
    pub async fn close_with(&self, code: CloseCode, reason: &str) {
        self.shared().close(code, reason);
        self.wait_state(|inner| inner.finished.then_some(())).await;
    }

    /// Starts closing the connection like [`close_with`](Self::close_with) and returns at
    /// once, without waiting for the transport to close: for code that cannot wait, such as
    /// a `Drop` impl or a callback. [`closed`](Self::closed) waits for the close. Does
    /// nothing if the connection is already closing.
    ///
    /// ```no_run
    /// # async fn demo(conn: chatter_core::Connection) {
    /// use chatter_core::CloseCode;
    ///
    /// conn.begin_close(CloseCode::GoingAway, "shutting down");
    /// let cause = conn.closed().await; // what the peer was told, or why it ended first
    /// # drop(cause);
    /// # }
    /// ```
    pub fn begin_close(&self, code: CloseCode, reason: &str) {
        self.shared().close(code, reason);
    }

    /// Waits until the connection is closed and returns why. Resolves as soon as the
    /// connection stopped working, while the transport may still be shutting down.
    pub async fn closed(&self) -> CloseCause {
        self.wait_state(|inner| inner.cause.clone()).await
    }

    /// Why the connection closed, or `None` while it is open.
    pub fn close_cause(&self) -> Option<CloseCause> {
        self.shared().lock().cause.clone()
    }

    /// The bytes this connection holds now: its read buffer, received messages not yet
    /// taken, and output waiting to be written. See [`Buffered`] for the bound on each.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use chatter_core::{connect, listen, Options};
    ///
    /// let server = listen("tcp://127.0.0.1:0", Options::default()).await?;
    /// let client = connect(&server.addresses()[0], Options::default()).await?;
    /// assert_eq!(client.buffered().received, 0);
    /// # Ok(()) }
    /// ```
    pub fn buffered(&self) -> Buffered {
        let inner = self.shared().lock();
        Buffered {
            read: inner.read_buffer,
            received: inner.proto.received_unreleased(),
            output: inner.output_buffer + inner.proto.output_len(),
            output_room: inner.proto.output_capacity(),
        }
    }

    /// Changes the connection's bandwidth limits (see [`Throttle`]); takes effect at once,
    /// with full buckets for the directions whose rate changed.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use chatter_core::{connect, listen, Options, Rate, Throttle};
    ///
    /// let server = listen("tcp://127.0.0.1:0", Options::default()).await?;
    /// let client = connect(&server.addresses()[0], Options::default()).await?;
    /// client.set_throttle(Throttle { send: Some(Rate::new(1 << 20)), receive: None });
    /// assert_eq!(client.throttle().send, Some(Rate::new(1 << 20)));
    /// # Ok(()) }
    /// ```
    pub fn set_throttle(&self, throttle: Throttle) {
        let mut inner = self.shared().lock();
        inner.throttle = throttle;
        let driver = inner.driver.clone();
        drop(inner);
        if let Some(w) = driver {
            w.wake();
        }
    }

    /// The connection's bandwidth limits.
    pub fn throttle(&self) -> Throttle {
        self.shared().lock().throttle
    }

    /// Runs `future` in this connection's own task, beside the driver that moves the
    /// connection's bytes, until the future completes.
    ///
    /// This is for the loop that receives from the connection and answers it (chatter-rpc
    /// runs its receive loop so). It saves a task per connection, and the scheduler's
    /// rounds between the two: messages the driver reads are handed to the future, and
    /// what the future sends is written, within the same poll of the task. The price: the
    /// connection moves no bytes while the future runs, so it must not block, and work
    /// that takes long belongs in a task of its own.
    ///
    /// The task ends when both the driver and the future ended (the socket closes when
    /// the driver ends). One future per connection runs so: a second one, or one attached
    /// after the connection's task ended, is spawned as a task of its own
    /// (`tokio::spawn`, so this must be called within a tokio runtime). A panic of the
    /// future ends the future, not the connection.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use chatter_core::{connect, listen, Options, SendOptions};
    ///
    /// let server = listen("tcp://127.0.0.1:0", Options::default()).await?;
    /// let client = connect(&server.addresses()[0], Options::default()).await?;
    /// let conn = server.accept().await.expect("open");
    /// // An echo loop, run by the connection's own task.
    /// conn.clone().attach(async move {
    ///     while let Ok(msg) = conn.receive().await {
    ///         let answer = SendOptions::new().conversation(msg.conversation);
    ///         let _ = conn.send_bytes(&msg.payload, answer).await;
    ///     }
    /// });
    /// client.send("echo?", SendOptions::new().last(false)).await?;
    /// assert_eq!(client.receive().await?.decode::<String>()?, "echo?");
    /// # Ok(()) }
    /// ```
    pub fn attach<F>(&self, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let shared = self.shared();
        let mut inner = shared.lock();
        if !matches!(inner.attachment, Attachment::Open) {
            drop(inner);
            // Only for a second attachment, or one after the connection's task ended: one
            // task per `attach` call the application makes, as `tokio::spawn` would be
            // (nothing a peer sends makes one). chatter-rpc attaches once per connection,
            // so it has at most the one receive task per connection it always had.
            drop(tokio::spawn(future));
            return;
        }
        inner.attachment = Attachment::Waiting(Box::pin(future));
        shared.attach_pending.store(true, Ordering::Release);
        // Called from within the task (a server's `on_accept`), the task takes it before
        // its poll ends; not polled yet, on its first poll; ended, on its way out
        // (`Task::end`).
        let driver = match POLLING.with(|p| p.get()) == shared.id {
            true => None,
            false => inner.driver.clone(),
        };
        drop(inner);
        if let Some(w) = driver {
            w.wake();
        }
    }

    /// True once the connection started closing.
    pub fn is_closed(&self) -> bool {
        self.shared().lock().cause.is_some()
    }

    fn shared(&self) -> &Shared {
        &self.handle.shared
    }

    pub(crate) fn downgrade(&self) -> std::sync::Weak<Handle> {
        Arc::downgrade(&self.handle)
    }

    /// Starts closing without waiting.
    pub(crate) fn start_close(&self, code: CloseCode, reason: &str) {
        self.shared().close(code, reason);
    }

    pub(crate) fn from_handle(handle: Arc<Handle>) -> Self {
        Connection { handle }
    }

    async fn next<R>(
        &self,
        mut take: impl FnMut(&mut Inner) -> Option<R>,
    ) -> Result<R, ConnectionClosed> {
        let shared = self.shared();
        let mut attempt = || {
            let mut inner = shared.lock();
            // Taking gives credit back (and so may `take` when it takes nothing: credit
            // released by `next_events_holding`), which may queue a window frame. Output
            // that was already queued had its driver wake-up when it was queued (as in
            // `send`).
            let was_idle = !inner.proto.has_output();
            let result = match take(&mut inner) {
                Some(item) => Some(Ok(item)),
                None => inner
                    .cause
                    .as_ref()
                    .map(|cause| Err(ConnectionClosed(cause.clone()))),
            };
            let wake = inner.driver_wake(was_idle);
            drop(inner);
            if let Some(w) = wake {
                w.wake();
            }
            result
        };
        // Register for a wake-up only when nothing is ready: under load nothing waits.
        if let Some(result) = attempt() {
            return result;
        }
        loop {
            let _waiting = shared.readable.register();
            let mut readable = pin!(shared.readable.notified());
            readable.as_mut().enable();
            if let Some(result) = attempt() {
                return result;
            }
            readable.await;
        }
    }

    /// Starts the driver for an open transport, on the given side of the handshake
    /// (PROTOCOL.md §4). The returned connection is usable once
    /// [`handshake`](Self::handshake) returned `Ok`.
    pub(crate) fn start<S: Transport>(
        io: S,
        (local, remote): (LazyAddress, LazyAddress),
        peer_certificates: PeerCertificates,
        options: &Options,
        side: Side,
    ) -> Self {
        let now = Instant::now();
        let accepting = matches!(side, Side::Accepting { .. });
        let (proto, permit, handoff) = match side {
            Side::Connecting => (
                Protocol::new(options.proto.clone(), now.into_std()),
                None,
                None,
            ),
            Side::Accepting { permit, handoff } => (
                Protocol::accepting(options.proto.clone(), now.into_std()),
                permit,
                handoff,
            ),
        };
        let id = NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(Shared {
            id,
            local,
            remote,
            peer_certificates,
            inner: Mutex::new(Inner {
                proto,
                clock: now.into_std(),
                connection: id,
                messages_seen: 0,
                timeouts: VecDeque::new(),
                driver: None,
                connected: false,
                cause: None,
                finished: false,
                read_buffer: 0,
                output_buffer: 0,
                throttle: options.throttle,
                attachment: Attachment::Open,
            }),
            readable: Waiters::default(),
            writable: Waiters::default(),
            state_changed: Waiters::default(),
            attach_pending: AtomicBool::new(false),
        });
        let mut driver = Driver {
            io,
            shared: shared.clone(),
            read_buf: BytesMut::new(),
            write_buf: BytesMut::new(),
            need_flush: false,
            read_open: true,
            shutdown: false,
            max_frame_size: options.proto.max_frame_size,
            stall_limit: options.proto.keepalive.map(|k| k.interval + k.timeout),
            stalled_since: None,
            linger: options.close_linger,
            linger_deadline: None,
            sleep: Box::pin(tokio::time::sleep_until(now + FAR_FUTURE)),
            sleep_deadline: None,
            write_buf_release: None,
            first_wake: first_wake_after(options).map(|after| now + after),
            done: false,
            permit: permit.map(Arc::new),
            throttle: Throttle::NONE,
            send_bucket: None,
            receive_bucket: None,
            throttled_until: None,
            answering: accepting,
            handoff: None,
            held: None,
            hold_rounds: 0,
            eof_probed: false,
            read_drained: false,
            read_grown: false,
            own_waker: None,
        };
        driver.apply(options.throttle, now);
        let handle = Arc::new(Handle { shared });
        driver.handoff = handoff.map(|h| {
            let conn = Connection {
                handle: handle.clone(),
            };
            (h, conn)
        });
        // One task per connection (`Task`: the driver, and at most one attached future):
        // an accepted one holds its server's `max_connections` permit, a connected one
        // exists because the application connected. Its driver, socket and buffers end at
        // the latest `close_linger` after the connection closes (closed, keepalive or
        // stall timeout, handshake timeout), and what it buffers is bounded as
        // `Connection::buffered` documents (docs/SECURITY.md). The task itself lasts until
        // the attached future also ended: chatter-rpc's receive loop ends once it saw the
        // close; an application's lasts as long as the application wrote it to.
        // A span per connection around its driver (target `chatter_core::connection`,
        // level debug: the driver's events carry the connection's id and addresses),
        // made only when that level is enabled; otherwise the driver runs bare, for
        // the price of one level check.
        if tracing::enabled!(target: "chatter_core::connection", tracing::Level::DEBUG) {
            let shared = &handle.shared;
            let span = tracing::debug_span!(
                target: "chatter_core::connection",
                "connection",
                id,
                local = %shared.local.get(),
                remote = %shared.remote.get(),
                side = if accepting { "accepted" } else { "connected" },
            );
            tokio::spawn(tracing::Instrument::instrument(Task::new(driver), span));
        } else {
            // Boxed: tokio moves a task's future several times while spawning it and
            // writes its whole stage when it ends; the driver is 440 bytes (TCP), its box a
            // pointer (connect + first call: -1.7k instructions per connection, -2% CPU).
            tokio::spawn(Box::pin(Task::new(driver)));
        }
        Connection { handle }
    }

    /// Waits for the handshake to complete.
    pub(crate) async fn handshake(&self) -> Result<(), CloseCause> {
        self.wait_state(|inner| match &inner.cause {
            // Completed, even if the connection closed since (the peer's hello, messages
            // and close frame in one read): its messages are delivered as after any close.
            _ if inner.connected => Some(Ok(())),
            Some(cause) => Some(Err(cause.clone())),
            None => None,
        })
        .await
    }

    async fn wait_state<R>(&self, mut check: impl FnMut(&Inner) -> Option<R>) -> R {
        let shared = self.shared();
        if let Some(r) = check(&shared.lock()) {
            return r;
        }
        loop {
            let _waiting = shared.state_changed.register();
            let mut changed = pin!(shared.state_changed.notified());
            changed.as_mut().enable();
            if let Some(r) = check(&shared.lock()) {
                return r;
            }
            changed.await;
        }
    }
}

static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

/// A [`Notify`] that knows whether a task waits on it, so that a wake-up with nobody to
/// wake costs one atomic load instead of `notify_waiters`' lock of the waiter list (a
/// short connection makes about a dozen wake-ups, nearly all with nobody waiting).
///
/// A waiter [`register`](Self::register)s first, then enables its
/// [`notified`](Self::notified) future, then checks under the connection's lock for what
/// it waits for, and awaits only if it is not there. A notifier changes the state under
/// that lock and calls [`notify_waiters`](Self::notify_waiters) after releasing it. If
/// the notifier reads a count of 0, the waiter registered after that read (the count's
/// operations are `SeqCst`), so it took the lock after the notifier released it and sees
/// the change; otherwise the notifier wakes every waiter that enabled its future (one
/// that enables later takes the lock later and sees the change).
#[derive(Debug, Default)]
struct Waiters {
    notify: Notify,
    /// Registered waiters (at most one per task waiting on this connection).
    count: AtomicUsize,
}

/// A registration with [`Waiters`], ended when dropped.
struct Registered<'a>(&'a Waiters);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Waiters {
    fn register(&self) -> Registered<'_> {
        self.count.fetch_add(1, Ordering::SeqCst);
        Registered(self)
    }

    fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }

    fn notify_waiters(&self) {
        if self.count.load(Ordering::SeqCst) != 0 {
            self.notify.notify_waiters();
        }
    }
}

/// How long after its start a connection's driver arms its timer at the latest the first
/// time (its linger; see `Driver::first_wake`), or `None` when it arms its first deadline
/// as it is. A connect arms its own timer no later than this (`transport::timed`), so
/// that the driver's does not move the runtime's next wake-up earlier.
pub(crate) fn first_wake_after(options: &Options) -> Option<Duration> {
    (!options.close_linger.is_zero()).then_some(options.close_linger)
}

/// How many rounds of the scheduler a server's hello waits for the application's first
/// answer at most (see `Driver::hold_hello`).
const HOLD_ROUNDS: u8 = 3;

/// Far enough ahead to mean "no deadline" for the driver's sleep.
const FAR_FUTURE: Duration = Duration::from_secs(86400 * 365);

/// How many read/write rounds the driver runs before yielding to other tasks.
const DRIVER_BUDGET: usize = 32;

/// Read in chunks of at least this many bytes.
const READ_CHUNK: usize = 16 * 1024;

/// A connection's first read buffer, until a read fills it: room for the hellos, a first
/// message or two and a close frame, which is all a short connection reads. Below glibc's
/// large-request size (1 KiB), so that it comes from the small bins (BENCHMARKS.md,
/// "Third round": chatter-rpc's connect + first call, -0.8% instructions, -2% CPU).
const FIRST_READ: usize = 512;

/// The room made at once for a frame larger than [`READ_CHUNK`] whose length prefix
/// arrived; beyond it the buffer grows to twice what arrived of the frame, so that a peer
/// that announces a large frame and sends it slowly holds at most this much or twice what
/// it sent. (Growing from a read chunk instead cost a third of the throughput of 64 KiB
/// messages: a reallocation and a read per doubling.)
const LARGE_FRAME_START: usize = 64 * 1024;

/// Buffers above this size are released once empty, so idle connections stay small.
const KEEP_BUFFER: usize = 64 * 1024;

/// While output above [`KEEP_BUFFER`] is being written, a written-out write buffer is
/// kept for the next output unless more than this much room was left in it (instead of
/// `KEEP_BUFFER`), and the output buffers are released once the connection has written
/// nothing above `KEEP_BUFFER` for [`KEEP_LARGE_FOR`]. Freeing them after every large
/// write made glibc give the top of its heap back to the kernel (`madvise`) at most
/// messages and fault the pages in again for the next; keeping every buffer, however
/// large, was worse still (BENCHMARKS.md, "64 KiB over TLS: the output buffers kept while
/// large messages go on").
const KEEP_LARGE_WRITE_BUFFER: usize = 256 * 1024;

/// How long the output buffers outlive the last output above [`KEEP_BUFFER`].
const KEEP_LARGE_FOR: Duration = Duration::from_secs(1);

/// Which side of the handshake a connection is on (PROTOCOL.md §4).
pub(crate) enum Side {
    /// It opened the transport: its hello goes first, at once.
    Connecting,
    /// It accepted the transport: its hello answers the peer's.
    Accepting {
        /// A server's connection-limit slot, released when the driver ends.
        permit: Option<OwnedSemaphorePermit>,
        /// Where the driver hands the connection once its handshake is over.
        handoff: Option<Handoff>,
    },
}

/// A byte stream a connection runs over.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Drops the connection without delivering what is still unsent: on TCP a reset
    /// (`SO_LINGER` 0), so that the kernel does not keep the unsent bytes of a peer that
    /// stopped reading either.
    fn abort(&self) {}

    /// Whether the write side must still be shut down when the peer's end of stream was
    /// read: not where closing the socket does the same (TCP's `FIN`, a Unix socket's end
    /// of stream); TLS sends its `close_notify` in the shutdown.
    fn shutdown_after_eof(&self) -> bool {
        true
    }

    /// Writes the last bytes before the write side is shut down, if the transport has a
    /// better way than `poll_write`; `None` when it has not. `WouldBlock` falls back to
    /// `poll_write`.
    fn write_last(&self, _buf: &[u8]) -> Option<io::Result<usize>> {
        None
    }

    /// After the shutdown: whether closing now leaves nothing unsent to the kernel, so that
    /// the close need not wait for the peer's end of stream (PROTOCOL.md §10). False where
    /// it cannot tell: the connection then drains until the end of stream or the linger.
    fn all_sent(&self) -> bool {
        false
    }

    /// Whether the peer's end of stream has arrived, as far as the transport knows without
    /// a read (the `EPOLLRDHUP` that tokio keeps for a socket). Asked only after a read
    /// that took everything the socket had: nothing is left to read then but the end of
    /// stream. False where it cannot tell: a read finds out.
    fn read_closed(&self) -> bool {
        false
    }
}

/// Whether tokio saw the peer's end of stream on a socket (its readiness keeps
/// `READ_CLOSED` once seen). The readiness future is polled once, with a waker that does
/// nothing: it answers at once when readiness is known and registers nothing once dropped.
fn socket_read_closed<F>(ready: F) -> bool
where
    F: Future<Output = io::Result<tokio::io::Ready>>,
{
    let mut ready = pin!(ready);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    matches!(ready.as_mut().poll(&mut cx), Poll::Ready(Ok(r)) if r.is_read_closed())
}

impl Transport for tokio::net::TcpStream {
    fn abort(&self) {
        let _ = self.set_zero_linger();
    }

    fn shutdown_after_eof(&self) -> bool {
        false
    }

    #[cfg(target_os = "linux")]
    fn all_sent(&self) -> bool {
        crate::transport::unsent(self) == Some(0)
    }

    fn read_closed(&self) -> bool {
        socket_read_closed(self.ready(tokio::io::Interest::READABLE))
    }

    /// With `MSG_MORE`: the kernel holds the bytes until the shutdown that follows at once,
    /// and sends them in the FIN's segment instead of one segment of their own.
    #[cfg(target_os = "linux")]
    fn write_last(&self, buf: &[u8]) -> Option<io::Result<usize>> {
        let flags = libc::MSG_MORE | libc::MSG_NOSIGNAL;
        Some(socket2::SockRef::from(self).send_with_flags(buf, flags))
    }
}

impl Transport for tokio::net::UnixStream {
    fn shutdown_after_eof(&self) -> bool {
        false
    }

    /// What was written is in the peer socket's queue already, and stays with it.
    fn all_sent(&self) -> bool {
        true
    }

    fn read_closed(&self) -> bool {
        socket_read_closed(self.ready(tokio::io::Interest::READABLE))
    }
}

#[cfg(feature = "tls")]
impl<S: Transport> Transport for tokio_rustls::server::TlsStream<S> {
    fn abort(&self) {
        self.get_ref().0.abort();
    }

    fn all_sent(&self) -> bool {
        self.get_ref().0.all_sent()
    }
}

#[cfg(feature = "tls")]
impl<S: Transport> Transport for tokio_rustls::client::TlsStream<S> {
    fn abort(&self) {
        self.get_ref().0.abort();
    }

    fn all_sent(&self) -> bool {
        self.get_ref().0.all_sent()
    }
}

#[cfg(test)]
impl Transport for tokio::io::DuplexStream {}

/// The certificate chain a TLS peer presented (DER, leaf first); always `None` in a build
/// without the `tls` feature.
#[cfg(feature = "tls")]
pub(crate) type PeerCertificates = Option<Vec<CertificateDer<'static>>>;
/// The certificate chain a TLS peer presented: always `None` without the `tls` feature.
#[cfg(not(feature = "tls"))]
pub(crate) type PeerCertificates = Option<std::convert::Infallible>;

/// The user-facing handle; dropping the last one closes the connection.
#[derive(Debug)]
pub(crate) struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared
            .close(CloseCode::Normal, "all connection handles dropped");
    }
}

#[derive(Debug)]
struct Shared {
    id: u64,
    local: LazyAddress,
    remote: LazyAddress,
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    peer_certificates: PeerCertificates,
    inner: Mutex<Inner>,
    /// Messages, timeouts or the close became available.
    readable: Waiters,
    /// Flow-control credit arrived (or the connection closed).
    writable: Waiters,
    /// Handshake completed, close started, or the driver finished.
    state_changed: Waiters,
    /// A future waits in [`Inner::attachment`] for the connection's task to take it.
    attach_pending: AtomicBool,
}

#[derive(Debug)]
struct Inner {
    proto: Protocol,
    /// The driver's latest clock reading, for sends that arm no timer.
    clock: std::time::Instant,
    /// This connection's id (for the conversations of received messages).
    connection: u64,
    /// `proto.messages_received()` when the readers were last told about messages.
    messages_seen: u64,
    timeouts: VecDeque<Conversation>,
    driver: Option<Waker>,
    connected: bool,
    cause: Option<CloseCause>,
    finished: bool,
    /// The driver's read buffer (its capacity) and the output waiting in its write buffer,
    /// as of its last round.
    read_buffer: usize,
    output_buffer: usize,
    /// The throttle the application wants; the driver applies it on its next round.
    throttle: Throttle,
    /// The future attached to the connection's task ([`Connection::attach`]).
    attachment: Attachment,
}

/// A future to run in the connection's task ([`Connection::attach`]).
type Attached = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where the connection's task stands with an attached future.
enum Attachment {
    /// None attached yet: one can be.
    Open,
    /// Attached, not taken by the task yet.
    Waiting(Attached),
    /// The task took one: later ones get tasks of their own.
    Taken,
    /// The task ended: attached futures get tasks of their own.
    Ended,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Attachment::Open => "Open",
            Attachment::Waiting(_) => "Waiting",
            Attachment::Taken => "Taken",
            Attachment::Ended => "Ended",
        })
    }
}

/// Who to wake after the lock is released.
#[derive(Default)]
struct Wake {
    readable: bool,
    writable: bool,
    state: bool,
}

impl Inner {
    /// Takes the next message and gives its flow-control credit back. Messages stay in the
    /// protocol's queue until taken (no second queue to move them through).
    #[inline]
    fn pop_message(&mut self) -> Option<Msg> {
        let msg = self.pop_message_holding()?;
        self.proto.release(msg.credit);
        Some(msg)
    }

    /// Takes the next message and keeps its flow-control credit.
    #[inline]
    fn pop_message_holding(&mut self) -> Option<Msg> {
        let m = self.proto.poll_message()?;
        Some(Msg {
            conversation: Conversation {
                connection: self.connection,
                id: m.conversation,
            },
            first: m.first,
            last: m.last,
            token: m.token,
            payload: m.payload,
            credit: m.cost,
        })
    }

    /// Appends up to `max` messages (taken with `pop`), then timeouts, to `events`; how
    /// many, if any.
    #[inline]
    fn take_events(
        &mut self,
        events: &mut Vec<Event>,
        max: usize,
        mut pop: impl FnMut(&mut Inner) -> Option<Msg>,
    ) -> Option<usize> {
        let before = events.len();
        while events.len() - before < max {
            match pop(self) {
                Some(msg) => events.push(Event::Message(msg)),
                None => break,
            }
        }
        while events.len() - before < max {
            match self.timeouts.pop_front() {
                Some(conv) => events.push(Event::Timeout(conv)),
                None => break,
            }
        }
        let taken = events.len() - before;
        (taken > 0).then_some(taken)
    }

    /// Gives back held credit (any amount: the protocol takes it in `u32` steps).
    fn release(&mut self, mut bytes: u64) {
        while bytes > 0 {
            let step = bytes.min(u32::MAX as u64);
            self.proto.release(step as u32);
            bytes -= step;
        }
    }

    /// Moves protocol events other than messages into the queues; says who to wake.
    fn pump(&mut self, connection: u64) -> Wake {
        let mut wake = Wake::default();
        let received = self.proto.messages_received();
        if received != self.messages_seen {
            self.messages_seen = received;
            wake.readable = true;
        }
        while let Some(event) = self.proto.poll_other_event() {
            match event {
                ProtoEvent::Connected(_) => {
                    self.connected = true;
                    wake.state = true;
                }
                // Messages are taken from the protocol by `pop_message`.
                ProtoEvent::Message(_) => {}
                ProtoEvent::Timeout(id) => {
                    self.timeouts.push_back(Conversation { connection, id });
                    wake.readable = true;
                }
                ProtoEvent::Writable => wake.writable = true,
                ProtoEvent::Closed(cause) => {
                    self.cause = Some(cause);
                    wake = Wake {
                        readable: true,
                        writable: true,
                        state: true,
                    };
                }
            }
        }
        wake
    }

    /// The driver's waker, when the protocol has new output for it to write (it had none
    /// before if `was_idle`).
    #[inline]
    fn driver_wake(&mut self, was_idle: bool) -> Option<Waker> {
        if (was_idle && self.proto.has_output()) || self.proto.is_closed() {
            self.driver.clone()
        } else {
            None
        }
    }
}

impl Shared {
    #[inline]
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The protocol never panics while holding the lock; if something else did, the state
        // is still consistent enough to close the connection.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn notify(&self, wake: Wake) {
        if wake.readable {
            self.readable.notify_waiters();
        }
        if wake.writable {
            self.writable.notify_waiters();
        }
        if wake.state {
            self.state_changed.notify_waiters();
        }
    }

    fn send(&self, payload: &[u8], options: SendOptions) -> Result<Conversation, SendError> {
        let conversation = match options.conversation {
            Some(c) if c.connection != self.id => return Err(SendError::WrongConnection(c)),
            c => c,
        };
        let args = SendArgs {
            conversation: conversation.map(|c| c.id),
            last: options.last,
            token: options.token,
            timeout: options.timeout,
        };
        let mut inner = self.lock();
        let was_idle = !inner.proto.has_output();
        // The clock is only needed to arm a timeout, and reading it is a measurable cost.
        let now = match args.timeout {
            Some(_) => Instant::now().into_std(),
            None => inner.clock,
        };
        match inner
            .proto
            .send_reserving(now, args, payload, options.reserve)
        {
            Ok(id) => {
                let waker = if was_idle { inner.driver.clone() } else { None };
                drop(inner);
                if let Some(w) = waker {
                    w.wake();
                }
                Ok(Conversation {
                    connection: self.id,
                    id,
                })
            }
            Err(refused) => {
                let conv = || Conversation {
                    connection: self.id,
                    id: args.conversation.unwrap_or(ConversationId {
                        owner: true,
                        first: 0,
                    }),
                };
                Err(match refused {
                    SendRefused::Closed | SendRefused::NotReady => {
                        SendError::Closed(inner.cause.clone().unwrap_or(CloseCause::Local))
                    }
                    SendRefused::NotYourTurn => SendError::NotYourTurn(conv()),
                    SendRefused::Ended => SendError::ConversationEnded(conv()),
                    SendRefused::TooLarge { size, max } => SendError::TooLarge { size, max },
                    SendRefused::NoCredit => SendError::WouldBlock,
                })
            }
        }
    }

    fn close(&self, code: CloseCode, reason: &str) {
        let mut inner = self.lock();
        inner.proto.close(code, reason);
        let wake = inner.pump(self.id);
        let driver = inner.driver.clone();
        drop(inner);
        self.notify(wake);
        if let Some(w) = driver {
            w.wake();
        }
    }
}

/// Moves bytes between the transport and the [`Protocol`]; one task per connection.
///
/// Each round it reads what the socket has, feeds it to the protocol, fires due timers,
/// then writes everything the protocol queued in one `write` (batching under load, no
/// delay when idle) and flushes once the buffer is drained. On close it writes the close
/// frame, shuts down its write side and drains input until the peer hangs up, a read finds
/// nothing, or the linger time passes (PROTOCOL.md §10).
struct Driver<S: Transport> {
    io: S,
    shared: Arc<Shared>,
    read_buf: BytesMut,
    write_buf: BytesMut,
    need_flush: bool,
    read_open: bool,
    shutdown: bool,
    max_frame_size: u32,
    /// Keepalive's interval + timeout: how long output may wait without the peer taking a
    /// byte of it before the connection is dropped as if a ping went unanswered. Keepalive
    /// counts any arriving byte as a sign of life, so a peer that keeps sending (a ping now
    /// and then) and never reads would otherwise hold the connection forever.
    stall_limit: Option<Duration>,
    /// Since when output has been waiting and the transport took none of it.
    stalled_since: Option<Instant>,
    linger: Duration,
    /// Set when the connection closes: the driver finishes by then, flushed or not.
    linger_deadline: Option<Instant>,
    sleep: Pin<Box<Sleep>>,
    sleep_deadline: Option<Instant>,
    /// When the output buffers are released: [`KEEP_LARGE_FOR`] after the last output
    /// above [`KEEP_BUFFER`]; `None` when no such output was written since the last
    /// release.
    write_buf_release: Option<Instant>,
    /// The latest the timer is first armed for: the connection's start plus the linger.
    /// A close within that time then finds the timer armed no later than its linger
    /// deadline and leaves it alone: moving a timer earlier than the runtime's next
    /// wake-up costs an unpark (an eventfd write, and an extra `epoll_wait`). If it fires
    /// early, nothing is due and the next round arms the real deadline.
    first_wake: Option<Instant>,
    done: bool,
    /// The server's connection-limit slot, released when the driver ends (and, once
    /// handed to the server's accept queue, the connection was taken from it).
    permit: Option<Arc<OwnedSemaphorePermit>>,
    /// The throttle applied, and its buckets.
    throttle: Throttle,
    send_bucket: Option<Bucket>,
    receive_bucket: Option<Bucket>,
    /// When a throttled read or write can go on (set by the round that stopped for it).
    throttled_until: Option<Instant>,
    /// The accepting side before the peer's hello arrived.
    answering: bool,
    /// A server's handoff of this connection (with a handle to it), until the handshake
    /// is over.
    handoff: Option<(Handoff, Connection)>,
    /// Our hello, held back while the write buffer is this long: messages came with the
    /// peer's hello, and the application's first answer may leave in the same write.
    held: Option<usize>,
    /// The rounds of the scheduler the hold took (at most [`HOLD_ROUNDS`], see
    /// `hold_hello`).
    hold_rounds: u8,
    /// After the peer's close, one more read looked for its end of stream.
    eof_probed: bool,
    /// The latest read took everything the socket had (it returned less than asked for).
    read_drained: bool,
    /// A read filled the read buffer once: reads are made in [`READ_CHUNK`]s from then
    /// on, instead of into the [`FIRST_READ`] bytes a connection starts with.
    read_grown: bool,
    /// The waker that sends wake the driver with, when a future is attached to the
    /// connection's task (see [`Task`]); the task's own otherwise.
    own_waker: Option<Waker>,
}

enum ReadOutcome {
    Nothing,
    Data,
    Eof,
    Failed(io::Error),
}

impl<S: Transport> Driver<S> {
    fn poll_read(&mut self, cx: &mut Context<'_>, now: Instant) -> ReadOutcome {
        if !self.read_open {
            return ReadOutcome::Nothing;
        }
        let allowed = match &mut self.receive_bucket {
            None => None,
            Some(bucket) => match bucket.available(now) {
                0 => {
                    self.throttled_until = Some(bucket.ready_at(now, READ_CHUNK as u64));
                    return ReadOutcome::Nothing;
                }
                n => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            },
        };
        // A frame larger than a read chunk is read up to its end and no further, into a
        // buffer that grows as its bytes arrive (at most doubling): the buffer then holds
        // that frame alone, and is dropped once the frame was split off.
        let limit = match self.read_buf.first_chunk::<{ frame::LENGTH_PREFIX }>() {
            Some(prefix) => {
                let len = u32::from_be_bytes(*prefix);
                let total = frame::LENGTH_PREFIX + len.min(self.max_frame_size) as usize;
                let needed = total.saturating_sub(self.read_buf.len());
                (total > READ_CHUNK && needed > 0).then_some(needed)
            }
            None => None,
        };
        let limit = match (limit, allowed) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let spare = self.read_buf.capacity() - self.read_buf.len();
        match limit {
            Some(needed) if spare == 0 || spare < needed.min(READ_CHUNK / 2) => self
                .read_buf
                .reserve(needed.min((2 * self.read_buf.len()).max(LARGE_FRAME_START))),
            Some(_) => {}
            None if spare == 0 || (self.read_grown && spare < READ_CHUNK / 2) => {
                // Until a read fills it, the first buffer is small (see `FIRST_READ`).
                let first = self.read_buf.capacity() == 0 && !self.read_grown;
                self.read_buf
                    .reserve(if first { FIRST_READ } else { READ_CHUNK });
            }
            None => {}
        }
        let spare = self.read_buf.capacity() - self.read_buf.len();
        let result = match limit {
            Some(needed) => tokio_util::io::poll_read_buf(
                Pin::new(&mut self.io),
                cx,
                &mut (&mut self.read_buf).limit(needed),
            ),
            None => tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read_buf),
        };
        match result {
            Poll::Pending => ReadOutcome::Nothing,
            Poll::Ready(Ok(0)) => {
                self.read_open = false;
                ReadOutcome::Eof
            }
            Poll::Ready(Ok(n)) => {
                if let Some(bucket) = &mut self.receive_bucket {
                    bucket.take(n as u64);
                }
                self.read_grown |= n == spare;
                // Less than asked for: the read took everything the socket had.
                self.read_drained = n < limit.map_or(spare, |needed| needed.min(spare));
                ReadOutcome::Data
            }
            Poll::Ready(Err(e)) => {
                self.read_open = false;
                ReadOutcome::Failed(e)
            }
        }
    }

    /// Writes and flushes; returns whether any progress was made, or the error. `last`:
    /// the connection is closed, and the write side is shut down once this is written.
    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        now: Instant,
        last: bool,
    ) -> Result<bool, io::Error> {
        let mut progress = false;
        if self.write_buf.len() > KEEP_BUFFER {
            self.large_output(now);
        }
        if last && !self.shutdown && self.send_bucket.is_none() && !self.write_buf.is_empty() {
            match self.io.write_last(&self.write_buf) {
                Some(Ok(n)) => {
                    self.write_buf.advance(n);
                    self.need_flush = true;
                    progress = n > 0;
                }
                Some(Err(e)) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                _ => {}
            }
        }
        while !self.write_buf.is_empty() {
            let mut len = self.write_buf.len();
            if let Some(bucket) = &mut self.send_bucket {
                match bucket.available(now) {
                    0 => {
                        self.throttled_until = Some(bucket.ready_at(now, len as u64));
                        return Ok(progress);
                    }
                    n => len = len.min(usize::try_from(n).unwrap_or(usize::MAX)),
                }
            }
            match Pin::new(&mut self.io).poll_write(cx, &self.write_buf[..len]) {
                Poll::Pending => return Ok(progress),
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    if let Some(bucket) = &mut self.send_bucket {
                        bucket.take(n as u64);
                    }
                    self.write_buf.advance(n);
                    self.need_flush = true;
                    progress = true;
                }
                Poll::Ready(Err(e)) => return Err(e),
            }
        }
        // After `advance`, `capacity` is the room left beyond the bytes written.
        if self.write_buf.capacity() > KEEP_BUFFER {
            self.free_or_keep_write_buf();
        }
        self.flush(cx)?;
        Ok(progress)
    }

    /// Output above [`KEEP_BUFFER`] is being written: the output buffers are kept until
    /// [`KEEP_LARGE_FOR`] after the last.
    #[cold]
    #[inline(never)]
    fn large_output(&mut self, now: Instant) {
        self.write_buf_release = Some(now + KEEP_LARGE_FOR);
    }

    /// The written-out write buffer has more than [`KEEP_BUFFER`] of room left: frees it,
    /// unless large output goes on and no more than [`KEEP_LARGE_WRITE_BUFFER`] was left
    /// (then it goes back to the protocol for its sends at the next `take_output`).
    /// (Counting the written bytes' room back in, with `try_reclaim`, and keeping by that
    /// instead made the faults come back: BENCHMARKS.md.)
    #[cold]
    #[inline(never)]
    fn free_or_keep_write_buf(&mut self) {
        if self.write_buf_release.is_none() || self.write_buf.capacity() > KEEP_LARGE_WRITE_BUFFER {
            self.write_buf = BytesMut::new();
        }
    }

    /// The connection wrote no large output for [`KEEP_LARGE_FOR`]: frees the output
    /// buffers, or looks again later if output waits.
    #[cold]
    #[inline(never)]
    fn release_output_buffers(&mut self, now: Instant) {
        if !self.write_buf.is_empty() {
            self.write_buf_release = Some(now + KEEP_LARGE_FOR);
            return;
        }
        self.write_buf_release = None;
        self.write_buf = BytesMut::new();
        self.shared.lock().proto.free_output_buffer();
    }

    fn flush(&mut self, cx: &mut Context<'_>) -> Result<(), io::Error> {
        if self.need_flush {
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Pending => {}
                Poll::Ready(Ok(())) => self.need_flush = false,
                Poll::Ready(Err(e)) => return Err(e),
            }
        }
        Ok(())
    }

    /// Holds our hello back for up to [`HOLD_ROUNDS`] rounds of the scheduler when it
    /// answers a hello that came with messages (PROTOCOL.md §4): the application then
    /// usually answers them before the driver runs again, and hello and answer leave in one
    /// write (one segment, one wake-up of the peer) instead of two. Any output the
    /// application queued ends the hold at once, and it ends after the last round whether
    /// or not the application answered.
    ///
    /// - The first rounds: the driver wakes itself, which puts it at the back of the run
    ///   queue, behind the tasks of the runtime it woke (the application's receiving task,
    ///   or an accept loop that spawns one: two hops). This costs one poll of the driver.
    /// - The last round, when the application's task was not ahead of it (a task of a
    ///   `LocalSet` or the `block_on` future, which a current-thread runtime polls only
    ///   once its run queue is empty, or a task on another worker): the driver defers
    ///   itself as `tokio::task::yield_now` does, so it runs again after the runtime polled
    ///   its I/O and its `block_on` future. That costs a zero-timeout `epoll_wait`, which
    ///   is why it is not the first resort.
    ///
    /// Returns true when the driver is to return `Pending` now.
    fn hold_hello(&mut self, cx: &mut Context<'_>, closed: bool) -> bool {
        let Some(len) = self.held else {
            return false;
        };
        if closed || self.write_buf.len() != len || self.hold_rounds == HOLD_ROUNDS {
            self.held = None;
            return false;
        }
        if self.shared.attach_pending.load(Ordering::Acquire) {
            // A future attached to the connection's task (the application's receive loop)
            // is polled next in this poll of the task, and the driver again after it
            // (`Task`): no round of the scheduler to wait for.
            return true;
        }
        if self.own_waker.is_some() {
            // A future is attached and was polled in this task since it was taken (or
            // since the hello came, when `on_accept` attached it): what it answered at
            // once was queued and is in this write; the rest may take long. (One attached
            // before the hello came, and not woken by it yet, misses the one write: the
            // hello leaves alone, as without a hold.)
            self.held = None;
            return false;
        }
        self.hold_rounds += 1;
        if self.hold_rounds < HOLD_ROUNDS {
            cx.waker().wake_by_ref();
        } else {
            // The first poll of `yield_now` defers the waker and returns `Pending`.
            let _ = pin!(tokio::task::yield_now()).poll(cx);
        }
        true
    }

    /// Applies a throttle the application set (buckets start full).
    fn apply(&mut self, throttle: Throttle, now: Instant) {
        let bucket = |current: &Option<Bucket>, rate: Option<Rate>| match (current, rate) {
            (Some(b), Some(r)) if b.rate() == r => None,
            (_, r) => Some(r.map(|r| Bucket::new(r, now))),
        };
        if let Some(b) = bucket(&self.send_bucket, throttle.send) {
            self.send_bucket = b;
        }
        if let Some(b) = bucket(&self.receive_bucket, throttle.receive) {
            self.receive_bucket = b;
        }
        self.throttle = throttle;
    }
}

impl<S: Transport> Driver<S> {
    fn finish(&mut self) {
        self.done = true;
        // Before the socket closes (when the driver is dropped, after this): its own
        // address, if not asked for yet, is asked now only if a handle is left to ask.
        self.shared
            .local
            .release(Arc::strong_count(&self.shared) > 1);
        let mut inner = self.shared.lock();
        if inner.cause.is_none() {
            inner
                .proto
                .handle_transport_closed(CloseCause::io(io::Error::other(
                    "connection task stopped",
                )));
        }
        let mut wake = inner.pump(self.shared.id);
        inner.finished = true;
        inner.driver = None;
        // The driver's buffers go with it (below): `buffered` no longer counts them.
        inner.read_buffer = 0;
        inner.output_buffer = 0;
        inner.proto.free_output_buffer();
        // Only a rejection needs the cause here (a peer's close reason is a `String`).
        let cause = self.handoff.as_ref().and_then(|_| inner.cause.clone());
        drop(inner);
        wake.state = true;
        self.shared.notify(wake);
        // A connection that ended before its handshake completed is a rejection.
        if let (Some((handoff, conn)), Some(cause)) = (self.handoff.take(), cause) {
            handoff.complete(conn, Err(cause), None);
        }
        self.read_buf = BytesMut::new();
        self.write_buf = BytesMut::new();
    }
}

impl<S: Transport> Future for Driver<S> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(());
        }
        // The rounds of a held hello after the first (see `hold_hello`): while the
        // connection is open and the application queued nothing, the round ends here,
        // without a read or a pass of the protocol; anything else runs the full round.
        if this.held.is_some() && this.hold_rounds > 0 {
            let quiet = {
                let inner = this.shared.lock();
                inner.proto.is_open()
                    && !inner.proto.has_output()
                    && inner.throttle == this.throttle
            };
            if quiet && this.hold_hello(cx, false) {
                return Poll::Pending;
            }
        }
        for _ in 0..DRIVER_BUDGET {
            let now = Instant::now();
            let mut progress = false;
            this.throttled_until = None;
            let read = this.poll_read(cx, now);
            let read_nothing = matches!(read, ReadOutcome::Nothing);
            let mut handoff = None;

            // Everything that needs the protocol, under one lock.
            let (closed, io_failed, keepalive_failed, deadline, wake, new_throttle, peer_closed) = {
                let mut inner = this.shared.lock();
                let waker = this.own_waker.as_ref().unwrap_or(cx.waker());
                if !inner.driver.as_ref().is_some_and(|w| w.will_wake(waker)) {
                    inner.driver = Some(waker.clone());
                }
                inner.clock = now.into_std();
                let new_throttle = (inner.throttle != this.throttle).then_some(inner.throttle);
                match read {
                    ReadOutcome::Nothing => {}
                    ReadOutcome::Data => {
                        progress = true;
                        inner.proto.handle_input(now.into_std(), &mut this.read_buf);
                        // A buffer grown for a large frame is not reused once that frame
                        // was split off: later small messages would keep it alive.
                        if this.read_buf.is_empty() && this.read_buf.capacity() > 2 * READ_CHUNK {
                            this.read_buf = BytesMut::new();
                        }
                    }
                    // After a close (the usual case) the protocol has no use for the cause:
                    // do not build it (two allocations).
                    ReadOutcome::Eof if inner.proto.is_closed() => progress = true,
                    ReadOutcome::Eof => {
                        progress = true;
                        inner
                            .proto
                            .handle_transport_closed(CloseCause::io(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "peer closed the connection without a close frame",
                            )));
                    }
                    ReadOutcome::Failed(e) => {
                        progress = true;
                        inner.proto.handle_transport_closed(CloseCause::io(e));
                    }
                }
                if inner
                    .proto
                    .poll_timeout()
                    .is_some_and(|t| t <= now.into_std())
                {
                    inner.proto.handle_timeout(now.into_std());
                }
                inner.proto.take_output(&mut this.write_buf);
                if this.answering && inner.proto.is_open() {
                    // Our hello answers the peer's. If messages came with it, give the
                    // application a moment to answer them (see `hold_hello`).
                    this.answering = false;
                    if inner.proto.messages_received() > 0 {
                        this.held = Some(this.write_buf.len());
                    }
                }
                inner.proto.handle_written(this.write_buf.len());
                inner.read_buffer = this.read_buf.capacity();
                inner.output_buffer = this.write_buf.len();
                let wake = inner.pump(this.shared.id);
                if this.handoff.is_some() {
                    handoff = match &inner.cause {
                        // The handshake completed, even if the connection closed since (a
                        // client's hello, early messages and close frame in one read): the
                        // application gets it, and the messages that came before the close.
                        _ if inner.connected => Some(Ok(())),
                        Some(cause) => Some(Err(cause.clone())),
                        None => None,
                    };
                }
                let io_failed = matches!(inner.cause, Some(CloseCause::Io(_)));
                let keepalive_failed = matches!(inner.cause, Some(CloseCause::KeepaliveTimeout));
                let peer_closed = matches!(inner.cause, Some(CloseCause::Peer { .. }));
                let deadline = inner.proto.poll_timeout().map(Instant::from_std);
                (
                    inner.proto.is_closed(),
                    io_failed,
                    keepalive_failed,
                    deadline,
                    wake,
                    new_throttle,
                    peer_closed,
                )
            };
            if let Some(throttle) = new_throttle {
                this.apply(throttle, now);
                progress = true;
            }
            this.shared.notify(wake);
            if let Some(result) = handoff {
                if let Some((handoff, conn)) = this.handoff.take() {
                    handoff.complete(conn, result, this.permit.clone());
                }
            }

            if io_failed {
                // Output left to the kernel (a peer that ended its side without a close
                // frame and reads nothing) is dropped with the connection, not left to an
                // orphaned socket the peer can keep alive.
                if !this.write_buf.is_empty() || !this.io.all_sent() {
                    this.io.abort();
                }
                this.finish();
                return Poll::Ready(());
            }
            if this.hold_hello(cx, closed) {
                return Poll::Pending;
            }
            match this.poll_write(cx, now, closed) {
                Ok(p) => {
                    progress |= p;
                    // Output held back by our own send throttle is not the peer's stall.
                    let throttled = this.throttled_until.is_some() && this.send_bucket.is_some();
                    this.stalled_since = match this.stalled_since {
                        _ if p || throttled || this.write_buf.is_empty() => None,
                        since => Some(since.unwrap_or(now)),
                    };
                }
                Err(e) => {
                    this.shared
                        .lock()
                        .proto
                        .handle_transport_closed(CloseCause::io(e));
                    this.finish();
                    return Poll::Ready(());
                }
            }

            let stall_deadline = this
                .stalled_since
                .zip(this.stall_limit)
                .map(|(since, limit)| since + limit);
            let (closed, keepalive_failed) = match stall_deadline {
                Some(at) if !closed && now >= at => {
                    tracing::debug!(
                        unsent = this.write_buf.len(),
                        "closing connection: the peer took none of our output in time"
                    );
                    let mut inner = this.shared.lock();
                    inner.proto.handle_output_stalled();
                    let wake = inner.pump(this.shared.id);
                    drop(inner);
                    this.shared.notify(wake);
                    (true, true)
                }
                _ => (closed, keepalive_failed),
            };

            if closed {
                // A peer that stopped answering pings will not acknowledge a close either.
                let linger = *this.linger_deadline.get_or_insert(
                    now + if keepalive_failed {
                        Duration::ZERO
                    } else {
                        this.linger
                    },
                );
                let flushed = this.write_buf.is_empty() && !this.need_flush;
                if now >= linger && !flushed {
                    // The peer did not take our output (or acknowledge the close) in time:
                    // drop it, unsent bytes and all.
                    if !flushed {
                        tracing::debug!(
                            unsent = this.write_buf.len(),
                            "connection aborted: output not flushed within the close linger"
                        );
                    }
                    this.io.abort();
                    this.finish();
                    return Poll::Ready(());
                }
            }
            if closed && this.write_buf.is_empty() && !this.need_flush {
                if this.shutdown && this.read_open && read_nothing && this.io.all_sent() {
                    // Our close frame and end of stream are sent (the shutdown is done, and
                    // the kernel holds nothing unsent) and nothing waits to be read: close
                    // the socket now rather than wait for the peer's end of stream
                    // (PROTOCOL.md §10). Input that still arrives makes the kernel reset
                    // the connection, but after the close frame and the FIN it sent, which
                    // the peer reads first; waiting instead costs a wake-up when the
                    // peer's FIN arrives (measured: one context switch per short
                    // connection with both ends on one core). With output unsent (a peer
                    // that does not read) the drain and the linger go on as before, so
                    // that the abort at the linger frees what the kernel holds.
                    this.finish();
                    return Poll::Ready(());
                }
                let linger = this.linger_deadline.unwrap_or(now);
                if peer_closed && this.read_open && !this.eof_probed {
                    // The peer's close frame and its end of stream often arrive together:
                    // read once more before shutting down. Where the end of stream is
                    // there, closing the socket ends ours as well as a shutdown would (the
                    // peer sends nothing after its close, so nothing unread can turn it
                    // into a reset), one system call less. Where the socket already
                    // reported it (and the last read emptied the socket), that read is
                    // not needed either: it would return the end of stream.
                    this.eof_probed = true;
                    progress = true;
                    if this.read_drained && this.io.read_closed() {
                        this.read_open = false;
                    }
                } else if !this.shutdown && (this.read_open || this.io.shutdown_after_eof()) {
                    match Pin::new(&mut this.io).poll_shutdown(cx) {
                        Poll::Ready(_) => {
                            this.shutdown = true;
                            progress = true;
                        }
                        Poll::Pending => {}
                    }
                }
                // Drain input until the peer hangs up, so that unread data does not turn our
                // close into a reset that could destroy the close frame in flight.
                if !this.read_open && (this.shutdown || !this.io.shutdown_after_eof()) {
                    // The peer ended its side: closing now is fine, but not with our output
                    // still unsent in the kernel (a peer that closed and reads nothing
                    // would keep the orphaned socket and its bytes alive); drop it.
                    if !this.io.all_sent() {
                        this.io.abort();
                    }
                    this.finish();
                    return Poll::Ready(());
                }
                if now >= linger {
                    // The peer did not hang up in time: do not leave the kernel holding on.
                    this.io.abort();
                    this.finish();
                    return Poll::Ready(());
                }
                this.read_buf.clear();
            }

            if !progress {
                let mut deadline = [
                    deadline,
                    this.linger_deadline,
                    this.throttled_until,
                    stall_deadline,
                ]
                .into_iter()
                .flatten()
                .min();
                // Apart, so that connections that never sent large output pay one branch.
                if let Some(release) = this.write_buf_release {
                    if now >= release {
                        this.release_output_buffers(now);
                    }
                    if let Some(release) = this.write_buf_release {
                        deadline = Some(deadline.map_or(release, |d| d.min(release)));
                    }
                }
                if let Some(mut deadline) = deadline {
                    if let Some(first) = this.first_wake.take() {
                        deadline = deadline.min(first);
                    }
                    // Deadlines mostly move later (keepalive after every frame received), so
                    // the timer only moves earlier; if it fires early, nothing is due and
                    // the next round arms the later deadline.
                    if this.sleep_deadline.is_none_or(|armed| deadline < armed) {
                        this.sleep.as_mut().reset(deadline);
                        this.sleep_deadline = Some(deadline);
                    }
                    if this.sleep.as_mut().poll(cx).is_ready() {
                        this.sleep_deadline = None;
                        continue;
                    }
                }
                if this.read_buf.is_empty() && this.read_buf.capacity() > KEEP_BUFFER {
                    this.read_buf = BytesMut::new();
                }
                return Poll::Pending;
            }
        }
        // Out of budget: let other tasks run, then continue.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<S: Transport> Drop for Driver<S> {
    fn drop(&mut self) {
        if !self.done {
            // The runtime is shutting down or the task was aborted: report it.
            self.finish();
        }
    }
}

/// How many times one poll of a connection's task goes back and forth between its driver
/// and its attached future before it lets other tasks run.
const TASK_ROUNDS: usize = 16;

/// A connection's task: its [`Driver`], and the future attached to the connection
/// ([`Connection::attach`]) once there is one.
///
/// Without an attached future a poll is the driver's poll. With one, the two are polled
/// in turn with wakers of their own ([`joint`](crate::joint)): the driver first, then the
/// attached future if it was woken (by the messages the driver delivered, typically), then
/// the driver again if the attached future queued output, and so on, within one poll of
/// the task. The driver is dropped (and with it the socket) as soon as it ends; the task
/// ends when the attached future ends too.
struct Task<S: Transport> {
    driver: Driving<S>,
    attached: Option<(Attached, crate::joint::Signals)>,
    /// The attached future is to be polled in the next poll of the task (it was woken,
    /// or the previous poll ran out of rounds).
    attached_due: bool,
    /// The task ended (`end`): later attachments get tasks of their own.
    ended: bool,
}

/// A connection's driver, or the connection's state once the driver ended. The task holds
/// no reference of its own to that state while the driver runs: the driver counts the
/// references left when it ends, to tell whether a handle may still ask the socket's
/// address (`Driver::finish`).
// The driver inline (the task is boxed once when spawned): a box of its own would be an
// allocation per connection, for 8 bytes saved after the driver ended.
#[allow(clippy::large_enum_variant)]
enum Driving<S: Transport> {
    Yes(Driver<S>),
    Ended(Arc<Shared>),
}

impl<S: Transport> Task<S> {
    fn new(driver: Driver<S>) -> Self {
        Task {
            driver: Driving::Yes(driver),
            attached: None,
            attached_due: false,
            ended: false,
        }
    }

    fn shared(&self) -> &Arc<Shared> {
        match &self.driver {
            Driving::Yes(driver) => &driver.shared,
            Driving::Ended(shared) => shared,
        }
    }

    fn driver(&mut self) -> Option<&mut Driver<S>> {
        match &mut self.driver {
            Driving::Yes(driver) => Some(driver),
            Driving::Ended(_) => None,
        }
    }

    /// Takes a future waiting to be attached, if any.
    fn take_attachment(&mut self) -> bool {
        // A load first: this runs on every poll, and a swap writes the cache line.
        let pending = &self.shared().attach_pending;
        if !pending.load(Ordering::Acquire) || !pending.swap(false, Ordering::AcqRel) {
            return false;
        }
        let shared = self.shared().clone();
        let mut inner = shared.lock();
        if let Attachment::Waiting(future) =
            std::mem::replace(&mut inner.attachment, Attachment::Taken)
        {
            let signals = crate::joint::Signals::new();
            if let Some(driver) = self.driver() {
                // Registered now, not at the driver's next round: what the attached future
                // sends in its first poll marks the driver instead of waking the task.
                let waker = signals.driver_waker();
                if inner.driver.is_some() {
                    inner.driver = Some(waker.clone());
                }
                driver.own_waker = Some(waker);
            }
            drop(inner);
            self.attached = Some((future, signals));
            self.attached_due = true;
            return true;
        }
        false
    }

    /// Whether the task ends (driver and attached future both ended): true unless a
    /// future was attached meanwhile, which is then taken.
    fn end(&mut self) -> bool {
        let shared = self.shared().clone();
        let mut inner = shared.lock();
        match std::mem::replace(&mut inner.attachment, Attachment::Ended) {
            Attachment::Waiting(future) => {
                inner.attachment = Attachment::Taken;
                drop(inner);
                shared.attach_pending.store(false, Ordering::Release);
                self.attached = Some((future, crate::joint::Signals::new()));
                self.attached_due = true;
                false
            }
            _ => {
                self.ended = true;
                true
            }
        }
    }
}

impl<S: Transport> Drop for Task<S> {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        // Dropped before it ended (the runtime shut down, or the task was aborted): a
        // future still waiting to be taken would keep a handle to the connection inside
        // the connection's own state, and with it the connection, for ever.
        let shared = self.shared().clone();
        let waiting = std::mem::replace(&mut shared.lock().attachment, Attachment::Ended);
        drop(waiting);
    }
}

thread_local! {
    /// The id of the connection whose task this thread polls (0: none), so that
    /// [`Connection::attach`] called from within it (a server's `on_accept`, called by the
    /// driver) does not wake the task it runs in.
    static POLLING: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Sets [`POLLING`] for one poll of a connection's task.
struct Polling(u64);

impl Polling {
    fn enter(id: u64) -> Self {
        Polling(POLLING.with(|p| p.replace(id)))
    }
}

impl Drop for Polling {
    fn drop(&mut self) {
        POLLING.with(|p| p.set(self.0));
    }
}

impl<S: Transport> Future for Task<S> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let id = this.shared().id;
        let _polling = Polling::enter(id);
        let mut run_driver = true;
        for _ in 0..TASK_ROUNDS {
            if let Some((_, signals)) = &mut this.attached {
                signals.enter(cx.waker());
            }
            if run_driver {
                if let Some(driver) = this.driver() {
                    if Pin::new(&mut *driver).poll(cx).is_ready() {
                        // Ended: its socket closes now, whatever the attached future does.
                        let shared = driver.shared.clone();
                        this.driver = Driving::Ended(shared);
                    }
                }
            }
            // A future attached just now has its first poll next, and the driver then
            // gets another round (a held hello waits for it: see `hold_hello`).
            let taken = this.take_attachment();
            let mut attached_done = false;
            if let Some((future, signals)) = &mut this.attached {
                if std::mem::take(&mut this.attached_due) | signals.attached.take() {
                    let waker = signals.attached_waker();
                    let mut acx = Context::from_waker(&waker);
                    let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        future.as_mut().poll(&mut acx)
                    }));
                    attached_done = match polled {
                        Ok(poll) => poll.is_ready(),
                        Err(_) => {
                            // Not the connection's fault: it goes on without the future.
                            tracing::error!(
                                target: "chatter_core::connection",
                                connection = id,
                                "a future attached to the connection panicked"
                            );
                            true
                        }
                    };
                }
            }
            // Left before the attached future may go: its wakers must wake the task from
            // now on (the driver's is registered with the connection until its next round).
            let (driver_woken, attached_woken) = match &this.attached {
                Some((_, signals)) => signals.leave(),
                None => (false, false),
            };
            if attached_done {
                this.attached = None;
                if let Some(driver) = this.driver() {
                    driver.own_waker = None;
                }
            }
            if matches!(this.driver, Driving::Ended(_)) && this.attached.is_none() {
                if this.end() {
                    return Poll::Ready(());
                }
                continue;
            }
            if !driver_woken && !attached_woken && !taken {
                return Poll::Pending;
            }
            run_driver = driver_woken || taken;
            this.attached_due = attached_woken;
        }
        // Out of rounds: let other tasks run, then go on where this poll stopped.
        this.attached_due = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Rate, Throttle};

    /// Two connections over an in-memory pipe, handshaken.
    async fn pair(a: &Options, b: &Options) -> (Connection, Connection) {
        let (x, y) = tokio::io::duplex(64 * 1024);
        let name = |s: &str| LazyAddress::ready(Address::Unix { path: s.into() });
        let a = Connection::start(x, (name("a"), name("b")), None, a, Side::Connecting);
        let side = Side::Accepting {
            permit: None,
            handoff: None,
        };
        let b = Connection::start(y, (name("b"), name("a")), None, b, side);
        a.handshake().await.expect("handshake");
        b.handshake().await.expect("handshake");
        (a, b)
    }

    /// A transport that records the bytes of each write.
    struct Recording {
        io: tokio::io::DuplexStream,
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    impl AsyncRead for Recording {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Recording {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let result = Pin::new(&mut self.io).poll_write(cx, buf);
            if let Poll::Ready(Ok(n)) = result {
                self.writes.lock().unwrap().push(buf[..n].to_vec());
            }
            result
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    impl Transport for Recording {}

    /// The frames in `bytes`.
    fn frames(bytes: &[u8]) -> Vec<frame::Frame> {
        let mut buf = BytesMut::from(bytes);
        let mut frames = Vec::new();
        while let Some(body) = frame::decode_frame(&mut buf, u32::MAX).unwrap() {
            frames.push(frame::Frame::decode(body).unwrap());
        }
        assert!(buf.is_empty());
        frames
    }

    /// The server's side of PROTOCOL.md §4: nothing before the client's hello; when a
    /// request came with it, the server's hello and its reply leave in one write.
    #[tokio::test(start_paused = true)]
    async fn the_servers_hello_and_first_reply_leave_in_one_write() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let (mut client, y) = tokio::io::duplex(64 * 1024);
        let writes = Arc::new(Mutex::new(Vec::new()));
        let io = Recording {
            io: y,
            writes: writes.clone(),
        };
        let name = |s: &str| LazyAddress::ready(Address::Unix { path: s.into() });
        let side = Side::Accepting {
            permit: None,
            handoff: None,
        };
        let server = Connection::start(io, (name("s"), name("c")), None, &Options::default(), side);
        let app = tokio::spawn(async move {
            let request = server.receive().await.expect("request");
            let reply = SendOptions::new().conversation(request.conversation);
            server.send_bytes(b"\x05", reply).await.expect("reply");
            server
        });
        tokio::task::yield_now().await;
        assert!(writes.lock().unwrap().is_empty(), "the server spoke first");

        // The client's hello and an early request, in one write.
        let now = std::time::Instant::now();
        let mut proto = Protocol::new(crate::proto::Config::default(), now);
        let request = SendArgs {
            last: false,
            ..SendArgs::new()
        };
        proto.send(now, request, b"\x01").unwrap();
        let mut out = BytesMut::new();
        proto.take_output(&mut out);
        client.write_all(&out).await.unwrap();

        let server = app.await.unwrap();
        let mut got = vec![0u8; 256];
        let n = client.read(&mut got).await.unwrap();
        let first = writes.lock().unwrap()[0].clone();
        assert_eq!(&got[..n], &first[..]);
        assert!(
            matches!(
                &frames(&first)[..],
                [frame::Frame::Hello(_), frame::Frame::Message(_, payload)] if payload[..] == [5]
            ),
            "{:?}",
            frames(&first)
        );
        drop(server);
    }

    /// Sends `count` messages of `size` bytes from `from` and returns the virtual time until
    /// `to` received the last one.
    async fn transfer(from: &Connection, to: &Connection, count: usize, size: usize) -> Duration {
        let start = Instant::now();
        let from = from.clone();
        let sender = tokio::spawn(async move {
            for _ in 0..count {
                from.send_bytes(&vec![0u8; size], SendOptions::new())
                    .await
                    .expect("send");
            }
        });
        for _ in 0..count {
            to.receive().await.expect("receive");
        }
        sender.await.expect("sender");
        start.elapsed()
    }

    /// What `count` one-shot messages of `size` bytes (ids below 128) take on the wire.
    fn wire_bytes(count: usize, size: usize) -> f64 {
        // Prefix, fixarray, kind, id, first, flags, and a bin-free raw payload.
        (count * (4 + 5 + size)) as f64
    }

    fn assert_near(elapsed: Duration, expected: f64) {
        let got = elapsed.as_secs_f64();
        assert!(
            got >= expected * 0.97 && got <= expected * 1.03 + 0.005,
            "took {got:.4} s, expected about {expected:.4} s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_send_throttle_holds_its_rate_after_the_burst() {
        let rate = Rate::new(200_000).burst(20_000);
        let throttled = Options::default().throttle(Throttle {
            send: Some(rate),
            receive: None,
        });
        let (a, b) = pair(&throttled, &Options::default()).await;
        let elapsed = transfer(&a, &b, 100, 10_000).await;
        // The burst left after the hello goes at once, the rest at the rate.
        assert_near(elapsed, (wire_bytes(100, 10_000) - 20_000.0) / 200_000.0);
        // The other direction is not limited.
        let back = transfer(&b, &a, 100, 10_000).await;
        assert!(back < Duration::from_millis(5), "{back:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_receive_throttle_slows_the_peer_down() {
        let rate = Rate::new(500_000).burst(16 * 1024);
        let throttled = Options::default().throttle(Throttle {
            send: None,
            receive: Some(rate),
        });
        let (a, b) = pair(&Options::default(), &throttled).await;
        let elapsed = transfer(&a, &b, 200, 5_000).await;
        assert_near(
            elapsed,
            (wire_bytes(200, 5_000) - 16.0 * 1024.0) / 500_000.0,
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttle_changes_at_run_time() {
        let (a, b) = pair(&Options::default(), &Options::default()).await;
        let free = transfer(&a, &b, 50, 10_000).await;
        assert!(free < Duration::from_millis(5), "{free:?}");

        let rate = Rate::new(1_000_000).burst(10_000);
        a.set_throttle(Throttle {
            send: Some(rate),
            receive: None,
        });
        assert_eq!(a.throttle().send, Some(rate));
        let slow = transfer(&a, &b, 50, 10_000).await;
        assert_near(slow, (wire_bytes(50, 10_000) - 10_000.0) / 1_000_000.0);

        a.set_throttle(Throttle::NONE);
        let again = transfer(&a, &b, 50, 10_000).await;
        assert!(again < Duration::from_millis(5), "{again:?}");
    }

    /// The output buffers grown for large messages are kept while those go on (glibc would
    /// trim and fault their pages back each time) and freed once the connection is quiet.
    #[tokio::test(start_paused = true)]
    async fn large_output_buffers_are_kept_while_used_and_freed_when_quiet() {
        let (a, b) = pair(&Options::default(), &Options::default()).await;
        transfer(&a, &b, 1, 100_000).await;
        let kept = a.buffered().output_room;
        assert!(kept > 0, "{:?}", a.buffered());
        // Another large message within `KEEP_LARGE_FOR` postpones the release; small ones
        // do not.
        tokio::time::sleep(KEEP_LARGE_FOR / 2).await;
        assert_eq!(a.buffered().output_room, kept);
        transfer(&a, &b, 1, 100_000).await;
        tokio::time::sleep(KEEP_LARGE_FOR * 3 / 4).await;
        assert!(a.buffered().output_room > 0, "{:?}", a.buffered());
        transfer(&a, &b, 10, 1_000).await;
        tokio::time::sleep(KEEP_LARGE_FOR / 2).await;
        assert_eq!(a.buffered().output_room, 0);

        // However large, they go once the connection is quiet.
        transfer(&a, &b, 1, 4 * KEEP_LARGE_WRITE_BUFFER).await;
        assert!(a.buffered().output_room > 0, "{:?}", a.buffered());
        tokio::time::sleep(KEEP_LARGE_FOR + Duration::from_millis(1)).await;
        assert_eq!(a.buffered().output_room, 0);
        assert_eq!(a.buffered().output, 0);
    }
}
