"""A sampling model's weights in huge-page regions (engine.huge_pages): the same values and results, tied
weights still one tensor, each region advised and freed with its tensor; nothing moves where it is off."""

import copy
import gc
import json
from pathlib import Path

import pytest
import torch

from multiar.engine import huge_pages
from multiar.engine.decode import generate
from multiar.engine.decode_choice import DecodeChoice
from multiar.engine.layout import prepare_for_decoding
from multiar.engine.model import GPT, ModelConfig
from multiar.engine.quantize import quantize

needs_thp = pytest.mark.skipif(not huge_pages.available(), reason="no transparent huge pages here")


@pytest.fixture
def forced(monkeypatch):
    """Huge pages wherever the kernel has them, not measured (MULTIAR_HUGE_PAGES=1)."""
    monkeypatch.setenv("MULTIAR_HUGE_PAGES", "1")


def model(width: int = 768, layers: int = 1, vocab: int = 600) -> GPT:
    torch.manual_seed(3)
    config = ModelConfig(vocab_size=vocab, block_size=64, n_layer=layers, n_head=4, n_embd=width)
    return GPT(config).eval()


def vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping that holds address in this process (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            low, high = (int(x, 16) for x in head.split("-"))
            inside = low <= address < high
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@needs_thp
def test_big_weights_move_into_advised_regions_and_every_logit_keeps_its_bits(forced):
    m = model()
    ids = torch.randint(0, 600, (2, 9))
    with torch.no_grad():
        before = m(ids)
    small = {n: p.data_ptr() for n, p in m.named_parameters() if p.nbytes < huge_pages.HUGE}
    big = [n for n, p in m.named_parameters() if p.nbytes >= huge_pages.HUGE]
    assert big and small  # qkv, proj, gate_up, down (768 wide, fp32) move; norms and the 600-word head stay

    placed = huge_pages.place(m)

    params = dict(m.named_parameters())
    assert placed == sum(params[n].nbytes for n in big)
    for n in big:
        assert params[n].data_ptr() % huge_pages.HUGE == 0 and huge_pages.placed(params[n])
        assert "hg" in vm_flags(params[n].data_ptr())  # madvise(MADV_HUGEPAGE) reached the kernel
        assert isinstance(params[n], torch.nn.Parameter) and params[n].is_contiguous()
    assert {n: params[n].data_ptr() for n in small} == small  # too small for a whole huge page: left
    assert m.lm_head.weight is m.wte.weight  # tied: still one tensor
    with torch.no_grad():
        assert torch.equal(m(ids), before)
    again = {n: p.data_ptr() for n, p in m.named_parameters()}
    assert huge_pages.place(m) == placed and again == {n: p.data_ptr() for n, p in m.named_parameters()}


@needs_thp
def test_a_region_is_freed_with_its_tensor_and_a_copy_of_it_is_plain_memory(monkeypatch):
    t = torch.randn(1024, 1024)  # 4 MiB: two whole huge pages
    out = huge_pages.copy_to_huge_pages(t)
    assert torch.equal(out, t) and huge_pages.placed(out)
    assert out.untyped_storage().nbytes() == t.nbytes  # the tensor's storage is its own bytes alone
    clone = copy.deepcopy(out)
    assert torch.equal(clone, t) and not huge_pages.placed(clone)
    ptr = out.data_ptr()
    del out
    gc.collect()
    assert ptr not in huge_pages._REGIONS  # unmapped with its tensor


def test_switched_off_or_without_the_kernels_huge_pages_nothing_moves(monkeypatch, tmp_path):
    m = model(width=64)
    monkeypatch.setattr(huge_pages, "MIN_BYTES", 0)
    ptrs = [p.data_ptr() for p in m.parameters()]
    monkeypatch.setenv("MULTIAR_HUGE_PAGES", "0")
    assert not huge_pages.available() and huge_pages.place(m) == 0
    assert huge_pages.decision(m) == {"place": False, "how": "off"}
    monkeypatch.setenv("MULTIAR_HUGE_PAGES", "1")  # forced, but the kernel has none: still off
    mode = tmp_path / "enabled"
    mode.write_text("always madvise [never]\n")
    monkeypatch.setattr(huge_pages, "THP_MODE", mode)
    assert not huge_pages.available() and huge_pages.place(m) == 0
    monkeypatch.setattr(huge_pages, "THP_MODE", tmp_path / "missing")  # not Linux, or no THP in the kernel
    assert not huge_pages.available() and huge_pages.place(m) == 0
    assert [p.data_ptr() for p in m.parameters()] == ptrs
    mode.write_text("always [madvise] never\n")
    monkeypatch.setattr(huge_pages, "THP_MODE", mode)
    assert huge_pages.available() == hasattr(__import__("mmap"), "MADV_HUGEPAGE")


@needs_thp
def test_whether_it_pays_is_measured_once_per_machine_and_shapes_kept_and_followed(monkeypatch, tmp_path):
    """A pass through the model's layers in each placement decides (huge pages where the rounds' median
    ratio is at most GAIN), once per machine, shapes and dtypes: the next process reads it from the
    cache, this one remembers it; another dtype is measured of its own; =1 forces, =0 is off."""
    monkeypatch.setenv("MULTIAR_CACHE", str(tmp_path))
    monkeypatch.delenv("MULTIAR_HUGE_PAGES", raising=False)
    monkeypatch.setattr(huge_pages, "MIN_BYTES", 0)
    m = model(width=64)
    calls = []

    def timer(ratio: float):
        def seconds(timed: torch.nn.Module) -> dict[str, float]:
            calls.append((ratio, next(timed.parameters()).dtype))
            return {"4 KiB pages": 1.0, "huge pages": 0.9, "ratio": ratio}

        return seconds

    for ratio, place in ((0.96, True), (0.98, False)):  # GAIN = 0.97: 4% shorter pays, 2% does not
        (tmp_path / "decode_layout.json").unlink(missing_ok=True)
        monkeypatch.setattr(huge_pages, "_DECIDED", {})
        made = huge_pages.decision(m, timer(ratio))
        pass_ms = {"4 KiB pages": 1e3, "huge pages": 900.0}
        assert made == {"place": place, "how": "measured", "pass_ms": pass_ms, "ratio": ratio}
        assert huge_pages.decision(m, timer(0.5)) is made  # remembered in this process: not timed again
        monkeypatch.setattr(huge_pages, "_DECIDED", {})  # a new process: read from the cache
        assert huge_pages.decision(m, timer(0.5)) == made | {"how": "cached"}
    assert calls == [(0.96, torch.float32), (0.98, torch.float32)]
    # a cached entry missing a field (edited by hand, an older shape): measured anew, not a crash
    cache = tmp_path / "decode_layout.json"
    for field in ("ratio", "pass_ms"):
        entries = json.loads(cache.read_text())
        key = next(k for k in entries if " | huge pages Linear torch.float32 | THP " in k)
        entries[key].pop(field)
        cache.write_text(json.dumps(entries))
        monkeypatch.setattr(huge_pages, "_DECIDED", {})
        assert huge_pages.decision(m, timer(0.98))["how"] == "measured"
    assert len(calls) == 4
    line = DecodeChoice("fp32", "linear", "forced", 1, huge_pages=made | {"mib": 0.0}).log_line()
    assert line.endswith(
        "; weights in 4 KiB pages (measured: a pass 900.00 ms in them, 1000.00 in 4 KiB pages)"
    )
    assert huge_pages.place(m) == 0 and not any(map(huge_pages.placed, m.parameters()))  # 2% did not pay
    bf16 = copy.deepcopy(m).to(torch.bfloat16)  # other dtypes: a decision of their own
    assert huge_pages.decision(bf16, timer(0.9))["place"] and calls[-1] == (0.9, torch.bfloat16)
    assert huge_pages.place(bf16) > 0 and huge_pages.decision(bf16)["how"] == "measured"  # placed: same key
    monkeypatch.setenv("MULTIAR_HUGE_PAGES", "1")
    assert huge_pages.decision(m) == {"place": True, "how": "forced"} and huge_pages.place(m) > 0
    # the real pass: each layer's operator over its weights as they are and over copies in huge pages
    figures = huge_pages.pass_seconds(model(width=64), rounds=2)
    assert set(figures) == {"4 KiB pages", "huge pages", "ratio"} and all(s > 0 for s in figures.values())
    assert huge_pages.pass_seconds(torch.nn.Sequential(torch.nn.LayerNorm(8))) == {}


@needs_thp
@pytest.mark.parametrize("how", ["fp32", "bf16", "int8"])
def test_a_prepared_model_samples_the_same_tokens_with_its_weights_placed(how, monkeypatch, tmp_path, forced):
    """Every candidate and the pick are placed (tiny tensors too, MIN_BYTES lowered), the choice notes the
    MiB, and greedy sampling gives what the same model gives unplaced."""
    monkeypatch.setattr(huge_pages, "MIN_BYTES", 0)
    base = model(width=64, layers=2)
    if how == "int8":
        base = quantize(base, "int8")
    kwargs = dict(dtype=how if how != "int8" else "auto", cache_dir=tmp_path / "a")
    prompt = torch.randint(0, 600, (2, 5))
    monkeypatch.setenv("MULTIAR_HUGE_PAGES", "0")
    plain, plain_choice = prepare_for_decoding(copy.deepcopy(base), **kwargs)
    assert plain_choice.huge_pages == {"place": False, "how": "off", "mib": 0.0}
    assert "pages" not in plain_choice.log_line()
    monkeypatch.setenv("MULTIAR_HUGE_PAGES", "1")
    kwargs["cache_dir"] = tmp_path / "b"
    placed, choice = prepare_for_decoding(copy.deepcopy(base), **kwargs)
    tensors = [*placed.parameters(), *placed.buffers()]
    moved = sum(t.nbytes for t in {t.data_ptr(): t for t in tensors}.values() if huge_pages.placed(t))
    assert moved > 0 and choice.huge_pages == {"place": True, "how": "forced", "mib": round(moved / 2**20, 1)}
    assert f"; {choice.huge_pages['mib']:g} MiB of weights in huge pages (forced)" in choice.log_line()
    assert choice.as_dict()["huge_pages"] == choice.huge_pages  # generate.json's provenance
    pinned = dict(dtype=choice.dtype, layout=choice.layout) if how != "int8" else {}
    again, _ = prepare_for_decoding(
        copy.deepcopy(base), cache_dir=tmp_path / "c", kernels=choice.kernels, **pinned
    )
    assert all(huge_pages.placed(p) for p in again.parameters() if p.device.type == "cpu" and not p.is_mkldnn)
    monkeypatch.setenv("MULTIAR_HUGE_PAGES", "0")
    unplaced, _ = prepare_for_decoding(
        copy.deepcopy(base), cache_dir=tmp_path / "d", kernels=choice.kernels, **pinned
    )
    assert not any(huge_pages.placed(t) for t in unplaced.parameters())
    with torch.inference_mode():
        assert generate(again, prompt, 6, temperature=0.0) == generate(unplaced, prompt, 6, temperature=0.0)


@needs_thp
def test_a_refused_region_leaves_its_tensor_and_a_view_buffer_keeps_its_shape(monkeypatch, caplog, forced):
    """mmap or madvise refused (a memory limit, a sandbox): the weights stay where they are, one warning;
    a buffer that is a smaller view at a moved buffer's first byte is not swapped for the whole one."""
    m = model()
    ptrs = [p.data_ptr() for p in m.parameters()]

    def refused(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(huge_pages.mmap, "mmap", refused)
    monkeypatch.setattr(huge_pages, "_REFUSED", [])
    with caplog.at_level("WARNING", logger="multiar"):
        assert huge_pages.place(m) == 0 and huge_pages.place(m) == 0
    assert [p.data_ptr() for p in m.parameters()] == ptrs
    assert [r.message for r in caplog.records if "refused" in r.message] == [
        "huge pages: a region was refused ([Errno 12] Cannot allocate memory): those weights stay where they are"
    ]
    monkeypatch.undo()
    monkeypatch.setenv("MULTIAR_HUGE_PAGES", "1")
    holder = torch.nn.Module()
    whole = torch.randn(1024, 1024)  # 4 MiB: moves
    holder.register_buffer("whole", whole)
    holder.register_buffer("again", whole)  # the same tensor under two names: moves once, stays one
    holder.register_buffer("head", whole[:8])  # a view of its first rows: not movable, and not replaced
    huge_pages.place(holder)
    assert huge_pages.placed(holder.whole) and holder.again is holder.whole
    assert holder.head.shape == (8, 1024) and not huge_pages.placed(holder.head)
