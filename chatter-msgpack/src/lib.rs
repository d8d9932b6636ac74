//! The MessagePack codec of the chatter RPC framework: one encoder and one decoder for
//! user values (serde) and for the hand-written headers and envelopes of the protocol.
//!
//! - [`encode`] and [`decode`] write and read serde values exactly as rmp-serde 1.3 does
//!   with `Serializer::new(w).with_struct_map().with_bytes(BytesMode::ForceIterables)`
//!   (sequences of bytes such as `Vec<u8>` as `bin`) and `from_slice`, including the forms
//!   rmp-serde accepts that are not what it writes (structs as arrays, a byte string as a
//!   sequence of bytes, integers of any width where they fit, enums as a variant name or a
//!   one-entry map, ext values as `_ExtStruct`). They serialize straight into a `Vec<u8>`
//!   and deserialize straight from a `&[u8]`, without rmp-serde's generic reader, writer
//!   and error machinery, which costs about a hundred instructions per integer.
//! - [`decode`] handles every input itself and counts nesting on every path: arrays, maps,
//!   enums in their `{variant: content}` form and ext values nested deeper than
//!   [`MAX_DEPTH`] are refused with [`DecodeError::DepthLimitExceeded`]. rmp-serde does not
//!   count the levels of enums, so a recursive enum type nested 200,000 levels deep
//!   overflows the stack through it, which aborts the process.
//! - The `write_*` functions and [`Reader`] read and write single values, for headers and
//!   envelopes written by hand, in the same shortest forms.
//!
//! ```
//! use chatter_msgpack::{decode, encode, DecodeError, Reader};
//!
//! let mut buf = Vec::new();
//! encode(&mut buf, &("add", [1, 2]))?;
//! assert_eq!(buf, [0x92, 0xa3, b'a', b'd', b'd', 0x92, 0x01, 0x02]);
//! let back: (String, Vec<i32>) = decode(&buf)?;
//! assert_eq!(back, ("add".to_string(), vec![1, 2]));
//!
//! // The same bytes, read one value at a time.
//! let mut r = Reader::new(&buf);
//! assert_eq!(r.read_array_len()?, 2);
//! assert_eq!(r.read_str()?, "add");
//!
//! // A peer cannot make the decoder recurse without end.
//! let bomb = [[0x91u8; 600].as_slice(), &[0xc0]].concat();
//! let refused = decode::<serde::de::IgnoredAny>(&bomb);
//! assert_eq!(refused.unwrap_err(), DecodeError::DepthLimitExceeded);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
#![forbid(unsafe_code)]

mod decode;
mod encode;
mod error;
mod reader;
mod write;

pub use decode::{decode, MAX_DEPTH};
pub use encode::encode;
pub use error::{DecodeError, EncodeError};
pub use reader::{Integer, Reader};
pub use write::{
    write_array_len, write_bin, write_bin_len, write_bool, write_ext_meta, write_f32, write_f64,
    write_map_len, write_nil, write_sint, write_str, write_str_len, write_uint, write_uint_at,
    Output, MAX_UINT_LEN,
};

#[cfg(test)]
mod tests;
