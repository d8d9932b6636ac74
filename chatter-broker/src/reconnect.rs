//! Reconnecting buses ([`BusOptions::reconnect`](crate::BusOptions::reconnect)): a
//! reconnecting chatter-rpc peer whose first on-connect hook presents the bus's credential
//! and claims its name again on every new connection, before the peer sends anything else
//! on it.

use std::sync::{Arc, Mutex, PoisonError};

use chatter_core::{Options, ToAddress};
use chatter_rpc::{CallError, Peer, PeerOptions, ReconnectOptions};

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
    let reconnect = parts.reconnect.on_connect_first(hook);
    let peer = Peer::reconnecting(address, parts.connection, parts.peer, reconnect)?;
    Ok(Bus::reconnecting(peer, reclaim))
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
