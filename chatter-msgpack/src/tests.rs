//! The codec against rmp-serde, value by value and on broken inputs.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use serde::de::IgnoredAny;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use serde::de::{self, DeserializeOwned, Visitor};
use serde::ser;
use std::fmt;

use crate::{decode, encode, DecodeError};

/// What rmp-serde writes, as the wire did before this crate.
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

/// What rmp-serde decodes, with errors as strings.
fn rmp_value<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    rmp_serde::from_slice(bytes).map_err(|e| e.to_string())
}

/// The decoders agree on `bytes`: both fail, or both return the same value. Returns
/// whether they decoded it.
fn agree<T: DeserializeOwned + PartialEq + Debug>(bytes: &[u8]) -> bool {
    let expected = rmp_value::<T>(bytes);
    let ours = decode::<T>(bytes);
    match (&ours, &expected) {
        (Ok(ours), Ok(theirs)) => assert_eq!(ours, theirs, "input {bytes:02x?}"),
        (Err(_), Err(_)) => {}
        _ => panic!("input {bytes:02x?}: ours {ours:?}, rmp-serde's {expected:?}"),
    }
    expected.is_ok()
}

/// Checks one value: the encoder writes rmp-serde's bytes, and decoding those bytes (and
/// rmp-serde's array form of structs) round-trips and agrees with rmp-serde.
fn check<T>(v: T)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let expected = rmp_bytes(&v);
    let mut w = vec![0xee];
    encode(&mut w, &v).expect("encodes");
    assert_eq!(w[1..], expected[..], "encoding of {v:?}");
    assert_eq!(decode::<T>(&expected).as_ref().ok(), Some(&v), "round trip");
    assert!(agree::<T>(&expected), "decoding of {v:?}");
    let arrays = rmp_serde::to_vec(&v).expect("rmp-serde encodes");
    agree::<T>(&arrays);
}

/// Bytes serialized as a MessagePack bin, like `serde_bytes::ByteBuf`.
#[derive(Debug, PartialEq)]
struct Bin(Vec<u8>);

impl Serialize for Bin {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Bin {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// Accepts bytes only.
        struct BinVisitor;
        impl<'de> Visitor<'de> for BinVisitor {
            type Value = Bin;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Bin, E> {
                Ok(Bin(v.to_vec()))
            }
        }
        d.deserialize_byte_buf(BinVisitor)
    }
}

/// A unit struct.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Unit;

/// A tuple struct.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Pair(i32, String);

/// A newtype struct.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Meters(f64);

/// A struct with fields skipped when empty.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
struct Record {
    id: u64,
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    note: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    tags: Vec<String>,
    score: f32,
}

/// An enum with every kind of variant.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Shape {
    Empty,
    Circle(f64),
    Rect(u32, u32),
    Named { name: String, sides: Option<u8> },
    Nested(Box<Shape>),
}

#[test]
fn integers_at_boundaries_match_rmp_serde() {
    let signed: [i64; 17] = [
        0,
        1,
        127,
        128,
        255,
        256,
        65535,
        65536,
        -1,
        -32,
        -33,
        -128,
        -129,
        -32768,
        -32769,
        i64::from(i32::MIN),
        i64::MIN,
    ];
    for v in signed {
        check(v);
        if let Ok(v) = i32::try_from(v) {
            check(v);
        }
        if let Ok(v) = i16::try_from(v) {
            check(v);
        }
        if let Ok(v) = i8::try_from(v) {
            check(v);
        }
    }
    let unsigned = [0, 127, 128, 255, 256, 65535, 65536, u64::from(u32::MAX)];
    for v in unsigned
        .into_iter()
        .chain([u64::from(u32::MAX) + 1, u64::MAX])
    {
        check(v);
        check(v as i64);
        if let Ok(v) = u32::try_from(v) {
            check(v);
        }
        if let Ok(v) = u16::try_from(v) {
            check(v);
        }
        if let Ok(v) = u8::try_from(v) {
            check(v);
        }
    }
    check(i32::MAX);
    check(i64::MAX);
    for v in [0, 1, -1, i128::MIN, i128::MAX] {
        check(v);
    }
    for v in [0, 1, u128::MAX] {
        check(v);
    }
    // rmp-serde reads any integer as a 128-bit one, and reinterprets negative ones.
    assert!(agree::<i128>(&[0xd0, 0x85]));
    assert!(agree::<u128>(&[0xff]));
    assert!(agree::<u128>(&[
        0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff
    ]));
    assert!(!agree::<i128>(&[0xc4, 0x03, 1, 2, 3]));
    assert!(!agree::<i128>(&[0x91, 0x01]));
}

#[test]
fn scalars_match_rmp_serde() {
    for v in [
        0.0f64,
        -0.0,
        1.5,
        f64::MAX,
        f64::MIN_POSITIVE,
        f64::INFINITY,
    ] {
        check(v);
        check(v as f32);
    }
    let mut nan = Vec::new();
    encode(&mut nan, &f64::NAN).expect("encodes");
    assert_eq!(nan, rmp_bytes(&f64::NAN));
    check(true);
    check(false);
    for c in ['a', '\0', 'é', '€', '😀'] {
        check(c);
    }
    check(());
    check(Unit);
    check(Meters(2.5));
    check(Duration::new(3, 500));
    check(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
    check(IpAddr::V6(Ipv6Addr::LOCALHOST));
    check(SocketAddr::from(([127, 0, 0, 1], 8080)));
}

#[test]
fn strings_and_bytes_of_every_length_form_match_rmp_serde() {
    for len in [0, 1, 31, 32, 255, 256, 65535, 65536, 70000] {
        check("x".repeat(len));
        check(Bin(vec![7; len]));
    }
    check(Bin((0..=255).collect()));
    check(vec![1u8, 2, 200]);
}

#[test]
fn containers_match_rmp_serde() {
    for len in [0, 1, 15, 16, 65535, 65536] {
        check((0..len).map(|i| i as u32).collect::<Vec<_>>());
        check(
            (0..len)
                .map(|i| (i as u32, i % 3 == 0))
                .collect::<BTreeMap<_, _>>(),
        );
    }
    let mut map = HashMap::new();
    map.insert("one".to_owned(), vec![Some(1i64), None]);
    map.insert("two".to_owned(), vec![Some(-70000)]);
    check(map);
    check(Some(5u8));
    check(None::<String>);
    check((1i32, 2i32));
    check((7u8, "seven".to_owned(), true, ()));
    check(Pair(-3, "p".into()));
    check([1u16, 2, 3]);
}

#[test]
fn structs_and_enums_match_rmp_serde() {
    check(Record::default());
    check(Record {
        id: 1 << 40,
        name: "name".into(),
        note: Some("a note".into()),
        tags: vec!["x".into(), "y".into()],
        score: -1.25,
    });
    check(Shape::Empty);
    check(Shape::Circle(1.0));
    check(Shape::Rect(3, 400));
    check(Shape::Named {
        name: "tri".into(),
        sides: Some(3),
    });
    check(Shape::Nested(Box::new(Shape::Nested(Box::new(
        Shape::Empty,
    )))));
    check(vec![Shape::Empty, Shape::Rect(1, 2)]);
    let mut nested = BTreeMap::new();
    nested.insert(
        "records".to_owned(),
        (vec![Record::default()], Some(Shape::Circle(0.5))),
    );
    check(nested);
    check(Ok::<u8, String>(1));
    check(Err::<u8, String>("bad".into()));
}

#[test]
fn enums_in_every_form_rmp_serde_accepts() {
    // A unit variant by index, by name, and as a one-entry map with a nil.
    agree::<Shape>(&[0x00]);
    agree::<Shape>(&rmp_bytes("Empty"));
    assert!(agree::<Shape>(&[
        0x81, 0xa5, b'E', b'm', b'p', b't', b'y', 0xc0
    ]));
    // Variants by index, and maps of the wrong size.
    assert!(agree::<Shape>(&[0x81, 0x01, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0]));
    agree::<Shape>(&[0x82, 0x01, 0xc0, 0x00, 0xc0]);
    agree::<Shape>(&[0x80]);
    agree::<Shape>(&[0x91, 0x00]);
    agree::<Shape>(&[0xc0]);
    agree::<Shape>(&[0xa5, b'C', b'i', b'r', b'c', b'l']);
    // A newtype variant named without content, a struct variant as an array.
    agree::<Shape>(&rmp_bytes("Circle"));
    assert!(agree::<Shape>(&[0x81, 0x03, 0x92, 0xa1, b'a', 0xc0]));
}

/// A type whose `Serialize` impl fails.
struct Failing;

impl Serialize for Failing {
    fn serialize<S: Serializer>(&self, _s: S) -> Result<S::Ok, S::Error> {
        Err(ser::Error::custom("refused"))
    }
}

/// A msgpack ext value in rmp-serde's `_ExtStruct` convention.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename = "_ExtStruct")]
struct Ext((i8, Bin));

/// A sequence of unknown length.
struct Evens(u32);

impl Serialize for Evens {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq((0..self.0).filter(|i| i % 2 == 0))
    }
}

#[test]
fn unusual_values_match_rmp_serde() {
    let mut w = vec![1, 2, 3];
    let err = encode(&mut w, &(1u8, Failing)).expect_err("the impl fails");
    assert_eq!(err.to_string(), "refused");
    assert_eq!(w[..3], [1, 2, 3]);

    let ext = Ext((5, Bin(vec![1, 2, 3, 4])));
    let mut w = vec![9];
    encode(&mut w, &ext).expect("rmp-serde encodes ext values");
    assert_eq!(w[1..], rmp_bytes(&ext)[..]);
    assert_eq!(w[1..], [0xd6, 5, 1, 2, 3, 4]);
    assert!(agree::<Ext>(&w[1..]));
    assert_eq!(decode::<Ext>(&w[1..]).ok(), Some(ext));

    let mut w = Vec::new();
    encode(&mut w, &Evens(9)).expect("encodes");
    assert_eq!(w, rmp_bytes(&Evens(9)));
    assert_eq!(decode::<Vec<u32>>(&w).ok(), Some(vec![0, 2, 4, 6, 8]));
    let mut w = Vec::new();
    encode(&mut w, &format_args!("{}-{}", 1, "x")).expect("encodes");
    assert_eq!(w, rmp_bytes("1-x"));
}

#[test]
fn mismatches_give_rmp_serde_errors() {
    let s = rmp_bytes("x");
    assert!(!agree::<i32>(&s));
    assert!(!agree::<u8>(&rmp_bytes(&300i64)));
    assert!(!agree::<u8>(&rmp_bytes(&i64::MAX)));
    assert!(!agree::<u32>(&rmp_bytes(&-1i64)));
    assert!(!agree::<i32>(&rmp_bytes(&1.5f64)));
    assert!(!agree::<bool>(&rmp_bytes(&1u8)));
    assert!(!agree::<u8>(&rmp_bytes(&true)));
    assert!(!agree::<String>(&rmp_bytes(&5u8)));
    assert!(!agree::<Bin>(&s));
    assert!(!agree::<(i32, i32)>(&rmp_bytes(&(1, 2, 3))));
    assert!(!agree::<(i32, i32, i32)>(&rmp_bytes(&(1, 2))));
    // A byte string where a sequence is expected is a sequence of its bytes.
    assert!(agree::<Vec<u8>>(&rmp_bytes(&Bin(vec![1, 2]))));
    assert!(agree::<(u8, u16)>(&rmp_bytes(&Bin(vec![1, 2, 3]))));
    assert!(!agree::<Vec<String>>(&rmp_bytes(&Bin(vec![1, 2]))));
    assert!(!agree::<Record>(&rmp_bytes(&5u8)));
    assert!(!agree::<char>(&rmp_bytes("ab")));
    assert!(!agree::<String>(&[0xa2, 0xff, 0xfe]));
    // Forms rmp-serde accepts though they are not what is expected.
    assert!(agree::<String>(&rmp_bytes(&Bin(b"text".to_vec()))));
    assert!(agree::<f64>(&rmp_bytes(&3u8)));
    assert!(agree::<i64>(&rmp_bytes(&3.0f32)) || rmp_value::<i64>(&rmp_bytes(&3.0f32)).is_err());
    assert!(agree::<Option<u8>>(&[0x05]));
    assert!(agree::<()>(&[0xc0]));
    assert!(agree::<Unit>(&[0x90]));
    // Trailing bytes are ignored, as rmp-serde ignores them.
    assert!(agree::<u8>(&[0x05, 0xff, 0xff]));
}

/// Describes every visitor call it receives, accepting them all, so that a decoder
/// calling the visitor differently from rmp-serde shows.
struct Describe;

impl<'de> Visitor<'de> for Describe {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("anything")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
        Ok(format!("bool {v}"))
    }
    fn visit_i8<E: de::Error>(self, v: i8) -> Result<String, E> {
        Ok(format!("i8 {v}"))
    }
    fn visit_i16<E: de::Error>(self, v: i16) -> Result<String, E> {
        Ok(format!("i16 {v}"))
    }
    fn visit_i32<E: de::Error>(self, v: i32) -> Result<String, E> {
        Ok(format!("i32 {v}"))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
        Ok(format!("i64 {v}"))
    }
    fn visit_u8<E: de::Error>(self, v: u8) -> Result<String, E> {
        Ok(format!("u8 {v}"))
    }
    fn visit_u16<E: de::Error>(self, v: u16) -> Result<String, E> {
        Ok(format!("u16 {v}"))
    }
    fn visit_u32<E: de::Error>(self, v: u32) -> Result<String, E> {
        Ok(format!("u32 {v}"))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
        Ok(format!("u64 {v}"))
    }
    fn visit_f32<E: de::Error>(self, v: f32) -> Result<String, E> {
        Ok(format!("f32 {:x}", v.to_bits()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
        Ok(format!("f64 {:x}", v.to_bits()))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(format!("str {v}"))
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<String, E> {
        Ok(format!("borrowed str {v}"))
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<String, E> {
        Ok(format!("bytes {v:?}"))
    }
    fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<String, E> {
        Ok(format!("borrowed bytes {v:?}"))
    }
    fn visit_none<E: de::Error>(self) -> Result<String, E> {
        Ok("none".into())
    }
    fn visit_unit<E: de::Error>(self) -> Result<String, E> {
        Ok("unit".into())
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        Ok(format!("some {}", d.deserialize_any(Describe)?))
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        Ok(format!("newtype {}", d.deserialize_any(Describe)?))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<String, A::Error> {
        let mut out = format!("seq {:?} [", seq.size_hint());
        while let Some(Probe::<0>(e)) = seq.next_element()? {
            out += &e;
            out += ", ";
        }
        Ok(out + "]")
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<String, A::Error> {
        let mut out = format!("map {:?} {{", map.size_hint());
        while let Some((Probe::<0>(k), Probe::<0>(v))) = map.next_entry()? {
            out += &format!("{k}: {v}, ");
        }
        Ok(out + "}")
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<String, A::Error> {
        let (Probe::<0>(variant), access) = data.variant()?;
        let Probe::<0>(content) = de::VariantAccess::newtype_variant(access)?;
        Ok(format!("enum {variant}: {content}"))
    }
}

/// What `Describe` saw when deserialized through the entry point numbered `K`.
#[derive(Debug, PartialEq)]
struct Probe<const K: u8>(String);

impl<'de, const K: u8> Deserialize<'de> for Probe<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Describe;
        match K {
            0 => d.deserialize_any(v),
            1 => d.deserialize_bool(v),
            2 => d.deserialize_u64(v),
            3 => d.deserialize_i8(v),
            4 => d.deserialize_f32(v),
            5 => d.deserialize_str(v),
            6 => d.deserialize_bytes(v),
            7 => d.deserialize_seq(v),
            8 => d.deserialize_tuple(2, v),
            9 => d.deserialize_map(v),
            10 => d.deserialize_struct("S", &["a", "b"], v),
            11 => d.deserialize_option(v),
            12 => d.deserialize_unit(v),
            13 => d.deserialize_unit_struct("U", v),
            14 => d.deserialize_newtype_struct("N", v),
            15 => d.deserialize_enum("E", &["A", "B"], v),
            16 => d.deserialize_identifier(v),
            17 => d.deserialize_ignored_any(v),
            18 => d.deserialize_char(v),
            19 => d.deserialize_tuple_struct("T", 2, v),
            20 => d.deserialize_byte_buf(v),
            _ => d.deserialize_string(v),
        }
        .map(Probe)
    }
}

/// Decodes `bytes` through every entry point, checking agreement with rmp-serde.
fn agree_probes(bytes: &[u8]) {
    agree::<Probe<0>>(bytes);
    agree::<Probe<1>>(bytes);
    agree::<Probe<2>>(bytes);
    agree::<Probe<3>>(bytes);
    agree::<Probe<4>>(bytes);
    agree::<Probe<5>>(bytes);
    agree::<Probe<6>>(bytes);
    agree::<Probe<7>>(bytes);
    agree::<Probe<8>>(bytes);
    agree::<Probe<9>>(bytes);
    agree::<Probe<10>>(bytes);
    agree::<Probe<11>>(bytes);
    agree::<Probe<12>>(bytes);
    agree::<Probe<13>>(bytes);
    agree::<Probe<14>>(bytes);
    agree::<Probe<15>>(bytes);
    agree::<Probe<16>>(bytes);
    agree::<Probe<17>>(bytes);
    agree::<Probe<18>>(bytes);
    agree::<Probe<19>>(bytes);
    agree::<Probe<20>>(bytes);
    agree::<Probe<21>>(bytes);
}

#[test]
fn every_entry_point_visits_as_rmp_serde() {
    let mut values = vec![
        rmp_bytes("5"),
        rmp_bytes(&Bin(vec![1, 2])),
        rmp_bytes(&(
            1u8,
            -1i8,
            300u16,
            -300i16,
            70000u32,
            -70000i32,
            u64::MAX,
            i64::MIN,
        )),
        rmp_bytes(&(0.5f32, 0.25f64, true, (), None::<u8>)),
        rmp_bytes(&Shape::Rect(1, 2)),
        rmp_bytes(&Record::default()),
        rmp_bytes(&Shape::Empty),
        vec![0x90],
        vec![0x80],
        vec![0x92, 0xc4, 0x01, 0x07, 0xa1, b'z'],
        vec![0xd6, 0x05, 1, 2, 3, 4],
        vec![0xa2, 0xff, 0xfe],
        vec![0x81, 0x00, 0x81, 0x01, 0xc0],
    ];
    values.extend((0..=255u8).map(|b| vec![b, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08]));
    for bytes in values {
        agree_probes(&bytes);
    }
    // rmp-serde reads numbers only through the number entry points, and a bin as a
    // sequence through the sequence ones.
    assert!(!agree::<Probe<2>>(&rmp_bytes("5")));
    assert!(agree::<Probe<7>>(&rmp_bytes(&Bin(vec![1, 2]))));
    assert!(agree::<Probe<6>>(&rmp_bytes(&Bin(vec![1, 2]))));
}

/// Encodings whose every prefix and mutation are decoded as several types.
fn samples() -> Vec<Vec<u8>> {
    vec![
        rmp_bytes(&Record {
            id: 70000,
            name: "r".repeat(40),
            note: Some("n".into()),
            tags: vec!["t".into()],
            score: 0.5,
        }),
        rmp_bytes(&vec![
            Shape::Circle(1.0),
            Shape::Named {
                name: "n".into(),
                sides: None,
            },
        ]),
        rmp_bytes(&(u64::MAX, -70000i64, "é".repeat(20), Bin(vec![1; 300]))),
        rmp_serde::to_vec(&Record::default()).expect("encodes"),
    ]
}

/// Decodes `bytes` as several types, checking agreement with rmp-serde.
fn agree_all(bytes: &[u8]) {
    agree::<IgnoredAny>(bytes);
    agree::<Record>(bytes);
    agree::<Vec<Shape>>(bytes);
    agree::<(u64, i64, String, Bin)>(bytes);
    agree::<Option<Vec<Option<(String, i64)>>>>(bytes);
    agree::<HashMap<String, u32>>(bytes);
    agree::<Shape>(bytes);
    agree_probes(bytes);
}

#[test]
fn truncated_inputs_agree_with_rmp_serde() {
    for sample in samples() {
        for end in 0..sample.len() {
            agree_all(&sample[..end]);
        }
    }
}

#[test]
fn garbage_agrees_with_rmp_serde() {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..3000 {
        let len = (next() % 48) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        agree_all(&bytes);
    }
    for sample in samples() {
        for _ in 0..300 {
            let mut bytes = sample.clone();
            let at = (next() as usize) % bytes.len();
            bytes[at] = next() as u8;
            agree_all(&bytes);
        }
    }
}

#[test]
fn deep_nesting_is_refused() {
    for depth in [10, 500, 513, 600, 1100, 10_000] {
        for marker in [0x91, 0x81] {
            let mut bytes = vec![marker; depth];
            bytes.push(0xc0);
            if depth <= 500 {
                assert_eq!(agree::<IgnoredAny>(&bytes), marker == 0x91);
            } else {
                let error = decode::<IgnoredAny>(&bytes).unwrap_err();
                assert!(
                    matches!(error, DecodeError::DepthLimitExceeded),
                    "{depth}: {error}"
                );
            }
        }
    }
}

#[test]
fn a_recursive_enum_nested_without_end_is_an_error_not_a_stack_overflow() {
    let mut nested = vec![0x81, 0xa6];
    nested.extend_from_slice(b"Nested");
    let mut bytes = nested.repeat(300);
    bytes.extend_from_slice(&rmp_bytes("Empty"));
    assert!(agree::<Shape>(&bytes));
    // rmp-serde does not count enum levels: this input overflowed the stack through it.
    let mut bytes = nested.repeat(200_000);
    bytes.extend_from_slice(&rmp_bytes("Empty"));
    let error = decode::<Shape>(&bytes).unwrap_err();
    assert!(matches!(error, DecodeError::DepthLimitExceeded), "{error}");
}

/// Reads a `u8` and drops the error if there is none, as `#[serde(default)]`-style impls
/// that swallow errors do: the error raised stays recorded but must not be reported.
#[derive(Debug, PartialEq)]
struct Lenient(Option<u8>);

impl<'de> Deserialize<'de> for Lenient {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Lenient(u8::deserialize(d).ok()))
    }
}

/// Raises a custom error, swallows it and reads a `u8`.
#[derive(Debug, PartialEq)]
struct RaisesThenReads(u8);

impl<'de> Deserialize<'de> for RaisesThenReads {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        drop(<D::Error as de::Error>::custom("swallowed"));
        u8::deserialize(d).map(RaisesThenReads)
    }
}

#[test]
fn the_error_returned_is_the_last_one_raised() {
    // A `Deserialize` impl's message, built once at the top.
    let e = decode::<Record>(&rmp_bytes(&BTreeMap::from([("id", 1u64)]))).unwrap_err();
    assert!(matches!(e, DecodeError::Custom(_)), "{e:?}");
    assert_eq!(
        Some(e.to_string()),
        rmp_value::<Record>(&rmp_bytes(&BTreeMap::from([("id", 1u64)]))).err()
    );
    // An error swallowed by an impl: the value decodes, and the next error is its own.
    assert_eq!(decode::<Lenient>(&rmp_bytes("x")), Ok(Lenient(None)));
    assert_eq!(decode::<u8>(&[]), Err(DecodeError::UnexpectedEnd));
    assert_eq!(
        decode::<(Lenient, u8)>(&[0x92, 0xc1, 0xcd, 0x01]),
        Err(DecodeError::UnexpectedEnd)
    );
    // A custom error swallowed, then the decoder's own error propagated.
    assert_eq!(
        decode::<RaisesThenReads>(&rmp_bytes("x")),
        Err(DecodeError::mismatch("nil, a boolean or a number", 0xa1))
    );
    assert_eq!(decode::<RaisesThenReads>(&[0x07]), Ok(RaisesThenReads(7)));
    // The decoder's error swallowed, then a custom one propagated.
    let e = decode::<(Lenient, Record)>(&[0x92, 0xc1, 0x80]).unwrap_err();
    assert_eq!(e, DecodeError::Custom("missing field `id`".into()));
    // And errors on other threads are their own.
    let e = std::thread::spawn(|| decode::<u8>(&[0xcd, 0x01]))
        .join()
        .unwrap();
    assert_eq!(e, Err(DecodeError::UnexpectedEnd));
}

/// `Vec<u8>` and other sequences of bytes are `bin`, as rmp-serde writes them with
/// `BytesMode::ForceIterables`; sequences of other one-byte items, fixed-size arrays and
/// collections that are not slices stay arrays.
#[test]
fn sequences_of_bytes_are_bin() {
    check(vec![1u8, 2, 255]);
    assert_eq!(rmp_bytes(&vec![1u8, 2, 255]), [0xc4, 3, 1, 2, 0xff]);
    check(vec![7u8; 300]);
    assert_eq!(rmp_bytes(&vec![7u8; 300])[..3], [0xc5, 0x01, 0x2c]);
    check(Vec::<u8>::new());
    assert_eq!(rmp_bytes(&Vec::<u8>::new()), [0x90]);
    let mut w = Vec::new();
    encode(&mut w, &[1u8, 2][..]).expect("a slice encodes");
    assert_eq!(w, [0xc4, 2, 1, 2]);
    w.clear();
    encode(&mut w, &Box::<[u8]>::from([3u8])).expect("a boxed slice encodes");
    assert_eq!(w, [0xc4, 1, 3]);
    check(vec![true, false]);
    assert_eq!(rmp_bytes(&vec![true, false]), [0x92, 0xc3, 0xc2]);
    check(vec![-1i8, 2]);
    check([1u8, 2, 3]);
    assert_eq!(rmp_bytes(&[1u8, 2, 3]), [0x93, 1, 2, 3]);
    check(std::collections::VecDeque::from(vec![1u8, 2]));
    check(vec![vec![1u8], vec![]]);
}

/// A one-byte type whose items do not all serialize as `u8` is written element by
/// element, the bytes before it rewritten as integers.
#[test]
fn a_sequence_that_stops_being_bytes_is_an_array() {
    #[derive(Clone, Copy)]
    struct Odd(u8);
    impl Serialize for Odd {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            if self.0 % 2 == 0 {
                s.serialize_u8(self.0)
            } else {
                s.serialize_str("odd")
            }
        }
    }
    let mut w = Vec::new();
    encode(&mut w, &vec![Odd(2), Odd(200), Odd(3), Odd(4)]).expect("encodes");
    assert_eq!(
        w,
        [0x94, 0x02, 0xcc, 0xc8, 0xa3, b'o', b'd', b'd', 0x04],
        "{w:02x?}"
    );
}
