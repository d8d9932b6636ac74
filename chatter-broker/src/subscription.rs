//! Publish/subscribe as a [`Bus`](crate::Bus) user sees it: [`SubscribeOptions`],
//! [`Subscription`], [`PublishReport`], [`Presence`] and their errors.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use chatter_rpc::__private::ClientCore;
use chatter_rpc::stream::{Receiver, StreamError};
use chatter_rpc::CallError;
use serde::de::{DeserializeOwned, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// What the broker does with publications for a subscriber that does not keep up: when
/// more than its [`queue_bytes`](SubscribeOptions::queue_bytes) wait for it (its stream
/// window is full and its connection's too).
///
/// Whatever the policy, a subscriber learns what it lost: [`Subscription::missed`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SlowSubscriber {
    /// Drop the oldest waiting publication to make room (the default): a slow subscriber
    /// sees the latest values, and nobody else waits for it.
    #[default]
    DropOldest,
    /// Drop the new publication: a slow subscriber sees the oldest values.
    DropNewest,
    /// End the subscription with [`StreamError::Lagged`]: the subscriber sees everything
    /// in order or knows it did not.
    End,
    /// Lose nothing: publishers wait. Each waiting publication holds its publisher's
    /// flow-control credit, so a publisher can be at most its connection's
    /// `receive_window` ahead of its slowest such subscriber, and then waits, for *all*
    /// of its traffic through the broker (calls and replies included). `queue_bytes` does
    /// not apply: the broker's [`max_backpressure_queue`](crate::BrokerOptions::max_backpressure_queue)
    /// (16 MiB) caps what waits, beyond which the subscription ends as with `End` (credit
    /// does not bound the broker's own publications, a publisher that reconnects, or one
    /// publication's copies in many subscriptions). For subscribers that must not miss a
    /// publication and that are trusted to keep reading; under access control it needs
    /// [`Rules::backpressure`](crate::Rules::backpressure).
    Backpressure,
}

/// How a subscription behaves ([`Bus::subscribe_with`](crate::Bus::subscribe_with)).
///
/// ```
/// use chatter_broker::{SlowSubscriber, SubscribeOptions};
///
/// let options = SubscribeOptions::new()
///     .policy(SlowSubscriber::DropNewest)
///     .queue_bytes(64 * 1024);
/// # let _ = options;
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct SubscribeOptions {
    /// What happens when the subscriber falls behind (default
    /// [`SlowSubscriber::DropOldest`]).
    pub policy: SlowSubscriber,
    /// The most bytes of publications that wait in the broker for this subscriber (each
    /// counts its topic, its value and 64 bytes), on top of what its stream window lets
    /// through; default 256 KiB, capped by the broker's
    /// [`max_subscription_queue`](crate::BrokerOptions::max_subscription_queue).
    pub queue_bytes: usize,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            policy: SlowSubscriber::DropOldest,
            queue_bytes: 256 * 1024,
        }
    }
}

impl SubscribeOptions {
    /// The defaults: drop the oldest, 256 KiB.
    pub fn new() -> Self {
        SubscribeOptions::default()
    }

    /// See [`SubscribeOptions::policy`].
    pub fn policy(mut self, policy: SlowSubscriber) -> Self {
        self.policy = policy;
        self
    }

    /// See [`SubscribeOptions::queue_bytes`].
    pub fn queue_bytes(mut self, bytes: usize) -> Self {
        self.queue_bytes = bytes;
        self
    }
}

/// Why the broker refused a subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum SubscribeError {
    /// The pattern is not valid.
    #[error("`{pattern}` is not a valid pattern: {reason}")]
    InvalidPattern {
        /// The pattern asked for.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
    /// This connection holds as many subscriptions as the broker allows.
    #[error("this connection holds {limit} subscriptions, the broker's limit")]
    TooManySubscriptions {
        /// The limit ([`BrokerOptions::max_subscriptions_per_peer`](crate::BrokerOptions::max_subscriptions_per_peer)).
        limit: usize,
    },
}

/// Why the broker refused an acknowledged publication
/// ([`Bus::publish_acked`](crate::Bus::publish_acked)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The topic is not valid.
    #[error("`{topic}` is not a valid topic: {reason}")]
    InvalidTopic {
        /// The topic.
        topic: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// What became of an acknowledged publication: answered once every subscription that
/// matched its topic when it arrived had it delivered (handed to the subscriber's
/// connection) or dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PublishReport {
    /// Subscriptions that matched the topic.
    pub subscribers: u32,
    /// Of those, how many got it.
    pub delivered: u32,
    /// The names of the named subscribers that did not get it (their policy dropped it,
    /// it expired, or they went away first); unnamed ones are only counted
    /// (`subscribers - delivered`). Empty when the broker's access control does not let
    /// the publisher introspect (names are what `peers()` shows).
    pub missed: Vec<String>,
}

/// A peer joining or leaving the broker, published on `$broker/presence/{name}`
/// ([`Bus::presence`](crate::Bus::presence)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    /// The peer's name.
    pub peer: String,
    /// True when it registered (or was registered when the subscription began), false when
    /// its connection closed.
    pub online: bool,
}

/// A publication as it travels to a subscriber: `[topic, value]`, or `[topic, value,
/// missed]` when `missed` publications were dropped for the subscription since the item
/// before it was sent.
pub(crate) struct Delivery<T> {
    topic: String,
    value: T,
    missed: u64,
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Delivery<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: DeserializeOwned> Visitor<'de> for V<T> {
            type Value = Delivery<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a publication [topic, value] or [topic, value, missed]")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                use serde::de::Error;
                let topic = seq
                    .next_element::<String>()?
                    .ok_or_else(|| A::Error::invalid_length(0, &self))?;
                let value = seq
                    .next_element::<T>()?
                    .ok_or_else(|| A::Error::invalid_length(1, &self))?;
                let missed = seq.next_element::<u64>()?.unwrap_or(0);
                Ok(Delivery {
                    topic,
                    value,
                    missed,
                })
            }
        }
        d.deserialize_seq(V(PhantomData))
    }
}

/// The publications on the topics that match a subscription's pattern, in the order the
/// broker took them from their publishers ([`Bus::subscribe`](crate::Bus::subscribe)).
/// Dropping it ends the subscription.
///
/// A subscription is a stream on one connection to the broker. On a reconnecting bus
/// ([`BusOptions::reconnect`](crate::BusOptions::reconnect)) it outlives its connection:
/// [`recv`](Self::recv) subscribes again, with the same pattern and options, on the next
/// connection. What was published in between is lost (see [`resubscribed`](Self::resubscribed)).
pub struct Subscription<T> {
    pattern: String,
    rx: Receiver<Delivery<T>>,
    missed: u64,
    /// How to subscribe again after a reconnect: `Some` on a reconnecting bus, until the
    /// subscription ended. Boxed: a plain bus's subscriptions carry one pointer for it.
    again: Option<Box<Again>>,
    resubscribed: u64,
}

/// What a subscription of a reconnecting bus needs to subscribe again.
pub(crate) struct Again {
    connections: Arc<crate::reconnect::Connections>,
    options: SubscribeOptions,
    /// The generation of the latest connection subscribed on or found lost: a later one
    /// is tried next.
    tried: u64,
    /// Set from the loss of a connection until subscribed again: why it was lost (the
    /// error `recv` ends with if no connection comes back). Kept here rather than in
    /// `recv`'s future, so that a `recv` dropped while waiting (a `select!`, a timeout)
    /// leaves the next one to go on.
    lost: Option<String>,
}

impl Again {
    /// For a subscription made on a connection of generation `generation` or later.
    pub(crate) fn new(
        connections: Arc<crate::reconnect::Connections>,
        options: SubscribeOptions,
        generation: u64,
    ) -> Box<Self> {
        Box::new(Again {
            connections,
            options,
            tried: generation,
            lost: None,
        })
    }
}

impl<T> fmt::Debug for Subscription<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("pattern", &self.pattern)
            .field("missed", &self.missed)
            .field("resubscribed", &self.resubscribed)
            .finish_non_exhaustive()
    }
}

impl<T: DeserializeOwned + Send + 'static> Subscription<T> {
    pub(crate) fn new(
        pattern: String,
        rx: Receiver<Delivery<T>>,
        again: Option<Box<Again>>,
    ) -> Self {
        Subscription {
            pattern,
            // Publications come from many publishers: one of the wrong type is an error
            // item for this subscriber, not the end of its subscription.
            rx: rx.keep_after_bad_items(),
            missed: 0,
            again,
            resubscribed: 0,
        }
    }

    /// The next publication as `(topic, value)`; `None` once the subscription ended
    /// normally. A publication whose value does not decode as `T` (another publisher's
    /// type on a matching topic) is a [`StreamError::BadItem`], and the subscription goes
    /// on after it; any other error ends it: the connection to the broker closed
    /// ([`StreamError::ConnectionLost`]) or the policy [`SlowSubscriber::End`] ended it
    /// ([`StreamError::Lagged`]).
    ///
    /// On a reconnecting bus ([`BusOptions::reconnect`](crate::BusOptions::reconnect)) a
    /// lost connection does not end the subscription: `recv` waits for the bus to
    /// reconnect (and claim its name), subscribes again on the new connection with the
    /// same pattern and options, counts it in [`resubscribed`](Self::resubscribed) and
    /// returns the first publication of the new subscription. It waits as long as the bus
    /// reconnects (no deadline, as for a publication); if the connection drops again
    /// before the broker answered, it waits for the next one. It ends with
    /// [`StreamError::ConnectionLost`] (the lost connection's reason) when no connection
    /// will come back: the bus was closed, shut down or dropped (every handle on its
    /// peer), or it gave up reconnecting. It ends with [`StreamError::ConnectionLost`]
    /// saying that the broker refused to subscribe again, and why, when the new
    /// connection's broker refused the subscription (its access rules changed, or
    /// [`SubscribeError::TooManySubscriptions`]). Then, as after any error that ends it,
    /// `recv` returns `None`. Dropping a `recv` while it waits (a `select!`, a timeout) is
    /// safe: the next call goes on where it was.
    ///
    /// The gap is not an item of its own: items stay publications, so that a loop that
    /// stops at the first error (`while let Some(Ok(…))`) is not ended by a reconnect the
    /// bus handled, and the counter costs nothing to those that do not care; one that
    /// does compares [`resubscribed`](Self::resubscribed) after each item with its value
    /// after the one before (or watches the bus's [`events`](chatter_rpc::Peer::events)).
    ///
    /// Order: within one connection, publications arrive in the broker's order; across a
    /// reconnect there is a gap, never an item of the old subscription after one of the
    /// new (the old stream has ended, with all it carried, before the new one is made).
    pub async fn recv(&mut self) -> Option<Result<(String, T), StreamError>> {
        loop {
            if self
                .again
                .as_ref()
                .is_some_and(|again| again.lost.is_some())
            {
                if let Err(e) = self.subscribe_again().await {
                    // Ended: later calls return `None`, as the lost stream does.
                    self.again = None;
                    return Some(Err(e));
                }
            }
            let delivery = match self.rx.recv().await? {
                Err(StreamError::ConnectionLost(reason)) if self.again.is_some() => {
                    if let Some(again) = &mut self.again {
                        again.lost = Some(reason);
                    }
                    continue;
                }
                delivery => delivery,
            };
            return Some(delivery.map(|d| {
                self.missed += d.missed;
                (d.topic, d.value)
            }));
        }
    }

    /// Subscribes again after the loss of the connection (`Again::lost`), on the next
    /// connection of a reconnecting bus; `Err` when the subscription ends instead.
    async fn subscribe_again(&mut self) -> Result<(), StreamError> {
        let Subscription {
            pattern,
            rx,
            again,
            resubscribed,
            ..
        } = self;
        let Some(again) = again else {
            return Ok(());
        };
        loop {
            let Some((generation, peer)) = again.connections.after(again.tried).await else {
                return Err(StreamError::ConnectionLost(again_lost(&again.lost)));
            };
            let broker = ClientCore::new(&peer, crate::BROKER_OBJECT);
            match crate::bus::subscribe_on::<T>(&broker, pattern, &again.options).await {
                Ok(new) => {
                    *rx = new.keep_after_bad_items();
                    *resubscribed += 1;
                    again.tried = generation;
                    again.lost = None;
                    return Ok(());
                }
                // The broker did not answer in time: ask again on the same connection (if
                // it is lost meanwhile, the next try says so at once).
                Err(CallError::DeadlineExceeded) => {}
                // This connection was lost too: wait for the next.
                Err(
                    CallError::ConnectionLost(_)
                    | CallError::OutcomeUnknown(_)
                    | CallError::NotConnected { .. },
                ) => again.tried = generation,
                // Closing: no connection will come.
                Err(CallError::ShuttingDown) => {
                    return Err(StreamError::ConnectionLost(again_lost(&again.lost)))
                }
                Err(refused) => {
                    let why = match refused {
                        CallError::App { error, .. } => error.to_string(),
                        other => other.to_string(),
                    };
                    return Err(StreamError::ConnectionLost(format!(
                        "{}; the broker refused to subscribe to `{pattern}` again on the new \
                         connection: {why}",
                        again_lost(&again.lost)
                    )));
                }
            }
        }
    }

    /// How many publications for this subscription the broker dropped (by its
    /// [`SlowSubscriber`] policy, or because they expired), as far as the items received
    /// so far tell: each item carries the count of drops since the item before it, so
    /// drops after the last item received are told with the next one. It does not count
    /// what was published while a reconnecting bus was disconnected: no broker saw this
    /// subscription then, so none can count it ([`resubscribed`](Self::resubscribed)).
    pub fn missed(&self) -> u64 {
        self.missed
    }

    /// How many times this subscription was made again after its bus reconnected
    /// ([`recv`](Self::recv)); always 0 on a bus that does not reconnect. Each time is a
    /// gap: what was published between the loss of the connection and the new
    /// subscription is lost and not counted in [`missed`](Self::missed). It grows before
    /// the new subscription's first item is returned: when it is higher after a `recv`
    /// than after the one before, the item that `recv` returned is the first after a gap
    /// (for [`Bus::presence`](crate::Bus::presence): the first of a fresh snapshot of who
    /// is online).
    pub fn resubscribed(&self) -> u64 {
        self.resubscribed
    }

    /// The pattern subscribed to.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }
}

/// Why the connection was lost, for the error a subscription that cannot go on ends with.
fn again_lost(lost: &Option<String>) -> String {
    lost.clone().unwrap_or_else(|| "connection lost".to_owned())
}
