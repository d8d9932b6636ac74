//! Workspace-level integration tests live in `tests/` of this package.
