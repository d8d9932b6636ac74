//! The serde deserializer: reads what rmp-serde 1.3's `from_slice` reads, calling the
//! visitor as it does, with nesting counted on every path.

use serde::de::value::SeqDeserializer;
use serde::de::{self, DeserializeOwned, DeserializeSeed, Unexpected, Visitor};

use crate::encode::EXT_STRUCT_NAME;
use crate::error::{raise, take_raised, DecodeError, Failed};

/// How deep arrays, maps, enums in their `{variant: content}` form and ext values may nest
/// in a value [`decode`] accepts. Deeper values are refused with
/// [`DecodeError::DepthLimitExceeded`].
///
/// rmp-serde allows 1023 levels of arrays and maps but does not count the levels of
/// enums, so with a recursive enum type (`Neg(Box<Expr>)`) a peer could make it recurse
/// until the stack overflowed, which aborts the process. 512 levels stay well within a
/// thread's 2 MiB stack.
pub const MAX_DEPTH: u16 = 512;

/// Decodes a value as `rmp_serde::from_slice` does (trailing bytes are ignored), except
/// that values nested deeper than [`MAX_DEPTH`] levels are refused.
///
/// Every input is handled here, none is handed to another decoder: the answer for a valid
/// input is rmp-serde's value, for an invalid one an error (whose message may differ from
/// rmp-serde's).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    T::deserialize(&mut Decoder::new(bytes)).map_err(|_: Failed| take_raised())
}

/// Decodes a value at the start of `bytes` as [`decode`] does, with `max_depth` levels of
/// nesting allowed instead of [`MAX_DEPTH`]; returns it with the number of bytes it took.
pub(crate) fn decode_prefix<T: DeserializeOwned>(
    bytes: &[u8],
    max_depth: u16,
) -> Result<(T, usize), DecodeError> {
    let mut decoder = Decoder {
        input: bytes,
        depth: max_depth,
    };
    let value = T::deserialize(&mut decoder).map_err(|_: Failed| take_raised())?;
    Ok((value, bytes.len() - decoder.input.len()))
}

/// A serde deserializer reading MessagePack from a slice.
pub(crate) struct Decoder<'de> {
    /// What is left to read.
    input: &'de [u8],
    /// How many more levels of arrays, maps, enums and ext values may be entered.
    depth: u16,
}

type DeResult<T> = Result<T, Failed>;

/// What the numeric entry points expect, for type mismatches.
const SCALAR: &str = "nil, a boolean or a number";

impl<'de> Decoder<'de> {
    pub(crate) fn new(input: &'de [u8]) -> Self {
        Decoder {
            input,
            depth: MAX_DEPTH,
        }
    }

    /// The next byte, not consumed.
    #[inline(always)]
    fn peek(&self) -> DeResult<u8> {
        match self.input.first() {
            Some(&b) => Ok(b),
            None => Err(unexpected_end()),
        }
    }

    /// The next `n` bytes, as a header announced them, consumed.
    #[inline(always)]
    fn take(&mut self, n: u32) -> DeResult<&'de [u8]> {
        match self.input.split_at_checked(n as usize) {
            Some((head, rest)) => {
                self.input = rest;
                Ok(head)
            }
            None => Err(self.exceeds(u64::from(n))),
        }
    }

    #[cold]
    #[inline(never)]
    fn exceeds(&self, len: u64) -> Failed {
        raise(DecodeError::LengthExceedsInput {
            len,
            remaining: self.input.len(),
        })
    }

    /// The next `N` bytes as an array, consumed.
    #[inline(always)]
    fn take_array<const N: usize>(&mut self) -> DeResult<[u8; N]> {
        match self.input.split_first_chunk::<N>() {
            Some((head, rest)) => {
                self.input = rest;
                Ok(*head)
            }
            None => Err(unexpected_end()),
        }
    }

    /// The next byte, consumed.
    #[inline(always)]
    fn byte(&mut self) -> DeResult<u8> {
        match self.input.split_first() {
            Some((&b, rest)) => {
                self.input = rest;
                Ok(b)
            }
            None => Err(unexpected_end()),
        }
    }

    #[inline(always)]
    fn u16(&mut self) -> DeResult<u16> {
        self.take_array().map(u16::from_be_bytes)
    }

    #[inline(always)]
    fn u32(&mut self) -> DeResult<u32> {
        self.take_array().map(u32::from_be_bytes)
    }

    #[inline(always)]
    fn u64(&mut self) -> DeResult<u64> {
        self.take_array().map(u64::from_be_bytes)
    }

    /// Nil, a boolean or a number, as rmp-serde's `any_num` visits it.
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
            _ => Err(mismatch(SCALAR, marker)),
        }
    }

    /// Any value, as rmp-serde's `any_inner` visits it. With `allow_bytes` false
    /// (sequences, tuples, structs), a bin is visited as a sequence of its bytes.
    fn any<V: Visitor<'de>>(&mut self, visitor: V, allow_bytes: bool) -> DeResult<V::Value> {
        match self.peek()? {
            0xa0..=0xbf | 0xd9..=0xdb => self.str(visitor),
            0x90..=0x9f | 0xdc | 0xdd => self.seq(visitor),
            0x80..=0x8f | 0xde | 0xdf => self.map(visitor),
            0xc4..=0xc6 if allow_bytes => self.bin(visitor),
            0xc4..=0xc6 => self.bin_as_seq(visitor),
            0xc7..=0xc9 | 0xd4..=0xd8 => self.ext(visitor),
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
    #[inline(always)]
    fn len_after(&mut self, marker: u8) -> DeResult<u32> {
        match marker {
            0xa0..=0xbf => Ok(u32::from(marker & 0x1f)),
            0x80..=0x9f => Ok(u32::from(marker & 0x0f)),
            0xc4 | 0xd9 => self.byte().map(u32::from),
            0xc5 | 0xda | 0xdc | 0xde => self.u16().map(u32::from),
            _ => self.u32(),
        }
    }

    /// A string, visited as borrowed. Invalid UTF-8 is offered to the visitor as bytes,
    /// as rmp-serde does, and is an error if it does not take them.
    fn str<V: Visitor<'de>>(&mut self, visitor: V) -> DeResult<V::Value> {
        let marker = self.byte()?;
        let len = self.len_after(marker)?;
        let data = self.take(len)?;
        match std::str::from_utf8(data) {
            Ok(s) => visitor.visit_borrowed_str(s),
            Err(e) => not_utf8(visitor, data, e),
        }
    }

    /// A byte string, visited as borrowed bytes.
    fn bin<V: Visitor<'de>>(&mut self, visitor: V) -> DeResult<V::Value> {
        let marker = self.byte()?;
        let len = self.len_after(marker)?;
        visitor.visit_borrowed_bytes(self.take(len)?)
    }

    /// A byte string where a sequence is expected: a sequence of `u8`, as rmp-serde visits
    /// it (flat: its elements cannot nest).
    fn bin_as_seq<V: Visitor<'de>>(&mut self, visitor: V) -> DeResult<V::Value> {
        let marker = self.byte()?;
        let len = self.len_after(marker)?;
        let data = self.take(len)?;
        visitor.visit_seq(SeqDeserializer::<_, Failed>::new(data.iter().copied()))
    }

    /// The data length after an ext marker.
    fn ext_len(&mut self, marker: u8) -> DeResult<u32> {
        Ok(match marker {
            0xd4 => 1,
            0xd5 => 2,
            0xd6 => 4,
            0xd7 => 8,
            0xd8 => 16,
            0xc7 => u32::from(self.byte()?),
            0xc8 => u32::from(self.u16()?),
            0xc9 => self.u32()?,
            _ => return Err(mismatch("an ext value", marker)),
        })
    }

    /// An ext value, visited as rmp-serde does: a newtype struct whose content is the
    /// sequence `(tag: i8, data: bytes)`. One level of nesting.
    fn ext<V: Visitor<'de>>(&mut self, visitor: V) -> DeResult<V::Value> {
        let marker = self.byte()?;
        let len = self.ext_len(marker)?;
        self.descend()?;
        let value = visitor.visit_newtype_struct(Ext::new(self, len))?;
        self.depth += 1;
        Ok(value)
    }

    /// Enters one more level of nesting, if allowed.
    #[inline(always)]
    fn descend(&mut self) -> DeResult<()> {
        if self.depth == 0 {
            return Err(too_deep());
        }
        self.depth -= 1;
        Ok(())
    }

    /// Reads a container header, checks that `len` elements can possibly follow (each
    /// takes at least a byte: rmp-serde fails otherwise, running out of input or finding
    /// elements left unread) and enters one more level of nesting.
    #[inline(always)]
    fn enter(&mut self) -> DeResult<u32> {
        let marker = self.byte()?;
        let len = self.len_after(marker)?;
        self.descend()?;
        if len as usize > self.input.len() {
            return Err(self.exceeds(u64::from(len)));
        }
        Ok(len)
    }

    /// Leaves a container, which must have been read entirely (rmp-serde reports a length
    /// mismatch otherwise).
    #[inline(always)]
    fn leave(&mut self, len: u32, left: u32) -> DeResult<()> {
        if left != 0 {
            return Err(length_mismatch(len, len - left));
        }
        self.depth += 1;
        Ok(())
    }

    /// An array, visited as a sequence.
    fn seq<V: Visitor<'de>>(&mut self, visitor: V) -> DeResult<V::Value> {
        let len = self.enter()?;
        let mut access = Elements {
            de: self,
            left: len,
        };
        let value = visitor.visit_seq(&mut access)?;
        let left = access.left;
        self.leave(len, left)?;
        Ok(value)
    }

    /// A map, visited as a map.
    fn map<V: Visitor<'de>>(&mut self, visitor: V) -> DeResult<V::Value> {
        let len = self.enter()?;
        let mut access = Entries {
            de: self,
            left: len,
        };
        let value = visitor.visit_map(&mut access)?;
        let left = access.left;
        self.leave(len, left)?;
        Ok(value)
    }

    /// An enum in its `{variant: content}` form: rmp-serde accepts any one-entry map, and
    /// refuses other maps. Counted as a level of nesting (rmp-serde does not count it).
    fn enum_in_map<V: Visitor<'de>>(&mut self, visitor: V) -> DeResult<V::Value> {
        let len = self.enter()?;
        if len != 1 {
            return Err(length_mismatch(len, 1));
        }
        let value = visitor.visit_enum(Variant { de: &mut *self })?;
        self.depth += 1;
        Ok(value)
    }

    /// A 128-bit integer as rmp-serde reads one: any integer, or a bin 8 of 16 big-endian
    /// bytes.
    fn i128(&mut self) -> DeResult<i128> {
        let marker = self.byte()?;
        Ok(match marker {
            0x00..=0x7f => i128::from(marker),
            0xe0..=0xff => i128::from(marker as i8),
            0xcc => i128::from(self.byte()?),
            0xcd => i128::from(self.u16()?),
            0xce => i128::from(self.u32()?),
            0xcf => i128::from(self.u64()?),
            0xd0 => i128::from(self.byte()? as i8),
            0xd1 => i128::from(self.u16()? as i16),
            0xd2 => i128::from(self.u32()? as i32),
            0xd3 => i128::from(self.u64()? as i64),
            // rmp-serde also reads the 16 bytes after a fixarray of 16 elements, which
            // cannot exist: a fixarray has at most 15.
            0xc4 | 0x90..=0x9f => {
                let len = match marker {
                    0xc4 => self.byte()?,
                    _ => marker & 0x0f,
                };
                if len != 16 {
                    return Err(length_mismatch(u32::from(len), 16));
                }
                i128::from_be_bytes(self.take_array()?)
            }
            _ => return Err(mismatch("a 128-bit integer", marker)),
        })
    }
}

// The errors the decoder raises, each built out of line so that the fast paths that may
// raise them stay small enough to inline.

#[cold]
#[inline(never)]
fn too_deep() -> Failed {
    raise(DecodeError::DepthLimitExceeded)
}

#[cold]
#[inline(never)]
fn unexpected_end() -> Failed {
    raise(DecodeError::UnexpectedEnd)
}

#[cold]
#[inline(never)]
fn mismatch(expected: &'static str, found: u8) -> Failed {
    raise(DecodeError::mismatch(expected, found))
}

/// A string that is not UTF-8, offered to the visitor as bytes (out of line, so that the
/// string fast path keeps its registers).
#[cold]
#[inline(never)]
fn not_utf8<'de, V: Visitor<'de>>(
    visitor: V,
    data: &'de [u8],
    e: std::str::Utf8Error,
) -> DeResult<V::Value> {
    visitor.visit_borrowed_bytes::<Failed>(data).map_err(|_| {
        raise(DecodeError::InvalidUtf8 {
            valid_up_to: e.valid_up_to(),
        })
    })
}

#[cold]
#[inline(never)]
fn length_mismatch(len: u32, read: u32) -> Failed {
    raise(DecodeError::LengthMismatch { len, read })
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
    type Error = Failed;

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

    fn deserialize_i128<V: Visitor<'de>>(self, visitor: V) -> DeResult<V::Value> {
        visitor.visit_i128(self.i128()?)
    }

    /// As rmp-serde: the 128-bit integer reinterpreted, so `-1` reads as `u128::MAX`.
    fn deserialize_u128<V: Visitor<'de>>(self, visitor: V) -> DeResult<V::Value> {
        visitor.visit_u128(self.i128()? as u128)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> DeResult<V::Value> {
        if self.peek()? == 0xc0 {
            self.byte()?;
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
                self.byte()?;
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
            let marker = self.byte()?;
            let len = self.ext_len(marker)?;
            self.descend()?;
            let value = visitor.visit_newtype_struct(Ext::new(self, len))?;
            self.depth += 1;
            return Ok(value);
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
    type Error = Failed;

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
    type Error = Failed;

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
    type Error = Failed;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> DeResult<(V::Value, Self)> {
        let variant = seed.deserialize(&mut *self.de)?;
        Ok((variant, self))
    }
}

impl<'de> de::VariantAccess<'de> for Variant<'_, 'de> {
    type Error = Failed;

    /// rmp-serde reads a nil as the content of a unit variant in map form.
    fn unit_variant(self) -> DeResult<()> {
        match self.de.byte()? {
            0xc0 => Ok(()),
            b => Err(mismatch("nil", b)),
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
    type Error = Failed;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> DeResult<(V::Value, Self)> {
        let variant = seed.deserialize(&mut *self.de)?;
        Ok((variant, self))
    }
}

impl<'de> de::VariantAccess<'de> for UnitVariant<'_, 'de> {
    type Error = Failed;

    fn unit_variant(self) -> DeResult<()> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, _seed: T) -> DeResult<T::Value> {
        Err(de::Error::invalid_type(
            Unexpected::UnitVariant,
            &"newtype variant",
        ))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, _visitor: V) -> DeResult<V::Value> {
        Err(de::Error::invalid_type(
            Unexpected::UnitVariant,
            &"tuple variant",
        ))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        _visitor: V,
    ) -> DeResult<V::Value> {
        Err(de::Error::invalid_type(
            Unexpected::UnitVariant,
            &"struct variant",
        ))
    }
}

/// The content of an ext value, as rmp-serde's `ExtDeserializer` presents it: a sequence
/// of its `i8` tag and its data bytes, whatever the type asks for. Flat: nothing in it
/// nests.
struct Ext<'a, 'de> {
    de: &'a mut Decoder<'de>,
    len: u32,
    state: ExtState,
}

/// What an [`Ext`] reads next.
#[derive(Clone, Copy)]
enum ExtState {
    Tag,
    Data,
    Done,
}

impl<'a, 'de> Ext<'a, 'de> {
    fn new(de: &'a mut Decoder<'de>, len: u32) -> Self {
        Ext {
            de,
            len,
            state: ExtState::Tag,
        }
    }
}

impl<'de> de::Deserializer<'de> for Ext<'_, 'de> {
    type Error = Failed;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> DeResult<V::Value> {
        visitor.visit_seq(self)
    }

    serde::forward_to_deserialize_any! {
        bool u8 u16 u32 u64 i8 i16 i32 i64 f32 f64 char str string unit option
        seq bytes byte_buf map unit_struct newtype_struct
        struct identifier tuple enum ignored_any tuple_struct
    }
}

impl<'de> de::SeqAccess<'de> for Ext<'_, 'de> {
    type Error = Failed;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> DeResult<Option<T::Value>> {
        match self.state {
            ExtState::Tag | ExtState::Data => seed.deserialize(self).map(Some),
            ExtState::Done => Ok(None),
        }
    }
}

impl<'de> de::Deserializer<'de> for &mut Ext<'_, 'de> {
    type Error = Failed;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> DeResult<V::Value> {
        match self.state {
            ExtState::Tag => {
                let tag = self.de.byte()? as i8;
                self.state = ExtState::Data;
                visitor.visit_i8(tag)
            }
            ExtState::Data => {
                let data = self.de.take(self.len)?;
                self.state = ExtState::Done;
                visitor.visit_borrowed_bytes(data)
            }
            ExtState::Done => Err(unexpected_end()),
        }
    }

    serde::forward_to_deserialize_any! {
        bool u8 u16 u32 u64 i8 i16 i32 i64 f32 f64 char str string unit option
        seq bytes byte_buf map unit_struct newtype_struct
        tuple_struct struct identifier tuple enum ignored_any
    }
}
