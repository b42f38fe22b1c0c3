/*
 * engine.c -- engine lifetime: provider selection, N domain+endpoint pairs,
 * the progress thread, addresses and peers.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define CQ_BATCH 32
#define IDLE_NAP_MAX_NS 250000 /* longest idle nap: first event after silence */
#define CQ_SIZE 16384 /* entries; remote-write events can outpace one thread's sleeps */

void pplx_engine_config_init(struct pplx_engine_config *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->provider = "shm";
	cfg->num_domains = 1;
	cfg->imm_table_size = 1u << 16; /* 512 KiB of counters */
	cfg->shard_threshold = 1u << 20;
	cfg->fault_seed = 1;
	cfg->msg_size = 8192;
	cfg->num_send_slots = 64;
	cfg->num_recv_slots = 64;
	cfg->spin_us = 1000; /* see engine_wait_cond: shorter spins fell back to
			      * condvar wake-ups, 1 MiB x2 on shm 1 ms instead of 0.25 ms */
	cfg->sleep_us = 20;
	cfg->busy_poll_us = 0; /* 20000 made no difference on 2 loaded cores (C-loop
				* A/B, PERFORMANCE.md); worse at 16 MiB in the Python loop */
	cfg->aside_us = 1000; /* see progress_main; 0 (never step aside): 8 B latency 2.7x raw
			       * on the 4x H100 host's 64 vCPUs, 1.2-1.7x with 1000 */
	cfg->inflight_spin_us = 20000; /* see engine_wait_cond and PERFORMANCE.md (Fabric):
					* waits past 1 ms for own large shm writes */
}

static const char *expand_provider(const char *name)
{
	if (!strcmp(name, "tcp"))
		return "tcp;ofi_rxm";
	if (!strcmp(name, "verbs"))
		return "verbs;ofi_rxm"; /* verbs itself has only FI_EP_MSG */
	return name;
}

static int check_config(const struct pplx_engine_config *cfg)
{
	if (!cfg->provider || !cfg->provider[0] || strlen(cfg->provider) >= 64)
		return pplx_fail(PPLX_ERR_INVALID, "provider must be a non-empty name");
	if (cfg->node && strlen(cfg->node) >= 64)
		return pplx_fail(PPLX_ERR_INVALID, "node must be shorter than 64 characters");
	if (cfg->num_domains < 1 || cfg->num_domains > PPLX_MAX_DOMAINS)
		return pplx_fail(PPLX_ERR_INVALID, "num_domains must be in [1, %d], got %u",
				 PPLX_MAX_DOMAINS, cfg->num_domains);
	if (cfg->imm_table_size < 1)
		return pplx_fail(PPLX_ERR_INVALID, "imm_table_size must be >= 1");
	if (cfg->shard_threshold < 64ull * cfg->num_domains)
		return pplx_fail(PPLX_ERR_INVALID, "shard_threshold must be >= 64 * num_domains = %u",
				 64 * cfg->num_domains);
	if ((cfg->num_send_slots || cfg->num_recv_slots) && cfg->msg_size < 1)
		return pplx_fail(PPLX_ERR_INVALID, "msg_size must be >= 1");
	return 0;
}

static struct fi_info *make_hints(struct pplx_engine *e, bool hmem)
{
	struct fi_info *hints = fi_allocinfo();

	if (!hints)
		return NULL;
	hints->ep_attr->type = FI_EP_RDM;
	hints->caps = FI_RMA | FI_WRITE | FI_REMOTE_WRITE | FI_MSG | FI_SEND | FI_RECV;
	if (hmem)
		hints->caps |= FI_HMEM;
	/* Modes we honour: every op carries a struct fi_context2 as its context. */
	hints->mode = FI_CONTEXT | FI_CONTEXT2;
	/* Registration modes we honour (EFA needs LOCAL, VIRT_ADDR, ALLOCATED,
	 * PROV_KEY): descriptors are passed on every op, keys and addresses are
	 * taken from the provider, only allocated memory is registered. */
	hints->domain_attr->mr_mode = FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED |
				      FI_MR_PROV_KEY | (hmem ? FI_MR_HMEM : 0);
	hints->domain_attr->threading = FI_THREAD_DOMAIN;
	hints->fabric_attr->prov_name = strdup(e->provider);
	return hints;
}

static int get_infos(struct pplx_engine *e, struct fi_info **out)
{
	const char *node = e->node[0] ? e->node : NULL;
	struct fi_info *hints;
	int rc;

	*out = NULL;
	for (int attempt = e->cfg.hmem ? 0 : 1; attempt < 2; attempt++) {
		hints = make_hints(e, attempt == 0);
		if (!hints)
			return pplx_fail(-FI_ENOMEM, "fi_allocinfo failed");
		rc = fi_getinfo(FI_VERSION(1, 17), node, NULL, node ? FI_SOURCE : 0, hints, out);
		fi_freeinfo(hints);
		if (!rc) {
			e->has_hmem = attempt == 0;
			return 0;
		}
	}
	return pplx_fail(PPLX_ERR_NO_PROVIDER,
			 "libfabric provider '%s' not found or lacks FI_EP_RDM with FI_RMA and "
			 "FI_MSG (fi_getinfo: %s); run `fi_info -l` to list providers",
			 e->provider, fi_strerror(-rc));
}

/* Pick the info for each domain: N distinct NICs of the first info's fabric
 * if the provider lists as many (EFA: one rdmap device each; verbs: mlx5_*
 * on one subnet), else N endpoints on the first. Same fabric only: tcp lists
 * every interface as a fabric of its own (eth0's subnet, lo's), and a peer on
 * another host cannot reach our lo. */
static int pick_infos(struct pplx_engine *e, struct fi_info *list)
{
	struct fi_info *pick[PPLX_MAX_DOMAINS];
	int found = 0;

	for (struct fi_info *i = list; i && found < e->n; i = i->next) {
		bool dup = strcmp(i->fabric_attr->name, list->fabric_attr->name) != 0;

		for (int j = 0; j < found; j++)
			dup |= !strcmp(pick[j]->domain_attr->name, i->domain_attr->name);
		if (!dup)
			pick[found++] = i;
	}
	for (int d = 0; d < e->n; d++) {
		struct fi_info *src = found >= e->n ? pick[d] : list;

		e->dom[d].info = fi_dupinfo(src);
		if (!e->dom[d].info)
			return pplx_fail(-FI_ENOMEM, "fi_dupinfo failed");
	}
	if (e->dom[0].info->domain_attr->cq_data_size < 4)
		return pplx_fail(PPLX_ERR_NO_PROVIDER,
				 "provider '%s' carries %zu bytes of remote CQ data; 4 are needed",
				 e->provider, e->dom[0].info->domain_attr->cq_data_size);
	e->mr_mode = e->dom[0].info->domain_attr->mr_mode;
	e->max_msg = UINT64_MAX;
	for (int d = 0; d < e->n; d++)
		if (e->dom[d].info->ep_attr->max_msg_size < e->max_msg)
			e->max_msg = e->dom[d].info->ep_attr->max_msg_size;
	snprintf(e->provider, sizeof(e->provider), "%s", e->dom[0].info->fabric_attr->prov_name);
	return 0;
}

static int open_domain(struct pplx_engine *e, int d)
{
	struct pplx_domain *dom = &e->dom[d];
	struct fi_cq_attr cq_attr = {
		.size = CQ_SIZE, .format = FI_CQ_FORMAT_DATA, .wait_obj = FI_WAIT_NONE};
	struct fi_av_attr av_attr = {.type = FI_AV_TABLE};
	int rc;

	rc = fi_fabric(dom->info->fabric_attr, &dom->fabric, NULL);
	if (rc)
		return pplx_fail(rc, "fi_fabric(%s): %s", e->provider, fi_strerror(-rc));
	rc = fi_domain(dom->fabric, dom->info, &dom->domain, NULL);
	if (rc)
		return pplx_fail(rc, "fi_domain(%s): %s", e->provider, fi_strerror(-rc));
	rc = fi_cq_open(dom->domain, &cq_attr, &dom->cq, NULL);
	if (rc)
		return pplx_fail(rc, "fi_cq_open: %s", fi_strerror(-rc));
	rc = fi_av_open(dom->domain, &av_attr, &dom->av, NULL);
	if (rc)
		return pplx_fail(rc, "fi_av_open: %s", fi_strerror(-rc));
	rc = fi_endpoint(dom->domain, dom->info, &dom->ep, NULL);
	if (rc)
		return pplx_fail(rc, "fi_endpoint: %s", fi_strerror(-rc));
	rc = fi_ep_bind(dom->ep, &dom->cq->fid, FI_TRANSMIT | FI_RECV);
	if (rc)
		return pplx_fail(rc, "fi_ep_bind(cq): %s", fi_strerror(-rc));
	rc = fi_ep_bind(dom->ep, &dom->av->fid, 0);
	if (rc)
		return pplx_fail(rc, "fi_ep_bind(av): %s", fi_strerror(-rc));
	if (!strcmp(dom->info->fabric_attr->prov_name, "shm")) {
		/* shm names its region /dev/shm/<pid>:<domain>:<ep> by default; a
		 * process killed before fi_close leaves that file behind, and the
		 * next process given the same pid (pid_max 32768 here; 53 stale
		 * files after a day of tests) fails fi_enable with -EBUSY. A name
		 * with a per-engine random part never meets a stale one. */
		char name[64];
		uint64_t salt = pplx_now_ns() ^ ((uint64_t)(uintptr_t)e * 0x9E3779B97F4A7C15ull);

		snprintf(name, sizeof(name), "pplx_%d_%016llx_%d", (int)getpid(),
			 (unsigned long long)salt, d);
		rc = fi_setname(&dom->ep->fid, name, strlen(name) + 1);
		if (rc)
			return pplx_fail(rc, "fi_setname(%s): %s", name, fi_strerror(-rc));
	}
	rc = fi_enable(dom->ep);
	if (rc)
		return pplx_fail(rc, "fi_enable: %s", fi_strerror(-rc));
	dom->addrlen = sizeof(dom->addr);
	rc = fi_getname(&dom->ep->fid, dom->addr, &dom->addrlen);
	if (rc)
		return pplx_fail(rc, "fi_getname: %s", fi_strerror(-rc));
	return 0;
}

#define CLOSE_FID(p)                                                                              \
	do {                                                                                      \
		if (p) {                                                                          \
			fi_close(&(p)->fid);                                                      \
			(p) = NULL;                                                               \
		}                                                                                 \
	} while (0)

static void handle_cq_error(struct pplx_engine *e, struct fid_cq *cq)
{
	struct fi_cq_err_entry err = {0};
	struct pplx_op *op;

	if (fi_cq_readerr(cq, &err, 0) < 0)
		return;
	e->stats.cq_errors++;
	op = err.op_context;
	if (!op)
		return;
	if (op->kind == OP_RECV) {
		/* A truncated or cancelled message: repost the slot. */
		op->inflight = false;
		list_remove(&e->inflight, op);
		op_submit(e, op);
		return;
	}
	op_complete(e, op, err.err ? -err.err : -FI_EOTHER);
}

static void progress_cq(struct pplx_engine *e, struct fid_cq *cq, bool *did)
{
	struct fi_cq_data_entry ent[CQ_BATCH];
	ssize_t n = fi_cq_read(cq, ent, CQ_BATCH);

	if (n == -FI_EAVAIL) {
		handle_cq_error(e, cq);
		*did = true;
		return;
	}
	if (n <= 0)
		return;
	*did = true;
	for (ssize_t i = 0; i < n; i++) {
		uint64_t flags = ent[i].flags;
		struct pplx_op *op;

		/* A remote write's completion belongs to no posted op of ours: decide by
		 * the flags, never by op_context (shm in libfabric 1.17 does not always
		 * clear it for these: a stale pointer crashed a two-engine process). */
		if ((flags & FI_REMOTE_WRITE) || ((flags & FI_REMOTE_CQ_DATA) && !(flags & FI_RECV))) {
			/* EFA carries 4 bytes of CQ data: the immediate is 32 bits. */
			if (flags & FI_REMOTE_CQ_DATA)
				imm_arrived(e, (uint32_t)ent[i].data);
			continue;
		}
		op = ent[i].op_context;
		if (!op)
			continue;
		if (op->kind == OP_RECV)
			msg_recv_done(e, op, ent[i].len);
		else
			op_complete(e, op, 0);
	}
}

/* One pass over every CQ, the pending queue and the held immediates; lock
 * held. Run by the progress thread, and by waiters while they spin. */
bool engine_progress_locked(struct pplx_engine *e)
{
	bool did = false;

	for (int d = 0; d < e->n; d++)
		progress_cq(e, e->dom[d].cq, &did);
	if (e->pending.head)
		ops_retry_pending(e, &did);
	if (e->num_held)
		imm_release_held(e, false, &did);
	if (atomic_load_explicit(&e->reap_dead, memory_order_relaxed))
		watch_reap_locked(e, &did);
	if (did) {
		counter_add_locked(&e->events, 1);
		if (e->sleepers)
			pthread_cond_broadcast(&e->cv);
	}
	return did;
}

/* Nap up to ns unless woken (engine_wake_progress): a waiter that stops
 * spinning, a submission, or destroy. wake/napping are seq_cst atomics, so
 * either this thread sees wake, or the waker sees napping and signals under
 * nap_lock after this thread started waiting. */
static void nap_ns(struct pplx_engine *e, uint64_t ns)
{
	uint64_t until = pplx_now_ns() + ns;
	struct timespec ts = {(time_t)(until / 1000000000ull), (long)(until % 1000000000ull)};

	pthread_mutex_lock(&e->nap_lock);
	atomic_store(&e->napping, 1);
	if (!atomic_load(&e->wake) && !atomic_load(&e->stop))
		pthread_cond_timedwait(&e->nap_cv, &e->nap_lock, &ts);
	atomic_store(&e->napping, 0);
	atomic_store(&e->wake, 0);
	pthread_mutex_unlock(&e->nap_lock);
}

/* Progress thread only: step aside while a waiter spins, or one succeeded
 * since the last look (within about aside_ns: the look before was at the end
 * of the previous nap). Clearing `spun` here, not comparing clocks, keeps the
 * waiters' and the posters' hot paths free of clock reads. */
static bool progress_step_aside(struct pplx_engine *e)
{
	if (!e->aside_ns)
		return false;
	if (atomic_load(&e->spinners))
		return true;
	return atomic_load_explicit(&e->spun, memory_order_relaxed) && atomic_exchange(&e->spun, 0);
}

bool engine_progress_aside(struct pplx_engine *e)
{
	return atomic_load_explicit(&e->aside_nap, memory_order_relaxed);
}

void engine_wake_progress(struct pplx_engine *e)
{
	atomic_store(&e->wake, 1);
	if (atomic_load(&e->napping)) {
		pthread_mutex_lock(&e->nap_lock);
		pthread_cond_signal(&e->nap_cv);
		pthread_mutex_unlock(&e->nap_lock);
	}
}

/* The progress thread. After an event it spins for spin_us; then it naps,
 * sleep_us first, doubling per idle nap up to IDLE_NAP_MAX_NS, so an idle
 * engine costs ~4000 wake-ups a second, not 50000 (2-core CI runs a dozen
 * engines). A submission (e->kicked) or an event puts it back to spinning;
 * a waiter that stops spinning wakes it at once (it must take over). */
static void *progress_main(void *arg)
{
	struct pplx_engine *e = arg;
	uint64_t last_event = pplx_now_ns();
	const uint64_t spin_ns = (uint64_t)e->cfg.spin_us * 1000;
	const uint64_t min_nap = (uint64_t)e->cfg.sleep_us * 1000;
	const uint64_t max_nap = min_nap > IDLE_NAP_MAX_NS ? min_nap : IDLE_NAP_MAX_NS;
	const uint64_t busy_ns = (uint64_t)e->cfg.busy_poll_us * 1000;
	uint64_t nap = min_nap;

	/* Timer slack: a 20 us nap should not become the default 50 us. */
	prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
	prctl(PR_SET_NAME, (unsigned long)"pplx-progress", 0, 0, 0); /* top, perf sched */
	while (!atomic_load(&e->stop)) {
		bool did, busy;
		uint64_t now;

		/* A spinning waiter drives progress itself (engine_wait_cond):
		 * step aside while one spins or one succeeded since our last look
		 * (it will likely post and wait again), rarely waking: every
		 * wake-up can preempt the spinner, which on a loaded box then
		 * waits a whole time slice (p80 of an 8 B ping-pong: 6 us with
		 * 20 us naps, 1.2 us with 1 ms; shm, 2 loaded cores), and two
		 * busy threads per process halve a 2-core box's copy bandwidth.
		 * A waiter that stops spinning unsuccessfully wakes us. */
		if (progress_step_aside(e)) {
			atomic_store_explicit(&e->aside_nap, 1, memory_order_relaxed);
			nap_ns(e, e->aside_ns);
			atomic_store_explicit(&e->aside_nap, 0, memory_order_relaxed);
			last_event = pplx_now_ns();
			continue;
		}
		/* A submitter wants the lock: let it in first. It clears
		 * want_lock once it holds the lock, so waiting for 0 hands the
		 * lock over instead of re-taking it before the submitter wakes
		 * (which starved submitters for milliseconds on a busy box). */
		if (atomic_load(&e->want_lock)) {
			uint64_t t0 = pplx_now_ns();

			while (atomic_load(&e->want_lock) && pplx_now_ns() - t0 < 200000)
				sched_yield();
		}
		pthread_mutex_lock(&e->lock);
		did = engine_progress_locked(e);
		busy = e->tx_inflight || e->pending.head || atomic_load(&e->waiters);
		pthread_mutex_unlock(&e->lock);

		now = pplx_now_ns();
		if (did || atomic_exchange(&e->kicked, 0)) {
			last_event = now;
			nap = min_nap;
		} else if (now - last_event > spin_ns) {
			/* Past the spin: work outstanding keeps us polling, politely,
			 * for busy_poll_us (see pplx_engine_config); idle, we nap. */
			if (busy && now - last_event < busy_ns) {
				sched_yield();
			} else if (min_nap) {
				nap_ns(e, nap);
				nap = nap * 2 > max_nap ? max_nap : nap * 2;
			}
		}
	}
	return NULL;
}

int pplx_engine_create(const struct pplx_engine_config *cfg, struct pplx_engine **out)
{
	struct pplx_engine *e = NULL;
	struct fi_info *list = NULL;
	pthread_condattr_t ca;
	size_t table_bytes;
	int rc;

	*out = NULL;
	rc = check_config(cfg);
	if (rc)
		return rc;
	e = calloc(1, sizeof(*e));
	if (!e)
		return pplx_fail(-FI_ENOMEM, "out of memory");
	e->cfg = *cfg;
	e->cfg.provider = NULL; /* not owned; copied below */
	e->cfg.node = NULL;
	e->n = (int)cfg->num_domains;
	e->aside_ns = (uint64_t)cfg->aside_us * 1000;
	e->inflight_spin_ns = (uint64_t)cfg->inflight_spin_us * 1000;
	e->next_key = 1;
	e->rng = cfg->fault_seed ? cfg->fault_seed : 0x9E3779B97F4A7C15ull;
	snprintf(e->provider, sizeof(e->provider), "%s", expand_provider(cfg->provider));
	if (cfg->node)
		snprintf(e->node, sizeof(e->node), "%s", cfg->node);
	pthread_mutex_init(&e->lock, NULL);
	pthread_mutex_init(&e->nap_lock, NULL);
	pthread_mutex_init(&e->watch_lock, NULL);
	e->watch_efd = -1;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&e->cv, &ca);
	pthread_cond_init(&e->nap_cv, &ca);
	pthread_condattr_destroy(&ca);

	table_bytes = ((size_t)cfg->imm_table_size * 8 + 4095) & ~(size_t)4095;
	if (posix_memalign((void **)&e->imm_table, 4096, table_bytes)) {
		rc = pplx_fail(-FI_ENOMEM, "imm table of %zu bytes", table_bytes);
		goto err;
	}
	memset(e->imm_table, 0, table_bytes);
	e->triggers = calloc(cfg->imm_table_size, sizeof(*e->triggers));
	e->held = calloc(cfg->fault_window ? cfg->fault_window : 1, sizeof(*e->held));
	if (!e->triggers || !e->held) {
		rc = pplx_fail(-FI_ENOMEM, "out of memory");
		goto err;
	}

	rc = get_infos(e, &list);
	if (rc)
		goto err;
	rc = pick_infos(e, list);
	if (rc)
		goto err;
	for (int d = 0; d < e->n; d++) {
		rc = open_domain(e, d);
		if (rc)
			goto err;
	}
	rc = watch_init(e);
	if (rc)
		goto err;
	rc = msg_init(e);
	if (rc)
		goto err;
	rc = pthread_create(&e->thread, NULL, progress_main, e);
	if (rc) {
		rc = pplx_fail(-rc, "pthread_create: %s", strerror(rc));
		goto err;
	}
	e->thread_started = true;
	fi_freeinfo(list);
	*out = e;
	return 0;
err:
	fi_freeinfo(list);
	pplx_engine_destroy(e);
	return rc;
}

static void fail_list(struct pplx_engine *e, struct pplx_op_list *l)
{
	struct pplx_op *op;

	while ((op = l->head)) {
		list_remove(l, op);
		op->inflight = false;
		if (op->kind == OP_RECV)
			continue; /* recv slots belong to msg.c */
		op_complete(e, op, PPLX_ERR_CLOSED);
	}
}

void pplx_engine_destroy(struct pplx_engine *e)
{
	struct pplx_op *op;

	if (!e)
		return;
	pthread_mutex_lock(&e->lock);
	atomic_store(&e->closed, 1);
	pthread_cond_broadcast(&e->cv);
	pthread_mutex_unlock(&e->lock);
	if (e->thread_started) {
		atomic_store(&e->stop, 1);
		engine_wake_progress(e);
		pthread_join(e->thread, NULL);
	}
	watch_fini(e); /* the monitor thread; ops keep op->watch but never read it now */
	/* Waiters see `closed` and leave; the engine must outlive them. */
	while (atomic_load(&e->waiters) > 0) {
		pthread_mutex_lock(&e->lock);
		pthread_cond_broadcast(&e->cv);
		pthread_mutex_unlock(&e->lock);
		usleep(100);
	}
	fail_list(e, &e->pending);
	for (int d = 0; d < e->n; d++)
		CLOSE_FID(e->dom[d].ep); /* in-flight contexts are ours again */
	fail_list(e, &e->inflight);
	msg_fini(e);
	for (struct pplx_mr *mr = e->mrs; mr; mr = mr->next) {
		mr_close_fids(mr);
		mr->e = NULL;
	}
	for (int d = 0; d < e->n; d++) {
		CLOSE_FID(e->dom[d].av);
		CLOSE_FID(e->dom[d].cq);
		CLOSE_FID(e->dom[d].domain);
		CLOSE_FID(e->dom[d].fabric);
		fi_freeinfo(e->dom[d].info);
	}
	while ((op = e->free_ops)) {
		e->free_ops = op->next;
		free(op);
	}
	for (int p = 0; p < e->num_peers; p++)
		free(e->peers[p].addr);
	free(e->peers);
	free(e->imm_table);
	free(e->triggers);
	free(e->held);
	pthread_cond_destroy(&e->cv);
	pthread_cond_destroy(&e->nap_cv);
	pthread_mutex_destroy(&e->lock);
	pthread_mutex_destroy(&e->nap_lock);
	pthread_mutex_destroy(&e->watch_lock);
	free(e);
}

int pplx_engine_num_domains(struct pplx_engine *e) { return e->n; }

const char *pplx_engine_provider(struct pplx_engine *e) { return e->provider; }

int pplx_engine_has_hmem(struct pplx_engine *e) { return e->has_hmem; }

int pplx_engine_peer_watch(struct pplx_engine *e)
{
	return e->monitor_started ? 1 + e->lock_recovery : 0;
}

int pplx_engine_address_len(struct pplx_engine *e)
{
	int len = 2;

	for (int d = 0; d < e->n; d++)
		len += 2 + (int)e->dom[d].addrlen;
	return len;
}

/* Main address: [PPLX_ADDR_MAGIC][n] then per domain [u16 len][name]. */
int pplx_engine_address(struct pplx_engine *e, uint8_t *buf, size_t *len)
{
	size_t need = (size_t)pplx_engine_address_len(e), pos = 2;

	if (*len < need) {
		*len = need;
		return pplx_fail(PPLX_ERR_INVALID, "address buffer of %zu bytes < %zu", *len, need);
	}
	buf[0] = PPLX_ADDR_MAGIC;
	buf[1] = (uint8_t)e->n;
	for (int d = 0; d < e->n; d++) {
		uint16_t l = (uint16_t)e->dom[d].addrlen;

		memcpy(buf + pos, &l, 2);
		memcpy(buf + pos + 2, e->dom[d].addr, l);
		pos += 2 + l;
	}
	*len = need;
	return 0;
}

int pplx_engine_stats(struct pplx_engine *e, struct pplx_engine_stats *out)
{
	engine_lock(e);
	*out = e->stats;
	out->pending_now = e->pending.len;
	out->inflight_now = e->inflight.len;
	out->peers_dead = atomic_load(&e->peers_dead);
	out->locks_recovered = atomic_load(&e->locks_recovered);
	engine_unlock(e);
	return 0;
}

int pplx_engine_num_shards(struct pplx_engine *e, uint64_t len)
{
	return len >= e->cfg.shard_threshold ? e->n : 1;
}

/* Parse a main address into per-domain (pointer, length); checks its shape. */
static int parse_address(struct pplx_engine *e, const uint8_t *a, size_t len,
			 const uint8_t **names, size_t *lens)
{
	size_t pos = 2;

	if (len < 2 || a[0] != PPLX_ADDR_MAGIC)
		return pplx_fail(PPLX_ERR_BAD_DESCRIPTOR, "not a pplx engine address (%zu bytes)",
				 len);
	if (a[1] != e->n)
		return pplx_fail(PPLX_ERR_BAD_DESCRIPTOR,
				 "peer has %u domains, this engine %d: num_domains must match", a[1],
				 e->n);
	for (int d = 0; d < e->n; d++) {
		uint16_t l;

		if (pos + 2 > len)
			return pplx_fail(PPLX_ERR_BAD_DESCRIPTOR, "address truncated");
		memcpy(&l, a + pos, 2);
		if (pos + 2 + l > len || l == 0 || l > PPLX_MAX_ADDR)
			return pplx_fail(PPLX_ERR_BAD_DESCRIPTOR, "address truncated");
		names[d] = a + pos + 2;
		lens[d] = l;
		pos += 2 + l;
	}
	if (pos != len)
		return pplx_fail(PPLX_ERR_BAD_DESCRIPTOR, "address has %zu trailing bytes",
				 len - pos);
	return 0;
}

/* Caller holds the lock. Returns the peer index, inserting it if new. */
static int peer_import_locked(struct pplx_engine *e, const uint8_t *a, size_t len)
{
	const uint8_t *names[PPLX_MAX_DOMAINS];
	size_t lens[PPLX_MAX_DOMAINS];
	struct pplx_peer *p;
	int rc;

	for (int i = 0; i < e->num_peers; i++)
		if (e->peers[i].len == len && !memcmp(e->peers[i].addr, a, len))
			return i;
	rc = parse_address(e, a, len, names, lens);
	if (rc)
		return rc;
	if (e->num_peers == e->cap_peers) {
		int cap = e->cap_peers ? 2 * e->cap_peers : 16;
		struct pplx_peer *np = realloc(e->peers, cap * sizeof(*np));

		if (!np)
			return pplx_fail(-FI_ENOMEM, "out of memory");
		e->peers = np;
		e->cap_peers = cap;
	}
	p = &e->peers[e->num_peers];
	memset(p, 0, sizeof(*p));
	for (int d = 0; d < e->n; d++) {
		rc = fi_av_insert(e->dom[d].av, names[d], 1, &p->fi_addr[d], 0, NULL);
		if (rc != 1)
			return pplx_fail(rc < 0 ? rc : PPLX_ERR_BAD_DESCRIPTOR,
					 "fi_av_insert of a peer on domain %d failed (%d)", d, rc);
	}
	p->addr = malloc(len);
	if (!p->addr)
		return pplx_fail(-FI_ENOMEM, "out of memory");
	p->watch = watch_peer(e, names, lens);
	memcpy(p->addr, a, len);
	p->len = len;
	return e->num_peers++;
}

int pplx_peer_import(struct pplx_engine *e, const uint8_t *main_addr, size_t main_addr_len)
{
	int rc;

	if (atomic_load(&e->closed))
		return pplx_fail(PPLX_ERR_CLOSED, "engine is closed");
	engine_lock(e);
	rc = peer_import_locked(e, main_addr, main_addr_len);
	engine_unlock(e);
	return rc;
}

int pplx_rdesc_import(struct pplx_engine *e, const uint8_t *main_addr, size_t main_addr_len,
		      uint64_t base, uint64_t len, uint32_t num_domains, const uint64_t *addrs,
		      const uint64_t *keys, struct pplx_rdesc **out)
{
	struct pplx_rdesc *r;
	int peer;

	*out = NULL;
	if (atomic_load(&e->closed))
		return pplx_fail(PPLX_ERR_CLOSED, "engine is closed");
	if (num_domains != (uint32_t)e->n)
		return pplx_fail(PPLX_ERR_BAD_DESCRIPTOR,
				 "descriptor has %u domains, this engine %d: num_domains must match",
				 num_domains, e->n);
	if (len == 0 || base + len < base)
		return pplx_fail(PPLX_ERR_BAD_DESCRIPTOR, "descriptor length %lu invalid",
				 (unsigned long)len);
	r = calloc(1, sizeof(*r));
	if (!r)
		return pplx_fail(-FI_ENOMEM, "out of memory");
	engine_lock(e);
	peer = peer_import_locked(e, main_addr, main_addr_len);
	if (peer >= 0) {
		memcpy(r->fi_addr, e->peers[peer].fi_addr, sizeof(r->fi_addr));
		r->watch = e->peers[peer].watch;
	}
	engine_unlock(e);
	if (peer < 0) {
		free(r);
		return peer;
	}
	r->e = e;
	r->base = base;
	r->len = len;
	r->n = e->n;
	for (int d = 0; d < e->n; d++) {
		r->raddr[d] = addrs[d];
		r->key[d] = keys[d];
	}
	*out = r;
	return 0;
}

void pplx_rdesc_free(struct pplx_rdesc *d) { free(d); }
