//! The sans-IO protocol core: bytes and `now` in; bytes, events and the next deadline out.
//!
//! [`Protocol`] holds everything one side of a connection knows: the handshake, the
//! conversations and whose turn it is in each, the timers, keepalive and flow control. It
//! never touches a socket or reads the clock, so two instances can be stepped against each
//! other in virtual time (see the tests at the end of this file). The async
//! [`Connection`](crate::Connection) is a thin driver around it:
//!
//! 1. feed received bytes to [`Protocol::handle_input`],
//! 2. call [`Protocol::handle_timeout`] when [`Protocol::poll_timeout`] has passed,
//! 3. write what [`Protocol::take_output`] hands out,
//! 4. deliver what [`Protocol::poll_event`] returns.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use bytes::BytesMut;
//! use chatter_core::proto::{Config, Event, Protocol, SendArgs};
//!
//! let now = Instant::now();
//! // The connecting side (a) and the accepting side (b).
//! let (mut a, mut b) = (Protocol::new(Config::default(), now), Protocol::accepting(Config::default(), now));
//! // Exchange hellos: a's first, then b's answer.
//! let mut wire = BytesMut::new();
//! a.take_output(&mut wire);
//! b.handle_input(now, &mut wire);
//! b.take_output(&mut wire);
//! a.handle_input(now, &mut wire);
//! assert!(matches!(a.poll_event(), Some(Event::Connected(_))));
//! assert!(matches!(b.poll_event(), Some(Event::Connected(_))));
//!
//! // A one-shot message from a to b.
//! a.send(now, SendArgs::new(), b"\xa2hi").unwrap();
//! a.take_output(&mut wire);
//! b.handle_input(now, &mut wire);
//! let Some(Event::Message(msg)) = b.poll_event() else { panic!("no message") };
//! assert!(msg.first && msg.last && msg.token);
//! assert_eq!(&msg.payload[..], b"\xa2hi");
//! ```

pub mod frame;
mod timers;

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::error::{CloseCause, ProtocolError};
use frame::{
    CloseCode, Frame, Hello, MessageHeader, FLAG_LAST, FLAG_OWNER, FLAG_TOKEN, LENGTH_PREFIX,
    MAX_HELLO,
};
use timers::{TimerKey, Timers};

/// The smallest `max_frame_size` and `receive_window` a peer may announce.
pub const MIN_LIMIT: u32 = 64;

/// Flow-control bytes charged per message on top of its body length: what a queued message
/// costs the receiver beyond its bytes, so that the window bounds real memory even for tiny
/// messages.
pub const MESSAGE_OVERHEAD: u32 = 64;

/// The credit for *early* messages: those a side sends after its hello and before the
/// peer's hello arrived (their costs, body + [`MESSAGE_OVERHEAD`] each, add up to at most
/// this). Every receiver accepts them whatever limits it announces: it accepts frames of up
/// to this many bytes and this many bytes of unconsumed messages even if it announced less
/// (PROTOCOL.md §4.1). A client can so send its first request right behind its hello,
/// without waiting a round trip for the server's.
pub const EARLY_CREDIT: u32 = 4096;

/// Received payloads of runs shorter than this are copied out of the read buffer rather than
/// sliced from it, so that a small message cannot keep a large read buffer alive: every
/// allocation a queued message holds on to is at most about twice the bytes that message
/// (or the run of messages it arrived with) is charged for.
pub const SHARE_AT_LEAST: usize = 16 * 1024;

/// Close reasons longer than this are cut.
const MAX_CLOSE_REASON: usize = 1024;

/// Settings of one side of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The largest frame body this side accepts (and announces in its hello).
    pub max_frame_size: u32,
    /// Bytes of received, unconsumed message bodies this side buffers. The peer stops
    /// sending when it has used this credit up, until this side consumes messages.
    pub receive_window: u32,
    /// Ping after a quiet period; `None` disables keepalive.
    pub keepalive: Option<Keepalive>,
    /// How long the peer has to complete the handshake.
    pub handshake_timeout: Duration,
    /// How many conversations the peer may hold open at once; also the most this side
    /// opens at once ([`Protocol::send`] refuses one more with [`SendRefused::NoCredit`]
    /// until one of them ended).
    pub max_conversations: usize,
    /// How many bytes of output may wait to be written before [`Protocol::send`] refuses
    /// messages ([`SendRefused::NoCredit`]) until the driver reports, with
    /// [`Protocol::handle_written`], that the peer took some. The peer's window limits what
    /// it must buffer; this limits what this side buffers, whatever window the peer
    /// announced and whether or not it reads.
    ///
    /// A cap on the send credit instead would not work: a receiver may hold back credit up
    /// to nearly its whole announced window (§8.3 of PROTOCOL.md), so a sender that used
    /// less than the window could wait forever for credit that never comes.
    pub send_buffer: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_frame_size: 4 * 1024 * 1024,
            receive_window: 8 * 1024 * 1024,
            keepalive: Some(Keepalive::default()),
            handshake_timeout: Duration::from_secs(10),
            max_conversations: 1 << 16,
            send_buffer: 1024 * 1024,
        }
    }
}

/// Keepalive timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Send a ping when nothing was received for this long.
    pub interval: Duration,
    /// Close the connection when nothing arrives this long after a ping.
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive {
            interval: Duration::from_secs(20),
            timeout: Duration::from_secs(20),
        }
    }
}

/// A conversation as one side sees it: who opened it and the id of its first message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConversationId {
    /// True when this side opened (owns) the conversation.
    pub owner: bool,
    /// The id of the conversation's first message, in the owner's id sequence.
    pub first: u64,
}

impl std::hash::Hash for ConversationId {
    /// One word instead of two (a round of [`IdHasher`] less per lookup): `first` rotated,
    /// with `owner` in the freed low bit. Only ids of 2^63 and above can share a hash.
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.first.rotate_left(1) ^ self.owner as u64);
    }
}

/// Arguments of [`Protocol::send`]. The default is a one-shot message: a new conversation,
/// `last` and `token` set, no timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendArgs {
    /// Continue this conversation; `None` opens a new one.
    pub conversation: Option<ConversationId>,
    /// End the conversation with this message.
    pub last: bool,
    /// Pass the turn to the peer (ignored with `last`).
    pub token: bool,
    /// Report a timeout if the peer sends nothing in the conversation for this long.
    pub timeout: Option<Duration>,
}

impl SendArgs {
    /// A one-shot message.
    pub fn new() -> Self {
        SendArgs {
            conversation: None,
            last: true,
            token: true,
            timeout: None,
        }
    }
}

/// The output buffer's first capacity: a hello (25 bytes with the defaults) and a first
/// request and close frame or two.
const FIRST_OUTPUT: usize = 128;

impl Default for SendArgs {
    fn default() -> Self {
        SendArgs::new()
    }
}

/// A received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The conversation, from this side's point of view.
    pub conversation: ConversationId,
    /// The message opens a conversation the peer started.
    pub first: bool,
    /// The message ends the conversation.
    pub last: bool,
    /// The peer passed the turn to this side.
    pub token: bool,
    /// The payload bytes (MessagePack, by convention).
    pub payload: Bytes,
    /// Flow-control credit to give back with [`Protocol::release`] once consumed: the body
    /// length plus [`MESSAGE_OVERHEAD`].
    pub cost: u32,
}

/// What a [`Protocol`] reports.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// The handshake completed; carries the peer's hello.
    Connected(Hello),
    /// A message arrived.
    Message(Message),
    /// The peer sent nothing in this conversation before its timeout.
    Timeout(ConversationId),
    /// Flow-control credit arrived after a send was refused for lack of it.
    Writable,
    /// The connection ended. Nothing follows this event.
    Closed(CloseCause),
}

/// Why [`Protocol::send`] refused a message. Nothing was queued.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SendRefused {
    /// The connection is closed.
    Closed,
    /// The handshake has not completed.
    NotReady,
    /// The peer holds the token in this conversation.
    NotYourTurn,
    /// The conversation ended or never existed.
    Ended,
    /// The message can never fit the peer's limits.
    TooLarge {
        /// The frame body size.
        size: usize,
        /// The peer's limit.
        max: u32,
    },
    /// Not enough flow-control credit now, or (for a message that opens a conversation)
    /// this side already holds [`Config::max_conversations`] conversations it opened; an
    /// [`Event::Writable`] follows when there is more credit or one of them ended.
    NoCredit,
}

/// Conversation state, kept only while a conversation is open:
///
/// ```text
///                 send first (!last)                 recv first (!last)
///   (absent) ───────────────────────► Open ◄──────────────────────────── (absent)
///                                      │
///        Turn::Local ──send(token)──► Turn::Remote ──recv(token)──► Turn::Local
///        Turn::Local ──send(!token)─► Turn::Local     (and the same for recv)
///                                      │
///                  send or recv `last` │ (only by whoever holds the turn)
///                                      ▼
///                                  (absent)
/// ```
///
/// One-shot messages (`first` and `last`) never create state. Because only the holder of
/// the turn may send, no message can cross a `last` on the wire: anything that arrives for
/// an absent conversation is a protocol error.
#[derive(Debug)]
struct ConvState {
    turn: Turn,
    timer: Option<TimerKey>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    Local,
    Remote,
}

#[derive(Debug)]
enum State {
    Handshaking { deadline: Instant },
    Open,
    Closed,
}

/// One side of a connection, without I/O. See the [module docs](self).
#[derive(Debug)]
pub struct Protocol {
    config: Config,
    state: State,
    peer: Hello,
    /// The largest message body the peer accepts: its frame limit, and its window less the
    /// per-message overhead (set from its hello).
    send_max: u64,
    next_tx_id: u64,
    next_rx_id: u64,
    conversations: HashMap<ConversationId, ConvState, IdBuildHasher>,
    peer_opened: usize,
    timers: Timers,
    last_rx: Instant,
    /// When input that finds the queue of received messages drained may next give back its
    /// room: [`SHRINK_EVERY`] after it last did, or after the connection's start
    /// ([`Protocol::release_idle_memory`]).
    shrink_after: Instant,
    ping_deadline: Option<Instant>,
    send_credit: u64,
    /// Early messages that cost more than the peer's window: window frames pay this back
    /// before they add credit.
    credit_deficit: u64,
    send_blocked: bool,
    /// Output the driver took and has not written yet (see `handle_written`).
    unwritten: usize,
    /// `config.send_buffer`, as a `usize`.
    send_buffer: usize,
    /// A ping arrived and its pong is not queued yet. Any number of pings coalesce into one
    /// pong, queued once the output before it has been handed out (see `take_output`).
    pong_due: bool,
    /// `rx_unannounced` reached the threshold: a window frame is owed, queued by
    /// `take_output` (one frame for all the credit, however many releases came before).
    window_due: bool,
    rx_used: u64,
    rx_unannounced: u64,
    /// [`window_threshold`](Self::window_threshold) of the config, computed once.
    window_threshold: u64,
    /// What this side accepts: its `max_frame_size` and `receive_window`, but at least
    /// [`EARLY_CREDIT`] (a peer may have sent that much before it knew our limits).
    frame_limit: u32,
    window_limit: u64,
    out: BytesMut,
    /// Events other than messages, each with the number of messages received before it,
    /// so that [`poll_event`](Self::poll_event) returns everything in order.
    events: VecDeque<(u64, Event)>,
    /// Received messages, kept apart so that a driver can take them with
    /// [`poll_message`](Self::poll_message) without an [`Event`] around each.
    messages: VecDeque<Message>,
    /// Messages received, and taken, since the start.
    messages_received: u64,
    messages_taken: u64,
    /// This side's hello is queued (at once on the connecting side; on the accepting side
    /// once the peer's hello arrived, PROTOCOL.md §4).
    hello_sent: bool,
}

/// How many entries the queue of received messages keeps room for when the connection is
/// idle ([`Protocol::release_idle_memory`]): more than a read's worth of small messages,
/// and 56 KiB at most.
const MESSAGES_KEPT: usize = 1024;

/// How often, at most, input finding the queue of received messages drained gives back a
/// burst's room ([`Protocol::release_idle_memory`]).
const SHRINK_EVERY: Duration = Duration::from_secs(1);

impl Protocol {
    /// Starts the connecting side (the client) of a connection: queues this side's hello,
    /// which goes first, without waiting for anything from the peer (PROTOCOL.md §4).
    /// Messages sent before the peer's hello arrives go right behind it, within the early
    /// credit ([`EARLY_CREDIT`], §4.1).
    pub fn new(config: Config, now: Instant) -> Self {
        let mut p = Self::accepting(config, now);
        p.queue_hello();
        p.send_max = (EARLY_CREDIT - MESSAGE_OVERHEAD) as u64;
        p.send_credit = EARLY_CREDIT as u64;
        p
    }

    /// Starts the accepting side (the server) of a connection: nothing is queued until the
    /// peer's hello arrives; then this side's hello is queued, ahead of anything else
    /// (PROTOCOL.md §4). Messages cannot be sent before that ([`SendRefused::NoCredit`],
    /// then [`Event::Writable`] with the handshake). If this side closes before the peer's
    /// hello arrived (a handshake timeout, a stranger), its close frame goes instead of its
    /// hello.
    pub fn accepting(config: Config, now: Instant) -> Self {
        // Room for the hello and a first small message or two at once, instead of growing
        // byte by byte from nothing (four reallocations for the hello alone).
        let out = BytesMut::with_capacity(FIRST_OUTPUT);
        let window_threshold = Self::window_threshold(&config);
        let send_buffer = config.send_buffer as usize;
        let frame_limit = config.max_frame_size.max(EARLY_CREDIT);
        let window_limit = config.receive_window.max(EARLY_CREDIT) as u64;
        Protocol {
            state: State::Handshaking {
                deadline: now + config.handshake_timeout,
            },
            config,
            peer: Hello {
                max_frame_size: 0,
                receive_window: 0,
            },
            next_tx_id: 1,
            next_rx_id: 1,
            conversations: HashMap::default(),
            peer_opened: 0,
            timers: Timers::default(),
            last_rx: now,
            shrink_after: now + SHRINK_EVERY,
            ping_deadline: None,
            send_max: 0,
            send_credit: 0,
            credit_deficit: 0,
            send_blocked: false,
            unwritten: 0,
            send_buffer,
            pong_due: false,
            window_due: false,
            rx_used: 0,
            rx_unannounced: 0,
            window_threshold,
            frame_limit,
            window_limit,
            out,
            events: VecDeque::new(),
            messages: VecDeque::new(),
            messages_received: 0,
            messages_taken: 0,
            hello_sent: false,
        }
    }

    /// Queues this side's hello (the first frame: nothing was queued before it).
    fn queue_hello(&mut self) {
        debug_assert!(self.out.is_empty() && !self.hello_sent);
        self.hello_sent = true;
        Frame::Hello(Hello {
            max_frame_size: self.config.max_frame_size,
            receive_window: self.config.receive_window,
        })
        .encode(&mut self.out);
    }

    /// The settings this side runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// True once the handshake completed and until the connection closes.
    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open)
    }

    /// True once the connection ended.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Sends a message. On success the frame is queued for [`take_output`](Self::take_output)
    /// and the conversation it belongs to is returned. `now` is only read to arm
    /// `args.timeout`.
    #[inline]
    pub fn send(
        &mut self,
        now: Instant,
        args: SendArgs,
        payload: &[u8],
    ) -> Result<ConversationId, SendRefused> {
        self.send_reserving(now, args, payload, 0)
    }

    /// [`send`](Self::send), refused with [`SendRefused::NoCredit`] unless at least
    /// `reserve` bytes of the peer's window stay free after this message, or nothing is in
    /// flight (all the credit the peer can grant is here: the message may then use what it
    /// needs). For senders that keep part of the window for more urgent messages: an RPC
    /// layer sends replies with no reserve, calls with some and signals with more, so that
    /// a backlog of signals never takes the window from calls and replies.
    #[inline]
    pub fn send_reserving(
        &mut self,
        now: Instant,
        args: SendArgs,
        payload: &[u8],
        reserve: u64,
    ) -> Result<ConversationId, SendRefused> {
        match self.state {
            // Before the peer's hello, the early credit stands in for its window.
            State::Open | State::Handshaking { .. } => {}
            State::Closed => return Err(SendRefused::Closed),
        }
        // Opening one more conversation than this side would accept from its peer waits
        // for one to end, as a send waits for credit: the peer's limit is not announced,
        // and one over it is a protocol error that closes the connection (§6.4).
        if args.conversation.is_none()
            && !args.last
            && self.conversations.len() - self.peer_opened >= self.config.max_conversations
        {
            self.send_blocked = true;
            return Err(SendRefused::NoCredit);
        }
        let id = self.next_tx_id;
        let peer_window = self.peer_window();
        // An existing conversation is looked up once, for the turn check and the update.
        let existing = match args.conversation {
            None => None,
            Some(c) => match self.conversations.entry(c) {
                Entry::Vacant(_) => return Err(SendRefused::Ended),
                Entry::Occupied(s) if s.get().turn == Turn::Remote => {
                    return Err(SendRefused::NotYourTurn)
                }
                Entry::Occupied(s) => Some(s),
            },
        };
        let conversation = match &existing {
            None => ConversationId {
                owner: true,
                first: id,
            },
            Some(s) => *s.key(),
        };
        let mut flags = 0;
        if conversation.owner {
            flags |= FLAG_OWNER;
        }
        if args.token {
            flags |= FLAG_TOKEN;
        }
        if args.last {
            flags |= FLAG_LAST;
        }
        let header = MessageHeader {
            id,
            first: conversation.first,
            flags,
        };
        let head = frame::MessageHead::new(header, payload.len());
        let size = head.body_len(payload.len());
        let cost = size as u64 + MESSAGE_OVERHEAD as u64;
        if size as u64 > self.send_max {
            if !self.is_open() {
                // Too large to go early: it waits for the peer's hello and its limits.
                self.send_blocked = true;
                return Err(SendRefused::NoCredit);
            }
            return Err(SendRefused::TooLarge {
                size,
                max: self.send_max as u32,
            });
        }
        let reserved = reserve > 0
            && cost.saturating_add(reserve) > self.send_credit
            && self.send_credit < peer_window;
        if cost > self.send_credit
            || reserved
            || self.out.len() + self.unwritten >= self.send_buffer
        {
            self.send_blocked = true;
            return Err(SendRefused::NoCredit);
        }
        head.append(&mut self.out, payload);
        self.next_tx_id += 1;
        self.send_credit -= cost;

        // Any send replaces the conversation's timer (REFERENCE.md §1.3 rule 2).
        if args.last {
            // A one-shot message (no existing conversation) has no state to end.
            if let Some(s) = existing {
                let state = s.remove();
                self.ended(conversation, state);
            }
        } else {
            let turn = if args.token {
                Turn::Remote
            } else {
                Turn::Local
            };
            let state = match existing {
                Some(s) => s.into_mut(),
                None => self
                    .conversations
                    .entry(conversation)
                    .or_insert(ConvState { turn, timer: None }),
            };
            state.turn = turn;
            if let Some(key) = state.timer.take() {
                self.timers.remove(key);
            }
            if let Some(timeout) = args.timeout {
                state.timer = Some(self.timers.insert(now + timeout, conversation));
                let conversations = &mut self.conversations;
                self.timers.compact(|moved, key| {
                    if let Some(state) = conversations.get_mut(&moved) {
                        state.timer = Some(key);
                    }
                });
            }
        }
        Ok(conversation)
    }

    /// Feeds received bytes: call it whenever new bytes arrived, with everything received
    /// and not yet consumed. Complete frames are consumed from `buf`; a partial frame stays
    /// for the next call. Arriving bytes count as a sign of life for keepalive even before
    /// their frame is complete. After a close, input is discarded.
    pub fn handle_input(&mut self, now: Instant, buf: &mut BytesMut) {
        if self.is_open() && !buf.is_empty() {
            self.last_rx = now;
            self.ping_deadline = None;
            if self.messages.capacity() > MESSAGES_KEPT
                && self.messages.is_empty()
                && now >= self.shrink_after
            {
                self.release_idle_memory(now);
            }
        }
        loop {
            if let State::Open = self.state {
                // Most frames are plain messages: split them off without the general decoder.
                // Split the whole run off at once: one `Bytes` for all of them, and a cheap
                // slice of it for each payload.
                let end = frame::plain_messages_end(buf, self.frame_limit);
                if end > 0 {
                    let run = if end < SHARE_AT_LEAST {
                        let run = Bytes::copy_from_slice(&buf[..end]);
                        bytes::Buf::advance(buf, end);
                        run
                    } else {
                        buf.split_to(end).freeze()
                    };
                    self.handle_plain_messages(now, run);
                    continue;
                }
            }
            let max = match self.state {
                State::Closed => {
                    buf.clear();
                    return;
                }
                State::Handshaking { .. } => MAX_HELLO,
                State::Open => self.frame_limit,
            };
            let handshaking = matches!(self.state, State::Handshaking { .. });
            match frame::take_frame(buf, max) {
                Ok(None) => return,
                Ok(Some((frame, body_len))) => self.handle_frame(now, frame, body_len),
                Err(e) if handshaking => {
                    // The first 16 bytes that arrived, within the first frame if its
                    // length is known (`take_frame` leaves `buf` as it was on an error):
                    // the length prefix and the body's start.
                    let frame_end = buf.first_chunk::<LENGTH_PREFIX>().map_or(buf.len(), |p| {
                        LENGTH_PREFIX + u32::from_be_bytes(*p) as usize
                    });
                    let first_bytes = buf[..buf.len().min(16).min(frame_end)].to_vec();
                    let e = match e {
                        ProtocolError::UnsupportedVersion { .. } => e,
                        _ => ProtocolError::NotChatter { first_bytes },
                    };
                    self.close_with(CloseCause::Protocol(e));
                }
                Err(e) => self.close_with(CloseCause::Protocol(e)),
            }
        }
    }

    /// Handles a run of complete frames found by [`frame::plain_messages_end`]; stops when
    /// the connection closes (the rest is discarded, as any input after a close).
    fn handle_plain_messages(&mut self, now: Instant, run: Bytes) {
        let mut at = 0;
        while let Some(prefix) = run.get(at..).and_then(|b| b.first_chunk::<LENGTH_PREFIX>()) {
            let len = u32::from_be_bytes(*prefix) as usize;
            let start = at + LENGTH_PREFIX;
            at = start + len;
            // The run holds complete frames only.
            let Some(body) = run.get(start..at) else {
                return;
            };
            match frame::plain_header(body) {
                // What `handle_frame` would do, minus its keepalive update: in the open
                // state `handle_input` made it for this `now`, and nothing here re-arms a
                // ping.
                Some((header, head_len)) => {
                    let payload = run.slice(start + head_len..at);
                    if let Err(e) = self.handle_message(header, payload, len) {
                        self.protocol_error(e);
                    }
                }
                None => match Frame::decode(run.slice(start..at)) {
                    Ok(frame) => self.handle_frame(now, frame, len),
                    Err(e) => self.close_with(CloseCause::Protocol(e)),
                },
            }
            if !self.is_open() {
                return;
            }
        }
    }

    /// The transport ended: a clean end of stream or an error.
    pub fn handle_transport_closed(&mut self, cause: CloseCause) {
        self.close_with(cause);
    }

    /// The driver's output has waited keepalive's interval + timeout without the transport
    /// taking a byte of it: the peer stopped reading. Closes as a keepalive timeout would
    /// (keepalive alone counts any arriving byte as a sign of life, so a peer that keeps
    /// sending and never reads would never time out).
    pub fn handle_output_stalled(&mut self) {
        self.close_with(CloseCause::KeepaliveTimeout);
    }

    /// Fires every deadline that is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Closed => return,
            State::Handshaking { deadline } => {
                if now >= deadline {
                    self.close_with(CloseCause::Protocol(ProtocolError::HandshakeTimeout));
                }
                return;
            }
            State::Open => {}
        }
        if let Some(keepalive) = self.config.keepalive {
            match self.ping_deadline {
                Some(deadline) if now >= deadline => {
                    self.close_with(CloseCause::KeepaliveTimeout);
                    return;
                }
                Some(_) => {}
                None if now >= self.last_rx + keepalive.interval => {
                    Frame::Ping.encode(&mut self.out);
                    self.ping_deadline = Some(now + keepalive.timeout);
                    self.release_idle_memory(now);
                }
                None => {}
            }
        }
        while let Some(conversation) = self.timers.pop_due(now) {
            if let Some(state) = self.conversations.get_mut(&conversation) {
                state.timer = None;
            }
            self.push_event(Event::Timeout(conversation));
        }
    }

    /// The earliest instant at which [`handle_timeout`](Self::handle_timeout) has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Closed => None,
            State::Handshaking { deadline } => Some(deadline),
            State::Open => {
                let keepalive = self.config.keepalive.map(|k| {
                    self.ping_deadline
                        .unwrap_or_else(|| self.last_rx + k.interval)
                });
                let timer = self.timers.first();
                match (keepalive, timer) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
        }
    }

    /// Hands out the bytes to write. Appends to `dst` (swapping buffers when `dst` is empty,
    /// so the common case copies nothing).
    ///
    /// Control frames the peer's input calls for are coalesced, so that a peer that sends
    /// and never reads cannot grow this side's output: a pong owed for any number of pings
    /// is added only when `dst` is empty (everything handed out before was written), and
    /// a window frame owed for consumed messages (carrying all the credit released so far)
    /// only while `dst` holds at most [`Config::send_buffer`] bytes.
    pub fn take_output(&mut self, dst: &mut BytesMut) {
        if self.window_due && dst.len() <= self.send_buffer && self.is_open() {
            self.window_due = false;
            Frame::Window(std::mem::take(&mut self.rx_unannounced)).encode(&mut self.out);
        }
        if self.pong_due && dst.is_empty() && !self.is_closed() {
            self.pong_due = false;
            Frame::Pong.encode(&mut self.out);
        }
        if dst.is_empty() {
            std::mem::swap(dst, &mut self.out);
        } else {
            dst.extend_from_slice(&self.out);
            self.out.clear();
        }
    }

    /// True when [`take_output`](Self::take_output) has bytes to hand out (a coalesced pong
    /// counts, although `take_output` holds it back while `dst` is not empty).
    pub fn has_output(&self) -> bool {
        !self.out.is_empty() || self.pong_due || self.window_due
    }

    /// Bytes queued for [`take_output`](Self::take_output).
    pub fn output_len(&self) -> usize {
        self.out.len()
    }

    /// Capacity of the output queue's buffer. [`take_output`](Self::take_output) swaps it
    /// with an empty `dst`, which then becomes the buffer the next output is queued in.
    pub fn output_capacity(&self) -> usize {
        self.out.capacity()
    }

    /// Frees the output queue's buffer if nothing waits in it, so that a connection gone
    /// quiet after large messages does not hold it.
    pub fn free_output_buffer(&mut self) {
        if self.out.is_empty() {
            self.out = BytesMut::new();
        }
    }

    /// Tells the protocol how many bytes of the output it handed out are still waiting to
    /// be written. While output and these add up to
    /// [`Config::send_buffer`], [`send`](Self::send) refuses messages; once they fall
    /// below it, a refused sender gets [`Event::Writable`].
    pub fn handle_written(&mut self, unwritten: usize) {
        self.unwritten = unwritten;
        if self.send_blocked && self.is_open() && self.out.len() + unwritten < self.send_buffer {
            self.send_blocked = false;
            self.push_event(Event::Writable);
        }
    }

    /// The most send credit the peer can grant: its announced `receive_window`, or before
    /// its hello the early credit (on the connecting side; none on the accepting side).
    /// What it granted now is this less what is in flight.
    pub fn peer_window(&self) -> u64 {
        if self.is_open() {
            self.peer.receive_window as u64
        } else if self.hello_sent {
            EARLY_CREDIT as u64
        } else {
            0
        }
    }

    /// Flow-control bytes of received messages not yet given back with
    /// [`release`](Self::release) (each counted as its body length plus
    /// [`MESSAGE_OVERHEAD`]); never more than the configured `receive_window`.
    pub fn received_unreleased(&self) -> u64 {
        self.rx_used
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        match self.events.front() {
            // No message was received before the next other event: that event is next.
            Some(&(before, _)) if before <= self.messages_taken => self.poll_other_event(),
            _ => match self.poll_message() {
                Some(message) => Some(Event::Message(message)),
                None => self.poll_other_event(),
            },
        }
    }

    /// The next received message, if any, ahead of other events.
    ///
    /// For drivers that keep messages apart from the other events (as the async
    /// [`Connection`](crate::Connection) does): messages come out in order, without an
    /// [`Event`] around each. Use it with [`poll_other_event`](Self::poll_other_event)
    /// instead of [`poll_event`](Self::poll_event).
    #[inline]
    pub fn poll_message(&mut self) -> Option<Message> {
        let message = self.messages.pop_front()?;
        self.messages_taken += 1;
        Some(message)
    }

    /// Gives back the memory of an earlier burst of messages once it is drained: the queue
    /// of received messages keeps room for [`MESSAGES_KEPT`], not its peak (up to
    /// `receive_window` / 64 messages: a window of tiny ones left it at 131 072 entries of
    /// 56 bytes, 7 MiB, for the connection's life). Called when the connection is idle
    /// (this side sends a keepalive ping, having heard nothing for the interval, or the
    /// peer's ping arrives), and when input finds the queue drained, at most every
    /// [`SHRINK_EVERY`]: a peer that keeps the connection from going idle (a frame more
    /// often than the keepalive interval) cannot keep the room either. Not at every drain:
    /// traffic in bursts drains the queue after each, and shrinking it then made the next
    /// burst grow it again (chatter-rpc's signals workload ran 13% slower); once a second
    /// costs nothing measurable.
    #[cold]
    #[inline(never)]
    fn release_idle_memory(&mut self, now: Instant) {
        if self.messages.is_empty() && self.messages.capacity() > MESSAGES_KEPT {
            self.messages.shrink_to(MESSAGES_KEPT);
            self.shrink_after = now + SHRINK_EVERY;
        }
    }

    /// The next event that is not a message, if any, ahead of messages received before it.
    pub fn poll_other_event(&mut self) -> Option<Event> {
        self.events.pop_front().map(|(_, event)| event)
    }

    /// How many messages were received since the start: a driver that takes messages with
    /// [`poll_message`](Self::poll_message) learns from it that new ones arrived.
    pub fn messages_received(&self) -> u64 {
        self.messages_received
    }

    /// Queues an event that is not a message.
    fn push_event(&mut self, event: Event) {
        self.events.push_back((self.messages_received, event));
    }

    /// Gives back the flow-control credit of a consumed message.
    ///
    /// Credit returns in chunks, to keep window frames rare: once the unannounced credit
    /// reaches a quarter of the window, or earlier if holding it back could leave the peer
    /// unable to send a frame of the maximum size while this side has nothing buffered.
    #[inline]
    pub fn release(&mut self, cost: u32) {
        // Never more than was received: credit given back twice would let the peer send
        // beyond the window (and the peer would take the window frame for an error).
        let cost = (cost as u64).min(self.rx_used);
        self.rx_used -= cost;
        if !self.is_open() {
            // Nothing is announced after a close, but messages taken after it (they stay
            // available) no longer count as received and unreleased.
            return;
        }
        self.rx_unannounced += cost;
        if self.rx_unannounced >= self.window_threshold {
            if self.out.len() + self.unwritten <= self.send_buffer {
                // Queued at once while the output moves: the peer's credit comes back
                // without waiting for the driver's next round.
                Frame::Window(std::mem::take(&mut self.rx_unannounced)).encode(&mut self.out);
            } else {
                // The peer is not taking our output: one frame later carries it all.
                self.window_due = true;
            }
        }
    }

    /// Unannounced credit at which a window frame is sent: a quarter window, but never so
    /// much that `receive_window - unannounced` falls below the cost of a maximum-size
    /// message (the peer could then be stuck with one while this side waits for more to
    /// consume).
    fn window_threshold(config: &Config) -> u64 {
        let window = config.receive_window as u64;
        let max_cost = config.max_frame_size as u64 + MESSAGE_OVERHEAD as u64;
        (window / 4).min(window.saturating_sub(max_cost) + 1).max(1)
    }

    /// Closes the connection from this side. Queues a close frame carrying `reason`; no
    /// timeout fires afterwards. Does nothing if already closed.
    pub fn close(&mut self, code: CloseCode, reason: &str) {
        if self.is_closed() {
            return;
        }
        self.send_close(code, reason);
        self.finish(CloseCause::Local);
    }

    fn close_with(&mut self, cause: CloseCause) {
        if self.is_closed() {
            return;
        }
        match &cause {
            CloseCause::Protocol(e) => {
                tracing::debug!(error = %e, "closing connection: protocol error");
                self.send_close(CloseCode::ProtocolError, &e.to_string());
            }
            CloseCause::KeepaliveTimeout => {
                self.send_close(CloseCode::KeepaliveTimeout, "keepalive timeout");
            }
            CloseCause::Local => {
                self.send_close(CloseCode::Normal, "closed");
            }
            CloseCause::Peer { .. } | CloseCause::Tls(_) | CloseCause::Io(_) => {}
        }
        self.finish(cause);
    }

    /// Queues a close frame whose reason is cut (at a character boundary) to fit what the
    /// peer accepts: its `max_frame_size`, or the hello limit before its hello arrived.
    fn send_close(&mut self, code: CloseCode, reason: &str) {
        let limit = match self.state {
            State::Open => self.peer.max_frame_size,
            _ => MAX_HELLO,
        };
        // Array, kind, code (up to 9 bytes) and a str32 header leave this much for text.
        let room = (limit as usize).saturating_sub(16).min(MAX_CLOSE_REASON);
        let mut end = reason.len().min(room);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        Frame::Close(code, reason[..end].to_string()).encode(&mut self.out);
    }

    fn finish(&mut self, cause: CloseCause) {
        self.state = State::Closed;
        self.pong_due = false;
        self.window_due = false;
        self.conversations.clear();
        self.timers.clear();
        self.peer_opened = 0;
        self.ping_deadline = None;
        self.push_event(Event::Closed(cause));
    }

    fn handle_frame(&mut self, now: Instant, frame: Frame, body_len: usize) {
        self.last_rx = now;
        self.ping_deadline = None;
        if let State::Handshaking { .. } = self.state {
            match frame {
                Frame::Hello(hello) if hello.max_frame_size < MIN_LIMIT || hello.receive_window < MIN_LIMIT => {
                    self.protocol_error(ProtocolError::Malformed(format!(
                        "hello announces max_frame_size {} and receive_window {}; both must be at least {MIN_LIMIT}",
                        hello.max_frame_size, hello.receive_window
                    )))
                }
                Frame::Hello(hello) => {
                    self.peer = hello;
                    self.send_max = (hello.max_frame_size as u64).min(
                        (hello.receive_window as u64).saturating_sub(MESSAGE_OVERHEAD as u64),
                    );
                    // Early messages count against the window as any other; if they took
                    // more than the peer announced, credit that comes back pays that first.
                    // (The accepting side sent nothing before: it answers with its hello now.)
                    let early = match self.hello_sent {
                        true => EARLY_CREDIT as u64 - self.send_credit,
                        false => {
                            self.queue_hello();
                            0
                        }
                    };
                    let window = hello.receive_window as u64;
                    self.send_credit = window.saturating_sub(early);
                    self.credit_deficit = early.saturating_sub(window);
                    self.state = State::Open;
                    self.push_event(Event::Connected(hello));
                    if std::mem::take(&mut self.send_blocked) {
                        self.push_event(Event::Writable);
                    }
                }
                Frame::Close(code, reason) => self.close_with(CloseCause::Peer {
                    code,
                    reason: cut_reason(reason),
                }),
                other => self.protocol_error(ProtocolError::Unexpected(format!(
                    "expected hello, got {}",
                    kind_name(&other)
                ))),
            }
            return;
        }
        match frame {
            Frame::Message(header, mut payload) => {
                // Frames outside a run of plain messages come from `take_frame`, sliced
                // from the read buffer: small ones get their own copy (see SHARE_AT_LEAST).
                if body_len < SHARE_AT_LEAST {
                    payload = Bytes::copy_from_slice(&payload);
                }
                if let Err(e) = self.handle_message(header, payload, body_len) {
                    self.protocol_error(e);
                }
            }
            Frame::Ping => {
                self.pong_due = true;
                self.release_idle_memory(now);
            }
            Frame::Pong => {}
            Frame::Window(mut n) => {
                if self.credit_deficit > 0 {
                    let paid = n.min(self.credit_deficit);
                    self.credit_deficit -= paid;
                    n -= paid;
                }
                let credit = self.send_credit.saturating_add(n);
                if credit > self.peer.receive_window as u64 {
                    self.protocol_error(ProtocolError::Unexpected(format!(
                        "window update to {credit} bytes exceeds the announced window of {}",
                        self.peer.receive_window
                    )));
                    return;
                }
                self.send_credit = credit;
                if std::mem::take(&mut self.send_blocked) {
                    self.push_event(Event::Writable);
                }
            }
            Frame::Close(code, reason) => self.close_with(CloseCause::Peer {
                code,
                reason: cut_reason(reason),
            }),
            Frame::Hello(_) => {
                self.protocol_error(ProtocolError::Unexpected("second hello".into()))
            }
        }
    }

    #[inline(always)]
    fn handle_message(
        &mut self,
        header: MessageHeader,
        payload: Bytes,
        body_len: usize,
    ) -> Result<(), ProtocolError> {
        if header.id != self.next_rx_id {
            return Err(ProtocolError::BadMessageId {
                got: header.id,
                expected: self.next_rx_id,
            });
        }
        self.next_rx_id += 1;
        // The frame's real body length: a peer may encode headers less compactly than we do.
        let cost = body_len as u32 + MESSAGE_OVERHEAD;
        self.rx_used += cost as u64;
        if self.rx_used > self.window_limit {
            return Err(ProtocolError::WindowExceeded {
                used: self.rx_used,
                window: self.window_limit as u32,
            });
        }
        let peer_owns = header.flags & FLAG_OWNER != 0;
        let token = header.flags & FLAG_TOKEN != 0;
        let last = header.flags & FLAG_LAST != 0;
        let conversation = ConversationId {
            owner: !peer_owns,
            first: header.first,
        };
        let first = peer_owns && header.first == header.id;
        if first {
            if !last {
                if self.peer_opened >= self.config.max_conversations {
                    return Err(ProtocolError::TooManyConversations {
                        limit: self.config.max_conversations,
                    });
                }
                self.peer_opened += 1;
                let turn = if token { Turn::Local } else { Turn::Remote };
                // The id is the next in the peer's sequence: no state exists for it yet (an
                // entry costs less than an insert that checks for an old value).
                if let Entry::Vacant(v) = self.conversations.entry(conversation) {
                    v.insert(ConvState { turn, timer: None });
                }
            }
        } else {
            // One lookup for the checks and the update or end.
            let Entry::Occupied(mut entry) = self.conversations.entry(conversation) else {
                return Err(ProtocolError::UnknownConversation {
                    first: header.first,
                    opened_by_peer: peer_owns,
                });
            };
            let state = entry.get_mut();
            if state.turn == Turn::Local {
                return Err(ProtocolError::OutOfTurn {
                    first: header.first,
                    opened_by_peer: peer_owns,
                });
            }
            // Any message received in the conversation cancels its timer (rule 3).
            if let Some(key) = state.timer.take() {
                self.timers.remove(key);
            }
            if last {
                let state = entry.remove();
                self.ended(conversation, state);
            } else if token {
                state.turn = Turn::Local;
            }
        }
        self.messages_received += 1;
        self.messages.push_back(Message {
            conversation,
            first,
            last,
            token,
            payload,
            cost,
        });
        Ok(())
    }

    /// Cleans up after a conversation whose state was just removed.
    fn ended(&mut self, conversation: ConversationId, state: ConvState) {
        if let Some(key) = state.timer {
            self.timers.remove(key);
        }
        if !conversation.owner {
            self.peer_opened -= 1;
        } else if self.send_blocked && self.is_open() {
            // A sender may wait to open a conversation (`send_reserving`): room for one.
            self.send_blocked = false;
            self.push_event(Event::Writable);
        }
    }

    fn protocol_error(&mut self, e: ProtocolError) {
        self.close_with(CloseCause::Protocol(e));
    }
}

/// A fast hasher for maps keyed by conversation ids (or their `first_id`).
///
/// Those ids are sequence numbers that each side's counter assigns (a received opening id
/// must be the next one), so a peer cannot choose colliding keys and SipHash's protection
/// would only cost time: it was a fifth of the per-message work. Do not use it for keys a
/// peer can choose freely.
///
/// ```
/// use std::collections::HashMap;
/// use chatter_core::proto::IdBuildHasher;
///
/// let mut pending: HashMap<u64, &str, IdBuildHasher> = HashMap::default();
/// pending.insert(7, "call 7");
/// assert_eq!(pending[&7], "call 7");
/// ```
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

/// Builds [`IdHasher`]s.
pub type IdBuildHasher = BuildHasherDefault<IdHasher>;

impl IdHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.add(b as u64);
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(n as u64);
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }
}

/// A peer's close reason, cut (at a character boundary) to [`MAX_CLOSE_REASON`] bytes as
/// this side's own are: it is for logs, and the close cause that carries it is copied
/// into every error that reports the close, so a peer must not make it megabytes.
fn cut_reason(mut reason: String) -> String {
    if reason.len() > MAX_CLOSE_REASON {
        let mut end = MAX_CLOSE_REASON;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        reason.shrink_to_fit();
    }
    reason
}

fn kind_name(frame: &Frame) -> &'static str {
    match frame {
        Frame::Hello(_) => "hello",
        Frame::Message(..) => "message",
        Frame::Ping => "ping",
        Frame::Pong => "pong",
        Frame::Window(_) => "window",
        Frame::Close(..) => "close",
    }
}

#[cfg(test)]
mod tests;
