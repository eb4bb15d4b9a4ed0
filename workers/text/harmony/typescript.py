"""Function tools as harmony declares them: JSON schema rendered as TypeScript-like types.

gpt-oss was trained on OpenAI's harmony renderer (github.com/openai/harmony), so the
text must match it character for character, quirks included: for example a nested
object's properties are indented by 4 spaces but its "{" is not, oneOf variants are
indented by 3, a string default is quoted unless the property is an enum, and a
non-string default is printed as compact JSON. Example:

    // Gets the current weather in the provided location.
    type get_current_weather = (_: {
    // The city and state, e.g. San Francisco, CA
    location: string,
    format?: "celsius" | "fahrenheit", // default: celsius
    }) => any;
"""

from __future__ import annotations

import decimal
import json
import math
from collections.abc import Sequence
from typing import Any

from tandem.workers.text.harmony.messages import ToolNamespace, ToolSpec


def _get(schema: Any, key: str) -> Any:
    """schema[key] for a dict schema, None for anything else (as a JSON lookup would)."""
    return schema.get(key) if isinstance(schema, dict) else None


def _has(schema: Any, key: str) -> bool:
    return isinstance(schema, dict) and key in schema


def _is_enum(schema: Any) -> bool:
    values = _get(schema, "enum")
    return isinstance(values, list) and len(values) > 0


def _json(value: Any) -> str:
    """Compact JSON as the harmony renderer (Rust serde_json) prints a value.

    Strings, ints, booleans and null read as Python's json module writes them; floats do
    not: serde_json prints the shortest round-trip digits in ryu's layout, so 1e-7 is
    "1e-7" (Python: "1e-07"), 1e22 is "1e22" ("1e+22") and 1e-5 is "0.00001" ("1e-05").
    """
    if isinstance(value, float):
        return _ryu(value)
    if isinstance(value, dict):
        items = (f"{json.dumps(str(k), ensure_ascii=False)}:{_json(v)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_json(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def _ryu(x: float) -> str:
    """A finite float in the layout of ryu's `format64` (what serde_json writes).

    With digits d (no trailing zeros, length n) and value d * 10^k, kk = n + k:
    0 <= k and kk <= 16: digits, k zeros, ".0"; 0 < kk <= 16: a point inside the digits;
    -5 < kk <= 0: "0." then -kk zeros then the digits; else scientific "d.ddde<kk-1>".
    """
    if not math.isfinite(x):
        raise ValueError(f"JSON has no representation for {x!r}")
    if x == 0:
        return "-0.0" if math.copysign(1.0, x) < 0 else "0.0"
    sign = "-" if x < 0 else ""
    # repr() gives the shortest digits that round-trip, as ryu does.
    _, digit_tuple, k = decimal.Decimal(repr(abs(x))).normalize().as_tuple()
    digits = "".join(map(str, digit_tuple))
    assert isinstance(k, int)
    n = len(digits)
    kk = n + k
    if 0 <= k and kk <= 16:
        body = digits + "0" * k + ".0"
    elif 0 < kk <= 16:
        body = digits[:kk] + "." + digits[kk:]
    elif -5 < kk <= 0:
        body = "0." + "0" * -kk + digits
    elif n == 1:
        body = f"{digits}e{kk - 1}"
    else:
        body = f"{digits[0]}.{digits[1:]}e{kk - 1}"
    return sign + body


def _nullable(schema: Any, type_str: str) -> str:
    if _get(schema, "nullable") is True and "null" not in type_str:
        return f"{type_str} | null"
    return type_str


def _default_text(schema: Any, default: Any, enum_string_as_json: bool) -> str:
    """A default for a "// default: ..." comment.

    Strings are quoted, except on enums, where the harmony renderer prints the raw
    string for properties and the JSON string for oneOf variants of a top-level union.
    """
    if isinstance(default, str):
        if not _is_enum(schema):
            return f'"{default}"'
        return _json(default) if enum_string_as_json else default
    return _json(default)


def _lines(text: str) -> list[str]:
    """Lines as Rust's str::lines() yields them (no trailing empty line, "\\r\\n" too)."""
    parts = text.split("\n")
    if parts[-1] == "":
        parts.pop()
    return [p[:-1] if p.endswith("\r") else p for p in parts]


def schema_to_typescript(schema: Any, indent: str = "") -> str:
    """Render one JSON schema as a TypeScript-like type."""
    one_of = _get(schema, "oneOf")
    if isinstance(one_of, list):
        return _union(one_of, indent)
    kind = _get(schema, "type")
    if isinstance(kind, list):
        names = ["number" if k == "integer" else k for k in kind if isinstance(k, str)]
        if names:
            return " | ".join(names)
        return "any"
    if kind == "object":
        return _object(schema, indent)
    if kind == "string":
        values = _get(schema, "enum")
        if isinstance(values, list):
            quoted = [f'"{v}"' for v in values if isinstance(v, str)]
            if quoted:
                return " | ".join(quoted)
        return "string"
    if kind in ("number", "integer"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "array":
        if _has(schema, "items"):
            return f"{schema_to_typescript(schema['items'], indent)}[]"
        return "Array<any>"
    return "any"


def _union(variants: list[Any], indent: str) -> str:
    """A top-level oneOf: one "\\n | type // comments" line per variant."""
    out = ""
    for variant in variants:
        out += f"\n{indent} | "
        out += _nullable(variant, schema_to_typescript(variant, indent + "   "))
        comments = []
        desc = _get(variant, "description")
        if isinstance(desc, str):
            comments.append(desc)
        if _has(variant, "default"):
            comments.append("default: " + _default_text(variant, variant["default"], True))
        if comments:
            out += " // " + " ".join(comments)
    return out


def _object(schema: dict[str, Any], indent: str) -> str:
    out = ""
    desc = schema.get("description")
    if isinstance(desc, str):
        out += f"{indent}// {desc}\n"
    out += "{\n"
    props = schema.get("properties")
    if isinstance(props, dict):
        required_list = schema.get("required")
        required = (
            {r for r in required_list if isinstance(r, str)}
            if isinstance(required_list, list)
            else set()
        )
        for key, prop in props.items():
            optional = "" if key in required else "?"
            out += _property_comments(prop, indent)
            variants = _get(prop, "oneOf")
            if isinstance(variants, list):
                out += _property_union(key, optional, prop, variants, indent)
                continue
            out += f"{indent}{key}{optional}: "
            out += _nullable(prop, schema_to_typescript(prop, indent + "    ")) + ","
            if not _has(prop, "oneOf") and _has(prop, "default"):
                out += " // default: " + _default_text(prop, prop["default"], False)
            out += "\n"
    out += f"{indent}}}"
    return out


def _property_comments(prop: Any, indent: str) -> str:
    """Title, description (unless a oneOf property renders its own) and examples."""
    out = ""
    title = _get(prop, "title")
    if isinstance(title, str):
        out += f"{indent}// {title}\n{indent}//\n"
    desc = _get(prop, "description")
    if not _has(prop, "oneOf") and isinstance(desc, str):
        out += f"{indent}// {desc}\n"
    examples = _get(prop, "examples")
    if isinstance(examples, list) and examples:
        out += f"{indent}// Examples:\n"
        for example in examples:
            if isinstance(example, str):
                out += f'{indent}// - "{example}"\n'
    return out


def _property_union(
    key: str, optional: str, prop: dict[str, Any], variants: list[Any], indent: str
) -> str:
    """A property whose schema is a oneOf: comments above, then one line per variant."""
    out = ""
    prop_desc = prop.get("description") if isinstance(prop.get("description"), str) else None
    first_desc = _get(variants[0], "description") if variants else None
    desc_above = prop_desc is not None and prop_desc != first_desc
    if desc_above:
        out += f"{indent}// {prop_desc}\n"
    if "default" in prop:
        out += f"{indent}// default: {_default_text(prop, prop['default'], False)}\n"
    out += f"{indent}{key}{optional}:\n"
    for i, variant in enumerate(variants):
        out += f"{indent} | "
        out += _nullable(variant, schema_to_typescript(variant, indent + "   "))
        comments = []
        desc = _get(variant, "description")
        # The first variant's description was already said above (or equals the property's).
        if not (i == 0 and desc_above) and isinstance(desc, str) and desc != prop_desc:
            comments.append(desc)
        if _has(variant, "default"):
            comments.append("default: " + _default_text(variant, variant["default"], False))
        if comments:
            out += " // " + " ".join(comments)
        out += "\n"
    out += f"{indent},\n"
    return out


def render_namespace(namespace: ToolNamespace) -> str:
    """One "## NAME" section: the description, then the tools as TypeScript types."""
    lines = [f"## {namespace.name}\n"]
    if namespace.description is not None:
        prefix = "// " if namespace.tools else ""
        lines.extend(prefix + line for line in _lines(namespace.description))
    if namespace.tools:
        lines.append(f"namespace {namespace.name} {{\n")
        for tool in namespace.tools:
            lines.extend(f"// {line}" for line in _lines(tool.description))
            if tool.parameters is None:
                lines.append(f"type {tool.name} = () => any;\n")
            else:
                params = schema_to_typescript(tool.parameters)
                lines.append(f"type {tool.name} = (_: {params}) => any;\n")
        lines.append(f"}} // namespace {namespace.name}")
    return "\n".join(lines)


def render_tools_section(namespaces: Sequence[ToolNamespace]) -> str:
    """The "# Tools" section, namespaces sorted by name (harmony keeps them in a sorted map,
    so "browser" comes before "python" whatever order they were added in)."""
    ordered = sorted(namespaces, key=lambda ns: ns.name)
    return "\n\n".join(["# Tools", *(render_namespace(ns) for ns in ordered)])


def render_functions_namespace(tools: Sequence[ToolSpec]) -> str:
    """The "# Tools" section of the developer message for function tools."""
    return render_tools_section([ToolNamespace("functions", None, tuple(tools))])
