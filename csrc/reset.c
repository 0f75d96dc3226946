/*
 * reset.c - putting a machine back to its in-memory checkpoint (kvmpy/lifecycle/reset.py).
 *
 * Three jobs, each one call from Python per reset:
 *   pages - KVM's dirty log of a RAM slot (KVM_GET_DIRTY_LOG; with manual protection
 *           also KVM_CLEAR_DIRTY_LOG for just the pages it returned, but the hot ones:
 *           pages dirty at two resets in a row, up to hot_max, are left writable and
 *           copied back at every reset, since on a shadow-paging host the write fault
 *           that tracks a page costs far more than copying it) OR-ed with the
 *           VMM's own bitmap of the region (dirty.c, taken word by word with an atomic
 *           exchange), and every page set in either copied back from the checkpoint;
 *   ops   - a prepared list of "set" ioctls (irqchips, PIT, each vCPU's registers,
 *           XSAVE, MSRs, LAPIC, events..., the clock) issued in order, their argument
 *           structs filled once at checkpoint time;
 *   disks - the 4 KiB blocks a case wrote to a disk's overlay, copied back from the
 *           backing file (which nobody writes while the checkpoint is held).
 * The page copy has a Python model (reset.py, copy_pages_model) and a differential test
 * (tests/native/test_reset_pages.py).
 */
#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>
#include <linux/kvm.h>

#include "kvmpy_native.h"

#define PAGE 4096u

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t kvmpy_reset_copy_pages(uint8_t *ram, const uint8_t *saved, uint64_t pages,
				const uint64_t *log, uint64_t *vmm)
{
	uint64_t w, words = (pages + 63) / 64, copied = 0;

	if (!ram || !saved)
		return 0;
	for (w = 0; w < words; w++) {
		uint64_t bits = log ? log[w] : 0;

		if (vmm && __atomic_load_n(&vmm[w], __ATOMIC_RELAXED))
			bits |= __atomic_exchange_n(&vmm[w], 0, __ATOMIC_ACQ_REL);
		if (w == words - 1 && pages % 64)
			bits &= (1ull << (pages % 64)) - 1;	/* bits past the region: ignored */
		while (bits) {
			uint64_t p = w * 64 + (uint64_t)__builtin_ctzll(bits);

			/* SAFETY: p < pages (the mask above), and ram and saved are both
			 * pages * PAGE bytes long (the region and its checkpoint copy). */
			memcpy(ram + p * PAGE, saved + p * PAGE, PAGE);
			copied++;
			bits &= bits - 1;
		}
	}
	return copied;
}

int kvmpy_reset_enable_manual_protect(int vm_fd)
{
	struct kvm_enable_cap cap = { .cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 };

	cap.args[0] = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
	return ioctl(vm_fd, KVM_ENABLE_CAP, &cap) < 0 ? -errno : 0;
}

/* KVM_CLEAR_DIRTY_LOG for the runs of 64-page words that have a bit set */
static int clear_log(int vm_fd, uint32_t slot, uint64_t *log, uint64_t pages)
{
	uint64_t w, words = (pages + 63) / 64;

	for (w = 0; w < words; w++) {
		struct kvm_clear_dirty_log c = { .slot = slot };
		uint64_t end = w;

		if (!log[w])
			continue;
		while (end + 1 < words && log[end + 1])
			end++;
		c.first_page = w * 64;
		/* a multiple of 64, or up to the end of the slot (api.rst) */
		c.num_pages = (uint32_t)((end + 1) * 64 > pages ? pages - w * 64 : (end - w + 1) * 64);
		c.dirty_bitmap = &log[w];
		if (ioctl(vm_fd, KVM_CLEAR_DIRTY_LOG, &c) < 0)
			return -errno;
		w = end;
	}
	return 0;
}

uint64_t kvmpy_reset_hot_mask(const uint64_t *log, uint64_t *prev, uint64_t *hot, uint64_t *mask,
			      uint64_t pages, uint64_t *hot_count, uint64_t hot_max)
{
	uint64_t w, words = (pages + 63) / 64, made = 0;

	for (w = 0; w < words; w++) {
		uint64_t tail = (w == words - 1 && pages % 64) ? (1ull << (pages % 64)) - 1 : ~0ull;
		uint64_t now = log[w] & tail, again = now & prev[w] & ~hot[w];

		while (again && *hot_count < hot_max) {
			uint64_t bit = again & -again;		/* the lowest page first */

			hot[w] |= bit;
			(*hot_count)++;
			made++;
			again &= again - 1;
		}
		mask[w] = now & ~hot[w];
		prev[w] = now;
	}
	return made;
}

int kvmpy_clear_dirty_log(int vm_fd, uint32_t slot, uint64_t *log, uint64_t pages)
{
	if (!log || !pages)
		return -EINVAL;
	return clear_log(vm_fd, slot, log, pages);
}

int64_t kvmpy_reset_region(int vm_fd, struct kvmpy_reset_region *r, int manual,
			   struct kvmpy_reset_times *t)
{
	struct kvm_dirty_log d = { .slot = r->slot, .dirty_bitmap = r->log };
	uint64_t t0 = t ? now_ns() : 0, copied;
	int err;

	if (!r->log || !r->pages)
		return -EINVAL;
	if (ioctl(vm_fd, KVM_GET_DIRTY_LOG, &d) < 0)
		return -errno;
	if (manual) {
		uint64_t *protect = r->log;

		if (r->hot_max && r->prev && r->hot && r->mask) {
			kvmpy_reset_hot_mask(r->log, r->prev, r->hot, r->mask, r->pages, &r->hot_count, r->hot_max);
			protect = r->mask;
		}
		err = clear_log(vm_fd, r->slot, protect, r->pages);
		if (err)
			return err;
	}
	if (t)
		t->log_ns += now_ns() - t0;
	t0 = t ? now_ns() : 0;
	copied = kvmpy_reset_copy_pages(r->ram, r->saved, r->pages, r->log, r->vmm_dirty);
	if (t) {
		t->copy_ns += now_ns() - t0;
		t->pages += copied;
	}
	return (int64_t)copied;
}

int kvmpy_reset_ops(const struct kvmpy_reset_op *ops, uint32_t n, uint64_t *ns)
{
	uint32_t i;

	for (i = 0; i < n; i++) {
		uint64_t t0 = ns ? now_ns() : 0;
		int r = ioctl(ops[i].fd, ops[i].request, ops[i].arg);

		if (ns)
			ns[i] += now_ns() - t0;
		if (r < 0)
			return -(int)i - 1;
		if ((uint32_t)r != ops[i].expect)
			return -(int)i - 1;
	}
	return 0;
}

int kvmpy_reset_sync_regs(int vcpu_fd, struct kvm_run *run, const struct kvm_regs *regs,
			  const struct kvm_sregs *sregs, const struct kvm_vcpu_events *events)
{
	int r;

	/* SAFETY: run is the vCPU's own mapped kvm_run page (Vcpu.run_page), and the
	 * machine is stopped: no KVM_RUN of this vCPU is in progress. */
	run->s.regs.regs = *regs;
	run->s.regs.sregs = *sregs;
	run->s.regs.events = *events;
	run->kvm_dirty_regs = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS;
	run->immediate_exit = 1;
	r = ioctl(vcpu_fd, KVM_RUN, 0);
	r = r < 0 ? -errno : 0;
	run->immediate_exit = 0;
	if (run->kvm_dirty_regs) {		/* not applied: do not let a later KVM_RUN do it */
		run->kvm_dirty_regs = 0;
		return r == -EINTR ? -EIO : r;
	}
	return r == -EINTR ? 0 : (r ? r : -EIO);
}

/* pread/pwrite the whole of [pos, pos+n): 0, or -errno (-EIO on a short file) */
static int copy_block(int from, int to, uint8_t *buf, uint64_t pos, uint64_t n)
{
	uint64_t done = 0;

	while (done < n) {
		ssize_t r = pread(from, buf + done, n - done, (off_t)(pos + done));

		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return r < 0 ? -errno : -EIO;
		done += (uint64_t)r;
	}
	for (done = 0; done < n;) {
		ssize_t r = pwrite(to, buf + done, n - done, (off_t)(pos + done));

		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return r < 0 ? -errno : -EIO;
		done += (uint64_t)r;
	}
	return 0;
}

int64_t kvmpy_reset_disk(int backing_fd, int overlay_fd, uint64_t *written, uint64_t size,
			 uint8_t *buf)
{
	uint64_t blocks = (size + PAGE - 1) / PAGE, words = (blocks + 63) / 64, w, copied = 0;
	int err;

	for (w = 0; w < words; w++) {
		uint64_t bits;

		if (!__atomic_load_n(&written[w], __ATOMIC_RELAXED))
			continue;
		bits = __atomic_exchange_n(&written[w], 0, __ATOMIC_ACQ_REL);
		if (w == words - 1 && blocks % 64)
			bits &= (1ull << (blocks % 64)) - 1;
		while (bits) {
			uint64_t blk = w * 64 + (uint64_t)__builtin_ctzll(bits);
			uint64_t pos = blk * PAGE, n = size - pos < PAGE ? size - pos : PAGE;

			err = copy_block(backing_fd, overlay_fd, buf, pos, n);
			if (err)
				return err;
			copied++;
			bits &= bits - 1;
		}
	}
	return (int64_t)copied;
}
