/*
 * blk-bench.c - virtio-blk throughput phases, timed by the host.
 *
 * Needs a writable disk 0 and OVERWRITES the first min(16 MiB, disk) of it.
 * Each phase moves `amount` = min(16 MiB, capacity * 512) bytes (rounded
 * down to a whole number of requests), one request in flight at a time:
 *
 *   phase  1  sequential read,   4 KiB requests    phase  2  sequential write,   4 KiB
 *   phase  3  sequential read,  16 KiB requests    phase  4  sequential write,  16 KiB
 *   phase  5  sequential read,  64 KiB requests    phase  6  sequential write,  64 KiB
 *   phase  7  sequential read, 256 KiB requests    phase  8  sequential write, 256 KiB
 *   phase  9  sequential read,   1 MiB requests    phase 10  sequential write,   1 MiB
 *   phase 11  random 4 KiB reads: amount / 4096 of them, 4 KiB-aligned, at
 *             sector 8 * ((x >> 33) % (capacity / 8)) with
 *             x = x * 6364136223846793005 + 1442695040888963407, x0 = 1
 *             (x advanced before each read)
 *
 * Sequential phases start at sector 0.  A write phase ends with a flush (if
 * the device offers VIRTIO_BLK_F_FLUSH), inside the phase.  Just before a
 * phase the guest writes the 32-bit value P (its number) to the benchmark
 * marker port 0x5e0 (`outl`); just after it, P | 0x80000000.  The host
 * timestamps each write.  Output, after the fixed first line:
 *     blk-bench: <capacity> sectors, id <id string | "?" if unsupported or empty>
 *     blk-bench: phase <P> <seq-read|seq-write|rand-read> <size>K: <bytes> bytes
 *     ... (one line per phase, printed after its end marker)
 *     blk-bench: done
 * Exits 0x48; 0x45 if a write fails with IOERR (read-only disk), 0x4D on
 * another error, 0x4E without a disk.
 */
#include "runtime/runtime.h"
#include "runtime/virtio_blk.h"

#define EXIT_OK        0x48
#define EXIT_READ_ONLY 0x45
#define EXIT_IO_ERROR  0x4D
#define EXIT_NO_DEVICE 0x4E

#define BENCH_MARK_PORT 0x5e0       /* kvmpy/x86/layout.py */
#define BENCH_PHASE_END 0x80000000u /* or-ed into the phase number after a phase */
#define AMOUNT          (16UL << 20)
#define MAX_REQUEST     (1UL << 20)
#define RAND_SIZE       4096UL

static u8 rbuf[MAX_REQUEST] __attribute__((aligned(4096)));
static u8 wbuf[MAX_REQUEST] __attribute__((aligned(4096)));

static const unsigned long sizes[] = {4096, 16384, 65536, 262144, 1048576};

static inline void outl(u16 port, u32 v)
{
	__asm__ volatile("outl %0, %w1" : : "a"(v), "Nd"(port));
}

static int fail(const char *what, u64 sector, int err)
{
	if (err == BLK_EIO && what[0] == 'w') {
		puts("blk-bench: write failed (read-only?)\n");
		return EXIT_READ_ONLY;
	}
	return blk_fail("blk-bench", what, sector, err);
}

static void report(u32 phase, const char *kind, unsigned long size, u64 bytes)
{
	puts("blk-bench: phase ");
	print_dec(phase);
	putc(' ');
	puts(kind);
	putc(' ');
	print_dec(size / 1024);
	puts("K: ");
	print_dec(bytes);
	puts(" bytes\n");
}

/* One sequential phase: `amount` bytes from sector 0 in `size`-byte requests. */
static int sequential(u32 phase, int write, unsigned long size, u64 amount)
{
	u64 sectors = size / BLK_SECTOR_SIZE, moved = 0;
	int err = 0;

	outl(BENCH_MARK_PORT, phase);
	for (u64 s = 0; moved + size <= amount; s += sectors, moved += size) {
		err = write ? blk_write(s, wbuf, size) : blk_read(s, rbuf, size);
		if (err) {
			outl(BENCH_MARK_PORT, phase | BENCH_PHASE_END);
			return fail(write ? "write" : "read", s, err);
		}
	}
	if (write)
		err = blk_flush();
	outl(BENCH_MARK_PORT, phase | BENCH_PHASE_END);
	if (err)
		return fail("flush", 0, err);
	report(phase, write ? "seq-write" : "seq-read", size, moved);
	return 0;
}

static int random_reads(u32 phase, u64 cap, u64 amount)
{
	u64 blocks = cap / (RAND_SIZE / BLK_SECTOR_SIZE), x = 1, moved = 0;
	u64 count = blocks ? amount / RAND_SIZE : 0;

	outl(BENCH_MARK_PORT, phase);
	for (u64 i = 0; i < count; i++, moved += RAND_SIZE) {
		u64 s;
		int err;

		x = x * 6364136223846793005ULL + 1442695040888963407ULL;
		s = (x >> 33) % blocks * (RAND_SIZE / BLK_SECTOR_SIZE);
		err = blk_read(s, rbuf, RAND_SIZE);
		if (err) {
			outl(BENCH_MARK_PORT, phase | BENCH_PHASE_END);
			return fail("read", s, err);
		}
	}
	outl(BENCH_MARK_PORT, phase | BENCH_PHASE_END);
	report(phase, "rand-read", RAND_SIZE, moved);
	return 0;
}

int main(void)
{
	char id[BLK_ID_BYTES + 1];
	u64 cap, disk_bytes, amount;
	u32 phase = 1;
	int err;

	puts("blk-bench: sequential and random I/O, phases marked on port 0x5e0\n");
	err = blk_start("blk-bench");
	if (err)
		return err;
	cap = blk_capacity();
	disk_bytes = cap * BLK_SECTOR_SIZE;
	amount = disk_bytes < AMOUNT ? disk_bytes : AMOUNT;

	for (int i = 0; i <= BLK_ID_BYTES; i++)
		id[i] = 0;
	err = blk_get_id(id);
	puts("blk-bench: ");
	print_dec(cap);
	puts(" sectors, id ");
	puts(err || !id[0] ? "?" : id); /* unsupported, or no ID set */
	putc('\n');

	for (unsigned long i = 0; i < MAX_REQUEST; i++)
		wbuf[i] = (u8)(i * 7 + (i >> 12));

	for (unsigned i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		err = sequential(phase++, 0, sizes[i], amount);
		if (!err)
			err = sequential(phase++, 1, sizes[i], amount);
		if (err)
			return err;
	}
	err = random_reads(phase, cap, amount);
	if (err)
		return err;
	puts("blk-bench: done\n");
	return EXIT_OK;
}
