/*
 * blk-selffeed.c - a hostile virtio-blk driver: one request that republishes itself.
 *
 * For tests of the device's bound on one QueueNotify (docs/virtio.md, "Why at most
 * QueueNum") and of every way to stop a run. After blk_start() (runtime/virtio_blk.c)
 * has found and initialised disk 0, the guest drops queue 0 and sets it up again
 * (QueueNum 16) on its own page, with one three-descriptor chain at head 0:
 *
 *   desc 0  device-readable, 16 bytes at &avail.idx - 8: the request header. Its
 *           type is 0 (IN) and its le64 sector field is avail.idx, ring[0], ring[1],
 *           ring[2], i.e. avail.idx itself (every ring slot names head 0);
 *   desc 1  device-writable, 512 bytes at &avail.idx - FEED_AT: the IN buffer, whose
 *           byte FEED_AT lies on avail.idx;
 *   desc 2  device-writable, 1 byte: the status.
 *
 * With a 32 MiB disk (65536 sectors) in which sector s holds (s + 1) mod 65536 as a
 * le16 at offset FEED_AT and zeros elsewhere, serving the request for sector s writes
 * s + 1 into avail.idx: the device publishes the next request itself, forever. The
 * guest publishes the first one (avail.idx = 1) and then writes QueueNotify in an
 * endless loop; a device without a bound never returns from the first write.
 *
 * Output: "blk-selffeed: one request that republishes itself", then after the
 * setup "blk-selffeed: feeding"; it never exits. Without a disk "no virtio-blk
 * device" and exit 0x4E; with a disk of another size "blk-selffeed: needs a
 * 32 MiB disk" and exit 0x46. CPL 3, so the notify loop runs natively.
 */
#include "runtime/runtime.h"
#include "runtime/virtio_blk.h"

#define EXIT_BAD_DISK 0x46
#define DISK_SECTORS 65536
#define QUEUE_NUM 16
#define FEED_AT 0x102			/* the IN buffer's byte that lands on avail.idx */

/* virtio-mmio registers (virtio 1.2, 4.2.2) and descriptor flags (2.7.5) */
#define QUEUE_SEL 0x030
#define QUEUE_NUM_REG 0x038
#define QUEUE_READY 0x044
#define QUEUE_NOTIFY 0x050
#define QUEUE_DESC_LOW 0x080
#define QUEUE_DRIVER_LOW 0x090
#define QUEUE_DEVICE_LOW 0x0a0
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2

/* Page layout: descriptor table at 0, available ring at 0x800, used ring at 0xc00;
 * the IN buffer covers 0x700..0x900 (the header and the available ring). */
#define AVAIL_OFF 0x800
#define USED_OFF 0xc00
#define STATUS_OFF 0xf00

static u8 page[4096] __attribute__((aligned(4096)));

static void reg(unsigned off, u32 v)
{
	*(volatile u32 *)(VIRTIO_MMIO_BASE + off) = v;
}

static void reg_addr(unsigned low, u64 a)
{
	reg(low, (u32)a);
	reg(low + 4, (u32)(a >> 32));
}

static void desc(unsigned i, u64 addr, u32 len, u16 flags, u16 next)
{
	volatile u8 *d = page + 16 * i;

	*(volatile u64 *)d = addr;
	*(volatile u32 *)(d + 8) = len;
	*(volatile u16 *)(d + 12) = flags;
	*(volatile u16 *)(d + 14) = next;
}

int main(void)
{
	u64 base = (unsigned long)page, avail = base + AVAIL_OFF;	/* identity map */
	int err;

	puts("blk-selffeed: one request that republishes itself\n");
	err = blk_start("blk-selffeed");
	if (err)
		return err;
	if (blk_capacity() != DISK_SECTORS) {
		puts("blk-selffeed: needs a 32 MiB disk\n");
		return EXIT_BAD_DISK;
	}
	reg(QUEUE_SEL, 0);
	reg(QUEUE_READY, 0);			/* drop the runtime's queue 0 */
	reg(QUEUE_NUM_REG, QUEUE_NUM);
	reg_addr(QUEUE_DESC_LOW, base);
	reg_addr(QUEUE_DRIVER_LOW, avail);
	reg_addr(QUEUE_DEVICE_LOW, base + USED_OFF);
	/* .bss is zero: header type IN, avail.flags 0, every ring slot head 0 */
	desc(0, avail + 2 - 8, 16, VIRTQ_DESC_F_NEXT, 1);
	desc(1, avail + 2 - FEED_AT, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2);
	desc(2, base + STATUS_OFF, 1, VIRTQ_DESC_F_WRITE, 0);
	*(volatile u16 *)(avail + 2) = 1;	/* publish head 0: the header says sector 1 */
	reg(QUEUE_READY, 1);
	puts("blk-selffeed: feeding\n");
	for (;;)
		reg(QUEUE_NOTIFY, 0);
}
