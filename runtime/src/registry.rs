//! The registry of remote functions and actor classes, built at link time.
//!
//! `#[braid::remote]` and `#[braid::actor]` add one entry each to a
//! [`linkme`] distributed slice, so every copy of a binary holds the same
//! table, keyed by a stable name (`module::path::function`). A worker finds
//! what to run by that name; nothing is shipped but the name and the
//! arguments. [`build_hash`] fingerprints the executable so a worker started
//! from a different build is refused.

use crate::error::{Error, Result};
use crate::value::{Args, Encoded};
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

/// A registered remote function.
pub struct FunctionEntry {
    /// Stable name: the function's module path and name.
    pub name: &'static str,
    /// How to run it.
    pub invoke: Invoke,
}

/// The two shapes a remote function comes in.
pub enum Invoke {
    /// A plain function, run to completion on the worker.
    Sync(fn(Args) -> Result<Encoded>),
    /// An `async fn`, polled on the worker's runtime.
    Async(fn(Args) -> BoxFuture<'static, Result<Encoded>>),
}

/// A registered actor class.
pub struct ActorClassEntry {
    /// Stable name: the type's module path and name.
    pub name: &'static str,
    /// Builds an instance from the constructor's arguments.
    pub construct: fn(Args) -> Result<Box<dyn ActorObject>>,
}

/// A live actor instance, type-erased: the worker calls methods by name.
pub trait ActorObject: Send + Sync + 'static {
    /// Runs `method` with `args`. Sync methods take the instance's lock for
    /// their whole run; async methods hold a shared guard across awaits.
    fn invoke(&self, method: &str, args: Args) -> BoxFuture<'static, Result<Encoded>>;
}

/// One actor method, decoded and ready to run against the instance.
pub enum Method<A> {
    /// A `&mut self` method.
    Mut(MutMethod<A>),
    /// A `&self` method.
    Ref(RefMethod<A>),
    /// An `async fn(&self, ..)` method; several may run at once, up to the
    /// actor's declared concurrency.
    Async(Box<dyn FnOnce(ActorRef<A>) -> BoxFuture<'static, Result<Encoded>> + Send>),
}

/// A decoded `&mut self` method call.
pub type MutMethod<A> = Box<dyn FnOnce(&mut A) -> Result<Encoded> + Send>;
/// A decoded `&self` method call.
pub type RefMethod<A> = Box<dyn FnOnce(&A) -> Result<Encoded> + Send>;

/// Shared access to an actor's state for an async method.
pub type ActorRef<A> = tokio::sync::OwnedRwLockReadGuard<A>;

/// What `#[braid::actor]` implements for an actor type: how to turn a method
/// name and its arguments into a [`Method`].
pub trait Dispatch: Send + Sync + Sized + 'static {
    /// The class's registered name.
    const CLASS: &'static str;
    /// Decodes `args` for `method`.
    fn method(method: &str, args: Args) -> Result<Method<Self>>;
}

/// An actor instance behind a read-write lock.
pub struct ActorCell<A>(Arc<tokio::sync::RwLock<A>>);

impl<A: Dispatch> ActorCell<A> {
    /// Wraps a freshly constructed instance.
    pub fn boxed(instance: A) -> Box<dyn ActorObject> {
        Box::new(ActorCell(Arc::new(tokio::sync::RwLock::new(instance))))
    }
}

impl<A: Dispatch> ActorObject for ActorCell<A> {
    fn invoke(&self, method: &str, args: Args) -> BoxFuture<'static, Result<Encoded>> {
        let cell = self.0.clone();
        let decoded = A::method(method, args);
        Box::pin(async move {
            match decoded? {
                Method::Mut(f) => {
                    let mut guard = cell.write_owned().await;
                    f(&mut guard)
                }
                Method::Ref(f) => {
                    let guard = cell.read_owned().await;
                    f(&guard)
                }
                Method::Async(f) => {
                    let guard = cell.read_owned().await;
                    f(guard).await
                }
            }
        })
    }
}

/// Every remote function linked into this binary.
#[linkme::distributed_slice]
pub static REMOTE_FUNCTIONS: [FunctionEntry];

/// Every actor class linked into this binary.
#[linkme::distributed_slice]
pub static ACTOR_CLASSES: [ActorClassEntry];

struct Index {
    functions: HashMap<&'static str, &'static FunctionEntry>,
    classes: HashMap<&'static str, &'static ActorClassEntry>,
}

fn index() -> &'static Index {
    static INDEX: OnceLock<Index> = OnceLock::new();
    INDEX.get_or_init(|| Index {
        functions: REMOTE_FUNCTIONS.iter().map(|e| (e.name, e)).collect(),
        classes: ACTOR_CLASSES.iter().map(|e| (e.name, e)).collect(),
    })
}

/// Looks a remote function up by name.
pub fn function(name: &str) -> Result<&'static FunctionEntry> {
    index()
        .functions
        .get(name)
        .copied()
        .ok_or_else(|| Error::UnknownFunction(name.to_string()))
}

/// Looks an actor class up by name.
pub fn actor_class(name: &str) -> Result<&'static ActorClassEntry> {
    index()
        .classes
        .get(name)
        .copied()
        .ok_or_else(|| Error::UnknownActorClass(name.to_string()))
}

/// Names of every registered function and actor class, sorted.
pub fn names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = REMOTE_FUNCTIONS
        .iter()
        .map(|e| e.name)
        .chain(ACTOR_CLASSES.iter().map(|e| e.name))
        .collect();
    names.sort_unstable();
    names
}

/// A fingerprint of this process's executable: CRC32 of its bytes, with its
/// length, as hex. Two processes share it exactly when they run the same
/// build. Computed once per process (a worker takes it from its node, which
/// checked the file it started the worker from; a driver may find it
/// remembered, `session::remembered_build_hash`).
pub fn build_hash() -> &'static str {
    BUILD_HASH.get_or_init(|| match hash_file(std::path::Path::new("/proc/self/exe")) {
        Ok(hash) => hash,
        Err(e) => format!("unreadable-{}", e.kind()),
    })
}

static BUILD_HASH: OnceLock<String> = OnceLock::new();

/// Sets this process's build hash without hashing its executable (a worker
/// whose node already checked the file it was started from, or a driver
/// that found it remembered).
pub(crate) fn set_build_hash(hash: String) {
    let _ = BUILD_HASH.set(hash);
}

/// The build hash of an executable's bytes.
pub fn hash_bytes(bytes: &[u8]) -> String {
    format!("{:08x}-{:x}", crc32fast::hash(bytes), bytes.len())
}

/// The build hash of the executable at `path` ([`hash_bytes`] of its
/// contents), read through one small buffer: an executable with debug
/// information is tens of megabytes, which reading whole would first
/// allocate and fault in.
pub fn hash_file(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; HASH_CHUNK];
    let mut crc = crc32fast::Hasher::new();
    let mut len = 0u64;
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let chunk = buf.get(..n).unwrap_or_default();
                crc.update(chunk);
                len += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(format!("{:08x}-{:x}", crc.finalize(), len))
}

/// The read size of [`hash_file`].
const HASH_CHUNK: usize = 1 << 20;

#[cfg(test)]
mod tests {
    #[test]
    fn a_file_hashes_as_its_bytes_do() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("exe");
        let bytes: Vec<u8> = (0..(super::HASH_CHUNK * 2 + 12_345))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        std::fs::write(&path, &bytes)?;
        assert_eq!(super::hash_file(&path)?, super::hash_bytes(&bytes));
        Ok(())
    }
}
