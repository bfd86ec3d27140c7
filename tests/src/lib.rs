//! Cross-crate integration tests for braid live in `tests/`; this library
//! holds what they share: [`hosts`], test hosts made of network and mount
//! namespaces on one machine.

pub mod hosts;
