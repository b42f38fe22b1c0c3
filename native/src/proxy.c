/*
 * proxy.c -- the host proxy thread: consumes work items from a ring in host
 * memory and posts them through the engine's public API (thread-safe: every
 * pplx_* call takes the engine lock), tracking each op's request in order.
 *
 * Memory ordering: the producer stores seq last with release semantics; the
 * proxy loads seq with acquire semantics, so it sees the item's other words.
 * The proxy publishes counters with release stores; a producer that reads
 * `consumed` with acquire may then overwrite that slot. In a tagged ring
 * (PPLX_PROXY_TAGGED) the producer may store in any order: the proxy reads
 * each word once more with a relaxed load until all carry the ticket's tag.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"
#include "pplx_proxy.h"

_Static_assert(sizeof(struct pplx_proxy_item) == 64, "work items are one cache line");

struct pplx_proxy {
	struct pplx_engine *e;
	struct pplx_mr *src;
	struct pplx_rdesc **dsts;
	uint32_t num_dsts;
	struct pplx_proxy_item *items;
	uint32_t num_slots, mask;
	bool own_ring;
	uint64_t *counters; /* PPLX_PROXY_NUM_COUNTERS, own cache line */
	struct pplx_req **inflight; /* ring of num_slots requests, oldest first */
	uint64_t if_head, if_tail;
	uint64_t next_ticket; /* pplx_proxy_submit's producer side */
	uint32_t idle_spin_us, idle_sleep_us;
	uint32_t flags;
	_Atomic int stop;
	pthread_t thread;
	bool started;
};

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#elif defined(__aarch64__)
	__asm__ __volatile__("yield");
#endif
}

static void nap_us(uint32_t us)
{
	struct timespec ts = { .tv_sec = us / 1000000, .tv_nsec = (long)(us % 1000000) * 1000 };

	nanosleep(&ts, NULL);
}

#define TAG_SHIFT 56
#define TAG_MASK (0xffull << TAG_SHIFT)

static inline uint64_t ticket_tag(const struct pplx_proxy *p, uint64_t t)
{
	return ((t / p->num_slots) % 255 + 1) << TAG_SHIFT;
}

/* Word i (0..7) of an item, as a relaxed atomic load (other threads, or a
 * GPU, write the ring while we read it). */
static inline uint64_t item_word(struct pplx_proxy_item *slot, int i)
{
	return __atomic_load_n((uint64_t *)slot + i, __ATOMIC_RELAXED);
}

/* Copy ticket t's item out of its slot if it is complete: seq == t + 1
 * (acquire) and, in a tagged ring, every word 1..5 carries tag(t), which is
 * then stripped. */
static bool take_item(struct pplx_proxy *p, struct pplx_proxy_item *slot, uint64_t t,
		      struct pplx_proxy_item *it)
{
	uint64_t w[6];

	if (__atomic_load_n(&slot->seq, __ATOMIC_ACQUIRE) != t + 1)
		return false;
	for (int i = 1; i < 6; i++)
		w[i] = item_word(slot, i);
	if (p->flags & PPLX_PROXY_TAGGED) {
		uint64_t tag = ticket_tag(p, t);

		for (int i = 1; i < 6; i++) {
			if ((w[i] & TAG_MASK) != tag)
				return false;
			w[i] &= ~TAG_MASK;
		}
	}
	memset(it, 0, sizeof(*it));
	it->seq = t + 1;
	it->op = (uint32_t)w[1];
	it->dst = (uint32_t)(w[1] >> 32);
	it->src_offset = w[2];
	it->dst_offset = w[3];
	it->len = w[4];
	it->imm = (uint32_t)w[5];
	it->has_imm = (uint32_t)(w[5] >> 32);
	return true;
}

static void count_result(struct pplx_proxy *p, int err)
{
	if (err) {
		uint64_t zero = 0;

		__atomic_compare_exchange_n(&p->counters[PPLX_PROXY_ERROR], &zero,
					    (uint64_t)(int64_t)err, false, __ATOMIC_RELEASE,
					    __ATOMIC_RELAXED);
		__atomic_add_fetch(&p->counters[PPLX_PROXY_FAILED], 1, __ATOMIC_RELEASE);
	} else {
		__atomic_add_fetch(&p->counters[PPLX_PROXY_COMPLETED], 1, __ATOMIC_RELEASE);
	}
}

/* Retire completed requests, oldest first; returns true if any retired. */
static bool reap(struct pplx_proxy *p)
{
	bool did = false;

	while (p->if_tail != p->if_head) {
		struct pplx_req *r = p->inflight[p->if_tail & p->mask];
		uint64_t total, done, failed;
		int err;

		pplx_req_counts(r, &total, &done, &failed, &err);
		if (done + failed < total)
			break;
		count_result(p, failed ? (err ? err : PPLX_ERR_FAILED) : 0);
		pplx_req_release(r);
		p->if_tail++;
		did = true;
	}
	return did;
}

static int post(struct pplx_proxy *p, const struct pplx_proxy_item *it, struct pplx_req **req)
{
	struct pplx_rdesc *d;

	*req = NULL;
	if (it->op == PPLX_PROXY_NOP)
		return 0;
	if (it->dst >= p->num_dsts || !(d = p->dsts[it->dst]))
		return pplx_fail(PPLX_ERR_INVALID, "proxy item: dst %u has no descriptor", it->dst);
	if (it->op == PPLX_PROXY_WRITE)
		return pplx_write(p->e, p->src, it->src_offset, d, it->dst_offset, it->len,
				  it->has_imm != 0, it->imm, req);
	if (it->op == PPLX_PROXY_IMM)
		return pplx_write_imm(p->e, d, it->imm, req);
	return pplx_fail(PPLX_ERR_INVALID, "proxy item: unknown op %u", it->op);
}

/* Drive mode: wait for seq == t + 1 inside the engine's wait, which drives
 * the engine's progress from this thread while it spins (its progress thread
 * steps aside). Short waits while requests are in flight, so that they are
 * reaped (and `completed` grows) within DRIVE_REAP_US of their completion. */
#define DRIVE_REAP_US 20
#define DRIVE_IDLE_US 200

static void drive_wait(struct pplx_proxy *p, struct pplx_proxy_item *slot, uint64_t t)
{
	int64_t us = p->if_tail != p->if_head ? DRIVE_REAP_US : DRIVE_IDLE_US;

	/* A timeout is the normal way out when no item comes: not an error. In a
	 * tagged ring seq may land before the other words: take_item checks. */
	(void)pplx_wait_u64(p->e, &slot->seq, t + 1, us);
}

static void *proxy_main(void *arg)
{
	struct pplx_proxy *p = arg;
	uint64_t consumed = 0, idle_since = pplx_now_ns();
	const bool drive = (p->flags & PPLX_PROXY_DRIVE) != 0;

	while (!atomic_load_explicit(&p->stop, memory_order_acquire)) {
		struct pplx_proxy_item *slot = &p->items[consumed & p->mask];
		struct pplx_proxy_item it;
		bool did = reap(p);
		/* A request slot must be free before an item is taken. */
		bool room = p->if_head - p->if_tail < p->num_slots;

		if (room && take_item(p, slot, consumed, &it)) {
			struct pplx_req *r;
			int rc = post(p, &it, &r);

			consumed++;
			__atomic_store_n(&p->counters[PPLX_PROXY_CONSUMED], consumed,
					 __ATOMIC_RELEASE);
			if (rc)
				count_result(p, rc);
			else if (!r)
				count_result(p, 0);
			else
				p->inflight[p->if_head++ & p->mask] = r;
			did = true;
		}
		if (did) {
			idle_since = pplx_now_ns();
			continue;
		}
		if (p->idle_sleep_us &&
		    pplx_now_ns() - idle_since > (uint64_t)p->idle_spin_us * 1000)
			nap_us(p->idle_sleep_us);
		else if (drive && room)
			drive_wait(p, slot, consumed);
		else
			cpu_relax();
	}
	return NULL;
}

int pplx_proxy_create(struct pplx_engine *e, struct pplx_mr *src, uint32_t num_dsts,
		      struct pplx_rdesc *const *dsts, void *ring, uint32_t num_slots,
		      uint32_t idle_spin_us, uint32_t idle_sleep_us, uint32_t flags,
		      struct pplx_proxy **out)
{
	struct pplx_proxy *p;
	int rc;

	*out = NULL;
	if (!e || !src)
		return pplx_fail(PPLX_ERR_INVALID, "proxy: engine and src region are required");
	if (num_slots < 2 || num_slots > (1u << 20) || (num_slots & (num_slots - 1)))
		return pplx_fail(PPLX_ERR_INVALID,
				 "proxy: num_slots must be a power of two in [2, 2^20], got %u",
				 num_slots);
	if (flags & ~(uint32_t)(PPLX_PROXY_DRIVE | PPLX_PROXY_TAGGED))
		return pplx_fail(PPLX_ERR_INVALID, "proxy: unknown flags 0x%x", flags);
	if (ring && ((uintptr_t)ring & 63))
		return pplx_fail(PPLX_ERR_INVALID, "proxy: ring %p must be 64-byte aligned", ring);
	p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	p->e = e;
	p->src = src;
	p->num_dsts = num_dsts;
	p->num_slots = num_slots;
	p->mask = num_slots - 1;
	p->idle_spin_us = idle_spin_us;
	p->idle_sleep_us = idle_sleep_us;
	p->flags = flags;
	p->dsts = calloc(num_dsts ? num_dsts : 1, sizeof(*p->dsts));
	p->inflight = calloc(num_slots, sizeof(*p->inflight));
	/* A page of its own: a GPU registers it (cudaHostRegister rejects a page
	 * that is registered already, e.g. another proxy's counters). */
	if (posix_memalign((void **)&p->counters, 4096, 4096))
		p->counters = NULL;
	if (!ring) {
		if (posix_memalign(&ring, 4096, (size_t)num_slots * 64))
			ring = NULL;
		else
			memset(ring, 0, (size_t)num_slots * 64);
		p->own_ring = true;
	}
	p->items = ring;
	if (!p->dsts || !p->inflight || !p->counters || !p->items) {
		rc = -ENOMEM;
		goto fail;
	}
	memset(p->counters, 0, 4096);
	if (num_dsts)
		memcpy(p->dsts, dsts, num_dsts * sizeof(*dsts));
	/* A caller's ring may hold a previous proxy's items: start the tickets
	 * after whatever seq is there would be wrong, so demand a clean ring. */
	for (uint32_t i = 0; i < num_slots; i++) {
		if (p->items[i].seq) {
			rc = pplx_fail(PPLX_ERR_INVALID,
				       "proxy: ring slot %u has seq %llu; zero the ring first", i,
				       (unsigned long long)p->items[i].seq);
			goto fail;
		}
	}
	if ((rc = -pthread_create(&p->thread, NULL, proxy_main, p)))
		goto fail;
	p->started = true;
	*out = p;
	return 0;
fail:
	if (p->own_ring)
		free(p->items);
	free(p->counters);
	free(p->inflight);
	free(p->dsts);
	free(p);
	return rc;
}

void pplx_proxy_destroy(struct pplx_proxy *p, int64_t timeout_us)
{
	uint64_t deadline;

	if (!p)
		return;
	atomic_store_explicit(&p->stop, 1, memory_order_release);
	if (p->started)
		pthread_join(p->thread, NULL);
	deadline = pplx_now_ns() + (timeout_us < 0 ? 0 : (uint64_t)timeout_us * 1000);
	while (p->if_tail != p->if_head) {
		if (!reap(p)) {
			if (pplx_now_ns() > deadline)
				break;
			nap_us(10);
		}
	}
	/* Requests still in flight: drop our reference (the engine keeps its own). */
	for (; p->if_tail != p->if_head; p->if_tail++)
		pplx_req_release(p->inflight[p->if_tail & p->mask]);
	if (p->own_ring)
		free(p->items);
	free(p->counters);
	free(p->inflight);
	free(p->dsts);
	free(p);
}

int pplx_proxy_ring(struct pplx_proxy *p, struct pplx_proxy_item **items, uint32_t *num_slots,
		    uint64_t **counters)
{
	if (!p)
		return pplx_fail(PPLX_ERR_INVALID, "proxy is NULL");
	*items = p->items;
	*num_slots = p->num_slots;
	*counters = p->counters;
	return 0;
}

int64_t pplx_proxy_submit(struct pplx_proxy *p, const struct pplx_proxy_item *item,
			  int64_t timeout_us)
{
	uint64_t t = p->next_ticket, start = 0;
	struct pplx_proxy_item *slot = &p->items[t & p->mask];

	while (t - __atomic_load_n(&p->counters[PPLX_PROXY_CONSUMED], __ATOMIC_ACQUIRE) >=
	       p->num_slots) {
		if (!start)
			start = pplx_now_ns();
		else if (timeout_us >= 0 && pplx_now_ns() - start > (uint64_t)timeout_us * 1000)
			return pplx_fail(PPLX_ERR_TIMEOUT, "proxy: ring full for %lld us",
					 (long long)timeout_us);
		cpu_relax();
	}
	{
		uint64_t tag = (p->flags & PPLX_PROXY_TAGGED) ? ticket_tag(p, t) : 0;
		uint64_t *w = (uint64_t *)slot;

		if (tag && ((item->dst | item->has_imm) >> 24 ||
			    (item->src_offset | item->dst_offset | item->len) & TAG_MASK))
			return pplx_fail(PPLX_ERR_INVALID,
					 "proxy: tagged item fields too large (dst < 2^24, "
					 "offsets and len < 2^56)");
		__atomic_store_n(&w[1], (item->op | (uint64_t)item->dst << 32) | tag,
				 __ATOMIC_RELAXED);
		__atomic_store_n(&w[2], item->src_offset | tag, __ATOMIC_RELAXED);
		__atomic_store_n(&w[3], item->dst_offset | tag, __ATOMIC_RELAXED);
		__atomic_store_n(&w[4], item->len | tag, __ATOMIC_RELAXED);
		__atomic_store_n(&w[5], (item->imm | (uint64_t)item->has_imm << 32) | tag,
				 __ATOMIC_RELAXED);
	}
	__atomic_store_n(&slot->seq, t + 1, __ATOMIC_RELEASE);
	p->next_ticket = t + 1;
	return (int64_t)t;
}

int pplx_proxy_wait(struct pplx_proxy *p, uint64_t n, int64_t timeout_us)
{
	uint64_t start = pplx_now_ns();
	uint32_t spins = 0;

	for (;;) {
		uint64_t ok = __atomic_load_n(&p->counters[PPLX_PROXY_COMPLETED], __ATOMIC_ACQUIRE);
		uint64_t bad = __atomic_load_n(&p->counters[PPLX_PROXY_FAILED], __ATOMIC_ACQUIRE);

		if (bad)
			return pplx_fail(PPLX_ERR_FAILED, "proxy: %llu items failed, first error %lld",
					 (unsigned long long)bad,
					 (long long)(int64_t)p->counters[PPLX_PROXY_ERROR]);
		if (ok >= n)
			return 0;
		if (timeout_us >= 0 && pplx_now_ns() - start > (uint64_t)timeout_us * 1000)
			return pplx_fail(PPLX_ERR_TIMEOUT,
					 "proxy: %llu of %llu items completed after %lld us",
					 (unsigned long long)ok, (unsigned long long)n,
					 (long long)timeout_us);
		if (++spins < 4096)
			cpu_relax();
		else
			nap_us(5);
	}
}

int pplx_proxy_bench_roundtrip(struct pplx_proxy *p, struct pplx_engine *receiver, uint32_t dst,
			       uint64_t len, uint32_t imm, uint64_t *flag, uint32_t iters,
			       uint64_t *out_ns, int64_t timeout_us)
{
	struct pplx_proxy_item it = { .op = PPLX_PROXY_WRITE, .dst = dst, .len = len,
				      .imm = imm, .has_imm = 1 };
	int rc;

	for (uint32_t i = 0; i < iters; i++) {
		uint64_t t0, v = (uint64_t)i + 1;
		int64_t t;

		__atomic_store_n(flag, 0, __ATOMIC_RELEASE);
		if ((rc = pplx_imm_set_trigger(receiver, imm, 1, flag, v, 1)))
			return rc;
		t0 = pplx_now_ns();
		if ((t = pplx_proxy_submit(p, &it, timeout_us)) < 0)
			return (int)t;
		/* The engine's wait spins, drives the receiver's progress itself, then
		 * sleeps: on a box with fewer cores than spinning threads a bare spin
		 * here starves the thread that would set the flag. */
		if ((rc = pplx_wait_u64(receiver, flag, v, timeout_us)))
			return pplx_fail(rc, "proxy round trip %u: flag not set after %lld us", i,
					 (long long)timeout_us);
		out_ns[i] = pplx_now_ns() - t0;
	}
	return 0;
}

int pplx_proxy_bench_echo(const uint64_t *ping, uint64_t *pong, uint64_t first, uint32_t iters,
			  int64_t timeout_us)
{
	for (uint64_t v = first; v < first + iters; v++) {
		uint64_t start = pplx_now_ns();
		uint32_t spins = 0;

		while (__atomic_load_n(ping, __ATOMIC_ACQUIRE) < v) {
			cpu_relax();
			if (++spins % 1024 == 0 && timeout_us >= 0 &&
			    pplx_now_ns() - start > (uint64_t)timeout_us * 1000)
				return pplx_fail(PPLX_ERR_TIMEOUT,
						 "echo: ping is %llu, waited for %llu for %lld us",
						 (unsigned long long)__atomic_load_n(ping,
										     __ATOMIC_ACQUIRE),
						 (unsigned long long)v, (long long)timeout_us);
		}
		__atomic_store_n(pong, v, __ATOMIC_RELEASE);
	}
	return 0;
}
