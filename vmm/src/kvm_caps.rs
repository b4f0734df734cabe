//! The one place the VMM asks KVM about a capability (`KVM_CHECK_EXTENSION`).
//!
//! Every probe goes through [`has_cap`] so that a capability number can be refused before it
//! reaches the kernel. The refused numbers ([`NEVER_PROBED`]) are the ones the 2021
//! `/dev/ioasid` RFC proposed for CPU PASID translation and that never became uAPI: the
//! RFC's `KVM_CAP_PASID_TRANSLATION` is 206, which is `KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM`
//! in today's `linux/kvm.h`. Probing it would ask KVM about SEV context migration and read
//! a yes as "KVM translates PASIDs". A kernel that offers PASID translation will name its
//! own capability; `docs/ENQCMD.md` says what it must offer.
//!
//! Owns: the probe and the refusal list. The test `pasid_cap_number_never_probed` checks the
//! list, the refusal, and that no other file of the workspace calls `check_extension*`.

use kvm_ioctls::{Cap, Kvm, VmFd};

/// Capability numbers never passed to `KVM_CHECK_EXTENSION`, with why.
pub const NEVER_PROBED: &[(u32, &str)] = &[(
    206,
    "the /dev/ioasid RFC's KVM_CAP_PASID_TRANSLATION (never merged); 206 is \
     KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM today",
)];

/// Something `KVM_CHECK_EXTENSION` can be issued on (`/dev/kvm` or a VM fd).
pub trait CapProbe {
    /// The raw ioctl: the kernel's answer for capability number `cap`.
    fn check_extension_raw(&self, cap: u32) -> i32;
}

impl CapProbe for Kvm {
    fn check_extension_raw(&self, cap: u32) -> i32 {
        Kvm::check_extension_raw(self, libc::c_ulong::from(cap))
    }
}

impl CapProbe for VmFd {
    fn check_extension_raw(&self, cap: u32) -> i32 {
        VmFd::check_extension_raw(self, libc::c_ulong::from(cap))
    }
}

/// Why a number in [`NEVER_PROBED`] is refused, `None` for any other.
pub fn refused(cap: u32) -> Option<&'static str> {
    NEVER_PROBED
        .iter()
        .find(|(n, _)| *n == cap)
        .map(|(_, why)| *why)
}

/// KVM's answer for capability number `cap` (0: absent). A refused number is never asked:
/// it reads as absent.
pub fn cap_value(on: &impl CapProbe, cap: u32) -> i32 {
    if let Some(why) = refused(cap) {
        log::warn!("KVM capability {cap} is never probed: {why}");
        return 0;
    }
    on.check_extension_raw(cap)
}

/// Whether KVM has `cap` (on `/dev/kvm` or, for per-VM answers, on the VM fd).
pub fn has_cap(on: &impl CapProbe, cap: Cap) -> bool {
    cap_value(on, cap as u32) > 0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::cell::RefCell;
    use std::path::{Path, PathBuf};

    use super::*;

    /// Records every number that reaches the "kernel".
    #[derive(Default)]
    struct Recorder(RefCell<Vec<u32>>);

    impl CapProbe for Recorder {
        fn check_extension_raw(&self, cap: u32) -> i32 {
            self.0.borrow_mut().push(cap);
            1
        }
    }

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n == "target" || n == ".git") {
                    continue;
                }
                rust_files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    #[test]
    fn pasid_cap_number_never_probed() {
        // The list holds the RFC's number.
        assert!(refused(206).is_some());
        assert_eq!(
            kvm_bindings::KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM,
            206,
            "206 is no longer KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM: re-check NEVER_PROBED"
        );
        // A refused number never reaches the ioctl; any other does.
        let r = Recorder::default();
        for (n, _) in NEVER_PROBED {
            assert_eq!(cap_value(&r, *n), 0);
        }
        assert!(has_cap(&r, Cap::X86UserSpaceMsr));
        assert!(has_cap(&r, Cap::X86MsrFilter));
        let asked = r.0.borrow().clone();
        assert_eq!(
            asked,
            vec![
                kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
                kvm_bindings::KVM_CAP_X86_MSR_FILTER
            ]
        );
        for (n, _) in NEVER_PROBED {
            assert!(!asked.contains(n));
        }
        // Nothing in the workspace goes around the wrapper: the only check_extension calls
        // are in this file.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files = Vec::new();
        rust_files(&root, &mut files);
        assert!(
            files.len() > 50,
            "the scan found too few files under {}",
            root.display()
        );
        let me = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/kvm_caps.rs")
            .canonicalize()
            .unwrap();
        let mut offenders = Vec::new();
        for f in &files {
            if f.canonicalize().ok().as_deref() == Some(me.as_path()) {
                continue;
            }
            let text = std::fs::read_to_string(f).unwrap_or_default();
            for (i, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or_default();
                if code.contains("check_extension") || code.contains("KVM_CHECK_EXTENSION()") {
                    offenders.push(format!("{}:{}: {}", f.display(), i + 1, line.trim()));
                }
            }
        }
        assert!(
            offenders.is_empty(),
            "KVM_CHECK_EXTENSION outside vmm::kvm_caps (route it through has_cap): {offenders:#?}"
        );
    }
}
