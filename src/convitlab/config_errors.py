"""Mistakes Hydra finds while composing (a misspelt key, a value of the wrong type, an unknown
option of a group), said in one line naming the key or value and what is allowed, exit code 2,
as every other bad input (convitlab.core.errors); Hydra's own report is several lines and exit code 1."""
import sys
import typing
from dataclasses import fields, is_dataclass
from enum import Enum

import hydra._internal.utils as hydra_utils  # private API: hydra._internal.utils.run_and_report
from hydra.errors import ConfigCompositionException, OverrideParseException

from convitlab.config import unknown_key
from convitlab.core.errors import bad_value

TYPE_NAMES = {int: "an int", float: "a number", bool: "true or false", str: "a string"}


def _type_text(annotation) -> str:
    """A schema field's type as the error says what is allowed."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        return f"{_type_text(args[0])} or null"
    if typing.get_origin(annotation) in (list, typing.List):
        return f"a list of {_type_text(args[0]).split(' ', 1)[1]}s" if args else "a list"
    if isinstance(annotation, type) and issubclass(annotation, Enum):  # a closed choice
        return f"one of {', '.join(member.value for member in annotation)}"
    return TYPE_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _one_line(text) -> str:
    """Hydra's or OmegaConf's message on one line, less OmegaConf's location lines."""
    lines = [line.strip().rstrip(".") for line in str(text).splitlines()]
    return "; ".join(line for line in lines if line and not line.startswith(("full_key:", "reference_type",
                                                                           "object_type")))


def composition_error(exc) -> str:
    """One line for an error Hydra raised while composing the config."""
    cause = exc.__cause__
    options = getattr(exc, "options", None)
    missing = getattr(exc, "missing_cfg_file", None)
    if options and missing and "/" in missing:  # an unknown option of a config group
        group = missing.rpartition("/")[0]
        return f"Could not find '{missing}': {group} is one of {', '.join(options)}"
    key, object_type = getattr(cause, "full_key", None), getattr(cause, "object_type", None)
    if key and is_dataclass(object_type) and type(cause).__name__ in ("ConfigAttributeError", "ConfigKeyError"):
        return str(unknown_key(key, object_type))
    if key and type(cause).__name__ == "ValidationError":
        if is_dataclass(object_type):
            annotation = {f.name: f.type for f in fields(object_type)}.get(cause.key)
        else:  # an item of a list: the list's element type
            annotation = next(iter(typing.get_args(getattr(cause, "ref_type", None))), None)
        if annotation is not None:
            return str(bad_value(key, cause.value, _type_text(annotation)))
    return _one_line(exc) + (f": {_one_line(cause)}" if cause else "")


def report_composition_errors_in_one_line() -> None:
    """Have an entry point's composition errors printed as one line with exit code 2.

    Hydra runs every step of a command line through hydra._internal.utils.run_and_report,
    which prints an error over several lines and exits with 1; composition errors are caught
    before it sees them, everything else is left to it."""
    report = hydra_utils.run_and_report
    if getattr(report, "one_line", False):
        return

    def run_and_report(func):
        def composed():
            try:
                return func()
            except (ConfigCompositionException, OverrideParseException) as exc:
                print(f"error: {composition_error(exc)}", file=sys.stderr)
                sys.exit(2)
        return report(composed)

    run_and_report.one_line = True
    hydra_utils.run_and_report = run_and_report
