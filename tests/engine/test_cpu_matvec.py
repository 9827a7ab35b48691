"""The decode step's mat-vec operators (engine/cpu_matvec.py): built with the system's C++ compiler against
torch's headers, equal to the dense product at one to three rows and at widths with a tail, usable in
torch.compile's graphs, and absent (not fatal) without a compiler."""

from __future__ import annotations

import logging
import platform

import pytest
import torch
import torch.nn.functional as F

from multiar.engine import cpu_kernels, cpu_matvec


def built() -> None:
    """Skip where there is no C++ compiler (or off Linux, where OpenMP may be missing); on Linux with one
    the operators must build."""
    if cpu_kernels.compiler("CXX", "c++") is None:
        pytest.skip("no C++ compiler here: int8 layers keep their own kernels")
    if cpu_matvec.library() is None and platform.system() != "Linux":
        pytest.skip(f"the operators do not build on {platform.system()} (logged)")
    assert cpu_matvec.library() is not None, "a C++ compiler is installed, yet the operators did not build"


@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize("width", [64, 96, 70, 4166])  # whole 32- and 64-wide steps, a tail, 2 int32 chunks
def test_the_operators_equal_the_dense_product(rows, width):
    """int8: the activations (fp32, or int16 on a per-row scale with AVX512-VNNI) times the codes, scaled
    per output row, against the dequantized weight's product within the rounding of the activations; fp32 and bf16 weights against F.linear in fp32 of the same values (bf16: products summed in
    fp32, so within fp32 rounding of the exact sum, not bf16's)."""
    built()
    gen = torch.Generator().manual_seed(rows * 1000 + width)
    x = torch.randn(rows, width, generator=gen)
    q = torch.randint(-127, 128, (37, width), generator=gen, dtype=torch.int8)
    scales = torch.rand(37, generator=gen) + 0.5
    weight = q.double() * scales.double()[:, None]
    expected = F.linear(x.double(), weight)
    # with AVX512-VNNI each row of x is rounded to int16 on its own scale (max|x| -> 32767): each term
    # off by at most half a step; elsewhere fp32 activations (within fp32 rounding of the same bound)
    half_step = x.abs().amax(-1, keepdim=True).double() / 32767 / 2  # (rows, 1)
    bound = half_step * weight.abs().sum(-1) + 1e-4 * expected.abs() + 1e-4  # (rows, out)
    assert ((cpu_matvec.int8_matvec(x, q, scales).double() - expected).abs() <= bound).all()
    # a row of zeros gives zeros; a NaN or an infinity reaches the output as F.linear's does
    odd = torch.zeros(3, width)
    odd[1, 5], odd[2, 7] = float("nan"), float("inf")
    y = cpu_matvec.int8_matvec(odd, q, scales)
    assert (y[0] == 0).all() and y[1].isnan().all()
    assert torch.equal(y[2].isinf(), F.linear(odd[2:], q.float() * scales[:, None])[0].isinf())
    w = torch.randn(37, width, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        xs, ws = x.to(dtype), w.to(dtype)
        y = cpu_matvec.matvec(xs, ws)
        assert y.dtype == torch.float32 and y.shape == (rows, 37)
        torch.testing.assert_close(y, F.linear(xs.double(), ws.double()).float(), rtol=1e-5, atol=1e-4)


def test_the_operators_check_their_inputs_and_run_in_a_compiled_graph():
    """A wrong dtype or shape is an error naming the operator (not a read past a buffer); the operators
    trace (their output's shape registered) into a torch.compile graph that computes what eager does."""
    built()
    x, q, scales = torch.randn(1, 32), torch.zeros(8, 32, dtype=torch.int8), torch.ones(8)
    with pytest.raises(RuntimeError, match="int8_matvec: x fp32"):
        cpu_matvec.int8_matvec(x.double(), q, scales)
    with pytest.raises(RuntimeError, match="int8_matvec: shapes"):
        cpu_matvec.int8_matvec(x, q, torch.ones(9))
    with pytest.raises(RuntimeError, match="matvec: x and w both"):
        cpu_matvec.matvec(x, torch.zeros(8, 32, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="matvec: x \\(rows, in\\)"):
        cpu_matvec.matvec(x, torch.zeros(8, 31))
    w = torch.randn(8, 32)
    q = torch.randint(-127, 128, (8, 32), dtype=torch.int8)

    def step(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(cpu_matvec.matvec(x, w)) + cpu_matvec.int8_matvec(x, q, scales)

    compiled = torch.compile(step, dynamic=False)
    torch.testing.assert_close(compiled(x), step(x))


def test_without_a_compiler_there_is_no_operator_and_no_error(monkeypatch, tmp_path, caplog):
    """No C++ compiler: library() is None, logged once; the process's loaded library is left alone."""
    monkeypatch.setenv("MULTIAR_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with caplog.at_level(logging.INFO, logger="multiar"):
        assert cpu_matvec._load() is None
    assert "mat-vec operators: no C++ compiler" in caplog.text
    assert not (tmp_path / "kernels").exists()
