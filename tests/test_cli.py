"""The ``mtp`` command line: every command in-process (``main(argv)`` returns the exit code),
their error paths and exit codes, and once for real through the installed console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from hf_server import HubServer
from safetensors.torch import load_file, save_file

from mtp import DeepSeekV4MTP, MTPConfig
from mtp.cli import EXIT_ERROR, EXIT_NOT_MTP, EXIT_OK, EXIT_USAGE, main
from mtp.demo import write_tiny_checkpoint
from mtp.testing import init_random_

SHARDS = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
NEEDED = [SHARDS[0], SHARDS[2], SHARDS[3]]  # embedding, head, MTP layer; shard 2: main layer


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, prefix: str, *fragments: str) -> None:
    """A refusal is one line on stderr, naming the command, with no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prefix}: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, err)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


# ---- demo ----------------------------------------------------------------------------------
def test_demo_loads_what_it_wrote_and_drafts(capsys):
    from mtp import demo

    printed = []
    drafter = demo.run(seqs=2, k=2, rounds=2, echo=printed.append)
    expected = init_random_(DeepSeekV4MTP(MTPConfig.from_name("tiny")), seed=0)
    got = dict(drafter.model.named_parameters())
    for name, p in expected.named_parameters():  # the checkpoint round trip is bit-exact
        assert torch.equal(got[name].view(torch.uint8), p.view(torch.uint8)), name
    assert drafter.load_report.shards_skipped == [SHARDS[1]]
    # round 1 fed the prompts (5 and 13 rows); round 2 re-fed (0 % 3 + 1, 1 % 3 + 1) rows
    assert [drafter.next_position(i) for i in (0, 1)] == [5 + 1, 13 + 2]
    text = "\n".join(printed)
    assert "round 1     catch-up 18 rows (13 after keeping the last W = 8 per sequence)" in text
    assert "round 2     re-feed 3 rows + 1 draft step(s), 2 sequences batched" in text
    assert "seq 1  positions 13..14  ->  drafts [" in text


def test_demo_command_prints_drafts_with_timings(capsys):
    code, out, err = run(capsys, "demo", "--random-checkpoint", "--seqs", "2", "--rounds", "1",
                         "-k", "2", "--temperature", "0.8")
    assert code == EXIT_OK and err == ""
    assert "sampled at temperature 0.8" in out and " ms" in out
    assert out.count("->  drafts [") == 2


def snapshot(folder) -> dict[str, tuple[int, int]]:
    return {f: (os.stat(os.path.join(folder, f)).st_size, os.stat(os.path.join(folder, f))
                .st_mtime_ns) for f in sorted(os.listdir(folder))}


def test_demo_refuses_a_folder_holding_a_checkpoint_and_overwrite_replaces_it(capsys, tmp_path):
    folder = write_tiny_checkpoint(tmp_path / "ckpt")
    before = snapshot(folder)
    code, _, err = run(capsys, "demo", "--random-checkpoint", "--out", folder)
    assert code == EXIT_ERROR and snapshot(folder) == before
    # names the CLI's own flag, not the Python argument behind it
    assert_one_line_error(err, "mtp demo", "already holds checkpoint files", "--overwrite")
    assert "overwrite=True" not in err
    code, out, err = run(capsys, "demo", "--random-checkpoint", "--out", folder, "--overwrite",
                         "--rounds", "1")
    assert code == EXIT_OK and err == "" and "round 1" in out
    assert snapshot(folder).keys() == before.keys() and snapshot(folder) != before
    code, _, err = run(capsys, "demo", "--random-checkpoint", "--overwrite")  # without --out
    assert code == EXIT_USAGE
    assert_one_line_error(err, "mtp demo", "--overwrite goes with --out DIR")
    after = snapshot(folder)
    code, _, err = run(capsys, "demo", "--out", folder)  # the trained pair's demo writes none
    assert code == EXIT_USAGE and snapshot(folder) == after
    assert_one_line_error(err, "mtp demo", "--out and --overwrite go with --random-checkpoint")


def test_demo_out_that_is_a_file_is_named_plainly(capsys, tmp_path):
    path = tmp_path / "a-file"
    path.write_text("keep me")
    code, _, err = run(capsys, "demo", "--random-checkpoint", "--out", str(path))
    assert code == EXIT_ERROR and path.read_text() == "keep me"
    assert_one_line_error(err, "mtp demo", f"--out {path}: exists and is not a folder")
    assert "Errno" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error path needs a machine without "
                    "CUDA")
@pytest.mark.parametrize("command", ["demo", "bench"])
def test_a_device_this_machine_lacks_is_refused_before_anything_is_written(capsys, tmp_path,
                                                                         command):
    out = ["--random-checkpoint", "--out", str(tmp_path / "out")] if command == "demo" else []
    code, stdout, err = run(capsys, command, "--device", "cuda", *out)
    assert code == EXIT_ERROR and stdout == ""
    assert_one_line_error(err, f"mtp {command}", "--device cuda: CUDA is not available",
                          "--device cpu")
    assert "AssertionError" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["demo", "bench"])
@pytest.mark.parametrize("device, fragment", [
    ("foo", "expected a torch device such as cpu, cuda, cuda:1 or mps, got 'foo'"),
    ("meta", "meta tensors hold no data")])
def test_a_device_that_is_not_one_is_a_usage_error(capsys, command, device, fragment):
    code, out, err = run(capsys, command, "--device", device)
    assert code == EXIT_USAGE and out == ""
    assert_one_line_error(err, f"mtp {command}", f"argument --device: {fragment}")
    assert "Expected one of" not in err  # torch's raw list of device types


def test_python_dash_m_mtp_runs_the_command_line():
    done = subprocess.run([sys.executable, "-m", "mtp", "--version"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == EXIT_OK and done.stdout.startswith("mtp "), done.stderr
    done = subprocess.run([sys.executable, "-m", "mtp", "bench", "--batch", "x"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_USAGE and "mtp bench: error:" in done.stderr


# ---- inspect -------------------------------------------------------------------------------
def test_inspect_a_loadable_checkpoint(capsys, tiny_checkpoint):
    code, out, err = run(capsys, "inspect", tiny_checkpoint)
    assert code == EXIT_OK and err == ""
    assert "v4-mtp" in out and all(s in out for s in NEEDED) and "verdict     loads" in out
    code, out, _ = run(capsys, "inspect", tiny_checkpoint, "--json")
    plan = json.loads(out)
    assert code == EXIT_OK and plan["ok"] is True and plan["kind"] == "v4-mtp"
    assert plan["shards_read"] == NEEDED and plan["shards_skipped"] == [SHARDS[1]]
    assert plan["missing"] == [] and plan["unexpected"] == []
    assert plan["config"]["hidden_size"] == 256


def test_inspect_says_when_a_checkpoint_is_something_else(capsys, tmp_path):
    """A checkpoint whose MTP tensors were dropped (quantized re-exports do this), and a DSpark
    drafter's config: read fine, not loadable, exit code 3."""
    folder = write_tiny_checkpoint(tmp_path / "no-mtp")
    tensors = load_file(os.path.join(folder, SHARDS[3]))
    save_file({k: v for k, v in tensors.items() if not k.startswith("mtp.")} or
              {"unrelated": torch.zeros(1)}, os.path.join(folder, SHARDS[3]))
    index_file = os.path.join(folder, "model.safetensors.index.json")
    with open(index_file) as f:
        index = json.load(f)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items()
                           if not k.startswith("mtp.")}
    with open(index_file, "w") as f:
        json.dump(index, f)
    code, out, _ = run(capsys, "inspect", folder)
    assert code == EXIT_NOT_MTP and "no-mtp" in out and "verdict     refused" in out

    folder = write_tiny_checkpoint(tmp_path / "dspark")
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    config["dspark_num_layers"] = 3
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    code, out, _ = run(capsys, "inspect", folder, "--json")
    assert code == EXIT_NOT_MTP and json.loads(out)["kind"] == "dspark"


@pytest.mark.parametrize("files, fragment", [
    ({}, "an empty folder"),
    ({"notes.txt": "x"}, "no config.json and no .safetensors files"),
    ({"config.json": "{}"}, "no .safetensors files")])
def test_inspect_of_a_folder_without_a_checkpoint_exits_3_as_documented(capsys, tmp_path, files,
                                                                        fragment):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    code, out, err = run(capsys, "inspect", str(tmp_path))
    assert code == EXIT_NOT_MTP and out == ""  # "3 if not" (the --help text)
    assert_one_line_error(err, "mtp inspect", fragment, "not a checkpoint folder")
    code, out, _ = run(capsys, "inspect", "--help")
    assert "3 if it was read but does not" in " ".join(out.split())


def test_inspect_of_unknown_weight_files_names_the_expected_files(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(MTPConfig.from_name("tiny").to_dict()))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "weights.safetensors"))
    code, _, err = run(capsys, "inspect", str(tmp_path))
    assert code == EXIT_ERROR
    assert_one_line_error(err, "mtp inspect", "model.safetensors.index.json",
                          "per-rank files (model0-mp8.safetensors, ...)")
    assert "{r}" not in err and "{N}" not in err  # no unfilled placeholder


def test_download_of_a_local_folder_says_what_to_do(capsys, tiny_checkpoint):
    code, _, err = run(capsys, "download", tiny_checkpoint)
    assert code == EXIT_ERROR
    assert_one_line_error(err, "mtp download", "is a local folder, not a Hub repo id",
                          "load or inspect the folder itself")
    assert "download()" not in err


def test_inspect_of_nothing_is_one_error_line_and_debug_shows_the_traceback(capsys, tmp_path):
    code, out, err = run(capsys, "inspect", str(tmp_path / "absent"))
    assert code == EXIT_ERROR and out == ""
    assert_one_line_error(err, "mtp inspect", "absent")
    code, _, err = run(capsys, "inspect", str(tmp_path / "absent"), "--debug")
    assert code == EXIT_ERROR and "Traceback (most recent call last)" in err


# ---- download (real huggingface_hub client, local server) -------------------------------------
def test_download_fetches_only_the_needed_shards(capsys, tiny_checkpoint, tmp_path, monkeypatch):
    with HubServer({"org/tiny": {"main": tiny_checkpoint}}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        code, out, err = run(capsys, "download", "org/tiny", "--cache-dir", str(tmp_path),
                             "--no-progress")
        assert code == EXIT_OK, err
        folder = out.strip()
        assert sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) == NEEDED
        assert SHARDS[1] not in hub.gets()
        # ... and what it downloaded is what inspect then reads (from the cache).
        code, out, _ = run(capsys, "inspect", "org/tiny", "--cache-dir", str(tmp_path))
        assert code == EXIT_OK and "v4-mtp" in out

        code, _, err = run(capsys, "download", "org/absent", "--cache-dir", str(tmp_path),
                           "--no-progress")
        assert code == EXIT_ERROR
        assert_one_line_error(err, "mtp download", "org/absent")


# ---- bench ---------------------------------------------------------------------------------
def test_bench_prints_a_row_per_batch(capsys):
    code, out, err = run(capsys, "bench", "--batch", "1", "3", "--steps", "2", "--repeats", "1",
                         "--warmup", "0", "--device", "cpu")
    assert code == EXIT_OK and err == ""
    lines = out.strip().splitlines()
    assert "preset tiny" in lines[0] and "k = 2" in lines[0]
    assert [line.split()[0] for line in lines[2:]] == ["1", "3"]
    assert all(line.count(" ms") == 3 for line in lines[2:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_on_cuda(capsys):
    code, out, _ = run(capsys, "bench", "--batch", "1", "4", "--repeats", "2", "--device", "cuda")
    assert code == EXIT_OK and "bfloat16" in out


def test_bench_on_a_missing_cuda_device_is_an_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error path needs one without")
    code, _, err = run(capsys, "bench", "--device", "cuda")
    assert code == EXIT_ERROR
    assert_one_line_error(err, "mtp bench", "--device cuda: CUDA is not available")


@pytest.mark.parametrize("preset", ["flash", "pro"])
def test_bench_refuses_full_size_presets_on_the_cpu_at_once(capsys, preset):
    t0 = time.perf_counter()
    code, out, err = run(capsys, "bench", "--preset", preset, "--device", "cpu")
    assert code == EXIT_ERROR and out == ""
    assert_one_line_error(err, "mtp bench", f"--preset {preset} on the CPU: its weights are",
                          "GiB", "run it on a CUDA device, or use --preset tiny")
    assert time.perf_counter() - t0 < 30  # sized on the meta device: nothing built (was 8+ min)


def test_bench_with_kernels_that_cannot_load_is_an_error(capsys):
    try:
        import mtp_kernels  # noqa: F401
        pytest.skip("mtp_kernels imports here; the error path needs a machine without Triton")
    except ImportError:
        pass
    code, _, err = run(capsys, "bench", "--backend", "triton", "--device", "cpu")
    assert code == EXIT_ERROR
    assert_one_line_error(err, "mtp bench", "--backend triton: the mtp_kernels package cannot")


def test_bench_picks_the_modules_backend_and_keeps_kernels_as_a_deprecated_alias(capsys):
    """Before: --kernels built the deprecated TritonMTP accelerator; now the module's own
    backend= runs (auto by default), and --kernels still works with a warning."""
    small = ("--batch", "1", "--repeats", "1", "--warmup", "0", "--device", "cpu", "-k", "1")
    code, out, err = run(capsys, "bench", *small)
    assert code == EXIT_OK and err == ""
    assert "backend auto (ReferenceOps)" in out  # auto on a CPU: the reference ops
    code, out, err = run(capsys, "bench", "--kernels", "reference", *small)
    assert code == EXIT_OK and "backend reference (ReferenceOps)" in out
    assert err == "mtp bench: warning: --kernels is deprecated; use --backend reference\n"
    code, _, err = run(capsys, "bench", "--kernels", "reference", "--backend", "triton", *small)
    assert code == EXIT_USAGE and "disagree; give --backend only" in err
    code, out, err = run(capsys, "bench", "--backend", "triton", *small)  # a CPU module
    assert code == EXIT_ERROR and out == ""
    assert_one_line_error(err, "mtp bench", "--backend triton: ")  # unimportable or "cannot run"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_on_cuda_with_the_triton_kernels(capsys):
    code, out, err = run(capsys, "bench", "--batch", "1", "4", "--repeats", "2", "--device",
                         "cuda", "--backend", "triton")
    assert code == EXIT_OK, err
    assert "backend triton (TritonOps)" in out


# ---- usage ---------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, prefix, fragment", [
    ([], "mtp", "a command is required"),
    (["frob"], "mtp", "invalid choice: 'frob'"),
    (["inspect"], "mtp inspect", "PATH_OR_REPO"),
    (["bench", "--batch", "0"], "mtp bench", "expected a positive integer, got 0"),
    (["bench", "--preset", "huge"], "mtp bench", "invalid choice: 'huge'"),
    (["bench", "--warmup", "-1", "--device", "cpu"], "mtp bench",
     "argument --warmup: expected an integer >= 0, got -1"),
    (["demo", "--temperature", "-1"], "mtp demo", "expected a finite number >= 0"),
    (["download"], "mtp download", "REPO"),
])
def test_usage_errors_exit_2_with_one_line(capsys, argv, prefix, fragment):
    code, out, err = run(capsys, *argv)
    assert code == EXIT_USAGE and out == ""
    assert_one_line_error(err, prefix, fragment, "--help")


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["inspect", "--help"],
                                  ["download", "--help"], ["bench", "--help"], ["--version"]])
def test_help_everywhere(capsys, argv):
    code, out, _ = run(capsys, *argv)
    assert code == EXIT_OK and out.startswith(("usage: mtp", "mtp "))


def test_the_installed_console_script_runs_the_demo():
    """A real process through the entry point pip installed (pyproject: mtp = mtp.cli:main)."""
    script = os.path.join(os.path.dirname(sys.executable), "mtp")
    assert os.path.isfile(script), f"no console script at {script}: run `pip install -e .`"
    done = subprocess.run([script, "demo", "--random-checkpoint", "--seqs", "2", "--rounds", "1"],
                          capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == EXIT_OK, done.stderr
    assert "round 1" in done.stdout and done.stdout.count("->  drafts [") == 2
    usage = subprocess.run([script, "bench", "--batch", "x"], capture_output=True, text=True,
                           timeout=120)
    assert usage.returncode == EXIT_USAGE and usage.stdout == ""
    assert usage.stderr.count("\n") == 1 and "mtp bench: error:" in usage.stderr
