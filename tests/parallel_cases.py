"""What the tensor-parallel tests run, the same code in every rank of a group and in one process
(``process_group=None``): one forward, then a drafting loop over three sequences with
rollback, greedy and sampled. Returns plain tensors to compare."""

from __future__ import annotations

import torch

from mtp import Drafter, Numerics, Sampling

ROUNDING = {"on": Numerics(), "off": Numerics(act_quant=False, kv_fp8=False)}


def resident_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of memory each parameter keeps alive: its whole storage (a view into a larger
    tensor would count the larger tensor), each storage counted once."""
    out, seen = {}, set()
    for name, p in model.named_parameters():
        st = p.untyped_storage()
        out[name] = 0 if st.data_ptr() in seen else st.nbytes()
        seen.add(st.data_ptr())
    return out


def run_case(path: str, process_group, dtype: torch.dtype, rounding: str = "on",
             rounds: int = 4, k: int = 3) -> dict:
    drafter = Drafter.from_pretrained(path, device="cpu", dtype=dtype, max_seqs=3,
                                      max_draft_tokens=k, numerics=ROUNDING[rounding],
                                      process_group=process_group)
    out: dict = {"bytes": resident_bytes(drafter.model), "read": drafter.load_report.bytes,
                 "shared_split": drafter.model.layer(0).mtp_block.ffn.shared_experts.split}
    return {**out, **play(drafter, rounds, k)}


def play(drafter: Drafter, rounds: int = 4, k: int = 3) -> dict:
    """One forward with logits, then the drafting loop (3 sequences, rollback, greedy and
    sampled rounds), on the drafter's device; results on the CPU."""
    model, cfg, dev, dtype = drafter.model, drafter.config, drafter.device, drafter.model.dtype
    gen = torch.Generator().manual_seed(0)

    def rows(n: int):
        h = torch.randn(n, cfg.hc_dim, generator=gen, dtype=torch.float64).to(dtype)
        return h.to(dev), torch.randint(0, cfg.vocab_size, (n,), generator=gen).to(dev)

    out: dict = {}
    h, ids = rows(7)
    with torch.no_grad():
        out["block"] = model(ids, torch.arange(7, device=dev), h)  # [T, M*D]
        out["logits"] = model.compute_logits(out["block"])  # [T, V]

    # Drafting: 3 sequences with different histories; each round feeds every sequence's new
    # real rows (the verified tokens: some drafts accepted, the draft cache rolled back) and
    # drafts k tokens; rounds alternate greedy and sampled (same seeded generator everywhere).
    seqs = ["a", "b", "c"]
    for i, s in enumerate(seqs):
        drafter.add_sequence(s, position=3 * i)
    new_rows = [5, 2, 9]
    sampled = Sampling(temperature=0.8, top_p=0.9,
                       generator=torch.Generator(device=dev).manual_seed(5))
    last_drafts = None
    for r in range(rounds):
        hs, idss, poss = [], [], []
        for j, s in enumerate(seqs):
            h, ids = rows(new_rows[j])
            if last_drafts is not None:  # the accepted drafts are the next tokens
                a = new_rows[j] - 1
                ids[:a] = last_drafts[j, :a]
            start = drafter.next_position(s)
            hs.append(h)
            idss.append(ids)
            poss.append(torch.arange(start, start + new_rows[j], device=dev))
        p = drafter.propose(seqs, torch.cat(hs), torch.cat(idss), torch.cat(poss), new_rows,
                            k=k, sampling=sampled if r % 2 else Sampling())
        out[f"round{r}.drafts"] = p.drafts
        out[f"round{r}.hidden"] = p.hidden
        if p.probs is not None:
            out[f"round{r}.probs"] = p.probs
        last_drafts = p.drafts
        new_rows = [1 + (r + j) % (k + 1) for j in range(len(seqs))]  # 0..k drafts accepted
    out["cache.kv"] = drafter.cache.kv.clone()
    return {key: v.cpu() for key, v in out.items()}


def run_nan_case(path: str, process_group, rank: int) -> dict:
    """NaN logits on ONE rank's vocabulary slice (a NaN row in rank 1's part of the head):
    greedy drafting must refuse on every rank together (the ranks agree on the flag), with the
    drafter as before the call; the head mended, the same call then runs."""
    drafter = Drafter.from_pretrained(path, device="cpu", dtype=torch.float32, max_seqs=2,
                                      max_draft_tokens=3, process_group=process_group)
    cfg = drafter.config
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(6, cfg.hc_dim, generator=gen)
    ids = torch.randint(0, cfg.vocab_size, (6,), generator=gen)
    drafter.add_sequence("a")
    drafter.propose(["a"], h[:4], ids[:4], torch.arange(4), [4], k=3)
    before = (drafter.cache.kv.clone(), drafter.cache.pos.clone(), drafter.next_position("a"))
    head = drafter.model.layer(0).shared_head.head.weight  # this rank's rows [V/w, D]
    keep = head.clone()
    if rank == 1:
        head[0] = float("nan")
    message = "no error"
    try:
        drafter.propose(["a"], h[4:], ids[4:], torch.arange(4, 6), [2], k=3)
    except ValueError as e:
        message = str(e)
    unchanged = (torch.equal(before[0], drafter.cache.kv)
                 and torch.equal(before[1], drafter.cache.pos)
                 and before[2] == drafter.next_position("a") and drafter.seq_ids == ["a"])
    head.copy_(keep)
    after = drafter.propose(["a"], h[4:], ids[4:], torch.arange(4, 6), [2], k=3).drafts
    return {"message": message, "unchanged": unchanged, "after": after}
