/*
 * fuzz-parser.h - the bundled fuzz target's parser, shared by the guest
 * (guests/fuzz-target.c, CPL 3 under kvmpy) and the native build that
 * `kvmpy bench fuzz` compiles for the host with AFL++'s compiler
 * (kvmpy/bench/fuzz_native.c): both fuzz the very same code.
 *
 * The includer defines u8 and u64 and four macros, what each planted bug does:
 *   FUZZ_REPORT_ASSERT()   the 'A' record's checksum is wrong
 *   FUZZ_WILD_WRITE()      the 'K' record is "kvm!"
 *   FUZZ_UD2()             the 'U' record is ff ee
 *   FUZZ_HANG()            the 'H' record starts with 0x77
 *
 * The format: "FZ", a version byte (1), then records <type u8><len u8><len bytes>:
 *   'N' note      ignored
 *   'S' sum       payload bytes summed into the result
 *   'A' assert    payload[0] must equal the sum of the others (mod 256): the
 *                 shallow bug, one wrong byte in any 'A' record finds it
 *   'K' key       payload "kvm!", compared byte by byte (each its own branch, so
 *                 coverage guides a fuzzer one byte at a time): the deeper bug
 *   'U' undefined len 2, payload 0xff 0xee
 *   'H' hang      payload[0] == 0x77
 * Anything else stops the parse. The parser reads only in[0..len): it is the
 * input's bounds, not the buffer's, that it trusts.
 */
#ifndef FUZZ_PARSER_H
#define FUZZ_PARSER_H

/* noinline: a function of its own, so a harness can end a case where it begins (end_at) */
static __attribute__((noinline)) void fuzz_check_key(const u8 *p, u64 n)
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
	FUZZ_WILD_WRITE();
}

static u64 fuzz_parse(const u8 *in, u64 len)
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
				FUZZ_REPORT_ASSERT();
			break;
		}
		case 'K':
			fuzz_check_key(p, n);
			break;
		case 'U':
			if (n == 2 && p[0] == 0xff && p[1] == 0xee)
				FUZZ_UD2();
			break;
		case 'H':
			if (n >= 1 && p[0] == 0x77)
				FUZZ_HANG();
			break;
		default:
			return sum;
		}
		pos += 2 + n;
	}
	return sum;
}

#endif
