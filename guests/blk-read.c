/*
 * blk-read.c - reads a whole virtio-blk disk and prints its checksum.
 *
 * Drives disk 0 (virtio-mmio at VIRTIO_MMIO_BASE) with runtime/virtio_blk.c,
 * reading capacity sectors in 64 KiB requests (the last one shorter).  The
 * checksum is FNV-1a 64 over every byte of the disk in order (the first
 * capacity * 512 bytes of the backing file):
 *     h = 0xcbf29ce484222325; for each byte b: h = (h ^ b) * 0x100000001b3 mod 2^64
 * Output:
 *     blk-read: reading the whole disk
 *     blk-read: <capacity, decimal> sectors, checksum 0x<h, lowercase hex, no leading zeros>
 * Exits 0x40; 0x4E (after "no virtio-blk device") without a disk, 0x4D on
 * any driver or I/O error.  Started at CPL 3 so the checksum runs natively.
 */
#include "runtime/runtime.h"
#include "runtime/virtio_blk.h"

#define EXIT_OK        0x40
#define EXIT_IO_ERROR  0x4D
#define EXIT_NO_DEVICE 0x4E

#define FNV64_OFFSET 0xcbf29ce484222325ULL
#define FNV64_PRIME  0x100000001b3ULL

#define CHUNK (64 * 1024)

static u8 buf[CHUNK] __attribute__((aligned(4096)));

static int io_error(const char *what, u64 sector, int err)
{
	return blk_fail("blk-read", what, sector, err);
}

int main(void)
{
	u64 cap, h = FNV64_OFFSET;
	int err;

	puts("blk-read: reading the whole disk\n");
	err = blk_start("blk-read");
	if (err)
		return err;

	cap = blk_capacity();
	for (u64 s = 0; s < cap;) {
		u64 n = cap - s < CHUNK / BLK_SECTOR_SIZE ? cap - s : CHUNK / BLK_SECTOR_SIZE;
		unsigned long nbytes = n * BLK_SECTOR_SIZE;

		err = blk_read(s, buf, nbytes);
		if (err)
			return io_error("read", s, err);
		for (unsigned long i = 0; i < nbytes; i++)
			h = (h ^ buf[i]) * FNV64_PRIME;
		s += n;
	}
	puts("blk-read: ");
	print_dec(cap);
	puts(" sectors, checksum ");
	print_hex(h);
	putc('\n');
	return EXIT_OK;
}
