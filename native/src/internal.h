/*
 * internal.h -- private structures of the pplx engine (not part of the API).
 *
 * Locking: one mutex per engine (e->lock) serialises every libfabric call and
 * every mutation of engine state (domains are opened FI_THREAD_DOMAIN). The
 * progress thread holds it only for one batch of CQ reads and retries, so
 * submissions from other threads (Python, a future host-proxy thread) get in
 * between batches; want_lock makes the progress thread yield to them.
 */
#ifndef PPLX_INTERNAL_H
#define PPLX_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>

#include "pplx_fabric.h"

#define PPLX_MAX_DOMAINS 16
#define PPLX_MAX_ADDR 256 /* bytes of one endpoint name (shm names are strings) */
#define PPLX_ADDR_MAGIC 0x50 /* 'P', first byte of a main address */

enum op_kind { OP_WRITE = 1, OP_SEND = 2, OP_RECV = 3 };

/* A peer process watched for death (shm; peers.c). Allocated once per peer,
 * never moved or freed before the engine: ops and descriptors point at it. */
struct peer_watch {
	struct peer_watch *next; /* engine's list, under watch_lock */
	int pid, pidfd;
	int n;
	_Atomic int dead;
	uint64_t dead_ns;
	bool unwatched; /* dead long enough: its lock is no longer sampled */
	char name[PPLX_MAX_DOMAINS][64]; /* its shm region names */
	uint8_t *region[PPLX_MAX_DOMAINS]; /* first page of each, or NULL */
	uint32_t held_samples[PPLX_MAX_DOMAINS];
};

/* One libfabric operation. fctx first: libfabric may use it (FI_CONTEXT2). */
struct pplx_op {
	struct fi_context2 fctx;
	enum op_kind kind;
	struct pplx_op *prev, *next; /* pending or in-flight list */
	struct pplx_req *req; /* holds a reference; NULL for recv slots */
	struct pplx_mr *mr; /* holds a reference; NULL for imm-only */
	int dom;
	int slot; /* send/recv slot index */
	bool has_data;
	bool inflight;
	bool detached; /* its request already counted it failed (dead peer) */
	struct peer_watch *watch; /* destination process, NULL if not watched */
	void *buf;
	size_t len;
	fi_addr_t dest;
	uint64_t raddr, rkey, data;
};

struct pplx_op_list {
	struct pplx_op *head, *tail;
	uint64_t len;
};

struct pplx_req {
	struct pplx_engine *e; /* for waiting; never touched once complete */
	_Atomic uint64_t total, done, failed;
	_Atomic int error;
	_Atomic int refs;
	_Atomic int sealed;
};

struct pplx_mr {
	struct pplx_engine *e; /* NULL once the engine closed the registration */
	struct pplx_mr *next; /* engine's list of live registrations */
	void *ptr;
	uint64_t len;
	int n;
	struct fid_mr *mr[PPLX_MAX_DOMAINS];
	void *desc[PPLX_MAX_DOMAINS];
	uint64_t raddr[PPLX_MAX_DOMAINS], key[PPLX_MAX_DOMAINS];
	_Atomic int refs; /* user + in-flight ops */
	bool dead; /* unregistered by the user */
};

struct pplx_rdesc {
	struct pplx_engine *e;
	struct peer_watch *watch;
	uint64_t base, len;
	int n;
	fi_addr_t fi_addr[PPLX_MAX_DOMAINS];
	uint64_t raddr[PPLX_MAX_DOMAINS], key[PPLX_MAX_DOMAINS];
};

struct pplx_peer {
	struct peer_watch *watch;
	uint8_t *addr;
	size_t len;
	fi_addr_t fi_addr[PPLX_MAX_DOMAINS];
};

struct pplx_domain {
	struct fi_info *info;
	struct fid_fabric *fabric;
	struct fid_domain *domain;
	struct fid_ep *ep;
	struct fid_av *av;
	struct fid_cq *cq;
	uint8_t addr[PPLX_MAX_ADDR];
	size_t addrlen;
};

struct pplx_trigger {
	uint64_t n, value;
	uint64_t *flag;
	bool armed, consume;
};

struct pplx_held_imm {
	uint32_t imm;
	uint64_t release_ns;
};

struct pplx_engine {
	struct pplx_engine_config cfg;
	char provider[64]; /* as asked, expanded ("tcp" -> "tcp;ofi_rxm") */
	char node[64];
	int n;
	struct pplx_domain dom[PPLX_MAX_DOMAINS];
	uint64_t mr_mode;
	uint64_t max_msg; /* largest single op (ep_attr->max_msg_size, all domains) */
	bool has_hmem;

	pthread_mutex_t lock;
	pthread_cond_t cv; /* broadcast on every completion while sleepers > 0 */
	_Atomic int waiters;
	_Atomic int spinners; /* waiters in their spin phase, driving progress */
	_Atomic int spun; /* a spinning waiter succeeded (the progress thread clears it) */
	_Atomic int aside_nap; /* the progress thread naps aside (posts need not wake it) */
	int sleepers; /* waiters on cv (under lock): progress broadcasts while > 0 */
	uint64_t aside_ns; /* cfg.aside_us: the progress thread's step-aside */
	_Atomic int kicked; /* a submission happened: progress thread, spin again */
	pthread_mutex_t nap_lock; /* the progress thread naps on nap_cv */
	pthread_cond_t nap_cv;
	_Atomic int napping, wake;
	_Atomic int want_lock;
	_Atomic int stop;
	_Atomic int closed;
	pthread_t thread;
	bool thread_started;

	struct pplx_op_list pending; /* met -FI_EAGAIN, to be posted */
	struct pplx_op_list inflight;
	uint64_t tx_inflight; /* writes and sends in `inflight` (it also holds recv slots) */
	/* Writes and sends accepted and not yet complete (queued or in flight):
	 * changed under the lock, read by spinning waiters without it. */
	_Atomic uint64_t tx_outstanding;
	/* Progress passes that did something, any thread's: changed under the
	 * lock, read by spinning waiters without it (engine_wait_cond). */
	_Atomic uint64_t events;
	uint64_t inflight_spin_ns; /* cfg.inflight_spin_us */
	struct pplx_op *free_ops;
	uint32_t rr; /* round-robin domain for unsharded ops */
	uint64_t next_key;
	struct pplx_mr *mrs;

	struct pplx_peer *peers;
	int num_peers, cap_peers;

	uint64_t *imm_table; /* imm_table_size counters, page-aligned */
	struct pplx_trigger *triggers;

	struct pplx_held_imm *held; /* fault injection */
	uint32_t num_held;
	uint64_t rng;

	uint8_t *zero_mem; /* registered source of imm-only writes */
	struct pplx_mr *zero_mr;

	/* two-sided messages on domain 0 */
	uint8_t *send_mem, *recv_mem;
	struct pplx_mr *send_mr, *recv_mr;
	int *free_send; /* stack of free send slots */
	int num_free_send;
	struct pplx_op *recv_ops; /* one per recv slot */
	uint32_t *ready_slot; /* ring of received slots */
	uint64_t *ready_len;
	uint32_t ready_head, ready_count;

	struct pplx_engine_stats stats;

	/* dead peers (peers.c); only the monitor thread touches the samples */
	pthread_mutex_t watch_lock; /* the list; never held across a libfabric call */
	struct peer_watch *watches;
	int watch_efd; /* eventfd: wakes the monitor (new peer, stop) */
	pthread_t monitor;
	bool monitor_started;
	bool lock_recovery; /* our region proved the shm layout peers.c knows */
	int spin_unlocked; /* value of an unlocked pthread spinlock */
	uint8_t *own_region[PPLX_MAX_DOMAINS];
	uint32_t own_held_samples[PPLX_MAX_DOMAINS];
	_Atomic int reap_dead; /* a peer died: the next progress pass fails its ops */
	_Atomic uint64_t peers_dead, locks_recovered;
};

/* Add d to a counter only ever changed under the engine lock, for readers
 * that do not take it: a relaxed load and store (no locked instruction). */
static inline void counter_add_locked(_Atomic uint64_t *c, int64_t d)
{
	atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + (uint64_t)d,
			      memory_order_relaxed);
}

/* error.c */
int pplx_fail(int rc, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
uint64_t pplx_now_ns(void);

/* ops.c */
struct pplx_op *op_alloc(struct pplx_engine *e);
void op_free(struct pplx_engine *e, struct pplx_op *op);
int op_submit(struct pplx_engine *e, struct pplx_op *op);
int req_new(struct pplx_engine *e, struct pplx_req **out); /* refs 1, counters 0 */
void op_complete(struct pplx_engine *e, struct pplx_op *op, int err);
void op_detach(struct pplx_engine *e, struct pplx_op *op, int err);
int op_post(struct pplx_engine *e, struct pplx_op *op);
void ops_retry_pending(struct pplx_engine *e, bool *did);
void req_put(struct pplx_req *r);
void list_remove(struct pplx_op_list *l, struct pplx_op *op);
void list_push(struct pplx_op_list *l, struct pplx_op *op);
void engine_lock(struct pplx_engine *e);
void engine_unlock(struct pplx_engine *e);

/* mr.c */
int mr_reg_locked(struct pplx_engine *e, void *ptr, uint64_t len, int device, int device_id,
		  struct pplx_mr **out);
void mr_put(struct pplx_mr *mr);
void mr_close_fids(struct pplx_mr *mr);

/* engine.c */
bool engine_progress_locked(struct pplx_engine *e);
void engine_wake_progress(struct pplx_engine *e);
bool engine_progress_aside(struct pplx_engine *e); /* napping aside: a waiter drives progress */

/* imm.c */
void imm_arrived(struct pplx_engine *e, uint32_t imm);
void imm_deliver(struct pplx_engine *e, uint32_t imm);
void imm_release_held(struct pplx_engine *e, bool all, bool *did);
int engine_wait_cond(struct pplx_engine *e, bool (*cond)(void *), void *arg,
		     int64_t timeout_us);
int engine_wait_cond_from(struct pplx_engine *e, bool (*cond)(void *), void *arg,
			  int64_t timeout_us, uint64_t *t0);

/* peers.c */
int watch_init(struct pplx_engine *e);
void watch_fini(struct pplx_engine *e);
struct peer_watch *watch_peer(struct pplx_engine *e, const uint8_t *const *names,
			      const size_t *lens);
void watch_reap_locked(struct pplx_engine *e, bool *did);

/* msg.c */
int msg_init(struct pplx_engine *e);
void msg_fini(struct pplx_engine *e);
void msg_recv_done(struct pplx_engine *e, struct pplx_op *op, size_t len);

#endif /* PPLX_INTERNAL_H */
