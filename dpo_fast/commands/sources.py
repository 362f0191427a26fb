"""Where the commands' models and data come from: local paths checked at once, Hub names looked up once.

A value that looks like a path (starts with `.`, `/` or `~`, has more than one `/`, ends with `/`, or
its first component exists here, as `runs/x` does when `runs/` exists) must be a local directory: it
fails at once, without the Hub. Anything else is a Hub name: with HF_HUB_OFFLINE (or
TRANSFORMERS_OFFLINE) set it must be in the local cache; otherwise one request with a short timeout
asks the Hub whether it exists (transformers alone would retry for about 52 s on a network error, then
name another flag). A name the Hub cannot be asked about but that is cached is used offline.

Every failure is a `CommandError`: one line, naming the flag, with the exit status 2.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

# Seconds one Hub lookup may take before the command says the Hub cannot be reached.
HUB_TIMEOUT_S = 10.0
_TRUE = ("1", "on", "yes", "true")
# A directory with one of these holds a tokenizer `AutoTokenizer` can load.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")


class CommandError(Exception):
    """A user mistake reported as one line on stderr with exit status 2."""


def error_text(prog: str, message: str) -> str:
    """The two lines every command prints for a mistake (argparse's words, without the usage block); a
    message of several lines (a YAML or library error) is joined into one."""
    one_line = " ".join(line.strip() for line in message.splitlines() if line.strip())
    return f"{prog}: error: {one_line}\nSee '{prog} --help' for the options.\n"


class ModelSource(NamedTuple):
    """What `from_pretrained` gets: a local directory or a Hub name, and whether it may use the network."""

    path: str
    local_files_only: bool


def looks_like_local_path(name: str) -> bool:
    """Hub names are 'name' or 'org/name'; anything with another path shape is meant as a local path."""
    if name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1:
        return True
    if os.sep != "/" and os.sep in name:
        return True
    first = name.split("/", 1)[0]
    return "/" in name and os.path.exists(first)


def hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _cached(name: str, probe_file: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, probe_file), str)
    except ValueError:  # not a valid repo id
        return False


def resolve_model_source(flag: str, name: str, *, probe_file: str = "config.json",
                         timeout: float = HUB_TIMEOUT_S) -> ModelSource:
    """Check a --model/--ref-model/--tokenizer value before anything is loaded (see the module doc).

    probe_file: the file a usable Hub repo has (config.json for a model, tokenizer_config.json for a
    tokenizer), looked for in the local cache.
    """
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return ModelSource(path, True)
    if os.path.exists(path):
        raise CommandError(f"{flag}: {name!r} is not a local directory (it is a file); expected a model "
                           "directory (with config.json) or a Hub name org/model")
    if looks_like_local_path(name):
        raise CommandError(f"{flag}: {name!r} is not a local directory (nothing exists at "
                           f"{os.path.abspath(path)!r})")
    cached = _cached(name, probe_file)
    if hub_offline():
        if cached:
            return ModelSource(name, True)
        raise CommandError(f"{flag}: {name!r} is not a local directory, and HF_HUB_OFFLINE is set while the Hugging "
                           "Face cache holds no copy of it")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        HfApi().model_info(name, timeout=timeout)
    except GatedRepoError:
        return ModelSource(name, False)  # it exists; transformers says how to get access
    except RepositoryNotFoundError:
        raise CommandError(f"{flag}: {name!r} is not a local directory, and the Hugging Face Hub has no model of "
                           "that name (a private or gated one needs `hf auth login`)") from None
    except HFValidationError:
        raise CommandError(f"{flag}: {name!r} is not a local directory nor a valid Hub name org/model") from None
    except Exception as e:  # network errors: their classes depend on the HTTP client huggingface_hub uses
        if cached:
            warnings.warn(f"{flag} {name!r}: the Hugging Face Hub could not be reached ({e}); using the cached copy",
                          stacklevel=2)
            return ModelSource(name, True)
        raise CommandError(f"{flag}: {name!r} is not a local directory, and the Hugging Face Hub could not be "
                           f"reached to look it up within {timeout:g} s ({type(e).__name__}: {e}); check the name "
                           "and the network, or set HF_HUB_OFFLINE=1 to use the local cache") from None
    return ModelSource(name, False)


def check_data_path(flag: str, name: str) -> None:
    """A path-like --data value (or one with a data file's extension) must exist."""
    from ..data.formats import FILE_EXTENSIONS

    path = os.path.expanduser(name)
    if not os.path.exists(path) and (looks_like_local_path(name) or name.lower().endswith(FILE_EXTENSIONS)):
        raise CommandError(f"{flag}: {name!r} does not exist")


def load_tokenizer(flag: str, name: str):
    """`AutoTokenizer.from_pretrained` of a checked --tokenizer (or --model) value; CommandError naming `flag`."""
    from transformers import AutoTokenizer

    source = resolve_model_source(flag, name, probe_file="tokenizer_config.json")
    if source.local_files_only and os.path.isdir(source.path) and not any(
            os.path.isfile(os.path.join(source.path, f)) for f in TOKENIZER_FILES):
        raise CommandError(f"{flag} {name!r} holds no tokenizer ({', '.join(TOKENIZER_FILES)}): pass --tokenizer "
                           "(checkpoints written by older versions have none)")
    try:
        return AutoTokenizer.from_pretrained(source.path, local_files_only=source.local_files_only)
    except (OSError, ValueError) as e:
        raise CommandError(f"{flag} {name!r}: no tokenizer could be loaded from it ({e})") from None


def load_causal_lm(flag: str, name: str, **kwargs):
    """`AutoModelForCausalLM.from_pretrained` of a checked model value; CommandError naming `flag`."""
    from transformers import AutoModelForCausalLM

    source = resolve_model_source(flag, name)
    try:
        return AutoModelForCausalLM.from_pretrained(source.path, local_files_only=source.local_files_only, **kwargs)
    except (OSError, ValueError) as e:
        raise CommandError(f"{flag} {name!r} could not be loaded: {e}") from None
