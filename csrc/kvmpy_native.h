/*
 * kvmpy_native.h - the whole C surface of kvmpy._native, declared once.
 *
 * csrc/build.py feeds the block between the CDEF markers to cffi, so Python sees
 * exactly these declarations. Functions return 0 or a non-negative result on
 * success and -errno on failure (kvmtool style): errno never crosses the boundary.
 */
#ifndef KVMPY_NATIVE_H
#define KVMPY_NATIVE_H

#include <stdint.h>
#include <linux/kvm.h>

/* CDEF-BEGIN */
/* ioctl(2) with a pointer or an integer argument; returns the result or -errno. */
int kvmpy_ioctl_ptr(int fd, unsigned long request, void *arg);
int kvmpy_ioctl_int(int fd, unsigned long request, unsigned long arg);

/* Install (once per process) an empty handler for the vCPU kick signal, without
 * SA_RESTART, so a kick makes a blocked KVM_RUN return -EINTR. Returns the signal
 * number to send with pthread_kill. */
int kvmpy_kick_signal(void);

/* ---- uart.c: the 16550A (same semantics as kvmpy/devices/serial.py) ---- */
struct kvmpy_uart;
struct kvmpy_uart_state {
	uint8_t ier, fcr, lcr, mcr, scr, dll, dlm;
	uint8_t lsr_errors, msr_delta, modem, thr_pending, level;
	uint32_t rx_head, rx_count, rx_cap;
	uint32_t tx_len;
	uint64_t irq_changes, tx_dropped;
	uint64_t irq_errors;		/* KVM_IRQ_LINE calls that failed ... */
	int32_t irq_errno;		/* ... and the errno of the last one (0: none) */
};
/* gsi < 0: no interrupt line (level is tracked only). A failed KVM_IRQ_LINE is counted
 * in irq_errors/irq_errno. NULL on bad sizes, ENOMEM or a failed pthread_mutex_init. */
struct kvmpy_uart *kvmpy_uart_new(uint32_t rx_cap, uint32_t tx_cap, int vm_fd, int gsi);
void kvmpy_uart_free(struct kvmpy_uart *u);
uint32_t kvmpy_uart_read(struct kvmpy_uart *u, uint32_t off);
/* 1 = done; 0 = a THR byte refused because the output buffer is full (drain, retry) */
int kvmpy_uart_write(struct kvmpy_uart *u, uint32_t off, uint32_t value);
uint32_t kvmpy_uart_peek(struct kvmpy_uart *u, uint32_t off);
uint32_t kvmpy_uart_feed(struct kvmpy_uart *u, const uint8_t *data, uint32_t len);
uint32_t kvmpy_uart_take(struct kvmpy_uart *u, uint8_t *out, uint32_t cap);
/* free output bytes now (under the lock): a snapshot, advice only; the writes decide */
uint32_t kvmpy_uart_tx_space(struct kvmpy_uart *u);
void kvmpy_uart_get_state(struct kvmpy_uart *u, struct kvmpy_uart_state *out);
uint32_t kvmpy_uart_rx_copy(struct kvmpy_uart *u, uint8_t *out, uint32_t cap);
/* registers from s (counters and tx ignored) and the receive FIFO from rx[0..n); -EINVAL if n > rx_cap */
int kvmpy_uart_set_state(struct kvmpy_uart *u, const struct kvmpy_uart_state *s,
			 const uint8_t *rx, uint32_t n);
int kvmpy_uart_pio(struct kvmpy_uart *u, uint32_t off, int is_out, uint8_t *data,
		   uint32_t size, uint32_t count);

/* ---- ratelimit.c: token buckets (same semantics as kvmpy/devices/ratelimit.py) ---- */
/* size tokens when full, refilled from empty in refill_ns; size 0 = no bucket (unlimited).
 * tokens < 0 is a debt; frac / refill_ns is the partial token; burst is one-time. */
struct kvmpy_bucket { uint64_t size, refill_ns, burst; int64_t tokens; uint64_t frac, last_ns; };
/* operations, bytes and flushes of one device; throttled_until: when a refused request may go */
struct kvmpy_limiter { struct kvmpy_bucket ops, bytes, flushes; uint64_t throttled_until, throttled; };
uint64_t kvmpy_now_ns(void);		/* CLOCK_MONOTONIC, as Python's time.monotonic_ns() */
/* a full bucket; -EINVAL unless 1 <= size, refill_ns <= 2^62 and burst <= 2^62 */
int kvmpy_bucket_init(struct kvmpy_bucket *b, uint64_t size, uint64_t refill_ns, uint64_t burst,
		      uint64_t now);
void kvmpy_bucket_refill(struct kvmpy_bucket *b, uint64_t now);
uint64_t kvmpy_bucket_missing(const struct kvmpy_bucket *b, uint64_t cost);
void kvmpy_bucket_take(struct kvmpy_bucket *b, uint64_t cost);
uint64_t kvmpy_bucket_wait_ns(const struct kvmpy_bucket *b, uint64_t missing);
/* 1: the tokens were taken from every bucket; 0: from none, throttled_until set */
int kvmpy_limiter_admit(struct kvmpy_limiter *l, uint64_t now, uint64_t ops, uint64_t bytes,
			uint64_t flushes);

/* ---- virtio_blk.c: virtio-blk over virtio-mmio (same semantics as kvmpy/devices/virtio/) ---- */
#define KVMPY_MAX_REGIONS 8
#define KVMPY_BLK_QUEUE_NUM_MAX 256
/* dirty: the region's bitmap (dirty.c; one bit per 4 KiB page), NULL = no tracking */
struct kvmpy_mem_region { uint64_t gpa, size; uint8_t *hva; uint64_t *dirty; };
struct kvmpy_guest_mem { uint32_t n; struct kvmpy_mem_region r[KVMPY_MAX_REGIONS]; };
struct kvmpy_vq_state {
	uint64_t num, ready, desc, driver, device;
	uint16_t last_avail_idx, used_idx;
	uint64_t used_count;
};
struct kvmpy_blk_state {
	uint32_t status, device_features_sel, driver_features_sel, queue_sel;
	uint32_t interrupt_status, level, readonly;
	uint64_t driver_features, device_features, capacity, irq_changes;
	struct kvmpy_vq_state q;
	char last_error[96];
	uint64_t irq_errors;		/* KVM_IRQ_LINE calls that failed ... */
	int32_t irq_errno;		/* ... and the errno of the last one (0: none) */
};
struct kvmpy_blk;
/* fd stays owned by the caller; id is 20 bytes. gsi < 0: no interrupt line; a failed
 * KVM_IRQ_LINE is counted in irq_errors/irq_errno. NULL on bad arguments, ENOMEM or a
 * failed pthread_mutex_init (nothing is left allocated). */
struct kvmpy_blk *kvmpy_blk_new(int fd, int readonly, uint64_t file_size, const uint8_t *id,
				const struct kvmpy_guest_mem *mem, int vm_fd, int gsi);
void kvmpy_blk_free(struct kvmpy_blk *b);
uint64_t kvmpy_blk_read(struct kvmpy_blk *b, uint64_t off, uint32_t size);
void kvmpy_blk_write(struct kvmpy_blk *b, uint64_t off, uint32_t size, uint64_t value);
void kvmpy_blk_set_fd(struct kvmpy_blk *b, int fd);
/* I/O goes to fd, and each 4 KiB block a write touches is marked in written (dirty.c
 * layout; NULL: none): a reset overlay (reset.c kvmpy_reset_disk). */
void kvmpy_blk_set_overlay(struct kvmpy_blk *b, int fd, uint64_t *written);
void kvmpy_blk_get_state(struct kvmpy_blk *b, struct kvmpy_blk_state *out);
/* Restore the registers and the queue from a saved (hostile) state: status,
 * feature selectors, driver_features, queue_sel, interrupt_status, level and q's
 * num/ready/desc/driver/device/last_avail_idx/used_idx. The disk's identity
 * (device_features, capacity, readonly), irq_changes, irq_errors, irq_errno,
 * q.used_count and last_error are not taken from s. The level is only recorded, never
 * driven (KVM_IRQ_LINE): the in-kernel irqchip is restored separately. -EINVAL, changing nothing, unless
 * s is a state the device could have reached (mmio.py check_state). */
int kvmpy_blk_set_state(struct kvmpy_blk *b, const struct kvmpy_blk_state *s);
void kvmpy_blk_mmio(struct kvmpy_blk *b, uint64_t off, int is_write, uint8_t *data, uint32_t len);
/* Rate limits (0 = none for a rate); -EINVAL for a rate or burst out of range. The
 * buckets start full; a throttled request stays in the ring until kvmpy_blk_serve_pending
 * (or the next QueueNotify) finds its tokens. */
int kvmpy_blk_set_limits(struct kvmpy_blk *b, uint64_t iops, uint64_t bps, uint64_t fps,
			 uint64_t iops_burst, uint64_t bps_burst);
void kvmpy_blk_get_limiter(struct kvmpy_blk *b, struct kvmpy_limiter *out);
/* CLOCK_MONOTONIC time at which a throttled request may go; 0: nothing waits */
uint64_t kvmpy_blk_throttled_until(struct kvmpy_blk *b);
/* a QueueNotify of queue 0 from the host: serve what the buckets allow now */
void kvmpy_blk_serve_pending(struct kvmpy_blk *b);
/* tests: the limiter's clock reads now_ns (0: CLOCK_MONOTONIC again) */
void kvmpy_blk_set_clock(struct kvmpy_blk *b, uint64_t now_ns);

/* virtio-blk's request queue for a transport that lives in Python (virtio-pci): the
 * disk a request needs. The mmio device above keeps one of its own. */
struct kvmpy_blk_disk {
	int fd;				/* -1: closed, every request completes with IOERR */
	uint32_t readonly;
	uint64_t capacity;		/* 512-byte sectors */
	uint64_t *written;		/* a reset overlay's written 4 KiB blocks (dirty.c), or NULL */
	uint8_t id[20];			/* GET_ID's bytes, NUL-padded */
};
struct kvmpy_blk_scratch;
uint64_t kvmpy_blk_scratch_size(void);	/* bytes of scratch kvmpy_blk_serve needs */
/* Serve at most budget requests of q (checked first, as a restored state is): the number
 * served, or -EINVAL and *why on a driver error. No rate limits: those stay in Python. */
int kvmpy_blk_serve(struct kvmpy_vq_state *q, const struct kvmpy_guest_mem *mem,
		    const struct kvmpy_blk_disk *d, uint32_t budget,
		    struct kvmpy_blk_scratch *scratch, const char **why);

/* ---- virtio_net.c: virtio-net's queue work (same semantics as devices/virtio/net.py) ---- */
struct kvmpy_vq_chain;
uint64_t kvmpy_net_chain_size(void);	/* bytes of the chain scratch space the caller provides */
struct kvmpy_net_counters {
	uint64_t rx_frames, rx_bytes, rx_too_big, rx_bad_chain, tx_bad_chain, tx_bad_length;
};
/* Serve at most budget chains of the transmit queue q (VirtioNet.transmit): each good
 * frame is appended to out as a stream record (be32 length, the frame without its
 * header); stops early while less than 4 + 12 + 65550 bytes of cap are left. Returns the
 * chains served, or -1 with *why set when the ring is broken (q then as at the error). */
int kvmpy_net_tx(struct kvmpy_vq_state *q, const struct kvmpy_guest_mem *mem, uint32_t budget,
		 uint8_t *out, uint64_t cap, uint64_t *out_len, struct kvmpy_net_counters *c,
		 struct kvmpy_vq_chain *chain, const char **why);
/* Put hdr (12 bytes) + frame into the next receive chain of q (one step of
 * VirtioNet.fill_rx), popping at most *budget chains (decremented): 1 delivered,
 * 2 dropped (too big for the chain, which is put back), 0 no chain (or no budget),
 * -1 with *why set when the ring is broken. Bad chains are returned empty, counted. */
int kvmpy_net_rx(struct kvmpy_vq_state *q, const struct kvmpy_guest_mem *mem, const uint8_t *hdr,
		 const uint8_t *frame, uint32_t len, uint32_t *budget, struct kvmpy_net_counters *c,
		 struct kvmpy_vq_chain *chain, const char **why);
/* kvmpy_net_rx for count frames laid end to end in frames (lens[i] bytes each), in order,
 * while chains and *budget last; *consumed = the frames delivered or dropped as too big for
 * their chain. Returns 0, or -1 with *why set when the ring broke at frame *consumed. */
int kvmpy_net_rx_many(struct kvmpy_vq_state *q, const struct kvmpy_guest_mem *mem, const uint8_t *hdr,
		      const uint8_t *frames, const uint32_t *lens, uint32_t count, uint32_t *consumed, uint32_t *budget,
		      struct kvmpy_net_counters *c, struct kvmpy_vq_chain *chain, const char **why);

/* ---- dirty.c: VMM-side dirty-page bitmaps, page p = bit p%64 of word p/64 ---- */
/* atomically OR in pages [first_page, first_page + npages); no-op for a NULL bitmap */
void kvmpy_dirty_mark(uint64_t *bitmap, uint64_t first_page, uint64_t npages);
/* out[i] = bitmap[i], bitmap[i] = 0, each word atomically */
void kvmpy_dirty_take(uint64_t *bitmap, uint64_t *out, uint64_t words);
/* 1 if the len bytes at p (whole pages: 8-byte aligned, len a multiple of 8) are all zero */
int kvmpy_all_zero(const uint8_t *p, uint64_t len);

/* ---- reset.c: back to an in-memory checkpoint (kvmpy/lifecycle/reset.py) ---- */
/* One RAM slot: ram and saved are pages * 4096 bytes; log is scratch of (pages+63)/64 words
 * for KVM's dirty log; vmm_dirty the region's dirty.c bitmap (NULL: none). With manual
 * protection, hot pages (hot_max > 0): prev, hot and mask are (pages+63)/64 words each (the
 * last reset's log, the pages left writable, the pages to protect again), hot_count counts
 * the set bits of hot. */
struct kvmpy_reset_region {
	uint32_t slot;
	uint64_t pages;
	uint8_t *ram;
	const uint8_t *saved;
	uint64_t *vmm_dirty;
	uint64_t *log;
	uint64_t *prev;
	uint64_t *hot;
	uint64_t *mask;
	uint64_t hot_count;
	uint64_t hot_max;
};
/* where the time went (added to; NULL: not measured) */
struct kvmpy_reset_times { uint64_t log_ns, copy_ns, pages; };
/* a prepared ioctl: fd, request, its argument; the result must equal expect */
struct kvmpy_reset_op { int fd; uint32_t expect; unsigned long request; void *arg; };
/* Copy back from saved every page set in log (read) or vmm (taken: cleared atomically);
 * either may be NULL; bits past pages are ignored. Returns the pages copied. */
uint64_t kvmpy_reset_copy_pages(uint8_t *ram, const uint8_t *saved, uint64_t pages,
				const uint64_t *log, uint64_t *vmm);
/* KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): 0 or -errno */
int kvmpy_reset_enable_manual_protect(int vm_fd);
/* KVM_CLEAR_DIRTY_LOG of the pages set in log (pages long): what KVM_GET_DIRTY_LOG returned,
 * protected again (with manual protection GET alone leaves them writable); 0 or -errno */
int kvmpy_clear_dirty_log(int vm_fd, uint32_t slot, uint64_t *log, uint64_t pages);
/* Hot pages: a page in log that was also in prev (dirty at two resets in a row), not hot yet,
 * becomes hot while *hot_count < hot_max (lowest pages first); then mask = log & ~hot and
 * prev = log. Bits past pages are ignored (zero in mask and hot). Returns the pages made hot. */
uint64_t kvmpy_reset_hot_mask(const uint64_t *log, uint64_t *prev, uint64_t *hot, uint64_t *mask,
			      uint64_t pages, uint64_t *hot_count, uint64_t hot_max);
/* KVM_GET_DIRTY_LOG (+ KVM_CLEAR_DIRTY_LOG of what it returned if manual, but for the hot
 * pages, which stay writable and dirty: copied back every time) and the copy; pages copied
 * or -errno */
int64_t kvmpy_reset_region(int vm_fd, struct kvmpy_reset_region *r, int manual,
			   struct kvmpy_reset_times *t);
/* ops[0..n) in order; 0, or -(i+1) for the first op that failed or returned another
 * value than its expect. ns (NULL: not measured): per-op nanoseconds, added to. */
int kvmpy_reset_ops(const struct kvmpy_reset_op *ops, uint32_t n, uint64_t *ns);
/* KVM_CAP_SYNC_REGS: regs, sregs and events into the kvm_run page, marked dirty, and one
 * KVM_RUN with immediate_exit that applies them and returns without entering the guest.
 * 0, or -errno (-EIO: KVM did not take them). */
int kvmpy_reset_sync_regs(int vcpu_fd, struct kvm_run *run, const struct kvm_regs *regs,
			  const struct kvm_sregs *sregs, const struct kvm_vcpu_events *events);
/* Copy every 4 KiB block set in written (taken) from backing_fd to overlay_fd (the last
 * block may be short: size is the disk's bytes); buf: 4096 bytes of scratch.
 * Blocks copied, or -errno. */
int64_t kvmpy_reset_disk(int backing_fd, int overlay_fd, uint64_t *written, uint64_t size,
			 uint8_t *buf);

/* ---- runloop.c: the native vCPU loop ---- */
#define KVMPY_OWNER_NONE 0	/* unclaimed: writes dropped, reads all ones */
#define KVMPY_OWNER_PYTHON 1	/* a Python device: return to Python */
#define KVMPY_OWNER_UART 2	/* the native UART */
#define KVMPY_MAX_MMIO_RANGES 16
#define KVMPY_RUN_EXIT 1	/* an exit for Python is in kvm_run */
#define KVMPY_RUN_DRAIN 2	/* UART output buffer nearly full: drain and call again */

struct kvmpy_range { uint64_t base, size; };
#define KVMPY_MAX_NATIVE_MMIO 8
struct kvmpy_native_mmio { uint64_t base, size; struct kvmpy_blk *blk; };
struct kvmpy_counters {
	uint64_t io_out, io_in, mmio_read, mmio_write;
	uint64_t uart, unclaimed_pio, unclaimed_mmio, unclaimed_writes;
	uint64_t native_mmio[KVMPY_MAX_NATIVE_MMIO];
	uint64_t kvm_ns, vmm_ns;
};
struct kvmpy_loop {
	int vcpu_fd;
	struct kvm_run *run;
	uint64_t run_size;
	uint8_t pio_owner[65536];		/* KVMPY_OWNER_* per port */
	struct kvmpy_range mmio_ranges[KVMPY_MAX_MMIO_RANGES];	/* claimed by Python */
	uint32_t n_mmio_ranges;
	struct kvmpy_native_mmio native_mmio[KVMPY_MAX_NATIVE_MMIO];	/* served in C */
	uint32_t n_native_mmio;
	struct kvmpy_uart *uart;
	uint16_t uart_base;
	uint32_t tx_low_water;
	uint64_t last_exit_ns;			/* CLOCK_MONOTONIC of the last exit, 0 before the first */
	struct kvmpy_counters c;		/* Python reads and zeroes these */
};
/* Returns KVMPY_RUN_EXIT, KVMPY_RUN_DRAIN, or -errno (-EINTR after a kick). */
int kvmpy_run(struct kvmpy_loop *l);
/* CDEF-END */

#endif
