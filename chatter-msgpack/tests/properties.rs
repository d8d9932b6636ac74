//! Property tests against rmp-serde: arbitrary values encode to rmp-serde's bytes and
//! decode back; arbitrary bytes decode without panicking, as rmp-serde decodes them
//! wherever it can (inputs nested no deeper than `MAX_DEPTH`); deep and bogus inputs are
//! errors, not stack overflows.
//!
//! `PROPTEST_CASES=100000 cargo test -p chatter-msgpack --test properties` runs more cases
//! than the default 256.

use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Debug};

use chatter_msgpack::{decode, encode, DecodeError, MAX_DEPTH};
use proptest::prelude::*;
use serde::de::{DeserializeOwned, IgnoredAny, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Bytes serialized as a MessagePack bin (what `serde_bytes::ByteBuf` does).
#[derive(Debug, Clone, PartialEq)]
struct Bin(Vec<u8>);

impl Serialize for Bin {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Bin {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// Accepts bytes, and sequences of bytes.
        struct BinVisitor;
        impl<'de> Visitor<'de> for BinVisitor {
            type Value = Bin;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Bin, E> {
                Ok(Bin(v.to_vec()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut s: A) -> Result<Bin, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = s.next_element()? {
                    out.push(b);
                }
                Ok(Bin(out))
            }
        }
        d.deserialize_byte_buf(BinVisitor)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct UnitStruct;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Meters(f64);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Pair(i32, String);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Record {
    id: u64,
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    note: Option<String>,
    values: Vec<Value>,
}

/// A float compared by its bits, and every NaN equal to every other: `f32`'s own `==`
/// says NaN != NaN, so values that both decoders decode alike (a mutated input often
/// holds a NaN) would compare unequal.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(transparent)]
struct Float<F>(F);

impl PartialEq for Float<f32> {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits() || (self.0.is_nan() && other.0.is_nan())
    }
}

impl PartialEq for Float<f64> {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits() || (self.0.is_nan() && other.0.is_nan())
    }
}

#[test]
fn floats_compare_by_bits_and_nan_equals_nan() {
    assert_eq!(Float(f32::NAN), Float(-f32::NAN));
    assert_eq!(Float(f64::NAN), Float(f64::NAN));
    assert_ne!(Float(0.0f64), Float(-0.0f64));
    assert_ne!(Float(1.0f32), Float(f32::NAN));
}

/// A zoo of every serde shape, recursive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Value {
    Empty,
    Bool(bool),
    U8(u8),
    U16(u16),
    U32(u32),
    U64(u64),
    I8(i8),
    I16(i16),
    I32(i32),
    I64(i64),
    I128(i128),
    U128(u128),
    F32(Float<f32>),
    F64(Float<f64>),
    Char(char),
    Str(String),
    Bytes(Bin),
    /// A plain `Vec<u8>`: written as bin (rmp-serde's `BytesMode::ForceIterables`).
    ByteVec(Vec<u8>),
    /// One-byte items that are not `u8`: arrays.
    Flags(Vec<bool>),
    Unit(()),
    UnitStruct(UnitStruct),
    Meters(Meters),
    Pair(Pair),
    Opt(Option<Box<Value>>),
    List(Vec<Value>),
    Tree(BTreeMap<String, Value>),
    Hash(HashMap<i64, Value>),
    Tuple(Box<Value>, i16, Option<u8>),
    Fields {
        name: String,
        inner: Box<Value>,
    },
    Nested(Box<Value>),
    Record(Box<Record>),
    Seq((u8, String, bool)),
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Empty),
        any::<bool>().prop_map(Value::Bool),
        any::<u8>().prop_map(Value::U8),
        any::<u16>().prop_map(Value::U16),
        any::<u32>().prop_map(Value::U32),
        any::<u64>().prop_map(Value::U64),
        any::<i8>().prop_map(Value::I8),
        any::<i16>().prop_map(Value::I16),
        any::<i32>().prop_map(Value::I32),
        any::<i64>().prop_map(Value::I64),
        any::<i128>().prop_map(Value::I128),
        any::<u128>().prop_map(Value::U128),
        any::<f32>().prop_map(|f| Value::F32(Float(f))),
        any::<f64>().prop_map(|f| Value::F64(Float(f))),
        any::<char>().prop_map(Value::Char),
        ".{0,40}".prop_map(Value::Str),
        prop::collection::vec(any::<u8>(), 0..300).prop_map(|b| Value::Bytes(Bin(b))),
        prop::collection::vec(any::<u8>(), 0..300).prop_map(Value::ByteVec),
        prop::collection::vec(any::<bool>(), 0..8).prop_map(Value::Flags),
        Just(Value::Unit(())),
        Just(Value::UnitStruct(UnitStruct)),
        any::<f64>()
            .prop_filter("not NaN", |f| !f.is_nan())
            .prop_map(|f| Value::Meters(Meters(f))),
        (any::<i32>(), ".{0,8}").prop_map(|(i, s)| Value::Pair(Pair(i, s))),
        (any::<u8>(), ".{0,8}", any::<bool>()).prop_map(Value::Seq),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(5, 64, 8, |inner| {
        prop_oneof![
            prop::option::of(inner.clone().prop_map(Box::new)).prop_map(Value::Opt),
            prop::collection::vec(inner.clone(), 0..20).prop_map(Value::List),
            prop::collection::btree_map(".{0,6}", inner.clone(), 0..8).prop_map(Value::Tree),
            prop::collection::hash_map(any::<i64>(), inner.clone(), 0..8).prop_map(Value::Hash),
            (inner.clone(), any::<i16>(), any::<Option<u8>>()).prop_map(|(v, i, o)| Value::Tuple(
                Box::new(v),
                i,
                o
            )),
            (".{0,6}", inner.clone()).prop_map(|(name, v)| Value::Fields {
                name,
                inner: Box::new(v)
            }),
            inner.clone().prop_map(|v| Value::Nested(Box::new(v))),
            (
                any::<u64>(),
                ".{0,6}",
                any::<Option<String>>(),
                prop::collection::vec(inner, 0..4)
            )
                .prop_map(|(id, name, note, values)| Value::Record(Box::new(Record {
                    id,
                    name,
                    note,
                    values
                }))),
        ]
    })
}

/// What rmp-serde writes with structs as maps.
fn rmp_bytes<T: Serialize + ?Sized>(v: &T) -> Vec<u8> {
    let mut w = Vec::new();
    v.serialize(
        &mut rmp_serde::Serializer::new(&mut w)
            .with_struct_map()
            .with_bytes(rmp_serde::config::BytesMode::ForceIterables),
    )
    .expect("rmp-serde encodes the test value");
    w
}

/// How deeply arrays, maps and ext values nest in `bytes` (read as a sequence of values,
/// up to where it stops making sense), without recursion: what decides whether rmp-serde
/// may be asked at all (it overflows the stack on deep enums) and whether our answer may
/// differ (a depth error past `MAX_DEPTH`).
fn nesting(bytes: &[u8]) -> usize {
    let mut pending: Vec<u64> = Vec::new();
    let (mut at, mut deepest) = (0, 0);
    let be = |b: &[u8]| b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x));
    while at < bytes.len() {
        let m = bytes[at];
        at += 1;
        let field = |n: usize, at: usize| bytes.get(at..at + n).map(be).unwrap_or(u64::MAX);
        let (skip, items, ext) = match m {
            0x80..=0x8f => (0, 2 * u64::from(m & 0x0f), false),
            0x90..=0x9f => (0, u64::from(m & 0x0f), false),
            0xa0..=0xbf => (u64::from(m & 0x1f), 0, false),
            0xc4 | 0xd9 => (field(1, at).saturating_add(1), 0, false),
            0xc5 | 0xda => (field(2, at).saturating_add(2), 0, false),
            0xc6 | 0xdb => (field(4, at).saturating_add(4), 0, false),
            0xc7 => (field(1, at).saturating_add(2), 0, true),
            0xc8 => (field(2, at).saturating_add(3), 0, true),
            0xc9 => (field(4, at).saturating_add(5), 0, true),
            0xca | 0xce | 0xd2 => (4, 0, false),
            0xcb | 0xcf | 0xd3 => (8, 0, false),
            0xcc | 0xd0 => (1, 0, false),
            0xcd | 0xd1 => (2, 0, false),
            0xd4..=0xd8 => (1 + (1 << (m - 0xd4)), 0, true),
            0xdc => (2, field(2, at), false),
            0xdd => (4, field(4, at), false),
            0xde => (2, field(2, at).saturating_mul(2), false),
            0xdf => (4, field(4, at).saturating_mul(2), false),
            _ => (0, 0, false),
        };
        at = at.saturating_add(usize::try_from(skip).unwrap_or(usize::MAX));
        let level = pending.len() + usize::from(items > 0 || ext);
        deepest = deepest.max(level);
        // One element of the innermost open container is done (this one).
        if items > 0 {
            pending.push(items);
        } else {
            while let Some(left) = pending.last_mut() {
                *left -= 1;
                if *left > 0 {
                    break;
                }
                pending.pop();
            }
        }
    }
    deepest
}

/// Our decoder and rmp-serde's agree on `bytes` as `T`: both fail, or both return the
/// same value. Only asked of inputs nested no deeper than `MAX_DEPTH`.
fn agree<T: DeserializeOwned + PartialEq + Debug>(bytes: &[u8]) -> Result<(), TestCaseError> {
    let ours = decode::<T>(bytes);
    if nesting(bytes) > usize::from(MAX_DEPTH) {
        return Ok(());
    }
    let theirs = rmp_serde::from_slice::<T>(bytes);
    match (&ours, &theirs) {
        (Ok(a), Ok(b)) => prop_assert_eq!(a, b, "input {:02x?}", bytes),
        (Err(_), Err(_)) => {}
        _ => prop_assert!(
            false,
            "input {:02x?}: ours {:?}, rmp-serde's {:?}",
            bytes,
            ours,
            theirs
        ),
    }
    Ok(())
}

/// Every type the byte properties decode as.
fn agree_all(bytes: &[u8]) -> Result<(), TestCaseError> {
    agree::<Value>(bytes)?;
    agree::<Vec<Value>>(bytes)?;
    agree::<Record>(bytes)?;
    agree::<(u64, String, Bin)>(bytes)?;
    agree::<Option<Vec<Option<(String, i64)>>>>(bytes)?;
    agree::<HashMap<String, u32>>(bytes)?;
    agree::<BTreeMap<i8, Vec<u8>>>(bytes)?;
    agree::<i128>(bytes)?;
    agree::<String>(bytes)?;
    // `IgnoredAny` has no `PartialEq`: compare the outcome only.
    let ours = decode::<IgnoredAny>(bytes).is_ok();
    if nesting(bytes) <= usize::from(MAX_DEPTH) {
        prop_assert_eq!(ours, rmp_serde::from_slice::<IgnoredAny>(bytes).is_ok());
    }
    Ok(())
}

proptest! {
    #[test]
    fn values_encode_as_rmp_serde_and_decode_back(v in value()) {
        let expected = rmp_bytes(&v);
        let mut ours = vec![0xee];
        encode(&mut ours, &v).expect("encodes");
        prop_assert_eq!(&ours[1..], &expected[..]);
        prop_assert_eq!(decode::<Value>(&expected).expect("decodes"), v.clone());
        // rmp-serde's default form, structs as arrays, decodes as rmp-serde decodes it (not
        // always: a skipped field shifts the ones after it).
        let arrays = rmp_serde::to_vec(&v).expect("rmp-serde encodes");
        agree::<Value>(&arrays)?;
        agree_all(&expected)?;
    }

    #[test]
    fn random_bytes_decode_as_rmp_serde_decodes_them(
        bytes in prop::collection::vec(any::<u8>(), 0..64)
    ) {
        agree_all(&bytes)?;
    }

    #[test]
    fn mutated_encodings_decode_as_rmp_serde_decodes_them(
        v in value(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..4u8), 1..4),
    ) {
        let mut bytes = rmp_bytes(&v);
        for (at, byte, kind) in edits {
            if bytes.is_empty() {
                break;
            }
            let at = at.index(bytes.len());
            match kind {
                0 => bytes[at] = byte,
                1 => bytes.truncate(at),
                2 => bytes.insert(at, byte),
                _ => {
                    bytes.remove(at);
                }
            }
        }
        agree_all(&bytes)?;
    }

    #[test]
    fn bogus_lengths_are_errors(marker in prop::sample::select(
        vec![0xc4u8, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xd9, 0xda, 0xdb, 0xdc, 0xdd, 0xde, 0xdf]
    ), len in any::<u32>(), tail in prop::collection::vec(any::<u8>(), 0..16)) {
        let mut bytes = vec![marker];
        let width = match marker {
            0xc4 | 0xc7 | 0xd9 => 1,
            0xc5 | 0xc8 | 0xda | 0xdc | 0xde => 2,
            _ => 4,
        };
        bytes.extend_from_slice(&len.to_be_bytes()[4 - width..]);
        bytes.extend_from_slice(&tail);
        let claimed = u64::from(len) & (u64::MAX >> (64 - 8 * width));
        let ours = decode::<IgnoredAny>(&bytes);
        if claimed > tail.len() as u64 {
            prop_assert!(ours.is_err(), "{:02x?}", bytes);
        }
        agree_all(&bytes)?;
    }
}

/// Runs `f` on a thread with the default 2 MiB stack of spawned threads, which a decoder
/// recursing once per level would overflow long before 200,000 levels.
fn on_normal_stack(f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(f)
        .expect("spawns")
        .join()
        .expect("does not panic");
}

/// A recursive type read from arrays.
#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct DeepArray(Vec<DeepArray>);

/// A recursive type read from maps.
#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct DeepMap(BTreeMap<String, DeepMap>);

/// Asserts that `bytes` is refused with a depth or length error as `T`.
fn refused<T: DeserializeOwned + Debug>(bytes: &[u8], what: &str) {
    match decode::<T>(bytes) {
        Err(DecodeError::DepthLimitExceeded | DecodeError::LengthExceedsInput { .. }) => {}
        other => panic!("{what} as {}: {other:?}", std::any::type_name::<T>()),
    }
}

#[test]
fn deep_nesting_is_a_depth_or_length_error_not_a_stack_overflow() {
    on_normal_stack(|| {
        let bin = [0xc4, 0x01, 0x00];
        let huge = [0xdd, 0xff, 0xff, 0xff, 0xff];
        for depth in [600, 200_000] {
            for (kind, level) in [
                ("arrays", &[0x91][..]),
                ("maps", &[0x81, 0xa1, b'k'][..]),
                (
                    "enums",
                    &[0x81, 0xa6, b'N', b'e', b's', b't', b'e', b'd'][..],
                ),
            ] {
                let nested = level.repeat(depth);
                for (end, tail) in [("a bin", &bin[..]), ("a huge array", &huge[..])] {
                    let what = format!("{kind} {depth} deep, then {end}");
                    let bytes = [&nested[..], tail].concat();
                    refused::<IgnoredAny>(&bytes, &what);
                    // The recursive types whose form the levels have.
                    match kind {
                        "arrays" => refused::<DeepArray>(&bytes, &what),
                        "maps" => refused::<DeepMap>(&bytes, &what),
                        _ => {
                            refused::<Value>(&bytes, &what);
                            refused::<DeepMap>(&bytes, &what);
                        }
                    }
                    // A huge array first: refused before anything nested is read.
                    let what = format!("a huge array, then {what}");
                    let bytes = [&huge[..], &nested[..], tail].concat();
                    refused::<IgnoredAny>(&bytes, &what);
                    refused::<Vec<Value>>(&bytes, &what);
                }
            }
        }
        // Just within the limit, a recursive enum decodes.
        let mut bytes = [0x81, 0xa6, b'N', b'e', b's', b't', b'e', b'd'].repeat(500);
        bytes.extend_from_slice(&rmp_bytes(&Value::Empty));
        assert!(decode::<Value>(&bytes).is_ok());
    });
}

#[test]
fn the_nesting_oracle_measures_depth() {
    assert_eq!(nesting(&[0xc0]), 0);
    assert_eq!(nesting(&[0x91, 0x91, 0xc0]), 2);
    assert_eq!(nesting(&[0x92, 0x91, 0xc0, 0x91, 0xc0]), 2);
    assert_eq!(nesting(&[0x92, 0xc0, 0x91, 0x91, 0xc0]), 3);
    assert_eq!(nesting(&[0x81, 0xc0, 0x81, 0xc0, 0xc0]), 2);
    assert_eq!(nesting(&[0x91, 0xd4, 0x01, 0x02]), 2);
    assert_eq!(nesting(&[0x91; 600]), 600);
}
