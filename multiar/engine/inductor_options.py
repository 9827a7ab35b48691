"""How multiar's compiled decode graphs are built by inductor: the weights frozen into the graph
(constant-folded, and on a CPU packed once for oneDNN / MKL) and, on a CPU, a C++ wrapper that calls the
graph's kernels one after another without returning to Python between them. At decode sizes a step is
made of ~100-200 small kernels, so the Python wrapper's per-kernel cost is much of the step: the
10.8M model's batch-1 step 1.7x faster and a 16-slot serve step 1.5x faster with both than with neither
(benchmarks/README.md). Both switches are inductor's private config; where a torch lacks one, the graph
is compiled without it (one warning line). No Lightning, Hydra or domain code here.
"""

from __future__ import annotations

import contextlib
import logging

log = logging.getLogger("multiar")

# what each switch buys, for the warning when it is missing
SWITCHES = {"freezing": "frozen weights", "cpp_wrapper": "a C++ wrapper"}


def inductor_options(cpp_wrapper: bool = True) -> contextlib.AbstractContextManager:
    """A context that turns on inductor's freezing (and its C++ wrapper when cpp_wrapper: on a CPU)
    around a compiled call: read when a call compiles, so it is entered around every call. Switches this
    torch lacks are left out, each with one warning line."""
    try:
        import torch._inductor.config as config
    except ImportError:
        config = None
    wanted = ["freezing", "cpp_wrapper"] if cpp_wrapper else ["freezing"]
    present = {k: True for k in wanted if hasattr(config, k)}
    for k in wanted:
        if k not in present:
            log.warning(
                "torch._inductor.config.%s is missing in this torch: compiling without %s", k, SWITCHES[k]
            )
    if not present or not hasattr(config, "patch"):
        return contextlib.nullcontext()
    return config.patch(**present)
