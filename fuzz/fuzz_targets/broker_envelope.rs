//! chatter-broker's reading of an opening message: the envelope kinds it routes, the
//! `peer/object` name, call ids and stream ids, the head it rewrites for the callee, and
//! the arguments of its own `publish`, `subscribe` and `authenticate` (through the hidden
//! `chatter_broker::__fuzz` entry points); and, from the same bytes, its certificate
//! common-name reader. Checks that nothing panics, slices out of range or allocates
//! without bound (an error is a fine answer).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    chatter_broker::__fuzz::route_envelope(data);
    chatter_broker::__fuzz::common_name(data);
    chatter_broker::__fuzz::access_rules(data);
});
