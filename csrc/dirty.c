/*
 * dirty.c - the VMM's own dirty-page bitmaps for guest RAM (see kvmpy/kvm/memory.py).
 *
 * KVM's dirty log sees only writes made by guest CPUs. Writes the VMM makes
 * through its host mapping (the virtio used ring, preadv into guest buffers,
 * status bytes, Python's GuestMemory.write) are recorded here instead: one bit
 * per 4 KiB page, page p is bit p % 64 of the u64 word p / 64. Markers (C device
 * threads, Python) OR bits in atomically and the migration side takes words with
 * an atomic exchange, so no marker's bit is ever lost between a take and the next.
 * A marker marks AFTER it wrote the page, so a take that misses the mark happens
 * before the data is final and the page shows up in the next take.
 */
#include "kvmpy_native.h"

void kvmpy_dirty_mark(uint64_t *bitmap, uint64_t first_page, uint64_t npages)
{
	uint64_t w, last_word, last = first_page + npages - 1;

	if (!bitmap || !npages || last < first_page)
		return;
	last_word = last / 64;
	for (w = first_page / 64; w <= last_word; w++) {
		uint64_t lo = w == first_page / 64 ? first_page % 64 : 0;
		uint64_t hi = w == last_word ? last % 64 : 63;
		uint64_t mask = (hi == 63 ? ~0ull : (1ull << (hi + 1)) - 1) & ~((1ull << lo) - 1);

		__atomic_fetch_or(&bitmap[w], mask, __ATOMIC_RELEASE);
	}
}

void kvmpy_dirty_take(uint64_t *bitmap, uint64_t *out, uint64_t words)
{
	uint64_t i;

	for (i = 0; i < words; i++) {
		/* a bit set after the relaxed load stays in the bitmap for the next take */
		if (__atomic_load_n(&bitmap[i], __ATOMIC_RELAXED))
			out[i] = __atomic_exchange_n(&bitmap[i], 0, __ATOMIC_ACQ_REL);
		else
			out[i] = 0;
	}
}

int kvmpy_all_zero(const uint8_t *p, uint64_t len)
{
	const uint64_t *w = (const uint64_t *)p;
	uint64_t i, acc = 0;

	/* callers pass whole pages of guest RAM: 8-byte aligned, a multiple of 8 long */
	for (i = 0; i < len / 8; i++) {
		acc |= w[i];
		if ((i & 511) == 511 && acc)
			return 0;
	}
	return acc == 0;
}
