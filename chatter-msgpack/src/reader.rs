//! A borrowing cursor that reads single MessagePack values, for hand-written headers and
//! envelopes.

use serde::de::DeserializeOwned;

use crate::error::DecodeError;

/// A cursor over MessagePack bytes that reads one value at a time, borrowing strings and
/// byte strings from the input. Every read checks the marker and the length it needs and
/// returns a [`DecodeError`] instead of reading past the end; a failed read may have
/// consumed part of the value.
///
/// ```
/// use chatter_msgpack::{write_array_len, write_str, write_uint, Reader};
///
/// let mut buf = Vec::new();
/// write_array_len(&mut buf, 2);
/// write_uint(&mut buf, 300);
/// write_str(&mut buf, "add");
/// let mut r = Reader::new(&buf);
/// assert_eq!(r.read_array_len()?, 2);
/// assert_eq!(r.read_uint()?, 300);
/// assert_eq!(r.read_str()?, "add");
/// r.finish()?;
/// # Ok::<(), chatter_msgpack::DecodeError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// Integer types [`Reader::read_int`] reads into.
pub trait Integer: sealed::Sealed + Sized {
    /// The value, if it fits.
    #[doc(hidden)]
    fn from_u64(v: u64) -> Option<Self>;
    /// The value, if it fits.
    #[doc(hidden)]
    fn from_i64(v: i64) -> Option<Self>;
    /// The type's name, for errors.
    #[doc(hidden)]
    const NAME: &'static str;
}

mod sealed {
    pub trait Sealed {}
}

macro_rules! integers {
    ($($ty:ident)*) => {
        $(
            impl sealed::Sealed for $ty {}
            impl Integer for $ty {
                #[inline]
                fn from_u64(v: u64) -> Option<Self> {
                    $ty::try_from(v).ok()
                }
                #[inline]
                fn from_i64(v: i64) -> Option<Self> {
                    $ty::try_from(v).ok()
                }
                const NAME: &'static str = stringify!($ty);
            }
        )*
    };
}

integers!(u8 u16 u32 u64 i8 i16 i32 i64);

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    #[inline]
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Bytes consumed so far.
    #[inline]
    pub fn position(&self) -> usize {
        self.pos
    }

    /// What is left to read.
    #[inline]
    pub fn remaining(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    /// Whether everything was read.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.pos == self.buf.len()
    }

    /// Checks that everything was read: [`DecodeError::TrailingBytes`] otherwise.
    pub fn finish(&self) -> Result<(), DecodeError> {
        match self.buf.len() - self.pos {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes { count }),
        }
    }

    /// The next marker byte, not consumed; `None` at the end.
    #[inline]
    pub fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    #[inline]
    fn byte(&mut self) -> Result<u8, DecodeError> {
        match self.buf.get(self.pos) {
            Some(&b) => {
                self.pos += 1;
                Ok(b)
            }
            None => Err(DecodeError::UnexpectedEnd),
        }
    }

    #[inline]
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        match self.buf[self.pos..].first_chunk::<N>() {
            Some(a) => {
                self.pos += N;
                Ok(*a)
            }
            None => Err(DecodeError::UnexpectedEnd),
        }
    }

    /// The next `len` bytes, as a header announced them.
    #[inline]
    fn take(&mut self, len: u32) -> Result<&'a [u8], DecodeError> {
        let rest = &self.buf[self.pos..];
        match rest.get(..len as usize) {
            Some(data) => {
                self.pos += data.len();
                Ok(data)
            }
            None => Err(DecodeError::LengthExceedsInput {
                len: u64::from(len),
                remaining: rest.len(),
            }),
        }
    }

    /// Reads nil.
    pub fn read_nil(&mut self) -> Result<(), DecodeError> {
        match self.byte()? {
            0xc0 => Ok(()),
            b => Err(DecodeError::mismatch("nil", b)),
        }
    }

    /// Reads a boolean.
    pub fn read_bool(&mut self) -> Result<bool, DecodeError> {
        match self.byte()? {
            0xc2 => Ok(false),
            0xc3 => Ok(true),
            b => Err(DecodeError::mismatch("a boolean", b)),
        }
    }

    /// Reads an unsigned integer written in an unsigned form (positive fixint, uint
    /// 8/16/32/64), as [`write_uint`](crate::write_uint) writes them; signed forms are a
    /// type mismatch (see [`read_int`](Self::read_int) for those).
    #[inline]
    pub fn read_uint(&mut self) -> Result<u64, DecodeError> {
        let b = self.byte()?;
        match b {
            0x00..=0x7f => Ok(u64::from(b)),
            0xcc => self.byte().map(u64::from),
            0xcd => self.array().map(u16::from_be_bytes).map(u64::from),
            0xce => self.array().map(u32::from_be_bytes).map(u64::from),
            0xcf => self.array().map(u64::from_be_bytes),
            _ => Err(DecodeError::mismatch("an unsigned integer", b)),
        }
    }

    /// Reads an integer in any form, signed or not, that fits in `T`, as
    /// `rmp::decode::read_int` does; [`DecodeError::OutOfRange`] if it does not fit.
    pub fn read_int<T: Integer>(&mut self) -> Result<T, DecodeError> {
        let b = self.byte()?;
        let v = match b {
            0x00..=0x7f => T::from_u64(u64::from(b)),
            0xe0..=0xff => T::from_i64(i64::from(b as i8)),
            0xcc => T::from_u64(u64::from(self.byte()?)),
            0xcd => T::from_u64(u64::from(u16::from_be_bytes(self.array()?))),
            0xce => T::from_u64(u64::from(u32::from_be_bytes(self.array()?))),
            0xcf => T::from_u64(u64::from_be_bytes(self.array()?)),
            0xd0 => T::from_i64(i64::from(self.byte()? as i8)),
            0xd1 => T::from_i64(i64::from(i16::from_be_bytes(self.array()?))),
            0xd2 => T::from_i64(i64::from(i32::from_be_bytes(self.array()?))),
            0xd3 => T::from_i64(i64::from_be_bytes(self.array()?)),
            _ => return Err(DecodeError::mismatch("an integer", b)),
        };
        v.ok_or(DecodeError::OutOfRange { target: T::NAME })
    }

    /// Reads a float 32 or 64 (a float 32 widened).
    pub fn read_f64(&mut self) -> Result<f64, DecodeError> {
        match self.byte()? {
            0xca => Ok(f64::from(f32::from_bits(u32::from_be_bytes(self.array()?)))),
            0xcb => Ok(f64::from_bits(u64::from_be_bytes(self.array()?))),
            b => Err(DecodeError::mismatch("a float", b)),
        }
    }

    /// Reads a string header: the length of the bytes that follow it.
    #[inline]
    pub fn read_str_len(&mut self) -> Result<u32, DecodeError> {
        let b = self.byte()?;
        match b {
            0xa0..=0xbf => Ok(u32::from(b & 0x1f)),
            0xd9 => self.byte().map(u32::from),
            0xda => self.array().map(u16::from_be_bytes).map(u32::from),
            0xdb => self.array().map(u32::from_be_bytes),
            _ => Err(DecodeError::mismatch("a string", b)),
        }
    }

    /// Reads a string's bytes without checking that they are UTF-8 (for names that are
    /// compared, not read).
    #[inline]
    pub fn read_str_bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.read_str_len()?;
        self.take(len)
    }

    /// Reads a string.
    pub fn read_str(&mut self) -> Result<&'a str, DecodeError> {
        let bytes = self.read_str_bytes()?;
        std::str::from_utf8(bytes).map_err(|e| DecodeError::InvalidUtf8 {
            valid_up_to: e.valid_up_to(),
        })
    }

    /// Reads a byte string.
    pub fn read_bin(&mut self) -> Result<&'a [u8], DecodeError> {
        let b = self.byte()?;
        let len = match b {
            0xc4 => u32::from(self.byte()?),
            0xc5 => u32::from(u16::from_be_bytes(self.array()?)),
            0xc6 => u32::from_be_bytes(self.array()?),
            _ => return Err(DecodeError::mismatch("a byte string", b)),
        };
        self.take(len)
    }

    /// Reads an array header: the number of elements that follow it.
    #[inline]
    pub fn read_array_len(&mut self) -> Result<u32, DecodeError> {
        let b = self.byte()?;
        match b {
            0x90..=0x9f => Ok(u32::from(b & 0x0f)),
            0xdc => self.array().map(u16::from_be_bytes).map(u32::from),
            0xdd => self.array().map(u32::from_be_bytes),
            _ => Err(DecodeError::mismatch("an array", b)),
        }
    }

    /// Reads a map header: the number of entries (key and value) that follow it.
    pub fn read_map_len(&mut self) -> Result<u32, DecodeError> {
        let b = self.byte()?;
        match b {
            0x80..=0x8f => Ok(u32::from(b & 0x0f)),
            0xde => self.array().map(u16::from_be_bytes).map(u32::from),
            0xdf => self.array().map(u32::from_be_bytes),
            _ => Err(DecodeError::mismatch("a map", b)),
        }
    }

    /// Reads one value with serde, as [`decode`](crate::decode) reads a whole input, and
    /// moves past it. Values nested more than `max_depth` levels deep are refused with
    /// [`DecodeError::DepthLimitExceeded`] (`decode` allows [`MAX_DEPTH`](crate::MAX_DEPTH);
    /// the elements of an array read with [`read_array_len`](Self::read_array_len) get
    /// the same limit as in a `decode` of the whole array with `MAX_DEPTH - 1`). On error
    /// the reader does not move.
    ///
    /// ```
    /// use chatter_msgpack::{encode, Reader, MAX_DEPTH};
    ///
    /// let mut buf = Vec::new();
    /// encode(&mut buf, &(2, "three"))?;
    /// let mut r = Reader::new(&buf);
    /// assert_eq!(r.read_array_len()?, 2);
    /// assert_eq!(r.read_value::<i64>(MAX_DEPTH - 1)?, 2);
    /// assert_eq!(r.read_value::<String>(MAX_DEPTH - 1)?, "three");
    /// r.finish()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[inline]
    pub fn read_value<T: DeserializeOwned>(&mut self, max_depth: u16) -> Result<T, DecodeError> {
        let (value, used) = crate::decode::decode_prefix(self.remaining(), max_depth)?;
        self.pos += used;
        Ok(value)
    }

    /// Skips one value of any type, refusing arrays and maps nested more than `max_depth`
    /// levels deep (with [`DecodeError::DepthLimitExceeded`]): a scalar is at depth 0, the
    /// elements of a top-level array at depth 1.
    pub fn skip_value(&mut self, max_depth: u16) -> Result<(), DecodeError> {
        self.skip_nested(max_depth)
    }

    fn skip_nested(&mut self, levels_left: u16) -> Result<(), DecodeError> {
        let b = self.byte()?;
        let (bytes, items): (u32, u64) = match b {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
            0x80..=0x8f => (0, 2 * u64::from(b & 0x0f)),
            0x90..=0x9f => (0, u64::from(b & 0x0f)),
            0xa0..=0xbf => (u32::from(b & 0x1f), 0),
            0xc4 | 0xd9 => (u32::from(self.byte()?), 0),
            0xc5 | 0xda => (u32::from(u16::from_be_bytes(self.array()?)), 0),
            0xc6 | 0xdb => (u32::from_be_bytes(self.array()?), 0),
            0xc7 => (u32::from(self.byte()?) + 1, 0),
            0xc8 => (u32::from(u16::from_be_bytes(self.array()?)) + 1, 0),
            0xc9 => (u32::from_be_bytes(self.array()?).saturating_add(1), 0),
            0xca | 0xce | 0xd2 => (4, 0),
            0xcb | 0xcf | 0xd3 => (8, 0),
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xd4 => (2, 0),
            0xd5 => (3, 0),
            0xd6 => (5, 0),
            0xd7 => (9, 0),
            0xd8 => (17, 0),
            0xdc => (0, u64::from(u16::from_be_bytes(self.array()?))),
            0xdd => (0, u64::from(u32::from_be_bytes(self.array()?))),
            0xde => (0, 2 * u64::from(u16::from_be_bytes(self.array()?))),
            0xdf => (0, 2 * u64::from(u32::from_be_bytes(self.array()?))),
            0xc1 => return Err(DecodeError::mismatch("a value", b)),
        };
        self.take(bytes)?;
        if items == 0 {
            return Ok(());
        }
        if levels_left == 0 {
            return Err(DecodeError::DepthLimitExceeded);
        }
        let remaining = self.buf.len() - self.pos;
        if items > remaining as u64 {
            return Err(DecodeError::LengthExceedsInput {
                len: items,
                remaining,
            });
        }
        for _ in 0..items {
            self.skip_nested(levels_left - 1)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::write::*;

    #[test]
    fn uints_use_the_shortest_form_and_read_back() {
        for (v, bytes) in [
            (0, &[0x00][..]),
            (127, &[0x7f]),
            (128, &[0xcc, 0x80]),
            (256, &[0xcd, 0x01, 0x00]),
            (70_000, &[0xce, 0x00, 0x01, 0x11, 0x70]),
        ] {
            let mut out = Vec::new();
            write_uint(&mut out, v);
            assert_eq!(out, bytes);
            assert_eq!(Reader::new(&out).read_uint(), Ok(v));
        }
        let mut out = Vec::new();
        write_uint(&mut out, u64::MAX);
        assert_eq!(Reader::new(&out).read_uint(), Ok(u64::MAX));
    }

    #[test]
    fn strings_arrays_and_maps_read_back() {
        let mut out = Vec::new();
        write_array_len(&mut out, 3);
        write_str(&mut out, "chatter");
        write_str(&mut out, &"x".repeat(40));
        write_map_len(&mut out, 1);
        write_bin(&mut out, &[1, 2]);
        write_nil(&mut out);
        write_bool(&mut out, true);
        write_f64(&mut out, 2.5);
        let mut r = Reader::new(&out);
        assert_eq!(r.read_array_len(), Ok(3));
        assert_eq!(r.read_str(), Ok("chatter"));
        assert_eq!(r.read_str_bytes().map(<[u8]>::len), Ok(40));
        assert_eq!(r.read_map_len(), Ok(1));
        assert_eq!(r.read_bin(), Ok(&[1u8, 2][..]));
        assert_eq!(r.read_nil(), Ok(()));
        assert_eq!(r.read_bool(), Ok(true));
        assert_eq!(r.read_f64(), Ok(2.5));
        assert!(r.is_empty());
        assert_eq!(r.position(), out.len());
        assert_eq!(r.finish(), Ok(()));
    }

    #[test]
    fn integers_of_any_form_are_read_where_they_fit() {
        assert_eq!(Reader::new(&[0xd0, 0x05]).read_int::<u8>(), Ok(5));
        assert_eq!(Reader::new(&[0xff]).read_int::<i8>(), Ok(-1));
        assert_eq!(
            Reader::new(&[0xff]).read_int::<u64>(),
            Err(DecodeError::OutOfRange { target: "u64" })
        );
        assert_eq!(
            Reader::new(&[0xcd, 0x01, 0x2c]).read_int::<u8>(),
            Err(DecodeError::OutOfRange { target: "u8" })
        );
        assert_eq!(Reader::new(&[0xcd, 0x01, 0x2c]).read_int::<i16>(), Ok(300));
        // Signed forms are not unsigned integers to `read_uint`.
        assert_eq!(
            Reader::new(&[0xd0, 0x05]).read_uint(),
            Err(DecodeError::mismatch("an unsigned integer", 0xd0))
        );
    }

    #[test]
    fn truncated_and_mismatched_input_is_an_error() {
        let err = Reader::new(&[0xa1, b'x']).read_uint().unwrap_err();
        assert!(err.to_string().contains("unsigned integer"), "{err}");
        assert_eq!(
            Reader::new(&[]).read_array_len(),
            Err(DecodeError::UnexpectedEnd)
        );
        assert_eq!(
            Reader::new(&[0xcd, 0x01]).read_uint(),
            Err(DecodeError::UnexpectedEnd)
        );
        assert_eq!(
            Reader::new(&[0xa5, b'a']).read_str(),
            Err(DecodeError::LengthExceedsInput {
                len: 5,
                remaining: 1
            })
        );
        assert_eq!(
            Reader::new(&[0xa2, 0xff, 0xfe]).read_str(),
            Err(DecodeError::InvalidUtf8 { valid_up_to: 0 })
        );
        assert_eq!(
            Reader::new(&[0x01, 0x02]).finish(),
            Err(DecodeError::TrailingBytes { count: 2 })
        );
    }

    #[test]
    fn read_value_decodes_one_element_as_decode_decodes_the_array() {
        let mut buf = Vec::new();
        crate::encode(&mut buf, &(vec![1u8, 2], "x", [[0u8; 0]; 1])).unwrap();
        let mut r = Reader::new(&buf);
        assert_eq!(r.read_array_len(), Ok(3));
        assert_eq!(r.read_value::<Vec<u8>>(1), Ok(vec![1, 2]));
        // A failed read does not move the reader.
        assert!(r.read_value::<u32>(1).is_err());
        assert_eq!(r.read_value::<String>(1), Ok("x".to_owned()));
        // Nesting is counted from the element, as a decode of the whole array with one
        // level more counts it.
        let rest = r.remaining();
        assert_eq!(
            r.read_value::<Vec<Vec<u8>>>(1),
            Err(DecodeError::DepthLimitExceeded)
        );
        assert_eq!(
            crate::decode::decode_prefix::<(Vec<u8>, String, Vec<Vec<u8>>)>(&buf, 2)
                .map(|(v, _)| v.2),
            Err(DecodeError::DepthLimitExceeded)
        );
        assert_eq!(r.remaining(), rest);
        assert_eq!(r.read_value::<Vec<Vec<u8>>>(2), Ok(vec![vec![]]));
        assert!(r.is_empty());
    }

    #[test]
    fn skip_walks_nested_values_and_refuses_truncation() {
        // {"a": [1, 2.5, nil], "b": bin8(3)}, then an ext and a negative fixint
        let v = [
            0x82, 0xa1, b'a', 0x93, 0x01, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0xc0, 0xa1, b'b', 0xc4, 3,
            1, 2, 3, 0xd6, 0x05, 1, 2, 3, 4, 0xe0,
        ];
        let mut r = Reader::new(&v);
        r.skip_value(16).unwrap();
        r.skip_value(16).unwrap();
        r.skip_value(0).unwrap();
        assert!(r.is_empty());
        for end in 0..22 {
            assert!(Reader::new(&v[..end]).skip_value(16).is_err(), "{end}");
        }
    }

    #[test]
    fn skip_refuses_deep_nesting_and_huge_lengths() {
        let deep = [vec![0x91; 100], vec![0xc0]].concat();
        assert_eq!(
            Reader::new(&deep).skip_value(16),
            Err(DecodeError::DepthLimitExceeded)
        );
        assert_eq!(Reader::new(&deep).skip_value(100), Ok(()));
        // An array claiming 2^32-1 elements in a 5-byte buffer, without looping over them.
        let huge = [0xdd, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            Reader::new(&huge).skip_value(16),
            Err(DecodeError::LengthExceedsInput { .. })
        ));
        let huge_ext = [0xc9, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert!(Reader::new(&huge_ext).skip_value(16).is_err());
    }
}
