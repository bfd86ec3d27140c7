//! A submitted job's working directory, carried to the head's machine as
//! Ray carries a `working_dir`: when the directory `braid job submit`
//! names is not the same directory on the head's machine
//! ([`DirIdentity`]: same kernel boot, device and inode), the CLI packs it
//! into a tar archive named by its SHA-256 ([`pack`]), uploads it, and the
//! head unpacks it once into its jobs directory ([`unpack`]) for the job
//! to run in. Archives are bounded by [`MAX_PACKAGE_BYTES`]; entries that
//! would land outside the directory are refused.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The largest working directory a job may upload (Ray's limit is of the
/// same size).
pub const MAX_PACKAGE_BYTES: u64 = 512 << 20;

/// Which directory a path is, machine-wide: two paths are the same
/// directory when the kernel (its boot id), the device and the inode are.
/// Hosts that share a kernel but not a file system (containers, network
/// namespaces with their own mounts) differ in device or inode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirIdentity {
    /// `/proc/sys/kernel/random/boot_id`.
    pub boot_id: String,
    /// The directory's device.
    pub dev: u64,
    /// The directory's inode.
    pub ino: u64,
}

impl DirIdentity {
    /// The identity of the directory at `path`.
    pub fn of(path: &Path) -> io::Result<DirIdentity> {
        let meta = std::fs::metadata(path)?;
        if !meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is not a directory", path.display()),
            ));
        }
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?
            .trim()
            .to_owned();
        Ok(DirIdentity {
            boot_id,
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// Why a working directory could not be packed or unpacked.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    /// The directory holds more than [`MAX_PACKAGE_BYTES`].
    #[error(
        "{dir} holds {bytes} bytes, more than the {max} bytes a job may upload; \
         submit from a smaller directory"
    )]
    TooLarge {
        /// The directory.
        dir: String,
        /// Its bytes (counted up to the limit and a little past it).
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// The archive's bytes are not what its name says.
    #[error("the package's content does not match its name {0}")]
    Mismatch(String),
    /// The name is not a SHA-256 in hex.
    #[error("not a package name: {0:?}")]
    BadName(String),
    /// Reading the directory or writing the archive's files failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The failure.
        source: io::Error,
    },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> PackageError {
    let what = what.into();
    move |source| PackageError::Io { what, source }
}

/// A packed working directory: its name (the SHA-256 of its bytes, hex)
/// and a tar archive of its files, directories and symbolic links.
#[derive(Debug, Clone)]
pub struct Package {
    /// The archive's SHA-256, in hex.
    pub name: String,
    /// The archive.
    pub bytes: Vec<u8>,
}

/// The name of an archive: its SHA-256, in hex.
pub fn name_of(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `name` can name a package (64 lowercase hex digits), so it is
/// safe as a file name.
pub fn is_name(name: &str) -> bool {
    name.len() == 64
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Every entry under `dir`, parents before children, in a stable order,
/// with the bytes of its regular files; fails past [`MAX_PACKAGE_BYTES`].
fn entries(dir: &Path) -> Result<Vec<PathBuf>, PackageError> {
    let mut out = Vec::new();
    let mut bytes = 0u64;
    let mut pending = vec![PathBuf::new()];
    while let Some(rel) = pending.pop() {
        let here = dir.join(&rel);
        let mut children: Vec<_> = std::fs::read_dir(&here)
            .map_err(io_error(format!("list {}", here.display())))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io_error(format!("list {}", here.display())))?;
        children.sort();
        for name in children.into_iter().rev() {
            let rel = rel.join(name);
            let meta = std::fs::symlink_metadata(dir.join(&rel))
                .map_err(io_error(format!("read {}", dir.join(&rel).display())))?;
            if meta.is_file() {
                bytes += meta.len();
                if bytes > MAX_PACKAGE_BYTES {
                    return Err(PackageError::TooLarge {
                        dir: dir.display().to_string(),
                        bytes,
                        max: MAX_PACKAGE_BYTES,
                    });
                }
            }
            if meta.is_dir() {
                pending.push(rel.clone());
            }
            if meta.is_dir() || meta.is_file() || meta.file_type().is_symlink() {
                out.push(rel);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Packs `dir` (its files, directories and symbolic links, not what the
/// links point to; sockets and devices are left out).
pub fn pack(dir: &Path) -> Result<Package, PackageError> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    for rel in entries(dir)? {
        let path = dir.join(&rel);
        builder
            .append_path_with_name(&path, &rel)
            .map_err(io_error(format!("pack {}", path.display())))?;
    }
    let bytes = builder
        .into_inner()
        .map_err(io_error(format!("pack {}", dir.display())))?;
    Ok(Package {
        name: name_of(&bytes),
        bytes,
    })
}

/// Unpacks the archive `bytes`, which must be named `name`, into
/// `parent/name` (a directory made whole or not at all), unless it is
/// there already; returns that directory.
pub fn unpack(parent: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf, PackageError> {
    if !is_name(name) {
        return Err(PackageError::BadName(name.to_owned()));
    }
    if bytes.len() as u64 > MAX_PACKAGE_BYTES {
        return Err(PackageError::TooLarge {
            dir: name.to_owned(),
            bytes: bytes.len() as u64,
            max: MAX_PACKAGE_BYTES,
        });
    }
    if name_of(bytes) != name {
        return Err(PackageError::Mismatch(name.to_owned()));
    }
    let dest = parent.join(name);
    if dest.is_dir() {
        return Ok(dest);
    }
    std::fs::create_dir_all(parent).map_err(io_error(format!("create {}", parent.display())))?;
    let partial = parent.join(format!(".{name}.{}", uuid::Uuid::new_v4().simple()));
    let unpacked = tar::Archive::new(bytes)
        .unpack(&partial)
        .map_err(io_error(format!("unpack package {name}")));
    let placed = unpacked.and_then(|()| {
        std::fs::rename(&partial, &dest).or_else(|e| {
            // Another upload of the same package got there first.
            if dest.is_dir() {
                Ok(())
            } else {
                Err(io_error(format!("place package {name}"))(e))
            }
        })
    });
    if partial.exists() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    placed.map(|()| dest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_directory_packs_and_unpacks_whole_with_modes_and_links() {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("data.txt"), b"hello").unwrap();
        std::fs::create_dir_all(src.path().join("bin/deep")).unwrap();
        let tool = src.path().join("bin/tool.sh");
        std::fs::write(&tool, b"#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("../data.txt", src.path().join("bin/link")).unwrap();
        std::fs::write(src.path().join("bin/deep/empty"), b"").unwrap();

        let package = pack(src.path()).unwrap();
        assert_eq!(package.name, name_of(&package.bytes));
        assert_eq!(
            pack(src.path()).unwrap().name,
            package.name,
            "the same directory packs to the same name"
        );

        let dest = tempfile::tempdir().unwrap();
        let dir = unpack(dest.path(), &package.name, &package.bytes).unwrap();
        assert_eq!(dir, dest.path().join(&package.name));
        assert_eq!(std::fs::read(dir.join("data.txt")).unwrap(), b"hello");
        assert_eq!(std::fs::read(dir.join("bin/link")).unwrap(), b"hello");
        assert!(std::fs::symlink_metadata(dir.join("bin/link"))
            .unwrap()
            .file_type()
            .is_symlink());
        let mode = std::fs::metadata(dir.join("bin/tool.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111, "executable bits kept: {mode:o}");
        assert!(dir.join("bin/deep/empty").is_file());
        // Unpacking again finds it there; no partial directory is left.
        assert_eq!(
            unpack(dest.path(), &package.name, &package.bytes).unwrap(),
            dir
        );
        let names: Vec<_> = std::fs::read_dir(dest.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn bad_packages_are_refused_and_leave_nothing() {
        let dest = tempfile::tempdir().unwrap();
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("a"), b"a").unwrap();
        let package = pack(src.path()).unwrap();
        let other = name_of(b"something else");
        assert!(matches!(
            unpack(dest.path(), &other, &package.bytes),
            Err(PackageError::Mismatch(_))
        ));
        assert!(matches!(
            unpack(dest.path(), "../../etc", &package.bytes),
            Err(PackageError::BadName(_))
        ));
        // Not a tar archive, though named by its hash.
        let junk = b"not an archive at all, just text".repeat(40);
        assert!(matches!(
            unpack(dest.path(), &name_of(&junk), &junk),
            Err(PackageError::Io { .. })
        ));
        // An entry that climbs out of the directory.
        let mut header = tar::Header::new_gnu();
        header.set_size(1);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        {
            let name = b"../escaped";
            let gnu = header.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name);
        }
        header.set_cksum();
        let mut evil = tar::Builder::new(Vec::new());
        evil.append(&header, &b"x"[..]).unwrap();
        let evil = evil.into_inner().unwrap();
        let _ = unpack(dest.path(), &name_of(&evil), &evil);
        assert!(
            !dest.path().join("escaped").exists(),
            "nothing lands outside"
        );
        let left: Vec<_> = std::fs::read_dir(dest.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().starts_with('.'))
            .collect();
        assert!(left.is_empty(), "no partial directory left: {left:?}");
    }

    #[test]
    fn a_directory_too_large_is_refused_before_it_is_read() {
        let src = tempfile::tempdir().unwrap();
        let big = std::fs::File::create(src.path().join("sparse")).unwrap();
        big.set_len(MAX_PACKAGE_BYTES + 1).unwrap();
        match pack(src.path()) {
            Err(PackageError::TooLarge { bytes, max, .. }) => {
                assert!(bytes > max);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn a_directory_is_itself_and_not_another() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let id = DirIdentity::of(a.path()).unwrap();
        assert_eq!(id, DirIdentity::of(a.path()).unwrap());
        assert_ne!(id, DirIdentity::of(b.path()).unwrap());
        let file = a.path().join("f");
        std::fs::write(&file, b"").unwrap();
        assert!(DirIdentity::of(&file).is_err());
    }
}
