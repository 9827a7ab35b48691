"""How multiar's compiled decode graphs are built by inductor: the weights frozen into the graph
(constant-folded, and on a CPU packed once for oneDNN / MKL) and, on a CPU, a C++ wrapper that calls the
graph's kernels one after another without returning to Python between them. At decode sizes a step is
made of ~100-200 small kernels, so the Python wrapper's per-kernel cost is much of the step: the
10.8M model's batch-1 step 1.7x faster and a 16-slot serve step 1.5x faster with both than with neither
(benchmarks/README.md). For a graph of static shapes, `autotune` also has inductor time each matmul's
kernels as it compiles and keep the faster (on a CPU its own C++ GEMM template against oneDNN / MKL):
at one row a oneDNN bf16 call costs 40-70 us whatever its size, the template's runs near the weights'
read time (benchmarks/README.md, issue 19). Not for dynamic row counts: the template's blocking for a
size unknown at compile time ran 5-15x slower than oneDNN there. On CUDA (`cuda_graphs`) none of these:
the whole step is captured as one CUDA graph and replayed, its weights left as graph inputs (85M batch 1
on an H200: 6.1x the eager step, benchmarks/README.md). These switches are inductor's private config;
where a torch lacks one, the graph is compiled without it (one warning line). The patch holds for the
thread that entered it only (torch 2.13 keeps inductor's config values per thread), so a server's engine
threads, each around its own calls, do not undo each other's switches. No Lightning, Hydra or domain
code here.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

log = logging.getLogger("multiar")

# what each switch buys, for the warning when it is missing
SWITCHES = {
    "freezing": "frozen weights",
    "cpp_wrapper": "a C++ wrapper",
    "max_autotune": "timing each matmul's kernels",
    "max_autotune_gemm_backends": "its own GEMM kernels among them",
    "triton.cudagraphs": "CUDA graphs",
}


def inductor_options(
    cpp_wrapper: bool = True, autotune: bool = False, cuda_graphs: bool = False, freeze: bool = True
) -> contextlib.AbstractContextManager:
    """A context that turns on inductor's freezing (and its C++ wrapper when cpp_wrapper: pass it for a
    CPU only; and with autotune, matmul kernels timed at compile time, with cpp_wrapper inductor's C++
    GEMM template among them) around a compiled call: read when a call compiles, so it is entered around
    every call. cuda_graphs (a CUDA device): the graph replayed as one CUDA graph (torch.compile's
    "reduce-overhead"), the weights left as its static inputs rather than frozen, as gpt-fast does.
    freeze=False: the weights left as the graph's inputs (a package that holds none, engine.ahead_of_time).
    Switches this torch lacks are left out, each with one warning line."""
    try:
        import torch._inductor.config as config
    except ImportError:
        config = None
    # a CUDA graph replays the weights from where they are: nothing to fold or pack
    wanted: dict[str, object] = {"triton.cudagraphs": True} if cuda_graphs else {"freezing": freeze}
    if cpp_wrapper:
        wanted["cpp_wrapper"] = True
    if autotune:
        wanted["max_autotune"] = True
        if cpp_wrapper:  # a CPU: the C++ template beside ATen's oneDNN / MKL calls
            wanted["max_autotune_gemm_backends"] = "CPP,ATEN"
    present = {k: v for k, v in wanted.items() if hasattr(config, k)}  # it answers "triton.cudagraphs" too
    if "max_autotune" in present:  # its tables on stderr at every compile: not a user's business
        quiet = {"autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}
        present |= {k: v for k, v in quiet.items() if hasattr(config, k)}
        # nor is the deprecation inductor's timing code warns about (torch 2.13: its own storage call);
        # a filter for the whole process, from the first autotuned graph on, on that message from inductor
        warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning, "torch._inductor")
    for k in wanted:
        if k not in present:
            log.warning(
                "torch._inductor.config.%s is missing in this torch: compiling without %s", k, SWITCHES[k]
            )
    if not present or not hasattr(config, "patch"):
        return contextlib.nullcontext()
    return config.patch(**present)


def make_room(graphs: int) -> None:
    """Raise dynamo's recompile limit by `graphs`: it counts the graphs compiled from one function, and
    every model compiled here shares one (`captured_step.CapturedStep`'s step or `decode.decode_filled`: each model, batch
    size and case is a graph of its own). Past the limit (8 by default) dynamo runs the function uncompiled, silently
    slower than the eager model: a server of three runs (4 graphs each) or a benchmark of several
    compiled models would reach it."""
    try:
        import torch._dynamo.config as config
    except ImportError:
        return
    for key in ("recompile_limit", "accumulated_recompile_limit"):
        if isinstance(getattr(config, key, None), int):
            setattr(config, key, getattr(config, key) + graphs)
