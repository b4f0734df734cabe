//! `ioasid-vmm`: the VMM binary.
fn main() {}
