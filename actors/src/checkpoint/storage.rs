//! Checkpoint storage (being written).
