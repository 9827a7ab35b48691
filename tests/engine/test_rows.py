"""The per-row machinery of decoding (multiar.engine.rows.Rows), on its own: processors and min_new_tokens
per row, end reasons, held-back stop tokens, one host sync per appended step, the slid window's tails; and
plain and speculative decoding both go through it."""

from __future__ import annotations

import torch

from multiar.engine.rows import Counts, Rows, Token

EOS = 2
CPU = torch.device("cpu")


def rows(prompts, max_new=5, **kwargs) -> Rows:
    return Rows(prompts, max_new, device=CPU, width=max(map(len, prompts)) + max_new, **kwargs)


def test_counts_move_together_on_the_device_or_each_its_own_way():
    c = Counts([3, 5], CPU)
    assert not c.aligned
    c.add(2)
    assert c.values == [5, 7] and c.tensor.tolist() == [5, 7]
    c.add([2, 0])
    assert c.values == [7, 7] and c.tensor.tolist() == [7, 7] and c.aligned


def test_processors_see_each_row_its_own_ids_and_min_new_tokens_holds_per_row():
    seen = []

    def record(ids, logits):
        seen.append(ids.tolist())
        return logits

    r = rows([[1, 5, 9], [1, 4]], eos_id=EOS, min_new_tokens=1, processors=[record])
    r.length.add([1, 0])  # row 0 has one new id (here a 0), row 1 none
    logits, banned = r.process(torch.zeros(2, 6))
    assert seen == [[[1, 5, 9, 0]], [[1, 4]]]
    assert torch.isneginf(logits[:, EOS]).tolist() == [False, True]  # only the row still under its minimum
    assert banned.tolist() == [False, False]


def test_a_row_with_every_token_banned_is_flagged_and_made_flat():
    def ban_row_1(ids, logits):
        logits[1:] = float("-inf")
        return logits

    r = rows([[1, 5], [1, 4]], processors=[ban_row_1])
    logits, banned = r.process(torch.randn(2, 6))
    assert banned.tolist() == [False, True] and logits[1].tolist() == [0.0] * 6
    assert rows([[1, 5]]).process(torch.zeros(1, 6))[1] is None  # nothing can ban: no flags computed


def test_push_gives_each_end_reason():
    r = rows(
        [[1], [1], [1], [1]], max_new=3, eos_id=EOS, stop=[[7, 8]], should_stop=lambda b, ids: ids == [9]
    )
    assert [r.push(0, t) for t in (5, EOS)] == [None, "eos"]
    assert [r.push(1, t) for t in (7, 8)] == [None, "stop"] and r.new[1] == []  # the stop is dropped
    assert r.push(2, 9) == "stop"  # should_stop
    assert [r.push(3, t) for t in (4, 4, 4)] == [None, None, "length"]


def test_append_streams_tokens_past_the_hold_writes_ended_rows_eos_and_syncs_once(monkeypatch):
    r = rows([[1, 5, 9], [1, 4]], max_new=6, eos_id=EOS, stop=[[7, 8, 3]])  # holds two tokens back
    syncs = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: syncs.append(1) or tolist(self))
    events = []
    for step in ([4, 6], [5, 7], [6, EOS], [7, 8]):
        token, ev = r.append(torch.tensor(step), None)
        events += ev
    assert len(syncs) == 4  # one host sync per step
    assert token.tolist() == [7, EOS]  # an ended row only repeats EOS
    assert r.seq[1, :5].tolist() == [1, 4, 6, 7, EOS] and r.length.values == [7, 6]
    assert [e for e in events if e.row == 1] == [Token(1, 6), Token(1, 7), Token(1, None, "eos")]
    assert [e for e in events if e.row == 0] == [Token(0, 4), Token(0, 5)]  # 6 and 7 held for the stop
    assert r.ends == [None, "eos"] and not r.done
    assert r.append(torch.tensor([8, 0]), None)[1] == [Token(0, 6)]  # 7, 8 may still start the stop
    _, ev = r.append(torch.tensor([3, 0]), torch.tensor([False, True]))  # an ended row's flag is ignored
    assert ev == [Token(0, None, "stop")] and r.new[0] == [4, 5, 6]
    assert r.done


def test_a_dead_row_ends_without_its_token():
    r = rows([[1, 5], [1, 4]])
    _, events = r.append(torch.tensor([3, 3]), torch.tensor([False, True]))
    assert events == [Token(0, 3), Token(1, None, "no_valid_token")] and r.new == [[3], []]


def test_the_slid_window_is_each_rows_tail_from_a_flagged_id():
    r = rows([[1, 10, 11, 12, 13, 14], [1, 20, 21]], max_new=4)
    starts = [i in (12, 20) for i in range(32)]
    padded, last = r.tails(4, starts)
    assert r.cache.values == [3, 2]  # [12, 13, 14] and [20, 21]
    assert padded.tolist() == [[12, 13, 14], [20, 21, 0]] and last.tolist() == [2, 1]


def test_plain_and_speculative_decoding_both_end_rows_through_rows(monkeypatch):
    from multiar.engine.decode import generate
    from multiar.engine.model import GPT, ModelConfig
    from multiar.engine.speculative import speculative_generate

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=17, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    callers = []
    push = Rows.push
    monkeypatch.setattr(Rows, "push", lambda self, b, t: callers.append(b) or push(self, b, t))
    plain = generate(model, prompts=[[1, 5], [1]], max_new_tokens=6, temperature=0.0)
    assert len(callers) == 12
    spec, stats = speculative_generate(model, [[1, 5], [1]], 6, draft="ngram", k=2, temperature=0.0)
    assert len(callers) >= 24 and spec == plain and stats.ends == ["length", "length"]


def test_a_refilled_row_starts_over_while_the_other_row_runs_on():
    r = rows([[1, 5, 9], [1, 4]], max_new=3, eos_id=EOS, min_new_tokens=1)
    _, events = r.append(torch.tensor([7, 8]), None)
    _, events = r.append(torch.tensor([EOS, 8]), None)
    assert r.ends == ["eos", None] and r.new == [[7], [8, 8]]
    r.refill(0, [1, 3])  # the next request joins in row 0's slot
    assert r.ends == [None, None] and r.new[0] == [] and r.prompt_lens == [2, 2]
    assert r.length.values == [2, 4] and r.cache.values == [2, 2] and not bool(r.finished_t[0])
    assert r.seq[0, :3].tolist() == [1, 3, 0]  # the old row's ids are gone
    logits, _ = r.process(torch.zeros(2, 6))
    assert torch.isneginf(logits[:, EOS]).tolist() == [True, False]  # min_new_tokens counts from the refill
    _, events = r.append(torch.tensor([6, 9]), None)
    assert r.ends == [None, "length"] and r.new == [[6], [8, 8, 9]]
    assert r.seq[0, :3].tolist() == [1, 3, 6]  # written after the new prompt, at the row's own position
    assert Token(1, None, "length") in events


def test_a_refill_longer_than_the_rows_width_is_refused():
    r = rows([[1, 5]], max_new=2)
    try:
        r.refill(0, list(range(10)))
    except ValueError as err:
        assert "does not fit a width of 4" in str(err)
    else:
        raise AssertionError("a prompt wider than the row was taken")


def test_a_moved_row_takes_its_ids_counts_and_stream_and_none_of_the_slots_old_state():
    r = rows([[1, 4], [1, 5, 6], [1, 7, 8, 9]], max_new=6, stop=[[30, 31]])
    r.append_rows(torch.tensor([10, 30]), torch.tensor([False, False]), [1, 2])  # row 2 holds 30 back
    r.end(0, "eos")
    r.failed[0] = "ValueError: the row that ended here"  # an ended row's error, kept until a refill
    r.move(2, 0)
    assert r.seq[0, :5].tolist() == [1, 7, 8, 9, 30] and r.length.values == [5, 4, 5]
    assert r.length.tensor.tolist() == r.length.values and r.prompt_lens[0] == 4
    assert r.ends == [None, None, "idle"] and r.finished_t.tolist() == [False, False, True]
    assert r.failed == {}  # not the moved row's
    assert r.end(0, "length") == [Token(0, 30), Token(0, None, "length")]  # its held-back token follows it
