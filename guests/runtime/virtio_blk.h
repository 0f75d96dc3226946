/*
 * virtio_blk.h - a small polling virtio-blk driver over virtio-mmio.
 *
 * Spec: virtio 1.2, section 5.2 (block device), over virtio_mmio.h (2.7
 * split virtqueues, 4.2 virtio-mmio, which has the register layout, the
 * queue and the polling).
 *
 * One device, one queue (queue 0), one request in flight: each call builds
 * a descriptor chain, publishes it in the available ring, writes
 * QueueNotify and then polls the used ring until the device returns it.
 * No interrupts (the available ring asks for none), no allocation: the
 * rings, the request header and the status byte are static.
 *
 * Works at CPL 0 and CPL 3 in 64-bit mode with guest-physical ==
 * guest-virtual (the host identity-maps the first 4 GiB, with user pages
 * for ring-3 guests), so a buffer's address is its pointer.  Every
 * register access is one volatile 32-bit load or store, i.e. one MMIO exit.
 */
#ifndef KVMPY_GUEST_VIRTIO_BLK_H
#define KVMPY_GUEST_VIRTIO_BLK_H

#include "runtime.h"
#include "virtio_mmio.h"

#define BLK_SECTOR_SIZE 512

/* Return values: 0 on success, one of these (negative) otherwise. */
#define BLK_ENODEV   VIO_ENODEV   /* no virtio-blk at that base (MagicValue/Version/DeviceID) */
#define BLK_EFEATURE VIO_EFEATURE /* no VIRTIO_F_VERSION_1, or FEATURES_OK did not stick */
#define BLK_EQUEUE   VIO_EQUEUE   /* queue 0 missing, already live, or under 4 entries */
#define BLK_EIO      (-4)         /* the device answered VIRTIO_BLK_S_IOERR (e.g. write to a read-only disk) */
#define BLK_EUNSUPP  (-5)         /* the device answered VIRTIO_BLK_S_UNSUPP */
#define BLK_EINVAL   VIO_EINVAL   /* not initialised, bad length, or past the end of the disk */
#define BLK_EDEVICE  VIO_EDEVICE  /* the device broke the protocol (bad used entry, status unset, NEEDS_RESET) */
#define BLK_ETIMEOUT VIO_ETIMEOUT /* the used ring never advanced */

/*
 * Probe and initialise the virtio-blk device whose registers start at
 * guest-physical `base` (virtio 1.2, 3.1.1 and 4.2.3): reset, ACKNOWLEDGE,
 * DRIVER, negotiate VIRTIO_F_VERSION_1 (+ VIRTIO_BLK_F_FLUSH if offered),
 * FEATURES_OK, set up queue 0, DRIVER_OK.  Returns 0 or BLK_E*.
 */
int blk_init(unsigned long base);

/* Exit values every disk guest shares. */
#define BLK_EXIT_IO_ERROR  0x4D
#define BLK_EXIT_NO_DEVICE 0x4E
/* blk_init(VIRTIO_MMIO_BASE) for the guest called prog, or the first virtio-blk
 * function on PCI bus 0 when no window holds a disk: 0 when the disk is ready,
 * otherwise prints why ("no virtio-blk device", or an init error) and returns the
 * exit value the guest should end with. */
int blk_start(const char *prog);
/* Prints "<prog>: <what> error at sector <s>: <reason>", returns BLK_EXIT_IO_ERROR. */
int blk_fail(const char *prog, const char *what, u64 sector, int err);

u64 blk_capacity(void);   /* disk size in 512-byte sectors (config offset 0) */
int blk_read_only(void);  /* the device offered VIRTIO_BLK_F_RO */
int blk_has_flush(void);  /* VIRTIO_BLK_F_FLUSH was negotiated */

/*
 * One request each.  `nbytes` is a non-zero multiple of 512 (at most
 * BLK_MAX_BYTES) and the range must lie inside the disk.
 */
#define BLK_MAX_BYTES (1UL << 30)
int blk_read(u64 sector, void *buf, unsigned long nbytes);
int blk_write(u64 sector, const void *buf, unsigned long nbytes);
/* Commit written data; 0 without VIRTIO_BLK_F_FLUSH (nothing to ask for). */
int blk_flush(void);
/* The device's ID string: 20 bytes, NUL-padded, not always NUL-terminated. */
#define BLK_ID_BYTES 20
int blk_get_id(char buf[BLK_ID_BYTES]);

/* A short name for a BLK_E* code ("I/O error", ...). */
const char *blk_strerror(int err);

#endif
