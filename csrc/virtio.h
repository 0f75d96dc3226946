/*
 * virtio.h - what csrc/virtqueue.c and csrc/virtio_blk.c share: the device state
 * and the guest-memory, interrupt and virtqueue helpers. Private to csrc/.
 */
#ifndef KVMPY_VIRTIO_H
#define KVMPY_VIRTIO_H

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>
#include <linux/kvm.h>

#include "kvmpy_native.h"

/* Register offsets (virtio 1.2, 4.2.2), spec names. */
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
#define VIRTIO_MMIO_MAGIC 0x74726976u
#define KVMPY_VIRTIO_MMIO_VENDOR 0x706d766bu	/* "kvmp": ours, the spec leaves VendorID open */
/* Spec values under Linux's uapi names (virtio_config.h, virtio_mmio.h, virtio_blk.h);
 * what is kvmpy's own is KVMPY_. */
#define VIRTIO_CONFIG_S_DRIVER_OK 4
#define VIRTIO_CONFIG_S_FEATURES_OK 8
#define VIRTIO_CONFIG_S_NEEDS_RESET 0x40
#define VIRTIO_CONFIG_S_FAILED 0x80
#define VIRTIO_MMIO_INT_VRING 1
#define VIRTIO_MMIO_INT_CONFIG 2
#define VIRTIO_F_VERSION_1 32
#define VIRTIO_BLK_F_SEG_MAX 2
#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_ID_BLOCK 2
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_DESC_F_INDIRECT 4
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2
#define KVMPY_BLK_SECTOR_SIZE 512u
#define KVMPY_BLK_HEADER_SIZE 16u
#define KVMPY_BLK_CONFIG_SIZE 36u
#define VIRTIO_BLK_ID_BYTES 20u
/* last_error of a state restored in DEVICE_NEEDS_RESET (the message is not saved) */
#define KVMPY_RESTORED_ERROR "DEVICE_NEEDS_RESET restored from a saved state"
#define KVMPY_PAGE_SIZE 4096u	/* one dirty bit per page (memory.py PAGE_SIZE) */

struct kvmpy_blk_seg { uint64_t gpa; uint32_t len; };

struct kvmpy_blk {
	pthread_mutex_t lock;
	struct kvmpy_blk_state s;
	struct kvmpy_guest_mem mem;
	int fd, vm_fd, gsi;
	uint8_t id[VIRTIO_BLK_ID_BYTES];
	uint8_t config[KVMPY_BLK_CONFIG_SIZE];
	/* one chain at a time: at most QUEUE_NUM_MAX segments of each kind */
	struct kvmpy_blk_seg rd[KVMPY_BLK_QUEUE_NUM_MAX], wr[KVMPY_BLK_QUEUE_NUM_MAX];
	uint32_t nrd, nwr;
	struct iovec iov[KVMPY_BLK_QUEUE_NUM_MAX];
};


/* guest memory: NULL unless [gpa, gpa+len) lies inside one RAM region */
uint8_t *kvmpy_vio_hva(const struct kvmpy_blk *b, uint64_t gpa, uint64_t len);
int kvmpy_vio_rd16(const struct kvmpy_blk *b, uint64_t gpa, uint16_t *v);
/* after the VMM wrote guest [gpa, gpa+len): set the pages' dirty bits (atomic) */
void kvmpy_vio_mark_dirty(const struct kvmpy_blk *b, uint64_t gpa, uint64_t len);
/* interrupt line = InterruptStatus != 0; device errors set DEVICE_NEEDS_RESET once */
void kvmpy_vio_update_irq(struct kvmpy_blk *b);
void kvmpy_vio_device_error(struct kvmpy_blk *b, const char *reason);
/* the split virtqueue: enable (checks), pop a validated chain into b->rd/b->wr, push used */
const char *kvmpy_vq_check(const struct kvmpy_blk *b, const struct kvmpy_vq_state *q);
int kvmpy_vq_enable(struct kvmpy_blk *b);
int kvmpy_vq_pop(struct kvmpy_blk *b, uint16_t *head, const char **why);
void kvmpy_vq_push_used(struct kvmpy_blk *b, uint16_t head, uint32_t written);

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
