"""NVLink probe: how fast a GPU's SMs store rows into its peers' memory (all ranks at once,
the all-to-all pattern of dispatch and combine), against the copy engine; and how fast a
rank then reads the rows its peers just wrote (combine's receive sum).

    python -m pplx.bench nvlink --ranks 4                 # one process per GPU
    python -m pplx.bench nvlink --ranks 2 --cpu --quick   # CPU smoke run (interpreter)

Cases (rows `R` per destination, `W` bytes per row, every rank sends to every rank, itself
included, like combine's send; bytes and GB/s count remote rows only):
- `store`: `_store_rows` copies `[R, rows, W]` from a local tensor into slot `[me, row]` of
  each destination's area; impls `sm-w<warps>-p<programs>-<order>[-s<stages>]`: programs
  per launch, warps per program, the order of a program's items (`rr`: consecutive items
  go to consecutive destinations; `blk`: one destination after the other), and a software
  pipeline of the loads (`tl.range(num_stages=...)`). Baseline: the copy engine
  (`copy_` into each peer's mapped area, one stream per destination).
- `read`: `_sum_rows`, the shape of combine's receive: `out[t] = sum_d area[d, t]` in f32,
  bf16 out; `after-peer-write` after the peers' stores (a GPU all-reduce, then the aligned
  start's 2 ms sleep), `-nosleep` right after them (the all-reduce only, as in combine),
  `-table`: the area addressed through this rank's entry of the address table, as the MoE
  kernels do, not the local tensor's pointer; `again` the same read a second time,
  `after-local-write` after this rank rewrote the area itself; `-split<N>`: N programs per
  row instead of one. Baseline: `after-local-write`.

Every timed iteration starts like `pplx.bench moe` (all-reduce, GPU sleep, all-reduce) and
a row's time is the slowest rank's. The stored data is checked bit-exact against the source
after the store case (and the sums against torch) before anything is timed.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from pplx.bench.common import Row, emit, percentiles, rank_device
from pplx.bench.timing import PhaseTimer, slowest

DEFAULT_CSV = "experiments/results/moe/nvlink.csv"


class _Probe:
    def __init__(self, args, rank: int, world: int, device: torch.device):
        from pplx.moe.kernels.buffers import PeerBuffers

        self.args, self.rank, self.world, self.device = args, rank, world, device
        self.cuda = device.type == "cuda"
        # Imported here: TRITON_INTERPRET must be set before the kernels are decorated.
        from pplx.bench.nvlink_kernels import _store_rows, _sum_rows

        self.store_k, self.sum_k = _store_rows, _sum_rows
        self.n = args.rows
        self.words = args.row_bytes // 8
        nbytes = world * self.n * args.row_bytes
        self.bufs = PeerBuffers(nbytes, None, device)
        g = torch.Generator(device="cpu").manual_seed(1234 + rank)
        # Random bf16 values (finite, never all zero) as 8-byte words: the read case sums them.
        vals = torch.randn(world, self.n, args.row_bytes // 2, generator=g).to(torch.bfloat16)
        self.src = vals.view(torch.int64).to(device)
        self._zero = torch.zeros(1, device=device)
        self.timer = PhaseTimer(device, None)

    # -- helpers
    def sync_all(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
        dist.barrier()

    def time_it(self, fn, iters: int, warmup: int, before=None, late=False) -> list[float]:
        """Slowest rank's time of `fn` per iteration (the iteration start of
        `pplx.bench.moe`); `before` runs ahead of that start (the GPU sleep between), or
        right before `fn` with `late`."""
        out = []
        for i in range(iters + warmup):
            if before is not None and not late:
                before()
            self.timer.start_iteration()
            if before is not None and late:
                before()
            a = self.timer.mark()
            fn()
            b = self.timer.mark()
            self.timer.finish()
            if i >= warmup:
                out.append(self.timer.elapsed_us(a, b))
        return slowest({"t": out}, None)["t"]

    def store(self, warps: int, progs: int, rr: bool, stages: int):
        items = self.world * self.n
        per = -(-items // progs)
        grid = (-(-items // per),)
        block = min(1024, 1 << (self.words - 1).bit_length())
        self.store_k[grid](
            self.src, self.bufs.ptrs, self.rank, self.n, self.words, per,
            R=self.world, BLOCK=block, RR=rr, STAGES=stages, num_warps=warps,
        )  # fmt: skip

    def area_i64(self) -> torch.Tensor:
        return self.bufs.local.view(torch.int64).view(self.world, self.n, self.words)

    def check_store(self):
        """Every rank's area holds, in slot [s, n], row n that rank s sent to it."""
        self.bufs.local.fill_(0xA5)  # poison
        self.sync_all()
        self.store(4, 64, True, 1)
        self.sync_all()
        got = self.area_i64().clone()
        want = torch.empty_like(got)
        for s in range(self.world):
            t = self.src.clone()
            dist.broadcast(t, s)
            want[s] = t[self.rank]
        if not torch.equal(got, want):
            bad = (got != want).nonzero()
            raise AssertionError(
                f"rank {self.rank}: {len(bad)} words differ, first {bad[0].tolist()}"
            )
        self.sync_all()

    def copy_engine(self):
        """Baseline: the copy engine moves the same rows (one stream per destination)."""
        h = getattr(self.bufs, "handle", None)
        if h is None or not hasattr(h, "get_buffer"):
            return None
        views = [
            h.get_buffer(d, (self.world, self.n, self.words), torch.int64)
            for d in range(self.world)
        ]
        streams = [torch.cuda.Stream(self.device) for _ in range(self.world)]
        cur = torch.cuda.current_stream(self.device)

        def run():
            for j in range(self.world):
                d = (self.rank + j) % self.world
                s = streams[j]
                s.wait_stream(cur)
                with torch.cuda.stream(s):
                    views[d][self.rank].copy_(self.src[d], non_blocking=True)
            for s in streams:
                cur.wait_stream(s)

        return run


def _rank_main(rank: int, world: int, args) -> list[Row] | None:
    device = rank_device(rank, args.cpu)
    cuda = device.type == "cuda"
    pr = _Probe(args, rank, world, device)
    pr.check_store()
    if rank == 0:
        print(
            f"# rank 0 buffer: local tensor at {pr.bufs.local.data_ptr():#x}, "
            f"address table entry {int(pr.bufs.ptrs[rank]):#x}"
        )
    sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 4
    remote = (world - 1) * pr.n * args.row_bytes
    shape = f"R{world} rows{pr.n} W{args.row_bytes}"
    rows: list[Row] = []

    def row(case, impl, samples, base=None, nbytes=remote, note=""):
        p50, p20, p80 = percentiles(samples)
        r = Row(
            bench="nvlink", case=case, impl=impl, p50_us=p50, p20_us=p20, p80_us=p80,
            provider="nvlink" if cuda else "shm", ranks=world, shape=shape, bytes=nbytes,
            gbps_nvlink=nbytes / (p50 * 1e-6) / 1e9 if p50 > 0 else 0.0, notes=note,
        )  # fmt: skip
        if base is not None:
            r.baseline, r.ratio = base[0], base[1] / p50
        rows.append(r)
        return p50

    it, wu = args.iters, args.warmup
    base = None
    ce = pr.copy_engine() if cuda else None
    if ce is not None:
        base = ("copy-engine", row("store", "copy-engine", pr.time_it(ce, it, wu)))
    for spec in args.store:
        w, p, order, st = spec
        progs = p * sms
        impl = f"sm-w{w}-p{progs}-{order}" + (f"-s{st}" if st > 1 else "")
        fn = lambda w=w, progs=progs, order=order, st=st: pr.store(w, progs, order == "rr", st)  # noqa: E731
        row("store", impl, pr.time_it(fn, it, wu), base)

    # -- read after peer write: the area as bf16 [R, N, H]
    h = args.row_bytes // 2
    area = pr.bufs.local.view(torch.bfloat16).view(world, pr.n, h)
    out = torch.empty(pr.n, h, dtype=torch.bfloat16, device=device)

    def summ(split, via_table=False):
        pr.sum_k[(pr.n * split,)](
            area, out, pr.bufs.ptrs, rank, pr.n, h,
            R=world, BLOCK=2048, SPLIT=split, VIA_TABLE=via_table, num_warps=4,
        )  # fmt: skip

    def peer_write():
        pr.store(4, 2 * sms, True, 1)
        if cuda:
            dist.all_reduce(pr._zero)  # every rank's stores are done before the read

    pr.sync_all()
    peer_write()
    pr.sync_all()
    summ(1, True)
    pr.sync_all()
    want = area.float().sum(0).to(torch.bfloat16)
    if not torch.equal(out, want) and not torch.allclose(out.float(), want.float(), rtol=1e-2):
        raise AssertionError(f"rank {rank}: _sum_rows differs from torch")
    read_bytes = world * pr.n * args.row_bytes
    local_copy = area.clone()

    def local_write():
        area.copy_(local_copy)

    for split in args.splits:
        sfx = f"-split{split}" if split > 1 else ""
        b = row(
            "read",
            f"after-local-write{sfx}",
            pr.time_it(lambda s=split: summ(s), it, wu, local_write),
            nbytes=read_bytes,
        )
        row(
            "read",
            f"after-peer-write{sfx}",
            pr.time_it(lambda s=split: summ(s), it, wu, peer_write),
            ("after-local-write", b),
            read_bytes,
        )

        def twice(split=split):
            summ(split)

        def prime(split=split):
            peer_write()
            summ(split)

        row(
            "read",
            f"after-peer-write-nosleep{sfx}",
            pr.time_it(lambda s=split: summ(s), it, wu, peer_write, late=True),
            ("after-local-write", b),
            read_bytes,
        )
        row(
            "read",
            f"after-peer-write-nosleep-table{sfx}",
            pr.time_it(lambda s=split: summ(s, True), it, wu, peer_write, late=True),
            ("after-local-write", b),
            read_bytes,
        )
        row(
            "read",
            f"again{sfx}",
            pr.time_it(twice, it, wu, prime),
            ("after-local-write", b),
            read_bytes,
        )
    pr.sync_all()
    pr.bufs.close()
    return rows if rank == 0 else None


def _spawned(rank, world, args):
    return _rank_main(rank, world, args)


def _store_spec(s: str):
    # "W,P,ORDER[,STAGES]": warps, programs per SM, rr|blk, pipeline stages
    parts = s.split(",")
    if len(parts) not in (3, 4) or parts[2] not in ("rr", "blk"):
        raise argparse.ArgumentTypeError(f"want WARPS,PROGS_PER_SM,rr|blk[,STAGES], got {s!r}")
    w, p = int(parts[0]), int(parts[1])
    st = int(parts[3]) if len(parts) == 4 else 1
    if w not in (1, 2, 4, 8, 16) or p < 1 or st < 1:
        raise argparse.ArgumentTypeError(f"bad store spec {s!r}")
    return (w, p, parts[2], st)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m pplx.bench nvlink", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--ranks", type=int, default=None, help="spawn this many ranks")
    p.add_argument("--rows", type=int, default=128, help="rows per destination")
    p.add_argument("--row-bytes", type=int, default=14336, help="bytes per row (multiple of 16)")
    p.add_argument(
        "--store",
        type=_store_spec,
        action="append",
        help="store variant WARPS,PROGS_PER_SM,rr|blk[,STAGES] (repeat); default: a sweep",
    )
    p.add_argument("--splits", default="1,4", help="programs per row in the read case")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    p.add_argument("--cpu", action="store_true", help="force CPU (gloo, interpreter)")
    p.add_argument("--csv", default=DEFAULT_CSV, help="CSV to append to ('' for none)")
    a = p.parse_args(argv)
    if a.row_bytes % 16 or a.row_bytes <= 0:
        p.error(f"--row-bytes must be a positive multiple of 16, got {a.row_bytes}")
    if a.rows < 1:
        p.error(f"--rows must be >= 1, got {a.rows}")
    a.splits = [int(x) for x in a.splits.split(",") if x]
    if not torch.cuda.is_available():
        a.cpu = True
    if a.cpu:
        a.quick = True
    if a.quick:
        a.rows, a.row_bytes, a.iters, a.warmup = min(a.rows, 4), min(a.row_bytes, 256), 2, 1
    if not a.store:
        a.store = (
            [(4, 1, "rr", 1)]
            if a.quick
            else [(w, p, o, 1) for w in (4, 8) for p in (1, 2, 4) for o in ("rr", "blk")]
            + [(4, 2, "rr", 3), (8, 1, "rr", 3), (16, 1, "rr", 1)]
        )
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    from pplx.moe import testing as mt

    world = args.ranks or (torch.cuda.device_count() if not args.cpu else 2)
    backend = "gloo" if args.cpu else "nccl"
    rows = mt.spawn(_spawned, world, (args,), timeout_s=1200.0, backend=backend)[0]
    if rows is not None:
        emit(rows, args.csv or None)
    return 0
