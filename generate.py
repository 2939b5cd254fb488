"""Generation with a preallocated KV cache, and GSM8K evaluation.

    python generate.py MODEL --prompt "Once upon a time"                      # greedy (temperature 0)
    python generate.py MODEL --chat --system "Be brief." --prompt "Hi!" --temperature 0.7 --top-k 20 --top-p 0.9 --seed 0
    python generate.py MODEL --gsm8k test.jsonl --limit 200 --batch-size 16 --output pred.jsonl
    python generate.py MODEL --gsm8k test.jsonl --batch-size 16 --compile   # compiled decode step (module doc)

MODEL is a Hugging Face directory (config.json + safetensors, or Meta consolidated.*.pth + params.json; tokenizer
files beside them) or hg://org/name (its safetensors and tokenizer files, fetched like train.py's model.path; needs
huggingface_hub), a train.py checkpoint (OUT/checkpoints/step_N/), or a train.py output directory OUT (the newer
of OUT/hf/ and its newest complete checkpoint). The tokenizer is --tokenizer, the directory's tokenizer files, or
the run's config (tokenizer.path, e.g. "byte"). Only the completion is printed (the stop token that ended it is
not). A GSM8K run prints what it skipped and its strict-match accuracy (see evaluate_gsm8k); its last line is
`accuracy: X.XXXX (k/n evaluated; flexible-extract: ...)`.

Prompt formats. --chat: tokenizer.render_chat([system?, user], add_generation_prompt=True) (--no-thinking: Qwen3's
non-thinking prompt, enable_thinking=False). Without it the prompt is what data.py feeds a src/tgt example before
its target: bos + encode(question) (source_encode_mode "prompt"), so a model fine-tuned with src_field=question,
tgt_field=answer continues with its answer + eos. For a train.py run, the default is how the run trained: its
dataset.chat_mode (--chat / --no-chat override it) and its dataset.source_encode_mode. --prompt may be repeated:
the prompts are generated as one batch.

Batching: prompts of different lengths are right-padded for one prefill; every sequence then continues at its
own position (cache slot = position; pad slots are overwritten before any query can see them), and sequences
that stop are dropped from the batch. Under FSDP, every rank runs the same number of forward calls (see
`generate(sync_ranks=...)` and `evaluate_gsm8k`).

--compile (`generate(compile=True)`): the one-token decode step (the whole model forward) is one torch.compile'd
graph with static shapes, as in gpt-fast: stopped sequences stay in the batch (their tokens are ignored) and the
KV cache length is rounded up to a multiple of CACHE_MULTIPLE, so one graph serves a whole generation and later
calls with the same batch size and rounded length. CUDA graphs ("reduce-overhead") on CUDA, inductor's default
mode on CPU. The prefill runs eagerly (its length varies).
"""
import argparse
import contextlib
import itertools
import json
import math
import re
import sys
import weakref
from decimal import Decimal, InvalidOperation
from pathlib import Path

import torch
import torch.distributed as dist

import data
import model as model_lib
import tokenizer as tokenizer_lib

# ----------------------------------------------------------------------------------------------------------------
# decoding


def compute_dtype(model) -> torch.dtype:
    """The dtype activations (and so k/v) have: autocast's dtype (train.py on one process), FSDP2 mixed precision's
    mp_policy.param_dtype (the sharded parameters stay fp32; FSDP2 has no public getter for its policy), else the
    parameters' own dtype."""
    from torch.distributed.fsdp import FSDPModule
    device_type = next(model.parameters()).device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if isinstance(model, FSDPModule):
        param_dtype = model._get_fsdp_state()._mp_policy.param_dtype
        if param_dtype is not None:
            return param_dtype
    return next(model.parameters()).dtype


def sample(logits, temperature, top_p, generator, vocab_size=None, top_k=0):
    """logits (B, V) -> next ids (B,). Greedy at temperature 0; otherwise sampling from sampling_probs(). Ids >=
    vocab_size (a model's embedding table padded past the tokenizer's vocabulary) are never chosen: the tokenizer
    could not decode them."""
    if vocab_size is not None:
        logits = logits[:, :vocab_size]
    if temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(sampling_probs(logits, temperature, top_p, top_k), 1, generator=generator).squeeze(-1)


def sampling_probs(logits, temperature, top_p=1.0, top_k=0):
    """logits (B, V) -> the (unnormalized) distribution sampled from, in transformers' order: temperature, then the
    top_k most likely tokens (0 = all), then of those the nucleus (Holtzman et al. 2019): the smallest set of most
    likely tokens whose renormalized probability reaches top_p."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if 0 < top_k < probs.size(-1):  # tokens tied with the k-th stay, as in transformers' TopKLogitsWarper
        probs = probs.masked_fill(probs < probs.topk(top_k, dim=-1).values[:, -1:], 0.0)
    if top_p < 1.0:
        sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
        kept = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
        # drop a token when the tokens ranked above it already reach top_p (the top token always stays)
        sorted_probs[kept.cumsum(dim=-1) - kept >= top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, sorted_ids, sorted_probs)
    return probs


CACHE_MULTIPLE = 256  # compile=True: KV cache lengths round up to this, so prompts of other lengths reuse the graph
RECOMPILE_LIMIT = 64  # compile=True: graphs (batch size x cache length) one process may compile
# compile=True: each model's last KV cache, reused while its shape fits. CUDA graphs replay on the addresses they
# recorded; a new cache in every call would make them re-record.
_STATIC_CACHES = weakref.WeakKeyDictionary()


def cache_length(needed: int, max_seq_len: int, compile: bool) -> int:
    """KV cache slots for `needed` tokens (longest prompt + max_new_tokens), never past the model's context. A
    compiled decode step's shapes include the cache length: compile rounds it up to a multiple of CACHE_MULTIPLE."""
    if compile:
        needed = -(-needed // CACHE_MULTIPLE) * CACHE_MULTIPLE
    return min(needed, max_seq_len)


def _static_cache(model, batch_size: int, max_len: int, device, dtype) -> model_lib.KVCache:
    """The model's KV cache of this shape for compile=True: the last one if it fits (zeroed), else a new one."""
    cache = _STATIC_CACHES.get(model)
    shape = (batch_size, model.args.n_kv_heads, max_len, model.args.head_dim)
    if cache is not None and cache.k[0].shape == shape and cache.k[0].dtype == dtype and cache.k[0].device == device:
        cache.zero_()  # stale slots are masked, but a stale inf would still turn 0 * inf into NaN
        return cache
    cache = model_lib.KVCache(model.args, batch_size, max_len, device, dtype)
    for t in cache.k + cache.v:
        torch._dynamo.mark_static_address(t)  # CUDA graphs read and write it in place instead of copying it
    _STATIC_CACHES[model] = cache
    return cache


def _decode_step(model, tokens, positions, cache):
    """One new token per row: tokens, positions (B, 1) -> logits (B, V). What compile=True compiles."""
    return model(tokens, positions, cache=cache)[:, -1]


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, stop_ids, temperature=0.0, top_p=1.0,
             seed=None, vocab_size=None, sync_ranks=False, compile=False, top_k=0) -> list[list[int]]:
    """Complete each prompt (token ids); returns the completions only, without the stop token that ended them.
    temperature 0 is greedy; otherwise temperature, top_k, top_p sample as sampling_probs() says.
    A sequence also ends after max_new_tokens or at the model's context (max_seq_len). vocab_size: see sample().
    sync_ranks: the model is sharded (FSDP), so all ranks of the default process group must call forward equally
    often: the loop continues until every rank's sequences are done (one all-reduce per step).
    compile: decode with one compiled graph (see the module doc); greedy ids equal eager's. Sampling draws for the
    stopped rows too, so seeded samples differ from eager's once a row has stopped. The model's last KV cache
    stays allocated for the next call."""
    args = model.args
    device = next(model.parameters()).device
    if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1 and top_k >= 0, got temperature={temperature} "
                         f"top_p={top_p} top_k={top_k}")
    for i, p in enumerate(prompts):
        if not 0 < len(p) < args.max_seq_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens; it must have 1 to {args.max_seq_len - 1} "
                             f"(the model's context is max_seq_len={args.max_seq_len})")
    from torch.distributed.fsdp import FSDPModule
    if compile and isinstance(model, FSDPModule):
        raise ValueError("compile=True needs an unsharded model (FSDP-sharded generation runs eagerly)")
    if max_new_tokens < 1 or not prompts:
        return [[] for _ in prompts]
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed) if seed is not None else generator.seed()
    stop_ids = set(stop_ids)

    B, T = len(prompts), max(len(p) for p in prompts)
    cache_len = cache_length(T + max_new_tokens, args.max_seq_len, compile)
    if compile:
        cache = _static_cache(model, B, cache_len, device, compute_dtype(model))
        # fullgraph: a graph break would be an error, not a silent split; dynamic=False: one graph per batch size
        # and cache length. Dynamo keeps compiled graphs per function, so later calls reuse them.
        decode_step = torch.compile(_decode_step, fullgraph=True, dynamic=False,
                                    mode="reduce-overhead" if device.type == "cuda" else None)
        # Dynamo's recompile_limit (8 graphs per function by default) would make the 9th shape a hard error under
        # fullgraph: raised while decoding.
        limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        recompile_limit = torch._dynamo.config.patch(recompile_limit=limit)
    else:
        cache = model_lib.KVCache(args, B, cache_len, device, compute_dtype(model))
        decode_step, recompile_limit = _decode_step, contextlib.nullcontext()
    tokens = torch.zeros(B, T, dtype=torch.long)  # right-padded; pad id 0 is never attended to (see module doc)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = torch.tensor(p)
    positions = torch.arange(T, device=device).expand(B, T)
    last = torch.tensor([len(p) - 1 for p in prompts], device=device)  # each prompt's last real token
    logits = model(tokens.to(device), positions, cache=cache, logits_at=last)  # (B, V)

    completions = [[] for _ in prompts]
    rows = list(range(B))  # rows[j]: the prompt whose sequence is in batch row j (None: a stopped or dummy row)
    pos = [len(p) for p in prompts]  # where each row's next input token goes (cache slot = position); on the host
    with recompile_limit:
        for step in range(max_new_tokens):
            next_ids = sample(logits, temperature, top_p, generator, vocab_size, top_k)
            keep = []  # batch rows that go on
            for j, (row, t) in enumerate(zip(rows, next_ids.tolist())):  # one host sync per step, like HF's stopping
                if row is None or t in stop_ids:
                    continue
                completions[row].append(t)
                if step + 1 < max_new_tokens and pos[j] + 1 < args.max_seq_len:  # prompt + completion <= context
                    keep.append(j)
            if step + 1 == max_new_tokens or not _any_rank(bool(keep), sync_ranks):
                break
            if compile:  # static shapes: stopped rows stay in the batch, and what they produce is ignored
                going = set(keep)
                rows = [row if j in going else None for j, row in enumerate(rows)]
            else:
                if not keep:  # done here but not on another rank: one dummy row keeps this rank's forward calls in step
                    keep, rows = [0], [None] * len(rows)
                if len(keep) < len(rows):  # drop finished sequences so they stop costing compute
                    idx = torch.tensor(keep, device=device)
                    cache.select(idx)
                    rows, next_ids, pos = [rows[j] for j in keep], next_ids[idx], [pos[j] for j in keep]
            # min() only ever moves a stopped or dummy row (its output is ignored): real rows stay below cache_len
            positions = torch.tensor([[min(p, cache_len - 1)] for p in pos], device=device)  # (b, 1)
            if compile and device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # the last step's logits (CUDA graph memory) are consumed
            logits = decode_step(model, next_ids[:, None], positions, cache)  # (b, V)
            pos = [p + 1 for p in pos]
    return completions


def _any_rank(flag: bool, sync_ranks: bool) -> bool:
    if not sync_ranks:
        return flag
    t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.item() > 0


# ----------------------------------------------------------------------------------------------------------------
# GSM8K

# A number as GSM8K and models write it: optional sign (not the minus of "16-3"), optional '$', thousands commas
# ("1,000"), optional decimals. A trailing period is sentence punctuation, not a decimal point.
NUMBER = re.compile(r"(?:(?<![\w.)])-)?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?:(?<![\w.)])-)?\$?\.\d+")


def normalize_number(text: str) -> str | None:
    """'$1,000.50' -> '1000.5', '2.50' -> '2.5', '3.0' -> '3', '-3' -> '-3'; None when text is not a number."""
    s = text.replace(",", "").replace("$", "").replace(" ", "")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def extract_answer(text: str, strict: bool = False) -> str | None:
    """The number right after the first '####' (GSM8K's answer convention; lm-eval's "strict-match"); unless strict,
    else the last number in the text (lm-eval's "flexible-extract": a model that answers "The answer is 18." scores,
    and so does a completion cut off at max_new_tokens whose last intermediate number happens to be the answer).
    Normalized by normalize_number, so '1,000', '$1000' and '1000.00' compare equal. None when there is none."""
    marker = text.find("####")
    if marker >= 0:
        m = NUMBER.search(text, marker + 4)
        if m and not text[marker + 4:m.start()].strip():  # the number must come right after '####'
            return normalize_number(m.group())
    if strict:
        return None
    numbers = NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def question_and_gold(example: dict) -> tuple[str, str | None]:
    """GSM8K rows are {"question", "answer"}; SFT-format rows are {"src", "tgt"}. The gold answer is strict: the
    number after '####' (None without one; the last number of a worked solution would be a wrong gold)."""
    for q, a in (("question", "answer"), ("src", "tgt")):
        if q in example and a in example:
            return example[q], extract_answer(example[a], strict=True)
    raise ValueError(f"GSM8K example needs 'question'/'answer' or 'src'/'tgt' fields, got {sorted(example)}")


def load_jsonl(path, limit: int | None = None) -> list[dict]:
    """GSM8K-format rows (the first `limit`), read by data.py's reader (one-line errors naming file:line, BOM, CRLF)."""
    if Path(path).is_dir():
        raise IsADirectoryError(f"GSM8K path {path} is a directory; a .jsonl file is expected "
                                f"(e.g. {Path(path) / 'test.jsonl'})")
    if not Path(path).is_file():
        raise FileNotFoundError(f"GSM8K file not found: {path}")
    records = itertools.islice(data.read_records(str(path)), limit)
    return [gsm8k_row(data.parse_record(where, raw), where) for where, raw in records]


def gsm8k_row(row: dict, where: str, fields: tuple[str, str] | None = None) -> dict:
    """{"question", "answer"} of a record: its `fields` (question, answer), else GSM8K's names or src/tgt. Both must
    be strings, checked when the file is read (naming file:line), not when an evaluation reaches the row."""
    pairs = [fields] if fields else [("question", "answer"), ("src", "tgt")]
    q, a = next((p for p in pairs if p[0] in row and p[1] in row), pairs[0])
    return {"question": data.string_field(row, q, where), "answer": data.string_field(row, a, where)}


def build_prompt(tokenizer, question: str, chat: bool, system: str | None = None,
                 source_encode_mode: str = "prompt", chat_kwargs: dict | None = None) -> list[int]:
    """The token ids a model is trained to answer: the chat rendering with the assistant header (--chat), or
    data.py's src encoding (dataset.source_encode_mode; 'prompt' = bos + text, the default). chat_kwargs: the chat
    format's options (qwen3: enable_thinking=False for the prompt of Qwen3's non-thinking mode)."""
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        return tokenizer.render_chat(messages, add_generation_prompt=True, **(chat_kwargs or {}))[0]
    if system:
        raise ValueError("--system needs --chat (a plain prompt has no system turn)")
    return data.encode_text(tokenizer, question, source_encode_mode)


def check_token_ids(model, tokenizer, prompts: list[list[int]]):
    """Every prompt id and stop id must index the model's embedding table: a tokenizer of another model would
    otherwise end in an IndexError deep inside the forward (or in stop ids the model can never produce)."""
    vocab_size = model.args.vocab_size
    worst = max((max(p) for p in prompts if p), default=-1), max(tokenizer.stop_ids, default=-1)
    for max_id, what in zip(worst, ("a prompt", "a stop id")):
        if max_id >= vocab_size:
            raise ValueError(f"token id {max_id} ({what}) does not fit the model's vocab_size={vocab_size}: the "
                             f"tokenizer ({tokenizer.vocab_size} ids) does not belong to this model; use the model's own")


# Why evaluate_gsm8k leaves an example out (the counts are its result's "skipped"). An over-long prompt is left out
# rather than an error: one long question in an evaluation set would otherwise end the evaluation, and in train.py
# the training run.
SKIP_REASONS = {"no_gold": "answer without '#### N'",
                "empty_prompt": "the question encodes to no tokens",
                "prompt_too_long": "no room for one new token within the model's max_seq_len"}


def evaluate_gsm8k(model, tokenizer, examples: list[dict], chat: bool, batch_size=16, max_new_tokens=256,
                   limit=None, system=None, source_encode_mode="prompt", compile=False, chat_kwargs=None) -> dict:
    """Greedy exact-match accuracy on GSM8K-format examples ({"question", "answer"} or {"src", "tgt"}).
    Examples are skipped and counted by reason (SKIP_REASONS) when their answer has no strict '#### N' gold or their
    prompt leaves no room for a new token; accuracy, correct and total are over the examples evaluated (accuracy is
    NaN when none is). A prediction is extract_answer's flexible-extract (the number after '####', else the last
    number); strict_correct counts those with the gold right after '####' (lm-eval's two gsm8k scores).
    With torch.distributed initialized (FSDP-sharded model or not), call it on EVERY rank with the same examples:
    rank r decodes batches r, r+W, ... (a rank short of a batch decodes a filler), all ranks make the same number
    of forward calls, and every rank returns the same global result. compile: see generate()."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    examples = examples[:limit] if limit is not None else examples
    if not examples:
        raise ValueError("evaluate_gsm8k got no examples")
    questions, golds = zip(*(question_and_gold(ex) for ex in examples))
    prompts = [build_prompt(tokenizer, q, chat, system, source_encode_mode, chat_kwargs) for q in questions]
    skip = {}  # example index -> reason
    for i, (gold, p) in enumerate(zip(golds, prompts)):
        reason = "no_gold" if gold is None else "empty_prompt" if not p else \
            "prompt_too_long" if len(p) >= model.args.max_seq_len else None
        if reason:
            skip[i] = reason
    evaluated = [i for i in range(len(prompts)) if i not in skip]
    check_token_ids(model, tokenizer, [prompts[i] for i in evaluated])
    # batch prompts of similar length together: less padding in the prefill
    order = sorted(evaluated, key=lambda i: len(prompts[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    was_training = model.training
    model.eval()
    local = {}  # example index -> completion ids
    for k in range(math.ceil(len(batches) / world_size)):
        b = rank + k * world_size
        batch = batches[b] if b < len(batches) else batches[0][:1]  # filler: same forward count on every rank
        # compile: the last, smaller batch is topped up with copies (outputs ignored) to reuse the full batch's graph
        run = batch + batch[:1] * (batch_size - len(batch)) if compile and len(batches) > 1 else batch
        outs = generate(model, [prompts[i] for i in run], max_new_tokens, tokenizer.stop_ids,
                        vocab_size=tokenizer.vocab_size, sync_ranks=world_size > 1, compile=compile)[:len(batch)]
        if b < len(batches):
            local.update(zip(batch, outs))
    model.train(was_training)
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, local)
        local = {i: out for part in gathered for i, out in part.items()}
    predictions = []  # one per example, skipped ones too (correct None: not scored), so a predictions file shows them
    for i, (q, gold) in enumerate(zip(questions, golds)):
        if i in skip:
            predictions.append({"index": i, "question": q, "gold": gold, "prediction": None, "correct": None,
                                "strict_correct": None, "completion": None, "skipped": skip[i]})
            continue
        completion = tokenizer.decode(local[i])
        pred = extract_answer(completion)
        predictions.append({"index": i, "question": q, "gold": gold, "prediction": pred, "correct": pred == gold,
                            "strict_correct": extract_answer(completion, strict=True) == gold,
                            "completion": completion, "skipped": None})
    scored = [p for p in predictions if p["skipped"] is None]
    correct = sum(p["correct"] for p in scored)
    return {"accuracy": correct / len(scored) if scored else math.nan, "correct": correct, "total": len(scored),
            "strict_correct": sum(p["strict_correct"] for p in scored),
            "skipped": {reason: sum(r == reason for r in skip.values()) for reason in SKIP_REASONS},
            "predictions": predictions}


def summary_lines(result: dict) -> list[str]:
    """evaluate_gsm8k's result in words: what was skipped and why (if anything), the strict-match accuracy, and last
    `accuracy: X.XXXX (k/n evaluated; flexible-extract: ...)`."""
    n, skipped = result["total"], {r: k for r, k in result["skipped"].items() if k}
    lines = []
    if skipped:
        lines.append(f"skipped {sum(skipped.values())} of {n + sum(skipped.values())} examples: "
                     + ", ".join(f"{k} {r} ({SKIP_REASONS[r]})" for r, k in skipped.items()))
    strict = result["strict_correct"] / n if n else math.nan
    lines.append(f"strict-match accuracy (only a number right after '####' counts): {strict:.4f} "
                 f"({result['strict_correct']}/{n})")
    lines.append(f"accuracy: {result['accuracy']:.4f} ({result['correct']}/{n} evaluated; flexible-extract: the "
                 f"number after '####', else the last number)")
    return lines


def write_predictions(path, predictions: list[dict]):
    """One JSON line per example: index, question, gold, prediction, correct, strict_correct, completion, skipped
    (a skipped example's reason, for which the others but index, question and gold are null)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for p in predictions:
            f.write(json.dumps(p) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# loading


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "params.json").is_file()


def resolve_model_dir(path) -> Path:
    """MODEL -> what to load: an HF (or Meta) directory or a train.py checkpoint (step_N/ with trainer_state.pt) as
    is; for a train.py output directory, the newer of its HF export (hf/) and its newest complete checkpoint;
    hg://org/name: its snapshot in the local Hub cache (downloaded first if need be)."""
    import train  # lazily: only this path needs train.py's checkpoint layout
    path = train.resolve_path(str(path), "MODEL")  # as model.path; on the str: Path() would collapse hg:// to hg:/
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    if _is_hf_dir(path) or (path / "trainer_state.pt").is_file():
        return path
    found = [p / "config.json" for p in [path / "hf"] if _is_hf_dir(p)]
    found += [p / "trainer_state.pt" for p in train.complete_checkpoints(path / "checkpoints")[-1:]]
    if not found:
        raise FileNotFoundError(f"{path} is not a model directory: no config.json / params.json (HF, Meta), "
                                f"trainer_state.pt (checkpoint), hf/ or checkpoints/step_N/ (train.py output)")
    return max(found, key=lambda f: f.stat().st_mtime).parent


def run_config(model_dir: Path) -> dict | None:
    """The resolved config of the train.py run of this checkpoint or export (its tokenizer, model and dataset
    sections), if known."""
    if (model_dir / "trainer_state.pt").is_file():
        cfg = torch.load(model_dir / "trainer_state.pt", weights_only=False)["config"]
    elif (model_dir.parent / "config.yaml").is_file() and any((model_dir.parent / f).exists()
                                                               for f in ("metrics.jsonl", "checkpoints")):
        import yaml  # an export inside a train.py output directory (<run>/hf, <run>/hf_step300): the run's config
        cfg = yaml.safe_load(open(model_dir.parent / "config.yaml"))
    else:
        return None
    if not (isinstance(cfg, dict) and all(isinstance(cfg.get(k), dict) for k in ("tokenizer", "model"))):
        return None  # a YAML file beside the model that is not a train.py run config
    return cfg


def _run_tokenizer(cfg: dict | None) -> tuple[str, str, str] | None:
    """(tokenizer.path, model.path, tokenizer.chat_format) of a run config."""
    if cfg is None:
        return None
    return cfg["tokenizer"].get("path") or "", cfg["model"].get("path") or "", cfg["tokenizer"].get("chat_format") or ""


def load_model(path, device="cpu", dtype=torch.float32, tokenizer_path=None):
    """(model in eval mode, tokenizer) from MODEL (see resolve_model_dir). The tokenizer: tokenizer_path if given;
    else the tokenizer files in an HF directory; else the training run's tokenizer (train.py's load_tokenizer: its
    tokenizer.path or model.path; the byte tokenizer has no files). The run's tokenizer.chat_format applies unless
    tokenizer_path is given. hg://org/name (MODEL or tokenizer_path) is fetched from the Hub (a tokenizer: its small
    files only)."""
    import train
    model_dir = resolve_model_dir(path)
    run = _run_tokenizer(run_config(model_dir))
    if tokenizer_path is not None:
        tokenizer = tokenizer_lib.load_tokenizer(str(train.resolve_path(tokenizer_path, "--tokenizer",
                                                                        tokenizer_only=True)))
    elif _is_hf_dir(model_dir) and any((model_dir / f).is_file() for f in ("tokenizer.model", "tokenizer.json",
                                                                           "vocab.json")):
        tokenizer = tokenizer_lib.load_tokenizer(str(model_dir), (run[2] or None) if run else None)
    elif run is not None:
        tokenizer = train.load_run_tokenizer(*run)
    else:
        raise FileNotFoundError(f"{model_dir} has no tokenizer files (tokenizer.model, tokenizer.json, vocab.json)"
                                f" and no train.py config names one: pass --tokenizer PATH (or 'byte')")
    if _is_hf_dir(model_dir):
        return model_lib.load_hf(model_dir, dtype=dtype, device=device).eval(), tokenizer
    model, _ = train.load_checkpoint_model(model_dir)  # a DCP checkpoint, resharded to this one process
    return model.to(device=device, dtype=dtype).eval(), tokenizer


# ----------------------------------------------------------------------------------------------------------------
# command line


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate with a KV cache, or evaluate GSM8K accuracy.")
    parser.add_argument("model", help="HF directory, hg://org/name, train.py output directory, or train.py checkpoint "
                                      "directory")
    parser.add_argument("--prompt", action="append", help="text to complete (or the user turn with --chat); repeat "
                                                           "it for several prompts, generated as one batch")
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="render with the model's chat format (default: as the train.py run trained, its "
                             "dataset.chat_mode; else off)")
    parser.add_argument("--no-thinking", action="store_true",
                        help="Qwen3: the non-thinking prompt (apply_chat_template(enable_thinking=False))")
    parser.add_argument("--system", help="system message (with --chat)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the K most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="then from the nucleus of probability P")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--gsm8k", metavar="FILE", help="GSM8K-format JSONL to evaluate (greedy)")
    parser.add_argument("--limit", type=int, default=None, help="first N GSM8K examples")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output", metavar="PRED.jsonl", help="write per-example GSM8K predictions")
    parser.add_argument("--tokenizer", help="tokenizer path or 'byte' (default: the model's, see load_model)")
    parser.add_argument("--compile", action="store_true",
                        help="decode with one torch.compile'd graph (compiling takes seconds to minutes at the start)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    args = parser.parse_args(argv)
    if (args.prompt is None) == (args.gsm8k is None):
        parser.error("give exactly one of --prompt TEXT or --gsm8k FILE")
    if args.batch_size < 1 or args.max_new_tokens < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--batch-size, --max-new-tokens and --limit must be >= 1")
    # options that would be ignored are errors, not a run that is not what was asked
    sampling = ("--temperature", "--top-k", "--top-p", "--seed")
    ignored = {o: "--gsm8k (greedy evaluation)" for o in sampling} if args.gsm8k else \
        {**{o: "--prompt" for o in ("--limit", "--output", "--batch-size")},
         **({o: "greedy decoding (--temperature 0)" for o in sampling[1:]} if args.temperature == 0 else {})}
    given = [f"{o} does not apply to {why}" for o, why in ignored.items()
             if getattr(args, o[2:].replace("-", "_")) != parser.get_default(o[2:].replace("-", "_"))]
    if given:
        parser.error("; ".join(given))
    if not math.isfinite(args.temperature) or not math.isfinite(args.top_p):
        parser.error("--temperature and --top-p must be finite numbers")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}, but this torch ({torch.__version__}) sees no CUDA GPU")
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, ValueError) as e:  # a typo (cude), or a backend this torch lacks (mps)
        parser.error(f"--device {args.device}: this torch cannot use it ({str(e).splitlines()[0].split('. ')[0][:160]})")
    if args.output and Path(args.output).is_dir():  # known now, not after the whole evaluation
        parser.error(f"--output {args.output} is a directory; a .jsonl file path is expected")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    try:
        model_dir = resolve_model_dir(args.model)
        model, tokenizer = load_model(model_dir, args.device, dtype, args.tokenizer)
        # prompts as the run trained on them (train.py's evaluation builds them so too): its chat_mode, its encoding
        trained = (run_config(model_dir) or {}).get("dataset")
        trained = trained if isinstance(trained, dict) else {}
        if args.chat is None and trained.get("chat_mode"):
            print("note: --chat, as the run trained (its dataset.chat_mode=true; --no-chat to override)", file=sys.stderr)
        chat = args.chat if args.chat is not None else bool(trained.get("chat_mode"))
        encode_mode = trained.get("source_encode_mode") or "prompt"
        chat_kwargs = {"enable_thinking": False} if args.no_thinking else None
        if args.no_thinking and not (chat and tokenizer.chat_format in ("qwen3", "jinja")):
            raise ValueError("--no-thinking needs --chat and Qwen3's chat format (a thinking block), here: "
                             + (f"chat_format {tokenizer.chat_format}" if chat else "no --chat"))
        if args.gsm8k:
            result = evaluate_gsm8k(model, tokenizer, load_jsonl(args.gsm8k, args.limit), chat, args.batch_size,
                                    args.max_new_tokens, args.limit, args.system, encode_mode, args.compile, chat_kwargs)
            print("\n".join(summary_lines(result)))
            if args.output:
                write_predictions(args.output, result["predictions"])
            if not result["total"]:
                skipped = ", ".join(f"{k} {r}" for r, k in result["skipped"].items() if k)
                raise ValueError(f"none of the {len(result['predictions'])} GSM8K examples could be evaluated: all were "
                                 f"skipped ({skipped})")
        else:
            prompts = [build_prompt(tokenizer, p, chat, args.system, encode_mode, chat_kwargs) for p in args.prompt]
            check_token_ids(model, tokenizer, prompts)
            completions = generate(model, prompts, args.max_new_tokens, tokenizer.stop_ids, args.temperature,
                                   args.top_p, args.seed, vocab_size=tokenizer.vocab_size, compile=args.compile,
                                   top_k=args.top_k)
            for i, completion in enumerate(completions):  # one prompt: its completion alone, as before
                print(tokenizer.decode(completion) if len(prompts) == 1 else f"--- {i}: {tokenizer.decode(completion)}")
    except (FileNotFoundError, IsADirectoryError, ValueError, ImportError) as e:  # ImportError: huggingface_hub
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
