"""The tools' JSON schemas as `tools/list` serves them: compact, because a model reads every byte.

pydantic writes schemas for code generators: a `title` on every property, `anyOf: [T, null]` for
every optional value, `default: null`, `$defs` with references and each model's docstring. Every
conversation with this server pays for `tools/list`, so the server serves the same schemas in the
compact form these two functions make, for every tool it lists (nothing is edited by hand):

* `compact_input`: no titles; an optional parameter is simply not required (its `null` arm and
  `default: null` go; the server still takes null as "omitted").
* `compact_output`: the fields of the result a model acts on, with their types, and nothing else: no
  titles, descriptions, defaults, `required` lists or enums, references inlined. A field marked as a
  detail (`models.DETAIL`: provider, model, sizes, costs, ...) is left out of the schema and the
  schema then admits further fields: every structuredContent still carries the details, which the
  three job tools' schemas would otherwise repeat at ~500 bytes each in every conversation. No model reads an output schema; clients check results against it, and the
  values are the server's own, validated against the full pydantic model before they are sent.
  A nullable field keeps its `anyOf: [{type: T}, {type: null}]`: one `type` per schema is what the
  most clients map (Gemini's function declarations, say), and a schema without a type accepts
  anything (the MCP Inspector's `--strict` lint flags both). Output schemas are still about half
  of `tools/list`: each of the three job tools returns a prediction.

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
HINT_DEFAULTS = {"destructive_hint": True, "idempotent_hint": False, "open_world_hint": True}
"""What the protocol says a tool annotation hint is when a tool leaves it out (readOnlyHint: false)."""


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
    """The compact form of a tool's `outputSchema`: it accepts every result the original accepts, and
    refuses any with other fields or other types."""
    return _Compactor(schema, output=True).node(schema)


def compact_annotations(annotations: ToolAnnotations | None) -> ToolAnnotations | None:
    """`annotations` with `readOnlyHint` (the hint clients act on most) and the other hints only where
    they differ from what the protocol says their absence means (destructive, not idempotent, open
    world). A tool states all four in code; the wire needs no more to say the same."""
    if annotations is None:
        return None
    dump = annotations.model_dump(exclude_none=True)
    if dump.get("read_only_hint"):  # the protocol gives the other hints meaning only for tools that write
        return ToolAnnotations(read_only_hint=True)
    kept = {k: v for k, v in dump.items() if k == "read_only_hint" or HINT_DEFAULTS.get(k) != v}
    return ToolAnnotations(**kept)


class _Compactor:
    def __init__(self, root: Mapping[str, Any], *, output: bool):
        self.defs: Mapping[str, Any] = root.get("$defs", {})
        self.output = output

    def node(self, schema: Mapping[str, Any]) -> dict[str, Any]:
        schema = self._inline(schema)
        if not self.output:
            schema = _drop_null(schema)
        dropped = {"title", "$defs", "description", "default", "required", "enum"} if self.output else {"title"}
        details = [name for name, sub in schema.get("properties", {}).items()
                   if self.output and self._inline(sub).get("x-detail")]
        if details:
            dropped = dropped | {"additionalProperties"}  # the details are still there: admit them
        out: dict[str, Any] = {}
        for key, value in schema.items():
            if key in dropped and (key != "enum" or "type" in schema):
                continue
            if key == "default" and (value is None or value is False):  # absent, or off: what omitting means
                continue
            if key == "additionalProperties" and value is True and "type" in schema:  # JSON Schema's default
                continue
            if key == "properties":
                out[key] = {name: self.node(sub) for name, sub in value.items() if name not in details}
            elif key in _SCHEMA_LISTS:
                out[key] = [self.node(sub) for sub in value]
            elif key in _SCHEMA_VALUES and isinstance(value, Mapping):
                out[key] = self.node(value)
            else:
                out[key] = value
        return out

    def _inline(self, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        ref = schema.get("$ref")
        if not isinstance(ref, str) or not ref.startswith("#/$defs/"):
            return schema
        target = self._inline(self.defs[ref.removeprefix("#/$defs/")])
        return {**target, **{k: v for k, v in schema.items() if k != "$ref"}}


def _drop_null(schema: Mapping[str, Any]) -> Mapping[str, Any]:
    """An input's `anyOf: [X, {type: null}]` -> X: the parameter is optional, and null means omitted."""
    arms = schema.get("anyOf")
    if not isinstance(arms, list):
        return schema
    others = [arm for arm in arms if arm != {"type": "null"}]
    if len(others) == len(arms):
        return schema
    rest = {k: v for k, v in schema.items() if k != "anyOf"}
    return {**others[0], **rest} if len(others) == 1 else {**rest, "anyOf": others}
