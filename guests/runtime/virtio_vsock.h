/*
 * virtio_vsock.h - a polling virtio-vsock driver (virtio 1.2, section 5.10)
 * for the bundled guests: three queues (0 rx, 1 tx, 2 event), one packet
 * per rx buffer, one tx chain in flight, no interrupts.
 *
 * Built on virtio_mmio.c: vio_init() sets up queue 0 (rx) and negotiates
 * VIRTIO_F_VERSION_1; vsock_init() adds the tx and event queues, reads the
 * guest CID from the configuration space and posts the rx and event
 * buffers.  Connection state (ports, credit) is the caller's: the driver
 * only moves packets (struct vsock_hdr plus payload).
 */
#ifndef KVMPY_GUEST_VIRTIO_VSOCK_H
#define KVMPY_GUEST_VIRTIO_VSOCK_H

#include "virtio_mmio.h"
#include "virtio_pci.h"

#define VIRTIO_ID_VSOCK 19
#define VSOCK_CID_HOST  2
#define VSOCK_TYPE_STREAM 1

/* struct virtio_vsock_hdr.op */
#define VSOCK_OP_REQUEST        1
#define VSOCK_OP_RESPONSE       2
#define VSOCK_OP_RST            3
#define VSOCK_OP_SHUTDOWN       4
#define VSOCK_OP_RW             5
#define VSOCK_OP_CREDIT_UPDATE  6
#define VSOCK_OP_CREDIT_REQUEST 7
#define VSOCK_SHUTDOWN_BOTH     3

/* Each rx buffer: a header and up to VSOCK_RX_DATA bytes of payload. */
#define VSOCK_RX_BUFS 8
#define VSOCK_RX_DATA 4096

struct vsock_hdr {
	u64 src_cid;
	u64 dst_cid;
	u32 src_port;
	u32 dst_port;
	u32 len;
	u16 type;
	u16 op;
	u32 flags;
	u32 buf_alloc;
	u32 fwd_cnt;
} __attribute__((packed));

struct vsock_rxbuf {
	struct vsock_hdr hdr;
	u8 data[VSOCK_RX_DATA];
} __attribute__((packed));

struct vsock_dev {
	struct vio_dev vio;     /* queue 0 (rx) and the device */
	struct virtq *tx, *ev;
	u16 tx_avail, tx_seen;
	u64 cid;                /* ours, from the configuration space */
};

/* Find and initialise the device; 0 or VIO_E*. */
int vsock_init(struct vsock_dev *d);

/* Send one packet (header, then `len` bytes of `data`); 0 or VIO_E*. */
int vsock_send(struct vsock_dev *d, const struct vsock_hdr *h, const void *data, u32 len);

/*
 * Wait (at most `spins` polls) for the next rx packet; copy its header to
 * *h and up to `max` payload bytes to `data`, repost the buffer.  Returns
 * 1 (a packet), 0 (none in time) or VIO_EDEVICE (a malformed used entry).
 */
int vsock_recv(struct vsock_dev *d, struct vsock_hdr *h, void *data, u32 max, unsigned long spins);

#endif
