/*
 * native_smoke.c -- the C API end to end without Python, built with
 * AddressSanitizer + UBSan by tests/test_native_build.py: two engines (2
 * domains each, fault injection on) in one process; sharded writes, paged
 * writes, send/recv, a trigger, unregistering with ops in flight, and
 * destroy. Prints OK; ASan fails the run on any memory error or leak.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "pplx_fabric.h"
#define CK(x) do { int _r = (x); if (_r < 0) { printf("FAIL %s: %d %s\n", #x, _r, pplx_last_error()); return 1; } } while (0)
int main(int argc, char **argv) {
	struct pplx_engine_config cfg; pplx_engine_config_init(&cfg);
	cfg.provider = argc > 1 ? argv[1] : "shm"; cfg.num_domains = 2; cfg.shard_threshold = 4096;
	cfg.fault_window = 8; cfg.fault_max_delay_us = 100;
	if (argc > 1 && !strcmp(argv[1], "tcp")) cfg.node = "127.0.0.1";
	struct pplx_engine *a, *b; CK(pplx_engine_create(&cfg, &a)); CK(pplx_engine_create(&cfg, &b));
	size_t n = 1 << 20; char *src = malloc(n), *dst = calloc(1, n);
	for (size_t i = 0; i < n; i++) src[i] = (char)(i * 7 + 3);
	struct pplx_mr *ma, *mb; CK(pplx_mr_reg(a, src, n, 0, 0, &ma)); CK(pplx_mr_reg(b, dst, n, 0, 0, &mb));
	uint8_t addr[1024]; size_t alen = sizeof(addr); CK(pplx_engine_address(b, addr, &alen));
	uint64_t ra[2], rk[2]; for (int d = 0; d < 2; d++) CK(pplx_mr_remote(mb, d, &ra[d], &rk[d]));
	struct pplx_rdesc *rd; CK(pplx_rdesc_import(a, addr, alen, (uint64_t)(uintptr_t)dst, n, 2, ra, rk, &rd));
	struct pplx_req *r;
	for (int it = 0; it < 200; it++) {
		CK(pplx_write(a, ma, 3, rd, 5, 100000, 1, 7, &r)); CK(pplx_req_wait(r, 5000000)); pplx_req_release(r);
	}
	CK(pplx_imm_wait(b, 7, 400, 1, 5000000));
	if (memcmp(dst + 5, src + 3, 100000)) { printf("data mismatch\n"); return 1; }
	uint32_t si[3] = {0, 5, 9}, di[3] = {2, 1, 0};
	CK(pplx_write_paged(a, ma, rd, 3, si, di, 1000, 1024, 0, 1500, 0, 1, 8, &r)); CK(pplx_req_wait(r, 5000000)); pplx_req_release(r);
	CK(pplx_imm_wait(b, 8, 3, 0, 5000000));
	int peer = pplx_peer_import(a, addr, alen); CK(peer);
	CK(pplx_send(a, peer, "hello", 5, &r)); CK(pplx_req_wait(r, 5000000)); pplx_req_release(r);
	char buf[16]; int64_t got = pplx_recv(b, buf, sizeof(buf), 5000000); CK((int)got);
	if (got != 5 || memcmp(buf, "hello", 5)) { printf("msg mismatch\n"); return 1; }
	uint64_t flag = 0; CK(pplx_imm_set_trigger(b, 9, 50, &flag, 42, 1));
	for (int i = 0; i < 50; i++) { CK(pplx_write_imm(a, rd, 9, &r)); pplx_req_release(r); }
	CK(pplx_wait_u64(b, &flag, 42, 5000000));
	for (int i = 0; i < 100; i++) { CK(pplx_write(a, ma, 0, rd, 0, n, 1, 10, &r)); pplx_req_release(r); }
	CK(pplx_write(a, ma, 0, rd, 0, n, 1, 10, &r));
	pplx_mr_dereg(ma); /* in flight: kept alive by the ops */
	CK(pplx_req_wait(r, 5000000)); pplx_req_release(r);
	CK(pplx_imm_wait(b, 10, 101 * 2, 0, 5000000));
	pplx_engine_destroy(a);
	pplx_rdesc_free(rd);
	pplx_mr_dereg(mb); pplx_engine_destroy(b);
	free(src); free(dst);
	printf("OK\n"); return 0;
}
