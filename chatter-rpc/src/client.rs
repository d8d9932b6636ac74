//! The runtime half of generated clients.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{CallError, RemoteContext, SignalError};
use crate::outbox::Sent;
use crate::peer::{lock, Outcome, MAX_DURATION};
use crate::reconnect::Target;
use crate::wire::{self, FailureKind, Reply, WireName};

/// What a generated `{Trait}Client` wraps: a peer, the remote object's name, and the
/// client's deadline and signal TTL overrides. Generated code only.
#[doc(hidden)]
#[derive(Clone)]
pub struct ClientCore {
    /// What every call and signal needs: one reference count per call, not one per part.
    shared: Arc<Shared>,
    idempotent: bool,
    persistent: bool,
    deadline: Option<Duration>,
    ttl: Option<Duration>,
}

struct Shared {
    peer: Target,
    object: WireName,
    /// The peer's defaults (its options do not change), capped at `MAX_DURATION`.
    default_deadline: Duration,
    default_ttl: Duration,
}

/// A method of a `#[remote]` trait: its name, and the name encoded as a MessagePack
/// string (`#[remote]` encodes it at compile time). Generated code only.
#[doc(hidden)]
#[derive(Clone, Copy, Debug)]
pub struct Method {
    pub name: &'static str,
    pub wire: &'static [u8],
}

impl fmt::Debug for ClientCore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("object", &self.shared.object)
            .field("deadline", &self.deadline())
            .field("ttl", &self.ttl)
            .field("persistent", &self.persistent)
            .finish_non_exhaustive()
    }
}

impl ClientCore {
    pub fn new(peer: impl Into<Target>, object: &str) -> Self {
        let peer = peer.into();
        let options = peer.peer_options();
        let (default_deadline, default_ttl) =
            (options.default_deadline, options.default_signal_ttl);
        ClientCore {
            shared: Arc::new(Shared {
                peer,
                object: WireName::new(object),
                default_deadline: default_deadline.min(MAX_DURATION),
                default_ttl: default_ttl.min(MAX_DURATION),
            }),
            idempotent: false,
            persistent: false,
            deadline: None,
            ttl: None,
        }
    }

    pub fn peer(&self) -> &Target {
        &self.shared.peer
    }

    /// The same client, allowed to re-send calls whose outcome is unknown (for methods
    /// marked `#[idempotent]`).
    pub fn idempotent(&self) -> Self {
        ClientCore {
            idempotent: true,
            ..self.clone()
        }
    }

    /// The same client, sending every signal as persistent.
    pub fn persistent(&self) -> Self {
        ClientCore {
            persistent: true,
            ..self.clone()
        }
    }

    pub fn object(&self) -> &str {
        self.shared.object.as_str()
    }

    pub fn deadline(&self) -> Duration {
        match self.deadline {
            Some(deadline) => deadline.min(MAX_DURATION),
            None => self.shared.default_deadline,
        }
    }

    pub fn with_deadline(&self, deadline: Duration) -> Self {
        ClientCore {
            deadline: Some(deadline),
            ..self.clone()
        }
    }

    pub fn with_ttl(&self, ttl: Duration) -> Self {
        ClientCore {
            ttl: Some(ttl),
            ..self.clone()
        }
    }

    /// A call of a method returning `Result<T, E>`.
    pub fn call<A, T, E>(
        &self,
        method: Method,
        args: &A,
    ) -> impl Future<Output = Result<T, CallError<E>>> + Send + 'static
    where
        A: Serialize + ?Sized,
        T: DeserializeOwned + Send + 'static,
        E: DeserializeOwned + Send + 'static,
    {
        self.call_with(method, args, |error, remote| {
            match wire::decode_value::<E>(error) {
                Ok(error) => CallError::App { error, remote },
                Err(e) => CallError::BadReply { what: e.0 },
            }
        })
    }

    /// A call of a method returning a plain `T`.
    pub fn call_plain<A, T>(
        &self,
        method: Method,
        args: &A,
    ) -> impl Future<Output = Result<T, CallError<Infallible>>> + Send + 'static
    where
        A: Serialize + ?Sized,
        T: DeserializeOwned + Send + 'static,
    {
        self.call_with(method, args, |_, remote| CallError::BadReply {
            what: format!("unexpected application error from a method without one: {remote}"),
        })
    }

    /// Sends a signal: encodes the arguments now, queues the signal when first polled
    /// (see [`Peer`](crate::Peer) and [`ReconnectingPeer`](crate::ReconnectingPeer) for
    /// TTL, outbox and persistence rules).
    pub fn signal<A: Serialize + ?Sized>(
        &self,
        method: Method,
        default_ttl: Option<Duration>,
        persistent: bool,
        args: &A,
    ) -> impl Future<Output = Result<Sent, SignalError>> + Send + 'static {
        let ttl = match self.ttl.or(default_ttl) {
            Some(ttl) => ttl.min(MAX_DURATION),
            None => self.shared.default_ttl,
        };
        let object = self.shared.object.encoded();
        let encoded = wire::encode_request_with(wire::SIGNAL, object, method.wire, ttl, args);
        let shared = self.shared.clone();
        let persistent = persistent || self.persistent;
        async move {
            let payload = encoded.map_err(|e| SignalError::BadArguments { what: e.0 })?;
            match &shared.peer {
                Target::Peer(peer) => {
                    let inner = &peer.inner;
                    if inner.hooks.is_shutting_down() {
                        return Err(SignalError::ShuttingDown);
                    }
                    if !inner.options.acknowledged_signals {
                        return inner.signal(payload, ttl).map(|()| Sent::untracked());
                    }
                    let (reliable, sent) = lock(&inner.hooks.tracked).track(&payload, ttl)?;
                    match inner.signal(reliable.into(), ttl) {
                        Ok(()) => Ok(sent),
                        Err(e) => {
                            lock(&inner.hooks.tracked).untrack(&sent);
                            Err(e)
                        }
                    }
                }
                Target::Reconnecting(peer) => {
                    // Boxed, as for calls: its wait state would make every signal future
                    // several times larger, and futures are moved when awaited.
                    Box::pin(peer.signal(payload.into_bytes(), ttl, persistent)).await
                }
            }
        }
    }

    fn call_with<A, T, E>(
        &self,
        method: Method,
        args: &A,
        app: impl FnOnce(&[u8], RemoteContext) -> CallError<E> + Send + 'static,
    ) -> impl Future<Output = Result<T, CallError<E>>> + Send + 'static
    where
        A: Serialize + ?Sized,
        T: DeserializeOwned + Send + 'static,
        E: Send + 'static,
    {
        let deadline = self.deadline();
        let object = self.shared.object.encoded();
        let encoded = wire::encode_request_with(wire::CALL, object, method.wire, deadline, args);
        let shared = self.shared.clone();
        let idempotent = self.idempotent;
        let method = method.name;
        async move {
            let payload = encoded.map_err(|e| CallError::BadArguments { what: e.0 })?;
            let object = shared.object.as_str();
            let inner = match &shared.peer {
                Target::Peer(peer) => &peer.inner,
                Target::Reconnecting(peer) => {
                    // Boxed: inline, its state (about 550 bytes) would make every call
                    // future that large, plain-peer calls included, and copying it shows
                    // in profiles.
                    let call = peer.call(payload.into_bytes(), deadline, idempotent);
                    let reply = Box::pin(call).await;
                    return finish(
                        reply.map_err(|e| e.map_app(|n| match n {})),
                        app,
                        object,
                        method,
                    );
                }
            };
            if inner.hooks.is_shutting_down() {
                return Err(CallError::ShuttingDown);
            }
            let reply = match inner.call(payload, deadline).await {
                Outcome::Reply(reply) => reply,
                Outcome::Deadline => return Err(CallError::DeadlineExceeded),
                Outcome::Lost(cause) | Outcome::NotSent(cause) => {
                    return Err(CallError::ConnectionLost(cause))
                }
                Outcome::Protocol(what) => return Err(CallError::Protocol(what)),
            };
            finish(Ok(reply), app, object, method)
        }
    }
}

/// Decodes a reply (or passes a framework failure through).
fn finish<T, E>(
    reply: Result<bytes::Bytes, CallError<E>>,
    app: impl FnOnce(&[u8], RemoteContext) -> CallError<E>,
    object: &str,
    method: &str,
) -> Result<T, CallError<E>>
where
    T: DeserializeOwned,
{
    let reply = reply?;
    {
        {
            match wire::decode_reply(&reply) {
                Ok(Reply::Ok(value)) => {
                    wire::decode_value(value).map_err(|e| CallError::BadReply { what: e.0 })
                }
                Ok(Reply::AppError { context, error }) => Err(app(error, context)),
                Ok(Reply::Failure { kind, message }) => Err(failure(kind, message, object, method)),
                Err(e) => Err(CallError::Protocol(e.0)),
            }
        }
    }
}

fn failure<E>(
    kind: Result<FailureKind, u8>,
    message: String,
    object: &str,
    method: &str,
) -> CallError<E> {
    match kind {
        Ok(FailureKind::DeadlineExceeded) => CallError::DeadlineExceeded,
        Ok(FailureKind::Cancelled) => CallError::Cancelled,
        Ok(FailureKind::NoSuchObject) => CallError::NoSuchObject {
            object: object.to_owned(),
        },
        Ok(FailureKind::NoSuchMethod) => CallError::NoSuchMethod {
            object: object.to_owned(),
            method: method.to_owned(),
        },
        Ok(FailureKind::BadArguments) => CallError::BadArguments { what: message },
        Ok(FailureKind::RemotePanic) => CallError::RemotePanic { message },
        Ok(FailureKind::Protocol) => CallError::Protocol(message),
        Ok(FailureKind::ShuttingDown) => CallError::ShuttingDown,
        Err(kind) => CallError::Protocol(format!("unknown failure kind {kind}: {message}")),
    }
}
