// SPDX-License-Identifier: GPL-2.0
/*
 * sva_copy: a test driver for ioasid-vmm's emulated SVA copy engine (PCI 1234:5a5a), the
 * client of the lab's linux_guest_sva_* tests. Its guest-visible ABI is /work/wt/SVA-ABI.md
 * in the project (BAR0 registers, 64-byte descriptors with a PASID, completion records).
 *
 * Per device: bus mastering, MSI-X (vector 0 completion, vector 1 error), a descriptor ring
 * from dma_alloc_coherent() (read by the device without a PASID, through the DMA API's
 * default domain), and a misc character device /dev/sva_copyN.
 * Per open file: the calling process's mm bound with iommu_sva_bind_device() (the 7.x API:
 * intel-iommu enables PASID, ATS and PRI itself at probe time and the iopf queue when the
 * SVA domain is attached; there are no IOMMU_DEV_FEAT_* calls any more), its PASID from
 * iommu_sva_get_pasid(); release() unbinds.
 * SVA_COPY_IOC_COPY submits one copy with plain user pointers under that PASID and waits,
 * bounded, for the device's COMPLETED counter (interrupt, with polling as the fallback),
 * then reads the completion record back from the process's memory.
 */
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/interrupt.h>
#include <linux/iommu.h>
#include <linux/miscdevice.h>
#include <linux/fs.h>
#include <linux/uaccess.h>
#include <linux/dma-mapping.h>
#include <linux/wait.h>
#include <linux/mutex.h>
#include <linux/slab.h>
#include <linux/io.h>
#include <linux/jiffies.h>
#include <linux/delay.h>
#include <linux/kref.h>
#include <linux/idr.h>
#include <linux/sched.h>

#include "sva_copy_uapi.h"

#define SVA_VENDOR		0x1234
#define SVA_DEVICE		0x5a5a

/* BAR0 registers. */
#define REG_ID			0x00
#define REG_STATUS		0x04
#define REG_CTRL		0x08
#define REG_RING_BASE		0x10
#define REG_RING_SIZE		0x18
#define REG_RING_HEAD		0x1c
#define REG_RING_TAIL		0x20
#define REG_COMPLETED		0x24
#define REG_PRQ_STATS		0x28

#define SVA_ID			0x53564131	/* "SVA1" */
#define STATUS_ENABLED		BIT(0)
#define STATUS_BUSY		BIT(1)
#define STATUS_ERROR		BIT(2)
#define CTRL_ENABLE		BIT(0)
#define CTRL_RESET		BIT(1)
#define CTRL_CLEAR_ERROR	BIT(2)

#define DESC_PASID_VALID	BIT(31)
#define DESC_F_INTERRUPT	BIT(0)
#define DESC_F_NO_PRI		BIT(2)

#define RING_SIZE		64
#define MAX_LEN			(16u << 20)
#define DEFAULT_TIMEOUT_MS	20000
#define MAX_TIMEOUT_MS		120000
#define POLL_MS			10

struct sva_desc {
	__le32 pasid;
	__le32 flags;
	__le64 src;
	__le64 dst;
	__le64 len;
	__le64 completion;
	__le64 reserved[3];
};
static_assert(sizeof(struct sva_desc) == 64);

struct sva_record {
	__u32 status;
	__u32 reserved;
	__u64 bytes;
};

struct sva_dev {
	struct kref ref;
	struct pci_dev *pdev;
	void __iomem *regs;
	struct sva_desc *ring;
	dma_addr_t ring_dma;
	struct mutex lock;	/* the ring, tail, submitted, dead */
	u32 tail;
	u32 submitted;		/* descriptors submitted since the last enable */
	bool dead;
	wait_queue_head_t wq;
	atomic_t irqs;
	atomic_t error_irqs;
	int index;
	char name[16];
	struct miscdevice misc;
};

struct sva_ctx {
	struct sva_dev *sd;
	struct iommu_sva *handle;
	struct mm_struct *mm;	/* compared only: the binder's mm */
	u32 pasid;
};

static DEFINE_IDA(sva_ida);

static void sva_dev_free(struct kref *ref)
{
	struct sva_dev *sd = container_of(ref, struct sva_dev, ref);

	pci_dev_put(sd->pdev);
	kfree(sd);
}

static irqreturn_t sva_irq_done(int irq, void *data)
{
	struct sva_dev *sd = data;

	atomic_inc(&sd->irqs);
	wake_up(&sd->wq);
	return IRQ_HANDLED;
}

static irqreturn_t sva_irq_error(int irq, void *data)
{
	struct sva_dev *sd = data;

	atomic_inc(&sd->error_irqs);
	wake_up(&sd->wq);
	return IRQ_HANDLED;
}

/* Resets the engine and programs the ring again; the caller holds sd->lock (or probes). */
static int sva_hw_start(struct sva_dev *sd)
{
	struct device *dev = &sd->pdev->dev;
	u32 status;

	unsigned long drain = jiffies + msecs_to_jiffies(2000);

	/* RESET abandons the descriptor in flight; BUSY reads 1 until the engine let go. */
	writel(CTRL_RESET, sd->regs + REG_CTRL);
	while (readl(sd->regs + REG_STATUS) & STATUS_BUSY) {
		if (time_after(jiffies, drain)) {
			dev_err(dev, "engine still BUSY 2 s after RESET\n");
			return -EIO;
		}
		usleep_range(1000, 2000);
	}
	memset(sd->ring, 0, RING_SIZE * sizeof(*sd->ring));
	writel(lower_32_bits(sd->ring_dma), sd->regs + REG_RING_BASE);
	writel(upper_32_bits(sd->ring_dma), sd->regs + REG_RING_BASE + 4);
	writel(RING_SIZE, sd->regs + REG_RING_SIZE);
	writel(0, sd->regs + REG_RING_TAIL);
	writel(CTRL_CLEAR_ERROR, sd->regs + REG_CTRL);
	writel(CTRL_ENABLE, sd->regs + REG_CTRL);
	status = readl(sd->regs + REG_STATUS);
	sd->tail = readl(sd->regs + REG_RING_HEAD) % RING_SIZE;
	sd->submitted = readl(sd->regs + REG_COMPLETED);
	if (!(status & STATUS_ENABLED) || (status & STATUS_ERROR)) {
		dev_err(dev, "engine did not start: STATUS %#x\n", status);
		return -EIO;
	}
	return 0;
}

static int sva_open(struct inode *inode, struct file *file)
{
	struct sva_dev *sd = container_of(file->private_data, struct sva_dev, misc);
	struct sva_ctx *ctx;
	struct iommu_sva *handle;
	u32 pasid;

	ctx = kzalloc(sizeof(*ctx), GFP_KERNEL);
	if (!ctx)
		return -ENOMEM;
	handle = iommu_sva_bind_device(&sd->pdev->dev, current->mm);
	if (IS_ERR(handle)) {
		dev_warn(&sd->pdev->dev, "iommu_sva_bind_device for pid %d: %ld\n",
			 task_pid_nr(current), PTR_ERR(handle));
		kfree(ctx);
		return PTR_ERR(handle);
	}
	pasid = iommu_sva_get_pasid(handle);
	if (pasid == IOMMU_PASID_INVALID) {
		dev_warn(&sd->pdev->dev, "no PASID for pid %d\n", task_pid_nr(current));
		iommu_sva_unbind_device(handle);
		kfree(ctx);
		return -ENODEV;
	}
	kref_get(&sd->ref);
	ctx->sd = sd;
	ctx->handle = handle;
	ctx->mm = current->mm;
	ctx->pasid = pasid;
	file->private_data = ctx;
	dev_info(&sd->pdev->dev, "pid %d bound to PASID %u\n", task_pid_nr(current), pasid);
	return 0;
}

static int sva_release(struct inode *inode, struct file *file)
{
	struct sva_ctx *ctx = file->private_data;
	struct sva_dev *sd = ctx->sd;

	/* Copies are synchronous under sd->lock: nothing of this PASID is in flight. */
	iommu_sva_unbind_device(ctx->handle);
	dev_info(&sd->pdev->dev, "PASID %u unbound\n", ctx->pasid);
	kfree(ctx);
	kref_put(&sd->ref, sva_dev_free);
	return 0;
}

static void sva_fill_info(struct sva_dev *sd, struct sva_copy_info *info)
{
	info->ring_size = RING_SIZE;
	info->completed = readl(sd->regs + REG_COMPLETED);
	info->prq_stats = readl(sd->regs + REG_PRQ_STATS);
	info->status = readl(sd->regs + REG_STATUS);
	info->irqs = atomic_read(&sd->irqs);
	info->error_irqs = atomic_read(&sd->error_irqs);
}

/* COMPLETED reached `target` (the count since enable after our descriptor). */
static bool sva_reached(struct sva_dev *sd, u32 target)
{
	return (s32)(readl(sd->regs + REG_COMPLETED) - target) >= 0;
}

/*
 * True when our descriptor ended (COMPLETED counts every ending, successful or not), or
 * the engine stopped: a failed descriptor fetch sets STATUS.ERROR and disables it.
 */
static bool sva_done(struct sva_dev *sd, u32 target, u32 *status)
{
	*status = readl(sd->regs + REG_STATUS);
	return sva_reached(sd, target) ||
	       ((*status & STATUS_ERROR) && !(*status & STATUS_ENABLED));
}

static long sva_copy(struct sva_ctx *ctx, struct sva_copy_req __user *ureq)
{
	struct sva_dev *sd = ctx->sd;
	struct device *dev = &sd->pdev->dev;
	struct sva_copy_req req;
	struct sva_record rec;
	struct sva_desc *d;
	unsigned long deadline;
	u32 target, status = 0, timeout_ms;
	int error_irqs;
	long ret = 0;

	if (copy_from_user(&req, ureq, sizeof(req)))
		return -EFAULT;
	if (current->mm != ctx->mm)
		return -EPERM;	/* the PASID is bound to the opener's address space */
	if (!req.len || req.len > MAX_LEN || !IS_ALIGNED(req.completion, 16) ||
	    (req.flags & ~SVA_COPY_F_NO_PRI))
		return -EINVAL;
	timeout_ms = req.timeout_ms ? min_t(u32, req.timeout_ms, MAX_TIMEOUT_MS) :
				      DEFAULT_TIMEOUT_MS;

	mutex_lock(&sd->lock);
	if (sd->dead) {
		ret = -ENODEV;
		goto out;
	}
	d = &sd->ring[sd->tail];
	memset(d, 0, sizeof(*d));
	d->pasid = cpu_to_le32((ctx->pasid & 0xfffff) | DESC_PASID_VALID);
	d->flags = cpu_to_le32(DESC_F_INTERRUPT |
			       ((req.flags & SVA_COPY_F_NO_PRI) ? DESC_F_NO_PRI : 0));
	d->src = cpu_to_le64(req.src);
	d->dst = cpu_to_le64(req.dst);
	d->len = cpu_to_le64(req.len);
	d->completion = cpu_to_le64(req.completion);
	/* The descriptor is in memory before the doorbell (writel orders after dma_wmb). */
	dma_wmb();
	req.prq_before = readl(sd->regs + REG_PRQ_STATS);
	error_irqs = atomic_read(&sd->error_irqs);
	sd->tail = (sd->tail + 1) % RING_SIZE;
	sd->submitted++;
	target = sd->submitted;
	writel(sd->tail, sd->regs + REG_RING_TAIL);

	/* Bounded wait: the completion interrupt wakes us; the short timeout polls as well. */
	deadline = jiffies + msecs_to_jiffies(timeout_ms);
	while (!sva_done(sd, target, &status)) {
		if (time_after(jiffies, deadline)) {
			dev_err(dev,
				"PASID %u: no completion after %u ms (STATUS %#x HEAD %u TAIL %u COMPLETED %u, want %u); resetting\n",
				ctx->pasid, timeout_ms, status,
				readl(sd->regs + REG_RING_HEAD), sd->tail,
				readl(sd->regs + REG_COMPLETED), target);
			sva_hw_start(sd);
			ret = -ETIMEDOUT;
			goto out;
		}
		wait_event_timeout(sd->wq, sva_done(sd, target, &status),
				   msecs_to_jiffies(POLL_MS));
	}
	req.prq_after = readl(sd->regs + REG_PRQ_STATS);
	if (!sva_reached(sd, target)) {
		dev_err(dev, "PASID %u: the engine stopped (STATUS %#x): descriptor fetch failed?\n",
			ctx->pasid, status);
		sva_hw_start(sd);
		ret = -EIO;
		goto out;
	}
	/* STATUS.ERROR says some descriptor ended with an error: the record tells which. */
	status = readl(sd->regs + REG_STATUS);
	if (status & STATUS_ERROR)
		writel(CTRL_CLEAR_ERROR | CTRL_ENABLE, sd->regs + REG_CTRL);
	if (atomic_read(&sd->error_irqs) != error_irqs) {
		/* Vector 1: the completion record could not be written. */
		dev_err(dev, "PASID %u: the completion record at %#llx was not written\n",
			ctx->pasid, req.completion);
		ret = -EIO;
		goto out;
	}
	mutex_unlock(&sd->lock);

	/* The device wrote the record through the PASID into this process's memory. */
	if (copy_from_user(&rec, u64_to_user_ptr(req.completion), sizeof(rec)))
		return -EFAULT;
	req.status = rec.status;
	req.bytes = rec.bytes;
	req.pasid = ctx->pasid;
	if (copy_to_user(ureq, &req, sizeof(req)))
		return -EFAULT;
	return 0;
out:
	mutex_unlock(&sd->lock);
	return ret;
}

static long sva_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct sva_ctx *ctx = file->private_data;
	struct sva_copy_info info = {};

	switch (cmd) {
	case SVA_COPY_IOC_INFO:
		mutex_lock(&ctx->sd->lock);
		if (ctx->sd->dead) {
			mutex_unlock(&ctx->sd->lock);
			return -ENODEV;
		}
		sva_fill_info(ctx->sd, &info);
		mutex_unlock(&ctx->sd->lock);
		info.pasid = ctx->pasid;
		if (copy_to_user((void __user *)arg, &info, sizeof(info)))
			return -EFAULT;
		return 0;
	case SVA_COPY_IOC_COPY:
		return sva_copy(ctx, (struct sva_copy_req __user *)arg);
	default:
		return -ENOTTY;
	}
}

static const struct file_operations sva_fops = {
	.owner = THIS_MODULE,
	.open = sva_open,
	.release = sva_release,
	.unlocked_ioctl = sva_ioctl,
};

static int sva_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct device *dev = &pdev->dev;
	struct sva_dev *sd;
	u32 ident;
	int ret;

	sd = kzalloc(sizeof(*sd), GFP_KERNEL);
	if (!sd)
		return -ENOMEM;
	kref_init(&sd->ref);
	sd->pdev = pci_dev_get(pdev);
	mutex_init(&sd->lock);
	init_waitqueue_head(&sd->wq);
	atomic_set(&sd->irqs, 0);
	atomic_set(&sd->error_irqs, 0);
	sd->index = -1;

	ret = pci_enable_device(pdev);
	if (ret)
		goto err_put;
	ret = pci_request_regions(pdev, "sva_copy");
	if (ret)
		goto err_disable;
	pci_set_master(pdev);
	ret = dma_set_mask_and_coherent(dev, DMA_BIT_MASK(64));
	if (ret)
		goto err_regions;
	sd->regs = pci_iomap(pdev, 0, 0);
	if (!sd->regs) {
		ret = -ENOMEM;
		goto err_regions;
	}
	ident = readl(sd->regs + REG_ID);
	if (ident != SVA_ID) {
		dev_err(dev, "ID register %#x, want %#x\n", ident, SVA_ID);
		ret = -ENODEV;
		goto err_unmap;
	}
	sd->ring = dma_alloc_coherent(dev, RING_SIZE * sizeof(*sd->ring), &sd->ring_dma,
				      GFP_KERNEL);
	if (!sd->ring) {
		ret = -ENOMEM;
		goto err_unmap;
	}
	ret = pci_alloc_irq_vectors(pdev, 2, 2, PCI_IRQ_MSIX);
	if (ret < 0) {
		dev_err(dev, "MSI-X with 2 vectors: %d\n", ret);
		goto err_ring;
	}
	ret = request_irq(pci_irq_vector(pdev, 0), sva_irq_done, 0, "sva_copy-done", sd);
	if (ret)
		goto err_vectors;
	ret = request_irq(pci_irq_vector(pdev, 1), sva_irq_error, 0, "sva_copy-error", sd);
	if (ret)
		goto err_irq0;
	ret = sva_hw_start(sd);
	if (ret)
		goto err_irq1;

	ret = ida_alloc(&sva_ida, GFP_KERNEL);
	if (ret < 0)
		goto err_stop;
	sd->index = ret;
	snprintf(sd->name, sizeof(sd->name), "sva_copy%d", sd->index);
	sd->misc.minor = MISC_DYNAMIC_MINOR;
	sd->misc.name = sd->name;
	sd->misc.fops = &sva_fops;
	sd->misc.parent = dev;
	sd->misc.mode = 0666;
	ret = misc_register(&sd->misc);
	if (ret)
		goto err_ida;
	pci_set_drvdata(pdev, sd);
	dev_info(dev, "SVA copy engine: /dev/%s, ring of %d at DMA %pad, PASID %s, PRI %s, ATS %s\n",
		 sd->name, RING_SIZE, &sd->ring_dma,
		 pdev->pasid_enabled ? "enabled" : "off",
		 pdev->pri_enabled ? "enabled" : "off",
		 pdev->ats_enabled ? "enabled" : "off");
	return 0;

err_ida:
	ida_free(&sva_ida, sd->index);
err_stop:
	writel(CTRL_RESET, sd->regs + REG_CTRL);
err_irq1:
	free_irq(pci_irq_vector(pdev, 1), sd);
err_irq0:
	free_irq(pci_irq_vector(pdev, 0), sd);
err_vectors:
	pci_free_irq_vectors(pdev);
err_ring:
	dma_free_coherent(dev, RING_SIZE * sizeof(*sd->ring), sd->ring, sd->ring_dma);
err_unmap:
	pci_iounmap(pdev, sd->regs);
err_regions:
	pci_release_regions(pdev);
err_disable:
	pci_disable_device(pdev);
err_put:
	kref_put(&sd->ref, sva_dev_free);
	return ret;
}

static void sva_remove(struct pci_dev *pdev)
{
	struct sva_dev *sd = pci_get_drvdata(pdev);

	misc_deregister(&sd->misc);
	mutex_lock(&sd->lock);
	sd->dead = true;
	writel(CTRL_RESET, sd->regs + REG_CTRL);
	mutex_unlock(&sd->lock);
	free_irq(pci_irq_vector(pdev, 1), sd);
	free_irq(pci_irq_vector(pdev, 0), sd);
	pci_free_irq_vectors(pdev);
	dma_free_coherent(&pdev->dev, RING_SIZE * sizeof(*sd->ring), sd->ring, sd->ring_dma);
	pci_iounmap(pdev, sd->regs);
	pci_release_regions(pdev);
	pci_disable_device(pdev);
	ida_free(&sva_ida, sd->index);
	kref_put(&sd->ref, sva_dev_free);
}

static const struct pci_device_id sva_ids[] = {
	{ PCI_DEVICE(SVA_VENDOR, SVA_DEVICE) },
	{ }
};
MODULE_DEVICE_TABLE(pci, sva_ids);

static struct pci_driver sva_driver = {
	.name = "sva_copy",
	.id_table = sva_ids,
	.probe = sva_probe,
	.remove = sva_remove,
};
module_pci_driver(sva_driver);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Test driver for ioasid-vmm's emulated SVA copy engine (1234:5a5a)");
