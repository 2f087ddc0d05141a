"""transformers' ``DeepseekV4ForCausalLM`` as a target of :func:`mtp.speculative.generate`.

transformers runs DeepSeek-V4 but drops its MTP weights on load; :class:`TransformersTarget`
wraps such a model so the library's speculative loop can drive it with the MTP drafter loaded
from the release folder::

    target = TransformersTarget(model)                  # a DeepseekV4ForCausalLM
    drafter = target.load_drafter("deepseek-ai/DeepSeek-V4-Flash")   # embedding and head shared
    tokens, stats = target.generate(drafter, prompts, max_new_tokens=64, k=3)

What it hands the loop, per sequence, and how (each is a trap when done by hand):

- **residuals**: the input of ``model.model.hc_head`` (a forward pre-hook), i.e. the last
  decoder block's output, [T, hc_mult, D] flattened to [T, hc_mult*D]. Not
  ``output_hidden_states``: its last entry is the normalised final output [T, D] and the one
  before it is the *previous* block's output, which has the right shape and drafts badly. Each
  prefill checks that the captured rows reproduce the model's logits through its own
  ``hc_head``, ``norm`` and ``lm_head`` (:func:`check_residuals`).
- **logits** of every new token, float32.
- **rollback** after partial acceptance, per sequence. Each sequence has its own
  ``DynamicCache`` (its batch dimension is 1): transformers' cache keeps one length for the
  whole batch, and V4's compressors close their windows at positions shared by the batch, so
  sequences that accept different numbers of drafts cannot share one. Per layer type:
  sliding-window layers are cropped (with ``activate_past_recording``, so the window can be
  restored); compressed layers (CSA / HCA: compressor buffers, emitted entries, overlap state)
  cannot be cropped, so their state is kept as it was before the last forward (the tensors are
  replaced, never written in place, so this costs no copy) and restored; the accepted tokens are
  then re-run at the front of the next ``extend`` (no extra forward call).

A sequence runs one forward per call (the cost of one cache per sequence); outputs are stacked.

Shape legend: B sequences, T tokens per call, V vocabulary, M hc_mult, D hidden_size.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..drafter import Drafter
from ..sampling import GREEDY, Sampling
from ..speculative import TargetOutput

_INSTALL = "pip install 'mtp[transformers]'"

# The cache layer types whose crop() is known to be exact (and tested): everything else, V4's
# compressed layers included, is restored from the state kept before the last forward.
_CROPPABLE = ("DynamicLayer", "DynamicSlidingWindowLayer")


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(f"mtp.integrations.transformers needs transformers ({exc}); "
                          f"install it with: {_INSTALL}") from exc
    return transformers


def _check_model(model: Any) -> None:
    inner = getattr(model, "model", None)
    ok = (isinstance(model, torch.nn.Module) and inner is not None
          and isinstance(getattr(inner, "hc_head", None), torch.nn.Module)
          and hasattr(inner, "layers") and hasattr(model, "lm_head"))
    if not ok:
        raise TypeError(f"model: expected a transformers DeepseekV4ForCausalLM (with "
                        f".model.hc_head and .lm_head), got {type(model).__name__}")


@contextmanager
def _capture_residuals(model):
    """Record what the last decoder block returns and what ``hc_head`` receives; they must be
    the same tensor [B, T, M, D] (else the adapter would read something else than the
    pre-``hc_head`` residual, and says so)."""
    seen: dict[str, torch.Tensor] = {}
    pre = model.model.hc_head.register_forward_pre_hook(
        lambda _m, args: seen.__setitem__("hc_head_input", args[0]))
    post = model.model.layers[-1].register_forward_hook(
        lambda _m, _a, out: seen.__setitem__("last_block", out[0] if isinstance(out, tuple)
                                             else out))
    try:
        yield seen
    finally:
        pre.remove()
        post.remove()


def _residual_rows(seen: dict, model, n: int) -> torch.Tensor:
    cfg = model.config
    x = seen.get("hc_head_input")
    if x is None:
        raise RuntimeError("model.model.hc_head was not called during the forward: this "
                           "transformers version computes the output differently; the adapter "
                           "cannot find the pre-hc_head residual")
    expected = (1, n, cfg.hc_mult, cfg.hidden_size)
    if tuple(x.shape) != expected or seen.get("last_block") is not x:
        got = seen.get("last_block")
        raise RuntimeError(
            f"hc_head received {list(x.shape)}, expected the last decoder block's output "
            f"{list(expected)} (and the very same tensor; the block returned "
            f"{None if got is None else list(got.shape)}): this transformers version puts "
            "something between them, so these are not the residuals the drafter was trained on")
    return x[0].flatten(1)  # [T, M, D] -> [T, M*D]


@torch.no_grad()
def check_residuals(model, residuals: torch.Tensor, logits: torch.Tensor, *,
                    rtol: float = 1e-2) -> None:
    """Raise if ``residuals`` are not the pre-``hc_head`` residuals behind ``logits``.

    For anyone feeding the drafter from their own transformers loop: the true residual gives
    the model's logits back through ``hc_head``, ``norm`` and ``lm_head``; a neighbour such as
    ``output_hidden_states[-2]`` (the previous block's output: same shape) does not.

    Args:
        model: the ``DeepseekV4ForCausalLM`` that produced both.
        residuals: [T, M*D] or [T, M, D] (or with a leading batch dimension of 1).
        logits: [T, V] the model's logits for the same rows (or [1, T, V]).
        rtol: allowed relative error of the recomputed logits (norm over all rows); the true
            residual recomputes to ~1e-6 (float32) / ~1e-3 (bfloat16), a wrong tensor to ~1.

    Example:
        >>> check_residuals(model, h.flatten(1), out.logits[0])  # doctest: +SKIP
    """
    _check_model(model)
    cfg = model.config
    m, d = cfg.hc_mult, cfg.hidden_size
    if residuals.dim() >= 3 and tuple(residuals.shape[-2:]) == (m, d):
        h = residuals.reshape(-1, m, d)  # [..., M, D] -> [T, M, D]
    elif residuals.shape[-1] == m * d:
        h = residuals.reshape(-1, m, d)  # [..., M*D] -> [T, M, D]
    else:
        what = ("the normalised final output (output_hidden_states[-1])"
                if residuals.shape[-1] == d else "not a residual")
        raise ValueError(f"residuals: expected [T, hc_mult*hidden_size] = [T, {m * d}] or "
                         f"[T, {m}, {d}], got {list(residuals.shape)}: {what}")
    lg = logits.reshape(-1, logits.shape[-1])
    if lg.shape[0] != h.shape[0]:
        raise ValueError(f"logits: {lg.shape[0]} rows for {h.shape[0]} residual rows")
    again = model.lm_head(model.model.norm(model.model.hc_head(h[None])))[0].float()
    err = ((again - lg.float()).norm() / lg.float().norm().clamp_min(1e-30)).item()
    if not err <= rtol:
        raise ValueError(
            f"residuals: they do not reproduce the model's logits through hc_head, norm and "
            f"lm_head (relative error {err:.3g} > {rtol}): these are not the pre-hc_head "
            "residuals. output_hidden_states[-2] is the previous block's output, not the last "
            "one; read the input of model.model.hc_head (a forward pre-hook) instead, or use "
            "mtp.integrations.transformers.TransformersTarget")


# ---- per-sequence state --------------------------------------------------------------------
def _layer_state(state: dict) -> dict:
    """A cache layer's attributes with their containers copied one level: its tensors are
    replaced by the layer's updates, never written in place, so references make a snapshot."""
    return {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
            for k, v in state.items()}


def _restore_layer(layer, state: dict) -> None:
    vars(layer).clear()
    vars(layer).update(_layer_state(state))  # copied again: it may be restored once more


@dataclass
class _Seq:
    cache: Any                    # a transformers DynamicCache of batch 1
    croppable: list[bool]         # per cache layer: cropped (True) or restored (False)
    cached: int = 0               # tokens in the cache
    pending: list[int] = field(default_factory=list)  # accepted, not in the cache yet
    start: int = 0                # the cache length before the last forward
    last_run: list[int] = field(default_factory=list)  # the tokens of the last forward
    before: list = field(default_factory=list)  # per layer: its state at `start` (restored ones)
    floor: int = 0                # the shortest length a rollback may ask for

    @property
    def length(self) -> int:
        return self.cached + len(self.pending)


class TransformersTarget:
    """A transformers ``DeepseekV4ForCausalLM`` as a target of :func:`mtp.speculative.generate`.

    Implements the target protocol (``prefill`` / ``extend`` / ``rollback``, ``hc_dim``,
    ``vocab_size``) for B sequences at once, and builds the matching drafter.

    Args:
        model: a ``DeepseekV4ForCausalLM`` (eval mode is set; any dtype and device).
        check_residuals: at every prefill, check that the captured residuals reproduce the
            model's logits (:func:`check_residuals`); costs one extra head computation.

    Example:
        >>> from transformers import DeepseekV4ForCausalLM                    # doctest: +SKIP
        >>> model = DeepseekV4ForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)  # doctest: +SKIP
        >>> target = TransformersTarget(model)                                # doctest: +SKIP
        >>> drafter = target.load_drafter(folder)                             # doctest: +SKIP
        >>> tokens, stats = target.generate(drafter, [[1, 2, 3]], 32, k=3)    # doctest: +SKIP
    """  # noqa: E501

    def __init__(self, model, *, check_residuals: bool = True):
        _transformers()
        _check_model(model)
        self.model = model.eval()
        cfg = model.config
        self.hc_dim = cfg.hc_mult * cfg.hidden_size
        self.vocab_size = cfg.vocab_size
        self.check = check_residuals
        self._seqs: list[_Seq] = []
        self._drafters: list[weakref.ref] = []
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # ---- the target protocol ---------------------------------------------------------------
    @property
    def lengths(self) -> list[int]:
        """Tokens each sequence holds."""
        return [s.length for s in self._seqs]

    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> list[TargetOutput]:
        """Start B new sequences (dropping the earlier ones); output i holds prompt i's rows:
        logits [1, n_i, V] float32, residuals [1, n_i, M*D] in the model's dtype."""
        if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Sequence) or not prompts:
            raise ValueError("prompts: expected a non-empty list of token-id lists")
        rows = [self._token_list(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
        self._check_drafters()
        self._seqs = []
        seqs = [self._new_seq() for _ in rows]
        with self._dropping_on_failure("prefill"):
            outs = [self._run(seq, tokens, check=self.check) for seq, tokens in zip(seqs, rows)]
        self._seqs = seqs
        return [TargetOutput(logits[None], residuals[None]) for logits, residuals in outs]

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor) -> TargetOutput:
        """tokens [B, T]: append T tokens to every sequence; logits [B, T, V] float32 and
        residuals [B, T, M*D] of those tokens."""
        b = len(self._seqs)
        if not b:
            raise RuntimeError("extend: no sequences; call prefill first")
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[0] != b \
                or tokens.shape[1] < 1:
            got = list(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens: expected [B, T] = [{b}, T >= 1] (one row per sequence), "
                             f"got {got}")
        if tokens.is_floating_point() or tokens.dtype == torch.bool:
            raise TypeError(f"tokens: expected integer token ids, got {tokens.dtype}")
        rows = [self._token_list(r, f"tokens[{i}]") for i, r in enumerate(tokens.tolist())]
        self._check_drafters()
        with self._dropping_on_failure("extend"):
            logits, residuals = zip(*(self._run(s, r) for s, r in zip(self._seqs, rows)))
        return TargetOutput(torch.stack(logits), torch.stack(residuals))

    @torch.no_grad()
    def rollback(self, lengths: Sequence[int]) -> None:
        """Sequence b keeps its first ``lengths[b]`` tokens. A rollback reaches back at most to
        where the last ``extend`` (or the prefill) started; all lengths are checked first."""
        if len(lengths) != len(self._seqs):
            raise ValueError(f"lengths: {len(lengths)} values for {len(self._seqs)} sequences")
        for i, (seq, n) in enumerate(zip(self._seqs, lengths)):
            if not isinstance(n, int) or isinstance(n, bool) or not seq.floor <= n <= seq.length:
                raise ValueError(
                    f"lengths[{i}]: {n!r} is outside [{seq.floor}, {seq.length}]: a sequence "
                    f"keeps at most its {seq.length} tokens and goes back at most to where the "
                    f"last extend started ({seq.floor})")
        for seq, n in zip(self._seqs, lengths):
            self._rollback(seq, n)

    # ---- the drafter -----------------------------------------------------------------------
    def load_drafter(self, path_or_repo_id, *, max_seqs: int = 64, max_draft_tokens: int = 4,
                     dtype: torch.dtype | None = None, **load_kwargs) -> Drafter:
        """The MTP drafter from the **release** folder or Hub repo id (transformers'
        ``save_pretrained`` folders have no MTP layer), on the model's device and in its dtype
        (or ``dtype``), sharing the model's embedding and ``lm_head`` (no copies). If the model
        is cast or moved afterwards, the next call of this target raises: build the drafter
        again then.

        Example:
            >>> drafter = target.load_drafter("deepseek-ai/DeepSeek-V4-Flash")  # doctest: +SKIP
        """
        embed, head = self._shared()
        drafter = Drafter.from_pretrained(
            path_or_repo_id, device=embed.device, dtype=dtype or embed.dtype, max_seqs=max_seqs,
            max_draft_tokens=max_draft_tokens, embed_tokens=embed, head=head, **load_kwargs)
        self.check_drafter(drafter)
        self._drafters.append(weakref.ref(drafter))
        return drafter

    def check_drafter(self, drafter: Drafter) -> None:
        """Raise unless ``drafter`` fits this model: same hidden size, hc_mult and vocabulary,
        and its embedding and head are the model's current tensors (not left behind by a
        ``model.to(...)`` after the drafter was built)."""
        if not isinstance(drafter, Drafter):
            raise TypeError(f"drafter: expected a mtp.Drafter, got {type(drafter).__name__}")
        cfg, dc = self.model.config, drafter.config
        for key in ("hidden_size", "hc_mult", "vocab_size"):
            if getattr(cfg, key) != getattr(dc, key):
                raise ValueError(f"drafter: {key} = {getattr(dc, key)} but the model has "
                                 f"{getattr(cfg, key)}: the drafter belongs to another model")
        embed, head = self._shared()
        mine = drafter.model.model.embed_tokens.weight
        theirs = drafter.model.layer(0).shared_head.head.weight
        for name, now, held in (("embedding", embed, mine), ("lm_head", head, theirs)):
            if held.data_ptr() != now.data_ptr() or held.dtype != now.dtype \
                    or held.device != now.device:
                raise RuntimeError(
                    f"drafter: its {name} is not the model's current one (the drafter holds "
                    f"{held.dtype} on {held.device}, the model now has {now.dtype} on "
                    f"{now.device}, different storage): the model was cast or moved (e.g. "
                    "model.to(torch.bfloat16)) after the drafter was built, or the drafter was "
                    "built without embed_tokens=/head= of this model. Build it again: "
                    "target.load_drafter(folder)")

    def generate(self, drafter: Drafter | None, prompt_ids, max_new_tokens: int, *, k: int = 3,
                 sampling: Sampling = GREEDY, generator: torch.Generator | None = None):
        """:func:`mtp.speculative.generate` with this target, after :meth:`check_drafter`.

        Example:
            >>> tokens, stats = target.generate(drafter, [[5, 6, 7]], 16, k=3)  # doctest: +SKIP
        """
        if drafter is not None:
            self.check_drafter(drafter)
        from ..speculative import generate

        return generate(self, drafter, prompt_ids, max_new_tokens, k=k, sampling=sampling,
                        generator=generator)

    # ---- internals -------------------------------------------------------------------------
    def _shared(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.model.get_input_embeddings().weight,
                self.model.get_output_embeddings().weight)

    def _check_drafters(self) -> None:
        """Every drafter built by :meth:`load_drafter` and still alive must see the model's
        current embedding and head (a cast or move of the model leaves it on the old ones)."""
        self._drafters = [ref for ref in self._drafters if ref() is not None]
        for ref in self._drafters:
            drafter = ref()
            if drafter is not None:
                self.check_drafter(drafter)

    def _token_list(self, row, name: str) -> list[int]:
        if isinstance(row, torch.Tensor):
            row = row.tolist()
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence) or not row:
            raise ValueError(f"{name}: expected a non-empty list of token ids")
        for t in row:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size:
                raise ValueError(f"{name}: token {t!r} is not an id in [0, {self.vocab_size})")
        return list(row)

    def _new_seq(self) -> _Seq:
        cache = _transformers().DynamicCache(config=self.model.config)
        croppable = [type(layer).__name__ in _CROPPABLE for layer in cache.layers]
        for layer, crop in zip(cache.layers, croppable):
            if crop and hasattr(layer, "activate_past_recording"):
                layer.activate_past_recording()  # keep the states a crop needs to go back
        return _Seq(cache, croppable)

    def _run(self, seq: _Seq, tokens: list[int], check: bool = False):
        """Forward the sequence's pending tokens and then ``tokens``; returns (logits [T, V]
        float32, residuals [T, M*D]) of ``tokens``."""
        run = seq.pending + tokens
        self._settle(seq)
        before = [None if crop else _layer_state(vars(layer))
                  for layer, crop in zip(seq.cache.layers, seq.croppable)]
        device = self.model.get_input_embeddings().weight.device
        ids = torch.tensor([run], device=device)
        positions = torch.arange(seq.cached, seq.cached + len(run), device=device)[None]
        with _capture_residuals(self.model) as seen:
            out = self.model(input_ids=ids, position_ids=positions, use_cache=True,
                             **{self._cache_kw: seq.cache})
        residuals = _residual_rows(seen, self.model, len(run))
        seq.start, seq.last_run, seq.before = seq.cached, run, before
        seq.floor = seq.length  # the pending tokens were accepted already
        seq.cached += len(run)
        seq.pending = []
        if check:
            check_residuals(self.model, residuals, out.logits[0])
        n = len(tokens)
        return out.logits[0, -n:].float(), residuals[-n:]

    @contextmanager
    def _dropping_on_failure(self, call: str):
        """A forward that fails (out of memory, a check) may leave caches half-written, some
        sequences extended and others not: drop them all rather than keep corrupt state."""
        try:
            yield
        except Exception as exc:
            self._seqs = []
            raise RuntimeError(f"{call}: {type(exc).__name__}: {exc} (the sequences were "
                               "dropped, since their caches may be half-written; prefill "
                               "again)") from exc

    def _settle(self, seq: _Seq) -> None:
        """Bring recorded sliding-window layers back to their window (they keep every state
        since the last crop so that a crop can go back)."""
        for layer, crop in zip(seq.cache.layers, seq.croppable):
            if crop and getattr(layer, "is_initialized", False):
                layer.crop(0)

    def _rollback(self, seq: _Seq, n: int) -> None:
        if n == seq.length:
            return
        if all(seq.croppable):  # every layer goes back by itself: nothing to re-run
            for layer in seq.cache.layers:
                layer.crop(-(seq.cached - n))
            seq.cached = seq.floor = n  # a crop cannot be undone: no going further back
            return
        for layer, crop, state in zip(seq.cache.layers, seq.croppable, seq.before):
            if crop:
                layer.crop(-(seq.cached - seq.start))
            else:
                _restore_layer(layer, state)
        # Back at `start`: the accepted tokens are re-run in front of the next extend. The
        # kept states stay valid, so a later rollback may still go back to `floor`.
        seq.cached = seq.start
        seq.pending = seq.last_run[:n - seq.start]


__all__ = ["TransformersTarget", "check_residuals"]
