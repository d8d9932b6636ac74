//! The serde serializer: writes exactly what rmp-serde 1.3 writes with
//! `Serializer::new(w).with_struct_map().with_bytes(BytesMode::ForceIterables)`, straight
//! into a `Vec<u8>`.

use serde::ser::{self, Impossible, Serialize};

use crate::error::{fail, Boxed, EncodeError};

/// The encoder's error, one pointer wide.
type Fail = Boxed<EncodeError>;
use crate::write::{self, Output};

/// The name rmp-serde gives newtype structs that stand for MessagePack ext values: a
/// tuple of an `i8` tag and bytes.
pub(crate) const EXT_STRUCT_NAME: &str = "_ExtStruct";

/// Encodes `v` as rmp-serde does with structs as maps and sequences of bytes as `bin`
/// (`Serializer::new(w).with_struct_map().with_bytes(BytesMode::ForceIterables)`),
/// appending to `w`. On error `w` is left as it
/// was.
///
/// Sequences and maps of unknown length (`#[serde(flatten)]`, `collect_seq` over a
/// filter) are written with their counted length in front, as rmp-serde writes them.
// Always inlined: a thin wrapper called once per argument by generated clients, where
// a call costs more than the encoding of a small value.
#[inline(always)]
pub fn encode<T: Serialize + ?Sized>(w: &mut Vec<u8>, v: &T) -> Result<(), EncodeError> {
    encode_boxed(w, v).map_err(|e| *e.0)
}

/// [`encode`] with the boxed error.
#[inline(always)]
fn encode_boxed<T: Serialize + ?Sized>(w: &mut Vec<u8>, v: &T) -> Result<(), Fail> {
    let start = w.len();
    let result = v.serialize(&mut Encoder { w: &mut *w });
    if result.is_err() {
        w.truncate(start);
    }
    result
}

/// A serde serializer writing MessagePack straight into a vector.
pub(crate) struct Encoder<'a> {
    pub(crate) w: &'a mut Vec<u8>,
}

/// A length as MessagePack carries it.
#[inline]
fn len32(len: usize) -> Result<u32, Fail> {
    u32::try_from(len).map_err(|_| fail(EncodeError::LengthTooLarge { len }))
}

impl Encoder<'_> {
    /// A sequence, element by element (serde's default `collect_seq`).
    #[inline]
    fn collect_elements<I>(&mut self, iter: I, len: Option<usize>) -> Result<(), Fail>
    where
        I: Iterator,
        I::Item: Serialize,
    {
        let mut seq = ser::Serializer::serialize_seq(&mut *self, len)?;
        for item in iter {
            ser::SerializeSeq::serialize_element(&mut seq, &item)?;
        }
        ser::SerializeSeq::end(seq)
    }

    /// `len` items of which the first serializes as a `u8`, as `bin`. Should a later item
    /// not be a `u8` (a one-byte type whose `Serialize` varies), the bytes so far are
    /// rewritten as an array of integers and the rest follow as elements: the result is
    /// what [`collect_elements`](Self::collect_elements) writes.
    fn collect_bytes<I>(&mut self, mut iter: I, len: usize) -> Result<(), Fail>
    where
        I: Iterator,
        I::Item: Serialize,
    {
        let start = self.w.len();
        write::write_bin_len(self.w, len32(len)?);
        let data = self.w.len();
        self.w.reserve(len);
        while let Some(item) = iter.next() {
            match byte_of(&item) {
                Some(byte) => self.w.push(byte),
                None => return self.bytes_to_elements(start, data, len, &item, iter),
            }
        }
        Ok(())
    }

    #[cold]
    fn bytes_to_elements<T, I>(
        &mut self,
        start: usize,
        data: usize,
        len: usize,
        item: &T,
        rest: I,
    ) -> Result<(), Fail>
    where
        T: Serialize,
        I: Iterator,
        I::Item: Serialize,
    {
        let bytes = self.w.split_off(data);
        self.w.truncate(start);
        write::write_array_len(self.w, len32(len)?);
        for byte in bytes {
            write::write_uint(self.w, byte.into());
        }
        item.serialize(&mut *self)?;
        for item in rest {
            item.serialize(&mut *self)?;
        }
        Ok(())
    }

    #[inline]
    fn put_str(&mut self, s: &str) -> Result<(), Fail> {
        write::write_str_len(self.w, len32(s.len())?);
        self.w.extend_from_slice(s.as_bytes());
        Ok(())
    }

    /// The one-entry map header and the name rmp-serde writes before a variant's content.
    #[inline]
    fn put_variant(&mut self, variant: &str) -> Result<(), Fail> {
        self.w.push(0x81);
        self.put_str(variant)
    }
}

/// The integer methods of the serializer: each widens its value and writes it in the
/// shortest form, as rmp-serde does.
macro_rules! integers {
    ($($writer:ident: $($method:ident($ty:ty)),*);*) => {
        $($(
            #[inline]
            fn $method(self, v: $ty) -> Result<(), Fail> {
                write::$writer(self.w, v.into());
                Ok(())
            }
        )*)*
    };
}

impl<'b, 'a> ser::Serializer for &'b mut Encoder<'a> {
    type Ok = ();
    type Error = Fail;
    type SerializeSeq = Compound<'b, 'a>;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Compound<'b, 'a>;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    #[inline]
    fn is_human_readable(&self) -> bool {
        false
    }

    #[inline]
    fn serialize_bool(self, v: bool) -> Result<(), Fail> {
        write::write_bool(self.w, v);
        Ok(())
    }

    integers!(
        write_sint: serialize_i8(i8), serialize_i16(i16), serialize_i32(i32), serialize_i64(i64);
        write_uint: serialize_u8(u8), serialize_u16(u16), serialize_u32(u32), serialize_u64(u64)
    );

    /// As rmp-serde: the 16 big-endian bytes as a byte string.
    #[inline]
    fn serialize_i128(self, v: i128) -> Result<(), Fail> {
        self.serialize_bytes(&v.to_be_bytes())
    }

    /// As rmp-serde: the 16 big-endian bytes as a byte string.
    #[inline]
    fn serialize_u128(self, v: u128) -> Result<(), Fail> {
        self.serialize_bytes(&v.to_be_bytes())
    }

    #[inline]
    fn serialize_f32(self, v: f32) -> Result<(), Fail> {
        write::write_f32(self.w, v);
        Ok(())
    }

    #[inline]
    fn serialize_f64(self, v: f64) -> Result<(), Fail> {
        write::write_f64(self.w, v);
        Ok(())
    }

    #[inline]
    fn serialize_char(self, v: char) -> Result<(), Fail> {
        self.put_str(v.encode_utf8(&mut [0; 4]))
    }

    #[inline]
    fn serialize_str(self, v: &str) -> Result<(), Fail> {
        self.put_str(v)
    }

    #[inline]
    fn serialize_bytes(self, v: &[u8]) -> Result<(), Fail> {
        write::write_bin_len(self.w, len32(v.len())?);
        self.w.extend_from_slice(v);
        Ok(())
    }

    #[inline]
    fn serialize_none(self) -> Result<(), Fail> {
        write::write_nil(self.w);
        Ok(())
    }

    #[inline]
    fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> Result<(), Fail> {
        v.serialize(self)
    }

    #[inline]
    fn serialize_unit(self) -> Result<(), Fail> {
        write::write_nil(self.w);
        Ok(())
    }

    #[inline]
    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), Fail> {
        self.w.push(0x90);
        Ok(())
    }

    #[inline]
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<(), Fail> {
        self.put_str(variant)
    }

    #[inline]
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        v: &T,
    ) -> Result<(), Fail> {
        if name == EXT_STRUCT_NAME {
            return encode_ext(self.w, v);
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
    ) -> Result<(), Fail> {
        self.put_variant(variant)?;
        v.serialize(self)
    }

    #[inline]
    fn serialize_seq(self, len: Option<usize>) -> Result<Compound<'b, 'a>, Fail> {
        Compound::begin(self, len, false)
    }

    /// Sequences of bytes (`Vec<u8>`, `&[u8]`, `Box<[u8]>`) are written as MessagePack
    /// `bin`, as rmp-serde does with `BytesMode::ForceIterables`: one byte per byte instead
    /// of up to two, copied rather than encoded one by one. serde hands every sequence to
    /// this method without saying what its items are, so, as rmp-serde, it looks for an
    /// iterator no larger than a slice's over items of one byte (or references to them)
    /// whose first item serializes as a `u8`. Anything else is an array as before.
    fn collect_seq<I>(self, iter: I) -> Result<(), Fail>
    where
        I: IntoIterator,
        I::Item: Serialize,
    {
        const SLICE_ITER: usize = std::mem::size_of::<std::slice::Iter<'static, u8>>();
        // Items of one byte, or `&u8` (what iterating `&Vec<u8>` gives). Other
        // pointer-sized items (`&String`, `Box<T>`), which rmp-serde probes too, are not
        // worth a probe per sequence: the type name is a constant, and so is the test.
        let item = std::mem::size_of::<I::Item>();
        let might_be_bytes = (item == 1
            || (item == std::mem::size_of::<&u8>() && std::any::type_name::<I::Item>() == "&u8"))
            && std::mem::size_of::<I::IntoIter>() <= SLICE_ITER;
        let iter = iter.into_iter();
        let len = match iter.size_hint() {
            (lo, Some(hi)) if lo == hi => Some(lo),
            _ => None,
        };
        if !might_be_bytes {
            // Known at compile time: other sequences take serde's default path unchanged.
            let mut seq = self.serialize_seq(len)?;
            for item in iter {
                ser::SerializeSeq::serialize_element(&mut seq, &item)?;
            }
            return ser::SerializeSeq::end(seq);
        }
        match len.filter(|&len| len > 0 && u32::try_from(len).is_ok()) {
            Some(len) => {
                let mut iter = iter.peekable();
                if iter.peek().and_then(byte_of).is_some() {
                    self.collect_bytes(iter, len)
                } else {
                    self.collect_elements(iter, Some(len))
                }
            }
            None => self.collect_elements(iter, len),
        }
    }

    #[inline]
    fn serialize_tuple(self, len: usize) -> Result<Self, Fail> {
        write::write_array_len(self.w, len32(len)?);
        Ok(self)
    }

    #[inline]
    fn serialize_tuple_struct(self, _name: &'static str, len: usize) -> Result<Self, Fail> {
        write::write_array_len(self.w, len32(len)?);
        Ok(self)
    }

    #[inline]
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self, Fail> {
        self.put_variant(variant)?;
        write::write_array_len(self.w, len32(len)?);
        Ok(self)
    }

    #[inline]
    fn serialize_map(self, len: Option<usize>) -> Result<Compound<'b, 'a>, Fail> {
        Compound::begin(self, len, true)
    }

    #[inline]
    fn serialize_struct(self, _name: &'static str, len: usize) -> Result<Self, Fail> {
        write::write_map_len(self.w, len32(len)?);
        Ok(self)
    }

    #[inline]
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self, Fail> {
        self.put_variant(variant)?;
        write::write_map_len(self.w, len32(len)?);
        Ok(self)
    }
}

/// A sequence or map. With a known length its header is written first and its elements
/// follow; with an unknown one the elements are written and counted, and the header is
/// put in front of them at the end (rmp-serde buffers them elsewhere, with the same
/// result).
pub(crate) struct Compound<'b, 'a> {
    enc: &'b mut Encoder<'a>,
    /// Where the elements start, when the length was not known.
    unknown_start: Option<usize>,
    /// Elements written (keys and values each count, as in rmp-serde).
    count: usize,
    /// A map (else an array).
    map: bool,
}

impl<'b, 'a> Compound<'b, 'a> {
    #[inline]
    fn begin(enc: &'b mut Encoder<'a>, len: Option<usize>, map: bool) -> Result<Self, Fail> {
        let unknown_start = match len {
            Some(len) => {
                header(enc.w, len32(len)?, map);
                None
            }
            None => Some(enc.w.len()),
        };
        Ok(Compound {
            enc,
            unknown_start,
            count: 0,
            map,
        })
    }

    #[inline]
    fn element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Fail> {
        self.count += 1;
        v.serialize(&mut *self.enc)
    }

    #[inline]
    fn end(mut self, per_entry: usize) -> Result<(), Fail> {
        match self.unknown_start {
            None => Ok(()),
            Some(start) => self.put_header_before(start, self.count / per_entry),
        }
    }

    #[cold]
    fn put_header_before(&mut self, start: usize, len: usize) -> Result<(), Fail> {
        let mut head = Vec::with_capacity(5);
        header(&mut head, len32(len)?, self.map);
        self.enc.w.splice(start..start, head);
        Ok(())
    }
}

/// An array or map header.
#[inline]
fn header(w: &mut Vec<u8>, len: u32, map: bool) {
    if map {
        write::write_map_len(w, len);
    } else {
        write::write_array_len(w, len);
    }
}

impl ser::SerializeSeq for Compound<'_, '_> {
    type Ok = ();
    type Error = Fail;

    #[inline]
    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Fail> {
        self.element(v)
    }

    #[inline]
    fn end(self) -> Result<(), Fail> {
        Compound::end(self, 1)
    }
}

impl ser::SerializeMap for Compound<'_, '_> {
    type Ok = ();
    type Error = Fail;

    #[inline]
    fn serialize_key<T: Serialize + ?Sized>(&mut self, k: &T) -> Result<(), Fail> {
        self.element(k)
    }

    #[inline]
    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Fail> {
        self.element(v)
    }

    #[inline]
    fn end(self) -> Result<(), Fail> {
        Compound::end(self, 2)
    }
}

/// Implements the serde compound traits whose elements are written one after the other
/// (the header was written when the compound began, and nothing closes it).
macro_rules! elements {
    ($($compound:ident::$element:ident),*) => {
        $(
            impl ser::$compound for &mut Encoder<'_> {
                type Ok = ();
                type Error = Fail;

                #[inline]
                fn $element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Fail> {
                    v.serialize(&mut **self)
                }

                #[inline]
                fn end(self) -> Result<(), Fail> {
                    Ok(())
                }
            }
        )*
    };
}

elements!(
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

/// Implements the serde compound traits of named fields: each field is its name (a map
/// key: structs are maps) and its value.
macro_rules! fields {
    ($($compound:ident),*) => {
        $(
            impl ser::$compound for &mut Encoder<'_> {
                type Ok = ();
                type Error = Fail;

                #[inline]
                fn serialize_field<T: Serialize + ?Sized>(
                    &mut self,
                    key: &'static str,
                    v: &T,
                ) -> Result<(), Fail> {
                    self.put_str(key)?;
                    v.serialize(&mut **self)
                }

                #[inline]
                fn end(self) -> Result<(), Fail> {
                    Ok(())
                }
            }
        )*
    };
}

fields!(SerializeStruct, SerializeStructVariant);

// ---------------------------------------------------------------------------------------
// Ext values, in rmp-serde's `_ExtStruct((tag, bytes))` convention
// ---------------------------------------------------------------------------------------

/// Encodes the content of an `_ExtStruct` newtype as rmp-serde does: it must serialize as
/// a tuple whose elements are an `i8` tag, then bytes (each such pair writes one ext
/// value).
#[cold]
#[inline(never)]
fn encode_ext<T: Serialize + ?Sized>(w: &mut Vec<u8>, v: &T) -> Result<(), Fail> {
    let mut ext = ExtTuple {
        fields: ExtFields {
            w,
            tag: None,
            finished: false,
        },
        tuple_received: false,
    };
    v.serialize(&mut ext)?;
    if !ext.tuple_received {
        return Err(fail(EncodeError::InvalidExt(EXPECTED_TUPLE)));
    }
    if !ext.fields.finished {
        return Err(fail(EncodeError::InvalidExt(EXPECTED_FIELDS)));
    }
    Ok(())
}

const EXPECTED_TUPLE: &str = "expected a tuple";
const EXPECTED_FIELDS: &str = "expected an i8 and bytes";

/// The serializer an `_ExtStruct`'s content sees: only a tuple is accepted.
struct ExtTuple<'a> {
    fields: ExtFields<'a>,
    tuple_received: bool,
}

/// The serializer an `_ExtStruct` tuple's elements see: an `i8` tag, then bytes.
struct ExtFields<'a> {
    w: &'a mut Vec<u8>,
    tag: Option<i8>,
    finished: bool,
}

/// Serializer methods that all fail with `$error` (of type `$fail`).
macro_rules! reject {
    ($fail:ty, $error:expr; $($method:ident($($arg:ty),*) -> $ret:ty;)*) => {
        $(
            #[inline]
            fn $method(self, $(_: $arg),*) -> Result<$ret, $fail> {
                Err($error)
            }
        )*
        #[inline]
        fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<(), $fail> {
            Err($error)
        }
        #[inline]
        fn serialize_newtype_struct<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            _: &T,
        ) -> Result<(), $fail> {
            Err($error)
        }
        #[inline]
        fn serialize_newtype_variant<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: &T,
        ) -> Result<(), $fail> {
            Err($error)
        }
    };
}

impl ser::Serializer for &mut ExtTuple<'_> {
    type Ok = ();
    type Error = Fail;
    type SerializeSeq = Impossible<(), Fail>;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Impossible<(), Fail>;
    type SerializeTupleVariant = Impossible<(), Fail>;
    type SerializeMap = Impossible<(), Fail>;
    type SerializeStruct = Impossible<(), Fail>;
    type SerializeStructVariant = Impossible<(), Fail>;

    fn serialize_tuple(self, _len: usize) -> Result<Self, Fail> {
        self.tuple_received = true;
        Ok(self)
    }

    reject!(Fail, fail(EncodeError::InvalidExt(EXPECTED_TUPLE));
        serialize_bool(bool) -> ();
        serialize_i8(i8) -> ();
        serialize_i16(i16) -> ();
        serialize_i32(i32) -> ();
        serialize_i64(i64) -> ();
        serialize_u8(u8) -> ();
        serialize_u16(u16) -> ();
        serialize_u32(u32) -> ();
        serialize_u64(u64) -> ();
        serialize_f32(f32) -> ();
        serialize_f64(f64) -> ();
        serialize_char(char) -> ();
        serialize_str(&str) -> ();
        serialize_bytes(&[u8]) -> ();
        serialize_none() -> ();
        serialize_unit() -> ();
        serialize_unit_struct(&'static str) -> ();
        serialize_unit_variant(&'static str, u32, &'static str) -> ();
        serialize_seq(Option<usize>) -> Self::SerializeSeq;
        serialize_tuple_struct(&'static str, usize) -> Self::SerializeTupleStruct;
        serialize_tuple_variant(&'static str, u32, &'static str, usize)
            -> Self::SerializeTupleVariant;
        serialize_map(Option<usize>) -> Self::SerializeMap;
        serialize_struct(&'static str, usize) -> Self::SerializeStruct;
        serialize_struct_variant(&'static str, u32, &'static str, usize)
            -> Self::SerializeStructVariant;
    );
}

impl ser::SerializeTuple for &mut ExtTuple<'_> {
    type Ok = ();
    type Error = Fail;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Fail> {
        v.serialize(&mut self.fields)
    }

    fn end(self) -> Result<(), Fail> {
        Ok(())
    }
}

impl ser::Serializer for &mut ExtFields<'_> {
    type Ok = ();
    type Error = Fail;
    type SerializeSeq = Impossible<(), Fail>;
    type SerializeTuple = Impossible<(), Fail>;
    type SerializeTupleStruct = Impossible<(), Fail>;
    type SerializeTupleVariant = Impossible<(), Fail>;
    type SerializeMap = Impossible<(), Fail>;
    type SerializeStruct = Impossible<(), Fail>;
    type SerializeStructVariant = Impossible<(), Fail>;

    fn serialize_i8(self, v: i8) -> Result<(), Fail> {
        if self.tag.is_some() {
            return Err(fail(EncodeError::InvalidExt(EXPECTED_FIELDS)));
        }
        self.tag = Some(v);
        Ok(())
    }

    fn serialize_bytes(self, v: &[u8]) -> Result<(), Fail> {
        let Some(tag) = self.tag.take() else {
            return Err(fail(EncodeError::InvalidExt(EXPECTED_FIELDS)));
        };
        write::write_ext_meta(self.w, len32(v.len())?, tag);
        self.w.put_slice(v);
        self.finished = true;
        Ok(())
    }

    reject!(Fail, fail(EncodeError::InvalidExt(EXPECTED_FIELDS));
        serialize_bool(bool) -> ();
        serialize_i16(i16) -> ();
        serialize_i32(i32) -> ();
        serialize_i64(i64) -> ();
        serialize_u8(u8) -> ();
        serialize_u16(u16) -> ();
        serialize_u32(u32) -> ();
        serialize_u64(u64) -> ();
        serialize_f32(f32) -> ();
        serialize_f64(f64) -> ();
        serialize_char(char) -> ();
        serialize_str(&str) -> ();
        serialize_none() -> ();
        serialize_unit() -> ();
        serialize_unit_struct(&'static str) -> ();
        serialize_unit_variant(&'static str, u32, &'static str) -> ();
        serialize_seq(Option<usize>) -> Self::SerializeSeq;
        serialize_tuple(usize) -> Self::SerializeTuple;
        serialize_tuple_struct(&'static str, usize) -> Self::SerializeTupleStruct;
        serialize_tuple_variant(&'static str, u32, &'static str, usize)
            -> Self::SerializeTupleVariant;
        serialize_map(Option<usize>) -> Self::SerializeMap;
        serialize_struct(&'static str, usize) -> Self::SerializeStruct;
        serialize_struct_variant(&'static str, u32, &'static str, usize)
            -> Self::SerializeStructVariant;
    );
}

/// The byte `v` is, if it serializes as a `u8` (and nothing else).
#[inline]
fn byte_of<T: Serialize + ?Sized>(v: &T) -> Option<u8> {
    let mut probe = ByteProbe(None);
    v.serialize(&mut probe).ok()?;
    probe.0
}

/// A serializer that accepts one `u8` and refuses everything else (without allocating).
struct ByteProbe(Option<u8>);

/// What [`ByteProbe`] returns for anything but a `u8`.
#[derive(Debug)]
struct NotAByte;

impl std::fmt::Display for NotAByte {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("not a byte")
    }
}

impl std::error::Error for NotAByte {}

impl ser::Error for NotAByte {
    fn custom<M: std::fmt::Display>(_: M) -> Self {
        NotAByte
    }
}

impl ser::Serializer for &mut ByteProbe {
    type Ok = ();
    type Error = NotAByte;
    type SerializeSeq = Impossible<(), NotAByte>;
    type SerializeTuple = Impossible<(), NotAByte>;
    type SerializeTupleStruct = Impossible<(), NotAByte>;
    type SerializeTupleVariant = Impossible<(), NotAByte>;
    type SerializeMap = Impossible<(), NotAByte>;
    type SerializeStruct = Impossible<(), NotAByte>;
    type SerializeStructVariant = Impossible<(), NotAByte>;

    #[inline]
    fn serialize_u8(self, v: u8) -> Result<(), NotAByte> {
        self.0 = Some(v);
        Ok(())
    }

    reject!(NotAByte, NotAByte;
        serialize_bool(bool) -> ();
        serialize_i8(i8) -> ();
        serialize_i16(i16) -> ();
        serialize_i32(i32) -> ();
        serialize_i64(i64) -> ();
        serialize_u16(u16) -> ();
        serialize_u32(u32) -> ();
        serialize_u64(u64) -> ();
        serialize_f32(f32) -> ();
        serialize_f64(f64) -> ();
        serialize_char(char) -> ();
        serialize_str(&str) -> ();
        serialize_bytes(&[u8]) -> ();
        serialize_none() -> ();
        serialize_unit() -> ();
        serialize_unit_struct(&'static str) -> ();
        serialize_unit_variant(&'static str, u32, &'static str) -> ();
        serialize_seq(Option<usize>) -> Self::SerializeSeq;
        serialize_tuple(usize) -> Self::SerializeTuple;
        serialize_tuple_struct(&'static str, usize) -> Self::SerializeTupleStruct;
        serialize_tuple_variant(&'static str, u32, &'static str, usize)
            -> Self::SerializeTupleVariant;
        serialize_map(Option<usize>) -> Self::SerializeMap;
        serialize_struct(&'static str, usize) -> Self::SerializeStruct;
        serialize_struct_variant(&'static str, u32, &'static str, usize)
            -> Self::SerializeStructVariant;
    );
}
