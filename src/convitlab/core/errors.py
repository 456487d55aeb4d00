"""The one place where bad user input becomes a one-line error."""
import errno
import os


class UserError(Exception):
    """A mistake the user can fix; entry points print it as one line and exit non-zero."""


def bad_value(key: str, value, allowed: str) -> UserError:
    """`key=value` is not allowed; `allowed` says what is."""
    return UserError(f"{key}={value!r} is not allowed: {allowed}")


def check(condition: bool, key: str, value, allowed: str) -> None:
    if not condition:
        raise bad_value(key, value, allowed)


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
