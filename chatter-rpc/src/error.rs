//! Errors of calls and signals.

use std::convert::Infallible;
use std::fmt;

use chatter_core::CloseCause;

/// Why a remote call failed.
///
/// `E` is the application's error type: the `E` of a method declared as returning
/// `Result<T, E>`. It arrives as the same typed value the callee returned, in
/// [`CallError::App`], together with the callee's [`RemoteContext`]. Everything else is a
/// framework failure with its own variant. Methods that return a plain `T` use
/// `CallError<Infallible>` (the default), which has no app variant to match.
///
/// ```
/// use chatter_rpc::CallError;
///
/// fn describe(err: &CallError<String>) -> String {
///     match err {
///         CallError::App { error, .. } => format!("the calculator said no: {error}"),
///         CallError::DeadlineExceeded => "too slow".into(),
///         other => format!("framework failure: {other}"),
///     }
/// }
/// # assert_eq!(describe(&CallError::DeadlineExceeded), "too slow");
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CallError<E = Infallible> {
    /// The callee's handler returned `Err(error)`.
    #[error("remote error: {remote}")]
    App {
        /// The application error, decoded as the type the method declares.
        error: E,
        /// The callee's description of the error (its `Display` and `source()` chain).
        remote: RemoteContext,
    },
    /// The call's deadline passed before a reply arrived (on either side).
    #[error("deadline exceeded")]
    DeadlineExceeded,
    /// The callee cancelled the call (for example because its peer was shutting down).
    #[error("call cancelled by the callee")]
    Cancelled,
    /// The connection closed before the reply arrived, or was closed when the call started.
    #[error("connection lost: {0}")]
    ConnectionLost(CloseCause),
    /// The callee hosts no object under this name.
    #[error("no such object: `{object}`")]
    NoSuchObject {
        /// The object name the call addressed.
        object: String,
    },
    /// The object has no method with this name.
    #[error("no such method: `{object}.{method}`")]
    NoSuchMethod {
        /// The object name the call addressed.
        object: String,
        /// The method name.
        method: String,
    },
    /// The arguments could not be encoded (here) or decoded (by the callee).
    #[error("bad arguments: {what}")]
    BadArguments {
        /// What failed, for example the decode error with the method name.
        what: String,
    },
    /// The reply could not be decoded as the declared return or error type.
    #[error("bad reply: {what}")]
    BadReply {
        /// What failed.
        what: String,
    },
    /// The callee's handler panicked; the callee keeps serving.
    #[error("remote handler panicked: {message}")]
    RemotePanic {
        /// The panic message.
        message: String,
    },
    /// The peer broke the RPC protocol (a malformed envelope, an unknown error kind, …),
    /// or the request is larger than the callee accepts (its `max_frame_size`, or its
    /// `receive_window` less 64): such a request is not sent, and the connection stays
    /// open.
    #[error("RPC protocol error: {0}")]
    Protocol(String),
    /// A reconnecting [`Peer`](crate::Peer) was not connected and did not
    /// reconnect within the call's deadline (or gave up reconnecting). The request was
    /// never sent.
    #[error("not connected (gave up waiting for a reconnect within the deadline): {last_error}")]
    NotConnected {
        /// Why the last connection or connection attempt failed.
        last_error: String,
    },
    /// The connection was lost after the request was sent and before the reply arrived:
    /// the callee may or may not have run the call. It was not re-sent (calls are at most
    /// once unless the method is `#[idempotent]`).
    #[error("connection lost, outcome unknown: {0}")]
    OutcomeUnknown(CloseCause),
    /// The peer (this side or the callee) is shutting down and takes no new calls.
    #[error("shutting down: the call was refused")]
    ShuttingDown,
    /// The call's metadata (and trace context) is larger than
    /// [`PeerOptions::max_metadata_bytes`](crate::PeerOptions::max_metadata_bytes): this
    /// side's (the call was not sent) or the callee's (it refused the call).
    #[error("metadata too large: {what}")]
    MetadataTooLarge {
        /// The size and the limit, and which side refused.
        what: String,
    },
    /// The callee already serves its `max_streams` stream calls on this connection
    /// ([`PeerOptions::max_streams`](crate::PeerOptions::max_streams)).
    #[error("too many streams: {what}")]
    TooManyStreams {
        /// The callee's message.
        what: String,
    },
    /// The call was routed through a broker (a [`Peer::routed`](crate::Peer::routed)
    /// handle) to a name that no connected peer holds. Nothing ran.
    #[error("no such peer: `{peer}` is not registered with the broker")]
    NoSuchPeer {
        /// The peer name the call addressed.
        peer: String,
    },
    /// The call was routed through a broker and the callee's connection to the broker
    /// closed before it answered: the broker's counterpart of
    /// [`ConnectionLost`](Self::ConnectionLost). The callee may or may not have run it.
    #[error("routed peer lost: {what}")]
    PeerLost {
        /// The broker's message: which peer, and why its connection ended.
        what: String,
    },
    /// The call was routed through a broker to a peer that has as many calls open through
    /// the broker as the broker allows (so that it is never opened more conversations
    /// than it accepts). Nothing ran; trying again later may succeed.
    #[error("routed peer busy: {what}")]
    PeerBusy {
        /// The broker's message: which peer, and the limit.
        what: String,
    },
    /// A broker's access control does not let this peer do this (call that peer,
    /// register that name, publish or subscribe to that topic). Nothing ran.
    #[error("permission denied: {what}")]
    PermissionDenied {
        /// The broker's message: what was denied, and to whom.
        what: String,
    },
}

impl<E> CallError<E> {
    /// The application error, if this is one.
    pub fn app(&self) -> Option<&E> {
        match self {
            CallError::App { error, .. } => Some(error),
            _ => None,
        }
    }

    /// Converts into the application error, if this is one.
    pub fn into_app(self) -> Option<E> {
        match self {
            CallError::App { error, .. } => Some(error),
            _ => None,
        }
    }

    /// True for failures where the callee may or may not have run the handler to completion
    /// (deadline exceeded, connection lost, a routed callee lost): the call's effect is unknown.
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(
            self,
            CallError::DeadlineExceeded
                | CallError::ConnectionLost(_)
                | CallError::OutcomeUnknown(_)
                | CallError::PeerLost { .. }
        )
    }

    /// Converts a framework failure into the same failure with another app error type.
    /// App errors are converted with `f`.
    pub fn map_app<F>(self, f: impl FnOnce(E) -> F) -> CallError<F> {
        match self {
            CallError::App { error, remote } => CallError::App {
                error: f(error),
                remote,
            },
            CallError::DeadlineExceeded => CallError::DeadlineExceeded,
            CallError::Cancelled => CallError::Cancelled,
            CallError::ConnectionLost(c) => CallError::ConnectionLost(c),
            CallError::NoSuchObject { object } => CallError::NoSuchObject { object },
            CallError::NoSuchMethod { object, method } => {
                CallError::NoSuchMethod { object, method }
            }
            CallError::BadArguments { what } => CallError::BadArguments { what },
            CallError::BadReply { what } => CallError::BadReply { what },
            CallError::RemotePanic { message } => CallError::RemotePanic { message },
            CallError::Protocol(m) => CallError::Protocol(m),
            CallError::NotConnected { last_error } => CallError::NotConnected { last_error },
            CallError::OutcomeUnknown(c) => CallError::OutcomeUnknown(c),
            CallError::ShuttingDown => CallError::ShuttingDown,
            CallError::MetadataTooLarge { what } => CallError::MetadataTooLarge { what },
            CallError::TooManyStreams { what } => CallError::TooManyStreams { what },
            CallError::NoSuchPeer { peer } => CallError::NoSuchPeer { peer },
            CallError::PeerLost { what } => CallError::PeerLost { what },
            CallError::PeerBusy { what } => CallError::PeerBusy { what },
            CallError::PermissionDenied { what } => CallError::PermissionDenied { what },
        }
    }
}

/// The callee's description of an application error, like snakeMQ's
/// `__remote_traceback__`: the error's `Display` and the `Display` of each error in its
/// `source()` chain, outermost first.
///
/// The chain is filled when the error type implements [`std::error::Error`]; for types that
/// only implement [`Display`](fmt::Display) it is empty, and for types that implement
/// neither, `message` is empty too.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteContext {
    /// The error's `Display`.
    pub message: String,
    /// The `Display` of each `source()`, outermost first.
    pub chain: Vec<String>,
}

impl fmt::Display for RemoteContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() {
            f.write_str("(no description)")?;
        } else {
            f.write_str(&self.message)?;
        }
        for cause in &self.chain {
            write!(f, ": caused by: {cause}")?;
        }
        Ok(())
    }
}

impl RemoteContext {
    /// The context of an error value: its `Display` and its `source()` chain.
    pub fn of(error: &(dyn std::error::Error + '_)) -> Self {
        let mut chain = Vec::new();
        let mut source = error.source();
        while let Some(cause) = source {
            chain.push(cause.to_string());
            source = cause.source();
        }
        RemoteContext {
            message: error.to_string(),
            chain,
        }
    }
}

/// Why a signal was not queued for sending.
///
/// A signal that was accepted can still be dropped later, when its TTL runs out before it
/// could be handed to the connection; that is counted in
/// [`PeerStats::signals_expired`](crate::PeerStats::signals_expired), not reported here.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SignalError {
    /// The connection is closed.
    #[error("connection lost: {0}")]
    ConnectionLost(CloseCause),
    /// The arguments could not be encoded.
    #[error("bad arguments: {what}")]
    BadArguments {
        /// What failed.
        what: String,
    },
    /// The signal outbox is full
    /// ([`PeerOptions::max_queued_signals`](crate::PeerOptions::max_queued_signals)) and
    /// the peer refuses more ([`WhenFull::Error`](crate::WhenFull::Error); by default a
    /// signal waits for room instead).
    #[error("signal outbox is full")]
    OutboxFull,
    /// The signal is larger than the connection's maximum frame.
    #[error("signal too large: {0}")]
    TooLarge(String),
    /// The peer is shutting down or closed and takes no new signals.
    #[error("shutting down: the signal was refused")]
    ShuttingDown,
    /// A reconnecting [`Peer`](crate::Peer) gave up reconnecting (its
    /// [`Backoff`](crate::Backoff) ran out) and is closed.
    #[error("not connected and not reconnecting: {0}")]
    NotConnected(String),
    /// The persistent store could not record the signal (so it was not accepted).
    #[error("signal store: {0}")]
    Store(String),
    /// The signal's TTL ran out while it waited for room in a full outbox
    /// ([`WhenFull::Wait`](crate::WhenFull::Wait)): it was never queued.
    #[error("the signal expired while waiting for room in the outbox")]
    Expired,
    /// The signal's metadata (and trace context) is larger than this side's
    /// [`PeerOptions::max_metadata_bytes`](crate::PeerOptions::max_metadata_bytes): it
    /// was not sent. (A receiver with a lower limit drops it and counts it in its
    /// [`PeerStats::signals_failed`](crate::PeerStats::signals_failed); an acknowledged
    /// signal then ends with [`AckError::Failed`].)
    #[error("metadata too large: {what}")]
    MetadataTooLarge {
        /// The size and the limit.
        what: String,
    },
}

/// Why an acknowledged send ([`Sent::acknowledged`](crate::Sent::acknowledged)) did not
/// end with the remote handler having run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AckError {
    /// The signal was sent through a [`Peer`](crate::Peer) whose signals are not
    /// acknowledged: turn on
    /// [`PeerOptions::acknowledged_signals`](crate::PeerOptions::acknowledged_signals), or
    /// send it through a reconnecting peer ([`Peer::reconnecting`](crate::Peer::reconnecting)).
    #[error("not supported: this Peer's signals are not acknowledged; set PeerOptions::acknowledged_signals or use Peer::reconnecting")]
    NotSupported,
    /// No acknowledgement within the time given to `acknowledged`. The signal stays queued
    /// (it may still be delivered, or expire).
    #[error("no acknowledgement within the timeout")]
    Timeout,
    /// The TTL ran out first. `maybe_delivered` is true when a copy had been sent on a
    /// connection that was lost before its acknowledgement arrived.
    #[error("signal expired (maybe delivered: {maybe_delivered})")]
    Expired {
        /// Whether the receiver may have run it anyway.
        maybe_delivered: bool,
    },
    /// The receiver could not run it: no such object or method, bad arguments, metadata
    /// over the receiver's
    /// [`PeerOptions::max_metadata_bytes`](crate::PeerOptions::max_metadata_bytes), or the
    /// handler panicked. Final: the signal is not sent again.
    #[error("the receiver could not handle the signal")]
    Failed,
    /// Dropped on this side before an acknowledgement: evicted from a full outbox
    /// ([`WhenFull::DropOldest`](crate::WhenFull::DropOldest)) or the peer closed.
    #[error("signal dropped before acknowledgement (maybe delivered: {maybe_delivered})")]
    Dropped {
        /// Whether the receiver may have run it anyway.
        maybe_delivered: bool,
    },
    /// The connection of a [`Peer`](crate::Peer) made from a connection closed before the
    /// acknowledgement arrived: the receiver may or may not have run it (such a peer does
    /// not re-send).
    #[error("connection lost before the acknowledgement (maybe delivered): {cause}")]
    ConnectionLost {
        /// Why the connection closed.
        cause: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner;

    #[test]
    fn context_walks_the_source_chain() {
        let ctx = RemoteContext::of(&Outer(Inner));
        assert_eq!(ctx.message, "outer");
        assert_eq!(ctx.chain, vec!["inner".to_string()]);
        assert_eq!(ctx.to_string(), "outer: caused by: inner");
    }

    #[test]
    fn errors_are_send_sync_static() {
        fn check<T: Send + Sync + 'static>() {}
        check::<CallError<String>>();
        check::<CallError>();
        check::<SignalError>();
        check::<AckError>();
    }
}
