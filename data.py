"""SFT data: JSONL / Parquet / Hugging Face Hub sources -> tokenized once into a memmap cache -> static, dynamic or
packed batches, formed globally and strided over data-parallel ranks, resumable, prefetched in a thread.

    python data.py configs/demo.yaml [dataset.max_seq_len=512 ...]     # dataset report (drops, padding, masks)
    loader = build_loader(cfg.dataset, tokenizer, "train", rank, world_size, seed=0, device="cuda")
    batch = next(loader); loss_sum = model(batch.tokens, batch.positions, batch.doc_ids, labels=batch.labels)

Sources (dataset.path): a .jsonl/.parquet file (the train split only); a directory with <split>.jsonl,
<split>/**/*.jsonl or, as the Hub lays datasets out, **/<split>-NNNNN*.jsonl (.parquet too: needs pyarrow; all files of
the layout are read, and two layouts of one split side by side are an error); or
hg://org/name[/subdir], fetched by huggingface_hub.snapshot_download (HF_HUB_CACHE/HF_HOME/HF_HUB_OFFLINE apply).
Records: {"src", "tgt"} (names from src_field/tgt_field: GSM8K is question/answer) or {"messages" | "chat": [{"role":
system|user|assistant, "content"}]} rendered by tokenizer.render_chat. chat_mode: true renders src/tgt as one
user/assistant exchange. Otherwise src and tgt are encoded SEPARATELY and concatenated, ids = encode(src) +
encode(tgt), so the prompt's ids are always a prefix of the example (no BPE merge across the boundary: the same ids
a generation prompt gets); source/target_encode_mode: prompt = bos+text, prompt_response = text+eos, as_is = text.
Target tokens and their eos / end-of-turn are trained, prompt tokens only with train_on_prompt.

Mixing (dataset.sources, instead of dataset.path): a list of {path, weight (default 1), name, and per-source
src_field / tgt_field / messages_field / chat_mode}; each path resolves like dataset.path, with its own cache. A
weight multiplies its source ONCE per run: 2 = every example twice per epoch, 0.5 = a fixed random half, 2.5 = twice
plus a fixed random half (round(weight * n) in all), drawn from the loader seed and the source's index alone. Every
epoch then holds the same multiset, shuffled and batched as one dataset, so batches/epoch is constant, the resume
state below stays exact and all ranks agree. Another split (validation) takes every example of each source that has
it, unweighted; a source without it is reported and skipped.

Lengths are MODEL tokens: n ids give n-1 inputs (tokens = ids[:-1], labels = ids[1:] where mask[1:] else -100).
Examples under min_seq_len, over max_seq_len or with no supervised label are dropped and counted by reason.
truncate: true cuts long examples instead, keeping their start (TRL's keep_start): the prompt stays whole and the
response loses its end (eos included). Cutting the prompt instead would train answers on contexts that inference
never shows (a chat without its headers, an answer without its question). An example whose prompt alone fills
max_seq_len (0 supervised tokens left) is dropped as too_long.

Cache: <cache_dir or ~/.cache/sft/data>/<name>-<split>-<hash>/{tokens.bin uint32, mask.bin uint8, offsets.bin
int64 (n+1), meta.json}. The hash covers the source files (path, size, mtime), the tokenizer (its `fingerprint`
attribute, else class name, backend, vocab size, special and stop ids, chat format, the ids of a
probe text and chat, and the names and bytes of tokenizer.loaded_from: the files it was built from, not every
tokenizer file of its directory) and the encoding options (max_seq_len among them: it decides drops and truncation); the other
batching options are not in it (batches are planned at start-up). The node-local rank 0 builds it with forked worker
processes into a temp dir renamed into place when complete; the other ranks wait at a torch.distributed barrier
(and get the builder's error, if any).

Batching, per epoch, GLOBAL (from seed and epoch only): packing (default): best-fit-decreasing into rows of
max_seq_len with per-document positions and doc_ids (the model's document mask keeps attention inside a
document; labels never cross one), max_num_tokens // max_seq_len rows per batch (or batch_size, or 1);
batch_size: static batches padded to their longest; max_num_tokens: dynamic batches of similar lengths (sorted,
random among equal lengths) with padded B*T <= max_num_tokens. Rank r takes global batches r, r+W, r+2W, ... of
an endless stream of reshuffled epochs. The state is the global position of the next batch no rank has taken
({"epoch", "index"}, equal on all ranks): a resumed run sees exactly the batches an uninterrupted one would, and
at another world size W' the global stream continues (rank r' takes P + r', P + r' + W', ...).
"""
import atexit
import bisect
import dataclasses
import glob
import hashlib
import json
import multiprocessing
import os
import queue
import random
import shutil
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from tokenizer import TRAIN_ON

CACHE_VERSION = 8  # 3: chat records with tools render them; 4: meta counts no_stop_token; 5: truncation cuts the
# prompt first; 6: tokenizer.json with ignore_merges=false applies merges only, jinja masks of assistant-first chats;
# 7: the tokenizer fingerprint hashes the files it was read from (a directory's tokenizer.model and tokenizer.json
# shared one, and so one cache); 8: truncation keeps the start (the prompt whole), cuts the response's end
ENCODE_MODES = ("prompt", "prompt_response", "as_is")
ROLES = ("system", "user", "assistant", "tool", "ipython")  # all formats' roles; render_chat checks its own
POOL_MIN_BYTES = 1 << 20  # below ~1 MB of data, forking tokenizer workers costs more than it saves


@dataclass
class DatasetConfig:
    path: str = ""                   # .jsonl/.parquet file | directory | hg://org/name[/subdir]
    sources: list[dict] = field(default_factory=list)  # instead of path: [{path, weight, src_field, ...}] (mixing)
    train_split: str = "train"
    valid_split: str = ""            # "" = no validation set
    src_field: str = "src"
    tgt_field: str = "tgt"
    messages_field: str = "messages" # a "chat" field is read too (fairseq2)
    chat_mode: bool = False          # src/tgt -> one user/assistant exchange in the tokenizer's chat format
    source_encode_mode: str = "prompt"            # prompt: bos+text | prompt_response: text+eos | as_is: text
    target_encode_mode: str = "prompt_response"
    train_on: str = "assistant"      # chat: assistant | last_assistant | all
    train_on_prompt: bool = False
    min_seq_len: int = 1             # in model tokens (ids - 1)
    max_seq_len: int = 2048
    truncate: bool = False           # truncate too-long examples instead of dropping them
    batch_size: int = 0              # static batches of N examples (or N packed rows)
    max_num_tokens: int = 0          # dynamic batches: padded B*T <= this (packing: this // max_seq_len rows)
    packing: bool = True
    shuffle: bool = True
    num_prefetch: int = 2            # batches prepared ahead in a background thread (0 = synchronous)
    cache_dir: str = ""              # "" = ~/.cache/sft/data
    skip_bad_examples: bool = False  # count and skip bad lines instead of raising
    num_workers: int = 0             # tokenizer processes for the cache build (0 = one per CPU, at most 8)
    generate_demo: bool = False      # write make_demo_data(path) first when path holds no data yet
    demo_n_train: int = 4000
    demo_n_valid: int = 200
    demo_max_value: int = 999


@dataclass
class Batch:
    tokens: torch.Tensor             # (B,T) long
    labels: torch.Tensor             # (B,T) long, -100 = not supervised; labels[b,t] is the target of tokens[b,t]
    positions: torch.Tensor          # (B,T) long, restart at 0 for every document
    doc_ids: torch.Tensor | None     # (B,T) int32 document index per token (packed rows only)
    num_tokens: int                  # real (non-pad) tokens
    num_label_tokens: int            # labels != -100
    doc_len_sq: int = 0              # sum over the documents of (model tokens)^2: attention's model FLOPs (MFU)
    source: int = -1                 # a mixture's validation batch: the one source of its examples (else -1)

    def to(self, device, non_blocking=False) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)
        return dataclasses.replace(self, tokens=move(self.tokens), labels=move(self.labels),
                                   positions=move(self.positions), doc_ids=move(self.doc_ids))

    def pin_memory(self) -> "Batch":
        pin = lambda t: None if t is None else t.pin_memory()
        return dataclasses.replace(self, tokens=pin(self.tokens), labels=pin(self.labels),
                                   positions=pin(self.positions), doc_ids=pin(self.doc_ids))


class BadExample(ValueError):
    """One bad input line: `reason` is the counter key used with skip_bad_examples."""
    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------------------------------------------------------
# Sources

def resolve_files(path: str, split: str, what: str = "dataset.path", missing_ok: bool = False,
                  train_split: str = "train") -> list[str]:
    """The data files of one split, sorted (their order is part of the data order). missing_ok: [] when a
    directory has no such split. `what` names the config key in errors. A single file (local or hg://) is the
    train split only: validating or evaluating on it would measure the training data."""
    if not path:
        raise ValueError(f"{what} is empty: set it to a .jsonl file, a directory or hg://org/name")
    hub = path.startswith("hg://")
    if hub:
        path = hub_snapshot(path, what)
    if os.path.isfile(path):
        if split == train_split:
            return [os.path.abspath(path)]
        if missing_ok:
            return []
        raise ValueError(f"{what} {path} is one file, the '{train_split}' split; a '{split}' split needs a "
                         "directory with both (or set valid_split: '', or evaluation.split to a .jsonl file)")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    exts = ("jsonl", "parquet")
    layouts, seen = [], set()  # (level, files, the files no layout before it has): the layouts present
    for level, patterns in enumerate(([f"{split}.{e}" for e in exts],
                                      [f"{split}/**/*.{e}" for e in exts],
                                      [f"**/{split}.{e}" for e in exts] + [f"**/{split}-[0-9]*.{e}" for e in exts])):
        files = sorted({os.path.abspath(f) for p in patterns for f in glob.glob(os.path.join(path, p), recursive=True)})
        if new := [f for f in files if f not in seen]:  # **/<split>.jsonl also matches <split>.jsonl itself
            layouts.append((level, files, new))
            seen.update(files)
    if not layouts:
        if missing_ok:
            return []
        raise FileNotFoundError(f"no data for split '{split}' in {path}: expected {split}.jsonl, {split}/**/*.jsonl "
                                f"or **/{split}-00000-of-00001.jsonl (or .parquet)")
    # A layout's files are all read (shards, languages in subdirectories). Two layouts side by side (train.jsonl
    # beside train/part-1.jsonl or data/train-00000-of-00001.parquet) are usually one dataset twice, a converted or
    # re-sharded copy: reading one would silently ignore the other, reading both would repeat examples.
    if len(layouts) > 1:
        shown = [", ".join(os.path.relpath(f, path) for f in new[:2]) + (f" (+{len(new) - 2} more)" if len(new) > 2
                                                                         else "") for _, _, new in layouts]
        raise ValueError(f"{what} {path}: split '{split}' is there in {len(layouts)} layouts, {' and '.join(shown)}: "
                         f"keep one layout (move or delete the other files, or point {what} at one of them)")
    level, files, _ = layouts[0]
    # Both would be read, each example twice: <split>.jsonl beside <split>.parquet, or a Hub dataset's configs
    # (hg://openai/gsm8k holds main/ and socratic/, the same questions with two answer styles; a local directory
    # may hold shards or languages in subdirectories, which are read together).
    if level == 0 and len(files) > 1:
        raise ValueError(f"{what} {path}: split '{split}' is there as {' and '.join(files)}; keep one")
    dirs = sorted({os.path.relpath(os.path.dirname(f), path) for f in files})
    if hub and level == 2 and len(dirs) > 1:
        raise ValueError(f"{what} {path}: split '{split}' files in {len(dirs)} subdirectories ({', '.join(dirs[:4])})"
                         f", usually the dataset's configs: point {what} at one (e.g. {path.rstrip('/')}/{dirs[0]},"
                         " or hg://org/name/<config>), or list them in dataset.sources")
    return files


def hub_snapshot(url: str, what: str = "dataset.path", repo_type: str = "dataset", tokenizer_only: bool = False) -> str:
    """hg://org/name[/subdir] -> the local snapshot dir of that Hub repo (downloaded, or from the HF cache;
    HF_HUB_OFFLINE honoured). train.py fetches models and tokenizers with it too (repo_type "model")."""
    parts = url[len("hg://"):].strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"{what} {url}: expected hg://org/name or hg://org/name/subdir")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(f"{what} {url} needs huggingface_hub: pip install huggingface_hub") from None
    repo_id = "/".join(parts[:2])
    # only what we read: data files; a model's safetensors and configs (not Meta's original/ copy of the weights nor
    # other frameworks' formats, which can double a download); for a tokenizer alone, its small files
    allow = ["*.jsonl", "*.parquet"] if repo_type == "dataset" else \
        ["*.json", "*.model", "*.txt", "*.jinja"] if tokenizer_only else None
    ignore = ["original/*", "*.bin", "*.pth", "*.pt", "*.gguf", "*.h5", "*.msgpack", "*.onnx*"] \
        if repo_type == "model" else None
    try:
        root = snapshot_download(repo_id=repo_id, repo_type=repo_type, allow_patterns=allow, ignore_patterns=ignore)
    except Exception as e:  # offline without a cached snapshot, gated or missing repo, network errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise FileNotFoundError(f"{what} {url}: cannot get Hub {repo_type} {repo_id} "
                                f"({type(e).__name__}: {first}){_no_network_hint(e, what)}") from None
    return os.path.join(root, *parts[2:])


def _no_network_hint(e: BaseException, what: str) -> str:
    """The way forward when the Hub could not be reached and the cache lacks the repo (huggingface_hub raises
    LocalEntryNotFoundError from its connection error; older versions a requests ConnectionError), else ""."""
    chain = []
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    names = " ".join(type(x).__name__ for x in chain)
    if not (any(isinstance(x, (ConnectionError, TimeoutError)) for x in chain)
            or any(n in names for n in ("Connect", "Timeout", "LocalEntryNotFound", "OfflineMode"))):
        return ""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return (f"; HF_HUB_OFFLINE is set and the Hugging Face cache lacks it: unset it to download, or download the "
                f"repo elsewhere and set {what} to that local directory")
    return (f"; no network? download the repo elsewhere and set {what} to that local directory, or fill the Hugging "
            "Face cache (HF_HOME / HF_HUB_CACHE) there and copy it here: HF_HUB_OFFLINE=1 then reads it")


COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"))


def read_records(file: str):
    """Yield (where, raw) for every non-blank record: raw is a bytes line (JSONL) or a dict (Parquet)."""
    if file.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"{file}: reading Parquet needs pyarrow: pip install pyarrow") from None
        for i, row in enumerate(pq.read_table(file).to_pylist()):
            yield f"{file}:row {i + 1}", row
        return
    with open(file, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):  # UTF-8 BOM (Windows editors)
                line = line[3:]
            if lineno == 1 and (kind := next((k for magic, k in COMPRESSED if line.startswith(magic)), None)):
                # else each line is "invalid UTF-8", and skip_bad_examples would skip the whole file
                raise ValueError(f"{file} is {kind}-compressed: decompress it first (JSONL files are read as text)")
            line = line.rstrip(b"\r\n")  # CRLF
            if line.strip():
                yield f"{file}:{lineno}", line


def parse_record(where: str, raw) -> dict:
    if isinstance(raw, dict):
        return raw
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadExample("invalid_utf8", f"{where}: invalid UTF-8 at byte {e.start}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:  # e.msg names the place as "... starting at" / "... at": the column says it
        what = e.msg.removesuffix(" at").removesuffix(" starting")
        raise BadExample("invalid_json", f"{where}:{e.colno}: malformed JSON ({what})") from None
    except (ValueError, RecursionError) as e:  # an integer of > 4300 digits, arrays nested past the recursion limit
        raise BadExample("invalid_json", f"{where}: unreadable JSON ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(obj, dict):
        raise BadExample("invalid_json", f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


# ----------------------------------------------------------------------------------------------------------------
# Encoding: record -> (ids, mask), mask[i] = 1 iff ids[i] is a supervised target

def string_field(obj, key, where):
    """obj[key], which must be a str (BadExample naming `where` otherwise)."""
    if key not in obj:
        raise BadExample("missing_field", f"{where}: missing field '{key}' (keys: {', '.join(sorted(obj))[:200]})")
    if not isinstance(obj[key], str):
        raise BadExample("bad_field", f"{where}: field '{key}' must be a string, got {type(obj[key]).__name__}")
    return obj[key]


def _render(tokenizer, messages, train_on, where, tools=None):
    try:
        return tokenizer.render_chat(messages, train_on=train_on, tools=tools)
    except ValueError as e:  # e.g. a role the chat format lacks: name the line
        raise BadExample("bad_field", f"{where}: {e}") from None


def encode_example(obj: dict, cfg: DatasetConfig, tokenizer, where: str) -> tuple[list[int], list[int]]:
    train_on = "all" if cfg.train_on_prompt else cfg.train_on
    # a null field is an absent one (Parquet fills a column that a src/tgt row lacks with null)
    key = next((k for k in (cfg.messages_field, "chat") if obj.get(k) is not None), None)
    if key is not None:
        if obj.get(cfg.src_field) is not None and obj.get(cfg.tgt_field) is not None:
            raise BadExample("ambiguous", f"{where}: both '{key}' (chat messages) and '{cfg.src_field}'/"
                                          f"'{cfg.tgt_field}' are set: which one to train on is not clear; keep one of "
                                          "them in the data, or point dataset.messages_field / src_field / tgt_field "
                                          "at fields the records lack")
        messages = obj[key]
        if not isinstance(messages, list) or not messages:
            raise BadExample("bad_field", f"{where}: field '{key}' must be a non-empty list of messages")
        for j, m in enumerate(messages):  # content and tool_calls types are checked by render_chat, per format
            if not (isinstance(m, dict) and m.get("role") in ROLES and ("content" in m or m.get("tool_calls"))):
                raise BadExample("bad_field", f"{where}: {key}[{j}] must be {{\"role\": {'|'.join(ROLES)}, "
                                              f"\"content\": ...}}, got {str(m)[:100]}")
        # "tools": function schemas, as apply_chat_template(tools=...) takes them (render_chat checks them)
        return _render(tokenizer, messages, train_on, where, obj.get("tools"))
    src = string_field(obj, cfg.src_field, where)
    tgt = string_field(obj, cfg.tgt_field, where)
    if not tgt:
        raise BadExample("empty_target", f"{where}: field '{cfg.tgt_field}' is empty (nothing to train on)")
    if cfg.chat_mode:
        return _render(tokenizer, [{"role": "user", "content": src}, {"role": "assistant", "content": tgt}],
                       train_on, where)
    try:
        s, t = encode_text(tokenizer, src, cfg.source_encode_mode), encode_text(tokenizer, tgt, cfg.target_encode_mode)
    except ValueError as e:  # e.g. a lone surrogate ("\ud800" in the JSON) that UTF-8 cannot encode
        raise BadExample("bad_field", f"{where}: {e}") from None
    return s + t, [int(cfg.train_on_prompt)] * len(s) + [1] * len(t)


def encode_text(tokenizer, text: str, mode: str) -> list[int]:
    """A src or tgt field as source_encode_mode / target_encode_mode say: prompt = bos + text, prompt_response =
    text + eos, as_is = text. generate.build_prompt encodes evaluation prompts with it, so they match training."""
    return tokenizer.encode(text, bos=mode == "prompt", eos=mode == "prompt_response")


def truncate_example(ids, mask, max_ids):
    """The first max_ids ids (see the module docstring), or None if nothing supervised would remain."""
    ids, mask = ids[:max_ids], mask[:max_ids]
    return (ids, mask) if any(mask[1:]) else None


def _encode_chunk(chunk):
    """Worker: [(where, raw)] -> flat ids, mask, lengths, drop counters, first skip messages."""
    cfg, tokenizer = _WORKER
    ids_out, mask_out, lengths, drops, messages, label_tokens, no_stop = [], [], [], Counter(), [], 0, 0
    stops = set(tokenizer.stop_ids)  # eos and the chat end-of-turn tokens
    for where, raw in chunk:
        try:
            obj = parse_record(where, raw)
            ids, mask = encode_example(obj, cfg, tokenizer, where)
        except BadExample as e:
            if not cfg.skip_bad_examples:  # plain ValueError: pickles back from a worker unchanged
                raise ValueError(f"{e}; dataset.skip_bad_examples=true skips (and counts) such examples") from None
            drops[e.reason] += 1
            messages.append(str(e))
            continue
        n = len(ids) - 1  # model tokens
        if n < cfg.min_seq_len:
            drops["too_short"] += 1
            continue
        cut = n > cfg.max_seq_len
        if cut:
            kept = truncate_example(ids, mask, cfg.max_seq_len + 1) if cfg.truncate else None
            if kept is None:
                drops["too_long"] += 1
                continue
            ids, mask = kept
            drops["truncated"] += 1  # kept; reported apart from the drops
        if not any(mask[1:]):
            drops["no_supervised"] += 1
            continue
        # A supervised span that does not end on a stop token teaches the model never to stop
        # (a cut response is expected to, and is not counted). Whitespace after the stop token (chatml's "\n" after
        # <|im_end|>, supervised with train_on: all) does not count.
        last = len(mask) - 1 - mask[::-1].index(1)  # the last supervised id
        while last > 1 and mask[last - 1] and ids[last] not in stops and not tokenizer.decode([ids[last]]).strip():
            last -= 1
        no_stop += ids[last] not in stops and not cut
        ids_out.extend(ids)
        mask_out.extend(mask)
        lengths.append(len(ids))
        label_tokens += sum(mask[1:])
    return (np.asarray(ids_out, np.uint32), np.asarray(mask_out, np.uint8), lengths, drops, messages[:5],
            label_tokens, len(chunk), no_stop)


_WORKER = None  # (cfg, tokenizer), inherited by forked workers so the tokenizer is never pickled


# ----------------------------------------------------------------------------------------------------------------
# Tokenize-once cache

def tokenizer_fingerprint(tokenizer) -> str:
    """The tokenizer's `fingerprint` if it has one, else a hash of what decides its ids (see module docstring)."""
    fp = getattr(tokenizer, "fingerprint", None)
    if fp:
        return str(fp)
    h = hashlib.sha256()
    probe = "Hello, world! 12345 <|eot_id|> <|im_end|> héllo\n\n  x"
    parts = [type(tokenizer).__name__, getattr(tokenizer, "backend", None), tokenizer.vocab_size, tokenizer.bos_id,
             tokenizer.eos_id, tokenizer.pad_id, getattr(tokenizer, "eot_id", None), getattr(tokenizer, "stop_ids", None),
             getattr(tokenizer, "chat_format", None), tokenizer.encode(probe)]
    try:
        parts.append(tokenizer.render_chat([{"role": "user", "content": "2+2?"},
                                            {"role": "assistant", "content": "4"}]))
    except Exception:  # no chat format: chat data would fail at encoding anyway
        pass
    h.update(json.dumps(parts, default=str).encode())
    # The files the ids come from, by name and content, not every tokenizer file of the directory (tokenizer.files,
    # what save() copies): a directory's tokenizer.model and a merges-only tokenizer.json tokenize " Việt" differently,
    # and no probe text can cover all such words. Not by path: the same files elsewhere share the cache.
    read = getattr(tokenizer, "loaded_from", None)
    for f in sorted((read if read is not None else getattr(tokenizer, "files", None) or []), key=os.path.basename):
        with open(f, "rb") as fh:
            h.update(os.path.basename(f).encode() + hashlib.sha256(fh.read()).digest())
    return h.hexdigest()


ENCODE_OPTIONS = ("src_field", "tgt_field", "messages_field", "chat_mode", "source_encode_mode", "target_encode_mode",
                  "train_on", "train_on_prompt", "min_seq_len", "max_seq_len", "truncate", "skip_bad_examples")
BATCH_OPTIONS = ("max_seq_len", "batch_size", "max_num_tokens", "packing", "shuffle")  # what plan_epoch reads


def cache_path(files, cfg: DatasetConfig, tokenizer, split) -> str:
    key = {"version": CACHE_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer),
           "files": [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files],
           "options": {k: getattr(cfg, k) for k in ENCODE_OPTIONS}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    root = cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "sft", "data")
    name = os.path.basename(cfg.path.rstrip("/")).replace(".jsonl", "").replace(".parquet", "") or "data"
    return os.path.join(root, f"{name}-{split}-{digest}")


def _chunks(files, cfg, drops: Counter, size=512):
    """Records in chunks for the workers; an empty file is an error (or a counted skip)."""
    chunk = []
    for file in files:
        count = 0
        for record in read_records(file):
            count += 1
            chunk.append(record)
            if len(chunk) == size:
                yield chunk
                chunk = []
        if count == 0:
            if not cfg.skip_bad_examples:
                raise ValueError(f"{file}: empty file (no examples); dataset.skip_bad_examples=true skips (and counts) it")
            drops["empty_file"] += 1
    if chunk:
        yield chunk


def build_cache(files, cfg: DatasetConfig, tokenizer, out_dir: str) -> None:
    """Tokenize `files` into out_dir (written to a temp dir, renamed into place when complete)."""
    global _WORKER
    t0 = time.time()
    # unique even between nodes sharing the cache dir (equal pids in containers, `random` seeded alike by train.py);
    # makedirs keeps the umask's permissions (mkdtemp's 0700 would lock other users out of a shared cache)
    tmp = f"{out_dir}.tmp-{uuid.uuid4().hex}"
    os.makedirs(tmp)
    workers = cfg.num_workers or min(os.cpu_count() or 1, 8)
    drops, messages, lengths, num_read, label_tokens, max_id, no_stop = Counter(), [], [0], 0, 0, 0, 0
    _WORKER = (cfg, tokenizer)
    pool = None
    try:
        if workers > 1 and sum(os.path.getsize(f) for f in files) > POOL_MIN_BYTES:
            pool = multiprocessing.get_context("fork").Pool(workers)
        chunks = _chunks(files, cfg, drops)
        results = pool.imap(_encode_chunk, chunks) if pool else map(_encode_chunk, chunks)
        with open(f"{tmp}/tokens.bin", "wb") as ft, open(f"{tmp}/mask.bin", "wb") as fm:
            for ids, mask, lens, d, msgs, nl, nr, ns in results:
                ft.write(ids.tobytes())
                fm.write(mask.tobytes())
                max_id = max(max_id, int(ids.max(initial=0)))
                lengths.extend(lens)
                drops.update(d)
                messages.extend(msgs)
                label_tokens += nl
                num_read += nr
                no_stop += ns
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _WORKER = None
        if pool:
            pool.terminate()
    for m in messages[:5]:
        print(f"data: skipped {m}", file=sys.stderr)
    # the bad-example reasons (skip_bad_examples), not the length and file counts
    if (skipped := sum(v for k, v in drops.items()
                       if k not in ("too_short", "too_long", "no_supervised", "truncated", "empty_file"))) > 5:
        print(f"data: ... and {skipped - 5} more skipped (counted by reason in the report)", file=sys.stderr)
    if len(lengths) == 1:
        shutil.rmtree(tmp, ignore_errors=True)
        top = max(drops, key=drops.get, default="empty_file")  # the hint follows the main reason
        hint = {"too_short": "lower dataset.min_seq_len",
                "too_long": "raise dataset.max_seq_len" + ("" if cfg.truncate else " (or dataset.truncate=true)"),
                "missing_field": "check the field names (dataset.src_field / tgt_field / messages_field)",
                "no_supervised": "check dataset.train_on and the chat roles",
                "empty_file": "the file holds no records"}.get(top, "see the skipped examples above")
        raise ValueError(f"{', '.join(files)[:300]}: no usable examples (read {num_read}, dropped "
                         f"{dict(drops) or 'none'}): {hint}")
    offsets = np.cumsum(np.asarray(lengths, np.int64))
    offsets.tofile(f"{tmp}/offsets.bin")
    meta = {"files": files, "num_read": num_read, "num_examples": len(lengths) - 1, "num_ids": int(offsets[-1]),
            "num_label_tokens": int(label_tokens), "max_id": max_id, "truncated": drops.pop("truncated", 0),
            "no_stop_token": no_stop,
            "drops": dict(sorted(drops.items())),
            "build_seconds": round(time.time() - t0, 3), "tokenizer": tokenizer_fingerprint(tokenizer),
            "options": {k: getattr(cfg, k) for k in ENCODE_OPTIONS}}
    with open(f"{tmp}/meta.json", "w") as f:
        json.dump(meta, f, indent=1)
    try:
        os.rename(tmp, out_dir)  # atomic: readers see a complete cache or none
    except OSError:  # another process finished the same cache first
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(out_dir):
            raise


class TokenizedData:
    """A built cache, memory-mapped: example i is ids tokens[offsets[i]:offsets[i+1]] with mask[...]."""
    def __init__(self, directory):
        self.directory = directory
        try:
            self.meta = _read_json(os.path.join(directory, "meta.json"))
            self.offsets = np.fromfile(os.path.join(directory, "offsets.bin"), np.int64)
            n = int(self.offsets[-1])
            self.tokens = np.memmap(os.path.join(directory, "tokens.bin"), np.uint32, "r", shape=(n,))
            self.mask = np.memmap(os.path.join(directory, "mask.bin"), np.uint8, "r", shape=(n,))
        except PermissionError:
            raise
        except (OSError, ValueError, IndexError) as e:  # a cache damaged after it was built (truncated, deleted)
            raise ValueError(f"token cache {directory} is damaged ({type(e).__name__}: {e}): delete that directory "
                             "and it is rebuilt") from None
        self.lengths = np.diff(self.offsets) - 1  # model tokens per example

    def __len__(self):
        return len(self.lengths)

    def example(self, i) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.tokens[a:b].astype(np.int64), self.mask[a:b]


def ids_present(data, ids: list[int], chunk: int = 1 << 24) -> list[int]:
    """Which of `ids` occur in a dataset's tokens (a TokenizedData, or MixedData's sources), read in chunks."""
    found, ids = set(), np.asarray(sorted(ids), dtype=np.uint32)
    for part in getattr(data, "parts", [data]):
        for a in range(0, len(part.tokens), chunk):
            piece = np.asarray(part.tokens[a:a + chunk])
            found.update(np.unique(piece[np.isin(piece, ids)]).tolist())
    return sorted(found)


def _barrier_sharing_errors(error: Exception | None):
    """A barrier that also tells every rank whether a builder failed: the builder raises its error, the others the
    same message (instead of waiting, then dying on a closed connection whose traceback buries the real error)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        if error is not None:
            raise error
        return
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = next(((i, e) for i, e in enumerate(errors) if e is not None), None)
    if failed:
        raise ValueError(f"rank {failed[0]} could not build the dataset: {failed[1]}")


def _is_builder(rank):
    """Node-local rank 0 builds shared files; without torch.distributed every process builds what is missing
    (the atomic rename makes concurrent builds safe)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(os.environ.get("LOCAL_RANK", rank)) == 0
    return True


def load_data(cfg: DatasetConfig, tokenizer, split: str, rank: int = 0, what: str = "dataset.path",
              missing_ok: bool = False) -> TokenizedData | None:
    """The split's tokenized cache: built (or downloaded, for hg://) by the builder first, opened by all.
    missing_ok: None when cfg.path has no such split (a source of dataset.sources without a validation split)."""
    builder, error = _is_builder(rank), None
    if builder:
        try:
            files = resolve_files(cfg.path, split, what, missing_ok, cfg.train_split)
            out_dir = cache_path(files, cfg, tokenizer, split) if files else None
            if out_dir and not os.path.isdir(out_dir):
                build_cache(files, cfg, tokenizer, out_dir)
        except Exception as e:
            error = e
    _barrier_sharing_errors(error)
    if not builder:
        files = resolve_files(cfg.path, split, what, missing_ok, cfg.train_split)
        out_dir = cache_path(files, cfg, tokenizer, split) if files else None
    return TokenizedData(out_dir) if out_dir else None


# ----------------------------------------------------------------------------------------------------------------
# Mixing: dataset.sources -> one dataset that plan_epoch, collate and Loader read like a TokenizedData

SOURCE_KEYS = ("path", "weight", "name", "src_field", "tgt_field", "messages_field", "chat_mode")
MIX_SALT = 0x6D6978  # the picks' random stream is not plan_epoch's ([seed, epoch])


@dataclass
class Source:
    where: str            # dataset.sources[i], for errors
    name: str
    weight: float
    cfg: DatasetConfig    # the dataset config that reads this source: its path and field overrides, no sources


def source_configs(cfg: DatasetConfig) -> list[Source]:
    """dataset.sources, checked (one-line errors naming the key), each as the DatasetConfig that reads it."""
    if cfg.path:
        raise ValueError("dataset.path and dataset.sources are both set: use one or the other (dataset.path: '' "
                         "with sources; a single dataset can be one entry of sources)")
    if cfg.generate_demo:
        raise ValueError("dataset.generate_demo writes demo data to dataset.path: not usable with dataset.sources")
    out = []
    for i, entry in enumerate(cfg.sources):
        where = f"dataset.sources[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a mapping {{path, weight, ...}}, got {entry!r}")
        for k in entry:
            if k not in SOURCE_KEYS:
                raise ValueError(f"{where}: unknown key '{k}' (valid: {', '.join(SOURCE_KEYS)})")
        path = entry.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError(f"{where}.path is required: a .jsonl file, a directory or hg://org/name")
        weight = entry.get("weight", 1.0)
        try:  # YAML reads 2e-1 as a string
            weight = float(weight) if not isinstance(weight, bool) else None
        except (TypeError, ValueError):
            weight = None
        if weight is None or not 0 < weight < float("inf"):
            raise ValueError(f"{where}.weight must be a number > 0 (2 = every example twice per epoch, 0.5 = a "
                             f"fixed half), got {entry.get('weight')!r}")
        overrides = {k: entry[k] for k in SOURCE_KEYS[3:] if k in entry}
        for k, v in overrides.items():
            if type(v) is not type(getattr(cfg, k)):
                raise ValueError(f"{where}.{k} must be a {type(getattr(cfg, k)).__name__}, got {v!r}")
        name = entry.get("name", os.path.basename(path.rstrip("/")).removesuffix(".jsonl").removesuffix(".parquet"))
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}.name must be a non-empty string, got {name!r}")
        out.append(Source(where, name, weight, dataclasses.replace(cfg, path=path, sources=[], **overrides)))
    names = [s.name for s in out]
    for s in out:
        if names.count(s.name) > 1:  # the logs and the per-source validation losses are keyed by name
            raise ValueError(f"{s.where}: another source is also named {s.name!r}: give each source a distinct name")
    return out


def mix_picks(n: int, weight: float, seed: int, source: int) -> np.ndarray:
    """The examples (indices into a source of n) that every epoch holds: each one int(weight) times, plus a fixed
    random subset for the fraction, round(weight * n) in all. Drawn once per run from the loader seed and the
    source's index alone, so every rank, and a resumed run, draws the same ones. Not redrawn per epoch: a new
    subset would change the epoch's lengths, hence its number of packed batches, and Loader's (epoch, index)
    position and constant batches_per_epoch would no longer name the same batches."""
    whole = int(weight)
    extra = int(weight * n + 0.5) - whole * n
    rng = np.random.default_rng([seed, source, MIX_SALT])
    return np.concatenate([np.tile(np.arange(n), whole), np.sort(rng.choice(n, extra, replace=False))])


class _Concat:
    """1-D arrays read as if laid end to end, for collate's gathers (tokens[idx], mask[idx + 1])."""
    def __init__(self, arrays):
        self.arrays = arrays
        self.starts = np.cumsum([0] + [len(a) for a in arrays])

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, idx):
        idx = np.asarray(idx)
        part = np.searchsorted(self.starts, idx, side="right") - 1
        out = np.empty(idx.shape, self.arrays[0].dtype)
        for p in np.unique(part):
            sel = part == p
            out[sel] = self.arrays[p][idx[sel] - self.starts[p]]
        return out


class MixedData:
    """The sources of one split as one dataset: example i is example local[i] of parts[source[i]]. Like a
    TokenizedData it has lengths, example(i), meta and, for collate, tokens / mask / offsets over the parts' caches
    laid end to end (offsets[i] is where example i starts; the end is offsets[i] + lengths[i] + 1)."""
    def __init__(self, sources: list[Source], parts: list[TokenizedData], picks: list[np.ndarray]):
        self.parts = parts
        self.source = np.concatenate([np.full(len(p), s) for s, p in enumerate(picks)])
        self.local = np.concatenate(picks)
        self.tokens, self.mask = _Concat([p.tokens for p in parts]), _Concat([p.mask for p in parts])
        self.offsets = self.tokens.starts[self.source] + np.concatenate([d.offsets[p] for d, p in zip(parts, picks)])
        self.lengths = np.concatenate([d.lengths[p] for d, p in zip(parts, picks)])
        self.directory = os.path.commonpath([d.directory for d in parts])
        metas = [d.meta for d in parts]
        self.meta = {"files": [f for m in metas for f in m["files"]], "num_read": sum(m["num_read"] for m in metas),
                     "num_examples": len(self.lengths), "num_kept": sum(len(d) for d in parts),
                     "max_id": max(m["max_id"] for m in metas),
                     "num_label_tokens": sum(_label_tokens(d, p) for d, p in zip(parts, picks)),
                     "truncated": sum(m["truncated"] for m in metas),
                     "no_stop_token": sum(m.get("no_stop_token", 0) for m in metas),
                     "drops": dict(sorted(sum((Counter(m["drops"]) for m in metas), Counter()).items())),
                     "build_seconds": round(sum(m["build_seconds"] for m in metas), 3),
                     "sources": [{"name": s.name, "path": s.cfg.path, "weight": s.weight, "kept": len(d),
                                  "count": len(p), "drops": d.meta["drops"], "cache": d.directory}
                                 for s, d, p in zip(sources, parts, picks)]}

    def __len__(self):
        return len(self.lengths)

    def example(self, i) -> tuple[np.ndarray, np.ndarray]:
        return self.parts[self.source[i]].example(self.local[i])


def _label_tokens(d: TokenizedData, picks: np.ndarray) -> int:
    """Supervised tokens (mask[1:] of each example) of the picked examples."""
    whole = len(picks) // len(d)
    if len(picks) == whole * len(d):  # each example `whole` times: no need to read the mask
        return whole * d.meta["num_label_tokens"]
    starts, n = d.offsets[:-1], len(d)
    k = max(1, (1 << 24) // (int(d.lengths.max()) + 1))  # examples per piece: <= 16M mask bytes in int64 at a time
    per_example = np.concatenate([np.add.reduceat(d.mask[starts[a]:d.offsets[min(a + k, n)]].astype(np.int64),
                                                  starts[a:a + k] - starts[a]) for a in range(0, n, k)])
    return int((per_example - d.mask[starts])[picks].sum())


def load_mixture(cfg: DatasetConfig, tokenizer, split: str, rank: int = 0, seed: int = 0,
                 weighted: bool = True) -> MixedData:
    """dataset.sources of one split: the training stream weighted (mix_picks), a validation pass unweighted (also of
    the train split), from the sources that have the split (the others are reported and skipped)."""
    kept = []
    for i, src in enumerate(source_configs(cfg)):
        d = load_data(src.cfg, tokenizer, split, rank, f"{src.where}.path", missing_ok=not weighted)
        if d is None:
            if rank == 0:
                print(f"data[{split}]: source {src.name} ({src.cfg.path}) has no '{split}' split: skipped", flush=True)
            continue
        picks = mix_picks(len(d), src.weight, seed, i) if weighted else np.arange(len(d))
        if not len(picks):
            raise ValueError(f"{src.where}.weight={src.weight:g} keeps 0 of its {len(d)} examples: raise it")
        kept.append((dataclasses.replace(src, weight=src.weight if weighted else 1.0), d, picks))
    if not kept:
        raise FileNotFoundError(f"no entry of dataset.sources has a '{split}' split: add one to a source, or set "
                                "dataset.valid_split: ''")
    return MixedData(*map(list, zip(*kept)))


# ----------------------------------------------------------------------------------------------------------------
# Batching: a plan is a list of global batches, each a list of rows, each a list of example indices

def best_fit_decreasing(lengths: np.ndarray, order: np.ndarray, capacity: int) -> list[list[int]]:
    """Pack examples (longest first, ties in `order`'s order) into rows of `capacity` tokens, each into the row
    it fills best. `free` is sorted (remaining << 32 | row) so bisect finds the tightest row in O(log rows)."""
    rows, free = [], []
    for i in order[np.argsort(-lengths[order], kind="stable")].tolist():
        n = int(lengths[i])
        k = bisect.bisect_left(free, n << 32)
        if k == len(free):
            rows.append([i])
            r, left = len(rows) - 1, capacity - n
        else:
            key = free.pop(k)
            r, left = key & 0xFFFFFFFF, (key >> 32) - n
            rows[r].append(i)
        if left > 0:
            bisect.insort(free, (left << 32) | r)
    return rows


def rows_per_batch(cfg: DatasetConfig) -> int:
    return cfg.max_num_tokens // cfg.max_seq_len if cfg.max_num_tokens else cfg.batch_size or 1


def plan_epoch(lengths: np.ndarray, cfg: DatasetConfig, seed: int, epoch: int, shuffle: bool) -> list:
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    if cfg.packing:
        rows = best_fit_decreasing(lengths, order, cfg.max_seq_len)
        if shuffle:
            rows = [rows[i] for i in rng.permutation(len(rows))]
        r = rows_per_batch(cfg)
        return [rows[i:i + r] for i in range(0, len(rows), r)]
    if cfg.batch_size:
        order = order.tolist()
        return [[[i] for i in order[j:j + cfg.batch_size]] for j in range(0, len(order), cfg.batch_size)]
    # dynamic: ascending length (random among equal lengths), cut when the padded size would exceed the budget
    batches, cur = [], []
    for i in order[np.argsort(lengths[order], kind="stable")].tolist():
        if cur and (len(cur) + 1) * int(lengths[i]) > cfg.max_num_tokens:
            batches.append(cur)
            cur = []
        cur.append([i])
    batches.append(cur)
    return [batches[i] for i in rng.permutation(len(batches))] if shuffle else batches


def plan_by_source(data: MixedData, cfg: DatasetConfig, seed: int, epoch: int, shuffle: bool) -> list:
    """plan_epoch within each source of a mixture, one source after the other: no batch mixes sources, so a
    validation pass can report a loss per source."""
    plan = []
    for s in range(len(data.parts)):
        idx = np.flatnonzero(data.source == s)  # this source's examples, as indices of the mixture
        plan += [[[int(idx[i]) for i in row] for row in batch]
                 for batch in plan_epoch(data.lengths[idx], cfg, seed, epoch, shuffle)]
    return plan


def real_token_fraction(plan, lengths, cfg: DatasetConfig) -> float:
    """Real (non-pad) tokens / padded B*T over a plan."""
    real = padded = 0
    for batch in plan:
        row_lens = [int(lengths[row].sum()) for row in batch]
        real += sum(row_lens)
        padded += len(batch) * (cfg.max_seq_len if cfg.packing else max(row_lens))
    return real / max(padded, 1)


def collate(data: TokenizedData, batch, pad_id: int, packed_len: int | None) -> Batch:
    """Rows of examples -> Batch, in a few vectorized gathers. packed_len: the fixed row length of packed batches
    (then doc_ids are set, and the padding of a row forms its own document so that it attends to nothing real)."""
    docs = np.array([i for row in batch for i in row], np.int64)                   # (D,) examples in row order
    row_of_doc = np.repeat(np.arange(len(batch)), [len(row) for row in batch])     # (D,)
    local_doc = np.concatenate([np.arange(len(row)) for row in batch])            # (D,) index within its row
    n = data.lengths[docs]                                                         # (D,) model tokens per doc
    fill = np.bincount(row_of_doc, weights=n, minlength=len(batch)).astype(np.int64)  # (B,) real tokens per row
    B, T = len(batch), packed_len or int(fill.max())
    start_col = np.cumsum(n) - n                                                   # docs laid end to end ...
    start_col -= (np.cumsum(fill) - fill)[row_of_doc]                              # ... restarting every row
    doc_of_tok = np.repeat(np.arange(len(docs)), n)                                # (N,) N = real tokens
    pos = np.arange(len(doc_of_tok)) - np.repeat(np.cumsum(n) - n, n)              # (N,) position in its doc
    src = data.offsets[docs][doc_of_tok] + pos                                     # (N,) into the flat ids
    rows, cols = row_of_doc[doc_of_tok], start_col[doc_of_tok] + pos
    nxt = data.tokens[src + 1].astype(np.int64)                                    # the shift stays inside a doc
    tokens = np.full((B, T), pad_id, np.int64)
    labels = np.full((B, T), -100, np.int64)
    positions = np.arange(T, dtype=np.int64)[None] - (fill[:, None] if packed_len else 0)  # pads: own positions
    positions = np.broadcast_to(positions, (B, T)).copy()
    doc_ids = np.repeat(np.array([len(row) for row in batch], np.int32)[:, None], T, axis=1)  # pads: own doc
    tokens[rows, cols] = data.tokens[src]
    labels[rows, cols] = np.where(data.mask[src + 1] == 1, nxt, -100)
    positions[rows, cols] = pos
    doc_ids[rows, cols] = local_doc[doc_of_tok]
    return Batch(torch.from_numpy(tokens), torch.from_numpy(labels), torch.from_numpy(positions),
                 torch.from_numpy(doc_ids) if packed_len else None, int(fill.sum()), int((labels != -100).sum()),
                 int((n * n).sum()))


# ----------------------------------------------------------------------------------------------------------------
# Loader

_END = object()
_THREADS = []  # (stop event, thread) of live prefetchers, stopped at exit: a daemon thread killed inside torch aborts


@atexit.register
def _stop_prefetchers():
    for stop, thread in _THREADS:
        stop.set()
        thread.join(timeout=1.0)


def _prefetch(gen, depth, stop: threading.Event):
    """Run generator `gen` in a daemon thread, `depth` items ahead; exceptions re-raise in the consumer."""
    q = queue.Queue(maxsize=depth)

    def put(item) -> bool:  # False once the consumer is gone (stop set): never block on a full queue forever
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            for item in gen:
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # surfaced to the consumer, not lost in the thread
            put(e)

    thread = threading.Thread(target=work, daemon=True, name="data-prefetch")
    _THREADS[:] = [(s, t) for s, t in _THREADS if t.is_alive()] + [(stop, thread)]
    thread.start()
    while True:
        item = q.get()
        if item is _END:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def _filler(batch: Batch) -> Batch:
    """A batch that takes its rank's turn in a collective step but trains nothing (and counts no tokens)."""
    batch.labels.fill_(-100)
    batch.num_label_tokens = batch.num_tokens = batch.doc_len_sq = 0
    return batch


class Loader:
    """Iterator of Batch for one rank (see the module docstring for order, striding and resume)."""

    def __init__(self, data: TokenizedData, cfg: DatasetConfig, rank, world_size, seed, device, infinite, pad_id):
        self.data, self.cfg, self.rank, self.world_size, self.seed = data, cfg, rank, world_size, seed
        self.device, self.infinite, self.pad_id = torch.device(device), infinite, pad_id
        self.shuffle = cfg.shuffle and infinite  # a validation pass is always in file order
        self.by_source = not infinite and isinstance(data, MixedData)  # validation of a mixture: loss per source
        self._plans = {}
        self.batches_per_epoch = len(self.plan(0))  # global batches per epoch
        self.epoch, self.index = 0, 0  # global position of the next batch no rank has taken yet
        self.end = None  # stop_at: the global position (epoch * batches_per_epoch + index) where the data ends
        self._it, self._stop = None, threading.Event()

    def plan(self, epoch) -> list:
        if epoch not in self._plans:  # the producer thread's plans (the consumer only counts batches)
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}  # keep at most 2 epochs
            self._plans[epoch] = plan_by_source(self.data, self.cfg, self.seed, epoch, self.shuffle) if self.by_source \
                else plan_epoch(self.data.lengths, self.cfg, self.seed, epoch, self.shuffle)
            # The count depends only on the multiset of lengths (ties never change it), so it is per-loader.
            assert epoch == 0 or len(self._plans[epoch]) == self.batches_per_epoch
        return self._plans[epoch]

    def _advance(self, epoch, index, k):
        epoch_add, index = divmod(index + k, self.batches_per_epoch)
        return epoch + epoch_add, index

    def stop_at(self, end: int):
        """The training stream ends at global position `end` (regime.num_data_epochs): a step of world x grad_accum
        batches that reaches past it gets fillers there (same shapes, no labels, no tokens counted), so no example is
        trained more often than the epochs say; the position (state_dict) stays at `end`."""
        self.end = end

    def _batches(self, epoch, index):
        packed_len = self.cfg.max_seq_len if self.cfg.packing else None
        pin = self.device.type == "cuda"
        if self.infinite:
            epoch, index = self._advance(epoch, index, self.rank)
            while True:
                batch = collate(self.data, self.plan(epoch)[index], self.pad_id, packed_len)
                if self.end is not None and epoch * self.batches_per_epoch + index >= self.end:
                    batch = _filler(batch)
                yield batch.pin_memory() if pin else batch
                epoch, index = self._advance(epoch, index, self.world_size)
        else:  # one pass; every rank yields ceil(n / W) batches, fillers (labels all -100) pad the last round
            n = self.batches_per_epoch
            for g in range(index + self.rank, index + self.world_size * -(-(n - index) // self.world_size),
                           self.world_size):
                rows = self.plan(epoch)[g % n]
                batch = collate(self.data, rows, self.pad_id, packed_len)
                if self.by_source:
                    batch.source = int(self.data.source[rows[0][0]])
                if g >= n:
                    batch = _filler(batch)
                yield batch.pin_memory() if pin else batch

    def __iter__(self):
        if not self.infinite:  # every `for` over a validation loader is a full pass
            self.load_state_dict({"epoch": 0, "index": 0})
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._stop = threading.Event()
            gen = self._batches(self.epoch, self.index)
            self._it = _prefetch(gen, self.cfg.num_prefetch, self._stop) if self.cfg.num_prefetch > 0 else gen
        batch = next(self._it)
        self.epoch, self.index = self._advance(self.epoch, self.index, self.world_size)
        if self.end is not None and self.epoch * self.batches_per_epoch + self.index > self.end:
            self.epoch, self.index = divmod(self.end, self.batches_per_epoch)
        return batch.to(self.device, non_blocking=True) if self.device.type != "cpu" else batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "batches_per_epoch": self.batches_per_epoch, "examples_per_epoch": len(self.data),
                "mixture": self._mixture(), "batching": self._batching()}

    def _mixture(self) -> list:
        # [name, weight, examples per epoch] of each source: weights swapped between sources of equal size, or
        # sources reordered (the picks are seeded by position), keep the totals but not the data
        return [[s["name"], s["weight"], s["count"]] for s in self.data.meta.get("sources", [])]

    def _batching(self) -> dict:
        return {k: getattr(self.cfg, k) for k in BATCH_OPTIONS}

    # A resume cannot continue another data stream exactly; the way forward is the same for every mismatch
    # (checkpoint.resume=false in the same checkpoint.dir is refused by train.py: it would mix the two runs)
    NEW_RUN = ("start a new run in another checkpoint.dir (to go on from the trained weights: python train.py --export "
               "<old checkpoint.dir> OUT, then model.path=OUT)")

    def load_state_dict(self, sd: dict) -> None:
        mine = (self.seed, self.batches_per_epoch, len(self.data))
        theirs = (sd.get("seed", mine[0]), sd.get("batches_per_epoch", mine[1]), sd.get("examples_per_epoch", mine[2]))
        if theirs != mine:
            raise ValueError(f"data loader state (seed {theirs[0]}, {theirs[1]} batches and {theirs[2]} examples per "
                             f"epoch) does not match this loader (seed {mine[0]}, {mine[1]} batches, {mine[2]} "
                             "examples): the seed, the dataset, its weights or the batching options changed since the "
                             f"checkpoint; restore them to resume, or {self.NEW_RUN}")
        batching = self._batching()
        if changed := [f"dataset.{k}: {v} -> {batching[k]}" for k, v in sd.get("batching", batching).items()
                       if batching.get(k) != v]:  # the same batch count can hide other batches
            raise ValueError(f"data loader state: the batching options changed since the checkpoint "
                             f"({'; '.join(changed)}): the rest of the epoch would repeat and skip examples; "
                             f"resume with the checkpoint's options, or {self.NEW_RUN}")
        if sd.get("mixture", self._mixture()) != self._mixture():
            raise ValueError(f"data loader state: the checkpoint's mixture [name, weight, examples] {sd['mixture']} "
                             f"is not this run's {self._mixture()}: dataset.sources changed since the checkpoint; "
                             f"restore them to resume, or {self.NEW_RUN}")
        self.close()
        self.epoch, self.index = int(sd["epoch"]), int(sd["index"])

    def close(self):
        self._stop.set()
        self._it = None

    def __del__(self):
        if hasattr(self, "_stop"):  # not when __init__ raised before setting it
            self._stop.set()


def check_config(cfg: DatasetConfig) -> None:
    if cfg.sources:
        source_configs(cfg)
    for name in ("source_encode_mode", "target_encode_mode"):
        if getattr(cfg, name) not in ENCODE_MODES:
            raise ValueError(f"dataset.{name}={getattr(cfg, name)!r}: expected one of {', '.join(ENCODE_MODES)}")
    if cfg.train_on not in TRAIN_ON:
        raise ValueError(f"dataset.train_on={cfg.train_on!r}: expected one of {', '.join(TRAIN_ON)}")
    if cfg.max_seq_len < 1 or not 0 <= cfg.min_seq_len <= cfg.max_seq_len:
        raise ValueError(f"dataset: need 0 <= min_seq_len <= max_seq_len and max_seq_len >= 1, got {cfg.min_seq_len}, "
                         f"{cfg.max_seq_len}")
    for name in ("batch_size", "max_num_tokens", "num_prefetch"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"dataset.{name} must be >= 0 (0 = off), got {getattr(cfg, name)}")
    if cfg.num_workers < 0:  # -1 ("all CPUs" elsewhere) would silently mean one process here
        raise ValueError(f"dataset.num_workers must be >= 0 (0 = one per CPU, at most 8), got {cfg.num_workers}")
    if cfg.generate_demo and (cfg.demo_n_train < 1 or cfg.demo_n_valid < 0 or cfg.demo_max_value < 1):
        raise ValueError(f"dataset: need demo_n_train >= 1, demo_n_valid >= 0 and demo_max_value >= 1, got "
                         f"{cfg.demo_n_train}, {cfg.demo_n_valid}, {cfg.demo_max_value}")
    if cfg.batch_size and cfg.max_num_tokens:
        raise ValueError("dataset: set batch_size or max_num_tokens, not both")
    if not cfg.packing and not (cfg.batch_size or cfg.max_num_tokens):
        raise ValueError("dataset: packing is off: set batch_size (static) or max_num_tokens (dynamic batches)")
    if cfg.max_num_tokens and cfg.max_num_tokens < cfg.max_seq_len:
        raise ValueError(f"dataset.max_num_tokens={cfg.max_num_tokens} < max_seq_len={cfg.max_seq_len}: "
                         "a longest example would not fit in a batch")


def build_loader(cfg: DatasetConfig, tokenizer, split: str, rank=0, world_size=1, seed=0, device="cpu",
                 infinite=True) -> Loader:
    check_config(cfg)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if cfg.generate_demo:
        demo = dict(n_train=cfg.demo_n_train, n_valid=cfg.demo_n_valid, max_value=cfg.demo_max_value)
        marker = os.path.join(cfg.path, "demo.json")  # our own demo data is regenerated when its options change
        stale = os.path.isfile(marker) and _read_json(marker) != dict(demo, format=DEMO_FORMAT)
        error = None
        if _is_builder(rank) and (not _has_data(cfg.path) or stale):
            try:
                make_demo_data(cfg.path, seed=0, **demo)
            except Exception as e:
                error = e
        _barrier_sharing_errors(error)
    # the training stream is weighted; a validation pass is not (also of the train split)
    data = load_mixture(cfg, tokenizer, split, rank, seed, weighted=infinite and split == cfg.train_split) \
        if cfg.sources else \
        load_data(cfg, tokenizer, split, rank)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id  # pads are never labels
    loader = Loader(data, cfg, rank, world_size, seed, device, infinite, pad_id)
    if rank == 0:
        m = data.meta
        mode = f"packed {rows_per_batch(cfg)}x{cfg.max_seq_len}" if cfg.packing else \
            f"static {cfg.batch_size}" if cfg.batch_size else f"dynamic {cfg.max_num_tokens} tokens"
        frac = real_token_fraction(loader.plan(0), data.lengths, cfg)
        weighted = f" ({m['num_kept']} kept, weighted)" if m.get("num_kept", len(data)) != len(data) else ""
        print(f"data[{split}]: {len(data)} examples{weighted} of {m['num_read']} read from {len(m['files'])} file(s), "
              f"dropped {m['drops'] or 'none'}; {int(data.lengths.sum())} tokens, {m['num_label_tokens']} supervised; "
              f"{loader.batches_per_epoch} {mode} batches/epoch, {frac:.1%} real tokens; cache {data.directory}",
              flush=True)
        for src in m.get("sources", []):
            print(f"  source {src['name']}: {src['kept']} examples kept x weight {src['weight']:g} = {src['count']} "
                  f"per epoch; dropped {src['drops'] or 'none'}; {src['path']}; cache {src['cache']}", flush=True)
        if m.get("no_stop_token"):  # counted per example by the cache build
            stops = ", ".join(tokenizer.decode([i]) for i in tokenizer.stop_ids)
            print(f"data[{split}]: WARNING: {m['no_stop_token']} of {m.get('num_kept', len(data))} examples end their "
                  f"supervised tokens on something else than a stop token ({stops}): a model trained on them does "
                  "not learn to stop; check dataset.target_encode_mode (prompt_response appends eos) or the chat "
                  "template", flush=True)
    return loader


# ----------------------------------------------------------------------------------------------------------------
# Demo task (CPU demo): GSM8K-format addition

def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _has_data(path):
    return os.path.isfile(path) or (os.path.isdir(path) and bool(glob.glob(os.path.join(path, "**", "*.jsonl"),
                                                                          recursive=True)))


DEMO_FORMAT = 2  # bump when demo_answer changes, so old demo data on disk is rewritten


def demo_answer(a: int, b: int, width: int) -> str:
    """The demo's worked answer: column addition from the ones digit up, one line per column with its carry, then
    the GSM8K-style final line. 49 + 97 (width 2) -> "9+7+0=16\n4+9+1=14\n#### 146". Every line is a one-digit fact
    plus copies, which a tiny model learns in minutes; a bare "= 146" asks it to add in one step and it does not."""
    da, db = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
    lines, carry = [], 0
    for x, y in zip(da, db):
        s = int(x) + int(y) + carry
        lines.append(f"{x}+{y}+{carry}={s}")
        carry = s // 10
    return "\n".join(lines) + f"\n#### {a + b}"


def make_demo_data(directory, seed=0, n_train=4000, n_valid=200, max_value=999):
    """Write train.jsonl / valid.jsonl of column-addition problems in GSM8K format: {"question": "What is 49 + 97?",
    "answer": "9+7+0=16\n4+9+1=14\n#### 146"} (see demo_answer). Train and valid questions are disjoint."""
    rng = random.Random(seed)
    pairs, seen = [], set()
    n = min(n_train + n_valid, (max_value + 1) ** 2)
    while len(pairs) < n:
        a, b = rng.randint(0, max_value), rng.randint(0, max_value)
        if (a, b) not in seen:
            seen.add((a, b))
            pairs.append((a, b))
    width = len(str(max_value))
    os.makedirs(directory, exist_ok=True)
    for split, chunk in (("train", pairs[n_valid:]), ("valid", pairs[:n_valid])):
        tmp = os.path.join(directory, f".{split}.jsonl.tmp{os.getpid()}")
        with open(tmp, "w") as f:
            for a, b in chunk:
                qa = {"question": f"What is {a} + {b}?", "answer": demo_answer(a, b, width)}
                f.write(json.dumps(qa) + "\n")
        os.replace(tmp, os.path.join(directory, f"{split}.jsonl"))
    with open(os.path.join(directory, "demo.json"), "w") as f:
        json.dump(dict(n_train=n_train, n_valid=n_valid, max_value=max_value, format=DEMO_FORMAT), f)


# ----------------------------------------------------------------------------------------------------------------
# Dataset report: python data.py CONFIG [key=value ...]

def main(argv):
    from train import load_config, one_line_errors  # the config loader and the CLI error style, written once
    if not argv or argv[0] in ("-h", "--help"):
        sys.exit("usage: python data.py CONFIG.yaml [section.key=value ...]: what the dataset becomes (counts, drops "
                 "by reason, padding of each batching mode, the first examples with their supervised tokens marked)")
    with one_line_errors("config error"):
        c = load_config(argv)
    with one_line_errors():
        report(c)


def report(c):
    """c: train.Config. Builds (or opens) the token caches of the train and validation splits and prints them."""
    from tokenizer import visualize
    from train import load_tokenizer  # hg:// paths resolved as train.py does
    cfg = c.dataset
    tokenizer = load_tokenizer(c.tokenizer.path, c.model.path, c.tokenizer.chat_format)
    color = sys.stdout.isatty()
    print("supervised tokens are shown " + ("on green" if color else "between \u00ab and \u00bb"))
    for split, infinite in [(cfg.train_split, True)] + ([(cfg.valid_split, False)] if cfg.valid_split else []):
        loader = build_loader(cfg, tokenizer, split, infinite=infinite)
        data, m = loader.data, loader.data.meta
        kept = f"{len(data)} kept" if m.get("num_kept", len(data)) == len(data) else \
            f"{m['num_kept']} kept, {len(data)} per epoch with the weights"
        print(f"\n== {split}: {m['num_read']} examples read, {kept} ({m['truncated']} truncated); "
              f"dropped by reason: {m['drops'] or 'none'}")
        print(f"   {int(data.lengths.sum())} tokens ({m['num_label_tokens']} supervised), "
              f"mean {data.lengths.mean():.1f}, max {data.lengths.max()} per example; "
              f"cache built in {m['build_seconds']} s")
        bs, budget = cfg.batch_size or 16, cfg.max_num_tokens or 16 * cfg.max_seq_len
        modes = {f"static {bs}": dict(packing=False, batch_size=bs, max_num_tokens=0),
                 f"dynamic {budget}": dict(packing=False, batch_size=0, max_num_tokens=budget),
                 f"packed {rows_per_batch(cfg)}x{cfg.max_seq_len}": dict(packing=True)}
        for name, over in modes.items():
            c2 = dataclasses.replace(cfg, **over)
            # as the loader plans it: a mixture's validation batches one source each, a validation pass unshuffled
            plan = plan_by_source(data, c2, 0, 0, False) if loader.by_source else \
                plan_epoch(data.lengths, c2, 0, 0, loader.shuffle)
            pad = 1 - real_token_fraction(plan, data.lengths, c2)
            print(f"   {name:>16}: {len(plan)} batches/epoch, padding {pad:.1%}")
        for i in range(min(3, len(data))):
            ids, mask = data.example(i)
            print(f"--- example {i} ({len(ids)} ids, {int(mask[1:].sum())} supervised):")
            # the first id is never a target (nothing predicts it), whatever its mask says
            print(visualize(ids.tolist(), [0] + mask[1:].tolist(), tokenizer, color))


if __name__ == "__main__":
    main(sys.argv[1:])
