/*
 * peers.c -- shm peers that die: liveness, failing their operations, and
 * releasing the region lock a dead peer left held.
 *
 * Why: libfabric 1.17's shm provider serialises access to a peer's command
 * queue with a process-shared pthread spinlock inside the peer's region
 * (/dev/shm/<name>); fi_writedata / fi_send to a peer spin on it, and every
 * progress pass takes our own region's lock. A process killed while one of
 * its threads holds such a lock (its progress pass; a post to us) leaves it
 * held for ever: the next post to that peer spins inside libfabric with our
 * engine lock held, and the whole engine hangs (seen: a survivor of
 * test_peer_killed_mid_stream stuck in fi_writedata -> pthread_spin_lock).
 *
 * What: one monitor thread per shm engine waits in poll() on a pidfd per
 * peer process (0 CPU while nobody dies). When a peer dies:
 *   - the peer is marked dead: new posts to it fail at once with
 *     PPLX_ERR_PEER_DEAD, without entering libfabric; the progress pass
 *     fails its queued ops and detaches its in-flight ones from their
 *     requests (a request then fails instead of timing out; the op itself
 *     stays ours until libfabric returns its context or the engine closes);
 *   - its region file is unlinked (a killed process leaves 16 MiB of tmpfs);
 *   - for 10 s the monitor samples the lock word of the dead peer's region
 *     (its first page, mapped at import): held in every sample for 200 ms,
 *     it was left by the dead process (a live poster holds it for
 *     microseconds) and is released, so a post stuck on it returns;
 *   - our own region's lock is released likewise if it stays held for 1 s
 *     while our engine lock is held all along and no dead peer's lock is
 *     held: a thread of ours is stuck inside libfabric on a lock that only
 *     the dead peer can have left.
 * The lock lives at an offset of libfabric's private struct smr_region; it is
 * used only after our own region proved the layout at engine creation
 * (version byte, pid, total size, an unlocked spinlock where expected), and
 * each peer's region proves it again at import. Otherwise the engine keeps
 * the liveness part alone.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "internal.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

/* libfabric 1.17 shm, struct smr_region (version 4): u8 version, u8 resv,
 * u16 flags, int pid, ..., void *base_addr @16, pthread_spinlock_t lock @24,
 * ..., size_t total_size @40. */
#define SMR_VERSION_OFF 0
#define SMR_VERSION_1_17 4
#define SMR_PID_OFF 4
#define SMR_LOCK_OFF 24
#define SMR_TOTAL_SIZE_OFF 40
#define SMR_PAGE 4096

#define SAMPLE_MS 10
#define PEER_LOCK_SAMPLES 20 /* 200 ms held by a dead process: release it */
#define OWN_LOCK_SAMPLES 100 /* 1 s held, engine lock held too: release it */
#define WATCH_DEAD_NS 10000000000ull /* sample a dead peer's lock this long */

static int spin_unlocked_value(void)
{
	pthread_spinlock_t l;
	int v;

	_Static_assert(sizeof(pthread_spinlock_t) == sizeof(int), "spinlock is not an int");
	pthread_spin_init(&l, PTHREAD_PROCESS_SHARED);
	v = (int)l;
	pthread_spin_destroy(&l);
	return v;
}

static int *lock_word(uint8_t *region) { return (int *)(region + SMR_LOCK_OFF); }

/* Map the first page of /dev/shm/<name> and check that it looks like a 1.17
 * shm region of process pid with an unlocked lock (if must_be_unlocked). */
static uint8_t *map_region(const char *name, int pid, bool must_be_unlocked, int unlocked)
{
	char path[PPLX_MAX_ADDR + 16];
	struct stat st;
	uint8_t *p;
	uint64_t total;
	int fd, rpid;

	if (strchr(name, '/'))
		return NULL;
	snprintf(path, sizeof(path), "/dev/shm/%s", name);
	fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return NULL;
	if (fstat(fd, &st) || st.st_size < SMR_PAGE) {
		close(fd);
		return NULL;
	}
	p = mmap(NULL, SMR_PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	if (p == MAP_FAILED)
		return NULL;
	memcpy(&rpid, p + SMR_PID_OFF, sizeof(rpid));
	memcpy(&total, p + SMR_TOTAL_SIZE_OFF, sizeof(total));
	if (p[SMR_VERSION_OFF] != SMR_VERSION_1_17 || rpid != pid ||
	    total != (uint64_t)st.st_size ||
	    (must_be_unlocked && __atomic_load_n(lock_word(p), __ATOMIC_ACQUIRE) != unlocked)) {
		munmap(p, SMR_PAGE);
		return NULL;
	}
	return p;
}

/* "pplx_<pid>_<salt>_<domain>" (open_domain names shm endpoints so). */
static int name_pid(const uint8_t *name, size_t len)
{
	char buf[32];
	size_t n = len < sizeof(buf) - 1 ? len : sizeof(buf) - 1;
	char *end;
	long pid;

	memcpy(buf, name, n);
	buf[n] = 0;
	if (strncmp(buf, "pplx_", 5))
		return -1;
	pid = strtol(buf + 5, &end, 10);
	if (end == buf + 5 || *end != '_' || pid <= 0 || pid > 0x7fffffff)
		return -1;
	return (int)pid;
}

static void *monitor_main(void *arg);

int watch_init(struct pplx_engine *e)
{
	int rc;

	e->watch_efd = -1;
	if (strcmp(e->provider, "shm"))
		return 0;
	e->spin_unlocked = spin_unlocked_value();
	/* Before any peer exists nobody else touches our region: its lock is
	 * free, so a layout that puts an unlocked spinlock there is proven. */
	e->lock_recovery = true;
	for (int d = 0; d < e->n; d++) {
		e->own_region[d] = map_region((const char *)e->dom[d].addr, getpid(), true,
					      e->spin_unlocked);
		if (!e->own_region[d])
			e->lock_recovery = false;
	}
	e->watch_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (e->watch_efd < 0)
		return pplx_fail(-errno, "eventfd: %s", strerror(errno));
	rc = pthread_create(&e->monitor, NULL, monitor_main, e);
	if (rc)
		return pplx_fail(-rc, "pthread_create (peer monitor): %s", strerror(rc));
	e->monitor_started = true;
	return 0;
}

static void watch_wake(struct pplx_engine *e)
{
	uint64_t one = 1;

	if (e->watch_efd >= 0 && write(e->watch_efd, &one, sizeof(one)) < 0) {
		/* EAGAIN: the counter is already non-zero, the monitor will wake. */
	}
}

void watch_fini(struct pplx_engine *e)
{
	struct peer_watch *w;

	if (e->monitor_started) {
		atomic_store(&e->stop, 1);
		watch_wake(e);
		pthread_join(e->monitor, NULL);
		e->monitor_started = false;
	}
	while ((w = e->watches)) {
		e->watches = w->next;
		if (w->pidfd >= 0)
			close(w->pidfd);
		for (int d = 0; d < PPLX_MAX_DOMAINS; d++)
			if (w->region[d])
				munmap(w->region[d], SMR_PAGE);
		free(w);
	}
	for (int d = 0; d < PPLX_MAX_DOMAINS; d++)
		if (e->own_region[d]) {
			munmap(e->own_region[d], SMR_PAGE);
			e->own_region[d] = NULL;
		}
	if (e->watch_efd >= 0)
		close(e->watch_efd);
	e->watch_efd = -1;
}

/* Caller holds the engine lock (peer import). NULL: not watched (not shm,
 * not a pplx shm name, or the process is gone or not ours to see). */
struct peer_watch *watch_peer(struct pplx_engine *e, const uint8_t *const *names,
			      const size_t *lens)
{
	struct peer_watch *w;
	int pid, pidfd;

	if (e->watch_efd < 0)
		return NULL;
	pid = name_pid(names[0], lens[0]);
	if (pid < 0 || pid == getpid())
		return NULL; /* ourselves: an engine of this process */
	pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
	if (pidfd < 0)
		return NULL; /* ESRCH (gone, or another pid namespace), ENOSYS */
	w = calloc(1, sizeof(*w));
	if (!w) {
		close(pidfd);
		return NULL;
	}
	w->pid = pid;
	w->pidfd = pidfd;
	w->n = e->n;
	for (int d = 0; d < e->n; d++) {
		size_t l = lens[d] < sizeof(w->name[d]) - 1 ? lens[d] : sizeof(w->name[d]) - 1;

		memcpy(w->name[d], names[d], l);
		w->name[d][l] = 0;
		if (e->lock_recovery)
			w->region[d] = map_region(w->name[d], pid, false, e->spin_unlocked);
	}
	pthread_mutex_lock(&e->watch_lock);
	w->next = e->watches;
	e->watches = w;
	pthread_mutex_unlock(&e->watch_lock);
	watch_wake(e);
	return w;
}

static void mark_dead(struct pplx_engine *e, struct peer_watch *w)
{
	w->dead_ns = pplx_now_ns();
	atomic_store(&w->dead, 1);
	atomic_fetch_add(&e->peers_dead, 1);
	/* Its region file outlives it (no fi_close ran): reclaim the tmpfs
	 * pages. Mappings (libfabric's, ours) stay valid. */
	for (int d = 0; d < w->n; d++)
		if (!strncmp(w->name[d], "pplx_", 5))
			shm_unlink(w->name[d]);
	atomic_store(&e->reap_dead, 1);
	atomic_store(&e->spun, 0);
	engine_wake_progress(e);
}

/* Sample the lock words; true while a dead peer still needs watching. */
static bool sample_locks(struct pplx_engine *e, bool *peer_lock_held)
{
	uint64_t now = pplx_now_ns();
	bool watching = false;

	*peer_lock_held = false;
	pthread_mutex_lock(&e->watch_lock);
	for (struct peer_watch *w = e->watches; w; w = w->next) {
		if (!atomic_load(&w->dead) || w->unwatched)
			continue;
		if (now - w->dead_ns > WATCH_DEAD_NS) {
			for (int d = 0; d < w->n; d++)
				if (w->region[d]) {
					munmap(w->region[d], SMR_PAGE);
					w->region[d] = NULL;
				}
			w->unwatched = true;
			continue;
		}
		watching = true;
		for (int d = 0; d < w->n; d++) {
			int *lk;

			if (!w->region[d])
				continue;
			lk = lock_word(w->region[d]);
			if (__atomic_load_n(lk, __ATOMIC_ACQUIRE) == e->spin_unlocked) {
				w->held_samples[d] = 0;
				continue;
			}
			*peer_lock_held = true;
			if (++w->held_samples[d] >= PEER_LOCK_SAMPLES) {
				__atomic_store_n(lk, e->spin_unlocked, __ATOMIC_RELEASE);
				w->held_samples[d] = 0;
				atomic_fetch_add(&e->locks_recovered, 1);
				fprintf(stderr,
					"pplx: released the shm region lock that dead process %d "
					"left held (domain %d)\n",
					w->pid, d);
			}
		}
	}
	pthread_mutex_unlock(&e->watch_lock);
	return watching;
}

/* Our own region's lock: see the header comment. */
static void sample_own_lock(struct pplx_engine *e, bool peer_lock_held)
{
	bool engine_busy = pthread_mutex_trylock(&e->lock) != 0;

	if (!engine_busy)
		pthread_mutex_unlock(&e->lock);
	for (int d = 0; d < e->n; d++) {
		int *lk;

		if (!e->own_region[d])
			continue;
		lk = lock_word(e->own_region[d]);
		if (!engine_busy || peer_lock_held ||
		    __atomic_load_n(lk, __ATOMIC_ACQUIRE) == e->spin_unlocked) {
			e->own_held_samples[d] = 0;
			continue;
		}
		if (++e->own_held_samples[d] >= OWN_LOCK_SAMPLES) {
			__atomic_store_n(lk, e->spin_unlocked, __ATOMIC_RELEASE);
			e->own_held_samples[d] = 0;
			atomic_fetch_add(&e->locks_recovered, 1);
			fprintf(stderr,
				"pplx: released this engine's shm region lock, held for 1 s after "
				"a peer died (domain %d)\n",
				d);
		}
	}
}

static void *monitor_main(void *arg)
{
	struct pplx_engine *e = arg;
	struct pollfd *fds = NULL;
	struct peer_watch **who = NULL;
	size_t cap = 0;
	bool watching = false;

	prctl(PR_SET_NAME, (unsigned long)"pplx-peers", 0, 0, 0);
	while (!atomic_load(&e->stop)) {
		size_t n = 1;
		int rc;

		pthread_mutex_lock(&e->watch_lock);
		for (struct peer_watch *w = e->watches; w; w = w->next)
			n += !atomic_load(&w->dead);
		if (n > cap) {
			struct pollfd *nf = realloc(fds, n * sizeof(*fds));
			struct peer_watch **nw = nf ? realloc(who, n * sizeof(*who)) : NULL;

			if (nf)
				fds = nf;
			if (nw)
				who = nw;
			if (!nf || !nw) {
				pthread_mutex_unlock(&e->watch_lock);
				usleep(100000);
				continue;
			}
			cap = n;
		}
		fds[0] = (struct pollfd){.fd = e->watch_efd, .events = POLLIN};
		n = 1;
		for (struct peer_watch *w = e->watches; w; w = w->next)
			if (!atomic_load(&w->dead)) {
				fds[n] = (struct pollfd){.fd = w->pidfd, .events = POLLIN};
				who[n++] = w;
			}
		pthread_mutex_unlock(&e->watch_lock);

		rc = poll(fds, n, watching ? SAMPLE_MS : -1);
		if (atomic_load(&e->stop))
			break;
		if (rc > 0 && (fds[0].revents & POLLIN)) {
			uint64_t v;

			if (read(e->watch_efd, &v, sizeof(v)) < 0) {
				/* EAGAIN: drained by an earlier pass. */
			}
		}
		for (size_t i = 1; rc > 0 && i < n; i++)
			if (fds[i].revents)
				mark_dead(e, who[i]);
		if (atomic_load(&e->peers_dead)) {
			bool peer_lock_held;

			watching = sample_locks(e, &peer_lock_held);
			if (watching)
				sample_own_lock(e, peer_lock_held);
		}
	}
	free(fds);
	free(who);
	return NULL;
}

/* Caller holds the engine lock (a progress pass). Queued ops to dead peers
 * fail; in-flight ones leave their requests failed and stay ours (libfabric
 * still holds their context) until a completion or the engine's close. */
void watch_reap_locked(struct pplx_engine *e, bool *did)
{
	struct pplx_op *op, *next;

	if (!atomic_exchange(&e->reap_dead, 0))
		return;
	for (op = e->pending.head; op; op = next) {
		next = op->next;
		if (op->watch && atomic_load(&op->watch->dead)) {
			list_remove(&e->pending, op);
			op_complete(e, op, PPLX_ERR_PEER_DEAD);
			*did = true;
		}
	}
	for (op = e->inflight.head; op; op = op->next)
		if (op->watch && atomic_load(&op->watch->dead) && op->req) {
			op_detach(e, op, PPLX_ERR_PEER_DEAD);
			*did = true;
		}
}
