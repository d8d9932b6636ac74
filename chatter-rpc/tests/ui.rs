//! Compile-fail tests of `#[remote]` diagnostics: one mistake per file (plus one file with
//! several, to show they are all reported in one compile). Regenerate the `.stderr` files
//! with `TRYBUILD=overwrite cargo test -p chatter-rpc --test ui` and review them.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
