"""Reading a run configuration from a YAML file and command-line flags (``--config run.yaml --max_seq_length 256``).

The config classes state values; this module turns text into them, with ``transformers.HfArgumentParser``
doing the type conversion from the dataclass fields.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any


def parse_config(cls: type, argv: list[str] | None = None) -> Any:
    """Parse ``--config file.yaml`` plus any field overrides (``--max_seq_length 256``).

    Overrides are parsed by ``transformers.HfArgumentParser`` from the dataclass fields, with the
    YAML values as defaults, so the command line always wins over the file. Beyond what the parser
    does: ``--field None`` sets an optional field to None, a bare ``--arabic_remove_diacritics``
    means true, and YAML 1.1 quirks are undone (``evaluation_strategy: no`` is read by YAML as
    False; ``lora_target_modules: q_proj`` as a string instead of a one-item list).
    """
    import argparse
    import typing

    import yaml
    from transformers import HfArgumentParser

    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    optional = {n for n, t in hints.items() if n in fields and type(None) in typing.get_args(t)}
    optional_bool = {n for n in optional if bool in typing.get_args(hints[n])}
    list_fields = {n for n, t in hints.items() if n in fields and typing.get_origin(t) is list}
    str_fields = {n for n, t in hints.items() if n in fields and (t is str or str in typing.get_args(t))}

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", action="append", default=None)
    known, rest = pre.parse_known_args(argv)
    if known.config and len(known.config) > 1:
        raise ValueError(f"--config given {len(known.config)} times ({', '.join(known.config)}); give one file")
    known.config = known.config[0] if known.config else None
    rest, set_to_none = _preprocess_flags(rest, optional, optional_bool)
    parser = HfArgumentParser(cls, allow_abbrev=False)  # exact flag names: --learning_rat is an error
    parser.add_argument("--config", default=None, help="YAML file with field values; flags override it.")
    if known.config:
        if not os.path.isfile(known.config):
            raise ValueError(f"config file {known.config!r} does not exist.")
        try:
            with open(known.config, encoding="utf-8") as fh:
                values = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ValueError(f"{known.config}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"{known.config}: not UTF-8 text ({exc.reason})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{known.config}: expected a mapping of field names to values, got {type(values).__name__}.")
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"{known.config}: unknown field(s) {unknown}.")
        for name, value in values.items():
            if name in AUTO_MEANS_NONE and value == "auto":
                values[name] = None
            elif name in str_fields and isinstance(value, bool):
                # YAML 1.1 reads a bare no/off/false as False: meaningful only where "no"/"none" is a value.
                if value is False and name in YAML_FALSE_MEANS:
                    values[name] = YAML_FALSE_MEANS[name]
                else:
                    raise ValueError(f"{known.config}: {name}: YAML read {value} (a boolean) where text is "
                                     f"expected; quote the value, e.g. {name}: \"...\"")
            elif name in list_fields and isinstance(value, str):
                values[name] = [value]
            elif name in str_fields and isinstance(value, (list, dict)):
                values[name] = json.dumps(value, ensure_ascii=False)  # a structured field (datasets) as JSON text
        # Defaults from YAML; dataclass construction (and validation) happens once, after parsing.
        parser.set_defaults(**values)
    namespace, unknown = parser.parse_known_args(rest)
    if unknown:
        import difflib

        flags = [u for u in unknown if u.startswith("-")] or unknown
        hint = difflib.get_close_matches(flags[0].lstrip("-").split("=", 1)[0].replace("-", "_"), list(fields), n=1)
        raise ValueError(f"unknown argument(s) {' '.join(unknown)}" + (f"; did you mean --{hint[0]}?" if hint else "")
                         + " (flag names must be exact; see --help)")
    kwargs = {name: getattr(namespace, name) for name, f in fields.items() if f.init}
    kwargs.update({name: None for name in set_to_none})
    return cls(**kwargs)



def load_config(cls: type, path: str) -> Any:
    """A config from a YAML mapping of field names to values (the same parser as the command line, so
    YAML strings such as ``2e-4``, which YAML 1.1 reads as text, get each field's type)."""
    return parse_config(cls, ["--config", path])


YAML_FALSE_MEANS = {"evaluation_strategy": "no", "report_to": "none"}
# Optional fields whose None means "decide automatically": "auto" is accepted as its spelling.
AUTO_MEANS_NONE = {"bf16"}


def _preprocess_flags(argv: list[str], optional: set[str], optional_bool: set[str]) -> tuple[list[str], set[str]]:
    """Take ``--field None`` / ``--field=None`` (``--bf16 auto`` too) out of argv (returned as names to set to None), and give
    bare optional-bool flags ``true``. Dashes in flag names count as underscores, as in HfArgumentParser."""
    out: list[str] = []
    set_to_none: set[str] = set()
    i = 0
    while i < len(argv):
        token = argv[i]
        name, inline = None, None
        if token.startswith("--"):
            flag, has_value, value = token[2:].partition("=")
            name, inline = flag.replace("-", "_"), (value if has_value else None)
        following = argv[i + 1] if i + 1 < len(argv) else None
        none_words = ("None", "auto") if name in AUTO_MEANS_NONE else ("None",)
        if name in optional and (inline in none_words or (inline is None and following in none_words)):
            set_to_none.add(name)
            i += 1 if inline is not None else 2
            continue
        out.append(token)
        if name in optional_bool and inline is None and (following is None or following.startswith("--")):
            out.append("true")
        i += 1
    return out, set_to_none
