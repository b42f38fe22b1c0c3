/*
 * msg.c -- two-sided messages of at most msg_size bytes on domain 0.
 *
 * Sends copy into a registered send slot (FI_MR_LOCAL needs registered
 * buffers), so the caller's buffer is free on return. Receives land in
 * posted recv slots; a received slot joins a FIFO and is reposted once
 * pplx_recv copied it out.
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

int msg_init(struct pplx_engine *e)
{
	size_t sz = e->cfg.msg_size;
	uint32_t ns = e->cfg.num_send_slots, nr = e->cfg.num_recv_slots;
	int rc;

	/* The source of imm-only writes (zero bytes, but registered). */
	if (posix_memalign((void **)&e->zero_mem, 4096, 64))
		return pplx_fail(-FI_ENOMEM, "out of memory");
	memset(e->zero_mem, 0, 64);
	rc = mr_reg_locked(e, e->zero_mem, 64, PPLX_DEVICE_HOST, 0, &e->zero_mr);
	if (rc)
		return rc;

	if (ns) {
		if (posix_memalign((void **)&e->send_mem, 4096, sz * ns))
			return pplx_fail(-FI_ENOMEM, "out of memory");
		e->free_send = calloc(ns, sizeof(int));
		if (!e->free_send)
			return pplx_fail(-FI_ENOMEM, "out of memory");
		rc = mr_reg_locked(e, e->send_mem, sz * ns, PPLX_DEVICE_HOST, 0, &e->send_mr);
		if (rc)
			return rc;
		for (uint32_t i = 0; i < ns; i++)
			e->free_send[e->num_free_send++] = (int)(ns - 1 - i);
	}
	if (!nr)
		return 0;
	if (posix_memalign((void **)&e->recv_mem, 4096, sz * nr))
		return pplx_fail(-FI_ENOMEM, "out of memory");
	e->recv_ops = calloc(nr, sizeof(*e->recv_ops));
	e->ready_slot = calloc(nr, sizeof(*e->ready_slot));
	e->ready_len = calloc(nr, sizeof(*e->ready_len));
	if (!e->recv_ops || !e->ready_slot || !e->ready_len)
		return pplx_fail(-FI_ENOMEM, "out of memory");
	rc = mr_reg_locked(e, e->recv_mem, sz * nr, PPLX_DEVICE_HOST, 0, &e->recv_mr);
	if (rc)
		return rc;
	for (uint32_t i = 0; i < nr; i++) {
		struct pplx_op *op = &e->recv_ops[i];

		op->kind = OP_RECV;
		op->dom = 0;
		op->slot = (int)i;
		op->buf = e->recv_mem + i * sz;
		op->len = sz;
		op->mr = e->recv_mr;
		rc = op_submit(e, op);
		if (rc)
			return rc;
	}
	return 0;
}

static void unlink_mr(struct pplx_engine *e, struct pplx_mr *mr)
{
	for (struct pplx_mr **p = &e->mrs; *p; p = &(*p)->next) {
		if (*p == mr) {
			*p = mr->next;
			break;
		}
	}
	mr_put(mr);
}

/* After the endpoints are closed and every op failed. */
void msg_fini(struct pplx_engine *e)
{
	if (e->zero_mr)
		unlink_mr(e, e->zero_mr);
	free(e->zero_mem);
	if (e->send_mr)
		unlink_mr(e, e->send_mr);
	if (e->recv_mr)
		unlink_mr(e, e->recv_mr);
	free(e->send_mem);
	free(e->recv_mem);
	free(e->free_send);
	free(e->recv_ops);
	free(e->ready_slot);
	free(e->ready_len);
}

/* Progress thread, lock held. */
void msg_recv_done(struct pplx_engine *e, struct pplx_op *op, size_t len)
{
	uint32_t nr = e->cfg.num_recv_slots;

	list_remove(&e->inflight, op);
	op->inflight = false;
	e->ready_slot[(e->ready_head + e->ready_count) % nr] = (uint32_t)op->slot;
	e->ready_len[(e->ready_head + e->ready_count) % nr] = len;
	e->ready_count++;
	e->stats.msgs_received++;
}

int pplx_send(struct pplx_engine *e, int peer, const void *buf, uint64_t len,
	      struct pplx_req **req)
{
	struct pplx_req *r;
	struct pplx_op *op;
	int rc, slot;

	*req = NULL;
	if (atomic_load(&e->closed))
		return pplx_fail(PPLX_ERR_CLOSED, "engine is closed");
	if (!e->cfg.num_send_slots)
		return pplx_fail(PPLX_ERR_INVALID, "engine has num_send_slots = 0");
	if (len > e->cfg.msg_size)
		return pplx_fail(PPLX_ERR_MSG_SIZE, "message of %lu bytes > msg_size %u",
				 (unsigned long)len, e->cfg.msg_size);
	rc = req_new(e, &r);
	op = NULL;
	if (rc)
		return rc;
	engine_lock(e);
	if (atomic_load(&e->closed)) {
		rc = pplx_fail(PPLX_ERR_CLOSED, "engine is closed");
		goto out;
	}
	if (peer < 0 || peer >= e->num_peers) {
		rc = pplx_fail(PPLX_ERR_INVALID, "peer %d unknown (import its address first)", peer);
		goto out;
	}
	if (!e->num_free_send) {
		rc = pplx_fail(PPLX_ERR_AGAIN, "all %u send slots busy", e->cfg.num_send_slots);
		goto out;
	}
	op = op_alloc(e);
	if (!op) {
		rc = pplx_fail(-FI_ENOMEM, "out of memory");
		goto out;
	}
	slot = e->free_send[--e->num_free_send];
	op->kind = OP_SEND;
	op->slot = slot;
	op->dom = 0;
	op->buf = e->send_mem + (size_t)slot * e->cfg.msg_size;
	op->len = len;
	if (len)
		memcpy(op->buf, buf, len);
	op->dest = e->peers[peer].fi_addr[0];
	op->watch = e->peers[peer].watch;
	op->mr = e->send_mr;
	atomic_fetch_add(&e->send_mr->refs, 1);
	op->req = r;
	atomic_fetch_add(&r->refs, 1);
	atomic_fetch_add(&r->total, 1);
	rc = op_submit(e, op);
out:
	atomic_store(&r->sealed, 1);
	engine_unlock(e);
	if (rc) {
		req_put(r);
		return rc;
	}
	*req = r;
	return 0;
}

static bool have_msg(void *arg)
{
	struct pplx_engine *e = arg;

	return __atomic_load_n(&e->ready_count, __ATOMIC_ACQUIRE) > 0;
}

static int64_t recv_msg(struct pplx_engine *e, void *buf, uint64_t cap, int64_t timeout_us)
{
	uint64_t start = pplx_now_ns();
	uint32_t slot;
	uint64_t len;

	if (atomic_load(&e->closed))
		return pplx_fail(PPLX_ERR_CLOSED, "engine is closed");
	if (!e->cfg.num_recv_slots)
		return pplx_fail(PPLX_ERR_INVALID, "engine has num_recv_slots = 0");
	for (;;) {
		int64_t left = timeout_us;
		int rc;

		if (timeout_us >= 0) {
			left = timeout_us - (int64_t)((pplx_now_ns() - start) / 1000);
			if (left < 0)
				left = 0;
		}
		rc = engine_wait_cond(e, have_msg, e, left);
		if (rc == PPLX_ERR_TIMEOUT)
			return pplx_fail(rc, "no message after %ld us", (long)timeout_us);
		if (rc)
			return pplx_fail(rc, "engine closed while receiving");
		engine_lock(e);
		if (e->ready_count)
			break;
		engine_unlock(e); /* another receiver took it */
	}
	slot = e->ready_slot[e->ready_head];
	len = e->ready_len[e->ready_head];
	e->ready_head = (e->ready_head + 1) % e->cfg.num_recv_slots;
	e->ready_count--;
	memcpy(buf, e->recv_ops[slot].buf, len < cap ? len : cap);
	op_submit(e, &e->recv_ops[slot]);
	engine_unlock(e);
	return (int64_t)len;
}

int64_t pplx_recv(struct pplx_engine *e, void *buf, uint64_t cap, int64_t timeout_us)
{
	int64_t rc;

	atomic_fetch_add(&e->waiters, 1); /* destroy waits for us */
	rc = recv_msg(e, buf, cap, timeout_us);
	atomic_fetch_sub(&e->waiters, 1);
	return rc;
}
