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

import json
from collections.abc import Sequence
from typing import Any

from tandem.workers.text.harmony.messages import ToolSpec


def _get(schema: Any, key: str) -> Any:
    """schema[key] for a dict schema, None for anything else (as a JSON lookup would)."""
    return schema.get(key) if isinstance(schema, dict) else None


def _has(schema: Any, key: str) -> bool:
    return isinstance(schema, dict) and key in schema


def _is_enum(schema: Any) -> bool:
    values = _get(schema, "enum")
    return isinstance(values, list) and len(values) > 0


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


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


def render_functions_namespace(tools: Sequence[ToolSpec]) -> str:
    """The "# Tools" section of the developer message for function tools."""
    lines = ["## functions\n", "namespace functions {\n"]
    for tool in tools:
        lines.extend(f"// {line}" for line in _lines(tool.description))
        if tool.parameters is None:
            lines.append(f"type {tool.name} = () => any;\n")
        else:
            params = schema_to_typescript(tool.parameters)
            lines.append(f"type {tool.name} = (_: {params}) => any;\n")
    lines.append("} // namespace functions")
    return "# Tools\n\n" + "\n".join(lines)
