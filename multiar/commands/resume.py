"""generate's journal: after every batch, what a killed run needs to go on byte for byte (`resume=true`):
the samples done, the size of every appended file, and the accumulated state (metrics' counts, the
ranking heap). Written atomically beside the samples as generate.resume; removed when the run ends."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import pickle
import secrets
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from multiar.commands.tally import Tally
from multiar.engine.choice_cache import cache_root
from multiar.engine.float_rows import without_linear_rules
from multiar.engine.precision import cpu_model
from multiar.engine.quantized_prefill import without_on_kernel_rules
from multiar.errors import ConfigError
from multiar.files import write_new_file

JOURNAL = "generate.resume"
# keys that change how a run is shown or stored, not what it samples
FREE = ("resume", "progress", "overwrite")


def settings_digest(cfg: DictConfig, decode: dict | None = None) -> str:
    """A hash of every setting that decides the samples: a resumed run must have the same. decode: how
    the model was laid out (engine.layout): its dtype, layout and kernels change the numbers too, and
    a layout measured anew (another batch size, another machine, a cleared cache) may differ."""
    # samples are drawn per index; only speculative decoding draws a batch with one generator
    free = FREE if cfg.get("draft") is not None else (*FREE, "batch_size")
    settings = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in free}
    if decode:
        settings["decode"] = {k: decode.get(k) for k in ("dtype", "layout", "kernels")}
        if isinstance(settings["decode"]["kernels"], dict):
            # every call on the kernel (on F.linear) is how runs decoded before the prefill rules (the
            # float rows rules) existed: their journals' digests left them out, so a resume of one
            # still matches
            settings["decode"]["kernels"] = without_linear_rules(
                without_on_kernel_rules(settings["decode"]["kernels"])
            )
        # what compile= decided, not how it was spelled ("auto", "True", true): as journals before
        # compile=auto recorded it
        settings["compile"] = str(decode.get("layout", "")).endswith(", compiled")
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def sample_seed(seed: int, index: int, attempt: int = 0) -> int:
    """The seed of sample index's generator (attempt: a redraw): a function of the seed and the index
    alone, so a sample is the same whatever the batch size, and a resumed run draws what an
    uninterrupted one drew. Sample 0's first draw uses the seed itself."""
    if index == 0 and attempt == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{index}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # below 2**63: any torch generator takes it


batch_seed = sample_seed  # the server's name for it (one request's samples, each from its index)


def journal_key() -> bytes:
    """This user's key for signing journals ($MULTIAR_CACHE/journal.key, made on first use, 0600): a
    journal is unpickled only when its signature matches, so a file planted in an output folder never
    runs code."""
    path = cache_root() / "journal.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
    return path.read_bytes()


def save(out_dir: Path, digest: str, state: Any) -> None:
    data = pickle.dumps({"digest": digest, "state": state}, protocol=pickle.HIGHEST_PROTOCOL)
    signed = hmac.new(journal_key(), data, hashlib.sha256).digest() + data
    write_new_file(out_dir / JOURNAL, lambda tmp: tmp.write_bytes(signed), overwrite=True)


def journaled_decode(out_dir: Path) -> tuple[str, str, dict[str, str] | None, bool | None]:
    """How a killed run in out_dir decoded, as generate takes it: a resumed run pins it. The dtype and
    layout as dtype= and layout= take them: auto, auto when it has no journal, an older one that did not
    record them, or a quantized run's (dtype and layout do not apply; its per-shape kernels, the third
    item, are pinned instead); a compiled run's layout without its ", compiled". The fourth item: whether
    it was compiled (what compile=auto decided when it began; None: not recorded)."""
    path = out_dir / JOURNAL
    if not path.exists():
        return "auto", "auto", None, None
    state = _read(path).get("state")
    layout = state.layout if isinstance(state, Tally) else None  # None: not recorded (an older journal)
    kernels = getattr(state, "kernels", None) or None
    if not layout:
        return "auto", "auto", kernels, None
    compiled = layout[1].endswith(", compiled")
    if layout[1].removesuffix(", compiled") in ("int8", "int4"):
        return "auto", "auto", kernels, compiled
    # a float run's rule for calls of a few rows; none in a journal from before the rule: F.linear's
    # every call, as it decoded (engine.float_rows)
    return layout[0], layout[1].removesuffix(", compiled"), kernels or {}, compiled


def journaled_gemms(out_dir: Path) -> str | None:
    """The GEMMs a killed run's compiled CPU step ran (engine.ahead_of_time), which a resumed run pins:
    measured anew (a cleared cache) they may differ, and with them the numbers. None: not recorded."""
    path = out_dir / JOURNAL
    state = _read(path).get("state") if path.exists() else None
    return getattr(state, "gemms", None) if isinstance(state, Tally) else None


def _read(path: Path) -> dict:
    """A journal's contents, once its signature is this user's; ConfigError otherwise."""
    try:
        signed = path.read_bytes()
        mac, data = signed[:32], signed[32:]
        if not hmac.compare_digest(mac, hmac.new(journal_key(), data, hashlib.sha256).digest()):
            raise ValueError("not signed by multiar for this user (journal.key): it is not read")
        return pickle.loads(data)  # signed by this user's key: written by generate itself
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, ImportError) as err:
        raise ConfigError(
            f"resume: {path}: cannot be read ({err}); start again with overwrite=true"
        ) from None


def load(out_dir: Path, digest: str, decode: dict | None = None) -> Any:
    """The state a killed run journaled in out_dir; ConfigError when it is not this user's multiar's
    journal, or its settings differ (decode: how this process laid the model out, to say so when that is
    what differs)."""
    path = out_dir / JOURNAL
    saved = _read(path)
    if saved.get("digest") != digest:
        raise ConfigError(f"resume: {path} {refusal(saved.get('state'), decode)}")
    return saved["state"]


def refusal(state: Any, decode: dict | None) -> str:
    """Why a journal's run cannot go on here, for the one-line error. The killed run's dtype/layout when
    this process decodes otherwise: on another CPU (recorded in the journal) that one cannot decode as
    it did, both CPUs named (a resume pins dtype and layout, so pinning cannot help); on this one, other
    settings (quantize=, compile=) changed it. Else other settings."""
    journaled = getattr(state, "layout", None)
    here = (str(decode.get("dtype")), str(decode.get("layout"))) if decode else None
    if journaled and here and tuple(journaled) != here:
        was, now = "/".join(journaled), "/".join(here)
        cpu, this = getattr(state, "cpu", None), cpu_model()
        if cpu is not None and cpu != this:
            return (
                f"was decoded as {was} on {cpu}; this CPU ({this}) decodes it as {now}, whose numbers"
                " differ: resume it on that CPU, or start again with overwrite=true"
            )
        return (
            f"was decoded as {was}, this run as {now} (quantize= or compile= differ): resume with the"
            " same settings, or start again with overwrite=true"
        )
    return "was written with other settings: resume with the same ones, or start again with overwrite=true"
