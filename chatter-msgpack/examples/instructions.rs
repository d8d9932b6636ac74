//! Instructions per encode and decode, for `valgrind --tool=callgrind` (see BENCHMARKS.md,
//! "chatter-msgpack: instructions per encode/decode, old codec vs new").
//!
//! ```text
//! cargo build --release -p chatter-msgpack --example instructions
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/release/examples/instructions CODEC OP N
//! ```
//!
//! runs OP N times with CODEC (`new`: chatter-msgpack, `rmp`: rmp-serde with
//! `with_struct_map()`, for reference); instructions per OP are
//! (Ir(N = 30000) − Ir(N = 10000)) / 20000, which cancels start-up and set-up. OP is
//! `enc-args` / `dec-args` (the tuple `(2i64, 3i64)`, an RPC's arguments) or
//! `enc-record` / `dec-record` (a struct with an integer, a string, a vector of strings, a
//! float and a nested enum, as below) or `enc-bytes` / `dec-bytes` (a `Vec<u8>` of 1,000
//! bytes; `new` only). The codec and operation are chosen once, outside
//! the loop, so that the loop holds nothing but the operation.
use std::hint::black_box;

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, PartialEq, Debug, Clone)]
struct Record {
    id: u64,
    name: String,
    tags: Vec<String>,
    score: f32,
    shape: Shape,
}

#[derive(Serialize, Deserialize, PartialEq, Debug, Clone)]
enum Shape {
    Empty,
    Rect(u32, u32),
    Nested(Box<Shape>),
}

/// Runs `op` `n` times.
#[inline(never)]
fn repeat(n: u64, mut op: impl FnMut()) {
    for _ in 0..n {
        op();
    }
}

fn rmp_encode<T: Serialize>(w: &mut Vec<u8>, v: &T) {
    v.serialize(&mut rmp_serde::Serializer::new(w).with_struct_map())
        .unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage =
        "usage: instructions new|rmp enc-args|enc-record|enc-bytes|dec-args|dec-record|dec-bytes N";
    let [_, codec, op, n] = &args[..] else {
        panic!("{usage}")
    };
    let n: u64 = n.parse().expect(usage);
    let args_value = (2i64, 3i64);
    let record = Record {
        id: 70_000,
        name: "record".into(),
        tags: vec!["a".into(), "bc".into()],
        score: 0.5,
        shape: Shape::Nested(Box::new(Shape::Rect(3, 400))),
    };
    let mut small = Vec::new();
    chatter_msgpack::encode(&mut small, &args_value).unwrap();
    let mut big = Vec::new();
    chatter_msgpack::encode(&mut big, &record).unwrap();
    // A `Vec<u8>` of 1,000 bytes, half of them 128 or above.
    let bytes: Vec<u8> = (0..1000u32).map(|i| (i * 37) as u8).collect();
    let mut encoded_bytes = Vec::new();
    chatter_msgpack::encode(&mut encoded_bytes, &bytes).unwrap();
    let mut buf = Vec::with_capacity(4096);
    match (codec.as_str(), op.as_str()) {
        ("new", "enc-args") => repeat(n, || {
            buf.clear();
            chatter_msgpack::encode(&mut buf, black_box(&args_value)).unwrap();
            black_box(&buf);
        }),
        ("new", "enc-record") => repeat(n, || {
            buf.clear();
            chatter_msgpack::encode(&mut buf, black_box(&record)).unwrap();
            black_box(&buf);
        }),
        ("new", "enc-bytes") => repeat(n, || {
            buf.clear();
            chatter_msgpack::encode(&mut buf, black_box(&bytes)).unwrap();
            black_box(&buf);
        }),
        ("new", "dec-bytes") => repeat(n, || {
            black_box(chatter_msgpack::decode::<Vec<u8>>(black_box(&encoded_bytes)).unwrap());
        }),
        ("new", "dec-args") => repeat(n, || {
            black_box(chatter_msgpack::decode::<(i64, i64)>(black_box(&small)).unwrap());
        }),
        ("new", "dec-record") => repeat(n, || {
            black_box(chatter_msgpack::decode::<Record>(black_box(&big)).unwrap());
        }),
        ("rmp", "enc-args") => repeat(n, || {
            buf.clear();
            rmp_encode(&mut buf, black_box(&args_value));
            black_box(&buf);
        }),
        ("rmp", "enc-record") => repeat(n, || {
            buf.clear();
            rmp_encode(&mut buf, black_box(&record));
            black_box(&buf);
        }),
        ("rmp", "dec-args") => repeat(n, || {
            black_box(rmp_serde::from_slice::<(i64, i64)>(black_box(&small)).unwrap());
        }),
        ("rmp", "dec-record") => repeat(n, || {
            black_box(rmp_serde::from_slice::<Record>(black_box(&big)).unwrap());
        }),
        _ => panic!("{usage}"),
    }
}
