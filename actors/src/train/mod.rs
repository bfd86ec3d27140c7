//! Online learning: models behind one seam ([`model::Model`]; logistic
//! regression with per-key optimizers, FTRL-Proximal, SGD, AdaGrad) over
//! a compact parameter table, feature data (gen_ctr and Criteo parsers, a
//! synthetic click stream, columnar feature batches), and progressive
//! evaluation.

pub mod client;
pub mod data;
pub mod eval;
mod hugepages;
pub mod messages;
pub mod metrics;
pub mod model;
pub mod optimizer;
pub mod pipeline;
pub mod ps;
pub mod pull;
pub mod serving;
pub mod shard;
pub mod shard_page;
pub mod sharding;
pub mod table;
pub mod worker;
