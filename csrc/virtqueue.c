/*
 * virtqueue.c - the device side of a split virtqueue (virtio 1.2, 2.7) over hostile
 * guest RAM, plus guest-memory access and the interrupt line of a virtio-mmio device.
 * The specification is kvmpy/devices/virtio/queue.py: same checks, same order.
 */
#include "virtio.h"

/* The host pointer for guest [gpa, gpa+len), or NULL unless it lies inside one RAM
 * region (overflow-safe). Every guest access in virtqueue.c and virtio_blk.c goes
 * through this check before a guest address becomes a host pointer. */
uint8_t *kvmpy_vio_hva(const struct kvmpy_blk *b, uint64_t gpa, uint64_t len)
{
	uint32_t i;

	for (i = 0; i < b->mem.n && i < KVMPY_MAX_REGIONS; i++) {
		const struct kvmpy_mem_region *r = &b->mem.r[i];

		if (gpa >= r->gpa && gpa - r->gpa <= r->size && len <= r->size - (gpa - r->gpa))
			return r->hva + (gpa - r->gpa);
	}
	return NULL;
}

/* Record that the VMM wrote guest [gpa, gpa+len): atomically set the region's
 * dirty bits (dirty.c) so live migration resends those pages. Call it after the
 * bytes are written. Ranges outside RAM or regions without a bitmap are ignored. */
void kvmpy_vio_mark_dirty(const struct kvmpy_blk *b, uint64_t gpa, uint64_t len)
{
	uint32_t i;

	if (!len)
		return;
	for (i = 0; i < b->mem.n && i < KVMPY_MAX_REGIONS; i++) {
		const struct kvmpy_mem_region *r = &b->mem.r[i];

		if (gpa >= r->gpa && gpa - r->gpa <= r->size && len <= r->size - (gpa - r->gpa)) {
			uint64_t first = (gpa - r->gpa) / KVMPY_PAGE_SIZE;
			uint64_t last = (gpa - r->gpa + len - 1) / KVMPY_PAGE_SIZE;

			kvmpy_dirty_mark(r->dirty, first, last - first + 1);
			return;
		}
	}
}

int kvmpy_vio_rd16(const struct kvmpy_blk *b, uint64_t gpa, uint16_t *v)
{
	uint8_t *p = kvmpy_vio_hva(b, gpa, 2);

	if (!p)
		return -1;
	*v = (uint16_t)(p[0] | p[1] << 8);
	return 0;
}

/* --- interrupts and errors (mmio.py: _update_irq, _device_error) --------------- */

void kvmpy_vio_update_irq(struct kvmpy_blk *b)
{
	uint32_t level = b->s.interrupt_status != 0;

	if (level == b->s.level)
		return;
	b->s.level = level;
	b->s.irq_changes++;
	if (b->gsi >= 0) {
		struct kvm_irq_level irq = { .irq = (uint32_t)b->gsi, .level = level };

		ioctl(b->vm_fd, KVM_IRQ_LINE, &irq);
	}
}

void kvmpy_vio_device_error(struct kvmpy_blk *b, const char *reason)
{
	if (b->s.status & VIRTIO_CONFIG_S_NEEDS_RESET)
		return;
	snprintf(b->s.last_error, sizeof(b->s.last_error), "%s", reason);
	b->s.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
	if (b->s.status & VIRTIO_CONFIG_S_DRIVER_OK)
		b->s.interrupt_status |= VIRTIO_MMIO_INT_CONFIG;
	kvmpy_vio_update_irq(b);
}

/* --- the split virtqueue (queue.py) -------------------------------------------- */

/* The QueueReady checks (mmio.py _enable, VirtQueue.__init__) of q: NULL if it may
 * go live, else why not. Shared by enable and kvmpy_blk_set_state. */
const char *kvmpy_vq_check(const struct kvmpy_blk *b, const struct kvmpy_vq_state *q)
{
	uint64_t n = q->num;

	if (n < 1 || n > KVMPY_BLK_QUEUE_NUM_MAX)
		return "QueueNum is not in 1..QueueNumMax";
	if (n & (n - 1))
		return "queue size is not a power of two";
	if (q->desc % 16 || q->driver % 2 || q->device % 4)
		return "ring address is not aligned";
	if (!kvmpy_vio_hva(b, q->desc, 16 * n) || !kvmpy_vio_hva(b, q->driver, 6 + 2 * n) || !kvmpy_vio_hva(b, q->device, 6 + 8 * n))
		return "ring is outside guest RAM";
	return NULL;
}

int kvmpy_vq_enable(struct kvmpy_blk *b)
{
	struct kvmpy_vq_state *q = &b->s.q;
	const char *why = kvmpy_vq_check(b, q);

	if (why) {
		kvmpy_vio_device_error(b, why);
		return -1;
	}
	q->ready = 1;
	q->last_avail_idx = q->used_idx = 0;
	q->used_count = 0;
	return 0;
}

/* Walk the chain at head into b->rd/b->wr: 1 = a chain, 0 = none, -1 = driver error. */
static int walk(struct kvmpy_blk *b, uint16_t head, const char **why)
{
	const struct kvmpy_vq_state *q = &b->s.q;
	uint32_t index = head, count = 0;
	uint64_t total = 0;

	b->nrd = b->nwr = 0;
	for (;;) {
		uint8_t *d;
		uint64_t addr;
		uint32_t len;
		uint16_t flags, next;

		if (index >= q->num)
			return *why = "descriptor index >= queue size", -1;
		if (++count > q->num)
			return *why = "descriptor chain longer than the queue size (a loop?)", -1;
		d = kvmpy_vio_hva(b, q->desc + 16ull * index, 16);	/* table checked at enable: non-NULL */
		if (!d)
			return *why = "descriptor outside guest RAM", -1;
		addr = kvmpy_get_le(d, 8);
		len = (uint32_t)kvmpy_get_le(d + 8, 4);
		flags = (uint16_t)kvmpy_get_le(d + 12, 2);
		next = (uint16_t)kvmpy_get_le(d + 14, 2);
		if (flags & VIRTQ_DESC_F_INDIRECT)
			return *why = "indirect descriptor (VIRTIO_F_INDIRECT_DESC not offered)", -1;
		if (len) {
			if (addr > UINT64_MAX - len + 1)	/* addr + len > 2^64 (len >= 1) */
				return *why = "buffer overflows 64 bits", -1;
			if (!kvmpy_vio_hva(b, addr, len))
				return *why = "buffer is outside guest RAM", -1;
			if (flags & VIRTQ_DESC_F_WRITE) {
				b->wr[b->nwr].gpa = addr;
				b->wr[b->nwr++].len = len;
			} else if (b->nwr) {
				return *why = "device-readable descriptor after a device-writable one", -1;
			} else {
				b->rd[b->nrd].gpa = addr;
				b->rd[b->nrd++].len = len;
			}
			total += len;
			if (total > (1ull << 32))
				return *why = "descriptor chain longer than 2^32 bytes", -1;
		}
		if (!(flags & VIRTQ_DESC_F_NEXT))
			return 1;
		index = next;
	}
}

/* queue.py VirtQueue.pop: 1 = chain in rd/wr with *head set, 0 = none, -1 = error */
int kvmpy_vq_pop(struct kvmpy_blk *b, uint16_t *head, const char **why)
{
	struct kvmpy_vq_state *q = &b->s.q;
	uint16_t idx, pending;
	int r;

	if (kvmpy_vio_rd16(b, q->driver + 2, &idx))
		return *why = "available ring outside guest RAM", -1;
	pending = (uint16_t)(idx - q->last_avail_idx);
	if (pending == 0)
		return 0;
	if (pending > q->num)
		return *why = "available idx too far ahead", -1;
	if (kvmpy_vio_rd16(b, q->driver + 4 + 2ull * (q->last_avail_idx % q->num), head))
		return *why = "available ring outside guest RAM", -1;
	r = walk(b, *head, why);
	if (r < 0)
		return r;
	q->last_avail_idx++;
	return 1;
}

void kvmpy_vq_push_used(struct kvmpy_blk *b, uint16_t head, uint32_t written)
{
	struct kvmpy_vq_state *q = &b->s.q;
	/* used ring bounds checked at enable; slot index < num */
	uint8_t *elem = kvmpy_vio_hva(b, q->device + 4 + 8ull * (q->used_idx % q->num), 8);
	uint8_t *idx = kvmpy_vio_hva(b, q->device + 2, 2);

	if (!elem || !idx)
		return;
	kvmpy_put_le(elem, head, 4);
	kvmpy_put_le(elem + 4, written, 4);
	/* dirty: the used element we just wrote */
	kvmpy_vio_mark_dirty(b, q->device + 4 + 8ull * (q->used_idx % q->num), 8);
	__atomic_thread_fence(__ATOMIC_RELEASE);	/* element before idx, as the driver reads them */
	q->used_idx++;
	kvmpy_put_le(idx, q->used_idx, 2);
	/* dirty: used.idx */
	kvmpy_vio_mark_dirty(b, q->device + 2, 2);
	q->used_count++;
}
