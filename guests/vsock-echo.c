/*
 * vsock-echo.c - a vsock echo server, then a vsock client, over virtio-vsock.
 *
 * Finds the socket device (DeviceID 19; kvmpy: Machine(vsock=PATH), --vsock
 * PATH) with runtime/virtio_vsock.c and reads its CID.  Then:
 *  1. listens on port 1234: accepts one connection from the host (a host
 *     program connects to PATH and writes "CONNECT 1234\n"), echoes every
 *     byte back until the host shuts the connection down.  It advertises a
 *     4 KiB receive buffer, so anything longer runs on credit updates (each
 *     echoed packet carries the bytes consumed);
 *  2. connects to host port 5678 (a listener on PATH_5678), sends
 *     "hello from the guest\n" and prints the line that comes back.
 * Output:
 *     vsock-echo: echo on port 1234, then call host port 5678
 *     vsock-echo: cid <n>, listening on port 1234
 *     vsock-echo: echoed <n> bytes
 *     vsock-echo: host says: <line>
 *     vsock-echo: done
 * Exits 0x60; 0x61 (after "no virtio-vsock device") without the device,
 * 0x66 on an error ("vsock-echo: <what>").  Started at CPL 3.
 */
#include "runtime/runtime.h"
#include "runtime/virtio_vsock.h"

#define EXIT_OK        0x60
#define EXIT_NO_DEVICE 0x61
#define EXIT_ERROR     0x66

#define ECHO_PORT  1234
#define HOST_PORT  5678
#define LOCAL_PORT 5000
#define BUF_ALLOC  4096
#define WAIT       (1UL << 31) /* polls before giving up on the host */

static struct vsock_dev dev;

/* One connection's state: the peer, what we sent and consumed, its credit. */
struct conn {
	u32 local, peer;
	u32 tx_cnt, fwd_cnt;          /* bytes sent; bytes received and consumed */
	u32 peer_buf_alloc, peer_fwd_cnt;
};

static u8 pend[BUF_ALLOC];            /* received, not yet echoed */
static u32 pend_len;
static u8 rx[VSOCK_RX_DATA];

static int fail(const char *what)
{
	puts("vsock-echo: ");
	puts(what);
	putc('\n');
	return EXIT_ERROR;
}

static int send(struct conn *c, u16 op, u32 flags, const void *data, u32 len)
{
	struct vsock_hdr h = {
		.src_cid = dev.cid, .dst_cid = VSOCK_CID_HOST, .src_port = c->local, .dst_port = c->peer,
		.len = len, .type = VSOCK_TYPE_STREAM, .op = op, .flags = flags,
		.buf_alloc = BUF_ALLOC, .fwd_cnt = c->fwd_cnt,
	};
	c->tx_cnt += len;
	return vsock_send(&dev, &h, data, len);
}

static u32 credit(const struct conn *c)
{
	return c->peer_buf_alloc - (c->tx_cnt - c->peer_fwd_cnt);
}

/* Next packet for connection c (others get RST); 1, 0 (timeout) or < 0. */
static int recv(struct conn *c, struct vsock_hdr *h)
{
	for (;;) {
		int got = vsock_recv(&dev, h, rx, sizeof(rx), WAIT);

		if (got <= 0)
			return got;
		if (h->dst_port == c->local && (c->peer == 0 || h->src_port == c->peer)) {
			c->peer_buf_alloc = h->buf_alloc;
			c->peer_fwd_cnt = h->fwd_cnt;
			return 1;
		}
		if (h->op != VSOCK_OP_RST) {
			struct conn other = { .local = h->dst_port, .peer = h->src_port };
			send(&other, VSOCK_OP_RST, 0, 0, 0);
		}
	}
}

/* Echo what we hold, as far as the host's credit goes. */
static int echo_pending(struct conn *c)
{
	u32 n = pend_len < credit(c) ? pend_len : credit(c);

	if (!n)
		return 0;
	c->fwd_cnt += n;          /* consumed: the header tells the host it has room again */
	if (send(c, VSOCK_OP_RW, 0, pend, n))
		return -1;
	for (u32 i = n; i < pend_len; i++)
		pend[i - n] = pend[i];
	pend_len -= n;
	return 0;
}

static int serve_echo(unsigned long *echoed)
{
	struct conn c = { .local = ECHO_PORT };
	struct vsock_hdr h;

	if (recv(&c, &h) != 1 || h.op != VSOCK_OP_REQUEST)
		return fail("no connection request on port 1234");
	c.peer = h.src_port;
	if (send(&c, VSOCK_OP_RESPONSE, 0, 0, 0))
		return fail("send error");
	for (;;) {
		if (recv(&c, &h) != 1)
			return fail("the host went silent");
		if (h.op == VSOCK_OP_RW) {
			if (h.len > BUF_ALLOC - pend_len)
				return fail("the host sent past its credit");
			for (u32 i = 0; i < h.len; i++)
				pend[pend_len + i] = rx[i];
			pend_len += h.len;
			*echoed += h.len;
		} else if (h.op == VSOCK_OP_CREDIT_REQUEST) {
			send(&c, VSOCK_OP_CREDIT_UPDATE, 0, 0, 0);
		} else if (h.op == VSOCK_OP_SHUTDOWN || h.op == VSOCK_OP_RST) {
			if (h.op == VSOCK_OP_SHUTDOWN)
				send(&c, VSOCK_OP_RST, 0, 0, 0);
			return pend_len ? fail("the host left before its echo") : 0;
		}
		if (echo_pending(&c))
			return fail("send error");
	}
}

static int call_host(void)
{
	static const char msg[] = "hello from the guest\n";
	struct conn c = { .local = LOCAL_PORT, .peer = HOST_PORT };
	struct vsock_hdr h;
	u32 got = 0;

	if (send(&c, VSOCK_OP_REQUEST, 0, 0, 0))
		return fail("send error");
	h.op = 0;
	if (recv(&c, &h) != 1 || h.op != VSOCK_OP_RESPONSE)
		return fail(h.op == VSOCK_OP_RST ? "host port 5678 refused" : "no answer from host port 5678");
	if (credit(&c) < sizeof(msg) - 1 || send(&c, VSOCK_OP_RW, 0, msg, sizeof(msg) - 1))
		return fail("cannot send to host port 5678");
	puts("vsock-echo: host says: ");
	while (!got || pend[got - 1] != '\n') {
		if (recv(&c, &h) != 1 || h.op != VSOCK_OP_RW)
			return fail("no reply from host port 5678");
		for (u32 i = 0; i < h.len && got < sizeof(pend); i++) {
			pend[got++] = rx[i];
			putc(rx[i]);
		}
		c.fwd_cnt += h.len;
	}
	send(&c, VSOCK_OP_SHUTDOWN, VSOCK_SHUTDOWN_BOTH, 0, 0);
	return recv(&c, &h) == 1 && h.op == VSOCK_OP_RST ? 0 : fail("no RST after our SHUTDOWN");
}

int main(void)
{
	unsigned long echoed = 0;
	int err;

	puts("vsock-echo: echo on port 1234, then call host port 5678\n");
	err = vsock_init(&dev);
	if (err == VIO_ENODEV) {
		puts("no virtio-vsock device\n");
		return EXIT_NO_DEVICE;
	}
	if (err)
		return fail(vio_strerror(err));
	puts("vsock-echo: cid ");
	print_dec(dev.cid);
	puts(", listening on port 1234\n");
	err = serve_echo(&echoed);
	if (err)
		return err;
	puts("vsock-echo: echoed ");
	print_dec(echoed);
	puts(" bytes\n");
	err = call_host();
	if (err)
		return err;
	puts("vsock-echo: done\n");
	return EXIT_OK;
}
