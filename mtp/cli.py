"""The ``mtp`` command line.

    mtp demo                      the shipped tiny pair: speculative decoding, acceptance, speedup
    mtp inspect PATH_OR_REPO      what a checkpoint holds for the drafter (reads no tensor data)
    mtp download REPO             config, index and only the shards the drafter needs
    mtp bench                     draft-step latency on this machine, random weights

Exit codes (scripts can rely on them):

    0  success (inspect: the checkpoint loads as a DeepSeek-V4 MTP drafter)
    1  the command failed (a missing path, a corrupt or unreadable checkpoint, a network or
       file error, a device this machine does not have)
    2  usage error (unknown command, bad or missing argument)
    3  inspect only: the source was read, but is not a loadable V4 MTP drafter (a folder
       without a checkpoint, another kind of model, a DSpark drafter, no MTP layer, missing
       or unexpected tensors)
    130  interrupted (Ctrl-C)

Errors are printed as one line on stderr (``mtp <command>: error: ...``), followed by the
details a refused checkpoint lists; ``--debug`` prints the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from functools import partial

import torch

from .config import PRESETS

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_MTP, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# `mtp bench` refuses presets whose weights exceed this on a CPU: building random full-size
# weights there takes many minutes (quantising every expert) before the first timing, and a CPU
# figure for a full-size layer says nothing about a deployment. Tiny (~20 MB) runs anywhere.
BENCH_CPU_MAX_BYTES = 1 << 30


class UsageError(Exception):
    """Bad command-line arguments (exit code 2); ``prog`` names the (sub)command."""

    def __init__(self, message: str, prog: str = "mtp"):
        super().__init__(message)
        self.prog = prog


class CommandError(RuntimeError):
    """A command cannot run here (exit code 1); the message says why and what to do."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so main() reports every
    error the same way (one line, exit code 2)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)", self.prog)


def _integer(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def _positive(text: str) -> int:
    return _integer(text, 1, "a positive integer")


def _non_negative(text: str) -> int:
    return _integer(text, 0, "an integer >= 0")


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _device(text: str) -> torch.device:
    """``--device``: a torch device string, checked when parsed (not torch's own message)."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda, cuda:1 or "
                                         f"mps, got {text!r}") from None
    if device.type == "meta":
        raise argparse.ArgumentTypeError("meta tensors hold no data; expected a device such as "
                                         "cpu or cuda")
    return device


def check_device(device: torch.device) -> None:
    """Refuse a device this machine lacks, before the command writes or builds anything."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CommandError(f"--device {device}: CUDA is not available on this machine (no "
                               f"GPU, or a CPU-only build of torch); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CommandError(f"--device {device}: this machine has "
                               f"{torch.cuda.device_count()} CUDA device(s), "
                               f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
        return
    if device.type == "cpu":
        return
    try:  # another backend (mps, xpu, ...): usable if a tensor can live there
        torch.empty(1, device=device)
    except Exception as e:
        raise CommandError(f"--device {device}: not usable on this machine "
                           f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    debug = _Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="print the full traceback on errors")
    hub = _Parser(add_help=False)  # where a Hub repo comes from (inspect, download)
    hub.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    hub.add_argument("--cache-dir", help="huggingface_hub cache folder")
    hub.add_argument("--token", help="Hub token (default: the huggingface_hub login)")
    parser = _Parser(
        prog="mtp", description="DeepSeek-V4 multi-token-prediction (MTP) drafter.",
        epilog="exit codes: 0 ok, 1 failed, 2 usage error, 3 (inspect) not a loadable V4 MTP "
               "checkpoint, 130 interrupted", parents=[debug])
    parser.add_argument("--version", action="version", version=f"mtp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("demo", parents=[debug], help="speculative decoding with the shipped "
                       "tiny trained pair (seconds on a CPU)",
                       description="Load the shipped tiny pair (a V4-shaped target trained on "
                       "Python's stdlib and its MTP layer, release format), continue a held-out "
                       "Python snippet by speculative decoding and print the text, the "
                       "acceptance per draft position, the mean accepted length and the "
                       "speedup over plain decoding. --random-checkpoint runs the older demo: "
                       "random weights written and loaded, drafts and timings.")
    p.add_argument("--prompt", default="25", help="a held-out snippet's index (default 25) "
                   "or any text")
    p.add_argument("--max-new-tokens", type=_positive, default=64,
                   help="tokens to generate (default 64)")
    p.add_argument("--random-checkpoint", action="store_true",
                   help="the random-weights checkpoint demo (uses --seqs, --rounds, --out)")
    p.add_argument("--seqs", type=_positive, default=3, help="sequences (default 3)")
    p.add_argument("--draft-tokens", "-k", type=_positive, default=3, dest="k",
                   help="draft tokens per proposal (default 3)")
    p.add_argument("--rounds", type=_positive, default=3, help="propose rounds (default 3)")
    p.add_argument("--temperature", type=_non_negative_float, default=0.0,
                   help="0 drafts greedily (default); > 0 samples")
    p.add_argument("--device", type=_device, default=torch.device("cpu"),
                   help="torch device (default cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="compute dtype (default float32)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and inputs")
    p.add_argument("--out", metavar="DIR", help="keep the checkpoint in DIR (created if "
                   "missing; it must hold no checkpoint) instead of a temporary folder")
    p.add_argument("--overwrite", action="store_true", help="with --out: replace the "
                   "checkpoint files already in DIR")
    p.set_defaults(func=_demo)

    p = sub.add_parser("inspect", parents=[debug, hub], help="what a checkpoint holds for the "
                       "drafter", description="Read config.json, the index and the shard "
                       "headers (no tensor data) of a folder or Hub repo and print what the "
                       "drafter would load: config, format, shards to read, tensors and bytes "
                       "per rule, missing and unexpected tensors, and the verdict. Exit code 0 "
                       "if it loads as a V4 MTP drafter; 3 if it was read but does not (no "
                       "checkpoint in the folder, another kind of model, missing tensors); 1 "
                       "if it cannot be read (no such path, a corrupt file, a network error).")
    p.add_argument("source", metavar="PATH_OR_REPO", help="checkpoint folder or Hub repo id")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("download", parents=[debug, hub], help="download only the shards the "
                       "drafter needs", description="Download config.json, the index and only "
                       "the shards holding the MTP layer, the embedding and the head (3 of 46 "
                       "for V4-Flash) into the huggingface_hub cache; print the folder.")
    p.add_argument("repo", metavar="REPO", help="Hub repo id, e.g. deepseek-ai/DeepSeek-V4-Flash")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_download)

    p = sub.add_parser("bench", parents=[debug], help="draft-step latency on this machine",
                       description="Time Drafter.propose (1 new row per sequence + k draft "
                       "tokens) and the catch-up of W rows per sequence, for a preset with "
                       "random weights in the released formats (FP8 + FP4 experts), on the "
                       "current device. Times are medians; on CUDA the device is synchronised "
                       "around each call. Full-size presets (flash, pro) need a CUDA device: "
                       "on a CPU, building their random weights alone takes many minutes and "
                       "says nothing about a deployment.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                   help="model dimensions (default tiny)")
    p.add_argument("--batch", type=_positive, nargs="+", default=[1, 4],
                   help="sequences per call (default 1 4)")
    p.add_argument("--steps", "-k", type=_positive, default=3, dest="k",
                   help="draft tokens per proposal (default 3)")
    p.add_argument("--repeats", type=_positive, default=10, help="timed calls (default 10)")
    p.add_argument("--warmup", type=_non_negative, default=2,
                   help="untimed calls first (default 2)")
    p.add_argument("--device", type=_device, default=None, help="torch device (default cuda "
                   "if present, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="compute dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--backend", choices=["auto", "reference", "triton"], default=None,
                   help="which ops run the module (DeepSeekV4MTP's backend=): auto (default: "
                   "the Triton kernels on CUDA in the released format, the reference "
                   "elsewhere), reference (pure PyTorch), triton (mtp_kernels; CUDA)")
    p.add_argument("--kernels", choices=["reference", "triton"], default=None,
                   help="deprecated alias of --backend (kept for one release)")
    p.add_argument("--graphs", action="store_true", help="draft steps as CUDA-graph replays "
                   "(Drafter.use_cuda_graphs; CUDA, needs mtp_kernels)")
    p.set_defaults(func=_bench)
    return parser


# ---- commands ------------------------------------------------------------------------------
def _demo(args) -> int:
    from .demo import run, run_pair

    check_device(args.device)
    if not args.random_checkpoint:
        if args.out or args.overwrite:
            raise UsageError("--out and --overwrite go with --random-checkpoint (the trained "
                             "pair's demo writes no checkpoint)", "mtp demo")
        prompt = int(args.prompt) if args.prompt.isdigit() else args.prompt
        run_pair(prompt=prompt, k=args.k, max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, device=str(args.device), seed=args.seed)
        return EXIT_OK
    if args.overwrite and not args.out:
        raise UsageError("--overwrite goes with --out DIR (the default folder is a fresh "
                         "temporary one)", "mtp demo")
    if args.out:
        _check_out_folder(args.out, args.overwrite)
    run(out=args.out, seqs=args.seqs, k=args.k, rounds=args.rounds, device=str(args.device),
        dtype=DTYPES[args.dtype], temperature=args.temperature, seed=args.seed,
        overwrite=args.overwrite)
    return EXIT_OK


def _check_out_folder(out: str, overwrite: bool) -> None:
    """``--out``: a folder (created if missing) that holds no checkpoint unless --overwrite;
    checked before anything is written."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise CommandError(f"--out {out}: exists and is not a folder; give a folder (it is "
                           f"created if missing)")
    if overwrite or not os.path.isdir(out):
        return
    old = sorted(f for f in os.listdir(out) if f == "config.json"
                 or (f.startswith("model") and f.endswith((".safetensors", ".index.json"))))
    if old:
        shown = ", ".join(old[:3]) + (", ..." if len(old) > 3 else "")
        raise CommandError(f"--out {out}: already holds checkpoint files ({shown}); add "
                           f"--overwrite to replace them, or give an empty folder")


def _inspect(args) -> int:
    from .loader import plan

    lacking = _lacks_a_checkpoint(args.source)
    if lacking:  # read, and not a drafter: exit 3, as documented
        print(f"mtp inspect: error: {args.source}: {lacking}: not a checkpoint folder",
              file=sys.stderr)
        return EXIT_NOT_MTP
    p = plan(args.source, revision=args.revision, cache_dir=args.cache_dir, token=args.token)
    if args.json:
        print(json.dumps(_jsonable(p), indent=2))
    else:
        print(p)
    return EXIT_OK if p.ok else EXIT_NOT_MTP


def _lacks_a_checkpoint(source: str) -> str | None:
    """What a local folder lacks to be a checkpoint at all (None: a folder with a config and
    weight files, or not a local folder)."""
    if not os.path.isdir(source):
        return None
    names = os.listdir(source)
    lacking = [what for what, there in (
        ("no config.json", "config.json" in names),
        ("no .safetensors files", any(n.endswith(".safetensors") for n in names))) if not there]
    return (("an empty folder" if not names else " and ".join(lacking)) if lacking else None)


def _jsonable(obj):
    import dataclasses

    if dataclasses.is_dataclass(obj):
        out = {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if hasattr(obj, "ok"):
            out["ok"] = obj.ok
        return out
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _download(args) -> int:
    from .loader import download

    folder = download(args.repo, revision=args.revision, cache_dir=args.cache_dir,
                      token=args.token, progress=False if args.no_progress else None)
    print(folder)
    return EXIT_OK


def _bench(args) -> int:
    from .config import MTPConfig
    from .drafter import Drafter
    from .model import DeepSeekV4MTP
    from .testing import init_random_

    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    dtype = DTYPES[args.dtype] if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = MTPConfig.from_name(args.preset)
    if device.type == "cpu":
        _refuse_full_size_on_cpu(args.preset, cfg, dtype)
    backend = _backend_choice(args)
    t0 = time.perf_counter()
    model = init_random_(DeepSeekV4MTP(cfg, dtype=dtype, device=device, backend=backend),
                         seed=0)
    try:
        ops = type(model.ops).__name__  # resolved now: "triton" that cannot run says why
    except (RuntimeError, ValueError) as e:
        raise CommandError(f"--backend {backend}: {e}") from e
    setup_s = time.perf_counter() - t0
    w, k = cfg.sliding_window, args.k
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"mtp bench: preset {args.preset} (hidden {cfg.hidden_size}, {cfg.n_routed_experts} "
          f"experts), random weights (FP8 + FP4 experts, built in {setup_s:.1f} s), "
          f"{name}, {str(dtype).removeprefix('torch.')}, backend {backend} ({ops})"
          f"{' + CUDA graphs' if args.graphs else ''}, k = {k}, "
          f"median of {args.repeats}")
    print(f"{'batch':>5}  {f'catch-up {w} rows + k':>20}  {'propose (1 row + k)':>20}  "
          f"{'per draft token':>16}")
    for batch in args.batch:
        drafter = Drafter(model, max_seqs=batch, max_draft_tokens=k)
        if args.graphs:
            drafter.use_cuda_graphs(buckets=(batch,))
        ids = list(range(batch))
        catch_ups, proposals = [], []
        for r in range(args.warmup + args.repeats):
            for i in ids:  # fresh sequences each round, so every catch-up starts at position 0
                if i in drafter:
                    drafter.remove_sequence(i)
                drafter.add_sequence(i)
            catch_up = _time_call(device, partial(_propose, drafter, ids, w, k))
            step = _time_call(device, partial(_propose, drafter, ids, 1, k))
            if r >= args.warmup:
                catch_ups.append(catch_up)
                proposals.append(step)
        catch_up, step = statistics.median(catch_ups), statistics.median(proposals)
        print(f"{batch:>5}  {catch_up * 1e3:>17.2f} ms  {step * 1e3:>17.2f} ms  "
              f"{step / k * 1e3:>13.2f} ms")
    return EXIT_OK


def _refuse_full_size_on_cpu(preset: str, cfg, dtype: torch.dtype) -> None:
    from .model import DeepSeekV4MTP

    meta = DeepSeekV4MTP(cfg, dtype=dtype, device="meta")  # sizes only, nothing allocated
    size = sum(p.numel() * p.element_size() for p in meta.parameters())
    if size > BENCH_CPU_MAX_BYTES:
        raise CommandError(f"--preset {preset} on the CPU: its weights are {size / 2**30:.1f} "
                           f"GiB, and building them at random takes many minutes before the "
                           f"first timing (a full-size CPU figure says nothing about a "
                           f"deployment); run it on a CUDA device, or use --preset tiny here")


def _backend_choice(args) -> str:
    """``--backend``, or the deprecated ``--kernels`` (with a warning); checked before the
    weights are built: ``triton`` needs the mtp_kernels package."""
    backend = args.backend
    if args.kernels is not None:
        if backend is not None and backend != args.kernels:
            raise UsageError(f"--kernels {args.kernels} (deprecated) and --backend {backend} "
                             f"disagree; give --backend only", "mtp bench")
        print(f"mtp bench: warning: --kernels is deprecated; use --backend {args.kernels}",
              file=sys.stderr)
        backend = args.kernels
    backend = backend or "auto"
    if backend == "triton":
        try:
            import mtp_kernels  # noqa: F401
        except ImportError as e:
            raise CommandError(f"--backend triton: the mtp_kernels package cannot be imported "
                               f"({e}); it needs Triton and a CUDA build of torch") from e
    return backend


def _propose(drafter, ids: list[int], rows: int, k: int):
    """One call as a decode loop makes it: ``rows`` new real rows per sequence, then k drafts."""
    cfg, dev = drafter.config, drafter.device
    t = rows * len(ids)
    positions = torch.cat([torch.arange(drafter.next_position(i), drafter.next_position(i) + rows)
                           for i in ids]).to(dev)
    h = torch.randn(t, cfg.hc_dim, device=dev, dtype=drafter.model.dtype)
    next_ids = torch.randint(0, cfg.vocab_size, (t,), device=dev)
    return drafter.propose(ids, h, next_ids, positions, [rows] * len(ids), k=k)


def _time_call(device: torch.device, fn) -> float:
    """Seconds of one call, the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


# ---- entry point ---------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    debug = "--debug" in argv
    command = "mtp"
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help and --version print and exit 0
            return int(e.code or 0)
        if args.command is None:
            raise UsageError("a command is required: demo, inspect, download or bench (see "
                             "`mtp --help`)")
        command = f"mtp {args.command}"
        return args.func(args)
    except UsageError as e:
        print(f"{e.prog if e.prog != 'mtp' else command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # every failure is reported the same way
        if debug:
            traceback.print_exc()
        else:
            print(f"{command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR


def _one_line(e: Exception) -> str:
    """The exception's message (a refused checkpoint's message goes on with its list of
    problems, one per line); its type is named unless it is a value, type, file or command
    error, whose message says it all."""
    text = str(e) or type(e).__name__
    if not isinstance(e, (ValueError, TypeError, OSError, CommandError)):
        text = f"{type(e).__name__}: {text}"
    return text


if __name__ == "__main__":
    sys.exit(main())
