//! The frame decoder: `decode_frame` splitting a byte stream into frame bodies, and
//! `Frame::decode` on each body (and on the raw input, so the fuzzer can explore header
//! shapes without first finding a matching length prefix).
//!
//! Input: one byte choosing the frame limit, then the stream.
//!
//! Invariants checked, beyond "no panic":
//! - `decode_frame` consumes exactly one length prefix and body, never a body above the
//!   limit, and says "need more" only when the frame really is incomplete;
//! - a decoded frame re-encodes to a frame that decodes to the same value, and no longer
//!   than the original (the encoder writes the shortest form).

#![no_main]

use bytes::{Bytes, BytesMut};
use chatter_core::proto::frame::{decode_frame, Frame, LENGTH_PREFIX, MAX_HELLO};
use libfuzzer_sys::fuzz_target;

/// The limits a receiver uses (the hello limit, the smallest allowed, the default) and a
/// few edge values. All stay small enough that reserving a whole frame is harmless.
const LIMITS: [u32; 8] = [0, 1, 2, 16, 64, MAX_HELLO, 65_536, 4 * 1024 * 1024];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, stream)) = data.split_first() else {
        return;
    };
    let max = LIMITS[pick as usize % LIMITS.len()];

    if let Ok(frame) = Frame::decode(Bytes::copy_from_slice(stream)) {
        check_roundtrip(&frame, stream.len());
    }

    let mut buf = BytesMut::from(stream);
    loop {
        let before = buf.len();
        let prefix = buf
            .first_chunk::<LENGTH_PREFIX>()
            .map(|p| u32::from_be_bytes(*p));
        match decode_frame(&mut buf, max) {
            Ok(Some(body)) => {
                let len = prefix.expect("a frame was split off without a length prefix");
                assert_eq!(body.len(), len as usize);
                assert!(len <= max, "a body of {len} bytes passed the limit {max}");
                assert_eq!(before - buf.len(), LENGTH_PREFIX + body.len());
                let body_len = body.len();
                if let Ok(frame) = Frame::decode(body) {
                    check_roundtrip(&frame, body_len);
                }
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "`need more` consumed bytes");
                if let Some(len) = prefix {
                    assert!(len <= max, "a length of {len} above {max} was not refused");
                    assert!(
                        buf.len() < LENGTH_PREFIX + len as usize,
                        "a complete frame of {len} bytes was not split off"
                    );
                }
                break;
            }
            Err(_) => {
                let len = prefix.expect("an error before the length prefix was complete");
                assert!(len > max, "a length of {len} within {max} was refused");
                break;
            }
        }
    }
});

/// Encodes `frame`, decodes the result again and compares; `body_len` is the length of the
/// body it was decoded from.
fn check_roundtrip(frame: &Frame, body_len: usize) {
    let mut wire = BytesMut::new();
    frame.encode(&mut wire);
    let encoded_len = wire.len();
    let body = decode_frame(&mut wire, u32::MAX)
        .expect("an encoded frame is within u32::MAX")
        .expect("an encoded frame is complete");
    assert!(wire.is_empty(), "encode wrote more than one frame");
    assert!(
        body.len() <= body_len,
        "re-encoded {frame:?} in {} bytes, more than the {body_len} it was decoded from",
        body.len()
    );
    assert_eq!(body.len() + LENGTH_PREFIX, encoded_len);
    match Frame::decode(body) {
        Ok(again) => assert_eq!(&again, frame),
        Err(e) => panic!("{frame:?} encodes to a frame that does not decode: {e}"),
    }
}
