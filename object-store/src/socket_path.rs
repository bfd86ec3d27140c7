//! Unix socket paths of any length. A socket's address holds at most 107
//! bytes of path (`sun_path`), so a socket under a long `BRAID_TMPDIR`
//! could neither be bound nor reached by its full path. [`SocketPath`]
//! names it instead through a descriptor of its directory,
//! `/proc/self/fd/N/NAME`, which the kernel resolves to the same file;
//! the socket file is still created, found and removed at its full path.
//!
//! ```
//! use braid_store::socket_path::SocketPath;
//! let dir = tempfile::tempdir().unwrap();
//! let deep = dir.path().join("d".repeat(150));
//! std::fs::create_dir(&deep).unwrap();
//! let full = deep.join("s.sock");
//! let listener = std::os::unix::net::UnixListener::bind(SocketPath::new(&full).unwrap().as_path()).unwrap();
//! let _client = std::os::unix::net::UnixStream::connect(SocketPath::new(&full).unwrap().as_path()).unwrap();
//! assert!(full.exists());
//! # drop(listener);
//! ```

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// The longest path a Unix socket address holds (`sun_path` less its NUL).
pub const SUN_PATH_MAX: usize = 107;

/// A path to bind or connect a Unix socket at, naming `path` in at most
/// [`SUN_PATH_MAX`] bytes. Keep it alive until the bind or connect returns:
/// it holds the directory's descriptor the short form goes through.
#[derive(Debug)]
pub struct SocketPath {
    path: PathBuf,
    _dir: Option<File>,
}

impl SocketPath {
    /// `path` itself when it fits, else its name through a descriptor of
    /// its directory; an error if the directory cannot be opened or the
    /// file name alone is too long.
    pub fn new(path: &Path) -> io::Result<SocketPath> {
        if path.as_os_str().len() <= SUN_PATH_MAX {
            return Ok(SocketPath {
                path: path.to_owned(),
                _dir: None,
            });
        }
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} names no file in a directory", path.display()),
            ));
        };
        let dir = File::open(dir)?;
        let short = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
        if short.as_os_str().len() > SUN_PATH_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("socket name {name:?} is too long"),
            ));
        }
        Ok(SocketPath {
            path: short,
            _dir: Some(dir),
        })
    }

    /// The path to pass to `bind` or `connect`.
    pub fn as_path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_path_is_kept_and_a_long_one_goes_through_its_directory() {
        let short = Path::new("/tmp/s.sock");
        assert_eq!(SocketPath::new(short).unwrap().as_path(), short);
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("d".repeat(200));
        std::fs::create_dir(&deep).unwrap();
        let long = deep.join("node.sock");
        let named = SocketPath::new(&long).unwrap();
        assert!(named.as_path().starts_with("/proc/self/fd/"));
        assert!(named.as_path().as_os_str().len() <= SUN_PATH_MAX);
        let listener = std::os::unix::net::UnixListener::bind(named.as_path()).unwrap();
        assert!(long.exists(), "the socket file is at its full path");
        let client =
            std::os::unix::net::UnixStream::connect(SocketPath::new(&long).unwrap().as_path());
        assert!(client.is_ok());
        drop(listener);
        let missing = deep.join("x".repeat(120));
        assert!(SocketPath::new(&missing).is_err());
    }
}
