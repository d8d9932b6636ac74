//! The commands: each connects, asks, prints and closes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chatter_rpc::__private::{ArgError, ArgsWriter, ClientCore, Method};
use chatter_rpc::introspect::shape::Shape;
use chatter_rpc::introspect::{
    InterfaceDescription, IntrospectClient, IntrospectError, MethodDescription, MethodKind, OBJECT,
};
use chatter_rpc::stream::StreamError;
use chatter_rpc::{AckError, CallError, Peer};
use serde_json::{json, Value};

use crate::connect::ConnectArgs;
use crate::error::CliError;
use crate::json::{parse_args, Json};
use crate::output;
use crate::shapes;
use crate::stdin::StdinFeed;

/// How long introspection calls may take.
const INTROSPECT_DEADLINE: Duration = Duration::from_secs(10);

/// `chatter list URL`.
pub(crate) async fn list(connect: &ConnectArgs) -> Result<(), CliError> {
    let peer = connect.peer(false).await?;
    let objects = introspect(&peer)
        .list()
        .await
        .map_err(|e| introspect_failed(connect, e))?;
    if connect.json_output() {
        for object in &objects {
            output::value(&to_json(object), true);
        }
    } else {
        let rows: Vec<Vec<String>> = objects
            .iter()
            .map(|o| {
                vec![
                    o.object.clone(),
                    o.interface.clone().unwrap_or_else(|| "-".into()),
                    o.methods
                        .iter()
                        .map(|m| {
                            if o.streams.contains(m) {
                                format!("{m} (stream)")
                            } else {
                                m.clone()
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                ]
            })
            .collect();
        output::table(&["OBJECT", "INTERFACE", "METHODS"], &rows);
    }
    peer.close().await;
    Ok(())
}

/// `chatter describe URL OBJECT`.
pub(crate) async fn describe(connect: &ConnectArgs, object: &str) -> Result<(), CliError> {
    let peer = connect.peer(false).await?;
    let description = match describe_object(&peer, connect, object).await? {
        Some(description) => description,
        None => return Err(introspection_off(connect)),
    };
    if connect.json_output() {
        let mut value = to_json(&description);
        if let Value::Object(map) = &mut value {
            map.insert("object".into(), Value::String(object.to_owned()));
        }
        output::value(&value, true);
    } else {
        output::line(&format!("{object}: {}", description.name));
        for line in description.docs.lines() {
            output::line(&format!("    {line}"));
        }
        for method in description.methods.iter() {
            output::line("");
            output::line(&format!("  {}", signature_line(method)));
            for line in method.docs.lines() {
                output::line(&format!("      {line}"));
            }
            for line in shape_lines(method, &description.shapes) {
                output::line(&format!("      {line}"));
            }
        }
    }
    peer.close().await;
    Ok(())
}

/// `chatter call URL OBJECT.METHOD ARGS... --deadline D [--stdin]`.
pub(crate) async fn call(
    connect: &ConnectArgs,
    target: &str,
    args: &[String],
    deadline: Duration,
    stdin: bool,
) -> Result<(), CliError> {
    let (object, method) = split_target(target, "METHOD")?;
    let peer = connect.peer(false).await?;
    let described = check_method(&peer, connect, object, method, Use::Call, stdin).await?;
    let values = parse_json_args(args, connect, object, described.as_ref())?;
    let client = ClientCore::new(&peer, object).with_deadline(deadline);
    let (count, args) = (values.len() as u32, write_args(values));
    let reply = if stdin {
        let (mut feed, input) = StdinFeed::start();
        let reply =
            client.call_input::<Json, Json, _, Value>(method_ref(method), count, args, input);
        tokio::select! {
            reply = reply => reply,
            (error, held) = feed.failed() => {
                // The call's future is gone (which cancels the call), and the connection
                // closes before the stream's sender goes: the callee sees the call fail,
                // never a stream that ended normally.
                peer.close().await;
                drop(held);
                return Err(error);
            }
        }
    } else {
        client
            .call::<Json, Json, _>(method_ref(method), count, args)
            .await
    };
    let result = match reply {
        Ok(Json(value)) => {
            output::value(&value, connect.json_output());
            Ok(())
        }
        Err(error) => Err(call_failed(
            connect,
            object,
            method,
            error,
            described.as_ref(),
            deadline,
        )),
    };
    peer.close().await;
    result
}

/// The options of `chatter watch`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Watch {
    /// `--deadline`: how long opening the stream may take.
    pub(crate) deadline: Duration,
    /// `--idle-timeout`: how long to wait for each item.
    pub(crate) idle_timeout: Option<Duration>,
    /// `--count`: stop after this many items.
    pub(crate) count: Option<u64>,
    /// `--stdin`: send stdin's JSON lines as the argument stream.
    pub(crate) stdin: bool,
}

/// `chatter watch URL OBJECT.METHOD ARGS... --deadline D --idle-timeout T --count N
/// [--stdin]`: the items of a method returning a stream, one JSON value each.
pub(crate) async fn watch(
    connect: &ConnectArgs,
    target: &str,
    args: &[String],
    options: Watch,
) -> Result<(), CliError> {
    let Watch {
        deadline,
        idle_timeout,
        count,
        stdin,
    } = options;
    let (object, method) = split_target(target, "METHOD")?;
    let peer = connect.peer(false).await?;
    let described = check_method(&peer, connect, object, method, Use::Watch, stdin).await?;
    let values = parse_json_args(args, connect, object, described.as_ref())?;
    // The deadline covers opening the stream only (PROTOCOL.md, "Streams").
    let client = ClientCore::new(&peer, object).with_deadline(deadline);
    let (mut feed, input) = match stdin {
        true => {
            let (feed, input) = StdinFeed::start();
            (Some(feed), Some(input))
        }
        false => (None, None),
    };
    let opened = client.call_stream::<Json, Json, _, Value>(
        method_ref(method),
        values.len() as u32,
        write_args(values),
        input,
    );
    let opened = tokio::select! {
        opened = opened => opened,
        (error, held) = feed_failed(&mut feed) => {
            peer.close().await;
            drop(held);
            return Err(error);
        }
    };
    let mut stream = match opened {
        Ok(stream) => stream,
        Err(CallError::BadReply { what }) if what.contains("not a stream") => {
            peer.close().await;
            return Err(CliError::new(format!(
                "`{object}.{method}` answered with one value, not a stream"
            ))
            .hint(format!(
                "call it with `chatter call {} {object}.{method} ...`",
                connect.url
            )));
        }
        Err(error) => {
            let error = call_failed(connect, object, method, error, described.as_ref(), deadline);
            peer.close().await;
            return Err(error);
        }
    };
    stream.set_idle_timeout(idle_timeout);
    let json = connect.json_output();
    let mut seen: u64 = 0;
    let result = loop {
        if count.is_some_and(|n| seen >= n) {
            // Dropping the reader cancels the stream on the server.
            drop(stream);
            break Ok(());
        }
        let next = tokio::select! {
            next = stream.recv() => next,
            (error, held) = feed_failed(&mut feed) => {
                drop(stream);
                peer.close().await;
                drop(held);
                return Err(error);
            }
        };
        match next {
            Some(Ok(Json(item))) => {
                output::value(&item, json);
                seen += 1;
            }
            Some(Err(error)) => {
                let mut e = CliError::new(format!(
                    "{object}.{method}: the stream failed after {seen} item{}: {error}",
                    if seen == 1 { "" } else { "s" }
                ));
                if matches!(error, StreamError::IdleTimeout) {
                    e = e.hint("--idle-timeout waits longer between items");
                }
                break Err(e);
            }
            None => break Ok(()),
        }
    };
    peer.close().await;
    result
}

/// [`StdinFeed::failed`] of `feed`; never resolves without one.
async fn feed_failed(
    feed: &mut Option<StdinFeed>,
) -> (CliError, Option<chatter_rpc::stream::Sender<Value>>) {
    match feed {
        Some(feed) => feed.failed().await,
        None => std::future::pending().await,
    }
}

/// `chatter emit URL OBJECT.SIGNAL ARGS... --ttl T`.
pub(crate) async fn emit(
    connect: &ConnectArgs,
    target: &str,
    args: &[String],
    ttl: Option<Duration>,
    acknowledged: bool,
) -> Result<(), CliError> {
    let (object, method) = split_target(target, "SIGNAL")?;
    let peer = connect.peer(acknowledged).await?;
    let described = check_method(&peer, connect, object, method, Use::Emit, false).await?;
    let values = parse_json_args(args, connect, object, described.as_ref())?;
    let declared = described
        .as_ref()
        .and_then(|d| d.method.ttl_ms)
        .map(Duration::from_millis);
    let ttl = ttl.or(declared).unwrap_or(Duration::from_secs(30));
    let client = ClientCore::new(&peer, object).with_ttl(ttl);
    let count = values.len() as u32;
    let sent = client
        .signal(method_ref(method), None, false, count, write_args(values))
        .await
        .map_err(|e| CliError::new(format!("{object}.{method} was not sent: {e}")))?;
    let outcome = if acknowledged {
        sent.acknowledged(ttl + Duration::from_secs(1))
            .await
            .map(|()| "delivered: the handler ran")
            .map_err(|e| {
                let error = CliError::new(format!("{object}.{method}: {e}"));
                match (&e, &described) {
                    (AckError::Failed, Some(d)) => error.hint(format!(
                        "it takes {}; did its handler panic?",
                        signature(&d.method)
                    )),
                    (AckError::Failed, None) => error.hint(
                        "no such object or method, arguments that do not fit, or a handler \
                         that panicked (the receiver does not say which)",
                    ),
                    _ => error,
                }
            })
    } else {
        peer.flush().await;
        Ok("sent (not acknowledged: --no-ack)")
    };
    peer.close().await;
    let outcome = outcome?;
    if connect.json_output() {
        output::value(&json!({ "sent": true, "acknowledged": acknowledged }), true);
    } else {
        output::line(outcome);
    }
    Ok(())
}

/// `chatter ping URL -c N -i T`.
pub(crate) async fn ping(
    connect: &ConnectArgs,
    count: u32,
    interval: Duration,
) -> Result<(), CliError> {
    let peer = connect.peer(false).await?;
    let client = introspect(&peer).with_deadline(Duration::from_secs(5));
    let json = connect.json_output();
    let mut times = Vec::new();
    let mut noted = false;
    for seq in 1..=count {
        if seq > 1 {
            tokio::time::sleep(interval).await;
        }
        let start = Instant::now();
        let outcome = client.ping().await;
        let elapsed = start.elapsed();
        let ms = elapsed.as_secs_f64() * 1000.0;
        match outcome {
            // A peer without introspection answers "no such object": a round trip all the same.
            Ok(()) | Err(CallError::NoSuchObject { .. }) => {
                if outcome.is_err() && !noted {
                    noted = true;
                    eprintln!("note: {OBJECT} is off there; timing its \"no such object\" answers");
                }
                times.push(ms);
                if json {
                    output::value(&json!({ "seq": seq, "time_ms": ms }), true);
                } else {
                    output::line(&format!(
                        "reply from {}: seq={seq} time={ms:.3} ms",
                        connect.url
                    ));
                }
            }
            Err(e) => {
                if json {
                    output::value(&json!({ "seq": seq, "error": e.to_string() }), true);
                } else {
                    output::line(&format!("no reply from {}: seq={seq}: {e}", connect.url));
                }
            }
        }
    }
    peer.close().await;
    let received = times.len();
    let lost = count as usize - received;
    let (min, max) = times
        .iter()
        .fold((f64::MAX, 0f64), |(lo, hi), &t| (lo.min(t), hi.max(t)));
    let avg = times.iter().sum::<f64>() / received.max(1) as f64;
    if json {
        let mut summary = json!({ "sent": count, "received": received });
        if received > 0 {
            summary["min_ms"] = json!(min);
            summary["avg_ms"] = json!(avg);
            summary["max_ms"] = json!(max);
        }
        output::value(&summary, true);
    } else {
        output::line(&format!("--- {} ping statistics ---", connect.url));
        let percent = lost as f64 * 100.0 / count.max(1) as f64;
        output::line(&format!(
            "{count} sent, {received} received, {percent:.0}% lost"
        ));
        if received > 0 {
            output::line(&format!(
                "round trip min/avg/max = {min:.3}/{avg:.3}/{max:.3} ms"
            ));
        }
    }
    if received == 0 && count > 0 {
        return Err(CliError::new(format!("no reply from {}", connect.url)));
    }
    Ok(())
}

/// `chatter stats URL`.
pub(crate) async fn stats(connect: &ConnectArgs) -> Result<(), CliError> {
    let peer = connect.peer(false).await?;
    let counters = introspect(&peer)
        .stats()
        .await
        .map_err(|e| introspect_failed(connect, e))?;
    if connect.json_output() {
        let map: serde_json::Map<String, Value> = counters
            .iter()
            .map(|c| (c.name.clone(), Value::from(c.value)))
            .collect();
        output::value(&Value::Object(map), true);
    } else {
        let rows: Vec<Vec<String>> = counters
            .iter()
            .map(|c| vec![c.name.clone(), c.value.to_string()])
            .collect();
        output::table(&["COUNTER", "VALUE"], &rows);
    }
    peer.close().await;
    Ok(())
}

fn introspect(peer: &Peer) -> IntrospectClient {
    IntrospectClient::new(peer, OBJECT).with_deadline(INTROSPECT_DEADLINE)
}

fn introspection_off(connect: &ConnectArgs) -> CliError {
    CliError::new(format!(
        "{} does not serve {OBJECT}: introspection is switched off there",
        connect.url
    ))
    .hint("the peer's PeerOptions::introspection(false) turns it off; `chatter call` and `chatter emit` still work")
}

fn introspect_failed<E: std::fmt::Display>(connect: &ConnectArgs, error: CallError<E>) -> CliError {
    match error {
        CallError::NoSuchObject { .. } => introspection_off(connect),
        other => CliError::new(format!("{}: {other}", connect.url)),
    }
}

/// The description of `object`: `None` when the peer has no introspection or the object
/// no description; an error naming the known objects when there is no such object.
async fn describe_object(
    peer: &Peer,
    connect: &ConnectArgs,
    object: &str,
) -> Result<Option<InterfaceDescription>, CliError> {
    match introspect(peer).describe(object.to_owned()).await {
        Ok(description) => Ok(Some(description)),
        Err(CallError::NoSuchObject { .. }) => Ok(None),
        Err(CallError::App {
            error: IntrospectError::NoSuchObject { known, .. },
            ..
        }) => Err(
            CliError::new(format!("{} has no object `{object}`", connect.url)).hint(format!(
                "objects there: {}",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            )),
        ),
        Err(CallError::App {
            error: IntrospectError::NotDescribed { .. },
            ..
        }) => Ok(None),
        Err(other) => Err(CliError::new(format!("{}: {other}", connect.url))),
    }
}

/// The command that uses a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    /// `chatter call`: a call with one reply.
    Call,
    /// `chatter emit`: a signal.
    Emit,
    /// `chatter watch`: a method returning a stream.
    Watch,
}

/// A method as the peer describes it, with the shapes of the types its interface names.
#[derive(Debug, Clone)]
struct Described {
    method: MethodDescription,
    shapes: BTreeMap<String, Shape>,
    /// The command that uses it.
    used: Use,
}

impl Described {
    /// The shapes of the arguments that say more than their type names, and a command
    /// line with JSON that fits them: the hint for arguments that do not fit.
    fn argument_hint(&self, connect: &ConnectArgs, object: &str) -> Option<String> {
        let m = &self.method;
        // An argument stream's item type is described by its items' shape.
        let mut lines: Vec<String> = m
            .args
            .iter()
            .filter_map(|a| {
                let ty = a.stream.as_deref().unwrap_or(&a.ty);
                Some(shapes::lines(&a.name, ty, self.shapes.get(ty)?))
            })
            .flatten()
            .collect();
        if lines.is_empty() {
            return None;
        }
        let example = |ty: &str| self.shapes.get(ty).map(|s| shapes::example(s).to_string());
        let examples: Option<Vec<String>> = m
            .args
            .iter()
            .filter(|a| a.stream.is_none())
            .map(|a| example(&a.ty).map(|e| shell_quote(&e)))
            .collect();
        if let Some(examples) = examples {
            let command = match self.used {
                Use::Call => "call",
                Use::Emit => "emit",
                Use::Watch => "watch",
            };
            let stdin = if m.argument_stream().is_some() {
                " --stdin"
            } else {
                ""
            };
            let mut line = format!(
                "for example: chatter {command} {} {object}.{}",
                connect.url, m.name
            );
            for example in examples {
                line.push(' ');
                line.push_str(&example);
            }
            line.push_str(stdin);
            lines.push(line);
        }
        if let Some(item) = m.argument_stream().and_then(example) {
            lines.push(format!("with stdin lines like: {item}"));
        }
        Some(lines.join("\n"))
    }
}

/// Checks `object.method` against the peer's description, when it has one: the object
/// and method exist, and the method is what the command `used` handles (with an argument
/// stream from stdin if `stdin`). Returns the method's description.
async fn check_method(
    peer: &Peer,
    connect: &ConnectArgs,
    object: &str,
    method: &str,
    used: Use,
    stdin: bool,
) -> Result<Option<Described>, CliError> {
    let Some(description) = describe_object(peer, connect, object).await? else {
        return Ok(None);
    };
    let Some(found) = description.methods.iter().find(|m| m.name == method) else {
        let names: Vec<&str> = description.methods.iter().map(|m| &*m.name).collect();
        return Err(CliError::new(format!(
            "`{object}` ({}) has no method `{method}`",
            description.name
        ))
        .hint(format!("its methods: {}", names.join(", ")))
        .hint(format!(
            "`chatter describe {} {object}` shows them with their arguments",
            connect.url
        )));
    };
    kind_fits(connect, object, found, used, stdin)?;
    Ok(Some(Described {
        method: found.clone(),
        shapes: description.shapes.clone(),
        used,
    }))
}

/// Whether the command `used` can run the method `m` (with an argument stream from stdin
/// if `stdin`): a clear refusal naming the right command or option when not.
fn kind_fits(
    connect: &ConnectArgs,
    object: &str,
    m: &MethodDescription,
    used: Use,
    stdin: bool,
) -> Result<(), CliError> {
    let target = format!("{object}.{}", m.name);
    let url = &connect.url;
    let input = m
        .args
        .iter()
        .find_map(|a| a.stream.as_deref().map(|item| (&a.name, item)));
    let command = if m.result_stream.is_some() {
        "watch"
    } else {
        "call"
    };
    match (input, stdin) {
        (Some((arg, item)), false) => {
            return Err(CliError::new(format!(
                "`{target}` takes a stream of {item} as its argument `{arg}`"
            ))
            .hint(format!("it takes {}", signature(m)))
            .hint(format!(
                "give the stream's items on stdin, one JSON value per line, with --stdin: \
                 ... | chatter {command} {url} {target} ... --stdin"
            )));
        }
        (None, true) if used != Use::Emit => {
            return Err(CliError::new(format!(
                "`{target}` takes no argument stream: --stdin is for methods that do"
            ))
            .hint(format!("it takes {}", signature(m))));
        }
        _ => {}
    }
    match (used, m.kind) {
        // Only an argument stream: one reply.
        (Use::Call, MethodKind::Stream) if m.result_stream.is_none() => Ok(()),
        (Use::Watch, MethodKind::Stream) if m.result_stream.is_none() => Err(CliError::new(
            format!("`{target}` returns one value, not a stream"),
        )
        .hint(format!(
            "call it with `chatter call {url} {target} ... --stdin`"
        ))),
        (Use::Call, MethodKind::Signal) => Err(CliError::new(format!(
            "`{target}` is a signal: it has no reply"
        ))
        .hint(format!("send it with `chatter emit {url} {target} ...`"))),
        (Use::Emit, MethodKind::Call) => {
            Err(CliError::new(format!("`{target}` is a call, not a signal"))
                .hint(format!("call it with `chatter call {url} {target} ...`")))
        }
        (Use::Call | Use::Emit, MethodKind::Stream) => {
            let item = m.result_stream.as_deref().unwrap_or("?");
            Err(CliError::new(format!(
                "`{target}` returns a stream of {item}, not {}",
                if used == Use::Call {
                    "one reply"
                } else {
                    "nothing (it is not a signal)"
                }
            ))
            .hint(format!("watch it with `chatter watch {url} {target} ...`")))
        }
        (Use::Watch, MethodKind::Call) => Err(CliError::new(format!(
            "`{target}` returns one value, not a stream"
        ))
        .hint(format!("call it with `chatter call {url} {target} ...`"))),
        (Use::Watch, MethodKind::Signal) => Err(CliError::new(format!(
            "`{target}` is a signal: it returns nothing, not a stream"
        ))
        .hint(format!("send it with `chatter emit {url} {target} ...`"))),
        _ => Ok(()),
    }
}

/// The command line's JSON arguments, checked against the method's arity when known.
fn parse_json_args(
    args: &[String],
    connect: &ConnectArgs,
    object: &str,
    described: Option<&Described>,
) -> Result<Vec<Value>, CliError> {
    // The argument stream, if any, is not among the arguments on the command line.
    let plain: Vec<_> = described
        .map(|d| {
            d.method
                .args
                .iter()
                .filter(|a| a.stream.is_none())
                .collect()
        })
        .unwrap_or_default();
    let values = parse_args(args, |i| {
        plain.get(i).map(|a| format!("{}: {}", a.name, a.ty))
    })
    .map_err(|e| takes(CliError::new(e), connect, object, described))?;
    if let Some(d) = described {
        if values.len() != plain.len() {
            let error = CliError::new(format!(
                "`{}` takes {} argument{}{}, {} given",
                d.method.name,
                plain.len(),
                if plain.len() == 1 { "" } else { "s" },
                if plain.len() < d.method.args.len() {
                    " besides its argument stream"
                } else {
                    ""
                },
                values.len()
            ));
            return Err(takes(error, connect, object, described)
                .hint("give each argument as one JSON value, in order"));
        }
    }
    Ok(values)
}

/// `error` with what the method takes, when it is known: its signature, and the shapes of
/// its arguments with an example.
fn takes(
    error: CliError,
    connect: &ConnectArgs,
    object: &str,
    described: Option<&Described>,
) -> CliError {
    let Some(d) = described else {
        return error;
    };
    let error = error.hint(format!("it takes {}", signature(&d.method)));
    match d.argument_hint(connect, object) {
        Some(hint) => error.hint(hint),
        None => error,
    }
}

/// `text` as one shell word: as it is when it has no special characters, else in single
/// quotes.
fn shell_quote(text: &str) -> String {
    if !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.,:/+=@".contains(c))
    {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// The shapes of `m`'s arguments, return value and error, where they say more than the
/// types' names: the lines `chatter describe` prints under a method.
fn shape_lines(m: &MethodDescription, known: &BTreeMap<String, Shape>) -> Vec<String> {
    let mut named: Vec<(&str, &str)> = m
        .args
        .iter()
        .map(|a| (&*a.name, a.stream.as_deref().unwrap_or(&a.ty)))
        .collect();
    match &m.result_stream {
        Some(item) => named.push(("items", item)),
        None => named.push(("returns", &m.returns)),
    }
    if let Some(error) = &m.error {
        named.push(("error", error));
    }
    named
        .into_iter()
        .filter_map(|(name, ty)| Some(shapes::lines(name, ty, known.get(ty)?)))
        .flatten()
        .collect()
}

/// What a failed call means.
fn call_failed(
    connect: &ConnectArgs,
    object: &str,
    method: &str,
    error: CallError<Json>,
    described: Option<&Described>,
    deadline: Duration,
) -> CliError {
    let target = format!("{object}.{method}");
    match error {
        CallError::App { error, remote } => {
            if connect.json_output() {
                output::value(
                    &json!({ "error": error.0, "message": remote.message, "chain": remote.chain }),
                    true,
                );
            }
            let kind = described
                .and_then(|d| d.method.error.as_deref())
                .map_or_else(String::new, |ty| format!(" ({ty})"));
            let mut e = CliError::new(format!("{target} failed{kind}: {remote}"));
            e = e.hint(format!("error value: {}", error.0));
            e
        }
        CallError::NoSuchObject { .. } => {
            CliError::new(format!("{} has no object `{object}`", connect.url)).hint(format!(
                "`chatter list {}` shows what it serves",
                connect.url
            ))
        }
        CallError::NoSuchMethod { .. } => {
            CliError::new(format!("`{object}` has no method `{method}`")).hint(format!(
                "`chatter describe {} {object}` shows its methods",
                connect.url
            ))
        }
        CallError::BadArguments { what } => takes(
            CliError::new(format!("the arguments do not fit {target}: {what}")),
            connect,
            object,
            described,
        ),
        CallError::DeadlineExceeded => {
            CliError::new(format!("{target}: no reply within {deadline:?}"))
                .hint("--deadline waits longer")
        }
        CallError::BadReply { what } => {
            CliError::new(format!("{target}: the reply did not decode: {what}"))
        }
        // A peer without introspection says that the command does not fit the method.
        CallError::Protocol(what) if what.contains("has no stream") => {
            CliError::new(format!("`{target}` has no stream: {what}")).hint(format!(
                "call it with `chatter call {} {target} ...`",
                connect.url
            ))
        }
        CallError::Protocol(what) if what.contains("must come as a stream call") => {
            CliError::new(format!("`{target}` has a stream: {what}")).hint(format!(
                "if it returns a stream, watch it with `chatter watch {} {target} ...`",
                connect.url
            ))
        }
        other => CliError::new(format!("{target}: {other}")),
    }
}

/// `add(a: i64, b: i64) -> i64`; streams as `stream of T`: `ticks(every: u64) -> stream
/// of u64`, `upload(chunks: stream of Vec<u8>) -> u64`.
fn signature(m: &MethodDescription) -> String {
    let args: Vec<String> = m
        .args
        .iter()
        .map(|a| match &a.stream {
            Some(item) => format!("{}: stream of {item}", a.name),
            None => format!("{}: {}", a.name, a.ty),
        })
        .collect();
    let mut text = format!("{}({})", m.name, args.join(", "));
    let returns = match &m.result_stream {
        Some(item) => format!("stream of {item}"),
        None => m.returns.to_string(),
    };
    match (&m.error, &*returns) {
        (Some(error), returns) => text.push_str(&format!(" -> Result<{returns}, {error}>")),
        (None, "()") => {}
        (None, returns) => text.push_str(&format!(" -> {returns}")),
    }
    text
}

/// `call    add(a: i64, b: i64) -> i64` with the method's options.
fn signature_line(m: &MethodDescription) -> String {
    let kind = match m.kind {
        MethodKind::Call => "call",
        MethodKind::Signal => "signal",
        MethodKind::Stream => "stream",
        _ => "other",
    };
    let mut options = Vec::new();
    if m.idempotent {
        options.push("idempotent".to_owned());
    }
    if let Some(ms) = m.ttl_ms {
        options.push(format!("ttl {}", millis_text(ms)));
    }
    if m.persistent {
        options.push("persistent".to_owned());
    }
    let options = if options.is_empty() {
        String::new()
    } else {
        format!("  [{}]", options.join(", "))
    };
    format!("{kind:<6}  {}{options}", signature(m))
}

/// `5s` for 5000, `2m`, `1h`, `250ms`: a declared TTL as it was written.
fn millis_text(ms: u64) -> String {
    match ms {
        0 => "0ms".to_owned(),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        ms => format!("{ms}ms"),
    }
}

/// `OBJECT.METHOD`, split at the last dot (object names may hold dots).
fn split_target<'a>(target: &'a str, what: &str) -> Result<(&'a str, &'a str), CliError> {
    match target.rsplit_once('.') {
        Some((object, method)) if !object.is_empty() && !method.is_empty() => Ok((object, method)),
        _ => Err(CliError::new(format!("{target:?} is not OBJECT.{what}"))
            .hint("for example calc.add (`chatter list URL` shows the objects and methods)")),
    }
}

/// A method for `ClientCore` (which takes generated clients' static names): made once
/// per run, so leaked.
fn method_ref(name: &str) -> &'static Method {
    let name: &'static str = Box::leak(name.to_owned().into_boxed_str());
    let mut wire = Vec::new();
    chatter_msgpack::write_str(&mut wire, name);
    Box::leak(Box::new(Method {
        name,
        wire: Box::leak(wire.into_boxed_slice()),
    }))
}

/// Writes the JSON arguments one by one, as MessagePack values.
fn write_args(values: Vec<Value>) -> impl FnOnce(&mut ArgsWriter<'_>) -> Result<(), ArgError> {
    move |writer| {
        for value in &values {
            writer.arg(value)?;
        }
        Ok(())
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_read_like_rust() {
        use chatter_rpc::__private::{describe_arg, describe_call, describe_signal};
        static AB: [chatter_rpc::__private::ArgDescription; 2] =
            [describe_arg("a", "i64"), describe_arg("b", "i64")];
        static LINE: [chatter_rpc::__private::ArgDescription; 1] = [describe_arg("line", "String")];
        let add = describe_call("add", "", &AB, "i64", None, false);
        assert_eq!(signature(&add), "add(a: i64, b: i64) -> i64");
        assert_eq!(signature_line(&add), "call    add(a: i64, b: i64) -> i64");
        let div = describe_call("div", "", &AB, "i64", Some("CalcError"), true);
        assert_eq!(
            signature_line(&div),
            "call    div(a: i64, b: i64) -> Result<i64, CalcError>  [idempotent]"
        );
        let none = describe_call("reset", "", &[], "()", None, false);
        use chatter_rpc::__private::{describe_stream, describe_stream_arg};
        static UP: [chatter_rpc::__private::ArgDescription; 2] = [
            describe_arg("name", "String"),
            describe_stream_arg("chunks", "Receiver<Vec<u8>>", "Vec<u8>"),
        ];
        let ticks = describe_stream(
            "ticks",
            "",
            &AB[..1],
            "Receiver<u64>",
            None,
            false,
            Some("u64"),
        );
        assert_eq!(
            signature_line(&ticks),
            "stream  ticks(a: i64) -> stream of u64"
        );
        let feed = describe_stream(
            "feed",
            "",
            &[],
            "Receiver<u64>",
            Some("E"),
            false,
            Some("u64"),
        );
        assert_eq!(signature(&feed), "feed() -> Result<stream of u64, E>");
        let up = describe_stream("upload", "", &UP, "u64", None, false, None);
        assert_eq!(
            signature_line(&up),
            "stream  upload(name: String, chunks: stream of Vec<u8>) -> u64"
        );
        assert_eq!(signature(&none), "reset()");
        let log = describe_signal("log", "", &LINE, Some(5_000), true);
        assert_eq!(
            signature_line(&log),
            "signal  log(line: String)  [ttl 5s, persistent]"
        );
    }

    #[test]
    fn json_examples_are_quoted_for_the_shell_when_needed() {
        assert_eq!(shell_quote("0.0"), "0.0");
        assert_eq!(shell_quote("-3"), "-3");
        assert_eq!(shell_quote(r#""Empty""#), r#"'"Empty"'"#);
        assert_eq!(shell_quote(r#"{"a":"it's"}"#), r#"'{"a":"it'\''s"}'"#);
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn shape_lines_cover_arguments_streams_returns_and_errors() {
        use chatter_rpc::__private::{describe_call, describe_stream, describe_stream_arg};
        use chatter_rpc::introspect::shape::trace;
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Point {
            x: f64,
        }
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        enum E {
            Bad,
        }
        let mut known = BTreeMap::new();
        known.insert("Point".to_owned(), trace::<Point>().expect("traced"));
        known.insert("E".to_owned(), trace::<E>().expect("traced"));
        known.insert("u8".to_owned(), Shape::U8);
        static ARGS: [chatter_rpc::__private::ArgDescription; 2] = [
            chatter_rpc::__private::describe_arg("p", "Point"),
            chatter_rpc::__private::describe_arg("n", "u8"),
        ];
        let m = describe_call("f", "", &ARGS, "Point", Some("E"), false);
        assert_eq!(
            shape_lines(&m, &known),
            [
                "p: Point { x: f64 }",
                "returns: Point { x: f64 }",
                "error: E = Bad"
            ]
        );
        static UP: [chatter_rpc::__private::ArgDescription; 1] =
            [describe_stream_arg("points", "Receiver<Point>", "Point")];
        let up = describe_stream("up", "", &UP, "u8", None, false, Some("Point"));
        assert_eq!(
            shape_lines(&up, &known),
            ["points: Point { x: f64 }", "items: Point { x: f64 }"]
        );
        // A peer without shapes: nothing.
        assert!(shape_lines(&m, &BTreeMap::new()).is_empty());
    }

    #[test]
    fn ttls_read_as_declared() {
        assert_eq!(millis_text(5_000), "5s");
        assert_eq!(millis_text(120_000), "2m");
        assert_eq!(millis_text(3_600_000), "1h");
        assert_eq!(millis_text(1_500), "1500ms");
        assert_eq!(millis_text(0), "0ms");
    }

    #[test]
    fn targets_split_at_the_last_dot() {
        assert_eq!(split_target("calc.add", "METHOD").unwrap(), ("calc", "add"));
        assert_eq!(
            split_target("chatter.introspect.list", "METHOD").unwrap(),
            ("chatter.introspect", "list")
        );
        assert!(split_target("calc", "METHOD").is_err());
        assert!(split_target("calc.", "METHOD").is_err());
        assert!(split_target(".add", "METHOD").is_err());
    }
}
