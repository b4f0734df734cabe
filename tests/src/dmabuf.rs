//! Page-aligned anonymous memory that a device reads and writes by DMA.
//!
//! Accessed only through volatile reads and writes of raw pointers: once the range is mapped
//! into an IOAS, the device may touch it at any time, so no Rust reference to it may exist
//! (the contract of `IommuBackend::ioas_map`).

use std::ptr::NonNull;

/// An mmap-ed DMA buffer.
#[derive(Debug)]
pub struct DmaBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is plain memory owned by this struct and only accessed with volatile
// operations through `&self`; nothing in it is tied to a thread.
unsafe impl Send for DmaBuf {}

impl DmaBuf {
    /// `len` bytes (rounded up to 4 KiB), zeroed and populated.
    pub fn new(len: usize) -> std::io::Result<Self> {
        let len = len.div_ceil(4096).max(1) * 4096;
        // SAFETY: an anonymous private mapping with no address hint; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| std::io::Error::other("mmap returned NULL"))?;
        Ok(DmaBuf { ptr, len })
    }

    /// The user virtual address, for `MapUser::user_va`.
    pub fn va(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// The length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty (never: at least one page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes `data` at `off` (clamped to the buffer).
    pub fn write(&self, off: usize, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if off + i < self.len {
                // SAFETY: off + i < len, inside the mapping we own; volatile because a device
                // may access the memory concurrently.
                unsafe { self.ptr.as_ptr().add(off + i).write_volatile(*b) };
            }
        }
    }

    /// Reads `n` bytes at `off` (clamped to the buffer).
    pub fn read(&self, off: usize, n: usize) -> Vec<u8> {
        (off..(off + n).min(self.len))
            // SAFETY: i < len, inside the mapping we own; volatile as above.
            .map(|i| unsafe { self.ptr.as_ptr().add(i).read_volatile() })
            .collect()
    }

    /// Fills the whole buffer with `b`.
    pub fn fill(&self, b: u8) {
        self.write(0, &vec![b; self.len]);
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly the mapping created in `new`. Pages still pinned by an
        // IOAS stay allocated by the kernel until unpinned, so this cannot free memory a
        // device can still reach.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
