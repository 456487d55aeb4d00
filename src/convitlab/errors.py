"""The one place where bad user input becomes a one-line error."""


class UserError(Exception):
    """A mistake the user can fix; entry points print it as one line and exit non-zero."""


def bad_value(key: str, value, allowed: str) -> UserError:
    """`key=value` is not allowed; `allowed` says what is."""
    return UserError(f"{key}={value!r} is not allowed: {allowed}")


def check(condition: bool, key: str, value, allowed: str) -> None:
    if not condition:
        raise bad_value(key, value, allowed)
