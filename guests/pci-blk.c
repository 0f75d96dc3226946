/*
 * pci-blk.c - finds the virtio-blk function on PCI bus 0 and drives it with
 * INTx and then with MSI-X, checking that each interrupt arrives.
 *
 * 1. Enumerates bus 0 through configuration mechanism #1 (0xcf8/0xcfc),
 *    printing each function, and checks that ECAM (0xE0000000) shows the
 *    same first 64 bytes of every one.
 * 2. Takes the first 1af4:1042 (modern virtio-blk), sizes and maps BAR 0
 *    and walks its virtio capabilities (runtime/virtio_pci.c).
 * 3. INTx: routes the function's INTA# (GSI 15 + its device number, as
 *    kvmpy's _PRT says) through the IOAPIC to vector 0x30 (level), with the
 *    local APIC enabled and interrupts off (IF = 0), negotiates
 *    VIRTIO_F_VERSION_1, writes sector 1, reads it back and reads sector
 *    0; after each request vector 0x30 must be pending in the local APIC's
 *    IRR and the ISR must read 1 and then 0.
 * 4. MSI-X: resets the device, enables MSI-X with vector 0 (queue) ->
 *    APIC vector 0x31 and vector 1 (configuration) -> 0x32, reads sector 0
 *    again: vector 0x31 must be pending, the ISR must read 0.
 * Output:
 *     pci-blk: 00:00.0 1b36:0008         (one line per function)
 *     pci-blk: 00:01.0 1af4:1042
 *     pci-blk: ecam agrees
 *     pci-blk: virtio-blk at 00:01.0, BAR 0 0xc0000000 size 0x8000
 *     pci-blk: intx ok
 *     pci-blk: msi-x ok
 *     pci-blk: <capacity> sectors, sector 0 checksum 0x<FNV-1a 64 of it>
 * Exits 0x40; 0x4E without the function ("no virtio-blk function"), 0x4D on
 * a driver error ("pci-blk: <what> error: <reason>"), 1 when a check fails
 * ("pci-blk: <check> failed").  Runs at CPL 0 (it programs the IOAPIC).
 */
#include "runtime/runtime.h"
#include "runtime/virtio_pci.h"

#define EXIT_OK        0x40
#define EXIT_IO_ERROR  0x4D
#define EXIT_NO_DEVICE 0x4E

#define LAPIC       0xFEE00000UL
#define LAPIC_SVR   0x0F0
#define LAPIC_IRR   0x200
#define IOAPIC      0xFEC00000UL
#define INTX_VECTOR 0x30
#define MSIX_QUEUE_VECTOR  0x31
#define MSIX_CONFIG_VECTOR 0x32

#define VIRTIO_BLK_T_IN  0
#define VIRTIO_BLK_T_OUT 1

static struct virtq vq;
static struct vpci_dev dev;
static struct { u32 type, reserved; u64 sector; } hdr __attribute__((aligned(16)));
static u8 data[512] __attribute__((aligned(512)));
static volatile u8 status;

static u32 mmio32(unsigned long a) { return *(volatile u32 *)a; }
static void mmio32w(unsigned long a, u32 v) { *(volatile u32 *)a = v; }

static void ioapic_write(unsigned reg, u32 v)
{
	mmio32w(IOAPIC, reg);
	mmio32w(IOAPIC + 0x10, v);
}

static int irr_has_now(unsigned vector)
{
	return mmio32(LAPIC + LAPIC_IRR + 0x10 * (vector / 32)) >> (vector % 32) & 1;
}

/* The interrupt may land a moment after the used ring moved (a request the host
 * served from another thread, such as a rate-limited disk's timer): wait a little. */
static int irr_has(unsigned vector)
{
	for (int i = 0; i < 100000; i++) {
		if (irr_has_now(vector))
			return 1;
		__asm__ volatile("pause");
	}
	return 0;
}

static int check(const char *what, int ok)
{
	if (!ok) {
		puts("pci-blk: ");
		puts(what);
		puts(" failed\n");
	}
	return ok;
}

static int fail(const char *what, int err)
{
	puts("pci-blk: ");
	puts(what);
	puts(" error: ");
	puts(vio_strerror(err));
	putc('\n');
	return EXIT_IO_ERROR;
}

static int request(u32 type, u64 sector)
{
	u32 len;
	int err;

	hdr.type = type;
	hdr.reserved = 0;
	hdr.sector = sector;
	status = 0xff;
	vq.desc[0] = (struct virtq_desc){ (unsigned long)&hdr, 16, VIRTQ_DESC_F_NEXT, 1 };
	vq.desc[1] = (struct virtq_desc){ (unsigned long)data, 512,
					  VIRTQ_DESC_F_NEXT | (type == VIRTIO_BLK_T_IN ? VIRTQ_DESC_F_WRITE : 0), 2 };
	vq.desc[2] = (struct virtq_desc){ (unsigned long)&status, 1, VIRTQ_DESC_F_WRITE, 0 };
	err = vpci_submit(&dev, &len);
	if (err)
		return err;
	return status == 0 ? 0 : VIO_EDEVICE;
}

static int enumerate(void)
{
	int same = 1;

	for (unsigned d = 0; d < 32; d++) {
		u32 id = pci_cf8_read32(d, 0);

		if (id == 0xffffffffu)
			continue;
		puts("pci-blk: 00:");
		putc('0' + d / 10);
		putc('0' + d % 10);
		puts(".0 ");
		for (int shift = 12; shift >= 0; shift -= 4)
			putc("0123456789abcdef"[(id >> shift) & 15]);
		putc(':');
		for (int shift = 28; shift >= 16; shift -= 4)
			putc("0123456789abcdef"[(id >> shift) & 15]);
		putc('\n');
		for (unsigned reg = 0; reg < 64; reg += 4)
			same &= pci_cf8_read32(d, reg) == pci_ecam_read32(d, reg);
	}
	if (same)
		puts("pci-blk: ecam agrees\n");
	return same;
}

static unsigned find(void)
{
	for (unsigned d = 0; d < 32; d++)
		if (pci_cf8_read32(d, 0) == (0x1042u << 16 | 0x1af4))
			return d;
	return 0;
}

int main(void)
{
	u64 h = 0xcbf29ce484222325ULL, cap;
	unsigned d;
	int err;

	__asm__ volatile("cli");
	if (!check("ecam", enumerate()))
		return EXIT_SELFCHECK_FAILED;
	d = find();
	if (!d) {
		puts("no virtio-blk function\n");
		return EXIT_NO_DEVICE;
	}
	err = vpci_probe(&dev, d);
	if (err)
		return fail("probe", err);
	puts("pci-blk: virtio-blk at 00:");
	putc('0' + d / 10);
	putc('0' + d % 10);
	puts(".0, BAR 0 ");
	print_hex(dev.bar0);
	puts(" size ");
	print_hex(dev.bar0_size);
	putc('\n');

	/* INTx: the local APIC on, INTA# -> IOAPIC pin (15 + d) -> vector 0x30, level, unmasked. */
	mmio32w(LAPIC + LAPIC_SVR, 0x1ff);
	ioapic_write(0x10 + 2 * (15 + d) + 1, 0);               /* destination: APIC 0 */
	ioapic_write(0x10 + 2 * (15 + d), INTX_VECTOR | 1 << 15);
	err = vpci_init(&dev, &vq, 0);
	if (err)
		return fail("init", err);
	cap = *(volatile u32 *)dev.device | (u64)*(volatile u32 *)(dev.device + 4) << 32;
	for (int i = 0; i < 512; i++)
		data[i] = (u8)(i * 7 + 3);
	err = request(VIRTIO_BLK_T_OUT, 1);
	if (err)
		return fail("write", err);
	if (!check("intx irr after write", irr_has(INTX_VECTOR)) ||
	    !check("isr after write", vpci_read_isr(&dev) == 1 && vpci_read_isr(&dev) == 0))
		return EXIT_SELFCHECK_FAILED;
	for (int i = 0; i < 512; i++)
		data[i] = 0;
	err = request(VIRTIO_BLK_T_IN, 1);
	if (err)
		return fail("read", err);
	for (int i = 0; i < 512; i++)
		if (!check("read back", data[i] == (u8)(i * 7 + 3)))
			return EXIT_SELFCHECK_FAILED;
	if (!check("isr after read", vpci_read_isr(&dev) == 1))
		return EXIT_SELFCHECK_FAILED;
	puts("pci-blk: intx ok\n");

	/* MSI-X: fixed delivery to APIC 0 (address 0xFEE00000), the vector in the data. */
	if (!check("msi-x capability", dev.msix_cap && dev.msix_vectors >= 2))
		return EXIT_SELFCHECK_FAILED;
	vpci_msix_entry(&dev, 0, LAPIC, MSIX_QUEUE_VECTOR);
	vpci_msix_entry(&dev, 1, LAPIC, MSIX_CONFIG_VECTOR);
	err = vpci_init(&dev, &vq, 1);
	if (err)
		return fail("msi-x init", err);
	err = request(VIRTIO_BLK_T_IN, 0);
	if (err)
		return fail("read", err);
	if (!check("msi-x irr", irr_has(MSIX_QUEUE_VECTOR)) || !check("msi-x isr", vpci_read_isr(&dev) == 0) ||
	    !check("config vector quiet", !irr_has_now(MSIX_CONFIG_VECTOR)))
		return EXIT_SELFCHECK_FAILED;
	puts("pci-blk: msi-x ok\n");
	for (int i = 0; i < 512; i++)
		h = (h ^ data[i]) * 0x100000001b3ULL;
	puts("pci-blk: ");
	print_dec(cap);
	puts(" sectors, sector 0 checksum ");
	print_hex(h);
	putc('\n');
	return EXIT_OK;
}
