/*
 * cma_trace.c -- LD_PRELOAD diagnostic: time every process_vm_readv/writev.
 *
 * libfabric's shm provider moves a write larger than its inject size (4 KiB)
 * with one process_vm_readv in the TARGET process, issued from whichever
 * thread progresses the target's endpoint (fi_cq_read). Preloading this
 * shim into both sides of a benchmark records, per copy: start and end
 * (CLOCK_MONOTONIC ns), bytes, thread, CPU at start and end, and the
 * thread's voluntary / involuntary context switches during the call. From
 * that: copy rate (is the copy itself slower?) and the idle gaps between
 * copies (is the target waiting for work?).
 *
 *   cc -O2 -shared -fPIC cma_trace.c -o cma_trace.so -ldl
 *   CMA_TRACE=/tmp/dir LD_PRELOAD=$PWD/cma_trace.so <program>
 *
 * Writes /tmp/dir/cma.<pid>.tsv at exit (nothing if CMA_TRACE is unset or
 * the process made no CMA call; a process that leaves through _exit(), e.g. a
 * forked multiprocessing child, calls cma_trace_dump() itself). Columns: t0_ns t1_ns bytes tid cpu0 cpu1
 * nvcsw nivcsw. At most 1 << 20 records per process (the rest are counted).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAX_REC (1u << 20)

struct rec {
	uint64_t t0, t1, bytes;
	int32_t tid, cpu0, cpu1;
	int32_t nvcsw, nivcsw;
};

static struct rec *recs;
static atomic_uint nrec;
static atomic_uint dropped;
static atomic_int dumped;

typedef ssize_t (*cma_fn)(pid_t, const struct iovec *, unsigned long, const struct iovec *,
			  unsigned long, unsigned long);

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static ssize_t traced(const char *name, pid_t pid, const struct iovec *l, unsigned long ln,
		      const struct iovec *r, unsigned long rn, unsigned long flags)
{
	static cma_fn readv_fn, writev_fn;
	cma_fn *slot = name[15] == 'r' ? &readv_fn : &writev_fn; /* process_vm_[r]eadv */
	struct rusage u0, u1;
	uint64_t t0, t1;
	int cpu0;
	ssize_t n;
	unsigned i;

	if (!*slot)
		*slot = (cma_fn)dlsym(RTLD_NEXT, name);
	getrusage(RUSAGE_THREAD, &u0);
	cpu0 = sched_getcpu();
	t0 = now_ns();
	n = (*slot)(pid, l, ln, r, rn, flags);
	t1 = now_ns();
	getrusage(RUSAGE_THREAD, &u1);
	if (!recs || (i = atomic_fetch_add(&nrec, 1)) >= MAX_REC) {
		atomic_fetch_add(&dropped, 1);
		return n;
	}
	recs[i] = (struct rec){t0, t1, n > 0 ? (uint64_t)n : 0, (int32_t)gettid(), cpu0,
			       sched_getcpu(), (int32_t)(u1.ru_nvcsw - u0.ru_nvcsw),
			       (int32_t)(u1.ru_nivcsw - u0.ru_nivcsw)};
	return n;
}

/* libfabric 1.17 calls syscall(SYS_process_vm_readv, ...) (osd.h), not the libc
 * wrappers: intercept syscall() too, forwarding every other number untouched
 * (six long arguments, as the kernel ABI takes; extra ones are ignored). */
long syscall(long num, ...)
{
	static long (*real)(long, ...);
	long a[6];
	va_list ap;

	va_start(ap, num);
	for (int k = 0; k < 6; k++)
		a[k] = va_arg(ap, long);
	va_end(ap);
	if (num == SYS_process_vm_readv || num == SYS_process_vm_writev)
		return traced(num == SYS_process_vm_readv ? "process_vm_readv" : "process_vm_writev",
			      (pid_t)a[0], (const struct iovec *)a[1], (unsigned long)a[2],
			      (const struct iovec *)a[3], (unsigned long)a[4], (unsigned long)a[5]);
	if (!real)
		real = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
	return real(num, a[0], a[1], a[2], a[3], a[4], a[5]);
}

ssize_t process_vm_readv(pid_t pid, const struct iovec *l, unsigned long ln,
			 const struct iovec *r, unsigned long rn, unsigned long flags)
{
	return traced("process_vm_readv", pid, l, ln, r, rn, flags);
}

ssize_t process_vm_writev(pid_t pid, const struct iovec *l, unsigned long ln,
			  const struct iovec *r, unsigned long rn, unsigned long flags)
{
	return traced("process_vm_writev", pid, l, ln, r, rn, flags);
}

__attribute__((constructor)) static void init(void)
{
	if (getenv("CMA_TRACE"))
		recs = calloc(MAX_REC, sizeof(*recs));
}

/* Also callable by name (dlsym), for processes that leave through _exit(). */
void cma_trace_dump(void);

__attribute__((destructor)) void cma_trace_dump(void)
{
	const char *dir = getenv("CMA_TRACE");
	unsigned n = atomic_load(&nrec);
	char path[512];
	FILE *f;

	if (!recs || !dir || !n)
		return;
	if (atomic_exchange(&dumped, 1))
		return; /* once */
	if (n > MAX_REC)
		n = MAX_REC;
	snprintf(path, sizeof(path), "%s/cma.%d.tsv", dir, (int)getpid());
	f = fopen(path, "w");
	if (!f)
		return;
	for (unsigned i = 0; i < n; i++)
		fprintf(f, "%llu\t%llu\t%llu\t%d\t%d\t%d\t%d\t%d\n", (unsigned long long)recs[i].t0,
			(unsigned long long)recs[i].t1, (unsigned long long)recs[i].bytes, recs[i].tid,
			recs[i].cpu0, recs[i].cpu1, recs[i].nvcsw, recs[i].nivcsw);
	if (atomic_load(&dropped))
		fprintf(f, "# dropped %u\n", atomic_load(&dropped));
	fclose(f);
}
