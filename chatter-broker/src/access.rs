//! Access control: which names a peer may register, which peers it may call or signal,
//! which topics it may publish and subscribe to, by the peer's identity.

use std::collections::HashMap;
use std::sync::Arc;

use crate::broker::glob;
use crate::pubsub;

/// Who may do what through a broker ([`BrokerOptions::access_control`]).
///
/// A connection's **identity** is the common name (CN) of its TLS client certificate, when
/// the broker requires client certificates (`ServerTls::require_client_certificates`), or
/// the identity a configured credential stands for, once the peer authenticated with it
/// ([`BusOptions::credential`]). A connection without an identity, or whose identity has
/// no rules, gets the [`anonymous`](Self::anonymous) rules: none by default, so that a
/// broker with access control lets nobody do anything it was not told to allow.
///
/// Denied requests fail with [`CallError::PermissionDenied`] (calls, subscriptions,
/// acknowledged publications, registrations); denied signals and publications are dropped.
/// Every denial is counted ([`BrokerStats::denied`]).
///
/// ```
/// use chatter_broker::{AccessControl, BrokerOptions, Rules};
///
/// let access = AccessControl::new()
///     // Sensors authenticate with a certificate whose CN is `sensors`…
///     .identity(
///         "sensors",
///         Rules::none()
///             .register("sensor-*")
///             .publish("sensors/#"),
///     )
///     // …dashboards with a token.
///     .credential("s3cret-token", "dashboard")
///     .identity(
///         "dashboard",
///         Rules::none()
///             .subscribe("sensors/#")
///             .subscribe("$broker/presence/+")
///             .call("sensor-*"),
///     );
/// let options = BrokerOptions::new().access_control(access);
/// # let _ = options;
/// ```
///
/// [`BrokerOptions::access_control`]: crate::BrokerOptions::access_control
/// [`BusOptions::credential`]: crate::BusOptions::credential
/// [`CallError::PermissionDenied`]: chatter_rpc::CallError::PermissionDenied
/// [`BrokerStats::denied`]: crate::BrokerStats::denied
#[derive(Debug, Clone, Default)]
pub struct AccessControl {
    anonymous: Arc<Rules>,
    identities: HashMap<String, Arc<Rules>>,
    credentials: HashMap<String, String>,
}

impl AccessControl {
    /// No identities, no credentials, and nothing allowed to anonymous connections.
    pub fn new() -> Self {
        AccessControl::default()
    }

    /// The rules of connections without an identity (or whose identity has no rules).
    pub fn anonymous(mut self, rules: Rules) -> Self {
        self.anonymous = Arc::new(rules);
        self
    }

    /// The rules of connections whose identity is `identity`.
    pub fn identity(mut self, identity: &str, rules: Rules) -> Self {
        self.identities.insert(identity.to_owned(), Arc::new(rules));
        self
    }

    /// A credential (a secret token) that makes a connection that presents it `identity`
    /// (replacing a certificate's identity, if it had one). Send credentials over TLS
    /// only: the broker compares them as given, and does not limit how many a connection
    /// tries (each wrong one is counted in `denied`), so use long random tokens.
    pub fn credential(mut self, token: &str, identity: &str) -> Self {
        self.credentials
            .insert(token.to_owned(), identity.to_owned());
        self
    }

    /// Reads access control from text, one rule per line (words separated by spaces, so
    /// names, patterns and tokens cannot contain any; a line that begins with `#`, and the
    /// words after a rule's own from one that begins with `#`, are comments):
    ///
    /// ```text
    /// credential TOKEN IDENTITY          # TOKEN makes a connection IDENTITY
    /// identity NAME register GLOB        # NAME may register names matching GLOB
    /// identity NAME call GLOB            # … call and signal peers matching GLOB
    /// identity NAME publish PATTERN      # … publish on topics PATTERN matches
    /// identity NAME subscribe PATTERN    # … subscribe to what PATTERN covers
    /// identity NAME introspect           # … ask for the broker's peers and counters
    /// identity NAME backpressure         # … subscribe with the Backpressure policy
    /// identity NAME all                  # … everything (Rules::all)
    /// anonymous register GLOB            # the same for connections without an identity
    /// ```
    ///
    /// ```
    /// use chatter_broker::AccessControl;
    ///
    /// let access = AccessControl::parse(
    ///     "identity sensors register sensor-*\n\
    ///      identity sensors publish sensors/#\n\
    ///      credential s3cret dashboard   # a token for the dashboard\n\
    ///      identity dashboard subscribe sensors/#\n",
    /// )?;
    /// # let _ = access;
    /// # Ok::<(), String>(())
    /// ```
    ///
    /// An unknown word, a missing or extra one, or an invalid pattern is an error that
    /// names its line.
    pub fn parse(text: &str) -> Result<AccessControl, String> {
        let mut access = AccessControl::new();
        let mut rules: HashMap<Option<String>, Rules> = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let fail = |why: &str| Err(format!("line {}: {why}: `{}`", n + 1, line.trim()));
            let mut words: Vec<&str> = line.split_whitespace().collect();
            // A comment runs from a word that begins with `#` after the rule's words (a
            // pattern may be `#` itself, so the rule's arity decides where it ends).
            let arity = match words.as_slice() {
                [first, ..] if first.starts_with('#') => 0,
                ["credential", ..] => 3,
                [_, _, "introspect" | "all" | "backpressure", ..]
                | ["anonymous", "introspect" | "all" | "backpressure", ..] => words
                    .iter()
                    .position(|w| matches!(*w, "introspect" | "all" | "backpressure"))
                    .map_or(0, |i| i + 1),
                ["anonymous", ..] => 3,
                _ => 4,
            };
            if words.len() > arity {
                if !words[arity].starts_with('#') {
                    return fail("unexpected words at the end");
                }
                words.truncate(arity);
            }
            let (who, rest) = match words.as_slice() {
                [] => continue,
                ["credential", token, identity] => {
                    access = access.credential(token, identity);
                    continue;
                }
                ["credential", ..] => return fail("expected `credential TOKEN IDENTITY`"),
                ["identity", name, rest @ ..] => (Some((*name).to_owned()), rest),
                ["anonymous", rest @ ..] => (None, rest),
                _ => return fail("expected `credential`, `identity NAME` or `anonymous`"),
            };
            let entry = rules.entry(who).or_default();
            let taken = std::mem::take(entry);
            *entry = match rest {
                ["register", glob] => taken.register(glob),
                ["call", glob] => taken.call(glob),
                ["publish", pattern] | ["subscribe", pattern] => {
                    if let Err(why) = pubsub::check_pattern(pattern, usize::MAX) {
                        return fail(&why);
                    }
                    if rest[0] == "publish" {
                        taken.publish(pattern)
                    } else {
                        taken.subscribe(pattern)
                    }
                }
                ["introspect"] => taken.introspect(),
                ["backpressure"] => taken.backpressure(),
                ["all"] => {
                    let all = Rules::all();
                    Rules {
                        register: [taken.register, all.register].concat(),
                        call: [taken.call, all.call].concat(),
                        publish: [taken.publish, all.publish].concat(),
                        subscribe: [taken.subscribe, all.subscribe].concat(),
                        introspect: true,
                        backpressure: true,
                    }
                }
                _ => {
                    return fail(
                        "expected `register GLOB`, `call GLOB`, `publish PATTERN`, `subscribe PATTERN`, `introspect` or `all`",
                    )
                }
            };
        }
        for (who, rules) in rules {
            access = match who {
                Some(identity) => access.identity(&identity, rules),
                None => access.anonymous(rules),
            };
        }
        Ok(access)
    }

    /// The rules of `identity` (the anonymous ones for `None` or an unknown identity).
    pub(crate) fn rules(&self, identity: Option<&str>) -> Arc<Rules> {
        identity
            .and_then(|i| self.identities.get(i))
            .unwrap_or(&self.anonymous)
            .clone()
    }

    /// The identity `token` stands for.
    pub(crate) fn identity_of(&self, token: &str) -> Option<&str> {
        self.credentials.get(token).map(String::as_str)
    }
}

/// What one identity may do ([`AccessControl`]). Each list allows what any of its entries
/// matches; an empty list allows nothing.
///
/// - peer names ([`register`](Self::register), [`call`](Self::call)) are globs, where `*`
///   stands for any characters: `sensor-*`, `*`;
/// - topics ([`publish`](Self::publish)) and subscription patterns
///   ([`subscribe`](Self::subscribe)) are MQTT-style patterns: a subscription is allowed if
///   every topic it can match is matched by an allowed pattern (`sensors/#` allows
///   subscribing to `sensors/+/temp`, not to `#`). Patterns that begin with a wildcard do
///   not cover the broker's own `$broker/…` topics: allow `$broker/presence/+` by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    register: Vec<String>,
    call: Vec<String>,
    publish: Vec<String>,
    subscribe: Vec<String>,
    introspect: bool,
    backpressure: bool,
}

impl Rules {
    /// Nothing allowed.
    pub fn none() -> Self {
        Rules::default()
    }

    /// Everything allowed: any name, any peer, any topic, presence included.
    pub fn all() -> Self {
        Rules::none()
            .register("*")
            .call("*")
            .publish("#")
            .subscribe("#")
            .subscribe("$broker/#")
            .introspect()
            .backpressure()
    }

    /// Allows subscriptions with the [`Backpressure`](crate::SlowSubscriber::Backpressure)
    /// policy, which hold their publishers back while they do not read: give it only to
    /// subscribers trusted to keep reading.
    pub fn backpressure(mut self) -> Self {
        self.backpressure = true;
        self
    }

    pub(crate) fn may_backpressure(&self) -> bool {
        self.backpressure
    }

    /// Allows asking the broker for its peers and counters ([`BrokerApi::peers`],
    /// [`BrokerApi::stats`], `chatter.introspect`'s `stats`): they show every peer's
    /// name, address, identity and subscriptions.
    ///
    /// [`BrokerApi::peers`]: crate::BrokerApi::peers
    /// [`BrokerApi::stats`]: crate::BrokerApi::stats
    pub fn introspect(mut self) -> Self {
        self.introspect = true;
        self
    }

    pub(crate) fn may_introspect(&self) -> bool {
        self.introspect
    }

    /// Allows registering the names that match `glob`.
    pub fn register(mut self, glob: &str) -> Self {
        self.register.push(glob.to_owned());
        self
    }

    /// Allows calling and signalling the peers whose names match `glob` (a broadcast
    /// reaches only the matching peers this allows).
    pub fn call(mut self, glob: &str) -> Self {
        self.call.push(glob.to_owned());
        self
    }

    /// Allows publishing on the topics that match `pattern`.
    pub fn publish(mut self, pattern: &str) -> Self {
        self.publish.push(pattern.to_owned());
        self
    }

    /// Allows subscriptions whose every topic `pattern` matches.
    pub fn subscribe(mut self, pattern: &str) -> Self {
        self.subscribe.push(pattern.to_owned());
        self
    }

    pub(crate) fn may_register(&self, name: &str) -> bool {
        self.register.iter().any(|g| glob(g, name))
    }

    pub(crate) fn may_call(&self, name: &str) -> bool {
        self.call.iter().any(|g| glob(g, name))
    }

    pub(crate) fn may_publish(&self, topic: &str) -> bool {
        self.publish.iter().any(|p| pubsub::matches(p, topic))
    }

    pub(crate) fn may_subscribe(&self, pattern: &str) -> bool {
        self.subscribe.iter().any(|a| covers(a, pattern))
    }
}

/// Whether every topic `pattern` matches is matched by `allowed` (both valid patterns).
pub(crate) fn covers(allowed: &str, pattern: &str) -> bool {
    let a: Vec<&str> = allowed.split('/').collect();
    let p: Vec<&str> = pattern.split('/').collect();
    for (i, level) in a.iter().enumerate() {
        // A leading wildcard of `allowed` matches no `$` topic, which a pattern with a `$`
        // first level matches.
        if i == 0 && (*level == "#" || *level == "+") && p[0].starts_with('$') {
            return false;
        }
        match *level {
            "#" => return true,
            _ if i == p.len() => return false,
            _ if p[i] == "#" => return false,
            "+" => {}
            literal if literal == p[i] => {}
            _ => return false,
        }
    }
    a.len() == p.len()
}

/// The common name (CN) of an X.509 certificate's subject, read from its DER: the first
/// CN attribute, as UTF-8 (UTF8String, PrintableString, IA5String or TeletexString read
/// as Latin-1). `None` for anything it cannot read.
pub(crate) fn common_name(cert: &[u8]) -> Option<String> {
    let mut der = Der(cert);
    let mut certificate = der.take(0x30)?;
    let mut tbs = certificate.take(0x30)?;
    if tbs.peek() == Some(0xa0) {
        tbs.take(0xa0)?; // version
    }
    tbs.take(0x02)?; // serial number
    tbs.take(0x30)?; // signature algorithm
    tbs.take(0x30)?; // issuer
    tbs.take(0x30)?; // validity
    let mut subject = tbs.take(0x30)?;
    while !subject.0.is_empty() {
        let mut rdn = subject.take(0x31)?;
        while !rdn.0.is_empty() {
            let mut attribute = rdn.take(0x30)?;
            let oid = attribute.take(0x06)?;
            if oid.0 != [0x55, 0x04, 0x03] {
                continue;
            }
            let tag = attribute.peek()?;
            let value = attribute.take(tag)?.0;
            return match tag {
                0x0c | 0x13 | 0x16 => String::from_utf8(value.to_vec()).ok(),
                0x14 => Some(value.iter().map(|&b| char::from(b)).collect()),
                _ => None,
            };
        }
    }
    None
}

/// A cursor over DER: takes one element of an expected tag, giving its contents.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    fn peek(&self) -> Option<u8> {
        self.0.first().copied()
    }

    fn take(&mut self, tag: u8) -> Option<Der<'a>> {
        let (&t, rest) = self.0.split_first()?;
        if t != tag {
            return None;
        }
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            (len, &rest[n..])
        };
        if rest.len() < len {
            return None;
        }
        let (contents, rest) = rest.split_at(len);
        self.0 = rest;
        Some(Der(contents))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_patterns_cover_narrower_ones() {
        let yes = [
            ("#", "#"),
            ("#", "a/+/c"),
            ("a/#", "a"),
            ("a/#", "a/b/#"),
            ("a/+", "a/b"),
            ("a/+", "a/+"),
            ("+/b", "x/b"),
            ("a/b", "a/b"),
            ("$broker/presence/+", "$broker/presence/+"),
            ("$broker/#", "$broker/presence/x"),
        ];
        let no = [
            ("a/+", "a/#"),
            ("a/b", "a/+"),
            ("a/+", "a"),
            ("a", "a/b"),
            ("a/#", "#"),
            ("a/#", "b/c"),
            ("#", "$broker/presence/+"),
            ("+/presence/+", "$broker/presence/+"),
            ("a/+/c", "a/+/d"),
        ];
        for (allowed, pattern) in yes {
            assert!(covers(allowed, pattern), "{allowed} should cover {pattern}");
        }
        for (allowed, pattern) in no {
            assert!(
                !covers(allowed, pattern),
                "{allowed} should not cover {pattern}"
            );
        }
    }

    /// `covers` agrees with the matcher: whatever a covered pattern matches, the allowed
    /// one matches too (over a set of topics).
    #[test]
    fn a_covered_pattern_matches_nothing_the_allowed_one_does_not() {
        let patterns = [
            "#", "+", "a", "a/#", "a/+", "a/b", "+/b", "+/+", "a/+/c", "$x/#", "$x/+",
        ];
        let topics = ["a", "b", "a/b", "x/b", "a/b/c", "a/x/c", "$x/y", "$x", "a/"];
        for allowed in patterns {
            for pattern in patterns {
                if covers(allowed, pattern) {
                    for topic in topics {
                        if pubsub::matches(pattern, topic) {
                            assert!(
                                pubsub::matches(allowed, topic),
                                "{allowed} covers {pattern}, which matches {topic}, but it does not"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rules_allow_what_they_list() {
        let rules = Rules::none()
            .register("sensor-*")
            .call("pump-1")
            .publish("sensors/#")
            .subscribe("alarms/+");
        assert!(rules.may_register("sensor-7") && !rules.may_register("pump-1"));
        assert!(rules.may_call("pump-1") && !rules.may_call("pump-2"));
        assert!(rules.may_publish("sensors/7/temp") && !rules.may_publish("alarms/x"));
        assert!(rules.may_subscribe("alarms/+") && !rules.may_subscribe("alarms/#"));
        let none = Rules::none();
        assert!(!none.may_register("x") && !none.may_call("x"));
        assert!(!none.may_publish("x") && !none.may_subscribe("x"));
        let all = Rules::all();
        assert!(all.may_subscribe("$broker/presence/+") && all.may_subscribe("#"));
    }

    #[test]
    fn rules_are_read_from_text() {
        let access = AccessControl::parse(
            "# sensors\n\
             identity sensors register sensor-*\n\
             identity sensors publish sensors/#   # their readings\n\
             identity sensors subscribe #\n\
             credential tok ops\n\
             identity ops all\n\
             anonymous subscribe public/#\n",
        )
        .expect("valid");
        let sensors = access.rules(Some("sensors"));
        assert!(sensors.may_register("sensor-1") && sensors.may_publish("sensors/1/t"));
        assert!(!sensors.may_call("x") && !sensors.may_introspect());
        assert_eq!(access.identity_of("tok"), Some("ops"));
        assert!(access.rules(Some("ops")).may_introspect());
        let anonymous = access.rules(None);
        assert!(anonymous.may_subscribe("public/x") && !anonymous.may_register("x"));
        assert_eq!(access.rules(Some("unknown")), anonymous);
        for bad in [
            "identity x",
            "identity x fly away",
            "credential tok",
            "someone register x",
            "identity x subscribe a/#/b",
            "identity x register",
            "identity x register a b",
        ] {
            let e = AccessControl::parse(bad).expect_err(bad);
            assert!(e.starts_with("line 1:"), "{e}");
        }
    }

    #[test]
    fn bad_der_has_no_common_name() {
        for bad in [
            &[][..],
            &[0x30],
            &[0x30, 0x05, 0x30],
            &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff],
        ] {
            assert_eq!(common_name(bad), None);
        }
    }
}
