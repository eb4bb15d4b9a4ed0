"""Render a harmony `Conversation` into prompt token ids.

Layout of a rendered prompt (every text piece encoded with special tokens disallowed,
control tokens inserted by id):

    <|start|>system<|message|>{identity, cutoff, date, reasoning, channels}<|end|>
    <|start|>developer<|message|># Instructions ... # Tools ...<|end|>   (if any)
    <|start|>user<|message|>...<|end|>
    <|start|>assistant<|channel|>final<|message|>...<|end|>
    <|start|>assistant to=functions.f<|channel|>commentary <|constrain|>json<|message|>{..}<|call|>
    <|start|>functions.f to=assistant<|channel|>commentary<|message|>...<|end|>
    <|start|>assistant                                                   (generation prompt)

Text is encoded in the same pieces as OpenAI's renderer (role, " to=...", channel name,
content separately), so token ids match what the model saw in training.
"""

from __future__ import annotations

from tandem.workers.text.harmony.builtin_tools import BUILTIN_TOOLS
from tandem.workers.text.harmony.messages import BUILTIN_TOOL_NAMES, Conversation, Message
from tandem.workers.text.harmony.typescript import render_functions_namespace, render_tools_section
from tandem.workers.text.tokenizer import Tokenizer

_CONSTRAIN_MARKER = "<|constrain|>"


def chat_stop_token_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """Ids that end an assistant turn: <|return|> (answer done) and <|call|> (tool call).

    Never <|end|>: it closes the analysis message and the model goes on to the final one.
    """
    return (tokenizer.special.return_, tokenizer.special.call)


def system_message_text(conv: Conversation) -> str:
    """Content of the system message (blank lines between sections, as harmony has):
    identity and dates, reasoning effort, built-in tools (if any), valid channels."""
    top = [conv.model_identity] if conv.model_identity else []
    top.append(f"Knowledge cutoff: {conv.knowledge_cutoff}")
    if conv.current_date is not None:
        top.append(f"Current date: {conv.current_date}")
    sections = ["\n".join(top), f"Reasoning: {conv.reasoning_effort}"]
    if conv.builtin_tools:
        sections.append(render_tools_section([BUILTIN_TOOLS[n] for n in conv.builtin_tools]))
    channels = (
        "# Valid channels: analysis, commentary, final. Channel must be included for every message."
    )
    if conv.tools:
        # Only function tools: built-in ones are called on whatever channel the model uses.
        channels += "\nCalls to these tools must go to the commentary channel: 'functions'."
    sections.append(channels)
    return "\n\n".join(sections)


def developer_message_text(conv: Conversation) -> str | None:
    """Content of the developer message, or None when there is nothing to say."""
    sections = []
    if conv.instructions is not None:
        sections += ["# Instructions", conv.instructions]
    if conv.tools:
        sections.append(render_functions_namespace(conv.tools))
    return "\n\n".join(sections) if sections else None


def _tool_author(name: str) -> str:
    """A tool result's author: "functions.NAME" unless a namespace is already given or the
    name is a built-in tool ("python" answers as "python"; a function that is itself named
    "python" must then be written "functions.python")."""
    return name if "." in name or name in BUILTIN_TOOL_NAMES else f"functions.{name}"


def render_message(msg: Message, tokenizer: Tokenizer) -> list[int]:
    """One message: <|start|>header<|message|>content<|end|> (or <|call|> for a tool call)."""
    sp = tokenizer.special
    enc = tokenizer.encode
    ids = [sp.start]
    recipient, channel, content_type = msg.recipient, msg.channel, msg.content_type
    if msg.role == "tool":
        ids += enc(_tool_author(msg.name or ""))
        recipient = recipient or "assistant"
        channel = channel or "commentary"
    else:
        ids += enc(msg.role)
        if msg.name:
            ids += enc(f":{msg.name}")
    if msg.is_tool_call:
        channel = channel or "commentary"
        content_type = content_type or "json"
    elif msg.role == "assistant":
        channel = channel or "final"
    if recipient is not None and recipient != "all":
        ids += enc(f" to={recipient}")
    if channel is not None:
        ids += [sp.channel, *enc(channel)]
    if content_type is not None and msg.constrain:
        ids += [*enc(" "), sp.constrain, *enc(content_type.removeprefix(_CONSTRAIN_MARKER))]
    elif content_type is not None:
        ids += enc(f" {content_type}")
    ids += [sp.message, *enc(msg.content)]
    ids.append(sp.call if msg.is_tool_call else sp.end)
    return ids


def _kept_messages(messages: tuple[Message, ...]) -> list[Message]:
    """Drop assistant analysis that precedes a final answer (finished turns' reasoning).

    Analysis after the last final answer belongs to the turn in progress (for example
    reasoning between tool calls) and is kept, as the model expects to see it.
    """
    last_final = max(
        (i for i, m in enumerate(messages) if m.role == "assistant" and m.channel == "final"),
        default=-1,
    )
    return [
        m
        for i, m in enumerate(messages)
        if not (i < last_final and m.role == "assistant" and m.channel == "analysis")
    ]


def render_conversation(conv: Conversation, tokenizer: Tokenizer) -> list[int]:
    """The whole prompt, ending with <|start|>assistant for the model to continue."""
    sp = tokenizer.special
    enc = tokenizer.encode
    ids = render_message(Message("system", system_message_text(conv)), tokenizer)
    developer = developer_message_text(conv)
    if developer is not None:
        ids += render_message(Message("developer", developer), tokenizer)
    for msg in _kept_messages(conv.messages):
        ids += render_message(msg, tokenizer)
    ids += [sp.start, *enc("assistant")]
    return ids
