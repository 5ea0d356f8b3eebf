"""The command that installs one of syncbn's extras, as this copy of syncbn was installed: for error messages."""

from __future__ import annotations

import functools
import shlex
from pathlib import Path


@functools.lru_cache(maxsize=1)
def _source_tree() -> Path | None:
    """The source tree this package is imported from (a clone), or None for an installed package."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    try:
        text = pyproject.read_text()
    except OSError:
        return None
    return root if 'name = "syncbn"' in text else None


def install_command(extra: str) -> str:
    """``pip install 'syncbn[extra]'``, or ``pip install -e '<clone>[extra]'`` when syncbn runs from a clone.

    The second is the command that works from a clone (syncbn may not be on
    the package index it would download from); both are quoted for the shell
    (unquoted brackets are a glob in zsh).
    """
    tree = _source_tree()
    if tree is None:
        return f"pip install {shlex.quote(f'syncbn[{extra}]')}"
    return f"pip install -e {shlex.quote(f'{tree}[{extra}]')}"
