"""The harmony conversation model: messages, function tools, and a whole conversation.

These are plain data; render.py turns a `Conversation` into prompt tokens and parse.py
turns sampled tokens back into `Message`s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")
REASONING_EFFORTS = ("low", "medium", "high")
CHANNELS = ("analysis", "commentary", "final")
DEFAULT_MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
# The built-in tools a system message can declare (their texts: builtin_tools.py).
BUILTIN_TOOL_NAMES = ("browser", "python")

# OpenAI's function-name rule; names are rendered into the header (" to=functions.NAME"),
# where whitespace or markup would break parsing.
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
# A header word (channel, recipient, author, content type) ends at whitespace or "<".
_HEADER_WORD = re.compile(r"^[^\s<]+$")


def _check_header_word(owner: str, name: str, value: str | None) -> None:
    if value is not None and not _HEADER_WORD.match(value):
        raise ValueError(f"{owner}.{name} must be one word without '<', got {value!r}")


@dataclass(frozen=True)
class Message:
    """One harmony message.

    Assistant tool calls: recipient "functions.NAME", channel commentary, content the
    JSON arguments. Tool results: role "tool", name the function ("get_weather" or
    "functions.get_weather"), content the result.
    """

    role: str
    # One of ROLES.
    content: str
    # The message text (for a tool call: the JSON arguments).
    channel: str | None = None
    # analysis | commentary | final. None on an assistant message renders as final.
    recipient: str | None = None
    # "functions.NAME" for a tool call; tool results default to "assistant".
    name: str | None = None
    # The tool's name on role "tool" messages (required there); else an author suffix.
    content_type: str | None = None
    # The header's content type, e.g. "json"; tool calls default to "json".
    constrain: bool = True
    # The content type follows <|constrain|> (a constrained format: " <|constrain|>json").
    # False writes the bare word, as the model does for code sent to a built-in tool
    # ("to=python code"); the parser sets it from what it read, so parse -> render
    # gives back the same tokens.

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"Message.role must be one of {ROLES}, got {self.role!r}")
        if not isinstance(self.constrain, bool):
            raise ValueError(f"Message.constrain must be a bool, got {self.constrain!r}")
        if not isinstance(self.content, str):
            raise ValueError(f"Message.content must be a str, got {type(self.content).__name__}")
        if self.role == "tool" and not self.name:
            raise ValueError("Message.name is required on role 'tool' (the tool's name)")
        for attr in ("channel", "recipient", "name", "content_type"):
            _check_header_word("Message", attr, getattr(self, attr))

    @property
    def is_tool_call(self) -> bool:
        """An assistant message addressed to a tool (it ends with <|call|>)."""
        return self.role == "assistant" and self.recipient not in (None, "all", "assistant")


@dataclass(frozen=True)
class ToolSpec:
    """A function tool offered to the model."""

    name: str
    # Function name, [A-Za-z0-9_-]{1,64}.
    description: str = ""
    # What it does; rendered as // comments.
    parameters: dict[str, Any] | None = None
    # JSON schema of the single argument object; None renders as "() => any".

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _TOOL_NAME.match(self.name):
            raise ValueError(f"ToolSpec.name must match [A-Za-z0-9_-]{{1,64}}, got {self.name!r}")
        if not isinstance(self.description, str):
            raise ValueError(f"ToolSpec.description must be a str, got {self.description!r}")
        if self.parameters is not None and not isinstance(self.parameters, dict):
            raise ValueError(
                f"ToolSpec.parameters must be a JSON-schema dict or None, "
                f"got {type(self.parameters).__name__}"
            )


@dataclass(frozen=True)
class ToolNamespace:
    """A "## NAME" section of a "# Tools" block: the developer message's `functions`, or
    a built-in tool of the system message (builtin_tools.py)."""

    name: str
    # The namespace, e.g. "browser"; calls go to "NAME.tool" (or "NAME" without tools).
    description: str | None
    # Text under the heading; "// "-commented when the namespace declares tools.
    tools: tuple[ToolSpec, ...]
    # Its functions, rendered as TypeScript types inside "namespace NAME { ... }".


@dataclass(frozen=True)
class Conversation:
    """Everything rendered into one prompt: the system and developer headers come from
    the fields here, then `messages` in order."""

    messages: tuple[Message, ...]
    # The turns so far (user, assistant, tool ...); system/developer ones render verbatim.
    reasoning_effort: str = "medium"
    # low | medium | high, the "Reasoning:" line of the system message.
    tools: tuple[ToolSpec, ...] = ()
    # Function tools, declared in the developer message's "namespace functions".
    instructions: str | None = None
    # Developer instructions ("# Instructions"), e.g. the API's system prompt.
    knowledge_cutoff: str = "2024-06"
    # The "Knowledge cutoff:" line.
    current_date: str | None = None
    # The "Current date:" line (YYYY-MM-DD), omitted when None.
    model_identity: str = DEFAULT_MODEL_IDENTITY
    # The first line of the system message.
    builtin_tools: tuple[str, ...] = ()
    # Built-in tools declared in the system message: "browser" and/or "python"
    # (openai-harmony's SystemContent.with_browser_tool() / with_python_tool()).

    def __post_init__(self) -> None:
        object.__setattr__(self, "messages", tuple(self.messages))
        object.__setattr__(self, "tools", tuple(self.tools))
        object.__setattr__(self, "builtin_tools", tuple(self.builtin_tools))
        for name in self.builtin_tools:
            if name not in BUILTIN_TOOL_NAMES:
                raise ValueError(
                    f"Conversation.builtin_tools: {name!r} is not one of {BUILTIN_TOOL_NAMES}"
                )
        if len(set(self.builtin_tools)) != len(self.builtin_tools):
            raise ValueError(f"Conversation.builtin_tools: duplicates in {self.builtin_tools}")
        for i, m in enumerate(self.messages):
            if not isinstance(m, Message):
                raise ValueError(f"Conversation.messages[{i}] must be a Message, got {m!r}")
        for i, t in enumerate(self.tools):
            if not isinstance(t, ToolSpec):
                raise ValueError(f"Conversation.tools[{i}] must be a ToolSpec, got {t!r}")
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names):
            raise ValueError(f"Conversation.tools: duplicate tool names in {names}")
        if self.reasoning_effort not in REASONING_EFFORTS:
            raise ValueError(
                f"Conversation.reasoning_effort must be one of {REASONING_EFFORTS}, "
                f"got {self.reasoning_effort!r}"
            )
        if self.instructions is not None and not isinstance(self.instructions, str):
            raise ValueError(f"Conversation.instructions must be a str, got {self.instructions!r}")
        if not self.knowledge_cutoff:
            raise ValueError("Conversation.knowledge_cutoff must be non-empty")
