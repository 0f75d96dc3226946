/*
 * virtio_blk.c - a polling virtio-blk driver over virtio-mmio (see virtio_blk.h).
 *
 * Spec references are to virtio 1.2: 5.2 the block device.  Finding the
 * device, feature negotiation, queue 0 and polling are virtio_mmio.c's.
 */
#include "virtio_blk.h"
#include "virtio_pci.h"

/* Feature bits (5.2.3). */
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

static struct virtq vq;   /* queue 0, one page */

/* The request header (struct virtio_blk_req up to the data) and status byte. */
static struct {
	u32 type;
	u32 reserved;
	u64 sector;
} req_hdr __attribute__((aligned(16)));
static u8 req_status;

static struct vio_dev dev;
static u64 capacity;

static u64 read_capacity(void)
{
	u32 gen, lo, hi;

	/* Two 32-bit reads of one u64: retry if the config changed between them (4.2.2). */
	do {
		gen = vio_read(&dev, MMIO_CONFIG_GENERATION);
		lo = vio_read(&dev, MMIO_CONFIG + BLK_CONFIG_CAPACITY);
		hi = vio_read(&dev, MMIO_CONFIG + BLK_CONFIG_CAPACITY + 4);
	} while (gen != vio_read(&dev, MMIO_CONFIG_GENERATION));
	return (u64)hi << 32 | lo;
}

int blk_init(unsigned long base)
{
	int err = vio_init(&dev, base, VIRTIO_ID_BLOCK, VIRTIO_BLK_F_FLUSH, &vq);

	if (err)
		return err;
	capacity = read_capacity();   /* step 7's device-specific part */
	return vio_driver_ok(&dev);
}

u64 blk_capacity(void)
{
	return capacity;
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
	unsigned st = 1; /* index of the status descriptor */
	u32 used_len;
	u8 status;
	int err;

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

	err = vio_submit(&dev, &used_len);
	if (err)
		return err;
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
	if (sector > capacity || n > capacity - sector)
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
	case BLK_ENODEV: return "no virtio-blk device";
	case BLK_EIO: return "I/O error";
	case BLK_EUNSUPP: return "unsupported request";
	default: return vio_strerror(err);
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
	static struct vpci_dev fn;
	int err = blk_init(VIRTIO_MMIO_BASE);

	if (err == BLK_ENODEV && vio_find_pci(&dev, &fn, VIRTIO_ID_BLOCK) == 0)
		err = blk_init(VIO_PCI_BASE);   /* behind virtio-pci: the same steps through virtio_pci.c */

	if (err == BLK_ENODEV) {
		puts("no virtio-blk device\n");
		return BLK_EXIT_NO_DEVICE;
	}
	return err ? blk_fail(prog, "init", 0, err) : 0;
}
