//! Cross-crate integration tests for braid live in `tests/`; this library is
//! intentionally empty.
