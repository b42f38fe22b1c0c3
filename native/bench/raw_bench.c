/*
 * raw_bench.c -- the plain-libfabric baseline for `python -m pplx.bench fabric`.
 *
 * No pplx code: one FI_EP_RDM endpoint per process, fi_writedata with remote CQ
 * data, a single thread that progresses its own CQ. Two processes, a server
 * (the target) and a client (the initiator), swap endpoint names and memory
 * keys over a plain TCP socket on 127.0.0.1, then run up to three
 * measurements, in this order:
 *
 *   lat    8-byte write+imm ping-pong: client writes, server answers each
 *          arrival with a write+imm back; one-way = round trip / 2.
 *   bw     per message size: a rep is `n` writes (at most `window` in flight),
 *          the server counts n immediates, then acks with one 8-byte write+imm;
 *          the client times a rep from the first post to the ack. Write k goes
 *          from and to offset (k % slots) * size, slots = min(window,
 *          buf_bytes / size): the same memory footprint and pattern as the pplx
 *          side (pplx/bench/fabric.py checks that the two agree).
 *   paged  per page size: a rep is `num_pages` page writes, one fi_writedata
 *          per page (each with an immediate), from random source pages to
 *          random destination pages (a permutation, seeded), acked as in bw.
 *          All pages are posted at once (no window; -FI_EAGAIN: progress, retry),
 *          as pplx_write_paged does.
 *
 * The client prints one JSON object per line on stdout, e.g.
 *   {"kind":"lat","bytes":8,"samples_us":[...]}
 *   {"kind":"bw","bytes":1048576,"writes_per_rep":32,"window":16,"slots":16,
 *    "buf_bytes":67108864,"rep_us":[...]}
 *   {"kind":"paged","page_bytes":4096,"num_pages":256,"window":256,"slots":256,
 *    "buf_bytes":67108864,"rep_us":[...]}
 * The server prints {"event":"listening","port":P} once it accepts on P
 * (port 0 = the kernel picks), and {"event":"done"} at the end. Errors go to
 * stderr with a non-zero exit; every wait has a deadline (--timeout-s).
 *
 * --yield: sched_yield() whenever the CQ is empty, instead of spinning on.
 * --node N / --domain D pick the NIC as the engine does (fi_getinfo's node
 * with FI_SOURCE; e.g. --node 127.0.0.1 puts tcp on the loopback).
 *
 * Build: cc -std=gnu11 -O2 -Wall -Wextra -Werror raw_bench.c -o raw_bench -lfabric
 * (native/bench/Makefile; pplx/bench/fabric.py builds it on demand).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>

#define MAX_SIZES 64
#define MAX_NAME 256
#define CQ_BATCH 32
#define MR_KEY 0x5eedULL

struct opts {
	int server;
	const char *provider;
	const char *domain;
	const char *node;
	int port;
	int do_lat, do_bw, do_paged;
	int lat_iters, warmup, reps, window;
	size_t bw_sizes[MAX_SIZES];
	int num_bw_sizes;
	size_t page_sizes[MAX_SIZES];
	int num_page_sizes;
	int num_pages;
	size_t bytes_per_rep;
	uint64_t seed;
	double timeout_s;
	int yield;
};

struct ctx {
	struct fi_info *info;
	struct fid_fabric *fabric;
	struct fid_domain *domain;
	struct fid_av *av;
	struct fid_cq *cq;
	struct fid_ep *ep;
	struct fid_mr *mr;
	void *desc;
	char *buf;
	size_t buf_size;
	int virt_addr;
	fi_addr_t peer;
	uint64_t peer_base;
	uint64_t peer_key;
	uint64_t peer_size;
	uint64_t tx_posted, tx_done;
	uint64_t rx_imm;
	/* Immediates expected so far, cumulative: the peer may write before we leave a
	 * barrier (it progresses the CQ), so never snapshot rx_imm at the start of a step. */
	uint64_t rx_expected;
	int sock;
	int yield;
	double timeout_s;
};

struct wire {
	uint64_t name_len;
	char name[MAX_NAME];
	uint64_t base;
	uint64_t key;
	uint64_t size;
};

static double now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec * 1e-3;
}

#define CHECK(call)                                                                    \
	do {                                                                           \
		int rc_ = (int)(call);                                                 \
		if (rc_) {                                                             \
			fprintf(stderr, "raw_bench: %s failed: %d (%s)\n", #call, rc_,  \
				fi_strerror(-rc_));                                    \
			return rc_;                                                    \
		}                                                                      \
	} while (0)

static int fail(const char *what)
{
	fprintf(stderr, "raw_bench: %s\n", what);
	return -ETIMEDOUT;
}

/* Drain the CQ once: count our finished writes and the peer's immediates. */
static int poll_cq(struct ctx *c)
{
	struct fi_cq_data_entry e[CQ_BATCH];
	ssize_t n = fi_cq_read(c->cq, e, CQ_BATCH);
	if (n == -FI_EAGAIN) {
		/* Nothing yet. --yield: hand the core over (a machine with more busy threads
		 * than cores otherwise loses whole scheduler slices, 4 ms each here). */
		if (c->yield)
			sched_yield();
		return 0;
	}
	if (n == -FI_EAVAIL) {
		struct fi_cq_err_entry err;
		memset(&err, 0, sizeof(err));
		fi_cq_readerr(c->cq, &err, 0);
		fprintf(stderr, "raw_bench: completion error %d (%s), prov_errno %d\n", err.err,
			fi_strerror(err.err), err.prov_errno);
		return -err.err ? -err.err : -EIO;
	}
	if (n < 0) {
		fprintf(stderr, "raw_bench: fi_cq_read: %zd (%s)\n", n, fi_strerror((int)-n));
		return (int)n;
	}
	for (ssize_t i = 0; i < n; i++) {
		if (e[i].flags & FI_REMOTE_CQ_DATA)
			c->rx_imm++;
		else if (e[i].flags & FI_WRITE)
			c->tx_done++;
		else
			fprintf(stderr, "raw_bench: unexpected completion flags 0x%llx\n",
				(unsigned long long)e[i].flags);
	}
	return 0;
}

static int wait_rx(struct ctx *c, uint64_t target)
{
	double deadline = now_us() + c->timeout_s * 1e6;
	while (c->rx_imm < target) {
		int rc = poll_cq(c);
		if (rc)
			return rc;
		if (now_us() > deadline) {
			fprintf(stderr, "raw_bench: %llu of %llu immediates arrived\n",
				(unsigned long long)c->rx_imm, (unsigned long long)target);
			return fail("timed out waiting for immediates");
		}
	}
	return 0;
}

static int wait_tx(struct ctx *c, uint64_t max_outstanding)
{
	double deadline = now_us() + c->timeout_s * 1e6;
	while (c->tx_posted - c->tx_done > max_outstanding) {
		int rc = poll_cq(c);
		if (rc)
			return rc;
		if (now_us() > deadline)
			return fail("timed out waiting for write completions");
	}
	return 0;
}

/* One fi_writedata; on -FI_EAGAIN progress the CQ and try again (single thread). */
static int post_write(struct ctx *c, size_t len, size_t local_off, size_t remote_off,
		      uint64_t imm)
{
	uint64_t raddr = (c->virt_addr ? c->peer_base : 0) + remote_off;
	double deadline = now_us() + c->timeout_s * 1e6;
	if (remote_off + len > c->peer_size || local_off + len > c->buf_size)
		return fail("write out of bounds (bug in raw_bench)");
	for (;;) {
		ssize_t rc = fi_writedata(c->ep, c->buf + local_off, len, c->desc, imm, c->peer,
					  raddr, c->peer_key, NULL);
		if (rc == 0)
			break;
		if (rc != -FI_EAGAIN) {
			fprintf(stderr, "raw_bench: fi_writedata: %zd (%s)\n", rc,
				fi_strerror((int)-rc));
			return (int)rc;
		}
		int prc = poll_cq(c);
		if (prc)
			return prc;
		if (now_us() > deadline)
			return fail("timed out posting a write (-FI_EAGAIN)");
	}
	c->tx_posted++;
	return 0;
}

/* ---- control socket: the out-of-band exchange and barriers ---- */

static int sock_all(int fd, void *p, size_t n, int send_)
{
	char *b = p;
	while (n) {
		ssize_t k = send_ ? send(fd, b, n, MSG_NOSIGNAL) : recv(fd, b, n, 0);
		if (k <= 0) {
			if (k < 0 && errno == EINTR)
				continue;
			fprintf(stderr, "raw_bench: control socket %s failed\n",
				send_ ? "send" : "recv");
			return -EIO;
		}
		b += k;
		n -= (size_t)k;
	}
	return 0;
}

static int wait_readable(int fd, double timeout_s)
{
	struct pollfd p = {.fd = fd, .events = POLLIN};
	int r = poll(&p, 1, (int)(timeout_s * 1000));
	if (r <= 0)
		return fail("timed out on the control socket");
	return 0;
}

/* Barrier over the control socket; the CQ is progressed meanwhile (rxm needs it). */
static int barrier(struct ctx *c)
{
	char x = 'b';
	double deadline = now_us() + c->timeout_s * 1e6;
	CHECK(sock_all(c->sock, &x, 1, 1));
	for (;;) {
		struct pollfd p = {.fd = c->sock, .events = POLLIN};
		if (poll(&p, 1, 0) > 0)
			break;
		int rc = poll_cq(c);
		if (rc)
			return rc;
		if (now_us() > deadline)
			return fail("timed out in barrier");
	}
	return sock_all(c->sock, &x, 1, 0);
}

static int connect_control(struct ctx *c, const struct opts *o)
{
	struct sockaddr_in a;
	memset(&a, 0, sizeof(a));
	a.sin_family = AF_INET;
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	a.sin_port = htons((uint16_t)o->port);
	int one = 1;
	if (o->server) {
		int ls = socket(AF_INET, SOCK_STREAM, 0);
		socklen_t len = sizeof(a);
		if (ls < 0 || bind(ls, (struct sockaddr *)&a, sizeof(a)) ||
		    listen(ls, 1) || getsockname(ls, (struct sockaddr *)&a, &len)) {
			perror("raw_bench: listen");
			return -EIO;
		}
		printf("{\"event\":\"listening\",\"port\":%d}\n", ntohs(a.sin_port));
		fflush(stdout);
		if (wait_readable(ls, o->timeout_s))
			return -ETIMEDOUT;
		c->sock = accept(ls, NULL, NULL);
		close(ls);
	} else {
		c->sock = socket(AF_INET, SOCK_STREAM, 0);
		if (c->sock >= 0 && connect(c->sock, (struct sockaddr *)&a, sizeof(a))) {
			close(c->sock);
			c->sock = -1;
		}
	}
	if (c->sock < 0) {
		perror("raw_bench: control connection");
		return -EIO;
	}
	setsockopt(c->sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	return 0;
}

/* ---- libfabric set-up ---- */

static int setup_fabric(struct ctx *c, const struct opts *o)
{
	struct fi_info *hints = fi_allocinfo();
	if (!hints)
		return -ENOMEM;
	hints->ep_attr->type = FI_EP_RDM;
	hints->caps = FI_RMA | FI_WRITE | FI_REMOTE_WRITE;
	hints->mode = FI_CONTEXT;
	hints->domain_attr->mr_mode =
		FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY | FI_MR_ENDPOINT;
	hints->domain_attr->threading = FI_THREAD_DOMAIN;
	hints->fabric_attr->prov_name = strdup(o->provider);
	if (o->domain)
		hints->domain_attr->name = strdup(o->domain);
	int rc = fi_getinfo(FI_VERSION(1, 17), o->node, NULL, o->node ? FI_SOURCE : 0, hints,
			    &c->info);
	fi_freeinfo(hints);
	if (rc) {
		fprintf(stderr, "raw_bench: no provider '%s'%s%s: %d (%s)\n", o->provider,
			o->domain ? " on domain " : "", o->domain ? o->domain : "", rc,
			fi_strerror(-rc));
		return rc;
	}
	struct fi_info *fi = c->info;
	if (fi->domain_attr->cq_data_size < 4) {
		fprintf(stderr, "raw_bench: provider has %zu-byte CQ data, need 4\n",
			fi->domain_attr->cq_data_size);
		return -ENOTSUP;
	}
	c->virt_addr = (fi->domain_attr->mr_mode & FI_MR_VIRT_ADDR) != 0;

	CHECK(fi_fabric(fi->fabric_attr, &c->fabric, NULL));
	CHECK(fi_domain(c->fabric, fi, &c->domain, NULL));
	struct fi_cq_attr cq_attr = {.format = FI_CQ_FORMAT_DATA, .size = 1024};
	CHECK(fi_cq_open(c->domain, &cq_attr, &c->cq, NULL));
	struct fi_av_attr av_attr = {.type = FI_AV_TABLE, .count = 4};
	CHECK(fi_av_open(c->domain, &av_attr, &c->av, NULL));
	CHECK(fi_endpoint(c->domain, fi, &c->ep, NULL));
	CHECK(fi_ep_bind(c->ep, &c->av->fid, 0));
	CHECK(fi_ep_bind(c->ep, &c->cq->fid, FI_TRANSMIT | FI_RECV));
	CHECK(fi_enable(c->ep));

	if (posix_memalign((void **)&c->buf, 4096, c->buf_size))
		return -ENOMEM;
	for (size_t i = 0; i < c->buf_size; i++)
		c->buf[i] = (char)(i * 131 + (size_t)o->server);
	CHECK(fi_mr_reg(c->domain, c->buf, c->buf_size, FI_WRITE | FI_REMOTE_WRITE, 0, MR_KEY,
			0, &c->mr, NULL));
	if (fi->domain_attr->mr_mode & FI_MR_ENDPOINT) {
		CHECK(fi_mr_bind(c->mr, &c->ep->fid, 0));
		CHECK(fi_mr_enable(c->mr));
	}
	c->desc = fi_mr_desc(c->mr);
	return 0;
}

static int exchange(struct ctx *c)
{
	struct wire mine, theirs;
	memset(&mine, 0, sizeof(mine));
	size_t len = MAX_NAME;
	CHECK(fi_getname(&c->ep->fid, mine.name, &len));
	mine.name_len = len;
	mine.base = (uint64_t)(uintptr_t)c->buf;
	mine.key = fi_mr_key(c->mr);
	mine.size = c->buf_size;
	CHECK(sock_all(c->sock, &mine, sizeof(mine), 1));
	if (wait_readable(c->sock, c->timeout_s))
		return -ETIMEDOUT;
	CHECK(sock_all(c->sock, &theirs, sizeof(theirs), 0));
	c->peer_base = theirs.base;
	c->peer_key = theirs.key;
	c->peer_size = theirs.size;
	int n = fi_av_insert(c->av, theirs.name, 1, &c->peer, 0, NULL);
	if (n != 1) {
		fprintf(stderr, "raw_bench: fi_av_insert: %d\n", n);
		return -EIO;
	}
	return 0;
}

static void close_fid(struct fid *f)
{
	if (f)
		fi_close(f);
}

static void teardown(struct ctx *c)
{
	close_fid(c->mr ? &c->mr->fid : NULL);
	close_fid(c->ep ? &c->ep->fid : NULL);
	close_fid(c->av ? &c->av->fid : NULL);
	close_fid(c->cq ? &c->cq->fid : NULL);
	close_fid(c->domain ? &c->domain->fid : NULL);
	close_fid(c->fabric ? &c->fabric->fid : NULL);
	if (c->info)
		fi_freeinfo(c->info);
	free(c->buf);
	if (c->sock >= 0)
		close(c->sock);
}

/* ---- measurements ---- */

static void print_samples(const char *key, const double *v, int n)
{
	printf("\"%s\":[", key);
	for (int i = 0; i < n; i++)
		printf("%s%.4f", i ? "," : "", v[i]);
	printf("]");
}

static int run_lat(struct ctx *c, const struct opts *o)
{
	int total = o->warmup + o->lat_iters;
	double *s = calloc((size_t)o->lat_iters, sizeof(double));
	if (!s)
		return -ENOMEM;
	for (int i = 0; i < total; i++) {
		if (o->server) {
			CHECK(wait_rx(c, ++c->rx_expected));
			CHECK(post_write(c, 8, 0, 0, (uint64_t)i));
		} else {
			double t0 = now_us();
			CHECK(post_write(c, 8, 0, 0, (uint64_t)i));
			CHECK(wait_rx(c, ++c->rx_expected));
			double t1 = now_us();
			if (i >= o->warmup)
				s[i - o->warmup] = (t1 - t0) / 2;
		}
	}
	CHECK(wait_tx(c, 0));
	if (!o->server) {
		printf("{\"kind\":\"lat\",\"bytes\":8,");
		print_samples("samples_us", s, o->lat_iters);
		printf("}\n");
		fflush(stdout);
	}
	free(s);
	return barrier(c);
}

static int writes_per_rep(const struct opts *o, size_t size)
{
	size_t n = o->bytes_per_rep / size;
	if (n < 2)
		n = 2;
	if (n > 1024)
		n = 1024;
	return (int)n;
}

/*
 * One rep on each side. Client: post the writes described by (src_off[k],
 * dst_off[k], len), at most `window` in flight, then wait for the ack.
 * Server: wait for n immediates, then ack. Returns the client's time in us.
 */
static int run_rep(struct ctx *c, const struct opts *o, int n, int window, size_t len,
		   const size_t *src_off, const size_t *dst_off, double *out_us)
{
	if (o->server) {
		c->rx_expected += (uint64_t)n;
		CHECK(wait_rx(c, c->rx_expected));
		CHECK(post_write(c, 8, 0, 0, 0xacc));
		CHECK(wait_tx(c, 0));
		return 0;
	}
	double t0 = now_us();
	for (int k = 0; k < n; k++) {
		CHECK(wait_tx(c, (uint64_t)window - 1));
		CHECK(post_write(c, len, src_off[k], dst_off[k], (uint64_t)k));
	}
	CHECK(wait_rx(c, ++c->rx_expected));
	*out_us = now_us() - t0;
	return wait_tx(c, 0);
}

static int run_bw(struct ctx *c, const struct opts *o)
{
	double *s = calloc((size_t)o->reps, sizeof(double));
	size_t *off = calloc(1024, sizeof(size_t));
	if (!s || !off)
		return -ENOMEM;
	for (int si = 0; si < o->num_bw_sizes; si++) {
		size_t size = o->bw_sizes[si];
		int n = writes_per_rep(o, size);
		size_t slots = c->buf_size / size;
		if (slots > (size_t)o->window)
			slots = (size_t)o->window;
		for (int k = 0; k < n; k++)
			off[k] = ((size_t)k % slots) * size;
		for (int r = -o->warmup / 10 - 1; r < o->reps; r++) {
			double t = 0;
			CHECK(run_rep(c, o, n, o->window, size, off, off, &t));
			if (r >= 0)
				s[r] = t;
		}
		if (!o->server) {
			printf("{\"kind\":\"bw\",\"bytes\":%zu,\"writes_per_rep\":%d,\"window\":%d,"
			       "\"slots\":%zu,\"buf_bytes\":%zu,",
			       size, n, o->window, slots, c->buf_size);
			print_samples("rep_us", s, o->reps);
			printf("}\n");
			fflush(stdout);
		}
		CHECK(barrier(c));
	}
	free(off);
	free(s);
	return 0;
}

static uint64_t xorshift(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

static void permutation(size_t *p, int n, uint64_t *seed)
{
	for (int i = 0; i < n; i++)
		p[i] = (size_t)i;
	for (int i = n - 1; i > 0; i--) {
		size_t j = (size_t)(xorshift(seed) % (uint64_t)(i + 1));
		size_t t = p[i];
		p[i] = p[j];
		p[j] = t;
	}
}

static int run_paged(struct ctx *c, const struct opts *o)
{
	int n = o->num_pages;
	double *s = calloc((size_t)o->reps, sizeof(double));
	size_t *src = calloc((size_t)n, sizeof(size_t));
	size_t *dst = calloc((size_t)n, sizeof(size_t));
	uint64_t seed = o->seed ? o->seed : 1;
	if (!s || !src || !dst)
		return -ENOMEM;
	for (int pi = 0; pi < o->num_page_sizes; pi++) {
		size_t page = o->page_sizes[pi];
		permutation(src, n, &seed);
		permutation(dst, n, &seed);
		for (int k = 0; k < n; k++) {
			src[k] *= page;
			dst[k] *= page;
		}
		for (int r = -o->warmup / 10 - 1; r < o->reps; r++) {
			double t = 0;
			CHECK(run_rep(c, o, n, n, page, src, dst, &t));
			if (r >= 0)
				s[r] = t;
		}
		if (!o->server) {
			printf("{\"kind\":\"paged\",\"page_bytes\":%zu,\"num_pages\":%d,\"window\":%d,"
			       "\"slots\":%d,\"buf_bytes\":%zu,",
			       page, n, n, n, c->buf_size);
			print_samples("rep_us", s, o->reps);
			printf("}\n");
			fflush(stdout);
		}
		CHECK(barrier(c));
	}
	free(src);
	free(dst);
	free(s);
	return 0;
}

/* ---- command line ---- */

static int parse_sizes(const char *arg, size_t *out, int *num)
{
	char *copy = strdup(arg), *save = NULL;
	*num = 0;
	for (char *t = strtok_r(copy, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
		char *end;
		unsigned long long v = strtoull(t, &end, 10);
		if (*end == 'K' || *end == 'k')
			v <<= 10, end++;
		else if (*end == 'M' || *end == 'm')
			v <<= 20, end++;
		if (*end || v == 0 || *num == MAX_SIZES) {
			fprintf(stderr, "raw_bench: bad size '%s' (want e.g. 4096,64K,1M)\n", t);
			free(copy);
			return -EINVAL;
		}
		out[(*num)++] = (size_t)v;
	}
	free(copy);
	return 0;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: raw_bench --role server|client --provider shm|'tcp;ofi_rxm' [--domain lo]\n"
		"  [--node 127.0.0.1]\n"
		"  [--port P] [--tests lat,bw,paged] [--lat-iters N] [--warmup N] [--reps N]\n"
		"  [--window W] [--sizes 4K,1M,...] [--bytes-per-rep B] [--page-sizes 1K,...]\n"
		"  [--num-pages N] [--seed S] [--timeout-s T] [--yield]\n");
}

static int parse_args(int argc, char **argv, struct opts *o)
{
	static const struct option longopts[] = {
		{"role", 1, 0, 'r'},	   {"provider", 1, 0, 'p'},	 {"domain", 1, 0, 'd'},
		{"port", 1, 0, 'P'},	   {"tests", 1, 0, 't'},	 {"lat-iters", 1, 0, 'i'},
		{"warmup", 1, 0, 'w'},	   {"reps", 1, 0, 'n'},		 {"window", 1, 0, 'W'},
		{"sizes", 1, 0, 's'},	   {"bytes-per-rep", 1, 0, 'b'}, {"page-sizes", 1, 0, 'g'},
		{"num-pages", 1, 0, 'N'},  {"seed", 1, 0, 'S'},		 {"timeout-s", 1, 0, 'T'},
		{"yield", 0, 0, 'y'},	   {"node", 1, 0, 'o'},	   {"help", 0, 0, 'h'},		 {0, 0, 0, 0}};
	int role = -1, opt;
	memset(o, 0, sizeof(*o));
	o->provider = "shm";
	o->do_lat = o->do_bw = o->do_paged = 1;
	o->lat_iters = 10000;
	o->warmup = 100;
	o->reps = 10;
	o->window = 16;
	o->bytes_per_rep = 32u << 20;
	o->num_pages = 256;
	o->seed = 1;
	o->timeout_s = 60;
	parse_sizes("4K,16K,64K,256K,1M,4M,16M,64M", o->bw_sizes, &o->num_bw_sizes);
	parse_sizes("1K,4K,16K,64K", o->page_sizes, &o->num_page_sizes);
	while ((opt = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
		switch (opt) {
		case 'r':
			role = !strcmp(optarg, "server") ? 1 : !strcmp(optarg, "client") ? 0 : -1;
			break;
		case 'p': o->provider = optarg; break;
		case 'd': o->domain = optarg; break;
		case 'o': o->node = optarg; break;
		case 'y': o->yield = 1; break;
		case 'P': o->port = atoi(optarg); break;
		case 't':
			o->do_lat = strstr(optarg, "lat") != NULL;
			o->do_bw = strstr(optarg, "bw") != NULL;
			o->do_paged = strstr(optarg, "paged") != NULL;
			break;
		case 'i': o->lat_iters = atoi(optarg); break;
		case 'w': o->warmup = atoi(optarg); break;
		case 'n': o->reps = atoi(optarg); break;
		case 'W': o->window = atoi(optarg); break;
		case 's':
			if (parse_sizes(optarg, o->bw_sizes, &o->num_bw_sizes))
				return -EINVAL;
			break;
		case 'b': o->bytes_per_rep = strtoull(optarg, NULL, 10); break;
		case 'g':
			if (parse_sizes(optarg, o->page_sizes, &o->num_page_sizes))
				return -EINVAL;
			break;
		case 'N': o->num_pages = atoi(optarg); break;
		case 'S': o->seed = strtoull(optarg, NULL, 10); break;
		case 'T': o->timeout_s = atof(optarg); break;
		default: usage(); return -EINVAL;
		}
	}
	if (role < 0 || o->lat_iters < 1 || o->warmup < 0 || o->reps < 1 || o->window < 1 ||
	    o->num_pages < 1 || o->num_pages > 1024 || o->bytes_per_rep < 1 ||
	    o->timeout_s <= 0) {
		usage();
		return -EINVAL;
	}
	o->server = role;
	if (!o->server && o->port <= 0) {
		fprintf(stderr, "raw_bench: the client needs --port (the server's)\n");
		return -EINVAL;
	}
	return 0;
}

int main(int argc, char **argv)
{
	struct opts o;
	struct ctx c;
	int rc;
	if (parse_args(argc, argv, &o))
		return 2;
	memset(&c, 0, sizeof(c));
	c.sock = -1;
	c.timeout_s = o.timeout_s;
	c.yield = o.yield;
	/* Large enough for every bw message (window slots, at least one), and every page set. */
	c.buf_size = 4096;
	for (int i = 0; o.do_bw && i < o.num_bw_sizes; i++)
		if (o.bw_sizes[i] > c.buf_size)
			c.buf_size = o.bw_sizes[i];
	for (int i = 0; o.do_paged && i < o.num_page_sizes; i++)
		if (o.page_sizes[i] * (size_t)o.num_pages > c.buf_size)
			c.buf_size = o.page_sizes[i] * (size_t)o.num_pages;
	rc = connect_control(&c, &o);
	if (!rc)
		rc = setup_fabric(&c, &o);
	if (!rc)
		rc = exchange(&c);
	if (!rc)
		rc = barrier(&c);
	if (!rc && o.do_lat)
		rc = run_lat(&c, &o);
	if (!rc && o.do_bw)
		rc = run_bw(&c, &o);
	if (!rc && o.do_paged)
		rc = run_paged(&c, &o);
	if (!rc && o.server) {
		printf("{\"event\":\"done\",\"provider\":\"%s\"}\n", c.info->fabric_attr->prov_name);
		fflush(stdout);
	}
	teardown(&c);
	return rc ? 1 : 0;
}
