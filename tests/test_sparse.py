"""The sparse low-bit codec (swarm.compression.sparse): what it keeps, error feedback around it, hostile
payloads refused before decoding, and the all-reduce with robust aggregation over it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hivemind.proto import runtime_pb2

from codec_checks import encode, over_the_wire
from swarm.averaging.averager import make_aggregator
from swarm.compression.payloads import PayloadError, decode_payload
from swarm.compression.plan import CompressionPlan
from swarm.compression.registry import make_codec, wire_codecs
from swarm.compression.sparse import BITMAP, CHUNKED, SparseLowBit
from swarm.config.loading import load_config
from swarm.config.schema import RobustConfig
from swarm.errors import ConfigError
from test_robust_aggregation import local_group  # noqa: F401 (a fixture)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bits, bound", [(2, 0.2), (4, 0.04), (8, 0.003)])
def test_keeps_the_largest_values_at_their_positions(bits, bound):
    tensor = torch.randn(300, 700, generator=torch.Generator().manual_seed(5))
    payload = encode(SparseLowBit(fraction=0.02, bits=bits), tensor)
    decoded = over_the_wire(payload)
    kept = decoded.reshape(-1) != 0
    top = torch.topk(tensor.reshape(-1).abs(), 4200).indices
    assert int(kept.sum()) == 4200 and bool(kept[top].all())
    error = (decoded.reshape(-1)[top] - tensor.reshape(-1)[top]).norm() / tensor.reshape(-1)[top].norm()
    assert error <= bound, error
    assert payload.buffer[5] == CHUNKED and len(payload.buffer) < 4200 * (2 + bits / 8) + 4 * 4 + 8 * 17 + 8 + 1


@pytest.mark.timeout(30)
def test_positions_go_as_a_bitmap_once_that_is_smaller():
    tensor = torch.randn(10_000, generator=torch.Generator().manual_seed(6))
    payload = encode(SparseLowBit(fraction=0.1, bits=4), tensor)
    assert payload.buffer[5] == BITMAP and len(payload.buffer) == 8 + 8 * 4 + 1250 + 500
    assert int((over_the_wire(payload) != 0).sum()) == 1000
    assert encode(SparseLowBit(fraction=0.05, bits=4), tensor).buffer[5] == CHUNKED


@pytest.mark.timeout(30)
def test_error_feedback_sends_everything_eventually():
    """A fixed signal, 1 % a round: what was not sent stays in the residual, so the running sum of what was
    sent follows the running sum of the signal (the gap is the residual, bounded), and almost every value is sent."""
    signal = torch.randn(4096, generator=torch.Generator().manual_seed(7))
    plan = CompressionPlan(codec="sparse", sparse_fraction=0.01, sparse_bits=4)

    def one_peer(tensors, phase, choose_codec):
        decoded = [over_the_wire(encode(choose_codec(t), t)).view_as(t) for t in tensors]
        return decoded, decoded

    total_sent, ever_sent = torch.zeros(4096), torch.zeros(4096, dtype=torch.bool)
    for step in range(1, 401):
        [sent] = plan.average([signal], one_peer)
        total_sent += sent
        ever_sent |= sent != 0
        assert torch.allclose(step * signal - total_sent, plan.residuals.get(0), atol=1e-3)
    print(float(ever_sent.float().mean()), float((400 * signal - total_sent).norm() / (400 * signal).norm()))
    assert float(ever_sent.float().mean()) > 0.75  # measured 0.84: the smallest values can still be waiting
    assert float((400 * signal - total_sent).norm() / (400 * signal).norm()) < 0.25


@pytest.mark.timeout(30)
def test_sparse_is_a_diloco_only_codec_with_validated_settings():
    config = load_config(None, ["averaging.mode=diloco", "averaging.compression=sparse",
                                "averaging.sparse_fraction=0.02", "averaging.sparse_bits=2"], environ={})
    assert (config.averaging.sparse_fraction, config.averaging.sparse_bits) == (0.02, 2)
    for overrides, match in [(["averaging.compression=sparse"], "set averaging.mode: diloco"),
                             (["averaging.mode=diloco", "averaging.sparse_fraction=0"], "sparse_fraction"),
                             (["averaging.mode=diloco", "averaging.sparse_fraction=1.5"], "sparse_fraction"),
                             (["averaging.mode=diloco", "averaging.sparse_bits=3"], "sparse_bits")]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, overrides, environ={})
    with pytest.raises(ValueError, match="fraction"):
        make_codec("sparse", sparse_fraction=0)


def _chunked() -> runtime_pb2.Tensor:
    """Values 0..999, the last 5 kept (positions 995..999, CHUNKED): a small payload to break."""
    return encode(SparseLowBit(fraction=0.005, bits=4), torch.arange(1000, dtype=torch.float32))


def _set(payload: runtime_pb2.Tensor, offset: int, data: bytes) -> None:
    buffer = bytearray(payload.buffer)
    buffer[offset:offset + len(data)] = data
    payload.buffer = bytes(buffer)


# header 8 bytes, one block's scales at 8..16, one chunk count at 16..20, positions at 20..30, values at 30..33
HOSTILE = [
    (lambda p: _set(p, 0, np.uint32(1001).tobytes()), "keeps 1001 of 1000"),
    (lambda p: _set(p, 0, np.uint32(0).tobytes()), "keeps 0 of 1000"),
    (lambda p: _set(p, 0, np.uint32(2**31).tobytes()), "keeps"),
    (lambda p: _set(p, 4, bytes([3])), "3 bits"),
    (lambda p: _set(p, 5, bytes([7])), "index format 7"),
    (lambda p: setattr(p, "buffer", p.buffer[:-1]), "bytes where a sparse payload"),
    (lambda p: setattr(p, "buffer", p.buffer + b"\0"), "bytes where a sparse payload"),
    (lambda p: setattr(p, "buffer", p.buffer[:5]), "shorter than its header"),
    (lambda p: _set(p, 8, np.float32("nan").tobytes()), "not finite"),
    (lambda p: _set(p, 8, np.float32(1e9).tobytes()), "out of order"),
    (lambda p: _set(p, 8, np.float32(-1).tobytes()), "negative"),
    (lambda p: _set(p, 16, np.uint32(6).tobytes()), "add up to 6"),
    (lambda p: _set(p, 20 + 2 * 4, np.uint16(1000).tobytes()), "position 1000 beyond 1000"),
    (lambda p: _set(p, 20 + 2 * 4, np.uint16(60000).tobytes()), "beyond 1000"),
    (lambda p: _set(p, 20 + 2 * 1, np.uint16(995).tobytes()), "repeat or are out of order"),
    (lambda p: p.size.__setitem__(0, 999), "values, expected"),
    (lambda p: setattr(p, "dtype", "int64"), "dtype"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mutate, match", HOSTILE, ids=[match for _, match in HOSTILE])
def test_hostile_sparse_payloads_are_refused_before_decoding(mutate, match):
    payload = _chunked()
    assert torch.equal(decode_payload(payload, accepted=wire_codecs("sparse"), numel=1000).nonzero().reshape(-1),
                       torch.arange(995, 1000))
    assert payload.buffer[5] == CHUNKED
    mutate(payload)
    with pytest.raises(PayloadError, match=match):
        decode_payload(payload, accepted=wire_codecs("sparse"), numel=1000)


@pytest.mark.timeout(30)
def test_a_bitmap_marking_the_wrong_count_or_beyond_the_shape_is_refused():
    payload = encode(SparseLowBit(fraction=0.5, bits=2), torch.randn(20))  # bitmap: 3 bytes at 16..19
    assert payload.buffer[5] == BITMAP
    for byte, value in [(16, 0xFF), (18, 0xF0)]:  # one more position; positions 20..23 (beyond 20 values)
        broken = runtime_pb2.Tensor()
        broken.CopyFrom(payload)
        _set(broken, byte, bytes([value | broken.buffer[byte]]))
        with pytest.raises(PayloadError, match="bitmap marks"):
            decode_payload(broken, accepted=wire_codecs("sparse"), numel=20)
    with pytest.raises(PayloadError, match="not accepted"):
        decode_payload(payload, accepted=wire_codecs("blockwise8"))


@pytest.mark.timeout(120)
def test_allreduce_of_sparse_parts_with_centered_clip(local_group):  # noqa: F811
    """Four members, each part sparsified on its own (1 % of it), reduced by CenteredClip at each reducer,
    the result re-encoded with the union of the inputs' positions: members agree, the attacker (x1000) is
    clipped at every reducer, each honest member's residual is what it did not send, and each sends about
    (n - 1) x 1 % of its values to reducers plus its reduced part (up to n x 1 % of a part) to the others."""
    n, d = 4, 40_003
    group = local_group(n, codec="sparse")
    aggregators = [make_aggregator(RobustConfig()) for _ in range(n)]
    plans = [CompressionPlan(codec="sparse", sparse_fraction=0.01) for _ in range(n)]
    generator = torch.Generator().manual_seed(8)
    honest = [torch.randn(d, generator=generator) for _ in range(n - 1)]
    outcomes = group.run([[x] for x in honest + [honest[0] * 1000]], [1.0] * n, aggregators, plans)
    results = [averaged[0] for averaged, _ in outcomes]
    assert all(torch.equal(results[0], other) for other in results[1:]), "members disagree"
    assert torch.isfinite(results[0]).all() and 0 < int((results[0] != 0).sum()) <= n * int(0.01 * d + n)
    for index, (_, result) in enumerate(outcomes):
        assert list(result.clipped) == [n - 1] and result.contributors == n, (index, result.clipped)
        assert result.bytes_sent < 0.1 * d  # blockwise8 would send about 1.5 d bytes
    for plan, x, (_, result) in zip(plans, honest, outcomes):
        assert torch.allclose(plan.residuals.get(0), x - result.sent[0], atol=1e-5)
