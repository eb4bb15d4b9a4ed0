"""The harmony chat format of gpt-oss: conversations in, prompt tokens out
(render.py), and sampled tokens back into reasoning, answer text and tool calls
(parse.py)."""

from tandem.workers.text.harmony.builtin_tools import BROWSER, BUILTIN_TOOLS, PYTHON
from tandem.workers.text.harmony.messages import (
    BUILTIN_TOOL_NAMES,
    CHANNELS,
    DEFAULT_MODEL_IDENTITY,
    REASONING_EFFORTS,
    ROLES,
    Conversation,
    Message,
    ToolNamespace,
    ToolSpec,
)
from tandem.workers.text.harmony.parse import (
    ContentDelta,
    HarmonyEvent,
    HarmonyStreamParser,
    MessageEnd,
    MessageStart,
    ReasoningDelta,
    ToolCall,
    ToolCallDelta,
)
from tandem.workers.text.harmony.render import (
    chat_stop_token_ids,
    developer_message_text,
    render_conversation,
    render_message,
    system_message_text,
)
from tandem.workers.text.harmony.typescript import (
    render_functions_namespace,
    render_namespace,
    render_tools_section,
    schema_to_typescript,
)

__all__ = [
    "BROWSER",
    "BUILTIN_TOOLS",
    "BUILTIN_TOOL_NAMES",
    "CHANNELS",
    "PYTHON",
    "DEFAULT_MODEL_IDENTITY",
    "REASONING_EFFORTS",
    "ROLES",
    "ContentDelta",
    "Conversation",
    "HarmonyEvent",
    "HarmonyStreamParser",
    "Message",
    "MessageEnd",
    "MessageStart",
    "ReasoningDelta",
    "ToolCall",
    "ToolCallDelta",
    "ToolNamespace",
    "ToolSpec",
    "chat_stop_token_ids",
    "developer_message_text",
    "render_conversation",
    "render_functions_namespace",
    "render_message",
    "render_namespace",
    "render_tools_section",
    "schema_to_typescript",
    "system_message_text",
]
