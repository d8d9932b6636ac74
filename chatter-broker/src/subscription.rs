//! Publish/subscribe as a [`Bus`](crate::Bus) user sees it: [`SubscribeOptions`],
//! [`Subscription`], [`PublishReport`], [`Presence`] and their errors.

use std::fmt;
use std::marker::PhantomData;

use chatter_rpc::stream::{Receiver, StreamError};
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
pub struct Subscription<T> {
    pattern: String,
    rx: Receiver<Delivery<T>>,
    missed: u64,
}

impl<T> fmt::Debug for Subscription<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("pattern", &self.pattern)
            .field("missed", &self.missed)
            .finish_non_exhaustive()
    }
}

impl<T: DeserializeOwned + Send + 'static> Subscription<T> {
    pub(crate) fn new(pattern: String, rx: Receiver<Delivery<T>>) -> Self {
        Subscription {
            pattern,
            // Publications come from many publishers: one of the wrong type is an error
            // item for this subscriber, not the end of its subscription.
            rx: rx.keep_after_bad_items(),
            missed: 0,
        }
    }

    /// The next publication as `(topic, value)`; `None` once the subscription ended
    /// normally. A publication whose value does not decode as `T` (another publisher's
    /// type on a matching topic) is a [`StreamError::BadItem`], and the subscription goes
    /// on after it; any other error ends it: the connection to the broker closed
    /// ([`StreamError::ConnectionLost`]) or the policy [`SlowSubscriber::End`] ended it
    /// ([`StreamError::Lagged`]).
    pub async fn recv(&mut self) -> Option<Result<(String, T), StreamError>> {
        let delivery = self.rx.recv().await?;
        Some(delivery.map(|d| {
            self.missed += d.missed;
            (d.topic, d.value)
        }))
    }

    /// How many publications for this subscription the broker dropped (by its
    /// [`SlowSubscriber`] policy, or because they expired), as far as the items received
    /// so far tell: each item carries the count of drops since the item before it, so
    /// drops after the last item received are told with the next one.
    pub fn missed(&self) -> u64 {
        self.missed
    }

    /// The pattern subscribed to.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }
}
