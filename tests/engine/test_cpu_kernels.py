"""The fused fp32 CPU kernels (engine/cpu_kernels.py): built with the system's C compiler, equal to the
composed ops in values and gradients, cached with their measured choice, and absent without a compiler."""

from __future__ import annotations

import json
import platform

import pytest
import torch
import torch.nn.functional as F

from multiar.engine import cpu_kernels, training_backward


@pytest.fixture
def fresh_kernels(monkeypatch, tmp_path):
    """A kernel cache of the test's own, and the process's built library and choices forgotten (and
    forgotten again after, so later tests find the session's)."""
    monkeypatch.setenv("MULTIAR_CACHE", str(tmp_path))
    monkeypatch.delenv("MULTIAR_CPU_KERNELS", raising=False)
    cpu_kernels.library.cache_clear()
    cpu_kernels._choice.cache_clear()
    yield tmp_path / "kernels"
    cpu_kernels.library.cache_clear()
    cpu_kernels._choice.cache_clear()


def built() -> None:
    """Skip where there is no compiler (or, off Linux, no OpenMP in it: macOS's clang); on Linux with a
    compiler the kernels must build."""
    if cpu_kernels.compiler() is None:
        pytest.skip("no C compiler here: the composed ops run (test_without_a_compiler_...)")
    if cpu_kernels.library() is None and platform.system() != "Linux":
        pytest.skip(f"the kernels do not build on {platform.system()} (logged): the composed ops run")
    assert cpu_kernels.library() is not None, "a C compiler is installed, yet the kernels did not build"


@pytest.mark.parametrize("threads", [1, 2])
def test_the_fused_kernels_equal_the_composed_ops(threads):
    """Values and input gradients of SwiGLU's gate and RMSNorm against torch's ops, at widths that are no
    multiple of a vector (so each row's tail runs), with gates far out where exp overflows, and a
    gradient that comes as a transposed view; at 1 and 2 threads (dw is summed per thread)."""
    built()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        gate_up = torch.randn(5, 7, 2 * 19, generator=gen) * 3
        gate_up[0, 0, :4] = torch.tensor([-120.0, -88.0, 88.0, 120.0])  # exp(-x) over/underflows
        x = torch.randn(5, 7, 37, generator=gen)
        weight = torch.randn(37, generator=gen)
        cases = {
            "swiglu": (
                (gate_up,),
                cpu_kernels.swiglu_gate,
                lambda h: F.silu(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1],
                torch.randn(7, 5, 19, generator=gen).transpose(0, 1),  # a view, as autograd may hand
            ),
            "rms_norm": (
                (x, weight),
                lambda x, w: cpu_kernels.rms_norm(x, w, 1e-5),
                lambda x, w: F.rms_norm(x, (37,), w, 1e-5),
                torch.randn(5, 7, 37, generator=gen),
            ),
        }
        for name, (inputs, fused, composed, grad) in cases.items():
            got_in = [t.clone().requires_grad_() for t in inputs]
            want_in = [t.clone().requires_grad_() for t in inputs]
            got, want = fused(*got_in), composed(*want_in)
            got.backward(grad)
            want.backward(grad)
            assert torch.isfinite(got).all(), name
            torch.testing.assert_close(got, want, msg=name)
            for g, w in zip(got_in, want_in, strict=True):
                torch.testing.assert_close(g.grad, w.grad, msg=name)
    finally:
        torch.set_num_threads(before)


def test_the_training_step_takes_the_kernels_measured_faster(fresh_kernels, monkeypatch):
    """training_backward's swiglu_gate and rms_norm take the fused kernel where the cached choice says it
    was faster, the composed Function where it says not, and the composed one always for bf16 and for
    MULTIAR_CPU_KERNELS=0; the choice is measured once and then read from its file."""
    built()
    measured = []
    real_measure = cpu_kernels.measure
    monkeypatch.setattr(cpu_kernels, "measure", lambda: measured.append(1) or real_measure(rounds=1))
    gate_up = torch.randn(4, 2 * 8, requires_grad=True)
    x, w = torch.randn(4, 8, requires_grad=True), torch.ones(8, requires_grad=True)
    assert cpu_kernels.chosen("swiglu_gate") in (True, False)
    assert measured == [1]
    choice_file = next(fresh_kernels.glob("*.choice.json"))
    table = json.loads(choice_file.read_text())
    key = cpu_kernels._choice_key()  # the machine (CPU, torch, threads) as every measured choice is keyed
    assert set(table[key]) == {"format", "swiglu_gate", "rms_norm"}
    assert cpu_kernels.measured() == table[key]  # what the benchmark records beside its rows
    assert all(table[key][op]["fused_ms"] > 0 and table[key][op]["composed_ms"] > 0 for op in cpu_kernels.OPS)
    for fused in (True, False):
        table[key]["swiglu_gate"]["fused"] = table[key]["rms_norm"]["fused"] = fused
        choice_file.write_text(json.dumps(table))
        cpu_kernels._choice.cache_clear()
        out = training_backward.swiglu_gate(gate_up), training_backward.rms_norm(x, w, 1e-5)
        modules = [o.grad_fn._forward_cls.__module__ for o in out]
        assert (
            modules == [("multiar.engine.cpu_kernels" if fused else "multiar.engine.training_backward")] * 2
        )
    assert measured == [1]  # read from the file each time after the first
    monkeypatch.setenv("MULTIAR_CPU_KERNELS", "0")
    table[key]["swiglu_gate"]["fused"] = True
    choice_file.write_text(json.dumps(table))
    cpu_kernels._choice.cache_clear()
    switched_off = training_backward.swiglu_gate(gate_up)
    assert switched_off.grad_fn._forward_cls.__module__ == "multiar.engine.training_backward"
    monkeypatch.delenv("MULTIAR_CPU_KERNELS")
    bf16 = training_backward.swiglu_gate(gate_up.detach().bfloat16().requires_grad_())
    assert bf16.grad_fn._forward_cls.__module__ == "multiar.engine.training_backward"


def test_the_library_is_built_once_and_kept(fresh_kernels, monkeypatch):
    """The first use compiles into the cache folder; a later process (the cache forgotten) loads the
    file without compiling again."""
    built()
    libraries = list(fresh_kernels.glob("*.so"))
    assert len(libraries) == 1 and not list(fresh_kernels.glob("tmp*"))  # mkstemp's names, renamed
    cpu_kernels.library.cache_clear()
    compiles = []
    real_build = cpu_kernels.build_library
    monkeypatch.setattr(cpu_kernels, "build_library", lambda *a: compiles.append(a) or real_build(*a))
    assert cpu_kernels.library() is not None
    assert compiles == []
    assert list(fresh_kernels.glob("*.so")) == libraries


def test_without_a_compiler_the_composed_ops_run(fresh_kernels, monkeypatch, caplog):
    """No C compiler: no library, one log line saying so, and the training functions compute as before."""
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with caplog.at_level("INFO", logger="multiar"):
        assert cpu_kernels.library() is None
    assert "no C compiler (/nonexistent/cc)" in caplog.text
    assert not cpu_kernels.chosen("swiglu_gate") and not cpu_kernels.chosen("rms_norm")
    gate_up = torch.randn(3, 2 * 5, requires_grad=True)
    out = training_backward.swiglu_gate(gate_up)
    assert out.grad_fn._forward_cls.__module__ == "multiar.engine.training_backward"
    torch.testing.assert_close(out, F.silu(gate_up[:, :5]) * gate_up[:, 5:])


def test_a_failing_build_is_reported_and_leaves_no_file(fresh_kernels, monkeypatch, tmp_path, caplog):
    """A compiler that fails every build: the error's last line logged, no library, no partial file."""
    fake = tmp_path / "cc"
    fake.write_text(
        "#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake 1.0; exit 0; fi\necho 'fatal: no' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with caplog.at_level("INFO", logger="multiar"):
        assert cpu_kernels.library() is None
    assert "no build succeeded" in caplog.text and "fatal: no" in caplog.text
    assert list(fresh_kernels.iterdir()) == []


def test_a_failing_measurement_or_a_misfit_keeps_the_composed_ops(fresh_kernels, monkeypatch, caplog):
    """A measurement that raises (mid-forward, under hooks it cannot run with) chooses neither kernel
    and says so; shapes the kernels do not take (an odd gate|up width, a weight of another width) never
    reach them."""
    built()

    def failing(rounds: int = 7) -> dict:
        raise RuntimeError("saved-tensor hooks")

    monkeypatch.setattr(cpu_kernels, "measure", failing)
    with caplog.at_level("INFO", logger="multiar"):
        assert not cpu_kernels.chosen("swiglu_gate") and not cpu_kernels.chosen("rms_norm")
    assert "the measurement failed (saved-tensor hooks)" in caplog.text
    assert not cpu_kernels.fits_swiglu(torch.randn(3, 7))
    assert cpu_kernels.fits_swiglu(torch.randn(3, 8))
    assert not cpu_kernels.fits_rms_norm(torch.randn(3, 8), torch.ones(7))
    assert not cpu_kernels.fits_rms_norm(torch.randn(3, 8), torch.ones(1, 8))
    assert cpu_kernels.fits_rms_norm(torch.randn(3, 8), torch.ones(8))
