"""The one rule for fine-tune names, shared by the engine and the service's store and API."""

import re

# 1-64 characters of A-Z a-z 0-9 . _ -, starting alphanumeric: no path separators, no "..",
# no unicode look-alikes, safe as a file name and a metrics label
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
