/*
 * fwcfg.c - reads QEMU's fw_cfg (docs/specs/fw_cfg.rst) through ports 0x510/0x511.
 *
 * Started at CPL 3.  `outw key, 0x510` selects an item and rewinds it; each
 * `inb 0x511` returns its next byte (0 past the end).  Prints, in this fixed
 * format (numbers as print_hex / decimal as shown):
 *     fw_cfg: signature QEMU, id 0x<FW_CFG_ID, le32>
 *     fw_cfg: ram 0x<FW_CFG_RAM_SIZE, le64>
 *     fw_cfg: cpus <FW_CFG_NB_CPUS, le16, decimal>
 *     fw_cfg: cmdline "<FW_CFG_CMDLINE_DATA up to its NUL; le32 FW_CFG_CMDLINE_SIZE bytes>"
 *     fw_cfg: files <count, be32 at the head of FW_CFG_FILE_DIR>
 *     fw_cfg: file 0x<select> <size> <name>        (one per directory entry, big-endian)
 *     greeting: <opt/kvmpy/greeting, if present, up to a NUL; newline added if missing>
 *     fw_cfg: done
 * Strings longer than 4096 bytes are cut there and followed by "...".
 * Exits 0x50; 0x51 (after "fw_cfg: no device") if the signature is not
 * "QEMU"; 1 if the 5th signature byte is not 0 (reads past the end must be).
 */
#include "runtime/runtime.h"

#define EXIT_OK        0x50
#define EXIT_NO_DEVICE 0x51

#define FW_CFG_PORT_SEL  0x510
#define FW_CFG_PORT_DATA 0x511

#define FW_CFG_SIGNATURE    0x00
#define FW_CFG_ID           0x01
#define FW_CFG_RAM_SIZE     0x03
#define FW_CFG_NB_CPUS      0x05
#define FW_CFG_CMDLINE_SIZE 0x14
#define FW_CFG_CMDLINE_DATA 0x15
#define FW_CFG_FILE_DIR     0x19
#define FW_CFG_MAX_FILE_PATH 56

#define MAX_PRINT 4096
#define GREETING "opt/kvmpy/greeting"

static inline void outw(u16 port, u16 v)
{
	__asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port));
}

static void fw_select(u16 key)
{
	outw(FW_CFG_PORT_SEL, key);
}

static u8 fw_byte(void)
{
	return inb(FW_CFG_PORT_DATA);
}

/* n (<= 8) bytes of the selected item as a little-endian number. */
static u64 fw_le(int n)
{
	u64 v = 0;

	for (int i = 0; i < n; i++)
		v |= (u64)fw_byte() << (8 * i);
	return v;
}

/* n (<= 8) bytes as a big-endian number (the file directory's byte order). */
static u64 fw_be(int n)
{
	u64 v = 0;

	for (int i = 0; i < n; i++)
		v = v << 8 | fw_byte();
	return v;
}


/* Print up to `size` bytes of the selected item, stopping at a NUL; returns the last byte. */
static int print_item(u64 size)
{
	int last = -1;

	for (u64 i = 0; i < size; i++) {
		u8 c = fw_byte();

		if (!c)
			break;
		if (i == MAX_PRINT) {
			puts("...");
			break;
		}
		putc(c);
		last = c;
	}
	return last;
}

static int streq(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

int main(void)
{
	char sig[5], name[FW_CFG_MAX_FILE_PATH + 1];
	u64 count, greeting_key = 0, greeting_size = 0;
	int have_greeting = 0;
	u8 past_end;

	fw_select(FW_CFG_SIGNATURE);
	for (int i = 0; i < 4; i++)
		sig[i] = fw_byte();
	sig[4] = 0;
	past_end = fw_byte();
	if (!streq(sig, "QEMU")) {
		puts("fw_cfg: no device\n");
		return EXIT_NO_DEVICE;
	}
	if (past_end) {
		puts("fw_cfg: read past the end of the signature gave ");
		print_hex(past_end);
		putc('\n');
		return EXIT_SELFCHECK_FAILED;
	}

	puts("fw_cfg: signature QEMU, id ");
	fw_select(FW_CFG_ID);
	print_hex(fw_le(4));
	puts("\nfw_cfg: ram ");
	fw_select(FW_CFG_RAM_SIZE);
	print_hex(fw_le(8));
	puts("\nfw_cfg: cpus ");
	fw_select(FW_CFG_NB_CPUS);
	print_dec(fw_le(2));

	puts("\nfw_cfg: cmdline \"");
	fw_select(FW_CFG_CMDLINE_SIZE);
	count = fw_le(4);
	fw_select(FW_CFG_CMDLINE_DATA);
	print_item(count);
	puts("\"\n");

	fw_select(FW_CFG_FILE_DIR);
	count = fw_be(4);
	puts("fw_cfg: files ");
	print_dec(count);
	putc('\n');
	for (u64 f = 0; f < count; f++) {
		u64 size = fw_be(4), key = fw_be(2);

		fw_be(2); /* reserved */
		for (int i = 0; i < FW_CFG_MAX_FILE_PATH; i++)
			name[i] = fw_byte();
		name[FW_CFG_MAX_FILE_PATH] = 0; /* in case the host forgot the NUL */
		puts("fw_cfg: file ");
		print_hex(key);
		putc(' ');
		print_dec(size);
		putc(' ');
		puts(name);
		putc('\n');
		if (streq(name, GREETING)) {
			have_greeting = 1;
			greeting_key = key;
			greeting_size = size;
		}
	}

	if (have_greeting) {
		puts("greeting: ");
		fw_select(greeting_key);
		if (print_item(greeting_size) != '\n')
			putc('\n');
	}
	puts("fw_cfg: done\n");
	return EXIT_OK;
}
