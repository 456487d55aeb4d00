"""The one place where bad user input becomes a one-line error."""
import errno
import os
import sys


class UserError(Exception):
    """A mistake the user can fix; entry points print it as one line and exit non-zero."""


def bad_value(key: str, value, allowed: str) -> UserError:
    """`key=value` is not allowed; `allowed` says what is."""
    return UserError(f"{key}={value!r} is not allowed: {allowed}")


def check(condition: bool, key: str, value, allowed: str) -> None:
    if not condition:
        raise bad_value(key, value, allowed)


def whole_message(exc: BaseException) -> str:
    """The exception's whole message on one line (its type's name when it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def first_line(exc: BaseException) -> str:
    """The first line of the exception's message (its type's name when it has none): what a
    library says before its traceback or source lines."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def one_line(exc: BaseException) -> str:
    """An unexpected error as result.csv and the log record it: its type and first line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:500]


def describe_error(exc: BaseException) -> str:
    """The line an entry point prints for a failure: the message alone for a UserError."""
    return str(exc) if isinstance(exc, UserError) else one_line(exc)


def exit_in_one_line(exc: BaseException):
    """End an entry point that failed: `error: <one line>` on stderr, exit code 2."""
    print(f"error: {describe_error(exc)}", file=sys.stderr)
    sys.exit(2)


def broken_link(path):
    """What is wrong with `path` when it is a symbolic link that leads nowhere ("a symbolic link
    loop (-> target)", "a symbolic link to target, which does not exist"); None otherwise."""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"a symbolic link loop (-> {os.readlink(path)})"
        return f"a symbolic link to {os.readlink(path)}, which does not exist"
    return None
