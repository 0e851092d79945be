"""What every ``shmcache`` command shares (integration layer, CLI): one-line refusals in
the words of the command line, not of the Python API."""

from __future__ import annotations

import pwd

from ..shm import segment as _segment

# The API's way out of a refusal, in the CLI's words (messages name flags, not keywords).
_CLI_HINTS = {
    _segment.OWNER_HINT: "--owner USER trusts another owner",
    _segment.WRITABLE_HINT: "--allow-writable-by-others accepts it",
}


class CommandError(Exception):
    """A refusal worth one line to the user (exit status in ``code``)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def user_label(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def for_cli(message: str) -> str:
    """An error message as a command-line user should read it: flags, not keywords."""
    for api, cli in _CLI_HINTS.items():
        message = message.replace(api, cli)
    return message
