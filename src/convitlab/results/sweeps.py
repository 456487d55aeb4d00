"""Gathering a sweep: one row per job (finished or not), in memory (sweep_table: what reading a
sweep uses, so reading writes nothing) or into the sweep's summary.csv (gather_sweep: at the
sweep's end, or on request)."""
import logging
import os
from pathlib import Path

import pandas as pd
import yaml

from convitlab.core import tables
from convitlab.core.errors import UserError
from convitlab.core.layout import HYDRA, RESULT, RunFolder

log = logging.getLogger(__name__)
SUMMARY = "summary.csv"


def job_dirs(sweep_dir) -> list:
    """The job directories under sweep_dir: those holding result.csv or .hydra/, sorted."""
    jobs = []
    for folder, subdirs, files in os.walk(sweep_dir):
        if RESULT in files or HYDRA in subdirs:
            jobs.append(Path(folder))
            subdirs.clear()  # a job's own folders (checkpoints, vdl) hold no other jobs
        else:
            subdirs[:] = [name for name in subdirs if not name.startswith(".")]
    return sorted(jobs)


def job_table(job_dir: Path) -> pd.DataFrame:
    """The job's result.csv as written (one row; status "damaged" when it is not a complete row),
    or a row with status "unfinished" when it has none.

    Cells are kept as text: the summary holds exactly what each job wrote.
    """
    if RunFolder(job_dir).result.exists():
        table = tables.result_row(RunFolder(job_dir).result).head(1)
    else:
        try:  # the overrides Hydra recorded for the job, if readable
            overrides = yaml.safe_load(RunFolder(job_dir).hydra_overrides.read_text())
        except (OSError, yaml.YAMLError):
            overrides = []
        overrides = [str(o) for o in overrides] if isinstance(overrides, list) else []
        table = pd.DataFrame([{"run_id": job_dir.name, "status": "unfinished", "overrides": " ".join(overrides)}],
                             dtype=object)
    # Where the job is now: the sweep may have been moved since it ran.
    return table.assign(run_dir=str(job_dir))


def sweep_table(sweep_dir) -> pd.DataFrame:
    """The sweep's summary as text, one row per job sorted by run_dir (absolute), written nowhere."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UserError(f"{sweep_dir}: no such directory")
    tables = [job_table(job) for job in job_dirs(sweep_dir.resolve())]
    summary = pd.concat(tables, ignore_index=True).fillna("") if tables else pd.DataFrame()
    return summary.sort_values("run_dir", kind="stable", ignore_index=True) if len(summary) else summary


def gather_sweep(sweep_dir) -> Path:
    """Write sweep_dir/summary.csv (sweep_table, in RESULT_COLUMNS order) and return its path."""
    path = Path(sweep_dir) / SUMMARY
    tables.write_table(path, sweep_table(sweep_dir), tables.RESULT_COLUMNS)
    return path
