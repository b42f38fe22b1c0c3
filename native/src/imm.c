/*
 * imm.c -- the ImmCounter table, triggers, fault injection and waits.
 *
 * Counters are written only by the progress thread, under the engine lock,
 * with release-ordered atomics so that a CPU or GPU poller that sees the
 * count also sees the data of the writes counted (the provider wrote the
 * data before it reported the completion).
 */
#include <string.h>
#include <time.h>

#include <sched.h>

#include "internal.h"

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#elif defined(__aarch64__)
	__asm__ __volatile__("yield");
#endif
}

static uint64_t rng_next(struct pplx_engine *e)
{
	/* xorshift64*: seeded, reproducible reordering. */
	e->rng ^= e->rng >> 12;
	e->rng ^= e->rng << 25;
	e->rng ^= e->rng >> 27;
	return e->rng * 0x2545F4914F6CDD1Dull;
}

/* Subtract n from a counter if it holds at least n, atomically (CAS): waiters
 * that consume, pplx_imm_consume and consuming triggers all take arrivals this
 * way, so none takes what another took and a counter never wraps below 0, with
 * no engine lock (arrivals only ever add). */
static bool imm_take(uint64_t *counter, uint64_t n)
{
	uint64_t v = __atomic_load_n(counter, __ATOMIC_RELAXED);

	do {
		if (v < n)
			return false;
	} while (!__atomic_compare_exchange_n(counter, &v, v - n, true, __ATOMIC_ACQ_REL,
					      __ATOMIC_RELAXED));
	return true;
}

/* Lock held. A consuming trigger fires only if it can take its n arrivals (a
 * consumer may have taken some since they were counted); else it stays armed
 * for the next arrival. */
static void fire(struct pplx_engine *e, uint32_t imm, struct pplx_trigger *t)
{
	if (t->consume && !imm_take(&e->imm_table[imm], t->n))
		return;
	t->armed = false;
	__atomic_store_n(t->flag, t->value, __ATOMIC_RELEASE);
}

void imm_deliver(struct pplx_engine *e, uint32_t imm)
{
	struct pplx_trigger *t;
	uint64_t c;

	if (imm >= e->cfg.imm_table_size) {
		e->stats.imms_dropped++;
		return;
	}
	c = __atomic_add_fetch(&e->imm_table[imm], 1, __ATOMIC_RELEASE);
	e->stats.imms_received++;
	t = &e->triggers[imm];
	if (t->armed && c >= t->n)
		fire(e, imm, t);
}

void imm_arrived(struct pplx_engine *e, uint32_t imm)
{
	uint64_t delay_ns = 0;

	if (!e->cfg.fault_window) {
		imm_deliver(e, imm);
		return;
	}
	/* Fault injection: hold it; when the window is full, a random held one
	 * goes first, so arrivals leave out of order. */
	if (e->num_held == e->cfg.fault_window) {
		uint32_t j = (uint32_t)(rng_next(e) % e->num_held);

		imm_deliver(e, e->held[j].imm);
		e->held[j] = e->held[--e->num_held];
	}
	if (e->cfg.fault_max_delay_us)
		delay_ns = rng_next(e) % ((uint64_t)e->cfg.fault_max_delay_us * 1000 + 1);
	e->held[e->num_held].imm = imm;
	e->held[e->num_held].release_ns = pplx_now_ns() + delay_ns;
	e->num_held++;
}

void imm_release_held(struct pplx_engine *e, bool all, bool *did)
{
	uint64_t now = pplx_now_ns();

	for (uint32_t j = 0; j < e->num_held;) {
		if (all || e->held[j].release_ns <= now) {
			imm_deliver(e, e->held[j].imm);
			e->held[j] = e->held[--e->num_held];
			*did = true;
		} else {
			j++;
		}
	}
}

/* Wait until cond(arg); the caller counts itself in e->waiters for its whole
 * call, so that pplx_engine_destroy waits for it to leave. */
#define YIELD_AFTER_NS 20000 /* spin this long without progress, then yield between polls */
#define SPIN_CLOCK_EVERY 4 /* polls per clock read while spinning */

/* How long a spinning waiter goes on without progress: spin_ns, or longer
 * while this engine's own writes or sends are outstanding. Their completion
 * is on its way; on shm it comes when the target's progress has copied the
 * write (CMA, one process_vm_readv per write: 1-3 ms for 4-16 MiB on the CPU
 * VM), and a waiter that sleeps meanwhile hears of it only when the progress
 * thread, napping 20-250 us at a time by then, polls and wakes it: the peer
 * idles in between (PERFORMANCE.md, Fabric: 4-16 MiB writes). */
static uint64_t spin_limit(struct pplx_engine *e, uint64_t spin_ns)
{
	if (e->inflight_spin_ns > spin_ns &&
	    atomic_load_explicit(&e->tx_outstanding, memory_order_relaxed))
		return e->inflight_spin_ns;
	return spin_ns;
}

int engine_wait_cond(struct pplx_engine *e, bool (*cond)(void *), void *arg, int64_t timeout_us)
{
	uint64_t t0 = 0;

	return engine_wait_cond_from(e, cond, arg, timeout_us, &t0);
}

/* The same; the timeout counts from *t0, or from now if *t0 is 0 (then set
 * to now, if the wait had to read the clock at all): a caller that waits
 * again (another consumer was first) keeps one deadline. */
int engine_wait_cond_from(struct pplx_engine *e, bool (*cond)(void *), void *arg,
			  int64_t timeout_us, uint64_t *t0)
{
	uint64_t spin_ns = (uint64_t)e->cfg.spin_us * 1000;
	uint64_t now, deadline, ev;
	int rc;

	if (cond(arg))
		return 0;
	/* Spin first: a completion usually lands within microseconds, and a
	 * condition-variable wake-up costs more than that. While spinning, this
	 * thread drives progress itself (the progress thread steps aside), so a
	 * ping-pong needs one busy thread per process, not two: on a box with
	 * fewer cores than spinning threads, the scheduler otherwise makes every
	 * round trip wait for a time slice (milliseconds).
	 * The clock is read once per SPIN_CLOCK_EVERY polls, and not before the
	 * first ones: at ~40 ns a read (this VM), the six reads per wait this loop
	 * and its callers used to make were a third of the engine's cost over
	 * raw libfabric in an 8 B ping-pong. The timeout therefore counts from a
	 * few polls (< 1 us) after the call. */
	if (spin_ns) {
		uint64_t last = 0; /* spin past the last progress seen */
		uint64_t seen = atomic_load_explicit(&e->events, memory_order_relaxed);
		bool progressed = false;

		deadline = UINT64_MAX;
		atomic_fetch_add(&e->spinners, 1);
		for (uint32_t polls = 1;; polls++) {
			if (!atomic_load_explicit(&e->want_lock, memory_order_relaxed) &&
			    !pthread_mutex_trylock(&e->lock)) {
				progressed |= engine_progress_locked(e);
				pthread_mutex_unlock(&e->lock);
			} else {
				cpu_relax();
			}
			if (cond(arg)) {
				rc = 0;
				/* The progress thread stays aside a while longer: this
				 * thread is likely to post and wait again soon. */
				if (!atomic_load_explicit(&e->spun, memory_order_relaxed))
					atomic_store_explicit(&e->spun, 1, memory_order_relaxed);
				atomic_fetch_sub(&e->spinners, 1);
				goto out;
			}
			if (atomic_load_explicit(&e->closed, memory_order_relaxed)) {
				rc = PPLX_ERR_CLOSED;
				atomic_fetch_sub(&e->spinners, 1);
				goto out;
			}
			if (polls % SPIN_CLOCK_EVERY)
				continue;
			now = pplx_now_ns();
			if (!last) { /* the first read */
				if (!*t0)
					*t0 = now;
				if (timeout_us >= 0)
					deadline = *t0 + (uint64_t)timeout_us * 1000;
				last = now;
			}
			/* Progress by any thread counts: the progress thread may be
			 * the one copying a large shm write (the lock is then busy
			 * for milliseconds); going to sleep now would only add a
			 * wake-up per arrival. */
			ev = atomic_load_explicit(&e->events, memory_order_relaxed);
			if (progressed || ev != seen) {
				last = now;
				seen = ev;
				progressed = false;
			}
			if (now >= deadline || now - last >= spin_limit(e, spin_ns))
				break;
			/* Past YIELD_AFTER_NS without progress, hand the core over
			 * between polls: with more runnable threads than cores (the
			 * peer's copy, our progress thread, other jobs) a pure
			 * spinner holds its core until the tick (4 ms here). */
			if (now - last > YIELD_AFTER_NS)
				sched_yield();
		}
		/* Not there yet: the progress thread must take over now, not
		 * after its step-aside nap. */
		atomic_store(&e->spun, 0);
		if (atomic_fetch_sub(&e->spinners, 1) == 1)
			engine_wake_progress(e);
	} else {
		if (!*t0)
			*t0 = pplx_now_ns();
		deadline = timeout_us < 0 ? UINT64_MAX : *t0 + (uint64_t)timeout_us * 1000;
	}
	pthread_mutex_lock(&e->lock);
	e->sleepers++; /* progress broadcasts e->cv while > 0 */
	for (;;) {
		struct timespec ts;
		uint64_t until;

		if (cond(arg)) {
			rc = 0;
			break;
		}
		if (atomic_load(&e->closed)) {
			rc = PPLX_ERR_CLOSED;
			break;
		}
		now = pplx_now_ns();
		if (now >= deadline) {
			rc = PPLX_ERR_TIMEOUT;
			break;
		}
		/* Wake at least every 10 ms: a bounded sleep needs no lost-wakeup
		 * proof across the spin phase. */
		until = deadline - now < 10000000ull ? deadline : now + 10000000ull;
		ts.tv_sec = (time_t)(until / 1000000000ull);
		ts.tv_nsec = (long)(until % 1000000000ull);
		pthread_cond_timedwait(&e->cv, &e->lock, &ts);
	}
	e->sleepers--;
	pthread_mutex_unlock(&e->lock);
out:
	return rc;
}

int pplx_imm_table(struct pplx_engine *e, uint64_t **ptr, uint64_t *nbytes)
{
	*ptr = e->imm_table;
	*nbytes = (uint64_t)e->cfg.imm_table_size * 8;
	return 0;
}

static int check_imm(struct pplx_engine *e, uint32_t imm)
{
	if (atomic_load(&e->closed))
		return pplx_fail(PPLX_ERR_CLOSED, "engine is closed");
	if (imm >= e->cfg.imm_table_size)
		return pplx_fail(PPLX_ERR_INVALID, "imm %u >= imm_table_size %u", imm,
				 e->cfg.imm_table_size);
	return 0;
}

int64_t pplx_imm_count(struct pplx_engine *e, uint32_t imm)
{
	int rc = check_imm(e, imm);

	if (rc)
		return rc;
	return (int64_t)__atomic_load_n(&e->imm_table[imm], __ATOMIC_ACQUIRE);
}

struct imm_wait_arg {
	uint64_t *counter;
	uint64_t n;
};

static bool imm_reached(void *p)
{
	struct imm_wait_arg *a = p;

	return __atomic_load_n(a->counter, __ATOMIC_ACQUIRE) >= a->n;
}

static int imm_wait(struct pplx_engine *e, uint32_t imm, uint64_t n, int consume,
		    int64_t timeout_us)
{
	struct imm_wait_arg a;
	uint64_t t0 = 0; /* set by the first wait that reads the clock */
	int rc = check_imm(e, imm);

	if (rc)
		return rc;
	a.counter = &e->imm_table[imm];
	a.n = n;
	for (;;) {
		rc = engine_wait_cond_from(e, imm_reached, &a, timeout_us, &t0);
		if (rc == PPLX_ERR_TIMEOUT)
			return pplx_fail(rc, "imm %u: %lu of %lu arrivals after %ld us", imm,
					 (unsigned long)__atomic_load_n(a.counter, __ATOMIC_ACQUIRE),
					 (unsigned long)n, (long)timeout_us);
		if (rc)
			return pplx_fail(rc, "engine closed while waiting for imm %u", imm);
		/* Consume without the engine lock: imm_take subtracts only what is
		 * there; if another consumer was first, wait again. */
		if (!consume || imm_take(a.counter, n))
			return 0;
	}
}

int pplx_imm_wait(struct pplx_engine *e, uint32_t imm, uint64_t n, int consume, int64_t timeout_us)
{
	int rc;

	atomic_fetch_add(&e->waiters, 1); /* destroy waits for us */
	rc = imm_wait(e, imm, n, consume, timeout_us);
	atomic_fetch_sub(&e->waiters, 1);
	return rc;
}

int pplx_imm_consume(struct pplx_engine *e, uint32_t imm, uint64_t n)
{
	int rc = check_imm(e, imm);

	if (rc)
		return rc;
	if (!imm_take(&e->imm_table[imm], n))
		return pplx_fail(PPLX_ERR_INVALID, "imm %u: cannot consume %lu of %lu arrivals", imm,
				 (unsigned long)n,
				 (unsigned long)__atomic_load_n(&e->imm_table[imm], __ATOMIC_ACQUIRE));
	return 0;
}

int pplx_imm_set_trigger(struct pplx_engine *e, uint32_t imm, uint64_t n, uint64_t *flag,
			 uint64_t value, int consume)
{
	struct pplx_trigger *t;
	int rc = check_imm(e, imm);

	if (rc)
		return rc;
	engine_lock(e);
	t = &e->triggers[imm];
	memset(t, 0, sizeof(*t));
	if (flag) {
		t->n = n;
		t->flag = flag;
		t->value = value;
		t->consume = consume != 0;
		t->armed = true;
		if (e->imm_table[imm] >= n) /* already there: fire now */
			fire(e, imm, t);
	}
	engine_unlock(e);
	return 0;
}

struct u64_wait_arg {
	const uint64_t *addr;
	uint64_t value;
};

static bool u64_equal(void *p)
{
	struct u64_wait_arg *a = p;

	return __atomic_load_n(a->addr, __ATOMIC_ACQUIRE) == a->value;
}

int pplx_wait_u64(struct pplx_engine *e, const uint64_t *addr, uint64_t value, int64_t timeout_us)
{
	struct u64_wait_arg a = {.addr = addr, .value = value};
	int rc;

	if (!addr)
		return pplx_fail(PPLX_ERR_INVALID, "addr is NULL");
	if (atomic_load(&e->closed))
		return pplx_fail(PPLX_ERR_CLOSED, "engine is closed");
	atomic_fetch_add(&e->waiters, 1);
	rc = engine_wait_cond(e, u64_equal, &a, timeout_us);
	atomic_fetch_sub(&e->waiters, 1);
	if (rc == PPLX_ERR_TIMEOUT)
		return pplx_fail(rc, "word at %p is %lu, not %lu, after %ld us", (const void *)addr,
				 (unsigned long)__atomic_load_n(addr, __ATOMIC_ACQUIRE),
				 (unsigned long)value, (long)timeout_us);
	if (rc)
		return pplx_fail(rc, "engine closed while waiting");
	return 0;
}
