"""Chat messages -> the one instruction template the adapter was trained on.

The adapter learned its prompts and gate on :func:`mops.data.format_prompt`'s template
(``### Instruction:`` / ``### Input:`` / ``### Response:``), not on the base model's chat
template, so a chat is written into that template:

- ``### Instruction:`` -- the system and developer messages, then the last user message,
  in order, separated by blank lines (what to do);
- ``### Input:`` -- the earlier turns of the conversation, if any, one per line as
  ``User: ...`` / ``Assistant: ...`` (what to do it on); left out for a one-turn chat;
- the reply is generated after ``### Response:``.

So a one-turn chat with a single user message is exactly a training prompt without input.
The last message must come from the user. Content given as parts must be text parts.
"""

from __future__ import annotations

from mops.data import InstructionRecord, format_prompt
from mops.serve.errors import bad_request
from mops.serve.schemas import ChatMessage

SPEAKERS = {"user": "User", "assistant": "Assistant"}


def message_text(message: ChatMessage, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for j, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise bad_request(f"messages[{index}].content[{j}]: content of type {part.type!r}; this model reads "
                              "text parts only", f"messages[{index}].content[{j}].type")
        texts.append(part.text)
    return "".join(texts)


def chat_prompt(messages: list[ChatMessage]) -> str:
    """The template text for a conversation whose last message is the user's."""
    if messages[-1].role != "user":
        raise bad_request(f"the last message is from {messages[-1].role!r}; it must be the user's message to reply to",
                          f"messages[{len(messages) - 1}].role")
    last = len(messages) - 1
    instruction = [message_text(m, i) for i, m in enumerate(messages) if m.role in ("system", "developer")]
    instruction.append(message_text(messages[last], last))
    turns = [f"{SPEAKERS[m.role]}: {message_text(m, i)}" for i, m in enumerate(messages[:last]) if m.role in SPEAKERS]
    record = InstructionRecord("\n\n".join(t for t in instruction if t), "\n".join(turns), "", "", "chat")
    return format_prompt(record)
