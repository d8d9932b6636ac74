//! Publish/subscribe inside the broker: the topic trie, subscriptions and their queues.
//!
//! A subscription is a chatter-rpc stream call of the broker's own `subscribe` method: the
//! broker answers it with `[0, nil]` and then writes `[3, item, …]` messages in the call's
//! conversation, within the credit the subscriber grants (`[15, call, bytes]`), as any
//! result stream. An item is `[topic, value]`, or `[topic, value, missed]` when `missed`
//! publications were dropped for the subscription (policy, expiry) since the item before it
//! was sent. A publication is a
//! signal (or, acknowledged, a call) of the broker's `publish(topic, value)`.
//!
//! Per subscription, what waits for the subscriber is bounded by its policy
//! ([`SlowSubscriber`]): the drop policies and `End` by the subscription's `queue_bytes`;
//! `Backpressure` by the publishers' receive windows (each queued item holds its
//! publication's flow-control credit, so a publisher is stalled once its window is full).
//! At most one batch per subscription is in the link's output queue at a time: what
//! arrives meanwhile waits here and goes as one batch next.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chatter_core::Conversation;
use chatter_msgpack as msgpack;
use tokio::time::Instant;

use crate::broker::BrokerState;
use crate::relay::{give_back, lock, Credit, Link};
use crate::subscription::{PublishReport, SlowSubscriber};

/// The topics on which the broker publishes presence: `$broker/presence/{name}`.
pub(crate) const PRESENCE_PREFIX: &str = "$broker/presence/";
/// Topics only the broker publishes on.
pub(crate) const RESERVED_PREFIX: &str = "$broker/";

/// A stream message's cost beyond its payload, per item (chatter-rpc PROTOCOL.md "Credit").
const ITEM_COST: u64 = 64;
/// A batch takes more ready items while its items are under this many bytes…
const GATHER: usize = 8 * 1024;
/// …and never more than this many items.
const MAX_BATCH: usize = 1024;

/// Checks a topic: 1 to `max_len` bytes, `/`-separated levels, no wildcard, no control
/// character.
pub(crate) fn check_topic(topic: &str, max_len: usize) -> Result<(), String> {
    if topic.is_empty() {
        return Err("a topic cannot be empty".into());
    }
    if topic.len() > max_len {
        return Err(format!(
            "{} bytes, over the broker's limit of {max_len}",
            topic.len()
        ));
    }
    if topic.contains(['+', '#']) {
        return Err("a topic cannot contain `+` or `#` (those are for patterns)".into());
    }
    if topic.chars().any(char::is_control) {
        return Err("a topic cannot contain control characters".into());
    }
    Ok(())
}

/// Checks a pattern: a topic whose levels may be `+` (any one level) or, as the last one,
/// `#` (any number of levels, none included).
pub(crate) fn check_pattern(pattern: &str, max_len: usize) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("a pattern cannot be empty".into());
    }
    if pattern.len() > max_len {
        return Err(format!(
            "{} bytes, over the broker's limit of {max_len}",
            pattern.len()
        ));
    }
    if pattern.chars().any(char::is_control) {
        return Err("a pattern cannot contain control characters".into());
    }
    let levels: Vec<&str> = pattern.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        let wild = level.contains(['+', '#']);
        if wild && *level != "+" && *level != "#" {
            return Err(format!(
                "`{level}`: `+` and `#` must stand alone in their level"
            ));
        }
        if *level == "#" && i + 1 != levels.len() {
            return Err("`#` can only be the last level".into());
        }
    }
    Ok(())
}

/// Whether `topic` matches `pattern` (both checked). A pattern that begins with a
/// wildcard does not match topics that begin with `$` (the broker's own, as in MQTT).
pub(crate) fn matches(pattern: &str, topic: &str) -> bool {
    let mut p = pattern.split('/');
    let mut t = topic.split('/');
    let mut first = true;
    loop {
        match (p.next(), t.next()) {
            (Some("#"), level) => return !(first && level.is_some_and(|l| l.starts_with('$'))),
            (Some("+"), Some(level)) if !(first && level.starts_with('$')) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
        first = false;
    }
}

/// What the topic trie holds: a subscription, or in tests a bare pattern.
pub(crate) trait Entry: Clone {
    fn pattern(&self) -> &str;
    fn same(&self, other: &Self) -> bool;
}

impl Entry for Arc<Sub> {
    fn pattern(&self) -> &str {
        &self.pattern
    }
    fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(self, other)
    }
}

/// One item of a subscription's stream: `[topic, value]`, or `[topic, value, missed]`
/// (topic and value encoded already).
fn write_item(out: &mut Vec<u8>, topic: &[u8], value: &[u8], missed: u64) {
    msgpack::write_array_len(out, if missed > 0 { 3 } else { 2 });
    out.extend_from_slice(topic);
    out.extend_from_slice(value);
    if missed > 0 {
        msgpack::write_uint(out, missed);
    }
}

/// Every subscription, by pattern level.
pub(crate) struct Topics<S = Arc<Sub>> {
    root: Node<S>,
    len: usize,
}

impl<S> Default for Topics<S> {
    fn default() -> Self {
        Topics {
            root: Node::default(),
            len: 0,
        }
    }
}

struct Node<S> {
    children: HashMap<Box<str>, Node<S>>,
    plus: Option<Box<Node<S>>>,
    /// Subscriptions whose pattern ends here with `#`.
    hash: Vec<S>,
    /// Subscriptions whose pattern ends here.
    here: Vec<S>,
}

impl<S> Default for Node<S> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            plus: None,
            hash: Vec::new(),
            here: Vec::new(),
        }
    }
}

impl<S: Entry> Node<S> {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.hash.is_empty()
            && self.here.is_empty()
    }

    /// Whether the node on a path holds nothing but the path's next node (`last`: nothing
    /// at all), so that pruning may remove it.
    fn holds_only_the_path(&self, last: bool) -> bool {
        if last {
            return self.is_empty();
        }
        self.hash.is_empty()
            && self.here.is_empty()
            && self.children.len() + usize::from(self.plus.is_some()) == 1
    }

    /// The child along `level` of a pattern.
    fn step(&self, level: &str) -> Option<&Node<S>> {
        match level {
            "+" => self.plus.as_deref(),
            _ => self.children.get(level),
        }
    }

    fn step_mut(&mut self, level: &str) -> Option<&mut Node<S>> {
        match level {
            "+" => self.plus.as_deref_mut(),
            _ => self.children.get_mut(level),
        }
    }
}

/// Dropped without recursion: a trie is as deep as its longest pattern has levels, which
/// `max_topic_len` lets an operator raise far beyond what a task's stack holds (a
/// recursive drop of a 200,000-level pattern overflowed the stack and aborted the
/// process).
impl<S> Drop for Node<S> {
    fn drop(&mut self) {
        let mut below: Vec<Node<S>> = self.children.drain().map(|(_, node)| node).collect();
        below.extend(self.plus.take().map(|node| *node));
        while let Some(mut node) = below.pop() {
            below.extend(node.children.drain().map(|(_, node)| node));
            below.extend(node.plus.take().map(|node| *node));
            // `node` drops here with no children left.
        }
    }
}

impl<S> std::fmt::Debug for Topics<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topics")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl<S: Entry> Topics<S> {
    /// Subscriptions now.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn insert(&mut self, sub: S) {
        let mut node = &mut self.root;
        let pattern: Box<str> = sub.pattern().into();
        for level in pattern.split('/') {
            node = match level {
                "#" => {
                    node.hash.push(sub);
                    self.len += 1;
                    return;
                }
                "+" => node.plus.get_or_insert_with(Box::default),
                _ => node.children.entry(level.into()).or_default(),
            };
        }
        node.here.push(sub);
        self.len += 1;
    }

    /// Takes `sub` out and prunes the nodes left empty. Without recursion, as
    /// [`Topics::matching`].
    pub(crate) fn remove(&mut self, sub: &S) {
        let mut levels: Vec<&str> = sub.pattern().split('/').collect();
        let in_hash = levels.last() == Some(&"#");
        if in_hash {
            levels.pop();
        }
        let mut node = &mut self.root;
        for level in &levels {
            match node.step_mut(level) {
                Some(next) => node = next,
                None => return,
            }
        }
        let list = if in_hash {
            &mut node.hash
        } else {
            &mut node.here
        };
        let before = list.len();
        list.retain(|s| !s.same(sub));
        if before == list.len() {
            return;
        }
        self.len -= 1;
        // The highest node of the path below which nothing but the path is left: it goes,
        // and the path below it with it.
        let mut cut = None;
        let mut node = &self.root;
        for (depth, level) in levels.iter().enumerate() {
            let Some(next) = node.step(level) else { return };
            node = next;
            if !node.holds_only_the_path(depth + 1 == levels.len()) {
                cut = None;
            } else if cut.is_none() {
                cut = Some(depth);
            }
        }
        let Some(cut) = cut else { return };
        let mut parent = &mut self.root;
        for level in &levels[..cut] {
            match parent.step_mut(level) {
                Some(next) => parent = next,
                None => return,
            }
        }
        match levels[cut] {
            "+" => parent.plus = None,
            level => {
                parent.children.remove(level);
            }
        }
    }

    /// The subscriptions whose pattern matches `topic`, each once. Without recursion (an
    /// explicit stack): the depth is the topic's number of levels, which `max_topic_len`
    /// lets an operator raise far beyond what a task's stack holds.
    pub(crate) fn matching(&self, topic: &str, out: &mut Vec<S>) {
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = levels.first().is_some_and(|l| l.starts_with('$'));
        let mut stack: Vec<(&Node<S>, usize)> = vec![(&self.root, 0)];
        while let Some((node, depth)) = stack.pop() {
            // A pattern that begins with a wildcard does not match a `$` topic.
            let wild_ok = !(depth == 0 && dollar);
            if wild_ok {
                out.extend(node.hash.iter().cloned());
            }
            match levels.get(depth) {
                None => out.extend(node.here.iter().cloned()),
                Some(level) => {
                    if let Some(child) = node.children.get(*level) {
                        stack.push((child, depth + 1));
                    }
                    if let (Some(plus), true) = (&node.plus, wild_ok) {
                        stack.push((plus, depth + 1));
                    }
                }
            }
        }
    }
}

/// A publication's flow-control credit, given back to its publisher when the last copy
/// that holds it (a `Backpressure` subscription's) was sent or dropped.
pub(crate) struct Held(Credit);

impl Held {
    pub(crate) fn new(credit: Credit) -> Arc<Held> {
        Arc::new(Held(credit))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        give_back(self.0.take());
    }
}

/// An acknowledged publication: answered (with its credit given back) when its last copy
/// was delivered or dropped.
pub(crate) struct Acked {
    link: Arc<Link>,
    conv: Conversation,
    credit: Credit,
    subscribers: u32,
    delivered: AtomicU32,
    missed: Mutex<Vec<String>>,
    /// The publisher may learn who missed it (it may introspect the broker).
    reveal: bool,
}

impl Acked {
    pub(crate) fn new(
        link: Arc<Link>,
        conv: Conversation,
        credit: Credit,
        subscribers: u32,
        reveal: bool,
    ) -> Arc<Acked> {
        Arc::new(Acked {
            link,
            conv,
            credit,
            subscribers,
            delivered: AtomicU32::new(0),
            missed: Mutex::default(),
            reveal,
        })
    }

    fn settled(&self, delivered: bool, sub: &Sub) {
        if delivered {
            self.delivered.fetch_add(1, Ordering::Relaxed);
        } else if self.reveal {
            // Names only (never addresses), and only to a publisher that may see them.
            if let Some(name) = lock(&sub.link.name).as_deref() {
                lock(&self.missed).push(name.to_owned());
            }
        }
    }
}

impl Drop for Acked {
    fn drop(&mut self) {
        let report = PublishReport {
            subscribers: self.subscribers,
            delivered: self.delivered.load(Ordering::Relaxed),
            missed: std::mem::take(&mut *lock(&self.missed)),
        };
        let mut payload = vec![0x92, 0x00];
        let payload = match chatter_core::codec::encode(&mut payload, &report) {
            Ok(()) => payload,
            Err(e) => crate::envelope::failure(crate::envelope::FAILURE_PROTOCOL, &e.to_string()),
        };
        self.link.answer(self.conv, payload, self.credit.take());
    }
}

/// What a queued copy keeps alive until it was sent or dropped.
pub(crate) struct Keep {
    held: Option<Arc<Held>>,
    acked: Option<Arc<Acked>>,
}

/// One publication waiting for a subscriber.
pub(crate) struct Item {
    /// The topic, encoded as a MessagePack string (shared by every copy).
    topic: Bytes,
    /// The value, encoded.
    value: Bytes,
    expires: Instant,
    keep: Keep,
}

impl Item {
    /// What it counts against its subscription's `queue_bytes`.
    fn size(&self) -> usize {
        self.topic.len() + self.value.len() + ITEM_COST as usize
    }
}

/// A publication on its way to the subscriptions that match its topic.
pub(crate) struct Publication {
    pub(crate) topic: Bytes,
    pub(crate) value: Bytes,
    pub(crate) expires: Instant,
    /// The publisher's credit, for `Backpressure` subscriptions to hold.
    pub(crate) held: Option<Arc<Held>>,
    pub(crate) acked: Option<Arc<Acked>>,
}

/// One subscription: the stream call `conv` of `link`.
pub(crate) struct Sub {
    pub(crate) link: Arc<Link>,
    pub(crate) conv: Conversation,
    pub(crate) pattern: Box<str>,
    pub(crate) policy: SlowSubscriber,
    queue_bytes: usize,
    /// The subscriber's stream window: an item that costs more can never be sent.
    window: u64,
    state: Mutex<SubState>,
    pub(crate) delivered: AtomicU64,
    pub(crate) dropped: AtomicU64,
}

#[derive(Default)]
struct SubState {
    queue: VecDeque<Item>,
    /// The `size` of what is in `queue`.
    queued: usize,
    /// Stream credit the subscriber granted and we have not used.
    credit: u64,
    /// A batch is in the link's output queue (or being written).
    in_flight: bool,
    /// A `pump` runs: whoever finds this set leaves the work to it.
    pumping: bool,
    ended: bool,
    /// Publications dropped since the last batch was taken: told with the next item.
    missed: u64,
    /// The `missed` the batch in flight tells, given back to `missed` if it is refused.
    missed_in_flight: u64,
    /// The largest batch payload the subscriber's frames take, once a batch was refused
    /// as too large (`usize::MAX` until then: chatter-core does not tell a peer's
    /// `max_frame_size` before).
    frame: usize,
}

impl std::fmt::Debug for Sub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sub")
            .field("pattern", &self.pattern)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Sub {
    pub(crate) fn new(
        link: Arc<Link>,
        conv: Conversation,
        pattern: &str,
        policy: SlowSubscriber,
        queue_bytes: usize,
        window: u64,
    ) -> Arc<Sub> {
        Arc::new(Sub {
            link,
            conv,
            pattern: pattern.into(),
            policy,
            queue_bytes,
            window,
            state: Mutex::new(SubState {
                credit: window,
                frame: usize::MAX,
                ..SubState::default()
            }),
            delivered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        })
    }

    fn state(&self) -> &BrokerState {
        &self.link.state
    }

    /// Queues a copy of `publication`, applying the policy when the queue is full, and
    /// sends what the subscriber has credit for.
    pub(crate) fn push(self: &Arc<Self>, p: &Publication) {
        let mut st = lock(&self.state);
        let mut item = Item {
            topic: p.topic.clone(),
            value: p.value.clone(),
            expires: p.expires,
            keep: Keep {
                held: None,
                acked: p.acked.clone(),
            },
        };
        if st.ended {
            drop(st);
            return self.lost(item.keep);
        }
        let size = item.size();
        let idle = !st.in_flight && st.queue.is_empty() && st.credit >= size as u64;
        if self.policy == SlowSubscriber::Backpressure {
            // Each copy holds its publication's credit, so publishers wait; but credit
            // bounds nothing for the broker's own publications (presence), for a publisher
            // that disconnects and comes back, or across many subscriptions of one
            // publication: the subscription's cap (`max_backpressure_queue`) is the bound.
            if st.queued + size > self.queue_bytes {
                drop(st);
                self.count_dropped(1);
                self.lost(item.keep);
                let why = format!(
                    "subscription `{}`: the subscriber fell {} bytes behind (the broker's max_backpressure_queue)",
                    self.pattern, self.queue_bytes
                );
                return self.end(crate::envelope::FAILURE_LAGGING, &why);
            }
            item.keep.held = p.held.clone();
        } else if !idle {
            // It may wait: its own copy, so that it does not keep the publisher's frame
            // (and its credit) alive.
            item.value = Bytes::copy_from_slice(&item.value);
            let mut dropped = Vec::new();
            while st.queued + size > self.queue_bytes {
                match self.policy {
                    SlowSubscriber::DropOldest if !st.queue.is_empty() => {
                        if let Some(old) = self.dequeue(&mut st) {
                            st.missed += 1;
                            dropped.push(old.keep);
                        }
                    }
                    SlowSubscriber::DropOldest | SlowSubscriber::DropNewest => {
                        st.missed += 1;
                        drop(st);
                        self.count_dropped(1);
                        self.lost(item.keep);
                        for keep in dropped {
                            self.lost(keep);
                        }
                        return;
                    }
                    SlowSubscriber::End | SlowSubscriber::Backpressure => {
                        drop(st);
                        self.count_dropped(1);
                        self.lost(item.keep);
                        let why = format!(
                            "subscription `{}`: the subscriber fell {} bytes behind (its queue_bytes), and its policy ends it",
                            self.pattern, self.queue_bytes
                        );
                        return self.end(crate::envelope::FAILURE_LAGGING, &why);
                    }
                }
            }
            if !dropped.is_empty() {
                self.count_dropped(dropped.len() as u64);
                drop(st);
                for keep in dropped {
                    self.lost(keep);
                }
                st = lock(&self.state);
                if st.ended {
                    drop(st);
                    return self.lost(item.keep);
                }
            }
        }
        st.queued += size;
        self.state().counters.add_queued_publications(size as u64);
        st.queue.push_back(item);
        drop(st);
        self.pump();
    }

    /// Takes the first waiting publication.
    fn dequeue(&self, st: &mut SubState) -> Option<Item> {
        let item = st.queue.pop_front()?;
        st.queued -= item.size();
        let counters = &self.state().counters;
        counters.remove_queued_publications(item.size() as u64);
        Some(item)
    }

    fn count_dropped(&self, n: u64) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
        let counters = &self.state().counters;
        counters.dropped_deliveries.fetch_add(n, Ordering::Relaxed);
    }

    /// A copy that will not reach the subscriber.
    fn lost(&self, keep: Keep) {
        if let Some(acked) = &keep.acked {
            acked.settled(false, self);
        }
    }

    /// What [`BrokerApi::peers`](crate::BrokerApi::peers) says about it.
    pub(crate) fn info(&self) -> crate::SubscriptionInfo {
        let (queued, queued_bytes) = {
            let st = lock(&self.state);
            (st.queue.len() as u64, st.queued as u64)
        };
        crate::SubscriptionInfo {
            pattern: self.pattern.to_string(),
            policy: self.policy,
            queued,
            queued_bytes,
            delivered: self.delivered.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }

    /// More stream credit from the subscriber (`[15, call, bytes]`).
    pub(crate) fn grant(self: &Arc<Self>, bytes: u64) {
        {
            let mut st = lock(&self.state);
            st.credit = st.credit.saturating_add(bytes);
        }
        self.pump();
    }

    /// Hands the link the next batch the subscriber has credit for, unless one is on its
    /// way already; loops while batches go out at once.
    pub(crate) fn pump(self: &Arc<Self>) {
        let mut st = lock(&self.state);
        if st.pumping {
            return;
        }
        st.pumping = true;
        loop {
            let batch = if st.in_flight || st.ended {
                None
            } else {
                self.take_batch(&mut st)
            };
            let Some((payload, items)) = batch else {
                st.pumping = false;
                return;
            };
            st.in_flight = true;
            drop(st);
            self.link.send_items(self, payload, items);
            st = lock(&self.state);
        }
    }

    /// The next batch `[3, item, …]` within the credit and the subscriber's frames, and
    /// its items (kept until it was sent, to be queued again if its frame was too large);
    /// drops expired items on the way.
    fn take_batch(&self, st: &mut SubState) -> Option<(Vec<u8>, Vec<Item>)> {
        let now = Instant::now();
        let mut items: Vec<Item> = Vec::new();
        let mut bytes = 0usize;
        let mut expired = Vec::new();
        let mut too_large = Vec::new();
        while let Some(front) = st.queue.front() {
            if front.expires <= now {
                if let Some(item) = self.dequeue(st) {
                    st.missed += 1;
                    expired.push(item.keep);
                }
                continue;
            }
            let len = front.topic.len() + front.value.len() + 10;
            // The cost of the batch with this item: its payload (≤ bytes + header) and 64
            // per item.
            let cost = (bytes + len + 6) as u64 + ITEM_COST * (items.len() as u64 + 1);
            let full = !items.is_empty()
                && (bytes + len > GATHER || bytes + len + 6 > st.frame || items.len() >= MAX_BATCH);
            if items.is_empty() && (cost > self.window || len + 6 > st.frame) {
                // Larger than the subscriber's whole window, or than its frames: it would
                // wait forever, or never be sent.
                if let Some(item) = self.dequeue(st) {
                    st.missed += 1;
                    self.count_dropped(1);
                    too_large.push(item.keep);
                }
                continue;
            }
            if full || cost > st.credit {
                break;
            }
            bytes += len;
            if let Some(item) = self.dequeue(st) {
                items.push(item);
            }
        }
        for keep in too_large {
            self.lost(keep);
        }
        if !expired.is_empty() {
            let counters = &self.state().counters;
            counters
                .signals_expired
                .fetch_add(expired.len() as u64, Ordering::Relaxed);
            self.dropped
                .fetch_add(expired.len() as u64, Ordering::Relaxed);
            for keep in expired {
                self.lost(keep);
            }
        }
        if items.is_empty() {
            return None;
        }
        let mut payload = Vec::with_capacity(bytes + 8);
        let n = u32::try_from(items.len()).unwrap_or(u32::MAX);
        msgpack::write_array_len(&mut payload, n.saturating_add(1));
        msgpack::write_uint(&mut payload, 3);
        st.missed_in_flight = std::mem::take(&mut st.missed);
        for (i, item) in items.iter().enumerate() {
            let missed = if i == 0 { st.missed_in_flight } else { 0 };
            write_item(&mut payload, &item.topic, &item.value, missed);
        }
        let cost = payload.len() as u64 + ITEM_COST * items.len() as u64;
        st.credit = st.credit.saturating_sub(cost);
        Some((payload, items))
    }

    /// The subscriber's connection refused the batch `send_items` was given (`payload`
    /// bytes) as larger than its frames, whose payload can be at most `frame` bytes: its
    /// items are queued again, to go in batches that fit, and its credit comes back; a
    /// single item that does not fit is dropped and told as missed. (Batches gather up to
    /// 8 KiB, and chatter-core lets a peer take frames as small as 64 bytes: such a
    /// subscriber used to lose every batch of several items, silently.)
    pub(crate) fn refused(self: &Arc<Self>, items: Vec<Item>, payload: usize, frame: usize) {
        let mut lost = Vec::new();
        {
            let mut st = lock(&self.state);
            st.frame = st.frame.min(frame);
            st.credit = st
                .credit
                .saturating_add(payload as u64 + ITEM_COST * items.len() as u64);
            st.missed += std::mem::take(&mut st.missed_in_flight);
            st.in_flight = false;
            if items.len() == 1 || st.ended {
                if !st.ended {
                    st.missed += 1;
                }
                lost = items;
            } else {
                let counters = &self.state().counters;
                for item in items.into_iter().rev() {
                    st.queued += item.size();
                    counters.add_queued_publications(item.size() as u64);
                    st.queue.push_front(item);
                }
            }
        }
        if !lost.is_empty() {
            self.count_dropped(lost.len() as u64);
        }
        for item in lost {
            self.lost(item.keep);
        }
        self.pump();
    }

    /// The link sent (or could not send) the batch `send_items` was given.
    pub(crate) fn settled(self: &Arc<Self>, sent: bool, items: Vec<Item>) {
        let n = items.len() as u64;
        for item in items {
            if let Some(acked) = &item.keep.acked {
                acked.settled(sent, self);
            }
        }
        if sent {
            self.delivered.fetch_add(n, Ordering::Relaxed);
            let counters = &self.state().counters;
            counters.deliveries.fetch_add(n, Ordering::Relaxed);
        }
        let pump = {
            let mut st = lock(&self.state);
            st.in_flight = false;
            !st.pumping && !st.ended && !st.queue.is_empty()
        };
        if pump {
            self.pump();
        }
    }

    /// Ends the subscription: out of the topics, its queue dropped, and (unless its
    /// connection is closing) the stream ended with failure `kind`.
    pub(crate) fn end(self: &Arc<Self>, kind: u64, why: &str) {
        if !self.retire() {
            return;
        }
        let failure = crate::envelope::failure(kind, why);
        self.link.say(self.conv, failure, true);
    }

    /// Takes the subscription out of the topics and its link, and drops its queue;
    /// false if it had ended already.
    pub(crate) fn retire(self: &Arc<Self>) -> bool {
        let queue = {
            let mut st = lock(&self.state);
            if st.ended {
                return false;
            }
            st.ended = true;
            let counters = &self.state().counters;
            counters.remove_queued_publications(std::mem::take(&mut st.queued) as u64);
            std::mem::take(&mut st.queue)
        };
        lock(&self.state().topics).remove(self);
        lock(&self.link.subs).remove(&self.conv.first_id());
        for item in queue {
            self.lost(item.keep);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Entry for Arc<str> {
        fn pattern(&self) -> &str {
            self
        }
        fn same(&self, other: &Self) -> bool {
            Arc::ptr_eq(self, other)
        }
    }

    /// PROTOCOL.md's item examples ("The broker").
    #[test]
    fn items_are_written_as_protocol_md_shows() {
        let doc = include_str!("../../chatter-rpc/PROTOCOL.md");
        for (missed, hex) in [
            (0, "92 03 92 a3 74 2f 31 07"),
            (5, "92 03 93 a3 74 2f 31 07 05"),
        ] {
            let mut out = vec![0x92, 0x03];
            write_item(&mut out, b"\xa3t/1", &[0x07], missed);
            let written: Vec<String> = out.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(written.join(" "), hex);
            assert!(doc.contains(hex), "PROTOCOL.md shows {hex}");
        }
    }

    #[test]
    fn patterns_match_as_in_mqtt() {
        let yes = [
            ("a/b/c", "a/b/c"),
            ("a/+/c", "a/b/c"),
            ("a/#", "a/b/c"),
            ("a/#", "a"),
            ("#", "a/b"),
            ("+", "a"),
            ("+/+", "a/b"),
            ("a/+", "a/"),
            ("$broker/presence/+", "$broker/presence/x"),
            ("$broker/#", "$broker/presence/x"),
        ];
        let no = [
            ("a/b", "a/b/c"),
            ("a/+", "a/b/c"),
            ("+", "a/b"),
            ("a/b/c", "a/b"),
            ("#", "$broker/presence/x"),
            ("+/presence/x", "$broker/presence/x"),
            ("b/#", "a"),
        ];
        for (pattern, topic) in yes {
            assert!(matches(pattern, topic), "{pattern} should match {topic}");
        }
        for (pattern, topic) in no {
            assert!(
                !matches(pattern, topic),
                "{pattern} should not match {topic}"
            );
        }
    }

    #[test]
    fn patterns_and_topics_are_checked() {
        for good in ["a", "a/b", "+", "#", "a/+/c", "a/#", "+/+/#", "a//b"] {
            assert_eq!(check_pattern(good, 64), Ok(()), "{good}");
        }
        for bad in ["", "a#", "#/a", "a/b+", "a/#/b", "x\n", &"a".repeat(65)] {
            assert!(check_pattern(bad, 64).is_err(), "{bad:?}");
        }
        assert_eq!(check_topic("a/b", 64), Ok(()));
        for bad in ["", "a/+", "a/#", "a\tb", &"a".repeat(65)] {
            assert!(check_topic(bad, 64).is_err(), "{bad:?}");
        }
    }

    /// The trie finds exactly the subscriptions whose patterns `matches` says match, each
    /// once, and forgets them when removed.
    #[test]
    fn the_trie_agrees_with_the_matcher() {
        let patterns = [
            "a",
            "a/b",
            "a/+",
            "a/#",
            "+/b",
            "#",
            "+",
            "+/+",
            "a/b/c",
            "a/+/c",
            "+/#",
            "$broker/#",
            "$broker/presence/+",
            "a//b",
            "a/+/+",
        ];
        let topics = [
            "a",
            "a/b",
            "a/c",
            "a/b/c",
            "b",
            "b/b",
            "x/y/z",
            "$broker/presence/p",
            "a//b",
            "a/x/c",
            "$x",
        ];
        let mut topics_trie = Topics::default();
        let subs: Vec<Arc<str>> = patterns.iter().map(|p| Arc::from(*p)).collect();
        for sub in &subs {
            topics_trie.insert(sub.clone());
        }
        assert_eq!(topics_trie.len(), patterns.len());
        for topic in topics {
            let mut found = Vec::new();
            topics_trie.matching(topic, &mut found);
            let mut found: Vec<&str> = found.iter().map(|s| &**s).collect();
            found.sort();
            let mut expected: Vec<&str> = patterns
                .iter()
                .copied()
                .filter(|p| matches(p, topic))
                .collect();
            expected.sort();
            assert_eq!(found, expected, "topic {topic}");
        }
        for sub in &subs {
            topics_trie.remove(sub);
        }
        assert_eq!(topics_trie.len(), 0);
        assert!(topics_trie.root.is_empty());
    }

    /// Patterns far deeper than a stack can recurse (an operator may raise
    /// `max_topic_len`): inserted, matched, removed and dropped without recursion, and
    /// pruning keeps what other patterns share.
    #[test]
    fn deep_patterns_need_no_deep_stack() {
        let deep: Arc<str> = "/".repeat(100_000).into();
        let plus: Arc<str> = format!("{}+", "/".repeat(100_000)).into();
        let hash: Arc<str> = format!("{}#", "/".repeat(50_000)).into();
        let mut trie = Topics::default();
        for sub in [&deep, &plus, &hash] {
            trie.insert(sub.clone());
        }
        let mut found = Vec::new();
        trie.matching(&deep, &mut found);
        assert_eq!(found.len(), 3);
        trie.remove(&plus);
        found.clear();
        trie.matching(&deep, &mut found);
        assert_eq!(found.len(), 2, "the shared path stays for the others");
        trie.remove(&deep);
        trie.remove(&hash);
        assert!(trie.root.is_empty());
        // And a deep trie dropped whole.
        let mut trie = Topics::default();
        trie.insert(deep.clone());
        drop(trie);
    }
}
