"""Payloads from other peers are checked before any decoder sees them (swarm.compression.payloads).

The crafted 84-byte BLOCKWISE_8BIT payload below crashes hivemind's own decoder with SIGSEGV (shown
in a child process, so the suite survives it); through decode_payload it is refused. The fuzz test
sends thousands of random and mutated payloads of every codec through decode_payload in a child
process: it must end normally, every payload either decoded to the announced shape or refused.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from codec_checks import encode
from swarm.compression.payloads import PayloadError, decode_payload
from swarm.compression.registry import CODEC_NAMES, PER_TENSOR_CODEC_NAMES, make_codec, wire_codecs

CRAFTED = textwrap.dedent("""
    import numpy as np
    from hivemind.proto import runtime_pb2
    buffer = np.int64(0).tobytes() + np.int64(0).tobytes() + bytes(range(68))  # no block scales, no codebook
    payload = runtime_pb2.Tensor(compression=runtime_pb2.CompressionType.BLOCKWISE_8BIT, buffer=buffer,
                                 size=[68], dtype="float32")
""")


def run_child(code: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(120)
def test_a_crafted_blockwise_payload_crashes_hivemind_but_is_refused_by_swarm():
    raw = run_child(CRAFTED + "from hivemind.compression import deserialize_torch_tensor\n"
                              "deserialize_torch_tensor(payload)\n")
    assert raw.returncode == -11, f"hivemind's decoder no longer crashes on it: {raw.returncode} {raw.stderr[-300:]}"
    checked = run_child(CRAFTED + textwrap.dedent("""
        from swarm.compression.payloads import PayloadError, decode_payload
        try:
            decode_payload(payload, accepted={"NONE", "BLOCKWISE_8BIT"})
        except PayloadError as e:
            print("refused:", e)
    """))
    assert checked.returncode == 0 and "refused: 0 block scales and a codebook of 0" in checked.stdout, checked


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", PER_TENSOR_CODEC_NAMES)
def test_genuine_payloads_of_every_codec_decode(name):
    for shape in [(1,), (5000,), (64, 70), (3, 4, 4097)]:
        tensor = torch.randn(*shape)
        payload = encode(make_codec(name), tensor)
        decoded = decode_payload(payload, accepted=wire_codecs(name), numel=tensor.numel())
        assert decoded.shape == tensor.shape


def test_only_the_codecs_of_the_run_are_accepted():
    assert wire_codecs("none") == {"NONE"} and wire_codecs("powersgd") == {"NONE"}
    assert wire_codecs("adaptive") == {"NONE", "FLOAT16", "BLOCKWISE_8BIT"}
    assert all("NONE" in wire_codecs(name) for name in CODEC_NAMES)
    payload = encode(make_codec("uint8"), torch.randn(1000))
    with pytest.raises(PayloadError, match="codec UNIFORM_8BIT is not accepted"):
        decode_payload(payload, accepted=wire_codecs("blockwise8"))


@pytest.mark.parametrize("mutate, match", [
    (lambda p: p.size.__setitem__(0, 999), "values, expected"),
    (lambda p: setattr(p, "dtype", "object"), "dtype"),
    (lambda p: setattr(p, "buffer", p.buffer[:-1]), "bytes where codec"),
    (lambda p: setattr(p, "buffer", np.int64(2**40).tobytes() + p.buffer[8:]), "block scales"),
    (lambda p: setattr(p, "buffer", p.buffer[:8] + np.int64(3).tobytes() + p.buffer[16:]), "codebook of 3"),
])
def test_inconsistent_blockwise_payloads_are_refused(mutate, match):
    payload = encode(make_codec("blockwise8"), torch.randn(5000))
    mutate(payload)
    with pytest.raises(PayloadError, match=match):
        decode_payload(payload, accepted={"NONE", "BLOCKWISE_8BIT"}, numel=5000)


def test_a_quantized_index_beyond_its_codebook_is_refused():
    payload = encode(make_codec("uint8"), torch.randn(1000))
    codebook = int(np.frombuffer(payload.buffer, np.int64, count=1)[0])
    short = np.int64(codebook // 2).tobytes() + payload.buffer[8:8 + 4 * (codebook // 2)] + payload.buffer[8 + 4 * codebook:]
    payload.buffer = short
    with pytest.raises(PayloadError, match="index beyond the codebook"):
        decode_payload(payload, accepted={"UNIFORM_8BIT"}, numel=1000)


FUZZ = textwrap.dedent("""
    import random, sys
    import numpy as np, torch
    from hivemind.proto import runtime_pb2
    from swarm.compression.payloads import PayloadError, decode_payload
    from swarm.compression.registry import PER_TENSOR_CODEC_NAMES, make_codec
    from hivemind.compression import CompressionInfo

    rng = random.Random(int(sys.argv[1]))
    from swarm.compression.sparse import SPARSE_WIRE
    accepted = set(runtime_pb2.CompressionType.keys()) | {"SPARSE_LOWBIT"}
    genuine = []
    for name in PER_TENSOR_CODEC_NAMES:
        for shape in [(7,), (300,), (5000,), (20, 30)]:
            tensor = torch.randn(*shape)
            genuine.append(make_codec(name).compress(tensor, CompressionInfo.from_tensor(tensor)))

    def mutated():
        payload = runtime_pb2.Tensor()
        payload.CopyFrom(rng.choice(genuine))
        for _ in range(rng.randint(1, 3)):
            kind = rng.randrange(6)
            buffer = bytearray(payload.buffer)
            if kind == 0 and buffer:  # flip bytes, header included
                for _ in range(rng.randint(1, 8)):
                    buffer[rng.randrange(min(len(buffer), 64) if rng.random() < 0.7 else len(buffer))] = rng.randrange(256)
            elif kind == 1:  # cut or extend
                buffer = buffer[:rng.randrange(len(buffer) + 1)] if rng.random() < 0.5 else buffer + bytes(rng.randrange(64))
            elif kind == 2:  # another codec's name on this layout
                payload.compression = rng.choice([*runtime_pb2.CompressionType.values(), SPARSE_WIRE])
            elif kind == 3:  # another shape
                del payload.size[:]
                payload.size.extend(rng.choice([[], [0], [1], [rng.randrange(1, 10**6)], [2, rng.randrange(10**4)], [2**31, 2**31]]))
            elif kind == 4:
                payload.dtype = rng.choice(["float32", "float16", "bfloat16", "int64", "object", "V8", "<f8", "", "save"])
            else:  # a header claiming huge lengths
                if len(buffer) >= 16:
                    buffer[rng.choice([0, 8]):][:8] = np.int64(rng.choice([-1, 2**62, 2**31, 1, 255, 257])).tobytes()
            payload.buffer = bytes(buffer)
        return payload

    def random_payload():
        size = [rng.randrange(0, 300) for _ in range(rng.randint(0, 3))]
        return runtime_pb2.Tensor(compression=rng.choice([*runtime_pb2.CompressionType.values(), SPARSE_WIRE]),
                                  buffer=bytes(rng.randrange(256) for _ in range(rng.randrange(0, 600))),
                                  size=size, dtype=rng.choice(["float32", "float16", "int64", "bogus"]))

    counts = {"decoded": 0, "refused": 0}
    for index in range(int(sys.argv[2])):
        payload = mutated() if index % 3 else random_payload()
        try:
            tensor = decode_payload(payload, accepted=accepted)
        except PayloadError:
            counts["refused"] += 1
            continue
        assert tuple(tensor.shape) == tuple(payload.size), (tensor.shape, payload.size)
        counts["decoded"] += 1
    print(counts)
""")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", [1, 2])
def test_fuzzed_payloads_never_crash_the_decoder(seed):
    result = subprocess.run([sys.executable, "-c", FUZZ, str(seed), "3000"], capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    counts = eval(result.stdout.strip().splitlines()[-1])  # a dict printed by the child
    assert counts["refused"] > 1000 and counts["decoded"] > 50, counts
