//! braid-actors: streaming dataflow graphs with exactly-once checkpoints,
//! and (later) parameter servers and FTRL, built on the [`braid`] runtime.
//!
//! * [`stream`]: the operator contract, windows and watermarks.
//! * [`checkpoint`]: checkpoint storage behind the `object_store`
//!   interface, with checksums, commit markers and retention.
//! * [`train`]: optimizers, parameter tables, feature data and progressive
//!   evaluation for online learning.
//!
//! ```
//! use braid_actors::stream::operator::{Collector, Operator, OperatorError};
//!
//! struct Double;
//! impl Operator for Double {
//!     type In = u64;
//!     type Out = u64;
//!     fn process(
//!         &mut self,
//!         v: u64,
//!         t: Option<i64>,
//!         out: &mut dyn Collector<u64>,
//!     ) -> Result<(), OperatorError> {
//!         out.emit(v * 2, t);
//!         Ok(())
//!     }
//! }
//! let mut out = Vec::new();
//! Double.process(21, None, &mut out)?;
//! assert_eq!(out, vec![(42, None)]);
//! # Ok::<(), OperatorError>(())
//! ```

pub use braid;

pub mod checkpoint;
pub mod stream;
pub mod train;
