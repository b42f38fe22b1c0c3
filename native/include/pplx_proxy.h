/*
 * pplx_proxy.h -- the host proxy: a C thread that posts TransferEngine writes
 * described by work items that producers (GPU kernels through host-mapped
 * pinned memory, CPU threads, Python) put into a ring in host memory.
 *
 * The ring
 * --------
 * num_slots (a power of two) items of 64 bytes (one cache line each), in
 * memory the caller provides (e.g. a pinned torch tensor a GPU kernel can
 * write through UVA) or the proxy allocates (page-aligned). Producer ticket t
 * uses slot t % num_slots. A producer
 *   1. waits until t - consumed < num_slots (a free slot; `consumed` is
 *      counters[PPLX_PROXY_CONSUMED]),
 *   2. writes the item's fields,
 *   3. stores seq = t + 1 LAST, with release ordering (x86 stores are ordered;
 *      a GPU uses a system-scope release store or atomic exchange).
 * The proxy thread waits for slot (consumed % num_slots) to hold
 * seq == consumed + 1 (acquire), posts the op, and stores consumed + 1
 * (release). seq carries the ticket, so slots never need clearing, and a stale
 * item from the previous lap is never mistaken for a new one. One producer per
 * ring (or producers that hand out tickets among themselves).
 *
 * Tagged rings (PPLX_PROXY_TAGGED): every word 1..5 also carries the tag of
 * its ticket in its top byte, tag(t) = (t / num_slots) % 255 + 1 (never 0,
 * never the previous lap's). The proxy takes slot t once seq == t + 1 AND
 * every word 1..5 carries tag(t), so a producer may store the words (seq
 * included) in any order with relaxed 8-byte stores and no fence: each word is
 * single-copy atomic, and a word with the current tag is the current word. A
 * GPU saves its system-scope release fence this way (see PERFORMANCE.md,
 * "Proxy round trip"). Fields are then limited to 56 bits (offsets, len) and
 * 24 bits (dst); the tag is stripped before the item is posted.
 *
 * Progress (PPLX_PROXY_DRIVE): the thread waits for the next item inside
 * pplx_wait_u64 on the engine, which drives the engine's progress from this
 * thread while it spins; the engine's own progress thread steps aside, so a
 * post never waits for the engine lock held by that thread (a futex sleep).
 * Without it the thread spins on the ring with a pause instruction.
 *
 * Completion: every posted op's request is kept in order; when one completes,
 * counters[PPLX_PROXY_COMPLETED] (or _FAILED, with the first error code in
 * _ERROR) grows. Receivers learn of data through the engine's ImmCounter
 * triggers ("when imm X has arrived N times store V at F"), which a GPU kernel
 * polls in host-mapped memory.
 */
#ifndef PPLX_PROXY_H
#define PPLX_PROXY_H

#include <stddef.h>
#include <stdint.h>

#include "pplx_fabric.h"

#ifdef __cplusplus
extern "C" {
#endif

/* CDEF BEGIN */
/* Ops of a work item. */
enum pplx_proxy_op {
	PPLX_PROXY_NOP = 0, /* consumed and counted as completed, nothing posted */
	PPLX_PROXY_WRITE = 1, /* len bytes src_offset -> dsts[dst] at dst_offset */
	PPLX_PROXY_IMM = 2 /* immediate only, to dsts[dst]'s owner */
};

/* Flags of pplx_proxy_create. */
enum pplx_proxy_flag {
	PPLX_PROXY_DRIVE = 1, /* wait for items in pplx_wait_u64: drive the engine's progress */
	PPLX_PROXY_TAGGED = 2 /* words 1..5 carry the ticket's tag (see above) */
};

/* Indices into the counters array (pplx_proxy_counters). */
enum pplx_proxy_counter {
	PPLX_PROXY_CONSUMED = 0, /* items taken from the ring */
	PPLX_PROXY_COMPLETED = 1, /* items whose ops all completed without error */
	PPLX_PROXY_FAILED = 2, /* items that failed (post error or failed op) */
	PPLX_PROXY_ERROR = 3, /* first error code (as uint64 of a negative int) */
	PPLX_PROXY_NUM_COUNTERS = 8
};

/* One work item: 64 bytes, 8 little-endian uint64 words:
 * [0] seq, [1] op | dst << 32, [2] src_offset, [3] dst_offset, [4] len,
 * [5] imm | has_imm << 32, [6], [7] reserved. */
struct pplx_proxy_item {
	uint64_t seq;
	uint32_t op;
	uint32_t dst;
	uint64_t src_offset;
	uint64_t dst_offset;
	uint64_t len;
	uint32_t imm;
	uint32_t has_imm;
	uint64_t reserved[2];
};

struct pplx_proxy;

/* Start a proxy thread posting from the local region src to the num_dsts
 * descriptors dsts (item.dst indexes them; NULL entries are allowed and fail
 * items that name them). ring: num_slots * 64 bytes, 64-byte aligned, or NULL
 * for proxy-allocated memory. idle_spin_us: spin this long after the last
 * item, then nap idle_sleep_us per round (0 = spin forever: lowest latency,
 * one core busy). flags: enum pplx_proxy_flag bits. */
int pplx_proxy_create(struct pplx_engine *e, struct pplx_mr *src, uint32_t num_dsts,
		      struct pplx_rdesc *const *dsts, void *ring, uint32_t num_slots,
		      uint32_t idle_spin_us, uint32_t idle_sleep_us, uint32_t flags,
		      struct pplx_proxy **out);
/* Stop the thread (items not yet consumed are dropped), wait for in-flight
 * ops (at most timeout_us), release everything. */
void pplx_proxy_destroy(struct pplx_proxy *p, int64_t timeout_us);
/* The ring (num_slots items) and the counters (PPLX_PROXY_NUM_COUNTERS uint64,
 * alone in their own page, so that a GPU can cudaHostRegister them; written by
 * the proxy thread with release stores). */
int pplx_proxy_ring(struct pplx_proxy *p, struct pplx_proxy_item **items, uint32_t *num_slots,
		    uint64_t **counters);
/* A C producer's submission (for CPU code): takes the next ticket, waits up
 * to timeout_us for a free slot, writes the item (its seq is ignored) and
 * publishes it. Returns the ticket (>= 0) or PPLX_ERR_TIMEOUT. Not to be mixed
 * with another producer on the same ring. */
int64_t pplx_proxy_submit(struct pplx_proxy *p, const struct pplx_proxy_item *item,
			  int64_t timeout_us);
/* Wait until completed + failed >= n; PPLX_ERR_FAILED if any item failed,
 * PPLX_ERR_TIMEOUT after timeout_us. */
int pplx_proxy_wait(struct pplx_proxy *p, uint64_t n, int64_t timeout_us);
/* Round trip measured from a C producer: iters times, arm the trigger "imm
 * arrived once -> store i + 1 at flag" on engine `receiver` (the engine that
 * owns dsts[dst]), submit a write of len bytes with imm, spin on *flag;
 * out_ns[i] gets each round's nanoseconds. */
int pplx_proxy_bench_roundtrip(struct pplx_proxy *p, struct pplx_engine *receiver, uint32_t dst,
			       uint64_t len, uint32_t imm, uint64_t *flag, uint32_t iters,
			       uint64_t *out_ns, int64_t timeout_us);
/* PCIe ping-pong partner for GPU latency measurements (no proxy, no fabric):
 * for v = first .. first + iters - 1, wait until *ping >= v (acquire), then
 * store v into *pong (release). PPLX_ERR_TIMEOUT if one wait passes
 * timeout_us. Returns 0. */
int pplx_proxy_bench_echo(const uint64_t *ping, uint64_t *pong, uint64_t first, uint32_t iters,
			  int64_t timeout_us);
/* CDEF END */

#ifdef __cplusplus
}
#endif

#endif /* PPLX_PROXY_H */
