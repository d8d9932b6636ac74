//! A fast serde MessagePack codec, a drop-in replacement for rmp-serde.
//!
//! [`Connection::send`](crate::Connection::send) and [`Msg::decode`](crate::Msg::decode)
//! encode with it, and chatter-rpc uses it for every argument, result and signal.
//!
//! rmp-serde spends about a hundred instructions per integer in its generic writer, reader
//! and error machinery. This module serializes straight into a `Vec<u8>` and deserializes
//! straight from a `&[u8]`, producing and accepting exactly what rmp-serde 1.3 does with
//! `Serializer::new(w).with_struct_map()` and `from_slice`, with one difference:
//! [`decode`] refuses values nested deeper than [`MAX_DEPTH`] levels, where rmp-serde does
//! not count the levels of enums and so could be made to overflow the stack.
//!
//! Correctness rests on one rule: whenever the fast path is not sure (an unusual form, a
//! special serde name, any error, whether raised here or by a user's `Serialize` or
//! `Deserialize` impl), it gives up and the value is encoded or decoded again by rmp-serde,
//! whose answer (value or error) is authoritative. So the fast encoder returns `Ok` only
//! with the bytes rmp-serde would write, and the fast decoder returns `Ok` only with the
//! value rmp-serde would return.
//!
//! ```
//! let mut buf = Vec::new();
//! chatter_core::codec::encode(&mut buf, &("add", [1, 2]))?;
//! assert_eq!(buf, rmp_serde::to_vec(&("add", [1, 2]))?);
//! let back: (String, Vec<i32>) = chatter_core::codec::decode(&buf)?;
//! assert_eq!(back, ("add".to_string(), vec![1, 2]));
//!
//! // A peer cannot make the decoder recurse without end.
//! let bomb = [[0x91u8; 600].as_slice(), &[0xc0]].concat();
//! let refused = chatter_core::codec::decode::<serde::de::IgnoredAny>(&bomb);
//! assert!(matches!(refused, Err(rmp_serde::decode::Error::DepthLimitExceeded)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;

use serde::de::{self, DeserializeOwned, DeserializeSeed, Visitor};
use serde::ser::{self, Serialize};

/// The name rmp-serde gives newtype structs that stand for MessagePack ext values.
const EXT_STRUCT_NAME: &str = "_ExtStruct";

/// How deep arrays, maps and enums may nest in a value [`decode`] accepts. Deeper values
/// are refused with [`DepthLimitExceeded`](rmp_serde::decode::Error::DepthLimitExceeded),
/// not left to rmp-serde: it allows 1023 levels of arrays and maps but does not count the
/// levels of `{variant: content}` enums, so with a recursive enum type (`Neg(Box<Expr>)`) a
/// peer could make it recurse until the stack overflowed, which aborts the process.
pub const MAX_DEPTH: u16 = 512;

/// Encodes `v` as rmp-serde does with structs as maps
/// (`Serializer::new(w).with_struct_map()`), appending to `w`. On error `w` is left as it
/// was.
pub fn encode<T: Serialize + ?Sized>(
    w: &mut Vec<u8>,
    v: &T,
) -> Result<(), rmp_serde::encode::Error> {
    let start = w.len();
    let mut enc = Encoder {
        w: &mut *w,
        failed: false,
    };
    if v.serialize(&mut enc).is_ok() && !enc.failed {
        return Ok(());
    }
    w.truncate(start);
    encode_slow(w, v)
}

/// Encodes `v` with rmp-serde, the authority when the fast path gives up.
#[cold]
#[inline(never)]
fn encode_slow<T: Serialize + ?Sized>(
    w: &mut Vec<u8>,
    v: &T,
) -> Result<(), rmp_serde::encode::Error> {
    let start = w.len();
    let result = v.serialize(&mut rmp_serde::Serializer::new(&mut *w).with_struct_map());
    if result.is_err() {
        w.truncate(start);
    }
    result
}

/// Decodes a value as `rmp_serde::from_slice` does (trailing bytes are ignored), except
/// that values nested deeper than [`MAX_DEPTH`] levels are refused.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, rmp_serde::decode::Error> {
    let mut de = Decoder {
        input: bytes,
        depth: MAX_DEPTH,
        failed: false,
        too_deep: false,
    };
    match T::deserialize(&mut de) {
        Ok(v) if !de.failed => Ok(v),
        _ if de.too_deep => Err(rmp_serde::decode::Error::DepthLimitExceeded),
        _ => decode_slow(bytes),
    }
}

/// Decodes with rmp-serde, the authority when the fast path gives up.
#[cold]
#[inline(never)]
fn decode_slow<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, rmp_serde::decode::Error> {
    rmp_serde::from_slice(bytes)
}

/// The fast path gave up: the caller redoes the work with rmp-serde. Carries no message, so
/// giving up allocates nothing.
#[derive(Debug)]
struct GiveUp;

impl fmt::Display for GiveUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not handled by the fast MessagePack path")
    }
}

impl std::error::Error for GiveUp {}

impl ser::Error for GiveUp {
    #[cold]
    fn custom<T: fmt::Display>(_msg: T) -> Self {
        GiveUp
    }
}

impl de::Error for GiveUp {
    #[cold]
    fn custom<T: fmt::Display>(_msg: T) -> Self {
        GiveUp
    }
}

// ---------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------

/// A serde serializer writing MessagePack straight into a vector.
struct Encoder<'a> {
    w: &'a mut Vec<u8>,
    /// Set when this encoder gave up, even if a user impl swallowed the error afterwards.
    failed: bool,
}

impl Encoder<'_> {
    /// Records that the fast path gave up and returns the error to propagate.
    #[cold]
    fn give_up(&mut self) -> GiveUp {
        self.failed = true;
        GiveUp
    }

    /// A length as rmp writes it, or giving up on lengths that do not fit in 32 bits.
    #[inline]
    fn len32(&mut self, len: usize) -> Result<u32, GiveUp> {
        u32::try_from(len).map_err(|_| self.give_up())
    }

    /// A signed integer in the form `rmp::encode::write_sint` picks.
    #[inline]
    fn put_sint(&mut self, v: i64) {
        if v >= 0 {
            self.put_uint(v as u64);
        } else if v >= -32 {
            self.w.push(v as u8);
        } else if v >= -128 {
            self.w.extend_from_slice(&[0xd0, v as u8]);
        } else if v >= -32768 {
            self.put_marked(0xd1, &(v as i16).to_be_bytes());
        } else if v >= -2_147_483_648 {
            self.put_marked(0xd2, &(v as i32).to_be_bytes());
        } else {
            self.put_marked(0xd3, &v.to_be_bytes());
        }
    }

    /// An unsigned integer in the form `rmp::encode::write_uint` picks.
    #[inline]
    fn put_uint(&mut self, v: u64) {
        if v < 0x80 {
            self.w.push(v as u8);
        } else if v < 0x100 {
            self.w.extend_from_slice(&[0xcc, v as u8]);
        } else if v < 0x1_0000 {
            self.put_marked(0xcd, &(v as u16).to_be_bytes());
        } else if v < 0x1_0000_0000 {
            self.put_marked(0xce, &(v as u32).to_be_bytes());
        } else {
            self.put_marked(0xcf, &v.to_be_bytes());
        }
    }

    /// A marker byte followed by its big-endian data.
    #[inline]
    fn put_marked(&mut self, marker: u8, data: &[u8]) {
        self.w.push(marker);
        self.w.extend_from_slice(data);
    }

    /// A string as `rmp::encode::write_str` writes it.
    #[inline]
    fn put_str(&mut self, s: &str) -> Result<(), GiveUp> {
        let len = self.len32(s.len())?;
        if len < 32 {
            self.w.push(0xa0 | len as u8);
        } else if len < 0x100 {
            self.w.extend_from_slice(&[0xd9, len as u8]);
        } else if len < 0x1_0000 {
            self.put_marked(0xda, &(len as u16).to_be_bytes());
        } else {
            self.put_marked(0xdb, &len.to_be_bytes());
        }
        self.w.extend_from_slice(s.as_bytes());
        Ok(())
    }

    /// A byte string as `rmp::encode::write_bin` writes it.
    #[inline]
    fn put_bin(&mut self, b: &[u8]) -> Result<(), GiveUp> {
        let len = self.len32(b.len())?;
        if len < 0x100 {
            self.w.extend_from_slice(&[0xc4, len as u8]);
        } else if len < 0x1_0000 {
            self.put_marked(0xc5, &(len as u16).to_be_bytes());
        } else {
            self.put_marked(0xc6, &len.to_be_bytes());
        }
        self.w.extend_from_slice(b);
        Ok(())
    }

    /// An array header as `rmp::encode::write_array_len` writes it.
    #[inline]
    fn put_array_len(&mut self, len: usize) -> Result<(), GiveUp> {
        let len = self.len32(len)?;
        self.put_len(len, 0x90, 0xdc);
        Ok(())
    }

    /// A map header as `rmp::encode::write_map_len` writes it.
    #[inline]
    fn put_map_len(&mut self, len: usize) -> Result<(), GiveUp> {
        let len = self.len32(len)?;
        self.put_len(len, 0x80, 0xde);
        Ok(())
    }

    /// A container header: the fix form under 16, else the 16-bit marker `m16` or the
    /// 32-bit one that follows it.
    #[inline]
    fn put_len(&mut self, len: u32, fix: u8, m16: u8) {
        if len < 16 {
            self.w.push(fix | len as u8);
        } else if len < 0x1_0000 {
            self.put_marked(m16, &(len as u16).to_be_bytes());
        } else {
            self.put_marked(m16 + 1, &len.to_be_bytes());
        }
    }

    /// The one-entry map header and the name rmp writes before a variant's content.
    #[inline]
    fn put_variant(&mut self, variant: &str) -> Result<(), GiveUp> {
        self.w.push(0x81);
        self.put_str(variant)
    }

    /// The length of a sequence or map, giving up on unknown ones (rmp buffers those).
    #[inline]
    fn known_len(&mut self, len: Option<usize>) -> Result<usize, GiveUp> {
        len.ok_or_else(|| self.give_up())
    }
}

/// The integer methods of the serializer: each widens its value and writes it in the
/// shortest form, as rmp-serde does.
macro_rules! integers {
    ($($writer:ident: $($method:ident($ty:ty)),*);*) => {
        $($(
            #[inline]
            fn $method(self, v: $ty) -> Result<(), GiveUp> {
                self.$writer(v.into());
                Ok(())
            }
        )*)*
    };
}

impl<'b, 'a> ser::Serializer for &'b mut Encoder<'a> {
    type Ok = ();
    type Error = GiveUp;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    #[inline]
    fn is_human_readable(&self) -> bool {
        false
    }

    #[inline]
    fn serialize_bool(self, v: bool) -> Result<(), GiveUp> {
        self.w.push(if v { 0xc3 } else { 0xc2 });
        Ok(())
    }

    integers!(
        put_sint: serialize_i8(i8), serialize_i16(i16), serialize_i32(i32), serialize_i64(i64);
        put_uint: serialize_u8(u8), serialize_u16(u16), serialize_u32(u32), serialize_u64(u64)
    );

    #[inline]
    fn serialize_i128(self, v: i128) -> Result<(), GiveUp> {
        self.put_bin(&v.to_be_bytes())
    }

    #[inline]
    fn serialize_u128(self, v: u128) -> Result<(), GiveUp> {
        self.put_bin(&v.to_be_bytes())
    }

    #[inline]
    fn serialize_f32(self, v: f32) -> Result<(), GiveUp> {
        self.put_marked(0xca, &v.to_bits().to_be_bytes());
        Ok(())
    }

    #[inline]
    fn serialize_f64(self, v: f64) -> Result<(), GiveUp> {
        self.put_marked(0xcb, &v.to_bits().to_be_bytes());
        Ok(())
    }

    #[inline]
    fn serialize_char(self, v: char) -> Result<(), GiveUp> {
        self.put_str(v.encode_utf8(&mut [0; 4]))
    }

    #[inline]
    fn serialize_str(self, v: &str) -> Result<(), GiveUp> {
        self.put_str(v)
    }

    #[inline]
    fn serialize_bytes(self, v: &[u8]) -> Result<(), GiveUp> {
        self.put_bin(v)
    }

    #[inline]
    fn serialize_none(self) -> Result<(), GiveUp> {
        self.w.push(0xc0);
        Ok(())
    }

    #[inline]
    fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> Result<(), GiveUp> {
        v.serialize(self)
    }

    #[inline]
    fn serialize_unit(self) -> Result<(), GiveUp> {
        self.w.push(0xc0);
        Ok(())
    }

    #[inline]
    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), GiveUp> {
        self.w.push(0x90);
        Ok(())
    }

    #[inline]
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<(), GiveUp> {
        self.put_str(variant)
    }

    #[inline]
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        v: &T,
    ) -> Result<(), GiveUp> {
        if name == EXT_STRUCT_NAME {
            return Err(self.give_up());
        }
        v.serialize(self)
    }

    #[inline]
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        v: &T,
    ) -> Result<(), GiveUp> {
        self.put_variant(variant)?;
        v.serialize(self)
    }

    #[inline]
    fn serialize_seq(self, len: Option<usize>) -> Result<Self, GiveUp> {
        let len = self.known_len(len)?;
        self.put_array_len(len)?;
        Ok(self)
    }

    #[inline]
    fn serialize_tuple(self, len: usize) -> Result<Self, GiveUp> {
        self.put_array_len(len)?;
        Ok(self)
    }

    #[inline]
    fn serialize_tuple_struct(self, _name: &'static str, len: usize) -> Result<Self, GiveUp> {
        self.put_array_len(len)?;
        Ok(self)
    }

    #[inline]
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self, GiveUp> {
        self.put_variant(variant)?;
        self.put_array_len(len)?;
        Ok(self)
    }

    #[inline]
    fn serialize_map(self, len: Option<usize>) -> Result<Self, GiveUp> {
        let len = self.known_len(len)?;
        self.put_map_len(len)?;
        Ok(self)
    }

    #[inline]
    fn serialize_struct(self, _name: &'static str, len: usize) -> Result<Self, GiveUp> {
        self.put_map_len(len)?;
        Ok(self)
    }

    #[inline]
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self, GiveUp> {
        self.put_variant(variant)?;
        self.put_map_len(len)?;
        Ok(self)
    }
}

/// Implements the serde compound traits whose elements are written one after the other
/// (the header was written when the compound began, and nothing closes it).
macro_rules! elements {
    ($($compound:ident::$element:ident),*) => {
        $(
            impl ser::$compound for &mut Encoder<'_> {
                type Ok = ();
                type Error = GiveUp;

                #[inline]
                fn $element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), GiveUp> {
                    v.serialize(&mut **self)
                }

                #[inline]
                fn end(self) -> Result<(), GiveUp> {
                    Ok(())
                }
            }
        )*
    };
}

elements!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

impl ser::SerializeMap for &mut Encoder<'_> {
    type Ok = ();
    type Error = GiveUp;

    #[inline]
    fn serialize_key<T: Serialize + ?Sized>(&mut self, k: &T) -> Result<(), GiveUp> {
        k.serialize(&mut **self)
    }

    #[inline]
    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), GiveUp> {
        v.serialize(&mut **self)
    }

    #[inline]
    fn end(self) -> Result<(), GiveUp> {
        Ok(())
    }
}

/// Implements the serde compound traits of named fields: each field is its name (a map
/// key: structs are maps) and its value.
macro_rules! fields {
    ($($compound:ident),*) => {
        $(
            impl ser::$compound for &mut Encoder<'_> {
                type Ok = ();
                type Error = GiveUp;

                #[inline]
                fn serialize_field<T: Serialize + ?Sized>(
                    &mut self,
                    key: &'static str,
                    v: &T,
                ) -> Result<(), GiveUp> {
                    self.put_str(key)?;
                    v.serialize(&mut **self)
                }

                #[inline]
                fn end(self) -> Result<(), GiveUp> {
                    Ok(())
                }
            }
        )*
    };
}

fields!(SerializeStruct, SerializeStructVariant);

// ---------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------

/// A serde deserializer reading MessagePack from a slice, calling the visitor exactly as
/// rmp-serde's `Deserializer` does for the forms it handles.
struct Decoder<'de> {
    /// What is left to read.
    input: &'de [u8],
    /// How many more levels of arrays, maps and enums may be entered.
    depth: u16,
    /// Set when this decoder gave up, even if a user impl swallowed the error afterwards.
    failed: bool,
    /// Set when the value nests deeper than [`MAX_DEPTH`]: refused, not retried.
    too_deep: bool,
}

/// Decoding results; every error means "ask rmp-serde".
type DeResult<T> = Result<T, GiveUp>;

impl<'de> Decoder<'de> {
    /// Records that the fast path gave up and returns the error to propagate.
    #[cold]
    fn give_up(&mut self) -> GiveUp {
        self.failed = true;
        GiveUp
    }

    /// The next byte, not consumed.
    #[inline]
    fn peek(&mut self) -> DeResult<u8> {
        match self.input.first() {
            Some(&b) => Ok(b),
            None => Err(self.give_up()),
        }
    }

    /// The next `n` bytes, consumed.
    #[inline]
    fn take(&mut self, n: usize) -> DeResult<&'de [u8]> {
        if n > self.input.len() {
            return Err(self.give_up());
        }
        let (head, rest) = self.input.split_at(n);
        self.input = rest;
        Ok(head)
    }

    /// The next `N` bytes as an array, consumed.
    #[inline]
    fn take_array<const N: usize>(&mut self) -> DeResult<[u8; N]> {
        match self.input.split_first_chunk::<N>() {
            Some((head, rest)) => {
                self.input = rest;
                Ok(*head)
            }
            None => Err(self.give_up()),
        }
    }

    /// The next byte, consumed.
    #[inline]
    fn byte(&mut self) -> DeResult<u8> {
        match self.input.split_first() {
            Some((&b, rest)) => {
                self.input = rest;
                Ok(b)
            }
            None => Err(self.give_up()),
        }
    }

    /// A big-endian `u16`, consumed.
    #[inline]
    fn u16(&mut self) -> DeResult<u16> {
        self.take_array().map(u16::from_be_bytes)
    }

    /// A big-endian `u32`, consumed.
    #[inline]
    fn u32(&mut self) -> DeResult<u32> {
        self.take_array().map(u32::from_be_bytes)
    }

    /// A big-endian `u64`, consumed.
    #[inline]
    fn u64(&mut self) -> DeResult<u64> {
        self.take_array().map(u64::from_be_bytes)
    }

    /// Nil, a boolean or a number, as rmp-serde's `any_num` visits it. Anything else gives
    /// up (rmp-serde rejects it with a type mismatch).
    fn scalar<V: Visitor<'de>>(&mut self, visitor: V) -> DeResult<V::Value> {
        let marker = self.byte()?;
        match marker {
            0x00..=0x7f => visitor.visit_u8(marker),
            0xe0..=0xff => visitor.visit_i8(marker as i8),
            0xc0 => visitor.visit_unit(),
            0xc2 => visitor.visit_bool(false),
            0xc3 => visitor.visit_bool(true),
            0xcc => visitor.visit_u8(self.byte()?),
            0xcd => visitor.visit_u16(self.u16()?),
            0xce => visitor.visit_u32(self.u32()?),
            0xcf => visitor.visit_u64(self.u64()?),
            0xd0 => visitor.visit_i8(self.byte()? as i8),
            0xd1 => visitor.visit_i16(self.u16()? as i16),
            0xd2 => visitor.visit_i32(self.u32()? as i32),
            0xd3 => visitor.visit_i64(self.u64()? as i64),
            0xca => visitor.visit_f32(f32::from_bits(self.u32()?)),
            0xcb => visitor.visit_f64(f64::from_bits(self.u64()?)),
            _ => Err(self.give_up()),
        }
    }

    /// Any value, as rmp-serde's `any_inner` visits it. With `allow_bytes` false (sequences,
    /// tuples, structs), rmp-serde visits a bin as a sequence of bytes; that is left to it.
    fn any<V: Visitor<'de>>(&mut self, visitor: V, allow_bytes: bool) -> DeResult<V::Value> {
        match self.peek()? {
            0xa0..=0xbf | 0xd9..=0xdb => self.str(visitor),
            0x90..=0x9f | 0xdc | 0xdd => self.seq(visitor),
            0x80..=0x8f | 0xde | 0xdf => self.map(visitor),
            0xc4..=0xc6 if allow_bytes => self.bin(visitor),
            _ => self.scalar(visitor),
        }
    }

    /// Any value, as rmp-serde's `deserialize_any` visits it.
    fn any_value<V: Visitor<'de>>(&mut self, visitor: V) -> DeResult<V::Value> {
        self.any(visitor, true)
    }

    /// Any value, as rmp-serde's `deserialize_seq` visits it.
    fn any_sequence<V: Visitor<'de>>(&mut self, visitor: V) -> DeResult<V::Value> {
        self.any(visitor, false)
    }

    /// The length that follows a str, bin, array or map marker.
    #[inline]
    fn len_after(&mut self, marker: u8) -> DeResult<u32> {
        match marker {
            0xa0..=0xbf => Ok(u32::from(marker & 0x1f)),
            0x80..=0x9f => Ok(u32::from(marker & 0x0f)),
            0xc4 | 0xd9 => self.byte().map(u32::from),
            0xc5 | 0xda | 0xdc | 0xde => self.u16().map(u32::from),
            _ => self.u32(),
        }
    }

    /// A string, visited as borrowed; invalid UTF-8 is left to rmp-serde.
    fn str<V: Visitor<'de>>(&mut self, visitor: V) -> DeResult<V::Value> {
        let marker = self.byte()?;
        let len = self.len_after(marker)?;
        let data = self.take(len as usize)?;
        match std::str::from_utf8(data) {
            Ok(s) => visitor.visit_borrowed_str(s),
            Err(_) => Err(self.give_up()),
        }
    }

    /// A byte string, visited as borrowed bytes.
    fn bin<V: Visitor<'de>>(&mut self, visitor: V) -> DeResult<V::Value> {
        let marker = self.byte()?;
        let len = self.len_after(marker)?;
        visitor.visit_borrowed_bytes(self.take(len as usize)?)
    }

    /// Reads a container header and checks that `len` elements can possibly follow (each
    /// takes at least a byte; rmp-serde would fail otherwise) and that nesting allows one
    /// more level, which is entered.
    #[inline]
    fn enter(&mut self) -> DeResult<u32> {
        let marker = self.byte()?;
        let len = self.len_after(marker)?;
        if self.depth == 0 {
            self.too_deep = true;
            return Err(self.give_up());
        }
        if len as usize > self.input.len() {
            return Err(self.give_up());
        }
        self.depth -= 1;
        Ok(len)
    }

    /// Leaves a container, which must have been read entirely (rmp-serde reports a length
    /// mismatch otherwise).
    #[inline]
    fn leave(&mut self, left: u32) -> DeResult<()> {
        if left != 0 {
            return Err(self.give_up());
        }
        self.depth += 1;
        Ok(())
    }

    /// An array, visited as a sequence.
    fn seq<V: Visitor<'de>>(&mut self, visitor: V) -> DeResult<V::Value> {
        let left = self.enter()?;
        let mut access = Elements { de: self, left };
        let value = visitor.visit_seq(&mut access)?;
        let left = access.left;
        self.leave(left)?;
        Ok(value)
    }

    /// A map, visited as a map.
    fn map<V: Visitor<'de>>(&mut self, visitor: V) -> DeResult<V::Value> {
        let left = self.enter()?;
        let mut access = Entries { de: self, left };
        let value = visitor.visit_map(&mut access)?;
        let left = access.left;
        self.leave(left)?;
        Ok(value)
    }

    /// An enum in its `{variant: content}` form: rmp-serde accepts any one-entry map.
    fn enum_in_map<V: Visitor<'de>>(&mut self, visitor: V) -> DeResult<V::Value> {
        if self.enter()? != 1 {
            return Err(self.give_up());
        }
        let value = visitor.visit_enum(Variant { de: &mut *self })?;
        self.depth += 1;
        Ok(value)
    }
}

/// Forwards `deserialize_*` methods to one of the decoder's readers.
macro_rules! forward {
    ($reader:ident; $($method:ident)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> DeResult<V::Value> {
                self.$reader(visitor)
            }
        )*
    };
}

impl<'de> de::Deserializer<'de> for &mut Decoder<'de> {
    type Error = GiveUp;

    forward!(scalar; deserialize_bool deserialize_i8 deserialize_i16 deserialize_i32
        deserialize_i64 deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64
        deserialize_f32 deserialize_f64);
    forward!(any_value; deserialize_any deserialize_char deserialize_str deserialize_string
        deserialize_bytes deserialize_byte_buf deserialize_unit deserialize_map
        deserialize_identifier deserialize_ignored_any);
    forward!(any_sequence; deserialize_seq);

    #[inline]
    fn is_human_readable(&self) -> bool {
        false
    }

    fn deserialize_i128<V: Visitor<'de>>(self, _visitor: V) -> DeResult<V::Value> {
        Err(self.give_up())
    }

    fn deserialize_u128<V: Visitor<'de>>(self, _visitor: V) -> DeResult<V::Value> {
        Err(self.give_up())
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> DeResult<V::Value> {
        if self.peek()? == 0xc0 {
            self.take(1)?;
            visitor.visit_none()
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> DeResult<V::Value> {
        match self.peek()? {
            0xc0 | 0x90 => {
                self.take(1)?;
                visitor.visit_unit()
            }
            _ => self.any(visitor, true),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> DeResult<V::Value> {
        if name == EXT_STRUCT_NAME {
            return Err(self.give_up());
        }
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, visitor: V) -> DeResult<V::Value> {
        self.any(visitor, false)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> DeResult<V::Value> {
        self.any(visitor, false)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> DeResult<V::Value> {
        self.any(visitor, false)
    }

    /// As rmp-serde: a map must have one entry, `{variant: content}`; anything else is the
    /// variant's identifier alone (a unit variant).
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> DeResult<V::Value> {
        match self.peek()? {
            0x80..=0x8f | 0xde | 0xdf => self.enum_in_map(visitor),
            _ => visitor.visit_enum(UnitVariant { de: self }),
        }
    }
}

/// The elements of an array.
struct Elements<'a, 'de> {
    de: &'a mut Decoder<'de>,
    left: u32,
}

impl<'de> de::SeqAccess<'de> for Elements<'_, 'de> {
    type Error = GiveUp;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> DeResult<Option<T::Value>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(&mut *self.de).map(Some)
    }

    #[inline]
    fn size_hint(&self) -> Option<usize> {
        Some(self.left as usize)
    }
}

/// The entries of a map.
struct Entries<'a, 'de> {
    de: &'a mut Decoder<'de>,
    left: u32,
}

impl<'de> de::MapAccess<'de> for Entries<'_, 'de> {
    type Error = GiveUp;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> DeResult<Option<K::Value>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(&mut *self.de).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> DeResult<V::Value> {
        seed.deserialize(&mut *self.de)
    }

    #[inline]
    fn size_hint(&self) -> Option<usize> {
        Some(self.left as usize)
    }
}

/// An enum variant written as `{variant: content}`.
struct Variant<'a, 'de> {
    de: &'a mut Decoder<'de>,
}

impl<'de> de::EnumAccess<'de> for Variant<'_, 'de> {
    type Error = GiveUp;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> DeResult<(V::Value, Self)> {
        let variant = seed.deserialize(&mut *self.de)?;
        Ok((variant, self))
    }
}

impl<'de> de::VariantAccess<'de> for Variant<'_, 'de> {
    type Error = GiveUp;

    /// rmp-serde reads a nil as the content of a unit variant in map form.
    fn unit_variant(self) -> DeResult<()> {
        match self.de.byte()? {
            0xc0 => Ok(()),
            _ => Err(self.de.give_up()),
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> DeResult<T::Value> {
        seed.deserialize(self.de)
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> DeResult<V::Value> {
        de::Deserializer::deserialize_tuple(self.de, len, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> DeResult<V::Value> {
        de::Deserializer::deserialize_tuple(self.de, fields.len(), visitor)
    }
}

/// An enum variant written as its identifier alone: only a unit variant can be.
struct UnitVariant<'a, 'de> {
    de: &'a mut Decoder<'de>,
}

impl<'de> de::EnumAccess<'de> for UnitVariant<'_, 'de> {
    type Error = GiveUp;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> DeResult<(V::Value, Self)> {
        let variant = seed.deserialize(&mut *self.de)?;
        Ok((variant, self))
    }
}

impl<'de> de::VariantAccess<'de> for UnitVariant<'_, 'de> {
    type Error = GiveUp;

    fn unit_variant(self) -> DeResult<()> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, _seed: T) -> DeResult<T::Value> {
        Err(self.de.give_up())
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, _visitor: V) -> DeResult<V::Value> {
        Err(self.de.give_up())
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        _visitor: V,
    ) -> DeResult<V::Value> {
        Err(self.de.give_up())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};
    use std::fmt::Debug;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    use std::time::Duration;

    use serde::de::IgnoredAny;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::*;

    /// What rmp-serde writes, as the wire did before this module.
    fn rmp_bytes<T: Serialize + ?Sized>(v: &T) -> Vec<u8> {
        let mut w = Vec::new();
        v.serialize(&mut rmp_serde::Serializer::new(&mut w).with_struct_map())
            .expect("rmp-serde encodes the test value");
        w
    }

    /// What rmp-serde decodes, with errors as strings.
    fn rmp_value<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
        decode_slow(bytes).map_err(|e| e.to_string())
    }

    /// The fast encoder alone: `None` when it gives up.
    fn fast_bytes<T: Serialize + ?Sized>(v: &T) -> Option<Vec<u8>> {
        let mut w = Vec::new();
        let mut enc = Encoder {
            w: &mut w,
            failed: false,
        };
        let ok = v.serialize(&mut enc).is_ok() && !enc.failed;
        ok.then_some(w)
    }

    /// The fast decoder alone: `None` when it gives up.
    fn fast_value<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
        let mut de = Decoder {
            input: bytes,
            depth: MAX_DEPTH,
            failed: false,
            too_deep: false,
        };
        match T::deserialize(&mut de) {
            Ok(v) if !de.failed => Some(v),
            _ => None,
        }
    }

    /// The public decoder, with errors as strings.
    fn public_value<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
        decode(bytes).map_err(|e| e.to_string())
    }

    /// The decoders agree on `bytes`: the public one answers exactly as rmp-serde, and the
    /// fast one, when it answers, answers the same value. Returns whether it answered.
    fn agree<T: DeserializeOwned + PartialEq + Debug>(bytes: &[u8]) -> bool {
        let expected = rmp_value::<T>(bytes);
        assert_eq!(public_value::<T>(bytes), expected, "input {bytes:02x?}");
        match fast_value::<T>(bytes) {
            Some(v) => {
                assert_eq!(Ok(&v), expected.as_ref(), "fast path on {bytes:02x?}");
                true
            }
            None => false,
        }
    }

    /// Checks one value: the fast encoder handles it and writes rmp-serde's bytes; the public
    /// encoder too; decoding those bytes (and rmp-serde's array form of structs) round-trips
    /// and agrees with rmp-serde, on the fast path unless `fast_decode` is false.
    fn check_as<T>(v: &T, fast_decode: bool)
    where
        T: Serialize + DeserializeOwned + PartialEq + Debug,
    {
        let expected = rmp_bytes(v);
        assert_eq!(
            fast_bytes(v).as_ref(),
            Some(&expected),
            "fast encoding of {v:?}"
        );
        let mut w = vec![0xee];
        encode(&mut w, v).expect("encodes");
        assert_eq!(w[1..], expected[..], "public encoding of {v:?}");
        assert_eq!(decode::<T>(&expected).as_ref().ok(), Some(v), "round trip");
        assert_eq!(agree::<T>(&expected), fast_decode, "fast decoding of {v:?}");
        let arrays = rmp_serde::to_vec(v).expect("rmp-serde encodes");
        let answered = agree::<T>(&arrays);
        if fast_decode {
            let ok = rmp_value::<T>(&arrays).is_ok();
            assert_eq!(answered, ok, "fast decoding of {arrays:02x?}");
        }
    }

    /// `check_as` for values the fast decoder handles.
    fn check<T>(v: T)
    where
        T: Serialize + DeserializeOwned + PartialEq + Debug,
    {
        check_as(&v, true);
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
            check_as(&v, false);
        }
        for v in [0, 1, u128::MAX] {
            check_as(&v, false);
        }
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
        assert_eq!(fast_bytes(&f64::NAN), Some(rmp_bytes(&f64::NAN)));
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
    fn unusual_values_fall_back_to_rmp_serde() {
        let mut w = vec![1, 2, 3];
        let err = encode(&mut w, &(1u8, Failing)).expect_err("the impl fails");
        assert_eq!(err.to_string(), "refused");
        assert_eq!(w[..3], [1, 2, 3]);

        let ext = Ext((5, Bin(vec![1, 2, 3, 4])));
        assert!(fast_bytes(&ext).is_none());
        let mut w = vec![9];
        encode(&mut w, &ext).expect("rmp-serde encodes ext values");
        assert_eq!(w[1..], rmp_bytes(&ext)[..]);
        assert_eq!(w[1..], [0xd6, 5, 1, 2, 3, 4]);
        assert!(!agree::<Ext>(&w[1..]));
        assert_eq!(decode::<Ext>(&w[1..]).ok(), Some(ext));

        assert!(fast_bytes(&Evens(9)).is_none());
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
        assert!(!agree::<Vec<u8>>(&rmp_bytes(&Bin(vec![1, 2]))));
        assert!(!agree::<Record>(&rmp_bytes(&5u8)));
        assert!(!agree::<char>(&rmp_bytes("ab")));
        assert!(!agree::<String>(&[0xa2, 0xff, 0xfe]));
        // Forms rmp-serde accepts though they are not what is expected.
        assert!(agree::<String>(&rmp_bytes(&Bin(b"text".to_vec()))));
        assert!(agree::<f64>(&rmp_bytes(&3u8)));
        assert!(
            agree::<i64>(&rmp_bytes(&3.0f32)) || rmp_value::<i64>(&rmp_bytes(&3.0f32)).is_err()
        );
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
        // sequence through the sequence ones (left to it).
        assert!(!agree::<Probe<2>>(&rmp_bytes("5")));
        assert!(!agree::<Probe<7>>(&rmp_bytes(&Bin(vec![1, 2]))));
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
    fn deep_nesting_is_refused_without_asking_rmp_serde() {
        for depth in [10, 500, 513, 600, 1100, 10_000] {
            for marker in [0x91, 0x81] {
                let mut bytes = vec![marker; depth];
                bytes.push(0xc0);
                if depth <= 500 {
                    assert_eq!(agree::<IgnoredAny>(&bytes), marker == 0x91);
                } else {
                    let error = decode::<IgnoredAny>(&bytes).unwrap_err();
                    assert!(
                        matches!(error, rmp_serde::decode::Error::DepthLimitExceeded),
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
        assert!(
            matches!(error, rmp_serde::decode::Error::DepthLimitExceeded),
            "{error}"
        );
    }
}
