#include "pplx_fabric.h"

#include <rdma/fabric.h>

int pplx_version(void) { return 100; }

uint32_t pplx_fabric_version(void) { return fi_version(); }
