//! braid: a Ray-style runtime for fused computing.
//!
//! Tasks, actors and object references over a shared-memory object store on
//! every node. Write remote functions and actors with
//! [`#[braid::remote]`](remote) and [`#[braid::actor]`](macro@actor), start or
//! join a cluster with [`init`], and call them:
//!
//! ```no_run
//! #[braid::remote]
//! fn add(a: i64, b: i64) -> i64 {
//!     a + b
//! }
//!
//! #[braid::actor]
//! pub struct Counter {
//!     n: u64,
//! }
//!
//! #[braid::actor]
//! impl Counter {
//!     fn new(start: u64) -> Self {
//!         Counter { n: start }
//!     }
//!     fn incr(&mut self, by: u64) -> u64 {
//!         self.n += by;
//!         self.n
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> braid::Result<()> {
//!     let rt = braid::init().await?; // BRAID_ADDRESS, or an embedded cluster
//!     let x = add::remote(&rt, 1, 2)?; // returns at once
//!     let y = add::remote(&rt, &x, 10)?; // references as arguments
//!     let c = Counter::remote(&rt, 0).max_restarts(3).spawn().await?;
//!     assert_eq!(c.incr(5).await?, 5);
//!     let big = rt.put_array(&vec![0f32; 1 << 20])?; // lands in shared memory
//!     let view = rt.get_array(&big).await?; // zero-copy view
//!     assert_eq!(view.len(), 1 << 20);
//!     assert_eq!(rt.get(&y).await?, 13);
//!     Ok(())
//! }
//! ```
//!
//! The processes (ARCHITECTURE §2): a head keeps cluster metadata; a node
//! daemon per node embeds the [object store](store), a scheduler and a pool
//! of worker processes, which are the job's own binary re-executed with a
//! role ([`role`]). Callers push tasks and actor calls directly to workers
//! over Unix sockets ([`wire`]); nodes and the head speak gRPC ([`rpc`]).

pub use braid_macros::{actor, remote};
pub use braid_store as store;

pub mod actor;
pub mod address;
pub mod cluster;
pub(crate) mod core;
pub mod dashboard;
pub mod error;
pub(crate) mod executor;
pub mod ids;
pub mod init;
pub mod lineage;
pub mod node;
pub mod object_ref;
pub(crate) mod objects;
pub(crate) mod panics;
pub(crate) mod peers;
pub mod refs;
pub mod registry;
pub mod resources;
pub mod role;
pub mod rpc;
pub mod runtime;
pub mod session;
pub mod submit;
pub mod telemetry;
pub mod value;
pub mod wire;

pub use actor::{ActorBuilder, ActorCall, ActorHandle, TypedHandle};
/// The Arrow record batch, braid's columnar format (see [`Runtime::put_batch`]).
pub use arrow_array::RecordBatch;
pub use error::{Error, Result};
pub use ids::{ActorId, JobId, NodeId, PlacementGroupId, TaskId, WorkerId};
pub use init::{init, init_blocking, init_blocking_with, InitOptions, DRIVER_ENV};
pub use object_ref::{Lent, ObjectRef};
pub use resources::Resources;
pub use runtime::{current, Array, ArrayView, Batch, PlacementGroup, PlacementStrategy, Runtime};
pub use submit::TaskOptions;
pub use value::{Arg, IntoArg};

/// What `#[braid::remote]` and `#[braid::actor]` expand to. Not a public
/// API.
#[doc(hidden)]
pub mod __private {
    pub use crate::registry::{
        ActorCell, ActorClassEntry, ActorObject, ActorRef, Dispatch, FunctionEntry, Invoke, Method,
        ACTOR_CLASSES, REMOTE_FUNCTIONS,
    };
    pub use crate::value::{encode_return, Args, Encoded};
    pub use futures::future::BoxFuture;
    pub use linkme;
    pub use serde;

    /// An application error as [`crate::Error::Application`].
    pub fn app_error(
        function: &str,
        type_name: &str,
        message: String,
        payload: Option<Vec<u8>>,
    ) -> crate::Error {
        crate::Error::Application {
            function: function.to_owned(),
            type_name: type_name.to_owned(),
            message,
            payload,
        }
    }

    /// An application error being reported, for the autoref choice of how
    /// to turn it into text and bytes (see `__app_error!`).
    pub struct AppErr<'a, E>(pub &'a E);

    /// Text of an error that is `Display`.
    pub trait ViaDisplay {
        /// The error's text.
        fn braid_text(&self) -> String;
    }
    impl<E: std::fmt::Display> ViaDisplay for &AppErr<'_, E> {
        fn braid_text(&self) -> String {
            self.0.to_string()
        }
    }
    /// Text of an error that is only `Debug`.
    pub trait ViaDebug {
        /// The error's text.
        fn braid_text(&self) -> String;
    }
    impl<E: std::fmt::Debug> ViaDebug for AppErr<'_, E> {
        fn braid_text(&self) -> String {
            format!("{:?}", self.0)
        }
    }
    /// The bytes of an error that is `Serialize`.
    pub trait ViaSerialize {
        /// The error's serialized value.
        fn braid_payload(&self) -> Option<Vec<u8>>;
    }
    impl<E: serde::Serialize> ViaSerialize for &AppErr<'_, E> {
        fn braid_payload(&self) -> Option<Vec<u8>> {
            braid_store::codec::encode(self.0).ok()
        }
    }
    /// No bytes for an error that is not `Serialize`.
    pub trait ViaNothing {
        /// None.
        fn braid_payload(&self) -> Option<Vec<u8>>;
    }
    impl<E> ViaNothing for AppErr<'_, E> {
        fn braid_payload(&self) -> Option<Vec<u8>> {
            None
        }
    }

    /// Submits a task by its registered name.
    pub fn submit_task<R>(
        rt: &crate::Runtime,
        name: &'static str,
        opts: &crate::TaskOptions,
        args: crate::Result<Vec<crate::Arg>>,
    ) -> crate::Result<crate::ObjectRef<R>> {
        rt.tasks.submit(name, opts, args)
    }
}

/// Turns an application's error `err`, returned by `function`, into
/// [`Error::Application`]: its `Display` text (else `Debug`) and, if its
/// type is `Serialize`, its value. What `#[braid::remote]` and
/// `#[braid::actor]` expand a returned `Err` to. Not a public API.
#[doc(hidden)]
#[macro_export]
macro_rules! __app_error {
    ($function:expr, $err:expr) => {{
        #[allow(unused_imports)]
        use $crate::__private::{
            ViaDebug as _, ViaDisplay as _, ViaNothing as _, ViaSerialize as _,
        };
        let __braid_err = $err;
        let __braid_wrapped = $crate::__private::AppErr(&__braid_err);
        $crate::__private::app_error(
            $function,
            ::core::any::type_name_of_val(&__braid_err),
            (&&__braid_wrapped).braid_text(),
            (&&__braid_wrapped).braid_payload(),
        )
    }};
}
