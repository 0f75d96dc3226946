/*
 * net-udp.c - gets an address by DHCP over virtio-net and exchanges one UDP
 * datagram with a server on the host.
 *
 * With runtime/virtio_net.c it broadcasts a DHCPDISCOVER from the device's
 * MAC, takes the first DHCPOFFER (its address, its router option, and the
 * server's MAC from the frame), then sends "hello from the guest" from UDP
 * port 40124 to port 40123 of the router, and waits for the answer.  Behind
 * passt (kvmpy --net passt) the router's address is the host's loopback, so
 * a server on the host's 127.0.0.1:40123 answers; on a TAP the test plays
 * the DHCP server and the router is the TAP's host address.  IPv4 only, no
 * ARP (the server's MAC comes with the offer; the host side must know ours
 * from the frames we send, as passt does, or from a neighbour entry).
 * Output:
 *     net-udp: mac 02:6b:76:6d:70:01
 *     net-udp: address 192.0.2.2 router 192.0.2.1
 *     net-udp: the host says '<its answer>'
 * With "flood=N" on the fw_cfg command line (kvmpy --cmdline) it then sends N
 * datagrams of 1400 bytes (each starting with its sequence number) and one
 * "flood done" to the same port, one frame per notify, and prints
 * "net-udp: flooding N datagrams" and "net-udp: flood sent" (a throughput test).
 * Exits 0x62; 0x63 (after "no virtio-net device") without the device, 0x66
 * on a driver error ("net-udp: <what> error: <reason>"), 0x67 if no DHCP
 * offer or no answer came ("net-udp: no DHCP offer" / "net-udp: no answer").
 * Started at CPL 3 like the disk guests.
 */
#include "runtime/runtime.h"
#include "runtime/virtio_net.h"

#define EXIT_OK        0x62
#define EXIT_NO_DEVICE 0x63
#define EXIT_ERROR     0x66
#define EXIT_NO_ANSWER 0x67

#define SERVER_PORT 40123
#define FLOOD_BYTES 1400          /* payload of each datagram of a flood */
#define FLOOD_MAX   10000000UL
#define CMDLINE_MAX 128
#define FW_CFG_PORT_SEL     0x510 /* QEMU's fw_cfg (kvmpy/devices/fwcfg.py) */
#define FW_CFG_PORT_DATA    0x511
#define FW_CFG_SIGNATURE    0x00
#define FW_CFG_CMDLINE_SIZE 0x14
#define FW_CFG_CMDLINE_DATA 0x15
#define CLIENT_PORT 40124
#define DHCP_XID    0x6b766d70u
#define WAIT_SPINS  (1UL << 25)   /* polls of the used ring per frame waited for */
#define TRIES       40            /* empty waits before giving up; every 4th resends */

static struct net_dev net;
static u8 frame[NET_FRAME_MAX], pkt[NET_FRAME_MAX];
static u8 my_ip[4], router[4], server_mac[6];
static const char hello[] = "hello from the guest";

static inline void outw(u16 port, u16 v)
{
	__asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port));
}

static u32 fw_le32(u16 key)
{
	u32 v = 0;

	outw(FW_CFG_PORT_SEL, key);
	for (int i = 0; i < 4; i++)
		v |= (u32)inb(FW_CFG_PORT_DATA) << (8 * i);
	return v;
}

/* N of "flood=N" on the fw_cfg command line (kvmpy --cmdline), or 0. */
static unsigned long flood_count(void)
{
	static char line[CMDLINE_MAX + 1];
	static const char key[] = "flood=";
	unsigned long n = 0;
	u32 size;

	if (fw_le32(FW_CFG_SIGNATURE) != 0x554d4551) /* "QEMU" */
		return 0;
	size = fw_le32(FW_CFG_CMDLINE_SIZE);
	if (size > CMDLINE_MAX)
		size = CMDLINE_MAX;
	outw(FW_CFG_PORT_SEL, FW_CFG_CMDLINE_DATA);
	for (u32 i = 0; i < size; i++)
		line[i] = (char)inb(FW_CFG_PORT_DATA);
	line[size] = 0;
	for (u32 i = 0; i + sizeof(key) - 1 <= size; i++) {
		u32 k = 0;

		while (key[k] && line[i + k] == key[k])
			k++;
		if (key[k])
			continue;
		for (i += k; line[i] >= '0' && line[i] <= '9' && n <= FLOOD_MAX; i++)
			n = n * 10 + (unsigned long)(line[i] - '0');
		return n > FLOOD_MAX ? FLOOD_MAX : n;
	}
	return 0;
}

static u16 be16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static void put16(u8 *p, u16 v) { p[0] = v >> 8; p[1] = (u8)v; }

static int fail(const char *what, int err)
{
	puts("net-udp: ");
	puts(what);
	puts(" error: ");
	puts(vio_strerror(err));
	putc('\n');
	return EXIT_ERROR;
}

static void print_ip(const u8 *ip)
{
	for (int i = 0; i < 4; i++) {
		if (i)
			putc('.');
		print_dec(ip[i]);
	}
}

static void print_mac(const u8 *m)
{
	static const char hex[] = "0123456789abcdef";

	for (int i = 0; i < 6; i++) {
		if (i)
			putc(':');
		putc(hex[m[i] >> 4]);
		putc(hex[m[i] & 15]);
	}
}

static u16 ip_checksum(const u8 *p, int n)
{
	u32 s = 0;

	for (int i = 0; i < n; i += 2)
		s += be16(p + i);
	while (s >> 16)
		s = (s & 0xffff) + (s >> 16);
	return (u16)~s;
}

/* An Ethernet + IPv4 + UDP frame in pkt; returns its length. */
static u32 udp_frame(const u8 *dst_mac, const u8 *src_ip, const u8 *dst_ip,
		     u16 sport, u16 dport, const u8 *data, u32 len)
{
	u8 *ip = pkt + 14, *udp = ip + 20;

	for (int i = 0; i < 6; i++) {
		pkt[i] = dst_mac[i];
		pkt[6 + i] = net.mac[i];
	}
	put16(pkt + 12, 0x0800);
	for (int i = 0; i < 20; i++)
		ip[i] = 0;
	ip[0] = 0x45;
	put16(ip + 2, (u16)(28 + len));
	ip[6] = 0x40;              /* don't fragment */
	ip[8] = 64;                /* TTL */
	ip[9] = 17;                /* UDP */
	for (int i = 0; i < 4; i++) {
		ip[12 + i] = src_ip[i];
		ip[16 + i] = dst_ip[i];
	}
	put16(ip + 10, ip_checksum(ip, 20));
	put16(udp, sport);
	put16(udp + 2, dport);
	put16(udp + 4, (u16)(8 + len));
	put16(udp + 6, 0);         /* no UDP checksum (IPv4 allows it) */
	for (u32 i = 0; i < len; i++)
		udp[8 + i] = data[i];
	return 42 + len;
}

/* The UDP payload of `f` if it is IPv4/UDP to `dport`, with its length in *len. */
static const u8 *udp_payload(const u8 *f, int n, u16 dport, u32 *len)
{
	int ihl;
	u32 ulen;

	if (n < 42 || be16(f + 12) != 0x0800 || f[23] != 17)
		return 0;
	ihl = (f[14] & 15) * 4;
	if (ihl < 20 || n < 14 + ihl + 8 || be16(f + 14 + ihl + 2) != dport)
		return 0;
	ulen = be16(f + 14 + ihl + 4);
	if (ulen < 8 || 14 + ihl + ulen > (u32)n)
		return 0;
	*len = ulen - 8;
	return f + 14 + ihl + 8;
}

static u32 dhcp_discover(void)
{
	static u8 bootp[244 + 8];
	static const u8 zero[4], all[4] = { 255, 255, 255, 255 }, bcast[6] = { 255, 255, 255, 255, 255, 255 };
	u32 n = 0;

	for (u32 i = 0; i < sizeof(bootp); i++)
		bootp[i] = 0;
	bootp[0] = 1;              /* BOOTREQUEST */
	bootp[1] = 1;              /* Ethernet */
	bootp[2] = 6;
	for (int i = 0; i < 4; i++)
		bootp[4 + i] = (u8)(DHCP_XID >> (24 - 8 * i));
	bootp[10] = 0x80;          /* broadcast the reply */
	for (int i = 0; i < 6; i++)
		bootp[28 + i] = net.mac[i];
	n = 236;
	bootp[n++] = 99; bootp[n++] = 130; bootp[n++] = 83; bootp[n++] = 99;   /* magic cookie */
	bootp[n++] = 53; bootp[n++] = 1; bootp[n++] = 1;                       /* DHCPDISCOVER */
	bootp[n++] = 55; bootp[n++] = 1; bootp[n++] = 3;                       /* we want the router */
	bootp[n++] = 255;
	return udp_frame(bcast, zero, all, 68, 67, bootp, n);
}

/* 1 if `f` is an offer for our DISCOVER: my_ip, router and server_mac set. */
static int take_offer(const u8 *f, int n)
{
	u32 len, i = 240;
	const u8 *b = udp_payload(f, n, 68, &len);

	if (!b || len < 240 || b[0] != 2 || b[4] != (u8)(DHCP_XID >> 24) || b[7] != (u8)DHCP_XID)
		return 0;
	for (int k = 0; k < 4; k++)
		my_ip[k] = b[16 + k];
	while (i + 1 < len && b[i] != 255) {
		if (b[i] == 0) {
			i++;
			continue;
		}
		if (b[i] == 3 && b[i + 1] >= 4 && i + 6 <= len)
			for (int k = 0; k < 4; k++)
				router[k] = b[i + 2 + k];
		i += 2 + b[i + 1];
	}
	for (int k = 0; k < 6; k++)
		server_mac[k] = f[6 + k];
	return router[0] | router[1] | router[2] | router[3];
}

/* After the exchange: n datagrams of FLOOD_BYTES to the server, then "flood done". */
static int flood(unsigned long n)
{
	static u8 data[FLOOD_BYTES];
	static const char done[] = "flood done";
	int err;

	puts("net-udp: flooding ");
	print_dec(n);
	puts(" datagrams\n");
	for (unsigned long i = 0; i < n; i++) {
		for (int k = 0; k < 8; k++)
			data[k] = (u8)(i >> (8 * k));   /* the sequence number, little-endian */
		err = net_send(&net, pkt, udp_frame(server_mac, my_ip, router, CLIENT_PORT, SERVER_PORT,
						      data, FLOOD_BYTES));
		if (err)
			return fail("send", err);
	}
	err = net_send(&net, pkt, udp_frame(server_mac, my_ip, router, CLIENT_PORT, SERVER_PORT,
					      (const u8 *)done, sizeof(done) - 1));
	if (err)
		return fail("send", err);
	puts("net-udp: flood sent\n");
	return EXIT_OK;
}

int main(void)
{
	u32 len;
	const u8 *answer;
	int n, err, got = 0;
	unsigned long flood_n = flood_count();

	err = net_init(&net);
	if (err == VIO_ENODEV) {
		puts("no virtio-net device\n");
		return EXIT_NO_DEVICE;
	}
	if (err)
		return fail("init", err);
	puts("net-udp: mac ");
	print_mac(net.mac);
	putc('\n');

	for (int t = 0, resend = 1; !got; resend = 0) {
		if (resend) {              /* first, and again after every 4 empty waits */
			err = net_send(&net, pkt, dhcp_discover());
			if (err)
				return fail("send", err);
		}
		n = net_recv(&net, frame, WAIT_SPINS);
		if (n < 0)
			return fail("receive", n);
		if (n == 0) {
			if (++t == TRIES)
				break;
			resend = t % 4 == 0;
			continue;
		}
		got = take_offer(frame, n);
	}
	if (!got) {
		puts("net-udp: no DHCP offer\n");
		return EXIT_NO_ANSWER;
	}
	puts("net-udp: address ");
	print_ip(my_ip);
	puts(" router ");
	print_ip(router);
	putc('\n');

	for (int t = 0, resend = 1; t < TRIES; resend = 0) {
		if (resend) {              /* first, and again after every 4 empty waits */
			err = net_send(&net, pkt, udp_frame(server_mac, my_ip, router, CLIENT_PORT, SERVER_PORT,
							      (const u8 *)hello, sizeof(hello) - 1));
			if (err)
				return fail("send", err);
		}
		n = net_recv(&net, frame, WAIT_SPINS);
		if (n < 0)
			return fail("receive", n);
		if (n == 0) {
			t++;
			resend = t % 4 == 0;
			continue;
		}
		answer = udp_payload(frame, n, CLIENT_PORT, &len);
		if (answer) {
			puts("net-udp: the host says '");
			for (u32 i = 0; i < len && i < 200; i++)
				putc(answer[i] >= 32 && answer[i] < 127 ? answer[i] : '?');
			puts("'\n");
			return flood_n ? flood(flood_n) : EXIT_OK;
		}
	}
	puts("net-udp: no answer\n");
	return EXIT_NO_ANSWER;
}
