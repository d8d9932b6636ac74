//! The MessagePack codec (`chatter_core::codec`): every input is decoded as several types,
//! and each value that decodes is encoded and decoded again.
//!
//! - `IgnoredAny`: any MessagePack value, walked and dropped (nesting limits, lengths that
//!   promise more than the input holds);
//! - `Shape`: a recursive enum in all four variant forms (unit, newtype, sequence, struct),
//!   the type whose nesting rmp-serde does not count;
//! - `Record`: a struct with strings, bytes, maps, options, floats, a char, a tuple and a
//!   nested enum.
//!
//! Invariants checked, beyond "no panic, no stack overflow": a decoded value encodes
//! without error, and its encoding decodes to an equal value. Errors are only checked with
//! `is_ok()`, so the target does not depend on the codec's error type.

#![no_main]

use std::collections::BTreeMap;
use std::fmt::Debug;

use chatter_core::codec::{decode, encode};
use libfuzzer_sys::fuzz_target;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize};

fuzz_target!(|data: &[u8]| {
    let _ = decode::<IgnoredAny>(data).is_ok();
    roundtrip::<Shape>(data);
    roundtrip::<Record>(data);
});

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Shape {
    Empty,
    Nested(Box<Shape>),
    Many(Vec<Shape>),
    Named { a: Box<Shape>, b: String },
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Record {
    name: String,
    tags: Vec<String>,
    #[serde(with = "serde_bytes")]
    blob: Vec<u8>,
    attrs: BTreeMap<String, u64>,
    by_id: BTreeMap<u32, Option<String>>,
    note: Option<String>,
    count: Option<i64>,
    ratio: F64,
    scale: Option<F32>,
    letter: char,
    flag: bool,
    pair: (u8, i16),
    nothing: (),
    kind: Kind,
    shape: Option<Shape>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Kind {
    Plain,
    Pair(u32, String),
    #[serde(with = "serde_bytes")]
    Raw(Vec<u8>),
    Point {
        x: i32,
        y: i32,
    },
}

/// An `f64` compared by its bits, so that a NaN that comes back as the same NaN is equal.
#[derive(Debug, Serialize, Deserialize)]
#[serde(transparent)]
struct F64(f64);

impl PartialEq for F64 {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}

/// An `f32` compared by its bits.
#[derive(Debug, Serialize, Deserialize)]
#[serde(transparent)]
struct F32(f32);

impl PartialEq for F32 {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}

/// Decodes `data` as a `T`; if that works, the value must encode, and decode back to itself.
fn roundtrip<T: Debug + PartialEq + Serialize + DeserializeOwned>(data: &[u8]) {
    let Ok(value) = decode::<T>(data) else {
        return;
    };
    let mut bytes = Vec::new();
    if encode(&mut bytes, &value).is_err() {
        panic!("{value:?}, decoded from {data:02x?}, does not encode");
    }
    match decode::<T>(&bytes) {
        Ok(again) => assert_eq!(again, value, "re-decoded from {bytes:02x?}"),
        Err(_) => panic!("{value:?} encodes to {bytes:02x?}, which does not decode"),
    }
}
