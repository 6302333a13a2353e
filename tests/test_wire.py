import pickle

import pytest
import torch

from hsplitlora.wire import TensorSpec, WireError, decode, encode

SPECS = {"h": TensorSpec((2, None, 8)), "labels": TensorSpec((2, None), (torch.int64,))}


def _payload():
    gen = torch.Generator().manual_seed(0)
    return {"h": torch.randn(2, 5, 8, generator=gen) * 3, "labels": torch.arange(10).reshape(2, 5)}


@pytest.mark.parametrize("fmt, tol", [("fp32", 0.0), ("fp16", 2e-3), ("int8", 1 / 127)])
def test_round_trip_in_every_wire_format(fmt, tol):
    sent = _payload()
    got = decode(encode(sent, fmt), SPECS, max_bytes=10_000)
    assert got["h"].dtype == torch.float32 and torch.equal(got["labels"], sent["labels"])
    # Relative to each token's largest value (int8 scales are per token).
    err = (got["h"] - sent["h"]).abs() / sent["h"].abs().amax(-1, keepdim=True)
    assert float(err.max()) <= tol


def test_fp16_and_int8_are_smaller_than_fp32():
    sent = {"h": torch.randn(4, 128, 64)}
    sizes = {fmt: len(encode(sent, fmt)) for fmt in ("fp32", "fp16", "int8")}
    assert sizes["int8"] < sizes["fp16"] < sizes["fp32"]


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.update(h=torch.randn(3, 5, 8)), "shape 3x5x8 does not match 2x\\*x8"),
    (lambda p: p.update(h=p["h"].double()), "dtype torch.float64 not allowed"),
    (lambda p: p["h"].__setitem__((0, 0, 0), float("nan")), "NaN"),
    (lambda p: p["h"].__setitem__((0, 0, 0), float("inf")), "NaN or infinite"),
    (lambda p: p.pop("labels"), "missing: \\['labels'\\]"),
    (lambda p: p.update(extra=torch.zeros(1)), "unexpected: \\['extra'\\]"),
    (lambda p: p.update(labels=p["labels"].float()), "labels: dtype"),
])
def test_bad_tensors_are_refused_with_a_message(mutate, message):
    payload = _payload()
    mutate(payload)
    from safetensors.torch import save

    with pytest.raises(WireError, match=message):
        decode(save({k: v.contiguous() for k, v in payload.items()}), SPECS, max_bytes=10_000)


def test_oversize_and_garbage_and_pickle_are_refused():
    data = encode(_payload())
    with pytest.raises(WireError, match="over the limit"):
        decode(data, SPECS, max_bytes=len(data) - 1)
    with pytest.raises(WireError, match="not a valid safetensors"):
        decode(b"\x00" * 64, SPECS, max_bytes=10_000)
    with pytest.raises(WireError, match="not a valid safetensors"):
        decode(pickle.dumps(_payload()), SPECS, max_bytes=10_000_000)


def test_int8_without_a_scale_is_refused():
    from safetensors.torch import save

    payload = {"h": torch.zeros(2, 5, 8, dtype=torch.int8), "labels": torch.zeros(2, 5, dtype=torch.int64)}
    with pytest.raises(WireError, match="dtype torch.int8"):
        decode(save(payload), SPECS, max_bytes=10_000)
