"""A checkpoint's chat template (tokenizer_config.json `chat_template`, or chat_template.jinja), rendered the
way transformers' `apply_chat_template(..., add_generation_prompt=True)` renders it: the same sandboxed
Jinja environment (trim_blocks, lstrip_blocks, loop controls, its `tojson`, `raise_exception`,
`strftime_now`) and the same variables (the messages, the tokenizer's special tokens). Imports no torch.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from stagemesh.errors import InvalidArgument

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers aliases these for templates


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        self.source = source
        self.special_tokens = special_tokens
        self._template = _environment().from_string(source)

    @classmethod
    def from_dir(cls, path: str | Path) -> ChatTemplate | None:
        """The checkpoint's template, or None when it has none (chat is then refused, completions work)."""
        path = Path(path)
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: transformers picks "default"
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        if (path / "chat_template.jinja").is_file():
            source = (path / "chat_template.jinja").read_text()
        if not source:
            return None
        special = {key: _token_text(config[key]) for key in SPECIAL_TOKEN_KEYS if config.get(key)}
        return cls(source, special)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text; InvalidArgument when the template refuses the conversation."""
        import jinja2

        chat = [_alias_reasoning(dict(m)) for m in messages]
        try:
            return self._template.render(
                messages=chat,
                tools=kwargs.pop("tools", None),
                documents=kwargs.pop("documents", None),
                add_generation_prompt=add_generation_prompt,
                **{**self.special_tokens, **kwargs},
            )
        except (jinja2.TemplateError, TypeError, ValueError) as e:  # e.g. a content the template cannot join
            raise InvalidArgument(f"messages: the chat template refused them: {e}") from None


def _token_text(token) -> str:
    return token["content"] if isinstance(token, dict) else str(token)


def _alias_reasoning(message: dict) -> dict:
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-mask markers): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
