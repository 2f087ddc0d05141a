"""Two naive drafters, to put the MTP layer's acceptance in context. Both have the Drafter's
``add_sequence`` / ``remove_sequence`` / ``propose`` surface, so ``mtp.speculative.generate``
runs them unchanged.

- :class:`LastRowDrafter`: the MTP layer fed only the newest verified row (no catch-up of the
  earlier rows: its KV cache then holds no context before that row).
- :class:`BigramDrafter`: drafts by the training set's byte bigram statistics.
"""

from __future__ import annotations

import numpy as np
import torch

from mtp.drafter import Drafter, Proposal
from mtp.sampling import Sampling, sample


class LastRowDrafter:
    def __init__(self, drafter: Drafter):
        self.inner = drafter
        self.max_draft_tokens, self.max_seqs = drafter.max_draft_tokens, drafter.max_seqs

    def add_sequence(self, seq_id, position: int = 0) -> None:
        self.inner.add_sequence(seq_id, position)

    def remove_sequence(self, seq_id) -> None:
        self.inner.remove_sequence(seq_id)

    def __contains__(self, seq_id) -> bool:
        return seq_id in self.inner

    def propose(self, seq_ids, hidden_states, input_ids, positions, num_rows_per_seq, *, k,
                sampling: Sampling) -> Proposal:
        last = torch.tensor(num_rows_per_seq).cumsum(0) - 1  # each sequence's newest row
        for seq_id, p in zip(seq_ids, positions[last].tolist()):
            self.inner.remove_sequence(seq_id)  # forget the cache: no context before p
            self.inner.add_sequence(seq_id, position=p)
        return self.inner.propose(seq_ids, hidden_states[last], input_ids[last],
                                  positions[last], [1] * len(seq_ids), k=k, sampling=sampling)


class BigramDrafter:
    """Drafts d_{j+1} from P(next byte | d_j) counted on the training stream (add-one
    smoothed), starting from the sequence's newest token."""

    max_draft_tokens, max_seqs = 8, 1 << 30

    def __init__(self, stream: np.ndarray, vocab: int):
        a, b = stream[:-1].astype(np.int64), stream[1:].astype(np.int64)
        counts = np.bincount(a * vocab + b, minlength=vocab * vocab).reshape(vocab, vocab)
        self.logits = torch.from_numpy(np.log(counts + 1.0)).float()  # log-probs up to a const
        self._seqs: set = set()

    def add_sequence(self, seq_id, position: int = 0) -> None:
        self._seqs.add(seq_id)

    def remove_sequence(self, seq_id) -> None:
        self._seqs.discard(seq_id)

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._seqs

    def propose(self, seq_ids, hidden_states, input_ids, positions, num_rows_per_seq, *, k,
                sampling: Sampling) -> Proposal:
        last = torch.tensor(num_rows_per_seq).cumsum(0) - 1
        token = input_ids[last].cpu()
        drafts, probs = [], []
        for _ in range(k):
            token, q = sample(self.logits[token], sampling)
            drafts.append(token)
            probs.append(q)
        return Proposal(torch.stack(drafts, 1),
                        None if probs[0] is None else torch.stack(probs, 1), None)
