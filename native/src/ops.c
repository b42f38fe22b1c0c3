/*
 * ops.c -- posting libfabric operations, the pending queue, requests, and
 * the write entry points (single, sharded, paged, scatter, imm, barrier).
 *
 * Every entry point validates all of its ranges first, then takes the engine
 * lock once and posts. A post that meets -FI_EAGAIN (full TX queue; on shm,
 * a new peer not yet progressed) is queued and retried by the progress
 * thread, so no call ever spins on the network.
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

void engine_lock(struct pplx_engine *e)
{
	/* Uncontended (the usual case: the progress thread steps aside while a
	 * waiter spins), one atomic instead of three. */
	if (!pthread_mutex_trylock(&e->lock))
		return;
	atomic_fetch_add(&e->want_lock, 1);
	pthread_mutex_lock(&e->lock);
	atomic_fetch_sub(&e->want_lock, 1);
}

void engine_unlock(struct pplx_engine *e) { pthread_mutex_unlock(&e->lock); }

void list_push(struct pplx_op_list *l, struct pplx_op *op)
{
	op->next = NULL;
	op->prev = l->tail;
	if (l->tail)
		l->tail->next = op;
	else
		l->head = op;
	l->tail = op;
	l->len++;
}

void list_remove(struct pplx_op_list *l, struct pplx_op *op)
{
	if (op->prev)
		op->prev->next = op->next;
	else
		l->head = op->next;
	if (op->next)
		op->next->prev = op->prev;
	else
		l->tail = op->prev;
	op->prev = op->next = NULL;
	l->len--;
}

struct pplx_op *op_alloc(struct pplx_engine *e)
{
	struct pplx_op *op = e->free_ops;

	if (op)
		e->free_ops = op->next;
	else
		op = malloc(sizeof(*op));
	if (op)
		memset(op, 0, sizeof(*op));
	return op;
}

void op_free(struct pplx_engine *e, struct pplx_op *op)
{
	op->next = e->free_ops;
	e->free_ops = op;
}

void req_put(struct pplx_req *r)
{
	if (atomic_fetch_sub(&r->refs, 1) == 1)
		free(r);
}

void pplx_req_release(struct pplx_req *r)
{
	if (r)
		req_put(r);
}

int op_post(struct pplx_engine *e, struct pplx_op *op)
{
	struct fid_ep *ep = e->dom[op->dom].ep;
	void *desc = op->mr ? op->mr->desc[op->dom] : NULL;

	switch (op->kind) {
	case OP_WRITE:
		if (op->has_data)
			return (int)fi_writedata(ep, op->buf, op->len, desc, op->data, op->dest,
						 op->raddr, op->rkey, op);
		return (int)fi_write(ep, op->buf, op->len, desc, op->dest, op->raddr, op->rkey, op);
	case OP_SEND:
		return (int)fi_send(ep, op->buf, op->len, desc, op->dest, op);
	case OP_RECV:
		return (int)fi_recv(ep, op->buf, op->len, desc, FI_ADDR_UNSPEC, op);
	}
	return -FI_EINVAL;
}

static void mark_inflight(struct pplx_engine *e, struct pplx_op *op)
{
	op->inflight = true;
	list_push(&e->inflight, op);
	if (op->kind != OP_RECV)
		e->tx_inflight++;
	e->stats.ops_posted++;
}

void op_complete(struct pplx_engine *e, struct pplx_op *op, int err)
{
	struct pplx_req *r = op->req;

	if (op->inflight) {
		list_remove(&e->inflight, op);
		op->inflight = false;
		e->tx_inflight--;
	}
	if (op->kind != OP_RECV)
		counter_add_locked(&e->tx_outstanding, -1);
	if (op->detached)
		; /* counted when it was detached */
	else if (err)
		e->stats.ops_failed++;
	else
		e->stats.ops_completed++;
	if (op->kind == OP_SEND)
		e->free_send[e->num_free_send++] = op->slot;
	if (r) {
		if (err) {
			int zero = 0;

			atomic_compare_exchange_strong(&r->error, &zero, err);
			atomic_fetch_add(&r->failed, 1);
		} else {
			/* Only ever changed under the lock: a plain release store. */
			atomic_store_explicit(&r->done,
					      atomic_load_explicit(&r->done, memory_order_relaxed) + 1,
					      memory_order_release);
		}
		req_put(r);
	}
	if (op->mr)
		mr_put(op->mr);
	op_free(e, op);
}

/* Caller holds the lock. An in-flight op whose peer died: its request counts
 * it failed now; the op stays in flight (libfabric holds its context) and is
 * freed by its completion or the engine's close. */
void op_detach(struct pplx_engine *e, struct pplx_op *op, int err)
{
	struct pplx_req *r = op->req;
	int zero = 0;

	op->req = NULL;
	op->detached = true;
	e->stats.ops_failed++;
	atomic_compare_exchange_strong(&r->error, &zero, err);
	atomic_fetch_add(&r->failed, 1);
	req_put(r);
}

static bool peer_dead(const struct pplx_op *op)
{
	return op->watch && atomic_load_explicit(&op->watch->dead, memory_order_relaxed);
}

/* Caller holds the lock. On a hard error the op is completed as failed. */
int op_submit(struct pplx_engine *e, struct pplx_op *op)
{
	int rc;

	if (op->kind != OP_RECV)
		counter_add_locked(&e->tx_outstanding, 1); /* op_complete takes it back */
	/* Never enter libfabric for a dead peer: its shm lock may be held for
	 * ever (peers.c); the op fails, its request reports it. */
	if (peer_dead(op)) {
		op_complete(e, op, PPLX_ERR_PEER_DEAD);
		return 0;
	}
	if (!e->pending.head) {
		rc = op_post(e, op);
		if (rc == 0) {
			mark_inflight(e, op);
			/* Hints for the progress thread (relaxed: a missed one costs
			 * at most one of its naps, never correctness). */
			if (!atomic_load_explicit(&e->kicked, memory_order_relaxed))
				atomic_store_explicit(&e->kicked, 1, memory_order_relaxed);
			/* No wake-up while it naps aside for a spinning waiter: it
			 * would only see that and nap again, and each such wake-up is
			 * a futex call plus a context switch per post (on 2 cores, 8 B
			 * submit_write 7.1 -> see PERFORMANCE.md). It returns within
			 * aside_us by itself, and a waiter that stops spinning wakes
			 * it (engine_wait_cond). */
			if (atomic_load_explicit(&e->napping, memory_order_relaxed) &&
			    !engine_progress_aside(e))
				engine_wake_progress(e);
			return 0;
		}
		if (rc != -FI_EAGAIN) {
			pplx_fail(rc, "posting an op on domain %d: %s", op->dom, fi_strerror(-rc));
			if (op->kind == OP_RECV)
				e->stats.cq_errors++;
			else
				op_complete(e, op, rc);
			return rc;
		}
	}
	list_push(&e->pending, op);
	e->stats.ops_queued++;
	atomic_store(&e->kicked, 1);
	atomic_store(&e->spun, 0); /* queued ops need the progress thread now */
	engine_wake_progress(e);
	return 0;
}

void ops_retry_pending(struct pplx_engine *e, bool *did)
{
	struct pplx_op *op;

	while ((op = e->pending.head)) {
		int rc = peer_dead(op) ? PPLX_ERR_PEER_DEAD : op_post(e, op);

		if (rc == -FI_EAGAIN)
			break;
		list_remove(&e->pending, op);
		*did = true;
		if (rc == 0)
			mark_inflight(e, op);
		else if (op->kind == OP_RECV)
			e->stats.cq_errors++;
		else
			op_complete(e, op, rc);
	}
}

/* ---- validation ---- */

static int check_engine(struct pplx_engine *e)
{
	if (!e)
		return pplx_fail(PPLX_ERR_INVALID, "engine is NULL");
	if (atomic_load(&e->closed))
		return pplx_fail(PPLX_ERR_CLOSED, "engine is closed");
	return 0;
}

static bool range_ok(uint64_t off, uint64_t len, uint64_t size)
{
	return off <= size && len <= size - off;
}

static int check_src(struct pplx_engine *e, struct pplx_mr *mr, uint64_t off, uint64_t len)
{
	if (!mr)
		return pplx_fail(PPLX_ERR_INVALID, "source region is NULL");
	if (mr->dead || !mr->e)
		return pplx_fail(PPLX_ERR_CLOSED, "source memory region was unregistered");
	if (mr->e != e)
		return pplx_fail(PPLX_ERR_INVALID, "source region belongs to another engine");
	if (!range_ok(off, len, mr->len))
		return pplx_fail(PPLX_ERR_OUT_OF_BOUNDS,
				 "source range [%lu, %lu + %lu) outside the region of %lu bytes",
				 (unsigned long)off, (unsigned long)off, (unsigned long)len,
				 (unsigned long)mr->len);
	return 0;
}

static int check_dst(struct pplx_engine *e, struct pplx_rdesc *d, uint64_t off, uint64_t len)
{
	if (!d)
		return pplx_fail(PPLX_ERR_INVALID, "destination descriptor is NULL");
	if (d->e != e)
		return pplx_fail(PPLX_ERR_INVALID, "descriptor was imported by another engine");
	if (!range_ok(off, len, d->len))
		return pplx_fail(PPLX_ERR_OUT_OF_BOUNDS,
				 "destination range [%lu, %lu + %lu) outside the descriptor of %lu "
				 "bytes",
				 (unsigned long)off, (unsigned long)off, (unsigned long)len,
				 (unsigned long)d->len);
	return 0;
}

static int check_op_len(struct pplx_engine *e, uint64_t len, const char *what)
{
	if (len > e->max_msg)
		return pplx_fail(PPLX_ERR_INVALID,
				 "%s of %lu bytes exceeds the provider's max_msg_size %lu: split it",
				 what, (unsigned long)len, (unsigned long)e->max_msg);
	return 0;
}

int req_new(struct pplx_engine *e, struct pplx_req **out)
{
	struct pplx_req *r = malloc(sizeof(*r)); /* malloc: calloc skips glibc's tcache */

	*out = r;
	if (!r)
		return pplx_fail(-FI_ENOMEM, "out of memory");
	r->e = e;
	atomic_init(&r->total, 0);
	atomic_init(&r->done, 0);
	atomic_init(&r->failed, 0);
	atomic_init(&r->error, 0);
	atomic_init(&r->refs, 1);
	atomic_init(&r->sealed, 0);
	return 0;
}

/* Caller holds the lock. One write op from src (NULL: imm-only, len 0). */
static int submit_write(struct pplx_engine *e, struct pplx_req *r, struct pplx_mr *src,
			uint64_t src_offset, struct pplx_rdesc *dst, int dom, uint64_t dst_offset,
			uint64_t len, int has_imm, uint32_t imm)
{
	struct pplx_op *op = op_alloc(e);

	if (!op)
		return pplx_fail(-FI_ENOMEM, "out of memory");
	if (!src) {
		/* Imm-only: a zero-byte write, still from registered memory with
		 * its descriptor (FI_MR_LOCAL providers may check it). */
		src = e->zero_mr;
		src_offset = 0;
	}
	op->kind = OP_WRITE;
	op->dom = dom;
	op->buf = (uint8_t *)src->ptr + src_offset;
	op->len = len;
	op->dest = dst->fi_addr[dom];
	op->watch = dst->watch;
	op->raddr = dst->raddr[dom] + dst_offset;
	op->rkey = dst->key[dom];
	op->has_data = has_imm != 0;
	op->data = imm;
	op->req = r;
	/* Plain increments: until finish() hands it out, only this thread, which
	 * holds the lock, sees the request (completions run under the lock), and
	 * registrations' refs change only under the lock (mr.c). */
	atomic_store_explicit(&r->refs, atomic_load_explicit(&r->refs, memory_order_relaxed) + 1,
			      memory_order_relaxed);
	atomic_store_explicit(&r->total, atomic_load_explicit(&r->total, memory_order_relaxed) + 1,
			      memory_order_relaxed);
	op->mr = src;
	atomic_store_explicit(&src->refs, atomic_load_explicit(&src->refs, memory_order_relaxed) + 1,
			      memory_order_relaxed);
	return op_submit(e, op);
}

/* Lock, recheck `closed` (destroy may have begun), make a request. */
static int begin(struct pplx_engine *e, struct pplx_req **r)
{
	int rc = req_new(e, r);

	if (rc)
		return rc;
	engine_lock(e);
	if (atomic_load(&e->closed)) {
		engine_unlock(e);
		req_put(*r);
		*r = NULL;
		return pplx_fail(PPLX_ERR_CLOSED, "engine is closed");
	}
	return 0;
}

static int finish(struct pplx_engine *e, struct pplx_req *r, int rc, struct pplx_req **out)
{
	atomic_store_explicit(&r->sealed, 1, memory_order_release);
	engine_unlock(e);
	if (rc) {
		req_put(r);
		return rc;
	}
	*out = r;
	return 0;
}

/* ---- entry points ---- */

int pplx_write(struct pplx_engine *e, struct pplx_mr *src, uint64_t src_offset,
	       struct pplx_rdesc *dst, uint64_t dst_offset, uint64_t len, int has_imm, uint32_t imm,
	       struct pplx_req **req)
{
	struct pplx_req *r;
	uint64_t chunk;
	int rc, shards;

	*req = NULL;
	if ((rc = check_engine(e)) || (rc = check_src(e, src, src_offset, len)) ||
	    (rc = check_dst(e, dst, dst_offset, len)))
		return rc;
	shards = pplx_engine_num_shards(e, len);
	/* Shards of a multiple of 64 bytes (cache lines); the last takes the
	 * rest. threshold >= 64 * n makes every shard non-empty. */
	chunk = shards > 1 ? (len / shards) & ~63ull : len;
	if ((rc = check_op_len(e, len - (shards - 1) * chunk, "a write shard")))
		return rc;
	if ((rc = begin(e, &r)))
		return rc;
	for (int i = 0; i < shards && !rc; i++) {
		uint64_t off = i * chunk;
		uint64_t l = i == shards - 1 ? len - off : chunk;
		int dom = shards > 1 ? i : (int)(e->rr++ % (uint32_t)e->n);

		rc = submit_write(e, r, src, src_offset + off, dst, dom, dst_offset + off, l, has_imm,
				  imm);
	}
	return finish(e, r, rc, req);
}

int pplx_write_paged(struct pplx_engine *e, struct pplx_mr *src, struct pplx_rdesc *dst,
		     uint32_t num_pages, const uint32_t *src_idx, const uint32_t *dst_idx,
		     uint64_t page_len, uint64_t src_stride, uint64_t src_offset,
		     uint64_t dst_stride, uint64_t dst_offset, int has_imm, uint32_t imm,
		     struct pplx_req **req)
{
	struct pplx_req *r;
	int rc;

	*req = NULL;
	if ((rc = check_engine(e)) || (rc = check_src(e, src, 0, 0)) ||
	    (rc = check_dst(e, dst, 0, 0)))
		return rc;
	if (num_pages && (!src_idx || !dst_idx))
		return pplx_fail(PPLX_ERR_INVALID, "page index arrays are NULL");
	if ((rc = check_op_len(e, page_len, "a page")))
		return rc;
	/* Strides and indices are < 2^32 and 2^64 / 2^32: products of a 32-bit
	 * index and a stride below 2^32 cannot overflow; larger strides are
	 * checked by dividing back. */
	for (uint32_t i = 0; i < num_pages; i++) {
		uint64_t so = (uint64_t)src_idx[i] * src_stride;
		uint64_t d_o = (uint64_t)dst_idx[i] * dst_stride;

		if ((src_stride && so / src_stride != src_idx[i]) || so + src_offset < so ||
		    !range_ok(so + src_offset, page_len, src->len))
			return pplx_fail(PPLX_ERR_OUT_OF_BOUNDS,
					 "page %u: source page index %u (stride %lu, offset %lu, "
					 "%lu bytes) outside the region of %lu bytes",
					 i, src_idx[i], (unsigned long)src_stride,
					 (unsigned long)src_offset, (unsigned long)page_len,
					 (unsigned long)src->len);
		if ((dst_stride && d_o / dst_stride != dst_idx[i]) || d_o + dst_offset < d_o ||
		    !range_ok(d_o + dst_offset, page_len, dst->len))
			return pplx_fail(PPLX_ERR_OUT_OF_BOUNDS,
					 "page %u: destination page index %u (stride %lu, offset "
					 "%lu, %lu bytes) outside the descriptor of %lu bytes",
					 i, dst_idx[i], (unsigned long)dst_stride,
					 (unsigned long)dst_offset, (unsigned long)page_len,
					 (unsigned long)dst->len);
	}
	if ((rc = begin(e, &r)))
		return rc;
	for (uint32_t i = 0; i < num_pages && !rc; i++)
		rc = submit_write(e, r, src, src_offset + (uint64_t)src_idx[i] * src_stride, dst,
				  (int)(e->rr++ % (uint32_t)e->n),
				  dst_offset + (uint64_t)dst_idx[i] * dst_stride, page_len, has_imm, imm);
	return finish(e, r, rc, req);
}

int pplx_write_scatter(struct pplx_engine *e, struct pplx_mr *src, uint32_t num_dsts,
		       const struct pplx_scatter_dst *dsts, int has_imm, uint32_t imm,
		       struct pplx_req **req)
{
	struct pplx_req *r;
	int rc;

	*req = NULL;
	if ((rc = check_engine(e)))
		return rc;
	if (num_dsts && !dsts)
		return pplx_fail(PPLX_ERR_INVALID, "dsts is NULL");
	for (uint32_t i = 0; i < num_dsts; i++) {
		if ((rc = check_src(e, src, dsts[i].src_offset, dsts[i].len)) ||
		    (rc = check_dst(e, dsts[i].rdesc, dsts[i].dst_offset, dsts[i].len)) ||
		    (rc = check_op_len(e, dsts[i].len, "a scatter range")))
			return pplx_fail(rc, "scatter destination %u: %s", i, pplx_last_error());
	}
	if ((rc = begin(e, &r)))
		return rc;
	for (uint32_t i = 0; i < num_dsts && !rc; i++)
		rc = submit_write(e, r, src, dsts[i].src_offset, dsts[i].rdesc,
				  (int)(e->rr++ % (uint32_t)e->n), dsts[i].dst_offset, dsts[i].len,
				  has_imm, imm);
	return finish(e, r, rc, req);
}

int pplx_barrier(struct pplx_engine *e, uint32_t num_dsts, struct pplx_rdesc *const *dsts,
		 uint32_t imm, struct pplx_req **req)
{
	struct pplx_req *r;
	int rc;

	*req = NULL;
	if ((rc = check_engine(e)))
		return rc;
	if (num_dsts && !dsts)
		return pplx_fail(PPLX_ERR_INVALID, "dsts is NULL");
	for (uint32_t i = 0; i < num_dsts; i++)
		if ((rc = check_dst(e, dsts[i], 0, 0)))
			return pplx_fail(rc, "barrier destination %u: %s", i, pplx_last_error());
	if ((rc = begin(e, &r)))
		return rc;
	for (uint32_t i = 0; i < num_dsts && !rc; i++)
		rc = submit_write(e, r, NULL, 0, dsts[i], (int)(e->rr++ % (uint32_t)e->n), 0, 0, 1,
				  imm);
	return finish(e, r, rc, req);
}

int pplx_write_imm(struct pplx_engine *e, struct pplx_rdesc *dst, uint32_t imm,
		   struct pplx_req **req)
{
	return pplx_barrier(e, 1, &dst, imm, req);
}

/* ---- requests ---- */

void pplx_req_counts(struct pplx_req *r, uint64_t *total, uint64_t *done, uint64_t *failed,
		     int *error)
{
	*failed = atomic_load(&r->failed);
	*done = atomic_load(&r->done);
	*total = atomic_load(&r->total);
	*error = atomic_load(&r->error);
}

static bool req_complete(void *arg)
{
	struct pplx_req *r = arg;

	return atomic_load(&r->sealed) &&
	       atomic_load(&r->done) + atomic_load(&r->failed) == atomic_load(&r->total);
}

int pplx_req_wait(struct pplx_req *r, int64_t timeout_us)
{
	int rc = 0;

	/* A complete request never touches its engine (which may be gone). */
	if (!req_complete(r)) {
		atomic_fetch_add(&r->e->waiters, 1);
		rc = engine_wait_cond(r->e, req_complete, r, timeout_us);
		atomic_fetch_sub(&r->e->waiters, 1);
	}
	if (rc == PPLX_ERR_CLOSED && req_complete(r))
		rc = 0;
	if (rc)
		return pplx_fail(rc, rc == PPLX_ERR_TIMEOUT ? "request not complete after %ld us: "
							      "%lu of %lu ops done"
							    : "engine closed while waiting (%ld us; "
							      "%lu of %lu ops done)",
				 (long)timeout_us, (unsigned long)atomic_load(&r->done),
				 (unsigned long)atomic_load(&r->total));
	if (atomic_load(&r->failed)) {
		int err = atomic_load(&r->error);

		return pplx_fail(err == PPLX_ERR_PEER_DEAD ? PPLX_ERR_PEER_DEAD : PPLX_ERR_FAILED,
				 "%lu of %lu ops failed, first error %d (%s)",
				 (unsigned long)atomic_load(&r->failed),
				 (unsigned long)atomic_load(&r->total), err, pplx_strerror(err));
	}
	return 0;
}
