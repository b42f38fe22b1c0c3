/*
 * pplx_fabric.h -- the public C API of pplx's native layer over libfabric.
 *
 * The text between the CDEF markers is handed verbatim to cffi as its cdef
 * (native/build_ffi.py), so it stays in the subset cffi parses: plain
 * declarations, enums with literal values, no macros, no includes.
 *
 * Model
 * -----
 * An engine owns N libfabric domains (one endpoint each; N NICs per GPU, or N
 * endpoints standing for N NICs on shm/tcp), a completion queue per domain, an
 * address vector per domain, and ONE progress thread that reads every CQ.
 *
 *  - Memory is registered on all N domains (pplx_mr_reg). Its descriptor is
 *    (base, length, per domain (remote address, key)) plus the owner's main
 *    address; Python serialises it (pplx.fabric.MrDescriptor). A peer imports
 *    a descriptor (pplx_rdesc_import), which inserts the owner into the
 *    address vectors on first use.
 *  - Writes go from a local region to a remote descriptor. Every remote range
 *    is bounds-checked against the descriptor before anything is posted.
 *  - Sender completion: each submission returns a request (pplx_req) whose
 *    counters (done / failed) the progress thread bumps per libfabric op.
 *    pplx_req_wait waits in C with a timeout (cffi releases the GIL). Done
 *    means the source may be reused, not that the data arrived (tcp
 *    completes at transmit): only the receiver's immediate count says that.
 *  - Receiver completion: a write may carry a 32-bit immediate. The progress
 *    thread counts arrivals per immediate in the ImmCounter table, an array of
 *    uint64_t indexed by imm (imm < imm_table_size) in page-aligned memory the
 *    CPU polls and that can be cudaHostRegister'ed for a GPU to poll.
 *    Completion never depends on delivery order (EFA is unordered): count.
 *  - Triggers: "when imm X has arrived N times, store V at address F".
 *
 * Progress: the progress thread spins spin_us after each event or submission,
 * then naps (sleep_us, doubling to 250 us). A *_wait call spins spin_us past
 * the engine's last progress (inflight_spin_us while its own writes are
 * outstanding) and drives progress itself meanwhile; the progress thread
 * steps aside while it does (and 1 ms after it succeeded), so a process has
 * one busy thread, not two; a waiter that gives up wakes it. Fault injection
 * (fault_window > 0) holds arriving immediates and releases them late and out
 * of order before they are counted, as EFA may deliver them.
 *
 * Providers: hints ask for FI_EP_RDM with FI_RMA and FI_MSG, FI_CONTEXT2,
 * mr_mode FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY
 * (what EFA requires; shm and tcp;ofi_rxm need less), and >= 4 bytes of CQ
 * data (EFA carries 4: immediates are 32 bits). Providers that need
 * FI_RX_CQ_DATA (posted receives for remote CQ data) or FI_MR_ENDPOINT are
 * not matched; verbs runs through ofi_rxm, which needs neither.
 *
 * Threading: every pplx_* call on an engine may be made from any thread
 * (Python threads, a C host-proxy thread): submissions take the engine lock,
 * try to post, and queue the op for the progress thread if libfabric says
 * -FI_EAGAIN. No call spins waiting for the network except the *_wait calls,
 * which take a timeout.
 *
 * Caveat (libfabric shm 1.17): engines of one process share the mapping of
 * a peer's region, so writing to an engine of the SAME process after it was
 * destroyed faults inside libfabric. Peers in other processes may die at any
 * time: writes to them fail or time out.
 *
 * Return codes: 0 (or a documented non-negative value) on success, else a
 * negative code: -errno / -FI_E* from libfabric, or one of enum pplx_status.
 * pplx_strerror(rc) names a code; pplx_last_error() gives the detail of the
 * last failure on the calling thread (e.g. which argument, which bound).
 */
#ifndef PPLX_FABRIC_H
#define PPLX_FABRIC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* CDEF BEGIN */
/* Version of this library, as major*10000 + minor*100 + patch. */
int pplx_version(void);
/* libfabric's runtime version (FI_VERSION(major, minor)). */
uint32_t pplx_fabric_version(void);

/* pplx-specific status codes; other negative codes are -errno / -FI_E*. */
enum pplx_status {
	PPLX_OK = 0,
	PPLX_ERR_NO_PROVIDER = -1001, /* provider absent or lacks a required feature */
	PPLX_ERR_OUT_OF_BOUNDS = -1002, /* range outside a region or descriptor */
	PPLX_ERR_BAD_DESCRIPTOR = -1003, /* malformed descriptor or address */
	PPLX_ERR_CLOSED = -1004, /* engine closed, or region unregistered */
	PPLX_ERR_TIMEOUT = -1005, /* a *_wait ran out of time */
	PPLX_ERR_NO_HMEM = -1006, /* device memory but no FI_HMEM support */
	PPLX_ERR_INVALID = -1007, /* bad argument (see pplx_last_error) */
	PPLX_ERR_AGAIN = -1008, /* resource busy (e.g. no free send slot) */
	PPLX_ERR_MSG_SIZE = -1009, /* message larger than the slot size */
	PPLX_ERR_FAILED = -1010, /* a request completed with failed ops */
	PPLX_ERR_PEER_DEAD = -1011 /* the peer's process exited (shm): ops to it fail */
};

/* Memory kinds for pplx_mr_reg. */
enum pplx_device {
	PPLX_DEVICE_HOST = 0,
	PPLX_DEVICE_CUDA = 1
};

/* Engine options. Fill with pplx_engine_config_init, then override. */
struct pplx_engine_config {
	/* "shm", "tcp" (= "tcp;ofi_rxm"), "efa", "verbs" (= "verbs;ofi_rxm"),
	 * or any libfabric provider string. */
	const char *provider;
	/* Source node for fi_getinfo (e.g. "127.0.0.1" for tcp), NULL = default. */
	const char *node;
	uint32_t num_domains; /* 1..16 */
	/* Nonzero: ask for FI_HMEM so that CUDA memory can be registered
	 * directly (needs a libfabric built with CUDA, e.g. AWS EFA's). */
	uint32_t hmem;
	uint32_t imm_table_size; /* entries of the ImmCounter table; imm < this */
	/* Single writes of at least this many bytes are split over all domains,
	 * one op (and one immediate) per domain. */
	uint64_t shard_threshold;
	/* Fault injection: hold up to fault_window arriving immediates, release
	 * each in random order after 0..fault_max_delay_us. 0 = off. */
	uint32_t fault_window;
	uint32_t fault_max_delay_us;
	uint64_t fault_seed;
	/* Two-sided messages: slot size in bytes, slots for sends, for recvs. */
	uint32_t msg_size;
	uint32_t num_send_slots;
	uint32_t num_recv_slots;
	/* Progress thread: spin this long after the last event or submission,
	 * then nap sleep_us, doubling per idle nap up to 250 us (0 = spin
	 * forever). Waiters spin this long too, driving progress themselves. */
	uint32_t spin_us;
	uint32_t sleep_us;
	/* Past spin_us, while this engine has writes or sends in flight or a
	 * thread waits on it, the progress thread keeps polling (yielding the
	 * core between polls) up to busy_poll_us after the last event before it
	 * naps: shm moves a large write when the target's progress copies it
	 * and completes it when the sender's progress reads the answer, so a
	 * nap on either side stalls the transfer. 0 (default) = nap right after
	 * spin_us (waiters spin and drive progress themselves meanwhile). */
	uint32_t busy_poll_us;
	/* While a waiter spins (it drives progress itself), and for aside_us
	 * after one succeeded, the progress thread naps aside_us at a time
	 * instead of polling. 0 = never step aside (the progress thread polls
	 * beside a spinning waiter and competes for the engine lock). */
	uint32_t aside_us;
	/* A waiter stops spinning after spin_us without progress, except while
	 * this engine's own writes or sends are outstanding (posted or queued):
	 * then it keeps spinning up to inflight_spin_us without progress (still
	 * yielding the core between polls after 20 us). Their completion is on
	 * its way (on shm it comes when the target's progress has copied a large
	 * write, 1-3 ms for 4-16 MiB here); a waiter that sleeps meanwhile is
	 * woken late (the progress thread naps by then) and the peer idles.
	 * 0 = spin_us always. Any thread's progress counts: a waiter keeps
	 * spinning while the progress thread moves data. */
	uint32_t inflight_spin_us;
};

/* Statistics, a snapshot (pplx_engine_stats). */
struct pplx_engine_stats {
	uint64_t ops_posted;
	uint64_t ops_completed;
	uint64_t ops_failed;
	uint64_t ops_queued; /* posts that met -FI_EAGAIN and were queued */
	uint64_t imms_received;
	uint64_t imms_dropped; /* imm >= imm_table_size (counted nowhere else) */
	uint64_t msgs_received;
	uint64_t cq_errors;
	uint64_t pending_now; /* ops queued, waiting to be posted */
	uint64_t inflight_now; /* ops posted, not completed */
	uint64_t peers_dead; /* peer processes seen exiting (shm) */
	uint64_t locks_recovered; /* shm region locks a dead process left held, released */
};

/* One destination of a scatter: len bytes from the source region at
 * src_offset to the remote descriptor rdesc at dst_offset. */
struct pplx_scatter_dst {
	struct pplx_rdesc *rdesc;
	uint64_t src_offset;
	uint64_t dst_offset;
	uint64_t len;
};

struct pplx_engine;
struct pplx_mr;
struct pplx_rdesc;
struct pplx_req;

/* Name of a return code, and the detail of the last failure on this thread. */
const char *pplx_strerror(int rc);
const char *pplx_last_error(void);

/* ---- engine ---- */
void pplx_engine_config_init(struct pplx_engine_config *cfg);
/* Open the domains and start the progress thread. */
int pplx_engine_create(const struct pplx_engine_config *cfg, struct pplx_engine **out);
/* Stop the progress thread, fail every queued / in-flight request with
 * PPLX_ERR_CLOSED, wake every waiter, close everything and free the engine.
 * Regions and descriptors of this engine become invalid (free them after). */
void pplx_engine_destroy(struct pplx_engine *e);
int pplx_engine_num_domains(struct pplx_engine *e);
/* The resolved libfabric provider name (e.g. "tcp;ofi_rxm"). */
const char *pplx_engine_provider(struct pplx_engine *e);
/* Nonzero if the provider registers device memory (FI_HMEM). */
int pplx_engine_has_hmem(struct pplx_engine *e);
/* How this engine watches peer processes: 0 not at all (not shm), 1 their
 * exit (ops to a dead peer fail), 2 that and releasing shm region locks a
 * dead peer left held (libfabric 1.17's shm layout recognised). */
int pplx_engine_peer_watch(struct pplx_engine *e);
/* Size in bytes of the engine's main address. */
int pplx_engine_address_len(struct pplx_engine *e);
/* Copy the main address (every domain's endpoint name) into buf; *len is
 * buf's capacity on entry and the address length on return. */
int pplx_engine_address(struct pplx_engine *e, uint8_t *buf, size_t *len);
int pplx_engine_stats(struct pplx_engine *e, struct pplx_engine_stats *out);
/* Number of ops (and immediates) a single write of len bytes turns into:
 * num_domains at or above shard_threshold, else 1. The receiver of such a
 * write expects this many arrivals of its immediate. */
int pplx_engine_num_shards(struct pplx_engine *e, uint64_t len);

/* ---- memory ---- */
/* Register [ptr, ptr+len) on every domain for local and remote writes.
 * device PPLX_DEVICE_CUDA needs FI_HMEM (else PPLX_ERR_NO_HMEM). */
int pplx_mr_reg(struct pplx_engine *e, void *ptr, uint64_t len, int device, int device_id,
		struct pplx_mr **out);
/* Unregister. Ops still in flight keep the registration alive until they
 * complete; new submissions from this region fail with PPLX_ERR_CLOSED. */
void pplx_mr_dereg(struct pplx_mr *mr);
/* The descriptor fields for domain d: remote address of the region's first
 * byte and the remote key. */
int pplx_mr_remote(struct pplx_mr *mr, int domain, uint64_t *addr, uint64_t *key);

/* Import a peer's descriptor: main_addr as from pplx_engine_address, the
 * region's base pointer and length at the owner, and per domain the remote
 * address and key (num_domains entries each; must equal this engine's).
 * Inserts the owner into the address vectors if it is new. */
int pplx_rdesc_import(struct pplx_engine *e, const uint8_t *main_addr, size_t main_addr_len,
		      uint64_t base, uint64_t len, uint32_t num_domains, const uint64_t *addrs,
		      const uint64_t *keys, struct pplx_rdesc **out);
void pplx_rdesc_free(struct pplx_rdesc *d);
/* Peer index (for pplx_send) of a main address; inserts the peer if new. */
int pplx_peer_import(struct pplx_engine *e, const uint8_t *main_addr, size_t main_addr_len);

/* ---- writes (each returns a new request in *req; release it) ---- */
/* has_imm: 0 or 1. Sharded over the domains when len >= shard_threshold. */
int pplx_write(struct pplx_engine *e, struct pplx_mr *src, uint64_t src_offset,
	       struct pplx_rdesc *dst, uint64_t dst_offset, uint64_t len, int has_imm, uint32_t imm,
	       struct pplx_req **req);
/* Pages: page i copies page_len bytes from
 * src_offset + src_idx[i] * src_stride to dst_offset + dst_idx[i] * dst_stride.
 * With an immediate, every page carries it (receiver expects num_pages). */
int pplx_write_paged(struct pplx_engine *e, struct pplx_mr *src, struct pplx_rdesc *dst,
		     uint32_t num_pages, const uint32_t *src_idx, const uint32_t *dst_idx,
		     uint64_t page_len, uint64_t src_stride, uint64_t src_offset,
		     uint64_t dst_stride, uint64_t dst_offset, int has_imm, uint32_t imm,
		     struct pplx_req **req);
/* One source region, num_dsts ranges to (possibly) different peers; with an
 * immediate, each destination receives it once. */
int pplx_write_scatter(struct pplx_engine *e, struct pplx_mr *src, uint32_t num_dsts,
		       const struct pplx_scatter_dst *dsts, int has_imm, uint32_t imm,
		       struct pplx_req **req);
/* Immediate only (a zero-byte write to the descriptor's first byte). */
int pplx_write_imm(struct pplx_engine *e, struct pplx_rdesc *dst, uint32_t imm,
		   struct pplx_req **req);
/* pplx_write_imm to each of num_dsts descriptors (one per peer). */
int pplx_barrier(struct pplx_engine *e, uint32_t num_dsts, struct pplx_rdesc *const *dsts,
		 uint32_t imm, struct pplx_req **req);

/* ---- two-sided messages (at most msg_size bytes) ---- */
/* Copy len bytes into a send slot and send to peer (pplx_peer_import).
 * PPLX_ERR_AGAIN when every send slot is busy. */
int pplx_send(struct pplx_engine *e, int peer, const void *buf, uint64_t len,
	      struct pplx_req **req);
/* Take the oldest received message: copy up to cap bytes into buf and return
 * its length (>= 0). Waits up to timeout_us for one (PPLX_ERR_TIMEOUT). */
int64_t pplx_recv(struct pplx_engine *e, void *buf, uint64_t cap, int64_t timeout_us);

/* ---- requests (sender completion) ---- */
/* Counters of ops: total (final once the submission returned), done, failed,
 * and the first error code of a failed op (0 if none). */
void pplx_req_counts(struct pplx_req *r, uint64_t *total, uint64_t *done, uint64_t *failed,
		     int *error);
/* Wait until every op completed: 0 if all succeeded, PPLX_ERR_FAILED if any
 * failed (see pplx_req_counts; PPLX_ERR_PEER_DEAD if the first failure was
 * that: on shm, a peer process that exits fails the ops to it, queued or in
 * flight, and every later one at once), PPLX_ERR_TIMEOUT after timeout_us
 * (< 0 = forever). Spins briefly, then sleeps on a condition variable. */
int pplx_req_wait(struct pplx_req *r, int64_t timeout_us);
/* Drop the caller's reference; in-flight ops keep theirs. */
void pplx_req_release(struct pplx_req *r);

/* ---- ImmCounter table (receiver completion) ---- */
/* Address and size in bytes of the table: imm_table_size uint64_t counters,
 * page-aligned, written only by the progress thread (atomic adds). */
int pplx_imm_table(struct pplx_engine *e, uint64_t **ptr, uint64_t *nbytes);
/* Arrivals of imm so far (negative on a bad imm). */
int64_t pplx_imm_count(struct pplx_engine *e, uint32_t imm);
/* Wait until imm has arrived at least n times; if consume, subtract n. */
int pplx_imm_wait(struct pplx_engine *e, uint32_t imm, uint64_t n, int consume,
		  int64_t timeout_us);
/* Subtract n from imm's count (n <= count, else PPLX_ERR_INVALID). */
int pplx_imm_consume(struct pplx_engine *e, uint32_t imm, uint64_t n);
/* When imm's count reaches n (now or later), store the 64-bit value at flag
 * (any host address: pinned/host-mapped memory a GPU polls, or a counter a
 * CPU thread polls) and, if consume, subtract n from the count. One trigger
 * per imm; a second one replaces the first. flag NULL clears the trigger. */
int pplx_imm_set_trigger(struct pplx_engine *e, uint32_t imm, uint64_t n, uint64_t *flag,
			 uint64_t value, int consume);
/* Wait until the 64-bit word at addr equals value (e.g. a trigger's flag),
 * waking on every completion of this engine; PPLX_ERR_TIMEOUT after
 * timeout_us (< 0 = forever). */
int pplx_wait_u64(struct pplx_engine *e, const uint64_t *addr, uint64_t value,
		  int64_t timeout_us);

/* ---- benchmarking ---- */
/* Ping-pong of iters writes of len bytes (len <= both regions) with
 * immediates, entirely in C: the initiator writes with imm_ping and waits
 * for one imm_pong (consuming it), storing round trip / 2 per iteration in
 * one_way_us[iters]; the responder (initiator = 0; one_way_us may be NULL)
 * waits for imm_ping and answers with imm_pong. Each wait has timeout_us. */
int pplx_bench_pingpong(struct pplx_engine *e, struct pplx_mr *src, struct pplx_rdesc *dst,
			uint32_t iters, uint64_t len, int initiator, uint32_t imm_ping,
			uint32_t imm_pong, int64_t timeout_us, double *one_way_us);
/* Streaming writes entirely in C, the pattern of the bandwidth benchmark:
 * per rep the initiator posts `writes` writes of len bytes with imm_data,
 * write k from and to offset (k % slots) * len, at most `window` in flight
 * (waiting for the oldest), then waits for one imm_ack (consumed) and stores
 * the rep's microseconds in rep_us[reps]. The responder (initiator = 0;
 * rep_us may be NULL) waits for writes * num_shards(len) imm_data arrivals
 * (consumed), then answers with an 8-byte write with imm_ack from offset 0 to
 * offset 0 and waits for its completion. Each wait has timeout_us. */
int pplx_bench_stream(struct pplx_engine *e, struct pplx_mr *src, struct pplx_rdesc *dst,
		      uint32_t reps, uint32_t writes, uint64_t len, uint32_t window,
		      uint32_t slots, int initiator, uint32_t imm_data, uint32_t imm_ack,
		      int64_t timeout_us, double *rep_us);
/* CDEF END */

#ifdef __cplusplus
}
#endif

#endif /* PPLX_FABRIC_H */
