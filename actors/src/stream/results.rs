//! What a job's subtasks hand back to whoever ran the job, as Flink's
//! accumulators do: an operator names a value when it finishes (an
//! evaluation's final figures, serving's final statistics), and the
//! runner returns every finished subtask's values in the
//! [`JobReport`](super::coordinator::JobReport), from whichever process
//! the subtask ran in.
//!
//! ```
//! use braid_actors::stream::results::{self, JobResults};
//!
//! // In an operator's `on_end`, on its subtask's thread:
//! results::set("eval/rows", &1_000u64).unwrap();
//! // The runner collects them when the subtask finishes:
//! let collected: JobResults = results::take();
//! assert_eq!(results::get::<u64>(&collected, "eval/rows").unwrap().unwrap(), 1_000);
//! ```

use braid::store::codec;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::cell::RefCell;
use std::collections::BTreeMap;
use thiserror::Error;

/// Named results, encoded: one entry per name, the last value set wins.
pub type JobResults = BTreeMap<String, Vec<u8>>;

/// A result that cannot be encoded or read back.
#[derive(Debug, Error)]
pub enum ResultError {
    /// The value cannot be encoded.
    #[error("result {0:?} cannot be encoded: {1}")]
    Encode(String, String),
    /// The stored bytes are not a value of the type asked for.
    #[error("result {0:?} cannot be decoded: {1}")]
    Decode(String, String),
}

thread_local! {
    static RESULTS: RefCell<JobResults> = const { RefCell::new(BTreeMap::new()) };
}

/// Sets result `name` of the subtask running on this thread.
pub fn set<T: Serialize>(name: &str, value: &T) -> Result<(), ResultError> {
    let bytes =
        codec::encode(value).map_err(|e| ResultError::Encode(name.to_string(), e.to_string()))?;
    RESULTS.with(|r| r.borrow_mut().insert(name.to_string(), bytes));
    Ok(())
}

/// Takes the results set on this thread (the runner, once its subtask
/// finished).
pub fn take() -> JobResults {
    RESULTS.with(|r| std::mem::take(&mut *r.borrow_mut()))
}

/// Result `name` of `results`, decoded; `None` if no subtask set it.
pub fn get<T: DeserializeOwned>(
    results: &JobResults,
    name: &str,
) -> Option<Result<T, ResultError>> {
    results.get(name).map(|bytes| {
        codec::decode(bytes).map_err(|e| ResultError::Decode(name.to_string(), e.to_string()))
    })
}
