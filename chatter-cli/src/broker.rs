//! `chatter subscribe` and `chatter publish`: a broker's publish/subscribe (chatter-rpc's
//! `PROTOCOL.md`, "The broker"), through chatter-broker's client ([`Bus`]), so that the
//! wire format lives in one place.
//!
//! Both connect without a name: the broker serves unnamed connections, and neither
//! command serves anything that others would need to address.

use std::pin::pin;
use std::time::Duration;

use chatter_broker::{
    Bus, BusError, BusOptions, PublishError, PublishReport, SlowSubscriber, SubscribeError,
    SubscribeOptions, BROKER_OBJECT,
};
use chatter_rpc::stream::StreamError;
use chatter_rpc::{AckError, CallError, PeerOptions};
use serde_json::Value;

use crate::connect::ConnectArgs;
use crate::error::CliError;
use crate::json::{parse_value, Json};
use crate::output;

/// The pattern of `--presence`: the topics the broker announces peers on.
pub(crate) const PRESENCE: &str = "$broker/presence/+";

/// What the syntax of patterns is, for errors about them.
const PATTERN_SYNTAX: &str =
    "a pattern is a topic (levels separated by `/`) whose levels may be `+` \
(any one level) or, as the last level, `#` (any number of levels): sensors/+/temp, sensors/#, #";

/// `--policy`: what the broker does when this subscriber falls behind
/// ([`SlowSubscriber`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Policy {
    /// Drop the oldest waiting publication (the broker's default): see the latest values.
    #[value(alias = "drop_oldest")]
    DropOldest,
    /// Drop the new publication: see the oldest values.
    #[value(alias = "drop_newest")]
    DropNewest,
    /// End the subscription (exit status 1): see everything in order, or know you did not.
    End,
    /// Lose nothing: the publishers wait for this subscriber.
    Backpressure,
}

impl From<Policy> for SlowSubscriber {
    fn from(policy: Policy) -> Self {
        match policy {
            Policy::DropOldest => SlowSubscriber::DropOldest,
            Policy::DropNewest => SlowSubscriber::DropNewest,
            Policy::End => SlowSubscriber::End,
            Policy::Backpressure => SlowSubscriber::Backpressure,
        }
    }
}

/// The options of `chatter subscribe`.
#[derive(Debug, Clone)]
pub(crate) struct Subscribe {
    /// The pattern (`PRESENCE` for `--presence`).
    pub(crate) pattern: String,
    /// `--presence`: print presence items as `NAME  online`.
    pub(crate) presence: bool,
    /// `--policy`.
    pub(crate) policy: Option<Policy>,
    /// `--queue-bytes`.
    pub(crate) queue_bytes: Option<usize>,
    /// `--count`: stop after this many publications.
    pub(crate) count: Option<u64>,
}

/// `chatter subscribe URL PATTERN [--policy P] [--queue-bytes N] [--count N]`, or
/// `--presence`: one line per publication until the broker ends the subscription,
/// `--count` is reached or Ctrl-C.
pub(crate) async fn subscribe(connect: &ConnectArgs, options: Subscribe) -> Result<(), CliError> {
    let Subscribe {
        pattern,
        presence,
        policy,
        queue_bytes,
        count,
    } = options;
    let bus = bus(connect, PeerOptions::default().introspection(false)).await?;
    let mut wanted = SubscribeOptions::new();
    if let Some(policy) = policy {
        wanted = wanted.policy(policy.into());
    }
    if let Some(bytes) = queue_bytes {
        wanted = wanted.queue_bytes(bytes);
    }
    let mut subscription = match bus.subscribe_with::<Json>(&pattern, wanted).await {
        Ok(subscription) => subscription,
        Err(error) => {
            let error = subscribe_failed(connect, &pattern, error);
            bus.close().await;
            return Err(error);
        }
    };
    let json = connect.json_output();
    if !json {
        eprintln!("subscribed to {pattern} at {} (Ctrl-C ends)", connect.url);
    }
    // Made once, before the first item: a Ctrl-C from then on ends the loop (and the
    // program with status 0) instead of killing the program.
    let mut interrupted = pin!(tokio::signal::ctrl_c());
    let mut seen: u64 = 0;
    let mut missed_before: u64 = 0;
    let result = loop {
        if count.is_some_and(|n| seen >= n) {
            break Ok(());
        }
        let next = tokio::select! {
            next = subscription.recv() => next,
            // An error means no Ctrl-C handler: Ctrl-C kills the program as usual.
            Ok(()) = &mut interrupted => break Ok(()),
        };
        match next {
            Some(Ok((topic, Json(value)))) => {
                // The subscription counts the drops each item reports.
                let missed = subscription.missed() - missed_before;
                missed_before = subscription.missed();
                output::line(&publication_line(&topic, &value, missed, json, presence));
                seen += 1;
            }
            // One publication that did not decode; the subscription goes on.
            Some(Err(StreamError::BadItem(what))) => {
                eprintln!("warning: a publication could not be read, skipped: {what}");
            }
            Some(Err(error)) => break Err(subscription_ended(connect, &pattern, seen, error)),
            // The broker ended it without an error (its closing shows as a lost
            // connection instead).
            None => break Ok(()),
        }
    };
    // Dropping the subscription cancels it at the broker.
    drop(subscription);
    bus.close().await;
    result
}

/// One publication as a line: `{"topic":…,"value":…}` (with `"missed":n` when the broker
/// dropped publications before it) for a program, `TOPIC  VALUE` for a person, and
/// `NAME  online` / `NAME  offline` for `--presence`.
pub(crate) fn publication_line(
    topic: &str,
    value: &Value,
    missed: u64,
    json: bool,
    presence: bool,
) -> String {
    if json {
        // By hand, for the order topic, value, missed.
        let mut line = format!("{{\"topic\":{},\"value\":{value}", Value::from(topic));
        if missed > 0 {
            line.push_str(&format!(",\"missed\":{missed}"));
        }
        line.push('}');
        return line;
    }
    let mut line = match (presence, &value["peer"], &value["online"]) {
        (true, Value::String(peer), Value::Bool(online)) => {
            format!("{peer}  {}", if *online { "online" } else { "offline" })
        }
        _ => format!("{topic}  {value}"),
    };
    if missed > 0 {
        line.push_str(&format!(
            "  ({missed} missed before this one: the subscriber fell behind)"
        ));
    }
    line
}

/// `chatter publish URL TOPIC VALUE [--ttl D] [--ack]`.
pub(crate) async fn publish(
    connect: &ConnectArgs,
    topic: &str,
    value: &str,
    ttl: Duration,
    acked: bool,
) -> Result<(), CliError> {
    let value = parse_value(value, "the value").map_err(CliError::new)?;
    // Without --ack, a reliable signal: the broker acknowledges it once it took it, or as
    // failed when it refuses it. With --ack, a call whose deadline is the TTL (the broker
    // gives each copy that long to reach its subscriber).
    let options = PeerOptions::default()
        .introspection(false)
        .acknowledged_signals(!acked)
        .default_deadline(ttl)
        .default_signal_ttl(ttl);
    let bus = bus(connect, options).await?;
    let result = if acked {
        publish_acked(&bus, connect, topic, &value, ttl).await
    } else {
        publish_signal(&bus, connect, topic, &value, ttl).await
    };
    bus.close().await;
    result
}

async fn publish_signal(
    bus: &Bus,
    connect: &ConnectArgs,
    topic: &str,
    value: &Value,
    ttl: Duration,
) -> Result<(), CliError> {
    let sent = bus
        .publish_ttl(topic, value, ttl)
        .await
        .map_err(|e| CliError::new(format!("the publication on `{topic}` was not sent: {e}")))?;
    match sent.acknowledged(ttl + Duration::from_secs(1)).await {
        Ok(()) => {
            if connect.json_output() {
                let line = format!("{{\"topic\":{},\"published\":true}}", Value::from(topic));
                output::line(&line);
            } else {
                output::line(&format!("published on {topic}: the broker took it"));
            }
            Ok(())
        }
        Err(AckError::Failed) => Err(CliError::new(format!(
            "{} refused the publication on `{topic}`",
            connect.url
        ))
        .hint(
            "a topic has 1 or more `/`-separated levels, no `+`, `#` or control characters; \
             `chatter publish --ack` says what the broker objects to",
        )
        .hint(format!(
            "is {} a chatter broker? (`chatter list {}` shows what it serves)",
            connect.url, connect.url
        ))),
        Err(e) => Err(CliError::new(format!("the publication on `{topic}`: {e}"))),
    }
}

async fn publish_acked(
    bus: &Bus,
    connect: &ConnectArgs,
    topic: &str,
    value: &Value,
    ttl: Duration,
) -> Result<(), CliError> {
    match bus.publish_acked(topic, value).await {
        Ok(report) => {
            if connect.json_output() {
                output::line(&report_json(&report));
            } else {
                output::line(&report_text(&report));
            }
            Ok(())
        }
        Err(CallError::App {
            error: PublishError::InvalidTopic { topic, reason },
            ..
        }) => Err(
            CliError::new(format!("`{topic}` is not a valid topic: {reason}")).hint(
                "a topic has 1 or more `/`-separated levels, no `+`, `#` or control \
                 characters (the wildcards are for `chatter subscribe`)",
            ),
        ),
        Err(CallError::DeadlineExceeded) => Err(CliError::new(format!(
            "no report on the publication on `{topic}` within {ttl:?}: a subscriber had not \
             taken it yet"
        ))
        .hint("--ttl waits longer")),
        Err(error) => Err(broker_call_failed(connect, "publishing", topic, error)),
    }
}

/// `{"subscribers":…,"delivered":…,"missed":[…]}`, in the broker's order.
fn report_json(report: &PublishReport) -> String {
    let missed = Value::from(report.missed.clone());
    format!(
        "{{\"subscribers\":{},\"delivered\":{},\"missed\":{missed}}}",
        report.subscribers, report.delivered
    )
}

/// `delivered to 2 of 3 subscribers; missed: dashboard`.
fn report_text(report: &PublishReport) -> String {
    let mut text = format!(
        "delivered to {} of {} subscriber{}",
        report.delivered,
        report.subscribers,
        if report.subscribers == 1 { "" } else { "s" }
    );
    if !report.missed.is_empty() {
        text.push_str(&format!("; missed: {}", report.missed.join(", ")));
    }
    text
}

/// Connects to the broker at the URL without a name.
async fn bus(connect: &ConnectArgs, peer: PeerOptions) -> Result<Bus, CliError> {
    let (address, options) = connect.target()?;
    let options = BusOptions::new().connection(options).peer(peer);
    match chatter_broker::connect_unnamed(&address, options).await {
        Ok(bus) => Ok(bus),
        Err(BusError::Connect(error)) => Err(connect.connect_failed(&address, error)),
        Err(other) => Err(CliError::new(format!("{}: {other}", connect.url))),
    }
}

/// Why the broker did not open the subscription.
fn subscribe_failed(
    connect: &ConnectArgs,
    pattern: &str,
    error: CallError<SubscribeError>,
) -> CliError {
    match error {
        CallError::App {
            error: SubscribeError::InvalidPattern { pattern, reason },
            ..
        } => CliError::new(format!("`{pattern}` is not a valid pattern: {reason}"))
            .hint(PATTERN_SYNTAX),
        CallError::App { error, .. } => {
            CliError::new(format!("{} refused the subscription: {error}", connect.url))
        }
        other => broker_call_failed(connect, "subscribing to", pattern, other),
    }
}

/// A call of the broker's object that failed for a reason other than its own errors:
/// most usefully, a peer that is not a broker.
fn broker_call_failed<E: std::fmt::Display>(
    connect: &ConnectArgs,
    doing: &str,
    what: &str,
    error: CallError<E>,
) -> CliError {
    match error {
        CallError::NoSuchObject { .. } | CallError::NoSuchMethod { .. } => CliError::new(format!(
            "{} is not a chatter broker: it has no `{BROKER_OBJECT}` object with publish \
             and subscribe",
            connect.url
        ))
        .hint("run one with `chatter-broker --listen URL`; `chatter list URL` shows what a peer serves"),
        other => CliError::new(format!("{doing} `{what}` failed: {other}")),
    }
}

/// How a subscription that was running ended with an error.
fn subscription_ended(
    connect: &ConnectArgs,
    pattern: &str,
    seen: u64,
    error: StreamError,
) -> CliError {
    let after = format!("after {seen} message{}", if seen == 1 { "" } else { "s" });
    match error {
        StreamError::Lagged(why) => CliError::new(format!(
            "the broker ended the subscription to `{pattern}` {after}: this subscriber fell \
             behind ({why})"
        ))
        .hint(
            "--policy end ends a subscriber that lets more than --queue-bytes wait at the \
             broker: raise --queue-bytes, or choose --policy drop-oldest (the default), \
             drop-newest, or backpressure (publishers wait)",
        ),
        StreamError::ConnectionLost(why) => CliError::new(format!(
            "the connection to the broker at {} closed {after}: {why}",
            connect.url
        ))
        .hint("is the broker still running? What is published until you subscribe again is lost"),
        other => CliError::new(format!(
            "the subscription to `{pattern}` failed {after}: {other}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn publications_as_json_lines_keep_topic_value_missed_in_order() {
        let value = json!({"c": 21.5});
        assert_eq!(
            publication_line("sensors/7/temp", &value, 0, true, false),
            r#"{"topic":"sensors/7/temp","value":{"c":21.5}}"#
        );
        assert_eq!(
            publication_line("a\"b", &json!(7), 3, true, false),
            r#"{"topic":"a\"b","value":7,"missed":3}"#
        );
    }

    #[test]
    fn publications_read_as_lines_on_a_terminal() {
        assert_eq!(
            publication_line("t/1", &json!("hi"), 0, false, false),
            r#"t/1  "hi""#
        );
        assert_eq!(
            publication_line("t/1", &json!(1), 2, false, false),
            "t/1  1  (2 missed before this one: the subscriber fell behind)"
        );
        let online = json!({"peer": "pump-1", "online": true});
        assert_eq!(
            publication_line("$broker/presence/pump-1", &online, 0, false, true),
            "pump-1  online"
        );
        let offline = json!({"peer": "pump-1", "online": false});
        assert_eq!(
            publication_line("$broker/presence/pump-1", &offline, 0, false, true),
            "pump-1  offline"
        );
        // Not a presence value: as any publication.
        assert_eq!(
            publication_line("$broker/presence/x", &json!(1), 0, false, true),
            "$broker/presence/x  1"
        );
    }

    #[test]
    fn reports_read_as_a_sentence() {
        let report: PublishReport = serde_json::from_value(
            json!({"subscribers": 3, "delivered": 2, "missed": ["dashboard"]}),
        )
        .expect("a report");
        assert_eq!(
            report_text(&report),
            "delivered to 2 of 3 subscribers; missed: dashboard"
        );
        assert_eq!(
            report_json(&report),
            r#"{"subscribers":3,"delivered":2,"missed":["dashboard"]}"#
        );
    }

    #[test]
    fn policies_map_to_the_brokers() {
        assert_eq!(
            SlowSubscriber::from(Policy::DropOldest),
            SlowSubscriber::DropOldest
        );
        assert_eq!(SlowSubscriber::from(Policy::End), SlowSubscriber::End);
    }
}
