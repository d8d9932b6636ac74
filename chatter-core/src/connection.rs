//! [`Connection`]: the async handle, and the driver task that moves its bytes.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use crate::error::{CloseCause, CloseCode, ConnectionClosed, DecodeError, SendError};
use crate::proto::{ConversationId, Event as ProtoEvent, Protocol, SendArgs, SendRefused};
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
        }
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
}

impl Msg {
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
            .field("local", &self.shared().local)
            .field("remote", &self.shared().remote)
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
            let mut writable = pin!(shared.writable.notified());
            writable.as_mut().enable();
            match shared.send(payload, options) {
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
        self.next(|inner| {
            let before = events.len();
            while events.len() - before < max {
                match inner.pop_message() {
                    Some(msg) => events.push(Event::Message(msg)),
                    None => break,
                }
            }
            while events.len() - before < max {
                match inner.timeouts.pop_front() {
                    Some(conv) => events.push(Event::Timeout(conv)),
                    None => break,
                }
            }
            let taken = events.len() - before;
            (taken > 0).then_some(taken)
        })
        .await
    }

    /// This side's address.
    pub fn local_address(&self) -> &Address {
        &self.shared().local
    }

    /// The peer's address.
    pub fn remote_address(&self) -> &Address {
        &self.shared().remote
    }

    /// The certificate chain the peer presented (DER, leaf first), on TLS connections
    /// where it presented one; `None` on other transports.
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

    /// Waits until the connection is closed and returns why. Resolves as soon as the
    /// connection stopped working, while the transport may still be shutting down.
    pub async fn closed(&self) -> CloseCause {
        self.wait_state(|inner| inner.cause.clone()).await
    }

    /// Why the connection closed, or `None` while it is open.
    pub fn close_cause(&self) -> Option<CloseCause> {
        self.shared().lock().cause.clone()
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
            // Taking gives credit back, which may queue a window frame. Output that was
            // already queued had its driver wake-up when it was queued (as in `send`).
            let was_idle = !inner.proto.has_output();
            if let Some(item) = take(&mut inner) {
                let wake = inner.driver_wake(was_idle);
                drop(inner);
                if let Some(w) = wake {
                    w.wake();
                }
                return Some(Ok(item));
            }
            inner
                .cause
                .as_ref()
                .map(|cause| Err(ConnectionClosed(cause.clone())))
        };
        // Register for a wake-up only when nothing is ready: under load nothing waits.
        if let Some(result) = attempt() {
            return result;
        }
        loop {
            let mut readable = pin!(shared.readable.notified());
            readable.as_mut().enable();
            if let Some(result) = attempt() {
                return result;
            }
            readable.await;
        }
    }

    /// Starts the driver for an open transport. The returned connection is usable once
    /// [`handshake`](Self::handshake) returned `Ok`.
    pub(crate) fn start<S>(
        io: S,
        (local, remote): (Address, Address),
        peer_certificates: Option<Vec<CertificateDer<'static>>>,
        options: &Options,
    ) -> Self
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let now = Instant::now();
        let id = NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(Shared {
            id,
            local,
            remote,
            peer_certificates,
            inner: Mutex::new(Inner {
                proto: Protocol::new(options.proto.clone(), now.into_std()),
                clock: now.into_std(),
                connection: id,
                messages_seen: 0,
                timeouts: VecDeque::new(),
                driver: None,
                connected: false,
                cause: None,
                finished: false,
            }),
            readable: Notify::new(),
            writable: Notify::new(),
            state_changed: Notify::new(),
        });
        let driver = Driver {
            io,
            shared: shared.clone(),
            read_buf: BytesMut::new(),
            write_buf: BytesMut::new(),
            need_flush: false,
            read_open: true,
            shutdown: false,
            linger: options.close_linger,
            linger_deadline: None,
            sleep: Box::pin(tokio::time::sleep_until(now + FAR_FUTURE)),
            sleep_deadline: None,
            done: false,
        };
        tokio::spawn(driver);
        Connection {
            handle: Arc::new(Handle { shared }),
        }
    }

    /// Waits for the handshake to complete.
    pub(crate) async fn handshake(&self) -> Result<(), CloseCause> {
        self.wait_state(|inner| match &inner.cause {
            Some(cause) => Some(Err(cause.clone())),
            None => inner.connected.then_some(Ok(())),
        })
        .await
    }

    async fn wait_state<R>(&self, mut check: impl FnMut(&Inner) -> Option<R>) -> R {
        let shared = self.shared();
        if let Some(r) = check(&shared.lock()) {
            return r;
        }
        loop {
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

/// Far enough ahead to mean "no deadline" for the driver's sleep.
const FAR_FUTURE: Duration = Duration::from_secs(86400 * 365);

/// How many read/write rounds the driver runs before yielding to other tasks.
const DRIVER_BUDGET: usize = 32;

/// Read in chunks of at least this many bytes.
const READ_CHUNK: usize = 16 * 1024;

/// Buffers above this size are released once empty, so idle connections stay small.
const KEEP_BUFFER: usize = 64 * 1024;

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
    local: Address,
    remote: Address,
    peer_certificates: Option<Vec<CertificateDer<'static>>>,
    inner: Mutex<Inner>,
    /// Messages, timeouts or the close became available.
    readable: Notify,
    /// Flow-control credit arrived (or the connection closed).
    writable: Notify,
    /// Handshake completed, close started, or the driver finished.
    state_changed: Notify,
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
        let m = self.proto.poll_message()?;
        self.proto.release(m.cost);
        Some(Msg {
            conversation: Conversation {
                connection: self.connection,
                id: m.conversation,
            },
            first: m.first,
            last: m.last,
            token: m.token,
            payload: m.payload,
        })
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
        match inner.proto.send(now, args, payload) {
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
/// frame, shuts down its write side and drains input until the peer hangs up or the linger
/// time passes.
struct Driver<S> {
    io: S,
    shared: Arc<Shared>,
    read_buf: BytesMut,
    write_buf: BytesMut,
    need_flush: bool,
    read_open: bool,
    shutdown: bool,
    linger: Duration,
    linger_deadline: Option<Instant>,
    sleep: Pin<Box<Sleep>>,
    sleep_deadline: Option<Instant>,
    done: bool,
}

enum ReadOutcome {
    Nothing,
    Data,
    Eof,
    Failed(io::Error),
}

impl<S: AsyncRead + AsyncWrite + Unpin> Driver<S> {
    fn poll_read(&mut self, cx: &mut Context<'_>) -> ReadOutcome {
        if !self.read_open {
            return ReadOutcome::Nothing;
        }
        if self.read_buf.capacity() - self.read_buf.len() < READ_CHUNK / 2 {
            self.read_buf.reserve(READ_CHUNK);
        }
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read_buf) {
            Poll::Pending => ReadOutcome::Nothing,
            Poll::Ready(Ok(0)) => {
                self.read_open = false;
                ReadOutcome::Eof
            }
            Poll::Ready(Ok(_)) => ReadOutcome::Data,
            Poll::Ready(Err(e)) => {
                self.read_open = false;
                ReadOutcome::Failed(e)
            }
        }
    }

    /// Writes and flushes; returns whether any progress was made, or the error.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Result<bool, io::Error> {
        let mut progress = false;
        while !self.write_buf.is_empty() {
            match Pin::new(&mut self.io).poll_write(cx, &self.write_buf) {
                Poll::Pending => return Ok(progress),
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    self.write_buf.advance(n);
                    self.need_flush = true;
                    progress = true;
                }
                Poll::Ready(Err(e)) => return Err(e),
            }
        }
        if self.write_buf.capacity() > KEEP_BUFFER {
            self.write_buf = BytesMut::new();
        }
        if self.need_flush {
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Pending => {}
                Poll::Ready(Ok(())) => self.need_flush = false,
                Poll::Ready(Err(e)) => return Err(e),
            }
        }
        Ok(progress)
    }
}

impl<S> Driver<S> {
    fn finish(&mut self) {
        self.done = true;
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
        drop(inner);
        wake.state = true;
        self.shared.notify(wake);
        self.read_buf = BytesMut::new();
        self.write_buf = BytesMut::new();
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Future for Driver<S> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(());
        }
        for _ in 0..DRIVER_BUDGET {
            let now = Instant::now();
            let mut progress = false;
            let read = this.poll_read(cx);

            // Everything that needs the protocol, under one lock.
            let (closed, io_failed, keepalive_failed, deadline, wake) = {
                let mut inner = this.shared.lock();
                if !inner
                    .driver
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    inner.driver = Some(cx.waker().clone());
                }
                inner.clock = now.into_std();
                match read {
                    ReadOutcome::Nothing => {}
                    ReadOutcome::Data => {
                        progress = true;
                        inner.proto.handle_input(now.into_std(), &mut this.read_buf);
                    }
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
                let wake = inner.pump(this.shared.id);
                let io_failed = matches!(inner.cause, Some(CloseCause::Io(_)));
                let keepalive_failed = matches!(inner.cause, Some(CloseCause::KeepaliveTimeout));
                let deadline = inner.proto.poll_timeout().map(Instant::from_std);
                (
                    inner.proto.is_closed(),
                    io_failed,
                    keepalive_failed,
                    deadline,
                    wake,
                )
            };
            this.shared.notify(wake);

            if io_failed {
                this.finish();
                return Poll::Ready(());
            }
            match this.poll_write(cx) {
                Ok(p) => progress |= p,
                Err(e) => {
                    this.shared
                        .lock()
                        .proto
                        .handle_transport_closed(CloseCause::io(e));
                    this.finish();
                    return Poll::Ready(());
                }
            }

            if closed && this.write_buf.is_empty() && !this.need_flush {
                // A peer that stopped answering pings will not acknowledge a close either.
                let linger = *this.linger_deadline.get_or_insert(
                    now + if keepalive_failed {
                        Duration::ZERO
                    } else {
                        this.linger
                    },
                );
                if !this.shutdown {
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
                if (this.shutdown && !this.read_open) || now >= linger {
                    this.finish();
                    return Poll::Ready(());
                }
                this.read_buf.clear();
            }

            if !progress {
                let deadline = match (deadline, this.linger_deadline) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                if let Some(deadline) = deadline {
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

impl<S> Drop for Driver<S> {
    fn drop(&mut self) {
        if !self.done {
            // The runtime is shutting down or the task was aborted: report it.
            self.finish();
        }
    }
}
