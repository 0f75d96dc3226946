/*
 * virtio_blk.c - virtio-blk in C: the block requests, and the virtio-mmio (version 2)
 * transport registers around them. A transport that lives in Python (virtio-pci) uses
 * the requests alone through kvmpy_blk_serve (the end of the file). The split virtqueue
 * and every guest-memory check are the generic ones of virtqueue.c; this file never
 * turns a guest address into a host pointer except through them.
 *
 * The specification is the Python reference in kvmpy/devices/virtio/ (mmio.py,
 * queue.py, blk.py) and docs/virtio.md; this file follows it check for check, in
 * the same order, so that the differential tests in tests/native/ can demand
 * identical observable behaviour: register values, guest memory, file contents,
 * interrupt levels. Read those first; comments here only mark where a guest
 * address becomes a host pointer and which check makes that safe.
 *
 * Everything is preallocated in kvmpy_blk_new(): serving a request allocates
 * nothing. Two mutexes, always taken in this order:
 *   io_lock - the data path: one QueueNotify at a time owns chain, iov and the use
 *             of fd (kvmpy_blk_set_fd takes it too, so an fd is never closed under
 *             a preadv);
 *   lock    - the registers and the queue state. It is never held across file I/O:
 *             a chain is popped under it, its data moved without it, its status
 *             byte and used element written under it again. A reset, a QueueReady
 *             write or a restored state in between bumps gen, and the completion of
 *             a chain popped before is dropped (it belongs to a queue that is gone).
 * One QueueNotify serves at most QueueNum chains (see serve_queue).
 *
 * Rate limits (ratelimit.c, under lock): a chain whose tokens are not there is put
 * back (last_avail_idx--, as if never popped) and the notify ends; the limiter
 * remembers when it may go, and kvmpy_blk_serve_pending (a host-side QueueNotify,
 * called by the Machine's disk timer) or the guest's next QueueNotify serves it.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <linux/kvm.h>

#include "virtio.h"

/* virtio-blk (virtio 1.2, 5.2), Linux's <linux/virtio_blk.h> names */
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_BLK_F_SEG_MAX 2
#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2
#define VIRTIO_BLK_ID_BYTES 20u
/* kvmpy's own */
#define KVMPY_BLK_SECTOR_SIZE 512u	/* blk.py SECTOR_SIZE */
#define KVMPY_BLK_HEADER_SIZE 16u	/* le32 type, le32 reserved, le64 sector */
#define KVMPY_BLK_CONFIG_SIZE 36u	/* struct virtio_blk_config up to num_queues (blk.py CONFIG) */
/* last_error of a state restored in DEVICE_NEEDS_RESET (the message is not saved) */
#define KVMPY_RESTORED_ERROR "DEVICE_NEEDS_RESET restored from a saved state"

_Static_assert(KVMPY_BLK_QUEUE_NUM_MAX <= KVMPY_VQ_NUM_MAX, "a chain must fit struct kvmpy_vq_chain");

/* What one request needs, whichever transport serves the queue: the disk, guest memory and
 * the scratch space of one chain. The mmio device below holds one; kvmpy_blk_serve makes
 * one for a transport in Python (virtio-pci). */
struct blk_io {
	const struct kvmpy_blk_disk *d;
	const struct kvmpy_guest_mem *mem;
	struct kvmpy_vq_chain *chain;
	struct iovec *iov;				/* at most one per buffer of the chain */
};

/* The scratch space of kvmpy_blk_serve, allocated by its caller (kvmpy_blk_scratch_size). */
struct kvmpy_blk_scratch {
	struct kvmpy_vq_chain chain;
	struct iovec iov[KVMPY_VQ_NUM_MAX];
};

struct kvmpy_blk {
	pthread_mutex_t io_lock;			/* the data path; taken before lock */
	pthread_mutex_t lock;				/* s, gen */
	uint64_t gen;					/* bumped when the queue is replaced */
	struct kvmpy_blk_state s;
	struct kvmpy_guest_mem mem;
	int vm_fd, gsi;
	struct kvmpy_blk_disk d;			/* fd and written change under io_lock */
	uint8_t config[KVMPY_BLK_CONFIG_SIZE];
	struct kvmpy_blk_scratch scratch;		/* one request at a time (io_lock) */
	struct kvmpy_limiter rl;			/* rate limits (lock); all sizes 0: none */
	uint64_t fake_now;				/* tests: the limiter's clock; 0: CLOCK_MONOTONIC */
};

static struct blk_io io_of(struct kvmpy_blk *b)
{
	return (struct blk_io){ &b->d, &b->mem, &b->scratch.chain, b->scratch.iov };
}

/* --- interrupts and errors (mmio.py: _update_irq, _device_error) ------------------ */

/* interrupt line = InterruptStatus != 0 */
static void update_irq(struct kvmpy_blk *b)
{
	uint32_t level = b->s.interrupt_status != 0;

	if (level == b->s.level)
		return;
	b->s.level = level;
	b->s.irq_changes++;
	if (b->gsi >= 0) {
		struct kvm_irq_level irq = { .irq = (uint32_t)b->gsi, .level = level };

		/* level stays the model's: a failure is counted for Python to see, not retried */
		if (ioctl(b->vm_fd, KVM_IRQ_LINE, &irq) < 0) {
			b->s.irq_errors++;
			b->s.irq_errno = errno;
		}
	}
}

/* a driver error sets DEVICE_NEEDS_RESET once, with a config interrupt if DRIVER_OK */
static void device_error(struct kvmpy_blk *b, const char *reason)
{
	if (b->s.status & VIRTIO_CONFIG_S_NEEDS_RESET)
		return;
	snprintf(b->s.last_error, sizeof(b->s.last_error), "%s", reason);
	b->s.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
	if (b->s.status & VIRTIO_CONFIG_S_DRIVER_OK)
		b->s.interrupt_status |= VIRTIO_MMIO_INT_CONFIG;
	update_irq(b);
}

/* --- block requests (blk.py: handle, _execute) ----------------------------------- */

static int in_range(const struct kvmpy_blk_disk *d, uint64_t sector, uint64_t nbytes)
{
	if (nbytes % KVMPY_BLK_SECTOR_SIZE)
		return 0;
	return sector <= d->capacity && nbytes / KVMPY_BLK_SECTOR_SIZE <= d->capacity - sector;
}

/* preadv/pwritev all of iov[0..niov) at pos: 1 ok, 0 failed (or end of file) */
static int rw_all(const struct blk_io *io, uint32_t niov, off_t pos, int write)
{
	uint32_t first = 0;

	while (first < niov) {
		ssize_t r = write ? pwritev(io->d->fd, io->iov + first, (int)(niov - first), pos)
				  : preadv(io->d->fd, io->iov + first, (int)(niov - first), pos);

		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return 0;	/* error, or end of file: the file shrank under us */
		pos += r;
		while (first < niov && (size_t)r >= io->iov[first].iov_len)
			r -= (ssize_t)io->iov[first++].iov_len;
		if (first < niov && r) {
			io->iov[first].iov_base = (uint8_t *)io->iov[first].iov_base + r;
			io->iov[first].iov_len -= (size_t)r;
		}
	}
	return 1;
}

/*
 * 1 if [pos, pos+n) ends inside the file as it is now (blk.py _inside_file). Someone
 * may have shrunk it under us: a read past its end has nothing to read, and a write
 * past its end would grow the disk back, which we never do. pos + n <= capacity * 512
 * (in_range), so it cannot overflow. lseek's offset is unused: I/O is preadv/pwritev.
 */
static int inside_file(const struct kvmpy_blk_disk *d, uint64_t pos, uint64_t n)
{
	off_t end = lseek(d->fd, 0, SEEK_END);

	return end >= 0 && pos + n <= (uint64_t)end;
}

/* Move bytes [skip, skip+n) of the buffers to/from the disk at sector: 1 ok, 0 failed. */
static int transfer(const struct blk_io *io, const struct kvmpy_vq_buf *bufs, uint32_t nbufs,
		    uint64_t skip, uint64_t n, uint64_t sector, int write)
{
	uint32_t niov;
	int ok;

	if (io->d->fd < 0 || !inside_file(io->d, sector * KVMPY_BLK_SECTOR_SIZE, n))
		return 0;
	niov = kvmpy_vq_iov(io->mem, bufs, nbufs, skip, n, io->iov);	/* nbufs <= KVMPY_VQ_NUM_MAX */
	if (n && !niov)
		return 0;	/* a buffer not in io->mem (kvmpy_vq_iov) */
	ok = rw_all(io, niov, (off_t)(sector * KVMPY_BLK_SECTOR_SIZE), write);
	/* a reset overlay: every block the write may have touched (even a failed one) */
	if (write && io->d->written && n)
		kvmpy_dirty_mark(io->d->written, sector * KVMPY_BLK_SECTOR_SIZE / 4096,
				 (sector * KVMPY_BLK_SECTOR_SIZE + n - 1) / 4096 -
				 sector * KVMPY_BLK_SECTOR_SIZE / 4096 + 1);
	/* dirty: a read filled the guest buffers (perhaps partly, if it failed): mark them all */
	if (!write)
		kvmpy_vq_mark_dirty(io->mem, bufs, nbufs, skip, n);
	return ok;
}

/* hdr: the request header serve_queue copied out of guest RAM (read once) */
static uint8_t execute(const struct blk_io *io, uint64_t wlen, const uint8_t *hdr, uint32_t *data_written)
{
	const struct kvmpy_vq_chain *c = io->chain;
	uint64_t rlen = kvmpy_vq_bufs_len(c->rd, c->nrd), n;
	uint32_t type;
	uint64_t sector;

	*data_written = 0;
	if (rlen < KVMPY_BLK_HEADER_SIZE)
		return VIRTIO_BLK_S_IOERR;
	if (!hdr)
		return VIRTIO_BLK_S_IOERR;	/* serve_queue could not copy it (a buffer not in io->mem) */
	type = (uint32_t)kvmpy_get_le(hdr, 4);
	sector = kvmpy_get_le(hdr + 8, 8);
	switch (type) {
	case VIRTIO_BLK_T_IN:
		n = wlen - 1;
		if (rlen != KVMPY_BLK_HEADER_SIZE || !in_range(io->d, sector, n))
			return VIRTIO_BLK_S_IOERR;
		if (!transfer(io, c->wr, c->nwr, 0, n, sector, 0))
			return VIRTIO_BLK_S_IOERR;
		*data_written = (uint32_t)n;
		return VIRTIO_BLK_S_OK;
	case VIRTIO_BLK_T_OUT:
		n = rlen - KVMPY_BLK_HEADER_SIZE;
		if (wlen != 1 || io->d->readonly || !in_range(io->d, sector, n))
			return VIRTIO_BLK_S_IOERR;
		return transfer(io, c->rd, c->nrd, KVMPY_BLK_HEADER_SIZE, n, sector, 1) ?
		       VIRTIO_BLK_S_OK : VIRTIO_BLK_S_IOERR;
	case VIRTIO_BLK_T_FLUSH:
		if (io->d->fd < 0)
			return VIRTIO_BLK_S_IOERR;
		if (io->d->readonly)
			return VIRTIO_BLK_S_OK;
		return fdatasync(io->d->fd) == 0 ? VIRTIO_BLK_S_OK : VIRTIO_BLK_S_IOERR;
	case VIRTIO_BLK_T_GET_ID:
		if (rlen != KVMPY_BLK_HEADER_SIZE)
			return VIRTIO_BLK_S_IOERR;
		n = wlen - 1 < VIRTIO_BLK_ID_BYTES ? wlen - 1 : VIRTIO_BLK_ID_BYTES;
		if (kvmpy_vq_scatter(io->mem, c->wr, c->nwr, io->d->id, n))
			return VIRTIO_BLK_S_IOERR;
		*data_written = (uint32_t)n;
		return VIRTIO_BLK_S_OK;
	}
	return VIRTIO_BLK_S_UNSUPP;
}

/* The status byte: the last byte of the last device-writable buffer. */
static void put_status(const struct blk_io *io, uint8_t status)
{
	const struct kvmpy_vq_buf *last = &io->chain->wr[io->chain->nwr - 1];
	uint64_t gpa = last->gpa + last->len - 1;
	uint8_t *p;

	/* SAFETY: kvmpy_mem_hva: NULL unless gpa lies inside one region of io->mem (it is the
	 * last byte of a buffer kvmpy_vq_pop checked, len >= 1; nwr >= 1: pop_request
	 * refused wlen == 0) */
	p = kvmpy_mem_hva(io->mem, gpa, 1);
	if (!p)
		return;
	*p = status;
	kvmpy_mem_mark_dirty(io->mem, gpa, 1);		/* dirty: the status byte */
}

/* FEATURES_OK and DRIVER_OK, neither NEEDS_RESET nor FAILED (mmio.py live) */
static int live(const struct kvmpy_blk *b)
{
	uint32_t want = VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK;

	return (b->s.status & (want | VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED)) == want;
}

/* --- rate limits (blk.py: _cost, notify) ------------------------------------------ */

static int limited(const struct kvmpy_blk *b)
{
	return b->rl.ops.size || b->rl.bytes.size || b->rl.flushes.size;
}

/*
 * The chain's tokens, or 0 and throttled_until (blk.py _cost): one operation for every
 * request; the data length for IN (writable bytes but the status) and OUT (readable
 * bytes after the header); one flush for FLUSH. Called with b->lock held.
 */
static int admit(struct kvmpy_blk *b, uint64_t wlen, const uint8_t *hdr)
{
	const struct kvmpy_vq_chain *c = &b->scratch.chain;
	uint64_t rlen = kvmpy_vq_bufs_len(c->rd, c->nrd), nbytes = 0, flushes = 0;

	if (!limited(b))
		return 1;
	if (rlen >= KVMPY_BLK_HEADER_SIZE) {
		switch ((uint32_t)kvmpy_get_le(hdr, 4)) {
		case VIRTIO_BLK_T_IN: nbytes = wlen - 1; break;
		case VIRTIO_BLK_T_OUT: nbytes = rlen - KVMPY_BLK_HEADER_SIZE; break;
		case VIRTIO_BLK_T_FLUSH: flushes = 1; break;
		}
	}
	return kvmpy_limiter_admit(&b->rl, b->fake_now ? b->fake_now : kvmpy_now_ns(), 1, nbytes,
				   flushes);
}

/*
 * The next request of q: its chain into io->chain, its header into hdr, copied out of
 * guest RAM once (zeroed if a buffer is not in io->mem; left alone if there are fewer
 * than 16 readable bytes, which execute refuses without reading hdr). 1 = a request,
 * *wlen its device-writable bytes and *hdr_ok whether hdr may be read; 0 = the ring is
 * empty; -EINVAL and *why on a driver error (blk.py _check_status_byte, _header).
 */
static int pop_request(const struct blk_io *io, struct kvmpy_vq_state *q, uint8_t *hdr,
		       uint64_t *wlen, int *hdr_ok, const char **why)
{
	const struct kvmpy_vq_chain *c = io->chain;
	int r = kvmpy_vq_pop(q, io->mem, io->chain, why);

	if (r <= 0)
		return r;
	*wlen = kvmpy_vq_bufs_len(c->wr, c->nwr);
	if (*wlen == 0)
		return *why = "virtio-blk request has no device-writable status byte", -EINVAL;
	*hdr_ok = kvmpy_vq_bufs_len(c->rd, c->nrd) < KVMPY_BLK_HEADER_SIZE ||
		  kvmpy_vq_gather(io->mem, c->rd, c->nrd, hdr, KVMPY_BLK_HEADER_SIZE) == 0;
	if (!*hdr_ok)
		memset(hdr, 0, KVMPY_BLK_HEADER_SIZE);
	return 1;
}

/* The request in io->chain is done: its status byte, then its used element. */
static void complete(const struct blk_io *io, struct kvmpy_vq_state *q, uint8_t status,
		     uint32_t written)
{
	put_status(io, status);
	kvmpy_vq_push_used(q, io->mem, io->chain->head, written + 1);
}

/*
 * blk.py notify(): serve the available requests in ring order, at most QueueNum of
 * them, so one QueueNotify is bounded work even when the device's own writes keep
 * publishing more (a device-writable buffer over the available ring); a driver that
 * follows the spec never has more than QueueNum available (docs/virtio.md). Called
 * and returns with b->lock and b->io_lock held; drops b->lock around each request's
 * I/O. -EINVAL and *why on a driver error; 0 otherwise, also when gen moved on.
 */
static int serve_queue(struct kvmpy_blk *b, uint64_t gen, const char **why)
{
	struct blk_io io = io_of(b);
	uint64_t i, num = b->s.q.num;
	uint8_t hdr[KVMPY_BLK_HEADER_SIZE] = { 0 };
	int r, hdr_ok = 0;

	for (i = 0; i < num; i++) {
		uint64_t wlen = 0;
		uint32_t written;
		uint8_t status;

		r = pop_request(&io, &b->s.q, hdr, &wlen, &hdr_ok, why);
		if (r == 0)
			b->rl.throttled_until = 0;	/* the ring is empty: nothing waits */
		if (r <= 0)
			return r;
		if (!admit(b, wlen, hdr)) {
			b->s.q.last_avail_idx--;	/* over budget: back in the ring, untouched */
			return 0;
		}
		pthread_mutex_unlock(&b->lock);
		status = execute(&io, wlen, hdr_ok ? hdr : NULL, &written);	/* file I/O without the register lock */
		pthread_mutex_lock(&b->lock);
		if (b->gen != gen)
			return 0;	/* reset or restored meanwhile: this chain's queue is gone */
		complete(&io, &b->s.q, status, written);
		if (!live(b))
			return 0;	/* the driver set FAILED meanwhile */
	}
	return 0;
}

/* QueueNotify (mmio.py _notify). Takes io_lock, then lock (see the top of the file). */
static void notify(struct kvmpy_blk *b, uint32_t index)
{
	uint64_t before, gen;
	const char *why = NULL;
	int r;

	pthread_mutex_lock(&b->io_lock);
	pthread_mutex_lock(&b->lock);
	if (live(b) && index < 1 && b->s.q.ready) {
		before = b->s.q.used_count;
		gen = b->gen;
		r = serve_queue(b, gen, &why);
		if (b->gen == gen) {
			if (r < 0)
				device_error(b, why);
			if (kvmpy_vq_should_notify(&b->s.q, &b->mem, before))
				b->s.interrupt_status |= VIRTIO_MMIO_INT_VRING;
			update_irq(b);
		}
	}
	pthread_mutex_unlock(&b->lock);
	pthread_mutex_unlock(&b->io_lock);
}

/* --- the transport registers (mmio.py: read, write) ------------------------------- */

static void reset(struct kvmpy_blk *b)
{
	b->gen++;
	b->s.status = 0;
	b->s.device_features_sel = b->s.driver_features_sel = 0;
	b->s.driver_features = 0;
	b->s.queue_sel = 0;
	b->s.last_error[0] = 0;
	memset(&b->s.q, 0, sizeof(b->s.q));
	b->s.q.num = KVMPY_BLK_QUEUE_NUM_MAX;
	b->s.interrupt_status = 0;
	b->rl.throttled_until = 0;	/* the ring is gone; the buckets keep their tokens */
	update_irq(b);
}

static uint32_t feature_word(uint64_t features, uint32_t sel)
{
	return sel < 2 ? (uint32_t)(features >> (32 * sel)) : 0;
}

static uint64_t reg_read(struct kvmpy_blk *b, uint64_t off, uint32_t size)
{
	if (off >= Config) {
		off -= Config;
		/* overflow-safe bound: never off + size, which a guest could wrap past 2^64 */
		if ((size != 1 && size != 2 && size != 4 && size != 8) ||
		    size > KVMPY_BLK_CONFIG_SIZE || off > KVMPY_BLK_CONFIG_SIZE - size)
			return 0;
		return kvmpy_get_le(b->config + off, size);
	}
	if (size != 4 || off % 4)
		return 0;
	switch (off) {
	case MagicValue:
		return VIRTIO_MMIO_MAGIC;
	case Version:
		return 2;
	case DeviceID:
		return VIRTIO_ID_BLOCK;
	case VendorID:
		return KVMPY_VIRTIO_MMIO_VENDOR;
	case DeviceFeatures:
		return feature_word(b->s.device_features, b->s.device_features_sel);
	case QueueNumMax:
		return b->s.queue_sel < 1 ? KVMPY_BLK_QUEUE_NUM_MAX : 0;
	case QueueReady:
		return b->s.queue_sel < 1 && b->s.q.ready;
	case InterruptStatus:
		return b->s.interrupt_status;
	case Status:
		return b->s.status;
	case SHMLenLow: case SHMLenHigh: case SHMBaseLow: case SHMBaseHigh:
		return 0xFFFFFFFFu;
	}
	return 0;
}

static void set_half(uint64_t *field, uint32_t value, int high)
{
	int shift = high ? 32 : 0;

	*field = (*field & ~(0xFFFFFFFFull << shift)) | ((uint64_t)value << shift);
}

static void write_queue(struct kvmpy_blk *b, uint64_t off, uint32_t value)
{
	struct kvmpy_vq_state *q = &b->s.q;
	const char *why;

	if (b->s.queue_sel >= 1)
		return;
	if (off == QueueReady) {
		b->gen++;		/* a request in flight belongs to the old queue */
		if (!value)
			q->ready = 0;
		else if (!q->ready && kvmpy_vq_enable(q, &b->mem, KVMPY_BLK_QUEUE_NUM_MAX, &why))
			device_error(b, why);
		return;
	}
	if (q->ready)
		return;
	switch (off) {
	case QueueNum: q->num = value; break;
	case QueueDescLow: set_half(&q->desc, value, 0); break;
	case QueueDescHigh: set_half(&q->desc, value, 1); break;
	case QueueDriverLow: set_half(&q->driver, value, 0); break;
	case QueueDriverHigh: set_half(&q->driver, value, 1); break;
	case QueueDeviceLow: set_half(&q->device, value, 0); break;
	case QueueDeviceHigh: set_half(&q->device, value, 1); break;
	}
}

static void write_status(struct kvmpy_blk *b, uint32_t value)
{
	uint32_t nw;
	uint64_t feats = b->s.driver_features;

	if (value == 0) {
		reset(b);
		return;
	}
	nw = value & 0xFF & ~(uint32_t)VIRTIO_CONFIG_S_NEEDS_RESET;
	if ((nw & VIRTIO_CONFIG_S_FEATURES_OK) && !(b->s.status & VIRTIO_CONFIG_S_FEATURES_OK) &&
	    ((feats & ~b->s.device_features) || !((feats >> VIRTIO_F_VERSION_1) & 1)))
		nw &= ~(uint32_t)VIRTIO_CONFIG_S_FEATURES_OK;
	b->s.status |= nw;
}

static void reg_write(struct kvmpy_blk *b, uint64_t off, uint32_t size, uint64_t value64)
{
	uint32_t value = (uint32_t)value64;

	if (off >= Config)
		return;			/* every config field is read-only: ignored */
	if (size != 4 || off % 4)
		return;
	switch (off) {
	case DeviceFeaturesSel:
		b->s.device_features_sel = value;
		break;
	case DriverFeatures:
		if (!(b->s.status & VIRTIO_CONFIG_S_FEATURES_OK) && b->s.driver_features_sel < 2)
			set_half(&b->s.driver_features, value, b->s.driver_features_sel == 1);
		break;
	case DriverFeaturesSel:
		b->s.driver_features_sel = value;
		break;
	case QueueSel:
		b->s.queue_sel = value;
		break;
	/* QueueNotify: kvmpy_blk_write serves it, outside this lock */
	case InterruptACK:
		b->s.interrupt_status &= ~value;
		update_irq(b);
		break;
	case Status:
		write_status(b, value);
		break;
	case QueueNum: case QueueReady: case QueueDescLow: case QueueDescHigh:
	case QueueDriverLow: case QueueDriverHigh: case QueueDeviceLow: case QueueDeviceHigh:
		write_queue(b, off, value);
		break;
	}
}

/* --- public entry points --------------------------------------------------------- */

struct kvmpy_blk *kvmpy_blk_new(int fd, int readonly, uint64_t file_size, const uint8_t *id,
				const struct kvmpy_guest_mem *mem, int vm_fd, int gsi)
{
	struct kvmpy_blk *b;

	if (!mem || mem->n > KVMPY_MAX_REGIONS)
		return NULL;
	b = calloc(1, sizeof(*b));
	if (!b)
		return NULL;
	if (pthread_mutex_init(&b->io_lock, NULL))
		goto err_free;
	if (pthread_mutex_init(&b->lock, NULL))
		goto err_io_lock;
	b->mem = *mem;
	b->vm_fd = vm_fd;
	b->gsi = gsi;
	b->d.fd = fd;
	memcpy(b->d.id, id, VIRTIO_BLK_ID_BYTES);
	b->d.readonly = b->s.readonly = !!readonly;
	b->d.capacity = b->s.capacity = file_size / KVMPY_BLK_SECTOR_SIZE;
	b->s.device_features = (1ull << VIRTIO_F_VERSION_1) | (1ull << VIRTIO_BLK_F_SEG_MAX) |
			       (1ull << VIRTIO_BLK_F_FLUSH) | (readonly ? 1ull << VIRTIO_BLK_F_RO : 0);
	kvmpy_put_le(b->config, b->s.capacity, 8);			/* capacity */
	kvmpy_put_le(b->config + 12, KVMPY_BLK_QUEUE_NUM_MAX - 2, 4);	/* seg_max */
	b->s.q.num = KVMPY_BLK_QUEUE_NUM_MAX;
	return b;

err_io_lock:
	pthread_mutex_destroy(&b->io_lock);
err_free:
	free(b);
	return NULL;
}

void kvmpy_blk_free(struct kvmpy_blk *b)
{
	if (!b)
		return;
	pthread_mutex_destroy(&b->lock);
	pthread_mutex_destroy(&b->io_lock);
	free(b);		/* the fd belongs to the Python VirtioBlk that opened it */
}

uint64_t kvmpy_blk_read(struct kvmpy_blk *b, uint64_t off, uint32_t size)
{
	uint64_t v;

	pthread_mutex_lock(&b->lock);
	v = reg_read(b, off, size);
	pthread_mutex_unlock(&b->lock);
	return v;
}

void kvmpy_blk_write(struct kvmpy_blk *b, uint64_t off, uint32_t size, uint64_t value)
{
	if (off == QueueNotify && size == 4) {
		notify(b, (uint32_t)value);	/* takes io_lock, then lock */
		return;
	}
	pthread_mutex_lock(&b->lock);
	reg_write(b, off, size, value);
	pthread_mutex_unlock(&b->lock);
}

/* io_lock: waits for the QueueNotify in progress (bounded), so no I/O still uses the old fd */
void kvmpy_blk_set_fd(struct kvmpy_blk *b, int fd)
{
	pthread_mutex_lock(&b->io_lock);
	pthread_mutex_lock(&b->lock);
	b->d.fd = fd;
	pthread_mutex_unlock(&b->lock);
	pthread_mutex_unlock(&b->io_lock);
}

void kvmpy_blk_set_overlay(struct kvmpy_blk *b, int fd, uint64_t *written)
{
	pthread_mutex_lock(&b->io_lock);
	pthread_mutex_lock(&b->lock);
	b->d.fd = fd;
	b->d.written = written;
	pthread_mutex_unlock(&b->lock);
	pthread_mutex_unlock(&b->io_lock);
}

void kvmpy_blk_get_state(struct kvmpy_blk *b, struct kvmpy_blk_state *out)
{
	pthread_mutex_lock(&b->lock);
	*out = b->s;
	pthread_mutex_unlock(&b->lock);
}

/* The checks of mmio.py check_state, in the same order: is s reachable? */
static int state_valid(const struct kvmpy_blk *b, const struct kvmpy_blk_state *s)
{
	const struct kvmpy_vq_state *q = &s->q;
	uint64_t feats = s->driver_features;

	if (s->status > 0xFF)
		return 0;
	if ((s->status & VIRTIO_CONFIG_S_FEATURES_OK) &&
	    ((feats & ~b->s.device_features) || !((feats >> VIRTIO_F_VERSION_1) & 1)))
		return 0;	/* FEATURES_OK is refused for such features */
	if (s->interrupt_status & ~(uint32_t)(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG))
		return 0;
	if (s->level != (s->interrupt_status != 0))
		return 0;	/* the line always follows InterruptStatus */
	if (q->num > 0xFFFFFFFFull || q->ready > 1)	/* QueueNum is a 32-bit register */
		return 0;
	if (!q->ready)
		return q->last_avail_idx == 0 && q->used_idx == 0;
	if (kvmpy_vq_check(q, &b->mem, KVMPY_BLK_QUEUE_NUM_MAX))
		return 0;
	/* every chain taken is returned, except the one a driver error stopped */
	switch ((uint16_t)(q->last_avail_idx - q->used_idx)) {
	case 0:
		return 1;
	case 1:
		return !!(s->status & VIRTIO_CONFIG_S_NEEDS_RESET);
	}
	return 0;
}

int kvmpy_blk_set_state(struct kvmpy_blk *b, const struct kvmpy_blk_state *s)
{
	pthread_mutex_lock(&b->lock);
	if (!state_valid(b, s)) {
		pthread_mutex_unlock(&b->lock);
		return -EINVAL;
	}
	b->gen++;		/* a request in flight belongs to the replaced queue */
	b->s.status = s->status;
	b->s.device_features_sel = s->device_features_sel;
	b->s.driver_features_sel = s->driver_features_sel;
	b->s.driver_features = s->driver_features;
	b->s.queue_sel = s->queue_sel;
	b->s.interrupt_status = s->interrupt_status;
	b->s.level = s->level;		/* recorded only: KVM's irqchip already has this level */
	b->s.q.num = s->q.num;
	b->s.q.ready = s->q.ready;
	b->s.q.desc = s->q.desc;
	b->s.q.driver = s->q.driver;
	b->s.q.device = s->q.device;
	b->s.q.last_avail_idx = s->q.last_avail_idx;
	b->s.q.used_idx = s->q.used_idx;
	b->s.q.used_count = 0;
	snprintf(b->s.last_error, sizeof(b->s.last_error), "%s",
		 s->status & VIRTIO_CONFIG_S_NEEDS_RESET ? KVMPY_RESTORED_ERROR : "");
	pthread_mutex_unlock(&b->lock);
	return 0;
}

/* The run loop's MMIO fast path: serve one access to the device window. */
void kvmpy_blk_mmio(struct kvmpy_blk *b, uint64_t off, int is_write, uint8_t *data, uint32_t len)
{
	if (len > 8)		/* data is kvm_run's 8-byte mmio.data */
		return;
	if (is_write) {
		kvmpy_blk_write(b, off, len, kvmpy_get_le(data, len));
	} else {
		uint64_t v = kvmpy_blk_read(b, off, len);

		memset(data, 0, 8);
		kvmpy_put_le(data, v, len);
	}
}

/* --- rate limits ----------------------------------------------------------------- */

int kvmpy_blk_set_limits(struct kvmpy_blk *b, uint64_t iops, uint64_t bps, uint64_t fps,
			 uint64_t iops_burst, uint64_t bps_burst)
{
	struct kvmpy_limiter rl = { 0 };
	uint64_t now, ns = 1000000000ull;
	int r = 0;

	pthread_mutex_lock(&b->lock);
	now = b->fake_now ? b->fake_now : kvmpy_now_ns();
	if (iops)
		r |= kvmpy_bucket_init(&rl.ops, iops, ns, iops_burst, now);
	if (bps)
		r |= kvmpy_bucket_init(&rl.bytes, bps, ns, bps_burst, now);
	if (fps)
		r |= kvmpy_bucket_init(&rl.flushes, fps, ns, 0, now);
	if (!r)
		b->rl = rl;
	pthread_mutex_unlock(&b->lock);
	return r ? -EINVAL : 0;
}

void kvmpy_blk_get_limiter(struct kvmpy_blk *b, struct kvmpy_limiter *out)
{
	pthread_mutex_lock(&b->lock);
	*out = b->rl;
	pthread_mutex_unlock(&b->lock);
}

uint64_t kvmpy_blk_throttled_until(struct kvmpy_blk *b)
{
	uint64_t t;

	pthread_mutex_lock(&b->lock);
	t = b->rl.throttled_until;
	pthread_mutex_unlock(&b->lock);
	return t;
}

/* throttled_until is cleared first: a device that is not live (or whose ring is gone)
 * has nothing to serve and must not look throttled for ever */
void kvmpy_blk_serve_pending(struct kvmpy_blk *b)
{
	pthread_mutex_lock(&b->lock);
	b->rl.throttled_until = 0;
	pthread_mutex_unlock(&b->lock);
	notify(b, 0);		/* bounded like any QueueNotify: at most QueueNum chains */
}

void kvmpy_blk_set_clock(struct kvmpy_blk *b, uint64_t now_ns)
{
	pthread_mutex_lock(&b->lock);
	b->fake_now = now_ns;
	pthread_mutex_unlock(&b->lock);
}

/* --- the request queue for a transport outside C (virtio-pci, in Python) ---------- */

uint64_t kvmpy_blk_scratch_size(void)
{
	return sizeof(struct kvmpy_blk_scratch);
}

/*
 * blk.py notify() without rate limits, for a queue whose transport lives in Python: at
 * most budget requests of q served on d, in ring order. The caller serialises calls for
 * one queue and owns scratch (kvmpy_blk_scratch_size bytes). q comes from Python, so it
 * is checked as a restored state is (kvmpy_vq_check) before a chain is walked. Returns
 * the requests served, or -EINVAL and *why on a driver error (the requests before it
 * are complete and in the used ring; q says how far it got).
 */
int kvmpy_blk_serve(struct kvmpy_vq_state *q, const struct kvmpy_guest_mem *mem,
		    const struct kvmpy_blk_disk *d, uint32_t budget,
		    struct kvmpy_blk_scratch *scratch, const char **why)
{
	struct blk_io io = { d, mem, &scratch->chain, scratch->iov };
	uint8_t hdr[KVMPY_BLK_HEADER_SIZE] = { 0 };
	uint32_t served, written;
	uint64_t wlen = 0;
	int r, hdr_ok = 0;

	if (!mem || mem->n > KVMPY_MAX_REGIONS)
		return *why = "virtio-blk: bad guest memory table", -EINVAL;
	*why = kvmpy_vq_check(q, mem, KVMPY_BLK_QUEUE_NUM_MAX);
	if (!q->ready && !*why)
		*why = "virtio-blk: the queue is not ready";
	if (*why)
		return -EINVAL;
	for (served = 0; served < budget; served++) {
		uint8_t status;

		r = pop_request(&io, q, hdr, &wlen, &hdr_ok, why);
		if (r <= 0)
			return r < 0 ? r : (int)served;
		status = execute(&io, wlen, hdr_ok ? hdr : NULL, &written);
		complete(&io, q, status, written);
	}
	return (int)served;
}
