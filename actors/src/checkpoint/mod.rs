//! Checkpoints: where snapshots are stored and how a completed one is
//! recognised.

pub mod storage;
