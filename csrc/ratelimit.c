/*
 * ratelimit.c - token buckets after Firecracker's, the C twin of
 * kvmpy/devices/ratelimit.py (read that first: it is the specification, and
 * tests/native/test_ratelimit.py holds this file to it with the same clock values).
 *
 * A bucket holds up to size tokens and refills from empty to full in refill_ns;
 * whole tokens are in tokens, the partial one is frac / refill_ns of a token, so
 * nothing is lost to rounding. Products are taken in 128 bits (size and refill_ns
 * are at most 2^62). A request of cost tokens may go when the bucket has
 * min(cost, size), the one-time burst counted; it may leave a debt (tokens < 0).
 * Nothing here locks: the device that owns a limiter holds its own mutex.
 */
#include <errno.h>
#include <time.h>

#include "kvmpy_native.h"

#define KVMPY_RL_MAX ((uint64_t)1 << 62)	/* ratelimit.py MAX_SIZE, MAX_REFILL_NS */

typedef unsigned __int128 u128;
typedef __int128 s128;

uint64_t kvmpy_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int kvmpy_bucket_init(struct kvmpy_bucket *b, uint64_t size, uint64_t refill_ns, uint64_t burst,
		      uint64_t now)
{
	if (size < 1 || size > KVMPY_RL_MAX || refill_ns < 1 || refill_ns > KVMPY_RL_MAX ||
	    burst > KVMPY_RL_MAX)
		return -EINVAL;
	b->size = size;
	b->refill_ns = refill_ns;
	b->burst = burst;
	b->tokens = (int64_t)size;
	b->frac = 0;
	b->last_ns = now;
	return 0;
}

void kvmpy_bucket_refill(struct kvmpy_bucket *b, uint64_t now)
{
	u128 earned;
	uint64_t whole;

	if (now <= b->last_ns)
		return;		/* a clock that went back adds nothing */
	earned = (u128)(now - b->last_ns) * b->size + b->frac;
	b->last_ns = now;
	if (b->tokens >= (int64_t)b->size) {
		b->frac = 0;
		return;
	}
	b->frac = (uint64_t)(earned % b->refill_ns);
	if (earned / b->refill_ns >= (u128)((s128)b->size - b->tokens)) {
		b->tokens = (int64_t)b->size;
		b->frac = 0;
		return;
	}
	whole = (uint64_t)(earned / b->refill_ns);	/* < size - tokens: fits */
	b->tokens += (int64_t)whole;
}

uint64_t kvmpy_bucket_missing(const struct kvmpy_bucket *b, uint64_t cost)
{
	s128 need = cost < b->size ? cost : b->size;
	s128 m = need - b->tokens - (s128)b->burst;

	return m > 0 ? (uint64_t)m : 0;
}

void kvmpy_bucket_take(struct kvmpy_bucket *b, uint64_t cost)
{
	uint64_t from_burst = b->burst < cost ? b->burst : cost;

	b->burst -= from_burst;
	b->tokens -= (int64_t)(cost - from_burst);	/* cost <= 2^32 for a chain: no overflow */
}

uint64_t kvmpy_bucket_wait_ns(const struct kvmpy_bucket *b, uint64_t missing)
{
	u128 need;

	if (!missing)
		return 0;
	need = (u128)missing * b->refill_ns - b->frac;	/* frac < refill_ns <= missing * refill_ns */
	need = (need + b->size - 1) / b->size;
	return need < KVMPY_RL_MAX ? (uint64_t)need : KVMPY_RL_MAX;	/* ratelimit.py MAX_WAIT_NS */
}

/* ratelimit.py RateLimiter.admit: every bucket's tokens, or none and throttled_until */
int kvmpy_limiter_admit(struct kvmpy_limiter *l, uint64_t now, uint64_t ops, uint64_t bytes,
			uint64_t flushes)
{
	struct kvmpy_bucket *bk[3] = { &l->ops, &l->bytes, &l->flushes };
	uint64_t cost[3] = { ops, bytes, flushes }, wait = 0, w;
	int i;

	for (i = 0; i < 3; i++) {
		if (!bk[i]->size || !cost[i])
			continue;	/* no such bucket, or nothing to take from it */
		kvmpy_bucket_refill(bk[i], now);
		w = kvmpy_bucket_wait_ns(bk[i], kvmpy_bucket_missing(bk[i], cost[i]));
		if (w > wait)
			wait = w;
	}
	if (wait) {
		l->throttled_until = now + wait;
		l->throttled++;
		return 0;
	}
	for (i = 0; i < 3; i++)
		if (bk[i]->size && cost[i])
			kvmpy_bucket_take(bk[i], cost[i]);
	l->throttled_until = 0;
	return 1;
}
