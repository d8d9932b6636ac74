//! The MessagePack codec of payloads: [`chatter_msgpack`]'s serde encoder and decoder.
//!
//! [`Connection::send`](crate::Connection::send) and [`Msg::decode`](crate::Msg::decode)
//! encode and decode with it, and chatter-rpc uses it for every argument, result and
//! signal. It writes exactly what rmp-serde 1.3 writes with
//! `Serializer::new(w).with_struct_map()` and reads what `rmp_serde::from_slice` reads,
//! but decodes every input itself, counting nesting on every path: values nested deeper
//! than [`MAX_DEPTH`] levels are refused, so a peer cannot make the decoder overflow the
//! stack.
//!
//! ```
//! let mut buf = Vec::new();
//! chatter_core::codec::encode(&mut buf, &("add", [1, 2]))?;
//! let back: (String, Vec<i32>) = chatter_core::codec::decode(&buf)?;
//! assert_eq!(back, ("add".to_string(), vec![1, 2]));
//!
//! // A peer cannot make the decoder recurse without end.
//! let bomb = [[0x91u8; 600].as_slice(), &[0xc0]].concat();
//! let refused = chatter_core::codec::decode::<serde::de::IgnoredAny>(&bomb);
//! assert!(matches!(
//!     refused,
//!     Err(chatter_core::codec::DecodeError::DepthLimitExceeded)
//! ));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub use chatter_msgpack::{decode, encode, DecodeError, EncodeError, MAX_DEPTH};
