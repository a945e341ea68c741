"""Yes/no options as they arrive from a config (``false``) or from the command line.

``python -m monai.bundle run ... --amp false`` reaches the config as the string ``'false'`` (Fire leaves words that
are not Python literals as strings), which Python treats as true; these helpers read it as meant.
"""

from __future__ import annotations

from scripts.errors import InputError

_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def flag(value: bool | int | str, name: str = "option") -> bool:
    """``value`` as a bool: a bool, 0/1, or true/false/yes/no in any case; anything else is an error."""
    if isinstance(value, str) and value.strip().lower() in _WORDS:
        return _WORDS[value.strip().lower()]
    if isinstance(value, (bool, int)) and value in (0, 1):
        return bool(value)
    raise InputError(f"--{name}: must be true or false; got {value!r}")
