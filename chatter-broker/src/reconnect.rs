//! Reconnecting buses ([`BusOptions::reconnect`](crate::BusOptions::reconnect)): a
//! reconnecting chatter-rpc peer whose first on-connect hook presents the bus's credential
//! and claims its name again on every new connection, before the peer sends anything else
//! on it, and whose last on-connect hook tells the bus's subscriptions about the connection
//! ([`Connections`]), for them to subscribe again.

use std::sync::{Arc, Mutex, PoisonError};

use chatter_core::{Options, ToAddress};
use chatter_rpc::{CallError, ConnectionState, Peer, PeerOptions, ReconnectOptions};
use tokio::sync::watch;

use crate::introspect::BrokerApiClient;
use crate::{Bus, BusError, BROKER_OBJECT};

/// The options of a reconnecting bus.
pub(crate) struct Parts {
    pub(crate) reconnect: ReconnectOptions,
    pub(crate) connection: Options,
    pub(crate) peer: PeerOptions,
    pub(crate) take_over: bool,
    pub(crate) credential: Option<String>,
}

/// The name a reconnecting bus holds, claimed again on each connection.
#[derive(Debug, Default)]
pub(crate) struct Reclaim {
    /// The name and its take-over flag; `None` until one is claimed.
    name: Mutex<Option<(String, bool)>>,
}

impl Reclaim {
    fn get(&self) -> Option<(String, bool)> {
        self.name
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, name: Option<(String, bool)>) -> Option<(String, bool)> {
        let mut held = self.name.lock().unwrap_or_else(PoisonError::into_inner);
        std::mem::replace(&mut *held, name)
    }

    /// [`Bus::claim`] on a reconnecting bus: the name is kept for later connections from
    /// now on (so that a connection made while the call waits claims it too), and the one
    /// before is put back if the broker refuses it.
    pub(crate) async fn claim(
        &self,
        peer: &Peer,
        name: &str,
        take_over: bool,
    ) -> Result<(), BusError> {
        let before = self.set(Some((name.to_owned(), take_over)));
        let result = register(peer, name, take_over).await;
        if result.is_err() {
            self.set(before);
        }
        result
    }
}

/// The connections of a reconnecting bus, as its last on-connect hook sees them (after the
/// name was claimed and the application's hooks ran, just before the connection is
/// published): what a [`Subscription`](crate::Subscription) whose connection was lost
/// subscribes again on ([`Subscription::recv`](crate::Subscription::recv)).
///
/// Held by the bus and by its subscriptions; the hook holds it weakly, so that the pinned
/// handle kept here (which holds the peer's state) makes no cycle with the peer (whose
/// state holds the hook).
#[derive(Debug)]
pub(crate) struct Connections {
    /// One value, replaced on each connection: it keeps the latest connection's state
    /// (not the connection open) until the next one.
    latest: watch::Sender<Latest>,
}

/// The latest connection of a reconnecting bus.
#[derive(Debug, Clone, Default)]
struct Latest {
    /// How many connections got this far (0: none yet).
    generation: u64,
    /// A handle pinned to the latest connection: its clients' calls go to that connection;
    /// it owns nothing (the peer closes when the application drops its last handle), and
    /// its state, events and `closed` are the peer's.
    peer: Option<Peer>,
}

impl Connections {
    fn new() -> Self {
        Connections {
            latest: watch::Sender::new(Latest::default()),
        }
    }

    /// The latest connection's generation: a subscription made now is on this connection
    /// or a later one.
    pub(crate) fn generation(&self) -> u64 {
        self.latest.borrow().generation
    }

    /// The hook's part: `pinned` is the latest connection.
    fn publish(&self, pinned: Peer) {
        self.latest.send_modify(|latest| {
            latest.generation += 1;
            latest.peer = Some(pinned);
        });
    }

    /// Waits for a connection later than generation `tried` and returns it with its
    /// generation; `None` once the peer is closed for good (closed, shut down or shutting
    /// down, dropped, or it gave up reconnecting): no connection will come.
    pub(crate) async fn after(&self, tried: u64) -> Option<(u64, Peer)> {
        let mut latest = self.latest.subscribe();
        loop {
            let (generation, peer) = {
                let l = latest.borrow_and_update();
                (l.generation, l.peer.clone())
            };
            let Some(peer) = peer else {
                // Never connected: a subscription exists only once a connection was
                // published, so this is not reached; wait for one all the same (`self`
                // holds the sender: `changed` does not fail).
                let _ = latest.changed().await;
                continue;
            };
            if peer.state() == ConnectionState::Closed || peer.is_shutting_down() {
                return None;
            }
            if generation > tried {
                return Some((generation, peer));
            }
            tokio::select! {
                _ = latest.changed() => {}
                _ = peer.closed() => return None,
            }
        }
    }
}

/// Starts a reconnecting bus that claims `name` on each connection, the first one
/// included (after presenting the credential, if any). Returns at once.
pub(crate) fn start(
    address: impl ToAddress,
    name: Option<&str>,
    parts: Parts,
) -> Result<Bus, BusError> {
    let reclaim = Arc::new(Reclaim::default());
    reclaim.set(name.map(|n| (n.to_owned(), parts.take_over)));
    let hook = {
        let (reclaim, credential) = (reclaim.clone(), parts.credential);
        move |pinned: Peer| {
            let (claim, credential) = (reclaim.get(), credential.clone());
            async move {
                if let Some(token) = credential {
                    let broker = BrokerApiClient::new(&pinned, BROKER_OBJECT);
                    broker
                        .authenticate(token)
                        .await
                        .map_err(BusError::Authenticate)?;
                }
                match claim {
                    Some((name, take_over)) => register(&pinned, &name, take_over).await,
                    None => Ok(()),
                }
            }
        }
    };
    let connections = Arc::new(Connections::new());
    // Last, after the application's hooks: a connection told here is one that will be
    // published (unless the peer is stopped meanwhile).
    let tell = {
        let connections = Arc::downgrade(&connections);
        move |pinned: Peer| {
            if let Some(connections) = connections.upgrade() {
                connections.publish(pinned);
            }
            std::future::ready(Ok::<(), std::convert::Infallible>(()))
        }
    };
    let reconnect = parts.reconnect.on_connect_first(hook).on_connect(tell);
    let peer = Peer::reconnecting(address, parts.connection, parts.peer, reconnect)?;
    Ok(Bus::reconnecting(peer, reclaim, connections))
}

/// The broker's `register` call, on `peer`'s connection.
pub(crate) async fn register(peer: &Peer, name: &str, take_over: bool) -> Result<(), BusError> {
    let broker = BrokerApiClient::new(peer, BROKER_OBJECT);
    match broker.register(name.to_owned(), take_over).await {
        Ok(()) => Ok(()),
        Err(CallError::App { error, .. }) => Err(BusError::Refused(error)),
        Err(e) => Err(BusError::Register(e)),
    }
}
