/*
 * sandbox.c - the guest runtime of kvmpy.Sandbox (see sandbox.h for the ABI).
 */
#include "sandbox.h"

volatile struct sbx_page sandbox_page __attribute__((aligned(4096)));
u8 sandbox_args[SBX_ARGS_SIZE] SBX_NOINIT;
static u8 host_buf[SBX_HOST_BUF] __attribute__((aligned(16)));

/* link64.ld collects every SANDBOX_FUNCTION's entry between these. */
extern const struct sbx_export __sandbox_exports_start[], __sandbox_exports_end[];

/* An exit with a memory clobber: every store to the page is done before it, and
 * every load of what the host wrote is done after it. */
static inline void sbx_exit(u8 v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(DEBUG_EXIT_PORT) : "memory");
}

u64 sbx_strlen(const char *s)
{
	u64 n = 0;

	while (s[n])
		n++;
	return n;
}

int sbx_ret_int(struct sbx_val *ret, long long v)
{
	*ret = SBX_I(v);
	return SBX_OK;
}

int sbx_ret_bytes(struct sbx_val *ret, const void *p, u64 len)
{
	*ret = SBX_B(p, len);
	return SBX_OK;
}

int sbx_ret_str(struct sbx_val *ret, const char *s)
{
	*ret = SBX_S(s);
	return SBX_OK;
}

int sbx_error(struct sbx_val *ret, const char *message)
{
	*ret = SBX_S(message);
	return SBX_ERR;
}

int sbx_host_call(const char *name, const struct sbx_val *args, u64 argc, struct sbx_val *result)
{
	volatile struct sbx_page *p = &sandbox_page;

	if (argc > SBX_MAX_ARGS)
		return sbx_error(result, "too many arguments for a host call");
	p->host_name = (u64)name;
	p->host_name_len = sbx_strlen(name);
	p->host_argc = argc;
	for (u64 i = 0; i < argc; i++) {
		p->host_args[i].type = args[i].type;
		p->host_args[i].value = args[i].value;
		p->host_args[i].len = args[i].len;
	}
	p->host_buf = (u64)host_buf;
	p->host_buf_cap = SBX_HOST_BUF;
	sbx_exit(SBX_EXIT_HOST);
	result->type = p->host_ret.type;
	result->value = p->host_ret.value;
	result->len = p->host_ret.len;
	return p->host_status == SBX_STATUS_OK ? SBX_OK : SBX_ERR;
}

/* The host checked the index, the count and every argument's type against the
 * export's signature: the guest trusts its host. */
static void dispatch(void)
{
	volatile struct sbx_page *p = &sandbox_page;
	u64 n = (u64)(__sandbox_exports_end - __sandbox_exports_start);
	u64 f = p->func, argc = p->argc;
	struct sbx_val args[SBX_MAX_ARGS], ret = { 0, 0, 0 };
	int err;

	if (f >= n || argc > SBX_MAX_ARGS) {
		err = sbx_error(&ret, "no such function, or too many arguments");
	} else {
		for (u64 i = 0; i < argc; i++) {
			args[i].type = p->args[i].type;
			args[i].value = p->args[i].value;
			args[i].len = p->args[i].len;
		}
		err = __sandbox_exports_start[f].fn(args, &ret);
	}
	p->status = err == SBX_OK ? SBX_STATUS_OK : SBX_STATUS_ERROR;
	p->ret.type = ret.type;
	p->ret.value = ret.value;
	p->ret.len = ret.len;
}

void sandbox_serve(void)
{
	volatile struct sbx_page *p = &sandbox_page;

	p->exports = (u64)__sandbox_exports_start;
	p->nexports = (u64)(__sandbox_exports_end - __sandbox_exports_start);
	p->magic = SBX_MAGIC;
	for (;;) {
		sbx_exit(SBX_EXIT_READY);       /* the host checkpoints here */
		dispatch();
		sbx_exit(SBX_EXIT_DONE);        /* the host resets to the READY above */
	}
}
