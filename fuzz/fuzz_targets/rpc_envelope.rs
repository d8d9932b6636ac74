//! chatter-rpc's envelope decoders: every input is tried both as a caller-to-callee
//! envelope (call, signal, cancel, reliable signal, ack) and as a reply, through the hidden
//! `chatter_rpc::__fuzz` entry points. Checks that neither panics, overflows or allocates
//! without bound (an error is a fine answer).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    chatter_rpc::__fuzz::decode_incoming(data);
    chatter_rpc::__fuzz::decode_reply(data);
});
