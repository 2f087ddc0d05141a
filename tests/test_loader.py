"""The loader on real safetensors files written by the tests: every layout and weight format
round-trips bit-exactly (parameters and forward), shared tensors are not read, tensor-parallel
slices tile the full tensors, and each kind of bad checkpoint is refused before anything loads."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from mtp import DeepSeekV4MTP, Drafter, WeightFormat, remap
from mtp.checkpoint.header import read_header
from mtp.export import write_checkpoint
from mtp.loader import CheckpointError, load_model, load_state, plan
from mtp.testing import init_random_, write_release_like

BASE = WeightFormat(experts="fp8", expert_scale="f32")  # the -Base checkpoints
FORMATS = {"release": WeightFormat.released(), "base": BASE, "plain": WeightFormat.plain()}
# "release": a whole release's layout (placeholder main layers, 4 shards); "drafter": what
# write_checkpoint writes by default (the drafter's tensors, 3 shards)
LAYOUTS = {"release": dict(num_shards=4, main_layers=2), "drafter": {},
           "single": dict(layout="single"), "mp": dict(layout="mp", mp=2)}
SHARD = "model-{:05d}-of-00004.safetensors".format


_MODELS: dict = {}


def make(cfg=None, fmt=None, dtype=torch.float32, seed=0) -> DeepSeekV4MTP:
    """A seeded random tiny model, built once per arguments (loading never writes into it)."""
    cfg = cfg or tiny_config()
    key = (dataclasses.astuple(cfg), fmt, dtype, seed)
    if key not in _MODELS:
        _MODELS[key] = init_random_(DeepSeekV4MTP(cfg, weight_format=fmt, dtype=dtype), seed=seed)
    return _MODELS[key]


def write(model, folder, **kw) -> None:
    """write_checkpoint, or write_release_like where placeholder main layers are asked for."""
    (write_release_like if "main_layers" in kw else write_checkpoint)(model, folder, **kw)


def written(tmp_path, model, **kw) -> str:
    folder = tmp_path / "ckpt"
    write(model, folder, **kw)
    return str(folder)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8)


def assert_same_params(a: DeepSeekV4MTP, b: DeepSeekV4MTP, skip=()) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert set(pa) - set(skip) == set(pb) - set(skip)
    for name in set(pa) - set(skip):
        assert pa[name].dtype == pb[name].dtype, name
        assert torch.equal(as_bytes(pa[name]), as_bytes(pb[name])), name


def assert_same_forward(a: DeepSeekV4MTP, b: DeepSeekV4MTP) -> None:
    cfg = a.config
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (6,), generator=gen)
    h = torch.randn(6, cfg.hc_dim, generator=gen)
    out_a, out_b = a(ids, torch.arange(6), h), b(ids, torch.arange(6), h)
    assert torch.equal(out_a, out_b)  # bit-identical: same stored values, same code path
    assert torch.equal(a.compute_logits(out_a), b.compute_logits(out_b))


# ---- round trips -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_round_trip(tmp_path, layout, fmt, dtype):
    model = make(fmt=FORMATS[fmt], dtype=dtype)
    folder = written(tmp_path, model, **LAYOUTS[layout])
    loaded, report = load_model(folder, dtype=dtype)
    wo_a = "model.layers.2.mtp_block.attn.wo_a."
    if layout == "mp" and fmt != "plain":
        # the converter's files hold wo_a dequantised to BF16: same values, plain storage
        assert loaded.weight_format == WeightFormat(**{**FORMATS[fmt].__dict__, "wo_a": "plain"})
        assert_same_params(model, loaded, skip={wo_a + "weight", wo_a + "weight_scale_inv"})
        blk = "model.layers.2"
        assert torch.equal(model.model.layers["2"].mtp_block.attn.wo_a.dequantized(),
                           loaded.model.layers["2"].mtp_block.attn.wo_a.dequantized()), blk
    else:
        assert loaded.weight_format == FORMATS[fmt]
        assert_same_params(model, loaded)
    assert_same_forward(model, loaded)
    if layout == "release":
        assert report.shards_skipped == [SHARD(2)]  # a main-model layer only
        assert report.shards_opened == [SHARD(1), SHARD(3), SHARD(4)]
        # 6E + 39 under mtp.0, embed and head; plain weights have no scales (3E + 10 fewer)
        assert report.tensors == 6 * 8 + 39 + 2 - (3 * 8 + 10 if fmt == "plain" else 0)


def test_saved_state_dict_loads_back(tmp_path):
    cfg = tiny_config(num_nextn_predict_layers=2, mtp_compress_ratios=(0, 0))
    model = make(cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # lists the head twice
    assert "model.layers.3.shared_head.head.weight" in state
    folder = tmp_path / "sd"
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
    loaded, report = load_model(folder, dtype=torch.float32)
    assert_same_params(model, loaded)
    assert_same_forward(model, loaded)
    assert report.dropped == {"drop:self.head.alias": 1}


def test_plain_checkpoint_converts_to_the_compute_dtype(tmp_path):
    model = make(fmt=WeightFormat.plain(), dtype=torch.float32)
    loaded, _ = load_model(written(tmp_path, model), dtype=torch.bfloat16)
    blk = loaded.model.layers["2"].mtp_block
    assert blk.attn.wq_b.weight.dtype == torch.bfloat16
    assert torch.equal(blk.attn.wq_b.weight,
                       model.model.layers["2"].mtp_block.attn.wq_b.weight.to(torch.bfloat16))
    assert blk.attn_norm.weight.dtype == torch.float32  # the module keeps norms in float32
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16


def test_shared_embedding_and_head_are_not_read(folder):
    model = make()
    embed = torch.randn(1024, 256)
    head = torch.randn(1024, 256)
    loaded, report = load_model(folder, dtype=torch.float32, embed_tokens=embed, head=head)
    assert report.shards_opened == [SHARD(4)]  # shards 1 and 3 only hold main-model tensors
    assert loaded.model.embed_tokens.weight.data_ptr() == embed.data_ptr()
    assert loaded.layer(0).shared_head.head.weight.data_ptr() == head.data_ptr()
    assert_same_params(model, loaded, skip={"model.embed_tokens.weight",
                                            "model.layers.2.shared_head.head.weight"})
    _, report = load_model(folder, dtype=torch.float32, embed_tokens=embed)
    assert report.shards_opened == [SHARD(3), SHARD(4)]
    assert plan(folder, embed_tokens_given=True, head_given=True).shards_read == [SHARD(4)]


def test_an_mtp_copy_of_the_head_wins(folder):
    copy = torch.randn(1024, 256)
    edit_shard(folder, SHARD(4), lambda t: {**t, "mtp.0.head.weight": copy})
    loaded, report = load_model(folder, dtype=torch.float32)
    assert torch.equal(loaded.layer(0).shared_head.head.weight, copy)
    assert report.dropped["superseded:head"] == 1


def test_unlisted_main_model_tensors_are_accounted_for(folder):
    edit_shard(folder, SHARD(4), with_(layers__0__ffn_norm__weight=torch.ones(256)),
               index_change=lambda wm: wm.pop("layers.0.ffn_norm.weight"))
    _, report = load_model(folder, dtype=torch.float32)
    assert report.dropped["drop:main.layer"] == 3  # two listed, one found in an opened shard


def test_progress_callback(folder):
    calls = []
    _, report = load_model(folder, dtype=torch.float32,
                           progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (report.bytes, report.bytes)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


@settings(max_examples=10)
@given(st.integers(1, 4), st.integers(0, 3), st.booleans(), st.booleans())
def test_opens_exactly_the_shards_with_needed_tensors(tmp_path_factory, main_layers, extra,
                                                      embed_given, head_given):
    cfg = tiny_config(num_hidden_layers=4)
    model = make(cfg)
    folder = tmp_path_factory.mktemp("ckpt")
    n = 3 + min(extra, main_layers - 1)
    write_release_like(model, folder, num_shards=n, main_layers=main_layers, overwrite=True)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    wanted = {f for name, f in index.items() if name.startswith("mtp.")
              or (name == "embed.weight" and not embed_given)
              or (name == "head.weight" and not head_given)}
    embed = torch.zeros(1024, 256) if embed_given else None
    head = torch.zeros(1024, 256) if head_given else None
    loaded, report = load_model(folder, dtype=torch.float32, embed_tokens=embed, head=head)
    assert report.shards_opened == sorted(wanted)
    assert report.shards_skipped == sorted(set(index.values()) - wanted)
    skip = {"model.embed_tokens.weight"} if embed_given else set()
    skip |= {"model.layers.4.shared_head.head.weight"} if head_given else set()
    assert_same_params(model, loaded, skip=skip)


# ---- tensor-parallel slices ------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["release", "mp"])
def test_rank_slices_tile_the_full_tensors(tmp_path, layout):
    cfg = tiny_config(o_groups=4)  # 4 heads, 4 groups, 8 experts: up to 4 ranks
    model = make(cfg)
    folder = written(tmp_path, model, **LAYOUTS[layout])
    full = dict(load_model(folder, dtype=torch.float32)[0].named_parameters())
    for world in (1, 2, 4):
        states, reports = zip(*[load_state(folder, rank=r, world_size=world,
                                           dtype=torch.float32) for r in range(world)])
        facts = remap.param_facts(cfg)
        for name, p in full.items():
            if facts[name].tp is not None:
                dim = facts[name].tp.dim
                parts = [s[name] for s in states]
                assert all(x.shape[dim] == p.shape[dim] // world for x in parts), name
                got = torch.cat([as_bytes(x).view(x.shape + (-1,)) for x in parts], dim=dim)
                assert torch.equal(got, as_bytes(p).view(p.shape + (-1,))), (name, world)
            else:
                assert all(torch.equal(as_bytes(s[name]), as_bytes(p)) for s in states), name
        if world > 1:  # each rank reads about 1/world of the split tensors, not everything
            assert max(r.bytes for r in reports) < reports[0].bytes * world


def test_a_column_split_reads_only_the_ranks_columns(tmp_path, monkeypatch):
    """wo_b (and its block scale) split by columns: each rank's reads cover exactly its
    columns. Before: whole rows, world_size times the bytes (at Flash, 32 MiB of wo_b per
    rank where 32/w MiB are needed)."""
    cfg = tiny_config(o_groups=4)
    folder = written(tmp_path, make(cfg, fmt=WeightFormat.released()), **LAYOUTS["drafter"])
    index = json.loads((Path(folder) / "model.safetensors.index.json").read_text())
    names = [n for n in index["weight_map"] if ".attn.wo_b." in n]
    assert len(names) == 2  # the FP8 weight and its scale
    infos = {n: read_header(os.path.join(folder, index["weight_map"][n]))[n] for n in names}
    reads = []  # (file, offset, bytes) of every read the loader makes
    real = os.preadv

    def counted(fd, buffers, offset):
        n = real(fd, buffers, offset)
        reads.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), offset, n))
        return n

    monkeypatch.setattr(os, "preadv", counted)
    world = 4
    for rank in range(world):
        reads.clear()
        load_state(folder, rank=rank, world_size=world, dtype=torch.float32)
        for name, info in infos.items():
            rows, cols = info.shape
            elem = info.nbytes // (rows * cols)
            c0, c1 = rank * cols // world * elem, (rank + 1) * cols // world * elem
            inside = [(o - info.begin, n) for f, o, n in reads
                      if f == info.file and info.begin <= o < info.end]
            assert sum(n for _, n in inside) == info.nbytes // world, (name, rank)
            for o, n in inside:  # every read within the rank's columns of one row
                assert c0 <= o % (cols * elem) and o % (cols * elem) + n <= c1, (name, rank)


@st.composite
def stored_parts(draw):
    """A stored tensor's shape (1-4 dims) and a part of it (a (start, stop) per dim)."""
    shape = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
    part = []
    for n in shape:
        a = draw(st.integers(0, n - 1))
        part.append((a, draw(st.integers(a + 1, n))))
    return tuple(shape), tuple(part)


@settings(max_examples=60, deadline=None)
@given(stored_parts(), st.sampled_from([torch.float32, torch.bfloat16, torch.int8]))
def test_stream_delivers_exactly_a_part(tmp_path_factory, shape_part, dtype):
    """Any part of any stored tensor (whole rows, columns, inner blocks): the bytes delivered
    are the tensor's slice, read from exactly the part's bytes when it is not whole rows."""
    from mtp.checkpoint.stream import Read, stream

    shape, part = shape_part
    folder = tmp_path_factory.mktemp("part")
    t = torch.arange(math.prod(shape), dtype=torch.float32).view(shape).to(dtype)
    save_file({"t": t}, str(folder / "t.safetensors"))
    info = read_header(str(folder / "t.safetensors"))["t"]
    want = t[tuple(slice(a, b) for a, b in part)]
    dest = torch.full_like(want, 7)
    assert stream(str(folder), [Read(info, dest, part)]) == want.numel() * want.element_size()
    assert torch.equal(dest, want)


def test_rank_slices_refuse_uneven_splits(folder):  # 4 heads, 2 groups
    with pytest.raises(ValueError, match="cannot split"):
        load_state(folder, rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        load_state(folder, rank=2, world_size=2)


# ---- refusals --------------------------------------------------------------------------------
def edit_shard(folder, file, change, index_change=None):
    path = os.path.join(folder, file)
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = change(tensors)
    os.remove(path)
    if tensors is not None:
        save_file(tensors, path)
    index_path = Path(folder) / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    wm = {k: v for k, v in index["weight_map"].items() if v != file}
    wm.update(dict.fromkeys(tensors or {}, file))
    if index_change:
        index_change(wm)
    index_path.write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def without(*names):
    return lambda t: {k: v for k, v in t.items() if k not in names}


def with_(**tensors):
    return lambda t: {**t, **{k.replace("__", "."): v for k, v in tensors.items()}}


def retyped(name, fn):
    return lambda t: {**t, name: fn(t[name])}


def mtp_only(change):
    return lambda folder: edit_shard(folder, SHARD(4), change)


def edit_config(**changes):
    def apply(folder):
        path = Path(folder) / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return apply


def duplicate_index_key(folder):
    path = Path(folder) / "model.safetensors.index.json"
    text = path.read_text().replace(
        '"weight_map": {', f'"weight_map": {{"mtp.0.attn.attn_sink": "{SHARD(3)}", ', 1)
    path.write_text(text)


def truncate(folder):
    path = os.path.join(folder, SHARD(4))
    os.truncate(path, os.path.getsize(path) - 10)


def scramble_header(folder):
    with open(os.path.join(folder, SHARD(4)), "r+b") as f:
        f.seek(8)
        f.write(b"\xff" * 8)


def move_in_index(folder):
    edit_shard(folder, SHARD(3), lambda t: t,
               index_change=lambda wm: wm.update({"mtp.0.attn.attn_sink": SHARD(3)}))


P = "mtp.0."
CORRUPTIONS = {
    "no MTP layer": (lambda folder: edit_shard(folder, SHARD(4), lambda t: None),
                     r"MTP layer\(s\) 2 \(mtp.0.\*\): no weights in the checkpoint\. The "
                     r"checkpoint may have been quantized without including the MTP layers"),
    "fewer MTP layers than configured": (
        edit_config(num_nextn_predict_layers=2, compress_ratios=[0, 0, 0, 0]),
        r"MTP layer\(s\) 3 \(mtp.1.\*\): no weights"),
    "DSpark config": (edit_config(dspark_num_blocks=3), "DSpark drafter"),
    "DSpark-like tensors": (
        mtp_only(lambda t: {**{k: v for k, v in t.items() if "e_proj" not in k},
                            P + "dspark_block.weight": torch.zeros(2)}),
        "looks like a DSpark drafter"),
    "unknown tensor under mtp.0": (mtp_only(with_(mtp__0__attn__wq_c__weight=torch.zeros(2))),
                                   r"mtp.0.attn.wq_c.weight.*closest: rule 'attn.proj'"),
    "wrong shape": (mtp_only(with_(mtp__0__attn__attn_sink=torch.zeros(5))),
                    r"mtp.0.attn.attn_sink in model-00004-of-00004.safetensors: shape \[5\] "
                    r"F32, expected \[4\]"),
    "wrong dtype": (mtp_only(retyped(P + "attn.q_norm.weight",
                                     lambda v: v.to(torch.float8_e4m3fn))),
                    r"mtp.0.attn.q_norm.weight .*: dtype F8_E4M3 cannot load into .*q_norm"),
    "unknown format": (mtp_only(retyped(P + "attn.wq_b.weight", lambda v: v.view(torch.int8))),
                       r"mtp.0.attn.wq_b.weight .*: dtype I8 is not a known dense format"),
    "mixed formats": (mtp_only(retyped(P + "attn.wq_b.weight", lambda v: v.to(torch.bfloat16))),
                      r"mixed dense formats: fp8 \(.*\), plain \(mtp.0.attn.wq_b.weight\)"),
    "missing tensor": (mtp_only(without(P + "attn.wq_b.scale")),
                       r"missing tensor: mtp.0.attn.wq_b.scale \(-> model.layers.2.mtp_block"),
    "missing head": (lambda folder: edit_shard(folder, SHARD(3), without("head.weight")),
                     r"missing tensor: head.weight"),
    "two spellings of one scale": (
        lambda folder: edit_shard(folder, SHARD(4), lambda t: {
            **t, P + "attn.wq_b.weight_scale_inv": t[P + "attn.wq_b.scale"].clone()}),
        r"mtp.0.attn.wq_b.\w+ .* and mtp.0.attn.wq_b.\w+ .* both fill part of "
        r".*wq_b.weight_scale_inv: duplicate tensors"),
    "missing shard file": (lambda folder: os.remove(os.path.join(folder, SHARD(4))),
                           r"shard model-00004-of-00004.safetensors is missing"),
    "index names the wrong shard": (move_in_index,
                                    r"the index maps mtp.0.attn.attn_sink to "
                                    r"model-00003-of-00004.safetensors, which does not hold it"),
    "the same tensor in two shards": (
        lambda folder: edit_shard(folder, SHARD(3), with_(mtp__0__attn__attn_sink=torch.zeros(4)),
                                  index_change=lambda wm: wm.update(
                                      {"mtp.0.attn.attn_sink": SHARD(4)})),
        r"mtp.0.attn.attn_sink is in model-00003-of-00004.safetensors and in "
        r"model-00004-of-00004.safetensors .*: the same tensor in two shards"),
    "a stale index": (lambda folder: edit_shard(folder, SHARD(3), lambda t: t, index_change=(
        lambda wm: wm.pop("mtp.0.attn.attn_sink"))),
        r"model-00004-of-00004.safetensors holds mtp.0.attn.attn_sink, which the index does "
        r"not list"),
    "an index listing a tensor twice": (duplicate_index_key,
                                        r"the index lists mtp.0.attn.attn_sink twice"),
    "truncated shard": (truncate, r"model-00004-of-00004.safetensors is truncated"),
    "corrupt header": (scramble_header, r"model-00004-of-00004.safetensors: .*(not valid JSON|"
                                        r"header claims)"),
    "non-zero compress ratio": (edit_config(compress_ratios=[0, 0, 4]),
                                "only 0 .* is implemented"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_refusal(folder, pristine, case):
    corrupt, message = CORRUPTIONS[case]
    corrupt(folder)
    embed = torch.randn(1024, 256)
    before = embed.clone()
    with pytest.raises(CheckpointError, match=message):
        load_model(folder, dtype=torch.float32, embed_tokens=embed)
    assert torch.equal(embed, before)  # the caller's tensor is untouched
    p = plan(folder)  # plan finds the same problem from config, index and headers
    assert not p.ok and "refused" in str(p)
    assert plan(pristine).ok


def test_plan_kinds(folder):
    p = plan(folder)
    assert (p.kind, p.ok, p.layout) == ("v4-mtp", True, "index")
    assert p.shards_read == [SHARD(1), SHARD(3), SHARD(4)] and p.shards_skipped == [SHARD(2)]
    assert p.bytes == sum(u.bytes for u in p.rules if u.status == "load")
    text = str(p)
    assert "3 of 4 shard file(s)" in text and "experts fp4" in text and "verdict     loads" in text
    edit_config(dspark_num_blocks=3)(folder)
    assert plan(folder).kind == "dspark"
    edit_config(num_nextn_predict_layers=0)(folder)
    path = Path(folder) / "config.json"
    raw = json.loads(path.read_text())
    raw.pop("dspark_num_blocks")
    path.write_text(json.dumps(raw))
    assert plan(folder).kind == "no-mtp"


def test_the_backend_is_chosen_where_the_module_is_loaded(folder):
    model, _ = load_model(folder, dtype=torch.float32, backend="reference")
    assert model.backend == "reference" and model.ops.name == "reference"
    assert load_model(folder, dtype=torch.float32)[0].backend == "auto"  # the default
    drafter = Drafter.from_pretrained(folder, dtype=torch.float32, backend="reference")
    assert drafter.model.backend == "reference"
    with pytest.raises(ValueError, match=r"backend: expected one of \('reference', 'triton', "
                                         r"'auto'\) or an ops object, got 'cuda'"):
        load_model(folder, backend="cuda")


def test_bad_arguments(tmp_path, folder):
    with pytest.raises(ValueError, match="revision='v1' applies to Hub repos"):
        load_model(folder, revision="v1")
    with pytest.raises(FileNotFoundError, match="neither a folder nor a Hub repo id"):
        load_model(str(tmp_path / "nowhere" / "x" / "y"))
    with pytest.raises(TypeError, match="dtype"):
        load_model(folder, dtype=torch.int32)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_checkpoint(make(), folder)
    with pytest.raises(ValueError, match="main_layers=3"):
        write_release_like(make(), tmp_path / "x", main_layers=3)
    with pytest.raises(ValueError, match=r"num_shards=4: the release layout needs 3 \.\. 3 "
                                         r"shards; more shards need placeholder main-model"):
        write_checkpoint(make(), tmp_path / "y", num_shards=4)


def test_write_checkpoint_writes_the_drafters_tensors_only(tmp_path):
    """Before: every layout also held placeholder main-model tensors (layers.0.attn_norm,
    norm, hc_head_*), which belong to tests and demos, not to the library's output."""
    model = make()
    names = {n for n, t in remap.canonical_names(model.config, model.weight_format)
             if t.param in dict(model.named_parameters())}
    for layout, kw in (("drafter", {}), ("single", LAYOUTS["single"]), ("mp", LAYOUTS["mp"])):
        folder = tmp_path / layout
        write_checkpoint(model, folder, **kw)
        stored = set()
        for f in folder.glob("*.safetensors"):
            with safe_open(f, "pt") as st_file:
                stored |= set(st_file.keys())
        assert stored <= names and not any(n.startswith(("layers.", "norm.", "hc_head"))
                                            for n in stored), layout
    index = json.loads((tmp_path / "drafter" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == names


def test_main_layers_is_a_deprecated_alias_of_write_release_like(tmp_path):
    model = make()
    with pytest.warns(DeprecationWarning, match=r"main_layers=\) is deprecated.*"
                                                r"mtp\.testing\.write_release_like"):
        write_checkpoint(model, tmp_path / "old", num_shards=4, main_layers=2)
    write_release_like(model, tmp_path / "new", num_shards=4, main_layers=2)
    files = sorted(p.name for p in (tmp_path / "new").iterdir())
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == files
    for f in files:
        assert (tmp_path / "old" / f).read_bytes() == (tmp_path / "new" / f).read_bytes(), f

