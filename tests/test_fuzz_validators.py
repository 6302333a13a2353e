"""Property-based tests of the validators a stranger's input meets first: whatever arrives, they
answer with the error the server turns into a 4xx (ValueError / WireError), never anything else."""

import json
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hsplitlora.federation import protocol
from hsplitlora.wire import WireError, decode, encode

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children,
                                                                                       max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_registration_bodies_are_parsed_or_refused_with_a_value_error(body):
    try:
        profile, examples = protocol.parse_registration(body)
    except ValueError:
        return
    assert isinstance(profile, dict) and "memory_bytes" in profile
    assert type(examples) is int and 1 <= examples <= protocol.MAX_EXAMPLES


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=60), JSON.map(json.dumps)))
def test_importance_headers_are_scores_or_a_value_error(text):
    try:
        scores = protocol.decode_scores(text)
    except ValueError:
        return
    assert all(math.isfinite(v) and v >= 0 for v in scores.values())


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30))
def test_path_integers_are_bounded_or_a_value_error(text):
    try:
        value = protocol.bounded_int(text, "round")
    except ValueError:
        return
    assert 0 <= value < protocol.MAX_ROUND


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_a_wire_error_or_checked_tensors(data):
    try:
        tensors = decode(data, protocol.step_specs(8), 1 << 20)
    except WireError:
        return
    protocol.check_step(tensors, 4, 64, 258)  # may raise WireError too; nothing else


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**63), st.binary(max_size=64))
def test_a_corrupted_step_is_a_wire_error_or_decodes(where, noise):
    body = bytearray(encode({"h": torch.ones(1, 2, 8), "attention_mask": torch.ones(1, 2, dtype=torch.long),
                             "labels": torch.ones(1, 2, dtype=torch.long)}, "int8"))
    at = where % len(body)
    body[at:at + len(noise)] = noise
    try:
        tensors = decode(bytes(body), protocol.step_specs(8), 1 << 20)
    except WireError:
        return
    assert all(bool(torch.isfinite(t.float()).all()) for t in tensors.values())
