"""Reading a run configuration from a YAML file and command-line flags (``--config run.yaml --max_seq_length 256``).

The config classes state values; this module turns text into them, with ``transformers.HfArgumentParser``
doing the type conversion from the dataclass fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from typing import Any

import yaml


def parse_config(cls: type, argv: list[str] | None = None) -> Any:
    """Parse ``--config file.yaml`` plus any field overrides (``--max_seq_length 256``).

    Overrides are parsed by ``transformers.HfArgumentParser`` from the dataclass fields, with the
    YAML values as defaults, so the command line always wins over the file. Beyond what the parser
    does: ``--field None`` sets an optional field to None, a bare ``--arabic_remove_diacritics``
    means true, and YAML 1.1 quirks are undone (``evaluation_strategy: no`` is read by YAML as
    False; ``lora_target_modules: q_proj`` as a string instead of a one-item list).

    Every mistake is a ``ValueError`` of one line (never argparse's usage dump and exit): a YAML key given
    twice names both lines; a YAML value of the wrong type (``per_device_train_batch_size: four``) names the
    file, line and key; a flag's value of the wrong type names the flag; a value the config refuses names
    the field, and the file and line when it came from the YAML file.
    """
    import typing

    view = parser_view(cls)
    hints = typing.get_type_hints(view)
    fields = {f.name: f for f in dataclasses.fields(view)}
    optional = {n for n, t in hints.items() if n in fields and type(None) in typing.get_args(t)}
    optional_bool = {n for n in optional if bool in typing.get_args(hints[n])}
    list_fields = {n for n, t in hints.items() if n in fields and list in
                   (typing.get_origin(t), *(typing.get_origin(a) for a in typing.get_args(t)))}
    # (list[str] has str among its type arguments too: a list field is not a text field)
    str_fields = {n for n, t in hints.items() if n in fields and n not in list_fields
                  and (t is str or str in typing.get_args(t))}

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.error = raise_argument_error  # one line, not a usage dump and exit
    pre.add_argument("--config", action="append", default=None)
    known, rest = pre.parse_known_args(argv)
    if known.config and len(known.config) > 1:
        raise ValueError(f"--config given {len(known.config)} times ({', '.join(known.config)}); give one file")
    known.config = known.config[0] if known.config else None
    flagged = {t[2:].split("=", 1)[0].replace("-", "_") for t in rest if t.startswith("--")}
    rest, set_to_none = _preprocess_flags(rest, optional, optional_bool, COMMA_TEXT_FIELDS & set(fields))
    parser = build_parser(cls)
    lines: dict[str, int] = {}
    if known.config:
        if not os.path.isfile(known.config):
            raise ValueError(f"config file {known.config!r} does not exist.")
        values, lines = read_yaml(known.config)
        values = {} if values is None else values
        if not isinstance(values, dict):
            raise ValueError(f"{known.config}: expected a mapping of field names to values, got {type(values).__name__}.")
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"{known.config}: unknown field(s) {unknown}.")
        for name, value in values.items():
            where = f"{known.config}, line {lines[name]}" if name in lines else known.config
            if name in list_fields:
                # a YAML list, or one text value (a name, or names separated by commas)
                values[name] = _list_value(name, value, where)
            elif name in COMMA_TEXT_FIELDS and isinstance(value, list):
                values[name] = ",".join(_list_value(name, value, where))  # report_to: [tensorboard, wandb]
            elif name in AUTO_MEANS_NONE and value == "auto":
                values[name] = None
            elif name in str_fields and isinstance(value, bool):
                # YAML 1.1 reads a bare no/off/false as False: meaningful only where "no"/"none" is a value.
                if value is False and name in YAML_FALSE_MEANS:
                    values[name] = YAML_FALSE_MEANS[name]
                else:
                    raise ValueError(f"{known.config}: {name}: YAML read {value} (a boolean) where text is "
                                     f"expected; quote the value, e.g. {name}: \"...\"")
            elif name in str_fields and isinstance(value, (list, dict)):
                values[name] = json.dumps(value, ensure_ascii=False)  # a structured field (datasets) as JSON text
            elif name in optional and value == "None":
                values[name] = None  # as `--field None` on the command line
            elif isinstance(value, str):
                values[name] = _convert_yaml_text(parser, hints[name], name, value, where)
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
    for name in list_fields & (flagged - set_to_none):
        if isinstance(kwargs.get(name), list):  # --lora_target_modules q_proj,v_proj as --lora_target_modules q_proj v_proj
            kwargs[name] = _list_value(name, kwargs[name], f"--{name}")
    kwargs.update({name: None for name in set_to_none})
    try:
        return cls(**kwargs)
    except ValueError as exc:
        # "SFTConfig.seed=1.5 is invalid ...": say where the value came from when the YAML file gave it
        named = re.match(r"\w*Config\.(\w+)", str(exc))
        name = named.group(1) if named else None
        if name in lines and name not in flagged and name not in set_to_none:
            raise ValueError(f"{known.config}, line {lines[name]}: {exc}") from None
        raise


USAGE = "train_sft.py [COMMAND] [--config run.yaml] [--FIELD VALUE ...]"
LIST_NOTE = ("Lists: --lora_target_modules q_proj v_proj, or q_proj,v_proj (YAML: [q_proj, v_proj]); --FIELD None sets an "
             "optional field to None; flags override the YAML file; dashes work as underscores (--max-steps).")
# The group of fields that come before any "# --- title ---" comment of their class, by class name.
UNHEADED_GROUP = {"SFTConfig": "SFT formatting"}
# Fields whose place in the source is not their group.
GROUP_OF = {"resume_from_checkpoint": "evaluation, saving, logging", "resume_allow_changes": "evaluation, saving, logging"}


# Fields that hold a structure (a list of sources, a mapping of template variables): a YAML list or mapping in the
# file, JSON text on the command line. The config class states their real type; the parser reads them as text.
STRUCTURED_FIELDS = ("datasets", "eval_datasets", "chat_template_kwargs")


def parser_view(cls: type) -> type:
    """``cls`` as the parser sees it: the same fields, defaults and help, with ``STRUCTURED_FIELDS`` typed as
    optional text (``HfArgumentParser`` cannot parse a Union of text and a structure)."""
    import typing

    hints = typing.get_type_hints(cls)
    if not any(f.name in STRUCTURED_FIELDS for f in dataclasses.fields(cls)):
        return cls
    spec = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = ({"default_factory": f.default_factory} if f.default_factory is not dataclasses.MISSING
                   else {"default": f.default})
        spec.append((f.name, typing.Optional[str] if f.name in STRUCTURED_FIELDS else hints[f.name],
                     dataclasses.field(metadata=f.metadata, **default)))
    return dataclasses.make_dataclass(cls.__name__, spec)


def build_parser(cls: type, usage: str | None = USAGE, description: str | None = None) -> Any:
    """The ``HfArgumentParser`` of ``cls`` (plus ``--config``), its flags grouped as the config class groups its fields
    (``field_groups``), each shown once (underscore spelling; the dashed one works too), a ``--no_FIELD`` switch
    described as what it does."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(parser_view(cls), allow_abbrev=False, usage=usage, description=description,  # exact flag names
                              formatter_class=_HelpFormatter)
    parser.error = raise_argument_error  # one line, not a usage dump and exit
    parser.add_argument("--config", default=None, metavar="FILE", help="YAML file with field values; flags override it.")
    general = parser._optionals
    general.title = "general"
    by_field = field_groups(cls)
    groups = {title: parser.add_argument_group(title) for title in dict.fromkeys(by_field.values())}
    for action in list(general._group_actions):
        title = by_field.get(action.dest)
        if title is None:
            continue
        general._group_actions.remove(action)
        groups[title]._group_actions.append(action)
        if isinstance(action, argparse._StoreFalseAction):
            action.help = f"Turn {action.dest} off (the same as --{action.dest} false)."
        elif action.metavar is None:
            action.metavar = _metavar(action)
    return parser


def format_help(cls: type, commands: dict[str, tuple[str, str]] | None = None) -> str:
    """``--help`` of the training command: the commands first (``commands``: name -> (module, description)), then the
    fields of ``cls`` in their groups."""
    text = build_parser(cls, description=LIST_NOTE).format_help()
    if not commands:
        return text
    width = max(len(name) for name in commands)
    lines = ["commands (the first argument; without one, train):"]
    lines += [f"  {name.ljust(width)}  {description}" for name, (_, description) in commands.items()]
    lines += ["Run 'train_sft.py COMMAND --help' for a command's own options; training options follow.", ""]
    first, _, rest = text.partition("\n\n")
    return first + "\n\n" + "\n".join(lines) + "\n" + rest


def field_groups(cls: type) -> dict[str, str]:
    """``{field: group title}`` in field order, the groups being the ``# --- title ---`` comments of the config
    classes' source (the text before any " (" of the comment: "Arabic normalization"); fields before a class's
    first comment are in ``UNHEADED_GROUP``'s group of that class, ``GROUP_OF`` moves the few that sit elsewhere."""
    import inspect

    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        own = set(vars(klass).get("__annotations__", {}))
        if not own or not dataclasses.is_dataclass(klass):
            continue
        try:
            source, _ = inspect.getsourcelines(klass)
        except (OSError, TypeError):  # no source (frozen): one group per class
            source = []
        title = UNHEADED_GROUP.get(klass.__name__, klass.__name__)
        for line in source:
            header = re.match(r"\s*#\s*-{2,}\s*(.*?)\s*-*\s*$", line)
            if header:
                title = header.group(1).split(" (")[0].strip() or title
                continue
            declared = re.match(r"    (\w+)\s*:", line)
            if declared and declared.group(1) in own:
                found.setdefault(declared.group(1), title)
        for name in own - set(found):
            found[name] = UNHEADED_GROUP.get(klass.__name__, klass.__name__)
    names = [f.name for f in dataclasses.fields(cls)]
    return {name: GROUP_OF.get(name, found.get(name, "other")) for name in names}


def _metavar(action: Any) -> str:
    from transformers.hf_argparser import string_to_bool

    if action.type is string_to_bool:
        return "BOOL"
    if action.nargs == "+":
        return "NAME"
    return {int: "INT", float: "FLOAT"}.get(action.type, "TEXT")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag once, in its underscore spelling, with a short metavar; defaults shown, except for ``--no_FIELD``."""

    def __init__(self, prog: str, **kwargs: Any):
        kwargs.setdefault("max_help_position", 34)
        super().__init__(prog, **kwargs)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        if action.nargs == 0:
            return ", ".join(action.option_strings) if isinstance(action, argparse._HelpAction) else action.option_strings[0]
        return f"{action.option_strings[0]} {self._format_args(action, self._get_default_metavar_for_optional(action))}"

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)  # not 'all-' / 'linear'

    def _get_help_string(self, action: argparse.Action) -> str:
        if (isinstance(action, (argparse._StoreFalseAction, argparse._HelpAction)) or action.default is None
                or action.dest == "config"):
            return action.help or ""
        return super()._get_help_string(action)


def read_yaml(path: str) -> tuple[Any, dict[str, int]]:
    """The values of a YAML file and the line (from 1) of each top-level key; a ``ValueError`` naming the file
    (and the line) for text that is not YAML, not UTF-8, unreadable, or that gives a key twice in one mapping
    (YAML's own loader silently keeps the last)."""
    try:
        with open(path, encoding="utf-8") as fh:
            loader = _StrictLoader(fh)
            try:
                node = loader.get_single_node()
                values = loader.construct_document(node) if node is not None else None
            finally:
                loader.dispose()
    except _DuplicateKey as exc:
        where = f"lines {exc.first} and {exc.second}" if exc.first != exc.second else f"twice on line {exc.first}"
        raise ValueError(f"{path}: key {exc.key!r} is given twice ({where}); keep one") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except RecursionError:
        raise ValueError(f"{path}: not a config file (nested too deeply)") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    lines = {}
    if isinstance(node, yaml.MappingNode):
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode):  # the last one is the value's (a merge puts its keys first)
                lines[key.value] = key.start_mark.line + 1
    return values, lines


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, second: int):
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping. Keys that a merge (``<<: *base``) brings
    in may still be overridden: that is what merging is for."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKey(key, seen[key], line)
                    seen[key] = line
                except TypeError:  # an unhashable key: YAML's own error follows
                    continue
        return super().construct_mapping(node, deep=deep)


def raise_argument_error(message: str) -> None:
    """``ArgumentParser.error`` as a ``ValueError``: "argument --seed: invalid int value: '1.5'"."""
    raise ValueError(message)


_KIND_WORDS = {int: "an integer", float: "a number", bool: "true or false"}


def _convert_yaml_text(parser: Any, hint: Any, name: str, value: str, where: str) -> Any:
    """A YAML text value for field ``name`` given the type the command line would give it (``learning_rate: 2e-4``,
    which YAML 1.1 reads as text, becomes 0.0002); a value that does not convert names ``where`` and the key."""
    import typing

    action = parser._option_string_actions.get(f"--{name}")
    convert = getattr(action, "type", None)
    if convert is None or convert is str:
        return value
    try:
        return convert(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        kinds = [k for k in (hint, *typing.get_args(hint)) if k in _KIND_WORDS]
        expected = _KIND_WORDS[kinds[0]] if kinds else getattr(convert, "__name__", "another value")
        if type(None) in typing.get_args(hint):
            expected += " or null"
        raise ValueError(f"{where}: {name}: expected {expected}, got {value!r}") from None


def load_config(cls: type, path: str) -> Any:
    """A config from a YAML mapping of field names to values (the same parser as the command line, so
    YAML strings such as ``2e-4``, which YAML 1.1 reads as text, get each field's type)."""
    return parse_config(cls, ["--config", path])


YAML_FALSE_MEANS = {"evaluation_strategy": "no", "report_to": "none"}
# Text fields that hold a comma-separated list: a YAML list or several flag values are joined with commas.
COMMA_TEXT_FIELDS = {"report_to"}
# Optional fields whose None means "decide automatically": "auto" is accepted as its spelling.
AUTO_MEANS_NONE = {"bf16"}


def _preprocess_flags(argv: list[str], optional: set[str], optional_bool: set[str],
                      comma_text: set[str] = frozenset()) -> tuple[list[str], set[str]]:
    """Take ``--field None`` / ``--field=None`` (``--bf16 auto`` too) out of argv (returned as names to set to None), give
    bare optional-bool flags ``true``, and join the values of a comma-separated text field given as several
    (``--report_to tensorboard wandb`` as ``tensorboard,wandb``). Dashes in flag names count as underscores, as in
    HfArgumentParser."""
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
        if name in comma_text and inline is None:
            values = []
            while i + 1 + len(values) < len(argv) and not argv[i + 1 + len(values)].startswith("--"):
                values.append(argv[i + 1 + len(values)])
            if len(values) > 1:
                out += [token, ",".join(values)]
                i += 1 + len(values)
                continue
        out.append(token)
        if name in optional_bool and inline is None and (following is None or following.startswith("--")):
            out.append("true")
        i += 1
    return out, set_to_none


def _list_value(name: str, value: Any, where: str) -> Any:
    """A list field's value from YAML or the command line: a list of names, where an item may itself name several
    separated by commas (``q_proj,v_proj``); one text value is a one-item list (``all-linear``); None stays None.
    Anything else (a number, a mapping, YAML's ``yes``) names ``where`` and the field."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        shown = next((item for item in items if not isinstance(item, str)), value) \
            if isinstance(items, (list, tuple)) else value
        raise ValueError(f"{where}: {name}: expected a list of names such as [q_proj, v_proj] (or one name, or names "
                         f"separated by commas), got {shown!r} ({type(shown).__name__})")
    return [part.strip() for item in items for part in item.split(",") if part.strip()]

