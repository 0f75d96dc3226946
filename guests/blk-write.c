/*
 * blk-write.c - writes a pattern to a virtio-blk disk, flushes, reads it back.
 *
 * Covers the first N = min(capacity, 256) sectors of disk 0.  Pattern: the
 * little-endian u64 at disk byte offset 8*k is
 *     (k + 1) * 0x9e3779b97f4a7c15 mod 2^64
 * so every word of the region is different and a misplaced sector shows.
 * Writes go out in 8 KiB requests (16 sectors), then one flush (if the
 * device offers VIRTIO_BLK_F_FLUSH), then one read of the whole region into
 * a buffer pre-filled with 0xa5, compared word by word.
 * Output:
 *     blk-write: pattern, flush, read back
 *     blk-write: <N, decimal> sectors ok                      exit 0x44
 * or  blk-write: write failed (read-only?)                    exit 0x45 (write -> IOERR)
 * or  blk-write: mismatch at byte <offset, decimal>            exit 1
 * or  no virtio-blk device                                    exit 0x4E
 * or  blk-write: <op> error at sector <s>: <reason>           exit 0x4D
 */
#include "runtime/runtime.h"
#include "runtime/virtio_blk.h"

#define EXIT_OK        0x44
#define EXIT_READ_ONLY 0x45
#define EXIT_IO_ERROR  0x4D
#define EXIT_NO_DEVICE 0x4E

#define MAX_SECTORS   256
#define WRITE_SECTORS 16
#define PATTERN_MUL   0x9e3779b97f4a7c15ULL

static u64 wbuf[MAX_SECTORS * BLK_SECTOR_SIZE / 8] __attribute__((aligned(4096)));
static u64 rbuf[MAX_SECTORS * BLK_SECTOR_SIZE / 8] __attribute__((aligned(4096)));

static int io_error(const char *what, u64 sector, int err)
{
	return blk_fail("blk-write", what, sector, err);
}

int main(void)
{
	u64 n, words;
	int err;

	puts("blk-write: pattern, flush, read back\n");
	err = blk_start("blk-write");
	if (err)
		return err;

	n = blk_capacity() < MAX_SECTORS ? blk_capacity() : MAX_SECTORS;
	words = n * BLK_SECTOR_SIZE / 8;
	for (u64 k = 0; k < words; k++) {
		wbuf[k] = (k + 1) * PATTERN_MUL;
		rbuf[k] = 0xa5a5a5a5a5a5a5a5ULL;
	}

	for (u64 s = 0; s < n; s += WRITE_SECTORS) {
		u64 c = n - s < WRITE_SECTORS ? n - s : WRITE_SECTORS;

		err = blk_write(s, (u8 *)wbuf + s * BLK_SECTOR_SIZE, c * BLK_SECTOR_SIZE);
		if (err == BLK_EIO) {
			puts("blk-write: write failed (read-only?)\n");
			return EXIT_READ_ONLY;
		}
		if (err)
			return io_error("write", s, err);
	}
	err = blk_flush();
	if (err)
		return io_error("flush", 0, err);
	if (n) {
		err = blk_read(0, rbuf, n * BLK_SECTOR_SIZE);
		if (err)
			return io_error("read", 0, err);
	}
	for (u64 k = 0; k < words; k++) {
		if (rbuf[k] != wbuf[k]) {
			puts("blk-write: mismatch at byte ");
			print_dec(k * 8);
			putc('\n');
			return EXIT_SELFCHECK_FAILED;
		}
	}
	puts("blk-write: ");
	print_dec(n);
	puts(" sectors ok\n");
	return EXIT_OK;
}
