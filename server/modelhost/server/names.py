"""Names of checkpoints and models: validated names, never paths."""

from __future__ import annotations

import re
from collections.abc import Sequence

from modelhost.server.errors import InvalidName

MAX_NAME_LENGTH = 128
MAX_LISTED = 10
"""Names a message lists before it says how many more there are."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_name(name: str, what: str) -> str:
    """Returns `name` if valid; raises InvalidName saying why not."""
    if not name:
        raise InvalidName(f"{what} name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(f"{what} name is {len(name)} characters; the limit is {MAX_NAME_LENGTH}")
    if ".." in name or not _NAME.fullmatch(name):
        raise InvalidName(
            f"{what} name {name!r} is not allowed: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, without '..'"
        )
    return name


def listing(names: Sequence[str]) -> str:
    """`names` in their order, for a message: the first MAX_LISTED, then how many more."""
    shown = ", ".join(names[:MAX_LISTED])
    more = len(names) - MAX_LISTED
    return f"{shown} (and {more} more)" if more > 0 else shown
