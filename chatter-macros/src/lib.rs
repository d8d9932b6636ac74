//! The `#[remote]` attribute of the chatter RPC framework. Use it through
//! [`chatter_rpc::remote`](https://docs.rs/chatter-rpc); this crate holds only the macro.
//!
//! The code is organised like serde_derive: [`remote`] is the entry point, `ast` builds the
//! model of the trait, `attr` parses attributes, `check` runs cross-item checks, and
//! `expand` generates code. Every problem is a `syn::Error` on the offending tokens, and all
//! of them are reported in one compile.

#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
#![forbid(unsafe_code)]

use proc_macro::TokenStream;

mod ast;
mod attr;
mod check;
mod ctxt;
mod describe;
mod expand;
mod stream;

/// Turns a trait into a remote interface: generates `{Trait}Client` and `{Trait}Server`.
///
/// Methods are `async fn name(&self, args..) -> T` or `-> Result<T, E>` (a type spelled
/// `Result` with two arguments), where the arguments, `T` and `E` are owned serde types.
/// A method marked `#[signal]` or `#[signal(ttl = "30s")]` (units `ms`, `s`, `m`, `h`)
/// returns nothing and gets no reply; `#[signal(persistent)]` (alone or after the TTL)
/// makes it persistent: through a reconnecting
/// [`Peer`](../chatter_rpc/struct.Peer.html) with a store, it is written to disk before
/// the send completes. Doc comments and lint attributes are copied to the
/// generated client methods.
///
/// ```ignore
/// #[chatter_rpc::remote]
/// pub trait Calculator {
///     /// Adds.
///     async fn add(&self, a: i64, b: i64) -> i64;
///     async fn div(&self, a: i64, b: i64) -> Result<i64, CalcError>;
///     #[signal(ttl = "5s")]
///     async fn log(&self, line: String);
///     #[signal(ttl = "1h", persistent)]
///     async fn audit(&self, line: String);
/// }
/// ```
///
/// expands to (bodies elided, paths shortened from `::chatter_rpc::__private::…`):
///
/// ```ignore
/// // The trait, with each `async fn` as `fn -> impl Future + Send` so handlers can be
/// // spawned. Implement it with plain `async fn`s.
/// pub trait Calculator {
///     /// Adds.
///     fn add(&self, a: i64, b: i64) -> impl Future<Output = i64> + Send;
///     fn div(&self, a: i64, b: i64) -> impl Future<Output = Result<i64, CalcError>> + Send;
///     fn log(&self, line: String) -> impl Future<Output = ()> + Send;
///     fn audit(&self, line: String) -> impl Future<Output = ()> + Send;
/// }
///
/// /// Client of a remote `Calculator` object.
/// #[derive(Clone, Debug)]
/// pub struct CalculatorClient { /* peer, object name, deadline, ttl */ }
///
/// impl CalculatorClient {
///     pub fn new(peer: &chatter_rpc::Peer, object: &str) -> Self;
///     pub fn with_deadline(&self, deadline: Duration) -> Self; // per-call override
///     pub fn with_ttl(&self, ttl: Duration) -> Self;           // per-send signal TTL
///     pub fn with_metadata(&self, key: &str, value: &str) -> Self; // sent with each request
///     pub fn with_trace_parent(&self, trace: chatter_rpc::TraceParent) -> Self;
///     pub fn persistent(&self) -> Self;                        // every signal persistent
///     pub fn deadline(&self) -> Duration;
///     pub fn peer(&self) -> &chatter_rpc::Peer;
///     pub fn object(&self) -> &str;
///
///     /// Adds.
///     pub fn add(&self, a: i64, b: i64)
///         -> impl Future<Output = Result<i64, CallError>> + Send + 'static;
///     pub fn div(&self, a: i64, b: i64)
///         -> impl Future<Output = Result<i64, CallError<CalcError>>> + Send + 'static;
///     /// A signal: queued when awaited, without a reply; ...
///     pub fn log(&self, line: String)
///         -> impl Future<Output = Result<Sent, SignalError>> + Send + 'static;
///     pub fn audit(&self, line: String)
///         -> impl Future<Output = Result<Sent, SignalError>> + Send + 'static;
/// }
///
/// /// Serves any `impl Calculator` as a remote object.
/// #[derive(Clone, Debug)]
/// pub struct CalculatorServer<T> { /* Arc<T> */ }
///
/// impl<T> CalculatorServer<T> {
///     pub fn new(object: T) -> Self;
///     pub fn from_arc(object: Arc<T>) -> Self;
///     pub fn object(&self) -> &Arc<T>;
/// }
///
/// // Its `description()` is a static record of the trait (name, docs, each method's kind,
/// // argument names and types, return and error types): `chatter_rpc::introspect`.
/// impl<T: Calculator + Send + Sync + 'static> chatter_rpc::Service for CalculatorServer<T> {}
/// ```
///
/// Call and signal futures own everything they need (`'static`), so they can be spawned
/// or stored. The client methods' arguments are encoded when the method is called, not
/// when the future is first polled. A call is sent when its future is first polled: one
/// dropped before that sends nothing, one dropped while it waits for its reply tells the
/// callee to cancel. Call futures are small (about 100 bytes) and `Unpin`, so they can be
/// polled through `&mut` without pinning. A signal is queued when its future is first
/// polled, and the future is ready at once unless the peer's outbox is full: then it
/// waits for room, at most the signal's TTL (`WhenFull::Wait`, the default).
///
/// # Options
///
/// - **`#[result]`** on a method whose return type is an alias of `Result`
///   (`type Res<T> = Result<T, MyError>`, `io::Result<T>`): a macro sees only tokens, so it
///   cannot tell that `Res<T>` is a `Result`; with `#[result]` its `Err` is the application
///   error, as for `Result<T, E>` written out (the client returns
///   `Result<T, CallError<MyError>>`). Without it, a return type whose name ends in
///   `Result` but is not `Result<T, E>` is a compile error that asks you to choose; an alias
///   with another name (`Res<T>`) cannot be detected and is sent as a plain value.
/// - **`#[plain]`** on a method returning `Result<T, E>`: the `Result` itself is the return
///   value (the client returns `Result<Result<T, E>, CallError>`), for an operation whose
///   `Err` is an ordinary outcome rather than a failure.
/// - **`#[remote(crate = "path")]`**: the path to chatter-rpc when it is not
///   `::chatter_rpc`, for example `crate = "rpc"` with `rpc = { package = "chatter-rpc" }`
///   in Cargo.toml, or a module that re-exports it.
/// - **Raw identifiers** are named without `r#` on the wire: `async fn r#type(&self)` is
///   called as `type`, which is what a peer in another language writes.
///
/// (The example is compiled and run in
/// `chatter-rpc/tests/rpc_macro_options.rs`.)
///
/// ```ignore
/// use chatter_rpc::remote;
///
/// pub type Res<T> = Result<T, NotFound>;
///
/// #[remote]
/// pub trait Store {
///     #[result]
///     async fn get(&self, key: u32) -> Res<String>;
///     #[plain]
///     async fn parse(&self, text: String) -> Result<i64, String>;
///     async fn r#type(&self) -> String;
/// }
/// ```
///
/// # Streams
///
/// A method can return a stream of items, take one, or both, with one type on both sides:
/// [`chatter_rpc::stream::Receiver<T>`](../chatter_rpc/stream/struct.Receiver.html), for
/// items of any serde type. The callee returns a `Receiver` (from
/// [`stream::channel`](../chatter_rpc/stream/fn.channel.html), whose `Sender` it feeds, or
/// `Receiver::from_stream` of any `futures::Stream`); the caller passes one and feeds its
/// `Sender` while the call runs. Why one type rather than a `Stream`/`Sink` pair per shape:
/// the callee's code for an argument stream reads like the caller's for a result stream, a
/// `Receiver` made locally works in a unit test without a connection, and a `Receiver` is a
/// `futures::Stream` of `Result<T, StreamError>`.
///
/// ```no_run
/// use chatter_rpc::stream::{self, Receiver};
/// use chatter_rpc::{remote, Peer};
///
/// #[derive(Debug, serde::Serialize, serde::Deserialize)]
/// pub enum FsError { NotFound, Interrupted(String) }
///
/// #[remote]
/// pub trait Files {
///     /// Server streaming: the callee returns a receiver, the caller reads it.
///     async fn watch(&self, dir: String) -> Result<Receiver<String>, FsError>;
///     /// Client streaming: the caller passes a receiver, the callee reads it.
///     async fn upload(&self, name: String, data: Receiver<Vec<u8>>) -> Result<u64, FsError>;
///     /// Both ways.
///     async fn chat(&self, input: Receiver<String>) -> Receiver<String>;
/// }
///
/// struct Disk;
///
/// impl Files for Disk {
///     async fn watch(&self, dir: String) -> Result<Receiver<String>, FsError> {
///         let (tx, rx) = stream::channel(16);
///         tokio::spawn(async move {
///             for event in ["created", "deleted"] {
///                 // Fails once the caller dropped its receiver: stop then.
///                 if tx.send(format!("{dir}: {event}")).await.is_err() {
///                     break;
///                 }
///             }
///         }); // `tx` dropped: the stream ends normally.
///         Ok(rx)
///     }
///
///     async fn upload(&self, _name: String, mut data: Receiver<Vec<u8>>) -> Result<u64, FsError> {
///         let mut size = 0;
///         while let Some(chunk) = data.recv().await {
///             // An `Err` says why the stream broke (connection lost, ...).
///             size += chunk.map_err(|e| FsError::Interrupted(e.to_string()))?.len() as u64;
///         }
///         Ok(size) // `None`: the caller ended the stream.
///     }
///
///     async fn chat(&self, mut input: Receiver<String>) -> Receiver<String> {
///         let (tx, rx) = stream::channel(4);
///         tokio::spawn(async move {
///             while let Some(Ok(line)) = input.recv().await {
///                 if tx.send(line.to_uppercase()).await.is_err() {
///                     break;
///                 }
///             }
///         });
///         rx
///     }
/// }
///
/// async fn caller(peer: &Peer) -> Result<(), Box<dyn std::error::Error>> {
///     let files = FilesClient::new(peer, "files");
///
///     // The reply is the stream; its items are `Result<T, StreamError>`.
///     let mut events = files.watch("/tmp".into()).await?;
///     while let Some(event) = events.recv().await {
///         println!("{}", event?);
///     }
///
///     // Pass the receiver, feed the sender while the call runs; dropping the sender
///     // ends the callee's stream.
///     let (tx, rx) = stream::channel(16);
///     let feed = async move {
///         for _ in 0..4 {
///             tx.send(vec![0u8; 64 * 1024]).await?;
///         }
///         Ok::<_, stream::Closed<Vec<u8>>>(())
///     };
///     let (size, fed) = tokio::join!(files.upload("a.bin".into(), rx), feed);
///     assert_eq!(size?, 256 * 1024);
///     fed?;
///
///     let (tx, rx) = stream::channel(4);
///     let mut answers = files.chat(rx).await?;
///     tx.send("hello".to_owned()).await?;
///     assert_eq!(answers.recv().await.transpose()?.as_deref(), Some("HELLO"));
///     Ok(())
/// }
///
/// fn callee(peer: &Peer) {
///     peer.register("files", FilesServer::new(Disk));
/// }
/// ```
///
/// The generated client methods (bodies elided; `Receiver` is
/// `chatter_rpc::stream::Receiver`):
///
/// ```ignore
/// impl FilesClient {
///     pub fn watch(&self, dir: String)
///         -> impl Future<Output = Result<Receiver<String>, CallError<FsError>>> + Send + 'static;
///     pub fn upload(&self, name: String, data: Receiver<Vec<u8>>)
///         -> impl Future<Output = Result<u64, CallError<FsError>>> + Send + 'static;
///     pub fn chat(&self, input: Receiver<String>)
///         -> impl Future<Output = Result<Receiver<String>, CallError>> + Send + 'static;
/// }
/// ```
///
/// and `FilesServer<T>` serves any `impl Files` as for calls. The call's deadline covers
/// opening only: the handler must return its `Receiver` (or, for a method taking a stream,
/// start) within the deadline; after that, a stream ends when its writer ends
/// it, when either side drops its end, when the connection is lost, or at the reader's
/// idle timeout (`Receiver::set_idle_timeout`). An application error returned instead of
/// the stream (`Err(FsError)`) is the call's `CallError::App`; errors in the middle of a
/// stream are items (`Receiver<Result<T, E>>`). Stream calls do not take a handler slot:
/// they count against `PeerOptions::max_streams`. What else a stream promises (order,
/// cancellation, flow control) is in the
/// [`chatter_rpc::stream`](../chatter_rpc/stream/index.html) docs.
///
/// `Receiver` is recognised by its path, since a macro sees only tokens: `Receiver<T>`,
/// `stream::Receiver<T>`, `chatter_rpc::stream::Receiver<T>` or, with
/// `#[remote(crate = "path")]`, `path::stream::Receiver<T>` (or the path's last segments:
/// `rpc::stream::Receiver<T>` for `crate = "crate::rpc"`). A `Receiver` of another path
/// (`mpsc::Receiver<T>`) is an ordinary value. Compile errors name the
/// misuses: more than one `Receiver` argument, a `Receiver` in a signal, a `Receiver`
/// inside another type (`Vec<Receiver<T>>`, `Option<Receiver<T>>`, a tuple, an error type),
/// a `Sender` as an argument or result (pass a `Receiver` instead), `#[idempotent]` on a
/// method with a stream (a call that opens one is never re-sent), and `#[plain]` on a
/// `Result` holding one. With `#[result]`, the stream must be written in the alias's first
/// argument (`Res<Receiver<T>>`): an alias that hides it (`type Feed = Result<Receiver<T>,
/// E>`) is not seen, and the `Receiver` is then reported as a value that cannot be sent.
///
/// Every argument, return and application error type must implement serde's `Serialize`
/// and `Deserialize` (`DeserializeOwned`). A type that does not is reported at the type
/// in the trait, once for each trait it lacks, for example ``error[E0277]: `Point` cannot
/// be sent by chatter: it does not implement `Serialize` `` with a note to add
/// `#[derive(serde::Serialize, serde::Deserialize)]`. (For a type inside another, as in
/// `Vec<Point>`, the error names the outer type.) An application error type needs nothing
/// else: `Display` or `std::error::Error`, when it has them, only enrich the context the
/// caller receives.
///
/// Misuse is a compile error on the offending tokens: a method that is not `async`, a
/// receiver other than `&self`, generic methods or traits, borrowed argument or return
/// types, a signal with a return value, duplicate method names, names that clash with the
/// generated client's methods (`new`, `with_deadline`, `with_ttl`, `with_metadata`,
/// `with_trace_parent`, `persistent`,
/// `deadline`, `peer`, `object`, `clone`, `fmt`), items other than methods, and unknown attributes.
#[proc_macro_attribute]
pub fn remote(args: TokenStream, input: TokenStream) -> TokenStream {
    expand::remote(args.into(), input.into())
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}
