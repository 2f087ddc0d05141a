"""Train the tiny V4-shaped pair (a 4-block target and one MTP layer) on Python's stdlib.

    python examples/tiny_pair/train.py --out runs/pair/joint --snapshot stdlib.tar.gz
    # on a GPU: phases A and A', about 2.5 minutes on an H200 (the shipped run)

Reproduces the shipped pair from scratch (``--steps-*`` fix the step counts; without them
each phase runs for its time budget, the step count measured on its steps 2..11 and written
to the log; seed 0). The model is the library's own: ``mtp.demo.ToyTarget``
(``mtp.model.Block`` blocks) and ``mtp.model.DeepSeekV4MTP``, built in the plain weight format
with gradients enabled (the library holds inference weights with ``requires_grad=False``;
training turns it on), in float32 master weights under bf16 autocast; the blocks run with
``mtp.demo.training_ops.TrainingOps`` (the reference's math arranged for a training batch).
``train_gpu.sh`` runs phases B and B' beside A and A' for the comparison.

Phases (each saves its weights and held-out metrics as it ends):

A.  joint: target + MTP layer trained together, loss = next-token CE + 0.3 x MTP CE
    (DeepSeek-V3's lambda), the MTP layer sharing the target's embedding and head;
A'. post-hoc: a fresh MTP layer fitted against the frozen target of A (embedding and head
    frozen too, as a released model's);
B.  a target trained alone (next-token loss only) for as many steps as A;
B'. post-hoc: an MTP layer fitted against the frozen target of B.

MoE routing uses DeepSeek-V3's auxiliary-loss-free balancing: after every step each gate's
``e_score_correction_bias`` moves by 1e-3 towards the mean expert load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import corpus as corpus_lib  # noqa: E402

import mtp.model  # noqa: E402
from mtp import ops  # noqa: E402
from mtp.cache import window_index  # noqa: E402
from mtp.demo.pair_config import PAIR_CONFIG, PLAIN_NUMERICS, TARGET_LAYERS  # noqa: E402
from mtp.demo.toy_target import ToyTarget, _scale_block_outputs_  # noqa: E402
from mtp.demo.training_ops import TrainingOps  # noqa: E402
from mtp.model import DeepSeekV4MTP, Experts, StepContext  # noqa: E402
from mtp.quant import WeightFormat  # noqa: E402
from mtp.testing import init_random_  # noqa: E402

MTP_LAMBDA = 0.3
# Post-hoc fitting trains the MTP layer only: the routing biases move by load, and the shared
# head is the frozen target's.
FROZEN_IN_POSTHOC = ("e_score_correction", "shared_head.head")
BIAS_STEP = 1e-3


# ---- models ------------------------------------------------------------------------------------
def new_target(seed: int, device) -> ToyTarget:
    """Plain-format float32 target, blocks' outputs scaled by 1/sqrt(2 x layers) at init."""
    target = ToyTarget.random(PAIR_CONFIG, n_layers=TARGET_LAYERS, seed=seed,
                              block_scale=(2 * TARGET_LAYERS) ** -0.5)
    target.numerics = PLAIN_NUMERICS
    for block in target.blocks:
        block.ffn.gate.e_score_correction_bias.data.zero_()
    return target.to(device)


def new_mtp(target: ToyTarget, seed: int) -> DeepSeekV4MTP:
    """A fresh MTP layer sharing the target's embedding and head *parameters* (so the MTP
    loss trains them in the joint phase)."""
    m = DeepSeekV4MTP(PAIR_CONFIG, weight_format=WeightFormat.plain(), dtype=torch.float32,
                      numerics=PLAIN_NUMERICS)
    init_random_(m, seed=seed)
    layer = m.layer(0)
    _scale_block_outputs_(layer.mtp_block, 2 ** -0.5)
    layer.mtp_block.ffn.gate.e_score_correction_bias.data.zero_()
    m = m.to(target.device)
    m.model.embed_tokens.weight = target.embed.weight
    layer.shared_head.head.weight = target.head.weight
    return m


def trainable(*modules, skip=("e_score_correction",)) -> list[torch.nn.Parameter]:
    """Every floating parameter except the routing biases (moved by load, not by gradient)
    and names containing ``skip``, each once (the embedding and head are shared)."""
    out, seen = [], set()
    for module in modules:
        for name, p in module.named_parameters():
            if id(p) in seen or not p.is_floating_point() or any(s in name for s in skip):
                continue
            seen.add(id(p))
            p.requires_grad_(True)
            out.append(p)
    return out


def freeze(module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


class LoadTracker:
    """Counts each MoE's expert choices during a step (a pre-hook on ``MoE.forward`` that
    routes its input again, without gradients) and applies the auxiliary-loss-free bias update
    afterwards."""

    def __init__(self, *modules):
        self.counts: dict[Experts, torch.Tensor] = {}
        self.gates = {}
        self.hooks = []
        for module in modules:
            for sub in module.modules():
                if isinstance(sub, mtp.model.MoE):
                    self.gates[sub.experts] = sub.gate
                    self.hooks.append(sub.register_forward_pre_hook(self._count))

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def _count(self, moe, args):
        if not torch.is_grad_enabled():
            return  # evaluation: no step follows
        experts, gate, cfg = moe.experts, moe.gate, moe.cfg
        with torch.no_grad():
            idx, _ = ops.route(args[0], gate.weight, gate.e_score_correction_bias,
                               cfg.num_experts_per_tok, cfg.scoring_func,
                               cfg.routed_scaling_factor)
        n = gate.weight.shape[0]
        c = torch.bincount(idx.flatten(), minlength=n).float()
        self.counts[experts] = self.counts.get(experts, 0) + c

    @torch.no_grad()
    def update(self, frozen=()) -> None:
        for experts, c in self.counts.items():
            if experts in frozen:
                continue
            bias = self.gates[experts].e_score_correction_bias
            bias += BIAS_STEP * torch.sign(c.mean() - c)
        self.counts.clear()


# ---- the forward -------------------------------------------------------------------------------
def batch_rows(b: int, s: int, device):
    positions = torch.arange(s, device=device).repeat(b)
    slots = torch.arange(b, device=device).repeat_interleave(s)
    return positions, slots


def mtp_logits(m: DeepSeekV4MTP, residual, next_ids, positions, slots, ops_) -> torch.Tensor:
    """The MTP layer over a packed batch (one run of rows per sequence): row i takes the
    target's residual at i and the token at i + 1, and predicts the token at i + 2."""
    cfg, layer = PAIR_CONFIG, m.layer(0)
    h = residual.view(-1, cfg.hc_mult, cfg.hidden_size)  # [T, M*D] -> [T, M, D]
    inv_freq = ops.rope_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta, positions.device)
    window = window_index(positions, slots, cfg.sliding_window, None, positions.shape[0]) \
        if getattr(ops_, "needs_window_index", True) else None
    ctx = StepContext(ops_, positions, window, slots, None, 0, m.numerics, inv_freq)
    x, _ = layer(m.model.embed_tokens.weight, next_ids, None, h, ctx)
    return layer.logits(ops_, x)


def losses(target, m, tokens, with_target_grad: bool, autocast: bool = True, ops_=None):
    """tokens [B, S+2] -> (next-token CE, MTP CE or None, target logits, MTP logits), under
    bf16 autocast (``autocast``; float32 master weights). ``ops_``: default TrainingOps;
    ``mtp.ops.REFERENCE`` runs the inference path instead."""
    b, s = tokens.shape[0], tokens.shape[1] - 2
    positions, slots = batch_rows(b, s, tokens.device)
    ops_ = ops_ or TrainingOps(s)
    with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=autocast):
        with torch.set_grad_enabled(with_target_grad and torch.is_grad_enabled()):
            logits, residual = target.rows(tokens[:, :s].flatten(), positions, slots,
                                           ops_=ops_)
        ntp = F.cross_entropy(logits.float(), tokens[:, 1:s + 1].flatten())
        if m is None:
            return ntp, None, logits, None
        ml = mtp_logits(m, residual, tokens[:, 1:s + 1].flatten(), positions, slots, ops_)
        return ntp, F.cross_entropy(ml.float(), tokens[:, 2:].flatten()), logits, ml


# ---- data --------------------------------------------------------------------------------------
class Windows:
    def __init__(self, stream: np.ndarray, length: int, device, seed: int):
        self.data = torch.from_numpy(stream.astype(np.int64)).to(device)
        self.length = length
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def batch(self, b: int) -> torch.Tensor:
        starts = torch.randint(0, self.data.numel() - self.length, (b,), generator=self.gen,
                               device=self.data.device)
        return self.data[starts[:, None] + torch.arange(self.length, device=starts.device)]


@torch.no_grad()
def evaluate(target, m, heldout: torch.Tensor) -> dict:
    """Held-out metrics on fixed windows: bits per byte of the target, the MTP layer's CE, and
    how often the MTP layer's argmax for token i+2 equals the target's argmax for it (given the
    true token i+1): greedy acceptance of the first draft, on real text."""
    out = {"ntp_bits": 0.0, "mtp_bits": 0.0, "agree1": 0.0, "target_acc": 0.0}
    chunks = heldout.split(16)
    for chunk in chunks:
        ntp, mt, logits, ml = losses(target, m, chunk, False)
        s = chunk.shape[1] - 2
        t_arg = logits.view(chunk.shape[0], s, -1).argmax(-1)  # predicts token i+1
        out["ntp_bits"] += ntp.item() / math.log(2)
        out["target_acc"] += (t_arg == chunk[:, 1:s + 1]).float().mean().item()
        if m is not None:
            m_arg = ml.view(chunk.shape[0], s, -1).argmax(-1)  # predicts token i+2
            out["mtp_bits"] += mt.item() / math.log(2)
            out["agree1"] += (m_arg[:, :-1] == t_arg[:, 1:]).float().mean().item()
    return {k: round(v / len(chunks), 4) for k, v in out.items()}


@torch.no_grad()
def greedy_sample(target, prompt: str, n: int = 160) -> str:
    """The target's greedy continuation of ``prompt`` (a check that it writes code)."""
    from mtp.demo.tokenizer import TOKENIZER
    from mtp.speculative import generate

    tokens, _ = generate(target, None, TOKENIZER.encode(prompt), n)
    return TOKENIZER.decode(tokens)


def bigram_bits(train: np.ndarray, heldout: np.ndarray, vocab: int) -> float:
    """Held-out bits per byte of the training set's byte bigrams (add-one smoothed): the
    bar a trained target must clear."""
    counts = np.bincount(train[:-1].astype(np.int64) * vocab + train[1:], minlength=vocab ** 2)
    p = (counts.reshape(vocab, vocab) + 1.0)
    p /= p.sum(1, keepdims=True)
    return float(-np.log2(p[heldout[:-1].astype(np.int64), heldout[1:]]).mean())


# ---- the loop ----------------------------------------------------------------------------------
def run_phase(name, target, m, params, train: Windows, heldout, args, steps, budget, log,
              target_grad: bool, lam: float):
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2],
                              "weight_decay": 0.1},
                             {"params": [p for p in params if p.dim() < 2],
                              "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                            fused=torch.device(args.device).type == "cuda")
    tracker = LoadTracker(*(x for x in (target if target_grad else None, m) if x is not None))
    # steps: a count, None (from the time budget), or a callable giving another run's count
    # once it is known (None before; the lr schedule needs no count during warm-up).
    follow = steps if callable(steps) else None
    warmup, total = 50, None if follow else steps
    if total is not None:
        log({"phase": name, "event": "steps", "steps": total})
    t0 = t_mark = time.perf_counter()
    step = 0
    while total is None or step < total:
        waited = time.monotonic()
        while follow is not None and total is None:
            total = follow()
            if total is None and step < 12:
                break  # the other run announces its count at its step 12 (see below)
            if total is None:
                if time.monotonic() - waited > 300:
                    raise RuntimeError(f"phase {name}: no step count to follow after 300 s")
                time.sleep(0.2)
        if total is None and follow is None and step == 12:  # steps 2..11 timed (the first
            # ones compile and allocate)
            _sync(args.device)
            per = (time.perf_counter() - t_mark) / 10
            total = max(100, min(args.max_steps, int(budget / per)))
            log({"phase": name, "event": "steps", "seconds_per_step": round(per, 4),
                 "steps": total})
        if step == 2:
            _sync(args.device)
            t_mark = time.perf_counter()
        horizon = total or args.max_steps
        lr_scale = min(1.0, (step + 1) / warmup) * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / horizon))))
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_scale
        tokens = train.batch(args.batch)
        ntp, mt, _, _ = losses(target, m, tokens, target_grad)
        loss = (ntp if target_grad else 0) + (lam * mt if mt is not None else 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        tracker.update()
        if step % args.log_every == 0 or step == (total or 0) - 1:
            rec = {"phase": name, "step": step, "ntp": round(ntp.item(), 4),
                   "lr": round(args.lr * lr_scale, 6), "grad_norm": round(norm.item(), 3),
                   "time": round(time.perf_counter() - t0, 2)}
            if mt is not None:
                rec["mtp"] = round(mt.item(), 4)
            log(rec)
        step += 1
    _sync(args.device)
    tracker.close()
    seconds = time.perf_counter() - t0
    metrics = evaluate(target, m, heldout)
    sample = greedy_sample(target, args.sample_prompt, args.sample_tokens)
    log({"phase": name, "event": "done", "steps": step, "seconds": round(seconds, 1),
         "tokens_per_second": round(step * args.batch * args.seq / seconds),
         "heldout": metrics, "greedy": sample})
    return metrics


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def save(module_or_state, path):
    state = module_or_state if isinstance(module_or_state, dict) else \
        module_or_state.state_dict()
    out = {}
    for k, v in state.items():
        v = v.detach().cpu()
        # matrices as bf16 (the release's precision before FP8/FP4); norms, hc mixes, gates,
        # biases and sinks in float32
        if v.is_floating_point() and v.dim() >= 2 and "hc_" not in k and "gate" not in k:
            v = v.to(torch.bfloat16)
        out[k] = v.contiguous()
    torch.save(out, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for weights, log and metrics")
    ap.add_argument("--snapshot", help="corpus snapshot (tar.gz); default: this Python's stdlib")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout-windows", type=int, default=64)
    ap.add_argument("--max-steps", type=int, default=20000)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--phases", default="A,A'", help="of A, A', B, B' (comma-separated)")
    ap.add_argument("--match-steps", metavar="LOG",
                    help="phase B runs as many steps as phase A in this other run's log "
                         "(two processes sharing one GPU); waits for it")
    ap.add_argument("--sample-prompt", default="import os\n\n\ndef ",
                    help="the text each phase's greedy sample continues")
    ap.add_argument("--sample-tokens", type=int, default=160)
    for phase, budget in (("joint", 95), ("posthoc", 20), ("alone", 95)):
        ap.add_argument(f"--steps-{phase}", type=int, default=None)
        ap.add_argument(f"--budget-{phase}", type=float, default=budget,
                        help="seconds, when --steps-* is not given")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    logf = open(os.path.join(args.out, "train_log.jsonl"), "w")

    def log(rec):
        print(json.dumps(rec), flush=True)
        logf.write(json.dumps(rec) + "\n")
        logf.flush()

    data = corpus_lib.load(args.snapshot)
    # the output folder as given when relative; only its name when absolute (a log names no
    # machine's paths)
    shown = vars(args) | {"out": args.out if not os.path.isabs(args.out)
                          else os.path.basename(args.out)}
    info = {"corpus": data.describe(), "args": shown, "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    log({"event": "start", **info})
    train = Windows(data.stream("train"), args.seq + 2, device, args.seed)
    held = Windows(data.stream("heldout"), args.seq + 2, device, args.seed + 1)
    heldout = held.batch(args.heldout_windows)
    bits = bigram_bits(data.stream("train"), data.stream("heldout"), PAIR_CONFIG.vocab_size)
    log({"event": "bigram", "heldout_bits": round(bits, 4)})
    phases = args.phases.split(",")
    summary = {"info": info, "bigram_heldout_bits": round(bits, 4)}

    target = new_target(args.seed, device)
    if "A" in phases:
        m = new_mtp(target, args.seed + 1)
        params = trainable(target, m)
        summary["A"] = run_phase("A", target, m, params, train, heldout, args,
                                 args.steps_joint, args.budget_joint, log, True, MTP_LAMBDA)
        summary["steps_A"] = _last_steps(args.out, "A")
        save(target, os.path.join(args.out, "target_A.pt"))
        save(m, os.path.join(args.out, "mtp_A_joint.pt"))
    if "A'" in phases:
        freeze(target)
        m = new_mtp(target, args.seed + 2)
        freeze(m)
        params = trainable(m.layer(0), skip=FROZEN_IN_POSTHOC)  # not the shared embedding and head
        summary["A'"] = run_phase("A'", target, m, params, train, heldout, args,
                                  args.steps_posthoc, args.budget_posthoc, log, False, 1.0)
        save(m, os.path.join(args.out, "mtp_A_posthoc.pt"))
    if "B" in phases:
        target_b = new_target(args.seed, device)
        params = trainable(target_b)
        steps = args.steps_alone or summary.get("steps_A") or (
            args.match_steps and (lambda: _announced_steps(args.match_steps, "A")))
        summary["B"] = run_phase("B", target_b, None, params, train, heldout, args, steps,
                                 args.budget_alone, log, True, 0.0)
        save(target_b, os.path.join(args.out, "target_B.pt"))
        if "B'" in phases:
            freeze(target_b)
            m = new_mtp(target_b, args.seed + 2)
            freeze(m)
            params = trainable(m.layer(0), skip=FROZEN_IN_POSTHOC)
            summary["B'"] = run_phase("B'", target_b, m, params, train, heldout, args,
                                      args.steps_posthoc, args.budget_posthoc, log, False,
                                      1.0)
            save(m, os.path.join(args.out, "mtp_B_posthoc.pt"))
    log({"event": "end", "summary": summary})
    logf.close()
    return 0


def _announced_steps(log_path: str, phase: str) -> int | None:
    """The step count another run's log announces for ``phase`` (its "steps" event), or
    None while it has not."""
    if os.path.exists(log_path):
        with open(log_path) as f:
            for line in f:
                rec = json.loads(line) if line.endswith("\n") else {}
                if rec.get("phase") == phase and rec.get("event") in ("steps", "done"):
                    return rec["steps"]
    return None


def _last_steps(out: str, phase: str) -> int | None:
    with open(os.path.join(out, "train_log.jsonl")) as f:
        for line in reversed(f.readlines()):
            rec = json.loads(line)
            if rec.get("phase") == phase and rec.get("event") == "done":
                return rec["steps"]
    return None


if __name__ == "__main__":
    sys.exit(main())
