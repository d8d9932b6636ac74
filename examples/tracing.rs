//! Logging and tracing: chatter-rpc's spans printed by `tracing-subscriber`, joined across
//! the two sides of a call by their trace id, with a nested call (a handler calling back
//! the caller) in the same trace, and what a handler learns from `CallContext::current()`.
//!
//! Run with `RUST_LOG=chatter_rpc=debug cargo run --example tracing` (without `RUST_LOG`,
//! only `info` lines print: the example's own, inside chatter's spans only when those
//! are enabled).

use chatter_rpc::{connect, listen, remote, CallContext, Options, Peer, PeerOptions, TraceParent};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::EnvFilter;

#[remote]
pub trait Greeter {
    /// Greets the caller, after asking it (a nested call back over the same connection)
    /// for its name.
    async fn greet(&self) -> String;
}

#[remote]
pub trait Directory {
    /// The caller's name.
    async fn name(&self) -> String;
}

struct Greeting {
    /// Calls back the client on its connection.
    directory: DirectoryClient,
}

impl Greeter for Greeting {
    async fn greet(&self) -> String {
        let cx = CallContext::current().expect("inside a handler");
        tracing::info!(target: "example",
            caller = %cx.remote_address(),
            user = cx.metadata().get("user").unwrap_or("?"),
            trace = ?cx.trace_parent().map(|t| t.to_string()),
            "greet: what the handler's context says"
        );
        // Made inside the handler: carries the caller's trace id on, with this
        // handler's span as its parent.
        let name = self.directory.name().await.unwrap_or_default();
        format!("hello, {name}")
    }
}

struct Names;

impl Directory for Names {
    async fn name(&self) -> String {
        let trace = CallContext::current().and_then(|cx| cx.trace_parent());
        tracing::info!(target: "example", trace = ?trace.map(|t| t.to_string()), "name: called back");
        "ada".to_owned()
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `RUST_LOG=chatter_rpc=debug` adds chatter's spans and events (at debug level) to
    // the `info` lines shown by default.
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env_lossy()
        .add_directive("example=info".parse()?);
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true)
        .init();

    let listener = listen("tcp://127.0.0.1:0", Options::default()).await?;
    let conn = connect(&listener.addresses()[0], Options::default()).await?;
    let server = Peer::new(listener.accept().await.ok_or("no connection")?);
    server.register(
        "greeter",
        GreeterServer::new(Greeting {
            directory: DirectoryClient::new(&server, "directory"),
        }),
    );
    // `start_traces`: a call made outside any trace starts one (while the call span is
    // enabled), so that both sides' spans carry a trace id.
    let client = Peer::with_options(conn, PeerOptions::default().start_traces(true));
    client.register("directory", DirectoryServer::new(Names));

    // A trace started here...
    let greeter = GreeterClient::new(&client, "greeter").with_metadata("user", "ada");
    // (Called outside `info!`: a macro whose level is off does not evaluate its fields.)
    let reply = greeter.greet().await?;
    tracing::info!(target: "example", reply, "first call");

    // ...and one given by the application (from OpenTelemetry, an incoming HTTP
    // request's `traceparent` header, ...): both sides' spans use its trace id.
    let parent: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse()?;
    let greeter = greeter.with_trace_parent(parent);
    let reply = greeter.greet().await?;
    tracing::info!(target: "example", reply, "second call, in trace 4bf92f35…");

    client.close().await;
    Ok(())
}
