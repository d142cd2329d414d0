"""Tokenizers (HF `tokenizers` BPE from GGUF or tokenizer.json; SentencePiece), chat templates and
incremental detokenization.

The GGUF vocabularies are rebuilt as `tokenizers` objects that behave like the model's original HF
tokenizer: byte-level BPE with the pre-tokenizer named in `tokenizer.ggml.pre`, or SentencePiece-style
BPE with byte fallback for `llama` vocabularies.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import jinja2
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from jaxserve.errors import UserError

META_FILE = "tokenizer_meta.json"

# Pre-tokenizer regexes of the BPE vocabularies llama.cpp names in `tokenizer.ggml.pre`.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_CONTROL, _GGUF_USER_DEFINED, _GGUF_BYTE = 3, 4, 6


class _Backend(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str: ...
    def token_to_id(self, token: str) -> int | None: ...
    def id_to_token(self, token_id: int) -> str | None: ...
    def save(self, folder: Path) -> None: ...
    def grammar_vocabulary(self, tokenizer: Tokenizer) -> Any: ...


class _HFBackend:
    def __init__(self, tk: tokenizers.Tokenizer) -> None:
        self.tk = tk

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tk.id_to_token(token_id)

    def save(self, folder: Path) -> None:
        self.tk.save(str(folder / "tokenizer.json"))

    def grammar_vocabulary(self, tokenizer: Tokenizer) -> Any:
        return self.tk.to_str()


class _SentencePieceBackend:
    """A SentencePiece `.model`; special-token strings in text are split out first, as HF does."""

    def __init__(self, model_file: Path) -> None:
        import sentencepiece

        self.model_bytes = model_file.read_bytes()
        self.sp = sentencepiece.SentencePieceProcessor(model_proto=self.model_bytes)
        self.special = {
            self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size()) if self.sp.is_control(i)
        }

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece, special_id in _split_special(text, self.special):
            ids.extend([special_id] if special_id is not None else self.sp.encode(piece))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        if not skip_special_tokens:
            out, run = [], []
            for i in ids:
                if self.sp.is_control(i):
                    out.append(self.sp.decode(run))
                    out.append(self.sp.id_to_piece(i))
                    run = []
                else:
                    run.append(i)
            return "".join(out) + self.sp.decode(run)
        return self.sp.decode([i for i in ids if not self.sp.is_control(i)])

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def id_to_token(self, token_id: int) -> str | None:
        return self.sp.id_to_piece(token_id)

    def save(self, folder: Path) -> None:
        (folder / "tokenizer.model").write_bytes(self.model_bytes)

    def grammar_vocabulary(self, tokenizer: Tokenizer) -> Any:
        from llguidance import TokenizerWrapper

        return TokenizerWrapper(_SentencePieceVocabulary(self.sp, tokenizer))


class _SentencePieceVocabulary:
    """A SentencePiece vocabulary as llguidance's `TokenizerWrapper` reads it: each token's bytes
    ('\u2581' as a space, byte pieces as their byte; control and unknown pieces special)."""

    def __init__(self, sp: Any, tokenizer: Tokenizer) -> None:
        self.sp, self.tokenizer = sp, tokenizer
        self.eos_token_id = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
        self.bos_token_id = tokenizer.bos_token_id
        self.tokens: list[bytes] = []
        self.special_token_ids: list[int] = []
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if sp.is_control(i) or sp.is_unknown(i):
                self.special_token_ids.append(i)
                self.tokens.append(piece.encode())
            elif sp.is_byte(i):
                self.tokens.append(bytes([int(piece[3:5], 16)]))
            else:
                self.tokens.append(piece.replace("\u2581", " ").encode())

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("text only")
        return self.tokenizer.encode(text, add_special_tokens=False)


def _split_special(text: str, special: Mapping[str, int]) -> list[tuple[str, int | None]]:
    """Split text into plain runs and special tokens (longest match first)."""
    names = sorted((s for s in special if s), key=len, reverse=True)
    out: list[tuple[str, int | None]] = []
    start = i = 0
    while i < len(text):
        hit = next((s for s in names if text.startswith(s, i)), None)
        if hit is None:
            i += 1
            continue
        if start < i:
            out.append((text[start:i], None))
        out.append((hit, special[hit]))
        i = start = i + len(hit)
    if start < len(text):
        out.append((text[start:], None))
    return out


class Tokenizer:
    """Text <-> token ids for one model, with its special tokens and chat template."""

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_token_id: int | None,
        eos_token_ids: tuple[int, ...],
        add_bos: bool,
        chat_template: str | None,
        add_eos: bool = False,
    ) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids  # every id generation stops on; the first is the EOS `add_eos` appends
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.chat_template = chat_template
        self._template: jinja2.Template | None = None

    @property
    def bos_token(self) -> str:
        return "" if self.bos_token_id is None else self.backend.id_to_token(self.bos_token_id) or ""

    @property
    def eos_token(self) -> str:
        return self.backend.id_to_token(self.eos_token_ids[0]) or "" if self.eos_token_ids else ""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; with `add_special_tokens`, a BOS is prepended and an EOS appended where the model's
        metadata asks."""
        ids = self.backend.encode(text)
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        if add_special_tokens and self.add_eos and self.eos_token_ids:
            ids = [*ids, self.eos_token_ids[0]]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens)

    def grammar_tokenizer(self) -> Any:
        """The vocabulary as llguidance's `LLTokenizer` takes it (for constrained decoding)."""
        return self.backend.grammar_vocabulary(self)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, continue_final_message: bool = False, **kwargs: Any
    ) -> str:
        """Render messages with the model's template, following HF's `apply_chat_template` conventions:
        `continue_final_message` leaves the last message open (the text ends where its content does),
        so the model continues it."""
        if not self.chat_template:
            raise UserError("this model has no chat template; use a plain prompt")
        if continue_final_message and add_generation_prompt:
            raise UserError("continue_final_message and add_generation_prompt cannot both be true")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        try:
            text = self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **kwargs,
            )
        except jinja2.TemplateError as e:
            raise UserError(f"chat template error: {e}") from None
        if continue_final_message:
            final = str(messages[-1].get("content") or "").strip() if messages else ""
            if not final or final not in text:
                raise UserError("continue_final_message needs a final message with content that the template renders")
            text = text[: text.rindex(final) + len(final)]
        return text

    def encode_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        """Token ids of a rendered conversation; the template supplies any BOS itself."""
        return self.encode(self.apply_chat_template(messages, **kwargs), add_special_tokens=False)

    # ---- persistence -------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        self.backend.save(folder)
        meta = {
            "bos_token_id": self.bos_token_id,
            "eos_token_ids": list(self.eos_token_ids),
            "add_bos": self.add_bos,
            "add_eos": self.add_eos,
            "chat_template": self.chat_template,
        }
        (folder / META_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False))

    @classmethod
    def load(cls, folder: Path) -> Tokenizer:
        """Our checkpoint's tokenizer (tokenizer.json or tokenizer.model, plus tokenizer_meta.json)."""
        meta = json.loads((folder / META_FILE).read_text())
        return cls(
            _backend_in(folder),
            bos_token_id=meta["bos_token_id"],
            eos_token_ids=tuple(meta["eos_token_ids"]),
            add_bos=meta["add_bos"],
            chat_template=meta["chat_template"],
            add_eos=meta.get("add_eos", False),
        )

    @classmethod
    def from_hf(cls, folder: Path) -> Tokenizer:
        """A Hugging Face folder, as transformers reads it: tokenizer.json or else tokenizer.model
        (SentencePiece); BOS, EOS, `add_bos_token` and `add_eos_token` from tokenizer_config.json
        (tokens as strings or `AddedToken` dicts); every EOS id of generation_config.json (an int or a
        list, as Llama 3 and Qwen write) to stop on as well; the chat template from chat_template.jinja
        (transformers 5), or else tokenizer_config.json."""
        backend = _backend_in(folder)
        conf = _json_file(folder / "tokenizer_config.json")
        sentencepiece = isinstance(backend, _SentencePieceBackend)

        def token_id(key: str) -> int | None:
            if key not in conf and sentencepiece:  # LlamaTokenizer's defaults: the model's own <s> and </s>
                i = backend.sp.bos_id() if key == "bos_token" else backend.sp.eos_id()
                return i if i >= 0 else None
            value = conf.get(key)
            text = value.get("content") if isinstance(value, dict) else value
            return backend.token_to_id(text) if text else None

        bos_id, eos_id = token_id("bos_token"), token_id("eos_token")
        eos_ids = [] if eos_id is None else [eos_id]
        gen_eos = _json_file(folder / "generation_config.json").get("eos_token_id")
        for i in [gen_eos] if isinstance(gen_eos, int) else (gen_eos or []):
            if isinstance(i, int) and not isinstance(i, bool) and i not in eos_ids:
                eos_ids.append(i)
        template = conf.get("chat_template")
        if isinstance(template, list):  # named templates: take the default
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (folder / "chat_template.jinja").exists():  # transformers: the file takes priority over the config
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        add_bos, add_eos = conf.get("add_bos_token"), conf.get("add_eos_token")
        if sentencepiece:  # LlamaTokenizer's defaults: BOS, no EOS
            add_bos = bos_id is not None if add_bos is None else add_bos
        elif add_bos is None or add_eos is None:  # what tokenizer.json's post-processor adds (Llama 3 prepends BOS)
            plain, full = backend.encode("a"), backend.tk.encode("a").ids
            if add_bos is None:
                add_bos = bos_id is not None and full[:1] == [bos_id] != plain[:1]
            if add_eos is None:
                add_eos = eos_id is not None and full[-1:] == [eos_id] != plain[-1:]
        return cls(backend, bos_token_id=bos_id, eos_token_ids=tuple(eos_ids), add_bos=bool(add_bos), chat_template=template,
                   add_eos=bool(add_eos))

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """From `tokenizer.ggml.*` metadata."""
        kind = meta.get("tokenizer.ggml.model")
        tokens = list(meta.get("tokenizer.ggml.tokens", []))
        if not tokens:
            raise UserError("the GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
        types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
        if kind == "gpt2":
            tk = _gguf_byte_level_bpe(tokens, list(meta.get("tokenizer.ggml.merges", [])), meta.get("tokenizer.ggml.pre"))
        elif kind == "llama":
            tk = _gguf_sentencepiece_bpe(
                tokens, list(meta.get("tokenizer.ggml.scores", [])), types, meta.get("tokenizer.ggml.add_space_prefix", True)
            )
        else:
            raise UserError(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)")
        special = [
            tokenizers.AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types)
            if ty in (_GGUF_CONTROL, _GGUF_USER_DEFINED)
        ]
        tk.add_special_tokens(special)
        bos = meta.get("tokenizer.ggml.bos_token_id")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        eos_ids = [int(eos)] if eos is not None else []
        eot = meta.get("tokenizer.ggml.eot_token_id")
        if eot is not None and int(eot) not in eos_ids:
            eos_ids.append(int(eot))
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
        return cls(
            _HFBackend(tk),
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=tuple(eos_ids),
            add_bos=add_bos,
            chat_template=meta.get("tokenizer.chat_template"),
            add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        )


def _json_file(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    return value if isinstance(value, dict) else {}


def _backend_in(folder: Path) -> _Backend:
    if (folder / "tokenizer.json").exists():
        return _HFBackend(tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")))
    if (folder / "tokenizer.model").exists():
        return _SentencePieceBackend(folder / "tokenizer.model")
    raise UserError(f"no tokenizer.json or tokenizer.model in {folder}")


def _gguf_byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> tokenizers.Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre == "llama-bpe"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre == "smollm":
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    elif pre in ("llama-bpe", "llama3", "qwen2"):
        regex = _QWEN2_REGEX if pre == "qwen2" else _LLAMA3_REGEX
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(tokenizers.Regex(regex), behavior="isolated"), byte_level]
        )
    else:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return tk


def _gguf_sentencepiece_bpe(
    tokens: list[str], scores: list[float], types: list[int], add_space_prefix: bool
) -> tokenizers.Tokenizer:
    """SentencePiece BPE vocab -> `tokenizers` BPE with byte fallback; merges ranked by piece score."""
    vocab = {t: i for i, t in enumerate(tokens)}
    scores = scores or [0.0] * len(tokens)
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, score, ty in zip(tokens, scores, types):
        if ty in (_GGUF_CONTROL, _GGUF_BYTE) or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    unk = next((t for t, ty in zip(tokens, types) if ty == 2), None)
    tk = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=[(l, r) for *_, l, r in ranked], unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    norm = [normalizers.Replace(" ", "\u2581")]
    if add_space_prefix:
        norm.insert(0, normalizers.Prepend("\u2581"))
    tk.normalizer = normalizers.Sequence(norm)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tk.decoder = decoders.Sequence(steps)
    return tk


def _compile_template(source: str) -> jinja2.Template:
    """HF's template environment: sandboxed, trim/lstrip blocks, `raise_exception`, `tojson`, `strftime_now`."""

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"chat template has a syntax error: {e}") from None


class IncrementalDetokenizer:
    """Turns a growing token list into text pieces, never splitting a UTF-8 character.

    Decodes a sliding window (prefix_offset..end) and emits what it adds beyond (prefix_offset..read_offset),
    holding back text that ends in U+FFFD (an incomplete byte sequence). The pieces concatenate to the
    full decode.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _pending(self) -> str:
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        full = decode(self.ids[self.prefix_offset :], self.skip_special_tokens)
        return full[len(prefix) :]

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (maybe empty)."""
        self.ids.append(token_id)
        new = self._pending()
        if not new or new.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new

    def flush(self) -> str:
        """Whatever is still held back (at the end of generation)."""
        new = self._pending()
        self.prefix_offset = self.read_offset = len(self.ids)
        return new
