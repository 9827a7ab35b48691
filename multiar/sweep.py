"""`multiar <command> -m key=a,b ...`: Hydra's own multirun. Hydra expands the sweep and its launcher
runs the jobs (the basic launcher locally, one after another; `hydra/launcher=submitit_slurm` on a
cluster, with the optional hydra-submitit-launcher plugin), so sweepers and launchers work as in any
Hydra app. Each job writes into its own folder, named from its overrides, under hydra.sweep.dir.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from multiar.config import hydra_overrides, store_schemas
from multiar.errors import ConfigError

# the key that names a job's output folder, per command: set to the job's folder unless given
OUTPUT_KEY = {"train": "run_dir", "generate": "out", "eval": "out"}


def _is_sweep(value: str) -> bool:
    """Whether an override's value sweeps (a,b / range(...) / choice(...) / glob(...)) in Hydra's grammar."""
    return (
        "," in value
        and not value.startswith(("[", "{", "'", '"'))
        or value.startswith(("range(", "choice(", "glob(", "interval("))
    )


def multirun(config_name: str, run: Callable[[DictConfig], Any], overrides: Sequence[str]) -> list[Any]:
    """Run `run` once per combination of the sweep in overrides, through hydra.main --multirun."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    overrides = hydra_overrides(overrides)  # experiment=NAME as +experiment=NAME, free text quoted
    given = {o.partition("=")[0].lstrip("+~") for o in overrides}
    argv = [
        "multiar",
        "--multirun",
        *overrides,
        "hydra/job_logging=none",  # multiar and Lightning log as in a single run
        "hydra/hydra_logging=none",
    ]
    if "hydra.sweep.dir" not in given:
        argv.append(f"hydra.sweep.dir=runs/multirun/{config_name}-${{now:%Y-%m-%d_%H-%M-%S}}")
    if "hydra.sweep.subdir" not in given:
        argv.append("hydra.sweep.subdir=${hydra.job.override_dirname}")
        # folders named from the swept keys only (domain=music,model=tiny), not every fixed override
        # (Hydra matches exclude_keys against the bare key: no +, ++ or ~)
        fixed = sorted(
            k.lstrip("+~") for k, v in (o.partition("=")[::2] for o in overrides) if not _is_sweep(v)
        )
        if fixed and "hydra.job.config.override_dirname.exclude_keys" not in given:
            argv.append(f"hydra.job.config.override_dirname.exclude_keys=[{','.join(fixed)}]")
    results: list[Any] = []

    def job(cfg: DictConfig) -> Any:
        key = OUTPUT_KEY.get(config_name)
        if key is not None and key not in given:
            with open_dict(cfg):
                cfg[key] = HydraConfig.get().runtime.output_dir
        print(
            f"multiar {config_name}: job {HydraConfig.get().job.num}: {HydraConfig.get().job.override_dirname}"
        )
        result = run(OmegaConf.create(OmegaConf.to_container(cfg)))
        results.append(result)
        return result

    store_schemas()  # conf/<command>.yaml's defaults list starts with the command's schema
    saved = sys.argv
    sys.argv = argv  # hydra.main reads its arguments from sys.argv
    try:
        hydra.main(config_path="pkg://multiar.conf", config_name=config_name, version_base="1.3")(job)()
    except SystemExit as err:  # Hydra's own argument and composition errors end in SystemExit
        if err.code:
            raise ConfigError(
                f"multirun: Hydra could not run the sweep (exit {err.code}); see the message above"
            ) from None
    finally:
        sys.argv = saved
    return results
