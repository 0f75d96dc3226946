/*
 * blk-durable.c - writes a pattern to disk 0, flushes, says so, then waits forever.
 *
 * The durability test kills the VMM with SIGKILL as soon as it reads the
 * "flushed" line: every write the guest saw acknowledged before that line must
 * be in the backing file. Pattern (as blk-write): the little-endian u64 at disk
 * byte offset 8*k is (k + 1) * 0x9e3779b97f4a7c15 mod 2^64, over the first
 * min(capacity, 64) sectors, written in 4 KiB requests.
 * Output: "blk-durable: writing\n", then "blk-durable: <n> sectors flushed\n".
 * Errors exit like blk-write: 0x4E no device, 0x4D I/O error.
 */
#include "runtime/runtime.h"
#include "runtime/virtio_blk.h"

#define EXIT_IO_ERROR  0x4D
#define EXIT_NO_DEVICE 0x4E
#define MAX_SECTORS    64
#define PATTERN_MUL    0x9e3779b97f4a7c15ULL

static u64 wbuf[MAX_SECTORS * BLK_SECTOR_SIZE / 8] __attribute__((aligned(4096)));

int main(void)
{
	u64 n;
	int err;

	puts("blk-durable: writing\n");
	err = blk_start("blk-durable");
	if (err)
		return err;
	n = blk_capacity() < MAX_SECTORS ? blk_capacity() : MAX_SECTORS;
	for (u64 k = 0; k < n * BLK_SECTOR_SIZE / 8; k++)
		wbuf[k] = (k + 1) * PATTERN_MUL;
	for (u64 s = 0; s < n; s += 8) {
		u64 c = n - s < 8 ? n - s : 8;

		if (blk_write(s, (u8 *)wbuf + s * BLK_SECTOR_SIZE, c * BLK_SECTOR_SIZE))
			return EXIT_IO_ERROR;
	}
	if (blk_flush())
		return EXIT_IO_ERROR;
	puts("blk-durable: ");
	print_dec(n);
	puts(" sectors flushed\n");
	for (;;)
		__asm__ volatile("pause");
}
