//! Nesting, invalidation, I/O page faults and PASIDs on the kernel's selftest mock IOMMU
//! (`CONFIG_IOMMUFD_TEST`): the kernel's real iommufd code paths, driven through the
//! `ioasid` crate, checked with the mock's own test ops. Plus the typed "nesting
//! unsupported" fallback on the emulated VT-d, where nesting does not exist.

use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use ioasid::iommufd::selftest::{
    MockDevice, IOTLB_DEFAULT, MOCK_APERTURE_START, MOCK_FLAGS_DEVICE_PASID,
};
use ioasid::{
    alloc_nest_parent, bind_stage1, sysfs, Error, FaultHandler, HwInfo, HwptAlloc, HwptFlags,
    HwptId, Invalidation, IoasId, IommuBackend, IommufdBackend, MapUser, NestParent,
    PageResponseCode, Pasid, Perm, PtId, Stage1Format,
};

use super::env::edu_path;
use crate::dmabuf::DmaBuf;
use crate::ensure;
use crate::harness::{chain, LabTest, Outcome, TestResult};

/// The mock tests.
pub fn tests() -> Vec<LabTest> {
    vec![
        LabTest {
            name: "nest_parent_and_nested_hwpt",
            run: nest_parent_and_nested_hwpt,
        },
        LabTest {
            name: "nested_replace_keeps_dma_mapping",
            run: nested_replace_keeps_dma_mapping,
        },
        LabTest {
            name: "invalidate_range_and_all",
            run: invalidate_range_and_all,
        },
        LabTest {
            name: "invalidate_partial_batch_reports_index",
            run: invalidate_partial_batch_reports_index,
        },
        LabTest {
            name: "iopf_round_trip",
            run: iopf_round_trip,
        },
        LabTest {
            name: "iopf_timeout_answers_invalid",
            run: iopf_timeout_answers_invalid,
        },
        LabTest {
            name: "pasid_attach_detach",
            run: pasid_attach_detach,
        },
        LabTest {
            name: "nesting_unsupported_on_vtd_edu",
            run: nesting_unsupported_on_vtd_edu,
        },
    ]
}

fn s(e: Error) -> String {
    chain(&e)
}

/// A mock device on a fresh IOAS, with a nest parent allocated through the capability check.
struct Mock {
    b: Arc<IommufdBackend>,
    ioas: IoasId,
    mock: MockDevice,
    parent: HwptId,
}

fn mock(flags: u32) -> Result<Mock, String> {
    let b = Arc::new(IommufdBackend::open().map_err(s)?);
    let ioas = b.ioas_alloc().map_err(s)?;
    let mock = b.selftest().mock_domain(ioas, flags).map_err(s)?;
    let caps = b.hw_info(mock.dev).map_err(s)?;
    ensure!(
        matches!(caps.info, HwInfo::Selftest { .. }),
        "mock device caps: {:?}",
        caps.info
    );
    let parent = match alloc_nest_parent(&*b, &caps, mock.dev, ioas).map_err(s)? {
        NestParent::Parent(h) => h,
        NestParent::Unsupported { reason } => {
            return Err(format!("the mock refused nesting: {reason}"))
        }
    };
    Ok(Mock {
        b,
        ioas,
        mock,
        parent,
    })
}

fn nested(m: &Mock, fault: Option<ioasid::FaultId>) -> Result<HwptId, String> {
    bind_stage1(
        &*m.b,
        m.mock.dev,
        m.parent,
        Stage1Format::Selftest {
            iotlb: IOTLB_DEFAULT,
        },
        fault,
        false,
    )
    .map_err(s)
}

fn nest_parent_and_nested_hwpt() -> TestResult {
    let m = mock(0)?;
    let n = nested(&m, None)?;
    ensure!(n != m.parent, "nested HWPT id equals the parent's");
    m.b.attach(m.mock.dev, None, PtId::Hwpt(n)).map_err(s)?;
    for slot in 0..4 {
        ensure!(
            m.b.selftest()
                .check_iotlb(n, slot, IOTLB_DEFAULT)
                .map_err(s)?,
            "mock IOTLB slot {slot} lacks the stage-1 data we bound"
        );
    }
    // A nested HWPT cannot parent another one, and the kernel says so.
    let e = bind_stage1(
        &*m.b,
        m.mock.dev,
        n,
        Stage1Format::Selftest { iotlb: 1 },
        None,
        false,
    )
    .err()
    .ok_or("nested on nested succeeded")?;
    ensure!(e.errno().is_some(), "want a kernel errno, got {e}");
    Ok(Outcome::Pass)
}

fn nested_replace_keeps_dma_mapping() -> TestResult {
    let m = mock(0)?;
    let buf = DmaBuf::new(64 * 1024).map_err(|e| e.to_string())?;
    let iova = MOCK_APERTURE_START;
    // SAFETY: the buffer outlives the mapping (unmapped below) and is only used through
    // volatile accesses.
    unsafe {
        m.b.ioas_map(
            m.ioas,
            &MapUser {
                iova: Some(iova),
                user_va: buf.va(),
                len: buf.len() as u64,
                perm: Perm::RW,
            },
        )
    }
    .map_err(s)?;
    let (n1, n2) = (nested(&m, None)?, nested(&m, None)?);
    let st = m.b.selftest();
    m.b.attach(m.mock.dev, None, PtId::Hwpt(n1)).map_err(s)?;
    ensure!(
        st.check_map(m.parent.0, iova, buf.len() as u64, buf.va())
            .map_err(s)?,
        "stage-2 mapping missing under n1"
    );
    // Replace: attach again to another nested HWPT under the same parent.
    m.b.attach(m.mock.dev, None, PtId::Hwpt(n2)).map_err(s)?;
    ensure!(
        st.check_map(m.parent.0, iova, buf.len() as u64, buf.va())
            .map_err(s)?,
        "stage-2 mapping lost by the replace"
    );
    m.b.ioas_unmap(m.ioas, iova, buf.len() as u64).map_err(s)?;
    ensure!(
        !st.check_map(m.parent.0, iova, buf.len() as u64, buf.va())
            .map_err(s)?,
        "mapping still there after unmap"
    );
    Ok(Outcome::Pass)
}

fn invalidate_range_and_all() -> TestResult {
    let m = mock(0)?;
    let n = nested(&m, None)?;
    m.b.attach(m.mock.dev, None, PtId::Hwpt(n)).map_err(s)?;
    let st = m.b.selftest();
    // Granular: one mock IOTLB slot.
    let out =
        m.b.hwpt_invalidate(
            n,
            &[Invalidation::Selftest {
                iotlb_id: 1,
                all: false,
            }],
        )
        .map_err(s)?;
    ensure!(out.handled == 1, "handled {}", out.handled);
    ensure!(
        st.check_iotlb(n, 1, 0).map_err(s)?,
        "slot 1 not invalidated"
    );
    ensure!(
        st.check_iotlb(n, 0, IOTLB_DEFAULT).map_err(s)?
            && st.check_iotlb(n, 2, IOTLB_DEFAULT).map_err(s)?,
        "a granular invalidation flushed other slots"
    );
    // All.
    m.b.hwpt_invalidate(n, &[Invalidation::All]).map_err(s)?;
    for slot in 0..4 {
        ensure!(
            st.check_iotlb(n, slot, 0).map_err(s)?,
            "slot {slot} survived invalidate-all"
        );
    }
    Ok(Outcome::Pass)
}

fn invalidate_partial_batch_reports_index() -> TestResult {
    let m = mock(0)?;
    let n = nested(&m, None)?;
    m.b.attach(m.mock.dev, None, PtId::Hwpt(n)).map_err(s)?;
    // Entry 2 names a slot the mock does not have (MOCK_NESTED_DOMAIN_IOTLB_ID_MAX is 3).
    let batch = [
        Invalidation::Selftest {
            iotlb_id: 0,
            all: false,
        },
        Invalidation::Selftest {
            iotlb_id: 1,
            all: false,
        },
        Invalidation::Selftest {
            iotlb_id: 9,
            all: false,
        },
        Invalidation::Selftest {
            iotlb_id: 3,
            all: false,
        },
    ];
    match m.b.hwpt_invalidate(n, &batch) {
        Err(Error::PartialInvalidation {
            handled,
            total,
            errno,
            ..
        }) => {
            ensure!(
                handled == 2 && total == 4,
                "handled {handled} of {total}, want 2 of 4"
            );
            ensure!(errno.0 == libc::EINVAL, "errno {errno}");
        }
        other => return Err(format!("want a partial-batch error, got {other:?}")),
    }
    let st = m.b.selftest();
    ensure!(
        st.check_iotlb(n, 0, 0).map_err(s)? && st.check_iotlb(n, 1, 0).map_err(s)?,
        "entries before the bad one were not applied"
    );
    ensure!(
        st.check_iotlb(n, 3, IOTLB_DEFAULT).map_err(s)?,
        "the entry after the bad one was applied"
    );
    Ok(Outcome::Pass)
}

const PERM_RW: u32 = 1 | 2;

fn iopf_setup(timeout: Duration) -> Result<(Mock, FaultHandler), String> {
    let m = mock(0)?;
    let q = m.b.fault_queue_alloc().map_err(s)?;
    let fid = q.id();
    let h = FaultHandler::new(q, timeout);
    let n = nested(&m, Some(fid))?;
    m.b.attach(m.mock.dev, None, PtId::Hwpt(n)).map_err(s)?;
    Ok((m, h))
}

fn wait_groups(h: &mut FaultHandler) -> Result<Vec<ioasid::FaultGroup>, String> {
    let start = Instant::now();
    loop {
        let g = h.poll(Instant::now()).map_err(s)?;
        if !g.is_empty() || start.elapsed() > Duration::from_secs(2) {
            return Ok(g);
        }
        sleep(Duration::from_millis(5));
    }
}

fn iopf_round_trip() -> TestResult {
    let (m, mut h) = iopf_setup(Duration::from_secs(5))?;
    m.b.selftest()
        .trigger_iopf(m.mock.dev, None, 2, PERM_RW, 0xdead_b000)
        .map_err(s)?;
    let groups = wait_groups(&mut h)?;
    ensure!(groups.len() == 1, "want one fault group, got {groups:?}");
    let g = &groups[0];
    let f = g.faults[0];
    ensure!(
        g.dev == m.mock.dev
            && g.grpid == 2
            && f.addr == 0xdead_b000
            && f.perm.read
            && f.perm.write
            && f.last_page,
        "fault record {f:?}"
    );
    h.respond(g.cookie, PageResponseCode::Success).map_err(s)?;
    ensure!(h.counters().responses == 1, "response not counted");
    // The kernel took the answer (the write above returned its full size, else respond
    // errs); the handler now refuses a second answer for the same group.
    ensure!(
        h.respond(g.cookie, PageResponseCode::Success).is_err(),
        "a second response was accepted"
    );
    Ok(Outcome::Pass)
}

fn iopf_timeout_answers_invalid() -> TestResult {
    let (m, mut h) = iopf_setup(Duration::from_millis(50))?;
    m.b.selftest()
        .trigger_iopf(m.mock.dev, None, 5, PERM_RW, 0x4000)
        .map_err(s)?;
    let groups = wait_groups(&mut h)?;
    ensure!(groups.len() == 1, "want one group, got {}", groups.len());
    ensure!(
        h.expire(Instant::now()).map_err(s)?.is_empty(),
        "expired before the timeout"
    );
    sleep(Duration::from_millis(80));
    let answered = h.expire(Instant::now()).map_err(s)?;
    ensure!(
        answered == vec![groups[0].cookie],
        "timeout answered {answered:?}, want [{}]",
        groups[0].cookie
    );
    ensure!(
        h.counters().timeouts == 1 && h.outstanding() == 0,
        "counters {:?}",
        h.counters()
    );
    // The kernel took the "invalid" answer (expire errs otherwise), and the device keeps
    // working: a new fault is delivered and answered.
    m.b.selftest()
        .trigger_iopf(m.mock.dev, None, 6, PERM_RW, 0x5000)
        .map_err(s)?;
    let again = wait_groups(&mut h)?;
    ensure!(
        again.len() == 1 && again[0].grpid == 6,
        "no new fault after the timeout answer: {again:?}"
    );
    h.respond(again[0].cookie, PageResponseCode::Invalid)
        .map_err(s)?;
    Ok(Outcome::Pass)
}

fn pasid_attach_detach() -> TestResult {
    let b = Arc::new(IommufdBackend::open().map_err(s)?);
    let ioas = b.ioas_alloc().map_err(s)?;
    let mock = b
        .selftest()
        .mock_domain(ioas, MOCK_FLAGS_DEVICE_PASID)
        .map_err(s)?;
    let caps = b.hw_info(mock.dev).map_err(s)?;
    ensure!(
        caps.max_pasid_bits() == 20,
        "mock PASID width {}",
        caps.max_pasid_bits()
    );
    let pasid_hwpt = |b: &IommufdBackend| {
        b.hwpt_alloc(&HwptAlloc {
            dev: mock.dev,
            parent: PtId::Ioas(ioas),
            flags: HwptFlags {
                pasid: true,
                ..Default::default()
            },
            fault: None,
            stage1: None,
        })
    };
    // The RID domain must be PASID-compatible before PASIDs attach.
    let rid = pasid_hwpt(&b).map_err(s)?;
    b.attach(mock.dev, None, PtId::Hwpt(rid)).map_err(s)?;
    let h = pasid_hwpt(&b).map_err(s)?;
    let p = Pasid(100);
    let st = b.selftest();
    b.attach(mock.dev, Some(p), PtId::Hwpt(h)).map_err(s)?;
    ensure!(
        st.pasid_check_hwpt(&mock, p, h).map_err(s)?,
        "PASID 100 not attached to HWPT {}",
        h.0
    );
    b.detach(mock.dev, Some(p)).map_err(s)?;
    ensure!(
        st.pasid_check_hwpt(&mock, p, HwptId(0)).map_err(s)?,
        "PASID 100 still attached after detach"
    );
    // A PASID beyond the device's width is refused by the VM's PASID space before the kernel.
    let mut space = ioasid::PasidSpace::new(1, (1 << 20) - 1).ok_or("PASID space")?;
    ensure!(
        space
            .bind(mock.dev, Pasid(1 << 20), caps.max_pasid_bits())
            .is_err(),
        "a 21-bit PASID was accepted"
    );
    let host = space
        .bind(mock.dev, p, caps.max_pasid_bits())
        .map_err(|e| e.to_string())?;
    ensure!(
        space.bind(mock.dev, p, caps.max_pasid_bits()).is_err(),
        "double use accepted"
    );
    ensure!(
        space.translate(mock.dev, p) == Some(host),
        "translation lost"
    );
    Ok(Outcome::Pass)
}

fn nesting_unsupported_on_vtd_edu() -> TestResult {
    let spec = sysfs::resolve(&edu_path()?).map_err(s)?;
    let b = IommufdBackend::open().map_err(s)?;
    let (dev, _vfio) = b.bind(&spec).map_err(s)?;
    let ioas = b.ioas_alloc().map_err(s)?;
    let caps = b.hw_info(dev).map_err(s)?;
    match alloc_nest_parent(&b, &caps, dev, ioas).map_err(s)? {
        NestParent::Parent(h) => {
            return Err(format!(
                "QEMU's VT-d gave a nest parent {}: it never advertises NEST",
                h.0
            ))
        }
        NestParent::Unsupported { reason } => {
            ensure!(
                reason.contains("NEST=0"),
                "reason does not cite ECAP.NEST: {reason}"
            );
            println!("  fallback: {reason}");
        }
    }
    // The capability check agrees with the kernel: the raw call is refused with EOPNOTSUPP.
    let raw = b.hwpt_alloc(&HwptAlloc {
        dev,
        parent: PtId::Ioas(ioas),
        flags: HwptFlags {
            nest_parent: true,
            ..Default::default()
        },
        fault: None,
        stage1: None,
    });
    match raw {
        Err(e) if e.errno() == Some(libc::EOPNOTSUPP) => ensure!(
            e.to_string().contains("cannot nest"),
            "cause not decoded: {e}"
        ),
        other => {
            return Err(format!(
                "raw NEST_PARENT alloc on VT-d: want EOPNOTSUPP, got {other:?}"
            ))
        }
    }
    b.unbind(dev);
    Ok(Outcome::Pass)
}
