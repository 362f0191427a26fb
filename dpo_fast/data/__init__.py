"""Preference data, from rows to batches: the source formats (`formats`), tokenization into pairs
(`tokenization`, `pairs`), packing and the batch layouts (`packing`, `layouts`), the attention each layout
needs (`attention`), and the data summary a run prints (`summary`). Imports only the loss core.

The formats API is importable from here (`dpo_fast.data.load_preferences`), loaded on first use: the
formats module imports `datasets`, which the rest of the data layer (and `import dpo_fast`) does without.
"""

from .._lazy import lazy_exports as _lazy_exports

_FORMATS_API = (
    "FORMATS", "PAIRINGS", "FILE_EXTENSIONS", "HUMAN_MARKER", "ASSISTANT_MARKER", "CONTEXT_ONLY_ROLES",
    "MAX_REPORTED_EXAMPLES", "DETECTION_ROWS", "Message", "LoadReport", "BadRow", "load_preferences",
    "load_preferences_with_report", "detect_format", "parse_row",
)


__getattr__, __dir__ = _lazy_exports(__name__, dict.fromkeys(_FORMATS_API, "dpo_fast.data.formats"))
