//! A locked page of this process with its guest-physical address (from /proc/self/pagemap).

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Page size the DMA buffers use.
pub const PAGE: usize = 4096;

/// One anonymous page, locked in memory, and its physical address.
#[derive(Debug)]
pub struct PinnedPage {
    ptr: *mut u8,
    phys: u64,
}

impl PinnedPage {
    /// Allocates, touches and locks a page, then looks up its frame in /proc/self/pagemap
    /// (root sees the PFN; bit 63 says present).
    pub fn new() -> Result<Self, String> {
        // SAFETY: a fresh private anonymous mapping; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        let ptr = p.cast::<u8>();
        // SAFETY: ptr is a fresh PAGE-sized writable mapping.
        unsafe { std::ptr::write_bytes(ptr, 0, PAGE) };
        // SAFETY: locks exactly the mapping above.
        if unsafe { libc::mlock(p, PAGE) } != 0 {
            return Err(format!("mlock: {}", std::io::Error::last_os_error()));
        }
        let mut page = PinnedPage { ptr, phys: 0 };
        let f = File::open("/proc/self/pagemap").map_err(|e| format!("/proc/self/pagemap: {e}"))?;
        let mut e = [0u8; 8];
        f.read_exact_at(&mut e, (ptr as u64 / PAGE as u64) * 8)
            .map_err(|e| format!("reading /proc/self/pagemap: {e}"))?;
        let entry = u64::from_le_bytes(e);
        if entry & (1 << 63) == 0 {
            return Err(format!("pagemap entry {entry:#x}: page not present"));
        }
        let pfn = entry & ((1 << 55) - 1);
        if pfn == 0 {
            return Err("pagemap shows PFN 0 (not root, or CONFIG_PROC_PAGE_MONITOR off?)".into());
        }
        page.phys = pfn * PAGE as u64;
        Ok(page)
    }

    /// The page's guest-physical address.
    pub fn phys(&self) -> u64 {
        self.phys
    }

    /// The page's address in this process.
    pub fn va(&self) -> u64 {
        self.ptr as u64
    }

    /// Writes the page with volatile stores (a device may read or write it at any time, so
    /// no Rust reference to it is made while it is mapped for DMA).
    pub fn write_volatile(&self, data: &[u8]) {
        for (i, b) in data.iter().take(PAGE).enumerate() {
            // SAFETY: i < PAGE, inside the mapping owned by self.
            unsafe { self.ptr.add(i).write_volatile(*b) };
        }
    }

    /// The page's bytes.
    pub fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a PAGE-sized mapping owned by self; &mut self makes it exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, PAGE) }
    }

    /// Reads the page with volatile loads (a device wrote it behind the compiler's back).
    pub fn read_volatile(&self) -> Vec<u8> {
        (0..PAGE)
            // SAFETY: i < PAGE, inside the mapping.
            .map(|i| unsafe { self.ptr.add(i).read_volatile() })
            .collect()
    }
}

impl Drop for PinnedPage {
    fn drop(&mut self) {
        // SAFETY: ptr/PAGE are exactly the mapping created in `new`.
        unsafe { libc::munmap(self.ptr.cast(), PAGE) };
    }
}
