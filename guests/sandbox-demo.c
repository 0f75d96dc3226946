/*
 * sandbox-demo.c - the demo guest of kvmpy.Sandbox (CPL 3, long mode).
 *
 * Prints "sandbox-demo: ready", then serves calls (runtime/sandbox.h).  Its
 * functions, each a thing a test or the benchmark needs:
 *
 *   add(ii:i)         a + b
 *   nop(:)            nothing: the trivial call
 *   reverse(b:b)      the bytes backwards
 *   upper(s:s)        ASCII letters upper-cased
 *   counter(:i)       increments a global and returns it: 1 on every call, since
 *                     each call starts from the checkpoint
 *   dirty(i:i)        writes one byte into each of the first n pages (at most 256)
 *                     of a 1 MiB array; returns n
 *   call_host(si:i)   calls the host function named by the string with the int,
 *                     returns its int answer (or the host's refusal as its error)
 *   shout(s:s)        calls the host's decorate(s:s) with the string, returns
 *                     the answer upper-cased
 *   crash(i:i)        0: a write to an unmapped address (#PF); 1: ud2 (#UD);
 *                     2: divides by zero (#DE); 3: breaks the IDT and faults:
 *                     a triple fault
 *   spin(:i)          loops forever (the host's time budget ends it)
 *   fail(s:i)         returns the string as an error
 *   hostile(i:b)      breaks the ABI (see the cases below): the host must refuse it
 *   hostile_str(:s)   returns a str that is not UTF-8
 */
#include "runtime/runtime.h"
#include "runtime/sandbox.h"

#define SCRATCH_PAGES 256
#define IDT_BASE 0x5000          /* kvmpy.fuzz.traps' IDT (x86/layout.py FUZZ_TRAPS) */

static u8 scratch[SCRATCH_PAGES * 4096] SBX_NOINIT;
static u8 out[SBX_ARGS_SIZE] SBX_NOINIT;
static u64 count;

SANDBOX_FUNCTION(add, "ii:i")
{
	return sbx_ret_int(ret, (long long)(args[0].value + args[1].value));
}

SANDBOX_FUNCTION(nop, ":")
{
	return SBX_OK;
}

SANDBOX_FUNCTION(reverse, "b:b")
{
	const u8 *in = (const u8 *)args[0].value;
	u64 n = args[0].len;

	for (u64 i = 0; i < n; i++)
		out[i] = in[n - 1 - i];
	return sbx_ret_bytes(ret, out, n);
}

SANDBOX_FUNCTION(upper, "s:s")
{
	u8 *s = (u8 *)args[0].value;           /* the argument's own bytes: ours to change */

	for (u64 i = 0; i < args[0].len; i++)
		if (s[i] >= 'a' && s[i] <= 'z')
			s[i] -= 'a' - 'A';
	ret->type = SBX_STR;
	ret->value = (u64)s;
	ret->len = args[0].len;
	return SBX_OK;
}

SANDBOX_FUNCTION(counter, ":i")
{
	return sbx_ret_int(ret, (long long)++count);
}

SANDBOX_FUNCTION(dirty, "i:i")
{
	u64 n = args[0].value > SCRATCH_PAGES ? SCRATCH_PAGES : args[0].value;

	for (u64 p = 0; p < n; p++)
		((volatile u8 *)scratch)[p * 4096] = (u8)(p + 1);
	return sbx_ret_int(ret, (long long)n);
}

SANDBOX_FUNCTION(call_host, "si:i")
{
	struct sbx_val a[1] = { SBX_I(args[1].value) }, r;

	/* the name is NUL-terminated by the host */
	if (sbx_host_call((const char *)args[0].value, a, 1, &r) != SBX_OK) {
		*ret = r;                       /* the host's refusal, as this call's error */
		return SBX_ERR;
	}
	if (r.type != SBX_INT)
		return sbx_error(ret, "call_host: the host function did not return an int");
	return sbx_ret_int(ret, (long long)r.value);
}

SANDBOX_FUNCTION(shout, "s:s")
{
	struct sbx_val a[1] = { SBX_B(args[0].value, args[0].len) }, r;

	a[0].type = SBX_STR;
	if (sbx_host_call("decorate", a, 1, &r) != SBX_OK) {
		*ret = r;
		return SBX_ERR;
	}
	if (r.type != SBX_STR || r.len > sizeof(out))
		return sbx_error(ret, "shout: decorate did not return a str");
	for (u64 i = 0; i < r.len; i++) {
		u8 c = ((const u8 *)r.value)[i];

		out[i] = c >= 'a' && c <= 'z' ? c - ('a' - 'A') : c;
	}
	ret->type = SBX_STR;
	ret->value = (u64)out;
	ret->len = r.len;
	return SBX_OK;
}

SANDBOX_FUNCTION(crash, "i:i")
{
	volatile u64 zero = 0;

	switch (args[0].value) {
	case 0:
		*(volatile u64 *)0x7f0000000000ULL = 1;         /* unmapped: #PF */
		break;
	case 1:
		__asm__ volatile("ud2");
		break;
	case 2: {                                            /* #DE */
		u64 q = 1, d = zero, hi = 0;

		__asm__ volatile("divq %2" : "+a"(q), "+d"(hi) : "r"(d));
		return sbx_ret_int(ret, (long long)q);
	}
	case 3:
		for (int i = 0; i < 32 * 16; i++)               /* every gate not present */
			((volatile u8 *)IDT_BASE)[i] = 0;
		__asm__ volatile("ud2");                          /* #UD -> #NP -> #DF -> shutdown */
		break;
	}
	return sbx_error(ret, "crash: no such mode");
}

SANDBOX_FUNCTION(spin, ":i")
{
	for (;;)
		__asm__ volatile("pause");
	return SBX_ERR;
}

SANDBOX_FUNCTION(fail, "s:i")
{
	ret->type = SBX_STR;
	ret->value = args[0].value;
	ret->len = args[0].len;
	return SBX_ERR;
}

/* Results a hostile guest might leave; the host must bounds-check each. */
SANDBOX_FUNCTION(hostile, "i:b")
{
	switch (args[0].value) {
	case 0:                                          /* longer than any result limit */
		return sbx_ret_bytes(ret, out, 1ULL << 40);
	case 1:                                          /* beyond the end of RAM */
		return sbx_ret_bytes(ret, (void *)(1ULL << 39), 16);
	case 2:                                          /* wraps around the address space */
		return sbx_ret_bytes(ret, (void *)~0ULL, 16);
	case 3:                                          /* the wrong type for "i:b" */
		return sbx_ret_int(ret, 7);
	case 4:                                          /* a status the ABI does not have */
		sandbox_page.status = 77;
		sandbox_page.ret.type = SBX_BYTES;
		__asm__ volatile("outb %0, %1" : : "a"((u8)SBX_EXIT_DONE), "Nd"(DEBUG_EXIT_PORT) : "memory");
		break;
	case 5:                                          /* an exit value the ABI does not have */
		__asm__ volatile("outb %0, %1" : : "a"((u8)0x99), "Nd"(DEBUG_EXIT_PORT) : "memory");
		break;
	case 6:                                          /* a host call whose name is outside RAM */
		sandbox_page.host_name = 1ULL << 39;
		sandbox_page.host_name_len = 8;
		sandbox_page.host_argc = 0;
		__asm__ volatile("outb %0, %1" : : "a"((u8)SBX_EXIT_HOST), "Nd"(DEBUG_EXIT_PORT) : "memory");
		break;
	case 7:                                          /* a host call with too many arguments */
		sandbox_page.host_name = (u64)"decorate";
		sandbox_page.host_name_len = 8;
		sandbox_page.host_argc = 1000;
		__asm__ volatile("outb %0, %1" : : "a"((u8)SBX_EXIT_HOST), "Nd"(DEBUG_EXIT_PORT) : "memory");
		break;
	}
	return sbx_error(ret, "hostile: no such mode");
}

SANDBOX_FUNCTION(hostile_str, ":s")                 /* a str that is not UTF-8 */
{
	static const u8 bad[2] = { 0xff, 0xfe };

	ret->type = SBX_STR;
	ret->value = (u64)bad;
	ret->len = sizeof(bad);
	return SBX_OK;
}

int main(void)
{
	puts("sandbox-demo: ready\n");
	sandbox_serve();
}
