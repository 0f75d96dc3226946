/*
 * virtio_net.c - the queue work of virtio-net in C: moving frames between guest
 * RAM and flat host buffers for the transmit and receive queues. The transport
 * (registers, status, interrupts) and the backend (passt, TAP) stay in Python;
 * the Python model kvmpy/devices/virtio/net.py (VirtioNet.transmit, fill_rx) is the
 * specification, followed check for check and in the same order, so that
 * tests/native/test_net_differential.py can demand the same guest RAM, used ring,
 * counters, frames and errors for the same rings. Read it first.
 *
 * Nothing is allocated here: the caller passes the chain scratch space and the
 * output buffer (kvmpy/vmm/native_net.py allocates them once per device). Guest
 * addresses become host pointers only inside virtqueue.c's kvmpy_vq_* helpers.
 */
#include <errno.h>
#include <string.h>
#include <sys/uio.h>

#include "virtio.h"

/* devices/virtio/net.py: NET_HDR_SIZE, MIN_FRAME, MAX_FRAME */
#define NET_HDR_SIZE 12u
#define NET_MIN_FRAME 14u
#define NET_MAX_FRAME 65550u

static void put_be32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}

uint64_t kvmpy_net_chain_size(void)
{
	return sizeof(struct kvmpy_vq_chain);
}

int kvmpy_net_tx(struct kvmpy_vq_state *q, const struct kvmpy_guest_mem *mem, uint32_t budget,
		 uint8_t *out, uint64_t cap, uint64_t *out_len, struct kvmpy_net_counters *c,
		 struct kvmpy_vq_chain *chain, const char **why)
{
	uint32_t served = 0;
	uint64_t n;
	uint8_t *rec;
	int r;

	*out_len = 0;
	while (served < budget && cap - *out_len >= 4 + NET_HDR_SIZE + NET_MAX_FRAME) {
		r = kvmpy_vq_pop(q, mem, chain, why);
		if (r < 0)
			return -1;
		if (r == 0)
			break;
		served++;
		n = kvmpy_vq_bufs_len(chain->rd, chain->nrd);
		if (chain->nwr) {
			c->tx_bad_chain++;
		} else if (n < NET_HDR_SIZE + NET_MIN_FRAME || n > NET_HDR_SIZE + NET_MAX_FRAME) {
			c->tx_bad_length++;			/* its bytes are not read */
		} else {
			rec = out + *out_len;
			/* header and frame read once into our buffer, then the header dropped */
			if (kvmpy_vq_gather(mem, chain->rd, chain->nrd, rec + 4, n))
				return *why = "transmit buffer outside guest RAM", -1;
			memmove(rec + 4, rec + 4 + NET_HDR_SIZE, n - NET_HDR_SIZE);
			put_be32(rec, (uint32_t)(n - NET_HDR_SIZE));
			*out_len += 4 + n - NET_HDR_SIZE;
		}
		kvmpy_vq_push_used(q, mem, chain->head, 0);
	}
	return (int)served;
}

int kvmpy_net_rx(struct kvmpy_vq_state *q, const struct kvmpy_guest_mem *mem, const uint8_t *hdr,
		 const uint8_t *frame, uint32_t len, uint32_t *budget, struct kvmpy_net_counters *c,
		 struct kvmpy_vq_chain *chain, const char **why)
{
	struct iovec iov[KVMPY_VQ_NUM_MAX];
	uint64_t wlen, total = NET_HDR_SIZE + (uint64_t)len, done = 0, k;
	uint32_t niov, i;
	int r;

	while (*budget) {
		(*budget)--;
		r = kvmpy_vq_pop(q, mem, chain, why);
		if (r < 0)
			return -1;
		if (r == 0)
			return 0;
		wlen = kvmpy_vq_bufs_len(chain->wr, chain->nwr);
		if (chain->nrd || wlen < NET_HDR_SIZE) {
			c->rx_bad_chain++;
			kvmpy_vq_push_used(q, mem, chain->head, 0);
			continue;
		}
		if (total > wlen) {
			c->rx_too_big++;
			q->last_avail_idx--;			/* the chain waits, untouched */
			return 2;
		}
		/* SAFETY: kvmpy_vq_iov maps only slices of the chain's writable buffers,
		 * which kvmpy_vq_pop checked to lie inside guest RAM; 0 iovecs = a fault */
		niov = kvmpy_vq_iov(mem, chain->wr, chain->nwr, 0, total, iov);
		if (!niov)
			return *why = "receive buffer outside guest RAM", -1;
		for (i = 0; i < niov; i++) {		/* the header, then the frame, across the iovecs */
			uint8_t *p = iov[i].iov_base;
			uint64_t left = iov[i].iov_len;

			if (done < NET_HDR_SIZE) {
				k = left < NET_HDR_SIZE - done ? left : NET_HDR_SIZE - done;
				memcpy(p, hdr + done, k);
				p += k;
				left -= k;
				done += k;
			}
			memcpy(p, frame + (done - NET_HDR_SIZE), left);
			done += left;
		}
		kvmpy_vq_mark_dirty(mem, chain->wr, chain->nwr, 0, total);
		kvmpy_vq_push_used(q, mem, chain->head, (uint32_t)total);
		c->rx_frames++;
		c->rx_bytes += len;
		return 1;
	}
	return 0;
}

int kvmpy_net_rx_many(struct kvmpy_vq_state *q, const struct kvmpy_guest_mem *mem, const uint8_t *hdr,
		      const uint8_t *frames, const uint32_t *lens, uint32_t count, uint32_t *consumed, uint32_t *budget,
		      struct kvmpy_net_counters *c, struct kvmpy_vq_chain *chain, const char **why)
{
	int r = 0;

	/* kvmpy_net_rx for each frame in turn, as VirtioNet.fill_rx's loop */
	for (*consumed = 0; *consumed < count; (*consumed)++) {
		r = kvmpy_net_rx(q, mem, hdr, frames, lens[*consumed], budget, c, chain, why);
		if (r <= 0)
			break;
		frames += lens[*consumed];
	}
	return r < 0 ? -1 : 0;
}
