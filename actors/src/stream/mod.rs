//! Stream processing: the operator contract, and windows over counts and
//! event time with watermarks.

pub mod operator;
pub mod window;
