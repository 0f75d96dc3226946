/*
 * virtio_blk.c - a polling virtio-blk driver over virtio-mmio (see virtio_blk.h).
 *
 * Spec references are to virtio 1.2: 2.7 split virtqueues, 3.1.1 driver
 * initialisation, 4.2.2 the MMIO register layout, 5.2 the block device.
 */
#include "virtio_blk.h"

/* --- virtio-mmio registers (4.2.2), byte offsets from the device's base ------- */
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

#define VIRTIO_MMIO_MAGIC   0x74726976
#define VIRTIO_MMIO_VERSION 2
#define VIRTIO_ID_BLOCK     2

/* Device status bits (2.1). */
#define STATUS_ACKNOWLEDGE        1
#define STATUS_DRIVER             2
#define STATUS_DRIVER_OK          4
#define STATUS_FEATURES_OK        8
#define STATUS_DEVICE_NEEDS_RESET 64
#define STATUS_FAILED             128

/* Feature bits (6 and 5.2.3). */
#define VIRTIO_F_VERSION_1   (1ULL << 32)
#define VIRTIO_BLK_F_RO      (1ULL << 5)
#define VIRTIO_BLK_F_FLUSH   (1ULL << 9)

/* Block device config (5.2.4): capacity, a u64 in 512-byte sectors, at offset 0. */
#define BLK_CONFIG_CAPACITY 0x00

/* Request types and status values (5.2.6). */
#define VIRTIO_BLK_T_IN     0
#define VIRTIO_BLK_T_OUT    1
#define VIRTIO_BLK_T_FLUSH  4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_S_OK     0
#define VIRTIO_BLK_S_IOERR  1
#define VIRTIO_BLK_S_UNSUPP 2

/* --- split virtqueue (2.7) --------------------------------------------------------- */
#define VIRTQ_DESC_F_NEXT         1
#define VIRTQ_DESC_F_WRITE        2 /* the device writes this buffer */
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1

/* Entries we use at most: QueueNum is the largest power of two <= both
 * QueueNumMax and QUEUE_MAX (a power of two).  One request needs 3
 * descriptors; a few more cost nothing. */
#define QUEUE_MAX 16

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
 * sized for QUEUE_MAX; with a smaller QueueNum the device only looks at
 * the first QueueNum entries, and we use no event-index fields.
 */
static struct {
	struct virtq_desc desc[QUEUE_MAX];
	struct {
		u16 flags;
		u16 idx;
		u16 ring[QUEUE_MAX];
		u16 used_event;
	} avail __attribute__((aligned(16)));
	struct {
		u16 flags;
		u16 idx;
		struct virtq_used_elem ring[QUEUE_MAX];
		u16 avail_event;
	} used __attribute__((aligned(16)));
} vq __attribute__((aligned(4096)));

/* The request header (struct virtio_blk_req up to the data) and status byte. */
static struct {
	u32 type;
	u32 reserved;
	u64 sector;
} req_hdr __attribute__((aligned(16)));
static u8 req_status;

static struct {
	unsigned long base;
	u64 features;   /* negotiated */
	u64 offered;    /* what the device offered */
	u64 capacity;
	u16 qsize;
	u16 avail_idx;  /* next free slot (mod 2^16) in the available ring */
	u16 used_seen;  /* used-ring entries consumed so far */
	int ready;
} dev;

/* How long to poll the used ring before giving up (iterations with `pause`). */
#define POLL_LIMIT (1UL << 28)

/* Keep the compiler from moving memory accesses across this point.  x86 keeps
 * stores in order and loads in order, so that is all the ordering needed. */
#define barrier() __asm__ volatile("" : : : "memory")

static inline u32 mmio_read(unsigned off)
{
	return *(volatile u32 *)(dev.base + off);
}

static inline void mmio_write(unsigned off, u32 v)
{
	*(volatile u32 *)(dev.base + off) = v;
}

static void write_addr(unsigned low, const volatile void *p)
{
	u64 a = (unsigned long)p; /* identity map: virtual == physical */

	mmio_write(low, (u32)a);
	mmio_write(low + 4, (u32)(a >> 32));
}

/* Give up on the device (3.1.1: set FAILED) and return `err`. */
static int fail(int err)
{
	mmio_write(MMIO_STATUS, mmio_read(MMIO_STATUS) | STATUS_FAILED);
	return err;
}

static u64 read_capacity(void)
{
	u32 gen, lo, hi;

	/* Two 32-bit reads of one u64: retry if the config changed between them (4.2.2). */
	do {
		gen = mmio_read(MMIO_CONFIG_GENERATION);
		lo = mmio_read(MMIO_CONFIG + BLK_CONFIG_CAPACITY);
		hi = mmio_read(MMIO_CONFIG + BLK_CONFIG_CAPACITY + 4);
	} while (gen != mmio_read(MMIO_CONFIG_GENERATION));
	return (u64)hi << 32 | lo;
}

static int setup_queue(void)
{
	u32 max;
	u8 *p = (u8 *)&vq;

	mmio_write(MMIO_QUEUE_SEL, 0);
	if (mmio_read(MMIO_QUEUE_READY) != 0)
		return BLK_EQUEUE;
	max = mmio_read(MMIO_QUEUE_NUM_MAX); /* 0: no such queue */
	/* A split ring's size is a power of two (2.7); a request needs 3 entries. */
	dev.qsize = QUEUE_MAX;
	while (dev.qsize > max)
		dev.qsize >>= 1;
	if (dev.qsize < 4)
		return BLK_EQUEUE;
	dev.avail_idx = dev.used_seen = 0;
	for (unsigned long i = 0; i < sizeof(vq); i++)
		p[i] = 0;
	vq.avail.flags = VIRTQ_AVAIL_F_NO_INTERRUPT; /* we poll */

	mmio_write(MMIO_QUEUE_NUM, dev.qsize);
	write_addr(MMIO_QUEUE_DESC_LOW, vq.desc);
	write_addr(MMIO_QUEUE_DRIVER_LOW, &vq.avail);
	write_addr(MMIO_QUEUE_DEVICE_LOW, &vq.used);
	barrier(); /* the zeroed rings are in memory before the device may look */
	mmio_write(MMIO_QUEUE_READY, 1);
	return 0;
}

int blk_init(unsigned long base)
{
	u32 lo, hi;
	int err;

	dev.ready = 0;
	dev.base = base;
	if (mmio_read(MMIO_MAGIC_VALUE) != VIRTIO_MMIO_MAGIC ||
	    mmio_read(MMIO_VERSION) != VIRTIO_MMIO_VERSION ||
	    mmio_read(MMIO_DEVICE_ID) != VIRTIO_ID_BLOCK)
		return BLK_ENODEV;

	/* 3.1.1 steps 1-3: reset (and wait for it), ACKNOWLEDGE, DRIVER. */
	mmio_write(MMIO_STATUS, 0);
	for (int i = 0; mmio_read(MMIO_STATUS) != 0; i++)
		if (i == 1000)
			return BLK_EDEVICE;
	mmio_write(MMIO_STATUS, STATUS_ACKNOWLEDGE);
	mmio_write(MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);

	/* Steps 4-6: read the offered features, accept ours, FEATURES_OK must stick. */
	mmio_write(MMIO_DEVICE_FEATURES_SEL, 0);
	lo = mmio_read(MMIO_DEVICE_FEATURES);
	mmio_write(MMIO_DEVICE_FEATURES_SEL, 1);
	hi = mmio_read(MMIO_DEVICE_FEATURES);
	dev.offered = (u64)hi << 32 | lo;
	if (!(dev.offered & VIRTIO_F_VERSION_1))
		return fail(BLK_EFEATURE);
	dev.features = VIRTIO_F_VERSION_1 | (dev.offered & VIRTIO_BLK_F_FLUSH);
	mmio_write(MMIO_DRIVER_FEATURES_SEL, 0);
	mmio_write(MMIO_DRIVER_FEATURES, (u32)dev.features);
	mmio_write(MMIO_DRIVER_FEATURES_SEL, 1);
	mmio_write(MMIO_DRIVER_FEATURES, (u32)(dev.features >> 32));
	mmio_write(MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
	if (!(mmio_read(MMIO_STATUS) & STATUS_FEATURES_OK))
		return fail(BLK_EFEATURE);

	/* Step 7: device-specific setup: the queue, the config. */
	err = setup_queue();
	if (err)
		return fail(err);
	dev.capacity = read_capacity();

	/* Step 8: DRIVER_OK. */
	mmio_write(MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER |
		   STATUS_FEATURES_OK | STATUS_DRIVER_OK);
	if (mmio_read(MMIO_STATUS) & (STATUS_DEVICE_NEEDS_RESET | STATUS_FAILED))
		return fail(BLK_EDEVICE);
	dev.ready = 1;
	return 0;
}

u64 blk_capacity(void)
{
	return dev.capacity;
}

int blk_read_only(void)
{
	return (dev.offered & VIRTIO_BLK_F_RO) != 0;
}

int blk_has_flush(void)
{
	return (dev.features & VIRTIO_BLK_F_FLUSH) != 0;
}

/*
 * One request: header (device-readable), optional data, status
 * (device-writable), as the chain 0 -> 1 -> 2 (or 0 -> 1 without data).
 * Publish it, notify, poll the used ring, decode the status byte.
 */
static int submit(u32 type, u64 sector, volatile void *data, u32 len, int device_writes)
{
	volatile u16 *used_idx = &vq.used.idx;
	struct virtq_used_elem elem;
	unsigned st = 1; /* index of the status descriptor */
	unsigned long spins;
	u8 status;

	if (!dev.ready)
		return BLK_EINVAL;
	req_hdr.type = type;
	req_hdr.reserved = 0;
	req_hdr.sector = sector;
	req_status = 0xff; /* no valid status: shows if the device never wrote it */

	vq.desc[0] = (struct virtq_desc){
		.addr = (unsigned long)&req_hdr, .len = sizeof(req_hdr),
		.flags = VIRTQ_DESC_F_NEXT, .next = 1,
	};
	if (len) {
		vq.desc[1] = (struct virtq_desc){
			.addr = (unsigned long)data, .len = len,
			.flags = VIRTQ_DESC_F_NEXT | (device_writes ? VIRTQ_DESC_F_WRITE : 0),
			.next = 2,
		};
		st = 2;
	}
	vq.desc[st] = (struct virtq_desc){
		.addr = (unsigned long)&req_status, .len = 1,
		.flags = VIRTQ_DESC_F_WRITE, .next = 0,
	};

	/* 2.7.13: ring entry, then (after a barrier) the new idx, then notify. */
	vq.avail.ring[dev.avail_idx % dev.qsize] = 0; /* the chain's head */
	barrier();
	dev.avail_idx++;
	*(volatile u16 *)&vq.avail.idx = dev.avail_idx;
	barrier();
	mmio_write(MMIO_QUEUE_NOTIFY, 0);

	for (spins = 0; *used_idx == dev.used_seen; spins++) {
		if (spins == POLL_LIMIT) {
			dev.ready = 0; /* the chain is still the device's: stop using the queue */
			return BLK_ETIMEOUT;
		}
		__asm__ volatile("pause");
	}
	barrier(); /* read the used entry and status only after seeing idx move */
	if ((u16)(*used_idx - dev.used_seen) != 1) {
		dev.ready = 0;
		return BLK_EDEVICE;
	}
	elem = *(volatile struct virtq_used_elem *)&vq.used.ring[dev.used_seen % dev.qsize];
	dev.used_seen++;
	if (elem.id != 0)
		return BLK_EDEVICE;
	status = *(volatile u8 *)&req_status;
	switch (status) {
	case VIRTIO_BLK_S_OK:
		return 0;
	case VIRTIO_BLK_S_IOERR:
		return BLK_EIO;
	case VIRTIO_BLK_S_UNSUPP:
		return BLK_EUNSUPP;
	default:
		return BLK_EDEVICE;
	}
}

static int check_range(u64 sector, unsigned long nbytes)
{
	u64 n = nbytes / BLK_SECTOR_SIZE;

	if (!nbytes || nbytes % BLK_SECTOR_SIZE || nbytes > BLK_MAX_BYTES)
		return BLK_EINVAL;
	if (sector > dev.capacity || n > dev.capacity - sector)
		return BLK_EINVAL;
	return 0;
}

int blk_read(u64 sector, void *buf, unsigned long nbytes)
{
	int err = check_range(sector, nbytes);

	return err ? err : submit(VIRTIO_BLK_T_IN, sector, buf, nbytes, 1);
}

int blk_write(u64 sector, const void *buf, unsigned long nbytes)
{
	int err = check_range(sector, nbytes);

	/* The device only reads this buffer (no VIRTQ_DESC_F_WRITE). */
	return err ? err : submit(VIRTIO_BLK_T_OUT, sector, (void *)buf, nbytes, 0);
}

int blk_flush(void)
{
	/* 5.2.6.2: no flush requests unless VIRTIO_BLK_F_FLUSH was negotiated. */
	if (!blk_has_flush())
		return dev.ready ? 0 : BLK_EINVAL;
	return submit(VIRTIO_BLK_T_FLUSH, 0, 0, 0, 0);
}

int blk_get_id(char buf[BLK_ID_BYTES])
{
	return submit(VIRTIO_BLK_T_GET_ID, 0, buf, BLK_ID_BYTES, 1);
}

const char *blk_strerror(int err)
{
	switch (err) {
	case 0: return "ok";
	case BLK_ENODEV: return "no virtio-blk device";
	case BLK_EFEATURE: return "feature negotiation failed";
	case BLK_EQUEUE: return "queue 0 unusable";
	case BLK_EIO: return "I/O error";
	case BLK_EUNSUPP: return "unsupported request";
	case BLK_EINVAL: return "invalid request";
	case BLK_EDEVICE: return "device protocol error";
	case BLK_ETIMEOUT: return "device timeout";
	default: return "unknown error";
	}
}


int blk_fail(const char *prog, const char *what, u64 sector, int err)
{
	puts(prog);
	puts(": ");
	puts(what);
	puts(" error at sector ");
	print_dec(sector);
	puts(": ");
	puts(blk_strerror(err));
	putc('\n');
	return BLK_EXIT_IO_ERROR;
}

int blk_start(const char *prog)
{
	int err = blk_init(VIRTIO_MMIO_BASE);

	if (err == BLK_ENODEV) {
		puts("no virtio-blk device\n");
		return BLK_EXIT_NO_DEVICE;
	}
	return err ? blk_fail(prog, "init", 0, err) : 0;
}
