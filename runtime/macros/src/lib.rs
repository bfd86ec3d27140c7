//! Procedural macros for braid: `#[braid::remote]` and `#[braid::actor]`.
//!
//! Use them through the runtime's re-exports, `braid::remote` and
//! `braid::actor`: the generated code names runtime items by absolute
//! `::braid::..` paths, so the `braid` crate must be a direct dependency of
//! the crate using the macros (under that name).
//!
//! Both macros register what they expand into a link-time table (a
//! [`linkme`](https://docs.rs/linkme) distributed slice) keyed by a stable
//! name, the item's module path and name. A worker running the same binary
//! looks the name up and decodes the arguments; nothing but the name and the
//! encoded arguments travels.
//!
//! # `#[braid::remote]`
//!
//! On a free function, sync or `async`:
//!
//! ```ignore
//! #[braid::remote]
//! pub fn add(a: i64, b: i64) -> i64 {
//!     a + b
//! }
//! ```
//!
//! The function is kept unchanged (still callable locally) and a module of
//! the same name and visibility is added next to it (functions and modules
//! live in different namespaces), holding:
//!
//! - `add::NAME: &str`, the registered name (`"my_crate::math::add"`);
//! - `add::remote(rt: &braid::Runtime, a: impl IntoArg<i64>, b: impl
//!   IntoArg<i64>) -> braid::Result<ObjectRef<i64>>`, which submits the call
//!   as a task with default options (a function without a return type gives
//!   `ObjectRef<()>`; one returning `Result<T, E>` gives `ObjectRef<T>`,
//!   and its `Err(e)` reaches the caller as `braid::Error::Application`,
//!   which `Error::downcast::<E>()` turns back into `e` when `E` is
//!   `Serialize`; the same holds for actor methods);
//! - `add::remote_with(rt, opts: &braid::TaskOptions, a, b)`, the same with
//!   explicit options;
//! - a registry entry whose invoker checks the argument count, decodes each
//!   argument as its declared type, calls the function (awaiting it if it is
//!   `async`) and encodes the result.
//!
//! Each argument of `remote` accepts a value of the declared type or an
//! `ObjectRef` (or `&ObjectRef`) to one. The generated module starts with
//! `use super::*;`, so argument types may name anything in scope where the
//! function is defined. The function must be at module level (not inside a
//! function body).
//!
//! Rejected with a compile error: `self` arguments, generic functions (type,
//! lifetime or const parameters, `where` clauses, `impl Trait` arguments),
//! `unsafe` functions, arguments that are patterns rather than plain
//! identifiers (`name` and `mut name` are fine), and arguments or return
//! types that borrow (`&str`, `&[T]`, `Cow<'a, T>`): remote function
//! arguments must be owned types. Arguments must be `Serialize +
//! DeserializeOwned` and the return type `Serialize`; an `async fn`'s future
//! must be `Send`.
//!
//! # `#[braid::actor]`
//!
//! An actor needs the attribute twice: on its type definition and on its
//! (single) inherent impl block.
//!
//! ```ignore
//! #[braid::actor]
//! pub struct Counter {
//!     value: u64,
//! }
//!
//! #[braid::actor]
//! impl Counter {
//!     fn new(start: u64) -> Self {
//!         Counter { value: start }
//!     }
//!     fn incr(&mut self, by: u64) -> u64 {
//!         self.value += by;
//!         self.value
//!     }
//!     fn get(&self) -> u64 {
//!         self.value
//!     }
//!     async fn slow(&self, x: u32) -> u32 {
//!         x
//!     }
//!     #[braid(local)]
//!     fn peek(&self) -> &u64 {
//!         &self.value
//!     }
//! }
//! ```
//!
//! On the type (a non-generic struct or enum), kept unchanged, it adds:
//!
//! - `Counter::BRAID_CLASS: &str`, the registered class name
//!   (`"my_crate::counters::Counter"`);
//! - `CounterHandle` (the type's name + `Handle`, same visibility), a typed
//!   handle to a running actor: `Clone`, `Serialize`, `Deserialize`
//!   (transparently an `ActorHandle`), implementing `braid::TypedHandle`.
//!
//! On the impl block, kept unchanged except that `#[braid(local)]` markers
//! are removed, it adds:
//!
//! - `Counter::remote(rt, start: impl IntoArg<u64>) ->
//!   braid::ActorBuilder<CounterHandle>`, from the constructor: the
//!   associated function `new` returning `Self` (required, synchronous);
//! - one method on `CounterHandle` per remote method, with the same name and
//!   arguments (each an `impl IntoArg<T>`), returning `braid::ActorCall<R>`
//!   and documented with the method's own docs;
//! - `impl braid::__private::Dispatch for Counter`, mapping a method name and
//!   encoded arguments to a call: `&mut self` methods run with exclusive
//!   access, `&self` methods with shared access, `async fn(&self)` methods
//!   hold shared access across awaits and may overlap;
//! - a registry entry building the actor from the constructor's arguments.
//!
//! Every method with a `&self` or `&mut self` receiver is remote unless
//! marked `#[braid(local)]`; associated functions other than `new` are left
//! alone. Remote methods follow the rules of remote functions (no generics,
//! owned argument and return types) and additionally must not take `self` by
//! value, nor be `async fn(&mut self)` (async actor methods take `&self`;
//! keep mutable state behind a lock). The impl block must not be generic and
//! may name the type by a path (`impl crate::x::Counter`); the handle is then
//! found at the same path (`crate::x::CounterHandle`). The names `remote`
//! and `BRAID_CLASS` are taken by the generated items.
//!
//! Generated handle methods and `Counter::remote` are `pub`, whatever the
//! visibility of the method they come from; the handle type's visibility
//! caps them.

mod actor;
mod common;
mod remote;

#[cfg(test)]
mod tests;

use proc_macro::TokenStream;

/// Makes a free function callable as a remote task.
///
/// Keeps the function and adds a module of the same name holding `NAME`,
/// `remote(rt, args..)`, `remote_with(rt, opts, args..)` and the function's
/// registry entry. See the [crate docs](crate) for the expansion and the
/// rules arguments must follow.
#[proc_macro_attribute]
pub fn remote(attr: TokenStream, item: TokenStream) -> TokenStream {
    remote::expand(attr.into(), item.into()).into()
}

/// Makes a type an actor class; goes on the type definition and on its
/// inherent impl block.
///
/// On the type it adds the typed handle (`<Type>Handle`) and
/// `<Type>::BRAID_CLASS`; on the impl block, `<Type>::remote(rt, args..)`
/// (from the `new` constructor), one handle method per `&self`/`&mut self`
/// method not marked `#[braid(local)]`, the dispatch table and the class's
/// registry entry. See the [crate docs](crate) for the details.
#[proc_macro_attribute]
pub fn actor(attr: TokenStream, item: TokenStream) -> TokenStream {
    actor::expand(attr.into(), item.into()).into()
}
