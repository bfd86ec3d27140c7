//! Shared helpers for the braid examples (none yet).
