"""The tools' JSON schemas as `tools/list` serves them: compact, because a model reads every byte.

pydantic writes schemas for code generators: a `title` on every property, `anyOf: [T, null]` for
every optional value, `default: null`, `$defs` with references and each model's docstring. Every
conversation with this server pays for `tools/list`, so the server serves the same schemas in the
compact form these two functions make, for every tool it lists (nothing is edited by hand):

* `compact_input`: no titles; an optional parameter is simply not required (its `null` arm and
  `default: null` go; the server still takes null as "omitted"); `additionalProperties: false`,
  because the server refuses arguments a tool does not have.
* `compact_output`: the shape of the result and nothing else: its fields (and no others:
  `additionalProperties: false` stays), which are required, and the lists and objects in it; no
  titles, descriptions, defaults, scalar types or enums. No model reads an output schema; clients
  validate results against it, and the values are the server's own, checked against the full
  pydantic model before they are sent. The types would otherwise cost some 900 bytes in every
  conversation (each of the three job tools returns a prediction).

The input side keeps every constraint that decides whether an argument is valid, except the
ones a field marks `quiet`: caps that only guard the server (a 1,024-character path, an 8,192-pixel
side), far from any value a model would choose, which cost every conversation bytes and mislead
beside the real, per-model limits. The server still enforces them, with an error that says so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mcp_types import ToolAnnotations

_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "not", "contains")


def quiet(*keywords: str) -> Callable[[dict[str, Any]], None]:
    """A field's `json_schema_extra` that leaves these keywords (`maxLength`, `maximum`, ...) out of its
    JSON schema while pydantic keeps enforcing them."""

    def edit(schema: dict[str, Any]) -> None:
        for node in [schema, *schema.get("anyOf", ())]:
            for keyword in keywords:
                node.pop(keyword, None)

    return edit


def compact_input(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The compact form of a tool's `inputSchema`."""
    return _Compactor(schema, output=False).node(schema)


def compact_output(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The compact form of a tool's `outputSchema`: it accepts every result the original accepts."""
    return _Compactor(schema, output=True).node(schema)


class _Compactor:
    def __init__(self, root: Mapping[str, Any], *, output: bool):
        self.defs: Mapping[str, Any] = root.get("$defs", {})
        self.output = output

    def node(self, schema: Mapping[str, Any]) -> dict[str, Any]:
        schema = self._fold_null(dict(self._inline(schema)))
        out: dict[str, Any] = {}
        for key, value in schema.items():
            if key in ("title", "$defs") or (key == "default" and (value is None or self.output)):
                continue
            if key == "description" and self.output:
                continue
            if key == "properties":
                out[key] = {name: self.node(sub) for name, sub in value.items()}
            elif key in _SCHEMA_LISTS:
                out[key] = [self.node(sub) for sub in value]
            elif key in _SCHEMA_VALUES and isinstance(value, Mapping):
                out[key] = self.node(value)
            else:
                out[key] = value
        out = _drop_redundant_type(out)
        if self.output:
            out.pop("enum", None)
            if _is_scalar_type(out.get("type")):
                del out["type"]
        if {} in out.get("anyOf", ()):
            del out["anyOf"]  # one arm accepts anything, so the union does
        return out

    def _inline(self, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        ref = schema.get("$ref")
        if not isinstance(ref, str) or not ref.startswith("#/$defs/"):
            return schema
        target = self._inline(self.defs[ref.removeprefix("#/$defs/")])
        return {**target, **{k: v for k, v in schema.items() if k != "$ref"}}

    def _fold_null(self, schema: dict[str, Any]) -> dict[str, Any]:
        """`anyOf: [X, {type: null}]` -> X (inputs) or X that also admits null (outputs)."""
        arms = schema.get("anyOf")
        if not isinstance(arms, list):
            return schema
        others = [arm for arm in arms if arm != {"type": "null"}]
        if len(others) == len(arms):
            return schema
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        if not self.output:
            return {**others[0], **rest} if len(others) == 1 else {**rest, "anyOf": others}
        if len(others) != 1:
            return schema
        [arm] = others
        if "enum" in arm:
            return {**{k: v for k, v in arm.items() if k != "type"}, "enum": [*arm["enum"], None], **rest}
        if isinstance(arm.get("type"), str) and "const" not in arm:
            # Every other keyword applies to values of the arm's type only, so null passes them all.
            return {**arm, "type": [arm["type"], "null"], **rest}
        return schema


HINT_DEFAULTS = {"read_only_hint": False, "destructive_hint": True, "idempotent_hint": False, "open_world_hint": True}
"""What the protocol says a tool annotation hint means when a tool leaves it out."""


def compact_annotations(annotations: ToolAnnotations | None) -> ToolAnnotations | None:
    """`annotations` without the hints that say what their absence says; None when nothing is left.
    A tool states all four hints in code; the wire needs only the ones that differ."""
    if annotations is None:
        return None
    kept = {k: v for k, v in annotations.model_dump(exclude_none=True).items() if HINT_DEFAULTS.get(k, not v) != v}
    return ToolAnnotations(**kept) if kept else None


_SCALARS = frozenset({"string", "integer", "number", "boolean", "null"})


def _is_scalar_type(kind: object) -> bool:
    kinds = kind if isinstance(kind, list) else [kind]
    return bool(kinds) and all(k in _SCALARS for k in kinds)


_JSON_TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "integer": (int,), "number": (int, float),
                                            "boolean": (bool,)}


def _drop_redundant_type(schema: dict[str, Any]) -> dict[str, Any]:
    """An `enum` of strings needs no `type: string` beside it."""
    enum, kind = schema.get("enum"), schema.get("type")
    if isinstance(enum, list) and isinstance(kind, str) and kind in _JSON_TYPES:
        types = _JSON_TYPES[kind]
        if all(isinstance(v, types) and (kind == "boolean" or not isinstance(v, bool)) for v in enum):
            return {k: v for k, v in schema.items() if k != "type"}
    return schema
