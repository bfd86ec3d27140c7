//! Unifies the features of the workspace's dependencies: every package
//! depends on this crate, which depends on each shared crate with the
//! union of the features any package enables, so building one package
//! (`cargo build -p braid --bin braid`) reuses what building another
//! (`cargo run --example online_learning`) compiled. Generated and kept
//! current by `cargo hakari generate` (checked by `.ci/run`); it holds no
//! code.
