//! Procedural macros for chatter-rpc (work in progress).
