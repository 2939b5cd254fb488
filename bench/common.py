"""Shared helpers of bench/train_step.py, bench/sft_e2e.py and bench/gpu.py: benchmark model shapes, a synthetic SFT
batch with a realistic label mask, GSM8K-like document lengths, the step functions of both sides, memory readings.

Import it as `from bench import common` after the sys.path line at the top of each script, which replaces bench/
with the repository root: bench/ holds tokenize.py, data.py and generate.py (the names the issues gave them), which
would shadow the standard library's `tokenize` (imported by torch through `inspect`) and the repository's modules.
"""
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Benchmark shapes for 2 CPU cores. Small bodies with the REAL vocabularies: at SFT shapes the LM head and the
# cross-entropy over 128k/152k classes dominate time and memory, which is exactly what the chunked loss is about.
# Llama: untied head (as Llama 3.1 8B/70B), GQA 4:2, head_dim 64. Qwen3: tied (as Qwen3 0.6B-4B), QK-norm,
# n_heads * head_dim (512) != dim (256) as in every Qwen3 size.
CPU_SHAPES = {
    "llama": dict(dim=256, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=768, vocab_size=128256,
                  norm_eps=1e-5, rope_theta=500000.0, tie_embeddings=False, model_type="llama"),
    "qwen3": dict(dim=256, n_layers=6, n_heads=8, n_kv_heads=2, head_dim=64, hidden_dim=768, vocab_size=151936,
                  norm_eps=1e-6, rope_theta=1000000.0, qk_norm=True, tie_embeddings=True, model_type="qwen3"),
}

# (prompt, response) token lengths of 256 GSM8K train examples drawn with numpy default_rng(0) and tokenized with
# the Llama 3.2 tokenizer (question + BOS, answer + EOS). Mean 159.8 tokens per example, 63.6% supervised. Used on
# the GPU machine, which has neither ../shared/data nor network. Regenerate: see bench/README.md.
GSM8K_PROMPT_LENS = [
    41, 60, 33, 65, 71, 52, 38, 39, 57, 90, 64, 23, 52, 32, 114, 47, 55, 51, 46, 47, 41, 53, 58, 71, 51, 61, 38, 41,
    37, 46, 71, 86, 66, 51, 64, 45, 42, 74, 109, 47, 45, 50, 84, 33, 54, 36, 34, 40, 51, 51, 35, 89, 66, 126, 47, 46,
    91, 58, 52, 40, 29, 71, 54, 51, 63, 45, 79, 42, 45, 81, 34, 53, 44, 37, 59, 90, 52, 79, 35, 85, 37, 107, 77, 45,
    54, 47, 52, 66, 63, 47, 38, 42, 38, 73, 63, 54, 54, 41, 66, 79, 37, 51, 66, 58, 55, 67, 54, 64, 53, 42, 48, 43,
    37, 86, 68, 45, 41, 93, 63, 66, 58, 46, 64, 33, 87, 55, 65, 73, 44, 59, 43, 85, 50, 37, 48, 64, 47, 64, 67, 112,
    61, 31, 52, 64, 127, 60, 36, 47, 104, 95, 70, 60, 49, 35, 44, 72, 55, 71, 37, 111, 65, 53, 45, 58, 46, 69, 59, 50,
    59, 66, 57, 43, 37, 83, 33, 45, 72, 50, 83, 67, 52, 107, 53, 45, 66, 30, 101, 62, 49, 80, 62, 45, 28, 39, 40, 39,
    39, 25, 57, 64, 23, 59, 103, 84, 36, 47, 34, 51, 60, 87, 48, 39, 55, 88, 66, 44, 39, 61, 49, 107, 55, 68, 38, 104,
    29, 34, 69, 53, 51, 100, 115, 99, 106, 45, 42, 39, 42, 59, 43, 54, 75, 60, 55, 83, 35, 34, 40, 33, 82, 60, 99, 51,
    69, 67, 48, 89]
GSM8K_RESPONSE_LENS = [
    71, 107, 46, 223, 51, 151, 55, 56, 104, 58, 56, 96, 99, 49, 84, 47, 48, 78, 105, 81, 51, 106, 146, 160, 60, 83, 78,
    66, 74, 107, 191, 138, 136, 117, 125, 126, 71, 122, 76, 98, 46, 80, 142, 82, 80, 84, 75, 95, 84, 81, 44, 80, 113,
    122, 108, 96, 143, 144, 122, 52, 58, 88, 152, 72, 157, 119, 121, 107, 81, 96, 52, 77, 71, 67, 204, 101, 127, 143,
    53, 104, 127, 75, 224, 144, 76, 90, 75, 64, 119, 57, 39, 61, 68, 76, 96, 123, 81, 89, 74, 112, 69, 72, 93, 118,
    112, 131, 91, 89, 138, 58, 108, 62, 80, 157, 101, 152, 73, 167, 84, 139, 157, 108, 82, 82, 169, 77, 100, 129, 128,
    124, 100, 158, 76, 81, 61, 109, 112, 40, 95, 184, 90, 86, 124, 130, 139, 119, 53, 69, 184, 154, 137, 114, 132, 63,
    156, 223, 100, 129, 49, 52, 90, 82, 74, 136, 76, 62, 135, 95, 159, 58, 136, 81, 44, 202, 40, 63, 127, 43, 137, 109,
    109, 206, 107, 79, 120, 58, 263, 56, 105, 124, 75, 48, 54, 89, 82, 69, 98, 65, 110, 71, 58, 90, 106, 137, 76, 116,
    110, 154, 65, 142, 125, 71, 130, 117, 78, 53, 49, 44, 101, 153, 76, 75, 81, 201, 147, 80, 87, 47, 74, 90, 137, 146,
    140, 107, 84, 71, 73, 100, 67, 117, 106, 98, 149, 119, 74, 115, 116, 48, 254, 127, 168, 87, 177, 125, 111, 79]


def model_args(name_or_dict):
    """ModelArgs for a CPU_SHAPES key, a model.py preset name, or a dict of ModelArgs fields."""
    import model as M
    if isinstance(name_or_dict, dict):
        return M.ModelArgs(**name_or_dict)
    if name_or_dict in CPU_SHAPES:
        return M.ModelArgs(**CPU_SHAPES[name_or_dict])
    return M.get_preset(name_or_dict)


def sft_batch(batch_size, seq_len, vocab_size, seed=0, supervised=0.6, turns=3):
    """One synthetic SFT batch: every row is a multi-turn conversation of random tokens whose user spans are not
    supervised and whose assistant spans are (about `supervised` of the tokens), like a chat-template mask.
    Returns (tokens, hf_labels, labels), all (B,T) long:
      hf_labels: transformers' convention, unshifted (hf_labels[b,t] = tokens[b,t] or -100; the model shifts);
      labels:    ours, already shifted (labels[b,t] = target of tokens[b,t] = hf_labels[b,t+1]).
    Both supervise exactly the same (position, target) pairs."""
    g = torch.Generator().manual_seed(seed)
    # Skip the first ids: they are byte-level/special tokens in real vocabularies; any id is fine for timing.
    tokens = torch.randint(min(1000, vocab_size // 2), vocab_size, (batch_size, seq_len), generator=g)
    hf_labels = torch.full_like(tokens, -100)
    for b in range(batch_size):
        # `turns` (user, assistant) pairs with random split points; assistant share ~ `supervised`.
        cuts = sorted(torch.randint(1, seq_len, (2 * turns - 1,), generator=g).tolist())
        bounds = [0] + cuts + [seq_len]
        lens = [bounds[i + 1] - bounds[i] for i in range(2 * turns)]
        users, assistants = sum(lens[0::2]), sum(lens[1::2])
        # Rescale so assistant spans hold `supervised` of the row (keeps the mask realistic for any seed).
        scale_u, scale_a = (1 - supervised) * seq_len / max(users, 1), supervised * seq_len / max(assistants, 1)
        pos = 0
        for i, n in enumerate(lens):
            n = round(n * (scale_u if i % 2 == 0 else scale_a))
            if i % 2 == 1:
                hf_labels[b, pos:pos + n] = tokens[b, pos:pos + n]
            pos += n
    labels = torch.full_like(hf_labels, -100)
    labels[:, :-1] = hf_labels[:, 1:]
    return tokens, hf_labels, labels


def gsm8k_like_docs(n, seed=0):
    """n (prompt_len, response_len) pairs drawn from the embedded GSM8K length sample."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(GSM8K_PROMPT_LENS), (n,), generator=g).tolist()
    return [(GSM8K_PROMPT_LENS[i], GSM8K_RESPONSE_LENS[i]) for i in idx]


# ------------------------------------------------------------------------------------------------ batching
def hf_batches(lengths, n, seed, epoch):
    """transformers Trainer's default order: a random permutation per epoch (RandomSampler), consecutive batches of
    n examples (the last one kept, dataloader_drop_last=False)."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return [order[i:i + n] for i in range(0, len(order), n)]


def choose_hf_batch_size(lengths, budget, seed=0):
    """Largest static batch size N whose MEAN padded size N * max(len) over an epoch's batches is <= budget."""
    best = 1
    for n in range(1, min(len(lengths), 1024) + 1):
        pads = [n * max(lengths[i] for i in b) for b in hf_batches(lengths, n, seed, 0)]
        if sum(pads) / len(pads) > budget:
            break
        best = n
    return best


def hf_packed_inputs(tokens, labels, positions):
    """transformers' padding-free input (TRL padding_free / DataCollatorWithFlattening) for OUR packed rows: the same
    (B,T) token ids, position_ids restarting at 0 in every document (data.collate's `positions`; a row's padding
    tail starts at 0 too, so it is a document of its own), no attention_mask. transformers 5.x then derives the
    documents from the position_ids and SDPA gets a block-diagonal causal mask, but only while no KV cache exists:
    use_cache=False is required (with use_cache=True, the default of the config, attention silently crosses
    documents; the loss checks catch that).
    Labels: `labels` in HF's convention (unshifted: labels[t] is the target of position t - 1, -100 in column 0)
    and `shift_labels` = ours (labels[t] = target of position t), which transformers' ForCausalLMLoss uses instead
    of shifting `labels` itself. Both hold the same (position, target) pairs except the last column, which
    unshifted labels cannot express (a row filled to its last slot supervises it), so shift_labels makes the
    supervision exactly ours; the loss is HF's own (mean CE over the supervised tokens, upcast to fp32)."""
    hf_labels = torch.full_like(labels, -100)
    hf_labels[:, 1:] = labels[:, :-1]
    return dict(input_ids=tokens, position_ids=positions, labels=hf_labels, shift_labels=labels, use_cache=False)


def hf_collate(examples, pad_id):
    """DataCollatorWithPadding-style batch of (ids, mask) examples: right padding to the longest, attention_mask,
    labels = ids where supervised else -100 (unshifted: the model predicts labels[t+1] from position t)."""
    T = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), T), dtype=torch.long)
    for r, (ids, mask) in enumerate(examples):
        ids, mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask).bool()  # copies (memmap views)
        input_ids[r, :len(ids)] = ids
        labels[r, :len(ids)] = torch.where(mask, ids, -100)
        attention_mask[r, :len(ids)] = 1
    return input_ids, attention_mask, labels


# ------------------------------------------------------------------------------------------------ memory (CPU)
def reset_peak_rss():
    """Reset this process's peak RSS (Linux VmHWM and ru_maxrss) so the next reading covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_gb():
    """Peak resident set size of this process since start (or since the last reset_peak_rss), in GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux


# ------------------------------------------------------------------------------------------------ steps
def ours_optimizer(model, fused=True):
    """train.py's AdamW (train.build_optimizer) with its default optimizer settings; fused=False for foreach."""
    import train
    return train.build_optimizer(model, train.OptimizerConfig(), fused=fused)


def run_alternating(sides, warmup, rounds, steps, after_first=None) -> dict:
    """The first step of each side (compile, lazy optimizer state, allocator) is timed and reported apart, then
    `warmup - 1` untimed steps, then `rounds` of `steps` timed steps per side in turn, so load drift hits both.
    after_first(sides): called once every side has made its first step (s.loss0, s.first_stats), e.g. to check the
    step-0 losses before spending minutes on timing. Returns each side's memory readings."""
    for s in sides:
        (s.first_step_s, first), = s.steps(1)
        s.loss0, s.first_stats = first["loss"], first
    if after_first is not None:
        after_first(sides)
    for s in sides:
        if warmup > 1:
            s.steps(warmup - 1)
    for _ in range(rounds):
        for s in sides:
            s.records += s.steps(steps)
    return {s.name: s.mem() for s in sides}


# ------------------------------------------------------------------------------------------------ weights, checks
# Correctness checks of every benchmark: ours and HF on the same weights and tokens must compute the same model.
# 1. Weights: normal(0, INIT_STD) for every matrix (norms ones), not model.init_weights' 0.02. At 0.02 the logits
#    are nearly uniform and the loss is ~ln(vocab) whatever the model computes (zeroing all attention moves it by
#    4e-4 relative, positions all 0 by 2e-6). At 0.1 (bench/generate.py's initializer_range) bugs move the loss by
#    1e-4 to 8e-3 relative, depending on shape and batch. Speed does not depend on the values.
# 2. The mean loss averages the bugs' per-token errors of either sign, so the checks also compare the CE of every
#    supervised token (token_losses): relative RMS of the per-token differences. Measured on CPU (/tmp scratch,
#    compiled ours vs HF, tiny and 70M Llama shapes, packed rows): real code 3e-7 (fp32) / <= 2e-3 (bf16 autocast);
#    no document mask or RoPE positions all 0: >= 3e-2 in both. The mean-loss check (the training step's own loss,
#    through the fused CE) stays as well: real code <= 1.1e-4 in CPU bf16 autocast, was 3e-5 on an H200.
INIT_STD = 0.1
LOSS_RTOL = {"fp32": 1e-5, "bf16": 5e-4}    # |mean loss ours - HF| / HF, step 0
TOKEN_RTOL = {"fp32": 1e-4, "bf16": 1e-2}   # RMS(per-token CE ours - HF) / mean CE, same weights, before step 0


@torch.no_grad()
def bench_init_(model):
    """model.init_weights(), then every matrix (Linear, Embedding; a tied head is the embedding) redrawn from
    N(0, INIT_STD)."""
    model.init_weights()
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(m.weight, mean=0.0, std=INIT_STD)
    return model


def loss_check(name, ours, ref, precision):
    """(line, ok): the relative difference |ours - ref| / |ref| of two step-0 losses against LOSS_RTOL[precision]."""
    d = abs(ours - ref) / abs(ref)
    ok = d < LOSS_RTOL[precision]
    return (f"loss check {name}: ours {ours:.6f} vs {ref:.6f}, rel diff {d:.1e} "
            f"{'OK' if ok else 'MISMATCH'} (< {LOSS_RTOL[precision]:.0e}, {precision}, init std {INIT_STD})"), ok


@torch.no_grad()
def token_losses(logits, targets, rows=1):
    """fp32 cross-entropy of every supervised position (targets != -100) of (B,T,V) logits against (B,T) targets
    (ours' convention: the target of position t), row-major, as a 1-D CPU tensor; `rows` rows at a time (memory)."""
    out = []
    for r in range(0, logits.shape[0], rows):
        keep = targets[r:r + rows] != -100
        out.append(torch.nn.functional.cross_entropy(logits[r:r + rows][keep].float(), targets[r:r + rows][keep],
                                                     reduction="none").cpu())
    return torch.cat(out)


def ours_token_losses(model, tokens, positions, doc_ids, labels):
    """Our model's per-token CE (token_losses) on a batch, from its logits (model(...) without labels: the same blocks
    as a training step, grad mode as the caller's so compiled blocks are reused, nothing backpropagated)."""
    logits = model(tokens, positions, doc_ids)
    out = token_losses(logits.detach(), labels)
    del logits
    return out


@torch.no_grad()
def hf_token_losses(model, inputs):
    """transformers' per-token CE (token_losses) for one batch of model kwargs (padded: labels unshifted; packed:
    common.hf_packed_inputs with shift_labels), in the same order as ours_token_losses on the same tokens."""
    out = model(**{k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")})
    if inputs.get("shift_labels") is not None:
        targets = inputs["shift_labels"]
    else:
        targets = torch.nn.functional.pad(inputs["labels"][:, 1:], (0, 1), value=-100)
    return token_losses(out.logits, targets)


def token_check(name, ours, ref, precision):
    """(line, ok): per-token CE of the same supervised tokens, RMS(ours - ref) / mean(ref) vs TOKEN_RTOL."""
    ours, ref = torch.as_tensor(ours), torch.as_tensor(ref)
    if ours.shape != ref.shape:
        return f"token check {name}: {ours.numel()} vs {ref.numel()} supervised tokens MISMATCH", False
    d = ours.double() - ref.double()
    rel = float(d.pow(2).mean().sqrt() / ref.double().mean())
    ok = rel < TOKEN_RTOL[precision]
    verdict = "OK" if ok else "MISMATCH"
    return (f"token check {name}: per-token CE of {ref.numel()} tokens, rel RMS diff {rel:.1e} (max abs "
            f"{float(d.abs().max()):.1e}) {verdict} (< {TOKEN_RTOL[precision]:.0e}, {precision})"), ok


def save_random_init(margs, hf_dir):
    """One seeded random init (bench_init_), written as an HF directory: both sides of a benchmark load it."""
    import model as M
    torch.manual_seed(0)
    m = M.Transformer(margs)
    bench_init_(m)
    M.save_hf(m, margs, hf_dir)


def ours_model_and_optimizer(spec):
    """Our model from the benchmark's saved HF dir, in training mode, blocks compiled in place as train.py does
    (spec["compile"]), with train.py's AdamW."""
    import model as M
    model = M.load_hf(spec["hf_dir"], dtype=torch.float32, device="cpu")
    model.train()
    if spec["compile"]:
        for layer in model.layers:  # per block: the repeated unit, compiled once and reused
            layer.compile()
        model.compile_loss = True
    return model, ours_optimizer(model, fused=spec["ours_fused"])


def hf_optimizer(model):
    """transformers Trainer's default: optim "adamw_torch_fused" (torch >= 2.8, any device), weight_decay 0.0."""
    return torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)


def backward_and_step(model, opt, loss) -> float:
    """backward, clip the grad norm at 1.0, AdamW step, zero the grads; returns the loss value. Both sides read the
    loss and the grad norm every step, as train.py (its non-finite check) and Trainer's logging do."""
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if hasattr(gn, "full_tensor"):  # DTensor under FSDP2
        gn = gn.full_tensor()
    loss_val, _ = loss.item(), gn.item()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_val


def add_timing_args(p):
    """The command-line options train_step.py and sft_e2e.py share."""
    p.add_argument("--rounds", type=int, default=3, help="alternating timed rounds")
    p.add_argument("--steps", type=int, default=2, help="steps per side per round")
    p.add_argument("--ours-adamw", choices=["fused", "foreach"], default="fused",
                   help="ours: AdamW fused (as train.py builds it, the default) or foreach")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def fmt_table(header, rows):
    """Plain-text table with right-aligned columns (first column left-aligned)."""
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def env_line():
    import platform
    return (f"python {platform.python_version()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
            f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")


# ------------------------------------------------------------------------------------------------ child processes
def _child(setup, spec, conn):
    """Run in a spawned process: `setup(spec) -> (step, info)`, then serve ("steps", n) -> [(seconds, stats)] and
    ("mem",) -> peak RSS readings, until ("quit",). `step()` returns a dict of numbers (loss, token counts)."""
    try:
        torch.set_num_threads(spec["threads"])
        step, info = setup(spec)
        setup_peak = peak_rss_gb()
        info["reset_ok"] = reset_peak_rss()  # from here on: the training high-water mark
        conn.send(("ok", info))
        while True:
            cmd = conn.recv()
            if cmd[0] == "steps":
                out = []
                for _ in range(cmd[1]):
                    t0 = time.perf_counter()
                    stats = step()
                    out.append((time.perf_counter() - t0, stats))
                conn.send(("ok", out))
            elif cmd[0] == "mem":
                train_peak = peak_rss_gb()
                conn.send(("ok", {"train": train_peak, "process": max(train_peak, setup_peak)}))
            else:
                break
    except BaseException as e:  # report to the parent instead of leaving it waiting
        import traceback
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


class Worker:
    """One benchmarked side in its own spawned process, so that its peak RSS is its own. The parent drives the
    workers in alternating rounds; only one computes at a time."""

    def __init__(self, name, setup, spec):
        ctx = mp.get_context("spawn")
        self.name = name
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(setup, spec, child_conn), daemon=True)
        self.proc.start()
        child_conn.close()
        self.info = self._recv()
        self.records = []  # (seconds, stats) of the timed steps

    def _recv(self):
        try:
            status, payload = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"{self.name}: worker process died (exit code {self.proc.exitcode}; out of memory?)")
        if status == "error":
            raise RuntimeError(f"{self.name}: {payload}")
        return payload

    def steps(self, n):
        self.conn.send(("steps", n))
        return self._recv()

    def mem(self):
        self.conn.send(("mem",))
        return self._recv()

    def close(self):
        try:
            self.conn.send(("quit",))
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()
