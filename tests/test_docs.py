"""The docs run as written and send the reader nowhere they cannot follow.

The python blocks of docs/drafter.md, kernels.md, loading.md and numerics.md run, in order, in
one namespace per page (the guide has its own test, tests/test_guide.py; engines.md
tests/test_integrations_transformers.py; the README's snippet tests/test_readme.py). Every
page of docs/ and the README is free of references to things a reader of the published docs
does not have: "the issue", issue numbers of this project, "the spec" (the design notes the
code was written from).
"""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
from doc_blocks import python_blocks, run_python_blocks

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


def test_drafter_md_runs_as_written():
    text = (ROOT / "docs" / "drafter.md").read_text()
    assert "```py\n" not in text, "a ```py block would be skipped: write ```python"
    blocks = python_blocks(text)
    assert len(blocks) == 2, "the API tour and the CUDA-graphs block: drafter.md lost a block"
    namespace, printed = run_python_blocks(ROOT / "docs" / "drafter.md", blocks)
    assert printed.startswith("loaded ")  # the load report
    assert namespace["drafter"].seq_ids == ["a"]


def test_every_page_with_python_blocks_is_run():
    """A page's blocks are run by some test: none is left to rot as a fragment."""
    run_elsewhere = {"guide.md", "engines.md", "README.md"}  # their own tests (module docstring)
    with_blocks = {p.name for p in PAGES if python_blocks(p.read_text())}
    assert with_blocks - run_elsewhere == {"drafter.md", "kernels.md", "loading.md",
                                           "numerics.md"}


def _has_gpu_kernels() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import mtp_kernels  # noqa: F401
    except ImportError:
        return False
    return True


def test_loading_md_runs_as_written():
    page = ROOT / "docs" / "loading.md"
    blocks = python_blocks(page.read_text())
    assert len(blocks) == 2, "the facts block and the load block: loading.md lost a block"
    namespace, printed = run_python_blocks(page, blocks)
    assert printed.startswith("TPSplit(dim=0, unit='head_dim')\n")  # the comment's claim
    assert "loaded " in printed and namespace["report"].shards_skipped  # the placeholder shard


def test_numerics_md_runs_as_written():
    page = ROOT / "docs" / "numerics.md"
    namespace, printed = run_python_blocks(page, python_blocks(page.read_text()))
    assert printed == "Numerics(act_quant=False, kv_fp8=False, zero_embed_at_pos0=False)\n"


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu_kernels(), reason="kernels.md's block runs the Triton kernels: "
                    "it needs a CUDA device and mtp_kernels (Triton)")
def test_kernels_md_runs_as_written():
    page = ROOT / "docs" / "kernels.md"
    blocks = python_blocks(page.read_text())
    assert len(blocks) == 1
    _, printed = run_python_blocks(page, blocks)
    assert printed == "triton\n(2, 3)\n"


# phrases that point at the project's own tracker or design notes (not at upstream projects:
# "vLLM issue #33299" names where to look)
UNFOLLOWABLE = re.compile(
    r"\bthe issue\b|(?<!vLLM )\bissues? #?\d+|\bissue-\d+|\bthe spec\b|\bspec's\b|\bspec/"
    r"|\bthe spec(?:ification)? (?:says|asks|is silent|leaves)", re.I)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_docs_refer_to_nothing_a_reader_cannot_follow(page):
    hits = [f"{page.name}:{n}: {line.strip()}"
            for n, line in enumerate(page.read_text().splitlines(), 1)
            if UNFOLLOWABLE.search(line)]
    assert not hits, "\n".join(hits)


def test_the_pattern_catches_what_it_must():  # the check above cannot pass vacuously
    for bad in ("where the issue left room", "issue 5's floor", "as the spec asks",
                "the spec's W + k", "(issue 3's loader)", "`spec/architecture.md`"):
        assert UNFOLLOWABLE.search(bad), bad
    for fine in ("vLLM issue #33299", "issue-bound kernels", "the specification and default",
                 "a separate piece of work"):
        assert not UNFOLLOWABLE.search(fine), fine


# a repository path in running text: mtp/..., kernels/..., tests/..., docs/... (globs allowed)
REPO_PATH = re.compile(r"(?<![\w./-])((?:mtp|kernels|tests|benchmarks|examples|docs)/[\w./*-]*"
                       r"[\w*])")
# a removed file, named as the provenance of a measurement or as what a change removed
HISTORICAL = {("performance.md", "kernels/model.py"), ("NOTES.md", "kernels/model.py")}


@pytest.mark.parametrize("page", PAGES + [ROOT / "kernels" / "NOTES.md"], ids=lambda p: p.name)
def test_every_repository_path_a_page_names_exists(page):
    """Code moves (the demo code went from mtp/demo.py and mtp/toy_target.py to mtp/demo/,
    drafter.md kept the old names): every path a page names must still be there."""
    missing = [f"{page.name}:{n}: {path}"
               for n, line in enumerate(page.read_text().splitlines(), 1)
               for path in REPO_PATH.findall(line)
               if (page.name, path) not in HISTORICAL and not any(ROOT.glob(path))]
    assert not missing, "\n".join(missing)


def test_the_path_pattern_finds_paths():  # the check above cannot pass vacuously
    assert REPO_PATH.findall("see `mtp/demo/toy_target.py`, benchmarks/bench_*.py.") == [
        "mtp/demo/toy_target.py", "benchmarks/bench_*.py"]
    assert not any(ROOT.glob("mtp/demo.py"))


@pytest.mark.parametrize("page", PAGES + [ROOT / "kernels" / "NOTES.md"], ids=lambda p: p.name)
def test_no_merge_conflict_markers(page):
    """A merge once left docs/parallel.md with both sides and the markers between them."""
    hits = [n for n, line in enumerate(page.read_text().splitlines(), 1)
            if re.match(r"(<{7}|={7}|>{7})( |$)", line)]
    assert not hits, f"{page.name}: conflict markers at lines {hits}"
