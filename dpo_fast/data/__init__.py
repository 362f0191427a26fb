"""Preference data, from rows to batches: the source formats (`formats`), tokenization into pairs
(`tokenization`, `pairs`), packing and the batch layouts (`packing`, `layouts`), the attention each layout
needs (`attention`), and the data summary a run prints (`summary`). Imports only the loss core.

The formats API is importable from here (`dpo_fast.data.load_preferences`), loaded on first use: the
formats module imports `datasets`, which the rest of the data layer (and `import dpo_fast`) does without.
"""

_FORMATS_API = (
    "FORMATS", "PAIRINGS", "FILE_EXTENSIONS", "HUMAN_MARKER", "ASSISTANT_MARKER", "CONTEXT_ONLY_ROLES",
    "MAX_REPORTED_EXAMPLES", "DETECTION_ROWS", "Message", "LoadReport", "BadRow", "load_preferences",
    "load_preferences_with_report", "detect_format", "parse_row",
)


def __getattr__(name: str):
    if name in _FORMATS_API:
        from . import formats

        value = getattr(formats, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dpo_fast.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_FORMATS_API))
