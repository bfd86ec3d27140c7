//! Spilling: primary objects that must leave memory go to one anonymous file
//! in the spill directory, and come back from it on `get`.
//!
//! The file is opened with `O_TMPFILE` (or created and unlinked at once where
//! the filesystem lacks it), so it has no name: when the store exits or is
//! killed, the kernel reclaims the space and nothing is left behind. Extents
//! inside it are handed out by the arena's own [`Allocator`] at page
//! granularity; a freed extent's disk space is returned with
//! `FALLOC_FL_PUNCH_HOLE`. Every extent carries the CRC32 of its bytes,
//! checked on restore: a corrupt spill is reported as a lost object, never
//! handed to a reader.

use crate::allocator::Allocator;
use parking_lot::Mutex;
use rustix::fs::{FallocateFlags, Mode, OFlags};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Extents are page-aligned so that hole punching frees whole pages.
const EXTENT_ALIGN: u64 = 4096;

/// Bytes checksummed and written per system call: small enough to stay in
/// cache between the checksum and the copy.
const IO_CHUNK: usize = 1 << 20;

/// Address space of the spill file (its size grows only as written).
const SPILL_SPACE: u64 = 1 << 50;

/// A byte range of the spill file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the spill file.
    pub offset: u64,
    /// Reserved length (page-rounded).
    pub len: u64,
}

/// Errors while spilling or restoring.
#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    /// The spill directory is unusable.
    #[error("cannot open a spill file in {dir}: {source}")]
    Open {
        /// The directory.
        dir: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Reading or writing the spill file failed.
    #[error("spill file I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes read back do not match the checksum taken when spilling.
    #[error("checksum mismatch: spilled {expected:#010x}, read back {found:#010x}")]
    Checksum {
        /// CRC32 taken at spill time.
        expected: u32,
        /// CRC32 of the bytes read back.
        found: u32,
    },
    /// No room left in the spill file's address space.
    #[error("spill file is full")]
    Full,
}

/// The store's spill file; see the module docs.
#[derive(Debug)]
pub struct SpillFile {
    file: File,
    extents: Mutex<Allocator>,
}

impl SpillFile {
    /// Opens an anonymous spill file in `dir`, creating `dir` if needed.
    pub fn open(dir: &Path) -> Result<SpillFile, SpillError> {
        let open_err = |source: std::io::Error| SpillError::Open {
            dir: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(open_err)?;
        let fd = match rustix::fs::open(
            dir,
            OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        ) {
            Ok(fd) => fd,
            Err(_) => {
                let path = dir.join(format!(
                    ".braid-spill-{}-{}",
                    std::process::id(),
                    uuid::Uuid::new_v4()
                ));
                let fd = rustix::fs::open(
                    &path,
                    OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| open_err(e.into()))?;
                std::fs::remove_file(&path).map_err(open_err)?;
                fd
            }
        };
        Ok(SpillFile {
            file: File::from(fd),
            extents: Mutex::new(Allocator::new(SPILL_SPACE)),
        })
    }

    /// Writes `data` to a fresh extent and returns it with the data's CRC32.
    pub fn write(&self, data: &[u8]) -> Result<(Extent, u32), SpillError> {
        let len = (data.len() as u64).max(1).div_ceil(EXTENT_ALIGN) * EXTENT_ALIGN;
        let block = self
            .extents
            .lock()
            .allocate(len)
            .map_err(|_| SpillError::Full)?;
        let extent = Extent {
            offset: block.offset,
            len: block.len,
        };
        let mut crc = crc32fast::Hasher::new();
        let mut at = extent.offset;
        for chunk in data.chunks(IO_CHUNK) {
            crc.update(chunk);
            if let Err(e) = self.file.write_all_at(chunk, at) {
                self.release(extent);
                return Err(e.into());
            }
            at += chunk.len() as u64;
        }
        Ok((extent, crc.finalize()))
    }

    /// Reads an extent back into `out` and checks it against `checksum`.
    pub fn read(&self, extent: Extent, out: &mut [u8], checksum: u32) -> Result<(), SpillError> {
        let mut crc = crc32fast::Hasher::new();
        let mut at = extent.offset;
        for chunk in out.chunks_mut(IO_CHUNK) {
            self.file.read_exact_at(chunk, at)?;
            crc.update(chunk);
            at += chunk.len() as u64;
        }
        let found = crc.finalize();
        if found != checksum {
            return Err(SpillError::Checksum {
                expected: checksum,
                found,
            });
        }
        Ok(())
    }

    /// Frees an extent and returns its disk space.
    pub fn release(&self, extent: Extent) {
        let freed = self.extents.lock().free(crate::allocator::Block {
            offset: extent.offset,
            len: extent.len,
        });
        if let Err(e) = freed {
            tracing::error!(error = %e, "spill extent double free");
            return;
        }
        let punched = rustix::fs::fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            extent.offset,
            extent.len,
        );
        if let Err(e) = punched {
            tracing::debug!(error = %e, "cannot punch a hole in the spill file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let spill = SpillFile::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let (extent, crc) = spill.write(&data).unwrap();
        let mut back = vec![0u8; data.len()];
        spill.read(extent, &mut back, crc).unwrap();
        assert_eq!(back, data);
        spill.file.write_all_at(&[!data[0]], extent.offset).unwrap();
        assert!(matches!(
            spill.read(extent, &mut back, crc),
            Err(SpillError::Checksum { .. })
        ));
        spill.release(extent);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
