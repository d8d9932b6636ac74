//! Remote objects: the [`Service`] trait that generated `{Trait}Server` adapters implement,
//! and the dispatch types they return.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio_util::sync::ReusableBoxFuture;

use crate::error::RemoteContext;
use crate::values::{Receivable, Sendable};
use crate::wire::{self, FailureKind, Payload};

/// An object that can be registered on a [`Peer`](crate::Peer) and called remotely.
///
/// `#[remote]` implements it for the generated `{Trait}Server<T>`; you do not implement it
/// by hand.
pub trait Service: Send + Sync + 'static {
    /// Decodes the arguments of `method` (its name as it arrived: bytes, matched against
    /// the trait's method names), puts the handler to run in `handlers` and says which
    /// kind it is.
    #[doc(hidden)]
    fn __dispatch(&self, method: &[u8], args: &[u8], handlers: &mut Handlers) -> Dispatch;

    /// What `#[remote]` recorded about the trait this object serves, for introspection
    /// ([`crate::introspect`]); `None` for a service without one.
    fn description(&self) -> Option<&'static crate::introspect::InterfaceDescription> {
        None
    }

    /// The shapes of the types [`description`](Self::description) names, traced on the
    /// first call ([`introspect::describe`](crate::introspect::describe) calls it).
    #[doc(hidden)]
    fn __shapes(&self) -> Option<&'static crate::introspect::shape::ShapeList> {
        None
    }
}

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A boxed, sendable future whose allocation is reused by the next future of the same
/// size (what handlers are run as).
pub(crate) type HandlerFuture<T> = ReusableBoxFuture<'static, T>;

/// What a [`Service`] returns for one incoming call or signal. Built by generated code.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dispatch {
    /// A call handler is in [`Handlers`]; it resolves to the encoded reply.
    Call,
    /// A signal handler is in [`Handlers`].
    Signal,
    /// A handler of a method with a stream (an argument or result of type
    /// [`stream::Receiver`](crate::stream::Receiver)) is in [`Handlers`]; it resolves to a
    /// [`StreamReply`].
    Stream,
    /// The object has no such method.
    NoSuchMethod,
    /// The arguments did not decode.
    BadArguments(String),
}

/// Where [`Service::__dispatch`] puts the handler it starts: one box for calls and one for
/// signals, each reused by the next handler of the same size. The receive task keeps one
/// for the handlers it runs inline, so a handler that completes on its first poll (most
/// do) costs no allocation; a handler that waits takes its box along
/// ([`take_call`](Self::take_call)) and the next one allocates anew.
#[doc(hidden)]
pub struct Handlers {
    call: HandlerFuture<Payload>,
    signal: HandlerFuture<()>,
    /// The stream handler and the call's stream set-up, only for stream calls. Boxed and
    /// optional: the receive task keeps a `Handlers` in its future, which must stay small.
    stream: Option<Box<crate::stream::StreamParts>>,
}

impl Handlers {
    /// Empty boxes (no allocation until the first handler).
    pub fn new() -> Self {
        Handlers {
            call: ReusableBoxFuture::new(std::future::pending()),
            signal: ReusableBoxFuture::new(std::future::pending()),
            stream: None,
        }
    }

    /// Puts the handler of a method with a stream in place; returns [`Dispatch::Stream`].
    pub fn stream<F: Future<Output = StreamReply> + Send + 'static>(
        &mut self,
        handler: F,
    ) -> Dispatch {
        self.stream.get_or_insert_with(Default::default).handler = Some(Box::pin(handler));
        Dispatch::Stream
    }

    /// The argument stream of the call being dispatched, for a method that takes a
    /// [`stream::Receiver`](crate::stream::Receiver) argument. Called by generated code
    /// while it decodes the arguments; a call that did not come as a stream call gets a
    /// receiver that fails at once with a protocol error.
    pub fn input<T: Receivable + Send + 'static>(&mut self) -> crate::stream::Receiver<T> {
        self.stream.get_or_insert_with(Default::default).input()
    }

    /// The stream handler and set-up, taken out (stream calls only).
    pub(crate) fn take_stream(&mut self) -> Option<Box<crate::stream::StreamParts>> {
        self.stream.take()
    }

    /// Prepares the next dispatch as a stream call's.
    pub(crate) fn set_stream(&mut self, parts: Box<crate::stream::StreamParts>) {
        self.stream = Some(parts);
    }

    /// Puts a call handler in place; returns [`Dispatch::Call`].
    pub fn call<F: Future<Output = Payload> + Send + 'static>(&mut self, handler: F) -> Dispatch {
        self.call.set(handler);
        Dispatch::Call
    }

    /// Puts a signal handler in place; returns [`Dispatch::Signal`].
    pub fn signal<F: Future<Output = ()> + Send + 'static>(&mut self, handler: F) -> Dispatch {
        self.signal.set(handler);
        Dispatch::Signal
    }

    /// The call handler, to poll in place.
    pub(crate) fn call_mut(&mut self) -> &mut HandlerFuture<Payload> {
        &mut self.call
    }

    /// The signal handler, to poll in place.
    pub(crate) fn signal_mut(&mut self) -> &mut HandlerFuture<()> {
        &mut self.signal
    }

    /// Takes the call handler out, leaving an empty box.
    pub(crate) fn take_call(&mut self) -> HandlerFuture<Payload> {
        std::mem::replace(
            &mut self.call,
            ReusableBoxFuture::new(std::future::pending()),
        )
    }

    /// Takes the signal handler out, leaving an empty box.
    pub(crate) fn take_signal(&mut self) -> HandlerFuture<()> {
        std::mem::replace(
            &mut self.signal,
            ReusableBoxFuture::new(std::future::pending()),
        )
    }

    /// Drops handlers that were put in place but will not run (and what they hold).
    pub(crate) fn clear(&mut self) {
        *self = Handlers::new();
    }
}

impl Default for Handlers {
    fn default() -> Self {
        Handlers::new()
    }
}

impl fmt::Debug for Handlers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handlers").finish_non_exhaustive()
    }
}

/// What the handler of a method with a stream resolves to: a reply that ends the call (a
/// value, an application error), or a stream of items that follows the call's opening.
/// Built by generated code.
#[doc(hidden)]
pub struct StreamReply(pub(crate) crate::stream::Reply);

impl StreamReply {
    /// The call ends with this reply (made by [`reply_ok`] or [`reply_app_error`]).
    pub fn reply(payload: Payload) -> StreamReply {
        StreamReply(crate::stream::Reply::Done(payload))
    }

    /// The call opens a result stream: the items of `rx`, each encoded as it is sent.
    pub fn open<T: Sendable + Send + 'static>(rx: crate::stream::Receiver<T>) -> StreamReply {
        StreamReply(crate::stream::Reply::Open(crate::stream::encoded(rx)))
    }
}

impl fmt::Debug for StreamReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            crate::stream::Reply::Done(_) => f.write_str("StreamReply::Done"),
            crate::stream::Reply::Open(_) => f.write_str("StreamReply::Open"),
        }
    }
}

/// Names the parts of a `Result` behind an alias, for `#[result]` methods: the macro
/// cannot see through `type Res<T> = Result<T, E>`, but `<Res<T> as RemoteResult>::Err`
/// is `E`.
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a `Result`",
    label = "#[result] needs a return type that is a `Result` (or an alias of one)",
    note = "remove #[result] to send this type as a plain return value"
)]
pub trait RemoteResult {
    /// The `T` of `Result<T, E>`.
    type Ok;
    /// The `E` of `Result<T, E>`: the application error.
    type Err;
}

impl<T, E> RemoteResult for Result<T, E> {
    type Ok = T;
    type Err = E;
}

/// Encodes a successful return value.
#[doc(hidden)]
pub fn reply_ok<T: Sendable + ?Sized>(value: &T) -> Payload {
    wire::encode_ok(value).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot encode a reply");
        wire::encode_failure(FailureKind::Protocol, &format!("callee: {e}"))
    })
}

/// Encodes an application error with its context.
#[doc(hidden)]
pub fn reply_app_error<E: Sendable + ?Sized>(error: &E, context: Option<RemoteContext>) -> Payload {
    wire::encode_app_error(error, &context.unwrap_or_default()).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot encode an application error");
        wire::encode_failure(FailureKind::Protocol, &format!("callee: {e}"))
    })
}

/// Autoref specialization: the context of an error value, as rich as its type allows.
/// Generated code calls `(&&&Ctx(&e)).__context()` with all three traits in scope.
#[doc(hidden)]
#[derive(Debug)]
pub struct Ctx<'a, E>(pub &'a E);

/// Picked for `E: std::error::Error`: message and source chain.
#[doc(hidden)]
pub trait CtxError {
    fn __context(&self) -> Option<RemoteContext>;
}
impl<E: std::error::Error> CtxError for &&Ctx<'_, E> {
    fn __context(&self) -> Option<RemoteContext> {
        Some(RemoteContext::of(self.0))
    }
}

/// Picked for `E: Display`: the message only.
#[doc(hidden)]
pub trait CtxDisplay {
    fn __context(&self) -> Option<RemoteContext>;
}
impl<E: fmt::Display> CtxDisplay for &Ctx<'_, E> {
    fn __context(&self) -> Option<RemoteContext> {
        Some(RemoteContext {
            message: self.0.to_string(),
            chain: Vec::new(),
        })
    }
}

/// Picked for any other type: no context.
#[doc(hidden)]
pub trait CtxNone {
    fn __context(&self) -> Option<RemoteContext>;
}
impl<E> CtxNone for Ctx<'_, E> {
    fn __context(&self) -> Option<RemoteContext> {
        None
    }
}

/// Runs a future, turning a panic into `Err(message)`.
pub(crate) struct CatchUnwind<F>(pub(crate) F)
where
    F: Future + Unpin;

impl<F: Future + Unpin> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = Pin::new(&mut self.0);
        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(payload) => Poll::Ready(Err(panic_message(payload.as_ref()))),
        }
    }
}

pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(panic payload is not a string)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Plain;

    /// Where the future in a handler box lives.
    fn address<T>(f: &mut HandlerFuture<T>) -> usize {
        let pinned = f.get_pin();
        let future: &(dyn Future<Output = T> + Send) = pinned.as_ref().get_ref();
        future as *const (dyn Future<Output = T> + Send) as *const u8 as usize
    }

    fn poll_now<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        Pin::new(f).poll(&mut Context::from_waker(std::task::Waker::noop()))
    }

    #[test]
    fn a_handler_box_is_reused_by_the_next_handler_of_its_size() {
        let mut handlers = Handlers::new();
        let held = std::sync::Arc::new(());
        let handler = |n: i32| {
            let held = held.clone();
            async move {
                let _held = held;
                reply_ok(&n)
            }
        };
        assert_eq!(handlers.call(handler(1)), Dispatch::Call);
        let first = address(handlers.call_mut());
        let Poll::Ready(reply) = poll_now(handlers.call_mut()) else {
            panic!("the handler completes on its first poll")
        };
        assert_eq!(&reply[..], &b"\x92\x00\x01"[..]);
        // A completed handler has dropped what it held; its box waits for the next one.
        assert_eq!(std::sync::Arc::strong_count(&held), 1);
        handlers.call(handler(2));
        assert_eq!(address(handlers.call_mut()), first, "same size: same box");

        // A handler that waits takes its box along; the next one gets another.
        let taken = handlers.take_call();
        handlers.call(handler(3));
        assert_ne!(address(handlers.call_mut()), first);
        drop(taken);

        // A handler that will not run is dropped with what it holds.
        assert_eq!(std::sync::Arc::strong_count(&held), 2);
        handlers.clear();
        assert_eq!(std::sync::Arc::strong_count(&held), 1);

        assert_eq!(handlers.signal(async {}), Dispatch::Signal);
        assert_eq!(poll_now(handlers.signal_mut()), Poll::Ready(()));
    }

    #[test]
    #[allow(clippy::needless_borrow)] // the borrows select the impl
    fn context_specialization_picks_the_richest() {
        let io = std::io::Error::other("disk on fire");
        assert_eq!((&&&Ctx(&io)).__context().unwrap().message, "disk on fire");
        assert_eq!((&&&Ctx(&"text")).__context().unwrap().message, "text");
        assert!((&&&Ctx(&Plain)).__context().is_none());
    }
}
