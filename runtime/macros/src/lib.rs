//! Procedural macros for braid (`#[braid::remote]`, `#[braid::actor]`).
//!
//! The macros arrive with the runtime (issue 3); the crate exists now so the
//! workspace has its final shape and dependency direction.
