/*
 * error.c -- return-code names and the per-thread detail of the last failure.
 *
 * The detail buffer is thread-local (like errno), so that a failure on the
 * progress thread or a proxy thread never clobbers the caller's message.
 */
#include <stdarg.h>
#include <stdio.h>
#include <time.h>

#include "internal.h"

static __thread char last_error[512];

int pplx_fail(int rc, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(last_error, sizeof(last_error), fmt, ap);
	va_end(ap);
	return rc;
}

const char *pplx_last_error(void) { return last_error; }

const char *pplx_strerror(int rc)
{
	switch (rc) {
	case PPLX_OK:
		return "success";
	case PPLX_ERR_NO_PROVIDER:
		return "libfabric provider not available";
	case PPLX_ERR_OUT_OF_BOUNDS:
		return "range out of bounds";
	case PPLX_ERR_BAD_DESCRIPTOR:
		return "malformed descriptor or address";
	case PPLX_ERR_CLOSED:
		return "engine closed or memory unregistered";
	case PPLX_ERR_TIMEOUT:
		return "timed out";
	case PPLX_ERR_NO_HMEM:
		return "device memory needs a libfabric with FI_HMEM";
	case PPLX_ERR_INVALID:
		return "invalid argument";
	case PPLX_ERR_AGAIN:
		return "resource busy, try again";
	case PPLX_ERR_MSG_SIZE:
		return "message larger than the slot size";
	case PPLX_ERR_FAILED:
		return "operation failed";
	case PPLX_ERR_PEER_DEAD:
		return "peer process exited";
	default:
		return fi_strerror(rc < 0 ? -rc : rc);
	}
}

uint64_t pplx_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}
