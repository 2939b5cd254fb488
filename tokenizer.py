"""Tokenizers and chat rendering for SFT: Llama 3.x, Qwen3, SentencePiece (Llama 2 style) and a built-in byte tokenizer.

    tok = load_tokenizer(".cache/test_files/qwen3")       # or "byte", a tokenizer.model, tokenizer.json, vocab.json dir
    ids = tok.encode("Hello")                             # special-token strings in text stay plain text
    ids, mask = tok.render_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    print(visualize(ids, mask, tok))                      # supervised tokens highlighted

Every byte-level BPE (Llama 3 tokenizer.model, HF tokenizer.json, vocab.json + merges.txt) is converted to one
tiktoken Encoding: ranks are the vocab ids (the vocab order is the merge order for these files; checked at load),
bytes come through the GPT-2 byte<->unicode map, the pre-tokenizer regex is read from the file. tiktoken keeps a
pre-token that is a vocab entry whole (HF's ignore_merges=true, Meta's tokenizer.model); a tokenizer.json without it
(or vocab.json + merges.txt) applies merges only, so the vocab entries its merges never build are taken out of the
ranks (decodable, never produced). Ids equal HF `tokenizers` exactly (tests/test_tokenizer.py proves it on GSM8K and
a hard-strings corpus).

End tokens, explicitly (Llama 3 base vs Instruct and Qwen3 base vs chat differ only here):
  eos_id   - tokenizer_config.json `eos_token` (Llama 3.2 base: <|end_of_text|>, Instruct: <|eot_id|>; Qwen3 base:
             <|endoftext|>, chat: <|im_end|>); without a config, the family's end-of-text token.
             encode(eos=True) appends it.
  eot_id   - the chat end-of-turn token (<|eot_id|> or <|im_end|>); it closes every rendered turn and is supervised.
  stop_ids - everything that ends generation: eos_id, eot_id, the end-of-text token, and generation_config.json
             eos_token_id (int or list).
  bos_id   - tokenizer_config.json `bos_token` (None for Qwen: encode(bos=True) then adds nothing, as Qwen has no BOS).

Chat formats (render_chat -> (ids, mask), built from special-token ids, never by re-tokenizing rendered text):
  "llama3" (Llama 3.1/3.2 Instruct; kwarg date_string="26 Jul 2024"), "qwen3" (ChatML with think blocks; kwarg
  enable_thinking=True), "chatml" (generic; the byte tokenizer's format), "jinja" (the model's own chat_template,
  mask found by rendering prefixes of the conversation). Text between two special tokens is encoded as ONE string,
  exactly like HF tokenizes the rendered text, so ids equal apply_chat_template(tokenize=True). One deliberate
  difference: special-token strings inside message content stay text (HF would turn them into control tokens); the
  "jinja" format tokenizes the rendered text, so there they do become control tokens. Non-special added tokens (Qwen's
  <think>, <tool_call>) are matched in text, as HF does. The llama3 default date is the template's fallback
  "26 Jul 2024" (transformers passes strftime_now, i.e. today): pass date_string= to change it.
Tool calling (render_chat(..., tools=[function schemas])): messages may have role "tool" (and "ipython" for llama3) and
assistant "tool_calls"; qwen3 and llama3 render them byte-for-byte like their templates (qwen3: "# Tools" system
block, <tool_call> blocks, tool responses grouped in one user turn; llama3: tools in the first user message unless
tools_in_user_message=False, ONE call per assistant message as {"name", "parameters"}, tool turns under "ipython").
Tool calls are supervised like assistant content; tools and tool responses never are (except train_on="all").
"chatml" has no tool format and refuses them; "jinja" passes tools to the template.

Tests: python3 -m pytest -q -x tests/test_tokenizer.py    Benchmark: python3 bench/tokenize.py
"""
import base64
import heapq
import json
import os
import re
import shutil
import unicodedata
from bisect import bisect_right
from pathlib import Path

BYTE_SPECIALS = {"<|bos|>": 256, "<|eos|>": 257, "<|pad|>": 258, "<|im_start|>": 259, "<|im_end|>": 260}
# Meta's llama3 tokenizer.py: the split regex and the 256 special tokens that follow the 128,000 ranks
LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                   "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                   "<|eot_id|>", "<|python_tag|>"] + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-2 regex after a Digits(individual_digits=True) pre-split (SmolLM2): a digit is always its own piece, and a
# whitespace run before a digit stays whole (the Digits split ends the piece there, so `\s+(?!\S)` sees its end).
GPT2_DIGITS_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""
QWEN2_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
END_OF_TEXT = ("<|end_of_text|>", "<|endoftext|>", "<|eos|>")
CHAT_FORMATS = ("llama3", "qwen3", "chatml", "jinja")
TRAIN_ON = ("assistant", "last_assistant", "all")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "chat_template.jinja")


# The Llama 3.1+/3.2 template's tool guidance (llama3.2-instruct.jinja), verbatim
LLAMA3_TOOL_FORMAT = ('Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
                      'value}.Do not use variables.\n\n')
LLAMA3_TOOLS_USER = ("Given the following functions, please respond with a JSON for a function call with its proper "
                     "arguments that best answers the given prompt.\n\n" + LLAMA3_TOOL_FORMAT)
LLAMA3_TOOLS_SYSTEM = ("You have access to the following functions. To call a function, please respond with JSON for a "
                       "function call." + LLAMA3_TOOL_FORMAT)
# qwen3.jinja's "# Tools" system block, around the tool schemas (one tojson line each)
QWEN3_TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
                    "with function signatures within <tools></tools> XML tags:\n<tools>")
QWEN3_TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
                    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                    "<args-json-object>}\n</tool_call>")


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' chat-template `tojson` filter (utils/chat_template_utils.py): plain json.dumps, non-ASCII kept."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode char map used by every byte-level BPE vocab file."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_MARKER = "\x00assistant-content\x00"  # stands for the content of a conversation's first (assistant) turn


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_utf8(text: str):
    """A lone surrogate ("\\ud800" escaped in JSON) has no UTF-8 bytes: tiktoken would silently encode it as U+FFFD
    and SentencePiece drop it, so the text trained on would not be the one in the data."""
    if not text.isascii() and (m := _SURROGATE.search(text)):
        raise ValueError(f"text holds a lone surrogate {m.group()!r} at character {m.start()}, which has no UTF-8 "
                         "encoding (a broken \\uXXXX escape in the data?)")


class Tokenizer:
    """One API over three backends: a tiktoken Encoding, a SentencePiece model, or plain UTF-8 bytes."""

    def __init__(self, backend, model, *, special: dict[str, int], matched: dict[str, int] | None = None,
                 vocab_size: int, bos: str | None, eos: str | None, pad: str | None, extra_stop=(),
                 chat_format: str | None = None, chat_template: str | None = None, nfc=False, files=(),
                 loaded_from=()):
        self.backend, self.model = backend, model       # "byte" | "tiktoken" | "sentencepiece"
        # what decides the ids: the files read (the data cache hashes them; the BPE mode follows from them). `files`
        # is every tokenizer file of the directory, which save() copies: a directory's tokenizer.model and
        # tokenizer.json are both there, whichever was read, and they tokenize differently (merges only: " Việt" is
        # never one token)
        self.loaded_from = list(loaded_from)
        self.special = special                          # control tokens: never produced from text by encode()
        self.matched = matched or {}                    # non-special added tokens (<think>): HF matches them in text
        self._allowed = set(self.matched)
        self.id_to_special = {i: s for s, i in {**special, **self.matched}.items()}
        self.vocab_size, self.nfc, self.files, self.chat_template = vocab_size, nfc, list(files), chat_template
        self.bos_id, self.pad_id = self._id(bos), self._id(pad)
        self.eos_id = self._id(eos if eos is not None else next((s for s in END_OF_TEXT if s in special), None))
        if self.eos_id is None:
            raise ValueError(f"no eos token found in {self.files or backend}: set eos_token in tokenizer_config.json")
        self.eot_id = self._id(next((s for s in ("<|eot_id|>", "<|im_end|>") if s in special), None))
        end_of_text = self._id(next((s for s in END_OF_TEXT if s in special), None))
        stops = [self.eos_id, self.eot_id, end_of_text, *extra_stop]
        self.stop_ids = list(dict.fromkeys(i for i in stops if i is not None))
        if chat_format is not None and chat_format not in CHAT_FORMATS:
            raise ValueError(f"unknown chat_format {chat_format!r}; expected one of {CHAT_FORMATS}")
        need = {"llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                "qwen3": ["<|im_start|>", "<|im_end|>"], "chatml": ["<|im_start|>", "<|im_end|>"]}.get(chat_format, [])
        if missing := [s for s in need if s not in special]:
            raise ValueError(f"chat_format {chat_format!r} needs special tokens {missing} that this tokenizer lacks")
        if chat_format == "jinja" and not chat_template:
            raise ValueError("chat_format 'jinja' needs a chat_template (tokenizer_config.json or chat_template.jinja)")
        self.chat_format = chat_format
        self._jinja = None  # compiled chat_template, on first use

    def _id(self, token: str | None) -> int | None:
        if token is None:
            return None
        if token in self.special:
            return self.special[token]
        if self.backend == "sentencepiece" and self.model.piece_to_id(token) != self.model.unk_id():
            return self.model.piece_to_id(token)
        raise ValueError(f"token {token!r} (from the tokenizer config) is not in the vocabulary of {self.files}")

    # ---------------------------------------------------------------- plain text
    def _encode(self, text: str) -> list[int]:
        if self.backend == "byte":
            return list(text.encode("utf-8"))
        _check_utf8(text)
        if self.backend == "sentencepiece":
            return self.model.encode(text)
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        if self.matched:  # only the non-special added tokens are recognised in text; the rest is ordinary text
            return self.model.encode(text, allowed_special=self._allowed, disallowed_special=())
        return self.model.encode_ordinary(text)

    def encode(self, text: str, bos=False, eos=False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        return self._wrap(self._encode(text), bos, eos)

    def encode_batch(self, texts, bos=False, eos=False, num_threads=None) -> list[list[int]]:
        """Encode many texts on all cores (tiktoken releases the GIL in Rust and runs a thread pool)."""
        texts = list(texts)
        if (bad := next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)) is not None:
            raise ValueError(f"encode_batch: texts[{bad}] is a {type(texts[bad]).__name__}, expected str")
        n = num_threads or os.cpu_count() or 1
        for t in texts:
            _check_utf8(t)
        if self.backend == "tiktoken":
            if self.nfc:
                texts = [t if unicodedata.is_normalized("NFC", t) else unicodedata.normalize("NFC", t) for t in texts]
            if self.matched:
                out = self.model.encode_batch(texts, num_threads=n, allowed_special=self._allowed,
                                              disallowed_special=())
            else:
                out = self.model.encode_ordinary_batch(texts, num_threads=n)
        elif self.backend == "sentencepiece":
            out = self.model.encode(texts, num_threads=n)
        else:
            out = [self._encode(t) for t in texts]
        if (bos and self.bos_id is not None) or eos:
            out = [self._wrap(ids, bos, eos) for ids in out]
        return out

    def _wrap(self, ids, bos, eos):
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if bad := [i for i in ids if not 0 <= i < self.vocab_size]:
            raise ValueError(f"decode: ids {bad[:5]} out of range [0, {self.vocab_size})")
        if self.backend == "tiktoken":
            return self.model.decode(ids)  # errors="replace": a cut multi-byte char decodes to U+FFFD
        if self.backend == "sentencepiece":
            return self.model.decode(ids)
        out = bytearray()
        for i in ids:
            out += bytes([i]) if i < 256 else self.id_to_special[i].encode()
        return out.decode("utf-8", errors="replace")

    def _token_bytes(self, i: int) -> int:
        return 1 if self.backend == "byte" else len(self.model.decode_single_token_bytes(i))

    # ---------------------------------------------------------------- chat
    def render_chat(self, messages, add_generation_prompt=False, train_on="assistant", tools=None, **template_kwargs):
        """(ids, mask): mask[i] = 1 iff ids[i] is supervised. train_on: "assistant" (each assistant turn's content,
        tool calls and end-of-turn token), "last_assistant" (only the last one), "all" (every token, prompt included).
        tools: function schemas, as apply_chat_template(tools=...) takes them.
        A conversation without an assistant turn gives an all-zero mask (callers must check `any(mask)`)."""
        if train_on not in TRAIN_ON:
            raise ValueError(f"unknown train_on {train_on!r}; expected one of {TRAIN_ON}")
        # OpenAI-style data writes "content": null (or no content) beside tool_calls; the templates need a string,
        # and "" renders the same
        messages = [dict(m, content="") if isinstance(m, dict) and m.get("content") is None and m.get("tool_calls")
                    else m for m in messages] if isinstance(messages, (list, tuple)) else messages
        _check_messages(messages, self.chat_format, tools)
        known = {"llama3": {"date_string", "tools_in_user_message"}, "qwen3": {"enable_thinking"},
                 "chatml": set()}.get(self.chat_format)
        if known is not None and (unknown := set(template_kwargs) - known):
            raise ValueError(f"chat_format {self.chat_format!r} got unknown kwargs {sorted(unknown)}; "
                             f"it takes {sorted(known)}")
        if self.chat_format == "llama3":
            segs = self._llama3(messages, add_generation_prompt, tools, **template_kwargs)
        elif self.chat_format == "qwen3":
            segs = self._qwen3(messages, add_generation_prompt, tools, **template_kwargs)
        elif self.chat_format == "chatml":
            segs = self._chatml(messages, add_generation_prompt)
        elif self.chat_format == "jinja":
            segs = self._jinja_segments(messages, add_generation_prompt, tools=tools, **template_kwargs)
        else:
            raise ValueError(f"tokenizer from {self.files} has no chat format: pass chat_format= to load_tokenizer")
        last = max((turn for _, turn in segs), default=-1)
        keep = {"assistant": lambda t: t >= 0, "last_assistant": lambda t: t >= 0 and t == last,
                "all": lambda t: True}[train_on]
        return self._encode_segments([(x, keep(t)) for x, t in segs])

    def _encode_segments(self, segs):
        """segs: (special id | text, supervised). Consecutive texts are encoded as ONE string (as HF encodes the rendered
        chat); a token is supervised when its first byte lies in a supervised text piece."""
        ids, mask, run = [], [], []

        def flush():
            if not run:
                return
            if self.backend == "sentencepiece":  # no byte offsets: encode pieces one by one
                for text, m in run:
                    piece = self._encode(text)
                    ids.extend(piece), mask.extend([int(m)] * len(piece))
            else:
                toks = self._encode("".join(t for t, _ in run))
                if len({m for _, m in run}) == 1:
                    mask.extend([int(run[0][1])] * len(toks))
                else:
                    norm = (lambda s: unicodedata.normalize("NFC", s)) if self.nfc else (lambda s: s)
                    starts, pos = [], 0
                    for text, _ in run:
                        starts.append(pos)
                        pos += len(norm(text).encode("utf-8"))
                    pos = 0
                    for t in toks:
                        mask.append(int(run[bisect_right(starts, pos) - 1][1]))
                        pos += self._token_bytes(t)
                ids.extend(toks)
            run.clear()

        for x, m in segs:
            if isinstance(x, int):
                flush()
                ids.append(x), mask.append(int(m))
            elif x:
                run.append((x, m))
        flush()
        return ids, mask

    # Each format builds segments (special id | text, turn) with turn = index of the assistant turn the piece is
    # supervised for, -1 for prompt. Comments quote the HF template lines they replicate.
    def _llama3(self, messages, add_generation_prompt, tools=None, date_string="26 Jul 2024",
                tools_in_user_message=True):
        S = self.special
        head = lambda role: [(S["<|start_header_id|>"], -1), (role, -1), (S["<|end_header_id|>"], -1), ("\n\n", -1)]
        eot = lambda t: (S["<|eot_id|>"], t)
        segs = [(self.bos_id, -1)] if self.bos_id is not None else []
        system = ""
        if messages[0]["role"] == "system":  # system_message = messages[0]['content']|trim
            system, messages = messages[0]["content"].strip(), messages[1:]
        functions = "".join(tojson(t, indent=4) + "\n\n" for t in tools or [])  # t | tojson(indent=4) + "\n\n"
        if tools is not None and not tools_in_user_message:
            system = LLAMA3_TOOLS_SYSTEM + functions + system
        system = "Cutting Knowledge Date: December 2023\nToday Date: " + date_string + "\n\n" + system
        if tools is not None:  # {%- if tools is not none %} (an empty list counts)
            system = "Environment: ipython\n" + system
        segs += head("system") + [(system, -1), eot(-1)]
        if tools is not None and tools_in_user_message:  # the first user message carries the tools
            if not messages or messages[0]["role"] != "user":  # the template raises (no messages) or mislabels
                raise ValueError("render_chat: llama3 puts tools in the first user message, but the first non-system "
                                 "message is not a user message (tools_in_user_message=False puts them in the system)")
            segs += head("user") + [(LLAMA3_TOOLS_USER + functions + messages[0]["content"].strip(), -1), eot(-1)]
            messages = messages[1:]
        turn = 0
        for m in messages:
            t = turn if m["role"] == "assistant" else -1
            turn += m["role"] == "assistant"
            if m["role"] in ("tool", "ipython"):  # header "ipython"; content | tojson (a str is "iterable" in Jinja)
                segs += head("ipython") + [(tojson(m["content"]), -1), eot(-1)]
            elif m.get("tool_calls") is not None:  # one call: {"name": ..., "parameters": arguments | tojson}
                call = m["tool_calls"][0]["function"]
                text = '{"name": "' + call["name"] + '", "parameters": ' + tojson(call["arguments"]) + "}"
                segs += head("assistant") + [(text, t), eot(t)]
            else:  # '<|start_header_id|>' + role + '<|end_header_id|>\n\n' + content|trim + '<|eot_id|>'
                segs += head(m["role"]) + [(m["content"].strip(), t), eot(t)]
        if add_generation_prompt:
            segs += head("assistant")
        return segs

    def _qwen3(self, messages, add_generation_prompt, tools=None, enable_thinking=True):
        start, end = self.special["<|im_start|>"], self.special["<|im_end|>"]
        # last_query_index: the last user message that is not a wrapped tool response
        last_query = len(messages) - 1
        for i in range(len(messages) - 1, -1, -1):
            c = messages[i]["content"]
            tool_response = c.startswith("<tool_response>") and c.endswith("</tool_response>")
            if messages[i]["role"] == "user" and not tool_response:
                last_query = i
                break
        segs, turn = [], 0
        if tools:  # one system turn: the system message (if any), then the "# Tools" block
            system = messages[0]["content"] + "\n\n" if messages[0]["role"] == "system" else ""
            block = system + QWEN3_TOOLS_HEAD + "".join("\n" + tojson(t) for t in tools) + QWEN3_TOOLS_TAIL
            segs += [(start, -1), ("system\n" + block, -1), (end, -1), ("\n", -1)]
        for i, m in enumerate(messages):
            role, content = m["role"], m["content"]
            if role == "user" or (role == "system" and not (i == 0 and tools)):
                segs += [(start, -1), (role + "\n" + content, -1), (end, -1), ("\n", -1)]
            elif role == "assistant":
                reasoning = ""
                if m.get("reasoning_content") is not None:
                    reasoning = m["reasoning_content"]
                elif "</think>" in content:
                    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                    content = content.split("</think>")[-1].lstrip("\n")
                # turns after the last user query keep their think block (the last one always, even if empty);
                # earlier turns drop it: this is why Qwen3 multi-turn rendering is not prefix-stable
                text = content
                if i > last_query and (i == len(messages) - 1 or reasoning):
                    text = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
                for k, call in enumerate(m.get("tool_calls") or []):
                    call = call.get("function") or call  # {"function": {...}} or the call itself
                    args = call["arguments"] if isinstance(call["arguments"], str) else tojson(call["arguments"])
                    text += ("\n" if k or content else "") + '<tool_call>\n{"name": "' + call["name"] + \
                        '", "arguments": ' + args + "}\n</tool_call>"
                segs += [(start, -1), ("assistant\n", -1), (text, turn), (end, turn), ("\n", -1)]
                turn += 1
            elif role == "tool":  # consecutive tool messages share one user turn
                if i == 0 or messages[i - 1]["role"] != "tool":
                    segs += [(start, -1), ("user", -1)]
                segs += [("\n<tool_response>\n" + content + "\n</tool_response>", -1)]
                if i == len(messages) - 1 or messages[i + 1]["role"] != "tool":
                    segs += [(end, -1), ("\n", -1)]
        if add_generation_prompt:
            # the template's `enable_thinking is false`: only False itself (not None, 0 or "") adds the empty block
            segs += [(start, -1), ("assistant\n" + ("<think>\n\n</think>\n\n" if enable_thinking is False else ""), -1)]
        return segs

    def _chatml(self, messages, add_generation_prompt):
        start, end = self.special["<|im_start|>"], self.special["<|im_end|>"]
        segs, turn = [], 0
        for m in messages:
            t = turn if m["role"] == "assistant" else -1
            turn += m["role"] == "assistant"
            segs += [(start, -1), (m["role"] + "\n", -1), (m["content"], t), (end, t), ("\n", -1)]
        if add_generation_prompt:
            segs += [(start, -1), ("assistant\n", -1)]
        return segs

    def render_jinja(self, messages, add_generation_prompt=False, tools=None, **kwargs) -> str:
        """The chat_template rendered as transformers' apply_chat_template(tokenize=False) does (same jinja options,
        tojson, raise_exception, strftime_now; special tokens passed by name)."""
        if self._jinja is None:
            try:
                import jinja2
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError:
                raise ImportError("chat_format 'jinja' needs jinja2: pip install jinja2") from None
            from datetime import datetime

            def raise_exception(msg):
                raise jinja2.exceptions.TemplateError(msg)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = tojson
            env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
            self._jinja = env.from_string(self.chat_template)
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id}
        tokens = {k: self.id_to_special[v] for k, v in names.items() if v in self.id_to_special}
        import jinja2
        try:
            return self._jinja.render(messages=messages, tools=tools, documents=None,
                                      add_generation_prompt=add_generation_prompt, **{**tokens, **kwargs})
        except jinja2.TemplateError as e:  # the template's raise_exception, or an undefined name: bad input data
            raise ValueError(f"the chat template refused this conversation: {e}") from None

    def _jinja_segments(self, messages, add_generation_prompt, **kwargs):
        """Render the template; assistant turn i spans render(messages[:i], gen prompt) .. render(messages[:i+1]),
        cut after its end-of-turn token. Needs the prefix property, which templates that rewrite history break."""
        full = self.render_jinja(messages, add_generation_prompt, **kwargs)
        end_tok = self.id_to_special.get(self.eot_id if self.eot_id is not None else self.eos_id)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            if i:  # what precedes the turn: the conversation so far with the generation prompt
                before = self.render_jinja(messages[:i], True, **kwargs)
            else:  # the conversation opens with it: the template's text up to its content (BOS, default system, header)
                probe = self.render_jinja([{**m, "content": _MARKER}], False, **kwargs)
                if _MARKER not in probe:
                    raise ValueError("chat template: cannot find where messages[0] (an assistant turn) starts, so the "
                                     "assistant mask cannot be found; use a built-in chat_format")
                before = probe[:probe.index(_MARKER)]
            upto = self.render_jinja(messages[: i + 1], False, **kwargs)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise ValueError(f"chat template is not prefix-stable at messages[{i}] (it rewrites earlier turns), so "
                                 "the assistant mask cannot be found by incremental rendering; use a built-in chat_format")
            cut = upto.rfind(end_tok, len(before)) if end_tok else -1
            spans.append((len(before), cut + len(end_tok) if cut >= 0 else len(upto.rstrip())))
        # split at special-token strings (HF's rendered-text tokenization does the same) and at span edges
        words = sorted(self.special, key=len, reverse=True)
        segs, pos = [], 0
        for piece in re.split("(" + "|".join(map(re.escape, words)) + ")", full) if words else [full]:
            cuts = sorted({pos, pos + len(piece)} | {e for s in spans for e in s if pos < e < pos + len(piece)})
            for a, b in zip(cuts, cuts[1:]):
                turn = next((k for k, (s, e) in enumerate(spans) if s <= a < e), -1)
                whole_special = piece in self.special and b - a == len(piece)
                segs.append((self.special[piece] if whole_special else full[a:b], turn))
            pos += len(piece)
        return segs

    def save(self, directory) -> list[str]:
        """Copy the source tokenizer files into `directory` (for HF export). Tokenizer files of an earlier export there
        are removed first: a loader would take a stale tokenizer.model over the new tokenizer.json. The byte tokenizer
        has none: returns []."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        names = {Path(f).name for f in self.files}
        for name in TOKENIZER_FILES:
            if name not in names and (d / name).is_file():
                (d / name).unlink()
        for f in self.files:
            if Path(f).resolve() != (d / Path(f).name).resolve():
                shutil.copy(f, d / Path(f).name)
        return [str(d / Path(f).name) for f in self.files]


def _check_messages(messages, chat_format, tools=None):
    """One-line errors for what the renderers (or the templates they replicate) cannot render."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("render_chat: messages must be a non-empty list of {'role', 'content'} dicts")
    if tools is not None and not (isinstance(tools, (list, tuple)) and all(isinstance(t, dict) for t in tools)):
        raise ValueError(f"render_chat: tools must be a list of function-schema dicts, got {tools!r:.80}")
    roles = {"llama3": ("system", "user", "assistant", "tool", "ipython"),
             "qwen3": ("system", "user", "assistant", "tool"), "chatml": ("system", "user", "assistant")}.get(chat_format)
    no_tools = "chat_format 'chatml' has no tool-calling format; use qwen3, llama3 or jinja"
    if tools is not None and chat_format == "chatml":
        raise ValueError(f"render_chat: got tools, but {no_tools}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ValueError(f"render_chat: messages[{i}] must be a dict with 'role' and 'content', got {m!r:.80}")
        role, calls = m["role"], m.get("tool_calls")
        if chat_format == "chatml" and (role in ("tool", "ipython") or calls is not None):
            raise ValueError(f"render_chat: messages[{i}] is a tool {'call' if calls is not None else 'message'}, "
                             f"but {no_tools}")
        if roles is not None and role not in roles:
            raise ValueError(f"render_chat: messages[{i}] has unknown role {role!r}; {chat_format} supports {roles}")
        # the llama3 template tojson's a tool result that is a mapping or list
        content_types = (str, dict, list) if role in ("tool", "ipython") and chat_format in ("llama3", "jinja") else str
        if not isinstance(m["content"], content_types):
            raise ValueError(f"render_chat: messages[{i}]['content'] must be a str, got {type(m['content']).__name__}")
        if m.get("reasoning_content") is not None and not isinstance(m["reasoning_content"], str):
            raise ValueError(f"render_chat: messages[{i}]['reasoning_content'] must be a str or None")
        if calls is not None:  # None (Parquet fills missing fields with it) means no tool calls
            _check_tool_calls(calls, f"render_chat: messages[{i}]", role, chat_format)


def _check_tool_calls(calls, where, role, chat_format):
    if not isinstance(calls, list):
        raise ValueError(f"{where}['tool_calls'] must be a list, got {type(calls).__name__}")
    if role != "assistant":
        raise ValueError(f"{where} has tool_calls but role {role!r}; only assistant messages call tools")
    if chat_format == "llama3" and len(calls) != 1:  # the template: raise_exception("... single tool-calls at once!")
        raise ValueError(f"{where} has {len(calls)} tool calls; llama3 renders exactly one per assistant message")
    if chat_format == "jinja":
        return  # the template decides what it accepts
    for k, call in enumerate(calls):
        # Qwen3 accepts the call with or without the {"function": ...} wrapper; the llama3 template needs it
        fn = call.get("function") if isinstance(call, dict) and (call.get("function") or chat_format == "llama3") \
            else call
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and isinstance(fn.get("arguments"), (dict, str))):
            optional = "" if chat_format == "llama3" else " (the function wrapper is optional)"
            raise ValueError(f"{where}['tool_calls'][{k}] must be {{'function': {{'name': str, 'arguments': dict or "
                             f"JSON string}}}}{optional}, got {call!r:.80}")


def visualize(ids, mask, tokenizer, color: bool = True) -> str:
    """The rendered example with supervised tokens on a green background (ANSI; without color between \u00ab and
    \u00bb); prompt tokens are shown plain."""
    out, i = [], 0
    while i < len(ids):
        j = i
        while j < len(ids) and mask[j] == mask[i]:
            j += 1
        text = tokenizer.decode(ids[i:j])
        out.append((f"\x1b[30;42m{text}\x1b[0m" if color else f"\u00ab{text}\u00bb") if mask[i] else text)
        i = j
    return "".join(out)


# -------------------------------------------------------------------- loading
def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _token_str(v):  # tokenizer_config.json writes tokens as "str" or {"content": "str", ...}
    return v.get("content") if isinstance(v, dict) else v


def _tiktoken_model_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        if line:
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: expected '<base64 token> <rank>' (Llama 3 tiktoken format)") from None
    return ranks


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


_UNREACHABLE = {}  # (file, size, mtime) -> _unreachable_tokens of its vocab


def _unreachable_tokens(ranks: dict[bytes, int]) -> dict[bytes, int]:
    """Vocab tokens that merges-only BPE never outputs: BPE of the token's own bytes (lowest-rank pair first,
    leftmost on ties, as tiktoken and, for these rank-ordered files, HF merge) does not end in the token itself.
    A heap of adjacent pairs keeps it O(L log L) per token (a trained vocab may hold tokens of thousands of bytes)."""
    out = {}
    for tok, rank in ranks.items():
        n = len(tok)
        if n < 2:
            continue
        nxt, prv, heap = list(range(1, n + 1)), list(range(-1, n - 1)), []

        def push(i):  # the pair (segment at i, the next one), keyed by where it ends
            if i >= 0 and nxt[i] < n and (r := ranks.get(tok[i:nxt[nxt[i]]])) is not None:
                heapq.heappush(heap, (r, i, nxt[nxt[i]]))
        for i in range(n - 1):
            push(i)
        segments = n
        while heap:
            _, i, e = heapq.heappop(heap)
            if prv[i] == -2 or nxt[i] >= n or nxt[nxt[i]] != e:  # a merged-away segment or a changed pair
                continue
            j = nxt[i]
            nxt[i], prv[j] = nxt[j], -2
            if nxt[j] < n:
                prv[nxt[j]] = i
            segments -= 1
            push(prv[i])
            push(i)
        if segments != 1:
            out[tok] = rank
    return out


def _bpe_from_hf(vocab: dict[str, int], merges, where: str) -> dict[bytes, int]:
    """Byte-level BPE vocab -> tiktoken ranks. tiktoken merges the pair whose concatenation has the lowest rank, which
    equals HF's merge-priority order when ids increase with merge order: checked here, not assumed."""
    dec = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {}
    for tok, i in vocab.items():
        try:
            ranks[bytes(dec[c] for c in tok)] = i
        except KeyError:
            raise ValueError(f"{where}: vocab token {tok!r} is not byte-level (GPT-2 byte map); only byte-level BPE "
                             "is supported (Llama 3, Qwen, GPT-2 style)") from None
    if missing := [b for b in range(256) if bytes([b]) not in ranks]:
        raise ValueError(f"{where}: byte-level vocab lacks single bytes {missing[:5]}")
    prev = -1
    for k, m in enumerate(merges):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank = vocab.get(a + b)
        if rank is None or rank < prev:  # equal: another split of the same token (tiktoken-converted files)
            raise ValueError(f"{where}: merge #{k} {a!r}+{b!r} does not produce vocab ids in merge order; "
                             "this BPE cannot be expressed as tiktoken ranks")
        prev = rank
    return ranks


def _pattern_from_tokenizer_json(j: dict, where: str) -> str:
    pre = j.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["Split", "ByteLevel"] and "Regex" in steps[0].get("pattern", {}) and not steps[1].get("use_regex") \
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
        pattern = steps[0]["pattern"]["Regex"]
    elif kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        pattern = GPT2_PATTERN
    elif kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        pattern = GPT2_DIGITS_PATTERN
    else:
        raise ValueError(f"{where}: unsupported pre_tokenizer {kinds}; supported: Split(Regex)+ByteLevel, ByteLevel, "
                         "Digits+ByteLevel (byte-level BPE like Llama 3, Qwen, GPT-2, SmolLM2)")
    if any(s.get("type") == "ByteLevel" and s.get("add_prefix_space") for s in steps):
        raise ValueError(f"{where}: ByteLevel add_prefix_space=true is not supported")
    return pattern


def load_tokenizer(path: str, chat_format: str | None = None) -> Tokenizer:
    """"byte", or a directory / file with tokenizer.model (Llama 3 tiktoken ranks or SentencePiece), tokenizer.json, or
    vocab.json + merges.txt. chat_format None picks it from the special tokens (and the template, when there is one)."""
    if str(path) == "byte":
        return Tokenizer("byte", None, special=dict(BYTE_SPECIALS), vocab_size=261, bos="<|bos|>", eos="<|eos|>",
                         pad="<|pad|>", chat_format=chat_format or "chatml")
    import tiktoken

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer path {p} does not exist")
    d = p if p.is_dir() else p.parent
    cfg = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").exists() else {}
    gen = _read_json(d / "generation_config.json") if (d / "generation_config.json").exists() else {}
    # which file: the one named, else in a directory tokenizer.model (Llama 3 / SentencePiece; a Llama 2 dir's
    # tokenizer.json is not byte-level), then tokenizer.json, then vocab.json + merges.txt
    if p.is_file():
        kind = {"tokenizer.json": "json", "vocab.json": "vocab", "merges.txt": "vocab"}.get(p.name, "model")
    else:
        kind = next((k for k, f in [("model", "tokenizer.model"), ("json", "tokenizer.json"), ("vocab", "merges.txt")]
                     if (d / f).exists()), None)
    tok_json = _read_json(p if p.is_file() else d / "tokenizer.json") if kind == "json" else None
    # names of the added tokens: tokenizer.json added_tokens, else tokenizer_config.json added_tokens_decoder
    added = {}  # content -> (id, special)
    for a in (tok_json or {}).get("added_tokens", []):
        added[a["content"]] = (a["id"], a.get("special", True))
    for i, a in cfg.get("added_tokens_decoder", {}).items():
        added.setdefault(a["content"], (int(i), a.get("special", True)))
    # save() copies every tokenizer file of the directory (an HF export needs tokenizer.json even if we read .model);
    # loaded_from: the files read, the ones that decide the ids (the vocab file(s), added tokens, bos/eos, template)
    files, nfc = [d / f for f in TOKENIZER_FILES if (d / f).exists()], False
    configs = [d / f for f in ("tokenizer_config.json", "generation_config.json", "chat_template.jinja") if (d / f).exists()]
    model_file = p if p.is_file() else d / "tokenizer.model"
    merges_only = False  # tiktoken (Meta's tokenizer.model) looks a whole pre-token up in the vocab first
    if kind == "model":
        head = model_file.read_bytes()[:200].split(b"\n")[0]
        if re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", head):  # Llama 3: tiktoken ranks (base64 token + rank per line)
            ranks = _tiktoken_model_ranks(model_file)
            if not added:
                added = {s: (len(ranks) + k, True) for k, s in enumerate(LLAMA3_SPECIALS)}
            pattern = LLAMA3_PATTERN
        else:  # SentencePiece (Llama 2 style): protobuf
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor()
            try:
                sp.load(str(model_file))
            except (OSError, RuntimeError) as e:
                raise ValueError(f"{model_file}: neither Llama 3 tiktoken ranks nor a SentencePiece model ({e})") from None
            special = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i)}
            special.update({s: i for s, (i, _) in added.items()})
            pick = lambda key, spid: _token_str(cfg.get(key)) or (sp.id_to_piece(spid) if spid >= 0 else None)
            return Tokenizer("sentencepiece", sp, special=special, vocab_size=sp.get_piece_size(),
                             bos=pick("bos_token", sp.bos_id()), eos=pick("eos_token", sp.eos_id()),
                             pad=pick("pad_token", sp.pad_id()), extra_stop=_as_list(gen.get("eos_token_id")),
                             chat_format=chat_format, chat_template=_chat_template(d, cfg),
                             files=files, loaded_from=[model_file, *configs])
        src = model_file
    elif kind == "json":
        where = str(p if p.is_file() else d / "tokenizer.json")
        model = tok_json.get("model") or {}
        decoder = (tok_json.get("decoder") or {}).get("type")
        if model.get("type") != "BPE" or decoder != "ByteLevel":
            raise ValueError(f"{where}: model {model.get('type')!r} with decoder {decoder!r} is not supported; "
                             "supported: byte-level BPE tokenizer.json (Llama 3, Qwen, GPT-2 style), "
                             "SentencePiece .model, Llama 3 tokenizer.model")
        if not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
            raise ValueError(f"{where}: model.vocab (dict) and model.merges (list) are required")
        ranks = _bpe_from_hf(model["vocab"], model["merges"], where)
        merges_only = not model.get("ignore_merges", False)  # HF's default: merges only, no whole-word vocab lookup
        pattern = _pattern_from_tokenizer_json(tok_json, where)
        norm = (tok_json.get("normalizer") or {}).get("type")
        if norm not in (None, "NFC"):
            raise ValueError(f"{where}: normalizer {norm!r} is not supported (only none or NFC)")
        nfc, src = norm == "NFC", Path(where)
    elif kind == "vocab":
        where = str(d / "vocab.json")
        if missing := [f for f in ("vocab.json", "merges.txt") if not (d / f).exists()]:
            raise FileNotFoundError(f"{d}: vocab.json + merges.txt tokenizer lacks {missing}")
        lines = (d / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [m for m in lines if m and not m.startswith("#version")]
        ranks = _bpe_from_hf(_read_json(d / "vocab.json"), merges, where)
        merges_only = True  # the slow tokenizers apply merges only
        # the slow tokenizer classes hard-code their regex (transformers tokenization_qwen2.py / tokenization_gpt2.py)
        cls = cfg.get("tokenizer_class")
        if cls not in ("Qwen2Tokenizer", "GPT2Tokenizer"):
            raise ValueError(f"{d / 'tokenizer_config.json'}: tokenizer_class {cls!r} with vocab.json+merges.txt is not "
                             "supported (Qwen2Tokenizer or GPT2Tokenizer); provide tokenizer.json")
        pattern, nfc = (QWEN2_PATTERN, True) if cls == "Qwen2Tokenizer" else (GPT2_PATTERN, False)
        src = d / "vocab.json"
    else:
        # a model exported from a run with the byte tokenizer has no tokenizer files (byte has none to copy); its
        # generation_config.json holds the byte tokenizer's stop ids
        byte_stops = [BYTE_SPECIALS["<|eos|>"], BYTE_SPECIALS["<|im_end|>"]]
        fix = "its generation_config.json has the byte tokenizer's stop ids: use tokenizer.path=byte" \
            if _as_list(gen.get("eos_token_id")) == byte_stops else \
            "set tokenizer.path to a directory or file with one, or to byte (the built-in byte tokenizer)"
        raise FileNotFoundError(f"no tokenizer in {p} (expected tokenizer.model, tokenizer.json or vocab.json + "
                                f"merges.txt): {fix}")
    read = [src, d / "merges.txt"] if kind == "vocab" else [src]
    rank_ids = set(ranks.values())
    specials = {s: i for s, (i, sp_) in added.items() if i not in rank_ids or sp_}
    # tiktoken returns a pre-token that is a vocab entry as that one token (HF's ignore_merges=true); with merges
    # only, HF never produces a token its merges do not build (Llama 3 tokenizer.json re-saved with
    # ignore_merges=false: 588 of them, e.g. " Việt"). Such tokens leave the ranks (so tiktoken never forms them)
    # and stay decodable as never-matched special tokens.
    unreachable = {}
    if merges_only:  # ~1 s: computed once per file and process
        key = (str(src), src.stat().st_size, src.stat().st_mtime_ns)
        if key not in _UNREACHABLE:
            _UNREACHABLE[key] = _unreachable_tokens(ranks)
        unreachable = _UNREACHABLE[key]
    if unreachable:
        if bad := [t for t in unreachable if not _is_utf8(t)]:
            raise ValueError(f"{src}: {len(bad)} vocab tokens (e.g. {bad[0]!r}) are never built by the merges "
                             "(ignore_merges=false) and are not UTF-8: not supported")
        ranks = {t: i for t, i in ranks.items() if t not in unreachable}
    try:  # tiktoken compiles the pattern with Rust fancy-regex here
        enc = tiktoken.Encoding(name=str(d), pat_str=pattern, mergeable_ranks=ranks,
                                special_tokens={**specials, **{t.decode(): i for t, i in unreachable.items()}})
    except ValueError as e:
        raise ValueError(f"{src}: pre-tokenizer regex {pattern!r} does not compile in tiktoken ({e})") from None
    bos, eos, pad = (_token_str(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token"))
    if kind == "model" and not cfg:  # Meta's tokenizer.model alone: Meta's tokenizer.py ids
        bos, pad = "<|begin_of_text|>", "<|finetune_right_pad_id|>"
    if chat_format is None:
        tmpl = _chat_template(d, cfg) or ""
        if "<|start_header_id|>" in specials and (not tmpl or "Cutting Knowledge Date" in tmpl):
            chat_format = "llama3"
        elif "<|im_start|>" in specials and "<think>" in added and (not tmpl or "<think>" in tmpl):
            chat_format = "qwen3"
        elif tmpl:
            chat_format = "jinja"
        elif "<|im_start|>" in specials:
            chat_format = "chatml"
    return Tokenizer("tiktoken", enc, special={s: i for s, i in specials.items() if added[s][1]},
                     matched={s: i for s, i in specials.items() if not added[s][1]}, vocab_size=enc.n_vocab, bos=bos,
                     eos=eos, pad=pad, extra_stop=_as_list(gen.get("eos_token_id")), chat_format=chat_format,
                     chat_template=_chat_template(d, cfg), nfc=nfc, files=files, loaded_from=read + configs)


def _as_list(x):
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def _chat_template(d: Path, cfg: dict) -> str | None:
    t = cfg.get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        t = next((x["template"] for x in t if x.get("name") == "default"), None)
    if t is None and (d / "chat_template.jinja").exists():
        t = (d / "chat_template.jinja").read_text(encoding="utf-8")
    return t
