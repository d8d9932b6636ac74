//! How `#[remote]`-generated code sends and receives the values of a remote trait: the
//! bounds it names for each argument, return and error type ([`Sendable`], [`Receivable`]),
//! and the argument array, written ([`ArgsWriter`]) and read ([`decode_args`]) one
//! argument at a time.
//!
//! Generated code names each type of the user's trait in its own call, with the type as
//! the call's explicit generic argument: a type that is not serde-serializable is then
//! reported once, at the type in the user's trait, with the message of the trait it lacks,
//! rather than as a tuple of all arguments failing a bound inside chatter.
//!
//! The wire form is the same as for a tuple of the arguments (`PROTOCOL.md`, "Arguments"):
//! one MessagePack array in declaration order, and nil for a method without arguments.

use chatter_msgpack::{self as msgpack, DecodeError, Reader};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::service::Dispatch;
use crate::wire::{self, WireError};

/// A type chatter can send: one that implements serde's `Serialize`. Generated code
/// requires it of the argument types (on the caller), and of return and application error
/// types (on the callee), so that a type without `Serialize` is an error that says so, at
/// the type.
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be sent by chatter: it does not implement `Serialize`",
    label = "needs `serde::Serialize`",
    note = "arguments, return values and application errors of a `#[remote]` trait travel \
            through serde: add `#[derive(serde::Serialize, serde::Deserialize)]` to `{Self}` \
            (or to the types it contains)"
)]
pub trait Sendable: Serialize {}

// Not recommended: without this, the compiler reports the `Serialize` bound below instead
// of `Sendable`, with serde's message.
#[diagnostic::do_not_recommend]
impl<T: Serialize + ?Sized> Sendable for T {}

/// A type chatter can receive: one that implements serde's `Deserialize` for any lifetime
/// (`DeserializeOwned`). Generated code requires it of the argument types (on the callee)
/// and of return and application error types (on the caller).
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be received by chatter: it does not implement `Deserialize`",
    label = "needs `serde::Deserialize`",
    note = "arguments, return values and application errors of a `#[remote]` trait travel \
            through serde: add `#[derive(serde::Serialize, serde::Deserialize)]` to `{Self}` \
            (or to the types it contains); a type that borrows (`&str`, `Cow<'a, T>`) \
            cannot be received: use an owned type"
)]
pub trait Receivable: DeserializeOwned {}

#[diagnostic::do_not_recommend]
impl<T: DeserializeOwned> Receivable for T {}

/// Why an argument could not be written or read. Generated code only passes it on.
#[doc(hidden)]
#[derive(Debug)]
pub struct ArgError(Box<Failed>);

#[derive(Debug)]
enum Failed {
    Encode(WireError),
    Decode(DecodeError),
}

/// Writes the arguments of a call or signal into the request's argument array, which the
/// client has opened with the number of arguments. Generated code only.
#[doc(hidden)]
#[derive(Debug)]
pub struct ArgsWriter<'a> {
    w: &'a mut Vec<u8>,
}

impl ArgsWriter<'_> {
    /// Writes the next argument.
    #[inline]
    pub fn arg<T: Sendable + ?Sized>(&mut self, value: &T) -> Result<(), ArgError> {
        wire::value(self.w, value).map_err(|e| ArgError(Box::new(Failed::Encode(e))))
    }
}

impl ArgError {
    #[cold]
    #[inline(never)]
    fn into_wire(self) -> WireError {
        match *self.0 {
            Failed::Encode(e) => e,
            Failed::Decode(e) => WireError(e.to_string()),
        }
    }
}

/// Writes an argument array of `count` arguments, each written by `args`: nil for none
/// (serde's `()`), else an array, as a tuple of the arguments is written.
#[inline]
pub(crate) fn write_args<F>(w: &mut Vec<u8>, count: u32, args: F) -> Result<(), WireError>
where
    F: FnOnce(&mut ArgsWriter<'_>) -> Result<(), ArgError>,
{
    match count {
        0 => msgpack::write_nil(w),
        // A fixarray: one byte, written here so that it folds into a constant store
        // wherever the generated method inlines this.
        1..16 => w.push(0x90 | count as u8),
        _ => msgpack::write_array_len(w, count),
    }
    match args(&mut ArgsWriter { w }) {
        Ok(()) => Ok(()),
        Err(e) => Err(e.into_wire()),
    }
}

/// Reads the arguments of a method from their array, one by one. Generated code only.
#[doc(hidden)]
#[derive(Debug)]
pub struct ArgsReader<'a> {
    r: Reader<'a>,
}

impl ArgsReader<'_> {
    /// Reads the next argument.
    #[inline]
    pub fn arg<T: Receivable>(&mut self) -> Result<T, ArgError> {
        // The elements of the array are one level down, as in a decode of the whole tuple.
        self.r
            .read_value(msgpack::MAX_DEPTH - 1)
            .map_err(|e| ArgError(Box::new(Failed::Decode(e))))
    }
}

/// Decodes the arguments of `method`, which takes `count` of them (at least one): an
/// array of `count` elements, each read by `read` in declaration order. What follows the
/// array is ignored, as it was when the arguments were decoded as a tuple. The error
/// names the method and the argument types: `arguments of `add`: cannot decode (i64, i64):
/// …`.
#[doc(hidden)]
pub fn decode_args<A, F>(method: &str, args: &[u8], count: u32, read: F) -> Result<A, Dispatch>
where
    F: FnOnce(&mut ArgsReader<'_>) -> Result<A, ArgError>,
{
    let mut reader = ArgsReader {
        r: Reader::new(args),
    };
    let decoded = match reader.r.read_array_len() {
        Ok(len) if len == count => read(&mut reader),
        Ok(len) => Err(ArgError(Box::new(Failed::Decode(
            DecodeError::LengthMismatch { len, read: count },
        )))),
        Err(e) => Err(ArgError(Box::new(Failed::Decode(e)))),
    };
    decoded.map_err(|e| bad_arguments::<A>(method, e))
}

/// Decodes the arguments of `method`, which takes none: nil, as the Rust client sends
/// them (serde's `()`), or an empty array, which implementations in other languages
/// naturally send for an empty argument list (PROTOCOL.md, "Arguments").
#[doc(hidden)]
pub fn decode_no_args(method: &str, args: &[u8]) -> Result<(), Dispatch> {
    match args {
        [0xc0] | [0x90] => Ok(()),
        _ => wire::decode_value::<()>(args)
            .map_err(|e| Dispatch::BadArguments(format!("arguments of `{method}`: {e}"))),
    }
}

#[cold]
#[inline(never)]
fn bad_arguments<A>(method: &str, e: ArgError) -> Dispatch {
    let e = match *e.0 {
        Failed::Decode(e) => wire::decode_error(std::any::type_name::<A>(), e),
        Failed::Encode(e) => e,
    };
    Dispatch::BadArguments(format!("arguments of `{method}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(
        count: u32,
        args: impl FnOnce(&mut ArgsWriter<'_>) -> Result<(), ArgError>,
    ) -> Vec<u8> {
        let mut w = Vec::new();
        write_args(&mut w, count, args).unwrap();
        w
    }

    fn tuple<T: Serialize>(value: &T) -> Vec<u8> {
        let mut w = Vec::new();
        msgpack::encode(&mut w, value).unwrap();
        w
    }

    #[test]
    fn arguments_are_written_as_their_tuple() {
        assert_eq!(written(0, |_| Ok(())), tuple(&()));
        assert_eq!(written(1, |w| w.arg(&5u64)), tuple(&(5u64,)));
        let (a, b) = ("x".to_owned(), vec![1u8, 2]);
        assert_eq!(
            written(3, |w| {
                w.arg(&a)?;
                w.arg(&b)?;
                w.arg(&-1i64)
            }),
            tuple(&(&a, &b, -1i64))
        );
    }

    #[test]
    fn arguments_are_read_as_their_tuple() {
        let bytes = tuple(&(2i64, "three", vec![4u8]));
        let read = decode_args("m", &bytes, 3, |r| {
            Ok((r.arg::<i64>()?, r.arg::<String>()?, r.arg::<Vec<u8>>()?))
        });
        assert_eq!(read, Ok((2, "three".to_owned(), vec![4])));
        let one = decode_args("m", &tuple(&(7u8,)), 1, |r| Ok((r.arg::<u8>()?,)));
        assert_eq!(one, Ok((7,)));
        assert_eq!(decode_no_args("m", &tuple(&())), Ok(()));
        assert_eq!(decode_no_args("m", &[0x90]), Ok(()));
    }

    #[test]
    fn bad_arguments_name_the_method_and_the_argument_types() {
        let add =
            |bytes: &[u8]| decode_args("add", bytes, 2, |r| Ok((r.arg::<i64>()?, r.arg::<i64>()?)));
        let what = |d: Result<(i64, i64), Dispatch>| match d {
            Err(Dispatch::BadArguments(what)) => what,
            other => panic!("expected bad arguments, got {other:?}"),
        };
        let wrong_type = what(add(&tuple(&("1", 2))));
        assert!(
            wrong_type.starts_with("arguments of `add`: cannot decode (i64, i64): "),
            "{wrong_type}"
        );
        for (bytes, count) in [(tuple(&(1,)), 1), (tuple(&(1, 2, 3)), 3)] {
            let message = what(add(&bytes));
            assert!(
                message.ends_with(&format!(
                    "cannot decode (i64, i64): an array or map of {count} elements where 2 \
                     were expected"
                )),
                "{message}"
            );
        }
        let bare = what(add(&tuple(&5)));
        assert!(bare.contains("cannot decode (i64, i64)"), "{bare}");
        assert!(what(add(&[])).contains("cannot decode (i64, i64)"));
        let bomb = [[0x92u8, 0x01].as_slice(), &[0x91; 600], &[0xc0]].concat();
        let deep = decode_args("m", &bomb, 2, |r| {
            Ok((r.arg::<i64>()?, r.arg::<serde::de::IgnoredAny>()?))
        });
        assert!(
            matches!(&deep, Err(Dispatch::BadArguments(what)) if what.contains("nested more than")),
            "{deep:?}"
        );
    }
}
