//! `chatter`: list, describe, call, watch the streams of, signal, ping and read the
//! counters of a running chatter RPC peer from the shell, through the peer's built-in `chatter.introspect` object
//! (chatter-rpc's `introspect` module); and publish and subscribe through a chatter broker
//! (chatter-broker's client).
//!
//! Arguments and replies are JSON (translated to and from MessagePack as chatter-rpc's
//! `PROTOCOL.md` "Values" describes). Output is a table or pretty JSON on a terminal, one
//! JSON value per line when piped (or with `--json`). Exit status: 0 on success, 1 on any
//! error (local or remote), 2 for a command line that does not parse.

#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod broker;
mod commands;
mod connect;
mod error;
mod json;
mod output;
mod shapes;
mod stdin;

use connect::ConnectArgs;
use error::CliError;

const ABOUT: &str = "Talk to a running chatter RPC peer: list its objects, describe them, call \
methods, watch their streams and send signals with JSON arguments, ping it, read its counters; \
publish and subscribe through a chatter broker.";

const AFTER_HELP: &str = "\
URLs are chatter addresses: tcp://HOST:PORT, tls://HOST:PORT or unix:///PATH.

Output is a table or pretty JSON on a terminal (or with --pretty), one JSON value per line
when piped (or with --json). Exit status: 0 on success, 1 on an error (local or remote), 2 for a bad command line.

Examples:
  chatter list tcp://127.0.0.1:7000
  chatter describe tcp://127.0.0.1:7000 calc
  chatter call tcp://127.0.0.1:7000 calc.add 2 3
  chatter watch tcp://127.0.0.1:7000 sensors.readings '\"kitchen\"' --count 10
  chatter emit unix:///run/app.sock log.line '\"hello\"' --ttl 5s
  chatter ping tls://example.com:7443 --ca ca.pem -c 3
  chatter subscribe tcp://127.0.0.1:7000 'sensors/+/temp'      (through a chatter-broker)
  chatter publish tcp://127.0.0.1:7000 sensors/7/temp 21.5";

const SUBSCRIBE_HELP: &str = "\
Prints one line per publication. On a terminal (or with --pretty): TOPIC  VALUE, the value as
JSON. Piped (or with --json): one JSON object per line,
  {\"topic\":\"sensors/7/temp\",\"value\":21.5}
with \"missed\":N added when the broker dropped N publications for this subscriber before
this one.

Patterns are topics whose levels (separated by /) may be + (any one level) or, as the last
level, # (any number of levels, none included: sensors/# matches sensors too); quote them
for the shell. A pattern that begins with a wildcard does not match the broker's own topics
($broker/...). --presence subscribes to $broker/presence/+: first every peer registered
now, then each that registers or disconnects, as NAME  online|offline on a terminal and
values {\"peer\":NAME,\"online\":true|false} when piped.

When this subscriber falls behind, the broker keeps up to --queue-bytes (256 KiB, each
publication counting its topic, its value and 64 bytes) waiting for it, then follows
--policy: drop-oldest (the default), drop-newest, end (the broker ends the subscription:
exit status 1) or backpressure (nothing is lost: the publishers wait).

It connects without a name: the broker serves unnamed connections. So the subscriber does
not show in presence, and a `chatter publish --ack` report counts it among the subscribers
that missed a publication without naming it.

Runs until Ctrl-C or --count N publications (exit 0), or until the broker ends the
subscription: exit 1 when it ends it because this subscriber fell behind, or when the
connection drops (the broker stopping included).

Examples:
  chatter subscribe tcp://127.0.0.1:7000 'sensors/+/temp'
  chatter subscribe tcp://127.0.0.1:7000 '#' --count 10 | jq .value
  chatter subscribe tcp://127.0.0.1:7000 'alarms/#' --policy backpressure
  chatter subscribe tcp://127.0.0.1:7000 --presence";

const PUBLISH_HELP: &str = "\
VALUE is one JSON value, as an argument of `chatter call`: numbers as they are, strings in
double quotes (quoted for the shell too), objects, arrays. It travels as MessagePack; a
subscriber in Rust decodes it as its own type.

Without --ack, it exits once the broker took the publication (status 1 if the broker
refused it: an invalid topic). With --ack, it waits until every subscription that matched
the topic had the publication delivered or dropped, and prints the report:
  {\"subscribers\":2,\"delivered\":1,\"missed\":[\"dashboard\"]}
(subscribers by name, unnamed ones by address). Exit status 1 if the broker refused the
topic; a subscriber that missed the publication is not an error.

It connects without a name: the broker serves unnamed connections.

Examples:
  chatter publish tcp://127.0.0.1:7000 sensors/7/temp 21.5
  chatter publish tcp://127.0.0.1:7000 alarms/boiler '{\"level\": \"high\"}' --ack
  chatter publish tcp://127.0.0.1:7000 log/app '\"started\"' --ttl 5s
  for i in 1 2 3; do chatter publish tcp://127.0.0.1:7000 counter $i; done";

/// The command line.
#[derive(Debug, Parser)]
#[command(name = "chatter", version, about = ABOUT, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the objects a peer serves, with their interfaces and methods.
    #[command(after_help = "Examples:
  chatter list tcp://127.0.0.1:7000
  chatter list unix:///run/app.sock --json | jq -r .object")]
    List {
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Describe an object: its methods with argument names and types, and their docs.
    #[command(
        after_help = "Under each method, the shapes of its argument, return and error types when they
say more than the type's name: `p: Point { x: f64, y: f64 }`, `figure: Figure =
Circle { r: f64 } | Square(f64) | Empty`. A struct is written in JSON as an object
keyed by field name, a unit variant as \"Empty\", another variant as {\"Square\": 2.0}.
With --json, the description's \"shapes\" map gives each type's shape in full.

Examples:
  chatter describe tcp://127.0.0.1:7000 calc
  chatter describe tcp://127.0.0.1:7000 calc --json | jq .shapes
  chatter describe tcp://127.0.0.1:7000 chatter.introspect"
    )]
    Describe {
        #[command(flatten)]
        connect: ConnectArgs,
        /// The object's name (as `chatter list` shows it).
        object: String,
    },
    /// Call a method with JSON arguments and print its reply as JSON.
    #[command(
        after_help = "Each ARG is one JSON value, in the method's argument order: numbers as they are,
strings in double quotes (quote them for the shell too), structs as objects, enums
as \"Variant\" or {\"Variant\": ...}. `chatter describe` shows what a method takes.

A method that takes an argument stream gets its items from stdin with --stdin, one JSON
value per line; the end of stdin ends the stream.

Examples:
  chatter call tcp://127.0.0.1:7000 calc.add 2 3
  chatter call tcp://127.0.0.1:7000 users.find '\"ada\"' '{\"active\": true}'
  chatter call tcp://127.0.0.1:7000 calc.slow_square 4 2000 --deadline 500ms
  seq 1 100 | chatter call tcp://127.0.0.1:7000 stats.sum --stdin"
    )]
    Call {
        #[command(flatten)]
        connect: ConnectArgs,
        /// The object and the method, as OBJECT.METHOD (the method is after the last dot).
        target: String,
        /// The arguments, one JSON value each.
        #[arg(allow_negative_numbers = true)]
        args: Vec<String>,
        /// How long to wait for the reply: 500ms, 30s, 2m (a number alone is seconds).
        #[arg(long, value_name = "TIME", default_value = "30s", value_parser = connect::parse_duration)]
        deadline: std::time::Duration,
        /// Send stdin, one JSON value per line, as the method's argument stream.
        #[arg(long)]
        stdin: bool,
    },
    /// Send a signal (a one-way method) with JSON arguments.
    #[command(
        after_help = "Waits until the receiver acknowledges that the handler ran (or says it could
not), unless --no-ack.

Examples:
  chatter emit tcp://127.0.0.1:7000 calc.log '\"hello\"'
  chatter emit tcp://127.0.0.1:7000 calc.log '\"hello\"' --ttl 5s --no-ack"
    )]
    Emit {
        #[command(flatten)]
        connect: ConnectArgs,
        /// The object and the signal, as OBJECT.SIGNAL.
        target: String,
        /// The arguments, one JSON value each.
        #[arg(allow_negative_numbers = true)]
        args: Vec<String>,
        /// How long the signal may take to reach its handler (default: the method's
        /// declared TTL, else 30s): 500ms, 30s, 2m.
        #[arg(long, value_name = "TIME", value_parser = connect::parse_duration)]
        ttl: Option<std::time::Duration>,
        /// Do not wait for the receiver's acknowledgement: only hand the signal to the
        /// connection.
        #[arg(long)]
        no_ack: bool,
    },
    /// Watch a method that returns a stream: one JSON value per item, until the stream ends.
    #[command(
        after_help = "The arguments are as for `chatter call`. Exits 0 when the stream ends normally (or
after --count items, which cancels the stream on the server), 1 when it fails.
--deadline covers opening the stream only; --idle-timeout bounds the wait for each item.

With --stdin, stdin's lines (one JSON value each) are the method's argument stream.

Examples:
  chatter watch tcp://127.0.0.1:7000 sensors.readings '\"kitchen\"'
  chatter watch tcp://127.0.0.1:7000 sensors.readings '\"kitchen\"' --count 10 --idle-timeout 5s"
    )]
    Watch {
        #[command(flatten)]
        connect: ConnectArgs,
        /// The object and the streaming method, as OBJECT.METHOD.
        target: String,
        /// The arguments, one JSON value each.
        #[arg(allow_negative_numbers = true)]
        args: Vec<String>,
        /// How long to wait for the stream to open: 500ms, 30s, 2m (a number alone is
        /// seconds).
        #[arg(long, value_name = "TIME", default_value = "30s", value_parser = connect::parse_duration)]
        deadline: std::time::Duration,
        /// Fail when no item arrives for this long: 500ms, 30s, 2m (default: wait forever).
        #[arg(long, value_name = "TIME", value_parser = connect::parse_duration)]
        idle_timeout: Option<std::time::Duration>,
        /// Stop after N items (the stream is cancelled on the server).
        #[arg(short, long, value_name = "N")]
        count: Option<u64>,
        /// Send stdin, one JSON value per line, as the method's argument stream.
        #[arg(long)]
        stdin: bool,
    },
    /// Subscribe to a broker's topics: one line per publication, with its topic.
    #[command(after_help = SUBSCRIBE_HELP)]
    Subscribe {
        #[command(flatten)]
        connect: ConnectArgs,
        /// The topic pattern: levels separated by /, + for any one level, a last # for any
        /// number of levels.
        #[arg(required_unless_present = "presence")]
        pattern: Option<String>,
        /// Subscribe to presence ($broker/presence/+): the peers registered with the
        /// broker, then each that comes or goes.
        #[arg(long, conflicts_with = "pattern")]
        presence: bool,
        /// What the broker does when this subscriber falls behind (default: drop-oldest).
        #[arg(long, value_enum, value_name = "POLICY")]
        policy: Option<broker::Policy>,
        /// How many bytes of publications may wait at the broker for this subscriber
        /// (default 262144; the broker caps it).
        #[arg(long, value_name = "BYTES")]
        queue_bytes: Option<usize>,
        /// Stop after N publications (the subscription is cancelled at the broker).
        #[arg(short, long, value_name = "N")]
        count: Option<u64>,
    },
    /// Publish a JSON value on a broker's topic.
    #[command(after_help = PUBLISH_HELP)]
    Publish {
        #[command(flatten)]
        connect: ConnectArgs,
        /// The topic: levels separated by /, without + or #.
        topic: String,
        /// The value: one JSON value.
        #[arg(allow_negative_numbers = true)]
        value: String,
        /// How long the publication may wait at the broker for a subscriber (with --ack,
        /// also how long to wait for the report): 500ms, 30s, 2m.
        #[arg(long, value_name = "TIME", default_value = "30s", value_parser = connect::parse_duration)]
        ttl: std::time::Duration,
        /// Wait until every matching subscriber got it or lost it, and print the report
        /// (subscribers, delivered, missed).
        #[arg(long)]
        ack: bool,
    },
    /// Measure round trips to a peer, like ping(8).
    #[command(
        after_help = "Each ping is a call of chatter.introspect.ping, through the peer's serving path.

Examples:
  chatter ping tcp://127.0.0.1:7000
  chatter ping tcp://127.0.0.1:7000 -c 10 -i 100ms"
    )]
    Ping {
        #[command(flatten)]
        connect: ConnectArgs,
        /// How many pings to send.
        #[arg(short, long, default_value_t = 4)]
        count: u32,
        /// The time between pings: 1s, 100ms.
        #[arg(short, long, value_name = "TIME", default_value = "1s", value_parser = connect::parse_duration)]
        interval: std::time::Duration,
    },
    /// Show the peer's counters (calls received, signals sent, handler panics, ...).
    #[command(
        after_help = "The counters are those of the peer that serves this connection: a server made
with chatter_rpc::serve has one peer per connection, so they count this connection only.

Example:
  chatter stats tcp://127.0.0.1:7000"
    )]
    Stats {
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return report(CliError::new(format!("cannot start the runtime: {e}"))),
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(e),
    }
}

fn report(error: CliError) -> ExitCode {
    eprintln!("{error}");
    ExitCode::FAILURE
}

async fn run(command: Command) -> Result<(), CliError> {
    match command {
        Command::List { connect } => commands::list(&connect).await,
        Command::Describe { connect, object } => commands::describe(&connect, &object).await,
        Command::Call {
            connect,
            target,
            args,
            deadline,
            stdin,
        } => commands::call(&connect, &target, &args, deadline, stdin).await,
        Command::Emit {
            connect,
            target,
            args,
            ttl,
            no_ack,
        } => commands::emit(&connect, &target, &args, ttl, !no_ack).await,
        Command::Watch {
            connect,
            target,
            args,
            deadline,
            idle_timeout,
            count,
            stdin,
        } => {
            let watch = commands::Watch {
                deadline,
                idle_timeout,
                count,
                stdin,
            };
            commands::watch(&connect, &target, &args, watch).await
        }
        Command::Subscribe {
            connect,
            pattern,
            presence,
            policy,
            queue_bytes,
            count,
        } => {
            let subscribe = broker::Subscribe {
                pattern: pattern.unwrap_or_else(|| broker::PRESENCE.to_owned()),
                presence,
                policy,
                queue_bytes,
                count,
            };
            broker::subscribe(&connect, subscribe).await
        }
        Command::Publish {
            connect,
            topic,
            value,
            ttl,
            ack,
        } => broker::publish(&connect, &topic, &value, ttl, ack).await,
        Command::Ping {
            connect,
            count,
            interval,
        } => commands::ping(&connect, count, interval).await,
        Command::Stats { connect } => commands::stats(&connect).await,
    }
}
