"""Screenshots of VisualDL's two views (scalars, hyper-parameters) from a real sweep, by headless Chromium.

    python experiments/visualdl_views/screenshots.py [--work /tmp/visualdl_views]

Trains a small real sweep (convit_micro and deit_micro on 25% of digits, 10 full-data epochs, seed
0) into --work, serves it with `visualdl --logdir views_demo --language en` from --work, and has Chromium
(`chromium --headless --screenshot`, Debian's `apt-get install chromium`) draw
/app/scalar and /app/hyper-parameter into scalar.png and hyper-parameter.png beside this script.
"""
import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BIN = Path(sys.executable).parent
VIEWS = ("scalar", "hyper-parameter")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url, seconds=60):
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/visualdl_views", help="where the sweep is trained")
    args = parser.parse_args()
    work = Path(args.work)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("no chromium on PATH: apt-get install -y chromium")
    sweep = work / "views_demo"
    subprocess.run([sys.executable, str(ROOT / "src" / "train.py"), "-m", "model=convit_micro,deit_micro",
                    "data.fraction=0.25", "schedule.epochs=10", "seed=0", "trainer.progress_bar=false",
                    f"hydra.sweep.dir={sweep}"], check=True, cwd=ROOT)
    port = free_port()
    # a relative --logdir: the hyper-parameter view names each run by its folder as found under it
    server = subprocess.Popen([str(BIN / "visualdl"), "--logdir", sweep.name, "--host", "127.0.0.1", "--port",
                               str(port), "--language", "en"], cwd=work, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_for(f"http://127.0.0.1:{port}/app/api/scalar/tags")
        for view in VIEWS:
            out = HERE / f"{view}.png"
            subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            "--window-size=1600,1100", "--virtual-time-budget=15000", f"--screenshot={out}",
                            f"http://127.0.0.1:{port}/app/{view}"], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=180)
            print(f"wrote {out}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
