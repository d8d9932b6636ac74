//! Runnable examples live in this package; see README.md.
