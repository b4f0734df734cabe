//! Edges of the PASID space that `scripts/mutants` found untested: a device with the full
//! 32-bit PASID width (no shift past the width of the value), and removing one device
//! releases only its own bindings.
#![allow(clippy::unwrap_used)]

use ioasid::types::{DevId, Pasid};
use ioasid::{PasidError, PasidSpace};

#[test]
fn pasid_width_32_accepts_every_nonzero_pasid() {
    let mut space = PasidSpace::new(1, 0xf_ffff).unwrap();
    let dev = DevId(7);
    for p in [1, 0xf_ffff, 0x10_0000, 0xffff_ffff] {
        let host = space.bind(dev, Pasid(p), 32).unwrap();
        assert_eq!(space.translate(dev, Pasid(p)), Some(host));
    }
    assert_eq!(
        space.bind(dev, Pasid(0), 32),
        Err(PasidError::Reserved { pasid: Pasid(0) })
    );
    // One bit narrower refuses the top bit.
    assert!(matches!(
        space.bind(DevId(8), Pasid(0x8000_0000), 31),
        Err(PasidError::TooWide { bits: 31, .. })
    ));
}

#[test]
fn release_device_releases_only_its_bindings() {
    let mut space = PasidSpace::new(1, 100).unwrap();
    let (a, b) = (DevId(1), DevId(2));
    space.bind(a, Pasid(5), 20).unwrap();
    space.bind(a, Pasid(6), 20).unwrap();
    let hb = space.bind(b, Pasid(5), 20).unwrap();
    assert_eq!(space.release_device(a), 2);
    assert_eq!(space.translate(a, Pasid(5)), None);
    assert_eq!(space.translate(a, Pasid(6)), None);
    assert_eq!(space.translate(b, Pasid(5)), Some(hb));
    assert_eq!(space.bindings().len(), 1);
    // A's host PASIDs are free again; b's stays taken.
    let again = space.bind(a, Pasid(5), 20).unwrap();
    assert_ne!(again, hb);
    assert_eq!(space.release_device(DevId(3)), 0);
    assert_eq!(space.bindings().len(), 2);
}
