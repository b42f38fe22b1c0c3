/*
 * pplx_fabric.h -- the public C API of pplx's native layer over libfabric.
 *
 * The text between the CDEF markers is handed verbatim to cffi as its cdef
 * (native/build_ffi.py), so it stays in the subset cffi parses: plain
 * declarations, no macros with expressions, no includes.
 *
 * Every function returns 0 (or a non-negative value where stated) on success
 * and a negative errno-style code on failure.
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
/* CDEF END */

#ifdef __cplusplus
}
#endif

#endif /* PPLX_FABRIC_H */
