"""The model directory's tokenizer (``tokenizer.json``) and chat template.

The chat template is read from ``chat_template.jinja`` (transformers 5) or from ``tokenizer_config.json``'s
``chat_template`` field (Hub checkpoints), and rendered in a sandboxed Jinja environment.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ConfigError


def _token_content(tok: Any) -> str | None:
    if tok is None:
        return None
    if isinstance(tok, dict):
        return tok.get("content")
    return str(tok)


class Tokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        d = Path(model_dir)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"{path}: not found; parca reads the fast-tokenizer file tokenizer.json")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception subclass on malformed files
            raise ConfigError(f"{path}: cannot parse tokenizer ({e})") from None
        cfg: dict[str, Any] = {}
        cfg_path = d / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{cfg_path}: not valid JSON ({e})") from None
        self.bos_token = _token_content(cfg.get("bos_token"))
        self.eos_token = _token_content(cfg.get("eos_token"))
        self.pad_token = _token_content(cfg.get("pad_token"))
        self.add_bos = bool(cfg.get("add_bos_token", False))
        template = None
        jinja = d / "chat_template.jinja"
        if jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        elif cfg.get("chat_template"):
            template = cfg["chat_template"]
            if isinstance(template, list):  # named templates: take "default"
                named = {t.get("name"): t.get("template") for t in template}
                template = named.get("default") or next(iter(named.values()))
        self.chat_template: str | None = template

    # ---- ids ------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``. With ``add_special_tokens`` the tokenizer's post-processor runs (e.g. BOS),
        and BOS is prepended when tokenizer_config.json asks for it and the post-processor did not."""
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- chat -------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ConfigError("this model's tokenizer has no chat template (chat_template.jinja or "
                              "tokenizer_config.json 'chat_template'); drop --chat or use a chat model")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg: str) -> None:
            raise ConfigError(f"chat template: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent, ensure_ascii=False)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            )
        except TemplateError as e:
            raise ConfigError(f"chat template failed to render: {e}") from None

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        # The rendered template already holds BOS where the model wants it: add no special tokens.
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas without splitting multi-byte characters."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        full = self.tok.decode(self.ids)
        if full.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        delta = full[len(self.text):] if full.startswith(self.text) else full
        self.text = full
        return delta
