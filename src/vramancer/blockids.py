"""The one rule for a block id, shared by the memory store and the task bodies that name
blocks: 1 to 256 characters of letters, digits and ``. _ : / -``."""

from __future__ import annotations

import re

BLOCK_ID_PATTERN = r"[A-Za-z0-9._:/-]{1,256}"
BLOCK_ID_RE = re.compile(BLOCK_ID_PATTERN)
