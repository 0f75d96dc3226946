/*
 * fuzz_native.c - the bundled fuzz target's parser built for the host, for
 * `kvmpy bench fuzz` (kvmpy/bench/fuzz.py): the physical limit that kvmpy's
 * executions per second are compared with.
 *
 * The parser is not copied: fuzz-parser.h is the very file the guest
 * (guests/fuzz-target.c) includes; it ships beside the guest image and the
 * benchmark passes its directory with -I. Built with AFL++'s compiler
 * (afl-clang-fast: LLVM PCGUARD edges), it runs in AFL++'s persistent mode
 * with shared-memory test cases: one process, __AFL_LOOP(N) cases each,
 * no fork and no file per case, the fastest way AFL++ can drive a target.
 *
 * The planted bugs do what they do natively: the 'A' report aborts
 * (SIGABRT, like the guest's report that kvmpy answers with SIGABRT), "kvm!"
 * writes through a wild pointer into page zero (SIGSEGV), ud2 is SIGILL, the
 * hang spins until afl-fuzz's -t kills it.
 *
 *   fuzz_native --time ROUNDS FILE...   parse each file ROUNDS times outside
 *                                       afl-fuzz, print the mean ns per parse
 *   (under afl-fuzz)                    the persistent loop
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef uint8_t u8;
typedef uint64_t u64;

#define FUZZ_INPUT_MAX 4096                  /* the guest's buffer: the same cut */

static u64 *volatile fuzz_wild = (u64 *)16;  /* in page zero, which is never mapped */

#define FUZZ_REPORT_ASSERT() abort()
#define FUZZ_WILD_WRITE() (*fuzz_wild = 0xdead)
#define FUZZ_UD2() __asm__ volatile("ud2")
#define FUZZ_HANG() for (;;) __asm__ volatile("pause")
#include "fuzz-parser.h"

volatile u64 fuzz_result;

#ifdef __AFL_FUZZ_TESTCASE_LEN
__AFL_FUZZ_INIT();
#endif

static double now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

/* --time ROUNDS FILE...: the parse alone (with its instrumentation, outside afl-fuzz) */
static int time_parses(int argc, char **argv)
{
	static u8 buf[FUZZ_INPUT_MAX];
	long rounds = atol(argv[2]);
	double total = 0;
	long parses = 0;

	if (rounds <= 0)
		return 2;
	for (int i = 3; i < argc; i++) {
		FILE *f = fopen(argv[i], "rb");
		size_t n;
		double t0;

		if (!f)
			continue;
		n = fread(buf, 1, sizeof(buf), f);
		fclose(f);
		t0 = now_ns();
		for (long r = 0; r < rounds; r++)
			fuzz_result = fuzz_parse(buf, n);
		total += now_ns() - t0;
		parses += rounds;
	}
	if (!parses)
		return 2;
	printf("%.3f\n", total / parses);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 3 && strcmp(argv[1], "--time") == 0)
		return time_parses(argc, argv);
#ifdef __AFL_FUZZ_TESTCASE_LEN
	__AFL_INIT();
	u8 *buf = __AFL_FUZZ_TESTCASE_BUF;

	while (__AFL_LOOP(100000)) {
		u64 len = __AFL_FUZZ_TESTCASE_LEN;

		fuzz_result = fuzz_parse(buf, len > FUZZ_INPUT_MAX ? FUZZ_INPUT_MAX : len);
	}
	return 0;
#else
	fprintf(stderr, "fuzz_native: built without AFL++'s compiler: only --time works\n");
	return 2;
#endif
}
