//! Remote objects: the [`Service`] trait that generated `{Trait}Server` adapters implement,
//! and the dispatch types they return.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::RemoteContext;
use crate::wire::{self, FailureKind, Payload};

/// An object that can be registered on a [`Peer`](crate::Peer) and called remotely.
///
/// `#[remote]` implements it for the generated `{Trait}Server<T>`; you do not implement it
/// by hand.
pub trait Service: Send + Sync + 'static {
    /// Decodes the arguments of `method` (its name as it arrived: bytes, matched against
    /// the trait's method names) and returns what to run.
    #[doc(hidden)]
    fn __dispatch(&self, method: &[u8], args: &[u8]) -> Dispatch;
}

/// A boxed, sendable future (what handlers are run as).
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What a [`Service`] returns for one incoming call or signal. Built by generated code.
#[doc(hidden)]
pub enum Dispatch {
    /// A call handler; resolves to the encoded reply.
    Call(BoxFuture<Payload>),
    /// A signal handler.
    Signal(BoxFuture<()>),
    /// The object has no such method.
    NoSuchMethod,
    /// The arguments did not decode.
    BadArguments(String),
}

impl fmt::Debug for Dispatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dispatch::Call(_) => f.write_str("Call"),
            Dispatch::Signal(_) => f.write_str("Signal"),
            Dispatch::NoSuchMethod => f.write_str("NoSuchMethod"),
            Dispatch::BadArguments(w) => f.debug_tuple("BadArguments").field(w).finish(),
        }
    }
}

/// Decodes the argument tuple of `method`.
#[doc(hidden)]
pub fn decode_args<A: DeserializeOwned>(method: &str, args: &[u8]) -> Result<A, Dispatch> {
    wire::decode_value(args)
        .map_err(|e| Dispatch::BadArguments(format!("arguments of `{method}`: {e}")))
}

/// Encodes a successful return value.
#[doc(hidden)]
pub fn reply_ok<T: Serialize>(value: &T) -> Payload {
    wire::encode_ok(value).unwrap_or_else(|e| {
        tracing::warn!("cannot encode a reply: {e}");
        wire::encode_failure(FailureKind::Protocol, &format!("callee: {e}"))
    })
}

/// Encodes an application error with its context.
#[doc(hidden)]
pub fn reply_app_error<E: Serialize>(error: &E, context: Option<RemoteContext>) -> Payload {
    wire::encode_app_error(error, &context.unwrap_or_default()).unwrap_or_else(|e| {
        tracing::warn!("cannot encode an application error: {e}");
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
pub(crate) struct CatchUnwind<F>(pub(crate) Pin<Box<F>>)
where
    F: Future + ?Sized;

impl<F: Future + ?Sized> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = self.0.as_mut();
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

    #[test]
    #[allow(clippy::needless_borrow)] // the borrows select the impl
    fn context_specialization_picks_the_richest() {
        let io = std::io::Error::other("disk on fire");
        assert_eq!((&&&Ctx(&io)).__context().unwrap().message, "disk on fire");
        assert_eq!((&&&Ctx(&"text")).__context().unwrap().message, "text");
        assert!((&&&Ctx(&Plain)).__context().is_none());
    }
}
