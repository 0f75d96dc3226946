/*
 * virtqueue.c - the device side of a split virtqueue (virtio 1.2, 2.7) over hostile
 * guest RAM, and the guest-memory access every C virtio device goes through.
 * The specification is kvmpy/devices/virtio/queue.py: the same checks in the same
 * order, so the differential tests in tests/native/ see no difference.
 *
 * Nothing here knows about a device. A queue is its struct kvmpy_vq_state (the
 * registers the transport fills in, the ring indices) plus the guest's memory
 * table; errors come back as -EINVAL and a reason (*why) for the transport to
 * turn into DEVICE_NEEDS_RESET. The caller serialises calls on one queue.
 *
 * How a device uses it (virtio_blk.c does exactly this; a virtio-net or vsock
 * device would do the same once per queue, e.g. rx and tx):
 *
 *	QueueReady = 1:  kvmpy_vq_enable(q, mem, QUEUE_NUM_MAX, &why)
 *	QueueNotify:     before = q->used_count;
 *			 while ((r = kvmpy_vq_pop(q, mem, &chain, &why)) > 0) {
 *				 read the request:  kvmpy_vq_gather / kvmpy_vq_iov on chain.rd
 *				 write the answer:  kvmpy_vq_scatter, or kvmpy_vq_iov on chain.wr
 *						    then kvmpy_vq_mark_dirty
 *				 kvmpy_vq_push_used(q, mem, chain.head, bytes written);
 *			 }
 *			 if (r < 0) device error (why);
 *			 if (kvmpy_vq_should_notify(q, mem, before)) raise VIRTIO_MMIO_INT_VRING;
 *
 * A device never converts a guest address itself: the buffers of a popped chain
 * were checked against mem, and the helpers below turn them into host pointers.
 * A net rx queue that waits for packets simply leaves chains unpopped (or keeps
 * the popped chain) until it has data; nothing here allocates or blocks.
 */
#include <errno.h>
#include <string.h>

#include "virtio.h"

/* --- guest memory ------------------------------------------------------------------- */

uint8_t *kvmpy_mem_hva(const struct kvmpy_guest_mem *mem, uint64_t gpa, uint64_t len)
{
	uint32_t i;

	for (i = 0; i < mem->n && i < KVMPY_MAX_REGIONS; i++) {
		const struct kvmpy_mem_region *r = &mem->r[i];

		/* SAFETY: this is the check: gpa - r->gpa <= size and len <= size - that,
		 * so [gpa, gpa+len) lies inside [r->gpa, r->gpa + size) without overflow */
		if (gpa >= r->gpa && gpa - r->gpa <= r->size && len <= r->size - (gpa - r->gpa))
			return r->hva + (gpa - r->gpa);
	}
	return NULL;
}

int kvmpy_mem_read(const struct kvmpy_guest_mem *mem, uint64_t gpa, void *out, uint32_t len)
{
	/* SAFETY: kvmpy_mem_hva: NULL unless [gpa, gpa+len) lies inside one RAM region */
	const volatile uint8_t *p = kvmpy_mem_hva(mem, gpa, len);
	uint8_t *o = out;
	uint32_t i;

	if (!p)
		return -EFAULT;
	for (i = 0; i < len; i++)	/* volatile: the guest may rewrite it meanwhile */
		o[i] = p[i];
	return 0;
}

/* Record that the VMM wrote guest [gpa, gpa+len): atomically set the region's dirty
 * bits (dirty.c) so live migration resends those pages. Call it after the bytes are
 * written. Ranges outside RAM or regions without a bitmap are ignored. */
void kvmpy_mem_mark_dirty(const struct kvmpy_guest_mem *mem, uint64_t gpa, uint64_t len)
{
	uint32_t i;

	if (!len)
		return;
	for (i = 0; i < mem->n && i < KVMPY_MAX_REGIONS; i++) {
		const struct kvmpy_mem_region *r = &mem->r[i];

		if (gpa >= r->gpa && gpa - r->gpa <= r->size && len <= r->size - (gpa - r->gpa)) {
			uint64_t first = (gpa - r->gpa) / KVMPY_PAGE_SIZE;
			uint64_t last = (gpa - r->gpa + len - 1) / KVMPY_PAGE_SIZE;

			kvmpy_dirty_mark(r->dirty, first, last - first + 1);
			return;
		}
	}
}

static int read_u16(const struct kvmpy_guest_mem *mem, uint64_t gpa, uint16_t *v)
{
	uint8_t b[2];

	if (kvmpy_mem_read(mem, gpa, b, sizeof(b)))
		return -EFAULT;
	*v = (uint16_t)kvmpy_get_le(b, 2);
	return 0;
}

/* --- the split virtqueue (queue.py) --------------------------------------------------- */

const char *kvmpy_vq_check(const struct kvmpy_vq_state *q, const struct kvmpy_guest_mem *mem,
			   uint64_t num_max)
{
	uint64_t n = q->num;

	if (n < 1 || n > num_max || n > KVMPY_VQ_NUM_MAX)
		return "QueueNum is not in 1..QueueNumMax";
	if (n & (n - 1))
		return "queue size is not a power of two";
	if (q->desc % 16 || q->driver % 2 || q->device % 4)
		return "ring address is not aligned";
	if (!kvmpy_mem_hva(mem, q->desc, 16 * n) || !kvmpy_mem_hva(mem, q->driver, 6 + 2 * n) ||
	    !kvmpy_mem_hva(mem, q->device, 6 + 8 * n))
		return "ring is outside guest RAM";
	return NULL;
}

int kvmpy_vq_enable(struct kvmpy_vq_state *q, const struct kvmpy_guest_mem *mem,
		    uint64_t num_max, const char **why)
{
	*why = kvmpy_vq_check(q, mem, num_max);
	if (*why)
		return -EINVAL;
	q->ready = 1;
	q->last_avail_idx = q->used_idx = 0;
	q->used_count = 0;
	return 0;
}

/* A live queue's size: kvmpy_vq_check let no other through. It bounds the chain
 * arrays (a chain has at most num buffers) and the ring slot arithmetic (% num). */
static int live_size(const struct kvmpy_vq_state *q)
{
	return q->num >= 1 && q->num <= KVMPY_VQ_NUM_MAX;
}

/* One non-empty descriptor's buffer into c (queue.py _check_buffer and the order
 * rule of _walk): 0, or -EINVAL. */
static int add_buf(struct kvmpy_vq_chain *c, const struct kvmpy_guest_mem *mem, uint64_t addr,
		   uint32_t len, uint16_t flags, const char **why)
{
	struct kvmpy_vq_buf buf = { .gpa = addr, .len = len };

	if (addr > UINT64_MAX - len + 1)	/* addr + len > 2^64 (len >= 1) */
		return *why = "buffer overflows 64 bits", -EINVAL;
	if (!kvmpy_mem_hva(mem, addr, len))
		return *why = "buffer is outside guest RAM", -EINVAL;
	/* nrd + nwr < count <= num <= KVMPY_VQ_NUM_MAX: walk() and live_size() */
	if (flags & VIRTQ_DESC_F_WRITE)
		c->wr[c->nwr++] = buf;
	else if (c->nwr)
		return *why = "device-readable descriptor after a device-writable one", -EINVAL;
	else
		c->rd[c->nrd++] = buf;
	return 0;
}

/* Walk the chain at c->head into c (queue.py _walk): 0, or -EINVAL. */
static int walk(const struct kvmpy_vq_state *q, const struct kvmpy_guest_mem *mem,
		struct kvmpy_vq_chain *c, const char **why)
{
	uint32_t index = c->head, count = 0;
	uint64_t total = 0;

	c->nrd = c->nwr = 0;
	for (;;) {
		uint8_t d[16];		/* struct virtq_desc, read once */
		uint64_t addr;
		uint32_t len;
		uint16_t flags, next;

		if (index >= q->num)
			return *why = "descriptor index >= queue size", -EINVAL;
		if (++count > q->num)
			return *why = "descriptor chain longer than the queue size (a loop?)", -EINVAL;
		if (kvmpy_mem_read(mem, q->desc + 16ull * index, d, sizeof(d)))
			return *why = "descriptor outside guest RAM", -EINVAL;
		addr = kvmpy_get_le(d, 8);
		len = (uint32_t)kvmpy_get_le(d + 8, 4);
		flags = (uint16_t)kvmpy_get_le(d + 12, 2);
		next = (uint16_t)kvmpy_get_le(d + 14, 2);
		if (flags & VIRTQ_DESC_F_INDIRECT)
			return *why = "indirect descriptor (VIRTIO_F_INDIRECT_DESC not offered)", -EINVAL;
		if (len) {
			if (add_buf(c, mem, addr, len, flags, why))
				return -EINVAL;
			total += len;
			if (total > (1ull << 32))
				return *why = "descriptor chain longer than 2^32 bytes", -EINVAL;
		}
		if (!(flags & VIRTQ_DESC_F_NEXT))
			return 0;
		index = next;
	}
}

int kvmpy_vq_pop(struct kvmpy_vq_state *q, const struct kvmpy_guest_mem *mem,
		 struct kvmpy_vq_chain *c, const char **why)
{
	uint16_t idx, pending;

	if (!live_size(q))
		return *why = "queue is not live", -EINVAL;
	if (read_u16(mem, q->driver + 2, &idx))
		return *why = "available ring outside guest RAM", -EINVAL;
	pending = (uint16_t)(idx - q->last_avail_idx);
	if (pending == 0)
		return 0;
	if (pending > q->num)
		return *why = "available idx too far ahead", -EINVAL;
	/* the ring entry and the descriptors after idx, in the order the driver wrote them */
	__atomic_thread_fence(__ATOMIC_ACQUIRE);
	if (read_u16(mem, q->driver + 4 + 2ull * (q->last_avail_idx % q->num), &c->head))
		return *why = "available ring outside guest RAM", -EINVAL;
	if (walk(q, mem, c, why))
		return -EINVAL;
	q->last_avail_idx++;
	return 1;
}

void kvmpy_vq_push_used(struct kvmpy_vq_state *q, const struct kvmpy_guest_mem *mem,
			uint16_t head, uint32_t written)
{
	uint64_t slot, idx_gpa = q->device + 2;
	uint8_t *elem, *idx;

	if (!live_size(q))
		return;
	slot = q->device + 4 + 8ull * (q->used_idx % q->num);
	/* SAFETY: kvmpy_mem_hva checks each range lies inside one RAM region (and
	 * kvmpy_vq_check found the whole used ring there when q went live) */
	elem = kvmpy_mem_hva(mem, slot, 8);
	idx = kvmpy_mem_hva(mem, idx_gpa, 2);
	if (!elem || !idx)
		return;
	kvmpy_put_le(elem, head, 4);
	kvmpy_put_le(elem + 4, written, 4);
	kvmpy_mem_mark_dirty(mem, slot, 8);		/* dirty: the used element */
	__atomic_thread_fence(__ATOMIC_RELEASE);	/* element before idx, as the driver reads them */
	q->used_idx++;
	kvmpy_put_le(idx, q->used_idx, 2);
	kvmpy_mem_mark_dirty(mem, idx_gpa, 2);		/* dirty: used.idx */
	q->used_count++;
}

int kvmpy_vq_should_notify(const struct kvmpy_vq_state *q, const struct kvmpy_guest_mem *mem,
			   uint64_t used_before)
{
	uint16_t flags;

	if (q->used_count == used_before)
		return 0;
	/* used.idx stored before avail.flags is loaded (2.7.7; kvmtool: should_signal) */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	/* flags unreadable cannot happen (checked at enable): then notify */
	return !(read_u16(mem, q->driver, &flags) == 0 && (flags & VIRTQ_AVAIL_F_NO_INTERRUPT));
}

/* --- the buffers of a popped chain ----------------------------------------------------
 * b[0..n) must be buffers of a chain kvmpy_vq_pop returned for the same mem (whose
 * regions do not change while the device lives): each lies inside one RAM region,
 * so every slice of one does too, and kvmpy_mem_hva should not return NULL for it.
 * Each use still checks for NULL and fails (-EFAULT, or no iov) rather than trust a
 * caller to have kept that promise. */

uint64_t kvmpy_vq_bufs_len(const struct kvmpy_vq_buf *b, uint32_t n)
{
	uint64_t t = 0;
	uint32_t i;

	for (i = 0; i < n; i++)
		t += b[i].len;
	return t;
}

/* What is left of buffer b after skipping *skip bytes, at most len: its length
 * (0 = nothing, *skip reduced) and in *gpa its start. */
static uint64_t slice(const struct kvmpy_vq_buf *b, uint64_t *skip, uint64_t len, uint64_t *gpa)
{
	uint64_t n;

	if (*skip >= b->len) {
		*skip -= b->len;
		return 0;
	}
	*gpa = b->gpa + *skip;
	n = b->len - *skip;
	*skip = 0;
	return n < len ? n : len;
}

int kvmpy_vq_gather(const struct kvmpy_guest_mem *mem, const struct kvmpy_vq_buf *b,
		    uint32_t n, uint8_t *out, uint64_t len)
{
	uint64_t skip = 0, gpa = 0, k;
	uint32_t i;

	for (i = 0; i < n && len; i++) {
		k = slice(&b[i], &skip, len, &gpa);	/* k <= b[i].len, a uint32_t */
		if (!k)
			continue;
		/* kvmpy_mem_read: NULL-checked (kvmpy_mem_hva) and each byte loaded once
		 * (volatile), so what the caller parses from out is what it checks */
		if (kvmpy_mem_read(mem, gpa, out, (uint32_t)k)) {
			memset(out, 0, len);
			return -EFAULT;
		}
		out += k;
		len -= k;
	}
	return 0;
}

int kvmpy_vq_scatter(const struct kvmpy_guest_mem *mem, const struct kvmpy_vq_buf *b,
		     uint32_t n, const uint8_t *in, uint64_t len)
{
	uint64_t skip = 0, gpa = 0, k;
	uint32_t i;
	uint8_t *p;

	for (i = 0; i < n && len; i++) {
		k = slice(&b[i], &skip, len, &gpa);
		if (!k)
			continue;
		/* SAFETY: kvmpy_mem_hva: NULL unless [gpa, gpa+k) lies inside one region of
		 * mem (it does: a slice of b[i], which walk() checked the same way) */
		p = kvmpy_mem_hva(mem, gpa, k);
		if (!p)
			return -EFAULT;
		memcpy(p, in, k);
		kvmpy_mem_mark_dirty(mem, gpa, k);	/* dirty: the bytes just copied in */
		in += k;
		len -= k;
	}
	return 0;
}

uint32_t kvmpy_vq_iov(const struct kvmpy_guest_mem *mem, const struct kvmpy_vq_buf *b,
		      uint32_t n, uint64_t skip, uint64_t len, struct iovec *iov)
{
	uint64_t gpa = 0, k;
	uint32_t i, niov = 0;
	uint8_t *p;

	for (i = 0; i < n && len; i++) {
		k = slice(&b[i], &skip, len, &gpa);
		if (!k)
			continue;
		/* SAFETY: kvmpy_mem_hva: NULL unless [gpa, gpa+k) lies inside one region of
		 * mem (it does: a slice of b[i], which walk() checked the same way) */
		p = kvmpy_mem_hva(mem, gpa, k);
		if (!p)
			return 0;
		iov[niov].iov_base = p;
		iov[niov++].iov_len = k;
		len -= k;
	}
	return niov;
}

void kvmpy_vq_mark_dirty(const struct kvmpy_guest_mem *mem, const struct kvmpy_vq_buf *b,
			 uint32_t n, uint64_t skip, uint64_t len)
{
	uint64_t gpa = 0, k;
	uint32_t i;

	for (i = 0; i < n && len; i++) {
		k = slice(&b[i], &skip, len, &gpa);
		kvmpy_mem_mark_dirty(mem, gpa, k);	/* k == 0: nothing */
		len -= k;
	}
}
