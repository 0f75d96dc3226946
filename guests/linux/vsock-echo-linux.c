/*
 * vsock-echo-linux.c - the vsock-echo guest's job as a Linux program (a
 * static x86-64 executable with no libc: raw system calls), for tests that
 * boot Debian's kernel with vmw_vsock_virtio_transport on kvmpy's device.
 *
 *  1. listens on vsock port 1234 (any CID), accepts one connection, echoes
 *     it until the host closes it;
 *  2. connects to the host (CID 2) port 5678, sends "hello from linux\n"
 *     and prints the line that comes back.
 * Output (stdout):
 *     vsock-echo-linux: listening on port 1234
 *     vsock-echo-linux: echoed <n> bytes
 *     vsock-echo-linux: host says: <line>
 * Exit status 0, or 1 after "vsock-echo-linux: <call> failed: -<errno>".
 */
typedef unsigned long u64;

#define SYS_read    0
#define SYS_write   1
#define SYS_close   3
#define SYS_socket  41
#define SYS_connect 42
#define SYS_accept  43
#define SYS_bind    49
#define SYS_listen  50
#define SYS_exit    60

#define AF_VSOCK        40
#define SOCK_STREAM     1
#define VMADDR_CID_ANY  0xFFFFFFFFu
#define VMADDR_CID_HOST 2

struct sockaddr_vm {
	unsigned short svm_family;
	unsigned short svm_reserved1;
	unsigned int svm_port;
	unsigned int svm_cid;
	unsigned char svm_zero[4];
};

static long sys3(long n, long a, long b, long c)
{
	long r;

	__asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
	return r;
}

static void out(const char *s)
{
	long n = 0;

	while (s[n])
		n++;
	sys3(SYS_write, 1, (long)s, n);
}

static void out_dec(u64 v)
{
	char buf[24];
	int i = sizeof(buf) - 1;

	buf[i] = 0;
	do {
		buf[--i] = '0' + v % 10;
		v /= 10;
	} while (v);
	out(buf + i);
}

static __attribute__((noreturn)) void quit(int status)
{
	sys3(SYS_exit, status, 0, 0);
	__builtin_unreachable();
}

static long check(long r, const char *what)
{
	if (r < 0) {
		out("vsock-echo-linux: ");
		out(what);
		out(" failed: -");
		out_dec(-r);
		out("\n");
		quit(1);
	}
	return r;
}

static char buf[65536];

static void run(void)
{
	struct sockaddr_vm addr = { .svm_family = AF_VSOCK, .svm_port = 1234, .svm_cid = VMADDR_CID_ANY };
	long s, c, n, got = 0;
	u64 echoed = 0;

	s = check(sys3(SYS_socket, AF_VSOCK, SOCK_STREAM, 0), "socket");
	check(sys3(SYS_bind, s, (long)&addr, sizeof(addr)), "bind");
	check(sys3(SYS_listen, s, 1, 0), "listen");
	out("vsock-echo-linux: listening on port 1234\n");
	c = check(sys3(SYS_accept, s, 0, 0), "accept");
	while ((n = check(sys3(SYS_read, c, (long)buf, sizeof(buf)), "read")) > 0) {
		for (long done = 0; done < n;)
			done += check(sys3(SYS_write, c, (long)buf + done, n - done), "write");
		echoed += n;
	}
	sys3(SYS_close, c, 0, 0);
	sys3(SYS_close, s, 0, 0);
	out("vsock-echo-linux: echoed ");
	out_dec(echoed);
	out(" bytes\n");

	addr = (struct sockaddr_vm){ .svm_family = AF_VSOCK, .svm_port = 5678, .svm_cid = VMADDR_CID_HOST };
	s = check(sys3(SYS_socket, AF_VSOCK, SOCK_STREAM, 0), "socket");
	check(sys3(SYS_connect, s, (long)&addr, sizeof(addr)), "connect");
	check(sys3(SYS_write, s, (long)"hello from linux\n", 17), "write");
	while (got < (long)sizeof(buf) - 1 && (!got || buf[got - 1] != '\n')) {
		n = check(sys3(SYS_read, s, (long)buf + got, sizeof(buf) - 1 - got), "read");
		if (!n)
			break;
		got += n;
	}
	buf[got] = 0;
	sys3(SYS_close, s, 0, 0);
	out("vsock-echo-linux: host says: ");
	out(buf);
}

void _start(void)
{
	run();
	quit(0);
}
