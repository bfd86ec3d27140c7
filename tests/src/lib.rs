//! Cross-crate integration tests for braid live in `tests/`; this library
//! holds what they share: [`hosts`], test hosts made of network and mount
//! namespaces on one machine, [`host_cluster`], a braid cluster started on
//! them with the CLI, and [`browser`], headless Chromium for the
//! dashboard.

pub mod browser;
pub mod host_cluster;
pub mod hosts;
