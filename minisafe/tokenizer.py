"""Tokenizer: a Hugging Face tokenizer.json through `tokenizers`, plus the chat and Alpaca prompt templates."""

from __future__ import annotations

import json
from datetime import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as FastTokenizer

from minisafe.errors import CheckpointError, DataError
from minisafe.io import read_json

# The no-input Alpaca template, used by the Safety Layers paper for every model. Its last token is the ':' of
# "### Response:", whose layer outputs the cosine analysis reads.
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
TEMPLATES = ("chat", "alpaca")
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


class Tokenizer:
    """context: the model's length in tokens (max_position_embeddings); a longer prompt is refused (see prompt_ids).
    template_source: the file the chat template came from, named when the template fails."""

    def __init__(self, tokenizer: FastTokenizer, config: dict[str, Any], chat_template: str | None,
                 extra_eos_ids: list[int] = (), context: int | None = None, template_source: str = "chat_template"):
        self.tok, self.config, self.chat_template = tokenizer, config, chat_template
        self.context, self.template_source = context, template_source
        self.special = {key: _token_text(config.get(key)) for key in SPECIAL_TOKEN_KEYS}
        self.eos_token_ids = list(dict.fromkeys(
            ([self.token_id(self.special["eos_token"])] if self.special["eos_token"] else []) + list(extra_eos_ids)))
        pad = self.special["pad_token"] or self.special["eos_token"]
        self.pad_token_id = self.token_id(pad) if pad else 0
        self._template = _compile(chat_template, template_source) if chat_template else None

    @classmethod
    def from_dir(cls, path: str | Path, extra_eos_ids: list[int] = (), context: int | None = None) -> Tokenizer:
        """Read tokenizer.json, tokenizer_config.json and (if present) chat_template.jinja from a model directory."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.exists():
            raise CheckpointError(f"{file}: missing; minisafe reads the fast-tokenizer file tokenizer.json")
        try:
            tok = FastTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise CheckpointError(f"{file}: not a valid tokenizer.json ({e})") from None
        config = read_json(path / "tokenizer_config.json", CheckpointError) or {}
        source = path / "tokenizer_config.json"
        template = config.get("chat_template")
        if (path / "chat_template.jinja").exists():
            source = path / "chat_template.jinja"
            template = source.read_text()
        if isinstance(template, list):  # several named templates: the default one is the chat template
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        if template is not None and not isinstance(template, str):
            raise CheckpointError(f"{source}: chat_template must be a string (a Jinja template), got {template!r:.60}")
        return cls(tok, config, template, extra_eos_ids, context, str(source))

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (chat template included) into a directory."""
        path = Path(path)
        self.tok.save(str(path / "tokenizer.json"))
        config = {**self.config, "chat_template": self.chat_template} if self.chat_template else dict(self.config)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))

    def token_id(self, token: str) -> int:
        token_id = self.tok.token_to_id(token)
        if token_id is None:
            raise CheckpointError(f"special token {token!r} from tokenizer_config.json is not in the vocabulary")
        return token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The checkpoint's own chat template, rendered with the variables transformers passes."""
        if self._template is None:
            raise CheckpointError("this tokenizer has no chat_template; use the alpaca template instead")
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **{k: v for k, v in self.special.items() if v})
        except Exception as e:  # the template is code from the checkpoint: whatever it raises is the template's fault
            reason = str(e) if isinstance(e, jinja2.TemplateError) else f"{type(e).__name__}: {e}"
            raise CheckpointError(f"{self.template_source}: the chat_template failed to render: {reason}") from None

    def format_prompt(self, instruction: str, template: str = "chat") -> str:
        """The text the model sees for one user instruction, up to where its answer starts."""
        if template == "chat":
            return self.render_chat([{"role": "user", "content": instruction}])
        if template == "alpaca":
            return ALPACA_TEMPLATE.format(instruction=instruction)
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")

    def prompt_ids(self, instruction: str, template: str = "chat", label: str = "prompt") -> list[int]:
        """Token ids of format_prompt. A chat template writes its own BOS; the Alpaca text gets the tokenizer's.

        A prompt longer than the model's context is a DataError (`label` names it): cutting it would change what is
        measured, silently.
        """
        ids = self.encode(self.format_prompt(instruction, template), add_special_tokens=template == "alpaca")
        if self.context is not None and len(ids) > self.context:
            raise DataError(f"{label} ({_clip(instruction)!r}) is {len(ids)} tokens in the {template} template, longer "
                            f"than the model's context of {self.context} (max_position_embeddings); shorten or drop it")
        return ids

    def prompts_ids(self, prompts: Sequence[str], template: str, source: str | Path) -> list[list[int]]:
        """prompt_ids of every prompt of a set; an error names the set (`source`) and the prompt's 0-based number."""
        return [self.prompt_ids(prompt, template, f"{source}: prompt {number}")
                for number, prompt in enumerate(prompts)]

    def pad_left(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad token id lists into input_ids [B, T] and attention_mask [B, T] (1 = real token)."""
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            if seq:
                ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
                mask[row, width - len(seq):] = 1
        return ids, mask

    def batch_encode(self, texts: list[str], add_special_tokens: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode texts into left-padded input_ids and attention_mask."""
        return self.pad_left([e.ids for e in self.tok.encode_batch(texts, add_special_tokens=add_special_tokens)])


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _clip(text: str, limit: int = 60) -> str:
    """The start of a text on one line, for an error message."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _compile(template: str, source: str) -> jinja2.Template:
    """A sandboxed jinja2 environment with the settings and helpers transformers gives chat templates."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise CheckpointError(f"{source}: the chat_template is not valid Jinja (template line {e.lineno}: "
                              f"{e.message})") from None

