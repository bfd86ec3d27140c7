//! Zero-copy buffers and views of objects in the arena.
//!
//! An [`ObjectBuf`] is an unsealed object: its creator writes it in place,
//! as bytes, as a typed slice, or as a columnar batch, then seals it. An
//! [`ObjectView`] is a pinned, sealed object: its bytes, typed slices and
//! batch columns point straight into this process's mapping of the arena.
//! Views are cheap to clone (they share one pin); the store's pin is
//! released when the last view of an object in this process is dropped.

use crate::batch::{BatchError, BatchLayout, BatchWriter, LayoutError};
use crate::client::ClientInner;
use crate::error::{SealError, ViewError};
use crate::protocol::Request;
use crate::ObjectId;
use std::sync::Arc;

/// Alignment of every object's first byte in the arena.
pub const OBJECT_ALIGN: usize = crate::allocator::ALIGN as usize;

fn cast<T: bytemuck::Pod>(bytes: &[u8]) -> Result<&[T], ViewError> {
    let elem = std::mem::size_of::<T>();
    if std::mem::align_of::<T>() > OBJECT_ALIGN {
        return Err(ViewError::Alignment {
            align: std::mem::align_of::<T>(),
        });
    }
    bytemuck::try_cast_slice(bytes).map_err(|_| ViewError::Length {
        len: bytes.len(),
        elem,
    })
}

fn cast_mut<T: bytemuck::Pod>(bytes: &mut [u8]) -> Result<&mut [T], ViewError> {
    let elem = std::mem::size_of::<T>();
    if std::mem::align_of::<T>() > OBJECT_ALIGN {
        return Err(ViewError::Alignment {
            align: std::mem::align_of::<T>(),
        });
    }
    let len = bytes.len();
    bytemuck::try_cast_slice_mut(bytes).map_err(|_| ViewError::Length { len, elem })
}

/// An unsealed object being written in place by its creator.
///
/// Dropping it without [`seal`](Self::seal) aborts the object and frees its
/// memory.
pub struct ObjectBuf {
    client: Arc<ClientInner>,
    id: ObjectId,
    offset: u64,
    len: u64,
    sealed: bool,
}

impl std::fmt::Debug for ObjectBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectBuf")
            .field("id", &self.id)
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish()
    }
}

impl ObjectBuf {
    pub(crate) fn new(client: Arc<ClientInner>, id: ObjectId, offset: u64, len: u64) -> Self {
        ObjectBuf {
            client,
            id,
            offset,
            len,
            sealed: false,
        }
    }

    /// The object's id.
    pub fn id(&self) -> ObjectId {
        self.id
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub(crate) fn client(&self) -> &Arc<ClientInner> {
        &self.client
    }

    /// Whether the object has no bytes (never true: objects have at least one).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The object's bytes, writable in place.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the store allocated `[offset, offset + len)` to this
        // unsealed object, created by this client, and validated it against
        // the arena; no other process reads an unsealed object and this
        // buffer is the only handle to it, borrowed mutably here.
        unsafe { self.client.slice_mut(self.offset, self.len) }
    }

    /// The object's bytes as a writable slice of `T`.
    pub fn as_mut_typed<T: bytemuck::Pod>(&mut self) -> Result<&mut [T], ViewError> {
        cast_mut(self.as_mut_slice())
    }

    /// Starts a columnar batch with `layout` in this object, which must be at
    /// least `layout.total_len()` bytes.
    pub fn batch_writer(&mut self, layout: &BatchLayout) -> Result<BatchWriter<'_>, LayoutError> {
        BatchWriter::new(layout, self.as_mut_slice())
    }

    /// Makes the object immutable and visible to every client, and returns a
    /// view that holds this client's pin.
    pub fn seal(self) -> Result<ObjectView, SealError> {
        self.seal_lending(None)
    }

    /// Seals, lending a pin to `lend_to` in the same request.
    pub(crate) fn seal_lending(
        mut self,
        lend_to: Option<crate::ClientId>,
    ) -> Result<ObjectView, SealError> {
        self.client
            .call_seal(self.id, self.offset, self.len, lend_to)?;
        self.sealed = true;
        Ok(ObjectView::new(
            Arc::clone(&self.client),
            self.id,
            self.offset,
            self.len,
        ))
    }
}

impl Drop for ObjectBuf {
    fn drop(&mut self) {
        if !self.sealed {
            let _ = self.client.send_oneway(Request::Abort { id: self.id });
        }
    }
}

/// A pinned, sealed object, read in place.
///
/// While any view of the object is alive in this process, the store keeps
/// the object resident: it is neither evicted, spilled nor freed.
pub struct ObjectView {
    client: Arc<ClientInner>,
    id: ObjectId,
    offset: u64,
    len: u64,
}

impl std::fmt::Debug for ObjectView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectView")
            .field("id", &self.id)
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish()
    }
}

impl ObjectView {
    /// Wraps a pin this process already counted.
    pub(crate) fn new(client: Arc<ClientInner>, id: ObjectId, offset: u64, len: u64) -> Self {
        ObjectView {
            client,
            id,
            offset,
            len,
        }
    }

    /// The object's id.
    pub fn id(&self) -> ObjectId {
        self.id
    }

    pub(crate) fn client(&self) -> &Arc<ClientInner> {
        &self.client
    }

    /// Offset of the object in the arena.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether the object has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The object's bytes, in place in the arena.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: the object is sealed, so no process writes it any more, and
        // this view's pin keeps the store from freeing, evicting or spilling
        // it while the view (and so the borrow) lives. The range was checked
        // against the arena when the pin was taken.
        unsafe { self.client.slice(self.offset, self.len) }
    }

    /// The object's bytes as a slice of `T`, in place.
    pub fn as_slice<T: bytemuck::Pod>(&self) -> Result<&[T], ViewError> {
        cast(self.as_bytes())
    }

    /// An Arrow buffer over the object's bytes that holds this view (and
    /// so the object's pin) until the last slice of it is dropped.
    pub fn into_arrow_buffer(self) -> arrow_buffer::Buffer {
        let bytes = self.as_bytes();
        let len = bytes.len();
        let ptr = std::ptr::NonNull::new(bytes.as_ptr().cast_mut())
            .unwrap_or(std::ptr::NonNull::dangling());
        let owner: Arc<dyn arrow_buffer::alloc::Allocation> = Arc::new(PinnedBytes { _pin: self });
        // SAFETY: `ptr` is valid for reads of `len` bytes for as long as the
        // view lives (see `as_bytes`): the object is sealed, so nobody
        // writes it, and the view's pin keeps the store from freeing,
        // evicting or spilling it. The buffer keeps `owner`, hence the view,
        // alive until its last clone or slice is dropped, and only reads
        // through the pointer. An empty object's pointer is never read.
        unsafe { arrow_buffer::Buffer::from_custom_allocation(ptr, len, owner) }
    }

    /// Reads the object as an Arrow record batch, in place: the batch's
    /// arrays point into this process's mapping of the arena and keep the
    /// object pinned until the last of them is dropped.
    pub fn record_batch(&self) -> Result<arrow_array::RecordBatch, BatchError> {
        crate::batch::read_record_batch(self.clone().into_arrow_buffer())
    }
}

/// A view as the owner of an Arrow buffer. The view's client holds locks,
/// which are not `RefUnwindSafe`; a panic while reading the buffer cannot
/// leave the sealed bytes half-changed, since nothing writes them.
struct PinnedBytes {
    _pin: ObjectView,
}

impl std::panic::RefUnwindSafe for PinnedBytes {}

impl Clone for ObjectView {
    fn clone(&self) -> Self {
        self.client.add_local_pin(self.id);
        ObjectView {
            client: Arc::clone(&self.client),
            id: self.id,
            offset: self.offset,
            len: self.len,
        }
    }
}

impl Drop for ObjectView {
    fn drop(&mut self) {
        self.client.unpin(self.id);
    }
}

impl AsRef<[u8]> for ObjectView {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}
