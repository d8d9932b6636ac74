//! Streams on one connection (issue 16; `docs/design/streams.md`): the result and argument
//! streams of the stream calls this side makes (the caller's half) and serves (the
//! callee's half).
//!
//! A stream belongs to one call and is named by the call's id (the first id of the call's
//! conversation `C`). The result stream's items ride in `C` after the callee's opening
//! reply `[0, nil]` (sent without `last`); the argument stream is a conversation `U` of
//! its own that the caller opens with `[14, call]` once the callee granted credit in `C`.
//! Each stream has its own credit, in bytes (an item costs its envelope's length plus
//! 64): the reader grants what it read, the writer never has more outstanding. The
//! connection's credit of a stream message goes back as soon as the message is in its
//! stream's inbox, which the stream's window bounds.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use chatter_core::proto::IdBuildHasher;
use chatter_core::{CloseCause, Conversation, Msg, SendError, SendOptions};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::client::Opened;
use crate::context::CallContext;
use crate::error::CallError;
use crate::service::{panic_message, Handlers};
use crate::stream::{
    cost, Inbox, InputSetup, ItemSource, Outlet, RemoteEnd, Reply, StreamError, StreamParts,
};
use crate::wire::stream::{self as envelope, CallerStreamMsg, StreamMsg};
use crate::wire::{self, FailureKind, Name, Payload, Reply as ReplyEnvelope};

use super::calls::{call_options, send_failure, CallGuard};
use super::{after, bump, lock, Inner, Outcome};
use chatter_core::LogLimit;

/// The streams of one connection, made on its first stream call (either way).
#[derive(Default)]
pub(crate) struct Streams {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The stream calls this side made and whose streams are still open, by call id.
    calls: HashMap<u64, CallerStream, IdBuildHasher>,
    /// Stream calls being sent: their ids are not known until the connection took them.
    starting: usize,
    /// Messages that arrived for a stream call still being registered (its reply raced the
    /// registration: microseconds). Bounded: see [`MAX_UNCLAIMED`].
    unclaimed: Vec<Msg>,
    unclaimed_bytes: usize,
    /// The result streams this side writes, by call id (the caller's grants go here).
    outlets: HashMap<u64, Arc<Outlet>, IdBuildHasher>,
    /// Argument streams of calls this side serves whose conversation is not open yet, by
    /// call id, with the call's conversation.
    inputs: HashMap<u64, (Conversation, Arc<Inbox>), IdBuildHasher>,
    /// Open argument streams, by the first id of their conversation, with their call's
    /// conversation (whose first id is the call's id).
    arguments: HashMap<u64, (Conversation, Arc<Inbox>), IdBuildHasher>,
    /// Stream calls this side serves now (at most `max_streams`).
    serving: usize,
    /// The connection closed: nothing new starts.
    closed: Option<CloseCause>,
}

/// At most this many bytes of stream messages wait for their call's registration; beyond,
/// they are dropped (a well-behaved callee sends at most one window before it is read, and
/// the registration takes microseconds). Each counts as in a window, with 64 bytes more
/// than its payload ([`unclaimed_cost`]): a callee that sends tiny messages meanwhile (in
/// the conversation of another call it holds, while a stream call waits for its credit)
/// gets no more of them kept than the bytes say.
const MAX_UNCLAIMED: usize = 1 << 20;

/// What a message waiting for its call's registration counts against [`MAX_UNCLAIMED`]:
/// its payload and the 64 bytes a window charges a message (chatter-core's
/// `MESSAGE_OVERHEAD`), which cover the [`Msg`] kept.
fn unclaimed_cost(msg: &Msg) -> usize {
    msg.payload.len() + 64
}

/// A stream call this side made.
struct CallerStream {
    /// The result stream's items, for a method that returns a stream.
    result: Option<Arc<Inbox>>,
    /// The callee's opening reply arrived: items follow.
    opened: bool,
    /// The caller gave up: messages are dropped until the callee ends the call.
    cancelled: bool,
    /// The argument stream, for a method that takes one.
    input: Option<CallerInput>,
}

/// The caller's argument stream: its credit, and its items until the first grant starts
/// the forwarder.
struct CallerInput {
    outlet: Arc<Outlet>,
    source: Option<ItemSource>,
}

/// What routing a message decided, done once the state's lock is released.
#[derive(Default)]
struct Then {
    settle: Option<(u64, Outcome)>,
    cancel: Option<u64>,
    start_input: Option<(u64, Arc<Outlet>, ItemSource)>,
}

impl Inner {
    /// This connection's streams, made on first use.
    fn streams(&self) -> &Streams {
        self.streams.get_or_init(Box::default)
    }

    /// A message in a conversation this side opened: a stream's, if it belongs to a stream
    /// call this side made (or may: one being registered); else handed back.
    // Out of line: the reply path of connections without streams stays as it was; not
    // cold, since every item of a result stream comes through here.
    #[inline(never)]
    pub(super) fn on_stream_reply(&self, streams: &Streams, msg: Msg) -> Option<Msg> {
        let then = {
            let mut st = lock(&streams.state);
            let id = msg.conversation.first_id();
            if !st.calls.contains_key(&id) {
                // Only non-final messages can belong to a stream call that is being
                // registered: a final reply goes through the call's slot like any other,
                // which keeps it for a caller that has not polled yet.
                if st.starting == 0 || msg.last {
                    return Some(msg);
                }
                let cost = unclaimed_cost(&msg);
                if st.unclaimed_bytes + cost > MAX_UNCLAIMED {
                    if let Some(warnings) = self.warnings.admit() {
                        tracing::warn!(
                            conversation = id,
                            warnings,
                            "stream message dropped: too many for calls being registered"
                        );
                    }
                    return None;
                }
                st.unclaimed_bytes += cost;
                // A copy: its connection credit went back, and a slice would keep the
                // whole run of messages it arrived with alive.
                let mut msg = msg;
                msg.payload = Bytes::copy_from_slice(&msg.payload);
                st.unclaimed.push(msg);
                return None;
            }
            route_reply(&mut st, msg, &self.warnings)
        };
        self.then(then);
        None
    }

    /// Carries out what routing decided.
    fn then(&self, then: Then) {
        if let Some((id, outcome)) = then.settle {
            self.settle(id, outcome);
        }
        if let Some(id) = then.cancel {
            self.send_soon(wire::encode_cancel(id), SendOptions::new());
        }
        if let Some((id, outlet, source)) = then.start_input {
            if let Some(me) = self.me.upgrade() {
                // One per argument stream of a call this side made: bounded by the calls
                // the application makes. It holds one encoded item and waits for the
                // callee's grants and the connection's credit, so a callee that never reads
                // costs it nothing more; it ends with the stream, the callee's stop, the
                // call's end, the caller dropping the call, or the connection's close.
                tokio::spawn(forward_input(me, id, outlet, source));
            }
        }
    }

    /// Makes a stream call: sends `payload` (`[12, …]`), registers its streams, and waits
    /// until the callee opened the result stream or ended the call.
    pub(crate) async fn stream_call(
        self: Arc<Self>,
        payload: Payload,
        deadline: Duration,
        result: bool,
        input: Option<ItemSource>,
    ) -> Result<Opened, CallError> {
        if self.peer.is_shutting_down() {
            return Err(CallError::ShuttingDown);
        }
        let streams = self.streams();
        let mut starting = Starting {
            streams,
            armed: true,
        };
        {
            let mut st = lock(&streams.state);
            if let Some(cause) = &st.closed {
                return Err(CallError::ConnectionLost(cause.clone()));
            }
            st.starting += 1;
        }
        let id = match self.try_start_call(&payload, deadline) {
            Ok(id) => id,
            Err(SendError::WouldBlock) => {
                let until = Instant::now() + deadline;
                let send = self.conn.send_made(|| {
                    let left = until.saturating_duration_since(Instant::now());
                    let request = wire::rewrite_deadline(&payload, left)
                        .unwrap_or_else(|_| Bytes::copy_from_slice(&payload));
                    (request, call_options(&self, left))
                });
                match tokio::time::timeout_at(until, send).await {
                    Ok(Ok(conv)) => conv.first_id(),
                    Ok(Err(e)) => return Err(outcome_error(send_failure(e))),
                    Err(_) => return Err(CallError::DeadlineExceeded),
                }
            }
            Err(e) => return Err(outcome_error(send_failure(e))),
        };
        let inbox = result.then(|| Arc::new(Inbox::new(self.peer.options.stream_window)));
        let call = CallerStream {
            result: inbox.clone(),
            opened: false,
            cancelled: false,
            input: input.map(|source| CallerInput {
                // Nothing may be sent before the callee's first grant.
                outlet: Arc::new(Outlet::new(self.peer.options.stream_window, 0)),
                source: Some(source),
            }),
        };
        starting.armed = false;
        let then = {
            let mut st = lock(&streams.state);
            st.starting -= 1;
            st.calls.insert(id, call);
            // Messages that raced the registration, in their order, before any later one
            // (the receive task routes those under this same lock).
            let unclaimed = std::mem::take(&mut st.unclaimed);
            st.unclaimed_bytes = 0;
            let mut thens = Vec::new();
            for msg in unclaimed {
                if msg.conversation.first_id() == id {
                    thens.push(route_reply(&mut st, msg, &self.warnings));
                } else if st.starting > 0 {
                    st.unclaimed_bytes += unclaimed_cost(&msg);
                    st.unclaimed.push(msg);
                }
                // Else: for no stream call (one being registered would still count).
            }
            thens
        };
        for then in then {
            self.then(then);
        }
        let mut guard = CallGuard {
            inner: &self,
            id,
            armed: true,
        };
        let mut stream_guard = StreamGuard {
            inner: &self,
            id,
            armed: true,
            tell: false,
        };
        let outcome = std::future::poll_fn(|cx| self.poll_outcome(id, cx)).await;
        guard.armed = false;
        stream_guard.tell = true;
        match outcome {
            Outcome::Opened => {}
            Outcome::Reply(reply) => {
                // The call ended with its reply (the stream entry is gone with it).
                stream_guard.armed = false;
                return Ok(Opened::Reply(reply));
            }
            other => return Err(outcome_error(other)),
        }
        stream_guard.armed = false;
        let end: Arc<dyn RemoteEnd> = Arc::new(CallerEnd {
            inner: self.me.clone(),
            id,
        });
        match inbox {
            Some(inbox) => Ok(Opened::Stream(inbox, end)),
            None => {
                end.cancel();
                Err(CallError::Protocol(
                    "the callee opened a result stream for a method that returns none".into(),
                ))
            }
        }
    }

    /// The caller of stream call `id` gave up (dropped its result stream, or the call
    /// before it opened): the callee is told to cancel, and the call's messages are
    /// dropped until it ends.
    fn cancel_caller(&self, id: u64, tell: bool) {
        let Some(streams) = self.streams.get() else {
            return;
        };
        let send = {
            let mut st = lock(&streams.state);
            let Some(call) = st.calls.get_mut(&id) else {
                return;
            };
            let first = !call.cancelled;
            call.cancelled = true;
            if let Some(input) = &call.input {
                input.outlet.cancel();
            }
            if let Some(result) = &call.result {
                result.finish(Err(StreamError::Cancelled));
            }
            tell && first && st.closed.is_none()
        };
        if send {
            self.send_soon(wire::encode_cancel(id), SendOptions::new());
        }
    }

    /// The connection closed: every stream fails.
    pub(super) fn close_streams(&self, cause: &CloseCause) {
        let Some(streams) = self.streams.get() else {
            return;
        };
        let mut st = lock(&streams.state);
        st.closed = Some(cause.clone());
        let lost = || Err(StreamError::ConnectionLost(cause.to_string()));
        for (_, call) in st.calls.drain() {
            if let Some(result) = call.result {
                result.finish(lost());
            }
            if let Some(input) = call.input {
                input.outlet.cancel();
            }
        }
        for (_, outlet) in st.outlets.drain() {
            outlet.cancel();
        }
        for (_, (_, inbox)) in st.inputs.drain() {
            inbox.finish(lost());
        }
        for (_, (_, inbox)) in st.arguments.drain() {
            inbox.finish(lost());
        }
        st.unclaimed.clear();
    }
}

/// Routes a message of stream call `msg.conversation.first_id()` (registered).
fn route_reply(st: &mut State, msg: Msg, warnings: &LogLimit) -> Then {
    let id = msg.conversation.first_id();
    let mut then = Then::default();
    let Some(call) = st.calls.get_mut(&id) else {
        return then;
    };
    if call.cancelled {
        if msg.last {
            let call = st.calls.remove(&id);
            // A call that never opened still has its slot (abandoned): the end frees it.
            if call.is_some_and(|c| !c.opened) {
                then.settle = Some((id, Outcome::Reply(msg.payload)));
            }
        }
        return then;
    }
    if msg.last {
        let Some(call) = st.calls.remove(&id) else {
            return then;
        };
        if let Some(input) = &call.input {
            // The call is over: its argument stream has no reader any more.
            input.outlet.cancel();
        }
        if !call.opened {
            // The call's reply: a value, an application error or a failure.
            if let Some(result) = &call.result {
                result.finish(Err(StreamError::Cancelled));
            }
            then.settle = Some((id, Outcome::Reply(msg.payload)));
            return then;
        }
        let end = match envelope::decode_stream_msg(&msg.payload) {
            Ok(StreamMsg::End) => Ok(()),
            Ok(other) => Err(StreamError::Protocol(format!(
                "a stream ended with {other:?} instead of its end"
            ))),
            Err(_) => Err(stream_failure(&msg.payload)),
        };
        if let Some(result) = &call.result {
            result.finish(end);
        }
        return then;
    }
    // Not the end: the opening reply, an item, or the argument stream's credit or stop.
    let decoded = match envelope::decode_stream_msg(&msg.payload) {
        Ok(decoded) => decoded,
        Err(_) if !call.opened => {
            return match wire::decode_reply(&msg.payload) {
                Ok(ReplyEnvelope::Ok(_)) if call.result.is_some() => {
                    call.opened = true;
                    then.settle = Some((id, Outcome::Opened));
                    then
                }
                _ => fail_call(
                    st,
                    warnings,
                    id,
                    "a stream call's reply without `last` that opens no stream",
                ),
            };
        }
        Err(e) => return fail_call(st, warnings, id, &format!("bad stream message: {}", e.0)),
    };
    match decoded {
        StreamMsg::Items(items) if call.opened => {
            let Some(result) = &call.result else {
                return fail_call(
                    st,
                    warnings,
                    id,
                    "an item for a call without a result stream",
                );
            };
            if let Err(over) = result.push_items(&msg.payload, items) {
                let what = format!(
                    "the callee sent {} bytes beyond the {} granted",
                    over.cost, over.window
                );
                return fail_call(st, warnings, id, &what);
            }
        }
        StreamMsg::Grant(bytes) => match &mut call.input {
            Some(input) => {
                if input.source.is_some() && !call.cancelled {
                    // The first grant is the callee's whole window (PROTOCOL.md, Streams):
                    // an item that costs more can never be sent, however long it waits.
                    input.outlet = Arc::new(Outlet::new(bytes, 0));
                }
                input.outlet.grant(bytes);
                if let Some(source) = input.source.take() {
                    then.start_input = Some((id, input.outlet.clone(), source));
                }
            }
            None => {
                return fail_call(
                    st,
                    warnings,
                    id,
                    "credit for a call without an argument stream",
                )
            }
        },
        StreamMsg::Stop => {
            if let Some(input) = &mut call.input {
                input.source = None;
                input.outlet.cancel();
            }
        }
        other => {
            return fail_call(
                st,
                warnings,
                id,
                &format!("unexpected stream message {other:?}"),
            )
        }
    }
    then
}

/// A stream call's callee broke the protocol: the caller's streams fail, the callee is
/// told to cancel (its end of the call comes later and is dropped).
fn fail_call(st: &mut State, warnings: &LogLimit, id: u64, what: &str) -> Then {
    if let Some(warnings) = warnings.admit() {
        tracing::warn!(
            conversation = id,
            error = what,
            warnings,
            "stream protocol error from peer"
        );
    }
    let mut then = Then::default();
    if let Some(call) = st.calls.get_mut(&id) {
        call.cancelled = true;
        if let Some(result) = &call.result {
            result.finish(Err(StreamError::Protocol(what.to_owned())));
        }
        if let Some(input) = &call.input {
            input.outlet.cancel();
        }
        if !call.opened {
            then.settle = Some((id, Outcome::Protocol(what.to_owned())));
        }
    }
    then.cancel = Some(id);
    then
}

/// The error a stream ended with, from the callee's failure reply.
fn stream_failure(payload: &[u8]) -> StreamError {
    match wire::decode_reply(payload) {
        Ok(ReplyEnvelope::Failure { kind, message }) => match kind {
            Ok(FailureKind::Cancelled) => StreamError::Cancelled,
            Ok(FailureKind::RemotePanic) => StreamError::RemotePanic(message),
            Ok(FailureKind::ShuttingDown) => {
                StreamError::ConnectionLost(format!("the callee is shutting down: {message}"))
            }
            // A broker's word that the peer behind it disconnected mid-stream.
            Ok(FailureKind::PeerLost) => StreamError::ConnectionLost(message),
            Ok(FailureKind::Lagging) => StreamError::Lagged(message),
            Ok(FailureKind::PermissionDenied) => StreamError::Protocol(message),
            Ok(FailureKind::BadArguments) => StreamError::BadItem(message),
            _ => StreamError::Protocol(message),
        },
        _ => StreamError::Protocol("a stream ended with a malformed envelope".into()),
    }
}

/// A call outcome other than a reply, as the caller's error.
fn outcome_error(outcome: Outcome) -> CallError {
    match outcome {
        Outcome::Reply(_) => CallError::Protocol("unexpected reply".into()),
        Outcome::Deadline => CallError::DeadlineExceeded,
        Outcome::Lost(cause) | Outcome::NotSent(cause) => CallError::ConnectionLost(cause),
        Outcome::Protocol(what) => CallError::Protocol(what),
        Outcome::Opened => CallError::Protocol("a stream opened for a call".into()),
    }
}

/// Undoes a stream call's `starting` count if it is dropped or fails before registering.
struct Starting<'a> {
    streams: &'a Streams,
    armed: bool,
}

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut st = lock(&self.streams.state);
            st.starting -= 1;
            if st.starting == 0 {
                st.unclaimed.clear();
                st.unclaimed_bytes = 0;
            }
        }
    }
}

/// Cancels a stream call whose caller gave up before its result stream was handed over.
struct StreamGuard<'a> {
    inner: &'a Inner,
    id: u64,
    armed: bool,
    /// Whether the callee still has to be told (the call's own guard tells it while the
    /// call waits for its outcome).
    tell: bool,
}

impl Drop for StreamGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.inner.cancel_caller(self.id, self.tell);
        }
    }
}

/// The caller's end of a result stream: grants go to the callee as one-shots
/// `[15, call, bytes]`; dropping the reader cancels the call.
struct CallerEnd {
    inner: Weak<Inner>,
    id: u64,
}

impl RemoteEnd for CallerEnd {
    fn grant(&self, bytes: u64) {
        if let Some(inner) = self.inner.upgrade() {
            let grant = envelope::encode_caller_msg(&CallerStreamMsg::GrantResult {
                call: self.id,
                bytes,
            });
            inner.send_soon(grant, SendOptions::new());
        }
    }

    fn cancel(&self) {
        if let Some(inner) = self.inner.upgrade() {
            inner.cancel_caller(self.id, true);
        }
    }
}

/// Sends a call's argument stream: opens its conversation with `[14, call]`, sends its
/// items within the callee's grants, and ends it with `[4]` (also when the callee stopped
/// reading or the call ended: the conversation must end).
async fn forward_input(inner: Arc<Inner>, id: u64, outlet: Arc<Outlet>, mut source: ItemSource) {
    let open = envelope::encode_caller_msg(&CallerStreamMsg::OpenArgument { call: id });
    let keep = SendOptions::new().last(false).token(false);
    let conv = match inner.conn.send_bytes(&open, keep).await {
        Ok(conv) => conv,
        Err(e) => {
            tracing::debug!(error = %e, "argument stream not opened");
            return;
        }
    };
    let never = &mut std::future::pending::<()>();
    let end = match write_items(&inner, conv, &mut source, &outlet, never).await {
        Written::Lost => return,
        Written::Cancelled | Written::Source(Finish::End) => envelope::encode_bare(envelope::END),
        // The callee's reader gets the error, not a short stream.
        Written::Source(Finish::Failed(e)) => failure_of(&e),
        Written::Source(Finish::Panicked(message)) => {
            wire::encode_failure(FailureKind::RemotePanic, &message)
        }
    };
    if let Err(e) = inner
        .conn
        .send_bytes(&end, in_conversation(conv).last(true))
        .await
    {
        tracing::debug!(error = %e, "argument stream not ended");
    }
}

/// How a stream's source ended.
enum Finish {
    End,
    Failed(StreamError),
    /// Polling the source panicked (a producer given as `Receiver::from_stream` runs in
    /// that poll).
    Panicked(String),
}

/// Why [`write_items`] stopped.
enum Written {
    /// The source ended.
    Source(Finish),
    /// The reader is gone, or the caller cancelled.
    Cancelled,
    /// An item could not be sent: the connection is closing.
    Lost,
}

/// A batch's items take at most this many bytes (but one item alone may be larger).
const BATCH_BYTES: usize = 16 * 1024;

/// A writer adds ready items to a batch while its items take less than this: small items
/// are what batching is for (a 64-byte item costs far less than its message), and a
/// message of larger ones stays within chatter-core's 16 KiB read chunk.
const GATHER_BYTES: usize = 8 * 1024;

/// A writer keeps its batch buffer between batches up to this capacity (a 64 KiB item
/// fits), so that a stream of large items does not allocate one per item.
const KEEP_BATCH: usize = 128 * 1024;

/// Sends the items of `source` in conversation `conv`, within the reader's credit
/// (`outlet`), until the source ends, the reader or `cancel` stops the stream, or the
/// connection fails. The items that are ready when one is sent go with it, in one message
/// (`[3, item, ...]`, at most [`BATCH_BYTES`] of items): a stream of small items costs
/// one chatter-core message per batch, not per item.
async fn write_items<C: Future + Unpin>(
    inner: &Inner,
    conv: Conversation,
    source: &mut ItemSource,
    outlet: &Outlet,
    cancel: &mut C,
) -> Written {
    let items = in_conversation(conv);
    let mut batch = envelope::ItemBatch::new();
    // The longest envelope the reader's frames take (chatter-core PROTOCOL.md §2: its
    // `max_frame_size`), learnt when the connection refused a longer one: batches stay
    // within it from then on.
    let mut room = usize::MAX;
    loop {
        // Empty, or with the item the last batch had no room or credit for.
        batch.next(KEEP_BATCH);
        if batch.count() == 0 {
            let pulled = tokio::select! {
                biased;
                _ = &mut *cancel => return Written::Cancelled,
                () = outlet.cancelled() => return Written::Cancelled,
                pulled = std::future::poll_fn(|cx| poll_item(source, cx, batch.buf())) => pulled,
            };
            if let Some(finish) = pulled {
                return Written::Source(finish);
            }
            batch.added();
        }
        let credit = tokio::select! {
            biased;
            _ = &mut *cancel => return Written::Cancelled,
            credit = outlet.take(cost(batch.payload_len(), 1)) => credit,
        };
        match credit {
            Ok(()) => {}
            Err(StreamError::Cancelled) => return Written::Cancelled,
            Err(e) => return Written::Source(Finish::Failed(e)),
        }
        let finish =
            std::future::poll_fn(|cx| Poll::Ready(gather(source, cx, outlet, &mut batch, room)))
                .await;
        match inner.conn.send_bytes(batch.payload(), items).await {
            Ok(_) => {}
            Err(SendError::TooLarge { size, max }) => {
                // What the message header adds to the envelope; ids grow by up to 8 bytes.
                let header = size.saturating_sub(batch.payload_len());
                room = (max as usize).saturating_sub(header + 8);
                if let Err(written) = send_split(inner, items, outlet, &batch, room).await {
                    return written;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "stream items not sent");
                return Written::Lost;
            }
        }
        if let Some(finish) = finish {
            return Written::Source(finish);
        }
    }
}

/// Sends the items of `batch`, whose envelope the reader's frames refused, in batches
/// whose envelopes take at most `room` bytes. Their extra envelope headers cost credit
/// beyond what `batch` took, taken here. An item that does not fit `room` alone fails the
/// stream, as one larger than the reader's window does, once the items before it are
/// sent: the reader gets every item up to the one that could not go, then the failure.
#[cold]
async fn send_split(
    inner: &Inner,
    options: SendOptions,
    outlet: &Outlet,
    batch: &envelope::ItemBatch,
    room: usize,
) -> Result<(), Written> {
    let mut parts = vec![envelope::ItemBatch::new()];
    let mut too_large = None;
    for item in batch.items() {
        // The envelope's header grows by 2 bytes from 15 items on.
        if item.len() + 4 > room {
            too_large = Some(Written::Source(Finish::Failed(StreamError::Protocol(
                format!(
                    "an item of {} bytes cannot fit the reader's frames ({room} bytes of envelope)",
                    item.len()
                ),
            ))));
            break;
        }
        let part = parts.last_mut().expect("one part at least");
        if part.count() > 0
            && (part.payload_len() + item.len() + 2 > room || part.count() == envelope::MAX_BATCH)
        {
            parts.push(envelope::ItemBatch::new());
        }
        let part = parts.last_mut().expect("one part at least");
        part.buf().extend_from_slice(item);
        part.added();
    }
    let taken = cost(batch.payload_len(), batch.count());
    let total: u64 = parts.iter().map(|p| cost(p.payload_len(), p.count())).sum();
    if total > taken {
        match outlet.take(total - taken).await {
            Ok(()) => {}
            Err(StreamError::Cancelled) => return Err(Written::Cancelled),
            Err(e) => return Err(Written::Source(Finish::Failed(e))),
        }
    }
    for mut part in parts {
        if part.count() == 0 {
            continue;
        }
        if let Err(e) = inner.conn.send_bytes(part.payload(), options).await {
            tracing::debug!(error = %e, "stream items not sent");
            return Err(Written::Lost);
        }
    }
    too_large.map_or(Ok(()), Err)
}

/// Adds to `batch` the items `source` has ready now, while the batch's items take less
/// than [`GATHER_BYTES`], as long as the reader's credit covers them, the batch stays
/// within [`BATCH_BYTES`] and [`MAX_BATCH`] items, and its envelope within `room` bytes
/// (the reader's frames, once known). An item pulled that does not fit is held back for
/// the next batch. Returns how the source ended, if it did (after the batch's items).
///
/// [`MAX_BATCH`]: envelope::MAX_BATCH
fn gather(
    source: &mut ItemSource,
    cx: &mut Context<'_>,
    outlet: &Outlet,
    batch: &mut envelope::ItemBatch,
    room: usize,
) -> Option<Finish> {
    if batch.values_len() >= GATHER_BYTES {
        return None;
    }
    // The credit, spent here without a lock per item; what is left goes back.
    let mut credit = outlet.take_all();
    let mut finish = None;
    while batch.count() < envelope::MAX_BATCH && batch.values_len() < GATHER_BYTES {
        let before = cost(batch.payload_len(), batch.count());
        let mark = batch.len();
        match poll_item(source, cx, batch.buf()) {
            Poll::Pending => break,
            Poll::Ready(Some(end)) => {
                finish = Some(end);
                break;
            }
            Poll::Ready(None) => {}
        }
        batch.added();
        let delta = cost(batch.payload_len(), batch.count()) - before;
        if batch.values_len() > BATCH_BYTES || batch.payload_len() > room || delta > credit {
            // Too large for this batch, beyond the credit, or the reader is gone: the
            // next batch starts with it (and waits for credit or sees the cancel).
            batch.hold_back(mark);
            break;
        }
        credit -= delta;
    }
    outlet.refund(credit);
    finish
}

/// Polls `source` for its next item, appended to `out`: `Ready(None)` when it was,
/// `Ready(Some(finish))` when the source ended (nothing appended).
fn poll_item(
    source: &mut ItemSource,
    cx: &mut Context<'_>,
    out: &mut Vec<u8>,
) -> Poll<Option<Finish>> {
    let mark = out.len();
    let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        source.as_mut().poll_encode(cx, out)
    }));
    let finish = match polled {
        Ok(Poll::Pending) => return Poll::Pending,
        Ok(Poll::Ready(Some(Ok(())))) => return Poll::Ready(None),
        Ok(Poll::Ready(None)) => Finish::End,
        Ok(Poll::Ready(Some(Err(e)))) => Finish::Failed(e),
        Err(panic) => Finish::Panicked(panic_message(panic.as_ref())),
    };
    out.truncate(mark);
    Poll::Ready(Some(finish))
}

/// Options for a message that keeps the turn in an open conversation.
fn in_conversation(conv: Conversation) -> SendOptions {
    SendOptions::new()
        .conversation(conv)
        .last(false)
        .token(false)
}

// The callee's half.

/// The callee's end of an argument stream: grants `[5, bytes]` and stop `[6]` go to the
/// caller in the call's conversation, while the call runs.
struct CalleeEnd {
    inner: Weak<Inner>,
    conv: Conversation,
}

impl RemoteEnd for CalleeEnd {
    fn grant(&self, bytes: u64) {
        if let Some(inner) = self.inner.upgrade() {
            inner.send_soon(envelope::encode_grant(bytes), in_conversation(self.conv));
        }
    }

    fn cancel(&self) {
        if let Some(inner) = self.inner.upgrade() {
            let stop = envelope::encode_bare(envelope::STOP);
            inner.send_soon(stop, in_conversation(self.conv));
        }
    }
}

/// A stream call this side serves, as the receive task decoded it.
pub(super) struct StreamCallIn<'a> {
    pub(super) conv: Conversation,
    pub(super) envelope: &'a Bytes,
    pub(super) object: Name<'a>,
    pub(super) method: Name<'a>,
    pub(super) deadline: Duration,
    pub(super) window: u64,
    pub(super) context: Option<&'a [u8]>,
    pub(super) args: &'a [u8],
}

impl Inner {
    /// Starts serving a stream call, or returns the failure that answers it. The handler
    /// runs in a task of its own, counted against `max_streams` (not a handler slot).
    pub(super) fn start_stream_call(
        self: &Arc<Self>,
        call: StreamCallIn<'_>,
    ) -> Result<(), Payload> {
        let id = call.conv.first_id();
        let streams = self.streams();
        {
            let mut st = lock(&streams.state);
            let limit = self.peer.options.max_streams;
            if st.serving >= limit {
                let what = format!("this side serves {limit} streams on the connection already (PeerOptions::max_streams)");
                return Err(wire::encode_failure(FailureKind::TooManyStreams, &what));
            }
            st.serving += 1;
        }
        let mut serving = Serving {
            inner: self,
            armed: true,
        };
        let Some(service) = self.lookup_name(call.object) else {
            return Err(wire::encode_failure(
                FailureKind::NoSuchObject,
                &call.object.to_string(),
            ));
        };
        let window = self.peer.options.stream_window;
        let mut handlers = Handlers::new();
        handlers.set_stream(Box::new(StreamParts {
            setup: Some(InputSetup {
                window,
                end: Arc::new(CalleeEnd {
                    inner: self.me.clone(),
                    conv: call.conv,
                }),
            }),
            ..StreamParts::default()
        }));
        let dispatch = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            service.__dispatch(call.method.as_bytes(), call.args, &mut handlers)
        }));
        let parts = handlers.take_stream();
        let method = call.method;
        let (handler, inbox) = match dispatch {
            Ok(crate::service::Dispatch::Stream) => match parts {
                Some(parts) => match parts.handler {
                    Some(handler) => (handler, parts.inbox),
                    None => return Err(protocol("the dispatch put no stream handler in place")),
                },
                None => return Err(protocol("the dispatch put no stream handler in place")),
            },
            Ok(crate::service::Dispatch::Call) => {
                return Err(protocol(&format!(
                    "`{method}` has no stream: call it with an ordinary call (envelope kind 0)"
                )))
            }
            Ok(crate::service::Dispatch::Signal) => {
                return Err(protocol(&format!(
                    "`{method}` is a signal: send it, do not call it"
                )))
            }
            Ok(crate::service::Dispatch::NoSuchMethod) => {
                return Err(wire::encode_failure(
                    FailureKind::NoSuchMethod,
                    &method.to_string(),
                ))
            }
            Ok(crate::service::Dispatch::BadArguments(what)) => {
                return Err(wire::encode_failure(FailureKind::BadArguments, &what))
            }
            Err(panic) => {
                bump(&self.peer.stats.handler_panics);
                let message = panic_message(panic.as_ref());
                return Err(wire::encode_failure(FailureKind::RemotePanic, &message));
            }
        };
        let cancel = {
            let mut inflight = lock(&self.inflight);
            if inflight.closing {
                return Err(wire::encode_failure(FailureKind::Cancelled, "closing"));
            }
            let (tx, rx) = oneshot::channel();
            inflight.calls.insert(id, tx);
            rx
        };
        let has_input = inbox.is_some();
        if let Some(inbox) = inbox {
            lock(&streams.state).inputs.insert(id, (call.conv, inbox));
            // The caller opens the argument stream on this first grant.
            self.send_soon(envelope::encode_grant(window), in_conversation(call.conv));
        }
        let context = self.context(
            call.envelope,
            (call.object, call.method),
            false,
            after(call.deadline),
            call.context,
        );
        serving.armed = false;
        self.active
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let run = serve_stream_call(
            self.clone(),
            call.conv,
            CallContext::scope(context, handler),
            // The deadline covers opening: the handler's return, or (with an argument
            // stream, whose first grant opens the call) nothing.
            (call.window, (!has_input).then(|| after(call.deadline))),
            cancel,
        );
        // Counted against `max_streams` (above): at most that many per connection, and
        // not a handler slot. A caller that never reads its result stream holds its place
        // here (with one encoded item and the producer's own buffer) until it cancels or
        // the connection closes; its argument items are held within `stream_window`. Ends
        // with the stream, its cancel, the deadline before opening, or the connection.
        tokio::spawn(run);
        Ok(())
    }

    /// A message of an argument stream this side reads: its opening `[14, call]`, or (in
    /// its conversation) an item or the end. Returns the credit to give back now.
    pub(super) fn on_argument(&self, msg: &Msg, call: Option<u64>) -> u64 {
        let credit = u64::from(msg.credit());
        let Some(streams) = self.streams.get() else {
            return credit;
        };
        let conv = msg.conversation.first_id();
        let mut st = lock(&streams.state);
        if let Some(call) = call {
            if let Some((call, inbox)) = st.inputs.remove(&call) {
                if !msg.last {
                    st.arguments.insert(conv, (call, inbox));
                } else {
                    inbox.finish(Ok(()));
                }
            }
            return credit;
        }
        let Some(&(call, ref inbox)) = st.arguments.get(&conv) else {
            // The call ended (its reader is gone): dropped.
            return credit;
        };
        let outcome = match envelope::decode_stream_msg(&msg.payload) {
            Ok(StreamMsg::Items(items)) if !msg.last => {
                inbox.push_items(&msg.payload, items).map_err(|over| {
                    format!(
                        "the caller sent {} bytes beyond the {} granted",
                        over.cost, over.window
                    )
                })
            }
            Ok(StreamMsg::End) if msg.last => {
                inbox.finish(Ok(()));
                st.arguments.remove(&conv);
                return credit;
            }
            Ok(other) => Err(format!("unexpected argument stream message {other:?}")),
            // The caller's source failed: `[2, kind, message]` ends the stream.
            Err(_)
                if msg.last
                    && matches!(
                        wire::decode_reply(&msg.payload),
                        Ok(ReplyEnvelope::Failure { .. })
                    ) =>
            {
                inbox.finish(Err(stream_failure(&msg.payload)));
                st.arguments.remove(&conv);
                return credit;
            }
            Err(e) => Err(e.0),
        };
        if let Err(what) = outcome {
            if let Some(warnings) = self.warnings.admit() {
                tracing::warn!(conversation = conv, error = %what, warnings, "argument stream protocol error from peer");
            }
            inbox.finish(Err(StreamError::Protocol(what)));
            st.arguments.remove(&conv);
            drop(st);
            // The stream failed: the caller stops sending now, not when the call ends
            // (PROTOCOL.md, Streams: `[6]`). Once per stream: its later messages find
            // it gone.
            let stop = envelope::encode_bare(envelope::STOP);
            self.send_soon(stop, in_conversation(call));
            return credit;
        }
        if msg.last {
            st.arguments.remove(&conv);
        }
        credit
    }

    /// More credit for a result stream this side writes.
    pub(super) fn on_result_grant(&self, call: u64, bytes: u64) {
        if let Some(streams) = self.streams.get() {
            if let Some(outlet) = lock(&streams.state).outlets.get(&call) {
                outlet.grant(bytes);
            }
        }
    }

    /// A stream call served here is over.
    fn stream_call_done(&self, id: u64) {
        if let Some(streams) = self.streams.get() {
            let mut st = lock(&streams.state);
            st.serving -= 1;
            st.outlets.remove(&id);
            // The call is over: a reader of its argument stream (if the handler passed it
            // on) learns that the caller will send nothing more.
            if let Some((_, inbox)) = st.inputs.remove(&id) {
                inbox.finish(Err(StreamError::Cancelled));
            }
            st.arguments.retain(|_, (call, inbox)| {
                if call.first_id() == id {
                    inbox.finish(Err(StreamError::Cancelled));
                }
                call.first_id() != id
            });
        }
        lock(&self.inflight).calls.remove(&id);
        self.call_done();
    }
}

/// A failure reply with kind *protocol*.
fn protocol(what: &str) -> Payload {
    wire::encode_failure(FailureKind::Protocol, what)
}

/// Gives back a `max_streams` place taken for a stream call that did not start.
struct Serving<'a> {
    inner: &'a Inner,
    armed: bool,
}

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Some(streams) = self.inner.streams.get() {
                lock(&streams.state).serving -= 1;
            }
        }
    }
}

/// Serves one stream call: runs its handler (until the deadline, if the call has no
/// argument stream: the deadline covers opening), then answers, or opens the result
/// stream and forwards its items within the caller's grants, and ends the call.
async fn serve_stream_call(
    inner: Arc<Inner>,
    conv: Conversation,
    handler: impl Future<Output = crate::service::StreamReply>,
    (window, deadline): (u64, Option<Instant>),
    mut cancel: oneshot::Receiver<()>,
) {
    let id = conv.first_id();
    let handler = CatchPanic(Box::pin(handler));
    let reply = tokio::select! {
        biased;
        _ = &mut cancel => Reply::Done(wire::encode_failure(FailureKind::Cancelled, "cancelled")),
        () = until(deadline) => {
            Reply::Done(wire::encode_failure(FailureKind::DeadlineExceeded, "deadline exceeded"))
        }
        reply = handler => match reply {
            Ok(reply) => reply.0,
            Err(message) => {
                bump(&inner.peer.stats.handler_panics);
                Reply::Done(wire::encode_failure(FailureKind::RemotePanic, &message))
            }
        },
    };
    let end = match reply {
        Reply::Done(reply) => reply,
        Reply::Open(source) => {
            let outlet = Arc::new(Outlet::new(window, window));
            if let Some(streams) = inner.streams.get() {
                lock(&streams.state).outlets.insert(id, outlet.clone());
            }
            let opening = wire::encode_ok(&()).unwrap_or_else(|_| protocol("unit"));
            match inner.conn.send_bytes(&opening, in_conversation(conv)).await {
                Ok(_) => forward_result(&inner, conv, source, &outlet, &mut cancel).await,
                Err(e) => {
                    tracing::debug!(error = %e, "stream not opened");
                    inner.stream_call_done(id);
                    return;
                }
            }
        }
    };
    let last = SendOptions::new().conversation(conv);
    let mut sent = inner.conn.send_bytes(&end, last).await;
    // A reply larger than the caller's frames (a value or an application error): the call
    // is still answered, with a failure in its place.
    if let Some(failure) = sent
        .as_ref()
        .err()
        .and_then(super::serve::too_large_failure)
    {
        sent = inner.conn.send_bytes(&failure, last).await;
    }
    if let Err(e) = sent {
        tracing::debug!(conversation = id, error = %e, "stream call not ended");
    }
    inner.stream_call_done(id);
}

/// Forwards a result stream's items; returns the envelope that ends the call.
async fn forward_result(
    inner: &Inner,
    conv: Conversation,
    mut source: ItemSource,
    outlet: &Outlet,
    cancel: &mut oneshot::Receiver<()>,
) -> Payload {
    match write_items(inner, conv, &mut source, outlet, cancel).await {
        Written::Source(Finish::End) => envelope::encode_bare(envelope::END),
        Written::Source(Finish::Failed(e)) => failure_of(&e),
        Written::Source(Finish::Panicked(message)) => {
            bump(&inner.peer.stats.handler_panics);
            wire::encode_failure(FailureKind::RemotePanic, &message)
        }
        // Cancelled by the caller, or by this side's close (its reader then learns that
        // the connection is going away, not that it cancelled).
        Written::Cancelled | Written::Lost if inner.is_closing() => wire::encode_failure(
            FailureKind::ShuttingDown,
            "the callee closed the connection",
        ),
        Written::Cancelled | Written::Lost => {
            wire::encode_failure(FailureKind::Cancelled, "cancelled")
        }
    }
}

/// The failure envelope that ends a result stream whose source failed with `e` (the
/// reader's [`stream_failure`] maps it back).
fn failure_of(e: &StreamError) -> Payload {
    match e {
        StreamError::BadItem(what) => wire::encode_failure(FailureKind::BadArguments, what),
        StreamError::RemotePanic(what) => wire::encode_failure(FailureKind::RemotePanic, what),
        StreamError::Cancelled => wire::encode_failure(FailureKind::Cancelled, "cancelled"),
        StreamError::Protocol(what) => wire::encode_failure(FailureKind::Protocol, what),
        other => wire::encode_failure(FailureKind::Protocol, &other.to_string()),
    }
}

/// Resolves at `deadline`, or never.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs a future, turning a panic into `Err(message)`.
struct CatchPanic<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchPanic<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(payload) => Poll::Ready(Err(panic_message(payload.as_ref()))),
        }
    }
}
