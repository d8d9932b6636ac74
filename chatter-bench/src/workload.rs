//! The workloads of issue 5 (and the stream workloads of issue 16) and their sizes.

/// One of the measured workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Latency,
    Pipelined,
    Fanin,
    Payload,
    Signals,
    Idle,
    TlsPipelined,
    TlsPayload,
    Connect,
    StreamItems,
    StreamBytes,
    StreamFanout,
}

pub const ALL: [Workload; 12] = [
    Workload::Latency,
    Workload::Pipelined,
    Workload::Fanin,
    Workload::Payload,
    Workload::Signals,
    Workload::Idle,
    Workload::TlsPipelined,
    Workload::TlsPayload,
    Workload::Connect,
    Workload::StreamItems,
    Workload::StreamBytes,
    Workload::StreamFanout,
];

/// What a workload does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Calls (request and reply), `window` in flight per connection.
    Calls,
    /// One-way messages counted at the receiver.
    OneWay,
    /// Connections opened and left idle.
    Idle,
    /// Connections opened one after the other, each for one call, then closed.
    Connect,
    /// `streams` streams on one connection from the server to the client, each of
    /// `payload`-byte items, read as fast as they come (`streams.rs`): `warmup` items
    /// (all streams together), then `total` measured.
    Stream,
}

/// The size of a workload.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub workload: Workload,
    pub kind: Kind,
    pub conns: usize,
    /// Calls in flight per connection.
    pub window: usize,
    /// Operations in the measured phase (all connections together).
    pub total: u64,
    /// Unmeasured calls per connection before the measured phase.
    pub warmup: u64,
    /// Payload bytes per call (0: `add(i32, i32)`, 8 bytes of arguments).
    pub payload: usize,
    pub tls: bool,
    /// Concurrent streams on the connection (stream workloads).
    pub streams: usize,
    /// chatter-rpc's stream window at the reader (`PeerOptions::stream_window`); 0: the
    /// default (256 KiB).
    pub stream_window: u64,
    /// raw writes together what may go together (the default, its physical limit) instead
    /// of one `send` (write and flush) per frame (`--raw-per-frame`).
    pub raw_batched: bool,
}

/// Payload size of the payload workloads.
pub const PAYLOAD: usize = 64 * 1024;

/// Item size of `stream-items`: a small value.
pub const STREAM_ITEM: usize = 64;

/// Chunk size of `stream-bytes`. An item must fit the reader's stream window (256 KiB by
/// default, `PeerOptions::stream_window`) with its 64 bytes of accounted overhead and its
/// envelope: 256 KiB chunks would be refused, 128 KiB ones would leave one chunk in flight
/// (stop and wait for each grant). 64 KiB leaves three in flight, grants every two, and is
/// the `payload` workload's size.
pub const STREAM_CHUNK: usize = 64 * 1024;

/// Item size of `stream-fanout`: big enough that MB/s means something, small enough that
/// each of the 100 windows holds dozens.
pub const FANOUT_ITEM: usize = 4 * 1024;

/// Streams of `stream-fanout` (issue 16: 100 on one connection).
pub const FANOUT_STREAMS: usize = 100;

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Latency => "latency",
            Workload::Pipelined => "pipelined",
            Workload::Fanin => "fanin",
            Workload::Payload => "payload",
            Workload::Signals => "signals",
            Workload::Idle => "idle",
            Workload::TlsPipelined => "tls-pipelined",
            Workload::TlsPayload => "tls-payload",
            Workload::Connect => "connect",
            Workload::StreamItems => "stream-items",
            Workload::StreamBytes => "stream-bytes",
            Workload::StreamFanout => "stream-fanout",
        }
    }

    pub fn parse(s: &str) -> Option<Workload> {
        ALL.into_iter().find(|w| w.name() == s)
    }

    /// What the table reports for this workload, and whether more is better.
    pub fn metric(self) -> (&'static str, bool) {
        match self {
            Workload::Latency => ("p50 µs", false),
            Workload::Pipelined | Workload::Fanin | Workload::TlsPipelined => ("kcalls/s", true),
            Workload::Payload | Workload::TlsPayload => ("MB/s", true),
            Workload::Signals => ("kmsgs/s", true),
            Workload::Idle => ("KB/conn", false),
            Workload::Connect => ("conns/s", true),
            Workload::StreamItems => ("kitems/s", true),
            Workload::StreamBytes | Workload::StreamFanout => ("MB/s", true),
        }
    }

    /// Whether this is one of the stream workloads of issue 16.
    pub fn is_stream(self) -> bool {
        matches!(
            self,
            Workload::StreamItems | Workload::StreamBytes | Workload::StreamFanout
        )
    }

    /// The target ratio to raw from issue 5 (issue 16's for streams: 0.8 too).
    pub fn target(self) -> f64 {
        match self {
            Workload::Latency | Workload::Idle => 1.25,
            _ => 0.8,
        }
    }

    pub fn spec(self, quick: bool) -> Spec {
        let q = |full: u64, small: u64| if quick { small } else { full };
        let base = Spec {
            workload: self,
            kind: Kind::Calls,
            conns: 1,
            window: 1,
            total: 0,
            warmup: 0,
            payload: 0,
            tls: false,
            streams: 1,
            stream_window: 0,
            raw_batched: true,
        };
        match self {
            Workload::Latency => Spec {
                total: q(20_000, 500),
                warmup: q(2_000, 50),
                ..base
            },
            Workload::Pipelined => Spec {
                window: 256,
                total: q(300_000, 5_000),
                warmup: q(20_000, 500),
                ..base
            },
            Workload::Fanin => Spec {
                conns: 64,
                window: 16,
                total: q(300_000, 5_000),
                warmup: q(200, 16),
                ..base
            },
            Workload::Payload => Spec {
                window: 16,
                total: q(20_000, 200),
                warmup: q(1_000, 20),
                payload: PAYLOAD,
                ..base
            },
            Workload::Signals => Spec {
                kind: Kind::OneWay,
                total: q(1_000_000, 10_000),
                ..base
            },
            Workload::Idle => Spec {
                kind: Kind::Idle,
                conns: q(5_000, 200) as usize,
                ..base
            },
            Workload::TlsPipelined => Spec {
                tls: true,
                ..Workload::Pipelined.spec(quick)
            },
            Workload::TlsPayload => Spec {
                tls: true,
                ..Workload::Payload.spec(quick)
            },
            // `total` connections in a row, each: connect, one call, close.
            Workload::Connect => Spec {
                kind: Kind::Connect,
                total: q(5_000, 300),
                warmup: q(200, 20),
                ..base
            },
            // 64-byte items on one stream.
            Workload::StreamItems => Spec {
                kind: Kind::Stream,
                total: q(2_000_000, 5_000),
                warmup: q(50_000, 500),
                payload: STREAM_ITEM,
                ..base
            },
            // 1 GiB of 64 KiB chunks on one stream (4 MiB with --quick).
            Workload::StreamBytes => Spec {
                kind: Kind::Stream,
                total: q((1 << 30) / STREAM_CHUNK as u64, 64),
                warmup: q(512, 8),
                payload: STREAM_CHUNK,
                ..base
            },
            // 100 streams of 4 KiB items on one connection: 800 MiB (16 MiB with --quick).
            // The warm-up is past what the 100 windows hold (about 6,000 items at the
            // default 256 KiB), so that the measured items are read as they are sent.
            Workload::StreamFanout => Spec {
                kind: Kind::Stream,
                streams: FANOUT_STREAMS,
                total: q(200 * 1024, 4_000),
                warmup: q(20_000, 8_000),
                payload: FANOUT_ITEM,
                ..base
            },
        }
        .with_name(self)
    }
}

impl Spec {
    fn with_name(mut self, w: Workload) -> Spec {
        self.workload = w;
        self
    }
}

/// A system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    Raw,
    Tarpc,
    Core,
    Rpc,
}

pub const SYSTEMS: [System; 4] = [System::Raw, System::Tarpc, System::Core, System::Rpc];

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Raw => "raw",
            System::Tarpc => "tarpc",
            System::Core => "chatter-core",
            System::Rpc => "chatter-rpc",
        }
    }

    pub fn parse(s: &str) -> Option<System> {
        match s {
            "raw" => Some(System::Raw),
            "tarpc" => Some(System::Tarpc),
            "core" | "chatter-core" => Some(System::Core),
            "rpc" | "chatter-rpc" => Some(System::Rpc),
            _ => None,
        }
    }

    /// Whether this system takes part in `w` (tarpc has no TLS transport here; streams
    /// are measured for chatter-rpc against raw).
    pub fn runs(self, w: Workload) -> bool {
        match w {
            Workload::TlsPipelined | Workload::TlsPayload => self != System::Tarpc,
            Workload::StreamItems | Workload::StreamBytes | Workload::StreamFanout => {
                matches!(self, System::Raw | System::Rpc)
            }
            _ => true,
        }
    }
}
