//! What the vIOMMU model needs from the VMM besides the bridge: guest memory for the tables,
//! queues and status writes it owns, and a way to send its own MSIs (fault event, invalidation
//! completion event, page request event).

use thiserror::Error;

use crate::pci::MsiMessage;

/// A guest-memory access outside guest RAM (or crossing its end).
#[derive(Debug, Clone, Copy, Error, PartialEq, Eq)]
#[error("Guest memory access of {len} bytes at {gpa:#x} is outside guest RAM")]
pub struct GuestMemoryError {
    /// The guest physical address.
    pub gpa: u64,
    /// The length.
    pub len: usize,
}

/// Guest RAM as the vIOMMU model reads and writes it (root/context/PASID tables, the
/// invalidation queue, wait-descriptor status writes, the page request queue). Accesses
/// outside guest RAM fail; they never reach host memory.
pub trait GuestMemoryAccess: Send + Sync {
    /// Reads `buf.len()` bytes at `gpa`.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestMemoryError>;
    /// Writes `buf` at `gpa`.
    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), GuestMemoryError>;
}

/// Sends an MSI that the model itself raises (not a device's vector).
pub trait MsiSignal: Send + Sync {
    /// Delivers the message (`KVM_SIGNAL_MSI` in the VMM).
    fn signal(&self, msg: MsiMessage);
}

/// DMA of an emulated device through the vIOMMU, at (PASID, IOVA): the VMM implements it with
/// the soft backend. A failed access returns the `ioasid` soft DMA error (fault, page
/// request answered Invalid, timeout).
pub trait DmaView: Send + Sync {
    /// Reads `buf.len()` bytes at `iova` in the context of `pasid` (`None`: requests without
    /// PASID).
    fn read(
        &self,
        pasid: Option<ioasid::Pasid>,
        iova: u64,
        buf: &mut [u8],
    ) -> Result<(), ioasid::DmaError>;
    /// Writes `buf` at `iova` in the context of `pasid`.
    fn write(
        &self,
        pasid: Option<ioasid::Pasid>,
        iova: u64,
        buf: &[u8],
    ) -> Result<(), ioasid::DmaError>;

    /// Reads as [`Self::read`], issued as `req` says (privileged, PRI: with `req.pri` a
    /// fixable translation fault returns [`ioasid::DmaError::PageRequest`]). The default
    /// ignores `req` (an implementation without PRI or privilege checks).
    fn read_with(
        &self,
        pasid: Option<ioasid::Pasid>,
        iova: u64,
        buf: &mut [u8],
        req: ioasid::DmaRequest,
    ) -> Result<(), ioasid::DmaError> {
        let _ = req;
        self.read(pasid, iova, buf)
    }

    /// Writes as [`Self::write`], issued as `req` says. The default ignores `req`.
    fn write_with(
        &self,
        pasid: Option<ioasid::Pasid>,
        iova: u64,
        buf: &[u8],
        req: ioasid::DmaRequest,
    ) -> Result<(), ioasid::DmaError> {
        let _ = req;
        self.write(pasid, iova, buf)
    }
}
