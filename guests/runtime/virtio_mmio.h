/*
 * virtio_mmio.h - what every polling virtio driver of the runtime shares:
 * finding a device, initialising it over virtio-mmio and sending one
 * descriptor chain at a time on queue 0.
 *
 * Spec: virtio 1.2, section 2.7 (split virtqueues), 3.1.1 (driver
 * initialisation) and 4.2 (virtio-mmio, "modern" Version 2 register layout).
 * The device drivers on top: virtio_blk.c (5.2) and the rng-read guest (5.4).
 *
 * One queue (queue 0) per device, one chain in flight: the driver writes
 * its chain into vq->desc from descriptor 0, vio_submit() publishes head 0,
 * writes QueueNotify and polls the used ring until the device returns it.
 * No interrupts (the available ring asks for none), no allocation: each
 * driver owns one page-aligned `struct virtq`.
 *
 * Works at CPL 0 and CPL 3 in 64-bit mode with guest-physical ==
 * guest-virtual (the host identity-maps the first 4 GiB, with user pages
 * for ring-3 guests), so a buffer's address is its pointer.  Every
 * register access is one volatile 32-bit load or store, i.e. one MMIO exit.
 */
#ifndef KVMPY_GUEST_VIRTIO_MMIO_H
#define KVMPY_GUEST_VIRTIO_MMIO_H

#include "runtime.h"

/* Where the host puts virtio-mmio devices (kvmpy/x86/layout.py): the disks
 * in order from the first window, then the other devices (the rng). */
#define VIRTIO_MMIO_BASE  0xD0000000UL
#define VIRTIO_MMIO_SIZE  0x1000UL
#define VIRTIO_MMIO_SLOTS 6

/* Device IDs (virtio 1.2, section 5). */
#define VIRTIO_ID_BLOCK   2
#define VIRTIO_ID_ENTROPY 4

/* Device-independent feature bits (6). */
#define VIRTIO_F_VERSION_1 (1ULL << 32)

/* Return values: 0 on success, one of these (negative) otherwise. */
#define VIO_ENODEV   (-1) /* no such device at that base (MagicValue/Version/DeviceID) */
#define VIO_EFEATURE (-2) /* no VIRTIO_F_VERSION_1, or FEATURES_OK did not stick */
#define VIO_EQUEUE   (-3) /* queue 0 missing, already live, or under 4 entries */
#define VIO_EINVAL   (-6) /* not initialised, or a bad argument */
#define VIO_EDEVICE  (-7) /* the device broke the protocol (bad used entry, NEEDS_RESET) */
#define VIO_ETIMEOUT (-8) /* the used ring never advanced */

/* virtio-mmio registers (4.2.2), byte offsets from the device's base. */
#define MMIO_MAGIC_VALUE         0x000 /* "virt", little-endian */
#define MMIO_VERSION             0x004 /* 2: the non-legacy interface */
#define MMIO_DEVICE_ID           0x008
#define MMIO_DEVICE_FEATURES     0x010
#define MMIO_DEVICE_FEATURES_SEL 0x014
#define MMIO_DRIVER_FEATURES     0x020
#define MMIO_DRIVER_FEATURES_SEL 0x024
#define MMIO_QUEUE_SEL           0x030
#define MMIO_QUEUE_NUM_MAX       0x034
#define MMIO_QUEUE_NUM           0x038
#define MMIO_QUEUE_READY         0x044
#define MMIO_QUEUE_NOTIFY        0x050
#define MMIO_STATUS              0x070
#define MMIO_QUEUE_DESC_LOW      0x080
#define MMIO_QUEUE_DESC_HIGH     0x084
#define MMIO_QUEUE_DRIVER_LOW    0x090
#define MMIO_QUEUE_DRIVER_HIGH   0x094
#define MMIO_QUEUE_DEVICE_LOW    0x0a0
#define MMIO_QUEUE_DEVICE_HIGH   0x0a4
#define MMIO_CONFIG_GENERATION   0x0fc
#define MMIO_CONFIG              0x100 /* device-specific configuration */

/* Split virtqueue (2.7). */
#define VIRTQ_DESC_F_NEXT          1
#define VIRTQ_DESC_F_WRITE         2 /* the device writes this buffer */
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1

/* Entries we use at most: QueueNum is the largest power of two <= both
 * QueueNumMax and VIO_QUEUE_MAX (a power of two). */
#define VIO_QUEUE_MAX 16

struct virtq_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

struct virtq_used_elem {
	u32 id;  /* head of the returned chain */
	u32 len; /* bytes the device wrote into it */
};

/*
 * The three parts of queue 0 in one page: descriptor table (16-byte
 * aligned), available ring (2-byte), used ring (4-byte).  The rings are
 * sized for VIO_QUEUE_MAX; with a smaller QueueNum the device only looks
 * at the first QueueNum entries, and we use no event-index fields.
 */
struct virtq {
	struct virtq_desc desc[VIO_QUEUE_MAX];
	struct {
		u16 flags;
		u16 idx;
		u16 ring[VIO_QUEUE_MAX];
		u16 used_event;
	} avail __attribute__((aligned(16)));
	struct {
		u16 flags;
		u16 idx;
		struct virtq_used_elem ring[VIO_QUEUE_MAX];
		u16 avail_event;
	} used __attribute__((aligned(16)));
} __attribute__((aligned(4096)));

/* One device as its driver sees it. */
struct vio_dev {
	unsigned long base;
	/*
	 * A virtio-pci function instead of a window (virtio_pci.c's vio_find_pci):
	 * every register access goes through pci_read/pci_write, which translate
	 * the virtio-mmio offsets to the function's capabilities.  NULL for a window.
	 */
	u32 (*pci_read)(const struct vio_dev *d, unsigned off);
	void (*pci_write)(const struct vio_dev *d, unsigned off, u32 v);
	void *pci;
	struct virtq *vq; /* the driver's ring page */
	u64 offered;      /* what the device offered */
	u64 features;     /* negotiated */
	u16 qsize;
	u16 avail_idx;    /* next free slot (mod 2^16) in the available ring */
	u16 used_seen;    /* used-ring entries consumed so far */
	int ready;
};

static inline u32 vio_read(const struct vio_dev *d, unsigned off)
{
	if (d->pci_read)
		return d->pci_read(d, off);
	return *(volatile u32 *)(d->base + off);
}

static inline void vio_write(const struct vio_dev *d, unsigned off, u32 v)
{
	if (d->pci_write)
		d->pci_write(d, off, v);
	else
		*(volatile u32 *)(d->base + off) = v;
}

/* vio_init's `base` for a device vio_find_pci() (virtio_pci.h) already found. */
#define VIO_PCI_BASE 1UL

/* 1 if a version-2 virtio-mmio device with `device_id` answers at `base`. */
int vio_probe(unsigned long base, u32 device_id);

/* The base of the first window holding a `device_id` device, or 0. */
unsigned long vio_find(u32 device_id);

/*
 * Initialisation steps 1-7 (3.1.1) of the `device_id` device at `base`,
 * with `vq` as its queue 0: reset (and wait for it), ACKNOWLEDGE, DRIVER,
 * accept VIRTIO_F_VERSION_1 plus the offered bits of `optional`,
 * FEATURES_OK, set up queue 0 (interrupts suppressed).  The driver may
 * read its configuration now; vio_driver_ok() is step 8.  On an error the
 * device is left FAILED.  Returns 0 or VIO_E*.
 */
int vio_init(struct vio_dev *d, unsigned long base, u32 device_id, u64 optional, struct virtq *vq);
int vio_driver_ok(struct vio_dev *d);

/*
 * Send the chain the driver wrote from vq->desc[0], wait for the device
 * to return it, and store the used element's length in *used_len.
 * Returns 0, VIO_EINVAL (not ready), VIO_ETIMEOUT or VIO_EDEVICE; after
 * the last two the device is no longer used (ready = 0).
 */
int vio_submit(struct vio_dev *d, u32 *used_len);

/* A short name for a VIO_E* code ("device timeout", ...). */
const char *vio_strerror(int err);

/* Keep the compiler from moving memory accesses across this point.  x86 keeps
 * stores in order and loads in order, so that is all the ordering needed. */
#define barrier() __asm__ volatile("" : : : "memory")

#endif
