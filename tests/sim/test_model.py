"""Invariants of the latency model (pplx.sim) and its calibration on the published table."""

from __future__ import annotations

import numpy as np
import pytest

from pplx.sim import (
    DECODE,
    Workload,
    calibrate,
    combine_latency,
    cx7_cluster,
    describe,
    dispatch_latency,
    efa_cluster,
    make_routing,
    p2p_stream_GBps,
    p2p_write_us,
    routing_from_indices,
    sample_indices,
)


@pytest.fixture(scope="module")
def ep32():
    return make_routing("uniform", 32, 128, 256, 8, seed=1)


def test_counts_are_consistent():
    """Counts from indices: slots sum to T*K per rank; distinct tokens per rank <= slots and
    >= slots / K; a token counted once per rank even when two of its experts live there."""
    idx = sample_indices(4, 50, 16, 3, skew=1.0, seed=3)
    r = routing_from_indices(idx, 16)
    assert (r.expert_counts.sum(1) == 50 * 3).all()
    assert (r.slot_rows.sum(1) == 50 * 3).all()
    assert (r.rank_tokens <= r.slot_rows).all() and (r.rank_tokens * 3 >= r.slot_rows).all()
    one = routing_from_indices([np.array([[0, 1, 5]]), np.array([[8, 9, 10]])], 16)
    assert one.rank_tokens.tolist() == [[1, 0], [0, 1]]
    assert one.slot_rows.tolist() == [[3, 0], [0, 3]]
    for i in idx:  # K distinct experts per token
        assert all(len(set(row)) == 3 for row in i.tolist())


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="multiple of the number of ranks"):
        routing_from_indices([np.zeros((2, 2), np.int64)] * 3, 16)
    with pytest.raises(ValueError, match="outside"):
        routing_from_indices([np.array([[16, 0]])], 16)
    with pytest.raises(ValueError, match="nics_per_gpu"):
        cx7_cluster(nic_nics_per_gpu=0)
    with pytest.raises(ValueError, match="phase"):
        from pplx.sim import phase_latency

        phase_latency(cx7_cluster(), make_routing("uniform", 8, 4, 16, 2), DECODE, "gather")


@pytest.mark.parametrize("phase", ["dispatch", "combine"])
@pytest.mark.parametrize("make", [cx7_cluster, efa_cluster])
def test_monotonic_in_bytes(ep32, phase, make):
    """A wider hidden dimension (more bytes per row) never makes a call faster."""
    c = make()
    f = dispatch_latency if phase == "dispatch" else combine_latency
    times = [f(c, ep32, Workload(hidden_dim=h)).total_us for h in (1024, 2048, 4096, 7168, 16384)]
    assert all(b >= a for a, b in zip(times, times[1:])), times
    assert times[-1] > times[0]


@pytest.mark.parametrize("ep", [16, 64])
@pytest.mark.parametrize("make", [cx7_cluster, efa_cluster])
def test_more_nics_never_slower(ep, make):
    """Adding a NIC per GPU (same speed each) never increases modelled latency."""
    r = make_routing("uniform", ep, 128, 256, 8, seed=2)
    base = make()
    for w in (DECODE, Workload(num_tokens=1024)):
        prev = None
        for n in (1, 2, 3, 4):
            c = base.replace(nic_nics_per_gpu=n)
            t = dispatch_latency(c, r, w).total_us + combine_latency(c, r, w).total_us
            assert prev is None or t <= prev + 1e-9, (n, t, prev)
            prev = t


def test_private_buffer_never_hurts(ep32):
    """A larger private region never makes dispatch slower; with none at all every row
    waits for the counts."""
    ts = [
        dispatch_latency(efa_cluster(max_private_tokens=m), ep32).total_us
        for m in (0, 8, 16, 32, 64, 128)
    ]
    assert all(b <= a + 1e-9 for a, b in zip(ts, ts[1:])), ts
    assert ts[0] > ts[-1]
    assert dispatch_latency(efa_cluster(max_private_tokens=0), ep32).counts_wait_us > 0


def test_single_node_uses_no_nic():
    r = make_routing("uniform", 8, 128, 256, 8)
    a, b = dispatch_latency(cx7_cluster(), r), dispatch_latency(efa_cluster(), r)
    assert a.rdma_us == 0 and a.fabric_bytes == 0 and a.total_us == b.total_us


def test_p2p():
    """Bandwidth rises with message size to the achieved line rate; paging small pages
    costs bandwidth; one write's time grows with bytes."""
    for nic in (cx7_cluster().nic, efa_cluster().nic):
        sizes = [2**k for k in range(8, 31)]
        bw = [p2p_stream_GBps(nic, s) for s in sizes]
        assert all(b >= a - 1e-9 for a, b in zip(bw, bw[1:]))
        assert bw[-1] == pytest.approx(nic.bytes_per_us / 1e3)
        assert p2p_stream_GBps(nic, 1 << 20, num_pages=256) <= bw[sizes.index(1 << 20)]
        assert p2p_write_us(nic, 1 << 20) > p2p_write_us(nic, 1 << 10)


def test_every_parameter_has_a_source():
    for name, value, unit, kind, text in describe(efa_cluster()):
        assert kind in ("vendor", "measured", "fitted", "assumed") and text and unit, name
        assert value is not None


def test_presets_fit_the_published_table_within_20_percent():
    """The fitted presets reproduce every non-anomalous decode cell within 20%."""
    cells = [c for c in calibrate.load_decode_table() if c.system in ("efa", "cx7")]
    routings = calibrate.decode_routings([8, 16, 32, 64])
    pred = calibrate.predict({"cx7": cx7_cluster(), "efa": efa_cluster()}, cells, routings)
    for c, p in zip(cells, pred):
        if (c.ep, c.phase, c.system) in calibrate.ANOMALOUS:
            continue
        assert abs(p / c.published_us - 1) < 0.20, (c, p)


def test_refit_matches_presets():
    """Re-running the fit lands within 20% on every cell (and near the stored presets)."""
    f = calibrate.fit()
    err = f.errors()[[i for i, c in enumerate(f.cells) if c.system in ("efa", "cx7")]]
    assert np.abs(err).max() < 0.20


def test_node_dedup_sends_fewer_fabric_bytes_and_needs_node_counts():
    r = make_routing("uniform", 32, 128, 256, 8, seed=4)
    a = dispatch_latency(cx7_cluster(), r)
    b = dispatch_latency(cx7_cluster(dispatch_dedup="node", max_private_tokens=128), r)
    assert b.fabric_bytes < a.fabric_bytes
    # Node dedup never sends more rows than rank dedup, per source and node.
    assert (r.node_tokens * 1 <= r.rank_tokens.reshape(32, 4, 8).sum(2)).all()
    bare = routing_from_indices(sample_indices(32, 16, 256, 8), 256, ranks_per_node=3)
    assert bare.node_tokens is None
    with pytest.raises(ValueError, match="node dedup needs"):
        dispatch_latency(cx7_cluster(dispatch_dedup="node"), bare)


def test_private_overflow_counts():
    from pplx.sim.routing import private_overflow

    r = make_routing("uniform", 16, 128, 256, 8, seed=5)
    none = private_overflow(r, 8, 0)
    assert none.rows_overflowing == none.rows and none.row_fraction == 1.0
    assert private_overflow(r, 8, 128).rows_overflowing == 0
    mid = private_overflow(r, 8, 32)
    assert 0 < mid.rows_overflowing < mid.rows
    assert mid.rows == int(r.rank_tokens[:8, 8:].sum() + r.rank_tokens[8:, :8].sum())


def test_leave_one_ep_out_predicts_within_20_percent():
    """Fitting without one EP size still predicts that size's cells within 20%."""
    errs = calibrate.holdout()
    assert len(errs) == 16
    worst = max(errs, key=lambda e: abs(e[3]))
    assert abs(worst[3]) < 0.20, worst
