//! Initial CPU state for each entry mode: the boot GDT, identity-mapping page tables,
//! segment registers, control registers, general registers and the FPU.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{
    BOOT_GDT_START, BOOT_IDENTITY_MAP_GIB, BOOT_IDT_START, PDE_START, PDPTE_START, PML4_START,
};
use crate::memory::GuestMemory;

/// CR0: protection enable.
pub const X86_CR0_PE: u64 = 1 << 0;
/// CR0: extension type (387 present).
pub const X86_CR0_ET: u64 = 1 << 4;
/// CR0: not write-through.
pub const X86_CR0_NW: u64 = 1 << 29;
/// CR0: cache disable.
pub const X86_CR0_CD: u64 = 1 << 30;
/// CR0: paging.
pub const X86_CR0_PG: u64 = 1 << 31;
/// CR4: physical address extension.
pub const X86_CR4_PAE: u64 = 1 << 5;
/// EFER: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER: long mode active.
pub const EFER_LMA: u64 = 1 << 10;

/// GDT index of the 64-bit code segment (selector 0x10 = Linux `__BOOT_CS`).
pub const GDT_CODE64: usize = 2;
/// GDT index of the flat data segment (selector 0x18 = Linux `__BOOT_DS`).
pub const GDT_DATA: usize = 3;
/// GDT index of the TSS.
pub const GDT_TSS: usize = 4;
/// GDT index of the 32-bit flat code segment (PVH entry).
pub const GDT_CODE32: usize = 5;

/// Errors writing boot CPU structures.
#[derive(Debug, Error)]
pub enum RegsError {
    /// Writing the GDT, IDT or page tables into guest memory failed.
    #[error("Cannot write the boot {what} at GPA {gpa:#x}")]
    Write {
        /// Which structure.
        what: &'static str,
        /// Where.
        gpa: u64,
        /// The memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// A GDT descriptor from flags (access byte in bits 0..8, flags nibble in 12..16), base and
/// limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, null, code64, data, TSS, code32.
pub fn boot_gdt() -> [u64; 6] {
    [
        0,
        0,
        gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code, present, exec/read, accessed, G
        gdt_entry(0xc093, 0, 0xfffff), // flat data, read/write, accessed, D/B, G
        gdt_entry(0x808b, 0, 0xfffff), // 32-bit busy TSS
        gdt_entry(0xc09b, 0, 0xfffff), // 32-bit flat code, exec/read, accessed, D, G
    ]
}

/// The KVM segment a GDT descriptor describes.
pub fn segment_from_gdt(entry: u64, index: usize) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (limit_raw << 12) | 0xfff
    } else {
        limit_raw
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: (index * 8) as u16,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(present == 0),
    }
}

fn write<T: vm_memory::ByteValued>(
    mem: &GuestMemory,
    what: &'static str,
    gpa: u64,
    v: T,
) -> Result<(), RegsError> {
    mem.write_obj(v, GuestAddress(gpa))
        .map_err(|source| RegsError::Write { what, gpa, source })
}

/// Writes the boot GDT and an empty IDT into guest memory.
pub fn write_gdt_idt(mem: &GuestMemory) -> Result<(), RegsError> {
    for (i, e) in boot_gdt().iter().enumerate() {
        write(mem, "GDT", BOOT_GDT_START + (i as u64) * 8, *e)?;
    }
    write(mem, "IDT", BOOT_IDT_START, 0u64)
}

/// Writes page tables identity-mapping the first [`BOOT_IDENTITY_MAP_GIB`] GiB with 2 MiB
/// pages: `PML4[0]` -> PDPT, `PDPT[i]` -> PD i, PD entries map 2 MiB each.
pub fn write_identity_page_tables(mem: &GuestMemory) -> Result<(), RegsError> {
    // Present | writable.
    const P_RW: u64 = 0x3;
    // Present | writable | page size (2 MiB).
    const P_RW_PS: u64 = 0x83;
    write(mem, "PML4", PML4_START, PDPTE_START | P_RW)?;
    for gib in 0..BOOT_IDENTITY_MAP_GIB {
        let pd = PDE_START + gib * 0x1000;
        write(mem, "PDPT", PDPTE_START + gib * 8, pd | P_RW)?;
        for i in 0..512u64 {
            let addr = (gib << 30) | (i << 21);
            write(mem, "page directory", pd + i * 8, addr | P_RW_PS)?;
        }
    }
    Ok(())
}

fn set_flat_segments(sregs: &mut kvm_sregs, code_index: usize) {
    let gdt = boot_gdt();
    let code = segment_from_gdt(gdt[code_index], code_index);
    let data = segment_from_gdt(gdt[GDT_DATA], GDT_DATA);
    let tss = segment_from_gdt(gdt[GDT_TSS], GDT_TSS);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
}

/// Special registers for 64-bit entry: long mode, paging on the boot page tables.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    set_flat_segments(&mut sregs, GDT_CODE64);
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    // KVM's reset CR0 has CD and NW set; a boot loader hands over with caches enabled.
    sregs.cr0 = (sregs.cr0 | X86_CR0_PE | X86_CR0_PG | X86_CR0_ET) & !(X86_CR0_CD | X86_CR0_NW);
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// Special registers for 32-bit protected-mode entry without paging (PVH).
pub fn protected_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    set_flat_segments(&mut sregs, GDT_CODE32);
    sregs.cr0 = (sregs.cr0 | X86_CR0_PE | X86_CR0_ET) & !(X86_CR0_PG | X86_CR0_CD | X86_CR0_NW);
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs
}

/// Special registers for real mode with CS based at `cs_base` (a multiple of 16 below 1 MiB).
pub fn real_mode_sregs(mut sregs: kvm_sregs, cs_base: u64) -> kvm_sregs {
    sregs.cs.base = cs_base;
    sregs.cs.selector = (cs_base >> 4) as u16;
    for s in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        s.base = 0;
        s.selector = 0;
    }
    sregs.cr0 &= !(X86_CR0_PE | X86_CR0_PG);
    sregs
}

/// General registers: `rip`, `rsp`, `rsi`, `rbx`, interrupts off (RFLAGS bit 1 is reserved-1).
pub fn entry_regs(rip: u64, rsp: u64, rsi: u64, rbx: u64) -> kvm_regs {
    kvm_regs {
        rip,
        rsp,
        rbp: rsp,
        rsi,
        rbx,
        rflags: 0x2,
        ..Default::default()
    }
}

/// FPU state at reset: x87 control word 0x37f, MXCSR 0x1f80.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use vm_memory::GuestAddress;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    #[test]
    fn gdt_entries_decode() {
        let gdt = boot_gdt();
        assert_eq!(gdt[GDT_CODE64], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[GDT_DATA], 0x00cf_9300_0000_ffff);
        let cs = segment_from_gdt(gdt[GDT_CODE64], GDT_CODE64);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.type_, cs.s),
            (0x10, 1, 0, 0xb, 1)
        );
        assert_eq!(
            (cs.base, cs.limit, cs.g, cs.present),
            (0, 0xffff_ffff, 1, 1)
        );
        let ds = segment_from_gdt(gdt[GDT_DATA], GDT_DATA);
        assert_eq!((ds.selector, ds.db, ds.type_), (0x18, 1, 0x3));
        let cs32 = segment_from_gdt(gdt[GDT_CODE32], GDT_CODE32);
        assert_eq!((cs32.l, cs32.db, cs32.type_), (0, 1, 0xb));
        let tr = segment_from_gdt(gdt[GDT_TSS], GDT_TSS);
        assert_eq!((tr.s, tr.type_), (0, 0xb));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let m = mem();
        write_identity_page_tables(&m).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        for gib in 0..4u64 {
            let pdpte: u64 = m.read_obj(GuestAddress(PDPTE_START + gib * 8)).unwrap();
            assert_eq!(pdpte, (PDE_START + gib * 0x1000) | 3);
        }
        // Walk a few addresses through the tables.
        for va in [0u64, 0x20_0000, 0x1234_5678, 0xffff_f000, 0xc020_0000] {
            let pdpte: u64 = m
                .read_obj(GuestAddress((pml4 & !0xfff) + ((va >> 30) & 0x1ff) * 8))
                .unwrap();
            let pde: u64 = m
                .read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 0x1ff) * 8))
                .unwrap();
            assert_eq!(pde & 0x83, 0x83, "va {va:#x}");
            assert_eq!((pde & !0x1f_ffff & !0xfff) | (va & 0x1f_ffff), va);
        }
        // Nothing beyond 4 GiB is mapped.
        let pdpte4: u64 = m.read_obj(GuestAddress(PDPTE_START + 4 * 8)).unwrap();
        assert_eq!(pdpte4, 0);
    }

    #[test]
    fn long_mode_sregs_set_paging() {
        let reset = kvm_sregs {
            cr0: 0x6000_0010,
            ..Default::default()
        };
        let s = long_mode_sregs(reset);
        assert_eq!(s.cr0 & (X86_CR0_CD | X86_CR0_NW), 0);
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cs.selector, 0x10);
        assert_eq!(s.ss.selector, 0x18);
        let p = protected_mode_sregs(s);
        assert_eq!(p.cr0 & X86_CR0_PG, 0);
        assert_eq!(p.efer, 0);
        assert_eq!(p.cs.selector, 0x28);
    }
}
