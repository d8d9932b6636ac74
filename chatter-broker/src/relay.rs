//! The relay: one [`Link`] per connected peer, a reader task that takes its messages and a
//! writer task that delivers what waits for its credit. `docs/design/broker.md` explains
//! the rules; the short version:
//!
//! - A request (call, stream call, signal) from link `a` for `peer/object` is forwarded to
//!   the link registered as `peer`, in a conversation the broker opens there. A call's two
//!   conversations form a [`Pair`]; every later message in either is forwarded to the
//!   other, with the same flags.
//! - A message's flow-control credit goes back to its sender only once the broker has
//!   handed it to the destination's connection (or dropped it), so the broker holds at
//!   most each connection's `receive_window` of its input, wherever it waits.
//! - Each destination has one FIFO queue of what could not be sent at once, drained by its
//!   writer in order, so messages of one conversation never overtake each other.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};

use bytes::Bytes;
use chatter_core::proto::{ConversationId, IdBuildHasher};
use chatter_core::{CloseCode, Connection, Conversation, Event, Msg, SendError, SendOptions};
use chatter_msgpack as msgpack;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::access::Rules;
use crate::broker::BrokerState;
use crate::envelope::{self, Envelope, Request};
use crate::introspect::{self, PeerInfo, SubscriptionInfo};
use crate::pubsub::{self, Acked, Held, Item, Publication, Sub};
use crate::{SubscribeError, BROKER_OBJECT};

/// A broadcast copy is not queued for a destination with this many messages waiting.
const MAX_BROADCAST_BACKLOG: usize = 1024;

/// How many events the reader takes from its connection at once.
const BATCH: usize = 64;

/// One connected peer.
pub(crate) struct Link {
    pub(crate) conn: Connection,
    /// The name this link registered, if any.
    pub(crate) name: Mutex<Option<Arc<str>>>,
    routes: Mutex<Routes>,
    out: Mutex<Out>,
    /// Wakes the writer: something was queued, or the link closed.
    wake: Notify,
    /// Wakes a reader that waits for an opening the writer is sending (see [`Routes`]).
    opened: Notify,
    closed: AtomicBool,
    /// Reliable-signal streams relayed to this link: the id this link sees → the sending
    /// link and the id it chose.
    streams_in: Mutex<HashMap<u64, (Weak<Link>, u64)>>,
    /// Reliable-signal streams this link sends through the broker: (destination, its own
    /// id) → the id the destination sees. At most [`MAX_STREAMS_PER_LINK`].
    streams_out: Mutex<Vec<StreamOut>>,
    /// This link's subscriptions, by the id of their stream call (at most
    /// `BrokerOptions::max_subscriptions_per_peer`).
    pub(crate) subs: Mutex<HashMap<u64, Arc<Sub>>>,
    /// Who this peer is, for access control: its client certificate's CN, or what its
    /// credential stands for.
    identity: Mutex<Option<Arc<str>>>,
    /// What it may do; `None`: the broker has no access control.
    rules: Mutex<Option<Arc<Rules>>>,
    pub(crate) state: Arc<BrokerState>,
}

/// One of a link's reliable-signal streams to one destination.
struct StreamOut {
    dest: Weak<Link>,
    own: u64,
    there: u64,
}

/// How many (destination, stream) pairs of reliable signals one connection may send: a
/// peer uses one stream id for all its reliable signals, so one per destination it
/// signals; beyond, reliable signals are refused (acked as failed).
const MAX_STREAMS_PER_LINK: usize = 1024;

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("name", &*lock(&self.name))
            .field("remote", self.conn.remote_address())
            .finish_non_exhaustive()
    }
}

/// The relayed conversations of a link, keyed as the link's connection sees them.
#[derive(Default)]
struct Routes {
    map: HashMap<ConversationId, Arc<Pair>, IdBuildHasher>,
    /// Openings the writer is sending now (awaiting credit): a reply in such a
    /// conversation can arrive before the writer recorded the route.
    opening: usize,
}

/// What waits for a link's credit.
#[derive(Default)]
struct Out {
    /// Not capped by a length of its own: every item holds the flow-control credit of the
    /// message it forwards until it is sent or dropped, so what waits here from one sender
    /// is within that sender's `receive_window`, and all of it within the sum of the
    /// senders' windows (docs/SECURITY.md, the broker's row). Broadcast copies share their
    /// sender's credit, so a destination gets none while [`MAX_BROADCAST_BACKLOG`] wait
    /// here; a subscription has at most one batch here at a time. The broker's own messages
    /// (answers, failures, cancels of a lost caller's calls) are one per request or per
    /// relayed conversation, which `max_routes_per_peer` and `max_conversations` bound.
    queue: VecDeque<Forward>,
    /// The writer is delivering an item it took from the queue.
    busy: bool,
    closed: bool,
}

/// One conversation relayed between two links: `a` opened it on its connection; the broker
/// opened `b_conv` on `b`'s.
pub(crate) struct Pair {
    a: Arc<Link>,
    a_conv: Conversation,
    b: Arc<Link>,
    b_conv: OnceLock<Conversation>,
    /// True while `b` holds the turn (so the broker, standing in for `b`, may speak to `a`).
    b_turn: AtomicBool,
    /// A `last` message went through: nothing more to say on either side.
    ended: AtomicBool,
}

/// A message on its way to a link.
struct Forward {
    target: Target,
    /// The envelope up to the part rewritten at send time (empty: none).
    head: Vec<u8>,
    patch: Patch,
    /// The rest, as it arrived.
    tail: Bytes,
    /// The link whose input this is, and the message's credit there: given back once the
    /// message was sent or dropped.
    credit: Option<(Arc<Link>, u32)>,
}

enum Target {
    /// Opens the pair's conversation on `b`.
    Open { pair: Arc<Pair>, token: bool },
    /// A one-shot message.
    OneShot,
    /// A reliable signal from `from` (its stream id there, and its sequence number as
    /// encoded): acked *failed* to its sender if it cannot be sent.
    Reliable {
        from: Arc<Link>,
        stream: u64,
        seq: Vec<u8>,
    },
    /// A message in the pair's conversation, on `b` (`to_b`) or on `a`.
    Continue {
        pair: Arc<Pair>,
        to_b: bool,
        last: bool,
        token: bool,
    },
    /// The broker's own answer, ending a conversation of this link.
    Answer(Conversation),
    /// A message of the broker's own in a conversation of this link, ending it or not
    /// (a subscription's opening and end).
    Say { conv: Conversation, last: bool },
    /// A batch of a subscription's items (kept until sent: queued again if the batch is
    /// too large for the subscriber's frames).
    Items { sub: Arc<Sub>, items: Vec<Item> },
    /// A one-shot copy of a broadcast signal, holding its share of the sender's credit.
    Copy(#[allow(dead_code)] Arc<Held>),
}

/// What is written between `head` and `tail` when the message is sent.
enum Patch {
    None,
    /// A duration, shortened by the time the message waited in the broker. A signal whose
    /// TTL ran out is dropped.
    Duration {
        ms: u64,
        received: Instant,
        signal: bool,
    },
    /// The id of the pair's call on `b`.
    Call(Arc<Pair>),
}

/// Why a queued message was not sent.
enum Skip {
    /// A signal's TTL ran out while it waited.
    Expired,
    /// Its conversation or call is gone on the other side.
    Orphaned,
}

impl Link {
    pub(crate) fn new(conn: Connection, state: Arc<BrokerState>) -> Arc<Link> {
        let identity = state
            .options
            .access
            .as_ref()
            .and_then(|_| certificate_identity(&conn));
        let link = Arc::new(Link {
            conn,
            name: Mutex::new(None),
            routes: Mutex::default(),
            out: Mutex::default(),
            wake: Notify::new(),
            opened: Notify::new(),
            closed: AtomicBool::new(false),
            streams_in: Mutex::default(),
            streams_out: Mutex::default(),
            subs: Mutex::default(),
            identity: Mutex::new(identity.clone()),
            rules: Mutex::new(
                state
                    .options
                    .access
                    .as_ref()
                    .map(|a| a.rules(identity.as_deref())),
            ),
            state,
        });
        link.state.opened(&link);
        link
    }

    /// What [`BrokerApi::peers`](crate::BrokerApi::peers) says about this connection.
    pub(crate) fn info(&self) -> PeerInfo {
        let mut subscriptions: Vec<SubscriptionInfo> =
            lock(&self.subs).values().map(|sub| sub.info()).collect();
        subscriptions.sort_by(|a, b| a.pattern.cmp(&b.pattern));
        PeerInfo {
            name: lock(&self.name).as_deref().map(str::to_owned),
            address: self.conn.remote_address().to_string(),
            identity: lock(&self.identity).as_deref().map(str::to_owned),
            queued: lock(&self.out).queue.len() as u64,
            routes: lock(&self.routes).map.len() as u64,
            subscriptions,
        }
    }

    /// Whether the access control lets this peer do what `allowed` checks; a denial is
    /// counted.
    fn permit(&self, allowed: impl FnOnce(&Rules) -> bool) -> bool {
        if self.state.options.access.is_none() {
            // Without access control nothing is checked (and no lock taken per message).
            return true;
        }
        let rules = lock(&self.rules).clone();
        let yes = rules.is_none_or(|rules| allowed(&rules));
        if !yes {
            self.state.counters.bump(&self.state.counters.denied);
        }
        yes
    }

    /// Whether the access control lets this peer do what `allowed` checks, without
    /// counting a denial (for what is shown or not, rather than refused).
    fn may(&self, allowed: impl FnOnce(&Rules) -> bool) -> bool {
        self.state.options.access.is_none()
            || lock(&self.rules)
                .clone()
                .is_none_or(|rules| allowed(&rules))
    }

    /// The failure that answers a denied request.
    fn denial(&self, what: &str) -> Vec<u8> {
        let who = match &*lock(&self.identity) {
            Some(identity) => format!("identity `{identity}`"),
            None => "an anonymous peer".to_owned(),
        };
        let why = format!("the broker's access control does not let {who} {what}");
        envelope::failure(envelope::FAILURE_PERMISSION_DENIED, &why)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The name to show in messages: the registered one, or the remote address.
    pub(crate) fn display_name(&self) -> String {
        match &*lock(&self.name) {
            Some(name) => format!("`{name}`"),
            None => format!("at {}", self.conn.remote_address()),
        }
    }

    /// Serves the link until its connection closes: reads, routes, and on close fails or
    /// cancels everything relayed through it.
    pub(crate) async fn run(self: Arc<Self>) {
        // One per link, awaited below: it returns once `close_down` marks the link closed.
        let writer = tokio::spawn(self.clone().write_loop());
        let reading = Reading {
            link: Arc::as_ptr(&self) as usize,
            pending: Cell::new(0),
        };
        let cause = READING.scope(reading, self.read_loop()).await;
        self.close_down(&cause);
        let _ = writer.await;
    }

    /// Takes messages and routes them until the connection closes; returns why it closed.
    async fn read_loop(self: &Arc<Self>) -> String {
        let mut events = Vec::with_capacity(BATCH);
        loop {
            events.clear();
            // What this reader forwarded at once goes back in the same call (one lock
            // instead of one per message).
            let release = READING.with(|r| r.pending.take());
            if let Err(closed) = self
                .conn
                .next_events_holding(&mut events, BATCH, release)
                .await
            {
                return closed.to_string();
            }
            for event in events.drain(..) {
                // The broker sets no conversation timeouts: only messages arrive.
                let Event::Message(msg) = event else { continue };
                self.state.counters.held(u64::from(msg.credit()));
                if msg.first {
                    self.open(msg);
                } else {
                    self.relay(msg).await;
                }
            }
        }
    }

    /// An opening message: a request to route, a cancel or stream envelope naming a call,
    /// or something the broker does not relay.
    fn open(self: &Arc<Self>, msg: Msg) {
        let credit = Some((self.clone(), msg.credit()));
        // The broker may answer only where the sender passed it the turn.
        let answerable = msg.token && !msg.last;
        match envelope::parse(&msg.payload) {
            Ok(Envelope::Request(request)) => self.request(&msg, request, credit),
            Ok(Envelope::CallRef { kind, call, at }) => self.call_ref(&msg, kind, call, at, credit),
            Ok(Envelope::Ack { stream, at }) => self.ack(&msg, stream, at, credit),
            Err(envelope::Unroutable(why)) if answerable => {
                let why = format!("the broker cannot route this request: {why}");
                self.answer(
                    msg.conversation,
                    envelope::failure(envelope::FAILURE_PROTOCOL, &why),
                    credit,
                );
            }
            Err(envelope::Unroutable(why)) => {
                tracing::debug!(from = %self.display_name(), %why, "unroutable one-shot message dropped");
                self.state.counters.bump(&self.state.counters.discarded);
                give_back(credit);
            }
        }
    }

    fn request(self: &Arc<Self>, msg: &Msg, request: Request<'_>, credit: Credit) {
        let call = request.is_call();
        // chatter-rpc's rules: a call passes the turn and a signal is a one-shot; anything
        // else is ignored (nobody may answer it).
        let well_placed = if call {
            msg.token && !msg.last
        } else {
            msg.last
        };
        if !well_placed {
            self.state.counters.bump(&self.state.counters.discarded);
            give_back(credit);
            return;
        }
        let Some(target) = request.target else {
            return self.broker_request(msg, &request, credit);
        };
        if target.contains('*') {
            return self.broadcast(msg, &request, target, credit);
        }
        if !self.permit(|rules| rules.may_call(target)) {
            let answer = self.denial(&format!("call or signal the peer `{target}`"));
            return self.refuse(msg, &request, credit, answer);
        }
        let dest = self.state.lookup(target);
        if let (Some((stream, seq)), None) = (request.reliable, &dest) {
            // A reliable signal nobody can run: acked as failed, so that its sender
            // learns it at once instead of re-sending it until its TTL.
            self.state.counters.bump(&self.state.counters.no_such_peer);
            let ack = envelope::ack(stream, &msg.payload[seq.0..seq.1], envelope::ACK_FAILED);
            return self.one_shot_with(ack, credit);
        }
        let Some(dest) = dest else {
            self.state.counters.bump(&self.state.counters.no_such_peer);
            if call {
                let failure = envelope::failure(envelope::FAILURE_NO_SUCH_PEER, target);
                self.answer(msg.conversation, failure, credit);
            } else {
                tracing::debug!(peer = target, "signal to an unknown peer dropped");
                give_back(credit);
            }
            return;
        };
        let stream = match request.reliable {
            None => None,
            Some((stream, seq)) => match self.stream_to(&dest, stream) {
                Some(there) => Some(there),
                None => {
                    let seq = &msg.payload[seq.0..seq.1];
                    let ack = envelope::ack(stream, seq, envelope::ACK_FAILED);
                    return self.one_shot_with(ack, credit);
                }
            },
        };
        let head = request.rewritten_head(&msg.payload, stream);
        let patch = Patch::Duration {
            ms: request.duration_ms,
            received: Instant::now(),
            signal: !call,
        };
        let tail = msg.payload.slice(request.tail()..);
        let target = if call {
            let max = self.state.max_routes_per_peer();
            if lock(&dest.routes).map.len() >= max {
                let why = format!(
                    "peer `{target}` has {max} conversations open through the broker, its limit"
                );
                self.state.counters.bump(&self.state.counters.busy);
                let failure = envelope::failure(envelope::FAILURE_PEER_BUSY, &why);
                return self.answer(msg.conversation, failure, credit);
            }
            let pair = self.pair(msg.conversation, &dest, true);
            Target::Open { pair, token: true }
        } else if let Some((stream, seq)) = request.reliable {
            Target::Reliable {
                from: self.clone(),
                stream,
                seq: msg.payload[seq.0..seq.1].to_vec(),
            }
        } else {
            Target::OneShot
        };
        dest.forward(Forward {
            target,
            head,
            patch,
            tail,
            credit,
        });
    }

    /// A new pair for the conversation `conv` this link opened, relayed to `dest`.
    fn pair(self: &Arc<Self>, conv: Conversation, dest: &Arc<Link>, b_turn: bool) -> Arc<Pair> {
        let pair = Arc::new(Pair {
            a: self.clone(),
            a_conv: conv,
            b: dest.clone(),
            b_conv: OnceLock::new(),
            b_turn: AtomicBool::new(b_turn),
            ended: AtomicBool::new(false),
        });
        lock(&self.routes).map.insert(conv.id(), pair.clone());
        pair
    }

    /// A cancel, an argument stream's opening or a result credit: forwarded to the callee
    /// of the call it names, with the call's id there.
    fn call_ref(
        self: &Arc<Self>,
        msg: &Msg,
        kind: u8,
        call: u64,
        at: (usize, usize),
        credit: Credit,
    ) {
        let key = ConversationId {
            owner: false,
            first: call,
        };
        let sub = lock(&self.subs).get(&call).cloned();
        if let Some(sub) = sub {
            // A subscription of this link's: its reader's credit, or its cancel.
            match kind {
                envelope::RESULT_CREDIT => {
                    let bytes = msgpack::Reader::new(&msg.payload[at.1..]).read_uint();
                    give_back(credit);
                    match bytes {
                        Ok(bytes) => sub.grant(bytes),
                        Err(e) => sub.end(
                            envelope::FAILURE_PROTOCOL,
                            &format!("a subscription's credit envelope: {e}"),
                        ),
                    }
                }
                envelope::CANCEL => {
                    give_back(credit);
                    sub.end(envelope::FAILURE_CANCELLED, "subscription cancelled");
                }
                _ => {
                    self.state.counters.bump(&self.state.counters.discarded);
                    give_back(credit);
                }
            }
            return;
        }
        let pair = lock(&self.routes).map.get(&key).cloned();
        // Only the caller names its call; an unknown or finished call is ignored, as a
        // callee ignores a cancel for one.
        let Some(pair) = pair.filter(|p| Arc::ptr_eq(&p.a, self) && p.a_conv.id() == key) else {
            self.state.counters.bump(&self.state.counters.discarded);
            give_back(credit);
            return;
        };
        let head = msg.payload[..at.0].to_vec();
        let tail = msg.payload.slice(at.1..);
        let patch = Patch::Call(pair.clone());
        let target = if kind == envelope::ARGUMENT_STREAM {
            // `[14, call]` opens the argument stream's own conversation, the caller
            // keeping the turn.
            if msg.last {
                give_back(credit);
                return;
            }
            let stream = self.pair(msg.conversation, &pair.b, msg.token);
            Target::Open {
                pair: stream,
                token: msg.token,
            }
        } else {
            if !msg.last {
                give_back(credit);
                return;
            }
            Target::OneShot
        };
        pair.b.forward(Forward {
            target,
            head,
            patch,
            tail,
            credit,
        });
    }

    /// A message in a conversation already open: forwarded to the other side of its pair.
    async fn relay(self: &Arc<Self>, msg: Msg) {
        let credit = Some((self.clone(), msg.credit()));
        let key = msg.conversation.id();
        let Some(pair) = self.route(key).await else {
            // The other side is gone (its call failed or was cancelled): drop.
            self.state.counters.bump(&self.state.counters.discarded);
            give_back(credit);
            return;
        };
        let to_b = Arc::ptr_eq(&pair.a, self) && pair.a_conv == msg.conversation;
        if msg.last {
            lock(&self.routes).map.remove(&key);
            pair.ended.store(true, Ordering::Release);
        } else if msg.token {
            pair.b_turn.store(to_b, Ordering::Release);
        }
        let dest = if to_b { pair.b.clone() } else { pair.a.clone() };
        dest.forward(Forward {
            target: Target::Continue {
                pair,
                to_b,
                last: msg.last,
                token: msg.token,
            },
            head: Vec::new(),
            patch: Patch::None,
            tail: msg.payload,
            credit,
        });
    }

    /// The pair of conversation `key`, waiting for an opening the writer is sending.
    async fn route(&self, key: ConversationId) -> Option<Arc<Pair>> {
        loop {
            let mut opened = pin!(self.opened.notified());
            opened.as_mut().enable();
            {
                let routes = lock(&self.routes);
                if let Some(pair) = routes.map.get(&key) {
                    return Some(pair.clone());
                }
                // Only a conversation the broker opened can be waiting for its route: its
                // opening is being sent, and the reply came before the writer recorded it
                // (a window of a few instructions; every other conversation the broker
                // opened keeps its route until its last message, see `lost_a`).
                if routes.opening == 0 || !key.owner {
                    return None;
                }
            }
            // Nothing this reader holds back may wait on the writer (whose send can need
            // the peer to get its credit first).
            let release = READING.with(|r| r.pending.take());
            self.conn.release(release);
            opened.await;
        }
    }

    /// A request for the broker itself (an object name without a route).
    fn broker_request(self: &Arc<Self>, msg: &Msg, request: &Request<'_>, credit: Credit) {
        let method = request.method(&msg.payload);
        let call = request.is_call();
        if request.object == BROKER_OBJECT && method == b"publish" {
            return self.publish(msg, request, credit);
        }
        if !call {
            tracing::debug!(object = request.object, "signal to the broker dropped");
            self.state.counters.bump(&self.state.counters.discarded);
            if let Some((stream, seq)) = request.reliable {
                let ack = envelope::ack(stream, &msg.payload[seq.0..seq.1], envelope::ACK_FAILED);
                return self.one_shot_with(ack, credit);
            }
            give_back(credit);
            return;
        }
        if request.duration_ms == 0 {
            // chatter-rpc's rule for a call with no time left (PROTOCOL.md, "Durations"):
            // answered at once, not run, for every method of the broker's own as for
            // `publish` (a `register` or `subscribe` with deadline 0 used to take effect).
            let answer = envelope::failure(envelope::FAILURE_DEADLINE_EXCEEDED, "deadline 0");
            return self.answer(msg.conversation, answer, credit);
        }
        if request.object == BROKER_OBJECT && method == b"subscribe" {
            return self.subscribe(msg, request, credit);
        }
        let answer = if request.object == chatter_rpc::introspect::OBJECT {
            self.introspect(method, msg, request)
        } else if request.object != BROKER_OBJECT {
            envelope::failure(envelope::FAILURE_NO_SUCH_OBJECT, request.object)
        } else if method == b"stats" || method == b"peers" {
            if !self.permit(Rules::may_introspect) {
                self.denial("ask the broker for its peers and counters")
            } else if method == b"stats" {
                ok_value(&self.state.stats())
            } else {
                let mut peers: Vec<PeerInfo> =
                    self.state.links().iter().map(|l| l.info()).collect();
                peers.sort_by(|a, b| (a.name.is_none(), &a.name).cmp(&(b.name.is_none(), &b.name)));
                ok_value(&peers)
            }
        } else if method == b"authenticate" {
            self.authenticate(msg, request)
        } else if method != b"register" {
            let method = String::from_utf8_lossy(method).into_owned();
            envelope::failure(envelope::FAILURE_NO_SUCH_METHOD, &method)
        } else {
            match request.args(&msg.payload) {
                None => envelope::failure(
                    envelope::FAILURE_PROTOCOL,
                    "the broker's `register` takes a plain call (kind 0 or 9)",
                ),
                Some(args) => match envelope::register_args(args) {
                    Ok((name, _)) if !self.permit(|rules| rules.may_register(&name)) => {
                        self.denial(&format!("register the name `{name}`"))
                    }
                    Ok((name, take_over)) => match self.state.register(self, &name, take_over) {
                        Ok(()) => envelope::ok_unit(),
                        Err(e) => app_error(&e),
                    },
                    Err(what) => envelope::failure(
                        envelope::FAILURE_BAD_ARGUMENTS,
                        &format!("arguments of `register`: cannot decode (String, bool): {what}"),
                    ),
                },
            }
        };
        self.answer(msg.conversation, answer, credit);
    }

    /// chatter-rpc's `chatter.introspect`, for the broker's own object: `list`, `describe`,
    /// `stats` (the broker's counters; access control as `peers`) and `ping`.
    fn introspect(self: &Arc<Self>, method: &[u8], msg: &Msg, request: &Request<'_>) -> Vec<u8> {
        let description = introspect::description();
        match method {
            b"ping" => envelope::ok_unit(),
            b"list" => ok_value(&[introspect::Summary {
                object: BROKER_OBJECT,
                interface: description.map(|d| d.name.to_string()),
                methods: description
                    .map(|d| d.methods.iter().map(|m| m.name.to_string()).collect())
                    .unwrap_or_default(),
            }]),
            b"stats" if !self.permit(Rules::may_introspect) => {
                self.denial("ask the broker for its peers and counters")
            }
            b"stats" => {
                // The counters as chatter-rpc's `PeerCounter`s, named as `BrokerStats`'s
                // fields, in their order: read back from the struct's own encoding.
                let mut map = Vec::new();
                if let Err(e) = chatter_core::codec::encode(&mut map, &self.state.stats()) {
                    return envelope::failure(envelope::FAILURE_PROTOCOL, &e.to_string());
                }
                let mut r = msgpack::Reader::new(&map);
                let len = r.read_map_len().unwrap_or(0);
                let counters: Vec<introspect::Counter> = (0..len)
                    .map_while(|_| {
                        let name = r.read_str().ok()?.to_owned();
                        Some(introspect::Counter {
                            name,
                            value: r.read_uint().ok()?,
                        })
                    })
                    .collect();
                ok_value(&counters)
            }
            b"describe" => {
                let object = request
                    .args(&msg.payload)
                    .and_then(|args| chatter_core::codec::decode::<(String,)>(args).ok());
                match (object, description) {
                    (Some((object,)), Some(description)) if object == BROKER_OBJECT => {
                        ok_value(description)
                    }
                    (Some((object,)), _) => {
                        let error = introspect::DescribeError::NoSuchObject {
                            object: object.clone(),
                            known: vec![BROKER_OBJECT.to_owned()],
                        };
                        let message =
                            format!("no object `{object}` (this broker serves: {BROKER_OBJECT})");
                        let mut value = Vec::new();
                        match chatter_core::codec::encode(&mut value, &error) {
                            Ok(()) => envelope::app_error(&message, &value),
                            Err(e) => envelope::failure(envelope::FAILURE_PROTOCOL, &e.to_string()),
                        }
                    }
                    (None, _) => envelope::failure(
                        envelope::FAILURE_BAD_ARGUMENTS,
                        "arguments of `describe`: cannot decode (String,)",
                    ),
                }
            }
            other => {
                let method = String::from_utf8_lossy(other).into_owned();
                envelope::failure(envelope::FAILURE_NO_SUCH_METHOD, &method)
            }
        }
    }

    /// `authenticate(credential)`: the identity the credential stands for becomes this
    /// connection's (its rules apply from the next request on). Without access control
    /// any credential is accepted and means nothing.
    fn authenticate(self: &Arc<Self>, msg: &Msg, request: &Request<'_>) -> Vec<u8> {
        let Some(args) = request.args(&msg.payload) else {
            return envelope::failure(
                envelope::FAILURE_PROTOCOL,
                "the broker's `authenticate` takes a plain call (kind 0 or 9)",
            );
        };
        let token = match chatter_core::codec::decode::<(String,)>(args) {
            Ok((token,)) => token,
            Err(e) => {
                let why = format!("arguments of `authenticate`: cannot decode (String,): {e}");
                return envelope::failure(envelope::FAILURE_BAD_ARGUMENTS, &why);
            }
        };
        let Some(access) = &self.state.options.access else {
            return envelope::ok_value_str("");
        };
        let Some(identity) = access.identity_of(&token) else {
            self.state.counters.bump(&self.state.counters.denied);
            let why = "the broker's access control does not know this credential";
            return envelope::failure(envelope::FAILURE_PERMISSION_DENIED, why);
        };
        let identity: Arc<str> = identity.into();
        *lock(&self.rules) = Some(access.rules(Some(&identity)));
        *lock(&self.identity) = Some(identity.clone());
        envelope::ok_value_str(&identity)
    }

    /// `publish(topic, value)`: a signal (or reliable signal), or a call for an
    /// acknowledged publication, answered with a `PublishReport` once every copy was
    /// delivered or dropped.
    fn publish(self: &Arc<Self>, msg: &Msg, request: &Request<'_>, credit: Credit) {
        let acked = request.is_call();
        if acked && request.duration_ms == 0 {
            // chatter-rpc's rule for a call with no time left (PROTOCOL.md, "Durations").
            let answer = envelope::failure(envelope::FAILURE_DEADLINE_EXCEEDED, "deadline 0");
            return self.answer(msg.conversation, answer, credit);
        }
        if request.is_stream_call() {
            let why = "`publish` is a call or a signal, not a stream call";
            return self.answer(
                msg.conversation,
                envelope::failure(envelope::FAILURE_PROTOCOL, why),
                credit,
            );
        }
        let parsed = request
            .window_and_args(&msg.payload)
            .ok_or_else(|| "the envelope ends before its arguments".to_owned())
            .and_then(|(_, args)| {
                let base = msg.payload.len() - args.len();
                envelope::publish_args(args).map(|(topic, (a, b))| (topic, (base + a, base + b)))
            });
        let counters = &self.state.counters;
        let (topic, at) = match parsed {
            Ok(parsed) => parsed,
            Err(what) => {
                counters.bump(&counters.discarded);
                let why = format!("arguments of `publish`: cannot decode (String, value): {what}");
                return self.refuse(
                    msg,
                    request,
                    credit,
                    envelope::failure(envelope::FAILURE_BAD_ARGUMENTS, &why),
                );
            }
        };
        let checked =
            pubsub::check_topic(topic, self.state.options.max_topic_len).and_then(|()| match topic
                .starts_with(pubsub::RESERVED_PREFIX)
            {
                true => Err(format!(
                    "topics under `{}` are the broker's own",
                    pubsub::RESERVED_PREFIX
                )),
                false => Ok(()),
            });
        if let Err(why) = checked {
            counters.bump(&counters.discarded);
            let error = crate::PublishError::InvalidTopic {
                topic: topic.to_owned(),
                reason: why,
            };
            return self.refuse(msg, request, credit, app_error(&error));
        }
        if !self.permit(|rules| rules.may_publish(topic)) {
            let answer = self.denial(&format!("publish on `{topic}`"));
            return self.refuse(msg, request, credit, answer);
        }
        counters.bump(&counters.publications);
        let mut subs = Vec::new();
        lock(&self.state.topics).matching(topic, &mut subs);
        let mut encoded = Vec::with_capacity(topic.len() + 5);
        msgpack::write_str(&mut encoded, topic);
        let ttl = std::time::Duration::from_millis(request.duration_ms.min(u64::from(u32::MAX)));
        let (held, acked) = if acked {
            let n = u32::try_from(subs.len()).unwrap_or(u32::MAX);
            let reveal = self.may(Rules::may_introspect);
            (
                None,
                Some(Acked::new(
                    self.clone(),
                    msg.conversation,
                    credit,
                    n,
                    reveal,
                )),
            )
        } else {
            (Some(Held::new(credit)), None)
        };
        let publication = Publication {
            topic: encoded.into(),
            value: msg.payload.slice(at.0..at.1),
            expires: Instant::now() + ttl,
            held,
            acked,
        };
        for sub in &subs {
            sub.push(&publication);
        }
        // The reliable signal's ack: the broker took it (its copies are on their way).
        if let Some((stream, seq)) = request.reliable {
            let ack = envelope::ack(stream, &msg.payload[seq.0..seq.1], 0);
            self.one_shot(ack);
        }
    }

    /// A request the broker refuses: a call is answered `answer`, a reliable signal acked
    /// as failed, a signal dropped.
    fn refuse(self: &Arc<Self>, msg: &Msg, request: &Request<'_>, credit: Credit, answer: Vec<u8>) {
        if request.is_call() {
            self.answer(msg.conversation, answer, credit);
        } else if let Some((stream, seq)) = request.reliable {
            let ack = envelope::ack(stream, &msg.payload[seq.0..seq.1], envelope::ACK_FAILED);
            self.one_shot_with(ack, credit);
        } else {
            give_back(credit);
        }
    }

    /// `subscribe(pattern, options)`: a stream call whose items are the publications on
    /// matching topics.
    fn subscribe(self: &Arc<Self>, msg: &Msg, request: &Request<'_>, credit: Credit) {
        let conv = msg.conversation;
        if !request.is_stream_call() {
            let why = "`subscribe` returns a stream: call it with a stream call (kind 12 or 13)";
            return self.answer(
                conv,
                envelope::failure(envelope::FAILURE_PROTOCOL, why),
                credit,
            );
        }
        let options = &self.state.options;
        let parsed = request
            .window_and_args(&msg.payload)
            .ok_or_else(|| "the envelope ends before its arguments".to_owned())
            .and_then(|(window, args)| Ok((window, envelope::subscribe_args(args)?)));
        let (window, (pattern, wanted)) = match parsed {
            Ok(parsed) => parsed,
            Err(what) => {
                let why = format!(
                    "arguments of `subscribe`: cannot decode (String, SubscribeOptions): {what}"
                );
                return self.answer(
                    conv,
                    envelope::failure(envelope::FAILURE_BAD_ARGUMENTS, &why),
                    credit,
                );
            }
        };
        let refused = if let Err(reason) = pubsub::check_pattern(&pattern, options.max_topic_len) {
            Some(SubscribeError::InvalidPattern {
                pattern: pattern.clone(),
                reason,
            })
        } else if !self.permit(|rules| rules.may_subscribe(&pattern)) {
            let answer = self.denial(&format!("subscribe to `{pattern}`"));
            return self.answer(conv, answer, credit);
        } else if lock(&self.subs).len() >= options.max_subscriptions_per_peer {
            Some(SubscribeError::TooManySubscriptions {
                limit: options.max_subscriptions_per_peer,
            })
        } else {
            None
        };
        if let Some(error) = refused {
            self.state.counters.bump(&self.state.counters.discarded);
            return self.answer(conv, app_error(&error), credit);
        }
        if wanted.policy == crate::SlowSubscriber::Backpressure
            && !self.permit(Rules::may_backpressure)
        {
            let answer = self.denial("hold publishers back (the `backpressure` policy)");
            return self.answer(conv, answer, credit);
        }
        let queue_bytes = match wanted.policy {
            crate::SlowSubscriber::Backpressure => options.max_backpressure_queue,
            _ => wanted.queue_bytes.min(options.max_subscription_queue),
        };
        let sub = Sub::new(
            self.clone(),
            conv,
            &pattern,
            wanted.policy,
            queue_bytes,
            window,
        );
        // The opening first, then items: both go through this link's queue in order.
        self.say(conv, envelope::stream_open(), false);
        give_back(credit);
        lock(&self.subs).insert(conv.first_id(), sub.clone());
        // Presence: who is there now, then who comes and goes (the names lock orders the
        // snapshot against `register` and `unregister`, which publish under it).
        self.state.with_names(|names| {
            lock(&self.state.topics).insert(sub.clone());
            for name in names {
                let topic = format!("{}{name}", pubsub::PRESENCE_PREFIX);
                if pubsub::matches(&sub.pattern, &topic) {
                    sub.push(&self.state.presence(name, true));
                }
            }
        });
    }

    /// A signal to every registered peer whose name matches `target` (`*` for any
    /// characters), but the sender: a copy each, the sender's credit given back when the
    /// last copy went. A reliable signal is sent on as plain signals and acked as handled
    /// once the broker took it; a call to a pattern is refused.
    fn broadcast(self: &Arc<Self>, msg: &Msg, request: &Request<'_>, target: &str, credit: Credit) {
        if request.is_call() {
            let why = format!("`{target}` is a name pattern: only signals can be broadcast");
            return self.answer(
                msg.conversation,
                envelope::failure(envelope::FAILURE_PROTOCOL, &why),
                credit,
            );
        }
        let dests = self.state.matching_names(target);
        self.state.counters.bump(&self.state.counters.broadcasts);
        let held = Held::new(credit);
        let head = request.plain_head(&msg.payload);
        let tail = msg.payload.slice(request.tail()..);
        let received = Instant::now();
        for dest in dests {
            if Arc::ptr_eq(&dest, self) {
                continue;
            }
            let name = lock(&dest.name).clone();
            if !name.is_some_and(|name| self.permit(|rules| rules.may_call(&name))) {
                continue;
            }
            // The copies share the sender's credit, so that credit does not bound them per
            // destination: one that has this many messages waiting gets no more copies.
            if lock(&dest.out).queue.len() >= MAX_BROADCAST_BACKLOG {
                self.state.counters.bump(&self.state.counters.discarded);
                continue;
            }
            dest.forward(Forward {
                target: Target::Copy(held.clone()),
                head: head.clone(),
                patch: Patch::Duration {
                    ms: request.duration_ms,
                    received,
                    signal: true,
                },
                tail: tail.clone(),
                credit: None,
            });
        }
        if let Some((stream, seq)) = request.reliable {
            let ack = envelope::ack(stream, &msg.payload[seq.0..seq.1], 0);
            self.one_shot(ack);
        }
    }

    /// Queues (or sends) the broker's own answer in `conv`, giving back `credit` (the
    /// request's) once it went.
    pub(crate) fn answer(self: &Arc<Self>, conv: Conversation, payload: Vec<u8>, credit: Credit) {
        self.forward(Forward {
            target: Target::Answer(conv),
            head: Vec::new(),
            patch: Patch::None,
            tail: payload.into(),
            credit,
        });
    }

    /// A message of the broker's own in `conv`, ending it with `last`.
    pub(crate) fn say(self: &Arc<Self>, conv: Conversation, payload: Vec<u8>, last: bool) {
        self.forward(Forward {
            target: Target::Say { conv, last },
            head: Vec::new(),
            patch: Patch::None,
            tail: payload.into(),
            credit: None,
        });
    }

    /// A batch of `sub`'s items; `sub.settled` is told when it went or could not.
    pub(crate) fn send_items(self: &Arc<Self>, sub: &Arc<Sub>, payload: Vec<u8>, items: Vec<Item>) {
        self.forward(Forward {
            target: Target::Items {
                sub: sub.clone(),
                items,
            },
            head: Vec::new(),
            patch: Patch::None,
            tail: payload.into(),
            credit: None,
        });
    }

    fn one_shot(self: &Arc<Self>, payload: Vec<u8>) {
        self.one_shot_with(payload, None);
    }

    /// A one-shot message of the broker's own, giving back `credit` once it went.
    fn one_shot_with(self: &Arc<Self>, payload: Vec<u8>, credit: Credit) {
        self.forward(Forward {
            target: Target::OneShot,
            head: Vec::new(),
            patch: Patch::None,
            tail: payload.into(),
            credit,
        });
    }

    /// The stream id `dest` sees for this link's reliable-signal stream `own`: the same
    /// id, unless another sender's stream already has it there (then one the broker
    /// chooses). `None` beyond [`MAX_STREAMS_PER_LINK`].
    fn stream_to(self: &Arc<Self>, dest: &Arc<Link>, own: u64) -> Option<u64> {
        let mut out = lock(&self.streams_out);
        if let Some(known) = out
            .iter()
            .find(|s| s.own == own && std::ptr::eq(s.dest.as_ptr(), Arc::as_ptr(dest)))
        {
            return Some(known.there);
        }
        out.retain(|s| s.dest.strong_count() > 0);
        if out.len() >= MAX_STREAMS_PER_LINK {
            self.state.counters.bump(&self.state.counters.discarded);
            return None;
        }
        let mut streams = lock(&dest.streams_in);
        let mut there = own;
        let mut salt = 0u64;
        while streams.contains_key(&there) {
            salt += 1;
            there = random_id(own, salt);
        }
        streams.insert(there, (Arc::downgrade(self), own));
        out.push(StreamOut {
            dest: Arc::downgrade(dest),
            own,
            there,
        });
        Some(there)
    }

    /// An ack from this link (the receiver of reliable signals): to the sender of the
    /// stream, with the sender's stream id.
    fn ack(self: &Arc<Self>, msg: &Msg, stream: u64, at: (usize, usize), credit: Credit) {
        let sender = lock(&self.streams_in).get(&stream).cloned();
        let Some((sender, own)) = sender.and_then(|(link, own)| Some((link.upgrade()?, own)))
        else {
            // The sender is gone: it re-sends on its next connection and gets the ack then.
            self.state.counters.bump(&self.state.counters.discarded);
            give_back(credit);
            return;
        };
        if !msg.last {
            give_back(credit);
            return;
        }
        let mut head = msg.payload[..at.0].to_vec();
        msgpack::write_uint(&mut head, own);
        sender.forward(Forward {
            target: Target::OneShot,
            head,
            patch: Patch::None,
            tail: msg.payload.slice(at.1..),
            credit,
        });
    }

    /// Sends `item` now if nothing waits before it and the connection has credit, else
    /// queues it for the writer.
    fn forward(self: &Arc<Self>, item: Forward) {
        let mut out = lock(&self.out);
        if out.closed {
            drop(out);
            self.discard(item, "its connection closed");
            return;
        }
        if out.queue.is_empty() && !out.busy {
            let mut buf = Vec::new();
            match self.prepare(&item, &mut buf) {
                Err(skip) => {
                    drop(out);
                    self.skip(item, skip);
                    return;
                }
                Ok((payload, options)) => {
                    let sent = match &item.target {
                        Target::Open { pair, .. } => {
                            // Recorded under the routes lock: the reply cannot be read
                            // before the route exists.
                            let mut routes = lock(&self.routes);
                            let sent = self.conn.try_send(payload, options);
                            if let Ok(conv) = &sent {
                                let _ = pair.b_conv.set(*conv);
                                routes.map.insert(conv.id(), pair.clone());
                            }
                            sent
                        }
                        _ => self.conn.try_send(payload, options),
                    };
                    if !matches!(sent, Err(SendError::WouldBlock)) {
                        drop(out);
                        self.settle(item, sent);
                        return;
                    }
                }
            }
        }
        out.queue.push_back(item);
        self.state.counters.queued.fetch_add(1, Ordering::Relaxed);
        drop(out);
        self.wake.notify_one();
    }

    /// Delivers queued messages in order, waiting for credit.
    async fn write_loop(self: Arc<Self>) {
        let mut buf = Vec::new();
        loop {
            let next = {
                let mut out = lock(&self.out);
                if out.closed {
                    return;
                }
                let next = out.queue.pop_front();
                out.busy = next.is_some();
                next
            };
            let Some(item) = next else {
                self.wake.notified().await;
                continue;
            };
            self.state.counters.queued.fetch_sub(1, Ordering::Relaxed);
            self.deliver(item, &mut buf).await;
        }
    }

    async fn deliver(self: &Arc<Self>, item: Forward, buf: &mut Vec<u8>) {
        let (payload, options) = match self.prepare(&item, buf) {
            Ok(ready) => ready,
            Err(skip) => return self.skip(item, skip),
        };
        let sent = if let Target::Open { pair, .. } = &item.target {
            lock(&self.routes).opening += 1;
            let sent = self.send_waiting(payload, options).await;
            {
                let mut routes = lock(&self.routes);
                if let Ok(conv) = &sent {
                    let _ = pair.b_conv.set(*conv);
                    routes.map.insert(conv.id(), pair.clone());
                }
                routes.opening -= 1;
            }
            self.opened.notify_waiters();
            sent
        } else {
            self.send_waiting(payload, options).await
        };
        self.settle(item, sent);
    }

    /// Sends, waiting for credit; with [`BrokerOptions::slow_peer_timeout`], a peer that
    /// gives none back for that long is disconnected.
    ///
    /// [`BrokerOptions::slow_peer_timeout`]: crate::BrokerOptions::slow_peer_timeout
    async fn send_waiting(
        &self,
        payload: &[u8],
        options: SendOptions,
    ) -> Result<Conversation, SendError> {
        let send = self.conn.send_bytes(payload, options);
        let Some(limit) = self.state.slow_peer_timeout() else {
            return send.await;
        };
        match tokio::time::timeout(limit, send).await {
            Ok(sent) => sent,
            Err(_) => {
                self.state
                    .counters
                    .bump(&self.state.counters.slow_peers_closed);
                let reason = format!(
                    "this peer took no message from the broker for {limit:?} (slow_peer_timeout)"
                );
                tracing::debug!(peer = %self.display_name(), "{reason}");
                self.conn.close_with(CloseCode::Busy, &reason).await;
                Err(SendError::Closed(self.conn.closed().await))
            }
        }
    }

    /// The bytes and options of `item` as sent now (its durations shortened by its wait).
    fn prepare<'a>(
        &self,
        item: &'a Forward,
        buf: &'a mut Vec<u8>,
    ) -> Result<(&'a [u8], SendOptions), Skip> {
        let options = match &item.target {
            Target::Open { pair, token } => {
                if pair.a.is_closed() {
                    return Err(Skip::Orphaned);
                }
                SendOptions::new().last(false).token(*token)
            }
            Target::OneShot | Target::Reliable { .. } | Target::Copy(_) => SendOptions::new(),
            Target::Say { conv, last } => SendOptions::new()
                .conversation(*conv)
                .last(*last)
                .token(*last),
            Target::Items { sub, .. } => SendOptions::new()
                .conversation(sub.conv)
                .last(false)
                .token(false),
            Target::Continue {
                pair,
                to_b,
                last,
                token,
            } => {
                let conv = if *to_b {
                    *pair.b_conv.get().ok_or(Skip::Orphaned)?
                } else {
                    pair.a_conv
                };
                SendOptions::new()
                    .conversation(conv)
                    .last(*last)
                    .token(*token)
            }
            Target::Answer(conv) => SendOptions::new().conversation(*conv),
        };
        let value = match &item.patch {
            Patch::None if item.head.is_empty() => return Ok((&item.tail, options)),
            Patch::None => None,
            Patch::Duration {
                ms,
                received,
                signal,
            } => {
                let waited = u64::try_from(received.elapsed().as_millis()).unwrap_or(u64::MAX);
                let left = ms.saturating_sub(waited);
                if *signal && left == 0 {
                    return Err(Skip::Expired);
                }
                Some(left)
            }
            Patch::Call(pair) => Some(pair.b_conv.get().ok_or(Skip::Orphaned)?.first_id()),
        };
        buf.clear();
        buf.extend_from_slice(&item.head);
        if let Some(value) = value {
            msgpack::write_uint(buf, value);
        }
        buf.extend_from_slice(&item.tail);
        Ok((buf.as_slice(), options))
    }

    /// After a send: record what it changed, or deal with a failure; give the credit back.
    fn settle(self: &Arc<Self>, item: Forward, sent: Result<Conversation, SendError>) {
        match sent {
            Ok(conv) => {
                self.state.counters.bump(&self.state.counters.forwarded);
                match item.target {
                    Target::Continue { last: true, .. } => {
                        lock(&self.routes).map.remove(&conv.id());
                    }
                    Target::Items { sub, items } => sub.settled(true, items),
                    _ => {}
                }
                give_back(item.credit);
            }
            Err(SendError::Closed(cause)) => {
                self.discard(item, &cause.to_string());
            }
            Err(e) => {
                tracing::debug!(to = %self.display_name(), error = %e, "message not forwarded");
                self.state.counters.bump(&self.state.counters.discarded);
                if let (Target::Answer(conv), SendError::TooLarge { .. }) = (&item.target, &e) {
                    // The broker's own answer did not fit (a long peer list, say): the
                    // caller gets a short failure instead of waiting for nothing. Only
                    // then: a short answer would fail as this one did for any other
                    // cause (the conversation ended, not the broker's turn), and would
                    // be answered again, without end (a stack overflow).
                    let conv = *conv;
                    let why = format!("the broker's answer could not be sent: {e}");
                    let failure = envelope::failure(envelope::FAILURE_PROTOCOL, &why);
                    self.answer(conv, failure, item.credit);
                    return;
                }
                if let Target::Items { sub, items } = item.target {
                    match e {
                        SendError::TooLarge { size, max } => {
                            // The frame's header is what it adds to the payload; ids grow
                            // by up to 16 bytes, hence the margin.
                            let header = size.saturating_sub(item.tail.len());
                            let frame = (max as usize).saturating_sub(header + 16);
                            sub.refused(items, item.tail.len(), frame);
                        }
                        _ => sub.settled(false, items),
                    }
                    give_back(item.credit);
                    return;
                }
                if let (
                    Target::Continue {
                        pair,
                        to_b: false,
                        last,
                        ..
                    },
                    SendError::TooLarge { .. },
                ) = (&item.target, &e)
                {
                    // A callee's message that cannot reach its caller (larger than the
                    // caller's frames): the caller used to wait for it until its deadline,
                    // and its route stayed until it disconnected. It gets a failure in its
                    // place (the broker speaks for the callee, which held the turn), and
                    // the callee's side ends as when a caller vanishes.
                    let why = format!(
                        "the broker could not forward a message from {} in this call: {e}",
                        pair.b.display_name()
                    );
                    lock(&self.routes).map.remove(&pair.a_conv.id());
                    let b_turn = pair.b_turn.load(Ordering::Acquire);
                    if !*last {
                        lost_a(pair, &why);
                    }
                    if *last || b_turn {
                        let failure = envelope::failure(envelope::FAILURE_PROTOCOL, &why);
                        self.answer(pair.a_conv, failure, None);
                    }
                    give_back(item.credit);
                    return;
                }
                if let (
                    Target::Continue {
                        pair,
                        to_b: true,
                        last: false,
                        ..
                    },
                    SendError::TooLarge { .. },
                ) = (&item.target, &e)
                {
                    if !pair.b_turn.load(Ordering::Acquire)
                        && !pair.ended.swap(true, Ordering::AcqRel)
                    {
                        // A caller's message the callee cannot take (an argument stream's
                        // item larger than its frames): dropping it alone would let the
                        // stream go on without it, and the callee compute on what is left.
                        // The broker holds the caller's turn there: it fails the stream
                        // (PROTOCOL.md, "the argument stream failed"), and drops the rest.
                        if let Some(conv) = pair.b_conv.get().copied() {
                            lock(&self.routes).map.remove(&conv.id());
                            let why = format!(
                                "the broker could not forward a message from {} to {}: {e}",
                                pair.a.display_name(),
                                self.display_name()
                            );
                            let failure = envelope::failure(envelope::FAILURE_PROTOCOL, &why);
                            self.answer(conv, failure, None);
                        }
                        lock(&pair.a.routes).map.remove(&pair.a_conv.id());
                    }
                    give_back(item.credit);
                    return;
                }
                if let Target::Reliable { from, stream, seq } = &item.target {
                    // Larger than the destination's frames, say: it will never be sent, so
                    // its sender learns it now instead of sending it again until its TTL.
                    from.one_shot(envelope::ack(*stream, seq, envelope::ACK_FAILED));
                }
                if let Target::Open { pair, .. } = &item.target {
                    lock(&pair.a.routes).map.remove(&pair.a_conv.id());
                    if pair.b_turn.load(Ordering::Acquire) {
                        let why = format!(
                            "the broker could not forward the request to {}: {e}",
                            self.display_name()
                        );
                        pair.a.answer(
                            pair.a_conv,
                            envelope::failure(envelope::FAILURE_PROTOCOL, &why),
                            None,
                        );
                    }
                }
                give_back(item.credit);
            }
        }
    }

    fn skip(&self, item: Forward, skip: Skip) {
        let counters = &self.state.counters;
        match skip {
            Skip::Expired => counters.bump(&counters.signals_expired),
            Skip::Orphaned => counters.bump(&counters.discarded),
        }
        if let Target::Items { sub, items } = item.target {
            sub.settled(false, items);
        }
        give_back(item.credit);
    }

    /// Drops `item`, which cannot reach this link (closed for `why`): a call it would have
    /// opened fails for its caller.
    fn discard(&self, item: Forward, why: &str) {
        self.state.counters.bump(&self.state.counters.discarded);
        match item.target {
            Target::Open { pair, .. } => lost_b(&pair, why),
            Target::Items { sub, items } => sub.settled(false, items),
            _ => {}
        }
        give_back(item.credit);
    }

    /// The link's connection closed: forget its name, drop what waits for it, and end
    /// every conversation relayed through it on the other side.
    fn close_down(self: &Arc<Self>, cause: &str) {
        self.closed.store(true, Ordering::Release);
        self.state.unregister(self);
        let why = format!("peer {} disconnected: {cause}", self.display_name());
        let queued = {
            let mut out = lock(&self.out);
            out.closed = true;
            std::mem::take(&mut out.queue)
        };
        self.wake.notify_one();
        self.state
            .counters
            .queued
            .fetch_sub(queued.len() as u64, Ordering::Relaxed);
        for item in queued {
            self.discard(item, &why);
        }
        let streams = std::mem::take(&mut *lock(&self.streams_out));
        for stream in streams {
            if let Some(dest) = stream.dest.upgrade() {
                let mut there = lock(&dest.streams_in);
                let ours = there
                    .get(&stream.there)
                    .is_some_and(|(link, _)| std::ptr::eq(link.as_ptr(), Arc::as_ptr(self)));
                if ours {
                    there.remove(&stream.there);
                }
            }
        }
        let subs: Vec<Arc<Sub>> = lock(&self.subs).values().cloned().collect();
        for sub in subs {
            sub.retire();
        }
        let routes = std::mem::take(&mut lock(&self.routes).map);
        for (key, pair) in routes {
            if Arc::ptr_eq(&pair.a, self) && pair.a_conv.id() == key {
                lost_a(&pair, &why);
            } else {
                lost_b(&pair, &why);
            }
        }
        self.opened.notify_waiters();
    }
}

pub(crate) type Credit = Option<(Arc<Link>, u32)>;

/// Gives a message's credit back to the connection it came from: at once, or with the
/// next batch when the reader of that connection forwarded it itself.
pub(crate) fn give_back(credit: Credit) {
    let Some((link, credit)) = credit else { return };
    let credit = u64::from(credit);
    link.state.counters.released(credit);
    let batched = READING
        .try_with(|r| {
            let own = r.link == Arc::as_ptr(&link) as usize;
            if own {
                r.pending.set(r.pending.get() + credit);
            }
            own
        })
        .unwrap_or(false);
    if !batched {
        link.conn.release(credit);
    }
}

tokio::task_local! {
    /// In a link's reader task: credit of that link's messages the reader forwarded,
    /// given back with its next `next_events_holding`.
    static READING: Reading;
}

/// See [`READING`].
struct Reading {
    /// The link (its address, compared only).
    link: usize,
    pending: Cell<u64>,
}

/// `b`'s side of the pair is gone: the caller (if it waits for an answer) gets *peer lost*.
fn lost_b(pair: &Arc<Pair>, why: &str) {
    lock(&pair.a.routes).map.remove(&pair.a_conv.id());
    if pair.ended.swap(true, Ordering::AcqRel) {
        return;
    }
    if pair.b_turn.load(Ordering::Acquire) {
        let failure = envelope::failure(envelope::FAILURE_PEER_LOST, why);
        pair.a.answer(pair.a_conv, failure, None);
    }
}

/// `a`'s side of the pair is gone: the callee's handler is cancelled, or the conversation
/// the broker holds the turn in ends with *peer lost*.
fn lost_a(pair: &Arc<Pair>, why: &str) {
    let Some(conv) = pair.b_conv.get().copied() else {
        // Not opened on `b` yet: the writer skips it (`a` is closed).
        return;
    };
    if pair.ended.swap(true, Ordering::AcqRel) {
        lock(&pair.b.routes).map.remove(&conv.id());
        return;
    }
    if !pair.b_turn.load(Ordering::Acquire) {
        lock(&pair.b.routes).map.remove(&conv.id());
        let failure = envelope::failure(envelope::FAILURE_PEER_LOST, why);
        pair.b.answer(conv, failure, None);
    } else {
        // `b` holds the turn and will still speak (its answer to the cancel): the route
        // stays until then, so that its reader finds it and drops what `b` says (a
        // conversation without a route is one whose opening is being sent, which the
        // reader waits for).
        if conv.is_owner() {
            pair.b.one_shot(envelope::cancel(conv.first_id()));
        }
    }
}

/// A stream id other than `own`, for a sender whose id collides at a destination.
fn random_id(own: u64, salt: u64) -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one((own, salt)) | 1
}

/// The identity in `conn`'s TLS client certificate (its subject's CN), if it has one.
#[cfg(feature = "tls")]
fn certificate_identity(conn: &Connection) -> Option<Arc<str>> {
    let leaf = conn.peer_certificates()?.first()?;
    crate::access::common_name(leaf).map(Arc::from)
}

#[cfg(not(feature = "tls"))]
fn certificate_identity(_: &Connection) -> Option<Arc<str>> {
    None
}

/// `[0, value]`: a reply with `value`.
fn ok_value<T: serde::Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut payload = vec![0x92, 0x00];
    match chatter_core::codec::encode(&mut payload, value) {
        Ok(()) => payload,
        Err(e) => envelope::failure(envelope::FAILURE_PROTOCOL, &e.to_string()),
    }
}

/// The application error reply of a refused request of the broker's own.
fn app_error<E: serde::Serialize + std::fmt::Display>(e: &E) -> Vec<u8> {
    let mut value = Vec::new();
    match chatter_core::codec::encode(&mut value, e) {
        Ok(()) => envelope::app_error(&e.to_string(), &value),
        Err(e) => envelope::failure(envelope::FAILURE_PROTOCOL, &e.to_string()),
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
