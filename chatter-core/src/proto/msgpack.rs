//! The small subset of MessagePack that frame headers use, encoded and decoded by hand.
//!
//! Headers are a handful of unsigned integers, booleans and short strings. Writing them
//! directly (instead of through serde) keeps the hot path free of allocations and lets the
//! decoder reject anything unexpected with a precise message. `skip` walks any MessagePack
//! value so that newer peers can append header fields that older peers ignore.

use bytes::BufMut;

/// Why a header could not be decoded.
pub(crate) type Result<T> = std::result::Result<T, String>;

/// Nesting limit for [`skip`]: deeper values are rejected instead of recursing on peer input.
const MAX_DEPTH: u32 = 16;

pub(crate) fn write_array_len(out: &mut impl BufMut, len: u32) {
    if len < 16 {
        out.put_u8(0x90 | len as u8);
    } else if len <= u16::MAX as u32 {
        out.put_u8(0xdc);
        out.put_u16(len as u16);
    } else {
        out.put_u8(0xdd);
        out.put_u32(len);
    }
}

pub(crate) fn write_uint(out: &mut impl BufMut, v: u64) {
    if v < 128 {
        out.put_u8(v as u8);
    } else if v <= u8::MAX as u64 {
        out.put_u8(0xcc);
        out.put_u8(v as u8);
    } else if v <= u16::MAX as u64 {
        out.put_u8(0xcd);
        out.put_u16(v as u16);
    } else if v <= u32::MAX as u64 {
        out.put_u8(0xce);
        out.put_u32(v as u32);
    } else {
        out.put_u8(0xcf);
        out.put_u64(v);
    }
}

pub(crate) fn write_str(out: &mut impl BufMut, s: &str) {
    let len = s.len();
    if len < 32 {
        out.put_u8(0xa0 | len as u8);
    } else if len <= u8::MAX as usize {
        out.put_u8(0xd9);
        out.put_u8(len as u8);
    } else if len <= u16::MAX as usize {
        out.put_u8(0xda);
        out.put_u16(len as u16);
    } else {
        out.put_u8(0xdb);
        out.put_u32(len as u32);
    }
    out.put_slice(s.as_bytes());
}

/// A cursor over a frame body.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Bytes consumed so far.
    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    fn byte(&mut self) -> Result<u8> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or_else(|| "header ends early".to_string())?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or_else(|| "header ends early".to_string())?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn be(&mut self, n: usize) -> Result<u64> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | b as u64))
    }

    pub(crate) fn array_len(&mut self) -> Result<u32> {
        match self.byte()? {
            b @ 0x90..=0x9f => Ok((b & 0x0f) as u32),
            0xdc => Ok(self.be(2)? as u32),
            0xdd => Ok(self.be(4)? as u32),
            b => Err(format!("expected an array, found type byte 0x{b:02x}")),
        }
    }

    pub(crate) fn uint(&mut self) -> Result<u64> {
        match self.byte()? {
            b @ 0x00..=0x7f => Ok(b as u64),
            0xcc => self.be(1),
            0xcd => self.be(2),
            0xce => self.be(4),
            0xcf => self.be(8),
            b => Err(format!(
                "expected an unsigned integer, found type byte 0x{b:02x}"
            )),
        }
    }

    pub(crate) fn str(&mut self) -> Result<&'a str> {
        let len = match self.byte()? {
            b @ 0xa0..=0xbf => (b & 0x1f) as usize,
            0xd9 => self.be(1)? as usize,
            0xda => self.be(2)? as usize,
            0xdb => self.be(4)? as usize,
            b => return Err(format!("expected a string, found type byte 0x{b:02x}")),
        };
        std::str::from_utf8(self.take(len)?).map_err(|_| "string is not valid UTF-8".to_string())
    }

    /// Skips one value of any type.
    pub(crate) fn skip(&mut self) -> Result<()> {
        self.skip_depth(0)
    }

    fn skip_depth(&mut self, depth: u32) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err("header nests too deeply".to_string());
        }
        let b = self.byte()?;
        let (bytes, items): (usize, u64) = match b {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
            0x80..=0x8f => (0, 2 * (b & 0x0f) as u64),
            0x90..=0x9f => (0, (b & 0x0f) as u64),
            0xa0..=0xbf => ((b & 0x1f) as usize, 0),
            0xc4 | 0xd9 => (self.be(1)? as usize, 0),
            0xc5 | 0xda => (self.be(2)? as usize, 0),
            0xc6 | 0xdb => (self.be(4)? as usize, 0),
            0xc7 => (self.be(1)? as usize + 1, 0),
            0xc8 => (self.be(2)? as usize + 1, 0),
            0xc9 => (self.be(4)? as usize + 1, 0),
            0xca => (4, 0),
            0xcb => (8, 0),
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xce | 0xd2 => (4, 0),
            0xcf | 0xd3 => (8, 0),
            0xd4 => (2, 0),
            0xd5 => (3, 0),
            0xd6 => (5, 0),
            0xd7 => (9, 0),
            0xd8 => (17, 0),
            0xdc => (0, self.be(2)?),
            0xdd => (0, self.be(4)?),
            0xde => (0, 2 * self.be(2)?),
            0xdf => (0, 2 * self.be(4)?),
            0xc1 => return Err("type byte 0xc1 is never used in MessagePack".to_string()),
        };
        self.take(bytes)?;
        for _ in 0..items {
            self.skip_depth(depth + 1)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip_uint(v: u64) -> (Vec<u8>, u64) {
        let mut out = Vec::new();
        write_uint(&mut out, v);
        let got = Reader::new(&out).uint().unwrap();
        (out, got)
    }

    #[test]
    fn uints_use_the_shortest_form() {
        assert_eq!(roundtrip_uint(0), (vec![0x00], 0));
        assert_eq!(roundtrip_uint(127), (vec![0x7f], 127));
        assert_eq!(roundtrip_uint(128), (vec![0xcc, 0x80], 128));
        assert_eq!(roundtrip_uint(256), (vec![0xcd, 0x01, 0x00], 256));
        assert_eq!(roundtrip_uint(70000).0, vec![0xce, 0x00, 0x01, 0x11, 0x70]);
        assert_eq!(roundtrip_uint(u64::MAX).1, u64::MAX);
    }

    #[test]
    fn strings_and_arrays_roundtrip() {
        let mut out = Vec::new();
        write_array_len(&mut out, 2);
        write_str(&mut out, "chatter");
        write_str(&mut out, &"x".repeat(40));
        let mut r = Reader::new(&out);
        assert_eq!(r.array_len().unwrap(), 2);
        assert_eq!(r.str().unwrap(), "chatter");
        assert_eq!(r.str().unwrap().len(), 40);
        assert_eq!(r.position(), out.len());
    }

    #[test]
    fn skip_walks_nested_values_and_refuses_truncation() {
        // {"a": [1, 2.5, nil], "b": bin8(3)}
        let v = [
            0x82, 0xa1, b'a', 0x93, 0x01, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0xc0, 0xa1, b'b', 0xc4, 3,
            1, 2, 3,
        ];
        let mut r = Reader::new(&v);
        r.skip().unwrap();
        assert_eq!(r.position(), v.len());
        assert!(Reader::new(&v[..v.len() - 1]).skip().is_err());
    }

    #[test]
    fn skip_refuses_deep_nesting_and_huge_lengths() {
        let deep = vec![0x91; 100];
        assert!(Reader::new(&deep).skip().is_err());
        // An array claiming 2^32-1 elements in a 5-byte buffer ends early, without allocating.
        let huge = [0xdd, 0xff, 0xff, 0xff, 0xff];
        assert!(Reader::new(&huge).skip().is_err());
    }

    #[test]
    fn wrong_types_are_described() {
        let err = Reader::new(&[0xa1, b'x']).uint().unwrap_err();
        assert!(err.contains("unsigned integer"), "{err}");
        assert!(Reader::new(&[]).array_len().is_err());
    }
}
