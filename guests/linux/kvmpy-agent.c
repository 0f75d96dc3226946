/*
 * kvmpy-agent.c - the guest half of kvmpy.linuxbox.LinuxSandbox: runs the host's
 * commands in a Linux guest and sends back what they did.
 *
 * A static program (glibc, gcc -static) started by the root disk's /etc/rc.local.
 * It connects to the host (CID 2) on vsock port PORT (argv[1], default 5200), which
 * the host reaches as the UNIX socket PATH_PORT (docs/vsock.md), reads one request,
 * answers, and connects again: one connection per request. The wire format is
 * kvmpy/linuxbox/protocol.py's docstring:
 *
 *   READY  answer who we are, wait for one byte from the host, then stop the machine
 *          with an out to isa-debug-exit (port 0xf4; ioperm): the host checkpoints
 *          there. Every reset comes back to just after that out, with the device's
 *          TRANSPORT_RESET on its way: wait until it has ended this connection (a read
 *          fails) before connecting again, so the next connection is never one the
 *          reset event tears down.
 *   RUN    write the files, fork + execve the program with pipes on 0, 1, 2 (its own
 *          session, the environment and working directory asked for), feed stdin,
 *          collect stdout and stderr (at most max_output bytes each, the rest read and
 *          dropped), wait4 its status, read the files to fetch (at most max_fetch
 *          bytes each), answer. The host stops and resets the machine after reading
 *          the reply, so nothing after it matters.
 *
 * The host is trusted (it owns the machine), but its request is still checked:
 * every length against what is left of the request, every string for NUL bytes.
 * Console output: one line when the first connection is made, and errors.
 * `kvmpy-agent --serve-stdin` serves one request on fd 0 (a socket) and exits: how
 * tests run the agent on the host, without a VM.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define DEFAULT_PORT 5200
#define DEBUG_EXIT_PORT 0xf4
#define VERSION 1
#define KIND_RUN 1
#define KIND_READY 2
#define REPLY_OK 0
#define REPLY_ERROR 1
#define MAX_REQUEST (64u << 20)
#define MAX_OUTPUT (64u << 20)
#define MAX_FETCH (64u << 20)
#define MAX_ITEMS 4096u
#define PATH_ENV "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

struct cursor {                 /* the request body, read front to back */
	const uint8_t *p;
	uint32_t left;
	int bad;
};

struct output {                 /* a child's stdout or stderr, bounded */
	char *data;
	uint32_t len, max;
	int truncated, fd;      /* fd: the pipe's read end, -1 once it ended */
};

struct request {
	uint32_t max_output, max_fetch;
	char **argv, **env, *cwd;
	const uint8_t *stdin_data;
	uint32_t stdin_len;
	struct cursor files, fetch;     /* parsed again when used */
	uint32_t nfiles, nfetch;
};

/* all n bytes, through EINTR and short transfers; -1 at EOF or an error */
static int transfer_full(int fd, char *p, size_t n, int writing)
{
	while (n) {
		ssize_t r = writing ? write(fd, p, n) : read(fd, p, n);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		p += r;
		n -= r;
	}
	return 0;
}

static int read_full(int fd, void *buf, size_t n)
{
	return transfer_full(fd, buf, n, 0);
}

static int write_full(int fd, const void *buf, size_t n)
{
	return transfer_full(fd, (char *)buf, n, 1);	/* write() does not modify it */
}

static uint32_t get_u32(struct cursor *c)
{
	uint32_t v;

	if (c->bad || c->left < 4) {
		c->bad = 1;
		return 0;
	}
	memcpy(&v, c->p, 4);
	c->p += 4;
	c->left -= 4;
	return v;
}

static const uint8_t *get_bytes(struct cursor *c, uint32_t *len)
{
	const uint8_t *p;

	*len = get_u32(c);
	if (c->bad || *len > c->left) {
		c->bad = 1;
		*len = 0;
		return NULL;
	}
	p = c->p;
	c->p += *len;
	c->left -= *len;
	return p;
}

/* A string of the request as a C string (malloc'd), or NULL (and c->bad) if it holds a NUL. */
static char *get_string(struct cursor *c)
{
	uint32_t len;
	const uint8_t *p = get_bytes(c, &len);
	char *s;

	if (c->bad || memchr(p, 0, len)) {
		c->bad = 1;
		return NULL;
	}
	s = malloc(len + 1);
	if (!s) {
		c->bad = 1;
		return NULL;
	}
	memcpy(s, p, len);
	s[len] = 0;
	return s;
}

static char **get_strings(struct cursor *c, const char *extra)
{
	uint32_t n = get_u32(c);
	char **v;

	if (c->bad || n > MAX_ITEMS || !(v = calloc(n + 2, sizeof(*v)))) {
		c->bad = 1;
		return NULL;
	}
	for (uint32_t i = 0; i < n; i++)
		v[i] = get_string(c);
	if (extra)
		v[n] = (char *)extra;
	return v;
}

/* Skip over the files and fetch lists, remembering where they are. */
static void skip_lists(struct cursor *c, struct request *rq)
{
	uint32_t len;

	rq->files = *c;
	rq->nfiles = get_u32(c);
	for (uint32_t i = 0; i < rq->nfiles && !c->bad && i < MAX_ITEMS; i++) {
		get_bytes(c, &len);
		get_u32(c);
		get_bytes(c, &len);
	}
	rq->fetch = *c;
	rq->nfetch = get_u32(c);
	for (uint32_t i = 0; i < rq->nfetch && !c->bad && i < MAX_ITEMS; i++)
		get_bytes(c, &len);
	if (rq->nfiles > MAX_ITEMS || rq->nfetch > MAX_ITEMS || c->left)
		c->bad = 1;
}

static int parse_run(const uint8_t *body, uint32_t len, struct request *rq)
{
	struct cursor c = { body, len, 0 };

	rq->argv = get_strings(&c, NULL);
	rq->env = get_strings(&c, NULL);
	rq->cwd = get_string(&c);
	rq->stdin_data = get_bytes(&c, &rq->stdin_len);
	skip_lists(&c, rq);
	return c.bad || !rq->argv || !rq->argv[0] ? -1 : 0;
}

/* --- replies -------------------------------------------------------------------------- */
static int send_header(int fd, int kind, int flags, int32_t wait_status)
{
	uint8_t h[12] = { 'K', 'V', 'M', 'R', VERSION, kind, flags & 0xff, flags >> 8 };

	memcpy(h + 8, &wait_status, 4);
	return write_full(fd, h, sizeof(h));
}

static int send_blob(int fd, const void *p, uint32_t len)
{
	if (write_full(fd, &len, 4))
		return -1;
	return write_full(fd, p, len);
}

/* An ERROR reply: ``what`` (and ": strerror(err)" if err is not 0). */
static void send_error(int fd, const char *what, const char *name, int err)
{
	char msg[1024];
	int n = snprintf(msg, sizeof(msg), "%s%s%s%s%s", what, name ? " " : "", name ? name : "",
			 err ? ": " : "", err ? strerror(err) : "");

	if (n < 0)
		n = 0;
	if (n >= (int)sizeof(msg))
		n = sizeof(msg) - 1;
	if (!send_header(fd, REPLY_ERROR, 0, 0))
		send_blob(fd, msg, n);
}

/* --- files in ------------------------------------------------------------------------- */
static void mkdir_parents(char *path)
{
	for (char *s = strchr(path + 1, '/'); s; s = strchr(s + 1, '/')) {
		*s = 0;
		mkdir(path, 0755);
		*s = '/';
	}
}

/* Write the request's files; 0, or -1 after an ERROR reply naming the file. */
static int write_files(int conn, struct request *rq)
{
	struct cursor c = rq->files;

	get_u32(&c);
	for (uint32_t i = 0; i < rq->nfiles; i++) {
		char *path = get_string(&c);
		uint32_t mode = get_u32(&c), len;
		const uint8_t *data = get_bytes(&c, &len);
		int fd;

		if (!path) {
			send_error(conn, "a file path holds a NUL byte", NULL, 0);
			return -1;
		}
		mkdir_parents(path);
		fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode & 07777);
		if (fd < 0 || write_full(fd, data, len) || fchmod(fd, mode & 07777) || close(fd)) {
			send_error(conn, "cannot write", path, errno);
			return -1;
		}
		free(path);
	}
	return 0;
}

/* --- the program ---------------------------------------------------------------------- */
static void child(struct request *rq, int in, int out, int err)
{
	dup2(in, 0);
	dup2(out, 1);
	dup2(err, 2);
	signal(SIGPIPE, SIG_DFL);
	setsid();
	if (chdir(rq->cwd) < 0) {
		dprintf(2, "kvmpy-agent: cannot change to %s: %s\n", rq->cwd, strerror(errno));
		_exit(127);
	}
	execvpe(rq->argv[0], rq->argv, rq->env);
	dprintf(2, "kvmpy-agent: cannot execute %s: %s\n", rq->argv[0], strerror(errno));
	_exit(127);
}

static void take(struct output *o)
{
	char scratch[65536];
	char *dst = scratch;
	size_t room = sizeof(scratch);
	ssize_t n;

	if (o->len < o->max) {
		dst = o->data + o->len;
		room = o->max - o->len;
	}
	n = read(o->fd, dst, room);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n <= 0) {
		close(o->fd);
		o->fd = -1;
		return;
	}
	if (dst == scratch)
		o->truncated = 1;
	else
		o->len += n;
}

/* Feed stdin and read both outputs until they end (or the program has exited and they
 * stay quiet: a background child may keep them open), then reap it. */
static int32_t collect(struct request *rq, pid_t pid, int in, struct output *out)
{
	uint32_t fed = 0;
	int status = 0, exited = 0;

	if (!rq->stdin_len) {
		close(in);
		in = -1;
	}
	while (out[0].fd >= 0 || out[1].fd >= 0) {
		struct pollfd p[3] = { { out[0].fd, POLLIN, 0 }, { out[1].fd, POLLIN, 0 }, { in, POLLOUT, 0 } };
		int n = poll(p, 3, exited ? 0 : 100);

		if (n == 0 && exited)
			break;
		if (n == 0 && waitpid(pid, &status, WNOHANG) == pid)
			exited = 1;
		for (int i = 0; i < 2; i++)
			if (out[i].fd >= 0 && p[i].revents)
				take(&out[i]);
		if (in >= 0 && p[2].revents) {
			ssize_t w = write(in, rq->stdin_data + fed, rq->stdin_len - fed);

			if (w > 0)
				fed += w;
			if ((w < 0 && errno != EAGAIN && errno != EINTR) || fed == rq->stdin_len) {
				close(in);
				in = -1;
			}
		}
	}
	for (int i = 0; i < 2; i++)
		if (out[i].fd >= 0)
			close(out[i].fd);
	if (in >= 0)
		close(in);
	if (!exited)
		while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
			;
	return status;
}

/* fork + execve with three pipes; the wait status, or -1 (errno) if no child could be made. */
static int spawn(struct request *rq, struct output *out, int32_t *status)
{
	int in[2], o[2], e[2];
	pid_t pid;

	if (pipe2(in, O_CLOEXEC) || pipe2(o, O_CLOEXEC) || pipe2(e, O_CLOEXEC))
		return -1;
	pid = fork();
	if (pid < 0)
		return -1;
	if (pid == 0)
		child(rq, in[0], o[1], e[1]);
	close(in[0]);
	close(o[1]);
	close(e[1]);
	fcntl(in[1], F_SETFL, O_NONBLOCK);
	out[0].fd = o[0];
	out[1].fd = e[0];
	*status = collect(rq, pid, in[1], out);
	return 0;
}

/* --- files out ------------------------------------------------------------------------ */
static int send_file(int conn, const char *path, uint32_t max)
{
	struct stat st;
	int32_t err = 0;
	uint32_t len = 0, truncated = 0, hdr[2];
	char *data = NULL;
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0 || fstat(fd, &st))
		err = errno;
	else if (!S_ISREG(st.st_mode))
		err = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
	else if (!(data = malloc(max + 1)))
		err = ENOMEM;
	while (!err) {
		ssize_t n = read(fd, data + len, max + 1 - len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			err = errno;
		if (n <= 0 || (len += n) > max)
			break;
	}
	if (err)
		len = 0;
	if (len > max) {
		len = max;
		truncated = 1;
	}
	if (fd >= 0)
		close(fd);
	memcpy(&hdr[0], &err, 4);
	hdr[1] = truncated;
	if (write_full(conn, hdr, 8) || send_blob(conn, data, len)) {
		free(data);
		return -1;
	}
	free(data);
	return 0;
}

static void run(int conn, struct request *rq)
{
	struct output out[2] = { { NULL, 0, rq->max_output, 0, -1 }, { NULL, 0, rq->max_output, 0, -1 } };
	struct cursor c = rq->fetch;
	int32_t status = 0;

	if (write_files(conn, rq))
		return;
	out[0].data = malloc(rq->max_output + 1);
	out[1].data = malloc(rq->max_output + 1);
	if (!out[0].data || !out[1].data || spawn(rq, out, &status)) {
		send_error(conn, "cannot start", rq->argv[0], errno);
		return;
	}
	if (send_header(conn, REPLY_OK, out[0].truncated | out[1].truncated << 1, status) ||
	    send_blob(conn, out[0].data, out[0].len) || send_blob(conn, out[1].data, out[1].len) ||
	    write_full(conn, &rq->nfetch, 4))
		return;
	get_u32(&c);
	for (uint32_t i = 0; i < rq->nfetch; i++) {
		char *path = get_string(&c);

		if (send_file(conn, path ? path : "", rq->max_fetch))
			return;
		free(path);
	}
}

/* --- the connection ------------------------------------------------------------------- */
static void ready(int conn)
{
	struct utsname u;
	char who[512], ack;
	int n;

	uname(&u);
	n = snprintf(who, sizeof(who), "kvmpy-agent %d on Linux %s", VERSION, u.release);
	if (send_header(conn, REPLY_OK, 0, 0) || send_blob(conn, who, n) || send_blob(conn, "", 0) ||
	    write_full(conn, "\0\0\0\0", 4) || read_full(conn, &ack, 1))
		return;
	outb(0, DEBUG_EXIT_PORT);          /* the machine stops here; the checkpoint is taken */
	/* every reset resumes here: wait for TRANSPORT_RESET to end this connection (2 s at
	 * most per read: should the event never come, connect anyway) */
	for (;;) {
		struct pollfd p = { conn, POLLIN, 0 };

		if (poll(&p, 1, 2000) <= 0 || read(conn, &ack, 1) <= 0)
			break;
	}
}

static void serve(int conn)
{
	uint8_t h[20];
	uint32_t max_output, max_fetch, len;
	struct request rq = { 0 };
	uint8_t *body;

	if (read_full(conn, h, sizeof(h)))
		return;
	memcpy(&max_output, h + 8, 4);
	memcpy(&max_fetch, h + 12, 4);
	memcpy(&len, h + 16, 4);
	if (memcmp(h, "KVMQ", 4) || h[4] != VERSION || len > MAX_REQUEST || max_output > MAX_OUTPUT ||
	    max_fetch > MAX_FETCH || !(body = malloc(len + 1))) {
		send_error(conn, "bad request header", NULL, 0);
		return;
	}
	if (read_full(conn, body, len))
		goto out;
	rq.max_output = max_output;
	rq.max_fetch = max_fetch;
	if (h[5] == KIND_READY)
		ready(conn);
	else if (h[5] != KIND_RUN || parse_run(body, len, &rq))
		send_error(conn, "malformed request", NULL, 0);
	else
		run(conn, &rq);
out:
	free(body);
}

static int connect_host(unsigned port)
{
	struct sockaddr_vm addr = { .svm_family = AF_VSOCK, .svm_port = port, .svm_cid = VMADDR_CID_HOST };

	for (;;) {
		int s = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);

		if (s >= 0 && connect(s, (struct sockaddr *)&addr, sizeof(addr)) == 0)
			return s;
		if (s >= 0)
			close(s);
		usleep(20000);          /* the host is not listening yet, or vsock is not up */
	}
}

int main(int argc, char **argv)
{
	unsigned port = argc > 1 ? (unsigned)strtoul(argv[1], NULL, 10) : DEFAULT_PORT;
	int first = 1;

	signal(SIGPIPE, SIG_IGN);
	putenv(PATH_ENV);
	if (argc > 1 && !strcmp(argv[1], "--serve-stdin")) {
		serve(0);               /* one request on fd 0 (a socket): host-side tests */
		return 0;
	}
	if (ioperm(DEBUG_EXIT_PORT, 1, 1))
		printf("kvmpy-agent: ioperm(0x%x): %s (the host cannot checkpoint)\n", DEBUG_EXIT_PORT,
		       strerror(errno));
	for (;;) {
		int conn = connect_host(port);

		if (first) {
			printf("kvmpy-agent: connected to the host's vsock port %u\n", port);
			fflush(stdout);
			first = 0;
		}
		serve(conn);
		close(conn);
	}
}
