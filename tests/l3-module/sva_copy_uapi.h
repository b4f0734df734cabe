/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * sva_copy: the ioctl interface of the SVA copy engine's test driver (tests/l3-module).
 * Mirrored by hand in tests/src/guest/sva.rs (`Info`, `CopyReq`); change both together.
 */
#ifndef SVA_COPY_UAPI_H
#define SVA_COPY_UAPI_H

#include <linux/ioctl.h>
#include <linux/types.h>

/* What the open file is bound to, and the device's counters. */
struct sva_copy_info {
	__u32 pasid;		/* the PASID iommu_sva_bind_device() gave this process's mm */
	__u32 ring_size;	/* descriptors in the ring */
	__u32 completed;	/* COMPLETED register */
	__u32 prq_stats;	/* PRQ_STATS register: page requests sent since enable */
	__u32 status;		/* STATUS register */
	__u32 irqs;		/* completion interrupts (MSI-X vector 0) seen by the driver */
	__u32 error_irqs;	/* error interrupts (MSI-X vector 1) */
	__u32 reserved;
};

/* Do not let the device send page requests: a fault ends the descriptor. */
#define SVA_COPY_F_NO_PRI	(1u << 0)

/* One copy with plain user pointers of the calling process (which must be the binder). */
struct sva_copy_req {
	__u64 src;		/* in: source address */
	__u64 dst;		/* in: destination address */
	__u64 len;		/* in: bytes, 1 to 16 MiB */
	__u64 completion;	/* in: completion record address (16 bytes, 16-byte aligned) */
	__u32 flags;		/* in: SVA_COPY_F_* */
	__u32 timeout_ms;	/* in: how long to wait; 0: 20 s; at most 120 s */
	__u32 status;		/* out: the completion record's status (1 SUCCESS, ...) */
	__u32 pasid;		/* out: the PASID the descriptor carried */
	__u64 bytes;		/* out: the completion record's bytes copied */
	__u32 prq_before;	/* out: PRQ_STATS before the doorbell */
	__u32 prq_after;	/* out: PRQ_STATS after the completion */
};

#define SVA_COPY_IOC_INFO	_IOR('S', 0x40, struct sva_copy_info)
#define SVA_COPY_IOC_COPY	_IOWR('S', 0x41, struct sva_copy_req)

#endif /* SVA_COPY_UAPI_H */
