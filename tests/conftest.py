"""Fixtures the test modules share: a finished tiny run (trained once per session, copied per test)
and the data folders tests only need the files of (tests/builders.py makes them). The session runs
Paddle as the entry points do: with the runtime set up before it loads."""
import shutil

from convitlab.ops import runtime

runtime.setup()

import pytest  # noqa: E402
from builders import make_image_folder, make_val_only_folder, write_fake_cifar  # noqa: E402
from helpers import QUICK, trained  # noqa: E402


@pytest.fixture(scope="session")
def _tiny_run_once(tmp_path_factory):
    """`python src/train.py` with helpers.QUICK (the default model and data): its run directory."""
    return trained(tmp_path_factory.mktemp("tiny_run"), QUICK)


@pytest.fixture
def tiny_run(_tiny_run_once, tmp_path):
    """A copy of the finished tiny run at tmp_path/run, the test's own to read, change or resume."""
    return shutil.copytree(_tiny_run_once, tmp_path / "run", symlinks=True)


@pytest.fixture
def image_folder(tmp_path):
    """tmp_path/images: train/ and val/ of two classes (builders.make_image_folder)."""
    return make_image_folder(tmp_path / "images")


@pytest.fixture
def val_only_folder(tmp_path):
    """tmp_path/images: val/ of two classes and no train/ (builders.make_val_only_folder)."""
    return make_val_only_folder(tmp_path / "images")


@pytest.fixture
def cifar10_archive(tmp_path):
    """tmp_path/cifar holding a small cifar-10-python.tar.gz (builders.write_fake_cifar)."""
    write_fake_cifar(tmp_path / "cifar", "cifar10")
    return tmp_path / "cifar"
