"""Shared fixtures: a private dataset cache per test session, and small real inputs from the bundled data."""

from __future__ import annotations

import itertools
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from Bio import SeqIO

from multiar.domains import DOMAINS, build_domain
from multiar.files import find_files


def context_sensitive(model: torch.nn.Module, std: float = 0.5) -> torch.nn.Module:
    """model with its matrices redrawn far from the init's scale: a tiny model at init predicts from
    the last id alone (greedy repeats one id), so a wrong position or context would change no token
    and a test comparing tokens could not fail; with these weights the tokens depend on the context."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, std)
    return model


@pytest.fixture(autouse=True)
def compile_without_autotune(request, monkeypatch) -> None:
    """compile=true's graphs compiled without timing each matmul's kernels (inductor's max_autotune): the
    kernels it would pick compute the same function, and timing them is ~40 s of a 55 s test on 2 cores.
    Tests marked `autotune` compile as users do (those check the timed kernels' numbers)."""
    if request.node.get_closest_marker("autotune") is not None:
        return
    import multiar.engine.decode as decode
    from multiar.engine.inductor_options import inductor_options

    monkeypatch.setattr(
        decode, "inductor_options", lambda **kw: inductor_options(**(kw | {"autotune": False}))
    )


@pytest.fixture(autouse=True, scope="session")
def no_network() -> None:
    """Tests never reach the network: a connection to anything but loopback fails loudly."""
    real_connect = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else None
        if host is not None and not (host in ("localhost", "::1") or str(host).startswith("127.")):
            raise OSError(f"test tried to reach the network: {address}")
        return real_connect(self, address)

    mp = pytest.MonkeyPatch()
    mp.setattr(socket.socket, "connect", connect)
    yield
    mp.undo()


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep tests off the user's ~/.cache/multiar; a compiled CPU step's GEMMs pinned (one package built,
    not one per candidate: engine.ahead_of_time; its own tests measure the choice)."""
    cache = tmp_path_factory.mktemp("multiar-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("MULTIAR_CACHE", str(cache))
    mp.setenv("MULTIAR_COMPILE_GEMMS", "autotuned")
    # huge pages forced (where the kernel has them), not measured: no test's cache file gains the decision's
    # key depending on which test ran first (test_huge_pages measures it in a cache of its own)
    mp.setenv("MULTIAR_HUGE_PAGES", "1")
    yield cache
    mp.undo()


def bundled_files(name: str, k: int) -> list[Path]:
    """The first k files of a domain's bundled default data."""
    domain = build_domain(name)
    return find_files(domain.default_paths(), domain.suffixes)[:k]


def fitted_domain(name: str, k: int = 20):
    """A domain whose tokenizer state is fitted on k bundled files, and its records."""
    domain = build_domain(name)
    records = [r for f in bundled_files(name, k) for r in domain.read(f)][:200]
    domain.fit(records)
    return domain, records


@pytest.fixture(params=sorted(DOMAINS))
def domain_name(request: pytest.FixtureRequest) -> str:
    return request.param


# the smallest useful training setup: seconds per run, every feature exercised
TINY = [
    "model.n_layer=1",
    "model.n_embd=32",
    "model.n_head=2",
    "model.block_size=64",
    "data.batch_size=4",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.precision=32-true",  # the same numbers on every CPU; precision=auto has its own tests
    "samples.every_n_steps=0",  # the samples callback has its own tests
]
FIXTURE_RUN = Path(__file__).parent / "fixtures" / "run_format0"


def copy_fixture_run(tmp_path: Path) -> Path:
    """A private copy of the small run folder of the foundation's format (format_version 0)."""
    import shutil

    run = tmp_path / "fixture_run"
    shutil.copytree(FIXTURE_RUN, run)
    return run


def serve_on_loopback(app: Any) -> tuple[str, Any, threading.Thread]:
    """app served by uvicorn on a thread, on 127.0.0.1 and a port bound here (no other process can take
    it between a pick and the bind), once started (60 s at most): its url, the server, the thread. Stop it
    with server.should_exit = True and thread.join()."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the test's server did not start within 60 s"
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread


# protein filters that let any sample through (tests that count samples, not judge them)
QUIET_FILTERS = ["filters.min_entropy=0", "filters.max_homopolymer=100000", "filters.max_identity=1.0"]


def proteome_subset(folder, per_file=60):
    """The first records of each bundled proteome, headers kept, as two small FASTA files."""
    folder.mkdir(parents=True, exist_ok=True)
    domain = build_domain("protein")
    for path in domain.default_paths("ecoli+yeast"):
        records = list(itertools.islice(domain.read(path), per_file))
        SeqIO.write(records, folder / path.name.replace(".gz", ""), "fasta")
    return folder
