"""Classify images with an exported model through Paddle Inference alone:
`python src/predict.py model_dir=<export folder> images=<file or folder> [out=predictions.csv] [topk=5]`.

One line per image on stdout for a file (a progress bar for a folder); predictions.csv holds the
top k per image, and the error of each file that could not be read.
"""
import sys

from convitlab.ops import runtime

runtime.setup()  # first: Paddle must load after it (threads, MKL's code path, Paddle's flags)

import hydra  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tqdm import tqdm  # noqa: E402

from convitlab.config import register_configs  # noqa: E402
from convitlab.config_errors import report_composition_errors_in_one_line  # noqa: E402
from convitlab.core.errors import UserError, exit_in_one_line  # noqa: E402
from convitlab.deploy import predictions  # noqa: E402
from convitlab.deploy.inference import Predictor  # noqa: E402

register_configs()
report_composition_errors_in_one_line()


REQUIRED = {"model_dir": "model_dir=<folder> is required: the folder export.py wrote",
            "images": "images=<file or folder> is required: the images to classify"}


def run(cfg):
    for key, message in REQUIRED.items():
        if OmegaConf.is_missing(cfg, key):
            raise UserError(message)
    predictor = Predictor(cfg.model_dir, str(cfg.device))
    predictions.check_topk(cfg.topk, predictor.manifest.num_classes)
    files, is_folder = predictions.list_images(cfg.images)
    out = predictions.check_out(cfg.out)
    with tqdm(total=len(files), unit="img", disable=not is_folder, file=sys.stderr) as bar:
        def on_row(row):
            if is_folder:
                bar.update()
            else:
                print(predictions.describe(row))
        table = predictions.predict(predictor, files, cfg.topk, cfg.batch_size, on_row)
    predictions.write_csv(table, out)
    unreadable = int((table["error"] != "").sum())
    print(f"{len(table)} image(s), {unreadable} unreadable, on the {predictor.device}: {out}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg):
    try:
        run(cfg)
    except Exception as exc:  # noqa: BLE001  (every failure is reported in one line)
        exit_in_one_line(exc)


if __name__ == "__main__":
    main()
