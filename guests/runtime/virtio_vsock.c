/*
 * virtio_vsock.c - the polling virtio-vsock driver (see virtio_vsock.h).
 */
#include "virtio_vsock.h"

#define TX_POLL_LIMIT (1UL << 28)

static struct virtq rxq, txq, evq;
static struct vsock_rxbuf rxbufs[VSOCK_RX_BUFS];
static u32 events[4];

static void write_addr(const struct vio_dev *d, unsigned low, const volatile void *p)
{
	u64 a = (unsigned long)p; /* identity map: virtual == physical */

	vio_write(d, low, (u32)a);
	vio_write(d, low + 4, (u32)(a >> 32));
}

/* Queue `index` with ring page `vq`, as virtio_mmio.c sets up queue 0. */
static int setup_queue(struct vio_dev *d, u32 index, struct virtq *vq)
{
	u8 *p = (u8 *)vq;

	vio_write(d, MMIO_QUEUE_SEL, index);
	if (vio_read(d, MMIO_QUEUE_READY) != 0 || vio_read(d, MMIO_QUEUE_NUM_MAX) < d->qsize)
		return VIO_EQUEUE;
	for (unsigned long i = 0; i < sizeof(*vq); i++)
		p[i] = 0;
	vq->avail.flags = VIRTQ_AVAIL_F_NO_INTERRUPT; /* we poll */
	vio_write(d, MMIO_QUEUE_NUM, d->qsize);
	write_addr(d, MMIO_QUEUE_DESC_LOW, vq->desc);
	write_addr(d, MMIO_QUEUE_DRIVER_LOW, &vq->avail);
	write_addr(d, MMIO_QUEUE_DEVICE_LOW, &vq->used);
	barrier();
	vio_write(d, MMIO_QUEUE_READY, 1);
	return 0;
}

/* Make descriptor `i` of `vq` (one device-writable buffer) available. */
static void post(struct virtq *vq, u16 qsize, u16 *avail, u16 i, void *buf, u32 len)
{
	vq->desc[i] = (struct virtq_desc){ .addr = (unsigned long)buf, .len = len, .flags = VIRTQ_DESC_F_WRITE };
	vq->avail.ring[*avail % qsize] = i;
	barrier();
	(*avail)++;
	*(volatile u16 *)&vq->avail.idx = *avail;
}

int vsock_init(struct vsock_dev *d)
{
	static struct vpci_dev fn;
	unsigned long base = vio_find(VIRTIO_ID_VSOCK);
	u16 ev_avail = 0;
	int err;

	if (!base && vio_find_pci(&d->vio, &fn, VIRTIO_ID_VSOCK) == 0)
		base = VIO_PCI_BASE;    /* behind virtio-pci: the same steps through virtio_pci.c */
	if (!base)
		return VIO_ENODEV;
	err = vio_init(&d->vio, base, VIRTIO_ID_VSOCK, 0, &rxq);
	if (err)
		return err;
	if (d->vio.qsize < VSOCK_RX_BUFS)
		return VIO_EQUEUE;
	d->tx = &txq;
	d->ev = &evq;
	d->tx_avail = d->tx_seen = 0;
	err = setup_queue(&d->vio, 1, &txq);
	if (!err)
		err = setup_queue(&d->vio, 2, &evq);
	if (err)
		return err;
	d->cid = vio_read(&d->vio, MMIO_CONFIG) | (u64)vio_read(&d->vio, MMIO_CONFIG + 4) << 32;
	for (u16 i = 0; i < VSOCK_RX_BUFS; i++)
		post(&rxq, d->vio.qsize, &d->vio.avail_idx, i, &rxbufs[i], sizeof(rxbufs[i]));
	for (u16 i = 0; i < 4; i++)
		post(&evq, d->vio.qsize, &ev_avail, i, &events[i], sizeof(events[i]));
	err = vio_driver_ok(&d->vio);
	if (err)
		return err;
	vio_write(&d->vio, MMIO_QUEUE_NOTIFY, 0);
	vio_write(&d->vio, MMIO_QUEUE_NOTIFY, 2);
	return 0;
}

int vsock_send(struct vsock_dev *d, const struct vsock_hdr *h, const void *data, u32 len)
{
	volatile u16 *used_idx = &d->tx->used.idx;
	unsigned long spins;

	if (!d->vio.ready)
		return VIO_EINVAL;
	d->tx->desc[0] = (struct virtq_desc){ .addr = (unsigned long)h, .len = sizeof(*h),
					      .flags = len ? VIRTQ_DESC_F_NEXT : 0, .next = 1 };
	d->tx->desc[1] = (struct virtq_desc){ .addr = (unsigned long)data, .len = len };
	d->tx->avail.ring[d->tx_avail % d->vio.qsize] = 0;
	barrier();
	d->tx_avail++;
	*(volatile u16 *)&d->tx->avail.idx = d->tx_avail;
	barrier();
	vio_write(&d->vio, MMIO_QUEUE_NOTIFY, 1);
	for (spins = 0; *used_idx == d->tx_seen; spins++) {
		if (spins == TX_POLL_LIMIT)
			return VIO_ETIMEOUT;
		__asm__ volatile("pause");
	}
	d->tx_seen++;
	return 0;
}

int vsock_recv(struct vsock_dev *d, struct vsock_hdr *h, void *data, u32 max, unsigned long spins)
{
	volatile u16 *used_idx = &d->vio.vq->used.idx;
	struct virtq_used_elem elem;
	struct vsock_rxbuf *b;
	u8 *out = data;

	for (unsigned long n = 0; *used_idx == d->vio.used_seen; n++) {
		if (n == spins)
			return 0;
		__asm__ volatile("pause");
	}
	barrier();
	elem = *(volatile struct virtq_used_elem *)&d->vio.vq->used.ring[d->vio.used_seen % d->vio.qsize];
	d->vio.used_seen++;
	if (elem.id >= VSOCK_RX_BUFS || elem.len < sizeof(*h))
		return VIO_EDEVICE;
	b = &rxbufs[elem.id];
	*h = b->hdr;
	if (h->len > elem.len - sizeof(*h) || h->len > VSOCK_RX_DATA)
		return VIO_EDEVICE;
	for (u32 i = 0; i < h->len && i < max; i++)
		out[i] = b->data[i];
	post(d->vio.vq, d->vio.qsize, &d->vio.avail_idx, elem.id, b, sizeof(*b));
	vio_write(&d->vio, MMIO_QUEUE_NOTIFY, 0);
	return 1;
}
