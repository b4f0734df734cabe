//! `--platform`: the IOMMU backend and the vIOMMU.
//!
//! `--platform iommufd=on|off|auto,hwpt=auto|explicit,rlimit_mode=user|process,
//! iommu_address_width=BITS,viommu=vtd|off,scalable-mode=on|off,fsts=on|off|auto,pasid-bits=N,
//! svm=on|off`: Cloud Hypervisor's `--platform` syntax with QEMU's 2026 intel-iommu property
//! names, plus two iommufd knobs (`hwpt=`, `rlimit_mode=`) that only mean something with
//! iommufd and are refused with `iommufd=off`. Combinations that can never
//! be honoured are refused here; those that depend on the host (first stage for an assigned
//! device needs host nesting) are refused by the device manager when the device is added,
//! which for a `--device` is at start.

use super::kv::KeyValues;
use super::ConfigError;

/// On, off, or decided by probing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnOffAuto {
    /// Required.
    On,
    /// Not used.
    Off,
    /// Used when available.
    Auto,
}

/// `hwpt=`: how an assigned device reaches the VM's guest-RAM IOAS on iommufd.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HwptMode {
    /// Attach the device to the IOAS; the kernel finds or creates the paging HWPT.
    #[default]
    Auto,
    /// Allocate a paging HWPT on the IOAS (`IOMMU_HWPT_ALLOC`) and attach the device to its
    /// id: the VMM owns the HWPT (what dirty tracking needs later).
    Explicit,
}

/// `rlimit_mode=`: how iommufd charges guest RAM it pins against RLIMIT_MEMLOCK
/// (`IOMMU_OPTION_RLIMIT_MODE`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RlimitMode {
    /// Per user, the iommufd default.
    #[default]
    User,
    /// Per process, as the VFIO type1 container charges; needs CAP_SYS_RESOURCE. (A VMM with
    /// CAP_IPC_LOCK is charged nothing in either mode.)
    Process,
}

/// `viommu=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViommuKind {
    /// No vIOMMU.
    Off,
    /// Emulated Intel VT-d.
    Vtd,
}

/// `fsts=`: whether the vIOMMU offers first-stage translation (ECAP.FSTS).
pub type FstsMode = OnOffAuto;

/// The guest address width when `iommu_address_width` is not given (4-level tables).
pub const DEFAULT_IOMMU_ADDRESS_WIDTH: u8 = 48;
/// The largest `pasid-bits` (PCIe PASIDs are 20 bits).
pub const MAX_PASID_BITS: u8 = 20;

/// The VT-d options of `--platform` (meaningful with `viommu=vtd`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViommuConfig {
    /// `scalable-mode=`: scalable-mode translation (context entries with PASID directories);
    /// `off` is legacy mode.
    pub scalable_mode: bool,
    /// `fsts=`: first-stage translation. `auto`: only where the bridge can honour it (host
    /// nesting for assigned devices; emulated devices always can).
    pub fsts: FstsMode,
    /// `pasid-bits=`: PASID width offered to the guest (ECAP.PSS + 1); 0 = no PASID support.
    pub pasid_bits: u8,
    /// `svm=`: shared virtual addressing (page requests: ECAP.PRS, PDS; needs PASID and first
    /// stage).
    pub svm: bool,
}

impl Default for ViommuConfig {
    fn default() -> Self {
        Self {
            scalable_mode: true,
            fsts: OnOffAuto::Auto,
            pasid_bits: 0,
            svm: false,
        }
    }
}

/// `--platform`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlatformConfig {
    /// iommufd (cdev) versus legacy VFIO container.
    pub iommufd: OnOffAuto,
    /// `hwpt=` (iommufd only).
    pub hwpt: HwptMode,
    /// `rlimit_mode=` (iommufd only).
    pub rlimit_mode: RlimitMode,
    /// vIOMMU guest address width in bits (`None`: [`DEFAULT_IOMMU_ADDRESS_WIDTH`]).
    pub iommu_address_width: Option<u8>,
    /// The vIOMMU model.
    pub viommu: ViommuKind,
    /// Its options.
    pub vtd: ViommuConfig,
}

impl PlatformConfig {
    /// The vIOMMU guest address width in bits.
    pub fn address_width(&self) -> u8 {
        self.iommu_address_width
            .unwrap_or(DEFAULT_IOMMU_ADDRESS_WIDTH)
    }
}

impl Default for PlatformConfig {
    fn default() -> Self {
        Self {
            iommufd: OnOffAuto::Auto,
            hwpt: HwptMode::Auto,
            rlimit_mode: RlimitMode::User,
            iommu_address_width: None,
            viommu: ViommuKind::Off,
            vtd: ViommuConfig::default(),
        }
    }
}

/// The keys `--platform` accepts.
const KEYS: &[&str] = &[
    "iommufd",
    "hwpt",
    "rlimit_mode",
    "iommu_address_width",
    "viommu",
    "scalable-mode",
    "fsts",
    "pasid-bits",
    "svm",
];
/// What `--platform` accepts, for messages.
pub const ACCEPTED: &str = "iommufd=on|off|auto, hwpt=auto|explicit, \
    rlimit_mode=user|process, iommu_address_width=<39-64>, viommu=vtd|off, \
    scalable-mode=on|off, fsts=on|off|auto, pasid-bits=<0-20>, svm=on|off";

fn on_off_auto(kv: &KeyValues, key: &str) -> Result<OnOffAuto, ConfigError> {
    match kv.get(key) {
        None | Some("auto") => Ok(OnOffAuto::Auto),
        Some("on") => Ok(OnOffAuto::On),
        Some("off") => Ok(OnOffAuto::Off),
        Some(v) => Err(kv.invalid(key, v, "on, off, auto")),
    }
}

fn refuse(reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag: "--platform",
        reason: reason.into(),
    }
}

pub(super) fn parse_platform(s: &str) -> Result<PlatformConfig, ConfigError> {
    let kv = KeyValues::parse("--platform", s, KEYS, ACCEPTED)?;
    let iommufd = on_off_auto(&kv, "iommufd")?;
    let hwpt = match kv.get("hwpt") {
        None | Some("auto") => HwptMode::Auto,
        Some("explicit") => HwptMode::Explicit,
        Some(v) => return Err(kv.invalid("hwpt", v, "auto, explicit")),
    };
    let rlimit_mode = match kv.get("rlimit_mode") {
        None | Some("user") => RlimitMode::User,
        Some("process") => RlimitMode::Process,
        Some(v) => return Err(kv.invalid("rlimit_mode", v, "user, process")),
    };
    if iommufd == OnOffAuto::Off {
        if hwpt == HwptMode::Explicit {
            return Err(refuse(
                "hwpt=explicit needs iommufd: the type1 container has no HWPTs",
            ));
        }
        if rlimit_mode == RlimitMode::Process {
            return Err(refuse(
                "rlimit_mode=process is an iommufd option: the type1 container always \
                 charges per process",
            ));
        }
    }
    let width: Option<u8> = kv.number("iommu_address_width", "a bit width from 39 to 64")?;
    if let Some(w) = width {
        if !(39..=64).contains(&w) {
            return Err(kv.invalid(
                "iommu_address_width",
                kv.get("iommu_address_width").unwrap_or_default(),
                "a bit width from 39 to 64",
            ));
        }
    }
    let viommu = match kv.get("viommu") {
        None | Some("off") => ViommuKind::Off,
        Some("vtd") => ViommuKind::Vtd,
        Some(v) => return Err(kv.invalid("viommu", v, "vtd, off")),
    };
    let vtd_keys = ["scalable-mode", "fsts", "pasid-bits", "svm"];
    if viommu == ViommuKind::Off {
        if let Some(k) = vtd_keys.iter().find(|k| kv.get(k).is_some()) {
            return Err(refuse(format!("{k} is a VT-d option: it needs viommu=vtd")));
        }
    }
    let pasid_bits: Option<u8> =
        kv.number("pasid-bits", "a PASID width from 0 (no PASIDs) to 20")?;
    if pasid_bits.is_some_and(|b| b > MAX_PASID_BITS) {
        return Err(kv.invalid(
            "pasid-bits",
            kv.get("pasid-bits").unwrap_or_default(),
            "a PASID width from 0 (no PASIDs) to 20",
        ));
    }
    let vtd = ViommuConfig {
        scalable_mode: kv.on_off("scalable-mode", true)?,
        fsts: on_off_auto(&kv, "fsts")?,
        pasid_bits: pasid_bits.unwrap_or(0),
        svm: kv.on_off("svm", false)?,
    };
    check_vtd(&vtd)?;
    if let (ViommuKind::Vtd, Some(w)) = (viommu, width) {
        if !matches!(w, 39 | 48 | 57) {
            return Err(kv.invalid(
                "iommu_address_width",
                kv.get("iommu_address_width").unwrap_or_default(),
                "with viommu=vtd, 39, 48 or 57 (3-, 4- or 5-level tables)",
            ));
        }
    }
    Ok(PlatformConfig {
        iommufd,
        hwpt,
        rlimit_mode,
        iommu_address_width: width,
        viommu,
        vtd,
    })
}

/// The combinations no host can honour (the VT-d specification's and Linux's rules).
fn check_vtd(v: &ViommuConfig) -> Result<(), ConfigError> {
    if !v.scalable_mode {
        if v.fsts == OnOffAuto::On {
            return Err(refuse(
                "fsts=on needs scalable-mode=on (legacy mode has second-stage tables only)",
            ));
        }
        if v.pasid_bits > 0 {
            return Err(refuse(
                "pasid-bits needs scalable-mode=on (legacy-mode context entries have no PASID \
                 tables)",
            ));
        }
    }
    if v.svm {
        if v.pasid_bits == 0 {
            return Err(refuse(
                "svm=on needs pasid-bits=N: shared virtual addressing binds process address \
                 spaces by PASID",
            ));
        }
        if v.fsts == OnOffAuto::Off {
            return Err(refuse(
                "svm=on needs first-stage translation (fsts=on or auto): the guest's CPU page \
                 tables are first-stage tables",
            ));
        }
    }
    Ok(())
}
