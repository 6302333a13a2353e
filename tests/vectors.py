"""Shared test vectors of the server <-> device protocol: request and reply bodies as files.

`build_vectors()` builds every file of `hsplitlora/federation/vectors/` (name -> bytes) from the
protocol module (`hsplitlora.federation.protocol`) and the wire format (`hsplitlora.wire.encode`)
alone, with tensors drawn from one seeded `torch.Generator`: a device implementation in any
language tests its encoder, its parser and its update arithmetic against them, and
tests/test_vectors.py holds the server and the Python client to them (and the committed files to
this generator, so that they cannot drift from the protocol code).

    python tests/vectors.py --write   # (re)write hsplitlora/federation/vectors/
    python tests/vectors.py           # check that the committed files are what this builds
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: the repository root is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from hsplitlora.federation.protocol import (IGNORE_INDEX, VECTORS, Header, Route, Settings, Update, adapters_path,
                                            encode_scores, steps_path)
from hsplitlora.lora import Target
from hsplitlora.models import load_dims
from hsplitlora.wire import encode

MODEL = "tiny-llama"
SEED = 20240601
# The server the vectors assume: `hsplitlora server --model tiny-llama --local-steps 3 --batch-size 2
# --max-len 8 --wire fp16 --clients-per-round 2` (the rest at their defaults).
SETTINGS = Settings(model=MODEL, local_steps=3, batch_size=2, max_len=8, lr=1e-3, alpha=16.0, wire="fp16", seed=0)
SERVER = {"method": "hsplitlora", "clients_per_round": 2}
# A declared profile far above what the tiny model needs: the plan is the largest one the planner
# makes, and the same on every run (it does not depend on measurements).
REGISTRATION = {"profile": {"memory_bytes": 100_000_000}, "examples": 8}
BATCH, SEQ = 2, 8
START_RANKS = {Target(0, "q"): 4, Target(1, "v"): 2}  # of the start update
SCORES = {Target(0, "q"): 0.75, Target(1, "v"): 0.125, Target(2, "down"): 2.5}
MALFORMED_SCORES = {
    "not-json": "high",
    "not-an-object": '[["0.q", 0.75]]',
    "bad-target": '{"q0": 0.75}',
    "not-a-number": '{"0.q": "high"}',
    "not-finite": '{"0.q": NaN}',  # Python's json reads NaN; a NaN score would reach every plan
    "negative": '{"0.q": -1.0}',
}
SAFETENSORS_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64", torch.int8: "I8"}
TOKEN = "{token}"  # replaced by the registration reply's token
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OCTETS = {"Content-Type": "application/octet-stream"}


def dims():
    d = load_dims(MODEL)
    assert (d.hidden, d.vocab) == (32, 258), "the vectors are for tiny-llama's hidden 32 and vocab 258"
    return d


def step_tensors() -> dict[str, torch.Tensor]:
    """The valid split step every `step-<wire>` file encodes: batch 2 x seq 8, the second row
    right-padded by 2; labels -100 on the 3-token prompt and the padding, token ids on the completion."""
    gen = torch.Generator().manual_seed(SEED)
    d = dims()
    h = torch.randn(BATCH, SEQ, d.hidden, generator=gen)
    mask = torch.ones(BATCH, SEQ, dtype=torch.int64)
    mask[1, 6:] = 0
    labels = torch.randint(0, d.vocab, (BATCH, SEQ), generator=gen, dtype=torch.int64)
    labels[:, :3] = IGNORE_INDEX
    labels[mask == 0] = IGNORE_INDEX
    return {"h": h, "attention_mask": mask, "labels": labels}


def _dyadic(shape, gen: torch.Generator, denominator: int) -> torch.Tensor:
    """Small multiples of 1/denominator: B @ A of such factors is exact in fp32 whatever the order
    of summation, so that every implementation's dense change matches bit for bit."""
    return torch.randint(-8, 9, shape, generator=gen).float() / denominator


def update_tensors() -> tuple[Update, Update]:
    """(merge, start): a merge with stacked factors of 3 weights and one delta of a new block, and
    a start update at the ranks {0.q: 4, 1.v: 2}."""
    gen = torch.Generator().manual_seed(SEED + 1)
    d = dims()
    factors = {}
    for t, r in ((Target(0, "q"), 6), (Target(1, "v"), 3), (Target(0, "down"), 5)):
        d_in, d_out = d.weight_shape(t.proj)
        factors[t] = (_dyadic((r, d_in), gen, 8), _dyadic((d_out, r), gen, 16))
    d_in, d_out = d.weight_shape("k")
    merge = Update("merge", factors, {Target(2, "k"): _dyadic((d_out, d_in), gen, 64)})
    start = {}
    for t, r in START_RANKS.items():
        d_in, d_out = d.weight_shape(t.proj)
        start[t] = (torch.randn(r, d_in, generator=gen) * 0.1, torch.randn(d_out, r, generator=gen) * 0.01)
    return merge, Update("start", start)


def _describe(tensors: dict[str, torch.Tensor]) -> dict:
    return {k: {"dtype": SAFETENSORS_DTYPES[v.dtype], "shape": list(v.shape)} for k, v in sorted(tensors.items())}


def _on_wire(tensors: dict[str, torch.Tensor], wire: str) -> dict:
    """What `encode(tensors, wire)` writes, tensor by tensor (names, safetensors dtypes, shapes)."""
    out = {}
    for k, v in tensors.items():
        if not v.is_floating_point():
            out[k] = v
        elif wire == "int8":
            out[k], out[k + ".scale"] = v.to(torch.int8), torch.zeros(*v.shape[:-1], 1)
        else:
            out[k] = v.to(torch.float16 if wire == "fp16" else torch.float32)
    return _describe(out)


def _invalid_steps(good: dict[str, torch.Tensor], vocab: int, hidden: int) -> list[tuple[str, str, bytes, str, str]]:
    """(name, what is wrong, body, wire the body is in, expected substring of the error)."""
    gen = torch.Generator().manual_seed(SEED + 2)

    def variant(**changes):
        return {**{k: v.clone() for k, v in good.items()}, **changes}

    nan = variant()
    nan["h"][0, 1, 2] = float("nan")
    inf = variant()
    inf["h"][1, 2, 3] = float("inf")
    mask = variant()
    mask["attention_mask"][0, 4] = 2
    out_of_vocab = variant()
    out_of_vocab["labels"][0, 5] = vocab
    negative = variant()
    negative["labels"][0, 5] = -1
    nothing = variant(labels=torch.full((BATCH, SEQ), IGNORE_INDEX, dtype=torch.int64))
    nothing["labels"][:, 0] = 7  # a label on the first token is never learnt (nothing predicts it)
    int8_h = torch.randint(-127, 128, good["h"].shape, generator=gen).to(torch.int8)
    long = {"h": torch.randn(BATCH, SEQ + 1, hidden, generator=gen),
            "attention_mask": torch.ones(BATCH, SEQ + 1, dtype=torch.int64),
            "labels": torch.full((BATCH, SEQ + 1), 5, dtype=torch.int64)}
    wide = {"h": torch.randn(BATCH + 1, SEQ, hidden, generator=gen),
            "attention_mask": torch.ones(BATCH + 1, SEQ, dtype=torch.int64),
            "labels": torch.full((BATCH + 1, SEQ), 5, dtype=torch.int64)}
    return [
        ("step-nan", "a NaN in h", encode(nan, "fp16"), "fp16", "NaN"),
        ("step-inf", "an infinity in h (fp32 wire)", encode(inf, "fp32"), "fp32", "infinite"),
        ("step-wrong-hidden", f"h of hidden size {hidden + 1}, not {hidden}",
         encode(variant(h=torch.randn(BATCH, SEQ, hidden + 1, generator=gen)), "fp16"), "fp16", "h: shape"),
        ("step-mask-not-binary", "a 2 in attention_mask", encode(mask, "fp16"), "fp16", "only 0 and 1"),
        ("step-mask-float", "attention_mask as a float tensor (it must be int64)",
         encode(variant(attention_mask=good["attention_mask"].float()), "fp16"), "fp16", "attention_mask: dtype"),
        ("step-labels-out-of-vocab", f"a label {vocab} (the vocabulary is [0, {vocab}))",
         encode(out_of_vocab, "fp16"), "fp16", "token ids in [0,"),
        ("step-labels-negative", "a label -1 (only -100 is ignored)", encode(negative, "fp16"), "fp16",
         "token ids in [0,"),
        ("step-no-learnable-token", "labels all -100 but the first token's", encode(nothing, "fp16"), "fp16",
         "no token to learn"),
        ("step-mask-shape", "attention_mask one token shorter than h",
         encode(variant(attention_mask=good["attention_mask"][:, :-1].contiguous()), "fp16"), "fp16",
         "like h"),
        ("step-batch-too-large", f"batch {BATCH + 1} over the run's batch_size {BATCH}", encode(wide, "fp16"),
         "fp16", "outside"),
        ("step-seq-too-long", f"sequence {SEQ + 1} over the run's max_len {SEQ}", encode(long, "fp16"), "fp16",
         "outside"),
        ("step-missing-labels", "no labels tensor",
         encode({k: v for k, v in good.items() if k != "labels"}, "fp16"), "fp16", "missing: ['labels']"),
        ("step-extra-tensor", "an input_ids tensor besides the three",
         encode(variant(input_ids=good["labels"].clamp(min=0)), "fp16"), "fp16", "unexpected: ['input_ids']"),
        ("step-int8-without-scale", "h as int8 with no h.scale", encode(variant(h=int8_h), "fp16"), "fp16",
         "h: dtype"),
        ("step-int8-bad-scale", "h as int8 with an h.scale of the wrong shape",
         encode(variant(h=int8_h, **{"h.scale": torch.ones(BATCH, SEQ, 2)}), "fp32"), "fp32",
         "needs an fp32 scale"),
        ("step-garbage", "bytes that are not safetensors", b"these bytes are not safetensors\n", "", "safetensors"),
    ]


def _case(name, method, path, body, status, *, about, headers=None, auth=True, error=None, reply=None,
          **extra) -> dict:
    case = {"name": name, "about": about, "method": method, "path": path,
            "headers": {**(AUTH if auth else {}), **OCTETS, **(headers or {})}, "body": body, "status": status}
    if error is not None:
        case["error"] = error
    if reply is not None:
        case["reply"] = reply
    case.update(extra)
    return case


def _readme(index: dict) -> str:
    names = "\n".join(f"- `{c['name']}`: {c['about']} -> {c['status']}" for c in index["cases"])
    return f"""# Protocol test vectors

Generated by `tests/vectors.py` (do not edit by hand): request and reply bodies of the server <-> device
protocol (docs/protocol.md, `hsplitlora/federation/protocol.py`) for the model `{index['model']}`
(hidden {index['dims']['hidden']}, vocab {index['dims']['vocab']}), so that a device implementation in
any language (the Python SDK, a TypeScript one, ...) can be tested against the same bytes as the server.

## Files

- `index.json`: the server settings the vectors assume, the registration body, and every case in the
  order to send them: method, path (with query), headers, body file, expected status, for a 4xx the
  expected substring of the JSON `error`, for a 200 the reply tensors (names, safetensors dtypes,
  shapes). `{TOKEN}` in a header stands for the token of the registration reply.
- `step-fp16.safetensors`, `step-fp32.safetensors`, `step-int8.safetensors`: one valid split step in
  each wire format. `step-fp32` holds the exact tensors; the others are what encoding them in fp16 and
  in int8 (per-token scales `h.scale`) gives.
- `step-*.safetensors` (others) and `step-garbage.bin`: split steps the server must refuse with 400.
- `update-merge.safetensors`, `update-start.safetensors`: round updates as `GET /v1/rounds/{{R}}/update`
  sends them (fp32); `update-merge-dense.safetensors`: the dense change `B @ A` of each weight of the merge.
- `index.json` `importance`: an `X-Importance` header value, the scores it encodes, and malformed values
  the server refuses with 400 on an adapter upload.

## Using them from another implementation

1. Parser: decode every `.safetensors` file (8-byte little-endian header length, JSON header, data) and
   check the names, dtypes and shapes `index.json` lists (`body_tensors`, `update.*.tensors`).
2. Encoder: encode `step-fp32`'s tensors in each wire format and compare tensor by tensor (names,
   dtypes, shapes, values) with `step-fp16` and `step-int8`: fp16 is round-to-nearest-even; int8 is
   `scale = max|x| / 127` per row of the last dimension (1 where the row is all zeros), fp32, and
   `q = round_half_even(x / scale)` clamped to [-127, 127]. Byte equality is only required of the Python
   client (the JSON header's key order and padding may differ elsewhere).
3. Updates: compute `B @ A` in fp32 for each `<t>.A`/`<t>.B` pair of `update-merge` and compare with
   `update-merge-dense` exactly (the values are small dyadic numbers, so the products are exact whatever
   the order of summation). `index.json` `updates` says what a device does with each tensor.
4. Against a server started with `index.json`'s `server_command`: register with `registration`, then send
   the cases in order and check status, error and reply. Adapter-upload bodies depend on the plan the
   server answers, so they are not files: build them from the plan's ranks (`adapter_upload`).

## Cases

{names}

## Regenerating

    python tests/vectors.py --write   # rewrite this directory
    python tests/vectors.py           # check it (tests/test_vectors.py does too)

A change to the protocol or the wire format changes these files; review the diff like code.
"""


def build_vectors() -> dict[str, bytes]:
    """Every file of `hsplitlora/federation/vectors/`: name -> content."""
    d = dims()
    files: dict[str, bytes] = {}
    good = step_tensors()
    # dL/dh, in the server's wire format whatever the request's
    step_reply = {"tensors": _on_wire({"grad": good["h"]}, SETTINGS.wire), "metadata": {"wire": SETTINGS.wire},
                  "headers": {Header.RETRIED: "false"}, "number_headers": [Header.LOSS]}
    cases = []
    for step, wire in enumerate(("fp16", "fp32", "int8")):
        name = f"step-{wire}.safetensors"
        files[name] = encode(good, wire)
        cases.append(_case(f"step-{wire}", "POST", steps_path(1, step), name, 200, reply=step_reply,
                           about=f"a valid split step, {wire} wire (step {step} of round 1)",
                           body_tensors=_on_wire(good, wire)))
    cases.append(_case("step-retry", "POST", steps_path(1, 2), "step-int8.safetensors", 200,
                       about="the last step sent again (a retry): answered from the cache, not trained twice",
                       reply={**step_reply, "headers": {Header.RETRIED: "true"}, "same_as": "step-int8"}))
    for name, about, body, wire, error in _invalid_steps(good, d.vocab, d.hidden):
        file = f"{name}.bin" if not wire else f"{name}.safetensors"
        files[file] = body
        cases.append(_case(name, "POST", steps_path(1, 0), file, 400, about=about, error=error))
    cases += [
        _case("step-out-of-range", "POST", steps_path(1, SETTINGS.local_steps), "step-fp16.safetensors", 400,
              about=f"step {SETTINGS.local_steps}: outside [0, local_steps)", error="step must be in"),
        _case("step-missing-query", "POST", f"{Route.STEPS}?round=1", "step-fp16.safetensors", 400,
              about="no step query parameter", error="query parameter 'step'"),
        _case("step-wrong-round", "POST", steps_path(2, 0), "step-fp16.safetensors", 409,
              about="round 2 while round 1 is open", error="not the open round"),
        _case("step-bad-token", "POST", steps_path(1, 0), "step-fp16.safetensors", 401,
              about="a token the server never gave", headers={"Authorization": "Bearer not-a-token"},
              error="bearer token"),
        _case("step-no-token", "POST", steps_path(1, 0), "step-fp16.safetensors", 401,
              about="no Authorization header", auth=False, error="bearer token"),
    ]
    for label, value in MALFORMED_SCORES.items():
        cases.append(_case(f"upload-importance-{label}", "PUT", adapters_path(1), None, 400,
                           about=f"an adapter upload whose {Header.IMPORTANCE} is malformed ({label})",
                           headers={Header.IMPORTANCE: value}, error=f"{Header.IMPORTANCE} must be",
                           body_built="adapter_upload"))
    cases.append(_case("upload-ok", "PUT", adapters_path(1), None, 202,
                       about=f"the adapter upload with the valid {Header.IMPORTANCE} header",
                       headers={Header.IMPORTANCE: encode_scores(SCORES)}, body_built="adapter_upload",
                       reply={"json": {"round": 1, "accepted": True, "open_round": 1}}))

    merge, start = update_tensors()
    files["update-merge.safetensors"] = encode(merge.to_tensors(), "fp32")
    files["update-start.safetensors"] = encode(start.to_tensors(), "fp32")
    files["update-merge-dense.safetensors"] = encode({str(t): v for t, v in merge.dense().items()}, "fp32")
    index = {
        "about": "Test vectors of the hsplitlora server <-> device protocol; see README.md. Generated by "
                 "tests/vectors.py: do not edit.",
        "model": MODEL,
        "dims": {"hidden": d.hidden, "vocab": d.vocab, "layers": d.layers,
                 "weight_shapes": {p: list(d.weight_shape(p)) for p in d.projections}},
        "settings": SETTINGS.to_dict(),
        "server": SERVER,
        "server_command": (f"hsplitlora server --model {MODEL} --method {SERVER['method']} --local-steps "
                           f"{SETTINGS.local_steps} --batch-size {SETTINGS.batch_size} --max-len {SETTINGS.max_len} "
                           f"--wire {SETTINGS.wire} --clients-per-round {SERVER['clients_per_round']} "
                           f"--seed {SETTINGS.seed} --open-registration"),
        "registration": {"method": "POST", "path": Route.REGISTER, "json": REGISTRATION, "status": 200,
                         "reply_keys": ["client_id", "number", "token", "round", "plan", "settings"],
                         "reply_settings": SETTINGS.to_dict()},
        "order": "Send the cases in this order, as one client freshly registered with `registration` on a "
                 "fresh server: the valid steps train round 1's steps 0-2, `step-retry` repeats the last "
                 "one. A refused case (4xx) must change nothing: the same GET /v1/status before and after, "
                 "no step recorded.",
        "wire": {
            "container": "safetensors; __metadata__ {\"wire\": <format>}; integer tensors (mask, labels) "
                         "travel as they are (int64)",
            "fp16": "floating tensors as F16 (round to nearest even)",
            "fp32": "floating tensors as F32",
            "int8": "each floating tensor x as I8 q plus F32 '<name>.scale' of shape (..., 1): scale = max|x| "
                    "over the last dimension / 127 (1 where that is 0), q = round_half_even(x / scale) "
                    "clamped to [-127, 127]; the receiver reads q * scale",
        },
        "adapter_upload": {
            "how": "PUT /v1/rounds/{R}/adapters with an fp32 safetensors body holding, for every target "
                   "'<layer>.<proj>' -> r of the registration reply's plan.ranks, '<t>.A' (r, d_in) and '<t>.B' "
                   "(d_out, r) F32 with (d_in, d_out) = dims.weight_shapes[proj] "
                   "(protocol.adapter_specs(plan.ranks, dims.weight_shape)); any finite values. Not a file: "
                   "the body depends on the plan the server answers (the planner's, not the protocol's).",
            "content_type": "application/octet-stream",
        },
        "importance": {"scores": {str(t): v for t, v in SCORES.items()}, "header": encode_scores(SCORES),
                       "malformed": MALFORMED_SCORES},
        "updates": {
            "merge": {
                "file": "update-merge.safetensors", "header": {Header.UPDATE: "merge"},
                "tensors": _describe(merge.to_tensors()),
                "device": "for every '<t>.A' (R, d_in) and '<t>.B' (d_out, R) pair: add B @ A, computed in fp32 "
                          "(the scales are folded in), to the weight of target t; for every '<t>.delta' "
                          "(d_out, d_in): a block new to the device, whose weight becomes the base checkpoint's "
                          "plus delta (not a change of its current weight). Then restart the LoRA adapters.",
                "dense": "update-merge-dense.safetensors",
                "dense_tensors": _describe({str(t): v for t, v in merge.dense().items()}),
            },
            "start": {
                "file": "update-start.safetensors", "header": {Header.UPDATE: "start"},
                "tensors": _describe(start.to_tensors()),
                "device": "the weights do not change: set the device's LoRA tensors '<t>.A' and '<t>.B' to these "
                          "(the client's own ranks, unscaled; training still scales B @ A by alpha / r).",
                "ranks": {str(t): r for t, r in START_RANKS.items()},
            },
        },
        "cases": cases,
    }
    files["index.json"] = (json.dumps(index, indent=1) + "\n").encode()
    files["README.md"] = _readme(index).encode()
    return files


def compare(directory: Path = VECTORS) -> list[str]:
    """What differs between `directory` and `build_vectors()` (empty when they agree)."""
    want = build_vectors()
    have = {p.name for p in directory.iterdir() if p.is_file()} if directory.is_dir() else set()
    problems = [f"{name}: missing" for name in sorted(set(want) - have)]
    problems += [f"{name}: not built by tests/vectors.py" for name in sorted(have - set(want))]
    problems += [f"{name}: differs" for name in sorted(set(want) & have)
                 if (directory / name).read_bytes() != want[name]]
    return problems


def main(argv: list[str]) -> int:
    if argv == ["--write"]:
        VECTORS.mkdir(exist_ok=True)
        files = build_vectors()
        for name in {p.name for p in VECTORS.iterdir() if p.is_file()} - set(files):
            (VECTORS / name).unlink()
        for name, content in files.items():
            (VECTORS / name).write_bytes(content)
        print(f"wrote {len(files)} files ({sum(map(len, files.values()))} bytes) to {VECTORS}")
        return 0
    if argv:
        print("usage: python tests/vectors.py [--write]", file=sys.stderr)
        return 2
    problems = compare()
    for p in problems:
        print(p, file=sys.stderr)
    print("vectors up to date" if not problems else f"{len(problems)} problem(s): run python tests/vectors.py --write")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
