"""Evaluate a checkpoint: `python src/eval.py model=<name> ckpt=<file> data=<set> [data.root=<dir>]`,
or a training run's best weights with its model and data: `python src/eval.py run=<run dir>`.

Writes result.csv (top-1, top-5 on the validation split; kind "eval") in outputs/eval/<time>/, or
a result.csv with status "failed" and the error when it fails.
"""
import logging
import sys
from pathlib import Path

from convitlab.ops import runtime

runtime.setup()  # first: Paddle must load after it (threads, MKL's code path, Paddle's flags)

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402

from convitlab.config import config_hash, register_configs, validate, with_training_run  # noqa: E402
from convitlab.config_errors import report_composition_errors_in_one_line  # noqa: E402
from convitlab.core import tables  # noqa: E402
from convitlab.core.errors import UserError, describe_error  # noqa: E402
from convitlab.core.signals import Interrupted, signal_name, stop_at_step_boundaries  # noqa: E402
from convitlab.ops.runtime import select_device  # noqa: E402

log = logging.getLogger("convitlab.eval")
register_configs()
report_composition_errors_in_one_line()


def evaluate_checkpoint(cfg, run_dir, row, overrides=()):
    """Evaluate cfg.ckpt into `row` (result.csv's columns, filled as they become known) and write it."""
    # Imported here, as in train.py's main: a launcher's job process sets up the runtime before these load Paddle.
    from convitlab.analysis.summary import count_flops, count_parameters
    from convitlab.data import build_eval_dataset, build_eval_loader
    from convitlab.engine.trainer import evaluate
    from convitlab.models.registry import build_model
    from convitlab.models.weights import load_pretrained
    from convitlab.run.record import identity_row

    if cfg.run:
        cfg = with_training_run(cfg, overrides)
    if not cfg.ckpt:
        raise UserError("ckpt=<file> is required: the weights to evaluate (or run=<a training run's folder> for "
                        "its best weights)")
    row["pretrained"] = cfg.ckpt
    validate(cfg)
    row.update(identity_row(cfg, run_dir, config_hash(cfg), overrides))
    select_device(cfg.trainer.device)
    model = load_pretrained(build_model(cfg), cfg.ckpt)  # model.num_classes = data.num_classes, checked
    # The validation split alone: an image folder needs only val/, and nothing about training applies.
    val, num_classes, _ = build_eval_dataset(cfg.data, cfg.seed)
    if num_classes != cfg.data.num_classes:  # label i must be the checkpoint's class i
        raise UserError(f"data.num_classes={cfg.data.num_classes} does not match the {num_classes} "
                        f"classes found in the validation split of data.name={cfg.data.name}")
    metrics = evaluate(model, build_eval_loader(val, cfg.data))
    row.update(status="completed", params=count_parameters(model), flops=count_flops(model),
               top1=metrics["val_top1"], top5=metrics["val_top5"], final_val_loss=metrics["val_loss"])
    tables.write_result(run_dir, row)
    log.info("%s on %s: top-1 %.2f%%, top-5 %.2f%% (%s)", cfg.model.name, cfg.data.name,
             metrics["val_top1"], metrics["val_top5"], cfg.ckpt)
    return row


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg):
    from convitlab.run.record import first_row  # here, as above

    stop_at_step_boundaries()  # SIGTERM, SIGINT: stop between batches, without a traceback
    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    overrides = list(hydra_cfg.overrides.task)
    row = first_row(run_dir, tables.EVAL, overrides)
    try:
        row = evaluate_checkpoint(cfg, run_dir, row, overrides)
    except (Exception, Interrupted) as exc:  # noqa: BLE001  (every failure is reported in one line)
        stopped = isinstance(exc, Interrupted)
        message = f"interrupted by {signal_name(exc.signum)}: nothing evaluated" if stopped else describe_error(exc)
        try:  # the evaluation's own record of how it ended
            tables.write_result(run_dir, {**row, "status": "interrupted" if stopped else "failed", "error": message})
        except OSError as write_error:  # the first error is the one to report
            log.error("result.csv not written: %s", write_error)
        print(message if stopped else f"error: {message}", file=sys.stderr)
        sys.exit(exc.exit_code if stopped else 2)
    log.info("result: %s", Path(run_dir) / "result.csv")
    print(f"top-1 {row['top1']:.2f}%  top-5 {row['top5']:.2f}%")
    return row["top1"]


if __name__ == "__main__":
    main()
