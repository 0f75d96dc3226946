/*
 * virtio_mmio.c - finding, initialising and driving a virtio-mmio device's
 * queue 0 by polling (see virtio_mmio.h).
 *
 * Spec references are to virtio 1.2: 2.7 split virtqueues, 3.1.1 driver
 * initialisation, 4.2.2 the MMIO register layout.
 */
#include "virtio_mmio.h"

#define VIRTIO_MMIO_MAGIC   0x74726976
#define VIRTIO_MMIO_VERSION 2

/* Device status bits (2.1). */
#define STATUS_ACKNOWLEDGE        1
#define STATUS_DRIVER             2
#define STATUS_DRIVER_OK          4
#define STATUS_FEATURES_OK        8
#define STATUS_DEVICE_NEEDS_RESET 64
#define STATUS_FAILED             128

/* How long to poll the used ring before giving up (iterations with `pause`). */
#define POLL_LIMIT (1UL << 28)

static void write_addr(const struct vio_dev *d, unsigned low, const volatile void *p)
{
	u64 a = (unsigned long)p; /* identity map: virtual == physical */

	vio_write(d, low, (u32)a);
	vio_write(d, low + 4, (u32)(a >> 32));
}

/* Give up on the device (3.1.1: set FAILED) and return `err`. */
static int fail(struct vio_dev *d, int err)
{
	vio_write(d, MMIO_STATUS, vio_read(d, MMIO_STATUS) | STATUS_FAILED);
	return err;
}

int vio_probe(unsigned long base, u32 device_id)
{
	struct vio_dev d = { .base = base };

	return vio_read(&d, MMIO_MAGIC_VALUE) == VIRTIO_MMIO_MAGIC &&
	       vio_read(&d, MMIO_VERSION) == VIRTIO_MMIO_VERSION &&
	       vio_read(&d, MMIO_DEVICE_ID) == device_id;
}

unsigned long vio_find(u32 device_id)
{
	for (unsigned long i = 0; i < VIRTIO_MMIO_SLOTS; i++) {
		unsigned long base = VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE;

		if (vio_probe(base, device_id))
			return base;
	}
	return 0;
}

static int setup_queue(struct vio_dev *d)
{
	u32 max;
	u8 *p = (u8 *)d->vq;

	vio_write(d, MMIO_QUEUE_SEL, 0);
	if (vio_read(d, MMIO_QUEUE_READY) != 0)
		return VIO_EQUEUE;
	max = vio_read(d, MMIO_QUEUE_NUM_MAX); /* 0: no such queue */
	/* A split ring's size is a power of two (2.7); a blk request needs 3 entries. */
	d->qsize = VIO_QUEUE_MAX;
	while (d->qsize > max)
		d->qsize >>= 1;
	if (d->qsize < 4)
		return VIO_EQUEUE;
	d->avail_idx = d->used_seen = 0;
	for (unsigned long i = 0; i < sizeof(*d->vq); i++)
		p[i] = 0;
	d->vq->avail.flags = VIRTQ_AVAIL_F_NO_INTERRUPT; /* we poll */

	vio_write(d, MMIO_QUEUE_NUM, d->qsize);
	write_addr(d, MMIO_QUEUE_DESC_LOW, d->vq->desc);
	write_addr(d, MMIO_QUEUE_DRIVER_LOW, &d->vq->avail);
	write_addr(d, MMIO_QUEUE_DEVICE_LOW, &d->vq->used);
	barrier(); /* the zeroed rings are in memory before the device may look */
	vio_write(d, MMIO_QUEUE_READY, 1);
	return 0;
}

int vio_init(struct vio_dev *d, unsigned long base, u32 device_id, u64 optional, struct virtq *vq)
{
	u32 lo, hi;
	int err;

	d->ready = 0;
	d->vq = vq;
	if (base != VIO_PCI_BASE) {     /* a window; VIO_PCI_BASE: vio_find_pci() set d up */
		d->base = base;
		d->pci_read = 0;
		d->pci_write = 0;
		d->pci = 0;
		if (!vio_probe(base, device_id))
			return VIO_ENODEV;
	}

	/* 3.1.1 steps 1-3: reset (and wait for it), ACKNOWLEDGE, DRIVER. */
	vio_write(d, MMIO_STATUS, 0);
	for (int i = 0; vio_read(d, MMIO_STATUS) != 0; i++)
		if (i == 1000)
			return VIO_EDEVICE;
	vio_write(d, MMIO_STATUS, STATUS_ACKNOWLEDGE);
	vio_write(d, MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);

	/* Steps 4-6: read the offered features, accept ours, FEATURES_OK must stick. */
	vio_write(d, MMIO_DEVICE_FEATURES_SEL, 0);
	lo = vio_read(d, MMIO_DEVICE_FEATURES);
	vio_write(d, MMIO_DEVICE_FEATURES_SEL, 1);
	hi = vio_read(d, MMIO_DEVICE_FEATURES);
	d->offered = (u64)hi << 32 | lo;
	if (!(d->offered & VIRTIO_F_VERSION_1))
		return fail(d, VIO_EFEATURE);
	d->features = VIRTIO_F_VERSION_1 | (d->offered & optional);
	vio_write(d, MMIO_DRIVER_FEATURES_SEL, 0);
	vio_write(d, MMIO_DRIVER_FEATURES, (u32)d->features);
	vio_write(d, MMIO_DRIVER_FEATURES_SEL, 1);
	vio_write(d, MMIO_DRIVER_FEATURES, (u32)(d->features >> 32));
	vio_write(d, MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
	if (!(vio_read(d, MMIO_STATUS) & STATUS_FEATURES_OK))
		return fail(d, VIO_EFEATURE);

	/* Step 7: device-specific setup: queue 0 here, the configuration by the caller. */
	err = setup_queue(d);
	return err ? fail(d, err) : 0;
}

int vio_driver_ok(struct vio_dev *d)
{
	/* Step 8: DRIVER_OK. */
	vio_write(d, MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER |
		  STATUS_FEATURES_OK | STATUS_DRIVER_OK);
	if (vio_read(d, MMIO_STATUS) & (STATUS_DEVICE_NEEDS_RESET | STATUS_FAILED))
		return fail(d, VIO_EDEVICE);
	d->ready = 1;
	return 0;
}

int vio_submit(struct vio_dev *d, u32 *used_len)
{
	volatile u16 *used_idx = &d->vq->used.idx;
	struct virtq_used_elem elem;
	unsigned long spins;

	if (!d->ready)
		return VIO_EINVAL;
	/* 2.7.13: ring entry, then (after a barrier) the new idx, then notify. */
	d->vq->avail.ring[d->avail_idx % d->qsize] = 0; /* the chain's head */
	barrier();
	d->avail_idx++;
	*(volatile u16 *)&d->vq->avail.idx = d->avail_idx;
	barrier();
	vio_write(d, MMIO_QUEUE_NOTIFY, 0);

	for (spins = 0; *used_idx == d->used_seen; spins++) {
		if (spins == POLL_LIMIT) {
			d->ready = 0; /* the chain is still the device's: stop using the queue */
			return VIO_ETIMEOUT;
		}
		__asm__ volatile("pause");
	}
	barrier(); /* read the used entry and the data only after seeing idx move */
	if ((u16)(*used_idx - d->used_seen) != 1) {
		d->ready = 0;
		return VIO_EDEVICE;
	}
	elem = *(volatile struct virtq_used_elem *)&d->vq->used.ring[d->used_seen % d->qsize];
	d->used_seen++;
	if (elem.id != 0)
		return VIO_EDEVICE;
	*used_len = elem.len;
	return 0;
}

const char *vio_strerror(int err)
{
	switch (err) {
	case 0: return "ok";
	case VIO_ENODEV: return "no such device";
	case VIO_EFEATURE: return "feature negotiation failed";
	case VIO_EQUEUE: return "queue 0 unusable";
	case VIO_EINVAL: return "invalid request";
	case VIO_EDEVICE: return "device protocol error";
	case VIO_ETIMEOUT: return "device timeout";
	default: return "unknown error";
	}
}
