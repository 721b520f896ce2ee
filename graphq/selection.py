"""Which linear layers a run quantizes: exclusion patterns and the lm_head rule."""

from __future__ import annotations

import fnmatch
import re

from graphq.linear_layers import LinearLayer


def matches(name: str, pattern: str) -> bool:
    """A pattern matches a layer name as a glob (``*.down_proj``) or as a regular expression searched in it."""
    if fnmatch.fnmatchcase(name, pattern):
        return True
    try:
        return re.search(pattern, name) is not None
    except re.error:
        return False


def skip_reason(layer: LinearLayer, exclude: list[str], quantize_lm_head: bool) -> str | None:
    """Why a layer stays float, or None if it is quantized."""
    if layer.role == "lm_head" and not quantize_lm_head:
        return "lm_head kept float (pass --quantize-lm-head to quantize it)"
    for pattern in exclude:
        if matches(layer.name, pattern):
            return f"excluded by pattern '{pattern}'"
    return None
