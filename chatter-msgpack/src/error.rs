//! The errors of encoding and decoding.

use std::cell::Cell;
use std::fmt;

/// Why bytes could not be decoded.
///
/// Kept small (no heap data except in [`Custom`](Self::Custom)), so that a decoder whose
/// error is thrown away (`.ok()`) costs nothing to build it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended inside a value.
    UnexpectedEnd,
    /// A value of another type than the one expected.
    TypeMismatch {
        /// What was expected, in words ("an array").
        expected: &'static str,
        /// The marker byte found instead.
        found: u8,
    },
    /// A string, byte string, ext value, array or map claims more than the input holds.
    LengthExceedsInput {
        /// The length claimed by the header (bytes, or elements for arrays and maps).
        len: u64,
        /// The bytes left in the input after the header.
        remaining: usize,
    },
    /// An array or map has another number of elements than the type reads from it.
    LengthMismatch {
        /// The length the header announced.
        len: u32,
        /// How many elements the type read.
        read: u32,
    },
    /// An integer that does not fit in the type it is read as.
    OutOfRange {
        /// The type it was read as.
        target: &'static str,
    },
    /// A string that is not valid UTF-8.
    InvalidUtf8 {
        /// The length of its valid prefix.
        valid_up_to: usize,
    },
    /// Arrays, maps and enums nest deeper than the decoder allows
    /// ([`MAX_DEPTH`](crate::MAX_DEPTH) for [`decode`](crate::decode)).
    DepthLimitExceeded,
    /// Bytes follow the value where none may.
    TrailingBytes {
        /// How many.
        count: usize,
    },
    /// A message from a `Deserialize` impl (a missing field, an unknown variant, ...).
    Custom(Box<str>),
}

impl DecodeError {
    /// A type mismatch: `expected` was wanted, `found` is the marker byte read.
    #[cold]
    pub(crate) fn mismatch(expected: &'static str, found: u8) -> DecodeError {
        DecodeError::TypeMismatch { expected, found }
    }
}

impl fmt::Display for DecodeError {
    #[cold]
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::UnexpectedEnd => f.write_str("the input ends inside a value"),
            DecodeError::TypeMismatch { expected, found } => write!(
                f,
                "expected {expected}, found {} (marker 0x{found:02x})",
                marker_name(*found)
            ),
            DecodeError::LengthExceedsInput { len, remaining } => write!(
                f,
                "a length of {len} exceeds the {remaining} bytes left in the input"
            ),
            DecodeError::LengthMismatch { len, read } => write!(
                f,
                "an array or map of {len} elements where {read} were expected"
            ),
            DecodeError::OutOfRange { target } => {
                write!(f, "an integer out of the range of {target}")
            }
            DecodeError::InvalidUtf8 { valid_up_to } => write!(
                f,
                "a string that is not valid UTF-8 (after {valid_up_to} valid bytes)"
            ),
            DecodeError::DepthLimitExceeded => {
                f.write_str("arrays, maps and enums nest deeper than the limit")
            }
            DecodeError::TrailingBytes { count } => {
                write!(f, "{count} bytes follow the value")
            }
            DecodeError::Custom(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for DecodeError {}

impl serde::de::Error for DecodeError {
    #[cold]
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DecodeError::Custom(msg.to_string().into_boxed_str())
    }
}

/// Why a value could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EncodeError {
    /// A string, byte string, sequence or map longer than MessagePack can express
    /// (`u32::MAX`).
    LengthTooLarge {
        /// Its length.
        len: usize,
    },
    /// A value named `_ExtStruct` (rmp-serde's convention for MessagePack ext values) that
    /// is not a tuple of an `i8` tag and bytes.
    InvalidExt(&'static str),
    /// A message from a `Serialize` impl.
    Custom(Box<str>),
}

impl fmt::Display for EncodeError {
    #[cold]
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::LengthTooLarge { len } => write!(
                f,
                "a length of {len} exceeds the MessagePack maximum of {}",
                u32::MAX
            ),
            EncodeError::InvalidExt(what) => write!(f, "invalid ext value: {what}"),
            EncodeError::Custom(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for EncodeError {}

impl serde::ser::Error for EncodeError {
    #[cold]
    fn custom<T: fmt::Display>(msg: T) -> Self {
        EncodeError::Custom(msg.to_string().into_boxed_str())
    }
}

/// An error boxed to one pointer: what the serde encoder passes around, so that its
/// results stay in registers on the hot path (a `Result<(), EncodeError>` is 24 bytes,
/// returned through memory by every nested call). Unboxed at the public boundary; built
/// only on the cold error path.
pub(crate) struct Boxed<E>(pub(crate) Box<E>);

/// Boxes an error.
#[cold]
#[inline(never)]
pub(crate) fn fail<E>(e: E) -> Boxed<E> {
    Boxed(Box::new(e))
}

impl<E: fmt::Debug> fmt::Debug for Boxed<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl<E: fmt::Display> fmt::Display for Boxed<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl<E: std::error::Error> std::error::Error for Boxed<E> {}

impl serde::ser::Error for Boxed<EncodeError> {
    #[cold]
    fn custom<T: fmt::Display>(msg: T) -> Self {
        fail(<EncodeError as serde::ser::Error>::custom(msg))
    }
}

/// The serde decoder's error: zero-sized, so that a `Result<T, Failed>` is no larger than
/// an `Option<T>` and every visitor call returns its value in registers. (A one-pointer
/// error is not enough: a `Result<Option<i64>, Box<_>>` holds an integer or a pointer in
/// the same place, which the Rust ABI returns through memory, and visitor methods that
/// build real errors are too big to inline.)
///
/// What went wrong is recorded when the error is raised, by [`raise`] (the decoder's own
/// errors) or by `serde::de::Error::custom` (a `Deserialize` impl's), in a slot of the
/// current thread, and [`take_raised`] turns it into the [`DecodeError`] returned by
/// [`decode`](crate::decode), once, at the top. The slot is per thread and a `Failed` can
/// only be made by raising one, so the error a decode returns is the last one raised on
/// its thread during that decode, as with an error passed by value; errors raised and
/// dropped by a `Deserialize` impl stay in the slot, unread, until the next one replaces
/// them. Nothing on the success path touches the slot.
pub(crate) struct Failed {
    _private: (),
}

std::thread_local! {
    /// The last error raised by a decoder on this thread.
    static RAISED: Cell<Option<DecodeError>> = const { Cell::new(None) };
}

/// Records `e` as the decoder's error and returns the token that propagates it.
#[cold]
#[inline(never)]
pub(crate) fn raise(e: DecodeError) -> Failed {
    // Only while the thread's locals are being destroyed is the slot gone; the error is
    // then reported without its details (see `take_raised`).
    let _ = RAISED.try_with(|slot| slot.set(Some(e)));
    Failed { _private: () }
}

/// The error recorded by the last [`raise`] on this thread, taken out of its slot.
#[cold]
#[inline(never)]
pub(crate) fn take_raised() -> DecodeError {
    RAISED
        .try_with(Cell::take)
        .ok()
        .flatten()
        .unwrap_or_else(|| DecodeError::Custom(LOST.into()))
}

/// The message of an error whose details were lost (only if a `Deserialize` impl runs a
/// nested [`decode`](crate::decode) that fails while it holds an error of its own, or
/// during the destruction of the thread's locals).
const LOST: &str = "the value could not be decoded";

impl fmt::Debug for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Failed")
    }
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(LOST)
    }
}

impl std::error::Error for Failed {}

impl serde::de::Error for Failed {
    #[cold]
    fn custom<T: fmt::Display>(msg: T) -> Self {
        raise(<DecodeError as serde::de::Error>::custom(msg))
    }
}

/// The MessagePack type a marker byte starts, for messages.
pub(crate) fn marker_name(marker: u8) -> &'static str {
    match marker {
        0x00..=0x7f | 0xcc..=0xcf => "an unsigned integer",
        0xe0..=0xff | 0xd0..=0xd3 => "a signed integer",
        0x80..=0x8f | 0xde | 0xdf => "a map",
        0x90..=0x9f | 0xdc | 0xdd => "an array",
        0xa0..=0xbf | 0xd9..=0xdb => "a string",
        0xc0 => "nil",
        0xc1 => "the unused marker",
        0xc2 | 0xc3 => "a boolean",
        0xc4..=0xc6 => "a byte string",
        0xc7..=0xc9 | 0xd4..=0xd8 => "an ext value",
        0xca | 0xcb => "a float",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_small_send_sync_and_say_what_happened() {
        fn assert_error<T: std::error::Error + Send + Sync + 'static>() {}
        assert_error::<DecodeError>();
        assert_error::<EncodeError>();
        assert!(std::mem::size_of::<DecodeError>() <= 24);
        let e = DecodeError::mismatch("an array", 0xa3);
        assert_eq!(
            e.to_string(),
            "expected an array, found a string (marker 0xa3)"
        );
        for b in 0..=255u8 {
            assert!(!marker_name(b).is_empty());
        }
    }
}
