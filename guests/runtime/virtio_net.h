/*
 * virtio_net.h - a polling virtio-net driver for the test guests (virtio 1.2,
 * section 5.1) on top of virtio_mmio.c: queue 0 receives, queue 1 transmits.
 * The device is a virtio-mmio window or, if there is none, a virtio-pci
 * function (virtio_pci.c's vio_find_pci translates the registers).
 *
 * VIRTIO_F_VERSION_1 and VIRTIO_NET_F_MAC only: every frame in either queue
 * follows a 12-byte struct virtio_net_hdr, all zeros on transmit.  NET_RX_BUFS
 * one-descriptor receive buffers of NET_BUF_SIZE bytes are kept in the ring;
 * net_recv() copies a frame out and gives its buffer back.  One frame is
 * transmitted at a time (net_send() waits for the device to return it).  No
 * interrupts: both available rings ask for none.
 */
#ifndef KVMPY_GUEST_VIRTIO_NET_H
#define KVMPY_GUEST_VIRTIO_NET_H

#include "virtio_mmio.h"
#include "virtio_pci.h"

#define VIRTIO_ID_NET       1
#define VIRTIO_NET_F_MAC    (1ULL << 5)
#define NET_HDR_SIZE        12
#define NET_BUF_SIZE        1526  /* header + a 1514-byte frame (MTU 1500) */
#define NET_FRAME_MAX       (NET_BUF_SIZE - NET_HDR_SIZE)
#define NET_RX_BUFS         8

struct net_dev {
	struct vio_dev vio;   /* queue 0 (receive) through virtio_mmio.c */
	u8 mac[6];
	u16 tx_qsize, tx_avail, tx_used_seen;
	u16 rx_used_seen;
};

/* Find and initialise the device; 0 or VIO_E* (VIO_ENODEV: no device). */
int net_init(struct net_dev *n);

/* Send one Ethernet frame of `len` bytes (<= NET_FRAME_MAX); 0 or VIO_E*. */
int net_send(struct net_dev *n, const void *frame, u32 len);

/*
 * Wait up to about `spins` polls for a received frame; copy it to `frame`
 * (NET_FRAME_MAX bytes) and return its length, 0 on timeout, or VIO_EDEVICE.
 */
int net_recv(struct net_dev *n, void *frame, unsigned long spins);

#endif
