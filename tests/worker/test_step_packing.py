"""pack_step / StepLayout / StepBuffers / BlockTables: the one-copy step buffer and the persistent
block tables, checked by hand (CPU)."""

import numpy as np
import pytest
import torch

from minivllm.step import ScheduledSeq
from minivllm.worker.block_table import BlockTables
from minivllm.worker.input_batch import (ALIGN, FIELDS, PAD_SLOT, FieldViews, InputBatch, StepLayout, exact_layout,
                                         field_views, pack_step)
from minivllm.worker.step_buffers import StepBuffers

BS = 4  # block size


def seq(seq_id, start, token_ids, table, samples=1, pending=False):
    return ScheduledSeq(seq_id, start, list(token_ids), pending, list(table), samples)


def packed_fields(seqs, last_sampled=None, pad_to=None, layout=None, stale=12345):
    """Pack `seqs` with fresh persistent tables; return the fields as lists."""
    tables = BlockTables(8, 6, torch.device("cpu"))
    rows = [tables.sync(s.seq_id, s.block_table) for s in seqs]
    layout = layout or exact_layout(sum(s.num_new_tokens for s in seqs), sum(s.num_samples for s in seqs), len(seqs))
    buf = np.full(layout.size, stale, dtype=np.int32)  # stale garbage must not leak through
    packed = pack_step(buf, layout, seqs, rows, tables.host, BS, last_sampled or {}, pad_to=pad_to,
                       pad_row=tables.pad_row)
    batch = InputBatch.view(torch.from_numpy(buf), layout, packed)
    batch.attn_metadata.block_tables = tables.device.index_select(0, batch.rows)
    m = batch.attn_metadata
    return packed, {
        "ids": batch.input_ids.tolist(), "pos": batch.positions.tolist(), "slots": m.slot_mapping.tolist(),
        "seq_lens": m.seq_lens.tolist(), "cu": m.cu_seqlens_q.tolist(), "tables": m.block_tables.tolist(),
        "logits": batch.logits_indices.tolist(), "max_seq_len": m.max_seq_len,
        "pending": list(zip(batch.pending_dst.tolist(), batch.pending_src.tolist())),
    }


def test_every_field_starts_on_a_64_byte_boundary_whatever_the_sizes():
    # Triton specializes kernels on pointer alignment: offsets that moved with the batch would
    # make the kernels compile again mid-run.
    for sizes in [(1, 1, 1), (7, 3, 5), (300, 17, 64), (0, 0, 0)]:
        layout = StepLayout(*sizes)
        assert all(layout.offsets[name] % ALIGN == 0 for name in FIELDS)
        starts = [layout.offsets[name] for name in FIELDS]
        assert starts == sorted(starts) and layout.size >= starts[-1]
    with pytest.raises(ValueError, match="max_seqs"):
        StepLayout(1, 1, -1)


def test_mixed_prefill_and_decode_step_with_a_fork():
    a = seq(0, 0, [11, 12, 13, 14, 15, 16], [7, 2])  # prefill 6 prompt tokens, samples once
    b = seq(1, 5, [99], [3, 8], samples=2)  # decode at position 5: block 8, offset 1; forked
    packed, f = packed_fields([a, b])
    assert f["ids"] == [11, 12, 13, 14, 15, 16, 99]
    assert f["pos"] == [0, 1, 2, 3, 4, 5, 5]
    assert f["slots"] == [28, 29, 30, 31, 8, 9, 33]
    assert f["seq_lens"] == [6, 6] and f["cu"] == [0, 6, 7]
    assert [row[:2] for row in f["tables"]] == [[7, 2], [3, 8]]
    assert f["logits"] == [5, 6, 6] and f["max_seq_len"] == 6
    assert packed.num_tokens == 7 and packed.num_pending == 0


def test_a_pending_token_is_a_placeholder_filled_from_the_last_samples():
    a = seq(4, 9, [], [1, 5, 6], pending=True)  # its token was sampled last step, row 2
    b = seq(5, 2, [42], [0])
    _, f = packed_fields([a, b], last_sampled={4: 2, 9: 0})
    assert f["ids"] == [0, 42] and f["pending"] == [(0, 2)]
    assert f["slots"] == [6 * BS + 1, 2]


def test_padding_rows_are_harmless_dummy_decodes():
    seqs = [seq(0, 9, [5], [4, 6, 1]), seq(1, 0, [6], [2])]
    packed, f = packed_fields(seqs, pad_to=4, layout=StepLayout(8, 8, 8), stale=777)
    assert packed.num_seqs == packed.num_tokens == 4
    assert f["ids"] == [5, 6, 0, 0] and f["pos"] == [9, 0, 0, 0]
    assert f["slots"] == [1 * BS + 1, 2 * BS, PAD_SLOT, PAD_SLOT]  # position 9: block [4, 6, 1][2]
    assert f["seq_lens"] == [10, 1, 1, 1] and f["cu"] == [0, 1, 2, 3, 4]
    assert f["tables"][2] == [0] * 6  # the all-zero padding row: a valid block id to look at
    assert f["logits"] == [0, 1]


def test_an_all_padding_batch_is_valid_for_the_reference_kernel():
    """What graph capture runs: every row a dummy. The kernels must accept it and write nothing."""
    from minivllm.kernels import paged_attention, write_kv_cache

    layout = StepLayout(max_tokens=4, max_sampled=4, max_seqs=4)
    buf = np.zeros(layout.size, dtype=np.int32)
    tables = np.zeros((1, 2), dtype=np.int32)
    packed = pack_step(buf, layout, [], [], tables, BS, {}, pad_to=4)
    m = InputBatch.view(torch.from_numpy(buf), layout, packed, torch.zeros(4, 2, dtype=torch.int32)).attn_metadata
    k_cache = torch.zeros(3, BS, 2, 8)
    v_cache = torch.zeros_like(k_cache)
    q, k = torch.randn(4, 4, 8), torch.randn(4, 2, 8)
    write_kv_cache(k, k, k_cache, v_cache, m.slot_mapping, backend="torch")
    assert not k_cache.any()
    out = paged_attention(q, k_cache, v_cache, m.block_tables, m.seq_lens, m.cu_seqlens_q, backend="torch")
    assert out.shape == q.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("bad, match", [
    ({"pad_to": 1}, "pad_to=1 is smaller"),
    ({"layout": StepLayout(1, 2, 2)}, "tokens"),
    ({"layout": StepLayout(8, 1, 2)}, "sampled rows"),
])
def test_a_step_that_does_not_fit_names_what_overflows(bad, match):
    seqs = [seq(0, 3, [1], [0]), seq(1, 0, [2, 3], [1, 2])]
    layout = bad.get("layout", StepLayout(8, 2, 2))
    buf = np.zeros(max(layout.size, 64), dtype=np.int32)
    with pytest.raises(ValueError, match=match):
        pack_step(buf, layout, seqs, [0, 1], np.zeros((2, 2), dtype=np.int32), BS, {}, pad_to=bad.get("pad_to"))


def test_step_buffers_grow_on_cpu_and_refuse_to_when_fixed():
    buffers = StepBuffers(8, torch.device("cpu"))
    assert buffers.device_tensor is buffers.host_tensor  # on CPU there is nothing to copy
    assert buffers.host(100).shape[0] >= 100
    fixed = StepBuffers(8, torch.device("cpu"), growable=False)
    with pytest.raises(ValueError, match="buffer elements"):
        fixed.host(9)


def test_block_tables_keep_a_row_per_sequence_and_write_only_what_changed():
    tables = BlockTables(max_seqs=2, width=4, device=torch.device("cpu"))
    row = tables.sync(10, [3])
    assert tables.sync(10, [3, 7]) == row and tables.host[row, :2].tolist() == [3, 7]
    tables.host[row, 3] = 99  # an entry past the table: never written, never read
    tables.sync(10, [3, 5])  # copy-on-write replaced the last block
    assert tables.host[row].tolist() == [3, 5, 0, 99]
    other = tables.sync(11, [1])
    assert other != row
    with pytest.raises(RuntimeError, match="more than 2 sequences"):
        tables.sync(12, [0])
    tables.release([10, 11])
    assert tables.sync(12, [2, 4]) in (row, other)  # a released row is reused, written anew
    with pytest.raises(ValueError, match="width"):
        tables.sync(13, [0] * 5)
    assert tables.host[tables.pad_row].tolist() == [0, 0, 0, 0]


def noisy_cache_runner(tmp_path, arch: str):
    """A CPU runner of a tiny random model on the reference attention, its KV cache full of noise:
    a read of the wrong slot, or a write where none belongs, changes what the tests compare."""
    from minivllm.config import EngineConfig
    from minivllm.models import make_random_model
    from minivllm.worker.model_runner import ModelRunner

    model = make_random_model(tmp_path / "m", arch=arch, size="tiny")
    runner = ModelRunner(EngineConfig.from_dict({"model": str(model), "device": "cpu", "num_kv_blocks": 16,
                                                 "block_size": 4, "max_model_len": 64,
                                                 "attention_backend": "torch"}))
    for k, v in runner.kv_caches:
        k.normal_()
        v.normal_()
    return runner


def test_padding_leaves_the_real_rows_of_a_forward_unchanged(tmp_path):
    """The padded batch a graph replays gives the real sequences the same hidden states (CPU)."""
    runner = noisy_cache_runner(tmp_path, "qwen3")
    seqs = [seq(0, 5, [7], [3, 9]), seq(1, 0, [8], [1]), seq(2, 11, [9], [2, 4, 6])]
    tables = BlockTables(8, 4, torch.device("cpu"))
    rows = [tables.sync(s.seq_id, s.block_table) for s in seqs]
    hidden = {}
    for pad_to in (None, 8):
        layout = StepLayout(max_tokens=8, max_sampled=8, max_seqs=8)
        buf = np.zeros(layout.size, dtype=np.int32)
        packed = pack_step(buf, layout, seqs, rows, tables.host, 4, {}, pad_to=pad_to, pad_row=tables.pad_row)
        batch = InputBatch.view(torch.from_numpy(buf), layout, packed, backend="torch", max_seq_len=64)
        batch.attn_metadata.block_tables = tables.device.index_select(0, batch.rows)
        before = [k.clone() for k, _ in runner.kv_caches]
        with torch.inference_mode():
            hidden[pad_to] = runner.model(batch.input_ids, batch.positions, batch.attn_metadata)
        if pad_to:  # padding wrote nothing: only the real tokens' slots were (re)written
            for b, (k, _) in zip(before, runner.kv_caches):
                torch.testing.assert_close(k, b)
    assert hidden[8].shape[0] == 8
    torch.testing.assert_close(hidden[8][:3], hidden[None])


# ---------------------------------------------------------------------------------------------
# Speculative decoding: drafts, their logits rows, and verification graphs' padded queries
# ---------------------------------------------------------------------------------------------
def spec_seq(seq_id, start, token, table, drafts=(), num_device_drafts=0):
    return ScheduledSeq(seq_id, start, [token], False, list(table), 1, is_decode=True, draft_token_ids=list(drafts),
                        num_draft_tokens=len(drafts) or num_device_drafts)


def test_drafts_are_verified_tokens_with_a_logits_row_each():
    a = spec_seq(0, 9, 50, [1, 5, 6], drafts=[5, 6])  # positions 9, 10, 11
    b = seq(1, 2, [60], [3], samples=2)  # a plain decode, forked
    c = spec_seq(2, 4, 70, [2, 7], num_device_drafts=3)  # a draft model fills in 3 drafts
    packed, f = packed_fields([a, b, c], layout=StepLayout(16, 16, 8))
    assert f["ids"] == [50, 5, 6, 60, 70, 0, 0, 0]
    assert f["pos"] == [9, 10, 11, 2, 4, 5, 6, 7]
    assert f["slots"] == [6 * BS + 1, 6 * BS + 2, 6 * BS + 3, 3 * BS + 2, 7 * BS, 7 * BS + 1, 7 * BS + 2, 7 * BS + 3]
    assert f["seq_lens"] == [12, 3, 8] and f["cu"] == [0, 3, 4, 8]
    assert f["logits"] == [0, 1, 2, 3, 3, 4, 5, 6, 7]  # 1 + drafts rows each; the fork twice
    assert packed.num_sampled == 9 and packed.num_device_drafts == 3


def test_query_len_pads_each_sequence_with_rows_that_write_nothing():
    a = spec_seq(0, 9, 50, [1, 5, 6], drafts=[5, 6])
    b = seq(1, 2, [60], [3])
    _, exact = packed_fields([a, b], layout=StepLayout(16, 16, 4))
    layout = StepLayout(16, 16, 4)
    tables = BlockTables(8, 6, torch.device("cpu"))
    rows = [tables.sync(s.seq_id, s.block_table) for s in (a, b)]
    buf = np.full(layout.size, 777, dtype=np.int32)
    packed = pack_step(buf, layout, [a, b], rows, tables.host, BS, {}, pad_to=3, pad_row=tables.pad_row,
                       query_len=3)
    batch = InputBatch.view(torch.from_numpy(buf), layout, packed)
    m = batch.attn_metadata
    assert packed.num_tokens == 9 and packed.num_seqs == 3
    assert batch.input_ids.tolist() == [50, 5, 6, 60, 0, 0, 0, 0, 0]
    assert batch.positions.tolist() == [9, 10, 11, 2, 2, 2, 0, 0, 0]  # dummy rows repeat the last
    assert m.slot_mapping.tolist() == exact["slots"][:3] + [exact["slots"][3]] + [PAD_SLOT] * 5
    assert m.seq_lens.tolist() == [12, 5, 3] and m.cu_seqlens_q.tolist() == [0, 3, 6, 9]
    assert batch.logits_indices.tolist() == [0, 1, 2, 3]  # the real rows, not the padded ends
    with pytest.raises(ValueError, match="query_len=2 is shorter"):
        pack_step(buf, layout, [a, b], rows, tables.host, BS, {}, query_len=2)


def test_verification_padding_leaves_the_real_rows_and_the_cache_unchanged(tmp_path):
    """A verification graph gives every sequence 1 + k query rows: the real queries of a
    sequence with fewer drafts must see exactly what they see unpadded, and the dummy rows
    must write nothing (CPU, the reference attention)."""
    runner = noisy_cache_runner(tmp_path, "llama")
    initial = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    seqs = [spec_seq(0, 5, 7, [3, 9], drafts=[11, 12]), seq(1, 0, [8], [1]),
            spec_seq(2, 10, 9, [2, 4, 6, 8], drafts=[13, 14, 15, 16])]
    tables = BlockTables(8, 5, torch.device("cpu"))
    rows = [tables.sync(s.seq_id, s.block_table) for s in seqs]
    logits, caches = {}, {}
    for query_len in (None, 5):
        for (k, v), (k0, v0) in zip(runner.kv_caches, initial):
            k.copy_(k0)
            v.copy_(v0)
        layout = StepLayout(max_tokens=20, max_sampled=20, max_seqs=4)
        buf = np.zeros(layout.size, dtype=np.int32)
        packed = pack_step(buf, layout, seqs, rows, tables.host, 4, {}, pad_to=4 if query_len else None,
                           pad_row=tables.pad_row, query_len=query_len)
        batch = InputBatch.view(torch.from_numpy(buf), layout, packed, backend="torch", max_seq_len=64)
        batch.attn_metadata.block_tables = tables.device.index_select(0, batch.rows)
        with torch.inference_mode():
            hidden = runner.model(batch.input_ids, batch.positions, batch.attn_metadata)
            logits[query_len] = runner.model.compute_logits(hidden[batch.logits_indices])
        caches[query_len] = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    assert logits[5].shape[0] == 3 + 1 + 5
    torch.testing.assert_close(logits[5], logits[None])
    for (k, v), (k_exact, v_exact) in zip(caches[5], caches[None]):
        torch.testing.assert_close(k, k_exact)
        torch.testing.assert_close(v, v_exact)


# ---------------------------------------------------------------------------------------------
# Properties: pack_step against a plain per-token reference; BlockTables against a fresh table
# ---------------------------------------------------------------------------------------------
from hypothesis import given, settings
from hypothesis import strategies as st


def reference_pack(seqs, tables, rows, last_sampled, pad_to, query_len):
    """The fields of a packed step, written one token at a time in plain Python."""
    ids, pos, slots, seq_lens, cu, logits, pending, drafts = [], [], [], [], [0], [], [], []
    dummy = [ScheduledSeq(-1, 0, [0], False, [], 0)] * ((pad_to or len(seqs)) - len(seqs))
    for b, s in enumerate(list(seqs) + dummy):
        real = s.num_new_tokens
        q = query_len or real
        base = cu[-1]
        if s.pending:
            pending.append((base, last_sampled[s.seq_id]))
        known = [None] * s.pending + s.token_ids + (s.draft_token_ids or [None] * s.num_draft_tokens)
        for j in range(q):
            p = s.start + min(j, real - 1)
            is_dummy = j >= real or b >= len(seqs)
            token = known[j] if j < real else None
            if token is None and j < real and j >= s.pending + len(s.token_ids) and b < len(seqs):
                drafts.append(base + j)
            ids.append(0 if token is None or b >= len(seqs) else token)
            pos.append(p)
            row = rows[b] if b < len(seqs) else 7
            slots.append(PAD_SLOT if is_dummy else int(tables[row, p // BS]) * BS + p % BS)
        seq_lens.append(s.start + q)
        cu.append(base + q)
        if b < len(seqs):
            last = base + real - 1
            logits += list(range(last - s.num_draft_tokens, last + 1)) if s.num_draft_tokens else [last] * s.num_samples
    return {"ids": ids, "pos": pos, "slots": slots, "seq_lens": seq_lens, "cu": cu, "logits": logits,
            "pending": pending, "draft_dst": drafts}


@st.composite
def steps(draw, num_seqs=st.integers(0, 5)):
    n = draw(num_seqs)
    seqs, last_sampled = [], {}
    for i in range(n):
        pending = draw(st.booleans())
        known = draw(st.lists(st.integers(1, 99), min_size=0 if pending else 1, max_size=4))
        num_drafts = draw(st.integers(0, 3))
        host_drafts = draw(st.booleans())
        samples = 1 if num_drafts else draw(st.integers(0, 3))
        start = draw(st.integers(0, 8))
        end = start + pending + len(known) + num_drafts
        table = draw(st.permutations(range(10)))[:-(-end // BS)]
        seqs.append(ScheduledSeq(i, start, known, pending, list(table), samples, False, None,
                                 [draw(st.integers(1, 99)) for _ in range(num_drafts)] if host_drafts else [],
                                 num_drafts))
        last_sampled[i] = draw(st.integers(0, 9))
    pad_to = draw(st.one_of(st.none(), st.integers(n, n + 3)))
    longest = max([s.num_new_tokens for s in seqs], default=1)
    query_len = draw(st.one_of(st.none(), st.integers(longest, longest + 2)))
    return seqs, last_sampled, pad_to, query_len


@settings(max_examples=150, deadline=None)
@given(steps())
def test_pack_step_equals_a_token_by_token_reference(step):
    seqs, last_sampled, pad_to, query_len = step
    tables = BlockTables(8, 6, torch.device("cpu"))
    rows = tables.sync_all(seqs)
    num_seqs = pad_to or len(seqs)
    layout = StepLayout(max_tokens=128, max_sampled=64, max_seqs=max(num_seqs, 1))
    buf = np.full(layout.size, 12345, dtype=np.int32)
    packed = pack_step(buf, layout, seqs, rows, tables.host, BS, last_sampled, pad_to=pad_to,
                       pad_row=7, query_len=query_len)
    batch = InputBatch.view(torch.from_numpy(buf), layout, packed)
    m = batch.attn_metadata
    got = {"ids": batch.input_ids.tolist(), "pos": batch.positions.tolist(), "slots": m.slot_mapping.tolist(),
           "seq_lens": m.seq_lens.tolist(), "cu": m.cu_seqlens_q.tolist(), "logits": batch.logits_indices.tolist(),
           "pending": list(zip(batch.pending_dst.tolist(), batch.pending_src.tolist())),
           "draft_dst": batch.draft_dst.tolist()}
    assert got == reference_pack(seqs, tables.host, rows, last_sampled, pad_to, query_len)
    assert batch.rows.tolist() == rows + [7] * (num_seqs - len(seqs))
    # The runs the runner slices instead of gathering: found exactly when the rows are runs.
    dst, src = [d for d, _ in got["pending"]], [s for _, s in got["pending"]]
    assert packed.logits_start == run_start(got["logits"])
    both = run_start(dst), run_start(src)
    assert packed.pending_run == (None if None in both else both)
    assert packed.rows_start == run_start(batch.rows.tolist())


@settings(max_examples=100, deadline=None)
@given(steps(num_seqs=st.just(1)))
def test_one_sequence_packed_by_python_equals_the_column_path(step):
    """A batch of one sequence skips the numpy columns (`_pack_one`): every field it writes, and
    the sizes and runs it reports, are the column path's."""
    from minivllm.worker.input_batch import _pack_columns, _pack_one

    seqs, last_sampled, _, query_len = step
    tables = BlockTables(8, 6, torch.device("cpu"))
    rows = tables.sync_all(seqs)
    layout = StepLayout(max_tokens=128, max_sampled=64, max_seqs=1)
    bufs = [np.full(layout.size, 12345, dtype=np.int32) for _ in range(2)]
    one = _pack_one(bufs[0], layout, seqs[0], rows[0], tables.host, BS, last_sampled, query_len)
    columns = _pack_columns(bufs[1], layout, seqs, rows, tables.host, BS, last_sampled, 1, 7, query_len)
    assert one == columns
    for name, view in field_views(torch.from_numpy(bufs[0]), layout, one).items():
        assert view.tolist() == field_views(torch.from_numpy(bufs[1]), layout, columns)[name].tolist(), name


def run_start(values):
    """v when values == [v, v + 1, ...] (0 when empty), else None: the plain-Python rule."""
    if not values:
        return 0
    return values[0] if values == list(range(values[0], values[0] + len(values))) else None


@settings(max_examples=60, deadline=None)
@given(st.lists(steps(), min_size=1, max_size=6), st.booleans())
def test_cached_field_views_equal_views_sliced_afresh(packs, inference):
    """FieldViews hands back, for any run of step shapes, views of the same memory, shape and
    values as slicing the buffer afresh; and a new buffer gets views of its own."""
    views = FieldViews()
    layout = StepLayout(max_tokens=128, max_sampled=64, max_seqs=8)
    bufs = [torch.zeros(layout.size, dtype=torch.int32) for _ in range(2)]
    tables = BlockTables(8, 6, torch.device("cpu"))
    for i, (seqs, last_sampled, pad_to, query_len) in enumerate(packs):
        buf = bufs[i % 3 == 2]  # the buffer changes now and then, as an eager one that grew
        tables = BlockTables(8, 6, torch.device("cpu"))
        packed = pack_step(buf.numpy(), layout, seqs, tables.sync_all(seqs), tables.host, BS, last_sampled,
                           pad_to=pad_to, pad_row=7, query_len=query_len)
        with torch.inference_mode(inference):
            cached, fresh = views.get(buf, layout, packed), field_views(buf, layout, packed)
        assert cached.keys() == fresh.keys() == set(FIELDS)
        for name in FIELDS:
            a, b = cached[name], fresh[name]
            assert (a.data_ptr(), a.shape, a.stride()) == (b.data_ptr(), b.shape, b.stride()), name
            assert torch.equal(a, b) and a.is_inference() == b.is_inference()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["sync", "append", "cow", "release"]), st.integers(0, 4),
                          st.integers(0, 30)), max_size=40))
def test_incremental_block_tables_equal_tables_written_from_scratch(ops):
    """After any sequence of new tables, appended blocks, copy-on-write and releases, every held
    row of the host mirror starts with its sequence's table (and the device copy equals it)."""
    tables = BlockTables(max_seqs=5, width=6, device=torch.device("cpu"))
    held: dict[int, list[int]] = {}
    for op, seq_id, block in ops:
        table = held.get(seq_id)
        if op == "release":
            tables.release([seq_id])
            held.pop(seq_id, None)
            continue
        if op == "sync" or table is None:
            table = [block]
        elif op == "append" and len(table) < 6:
            table = table + [block]
        elif op == "cow":
            table = table[:-1] + [block]
        held[seq_id] = table
        seqs = [ScheduledSeq(i, 0, [1], False, t, 1) for i, t in held.items()]
        before, version = tables.host.copy(), tables.version
        rows = tables.sync_all(seqs)
        assert len(set(rows)) == len(rows)
        for row, t in zip(rows, held.values()):
            assert tables.host[row, :len(t)].tolist() == t
        # A copy of some rows is current while the version stands: no row changed without it.
        if tables.version == version:
            assert np.array_equal(tables.host, before)
    tables.commit()
    assert torch.equal(tables.device, torch.from_numpy(tables.host))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.lists(st.booleans(), min_size=4, max_size=4), st.booleans(),
       st.booleans(), st.integers(0, 2))
def test_a_verification_of_k_drafts_each_is_the_gathered_one_as_views(n, k, pending, host_drafts, graphed, pad):
    """Every sequence verifies k drafts after one token: `verification` reads the logits and the
    drafts as views, and they equal what the general path gathers by indices; with the k as
    `num_drafts`, greedy verification accepts the same tokens."""
    from minivllm.layers.rejection_sampler import greedy_verify
    from minivllm.worker.verification import gathered_verification, verification

    rng = np.random.default_rng(n * 10 + k)
    known = [[] if pending[i] else [int(rng.integers(1, 99))] for i in range(n)]
    drafts = [[int(rng.integers(1, 9)) for _ in range(k)] if host_drafts else [] for _ in range(n)]
    seqs = [ScheduledSeq(i, 2 * i + 1, known[i], pending[i], [4 * i + b for b in range(4)], 1, True, None, drafts[i], k)
            for i in range(n)]
    tables = BlockTables(8, 6, torch.device("cpu"))
    rows = tables.sync_all(seqs)
    query_len = k + 1 if graphed else None
    layout = StepLayout(max_tokens=64, max_sampled=64, max_seqs=8)
    buf = np.zeros(layout.size, dtype=np.int32)
    packed = pack_step(buf, layout, seqs, rows, tables.host, BS, {i: i for i in range(n)},
                       pad_to=n + pad if graphed else None, pad_row=7, query_len=query_len)
    batch = InputBatch.view(torch.from_numpy(buf), layout, packed)
    batch.input_ids[batch.pending_dst] = torch.arange(50, 50 + n, dtype=torch.int32)[batch.pending_src]
    batch.input_ids[batch.draft_dst] = torch.from_numpy(rng.integers(1, 9, len(batch.draft_dst), dtype=np.int32))
    logits = torch.from_numpy(rng.normal(size=(packed.num_sampled, 9)).astype(np.float32))
    fast, gathered = (f(seqs, logits, batch.input_ids, k, query_len) for f in (verification, gathered_verification))
    assert fast.num_drafts is None and gathered.num_drafts.tolist() == [k] * n
    assert torch.equal(fast.target_logits, gathered.target_logits)
    assert torch.equal(fast.draft_ids, gathered.draft_ids)
    assert list(fast.verifying) == list(gathered.verifying) and not fast.plain and not gathered.plain
    argmax = fast.target_logits.argmax(-1)
    verified = greedy_verify(argmax, gathered.draft_ids, gathered.num_drafts)
    assert torch.equal(greedy_verify(argmax, fast.draft_ids), verified)
