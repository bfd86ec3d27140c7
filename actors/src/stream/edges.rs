//! What crosses each channel: batches and bytes, and of those bytes how
//! many went through serde and how many were copied.
//!
//! * `bytes`: the size of what a channel carried: encoded batches'
//!   length, columnar batches' object size, or, for records passed by
//!   pointer inside one process, their in-memory size.
//! * `codec_bytes`: bytes that went through serde encode or decode
//!   (counted at each: an encoded batch counts its length twice).
//! * `copied_bytes`: bytes memcpy'd from one buffer to another after the
//!   producing operator wrote them: an encoded batch copied into the store,
//!   strings and lists copied out of a columnar batch into owned values.
//!
//! Each end counts what it does on a [`ChannelMeter`] of the plan channel
//! (a process holds [`Meters`] for the channels its subtasks use); a job's
//! report sums them per graph edge into [`EdgeStats`]
//! ([`Plan::edge_stats`](super::plan::Plan::edge_stats)).

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// One channel's counters.
#[derive(Debug, Default)]
pub struct ChannelMeter {
    batches: AtomicU64,
    bytes: AtomicU64,
    codec_bytes: AtomicU64,
    copied_bytes: AtomicU64,
}

fn add(counter: &AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
}

impl ChannelMeter {
    /// A batch of `bytes` bytes was sent.
    pub fn sent(&self, bytes: usize) {
        add(&self.batches, 1);
        add(&self.bytes, bytes);
    }

    /// `bytes` bytes went through serde.
    pub fn codec(&self, bytes: usize) {
        add(&self.codec_bytes, bytes);
    }

    /// `bytes` bytes were copied between buffers.
    pub fn copied(&self, bytes: usize) {
        add(&self.copied_bytes, bytes);
    }

    fn counts(&self, channel: usize) -> ChannelCounts {
        ChannelCounts {
            channel,
            batches: self.batches.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            codec_bytes: self.codec_bytes.load(Ordering::Relaxed),
            copied_bytes: self.copied_bytes.load(Ordering::Relaxed),
        }
    }
}

/// The meters of every channel of a plan, in one process.
#[derive(Debug, Clone, Default)]
pub struct Meters(Arc<Vec<ChannelMeter>>);

impl Meters {
    /// Meters for `channels` channels.
    pub fn new(channels: usize) -> Self {
        Meters(Arc::new(
            (0..channels).map(|_| ChannelMeter::default()).collect(),
        ))
    }

    /// The meter of plan channel `channel`.
    pub fn get(&self, channel: usize) -> Option<&ChannelMeter> {
        self.0.get(channel)
    }

    /// What every channel counted so far (channels with nothing left out).
    pub fn counts(&self) -> Vec<ChannelCounts> {
        self.0
            .iter()
            .enumerate()
            .map(|(i, m)| m.counts(i))
            .filter(|c| c.batches + c.codec_bytes + c.copied_bytes > 0)
            .collect()
    }
}

/// One channel's totals, as a process reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelCounts {
    /// The plan channel.
    pub channel: usize,
    /// Batches sent.
    pub batches: u64,
    /// Bytes carried.
    pub bytes: u64,
    /// Bytes through serde.
    pub codec_bytes: u64,
    /// Bytes copied between buffers.
    pub copied_bytes: u64,
}

/// One graph edge's totals over all its channels.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeStats {
    /// The producing vertex.
    pub from: String,
    /// The consuming vertex.
    pub to: String,
    /// Batches sent.
    pub batches: u64,
    /// Bytes carried.
    pub bytes: u64,
    /// Bytes through serde encode or decode.
    pub codec_bytes: u64,
    /// Bytes memcpy'd after the producing operator wrote them.
    pub copied_bytes: u64,
}
