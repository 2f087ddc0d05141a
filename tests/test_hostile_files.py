"""Hostile or damaged checkpoint files: FIFOs and devices are refused without blocking or reading
forever, JSON nested past the parser's depth names its file, shard headers are read at least as
strictly as safetensors' own reader, and non-finite weights are refused with the tensor named."""

from __future__ import annotations

import json
import os
import struct
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError, safe_open
from test_loader import SHARD, edit_shard

from mtp import MTPConfig
from mtp.loader import CheckpointError, load_model, load_state, plan
from mtp.shards import read_header

INDEX = "model.safetensors.index.json"
FILES = ["config.json", INDEX, SHARD(4)]


def finishes(fn, seconds=20.0):
    """Run ``fn`` in a thread; the exception it raised (the test fails if it blocks)."""
    out = {}

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 (handed back to the test)
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn} blocked for {seconds} s"
    return out.get("error")


# ---- only regular files ------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
@pytest.mark.parametrize("file", FILES)
def test_a_fifo_is_refused_without_blocking(folder, file):
    os.remove(os.path.join(folder, file))
    os.mkfifo(os.path.join(folder, file))  # open() for reading would wait for a writer
    error = finishes(lambda: load_model(folder, dtype=torch.float32))
    assert isinstance(error, CheckpointError), error
    assert f"{file}" in str(error) and "a FIFO (named pipe), not a regular file" in str(error)
    error = finishes(lambda: plan(folder))
    assert isinstance(error, CheckpointError) or not plan(folder).ok


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
@pytest.mark.parametrize("file", FILES)
def test_a_symlink_to_dev_zero_is_not_read(folder, file):
    os.remove(os.path.join(folder, file))
    os.symlink("/dev/zero", os.path.join(folder, file))  # reading it would never end
    error = finishes(lambda: load_model(folder, dtype=torch.float32))
    assert isinstance(error, CheckpointError), error
    assert "a character device, not a regular file" in str(error)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_config_from_pretrained_refuses_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "config.json")
    error = finishes(lambda: MTPConfig.from_pretrained(tmp_path))
    assert isinstance(error, CheckpointError) and "FIFO" in str(error)


# ---- JSON nested deeper than the parser goes --------------------------------------------
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("file", ["config.json", INDEX])
def test_deeply_nested_json_names_the_file(folder, file):
    path = os.path.join(folder, file)
    with open(path) as f:
        raw = json.load(f)
    text = json.dumps(raw)
    with open(path, "w") as f:
        f.write(text[:-1] + ', "deep": ' + DEEP + "}")
    with pytest.raises(CheckpointError, match=f"{file}: .* is nested too deeply"):
        load_model(folder, dtype=torch.float32)


def rewrite_shard(path, header_text=None, data=None, header_len=None):
    """Rewrite a shard's header text and/or data bytes as given (no checks)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        text, body = f.read(n).decode(), f.read()
    text = header_text(text) if header_text else text
    body = data(body) if data else body
    raw = text.encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", header_len or len(raw)) + raw + body)


def test_deeply_nested_header_names_the_file(folder):
    path = os.path.join(folder, SHARD(4))
    rewrite_shard(path, lambda t: t[:-1] + ', "deep": ' + DEEP + "}")
    with pytest.raises(CheckpointError, match=f"{SHARD(4)}: the header is nested too deeply"):
        load_model(folder, dtype=torch.float32)


# ---- headers: as strict as safetensors, and no duplicate keys ---------------------------
def first_key(text):
    return next(k for k in json.loads(text) if k != "__metadata__")


HEADER_DAMAGE = {
    "duplicate key": (lambda t: t.replace("{", "{" + json.dumps(first_key(t)) + ": "
                                          + json.dumps(json.loads(t)[first_key(t)]) + ", ", 1),
                      None, r"the header lists 'mtp.0.\S+' twice"),
    "trailing bytes": (None, lambda b: b + b"\0" * 16,
                       r"16 byte\(s\) after the last tensor belong to no tensor"),
    "a hole": (lambda t: json.dumps({k: (v if k == "__metadata__" else {
        **v, "data_offsets": [x + 8 for x in v["data_offsets"]]})
        for k, v in json.loads(t).items()}), lambda b: b"\0" * 8 + b,
        r"8 byte\(s\) before tensor \S+ belong to no tensor"),
    "non-string metadata": (lambda t: json.dumps({**json.loads(t), "__metadata__": {"v": 1}}),
                            None, "__metadata__ must map strings to strings"),
}


@pytest.mark.parametrize("case", HEADER_DAMAGE)
def test_damaged_headers_are_refused(folder, case):
    header, data, message = HEADER_DAMAGE[case]
    path = os.path.join(folder, SHARD(4))
    rewrite_shard(path, header, data)
    with pytest.raises(CheckpointError, match=message):
        load_model(folder, dtype=torch.float32)


@given(sizes=st.lists(st.integers(0, 6), min_size=1, max_size=4),
       gaps=st.lists(st.integers(-2, 2), min_size=4, max_size=4),
       trailing=st.integers(0, 3), reorder=st.booleans())
def test_header_verdicts_match_safetensors(tmp_path_factory, sizes, gaps, trailing, reorder):
    """Whatever layout of offsets, we refuse every file safetensors refuses (and accept the
    ones it accepts: we are not stricter about offsets than the format)."""
    header, at = {}, 0
    for k, (size, gap) in enumerate(zip(sizes, gaps)):
        begin = max(0, at + gap)
        header[f"t{k}"] = {"dtype": "U8", "shape": [size], "data_offsets": [begin, begin + size]}
        at = begin + size
    items = list(header.items())
    raw = json.dumps(dict(reversed(items) if reorder else items)).encode()
    path = tmp_path_factory.mktemp("h") / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\1" * (at + trailing))
    try:
        with safe_open(str(path), framework="pt"):
            theirs = True
    except SafetensorError:
        theirs = False
    try:
        read_header(str(path))
        ours = True
    except CheckpointError:
        ours = False
    assert ours == theirs, header


# ---- non-finite weights ------------------------------------------------------------------
def poke(name, value, view=None):
    def change(t):
        x = t[name].clone()
        flat = x.view(-1) if view is None else x.view(view).view(-1)
        flat[flat.numel() // 2] = value
        return {**t, name: x}
    return change


P = "mtp.0."
NON_FINITE = {
    "NaN norm (F32)": (P + "attn.q_norm.weight", float("nan"), None),
    "inf sink (F32)": (P + "attn.attn_sink", float("inf"), None),
    "FP8 0x7F": (P + "attn.wq_b.weight", 0x7F, torch.uint8),
    "FP8 0xFF": (P + "ffn.shared_experts.w2.weight", 0xFF, torch.uint8),
    "E8M0 0xFF": (P + "ffn.experts.3.w1.scale", 0xFF, torch.uint8),
}


@pytest.mark.parametrize("case", NON_FINITE)
def test_non_finite_weights_are_refused(folder, case):
    name, value, view = NON_FINITE[case]
    edit_shard(folder, SHARD(4), poke(name, value, view))
    with pytest.raises(CheckpointError, match=rf"{SHARD(4)}: tensor {name} .*holds NaN or "
                                              "infinite"):
        load_model(folder, dtype=torch.float32)
    with pytest.raises(CheckpointError, match=name):  # a bf16 model reads through a buffer
        load_model(folder, dtype=torch.bfloat16)


def test_non_finite_part_read_by_one_rank_is_refused(folder):
    edit_shard(folder, SHARD(4), poke(P + "attn.attn_sink", float("nan")))  # rows split by rank
    with pytest.raises(CheckpointError, match="attn_sink .*holds NaN"):
        load_state(folder, rank=1, world_size=2, dtype=torch.float32)


def test_non_finite_bf16_embedding_is_refused(folder):
    def change(t):
        x = t["embed.weight"].to(torch.bfloat16)
        x[5, 7] = float("-inf")
        return {**t, "embed.weight": x}
    edit_shard(folder, SHARD(1), change)
    with pytest.raises(CheckpointError, match="tensor embed.weight .*holds NaN or infinite BF16"):
        load_model(folder, dtype=torch.bfloat16)


@settings(max_examples=300)  # cheap; every dtype x sign x NaN/inf pattern gets drawn
@given(st.sampled_from(["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0"]),
       st.lists(st.integers(0, 255), min_size=8, max_size=64))
def test_bit_pattern_check_agrees_with_torch(dtype, raw):
    """The loader's bit-pattern test against torch's own conversion of every value."""
    from mtp.shards import DTYPES, _nonfinite

    dt = DTYPES[dtype]
    stored = torch.tensor(raw, dtype=torch.uint8)[: len(raw) // dt.itemsize * dt.itemsize]
    values = stored.view(dt).to(torch.float64)
    assert _nonfinite(stored.view(dt), dtype) == (not bool(torch.isfinite(values).all()))
