/*
 * fuzz-target.c - a small binary-format parser for kvmpy.fuzz (CPL 3, long mode).
 *
 * Compiled with gcc's -fsanitize-coverage=trace-pc: gcc calls
 * __sanitizer_cov_trace_pc() at the start of every basic block.  gcc 12 has no
 * trace-pc-guard (that is clang's), so the callback below hashes its return
 * address (the block's address) and counts the edge from the previous block
 * AFL-style, in the map __fuzz_cov_map that the host reads straight from guest
 * RAM: counting an edge costs no exit.
 *
 * The host (kvmpy.fuzz.Harness) finds everything by symbol:
 *   fuzz_input[FUZZ_INPUT_MAX]  where a case's bytes go
 *   fuzz_input_len              how many (u64); the target trusts nothing beyond it
 *   __fuzz_cov_map              the edge-count map, COV_MAP_SIZE bytes
 *
 * Protocol: prints "fuzz-target: ready", then loops:
 *   out 0xf4, 0x52 ('R')   ready: the host zeroes the map and checkpoints here
 *   parse(fuzz_input, fuzz_input_len)
 *   out 0xf4, 0x44 ('D')   the case ended without a crash; the host resets
 *
 * The format: "FZ", a version byte (1), then records <type u8><len u8><len bytes>:
 *   'N' note      ignored
 *   'S' sum       payload bytes summed into the result
 *   'A' assert    payload[0] must equal the sum of the others (mod 256), else the
 *                 target reports it:  out 0xf4, 0x43 ('C')  (a sanitizer-style report)
 *   'K' key       payload "kvm!" (compared byte by byte, each a branch) makes a
 *                 write through a wild pointer: a page fault (#PF, vector 14)
 *   'U' undefined len 2, payload 0xff 0xee: ud2 (#UD, vector 6)
 *   'H' hang      payload[0] == 0x77: spins forever (the host's time budget ends it)
 * Anything else stops the parse.
 *
 * Each case checks that it does not see the previous case's RAM: `canary`, which
 * every case sets, must be zero when a case begins, else exit 0x53 ('S', stale).
 */
#include "runtime/runtime.h"

#define FUZZ_INPUT_MAX 4096
#define COV_MAP_SIZE   65536
#define EXIT_READY   0x52
#define EXIT_DONE    0x44
#define EXIT_ASSERT  0x43
#define EXIT_STALE   0x53

u8 fuzz_input[FUZZ_INPUT_MAX] __attribute__((aligned(4096)));
volatile u64 fuzz_input_len;
u8 __fuzz_cov_map[COV_MAP_SIZE] __attribute__((aligned(4096)));

static u64 cov_prev;
static volatile u64 canary;
volatile u64 fuzz_result;

__attribute__((no_sanitize_coverage))
void __sanitizer_cov_trace_pc(void)
{
	u64 pc = (u64)__builtin_return_address(0);
	u64 loc = (pc * 0x9E3779B97F4A7C15ULL) >> 48;    /* 16 bits: COV_MAP_SIZE */

	__fuzz_cov_map[(loc ^ cov_prev) & (COV_MAP_SIZE - 1)]++;
	cov_prev = loc >> 1;
}

static void report(u8 code)
{
	outb(DEBUG_EXIT_PORT, code);
}

static void check_key(const u8 *p, u64 n)
{
	if (n != 4)
		return;
	if (p[0] != 'k')
		return;
	if (p[1] != 'v')
		return;
	if (p[2] != 'm')
		return;
	if (p[3] != '!')
		return;
	*(volatile u64 *)0x7f0000000000ULL = 0xdead;     /* unmapped: #PF */
}

static u64 parse(const u8 *in, u64 len)
{
	u64 pos = 3, sum = 0;

	if (len < 3 || in[0] != 'F' || in[1] != 'Z' || in[2] != 1)
		return 0;
	while (pos + 2 <= len) {
		u8 type = in[pos], n = in[pos + 1];
		const u8 *p = in + pos + 2;

		if (pos + 2 + n > len)
			break;
		switch (type) {
		case 'N':
			break;
		case 'S':
			for (u8 i = 0; i < n; i++)
				sum += p[i];
			break;
		case 'A': {
			u8 s = 0;

			for (u8 i = 1; i < n; i++)
				s += p[i];
			if (n == 0 || p[0] != s)
				report(EXIT_ASSERT);
			break;
		}
		case 'K':
			check_key(p, n);
			break;
		case 'U':
			if (n == 2 && p[0] == 0xff && p[1] == 0xee)
				__asm__ volatile("ud2");
			break;
		case 'H':
			if (n >= 1 && p[0] == 0x77)
				for (;;)
					__asm__ volatile("pause");
			break;
		default:
			return sum;
		}
		pos += 2 + n;
	}
	return sum;
}

int main(void)
{
	puts("fuzz-target: ready\n");
	for (;;) {
		report(EXIT_READY);
		if (canary)
			report(EXIT_STALE);
		canary = 1;
		u64 len = fuzz_input_len;
		fuzz_result = parse(fuzz_input, len > FUZZ_INPUT_MAX ? FUZZ_INPUT_MAX : len);
		report(EXIT_DONE);
	}
}
