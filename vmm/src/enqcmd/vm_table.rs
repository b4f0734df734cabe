//! [`VmPasidTable`]: the VM's one guest-PASID to host-PASID translation, the source of truth
//! for ENQCMD and for a shared-work-queue portal.
//!
//! ENQCMD takes the PASID from the CPU (IA32_PASID), not from a device, so the translation is
//! VM-wide: one guest PASID has one host PASID whichever device the descriptor goes to. The
//! vIOMMU bridge feeds the table: when it gives a guest PASID a host PASID it records it
//! here; a second device binding the same guest PASID shares that host PASID (one more
//! user); the entry goes with its last user. The translation is kept in the VT-x layout
//! ([`super::table`]) so that a KVM extension could consume it as is, and every change is
//! handed to the CPU side ([`super::cpu::CpuPasidTranslation`]) when it can translate
//! (upstream KVM cannot: nothing is handed then).
//!
//! Owns: the users of each guest PASID and the VT-x structure. Must not touch: the host
//! PASID allocator (`ioasid::PasidSpace`, through the bridge) and iommufd.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};

use devices::cpu_pasid::PasidTranslate;
use thiserror::Error;

use super::cpu::{host_cpu_side, CpuPasidSupport, CpuPasidTranslation};
use super::table::{PasidTranslationTable, TableError};

/// Who uses a guest PASID: a device's key in the VM's PASID space (`ioasid::DevId`'s raw
/// value, tagged for emulated devices).
pub type PasidUser = u32;

/// Errors of the VM's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum VmPasidError {
    /// The guest PASID already has another host PASID.
    #[error("guest PASID {guest:#x} already translates to host PASID {host:#x}, not {wanted:#x}")]
    Conflict {
        /// The guest PASID.
        guest: u32,
        /// Its host PASID.
        host: u32,
        /// The host PASID asked for.
        wanted: u32,
    },
    /// The table refused a PASID.
    #[error(transparent)]
    Table(#[from] TableError),
}

/// What [`VmPasidTable::release`] left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Release {
    /// The user did not use the guest PASID.
    NotUsed,
    /// Other users keep it (their keys, ascending).
    Shared {
        /// The host PASID.
        host: u32,
        /// The remaining users.
        users: Vec<PasidUser>,
    },
    /// That was the last user: the translation is gone.
    Last {
        /// The host PASID it had.
        host: u32,
    },
}

/// One guest PASID's translation, for introspection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasidTranslationView {
    /// The guest PASID.
    pub guest: u32,
    /// The host PASID.
    pub host: u32,
    /// Its users.
    pub users: Vec<PasidUser>,
}

#[derive(Debug)]
struct Shared {
    host: u32,
    users: BTreeSet<PasidUser>,
}

#[derive(Debug, Default)]
struct Inner {
    by_guest: BTreeMap<u32, Shared>,
    table: PasidTranslationTable,
}

/// The VM's guest-to-host PASID translation (see the module documentation).
#[derive(Debug)]
pub struct VmPasidTable {
    inner: Mutex<Inner>,
    cpu: &'static dyn CpuPasidTranslation,
}

impl Default for VmPasidTable {
    fn default() -> Self {
        Self::new()
    }
}

impl VmPasidTable {
    /// An empty table, over this host's CPU side ([`host_cpu_side`]).
    pub fn new() -> Self {
        Self::with_cpu(host_cpu_side())
    }

    /// An empty table whose changes go to `cpu` when it can translate.
    pub fn with_cpu(cpu: &'static dyn CpuPasidTranslation) -> Self {
        VmPasidTable {
            inner: Mutex::new(Inner::default()),
            cpu,
        }
    }

    /// Hands a change to the CPU side, when it translates (`host == None`: unmap). A
    /// refusal is logged: the VMM-side table stays the source of truth, and the CPU side
    /// reports a missing translation by its exit.
    fn program_cpu(&self, guest: u32, host: Option<u32>) {
        if self.cpu.support() != CpuPasidSupport::Available {
            return;
        }
        let r = match host {
            Some(h) => self.cpu.map(guest, h),
            None => self.cpu.unmap(guest),
        };
        if let Err(e) = r {
            log::warn!("{e}");
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The host PASID of `guest`, if any device of the VM has it.
    pub fn host_of(&self, guest: u32) -> Option<u32> {
        self.lock().by_guest.get(&guest).map(|s| s.host)
    }

    /// Adds `user` to `guest`'s translation and returns its host PASID, when `guest` has one.
    pub fn share(&self, guest: u32, user: PasidUser) -> Option<u32> {
        let mut g = self.lock();
        let s = g.by_guest.get_mut(&guest)?;
        s.users.insert(user);
        Some(s.host)
    }

    /// Records `guest -> host` for its first user.
    pub fn insert(&self, guest: u32, host: u32, user: PasidUser) -> Result<(), VmPasidError> {
        let mut g = self.lock();
        if let Some(s) = g.by_guest.get_mut(&guest) {
            if s.host != host {
                return Err(VmPasidError::Conflict {
                    guest,
                    host: s.host,
                    wanted: host,
                });
            }
            s.users.insert(user);
            return Ok(());
        }
        g.table.map(guest, host)?;
        let mut users = BTreeSet::new();
        users.insert(user);
        g.by_guest.insert(guest, Shared { host, users });
        self.program_cpu(guest, Some(host));
        Ok(())
    }

    /// Gives `guest` a new host PASID (every user moved to it).
    pub fn rehost(&self, guest: u32, host: u32) -> Result<(), VmPasidError> {
        let mut g = self.lock();
        let Inner { by_guest, table } = &mut *g;
        if let Some(s) = by_guest.get_mut(&guest) {
            table.map(guest, host)?;
            s.host = host;
            self.program_cpu(guest, Some(host));
        }
        Ok(())
    }

    /// `user` lets go of `guest`.
    pub fn release(&self, guest: u32, user: PasidUser) -> Release {
        let mut g = self.lock();
        let Some(s) = g.by_guest.get_mut(&guest) else {
            return Release::NotUsed;
        };
        if !s.users.remove(&user) {
            return Release::NotUsed;
        }
        if !s.users.is_empty() {
            return Release::Shared {
                host: s.host,
                users: s.users.iter().copied().collect(),
            };
        }
        let host = s.host;
        g.by_guest.remove(&guest);
        g.table.unmap(guest);
        self.program_cpu(guest, None);
        Release::Last { host }
    }

    /// Every translation, by guest PASID.
    pub fn entries(&self) -> Vec<PasidTranslationView> {
        self.lock()
            .by_guest
            .iter()
            .map(|(g, s)| PasidTranslationView {
                guest: *g,
                host: s.host,
                users: s.users.iter().copied().collect(),
            })
            .collect()
    }

    /// Runs `f` on the VT-x structure (what a KVM extension would be handed).
    pub fn with_vtx_table<R>(&self, f: impl FnOnce(&PasidTranslationTable) -> R) -> R {
        f(&self.lock().table)
    }
}

impl PasidTranslate for VmPasidTable {
    /// The CPU's walk of the VT-x structure.
    fn host_pasid(&self, guest: u32) -> Option<u32> {
        self.lock().table.translate(guest)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::cpu::EnqcmdError;
    use super::*;

    /// A CPU side that translates and records what it is told.
    #[derive(Debug, Default)]
    struct Recording(Mutex<Vec<(u32, Option<u32>)>>);

    impl CpuPasidTranslation for Recording {
        fn support(&self) -> CpuPasidSupport {
            CpuPasidSupport::Available
        }
        fn map(&self, guest: u32, host: u32) -> Result<(), EnqcmdError> {
            self.0.lock().unwrap().push((guest, Some(host)));
            Ok(())
        }
        fn unmap(&self, guest: u32) -> Result<(), EnqcmdError> {
            self.0.lock().unwrap().push((guest, None));
            Ok(())
        }
    }

    #[test]
    fn changes_reach_a_translating_cpu_side() {
        let cpu: &'static Recording = Box::leak(Box::default());
        let t = VmPasidTable::with_cpu(cpu);
        t.insert(5, 0x40, 1).unwrap();
        assert_eq!(t.share(5, 2), Some(0x40));
        t.release(5, 1);
        t.rehost(5, 0x41).unwrap();
        t.release(5, 2);
        assert_eq!(
            *cpu.0.lock().unwrap(),
            vec![(5, Some(0x40)), (5, Some(0x41)), (5, None)]
        );
    }

    #[test]
    fn shared_guest_pasid_is_refcounted() {
        let t = VmPasidTable::new();
        assert_eq!(t.share(5, 1), None);
        t.insert(5, 0x40, 1).unwrap();
        assert_eq!(t.share(5, 2), Some(0x40));
        assert!(matches!(
            t.insert(5, 0x41, 3),
            Err(VmPasidError::Conflict { host: 0x40, .. })
        ));
        assert_eq!(t.host_pasid(5), Some(0x40));
        assert_eq!(
            t.release(5, 1),
            Release::Shared {
                host: 0x40,
                users: vec![2]
            }
        );
        assert_eq!(t.release(5, 1), Release::NotUsed);
        t.rehost(5, 0x42).unwrap();
        assert_eq!(t.host_pasid(5), Some(0x42));
        assert_eq!(t.release(5, 2), Release::Last { host: 0x42 });
        assert_eq!(t.host_pasid(5), None);
        assert!(t.entries().is_empty());
        assert_eq!(t.with_vtx_table(PasidTranslationTable::tables), 0);
    }
}
