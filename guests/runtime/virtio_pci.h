/*
 * virtio_pci.h - finding a PCI function through configuration mechanism #1
 * or ECAM, and driving a modern virtio-pci device's queue 0 (one chain in
 * flight, completion seen by polling the used ring; the interrupts the
 * device raises are the caller's to look for).
 *
 * Spec: PCI Local Bus 3.0 (3.2.2.3.2 mechanism #1, 6.1 the header, 6.7
 * capabilities, 6.8.2 MSI-X); PCI Express 4.0, 7.2.2 (ECAM); virtio 1.2,
 * 4.1 (virtio over PCI) and 3.1.1 (driver initialisation).  The split
 * virtqueue structures are virtio_mmio.h's.
 *
 * Addresses are kvmpy's (kvmpy/x86/layout.py): ECAM for bus 0 at
 * 0xE0000000; BARs placed by the host in 0xC0000000-0xCFFFFFFF.  64-bit
 * mode, CPL 0, guest-physical == guest-virtual.
 */
#ifndef KVMPY_GUEST_VIRTIO_PCI_H
#define KVMPY_GUEST_VIRTIO_PCI_H

#include "runtime.h"
#include "virtio_mmio.h"

#define PCI_ECAM_BASE 0xE0000000UL
#define PCI_CONFIG_ADDRESS 0xcf8
#define PCI_CONFIG_DATA    0xcfc

#define PCI_COMMAND        0x04
#define PCI_STATUS         0x06
#define PCI_BAR0           0x10
#define PCI_CAP_PTR        0x34
#define PCI_COMMAND_MEMORY 0x2
#define PCI_COMMAND_MASTER 0x4
#define PCI_STATUS_CAP_LIST 0x10
#define PCI_CAP_ID_VNDR    0x09
#define PCI_CAP_ID_MSIX    0x11

/* virtio_pci_cap cfg_type (4.1.4) */
#define VPCI_COMMON 1
#define VPCI_NOTIFY 2
#define VPCI_ISR    3
#define VPCI_DEVICE 4

/* struct virtio_pci_common_cfg offsets (4.1.4.3) */
#define VC_DEVICE_FEATURE_SELECT 0x00
#define VC_DEVICE_FEATURE        0x04
#define VC_DRIVER_FEATURE_SELECT 0x08
#define VC_DRIVER_FEATURE        0x0C
#define VC_CONFIG_MSIX_VECTOR    0x10
#define VC_NUM_QUEUES            0x12
#define VC_DEVICE_STATUS         0x14
#define VC_CONFIG_GENERATION     0x15
#define VC_QUEUE_SELECT          0x16
#define VC_QUEUE_SIZE            0x18
#define VC_QUEUE_MSIX_VECTOR     0x1A
#define VC_QUEUE_ENABLE          0x1C
#define VC_QUEUE_NOTIFY_OFF      0x1E
#define VC_QUEUE_DESC            0x20
#define VC_QUEUE_DRIVER          0x28
#define VC_QUEUE_DEVICE          0x30
#define VIRTIO_NO_VECTOR         0xffff
#define VPCI_VIO_QUEUES          4      /* queues a vio_dev driver may use behind PCI */

/* Configuration space of 00:dev.0: through 0xcf8/0xcfc, or through ECAM. */
u32 pci_cf8_read32(unsigned dev, unsigned reg);
void pci_cf8_write32(unsigned dev, unsigned reg, u32 v);
u32 pci_ecam_read32(unsigned dev, unsigned reg);
void pci_ecam_write16(unsigned dev, unsigned reg, u16 v);
u16 pci_ecam_read16(unsigned dev, unsigned reg);

/* A modern virtio-pci function as its driver sees it. */
struct vpci_dev {
	unsigned pci_dev;           /* device number on bus 0 */
	unsigned long bar0;         /* BAR 0's address */
	unsigned long bar0_size;
	volatile u8 *common, *isr, *device, *notify;
	u32 notify_mult;
	unsigned msix_cap;          /* config offset of the MSI-X capability, 0 if none */
	u16 msix_vectors;
	unsigned long msix_table;   /* address of the MSI-X table */
	struct virtq *vq;
	u16 qsize, avail_idx, used_seen;
	volatile u16 *queue_notify;
	/* behind a struct vio_dev (vio_find_pci): the selected queue, each queue's notify_off */
	u16 queue_sel, notify_off[VPCI_VIO_QUEUES];
};

/* Map BAR 0 (sizing it), turn on memory decoding and bus mastering, and
 * find the virtio capabilities.  VIO_ENODEV if one is missing. */
int vpci_probe(struct vpci_dev *d, unsigned pci_dev);
/* Steps 1-8 of 3.1.1 with VIRTIO_F_VERSION_1 only and queue 0 as `vq`;
 * with `msix`, MSI-X is enabled first, vector 0 for the queue and
 * vector 1 for configuration changes (each entry's message set by the
 * caller beforehand with vpci_msix_entry). */
int vpci_init(struct vpci_dev *d, struct virtq *vq, int msix);
void vpci_msix_entry(struct vpci_dev *d, unsigned vector, u64 address, u32 data);
/* Submit the chain at desc[0] and poll until it is used. */
int vpci_submit(struct vpci_dev *d, u32 *used_len);
u8 vpci_read_isr(struct vpci_dev *d);

/*
 * The first function on bus 0 whose ID is virtio device `device_id`, probed
 * into `f`, and `d` set up to drive it through virtio_mmio.c's helpers:
 * vio_read/vio_write translate each virtio-mmio register to the common
 * configuration, the notify slots, the ISR and the device configuration, so
 * vio_init(d, VIO_PCI_BASE, ...) and the drivers above it work unchanged.
 * Enumerates through 0xcf8/0xcfc (an empty bus reads all ones) and touches
 * ECAM only once a function matched.  0 or VIO_ENODEV.
 */
int vio_find_pci(struct vio_dev *d, struct vpci_dev *f, u32 device_id);

#endif
