//! The error every braid call returns. It is plain data, so an error raised
//! in another process crosses the wire and reaches the caller as the same
//! variant it was raised as.

use crate::ids::{ActorId, NodeId};
use braid_store::{codec, ObjectId};
use serde::{Deserialize, Serialize};

/// What went wrong in a braid call.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
pub enum Error {
    /// The task or actor method ran and failed: it panicked, or its
    /// arguments could not be decoded.
    #[error("task {function} failed: {message}")]
    TaskError {
        /// The function or `Class::method` that failed.
        function: String,
        /// The panic message or decoding error.
        message: String,
    },
    /// The task or actor method returned `Err(e)`: `e` as text, and as its
    /// type's serialized value, which [`Error::downcast`] turns back into
    /// that type.
    #[error("{function} returned an error: {message}")]
    Application {
        /// The function or `Class::method` that returned it.
        function: String,
        /// The error's type (`std::any::type_name`).
        type_name: String,
        /// The error as text (`Display`, else `Debug`).
        message: String,
        /// The error's serialized value (`None` if its type is not
        /// `Serialize`).
        payload: Option<Vec<u8>>,
    },
    /// The worker process running the task died, and the retries are spent.
    #[error("worker died running {function} (after {attempts} attempts): {cause}")]
    WorkerDied {
        /// The function that was running.
        function: String,
        /// How many times the task was tried.
        attempts: u32,
        /// What is known about the death.
        cause: String,
    },
    /// The actor's process died while the call was in flight, or the actor
    /// is dead for good (restarts spent, or killed).
    #[error("actor {actor} died: {cause}")]
    ActorDied {
        /// The actor.
        actor: ActorId,
        /// What is known about the death.
        cause: String,
    },
    /// Every copy of the object is gone (its node died, or its owner did)
    /// and it cannot be rebuilt.
    #[error("object {id} lost: {reason}")]
    ObjectLost {
        /// The object.
        id: ObjectId,
        /// Why it is gone and not rebuilt.
        reason: String,
    },
    /// The object store could not make room for an object.
    #[error("object store full: {0}")]
    StoreFull(String),
    /// The call did not finish within its timeout.
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The task was cancelled.
    #[error("task cancelled")]
    Cancelled,
    /// A daemon or peer could not be reached.
    #[error("cannot reach {address}: {message}")]
    Unreachable {
        /// Who was called.
        address: String,
        /// Why it failed.
        message: String,
    },
    /// The cluster refused the cluster token.
    #[error("authentication failed: {0}")]
    Unauthenticated(String),
    /// No function of this name is registered in the job's binary.
    #[error("no remote function named {0}")]
    UnknownFunction(String),
    /// No actor class of this name is registered in the job's binary.
    #[error("no actor class named {0}")]
    UnknownActorClass(String),
    /// The actor class has no method of this name.
    #[error("actor class {class} has no method {method}")]
    UnknownMethod {
        /// The actor class.
        class: String,
        /// The method asked for.
        method: String,
    },
    /// No live actor has this name.
    #[error("no actor named {0}")]
    ActorNotFound(String),
    /// A live actor already has the name asked for a new one (get it with
    /// `Runtime::get_actor`, or spawn with `ActorBuilder::get_if_exists`).
    #[error("actor name {0} is taken by a live actor")]
    NameTaken(String),
    /// A worker was started from a different build of the job's binary.
    #[error("worker binary differs from the job's: expected build {expected}, found {found}")]
    BuildMismatch {
        /// The job's build hash.
        expected: String,
        /// The worker's build hash.
        found: String,
    },
    /// No node can ever satisfy the resource demand.
    #[error("no node can satisfy {0}")]
    Infeasible(String),
    /// A node the call depended on died.
    #[error("node {0} died")]
    NodeDied(NodeId),
    /// A value could not be encoded or decoded.
    #[error("codec: {0}")]
    Codec(String),
    /// The request was malformed or not allowed.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The runtime is not initialised, or has shut down.
    #[error("runtime not running: {0}")]
    NotRunning(String),
    /// A directory braid keeps private files in (sockets, the cluster
    /// token) is not private to this user, so braid refuses to use it.
    #[error(
        "{path} is not safe to use: it is a {kind} owned by uid {owner} with mode {mode:04o}, \
         but braid needs a directory owned by uid {user} with mode 0700 \
         (remove or fix it, or set BRAID_TMPDIR to another place)"
    )]
    UnsafeDirectory {
        /// The directory.
        path: std::path::PathBuf,
        /// What is there: `directory`, `symbolic link` or `file`.
        kind: String,
        /// Its owner's uid.
        owner: u32,
        /// Its permission bits.
        mode: u32,
        /// This process's uid.
        user: u32,
    },
    /// An operating-system call failed.
    #[error("{context}: {message}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        message: String,
    },
}

impl Error {
    /// The application's error of type `E` a task or method returned
    /// (`Err(e)`), if this is one of that type.
    ///
    /// ```
    /// # fn check(e: braid::Error) {
    /// if let Some(message) = e.downcast::<String>() {
    ///     println!("the task said: {message}");
    /// }
    /// # }
    /// ```
    pub fn downcast<E: serde::de::DeserializeOwned>(&self) -> Option<E> {
        match self {
            Error::Application {
                type_name,
                payload: Some(bytes),
                ..
            } if type_name == std::any::type_name::<E>() => codec::decode(bytes).ok(),
            _ => None,
        }
    }

    /// [`Error::ObjectLost`] for the usual reason: no copy could be read.
    pub fn lost(id: ObjectId) -> Error {
        Error::lost_because(id, "no copy of it could be read")
    }

    /// [`Error::ObjectLost`] with a reason.
    pub fn lost_because(id: ObjectId, reason: impl Into<String>) -> Error {
        Error::ObjectLost {
            id,
            reason: reason.into(),
        }
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, err: impl std::fmt::Display) -> Error {
        Error::Io {
            context: context.into(),
            message: err.to_string(),
        }
    }

    /// Whether the error says a peer process is gone (as opposed to the
    /// call itself failing), so a retry elsewhere may succeed.
    pub fn is_peer_death(&self) -> bool {
        matches!(
            self,
            Error::Unreachable { .. } | Error::WorkerDied { .. } | Error::NodeDied(_)
        )
    }
}

impl From<codec::EncodeError> for Error {
    fn from(e: codec::EncodeError) -> Self {
        Error::Codec(e.to_string())
    }
}

impl From<codec::DecodeError> for Error {
    fn from(e: codec::DecodeError) -> Self {
        Error::Codec(e.to_string())
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
