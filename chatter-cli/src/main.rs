//! `chatter`: list, describe, call, watch the streams of, signal, ping and read the
//! counters of a running chatter RPC peer from the shell, through the peer's built-in `chatter.introspect` object
//! (chatter-rpc's `introspect` module).
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
methods, watch their streams and send signals with JSON arguments, ping it, read its counters.";

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
  chatter ping tls://example.com:7443 --ca ca.pem -c 3";

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
    /// Subscribe to a broker's topics: one JSON line per message (needs the broker: not in
    /// this build).
    #[command(after_help = "Example:
  chatter subscribe tcp://127.0.0.1:7000 'sensors.*'")]
    Subscribe {
        #[command(flatten)]
        connect: ConnectArgs,
        /// The topic pattern.
        pattern: String,
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
        Command::Subscribe { .. } => Err(CliError::new(
            "`chatter subscribe` needs the pub/sub broker (issue 18), which this build of \
             chatter does not have",
        )
        .hint("the broker is not merged yet; rebuild chatter-cli once it is")),
        Command::Ping {
            connect,
            count,
            interval,
        } => commands::ping(&connect, count, interval).await,
        Command::Stats { connect } => commands::stats(&connect).await,
    }
}
