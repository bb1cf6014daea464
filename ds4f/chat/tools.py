"""Tool helpers: request `tools` -> function specs and the TOOLS block; DSML parameter text -> schema-typed values."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "as_plain",
    "coerce_args",
    "coerce_str",
    "coerce_value",
    "find_properties",
    "function_specs",
    "loads_finite",
    "param_value",
    "parse_param_header",
    "render_tools",
    "schema_types",
    "unwrap_wrapper",
]

_TOOLS_TEMPLATE = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a \
"<｜DSML｜tool_calls>" block like the following:

<｜DSML｜tool_calls>
<｜DSML｜invoke name="$TOOL_NAME">
<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name="$TOOL_NAME2">
...
</｜DSML｜invoke>
</｜DSML｜tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, \
arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside \
<think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

{schemas}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""

_TYPE_ALIASES = {
    "str": "string", "text": "string", "varchar": "string", "char": "string", "enum": "string",
    "int": "integer", "int32": "integer", "int64": "integer", "uint": "integer", "uint32": "integer",
    "uint64": "integer", "long": "integer", "short": "integer", "unsigned": "integer",
    "float": "number", "float32": "number", "float64": "number", "double": "number",
    "bool": "boolean", "dict": "object", "arr": "array", "list": "array", "sequence": "array",
}  # fmt: skip
# Coercion tries the schema's types in this order; "string" last so a typed reading wins when one parses.
_PRIORITY = ("null", "integer", "number", "boolean", "object", "array", "string")


def as_plain(obj: Any) -> Any:
    """Pydantic models / dataclass-like objects -> plain dicts (request objects may arrive either way)."""
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        return dump(exclude_none=False)
    return obj


def function_specs(tools: Sequence[Any] | None) -> list[dict[str, Any]]:
    """OpenAI `tools` -> the `function` dicts, validated (type function, str name)."""
    specs: list[dict[str, Any]] = []
    for i, tool in enumerate(tools or ()):
        tool = as_plain(tool)
        if not isinstance(tool, Mapping):
            raise ValueError(f"tools[{i}] must be an object, got {type(tool).__name__}")
        if tool.get("type", "function") != "function":
            raise ValueError(f"tools[{i}].type must be 'function', got {tool.get('type')!r}")
        fn = as_plain(tool.get("function"))
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tools[{i}].function.name must be a non-empty string")
        specs.append(dict(fn))
    return specs


def render_tools(specs: Sequence[Mapping[str, Any]]) -> str:
    """TOOLS_BLOCK: one JSON line per tool `{"name", "description", "parameters"[, "strict"]}`."""
    lines = []
    for fn in specs:
        d = {"name": fn.get("name"), "description": fn.get("description"), "parameters": fn.get("parameters")}
        if fn.get("strict") is not None:
            d["strict"] = fn["strict"]
        lines.append(json.dumps(d, ensure_ascii=False))
    return _TOOLS_TEMPLATE.replace("{schemas}", "\n".join(lines))


def find_properties(specs: Sequence[Mapping[str, Any]] | None, name: str) -> dict[str, Any] | None:
    """The `parameters.properties` of tool `name`; None when unknown, absent or empty (no coercion then)."""
    for fn in specs or ():
        if fn.get("name") == name:
            params = fn.get("parameters")
            props = params.get("properties") if isinstance(params, Mapping) else None
            return dict(props) if isinstance(props, Mapping) and props else None
    return None


def schema_types(schema: Any) -> set[str]:
    """JSON-schema types a value may take: `type` (str or list), enum members' types, anyOf/oneOf/allOf."""
    if not isinstance(schema, Mapping):
        return {"string"}
    types: set[str] = set()
    t = schema.get("type")
    if isinstance(t, str):
        types.add(t)
    elif isinstance(t, list):
        types.update(x for x in t if isinstance(x, str))
    enum = schema.get("enum")
    if isinstance(enum, list):
        for v in enum:
            types.add(_json_type(v))
    for key in ("anyOf", "oneOf", "allOf"):
        choices = schema.get(key)
        if isinstance(choices, list):
            for c in choices:
                types.update(schema_types(c))
    return {_TYPE_ALIASES.get(x.strip().lower(), x.strip().lower()) for x in types} or {"string"}


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return "string"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite JSON constant {name}")


def loads_finite(text: str) -> Any:
    """json.loads that rejects NaN/Infinity (they would re-serialize as invalid JSON)."""
    return json.loads(text, parse_constant=_reject_constant)


def coerce_str(value: str, types: set[str]) -> Any:
    """A string read for a schema with `types` -> the first type (in priority order) it parses as."""
    for t in _PRIORITY:
        if t not in types:
            continue
        if t == "null":
            if value.lower() == "null":
                return None
        elif t == "string":
            return value
        elif t == "integer":
            try:
                return int(value)
            except ValueError:
                pass
        elif t == "number":
            try:
                f = float(value)
            except ValueError:
                continue
            if math.isfinite(f):
                return int(f) if f == int(f) else f
        elif t == "boolean":
            low = value.strip().lower()
            if low in ("true", "1"):
                return True
            if low in ("false", "0"):
                return False
        else:
            try:
                return loads_finite(value)
            except ValueError:
                pass
    try:
        return loads_finite(value)
    except ValueError:
        return value


def coerce_value(value: Any, schema: Any) -> Any:
    """Coerce one parsed argument to its property schema; recurses into properties / items."""
    if isinstance(value, str):
        return coerce_str(value, schema_types(schema))
    if not isinstance(schema, Mapping):
        return value
    if isinstance(value, dict):
        props = schema.get("properties")
        return coerce_args(value, props) if isinstance(props, Mapping) else value
    if isinstance(value, list):
        items = schema.get("items")
        return [coerce_value(v, items) for v in value] if isinstance(items, Mapping) else value
    coerced = coerce_str(json.dumps(value), schema_types(schema))
    return coerced if type(coerced) is not type(value) or coerced != value else value


def coerce_args(args: Mapping[str, Any], properties: Mapping[str, Any] | None) -> dict[str, Any]:
    """Coerce every key that has a property schema; other keys pass through; key order kept."""
    if not properties:
        return dict(args)
    return {k: coerce_value(v, properties[k]) if isinstance(properties.get(k), Mapping) else v for k, v in args.items()}


def unwrap_wrapper(args: dict[str, Any], properties: Mapping[str, Any] | None) -> dict[str, Any]:
    """`{"arguments": {...}}` / `{"input": {...}}` around schema keys -> the inner object (key not in schema)."""
    if not properties:
        return args
    for wrapper in ("arguments", "input"):
        if set(args) != {wrapper} or wrapper in properties:
            continue
        inner = args[wrapper]
        if isinstance(inner, str):
            try:
                inner = loads_finite(inner)
            except ValueError:
                return args
        if isinstance(inner, dict) and set(inner) <= set(properties):
            return inner
    return args


def parse_param_header(header: str) -> dict[str, str]:
    """` name="K" string="true"` -> {"name": "K", "string": "true"} (lenient about spacing and order)."""
    attrs: dict[str, str] = {}
    rest = header
    while True:
        eq = rest.find('="')
        if eq == -1:
            return attrs
        end = rest.find('"', eq + 2)
        if end == -1:
            end = len(rest)
        attr = rest[:eq].strip()
        if attr in ("name", "string") and attr not in attrs:
            attrs[attr] = rest[eq + 2 : end]
        rest = rest[end + 1 :]


def param_value(raw: str, is_str: bool) -> Any:
    """A DSML parameter's text -> value: string="true" keeps it raw, anything else tries JSON, else raw."""
    if is_str:
        return raw
    try:
        return loads_finite(raw)
    except (ValueError, RecursionError):
        return raw
