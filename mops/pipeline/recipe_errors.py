"""One line per bad recipe: the key path, the bad value, and what is accepted.

pydantic reports every problem with a location tuple and an error type; this turns the
first of them into ``recover.methods[2].gate: 'mopz' is not one of mops, attempt, uniform,
single``. Accepted keys and descriptions are read from the schema itself, so the message
never drifts from what the recipe really accepts.
"""

from __future__ import annotations

import difflib
import typing

from pydantic import BaseModel, ValidationError

#: error type -> what a value of that kind would have been
KINDS = {
    "int_type": "a whole number", "int_parsing": "a whole number", "int_from_float": "a whole number",
    "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
    "string_type": "a string", "bool_type": "true or false", "bool_parsing": "true or false",
    "list_type": "a list", "dict_type": "a mapping of keys", "model_type": "a mapping of keys",
    "model_attributes_type": "a mapping of keys",
}
BOUNDS = {"greater_than": ("gt", "greater than"), "greater_than_equal": ("ge", "at least"),
          "less_than": ("lt", "less than"), "less_than_equal": ("le", "at most")}


def key_path(loc) -> str:
    """``('recover', 'methods', 2, 'gate')`` -> ``recover.methods[2].gate``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "recipe"


def _unwrap(annotation):
    """The model class inside ``Optional[list[Model]]`` and the like, else None."""
    while True:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return annotation
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if not args:
            return None
        annotation = args[0]


def model_at(root: type[BaseModel], loc) -> type[BaseModel] | None:
    """The schema class that holds the keys at ``loc`` (list indices skipped)."""
    cls = root
    for part in loc:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        cls = _unwrap(field.annotation) if field else None
        if cls is None:
            return None
    return cls


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe(error: dict, root: type[BaseModel]) -> str:
    loc, kind, ctx, value = error["loc"], error["type"], error.get("ctx") or {}, error.get("input")
    if "at" in ctx:  # a rule over several keys names the key it blames
        return f"{ctx['at']}: {error['msg']}"
    if kind == "method_key":  # raised on the entry, about one of its keys (named first in the message)
        return f"{key_path(loc)}.{error['msg']}"
    path = key_path(loc)
    if kind == "extra_forbidden":
        parent = model_at(root, loc[:-1])
        accepted = sorted(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), accepted, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{path}: unknown key{hint}; accepted here: {', '.join(accepted)}"
    if kind == "missing":
        parent = model_at(root, loc[:-1])
        field = parent.model_fields.get(loc[-1]) if parent else None
        what = f": {field.description}" if field and field.description else ""
        return f"{path}: missing; required{what}"
    if kind == "literal_error":
        expected = ctx["expected"].replace("'", "").replace(" or ", ", ")
        return f"{path}: {_short(value)} is not one of {expected}"
    if kind in KINDS:
        parent = model_at(root, loc[:-1]) if loc and isinstance(loc[-1], str) else None
        field = parent.model_fields.get(loc[-1]) if parent else None
        expected = f"; expected {field.description}" if field and field.description else ""
        return f"{path}: {_short(value)} is not {KINDS[kind]}{expected}"
    if kind in BOUNDS:
        name, words = BOUNDS[kind]
        return f"{path}: {_short(value)} is not {words} {ctx[name]}"
    if kind == "too_short":
        return f"{path}: is empty; expected at least {ctx.get('min_length', 1)} entry"
    if kind == "string_pattern_mismatch":
        return f"{path}: {_short(value)} is not a name of letters, digits, '.', '_' and '-'"
    if kind in ("pattern", "one_of", "duplicate"):
        return f"{path}: {error['msg']}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{path}: {_short(value)}: {message}"


def one_line(e: ValidationError, root: type[BaseModel]) -> str:
    """The first problem pydantic found (in the recipe's own key order), as one line; an
    unknown key first, since a misspelt key is often why another one is missing."""
    errors = e.errors(include_url=False)
    errors.sort(key=lambda err: err["type"] != "extra_forbidden")  # stable: otherwise the recipe's order
    return describe(errors[0], root)
