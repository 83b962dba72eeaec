"""Read a recipe file with YAML 1.2's core schema, and refuse a key given twice.

PyYAML implements YAML 1.1, where ``pattern: 2:4`` is the sexagesimal integer 124,
``lr: 3e-3`` is a string (1.1 floats need a dot) and ``on``/``no`` are booleans. A recipe
means what it says under YAML 1.2 (the version every other tool in the ecosystem reads),
so the implicit resolvers are swapped for 1.2's: ``2:4`` stays a string, ``3e-3`` is a
float, only ``true``/``false`` are booleans. PyYAML also keeps the last of two equal keys
silently; a recipe that sets ``steps`` twice is almost certainly a mistake, so it is refused.
"""

from __future__ import annotations

import re

import yaml

from mops.errors import UserError

# YAML 1.2 core schema (https://yaml.org/spec/1.2.2/#1032-tag-resolution)
_CORE = {
    "tag:yaml.org,2002:bool": (re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")),
    "tag:yaml.org,2002:int": (re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")),
    "tag:yaml.org,2002:float": (
        re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                   r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
        list("-+0123456789."),
    ),
    "tag:yaml.org,2002:null": (re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]),
}


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core scalars and duplicate keys refused."""


RecipeLoader.yaml_implicit_resolvers = {}
for _tag, (_regexp, _first) in _CORE.items():
    RecipeLoader.add_implicit_resolver(_tag, _regexp, _first)
# 1.1's other implicit types (timestamps, merge keys, '=') do not exist in 1.2's core schema


def _int_12(loader, node):
    text = loader.construct_scalar(node)
    base = 8 if text.startswith("0o") else 16 if text.startswith("0x") else 10
    return int(text[2:] if base != 10 else text, base)


def _float_12(loader, node):
    text = loader.construct_scalar(node).lower()
    if text.endswith(".inf"):
        return float("-inf") if text.startswith("-") else float("inf")
    if text == ".nan":
        return float("nan")
    return float(text)


def _mapping_without_duplicates(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice (first on line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


RecipeLoader.add_constructor("tag:yaml.org,2002:int", _int_12)
RecipeLoader.add_constructor("tag:yaml.org,2002:float", _float_12)
RecipeLoader.construct_mapping = _mapping_without_duplicates


def load_yaml(text: str, source: str):
    """Parse ``text``; a syntax error is one line naming ``source``, the line and the column."""
    try:
        return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - RecipeLoader is a SafeLoader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}: line {mark.line + 1}, column {mark.column + 1}" if mark else source
        problem = " ".join(str(e.problem or e.context or "not valid YAML").split())
        raise UserError(f"{where}: {problem}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{source}: not valid YAML ({' '.join(str(e).split())})") from None
