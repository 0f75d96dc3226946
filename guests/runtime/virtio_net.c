/*
 * virtio_net.c - the polling virtio-net driver of the test guests (see
 * virtio_net.h).  Spec references are to virtio 1.2: 5.1 the network device,
 * 2.7 split virtqueues, 4.2.2 the MMIO registers.
 */
#include "virtio_net.h"

static struct virtq rxq, txq;
static u8 rx_bufs[NET_RX_BUFS][NET_BUF_SIZE] __attribute__((aligned(64)));
static u8 tx_buf[NET_BUF_SIZE] __attribute__((aligned(64)));

static void copy(u8 *dst, const u8 *src, u32 n)
{
	for (u32 i = 0; i < n; i++)
		dst[i] = src[i];
}

static void write_addr(const struct vio_dev *d, unsigned low, const volatile void *p)
{
	u64 a = (unsigned long)p;

	vio_write(d, low, (u32)a);
	vio_write(d, low + 4, (u32)(a >> 32));
}

/* Queue 1, the transmit queue: the same steps as virtio_mmio.c's queue 0. */
static int setup_txq(struct net_dev *n)
{
	struct vio_dev *d = &n->vio;
	u32 max;

	vio_write(d, MMIO_QUEUE_SEL, 1);
	if (vio_read(d, MMIO_QUEUE_READY) != 0)
		return VIO_EQUEUE;
	max = vio_read(d, MMIO_QUEUE_NUM_MAX);
	n->tx_qsize = VIO_QUEUE_MAX;
	while (n->tx_qsize > max)
		n->tx_qsize >>= 1;
	if (n->tx_qsize < 1)
		return VIO_EQUEUE;
	n->tx_avail = n->tx_used_seen = 0;
	txq.avail.flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
	vio_write(d, MMIO_QUEUE_NUM, n->tx_qsize);
	write_addr(d, MMIO_QUEUE_DESC_LOW, txq.desc);
	write_addr(d, MMIO_QUEUE_DRIVER_LOW, &txq.avail);
	write_addr(d, MMIO_QUEUE_DEVICE_LOW, &txq.used);
	barrier();
	vio_write(d, MMIO_QUEUE_READY, 1);
	return 0;
}

/* Offer receive buffer `i` (descriptor i) again. */
static void post_rx(struct net_dev *n, u16 i)
{
	struct vio_dev *d = &n->vio;

	rxq.desc[i] = (struct virtq_desc){
		.addr = (unsigned long)rx_bufs[i], .len = NET_BUF_SIZE,
		.flags = VIRTQ_DESC_F_WRITE, .next = 0,
	};
	rxq.avail.ring[d->avail_idx % d->qsize] = i;
	barrier();
	d->avail_idx++;
	*(volatile u16 *)&rxq.avail.idx = d->avail_idx;
}

int net_init(struct net_dev *n)
{
	static struct vpci_dev fn;
	struct vio_dev *d = &n->vio;
	unsigned long base = vio_find(VIRTIO_ID_NET);
	int err;

	if (!base && vio_find_pci(d, &fn, VIRTIO_ID_NET) == 0)
		base = VIO_PCI_BASE;    /* behind virtio-pci: the same steps through virtio_pci.c */
	if (!base)
		return VIO_ENODEV;
	err = vio_init(d, base, VIRTIO_ID_NET, VIRTIO_NET_F_MAC, &rxq);
	if (err)
		return err;
	err = setup_txq(n);
	if (err)
		return err;
	for (int i = 0; i < 6; i++)   /* 5.1.4: mac, read byte by byte */
		n->mac[i] = d->pci ? *(volatile u8 *)(((struct vpci_dev *)d->pci)->device + i)
				   : *(volatile u8 *)(d->base + MMIO_CONFIG + i);
	err = vio_driver_ok(d);
	if (err)
		return err;
	n->rx_used_seen = 0;
	for (u16 i = 0; i < NET_RX_BUFS && i < d->qsize; i++)
		post_rx(n, i);
	barrier();
	vio_write(d, MMIO_QUEUE_NOTIFY, 0);
	return 0;
}

int net_send(struct net_dev *n, const void *frame, u32 len)
{
	struct vio_dev *d = &n->vio;
	volatile u16 *used_idx = &txq.used.idx;
	unsigned long spins;

	if (!d->ready || len > NET_FRAME_MAX)
		return VIO_EINVAL;
	for (int i = 0; i < NET_HDR_SIZE; i++)
		tx_buf[i] = 0;             /* no offloads: an all-zero header */
	copy(tx_buf + NET_HDR_SIZE, frame, len);
	txq.desc[0] = (struct virtq_desc){
		.addr = (unsigned long)tx_buf, .len = NET_HDR_SIZE + len, .flags = 0, .next = 0,
	};
	txq.avail.ring[n->tx_avail % n->tx_qsize] = 0;
	barrier();
	n->tx_avail++;
	*(volatile u16 *)&txq.avail.idx = n->tx_avail;
	barrier();
	vio_write(d, MMIO_QUEUE_NOTIFY, 1);
	for (spins = 0; *used_idx == n->tx_used_seen; spins++) {
		if (spins == (1UL << 26))
			return VIO_ETIMEOUT;
		__asm__ volatile("pause");
	}
	barrier();
	n->tx_used_seen++;
	return 0;
}

int net_recv(struct net_dev *n, void *frame, unsigned long spins)
{
	struct vio_dev *d = &n->vio;
	volatile u16 *used_idx = &rxq.used.idx;
	struct virtq_used_elem elem;
	u32 len;

	for (;;) {
		while (*used_idx == n->rx_used_seen) {
			if (spins-- == 0)
				return 0;
			__asm__ volatile("pause");
		}
		barrier();
		elem = *(volatile struct virtq_used_elem *)&rxq.used.ring[n->rx_used_seen % d->qsize];
		n->rx_used_seen++;
		if (elem.id >= NET_RX_BUFS || elem.len > NET_BUF_SIZE)
			return VIO_EDEVICE;
		len = elem.len < NET_HDR_SIZE ? 0 : elem.len - NET_HDR_SIZE;
		copy(frame, rx_bufs[elem.id] + NET_HDR_SIZE, len);
		post_rx(n, (u16)elem.id);
		barrier();
		vio_write(d, MMIO_QUEUE_NOTIFY, 0);
		if (len)                   /* an empty buffer (a dropped frame): wait on */
			return (int)len;
	}
}
