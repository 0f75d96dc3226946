/*
 * virtio.h - what the C virtio devices share, private to csrc/: the virtio-mmio
 * register and status names, guest-memory access through struct kvmpy_guest_mem,
 * and the generic split virtqueue of csrc/virtqueue.c. Nothing here knows which
 * device it serves; a device's own names live in its .c file (virtio_blk.c).
 */
#ifndef KVMPY_VIRTIO_H
#define KVMPY_VIRTIO_H

#include <stdint.h>
#include <sys/uio.h>

#include "kvmpy_native.h"

/* virtio-mmio register offsets (virtio 1.2, 4.2.2), spec names. */
enum {
	MagicValue = 0x000, Version = 0x004, DeviceID = 0x008, VendorID = 0x00c,
	DeviceFeatures = 0x010, DeviceFeaturesSel = 0x014, DriverFeatures = 0x020,
	DriverFeaturesSel = 0x024, QueueSel = 0x030, QueueNumMax = 0x034, QueueNum = 0x038,
	QueueReady = 0x044, QueueNotify = 0x050, InterruptStatus = 0x060, InterruptACK = 0x064,
	Status = 0x070, QueueDescLow = 0x080, QueueDescHigh = 0x084, QueueDriverLow = 0x090,
	QueueDriverHigh = 0x094, QueueDeviceLow = 0x0a0, QueueDeviceHigh = 0x0a4,
	SHMLenLow = 0x0b0, SHMLenHigh = 0x0b4, SHMBaseLow = 0x0b8, SHMBaseHigh = 0x0bc,
	ConfigGeneration = 0x0fc, Config = 0x100,
};
#define VIRTIO_MMIO_MAGIC 0x74726976u		/* "virt" little-endian (4.2.2) */
#define KVMPY_VIRTIO_MMIO_VENDOR 0x706d766bu	/* "kvmp": VendorID, the spec leaves it to us */

/* Device status bits (2.1), Linux's <linux/virtio_config.h> names. */
#define VIRTIO_CONFIG_S_DRIVER_OK 4
#define VIRTIO_CONFIG_S_FEATURES_OK 8
#define VIRTIO_CONFIG_S_NEEDS_RESET 0x40
#define VIRTIO_CONFIG_S_FAILED 0x80

/* InterruptStatus bits (4.2.2), Linux's <linux/virtio_mmio.h> names. */
#define VIRTIO_MMIO_INT_VRING 1
#define VIRTIO_MMIO_INT_CONFIG 2

#define VIRTIO_F_VERSION_1 32

/* struct virtq_desc.flags and struct virtq_avail.flags (2.7.5, 2.7.6) */
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_DESC_F_INDIRECT 4
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1

/* The largest QueueNumMax of any C device: a chain has at most this many buffers. */
#define KVMPY_VQ_NUM_MAX 256
#define KVMPY_PAGE_SIZE 4096u	/* one dirty bit per page (memory.py PAGE_SIZE) */

/* --- guest memory (virtqueue.c) ----------------------------------------------------- */

/* The host pointer for guest [gpa, gpa+len), or NULL unless it lies inside one RAM
 * region (overflow-safe). The one place a guest address becomes a host pointer. */
uint8_t *kvmpy_mem_hva(const struct kvmpy_guest_mem *mem, uint64_t gpa, uint64_t len);
/* Copy guest [gpa, gpa+len) into out, each byte read exactly once (READ_ONCE):
 * 0, or -EFAULT (nothing copied) unless it lies inside one RAM region. */
int kvmpy_mem_read(const struct kvmpy_guest_mem *mem, uint64_t gpa, void *out, uint32_t len);
/* After the VMM wrote guest [gpa, gpa+len): set the pages' dirty bits (atomic). */
void kvmpy_mem_mark_dirty(const struct kvmpy_guest_mem *mem, uint64_t gpa, uint64_t len);

/* --- the split virtqueue (virtqueue.c) ------------------------------------------------ */

/* One buffer of a chain: [gpa, gpa+len), len >= 1, checked to lie inside one RAM region. */
struct kvmpy_vq_buf { uint64_t gpa; uint32_t len; };

/* One chain as kvmpy_vq_pop validated it: device-readable buffers, then writable ones. */
struct kvmpy_vq_chain {
	uint16_t head;
	uint32_t nrd, nwr;
	struct kvmpy_vq_buf rd[KVMPY_VQ_NUM_MAX], wr[KVMPY_VQ_NUM_MAX];
};

/* The QueueReady checks of q for a device offering num_max (<= KVMPY_VQ_NUM_MAX)
 * entries: NULL if q may go live, else why not. */
const char *kvmpy_vq_check(const struct kvmpy_vq_state *q, const struct kvmpy_guest_mem *mem,
			   uint64_t num_max);
/* QueueReady = 1: 0 and q live with its indices zeroed, or -EINVAL and *why. */
int kvmpy_vq_enable(struct kvmpy_vq_state *q, const struct kvmpy_guest_mem *mem,
		    uint64_t num_max, const char **why);
/* The next available chain into *c: 1 = a chain, 0 = none, -EINVAL = driver error
 * (*why says which; q unchanged). q must be live (kvmpy_vq_enable or a checked state). */
int kvmpy_vq_pop(struct kvmpy_vq_state *q, const struct kvmpy_guest_mem *mem,
		 struct kvmpy_vq_chain *c, const char **why);
/* Return chain head to the driver with written bytes: used element, then used.idx. */
void kvmpy_vq_push_used(struct kvmpy_vq_state *q, const struct kvmpy_guest_mem *mem,
			uint16_t head, uint32_t written);
/* 1 if chains were returned since used_count was used_before and the driver has not
 * set VIRTQ_AVAIL_F_NO_INTERRUPT: the device should raise a used buffer notification. */
int kvmpy_vq_should_notify(const struct kvmpy_vq_state *q, const struct kvmpy_guest_mem *mem,
			   uint64_t used_before);

/* The buffers b[0..n) below come from a chain kvmpy_vq_pop returned for the same mem;
 * that check is what lets these turn their addresses into host pointers. */

/* Bytes in the n buffers at b. */
uint64_t kvmpy_vq_bufs_len(const struct kvmpy_vq_buf *b, uint32_t n);
/* Copy bytes [0, len) of the buffers' concatenation to out, each byte loaded once
 * (READ_ONCE: parse the copy, never the guest's bytes), or from in (marking them dirty).
 * 0, or -EFAULT if a buffer is not in mem (gather then zeroes out). */
int kvmpy_vq_gather(const struct kvmpy_guest_mem *mem, const struct kvmpy_vq_buf *b,
		    uint32_t n, uint8_t *out, uint64_t len);
int kvmpy_vq_scatter(const struct kvmpy_guest_mem *mem, const struct kvmpy_vq_buf *b,
		     uint32_t n, const uint8_t *in, uint64_t len);
/* iov[] for bytes [skip, skip+len) of the buffers (at most n entries); returns how many,
 * 0 if a buffer is not in mem (so 0 for len > 0 is a failure). */
uint32_t kvmpy_vq_iov(const struct kvmpy_guest_mem *mem, const struct kvmpy_vq_buf *b,
		      uint32_t n, uint64_t skip, uint64_t len, struct iovec *iov);
/* Mark bytes [skip, skip+len) of the buffers dirty, after the device wrote them. */
void kvmpy_vq_mark_dirty(const struct kvmpy_guest_mem *mem, const struct kvmpy_vq_buf *b,
			 uint32_t n, uint64_t skip, uint64_t len);

static inline void kvmpy_put_le(uint8_t *p, uint64_t v, unsigned n)
{
	unsigned i;

	for (i = 0; i < n; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static inline uint64_t kvmpy_get_le(const uint8_t *p, unsigned n)
{
	uint64_t v = 0;
	unsigned i;

	for (i = 0; i < n; i++)
		v |= (uint64_t)p[i] << (8 * i);
	return v;
}

#endif
