/*
 * runloop.c - the native vCPU loop: KVM_RUN from C, with the GIL released.
 *
 * kvmpy_run() enters the guest and serves, without returning to Python, the exits
 * in its fast-path table: port I/O on the UART, writes to unclaimed ports (counted
 * and dropped), reads of unclaimed ports (all ones), and unclaimed MMIO (reads are
 * zero, writes counted and dropped). Any other exit, a signal (EINTR, e.g. a
 * timeout kick through immediate_exit) or a full UART output buffer returns to
 * Python, which dispatches it through the same buses and calls kvmpy_run again.
 * It never calls back into Python and never allocates.
 *
 * A kick (Vcpu.kick: immediate_exit = 1, then the kick signal) is obeyed at the next
 * exit boundary whatever KVM does: after serving an exit, the loop returns -EINTR
 * instead of entering again when immediate_exit is set. KVM itself looks at
 * immediate_exit only after completing the exit just served, and when that completion
 * makes the next exit at once (the rest of a `rep ins/outs`, an MMIO access split in
 * two) it returns that exit without looking: a loop relying on KVM alone would go on
 * serving such exits, kick or not, for as long as they chain, the kick's signal having
 * been spent on its empty handler while this thread was out of the kernel.
 */
#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <linux/kvm.h>

#include "kvmpy_native.h"

#define SERVED 1
#define SERVED_UART 2

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int mmio_claimed(const struct kvmpy_loop *l, uint64_t addr, uint32_t len)
{
	uint32_t i;

	for (i = 0; i < l->n_mmio_ranges && i < KVMPY_MAX_MMIO_RANGES; i++) {
		const struct kvmpy_range *r = &l->mmio_ranges[i];

		if (addr < r->base + r->size && r->base < addr + len)
			return 1;
	}
	return 0;
}

/* Serve an I/O exit in C if the fast-path table allows: SERVED, SERVED_UART (the UART took
 * it: its output buffer may have filled), or 0 = for Python. */
static int serve_io(struct kvmpy_loop *l, struct kvm_run *run)
{
	uint16_t port = run->io.port;
	uint32_t size = run->io.size, count = run->io.count;
	uint64_t off = run->io.data_offset;
	uint8_t *data;
	int is_out = run->io.direction == KVM_EXIT_IO_OUT, served = SERVED;

	/* data lies inside the kvm_run mapping: KVM sets the offset, we still check it */
	if (size == 0 || size > 4 || off > l->run_size || (uint64_t)size * count > l->run_size - off)
		return 0;
	data = (uint8_t *)run + off;
	switch (l->pio_owner[port]) {
	case KVMPY_OWNER_NONE:
		if (is_out) {
			l->c.unclaimed_writes += count;
		} else {
			memset(data, 0xFF, (size_t)size * count);	/* an empty ISA bus floats high */
		}
		l->c.unclaimed_pio += count;
		break;
	case KVMPY_OWNER_UART:
		if (!l->uart || port < l->uart_base || port - l->uart_base >= 8)
			return 0;
		if (!kvmpy_uart_pio(l->uart, port - l->uart_base, is_out, data, size, count))
			return 0;
		l->c.uart += count;
		served = SERVED_UART;
		break;
	default:
		return 0;
	}
	if (is_out)
		l->c.io_out++;
	else
		l->c.io_in++;
	return served;
}

static int serve_mmio(struct kvmpy_loop *l, struct kvm_run *run)
{
	uint32_t len = run->mmio.len, i;
	uint64_t addr = run->mmio.phys_addr;

	if (len == 0 || len > 8)
		return 0;
	for (i = 0; i < l->n_native_mmio && i < KVMPY_MAX_NATIVE_MMIO; i++) {
		struct kvmpy_native_mmio *d = &l->native_mmio[i];

		if (addr >= d->base && addr - d->base < d->size && len <= d->size - (addr - d->base)) {
			kvmpy_blk_mmio(d->blk, addr - d->base, run->mmio.is_write, run->mmio.data, len);
			l->c.native_mmio[i]++;
			if (run->mmio.is_write)
				l->c.mmio_write++;
			else
				l->c.mmio_read++;
			return 1;
		}
	}
	if (mmio_claimed(l, addr, len))
		return 0;
	if (run->mmio.is_write) {
		l->c.mmio_write++;
		l->c.unclaimed_writes++;
	} else {
		memset(run->mmio.data, 0, sizeof(run->mmio.data));
		l->c.mmio_read++;
	}
	l->c.unclaimed_mmio++;
	return 1;
}

int kvmpy_run(struct kvmpy_loop *l)
{
	struct kvm_run *run = l->run;
	uint64_t t_out = l->last_exit_ns ? l->last_exit_ns : now_ns(), t_in;
	int r, err, served;

	/*
	 * VMM time runs from the last exit to the next entry, including Python's share
	 * between two calls. last_exit_ns is that last exit; Python sets it to 0 where its
	 * clock must not run on (a new run, a parked vCPU), else the time between two
	 * runs, spent doing anything, would be counted as this vCPU's VMM time.
	 */
	for (;;) {
		t_in = now_ns();
		l->c.vmm_ns += t_in - t_out;
		r = ioctl(l->vcpu_fd, KVM_RUN, 0);
		err = errno;			/* before anything else can change it */
		t_out = now_ns();
		l->c.kvm_ns += t_out - t_in;
		l->last_exit_ns = t_out;
		if (r < 0)
			return -err;		/* EINTR: a kick (stop request, timeout) */
		switch (run->exit_reason) {
		case KVM_EXIT_IO:
			served = serve_io(l, run);
			break;
		case KVM_EXIT_MMIO:
			served = serve_mmio(l, run);
			break;
		default:
			served = 0;
		}
		if (!served)
			return KVMPY_RUN_EXIT;
		/* Only after the UART took a byte can its buffer have filled (a flusher
		 * drains what other vCPUs add). Advice only: the UART itself refuses, under
		 * its lock, a THR byte that does not fit. */
		if (served == SERVED_UART && kvmpy_uart_tx_space(l->uart) < l->tx_low_water)
			return KVMPY_RUN_DRAIN;	/* let Python write the burst out */
		/* Kicked while serving: Python looks at the gate. The exit just served is
		 * completed by the next KVM_RUN, whoever makes it (this loop, or settle). The
		 * kicker's store is another thread's: read it afresh, with acquire. */
		if (__atomic_load_n(&run->immediate_exit, __ATOMIC_ACQUIRE))
			return -EINTR;
	}
}
