/*
 * mr.c -- memory registration on every domain of an engine.
 *
 * Registration modes (fi_mr(3)) honoured: FI_MR_LOCAL (the descriptor is
 * passed on every op), FI_MR_VIRT_ADDR (remote addresses are virtual
 * addresses; else offsets from 0), FI_MR_PROV_KEY (the provider picks keys;
 * else we request unique ones), FI_MR_ALLOCATED (only memory the caller
 * allocated is registered), FI_MR_HMEM (CUDA memory via FI_HMEM_CUDA).
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

void mr_close_fids(struct pplx_mr *mr)
{
	for (int d = 0; d < mr->n; d++) {
		if (mr->mr[d]) {
			fi_close(&mr->mr[d]->fid);
			mr->mr[d] = NULL;
		}
	}
}

/* Caller holds the engine lock (or the engine is single-threaded): refs only
 * change under it, so a plain decrement (no locked instruction per op). */
void mr_put(struct pplx_mr *mr)
{
	int left = atomic_load_explicit(&mr->refs, memory_order_relaxed) - 1;

	atomic_store_explicit(&mr->refs, left, memory_order_relaxed);
	if (left == 0) {
		mr_close_fids(mr);
		free(mr);
	}
}

int mr_reg_locked(struct pplx_engine *e, void *ptr, uint64_t len, int device, int device_id,
		  struct pplx_mr **out)
{
	struct pplx_mr *mr;
	int rc = 0;

	*out = NULL;
	if (!ptr || !len)
		return pplx_fail(PPLX_ERR_INVALID, "memory to register must be non-NULL and "
						   "non-empty (ptr %p, %lu bytes)",
				 ptr, (unsigned long)len);
	if (device != PPLX_DEVICE_HOST && device != PPLX_DEVICE_CUDA)
		return pplx_fail(PPLX_ERR_INVALID, "device must be PPLX_DEVICE_HOST or "
						   "PPLX_DEVICE_CUDA, got %d",
				 device);
	if (device == PPLX_DEVICE_CUDA && !e->has_hmem)
		return pplx_fail(PPLX_ERR_NO_HMEM,
				 "provider '%s' registers no device memory (this libfabric has no "
				 "FI_HMEM, or the engine was made without hmem): stage CUDA data "
				 "through pinned host memory (pplx.fabric.staging)",
				 e->provider);
	mr = calloc(1, sizeof(*mr));
	if (!mr)
		return pplx_fail(-FI_ENOMEM, "out of memory");
	mr->e = e;
	mr->ptr = ptr;
	mr->len = len;
	mr->n = e->n;
	atomic_store(&mr->refs, 1);
	for (int d = 0; d < e->n; d++) {
		struct iovec iov = {.iov_base = ptr, .iov_len = len};
		struct fi_mr_attr attr = {
			.mr_iov = &iov,
			.iov_count = 1,
			.access = FI_WRITE | FI_REMOTE_WRITE | FI_READ | FI_REMOTE_READ | FI_SEND |
				  FI_RECV,
			.requested_key = e->next_key++,
			.iface = device == PPLX_DEVICE_CUDA ? FI_HMEM_CUDA : FI_HMEM_SYSTEM,
		};

		if (device == PPLX_DEVICE_CUDA)
			attr.device.cuda = device_id;
		rc = fi_mr_regattr(e->dom[d].domain, &attr, 0, &mr->mr[d]);
		if (rc && device == PPLX_DEVICE_CUDA) {
			rc = pplx_fail(PPLX_ERR_NO_HMEM,
				       "fi_mr_regattr(%p, %lu bytes, FI_HMEM_CUDA) on domain %d: %s "
				       "(this libfabric claims FI_HMEM but was built without CUDA): "
				       "stage CUDA data through pinned host memory "
				       "(pplx.fabric.staging)",
				       ptr, (unsigned long)len, d, fi_strerror(-rc));
			goto err;
		}
		if (rc) {
			rc = pplx_fail(rc, "fi_mr_regattr(%p, %lu bytes) on domain %d: %s", ptr,
				       (unsigned long)len, d, fi_strerror(-rc));
			goto err;
		}
		mr->desc[d] = fi_mr_desc(mr->mr[d]);
		mr->key[d] = fi_mr_key(mr->mr[d]);
		if (mr->key[d] == FI_KEY_NOTAVAIL) {
			rc = pplx_fail(PPLX_ERR_NO_PROVIDER, "provider needs raw keys (FI_MR_RAW)");
			goto err;
		}
		mr->raddr[d] = (e->mr_mode & FI_MR_VIRT_ADDR) ? (uint64_t)(uintptr_t)ptr : 0;
	}
	mr->next = e->mrs;
	e->mrs = mr;
	*out = mr;
	return 0;
err:
	mr_close_fids(mr);
	free(mr);
	return rc;
}

int pplx_mr_reg(struct pplx_engine *e, void *ptr, uint64_t len, int device, int device_id,
		struct pplx_mr **out)
{
	int rc;

	*out = NULL;
	if (atomic_load(&e->closed))
		return pplx_fail(PPLX_ERR_CLOSED, "engine is closed");
	engine_lock(e);
	rc = mr_reg_locked(e, ptr, len, device, device_id, out);
	engine_unlock(e);
	return rc;
}

void pplx_mr_dereg(struct pplx_mr *mr)
{
	struct pplx_engine *e;

	if (!mr)
		return;
	e = mr->e;
	if (!e) { /* the engine closed it already */
		free(mr);
		return;
	}
	engine_lock(e);
	for (struct pplx_mr **p = &e->mrs; *p; p = &(*p)->next) {
		if (*p == mr) {
			*p = mr->next;
			break;
		}
	}
	mr->dead = true;
	mr_put(mr);
	engine_unlock(e);
}

int pplx_mr_remote(struct pplx_mr *mr, int domain, uint64_t *addr, uint64_t *key)
{
	if (domain < 0 || domain >= mr->n)
		return pplx_fail(PPLX_ERR_INVALID, "domain must be in [0, %d), got %d", mr->n,
				 domain);
	*addr = mr->raddr[domain];
	*key = mr->key[domain];
	return 0;
}
