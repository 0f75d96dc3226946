/*
 * counter.c - a deterministic workload for snapshot, restore and live-migration tests.
 *
 * It prints, writes disk 0, flushes and dirties memory all the time, and nothing
 * it does depends on timing, the TSC, interrupts or the host: run it once
 * straight through and once snapshotted/migrated/continued elsewhere, and the
 * serial output and disk contents must be byte-identical.  Long mode; runs at
 * CPL 0 or CPL 3 alike (same output, same disk; the virtio driver's MMIO works
 * from both).  The bundled demo entry (kvmpy/images/guests.py) starts it at CPL 0
 * (user=False): on the development host, whose CPL-0 code is emulated
 * (docs/host-notes.md), a default run takes about 1.9 s (C or Python run
 * loop; `kvmpy demo counter --disk FILE` ~2.1 s wall); at CPL 3 (user=True,
 * `--user`) about 0.35 s, the time then going to VM exits.
 *
 * PARAMETERS: the fw_cfg command line (FW_CFG_CMDLINE_DATA; Machine.load(...,
 * cmdline="n=200 pages=256"), `kvmpy run/demo --cmdline`): space-separated
 * words `n=<decimal>` (iterations, 0..1000000000, default 200) and
 * `pages=<decimal>` (4 KiB pages in the array, 1..(RAM - 2 MiB) / 4 KiB, default
 * 256 = 1 MiB).  Any other word, or a bad number, prints
 * `counter: bad cmdline: <word>` (or `counter: pages must be 1..<max>`) and
 * exits 0x42.  No fw_cfg device: the defaults, no RAM bound.
 *
 * MEMORY: the array A is W = pages * 512 little-endian u64 words at the fixed
 * guest-physical (= virtual) address 0x200000 (ARRAY_BASE; just above the image,
 * outside .bss: nothing clears it, and the host's identity map covers it).
 * Before iteration 1 the guest sets A[k] = k for every k < W.
 *
 * ITERATION i = 1..n, with the running checksum c (starting at
 * 0xcbf29ce484222325 and carried over from one iteration to the next), all
 * arithmetic mod 2^64:
 *     S = ceil(pages / 8)                       pages per slice
 *     start = ((i - 1) * S) mod pages           first page of this slice
 *     for j = 0..S-1: p = (start + j) mod pages
 *         for b = 0..7: k = p*512 + b*64 + (i mod 64)   (one word per 512 bytes)
 *             x = ((A[k] xor c) * 0x9e3779b97f4a7c15) + i
 *             A[k] = x
 *             c = (c xor x) * 0x100000001b3
 * so every page of the array is written every 8 iterations (S pages per
 * iteration), and each iteration's checksum depends on what the earlier ones
 * left in memory.  Then:
 *   - print `count <i> 0x<c>`  (decimal; lowercase hex, no leading zeros)
 *   - with a disk of capacity C > 0 sectors: write one 512-byte sector,
 *     number s = i mod min(64, C), whose 64 little-endian u64 words are
 *         word 0 = i,  word 1 = c,  word j (2..63) = c + j * 0x9e3779b97f4a7c15
 *     and, if i mod 8 == 0, flush.
 * After the last iteration, with a disk (C > 0) and n mod 8 != 0, one more
 * flush; so the disk ends with sector s holding the pattern of the largest
 * i <= n with i mod min(64, C) == s, and no other sector touched.
 *
 * OUTPUT (each line ends in \n):
 *     counter: n=<n> pages=<pages>
 *     counter: disk <C> sectors          or, without a virtio-blk device,   counter: no disk
 *     count 1 0x<c_1>
 *     ...
 *     count <n> 0x<c_n>
 *     counter: done 0x<F>
 * where F = sum over k < W of (k + 1) * A[k] mod 2^64 (the whole array at the
 * end).  Without a disk the lines are the same except the second one.
 *
 * EXIT (isa-debug-exit, status (v << 1) | 1, RAX = v): v = 0x43 ('C') after the
 * done line, with or without a disk.  0x42 bad command line; 0x4D a driver or I/O
 * error (`counter: <op> error at sector <s>: <reason>`, e.g. a write to a
 * read-only disk); 0x41 the image overlaps the array (a build problem).
 */
#include "runtime/runtime.h"
#include "runtime/virtio_blk.h"

#define EXIT_OK       0x43
#define EXIT_BAD_ARGS 0x42
#define EXIT_LAYOUT   0x41

#define ARRAY_BASE    0x200000UL
#define PAGE_WORDS    512
#define SLICES        8                      /* the array is rewritten every 8 iterations */
#define BLOCK_WORDS   64                     /* one word per 512-byte block of a page */
#define DISK_SECTORS  64                     /* sectors used: i mod min(64, capacity) */
#define FLUSH_EVERY   8

#define DEFAULT_N     200
#define DEFAULT_PAGES 256
#define MAX_N         1000000000ULL

#define GOLDEN        0x9e3779b97f4a7c15ULL
#define FNV_OFFSET    0xcbf29ce484222325ULL
#define FNV_PRIME     0x100000001b3ULL

#define FW_CFG_PORT_SEL     0x510
#define FW_CFG_PORT_DATA    0x511
#define FW_CFG_SIGNATURE    0x00
#define FW_CFG_RAM_SIZE     0x03
#define FW_CFG_CMDLINE_SIZE 0x14
#define FW_CFG_CMDLINE_DATA 0x15
#define CMDLINE_MAX         4096

extern char __stack_top[];                  /* end of the image (link64.ld) */

static u64 sector[BLK_SECTOR_SIZE / 8] __attribute__((aligned(BLK_SECTOR_SIZE)));
static char cmdline[CMDLINE_MAX + 1];

static int is_space(char ch)
{
	return ch == ' ' || ch == '\t' || ch == '\n';
}

static inline void outw(u16 port, u16 v)
{
	__asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port));
}

/* Selects fw_cfg item `key`; returns its first n (<= 8) bytes as a little-endian number. */
static u64 fw_le(u16 key, int n)
{
	u64 v = 0;

	outw(FW_CFG_PORT_SEL, key);
	for (int i = 0; i < n; i++)
		v |= (u64)inb(FW_CFG_PORT_DATA) << (8 * i);
	return v;
}

/* Reads the fw_cfg command line into cmdline[]; returns the RAM size, or 0 without fw_cfg. */
static u64 read_fw_cfg(void)
{
	u64 size, ram;

	if (fw_le(FW_CFG_SIGNATURE, 4) != 0x554d4551) /* "QEMU" */
		return 0;
	ram = fw_le(FW_CFG_RAM_SIZE, 8);
	size = fw_le(FW_CFG_CMDLINE_SIZE, 4);
	if (size > CMDLINE_MAX)
		size = CMDLINE_MAX;
	outw(FW_CFG_PORT_SEL, FW_CFG_CMDLINE_DATA);
	for (u64 i = 0; i < size; i++)
		cmdline[i] = inb(FW_CFG_PORT_DATA);
	cmdline[size] = 0;
	return ram;
}

/* `key=<decimal>` at w (a word ending at white space or NUL): 1 and *v set, else 0. */
static int param(const char *w, const char *key, u64 *v)
{
	u64 x = 0;
	int digits = 0;

	while (*key && *w == *key)
		w++, key++;
	if (*key || *w++ != '=')
		return 0;
	for (; *w && !is_space(*w); w++, digits++) {
		if (*w < '0' || *w > '9' || digits == 10)
			return 0;
		x = x * 10 + (u64)(*w - '0');
	}
	if (!digits)
		return 0;
	*v = x;
	return 1;
}

static int bad_word(const char *w)
{
	puts("counter: bad cmdline: ");
	while (*w && !is_space(*w))
		putc(*w++);
	putc('\n');
	return EXIT_BAD_ARGS;
}

/* Parses cmdline[] into *n and *pages (left at their defaults when absent). */
static int parse(u64 *n, u64 *pages)
{
	const char *w = cmdline;

	for (;;) {
		while (is_space(*w))
			w++;
		if (!*w)
			return 0;
		if (!(param(w, "n", n) && *n <= MAX_N) && !param(w, "pages", pages))
			return bad_word(w);
		while (*w && !is_space(*w))
			w++;
	}
}

int main(void)
{
	u64 *a = (u64 *)ARRAY_BASE;
	u64 n = DEFAULT_N, pages = DEFAULT_PAGES, max_pages, ram, words, slice, c = FNV_OFFSET;
	u64 capacity = 0, span = 0;
	int disk, err;

	if ((unsigned long)__stack_top > ARRAY_BASE) {
		puts("counter: the image overlaps the array at 0x200000\n");
		return EXIT_LAYOUT;
	}
	ram = read_fw_cfg();
	err = parse(&n, &pages);
	if (err)
		return err;
	max_pages = ram > ARRAY_BASE ? (ram - ARRAY_BASE) / 4096 : ram ? 0 : ~0ULL;
	if (pages < 1 || pages > max_pages) {
		puts("counter: pages must be 1..");
		print_dec(max_pages);
		putc('\n');
		return EXIT_BAD_ARGS;
	}
	puts("counter: n=");
	print_dec(n);
	puts(" pages=");
	print_dec(pages);
	putc('\n');

	err = blk_init(VIRTIO_MMIO_BASE);
	disk = err == 0;
	if (err == BLK_ENODEV) {
		puts("counter: no disk\n");
	} else if (err) {
		return blk_fail("counter", "init", 0, err);
	} else {
		capacity = blk_capacity();
		span = capacity < DISK_SECTORS ? capacity : DISK_SECTORS;
		puts("counter: disk ");
		print_dec(capacity);
		puts(" sectors\n");
	}

	words = pages * PAGE_WORDS;
	for (u64 k = 0; k < words; k++)
		a[k] = k;
	slice = (pages + SLICES - 1) / SLICES;

	for (u64 i = 1; i <= n; i++) {
		u64 p = ((i - 1) * slice) % pages;

		for (u64 j = 0; j < slice; j++) {
			u64 *w = a + p * PAGE_WORDS + i % BLOCK_WORDS;

			for (int b = 0; b < PAGE_WORDS / BLOCK_WORDS; b++, w += BLOCK_WORDS) {
				u64 x = ((*w ^ c) * GOLDEN) + i;

				*w = x;
				c = (c ^ x) * FNV_PRIME;
			}
			if (++p == pages)
				p = 0;
		}
		puts("count ");
		print_dec(i);
		putc(' ');
		print_hex(c);
		putc('\n');
		if (disk && span) {
			u64 s = i % span;

			sector[0] = i;
			sector[1] = c;
			for (u64 j = 2; j < BLK_SECTOR_SIZE / 8; j++)
				sector[j] = c + j * GOLDEN;
			err = blk_write(s, sector, BLK_SECTOR_SIZE);
			if (err)
				return blk_fail("counter", "write", s, err);
			if (i % FLUSH_EVERY == 0 && (err = blk_flush()))
				return blk_fail("counter", "flush", s, err);
		}
	}
	if (disk && span && n % FLUSH_EVERY && (err = blk_flush()))
		return blk_fail("counter", "flush", 0, err);

	c = 0;
	for (u64 k = 0; k < words; k++)
		c += (k + 1) * a[k];
	puts("counter: done ");
	print_hex(c);
	putc('\n');
	return EXIT_OK;
}
