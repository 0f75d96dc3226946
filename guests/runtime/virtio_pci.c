/*
 * virtio_pci.c - PCI configuration access and a polling modern virtio-pci
 * driver for queue 0 (see virtio_pci.h).
 */
#include "virtio_pci.h"

#define STATUS_ACKNOWLEDGE 1
#define STATUS_DRIVER      2
#define STATUS_DRIVER_OK   4
#define STATUS_FEATURES_OK 8
#define STATUS_NEEDS_RESET 64
#define STATUS_FAILED      128
#define POLL_LIMIT (1UL << 24)

static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static u32 cf8_address(unsigned dev, unsigned reg)
{
	return 0x80000000u | (dev & 31) << 11 | (reg & 0xfc);
}

u32 pci_cf8_read32(unsigned dev, unsigned reg)
{
	outl(PCI_CONFIG_ADDRESS, cf8_address(dev, reg));
	return inl(PCI_CONFIG_DATA);
}

void pci_cf8_write32(unsigned dev, unsigned reg, u32 v)
{
	outl(PCI_CONFIG_ADDRESS, cf8_address(dev, reg));
	outl(PCI_CONFIG_DATA, v);
}

static unsigned long ecam(unsigned dev, unsigned reg)
{
	return PCI_ECAM_BASE + ((unsigned long)(dev & 31) << 15) + (reg & 0xfff);
}

u32 pci_ecam_read32(unsigned dev, unsigned reg) { return *(volatile u32 *)ecam(dev, reg); }
u16 pci_ecam_read16(unsigned dev, unsigned reg) { return *(volatile u16 *)ecam(dev, reg); }
void pci_ecam_write16(unsigned dev, unsigned reg, u16 v) { *(volatile u16 *)ecam(dev, reg) = v; }

static u8 cfg8(unsigned dev, unsigned reg) { return *(volatile u8 *)ecam(dev, reg); }

int vpci_probe(struct vpci_dev *d, unsigned pci_dev)
{
	u32 bar, size;
	unsigned pos, guard = 0;

	d->pci_dev = pci_dev;
	d->common = d->isr = d->device = d->notify = 0;
	d->msix_cap = 0;
	/* BAR sizing (6.2.5.1): decoding off, write all ones, read the mask back, restore. */
	pci_ecam_write16(pci_dev, PCI_COMMAND, 0);
	bar = pci_cf8_read32(pci_dev, PCI_BAR0);
	pci_cf8_write32(pci_dev, PCI_BAR0, 0xffffffffu);
	size = ~(pci_cf8_read32(pci_dev, PCI_BAR0) & ~0xfu) + 1;
	pci_cf8_write32(pci_dev, PCI_BAR0, bar);
	if (bar & 1 || !(bar & ~0xfu))
		return VIO_ENODEV;
	d->bar0 = bar & ~0xfu;
	d->bar0_size = size;
	pci_ecam_write16(pci_dev, PCI_COMMAND, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);

	if (!(pci_ecam_read16(pci_dev, PCI_STATUS) & PCI_STATUS_CAP_LIST))
		return VIO_ENODEV;
	for (pos = cfg8(pci_dev, PCI_CAP_PTR); pos && guard < 48; pos = cfg8(pci_dev, pos + 1), guard++) {
		u8 id = cfg8(pci_dev, pos);

		if (id == PCI_CAP_ID_MSIX) {
			u32 table = pci_ecam_read32(pci_dev, pos + 4);

			d->msix_cap = pos;
			d->msix_vectors = (pci_ecam_read16(pci_dev, pos + 2) & 0x7ff) + 1;
			d->msix_table = d->bar0 + (table & ~7u);
			continue;
		}
		if (id != PCI_CAP_ID_VNDR || cfg8(pci_dev, pos + 4) != 0)
			continue;       /* not a virtio capability into BAR 0 */
		volatile u8 *at = (volatile u8 *)(d->bar0 + pci_ecam_read32(pci_dev, pos + 8));
		switch (cfg8(pci_dev, pos + 3)) {
		case VPCI_COMMON: if (!d->common) d->common = at; break;
		case VPCI_ISR: if (!d->isr) d->isr = at; break;
		case VPCI_DEVICE: if (!d->device) d->device = at; break;
		case VPCI_NOTIFY:
			if (!d->notify) {
				d->notify = at;
				d->notify_mult = pci_ecam_read32(pci_dev, pos + 16);
			}
			break;
		}
	}
	return d->common && d->isr && d->notify ? 0 : VIO_ENODEV;
}

#define C8(off)  (*(volatile u8 *)(d->common + (off)))
#define C16(off) (*(volatile u16 *)(d->common + (off)))
#define C32(off) (*(volatile u32 *)(d->common + (off)))

void vpci_msix_entry(struct vpci_dev *d, unsigned vector, u64 address, u32 data)
{
	volatile u32 *e = (volatile u32 *)(d->msix_table + 16 * vector);

	e[0] = (u32)address;
	e[1] = (u32)(address >> 32);
	e[2] = data;
	e[3] = 0;               /* unmasked */
}

static void write64(unsigned off, const volatile void *p, struct vpci_dev *d)
{
	u64 a = (unsigned long)p;

	C32(off) = (u32)a;
	C32(off + 4) = (u32)(a >> 32);
}

int vpci_init(struct vpci_dev *d, struct virtq *vq, int msix)
{
	u8 *p = (u8 *)vq;
	u16 max;

	d->vq = vq;
	C8(VC_DEVICE_STATUS) = 0;
	for (int i = 0; C8(VC_DEVICE_STATUS) != 0; i++)
		if (i == 1000)
			return VIO_EDEVICE;
	if (d->msix_cap) {      /* MSI-X on or off, as asked (6.8.2.3 Message Control bit 15) */
		u16 ctl = pci_ecam_read16(d->pci_dev, d->msix_cap + 2);
		pci_ecam_write16(d->pci_dev, d->msix_cap + 2, msix ? (ctl | 0x8000) & ~0x4000 : ctl & ~0x8000);
	} else if (msix) {
		return VIO_ENODEV;
	}
	C8(VC_DEVICE_STATUS) = STATUS_ACKNOWLEDGE;
	C8(VC_DEVICE_STATUS) = STATUS_ACKNOWLEDGE | STATUS_DRIVER;
	C32(VC_DEVICE_FEATURE_SELECT) = 1;
	if (!(C32(VC_DEVICE_FEATURE) & 1))
		return VIO_EFEATURE;
	C32(VC_DRIVER_FEATURE_SELECT) = 0;
	C32(VC_DRIVER_FEATURE) = 0;
	C32(VC_DRIVER_FEATURE_SELECT) = 1;
	C32(VC_DRIVER_FEATURE) = 1;     /* VIRTIO_F_VERSION_1 */
	C8(VC_DEVICE_STATUS) = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
	if (!(C8(VC_DEVICE_STATUS) & STATUS_FEATURES_OK))
		return VIO_EFEATURE;
	if (msix) {
		C16(VC_CONFIG_MSIX_VECTOR) = 1;
		if (C16(VC_CONFIG_MSIX_VECTOR) != 1)
			return VIO_EDEVICE;
	}

	C16(VC_QUEUE_SELECT) = 0;
	max = C16(VC_QUEUE_SIZE);
	d->qsize = VIO_QUEUE_MAX;
	while (d->qsize > max)
		d->qsize >>= 1;
	if (d->qsize < 4 || C16(VC_QUEUE_ENABLE))
		return VIO_EQUEUE;
	d->avail_idx = d->used_seen = 0;
	for (unsigned long i = 0; i < sizeof(*vq); i++)
		p[i] = 0;
	C16(VC_QUEUE_SIZE) = d->qsize;
	write64(VC_QUEUE_DESC, vq->desc, d);
	write64(VC_QUEUE_DRIVER, &vq->avail, d);
	write64(VC_QUEUE_DEVICE, &vq->used, d);
	C16(VC_QUEUE_MSIX_VECTOR) = msix ? 0 : VIRTIO_NO_VECTOR;
	if (msix && C16(VC_QUEUE_MSIX_VECTOR) != 0)
		return VIO_EDEVICE;
	d->queue_notify = (volatile u16 *)(d->notify + C16(VC_QUEUE_NOTIFY_OFF) * d->notify_mult);
	barrier();
	C16(VC_QUEUE_ENABLE) = 1;
	C8(VC_DEVICE_STATUS) = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
	if (C8(VC_DEVICE_STATUS) & (STATUS_NEEDS_RESET | STATUS_FAILED))
		return VIO_EDEVICE;
	return 0;
}

int vpci_submit(struct vpci_dev *d, u32 *used_len)
{
	volatile u16 *used_idx = &d->vq->used.idx;
	struct virtq_used_elem elem;

	d->vq->avail.ring[d->avail_idx % d->qsize] = 0;
	barrier();
	d->avail_idx++;
	*(volatile u16 *)&d->vq->avail.idx = d->avail_idx;
	barrier();
	*d->queue_notify = 0;   /* the queue's index (no VIRTIO_F_NOTIFICATION_DATA) */
	for (unsigned long spins = 0; *used_idx == d->used_seen; spins++) {
		if (spins == POLL_LIMIT)
			return VIO_ETIMEOUT;
		__asm__ volatile("pause");
	}
	barrier();
	elem = *(volatile struct virtq_used_elem *)&d->vq->used.ring[d->used_seen % d->qsize];
	d->used_seen++;
	if (elem.id != 0)
		return VIO_EDEVICE;
	*used_len = elem.len;
	return 0;
}

u8 vpci_read_isr(struct vpci_dev *d)
{
	return *d->isr;
}

/* --- virtio_mmio.c's registers over a virtio-pci function (vio_find_pci) ------- */

static u32 vio_pci_read(const struct vio_dev *vd, unsigned off)
{
	struct vpci_dev *d = vd->pci;

	if (off >= MMIO_CONFIG)
		return d->device ? *(volatile u32 *)(d->device + off - MMIO_CONFIG) : 0;
	switch (off) {
	case MMIO_DEVICE_FEATURES: return C32(VC_DEVICE_FEATURE);
	case MMIO_QUEUE_NUM_MAX: return C16(VC_QUEUE_SIZE);     /* the maximum until the driver sets it */
	case MMIO_QUEUE_READY: return C16(VC_QUEUE_ENABLE);
	case MMIO_STATUS: return C8(VC_DEVICE_STATUS);
	case MMIO_CONFIG_GENERATION: return C8(VC_CONFIG_GENERATION);
	default: return 0;
	}
}

static void vio_pci_write(const struct vio_dev *vd, unsigned off, u32 v)
{
	struct vpci_dev *d = vd->pci;

	switch (off) {
	case MMIO_DEVICE_FEATURES_SEL: C32(VC_DEVICE_FEATURE_SELECT) = v; break;
	case MMIO_DRIVER_FEATURES_SEL: C32(VC_DRIVER_FEATURE_SELECT) = v; break;
	case MMIO_DRIVER_FEATURES: C32(VC_DRIVER_FEATURE) = v; break;
	case MMIO_QUEUE_SEL: d->queue_sel = (u16)v; C16(VC_QUEUE_SELECT) = (u16)v; break;
	case MMIO_QUEUE_NUM: C16(VC_QUEUE_SIZE) = (u16)v; break;
	case MMIO_QUEUE_READY:
		if (v && d->queue_sel < VPCI_VIO_QUEUES) {
			C16(VC_QUEUE_MSIX_VECTOR) = VIRTIO_NO_VECTOR;   /* we poll */
			d->notify_off[d->queue_sel] = C16(VC_QUEUE_NOTIFY_OFF);
		}
		C16(VC_QUEUE_ENABLE) = (u16)v;
		break;
	case MMIO_QUEUE_NOTIFY:
		if (v < VPCI_VIO_QUEUES)
			*(volatile u16 *)(d->notify + d->notify_off[v] * d->notify_mult) = (u16)v;
		break;
	case MMIO_STATUS: C8(VC_DEVICE_STATUS) = (u8)v; break;
	case MMIO_QUEUE_DESC_LOW: case MMIO_QUEUE_DESC_HIGH: C32(VC_QUEUE_DESC + (off & 4)) = v; break;
	case MMIO_QUEUE_DRIVER_LOW: case MMIO_QUEUE_DRIVER_HIGH: C32(VC_QUEUE_DRIVER + (off & 4)) = v; break;
	case MMIO_QUEUE_DEVICE_LOW: case MMIO_QUEUE_DEVICE_HIGH: C32(VC_QUEUE_DEVICE + (off & 4)) = v; break;
	default: break;         /* InterruptACK: reading the ISR acknowledges behind PCI */
	}
}

int vio_find_pci(struct vio_dev *vd, struct vpci_dev *f, u32 device_id)
{
	for (unsigned dev = 1; dev < 32; dev++) {
		if (pci_cf8_read32(dev, 0) != ((0x1040u + device_id) << 16 | 0x1af4u))
			continue;
		if (vpci_probe(f, dev) != 0)
			return VIO_ENODEV;
		f->queue_sel = 0;
		for (int i = 0; i < VPCI_VIO_QUEUES; i++)
			f->notify_off[i] = 0;
		vd->pci = f;
		vd->pci_read = vio_pci_read;
		vd->pci_write = vio_pci_write;
		vd->base = 0;
		return 0;
	}
	return VIO_ENODEV;
}
