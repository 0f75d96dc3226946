/*
 * sandbox.h - the guest side of kvmpy.Sandbox: export functions, call the host.
 *
 * A sandbox guest declares functions with SANDBOX_FUNCTION and ends main() with
 * sandbox_serve().  The host (kvmpy/sandbox/, docs/sandboxes.md) calls them by
 * name with integers, bytes and strings; one call costs one exit:
 *
 *   ready:  sandbox_serve() publishes the export table in the call page and
 *           writes SBX_EXIT_READY to isa-debug-exit; the host checkpoints there.
 *   call:   the host writes the call (function index, arguments) into the page
 *           and the arguments' bytes into sandbox_args, and resumes the guest;
 *           the runtime calls the function, stores its result in the page and
 *           writes SBX_EXIT_DONE.  The host reads the result and resets the
 *           machine to the checkpoint: the next call sees none of this one.
 *   host:   sbx_host_call() writes a request into the page and SBX_EXIT_HOST;
 *           the host checks it against the functions the program registered,
 *           calls one (or refuses), writes the answer and resumes the guest.
 *
 * Signatures are strings "ARGS:RET", one letter a value: i (int64), b (bytes),
 * s (str, UTF-8); RET may be empty (the host gets None).  "ii:i" takes two ints
 * and returns one.  A bytes or str argument is (pointer, length) into
 * sandbox_args, followed by a NUL the length does not count.
 *
 * A function returns SBX_OK after sbx_ret_*() or the value of sbx_error().
 * A bytes/str result is a pointer into guest RAM and a length: the data must
 * stay where it is until the function returns (static storage, or the
 * arguments' own bytes).
 */
#ifndef KVMPY_GUEST_SANDBOX_H
#define KVMPY_GUEST_SANDBOX_H

#include "runtime.h"

#define SBX_MAGIC       0x31584253ULL   /* "SBX1" */
#define SBX_MAX_ARGS    8
#define SBX_ARGS_SIZE   (1 << 20)       /* bytes the host may place arguments in */
#define SBX_HOST_BUF    (64 << 10)      /* room for a host function's bytes/str answer */

#define SBX_EXIT_READY  0x52            /* 'R' */
#define SBX_EXIT_DONE   0x44            /* 'D' */
#define SBX_EXIT_HOST   0x48            /* 'H' */

#define SBX_INT   'i'
#define SBX_BYTES 'b'
#define SBX_STR   's'

#define SBX_OK    0
#define SBX_ERR   (-1)

#define SBX_STATUS_OK    0
#define SBX_STATUS_ERROR 1

struct sbx_val {
	u64 type;       /* SBX_INT, SBX_BYTES, SBX_STR (0: no value) */
	u64 value;      /* the integer, or the address of the bytes */
	u64 len;        /* bytes (0 for an integer) */
};

typedef int (*sbx_fn)(const struct sbx_val *args, struct sbx_val *ret);

struct sbx_export {
	const char *name;
	const char *sig;
	sbx_fn fn;
};

/* The call page: little-endian u64 words, at the symbol sandbox_page. */
struct sbx_page {
	u64 magic;                              /* guest: SBX_MAGIC at the ready point */
	u64 exports, nexports;                  /* guest: the export table (struct sbx_export[]) */
	u64 func, argc;                         /* host: which function, how many arguments */
	struct sbx_val args[SBX_MAX_ARGS];      /* host */
	u64 status;                             /* guest: SBX_STATUS_* */
	struct sbx_val ret;                     /* guest: the result, or the error message (str) */
	u64 host_name, host_name_len, host_argc;   /* guest: a host call's request */
	struct sbx_val host_args[SBX_MAX_ARGS];
	u64 host_buf, host_buf_cap;             /* guest: where the host may write its answer's bytes */
	u64 host_status;                        /* host: SBX_STATUS_* */
	struct sbx_val host_ret;                /* host: the answer, or the refusal (str) */
};

/* Big buffers that start zeroed without start64.S clearing them: kvmpy gives a
 * guest zeroed RAM, and a page the guest never touches at boot costs nothing
 * (on kvm_pvm each first touch costs tens of microseconds). */
#define SBX_NOINIT __attribute__((section(".noinit"), aligned(4096)))

extern volatile struct sbx_page sandbox_page;
extern u8 sandbox_args[SBX_ARGS_SIZE];

/* Declare (and export) a guest function: SANDBOX_FUNCTION(add, "ii:i") { ... } */
#define SANDBOX_FUNCTION(fname, signature)                                          \
	static int fname(const struct sbx_val *args, struct sbx_val *ret);           \
	static const struct sbx_export sbx_export_##fname                            \
		__attribute__((used, section(".sandbox.exports"), aligned(8))) =     \
		{ #fname, signature, fname };                                         \
	static int fname(__attribute__((unused)) const struct sbx_val *args,        \
			 __attribute__((unused)) struct sbx_val *ret)

#define SBX_I(v)       ((struct sbx_val){ SBX_INT, (u64)(v), 0 })
#define SBX_B(p, n)    ((struct sbx_val){ SBX_BYTES, (u64)(p), (n) })
#define SBX_S(p)       ((struct sbx_val){ SBX_STR, (u64)(p), sbx_strlen(p) })

u64 sbx_strlen(const char *s);
int sbx_ret_int(struct sbx_val *ret, long long v);
int sbx_ret_bytes(struct sbx_val *ret, const void *p, u64 len);
int sbx_ret_str(struct sbx_val *ret, const char *s);
int sbx_error(struct sbx_val *ret, const char *message);   /* returns SBX_ERR */

/* Call a host function the program registered.  SBX_OK: *result holds its answer
 * (bytes in a runtime buffer, valid until the next host call); SBX_ERR: the host
 * refused (unknown name, wrong argument types) and *result is its message (str). */
int sbx_host_call(const char *name, const struct sbx_val *args, u64 argc, struct sbx_val *result);

__attribute__((noreturn)) void sandbox_serve(void);

#endif
