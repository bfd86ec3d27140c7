//! Store configuration and byte-size parsing.

use std::path::PathBuf;

/// Fraction of physical memory a store takes by default (as Ray's object
/// store does).
pub const DEFAULT_MEMORY_FRACTION: f64 = 0.3;

/// Largest default capacity, whatever the machine (64 GiB).
pub const DEFAULT_CAPACITY_CAP: u64 = 64 << 30;

/// Smallest capacity a store accepts (1 MiB).
pub const MIN_CAPACITY: u64 = 1 << 20;

/// Largest headroom of pre-allocated pages kept above the high-water mark
/// (1 GiB); smaller arenas keep a quarter of their capacity.
pub const MAX_HEADROOM: u64 = 1 << 30;

/// How a store is set up.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Path of the Unix socket clients connect to.
    pub socket: PathBuf,
    /// Arena size in bytes.
    pub capacity: u64,
    /// Where unpinned primary objects go under memory pressure; without it
    /// the store only evicts evictable objects and otherwise answers
    /// `StoreFull`.
    pub spill_dir: Option<PathBuf>,
    /// Bytes of pages kept allocated above the allocator's high-water mark.
    pub headroom: u64,
}

impl StoreConfig {
    /// A configuration with the default capacity ([`default_capacity`]), no
    /// spill directory and the default headroom.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self::with_capacity(socket, default_capacity())
    }

    /// A configuration with an explicit capacity.
    pub fn with_capacity(socket: impl Into<PathBuf>, capacity: u64) -> Self {
        StoreConfig {
            socket: socket.into(),
            capacity,
            spill_dir: None,
            headroom: default_headroom(capacity),
        }
    }

    /// Sets the spill directory.
    pub fn spill_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.spill_dir = Some(dir.into());
        self
    }
}

/// Physical memory of this machine in bytes.
pub fn physical_memory() -> u64 {
    let info = rustix::system::sysinfo();
    #[allow(clippy::useless_conversion)]
    let total = u64::from(info.totalram);
    total.saturating_mul(u64::from(info.mem_unit.max(1)))
}

/// [`DEFAULT_MEMORY_FRACTION`] of physical memory, at most
/// [`DEFAULT_CAPACITY_CAP`] and at least [`MIN_CAPACITY`], rounded down to
/// whole MiB.
pub fn default_capacity() -> u64 {
    let bytes = (physical_memory() as f64 * DEFAULT_MEMORY_FRACTION) as u64;
    (bytes.min(DEFAULT_CAPACITY_CAP) & !((1 << 20) - 1)).max(MIN_CAPACITY)
}

/// The default pre-allocation headroom for an arena of `capacity` bytes.
pub fn default_headroom(capacity: u64) -> u64 {
    (capacity / 4).min(MAX_HEADROOM)
}

/// A byte size was not understood.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid size {0:?}: expected a number of bytes, optionally with a unit (K, M, G, T, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")]
pub struct ParseSizeError(pub String);

/// Parses a byte count such as `1073741824`, `512MiB`, `4G` or `1.5GB`.
/// Binary units (`K`, `KiB`, ...) are powers of 1024, decimal ones (`KB`,
/// ...) powers of 1000.
pub fn parse_size(text: &str) -> Result<u64, ParseSizeError> {
    let err = || ParseSizeError(text.to_owned());
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(err());
    }
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(err()),
    };
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(err);
    }
    let f: f64 = num.parse().map_err(|_| err())?;
    let bytes = f * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 {
        return Err(err());
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("4g").unwrap(), 4 << 30);
        assert_eq!(parse_size("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("512 MiB").unwrap(), 512 << 20);
        assert!(parse_size("").is_err());
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("99999999999999999999T").is_err());
    }

    #[test]
    fn default_capacity_is_bounded() {
        let c = default_capacity();
        assert!((MIN_CAPACITY..=DEFAULT_CAPACITY_CAP).contains(&c));
        assert!(c <= physical_memory());
    }
}
