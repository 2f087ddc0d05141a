"""The host side of a graphed ``Drafter.propose`` (everything but the replay), on the CPU: how
a call is staged into its bucket's buffers, how few torch operations a steady call
dispatches (each one is a launch, a copy or an allocation on CUDA, ~5-15 us of host time
there), and what a call that fails after staging leaves behind.

The program runs once when its bucket is made (real outputs); its "replay" is then a no-op,
as a captured graph's replay is one launch for the host. What the programs compute is tested
in tests/test_propose_program.py.
"""

from __future__ import annotations

import pytest
import torch
from drafter_helpers import bucket_rows, drafter, rows
from hypothesis import given, settings
from hypothesis import strategies as st

from mtp.drafter import MAX_ABS_HIDDEN
from mtp.propose_program import ProposeBuckets, ProposeProgram
from mtp.sampling import Sampling
from mtp.testing import CountOps, HostOnlyProposal, host_only


def stubbed(max_seqs: int = 4, n_seqs: int = 4):
    d = host_only(drafter(max_seqs=max_seqs))
    for s in range(n_seqs):
        d.add_sequence(s, position=10 * s)
    return d


def call(d, seq_ids, counts, ids_dtype=torch.int64):
    h, ids, _ = rows(sum(counts), 1)
    pos = torch.cat([torch.arange(d.next_position(s), d.next_position(s) + n)
                     for s, n in zip(seq_ids, counts)])
    return dict(seq_ids=seq_ids, hidden_states=h, next_token_ids=ids.to(ids_dtype),
                positions=pos, num_rows_per_seq=counts, k=2)


def staged_rows(prog):
    """The bucket's rows as the program's first step reads them (``gather_rows`` of the
    staged sources from the tensors the call staged) -> (ids, positions, hidden)."""
    from mtp.propose_program import gather_rows
    hidden, ids, pos = prog.caller
    return gather_rows(prog.host_src, ids, pos, hidden, prog.model.dtype)


def test_stage_puts_each_row_at_the_end_of_its_block():
    """A call that fills part of its bucket: its rows are read where ``dest`` says (the last
    n_i rows of block i), converted to int64; the per-sequence meta holds slots, next
    positions and counts, padding sequences slot -1 and 0 rows. A call that fills the bucket:
    its rows in order. The host buffer says where the caller's tensors are."""
    from mtp.propose_program import ROWS_AT, rows_at
    d = drafter(max_seqs=5)
    prog = ProposeProgram(d.model, d.cache, 4, 5, 2, MAX_ABS_HIDDEN)
    counts = [2, 5, 1]
    h, ids, pos = rows(8, 0)
    prog.stage([3, 0, 2], [10, 20, 30], counts, ids.to(torch.int32), pos.to(torch.int32), h,
               prog.new_out())
    assert prog.host_meta.tolist() == [[3, 0, 2, -1], [10, 20, 30, 0], [2, 5, 1, 0]]
    dest = torch.tensor(bucket_rows(prog.rows, counts))
    got_ids, got_pos, got_h = staged_rows(prog)
    assert torch.equal(got_ids[dest], ids) and torch.equal(got_pos[dest], pos)
    assert torch.equal(got_h[dest], h)
    h, ids, pos = rows(20, 1)
    prog.stage([0, 1, 2, 4], [1, 2, 3, 4], [5] * 4, ids, pos, h, prog.new_out())
    assert prog.host_meta.tolist() == [[0, 1, 2, 4], [1, 2, 3, 4], [5] * 4]
    assert prog.host_src.tolist() == list(range(20))
    assert prog.host[-ROWS_AT - 1:-1].tolist() == rows_at(h, ids, pos)
    got_ids, got_pos, got_h = staged_rows(prog)
    assert torch.equal(got_ids, ids) and torch.equal(got_pos, pos) and torch.equal(got_h, h)


def test_stage_converts_only_what_a_kernel_cannot_read():
    """Int32 ids and positions and strided views are read as they are (their own address
    and stride, no copy); a hidden dtype other than the module's, or a hidden row that is not
    contiguous, is converted (the program holds the converted tensor until the next call)."""
    d = drafter(max_seqs=2)
    prog = ProposeProgram(d.model, d.cache, 2, 2, 2, MAX_ABS_HIDDEN)
    h, ids, pos = rows(4, 2)
    wide_ids = torch.stack((ids.to(torch.int32), ids.to(torch.int32)), dim=1)[:, 0]
    prog.stage([0, 1], [0, 0], [2, 2], wide_ids, pos, h, prog.new_out())
    assert prog.caller[1] is wide_ids and prog.caller[0] is h
    assert prog.host[-9:-4].tolist()[2:] == [wide_ids.data_ptr(), 2, 1]
    other = torch.float32 if d.model.dtype != torch.float32 else torch.float64
    prog.stage([0, 1], [0, 0], [2, 2], ids, pos, h.to(other), prog.new_out())
    assert prog.caller[0].dtype == d.model.dtype
    assert torch.equal(prog.caller[0], h.to(other).to(d.model.dtype))
    prog.stage([0, 1], [0, 0], [2, 2], ids, pos, h.t().contiguous().t(), prog.new_out())
    assert prog.caller[0].stride(-1) == 1 and torch.equal(prog.caller[0], h)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), seqs=st.integers(1, 4), rows_=st.integers(1, 5),
       ids_dtype=st.sampled_from([torch.int64, torch.int32]))
def test_staged_rows_are_the_callers_rows_in_any_bucket(data, seqs, rows_, ids_dtype):
    """Any call that fits a bucket (s <= S sequences, each 1 .. R rows), after any other
    call: the rows read at ``dest`` are the caller's, bit for bit, and the meta is the
    call's, padded."""
    d = drafter(max_seqs=4)
    prog = ProposeProgram(d.model, d.cache, seqs, rows_, 2, MAX_ABS_HIDDEN)
    for _ in range(2):
        s = data.draw(st.integers(1, seqs))
        counts = data.draw(st.lists(st.integers(1, rows_), min_size=s, max_size=s))
        slots = data.draw(st.permutations(range(4)))[:s]
        starts = data.draw(st.lists(st.integers(0, 10**6), min_size=s, max_size=s))
        h, ids, pos = rows(sum(counts), data.draw(st.integers(0, 99)))
        prog.stage(slots, starts, counts, ids.to(ids_dtype), pos, h, prog.new_out())
        pad = seqs - s
        assert prog.host_meta.tolist() == [slots + [-1] * pad, starts + [0] * pad,
                                           counts + [0] * pad]
        dest = torch.tensor(bucket_rows(prog.rows, counts))
        got_ids, got_pos, got_h = staged_rows(prog)
        assert torch.equal(got_ids[dest], ids) and torch.equal(got_pos[dest], pos)
        assert torch.equal(got_h[dest], h)


@pytest.mark.parametrize("held, seq_ids, counts, expected", [
    # the bucket filled (1 sequence held, 1 row): empty x1 = the proposal's own buffer for
    # the outputs (drafts, hidden and, sampled, q in one buffer), which the replay fills (an
    # allocation, no launch); _local_scalar_dense: the previous call's error word, read from
    # host memory once its event is done. The staged call's copy in (from the pinned buffer
    # the host wrote: meta, row sources, where the caller's rows and the output buffer are),
    # the rows' reads, the outputs' copy, the error word's copy back and the event's record
    # are the replay's own (in a graph: nodes of it)
    (1, [0], [1], {"empty": 1, "_local_scalar_dense": 1}),
    # a partial bucket (3 of 4 sequences, up to 3 of 4 rows): the same (the row sources are
    # host arithmetic, staged with the meta)
    (4, [2, 0, 3], [1, 3, 2], {"empty": 1, "_local_scalar_dense": 1}),
])
def test_a_steady_call_dispatches_few_torch_operations(held, seq_ids, counts, expected):
    """Regression guard on propose's host time: after a bucket's first call, a greedy call
    dispatches exactly these operations (each a launch or a copy on CUDA), and nothing that
    allocates a host buffer (``torch.tensor`` of a list, pinned memory, a CPU ``.to``)."""
    d = stubbed(max_seqs=held, n_seqs=held)
    d.propose(**call(d, seq_ids, counts))  # makes the bucket
    d.propose(**call(d, seq_ids, counts))
    args = call(d, seq_ids, counts)
    with CountOps() as c:
        d.propose(**args)
    assert dict(c.ops) == expected


def test_int32_ids_and_another_hidden_dtype():
    """Int32 ids are read as they are (no conversion); hidden states of another dtype than
    the module's are converted once (one ``_to_copy``)."""
    d = stubbed()
    for _ in range(2):
        d.propose(**call(d, [1, 2], [2, 1], torch.int32))
    args = call(d, [1, 2], [2, 1], torch.int32)
    with CountOps() as c:
        d.propose(**args)
    assert dict(c.ops) == {"empty": 1, "_local_scalar_dense": 1}
    args = call(d, [1, 2], [2, 1])
    other = torch.float32 if d.model.dtype != torch.float32 else torch.float64
    args["hidden_states"] = args["hidden_states"].to(other)
    with CountOps() as c:
        d.propose(**args)
    assert dict(c.ops) == {"_to_copy": 1, "empty": 1, "_local_scalar_dense": 1}


def test_hidden_states_in_the_streams_layout_add_only_a_view():
    """Hidden states as [T, M, D] (transformers' residual layout) take the same steady path
    as [T, M*D]: one ``view`` more (their flatten), no copy."""
    d = stubbed()
    cfg = d.model.config
    for _ in range(2):
        d.propose(**call(d, [1, 2], [2, 1]))
    args = call(d, [1, 2], [2, 1])
    args["hidden_states"] = args["hidden_states"].view(3, cfg.hc_mult, cfg.hidden_size)
    with CountOps() as c:
        d.propose(**args)
    assert dict(c.ops) == {"view": 1, "empty": 1, "_local_scalar_dense": 1}


def test_calls_reuse_the_programs_host_buffers():
    """No per-call host allocation: the packed inputs and the error word go through the same
    (on CUDA pinned) buffers every call."""
    d = stubbed()
    d.propose(**call(d, [0, 1], [2, 2]))
    prog = d._proposer.get(2, 2, 2).program
    buffers = prog.host.data_ptr(), prog.error_host.data_ptr()
    for _ in range(3):
        d.propose(**call(d, [0, 1], [1, 2]))
    assert (prog.host.data_ptr(), prog.error_host.data_ptr()) == buffers


def test_a_call_failing_after_staging_keeps_the_host_buffers():
    """A failure between staging and the end of the call (here the replay): its sequences are
    dropped (their cache may be half-written), the program waits for the device (its copies
    may still read the host buffers) and keeps them (a captured graph holds their
    addresses), and the drafter goes on."""
    d = stubbed()
    d.propose(**call(d, [0, 1], [1, 1]))
    prog = d._proposer.get(2, 1, 2).program
    host, error = prog.host, prog.error_host
    HostOnlyProposal.fail = RuntimeError("an illegal memory access was encountered")
    try:
        with pytest.raises(RuntimeError, match=r"the forward failed \(RuntimeError: an illegal"):
            d.propose(**call(d, [0, 1], [1, 1]))
    finally:
        HostOnlyProposal.fail = None
    assert d.seq_ids == [2, 3] and prog.host is host and prog.error_host is error
    d.add_sequence(0, position=0)
    assert d.propose(**call(d, [0, 2], [1, 1])).drafts.shape == (2, 2)


class Interrupted:
    """An event whose wait is interrupted (Ctrl-C while the host waits for the GPU)."""

    def synchronize(self):
        raise KeyboardInterrupt


def test_an_interrupted_wait_leaves_the_call_pending():
    """The next call waits for the previous call's event before it rewrites that bucket's host
    buffers; if the wait is interrupted, the previous call stays pending (its copies may still
    be in flight, its error word unread): the call after that waits for it again, and a
    refusal found then is still raised (the programs run for real here)."""
    d = stubbed()
    d._proposer = ProposeBuckets(d.model, d.cache, *d._buckets(), MAX_ABS_HIDDEN)
    d.propose(**call(d, [0, 1], [1, 1]))
    good = call(d, [0, 1], [1, 1])
    bad = dict(good, positions=good["positions"] + 1)  # a gap: refused on the device
    d.propose(**bad)
    pend = d._pending
    event, pend.event = pend.event, Interrupted()
    with pytest.raises(KeyboardInterrupt):
        d.propose(**good)
    assert d._pending is pend
    pend.event = event
    with pytest.raises(ValueError, match="leaving a gap"):
        d.propose(**good)
    assert d._pending is None and d.propose(**good).drafts.shape == (2, 2)


def test_the_last_calls_records_are_forgotten_when_sequences_change():
    """A call with the same seq_ids as the last one reuses its lookup, unless a sequence was
    removed or added since: a sequence added again under the same id is a new record (its
    position), in another slot."""
    d = stubbed(n_seqs=2)
    d.propose(**call(d, [0, 1], [1, 1]))
    d.remove_sequence(1)
    d.add_sequence("x")  # takes 1's slot
    d.add_sequence(1, position=50)
    assert d.slot(1) != d.slot("x")
    d.propose(**call(d, [0, 1], [1, 2]))
    assert d.next_position(1) == 52
    prog = d._proposer.get(2, 2, 2).program
    assert prog.host_meta[0, :2].tolist() == [d.slot(0), d.slot(1)]
    assert prog.host_meta[1, :2].tolist() == [d.next_position(0) - 1, 50]


def test_a_sampled_steady_call_writes_an_unchanged_scalar_setting_once():
    """Sampled with scalar settings: the temperature and top-p buffers are filled at the
    bucket's first call and not again while the values stay (each fill a launch on CUDA);
    a new value is written, and so is a per-sequence tensor. The uniforms are drawn every
    call (``torch.rand``'s ``uniform_``)."""
    d = stubbed()
    gen = torch.Generator().manual_seed(0)
    warm = Sampling(temperature=0.7, top_p=0.9, generator=gen)
    d.propose(**call(d, [0, 1], [1, 1]), sampling=warm)
    prog = d._proposer.get(2, 1, 2, "top_p").program
    per_seq = torch.full((2,), 0.8, dtype=torch.float64)
    for sampling, fills in ((warm, 0), (Sampling(temperature=0.5, top_p=0.9, generator=gen), 1),
                            (Sampling(temperature=0.5, top_p=per_seq, generator=gen), 0)):
        args = call(d, [0, 1], [1, 1])
        with CountOps() as c:
            d.propose(**args, sampling=sampling)
        assert c.ops["fill_"] == fills and c.ops["uniform_"] == 1, dict(c.ops)
    assert prog.temperature.tolist() == [0.5, 0.5]
    assert prog.top_p.tolist() == pytest.approx([0.8, 0.8])
    args = call(d, [0, 1], [1, 1])
    with CountOps() as c:  # back to a scalar top_p: written again over the tensor's values
        d.propose(**args, sampling=Sampling(temperature=0.5, top_p=0.8, generator=gen))
    assert c.ops["fill_"] == 1 and prog.top_p.tolist() == pytest.approx([0.8, 0.8])


def test_the_last_calls_lookup_agrees_with_a_dict_lookup():
    """An id equal to the last call's by ``==`` but not as a dict key (a 0-d tensor: hashed by
    identity) is not taken for it: unknown, as a dict lookup says."""
    d = stubbed(n_seqs=2)
    d.propose(**call(d, [0, 1], [1, 1]))
    args = call(d, [0, 1], [1, 1])
    with pytest.raises(ValueError, match="unknown sequence tensor"):
        d.propose(**dict(args, seq_ids=[torch.tensor(0), 1]))
