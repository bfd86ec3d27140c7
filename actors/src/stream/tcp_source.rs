//! A TCP line source (being written).
