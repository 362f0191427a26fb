"""The command line's flags for `DPOConfig` fields and its error style, shared by `train` and `sweep`.

One flag per field, generated from the dataclass (help from the field metadata), in both spellings
`--learning-rate` and `--learning_rate`. A mistake prints one error line and a pointer to --help, and
messages raised in DPOConfig's words name the flags (`--resume-from-checkpoint`).
"""

from __future__ import annotations

import argparse
import dataclasses
import re

from ..loss.formulas import LOSS_TYPES
from ..training.config import DPOConfig, coerce_field, field_type
from .sources import error_text

# Fields whose help lists their values here (the others list them in their own help text).
FIELD_CHOICES = {"loss_type": LOSS_TYPES}
_QUOTE = "'"
_FIELDS_LONGEST_FIRST = sorted(DPOConfig.field_names(), key=len, reverse=True)
# field=value (a quoted string or a bare token), and a bare field name with an underscore (unambiguous:
# "beta" or "seed" are also English words). Not inside a flag already (--max-length) nor a longer word.
_ASSIGNMENT = re.compile(r"(?<![\w-])(" + "|".join(_FIELDS_LONGEST_FIRST) + r")=('[^']*'|[^\s,;:)]+)")
_FIELD_NAME = re.compile(r"(?<![\w-])(" + "|".join(n for n in _FIELDS_LONGEST_FIRST if "_" in n) + r")(?![\w=])")


class _FieldType:
    """argparse `type=` for a DPOConfig field: coerces the text and reports errors in the field's words."""

    def __init__(self, name: str):
        self.name = name
        self.__name__ = field_type(name)  # argparse names the type in "invalid <type> value"

    def __call__(self, text: str):
        try:
            return coerce_field(self.name, text, source="--" + self.name.replace("_", "-"))
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None


class CommandParser(argparse.ArgumentParser):
    """argparse, but a mistake prints one error line and a pointer to --help instead of the usage block."""

    def error(self, message: str):
        self.exit(2, error_text(self.prog, flag_spelling(message)))


def flag_spelling(message: str) -> str:
    """A DPOConfig message in the command line's words: `resume_from_checkpoint='latest'` becomes
    `--resume-from-checkpoint latest`, `overwrite_output_dir=True` `--overwrite-output-dir`, and a field
    name with an underscore its flag. Flags already written as flags stay as they are."""

    def assignment(m: re.Match) -> str:
        flag, value = "--" + m.group(1).replace("_", "-"), m.group(2)
        if value == "True":
            return flag
        if value == "False":
            return "--no-" + flag[2:]
        return f"{flag} {value[1:-1] if value.startswith(_QUOTE) else value}"

    message = _ASSIGNMENT.sub(assignment, message)
    return _FIELD_NAME.sub(lambda m: "--" + m.group(1).replace("_", "-"), message)


def add_config_arguments(parser: argparse.ArgumentParser, *, title: str = "training configuration (DPOConfig fields)",
                         skip: frozenset[str] = frozenset()) -> None:
    """One flag per DPOConfig field (but those in `skip`); absent flags leave no attribute (argparse.SUPPRESS)."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(DPOConfig):
        if f.name in skip:
            continue
        flags = ["--" + f.name.replace("_", "-")]
        if "_" in f.name:
            flags.append("--" + f.name)
        help_text = f.metadata.get("help", "")
        if f.name in FIELD_CHOICES:
            help_text += f" Choices: {', '.join(FIELD_CHOICES[f.name])}."
        help_text += f" (default: {f.default!r})"
        if field_type(f.name) == "bool":
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            group.add_argument(*flags, dest=f.name, type=_FieldType(f.name), default=argparse.SUPPRESS,
                               metavar=f.name.upper(), help=help_text)

