"""Train one model, or sweep many with -m: `python src/train.py [group=option] [key=value ...]`.

config (Hydra composes conf/) → validation → data → model → training loop → result tables.
"""
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

import convitlab  # noqa: F401  (gives Paddle every CPU core)
from convitlab.config import register_configs

log = logging.getLogger("convitlab.train")
register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg):
    from convitlab.engine.run import describe_error, run_training
    from convitlab.runtime import defer_signal_handlers, share_machine_between_jobs

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if multirun:
        share_machine_between_jobs(hydra_cfg)
        defer_signal_handlers()  # submitit's preemption/time-limit signal: requeue between steps
    try:
        row = run_training(cfg, hydra_cfg.runtime.output_dir, list(hydra_cfg.overrides.task))
    except Exception as exc:  # noqa: BLE001  (every failure is reported in one line)
        message = describe_error(exc)
        if multirun:  # the job's result.csv says "failed"; the other jobs carry on
            log.error("job failed: %s", message)
            return None
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    return row.get("top1")


if __name__ == "__main__":
    main()
