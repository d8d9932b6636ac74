//! Writers of single MessagePack values and headers, for hand-written headers and
//! envelopes. Each writes the shortest form, exactly as `rmp::encode` does, and the serde
//! encoder is built on them.

/// Where the writers append bytes: a `Vec<u8>`, or (feature `bytes`) a `bytes::BytesMut`.
///
/// Statically dispatched: every writer is generic over it and inlines to plain pushes.
pub trait Output {
    /// Appends one byte.
    fn put_u8(&mut self, byte: u8);
    /// Appends bytes.
    fn put_slice(&mut self, bytes: &[u8]);
}

impl Output for Vec<u8> {
    #[inline]
    fn put_u8(&mut self, byte: u8) {
        self.push(byte);
    }

    #[inline]
    fn put_slice(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

#[cfg(feature = "bytes")]
impl Output for bytes::BytesMut {
    #[inline]
    fn put_u8(&mut self, byte: u8) {
        self.extend_from_slice(&[byte]);
    }

    #[inline]
    fn put_slice(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// The most bytes [`write_uint`] and [`write_uint_at`] write.
pub const MAX_UINT_LEN: usize = 9;

/// A marker byte and its big-endian data.
#[inline]
fn marked<O: Output + ?Sized>(out: &mut O, marker: u8, data: &[u8]) {
    out.put_u8(marker);
    out.put_slice(data);
}

/// Writes nil (`0xc0`).
#[inline]
pub fn write_nil<O: Output + ?Sized>(out: &mut O) {
    out.put_u8(0xc0);
}

/// Writes a boolean.
#[inline]
pub fn write_bool<O: Output + ?Sized>(out: &mut O, v: bool) {
    out.put_u8(if v { 0xc3 } else { 0xc2 });
}

/// Writes an unsigned integer in its shortest form (positive fixint, uint 8/16/32/64).
#[inline]
pub fn write_uint<O: Output + ?Sized>(out: &mut O, v: u64) {
    if v < 0x80 {
        out.put_u8(v as u8);
    } else if v < 0x100 {
        out.put_slice(&[0xcc, v as u8]);
    } else if v < 0x1_0000 {
        marked(out, 0xcd, &(v as u16).to_be_bytes());
    } else if v < 0x1_0000_0000 {
        marked(out, 0xce, &(v as u32).to_be_bytes());
    } else {
        marked(out, 0xcf, &v.to_be_bytes());
    }
}

/// Writes a signed integer in its shortest form: non-negative values as [`write_uint`]
/// does, negative ones as negative fixint or int 8/16/32/64.
#[inline]
pub fn write_sint<O: Output + ?Sized>(out: &mut O, v: i64) {
    if v >= 0 {
        write_uint(out, v as u64);
    } else if v >= -32 {
        out.put_u8(v as u8);
    } else if v >= -128 {
        out.put_slice(&[0xd0, v as u8]);
    } else if v >= -32768 {
        marked(out, 0xd1, &(v as i16).to_be_bytes());
    } else if v >= -2_147_483_648 {
        marked(out, 0xd2, &(v as i32).to_be_bytes());
    } else {
        marked(out, 0xd3, &v.to_be_bytes());
    }
}

/// Writes a float 32.
#[inline]
pub fn write_f32<O: Output + ?Sized>(out: &mut O, v: f32) {
    marked(out, 0xca, &v.to_bits().to_be_bytes());
}

/// Writes a float 64.
#[inline]
pub fn write_f64<O: Output + ?Sized>(out: &mut O, v: f64) {
    marked(out, 0xcb, &v.to_bits().to_be_bytes());
}

/// Writes the header of a string of `len` bytes; the bytes must follow.
#[inline]
pub fn write_str_len<O: Output + ?Sized>(out: &mut O, len: u32) {
    if len < 32 {
        out.put_u8(0xa0 | len as u8);
    } else if len < 0x100 {
        out.put_slice(&[0xd9, len as u8]);
    } else if len < 0x1_0000 {
        marked(out, 0xda, &(len as u16).to_be_bytes());
    } else {
        marked(out, 0xdb, &len.to_be_bytes());
    }
}

/// Writes a string.
///
/// # Panics
///
/// If `s` is longer than `u32::MAX` bytes, which MessagePack cannot express.
#[inline]
pub fn write_str<O: Output + ?Sized>(out: &mut O, s: &str) {
    write_str_len(out, len32(s.len()));
    out.put_slice(s.as_bytes());
}

/// Writes the header of a byte string of `len` bytes; the bytes must follow.
#[inline]
pub fn write_bin_len<O: Output + ?Sized>(out: &mut O, len: u32) {
    if len < 0x100 {
        out.put_slice(&[0xc4, len as u8]);
    } else if len < 0x1_0000 {
        marked(out, 0xc5, &(len as u16).to_be_bytes());
    } else {
        marked(out, 0xc6, &len.to_be_bytes());
    }
}

/// Writes a byte string.
///
/// # Panics
///
/// If `b` is longer than `u32::MAX` bytes, which MessagePack cannot express.
#[inline]
pub fn write_bin<O: Output + ?Sized>(out: &mut O, b: &[u8]) {
    write_bin_len(out, len32(b.len()));
    out.put_slice(b);
}

/// Writes the header of an array of `len` elements; the elements must follow.
#[inline]
pub fn write_array_len<O: Output + ?Sized>(out: &mut O, len: u32) {
    container_len(out, len, 0x90, 0xdc);
}

/// Writes the header of a map of `len` entries; the keys and values must follow, in turn.
#[inline]
pub fn write_map_len<O: Output + ?Sized>(out: &mut O, len: u32) {
    container_len(out, len, 0x80, 0xde);
}

/// A container header: the fix form under 16, else the 16-bit marker `m16` or the 32-bit
/// one that follows it.
#[inline]
fn container_len<O: Output + ?Sized>(out: &mut O, len: u32, fix: u8, m16: u8) {
    if len < 16 {
        out.put_u8(fix | len as u8);
    } else if len < 0x1_0000 {
        marked(out, m16, &(len as u16).to_be_bytes());
    } else {
        marked(out, m16 + 1, &len.to_be_bytes());
    }
}

/// Writes the header of an ext value of `len` data bytes with type `tag`, as rmp-serde
/// does (fixext for 1, 2, 4, 8 and 16 bytes); the data must follow.
#[inline]
pub fn write_ext_meta<O: Output + ?Sized>(out: &mut O, len: u32, tag: i8) {
    match len {
        1 => out.put_u8(0xd4),
        2 => out.put_u8(0xd5),
        4 => out.put_u8(0xd6),
        8 => out.put_u8(0xd7),
        16 => out.put_u8(0xd8),
        0..=0xff => out.put_slice(&[0xc7, len as u8]),
        0x100..=0xffff => marked(out, 0xc8, &(len as u16).to_be_bytes()),
        _ => marked(out, 0xc9, &len.to_be_bytes()),
    }
    out.put_u8(tag as u8);
}

/// Writes `v` as [`write_uint`] does at `buf[at..]` and returns the position after it.
///
/// For headers assembled on the stack: each width is its own fixed-size store, with no
/// call to `memcpy`. Room for [`MAX_UINT_LEN`] bytes always suffices.
///
/// # Panics
///
/// If the encoding does not fit in `buf[at..]`.
#[inline(always)]
pub fn write_uint_at(buf: &mut [u8], at: usize, v: u64) -> usize {
    match v {
        0..=0x7f => {
            buf[at] = v as u8;
            at + 1
        }
        0x80..=0xff => {
            buf[at] = 0xcc;
            buf[at + 1] = v as u8;
            at + 2
        }
        0x100..=0xffff => {
            buf[at] = 0xcd;
            buf[at + 1..at + 3].copy_from_slice(&(v as u16).to_be_bytes());
            at + 3
        }
        0x1_0000..=0xffff_ffff => {
            buf[at] = 0xce;
            buf[at + 1..at + 5].copy_from_slice(&(v as u32).to_be_bytes());
            at + 5
        }
        _ => {
            buf[at] = 0xcf;
            buf[at + 1..at + 9].copy_from_slice(&v.to_be_bytes());
            at + 9
        }
    }
}

/// A length as MessagePack carries it.
#[inline]
fn len32(len: usize) -> u32 {
    match u32::try_from(len) {
        Ok(len) => len,
        Err(_) => too_long(len),
    }
}

#[cold]
#[inline(never)]
fn too_long(len: usize) -> ! {
    panic!(
        "a length of {len} exceeds the MessagePack maximum of {}",
        u32::MAX
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writers_match_rmp() {
        for v in [0, 1, 127, 128, 255, 256, 65_535, 65_536, 1 << 32, u64::MAX] {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            write_uint(&mut ours, v);
            rmp::encode::write_uint(&mut theirs, v).unwrap();
            assert_eq!(ours, theirs, "{v}");
            let mut at = [0u8; 3 + MAX_UINT_LEN];
            let end = write_uint_at(&mut at, 3, v);
            assert_eq!(at[3..end], theirs[..], "{v} at an offset");
        }
        for v in [
            0,
            -1,
            -32,
            -33,
            -128,
            -129,
            -32768,
            -32769,
            i64::MIN,
            i64::MAX,
        ] {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            write_sint(&mut ours, v);
            rmp::encode::write_sint(&mut theirs, v).unwrap();
            assert_eq!(ours, theirs, "{v}");
        }
        for len in [0, 1, 15, 16, 31, 32, 255, 256, 65_535, 65_536, 70_000] {
            let s = "x".repeat(len as usize);
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            write_str(&mut ours, &s);
            write_bin(&mut ours, s.as_bytes());
            write_array_len(&mut ours, len);
            write_map_len(&mut ours, len);
            write_ext_meta(&mut ours, len, -3);
            rmp::encode::write_str(&mut theirs, &s).unwrap();
            rmp::encode::write_bin(&mut theirs, s.as_bytes()).unwrap();
            rmp::encode::write_array_len(&mut theirs, len).unwrap();
            rmp::encode::write_map_len(&mut theirs, len).unwrap();
            rmp::encode::write_ext_meta(&mut theirs, len, -3).unwrap();
            assert_eq!(ours, theirs, "{len}");
        }
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        write_nil(&mut ours);
        write_bool(&mut ours, true);
        write_bool(&mut ours, false);
        write_f32(&mut ours, 1.5);
        write_f64(&mut ours, -0.25);
        rmp::encode::write_nil(&mut theirs).unwrap();
        rmp::encode::write_bool(&mut theirs, true).unwrap();
        rmp::encode::write_bool(&mut theirs, false).unwrap();
        rmp::encode::write_f32(&mut theirs, 1.5).unwrap();
        rmp::encode::write_f64(&mut theirs, -0.25).unwrap();
        assert_eq!(ours, theirs);
    }
}
