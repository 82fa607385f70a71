"""The one rule for fine-tune names, shared by the engine and the service's store and API."""

import re

# 1-64 characters of A-Z a-z 0-9 . _ -, starting alphanumeric: no path separators, no "..",
# no unicode look-alikes, safe as a file name and a metrics label
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# the rule in words, for error messages, help texts and API docs
NAME_RULE = "1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"


def is_valid_name(name: object) -> bool:
    """Whether ``name`` is a string that follows :data:`NAME_RULE`."""
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None


__all__ = ["NAME_PATTERN", "NAME_RULE", "is_valid_name"]
