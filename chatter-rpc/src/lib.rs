//! Remote objects, calls and signals over chatter conversations (work in progress).
