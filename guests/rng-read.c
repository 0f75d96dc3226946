/*
 * rng-read.c - reads 4 KiB from the virtio-rng device twice and checks them.
 *
 * Finds the entropy device (DeviceID 4) in the virtio-mmio windows (after
 * the disks; kvmpy: Machine(rng=True), --rng) with runtime/virtio_mmio.c,
 * initialises it (VIRTIO_F_VERSION_1 only, queue 0) and fills two 4 KiB
 * buffers, each with one-descriptor device-writable chains until full (the
 * device may return fewer bytes than asked, virtio 1.2 5.4.6.2).  The two
 * buffers must differ and neither may be all zero.
 * Output:
 *     rng-read: reading 4096 random bytes twice
 *     rng-read: 2 x 4096 random bytes, different and not all zero
 * Exits 0x52; 0x53 (after "no virtio-rng device") without the device, 0x56
 * on a driver error ("rng-read: <what> error: <reason>"), 1 if a check
 * fails ("rng-read: the two reads are equal" / "rng-read: read <n> is all zero").
 * Started at CPL 3 like the disk guests.
 */
#include "runtime/runtime.h"
#include "runtime/virtio_mmio.h"

#define EXIT_OK        0x52
#define EXIT_NO_DEVICE 0x53
#define EXIT_ERROR     0x56

#define SIZE 4096

static struct virtq vq;
static struct vio_dev dev;
static u8 bufs[2][SIZE] __attribute__((aligned(4096)));

static int fail(const char *what, int err)
{
	puts("rng-read: ");
	puts(what);
	puts(" error: ");
	puts(vio_strerror(err));
	putc('\n');
	return EXIT_ERROR;
}

/* Fill buf[0..n) with random bytes, one chain per round trip. */
static int fill(u8 *buf, u32 n)
{
	u32 got = 0, len;
	int err;

	while (got < n) {
		vq.desc[0] = (struct virtq_desc){
			.addr = (unsigned long)(buf + got), .len = n - got,
			.flags = VIRTQ_DESC_F_WRITE, .next = 0,
		};
		err = vio_submit(&dev, &len);
		if (err)
			return err;
		if (len == 0 || len > n - got)
			return VIO_EDEVICE;   /* nothing, or more than the buffer holds */
		got += len;
	}
	return 0;
}

static int all_zero(const u8 *p)
{
	for (int i = 0; i < SIZE; i++)
		if (p[i])
			return 0;
	return 1;
}

int main(void)
{
	unsigned long base;
	int err, same = 1;

	puts("rng-read: reading 4096 random bytes twice\n");
	base = vio_find(VIRTIO_ID_ENTROPY);
	if (!base) {
		puts("no virtio-rng device\n");
		return EXIT_NO_DEVICE;
	}
	err = vio_init(&dev, base, VIRTIO_ID_ENTROPY, 0, &vq);
	if (!err)
		err = vio_driver_ok(&dev);
	if (err)
		return fail("init", err);
	for (int k = 0; k < 2; k++) {
		err = fill(bufs[k], SIZE);
		if (err)
			return fail("read", err);
	}
	for (int i = 0; i < SIZE; i++)
		if (bufs[0][i] != bufs[1][i])
			same = 0;
	if (same) {
		puts("rng-read: the two reads are equal\n");
		return EXIT_SELFCHECK_FAILED;
	}
	for (int k = 0; k < 2; k++)
		if (all_zero(bufs[k])) {
			puts("rng-read: read ");
			print_dec(k + 1);
			puts(" is all zero\n");
			return EXIT_SELFCHECK_FAILED;
		}
	puts("rng-read: 2 x 4096 random bytes, different and not all zero\n");
	return EXIT_OK;
}
