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
 * The format and its parser are in fuzz-parser.h (shared with the native build of
 * `kvmpy bench fuzz`); here the planted bugs do what a guest can:
 *   'A' assert    a wrong checksum: the report  out 0xf4, 0x43 ('C')  (the shallow bug)
 *   'K' key       "kvm!": a write through a wild pointer, #PF (vector 14) (the deeper bug)
 *   'U' undefined ff ee: ud2 (#UD, vector 6)
 *   'H' hang      0x77: spins forever (the host's time budget ends it)
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

#define FUZZ_REPORT_ASSERT() report(EXIT_ASSERT)     /* a sanitizer-style report: out 0xf4, 0x43 */
#define FUZZ_WILD_WRITE() (*(volatile u64 *)0x7f0000000000ULL = 0xdead)   /* unmapped: #PF */
#define FUZZ_UD2() __asm__ volatile("ud2")                 /* #UD, vector 6 */
#define FUZZ_HANG() for (;;) __asm__ volatile("pause")     /* the host's time budget ends it */
#include "fuzz-parser.h"

int main(void)
{
	puts("fuzz-target: ready\n");
	for (;;) {
		report(EXIT_READY);
		if (canary)
			report(EXIT_STALE);
		canary = 1;
		u64 len = fuzz_input_len;
		fuzz_result = fuzz_parse(fuzz_input, len > FUZZ_INPUT_MAX ? FUZZ_INPUT_MAX : len);
		report(EXIT_DONE);
	}
}
