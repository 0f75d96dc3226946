/*
 * multiboot-hello.c - a multiboot v1 kernel (entry in multiboot-hello.S).
 *
 * Checks EAX == 0x2BADB002, then prints what the boot loader passed in the
 * information structure (Multiboot spec 0.6.96, section 3.3), each part only
 * if its flag says it is there: the command line (its first word, the kernel's
 * file name, cut to the name after the last '/'), mem_lower/mem_upper, the
 * memory map, each module's string, size and first 8 bytes, and the boot
 * loader's name.  Exits 0x2B (status 0x57); a wrong magic exits 1.
 */
#include "runtime/runtime.h"

#define MULTIBOOT_BOOTLOADER_MAGIC	0x2BADB002
#define MBI_MEMORY		(1u << 0)
#define MBI_CMDLINE		(1u << 2)
#define MBI_MODS		(1u << 3)
#define MBI_MEM_MAP		(1u << 6)
#define MBI_BOOT_LOADER_NAME	(1u << 9)

struct mb_info {
	u32 flags, mem_lower, mem_upper, boot_device, cmdline;
	u32 mods_count, mods_addr;
	u32 syms[4];
	u32 mmap_length, mmap_addr;
	u32 drives_length, drives_addr, config_table, boot_loader_name;
};

struct mb_module {
	u32 mod_start, mod_end, string, reserved;
};

struct mb_mmap_entry {
	u32 size;		/* bytes after this field; the next entry follows them */
	u64 base_addr, length;
	u32 type;
} __attribute__((packed));


static void print_byte(u8 b)
{
	putc("0123456789abcdef"[b >> 4]);
	putc("0123456789abcdef"[b & 15]);
}

/* The kernel's command line, its first word (a path) cut to the file name. */
static void print_cmdline(const char *s)
{
	const char *word = s, *p;

	for (p = s; *p && *p != ' '; p++)
		if (*p == '/')
			word = p + 1;
	puts("cmdline: '");
	puts(word);
	puts("'\n");
}

static void print_mmap(const struct mb_info *mbi)
{
	u32 p = mbi->mmap_addr, end = mbi->mmap_addr + mbi->mmap_length;

	while (p < end) {
		const struct mb_mmap_entry *e = (const struct mb_mmap_entry *)p;

		puts("mmap ");
		print_hex(e->base_addr);
		puts(" +");
		print_hex(e->length);
		puts(" type ");
		print_dec(e->type);
		putc('\n');
		p += e->size + 4;
	}
}

static void print_modules(const struct mb_info *mbi)
{
	const struct mb_module *m = (const struct mb_module *)mbi->mods_addr;
	u32 i, j;

	puts("mods ");
	print_dec(mbi->mods_count);
	putc('\n');
	for (i = 0; i < mbi->mods_count; i++, m++) {
		u32 size = m->mod_end - m->mod_start;
		const u8 *data = (const u8 *)m->mod_start;

		puts("mod ");
		print_dec(i);
		puts(": '");
		puts((const char *)m->string);
		puts("' ");
		print_dec(size);
		puts(" bytes:");
		for (j = 0; j < size && j < 8; j++) {
			putc(' ');
			print_byte(data[j]);
		}
		putc('\n');
	}
}

int kmain(u32 magic, const struct mb_info *mbi)
{
	if (magic != MULTIBOOT_BOOTLOADER_MAGIC) {
		puts("multiboot-hello: bad magic ");
		print_hex(magic);
		putc('\n');
		return EXIT_SELFCHECK_FAILED;
	}
	puts("multiboot-hello: magic ");
	print_hex(magic);
	puts(", flags ");
	print_hex(mbi->flags);
	putc('\n');
	if (mbi->flags & MBI_CMDLINE)
		print_cmdline((const char *)mbi->cmdline);
	if (mbi->flags & MBI_MEMORY) {
		puts("mem_lower ");
		print_dec(mbi->mem_lower);
		puts("K, mem_upper ");
		print_dec(mbi->mem_upper);
		puts("K\n");
	}
	if (mbi->flags & MBI_MEM_MAP)
		print_mmap(mbi);
	if (mbi->flags & MBI_MODS)
		print_modules(mbi);
	if (mbi->flags & MBI_BOOT_LOADER_NAME) {
		puts("boot loader: ");
		puts((const char *)mbi->boot_loader_name);
		putc('\n');
	}
	puts("multiboot-hello: done\n");
	return 0x2B;
}
