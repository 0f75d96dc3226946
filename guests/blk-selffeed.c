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
#include "runtime/selffeed.h"

#define EXIT_BAD_DISK 0x46

static u8 page[4096] __attribute__((aligned(4096)));

int main(void)
{
	int err;

	puts("blk-selffeed: one request that republishes itself\n");
	err = blk_start("blk-selffeed");
	if (err)
		return err;
	if (blk_capacity() != SELFFEED_SECTORS) {
		puts("blk-selffeed: needs a 32 MiB disk\n");
		return EXIT_BAD_DISK;
	}
	selffeed_setup(page);
	puts("blk-selffeed: feeding\n");
	for (;;)
		selffeed_reg(QUEUE_NOTIFY, 0);
}
