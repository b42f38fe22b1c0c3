"""CUDA tensors between two processes through the TransferEngine, staged through host memory.

Our libfabric (Debian/Ubuntu builds) has no FI_HMEM_CUDA (DESIGN.md, facts), so GPU data
crosses the fabric through a registered, pinned host mirror (`pplx.fabric.staging`):
device -> pinned host, RDMA write + imm, pinned host -> device on the receiver once the imm
count says the bytes are there. The same flow runs in CI on CPU tensors (an unpinned mirror),
and with `gpu` on the GPU machine on CUDA tensors; both check every element bit-exactly.
"""

from __future__ import annotations

import pytest
import torch

from pplx.fabric import HmemNotSupported, TransferEngine
from pplx.fabric.bootstrap import exchange_descriptors
from pplx.fabric.staging import StagedTensor, register_tensor_or_stage
from pplx.spawn import spawn

HAS_CUDA = torch.cuda.is_available()
needs_cuda = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU"),
]
TIMEOUT = 30.0

# Each shape says why it exists:
#   [128, 7168] bf16: a decode batch of DeepSeek-V3 hidden states (1.75 MiB, above the
#       engine's 1 MiB shard threshold);
#   [3, 1001] f32: odd byte count (12012) and a row length that is no power of two;
#   [1] uint8: one byte, the smallest write;
#   [4096, 7168] bf16 (56 MiB): a prefill batch, many pages of pinned memory (GPU only:
#       on CPU it adds nothing the smaller cases do not test, and costs CI seconds).
CASES = [
    ((128, 7168), torch.bfloat16),
    ((3, 1001), torch.float32),
    ((1,), torch.uint8),
    ((4096, 7168), torch.bfloat16),
]


def _data(rank: int, shape, dtype) -> torch.Tensor:
    """Fresh random data of `rank`, reproducible by the peer (drawn on CPU, then moved)."""
    g = torch.Generator().manual_seed(1234 + rank)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(0, 256, shape, generator=g).to(dtype)


def _poison(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (floats) or 0x7F so that unwritten elements show."""
    return t.fill_(float("nan") if t.dtype.is_floating_point else 0x7F)


def _cases(device: str):
    return CASES if device == "cuda" else CASES[:3]


def _exchange_worker(rank: int, world_size: int, device: str, provider: str) -> list[str]:
    """Both ranks send one tensor per case to the other and check what they received."""
    dev = torch.device(device, rank % torch.cuda.device_count()) if device == "cuda" else None
    dev = dev or torch.device("cpu")
    peer = 1 - rank
    report = []
    with TransferEngine(provider) as engine:
        for i, (shape, dtype) in enumerate(_cases(device)):
            send = StagedTensor(engine, _data(rank, shape, dtype).to(dev))
            recv = StagedTensor(engine, _poison(torch.empty(shape, dtype=dtype, device=dev)))
            _poison(recv.host)
            peer_recv = exchange_descriptors(recv.descriptor)[peer]
            imm = 100 + i
            send.to_host()
            req = engine.submit_write(send.mr, peer_recv, send.host.nbytes, imm=imm)
            engine.imm_counter(imm).wait(engine.num_shards(send.host.nbytes), timeout=TIMEOUT)
            req.wait(timeout=TIMEOUT)
            recv.to_device()
            want = _data(peer, shape, dtype).to(dev)
            assert recv.tensor.device == dev
            if not torch.equal(recv.tensor, want):
                bad = (recv.tensor.view(torch.uint8) != want.view(torch.uint8)).nonzero()
                raise AssertionError(
                    f"rank {rank} {dtype}{list(shape)} on {dev}: {bad.shape[0]} bytes differ, "
                    f"first at byte index {bad[0].tolist()}"
                )
            report.append(f"{dtype}{list(shape)}")
            send.close()
            recv.close()
    return report


# CPU in CI: shm only (tcp data paths are covered by tests/fabric's engine tests).
@pytest.mark.parametrize(
    "device, provider",
    [
        ("cpu", "shm"),
        pytest.param("cuda", "shm", marks=needs_cuda),
        pytest.param("cuda", "tcp", marks=needs_cuda),
    ],
)
def test_staged_exchange_two_processes(device, provider):
    want = [f"{d}{list(s)}" for s, d in _cases(device)]
    assert spawn(_exchange_worker, 2, (device, provider), timeout_s=180) == [want, want]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_registering_cuda_directly_raises_clear_error():
    x = torch.randn(1024, device="cuda")
    with TransferEngine("shm") as engine:
        # The default engine asks for no FI_HMEM: CUDA memory is refused, with the way out.
        with pytest.raises(HmemNotSupported, match="stage CUDA data through pinned host"):
            engine.register_tensor(x)
        mr, desc, staged = register_tensor_or_stage(engine, x)
        assert staged is not None and staged.host.is_pinned() and mr is staged.mr
        assert desc.nbytes == x.numel() * x.element_size()
        staged.close()
    with TransferEngine("shm", hmem=True) as engine:
        # With hmem asked for, a CUDA-enabled libfabric registers it; ours must refuse.
        try:
            mr, _ = engine.register_tensor(x)
        except HmemNotSupported:
            pass
        else:
            engine.unregister_memory(mr)


def test_register_tensor_or_stage_keeps_host_tensors_direct():
    x = torch.arange(4096, dtype=torch.uint8)
    with TransferEngine("shm") as engine:
        mr, desc, staged = register_tensor_or_stage(engine, x)
        assert staged is None and mr.ptr == x.data_ptr() and desc.nbytes == 4096
