"""`multiar serve runs=[...]`: each run's model behind one engine thread (continuous batching over its
slots), an HTTP API (serve_app) on host:port until SIGTERM / Ctrl-C, which drains: running requests
finish (up to drain_timeout), new ones get 503. Loopback by default; another host needs an API key."""

from __future__ import annotations

import dataclasses
import gc
import ipaddress
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from multiar.commands.sampling_setup import cache_dir
from multiar.commands.serve_app import AppState, create_app
from multiar.commands.serve_engine import SlotEngine
from multiar.commands.serve_requests import Served, warm_up
from multiar.commands.serve_step import served_model
from multiar.config import load_config
from multiar.domain import WindowStarts
from multiar.engine.layout import CACHE_FILE
from multiar.errors import ConfigError
from multiar.run_folder import load_run
from multiar.schema import validate

log = logging.getLogger("multiar")

NO_AUTOMATIC_FULL_GC = 1 << 30  # young collections before CPython runs a full one itself: never
SWITCH_INTERVAL = 0.001  # seconds: how long a thread waiting for the GIL waits before it asks for it


def engines_collect() -> None:
    """CPython's automatic full collections off: the engines made with full_gc run one a second between
    their steps (serve_engine.collect_between_steps); young generations are collected as usual."""
    gc.set_threshold(*gc.get_threshold()[:2], NO_AUTOMATIC_FULL_GC)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key(cfg: DictConfig) -> str | None:
    """The key from api_key_file or MULTIAR_API_KEY (never the command line); ConfigError, exit 2, when
    the host is not loopback and there is none."""
    key = os.environ.get("MULTIAR_API_KEY") or None
    if cfg.api_key_file is not None:
        path = Path(cfg.api_key_file).expanduser()
        try:
            key = path.read_text(encoding="utf-8").strip() or None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"api_key_file: {path}: {getattr(err, 'strerror', None) or err}") from None
    if key is None and not is_loopback(cfg.host):
        raise ConfigError(f"host: {cfg.host} is not loopback: set MULTIAR_API_KEY or api_key_file= first")
    return key


def model_names(cfg: DictConfig) -> list[str]:
    """The runs' folder names, the models' names in requests; ConfigError for two runs of one name."""
    names = [Path(r).expanduser().resolve().name for r in cfg.runs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"runs: two runs are named {twice[0]!r} (the folder name is the model name)")
    return names


def load_models(cfg: DictConfig, files_dir: Path, full_gc: bool = False) -> dict[str, Served]:
    """Each run's model and engine (started), named by its folder."""
    names = model_names(cfg)
    models: dict[str, Served] = {}
    for name, path in zip(names, cfg.runs, strict=True):
        run = load_run(path, device=cfg.device)
        served = served_model(run, cfg, cache_dir() / CACHE_FILE)
        model, attention = served.model, served.attention
        log.info("%s: %s; %s", name, attention.log_line(), served.log_line())
        base = load_config(
            "generate", [f"run={path}", f"device={cfg.device}", f"dtype={cfg.dtype}", "progress=false", "n=1"]
        )
        base = validate("generate", base)
        domain = run.domain
        starts = domain.window_starts if isinstance(domain, WindowStarts) else None
        engine = SlotEngine(
            model,
            slots=cfg.slots,
            max_queue=cfg.max_queue,
            prefill_chunk=cfg.prefill_chunk,
            stream_interval=cfg.stream_interval,
            eos_id=domain.eos_id,
            max_tokens=cfg.max_tokens,
            window_starts=starts,
            attention=attention,
            captured=served.step == "captured",
            checks=cfg.checks,
            full_gc=full_gc,
        )
        engine.start()
        info = engine.describe()
        print(
            f"serve: {name} ({domain.name}): {info['slots']} slots, KV cache {info['kv_mib']:.1f} MiB "
            f"({info['kv_dtype']}), {info['dtype']} weights, rows attention {info['attention']}, "
            f"{served.step} steps ({served.how}), checks {info['checks']}",
            flush=True,
        )
        run = dataclasses.replace(run, model=model)  # the candidate not served is not kept alive by the run
        models[name] = Served(name, run, model, base, engine, files_dir / name, cfg.max_tokens, cfg.max_n)
    return models


def new_state(cfg: DictConfig) -> tuple[AppState, Any, Path]:
    """The app and its shared state, no model loaded yet (/health says loading), and the files folder."""
    key = api_key(cfg)
    model_names(cfg)  # a one-line error before listening
    files_dir = (
        Path(cfg.files_dir).expanduser() if cfg.files_dir else Path(tempfile.mkdtemp(prefix="multiar-serve-"))
    )
    state = AppState({}, key, cfg.max_body_bytes, cfg.request_timeout)
    state.files.keep = cfg.keep_files
    return state, create_app(state, list(cfg.cors_origins) or None), files_dir


def start_loading(
    cfg: DictConfig, state: AppState, files_dir: Path, full_gc: bool = False
) -> threading.Thread:
    """Load the models on a thread of their own, which ends once they are loaded and their engines run;
    then state.ready (or state.load_error). Why a thread that ends: torch's OpenMP (libgomp) gives each
    thread that runs a parallel op a team of workers, and with more of those threads than cores it stops
    spinning between ops, so the engine thread's decode step measured 1.4-1.8x slower when the thread that
    loaded the model stayed alive (benchmarks/README.md, serve). The exiting thread takes its team with it,
    leaving the engine's the only one. Each model then serves one small request (warm_up: what a first
    request loads lazily), and every object loaded is frozen out of the cyclic GC: a full collection
    over the ~260,000 of them took 60-130 ms, a pause for every running stream (vLLM freezes after
    loading too)."""

    def load() -> None:
        try:
            models = load_models(cfg, files_dir, full_gc)
            with tempfile.TemporaryDirectory(prefix="multiar-warm-up-") as scratch:
                for served in models.values():
                    warm_up(served, Path(scratch))
            gc.collect()
            gc.freeze()
            if full_gc:  # the engines run the full collections from now on
                engines_collect()
            state.models.update(models)
            state.ready = True
        except BaseException as err:  # noqa: BLE001 (reported by whoever waits for the server)
            state.load_error = err

    thread = threading.Thread(target=load, name="multiar-load", daemon=True)
    thread.start()
    return thread


def build_state(cfg: DictConfig, full_gc: bool = False) -> tuple[AppState, Any]:
    """The app and its shared state, models loaded and engines running (ready); full_gc: as serve's,
    the engines run the full collections (CPython's are turned off: the caller restores them)."""
    state, app, files_dir = new_state(cfg)
    start_loading(cfg, state, files_dir, full_gc).join()
    if state.load_error is not None:
        raise state.load_error
    return state, app


def drain(state: AppState, timeout: float) -> None:
    """New requests get 503; running ones get up to timeout seconds; then the engines stop."""
    state.draining = True
    for served in list(state.models.values()):
        if not served.engine.drain(timeout):
            log.warning(
                "serve: %s: requests still running after drain_timeout=%s s were cut", served.name, timeout
            )


def serve(cfg: DictConfig) -> dict[str, Any]:
    """Serve until SIGTERM / Ctrl-C, then drain."""
    import uvicorn

    cfg = validate("serve", cfg)
    # The engine thread gives up the GIL at every torch op and waits for it back; while another thread
    # runs Python (a request's planning, the event loop), that wait lasts up to the switch interval,
    # 5 ms by default: ~200 ops a step made steps of 40-80 ms whenever requests arrived together, and
    # TTFT p99 12-21x its median at half load. At 1 ms: p99 2.0-2.5x (benchmarks/README.md, serve).
    sys.setswitchinterval(SWITCH_INTERVAL)
    thresholds = gc.get_threshold()  # restored at the end: serve may run inside another program
    state, app, files_dir = new_state(cfg)

    class Draining(uvicorn.Server):
        """At SIGTERM / SIGINT: 503 for new requests while the running ones finish, then exit."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            if state.draining:  # a second signal: exit now
                return super().handle_exit(sig, frame)
            state.draining = True
            print("serve: draining (new requests get 503)", flush=True)

            def finish() -> None:
                drain(state, cfg.drain_timeout)
                super(Draining, self).handle_exit(sig, frame)

            threading.Thread(target=finish, daemon=True).start()

    server = Draining(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning"))
    loader = start_loading(cfg, state, files_dir, full_gc=True)

    def stop_when_loading_fails() -> None:
        loader.join()
        if state.load_error is not None:
            server.should_exit = True

    threading.Thread(target=stop_when_loading_fails, daemon=True).start()
    # listening while the models load: /health says "loading" (503) until every model is ready
    print(f"serve: http://{cfg.host}:{cfg.port} (loading {', '.join(map(str, cfg.runs))})", flush=True)
    try:
        server.run()
    finally:
        gc.set_threshold(*thresholds)
    if state.load_error is not None:
        raise state.load_error
    return {"models": list(state.models)}
