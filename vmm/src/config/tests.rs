//! Command-line parsing tests.

#![allow(clippy::unwrap_used, clippy::panic)]

use clap::Parser;

use super::kv::parse_size;
use super::*;
use crate::boot::payload::{PayloadMode, DEFAULT_REAL_GPA};

fn parse(args: &[&str]) -> Result<Action, ConfigError> {
    let mut v = vec!["ioasid-vmm"];
    v.extend_from_slice(args);
    Cli::try_parse_from(v).unwrap().action()
}

fn vm(args: &[&str]) -> VmConfig {
    match parse(args).unwrap() {
        Action::Run(c) => *c,
        a => panic!("expected run, got {a:?}"),
    }
}

fn err(args: &[&str]) -> String {
    let e = parse(args).unwrap_err().to_string();
    println!("{args:?} -> {e}");
    e
}

/// Asserts that `args` fail with a message naming `flag` and containing `hint`.
fn rejects(args: &[&str], flag: &str, hint: &str) {
    let e = err(args);
    assert!(e.starts_with(flag), "{e}");
    assert!(e.contains(hint), "{e}");
}

#[test]
fn full_command_line() {
    let c = vm(&[
        "--kernel", "/k", "--cmdline", "console=ttyS0", "--initramfs", "/i",
        "--cpus", "boot=2", "--memory", "size=2G,hugepages=off",
        "--device", "path=/sys/bus/pci/devices/0000:00:03.0,iommu=on,pasid=on,id=edu0,pci_segment=0,pci_device_id=5",
        "--device", "fd=7",
        "--platform", "iommufd=on,iommu_address_width=48,viommu=vtd,pasid-bits=20",
        "--serial", "file=/tmp/s.log", "--api-socket", "/tmp/api.sock",
    ]);
    assert_eq!(
        c.boot,
        BootConfig::Linux(LinuxConfig {
            kernel: "/k".into(),
            cmdline: "console=ttyS0".into(),
            initramfs: Some("/i".into())
        })
    );
    assert_eq!(c.cpus.boot, 2);
    assert_eq!(
        c.memory,
        MemoryConfig {
            size: 2 << 30,
            hugepages: false
        }
    );
    assert_eq!(c.devices.len(), 2);
    let d = &c.devices[0];
    assert!(d.iommu && d.pasid);
    assert_eq!(d.id.as_deref(), Some("edu0"));
    assert_eq!(d.pci_device_id, Some(5));
    assert_eq!(c.devices[1].fd, Some(7));
    assert_eq!(c.platform.iommufd, OnOffAuto::On);
    assert_eq!(c.platform.iommu_address_width, Some(48));
    assert_eq!(c.platform.viommu, ViommuKind::Vtd);
    assert_eq!(
        c.serial,
        SerialConfig::File {
            path: "/tmp/s.log".into(),
            max_size: None
        }
    );
    assert_eq!(c.api_socket, Some("/tmp/api.sock".into()));
}

#[test]
fn defaults() {
    let c = vm(&["--kernel", "/k"]);
    assert_eq!(c.cpus.boot, 1);
    assert_eq!(c.memory.size, DEFAULT_MEMORY);
    assert_eq!(c.serial, SerialConfig::Tty);
    assert_eq!(c.platform, PlatformConfig::default());
    match c.boot {
        BootConfig::Linux(l) => assert_eq!(l.cmdline, DEFAULT_CMDLINE),
        b => panic!("{b:?}"),
    }
}

#[test]
fn several_devices_after_one_flag() {
    let c = vm(&[
        "--kernel",
        "/k",
        "--device",
        "path=/sys/bus/pci/devices/0000:00:03.0",
        "path=/sys/bus/pci/devices/0000:00:04.0",
    ]);
    assert_eq!(c.devices.len(), 2);
}

#[test]
fn sizes() {
    assert_eq!(parse_size("512M"), Some(512 << 20));
    assert_eq!(parse_size("2g"), Some(2 << 30));
    assert_eq!(parse_size("4096"), Some(4096));
    assert_eq!(parse_size("1T"), Some(1 << 40));
    assert_eq!(parse_size(""), None);
    assert_eq!(parse_size("M"), None);
    assert_eq!(parse_size("-1G"), None);
    assert_eq!(parse_size("99999999999T"), None);
}

#[test]
fn bad_cpus() {
    rejects(
        &["--kernel", "/k", "--cpus", "boot=0"],
        "--cpus",
        "1 to 255",
    );
    rejects(
        &["--kernel", "/k", "--cpus", "boot=x"],
        "--cpus",
        "1 to 255",
    );
    rejects(
        &["--kernel", "/k", "--cpus", "boot=256"],
        "--cpus",
        "1 to 255",
    );
    rejects(&["--kernel", "/k", "--cpus", "4"], "--cpus", "boot=<count>");
    rejects(
        &["--kernel", "/k", "--cpus", "max=4"],
        "--cpus",
        "boot=<count>",
    );
    rejects(
        &["--kernel", "/k", "--cpus", "boot=1,boot=2"],
        "--cpus",
        "more than once",
    );
}

#[test]
fn cpus_enqcmd_policy_parses() {
    assert_eq!(vm(&["--kernel", "/k"]).cpus.enqcmd, OnOffAuto::Auto);
    for (v, want) in [
        ("auto", OnOffAuto::Auto),
        ("off", OnOffAuto::Off),
        // Accepted here; refused at start with the reason (runner, enqcmd::cpu).
        ("on", OnOffAuto::On),
    ] {
        let c = vm(&["--kernel", "/k", "--cpus", &format!("boot=2,enqcmd={v}")]);
        assert_eq!((c.cpus.boot, c.cpus.enqcmd), (2, want));
    }
    rejects(
        &["--kernel", "/k", "--cpus", "boot=1,enqcmd=yes"],
        "--cpus",
        "on, off or auto",
    );
    rejects(
        &["--kernel", "/k", "--cpus", "enqcmd=on"],
        "--cpus",
        "boot=<count> is required",
    );
}

#[test]
fn bad_memory() {
    rejects(
        &["--kernel", "/k", "--memory", "size=abc"],
        "--memory",
        "512M",
    );
    rejects(
        &["--kernel", "/k", "--memory", "size=1M"],
        "--memory",
        "at least 2M",
    );
    rejects(
        &["--kernel", "/k", "--memory", "size=4097"],
        "--memory",
        "multiple of 4K",
    );
    rejects(
        &["--kernel", "/k", "--memory", "size=1G,hugepages=yes"],
        "--memory",
        "on, off",
    );
    rejects(
        &["--kernel", "/k", "--memory", "size=3M,hugepages=on"],
        "--memory",
        "2M",
    );
    rejects(
        &["--kernel", "/k", "--memory", "sz=1G"],
        "--memory",
        "size=<size>",
    );
    rejects(
        &["--kernel", "/k", "--memory", "1G"],
        "--memory",
        "key=value",
    );
}

const EDU: &str = "/sys/bus/pci/devices/0000:00:03.0";

#[test]
fn bad_device() {
    let dev = |v: &str| {
        vec![
            "--kernel".to_string(),
            "/k".into(),
            "--device".into(),
            v.into(),
        ]
    };
    let cases: Vec<(String, &str)> = vec![
        ("iommu=on".to_string(), "needs `path`"),
        (format!("path={EDU},fd=3"), "not both"),
        ("fd=-1".to_string(), "file descriptor"),
        ("fd=1".to_string(), "stdin, stdout or stderr"),
        (format!("path={EDU},iommu=maybe"), "on or off"),
        (format!("path={EDU},iommu=on,pasid=1"), "on or off"),
        (format!("path={EDU},pasid=on"), "needs iommu=on"),
        (format!("path={EDU},pci_device_id=32"), "0-31"),
        (format!("path={EDU},pci_segment=70000"), "0-65535"),
        (format!("path={EDU},id="), "empty"),
        (format!("path={EDU},id=a b"), "only letters"),
        (format!("path={EDU},colour=red"), "pci_device_id"),
        ("path=,id=x".to_string(), "sysfs device path"),
        ("path=/etc/passwd".to_string(), "not allowed"),
        ("path=/dev/vfio/devices/vfiox".to_string(), "not allowed"),
        (
            format!("path={EDU},x_exclude_mmap_bars=[1]"),
            "not supported",
        ),
    ];
    for (value, hint) in &cases {
        let args = dev(value);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        rejects(&args, "--device", hint);
        // The rejected value is quoted, so the user sees which --device was wrong.
        assert!(err(&args).contains(value), "{value}");
    }
    rejects(
        &[
            "--kernel",
            "/k",
            "--device",
            &format!("path={EDU},id=d"),
            "--device",
            "path=/sys/bus/pci/devices/0000:00:04.0,id=d",
        ],
        "--device",
        "more than one device",
    );
    rejects(
        &["--kernel", "/k", "--device", "fd=5", "--device", "fd=5"],
        "--device",
        "fd=5 is given for more than one device",
    );
    rejects(
        &[
            "--kernel",
            "/k",
            "--device",
            &format!("path={EDU},iommu=on"),
        ],
        "--device",
        "viommu=vtd",
    );
}

#[test]
fn device_accepts_cdev_paths_and_mdevs() {
    let c = vm(&[
        "--kernel",
        "/k",
        "--device",
        "path=/dev/vfio/devices/vfio3,id=c",
        "path=/sys/bus/mdev/devices/83b8f4f2-509f-382f-3c1e-e6bfe0fa1001",
    ]);
    assert_eq!(
        c.devices[0].path.as_deref(),
        Some(std::path::Path::new("/dev/vfio/devices/vfio3"))
    );
    assert_eq!(c.devices[1].id, None);
}

#[test]
fn bad_platform() {
    rejects(
        &["--kernel", "/k", "--platform", "iommufd=yes"],
        "--platform",
        "on, off, auto",
    );
    rejects(
        &["--kernel", "/k", "--platform", "iommu_address_width=20"],
        "--platform",
        "39 to 64",
    );
    rejects(
        &["--kernel", "/k", "--platform", "iommu_address_width=x"],
        "--platform",
        "39 to 64",
    );
    rejects(
        &["--kernel", "/k", "--platform", "viommu=smmu"],
        "--platform",
        "vtd, off",
    );
    rejects(
        &["--kernel", "/k", "--platform", "num_pci_segments=2"],
        "--platform",
        "iommufd=on|off|auto",
    );
}

#[test]
fn viommu_options() {
    let c = vm(&[
        "--kernel",
        "/k",
        "--platform",
        "viommu=vtd,scalable-mode=on,fsts=off,pasid-bits=16,svm=off",
    ]);
    assert_eq!(c.platform.viommu, ViommuKind::Vtd);
    assert_eq!(
        c.platform.vtd,
        ViommuConfig {
            scalable_mode: true,
            fsts: OnOffAuto::Off,
            pasid_bits: 16,
            svm: false
        }
    );
    assert_eq!(c.platform.address_width(), 48);
    let c = vm(&["--kernel", "/k", "--platform", "viommu=vtd"]);
    assert_eq!(c.platform.vtd, ViommuConfig::default());
    assert_eq!(c.platform.vtd.fsts, OnOffAuto::Auto);
    let c = vm(&[
        "--kernel",
        "/k",
        "--platform",
        "viommu=vtd,fsts=on,pasid-bits=20,svm=on,iommu_address_width=39",
    ]);
    assert!(c.platform.vtd.svm);
    assert_eq!(c.platform.address_width(), 39);
    let c = vm(&[
        "--kernel",
        "/k",
        "--platform",
        "viommu=vtd,scalable-mode=off",
    ]);
    assert!(!c.platform.vtd.scalable_mode);
}

#[test]
fn iommufd_platform_options() {
    let c = vm(&["--kernel", "/k"]);
    assert_eq!(
        (c.platform.hwpt, c.platform.rlimit_mode),
        (HwptMode::Auto, RlimitMode::User)
    );
    let c = vm(&[
        "--kernel",
        "/k",
        "--platform",
        "iommufd=on,hwpt=explicit,rlimit_mode=process",
    ]);
    assert_eq!(c.platform.hwpt, HwptMode::Explicit);
    assert_eq!(c.platform.rlimit_mode, RlimitMode::Process);
    let c = vm(&["--kernel", "/k", "--platform", "hwpt=auto,rlimit_mode=user"]);
    assert_eq!(
        (c.platform.hwpt, c.platform.rlimit_mode),
        (HwptMode::Auto, RlimitMode::User)
    );
    // auto may end on iommufd, so the iommufd knobs are accepted with it.
    let c = vm(&["--kernel", "/k", "--platform", "iommufd=auto,hwpt=explicit"]);
    assert_eq!(c.platform.hwpt, HwptMode::Explicit);
    for (v, hint) in [
        ("hwpt=kernel", "auto, explicit"),
        ("rlimit_mode=mm", "user, process"),
        ("iommufd=off,hwpt=explicit", "type1 container has no HWPTs"),
        ("iommufd=off,rlimit_mode=process", "charges per process"),
    ] {
        rejects(&["--kernel", "/k", "--platform", v], "--platform", hint);
    }
    // The type1 defaults are fine with iommufd=off.
    let c = vm(&[
        "--kernel",
        "/k",
        "--platform",
        "iommufd=off,hwpt=auto,rlimit_mode=user",
    ]);
    assert_eq!(c.platform.iommufd, OnOffAuto::Off);
}

#[test]
fn viommu_combinations_that_cannot_be_honoured() {
    let p = |v: &str| {
        vec![
            "--kernel".to_string(),
            "/k".into(),
            "--platform".into(),
            v.into(),
        ]
    };
    let cases = [
        ("viommu=vtd,svm=on", "svm=on needs pasid-bits"),
        ("viommu=vtd,svm=on,pasid-bits=0", "svm=on needs pasid-bits"),
        (
            "viommu=vtd,svm=on,pasid-bits=8,fsts=off",
            "needs first-stage",
        ),
        (
            "viommu=vtd,scalable-mode=off,fsts=on",
            "fsts=on needs scalable-mode=on",
        ),
        (
            "viommu=vtd,scalable-mode=off,pasid-bits=8",
            "pasid-bits needs scalable-mode=on",
        ),
        ("viommu=vtd,pasid-bits=21", "0 (no PASIDs) to 20"),
        ("viommu=vtd,pasid-bits=x", "0 (no PASIDs) to 20"),
        ("viommu=vtd,fsts=maybe", "on, off, auto"),
        ("viommu=vtd,scalable-mode=1", "on, off"),
        ("fsts=on", "needs viommu=vtd"),
        ("viommu=off,pasid-bits=8", "needs viommu=vtd"),
        ("viommu=vtd,x-flts=on", "fsts=on|off|auto"),
        ("viommu=vtd,iommu_address_width=40", "39, 48 or 57"),
    ];
    for (v, hint) in cases {
        let args = p(v);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        rejects(&args, "--platform", hint);
    }
    rejects(
        &[
            "--kernel",
            "/k",
            "--platform",
            "viommu=vtd",
            "--device",
            &format!("path={EDU},iommu=on,pasid=on"),
        ],
        "--device",
        "pasid-bits",
    );
}

#[test]
fn help_documents_every_platform_option() {
    use clap::CommandFactory;
    let help = Cli::command().render_long_help().to_string();
    for key in [
        "iommufd=",
        "hwpt=auto|explicit",
        "rlimit_mode=user|process",
        "iommu_address_width=",
        "viommu=vtd",
        "scalable-mode=",
        "fsts=",
        "pasid-bits=",
        "svm=",
        "iommu=on",
    ] {
        assert!(help.contains(key), "--help lacks {key}: {help}");
    }
}

#[test]
fn serial_modes() {
    assert_eq!(
        vm(&["--kernel", "/k", "--serial", "off"]).serial,
        SerialConfig::Off
    );
    assert_eq!(
        vm(&["--kernel", "/k", "--serial", "tty"]).serial,
        SerialConfig::Tty
    );
    rejects(
        &["--kernel", "/k", "--serial", "pty"],
        "--serial",
        "tty, file=<path>[,max_size=<bytes>], off",
    );
    rejects(
        &["--kernel", "/k", "--serial", "file="],
        "--serial",
        "tty, file=<path>[,max_size=<bytes>], off",
    );
}

#[test]
fn boot_choice() {
    rejects(&[], "--kernel", "nothing to boot");
    rejects(
        &["--kernel", "/k", "--payload", "/p"],
        "--kernel/--payload",
        "not both",
    );
    rejects(
        &["--payload", "/p", "--initramfs", "/i"],
        "--payload",
        "only to --kernel",
    );
    let c = vm(&["--payload", "/p,mode=long,gpa=0x200000"]);
    assert_eq!(
        c.boot,
        BootConfig::Payload(PayloadConfig {
            path: "/p".into(),
            gpa: 0x20_0000,
            mode: PayloadMode::Long,
            irqchip: false
        })
    );
    let c = vm(&["--payload", "/p"]);
    match c.boot {
        BootConfig::Payload(p) => {
            assert_eq!((p.gpa, p.mode), (DEFAULT_REAL_GPA, PayloadMode::Real))
        }
        b => panic!("{b:?}"),
    }
    rejects(
        &["--payload", "/p,mode=protected"],
        "--payload",
        "real, long",
    );
    rejects(&["--payload", "/p,gpa=zz"], "--payload", "0x-hex");
    rejects(&["--payload", "gpa=1"], "--payload", "payload file");
    rejects(
        &["--payload", "/p", "--cpus", "boot=2"],
        "--cpus",
        "one vCPU",
    );
}

#[test]
fn iommu_info_subcommand() {
    assert_eq!(
        parse(&["iommu-info", "--device", "/dev/vfio/devices/vfio0"]).unwrap(),
        Action::IommuInfo {
            device: "/dev/vfio/devices/vfio0".into()
        }
    );
    assert!(Cli::try_parse_from(["ioasid-vmm", "iommu-info"]).is_err());
}

#[test]
fn serial_file_takes_a_size_cap() {
    assert_eq!(
        parse_serial("file=/tmp/a,b.log,max_size=1M").unwrap(),
        SerialConfig::File {
            path: "/tmp/a,b.log".into(),
            max_size: Some(1 << 20)
        }
    );
    for bad in [
        "file=/tmp/x,max_size=0",
        "file=/tmp/x,max_size=lots",
        "file=,max_size=1M",
    ] {
        let e = parse_serial(bad).unwrap_err().to_string();
        assert!(e.contains("max_size"), "{bad}: {e}");
    }
}
