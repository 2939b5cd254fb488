"""All training benchmarks on one CUDA GPU in one run (< 8 min), printing one table; bf16.

    python bench/gpu.py                        # H100 / H200; the table also goes to $OUT/gpu_bench.txt when OUT is set
    python bench/gpu.py --time-budget 300 --cases packed4096,packed2048
    python bench/gpu.py --smoke                # tiny shapes on CPU (gloo): exercises every code path, no GPU needed

Cases, in this order (each in try/except; a case that would not fit the remaining --time-budget is skipped):
  packed4096 / packed2048  Llama 3.2 1B shape (preset llama3_2_1b, random init, tied 128,256 vocab), --budget token
        slots per step. Ours: data.py's packing (best-fit-decreasing, data.plan_epoch + data.collate) of GSM8K-like
        documents into rows of 4096 / 2048 tokens, doc_ids -> flex_attention document mask. HF twice:
        "HF" = Trainer's default batching of the same documents: static batches of N in random order padded to the
        longest (N: mean padded size <= budget), attn_implementation="sdpa" with attention_mask (the issue's goal
        is defined against this); "HF packed" = padding-free (TRL padding_free / DataCollatorWithFlattening):
        exactly our packed rows, position_ids restarting per document, no attention_mask, use_cache=False
        (common.hf_packed_inputs; sdpa with the block-diagonal mask transformers derives from position_ids).
        Document lengths: (prompt, response) pairs of 256 real GSM8K train examples under the Llama 3.2 tokenizer,
        embedded in bench/common.py (no data files needed).
  llama_cpu / qwen3_cpu    bench/train_step.py's shapes (vocab 128,256 / 151,936), the same 8 x 512 batch for both.
  packed4096x2             packed4096 for ours only at twice --budget per step, one micro-batch (the optimizer step and
        the per-step overheads spread over twice the tokens): how MFU depends on tokens per step.
  fsdp4096                 packed4096 for ours only, with FSDP2 on its one rank (MixedPrecisionPolicy bf16 over fp32):
        what each rank of a multi-GPU run does, beside train.py's one-GPU autocast path.
  same4096                 1B, the same 2 x 4096 batch for both (plain causal rows: kernels + loss head only).
  generate                 bench/generate.py --device cuda --dtype bfloat16 (decode tokens/s), if time is left.
Precision, mirroring train.py on one GPU: ours = bf16 autocast over fp32 weights (no FSDP on one rank, as
torchtitan), per-block torch.compile, fused AdamW, loss = SUM CE / supervised tokens; HF = what Trainer(bf16=True)
does: bf16 autocast over fp32 weights, fused AdamW (Trainer's default), its default loss. Both clip the grad norm at 1.0 and read loss + grad norm each step (as train.py / Trainer log).
Weights: one seeded random init (common.bench_init_: N(0, common.INIT_STD = 0.1), at which the loss depends on what
the model computes), loaded into all sides (ours via load_state_dict / set_model_state_dict as train.py, HF via
model.ours_to_hf). Step-0 losses are compared (common.LOSS_RTOL, bf16): packed cases: ours' first packed batch vs
HF forward on the same documents each padded, and vs HF packed's first step (the same batch: shows that HF's
position_ids path isolates the documents); same-batch cases: ours vs HF. A mismatch is logged, marked in the table,
and the script exits with an error after the table.
Columns: trained tok/s = supervised tokens (labels != -100) per second over --steps timed steps after --warmup
steps (the first step, with compilation, is reported separately). MFU, one convention for every side:
model.flops_per_token(args, span) x real (non-pad) tokens/s / peak (train.peak_flops of the GPU, 989e12 for
H100/H200 SXM dense bf16), span = sum(doc_len^2) / sum(doc_len) over the documents of the timed batches (the
model's causal attention within each document: a padded HF row holding one document costs the model the same FLOPs
per real token as that document in a packed row; same-batch cases: one document per row, span = row length), the
LM head counted for every real token (the standard 6N). Ours' head runs on supervised tokens only: the notes also
give the FLOPs ours executes (head share = supervised / real) as a utilization of the same peak.
Peak GB = torch.cuda.max_memory_allocated during the timed side (params, grads, optimizer state, activations).
"""
import os
import sys
import time

_T0 = time.time()
_HERE = os.path.dirname(os.path.abspath(__file__))
# bench/ holds tokenize.py and data.py: first on sys.path (as `python bench/x.py` puts it) they would shadow the
# standard library's tokenize (which torch imports) and the repository's data.py. Use the repository root instead.
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse
import contextlib
import gc
import json
import subprocess
import traceback

import numpy as np
import torch

from bench import common

import train  # noqa: E402
from train import PEAK_BF16_FLOPS  # noqa: E402

PEAK_FLOPS = PEAK_BF16_FLOPS["H100"]  # H100 / H200 SXM, dense bf16 (the same 989e12 for both); main() sets the GPU's
REPORT = []          # lines for $OUT/gpu_bench.txt


def log(msg=""):
    print(msg, flush=True)
    REPORT.append(msg)


def left(args):
    return args.time_budget - (time.time() - _T0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_gb(device):
    return torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


# ------------------------------------------------------------------------------------------------ models
_MESH = None


def mesh_1rank(device):
    """A 1-rank process group and mesh, as train.py makes for one GPU (FSDP2 gives it bf16 compute over fp32)."""
    global _MESH
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    if _MESH is None:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                    world_size=1, device_id=torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else None)
        _MESH = init_device_mesh(device.type, (1,), mesh_dim_names=("dp_shard",))
    return _MESH


def init_state_dict(margs, device, seed=0):
    """One seeded random init (common.bench_init_), as a full fp32 state dict on the CPU."""
    import model as M
    torch.manual_seed(seed)
    with torch.device("meta"):
        m = M.Transformer(margs)
    m.to_empty(device=device)
    common.bench_init_(m)
    sd = {k: v.detach().to("cpu") for k, v in m.state_dict().items()}
    del m
    free(device)
    return sd


def build_ours(margs, sd, device, mode, compile_blocks):
    """mode "autocast": train.py's one-GPU path (plain module, bf16 autocast); "fsdp": a multi-GPU rank's path."""
    import model as M
    with torch.device("meta"):
        model = M.Transformer(margs)
    if compile_blocks:
        for block in model.layers:
            block.compile()  # in place, as train.py
        model.compile_loss = True
    if mode == "fsdp":
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
        mesh = mesh_1rank(device)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for i, block in enumerate(model.layers):  # as train.py: the last block stays unsharded for its backward
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(model.layers) - 1)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)
    model.to_empty(device=device)
    model.init_weights()
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        # a copy: the call replaces the dict's values with DTensors, and the HF side reads `sd` next
        set_model_state_dict(model, dict(sd), options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        model.load_state_dict(sd)
    model.train()
    return model, common.ours_optimizer(model)


def build_hf(margs, sd, device):
    import model as M
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = margs.to_hf_config()
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    missing, unexpected = model.load_state_dict(M.ours_to_hf(sd, margs), strict=False)
    allowed = {"lm_head.weight"} if margs.tie_embeddings else set()
    if unexpected or set(missing) - allowed:
        raise RuntimeError(f"HF weights did not load: missing {missing}, unexpected {unexpected}")
    if margs.tie_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "HF lost the tie"
    model.train()
    return model, common.hf_optimizer(model)


def autocast(device, on=True):
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()


def ours_step(model, opt, b, device, use_autocast):
    with autocast(device, use_autocast):
        loss = model(b["tokens"], b["positions"], b["doc_ids"], b["labels"]) / max(b["n_sup"], 1)
    return common.backward_and_step(model, opt, loss)


def hf_step(model, opt, b, device):
    with autocast(device):  # Trainer(bf16=True): autocast around the forward (and the loss inside it)
        loss = model(**b["inputs"]).loss
    return common.backward_and_step(model, opt, loss)


def run_side(step, batches, args, device):
    """First step (compile) timed alone, warmup, then --steps timed steps cycling over `batches`."""
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    loss0 = step(batches[0])
    sync(device)
    first = time.perf_counter() - t0
    for i in range(1, args.warmup):
        step(batches[i % len(batches)])
    sync(device)
    t0 = time.perf_counter()
    used = []
    for i in range(args.steps):
        b = batches[(args.warmup + i) % len(batches)]
        step(b)
        used.append(b)
    sync(device)
    secs = time.perf_counter() - t0
    real = sum(b["n_real"] for b in used)
    return dict(loss0=loss0, first_s=first, secs=secs, steps=args.steps, peak_gb=peak_gb(device),
                sup=sum(b["n_sup"] for b in used), real=real, slots=sum(b["n_slots"] for b in used),
                seq_len=float(np.mean([b["seq_len"] for b in used])),
                span=sum(b["doc_sq"] for b in used) / real)  # sum(doc_len^2) / sum(doc_len): the MFU attention span


# ------------------------------------------------------------------------------------------------ data
class SyntheticDocs:
    """GSM8K-like documents (embedded length sample, random token ids) laid out like data.py's TokenizedData (flat
    `tokens` / `mask`, `offsets`, `lengths` in model tokens, `example(i)` -> (ids, mask)), so that data.plan_epoch
    and data.collate pack them exactly as the real pipeline packs a tokenized dataset."""

    def __init__(self, n, vocab_size, seed=0):
        g = np.random.default_rng(seed)
        pairs = common.gsm8k_like_docs(n, seed)
        sizes = np.array([p + r for p, r in pairs], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.tokens = g.integers(1000, vocab_size, int(sizes.sum())).astype(np.uint32)
        self.mask = np.concatenate([np.r_[np.zeros(p, np.uint8), np.ones(r, np.uint8)] for p, r in pairs])
        self.lengths = sizes - 1  # model tokens per example

    def __len__(self):
        return len(self.lengths)

    def example(self, i):
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.tokens[a:b].astype(np.int64), self.mask[a:b]


def ours_packed_batches(docs, seq_len, budget, n_batches, device):
    import data
    cfg = data.DatasetConfig(max_seq_len=seq_len, max_num_tokens=budget, packing=True)
    fits = np.flatnonzero(docs.lengths <= seq_len)  # data.py drops longer examples (only --smoke has any)
    plan = data.plan_epoch(docs.lengths[fits], cfg, seed=0, epoch=0, shuffle=True)
    plan = [[[int(fits[i]) for i in row] for row in batch] for batch in plan]
    # Full batches only (the plan's last batch can have fewer rows); the fullest rows are the first ones.
    plan = [b for b in plan if len(b) == budget // seq_len][:n_batches]
    out = []
    for rows in plan:
        b = data.collate(docs, rows, pad_id=0, packed_len=seq_len).to(device)
        idx = [i for row in rows for i in row]
        out.append(dict(tokens=b.tokens, labels=b.labels, positions=b.positions, doc_ids=b.doc_ids,
                        n_sup=b.num_label_tokens, n_real=b.num_tokens, n_slots=b.tokens.numel(), seq_len=seq_len,
                        doc_idx=idx, doc_sq=b.doc_len_sq))
    return out


def hf_packed_batches(ours_b):
    """HF padding-free: exactly ours' packed rows (common.hf_packed_inputs), the same counts."""
    keys = ("n_sup", "n_real", "n_slots", "seq_len", "doc_sq")
    return [dict(inputs=common.hf_packed_inputs(b["tokens"], b["labels"], b["positions"]), **{k: b[k] for k in keys})
            for b in ours_b]


def hf_padded_batches(docs, n, n_batches, device, seed=0):
    lengths = (docs.lengths + 1).tolist()  # HF feeds all ids
    out = []
    for idx in common.hf_batches(lengths, n, seed, 0)[:n_batches]:
        input_ids, attention_mask, labels = common.hf_collate([docs.example(i) for i in idx], pad_id=0)
        row_len = attention_mask.sum(1)  # one document per row: its ids, all fed
        out.append(dict(inputs=dict(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    labels=labels.to(device)),
                        n_sup=int((labels[:, 1:] != -100).sum()), n_real=int(row_len.sum()),
                        n_slots=input_ids.numel(), seq_len=input_ids.shape[1], doc_sq=int((row_len ** 2).sum())))
    return out


def hf_check_on_docs(model, docs, idx, device, chunk=16):
    """The HF model on documents `idx`, each padded separately (no_grad, bf16 autocast): the mean CE over their
    supervised tokens, and the per-token CE in ours' order (documents in row order, as ours' packed rows hold them)."""
    total, count, tokens = 0.0, 0, []
    with torch.no_grad(), autocast(device):
        for i in range(0, len(idx), chunk):
            input_ids, attention_mask, labels = common.hf_collate([docs.example(j) for j in idx[i:i + chunk]], 0)
            n = int((labels[:, 1:] != -100).sum())
            out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                        labels=labels.to(device))
            tokens.append(common.token_losses(out.logits, torch.nn.functional.pad(labels[:, 1:], (0, 1),
                                                                                  value=-100).to(device)))
            total, count = total + out.loss.item() * n, count + n
    return {"check_loss": total / count, "token_losses": torch.cat(tokens)}


def hf_check_on_batch(model, batch, device):
    """The per-token CE of the HF model on one of its batches (before any update), bf16 autocast."""
    with autocast(device):
        return {"token_losses": common.hf_token_losses(model, batch["inputs"])}


# ------------------------------------------------------------------------------------------------ cases
def case_packed(args, device, seq_len, state, mode=None, with_hf=True, profile=False, budget=None):
    import model as M
    margs = state["margs_1b"]
    budget = budget or args.budget
    docs = SyntheticDocs(args.docs, margs.vocab_size)
    ours_b = ours_packed_batches(docs, seq_len, budget, args.n_batches, device)
    res = {"margs": margs, "notes": [f"ours{' and HF packed' if with_hf else ''}: {budget // seq_len} x {seq_len} "
                                     "packed rows per step"]}
    if with_hf:
        n_hf = common.choose_hf_batch_size((docs.lengths + 1).tolist(), budget)
        hf_b = hf_padded_batches(docs, n_hf, args.n_batches, device)
        res["notes"].append(f"HF static batch {n_hf} examples (mean padded "
                            f"{np.mean([b['n_slots'] for b in hf_b]):.0f} slots)")
    res["ours"] = run_ours(args, device, margs, state["sd_1b"], ours_b, state, mode, profile)
    if "error" not in res["ours"]:
        # MFU counts the head for every real token; the fused loss runs it on supervised tokens only, so the GPU
        # executes fewer FLOPs than that (attention is counted over each document in both).
        r = res["ours"]
        executed = M.flops_per_token(margs, r["span"], head_share=r["sup"] / r["real"]) * r["real"] / r["secs"]
        res["notes"].append(f"ours executed-FLOP utilization (attention over documents, mean span {r['span']:.0f}; "
                            f"head on the {r['sup'] / r['real']:.0%} supervised tokens): {executed / PEAK_FLOPS:.1%}")
    if with_hf:
        res["hf"] = run_hf(args, device, margs, state["sd_1b"], hf_b,
                           check=lambda m: hf_check_on_docs(m, docs, ours_b[0]["doc_idx"], device))
        # its first batch is ours' first batch: its per-token CE and step-0 loss are the check (document isolation)
        hfp_b = hf_packed_batches(ours_b)
        res["hf_packed"] = run_hf(args, device, margs, state["sd_1b"], hfp_b,
                                  check=lambda m: hf_check_on_batch(m, hfp_b[0], device))
    else:
        res["hf"] = res["hf_packed"] = {"skipped": True}
    return res


def case_same(args, device, margs, sd, batch_size, seq_len, state):
    tokens, hf_labels, labels = common.sft_batch(batch_size, seq_len, margs.vocab_size, seed=0)
    n_sup = int((labels != -100).sum())
    meta = dict(n_sup=n_sup, n_real=tokens.numel(), n_slots=tokens.numel(), seq_len=seq_len,
                doc_sq=batch_size * seq_len ** 2)  # one document per row
    ours_b = [dict(tokens=tokens.to(device), labels=labels.to(device), positions=None, doc_ids=None, **meta)]
    hf_b = [dict(inputs=dict(input_ids=tokens.to(device), labels=hf_labels.to(device)), **meta)]
    res = {"margs": margs, "notes": [f"same batch {batch_size} x {seq_len} for both, {n_sup} supervised tokens"]}
    res["ours"] = run_ours(args, device, margs, sd, ours_b, state)
    res["hf"] = run_hf(args, device, margs, sd, hf_b, check=lambda m: hf_check_on_batch(m, hf_b[0], device))
    res["hf_packed"] = {"skipped": True}  # rows are whole documents: nothing to pack
    return res


def run_ours(args, device, margs, sd, batches, state, mode=None, profile=False):
    """Ours as train.py runs it on one GPU (bf16 autocast, flex_attention for packed rows). If flex fails, fall back
    to SDPA with a dense document mask and keep that (said in the output), so that one failure does not cost every
    case. mode="fsdp": FSDP2 on one rank instead (no fallback). profile: then 2 more steps under torch.profiler,
    whose costliest ops are logged (where the step's time goes, for the MFU goal)."""
    import model as M
    chain = [("autocast", None), ("autocast", False)]
    chain = [("fsdp", None)] if mode == "fsdp" else chain[chain.index(state["ours_mode"]):]
    errors = []
    for mode, flex in chain:
        if errors and left(args) < 40:
            break
        model = opt = None
        try:
            M.USE_FLEX = flex
            torch._dynamo.reset()  # static shapes per case, as a train.py run has (no automatic-dynamic recompile)
            model, opt = build_ours(margs, sd, device, mode, compile_blocks=not args.no_compile)
            use_ac = mode == "autocast"  # FSDP2 casts to bf16 itself
            checked = {}
            if mode != "fsdp":  # the per-token CE of the first batch, before any update (fsdp4096 has no HF side)
                t0 = time.perf_counter()
                with autocast(device, use_ac):
                    b0 = batches[0]
                    checked["token_losses"] = common.ours_token_losses(model, b0["tokens"], b0["positions"],
                                                                       b0["doc_ids"], b0["labels"])
                sync(device)
                checked["check_s"] = time.perf_counter() - t0
                free(device)
            r = run_side(lambda b: ours_step(model, opt, b, device, use_ac), batches, args, device)
            r.update(checked)
            # the check's forward (grad mode on, so the training graphs) compiled the blocks: count it in first_s
            r["first_s"] += checked.get("check_s", 0.0)
            r["mode"] = mode + ("" if flex is None else ", no flex")
            log(f"   ours done ({time.time() - _T0:.0f} s elapsed)")
            if profile:
                profile_steps(lambda b: ours_step(model, opt, b, device, use_ac), batches[:2], device)
            if mode != "fsdp" and (mode, flex) != state["ours_mode"]:
                log(f"   ours: NOTE falling back to {r['mode']} for this and later cases")
                state["ours_mode"] = (mode, flex)
            return r
        except Exception as e:
            errors.append(f"{mode}{'' if flex is None else ', no flex'}: {type(e).__name__}: {e}")
            log(f"   ours ({errors[-1]})\n" + traceback.format_exc(limit=-4))
        finally:
            del model, opt
            free(device)
    return {"error": "; ".join(errors)}


def profile_steps(step, batches, device):
    """`batches` more steps under torch.profiler, as train.py's trainer.profile_steps; the costliest ops logged."""
    prof = train.start_profiler(device)
    for b in batches:
        step(b)
    sync(device)
    prof.stop()
    log(f"   ours: profile of {len(batches)} steps, " + train.profile_table(prof, device).replace("\n", "\n   "))


def run_hf(args, device, margs, sd, batches, check):
    model = opt = None
    try:
        model, opt = build_hf(margs, sd, device)
        checked = check(model)  # before any update: the weights of ours' step 0
        free(device)
        r = run_side(lambda b: hf_step(model, opt, b, device), batches, args, device)
        log(f"   hf done ({time.time() - _T0:.0f} s elapsed)")
        return {"check_loss": r["loss0"], **r, **checked}  # check_loss: step 0's own, unless the check has one
    except Exception as e:
        log(f"   hf failed: {type(e).__name__}: {e}\n" + traceback.format_exc(limit=-4))
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        del model, opt
        free(device)


# ------------------------------------------------------------------------------------------------ main
def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", default="packed4096,packed4096x2,packed2048,fsdp4096,same4096,llama_cpu,qwen3_cpu,generate")
    p.add_argument("--time-budget", type=float, default=420.0,
                   help="seconds from start; a case that would not fit is skipped (the table still prints)")
    p.add_argument("--budget", type=int, default=8192, help="token slots per step (packed cases), both sides")
    p.add_argument("--steps", type=int, default=8, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side (the first, compile, is reported)")
    p.add_argument("--n-batches", type=int, default=6, help="distinct batches cycled through per side")
    p.add_argument("--docs", type=int, default=2000, help="synthetic GSM8K-like documents to pack / pad")
    p.add_argument("--no-compile", action="store_true", help="ours without per-block torch.compile")
    p.add_argument("--profile", default="packed4096", help="cases (packed4096, fsdp4096) whose ours side is then "
                   "profiled for 2 steps, the costliest ops logged ('' = none)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU to test the script without a GPU")
    args = p.parse_args()

    import model as M
    import transformers
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, python {sys.version.split()[0]}, "
        f"device {name}" + (f", {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB" if device.type == "cuda" else ""))
    if device.type != "cuda" and not args.smoke:
        log("no CUDA device: run with --smoke to test the script on CPU")
        return
    global PEAK_FLOPS
    PEAK_FLOPS = train.peak_flops(device) or PEAK_FLOPS  # H100 PCIe / NVL have lower peaks than SXM
    log(f"MFU peak {PEAK_FLOPS / 1e12:.0f} TFLOP/s dense bf16; init std {common.INIT_STD}; checks (bf16): per-token "
        f"CE rel RMS diff < {common.TOKEN_RTOL['bf16']:.0e}, step-0 loss rel diff < {common.LOSS_RTOL['bf16']:.0e}")
    if args.smoke:  # tiny everything: the point is running every code path
        args.budget, args.steps, args.warmup, args.n_batches, args.docs = 1024, 2, 2, 2, 200
    # Same rate for fp32 matmuls (HF keeps fp32 master weights under autocast; some ops stay fp32).
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    state = {"ours_mode": ("autocast", None)}
    margs_1b = M.get_preset("tiny_llama" if args.smoke else "llama3_2_1b")
    if args.smoke:
        margs_1b.vocab_size = 2048
    cases = args.cases.split(",")
    # Rough cost of each case in seconds on an H100 (compile included), to skip what cannot finish in time.
    cost = {"packed4096": 130, "packed4096x2": 50, "packed2048": 120, "fsdp4096": 60, "llama_cpu": 45, "qwen3_cpu": 45,
            "same4096": 80, "generate": 90}  # packed: ours, HF padded, HF packed; generate: eager, compiled (CUDA graphs) and HF
    results = []
    for case in cases:
        if case not in cost:
            log(f"unknown case {case!r} (valid: {', '.join(cost)})")
            continue
        if left(args) < (5 if args.smoke else cost[case]):
            log(f"-- {case}: skipped ({left(args):.0f} s left of --time-budget {args.time_budget:.0f})")
            results.append((case, {"skipped": True}))
            continue
        log(f"-- {case} ({time.time() - _T0:.0f} s elapsed)")
        t_case = time.time()
        try:
            if case == "generate":
                run_generate(args, device)
                continue
            if case.startswith(("packed", "same")) and "sd_1b" not in state:
                state["margs_1b"] = margs_1b
                state["sd_1b"] = init_state_dict(margs_1b, device)
            if case in ("packed4096", "fsdp4096"):
                res = case_packed(args, device, 512 if args.smoke else 4096, state, mode=case[:4] if case == "fsdp4096"
                                  else None, with_hf=case == "packed4096", profile=case in args.profile.split(","))
            elif case == "packed4096x2":
                res = case_packed(args, device, 512 if args.smoke else 4096, state, with_hf=False, budget=2 * args.budget)
            elif case == "packed2048":
                res = case_packed(args, device, 256 if args.smoke else 2048, state)
            elif case == "same4096":
                res = case_same(args, device, margs_1b, state["sd_1b"], 2, 256 if args.smoke else 4096, state)
            else:
                shape = case.removesuffix("_cpu")
                margs = common.model_args(shape)
                if args.smoke:
                    margs.n_layers, margs.vocab_size = 1, 4096
                sd = init_state_dict(margs, device)
                res = case_same(args, device, margs, sd, 2 if args.smoke else 8, 128 if args.smoke else 512, state)
                del sd
            results.append((case, res))
            summarize(case, res)
        except Exception as e:
            log(f"   {case} failed: {type(e).__name__}: {e}\n" + traceback.format_exc(limit=-6))
            results.append((case, {"error": f"{type(e).__name__}: {e}"}))
        finally:
            free(device)
            log(f"   ({time.time() - t_case:.0f} s)")
            table(results, name, final=False)  # $OUT/gpu_bench.txt stays current if the run is cut short
    table(results, name)
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    failed = [f"{case}: {line}" for case, res in results for line in res.get("mismatch", [])]
    if failed:
        log("\nFAILED loss checks (the sides do not compute the same model on the same tokens; numbers not valid):\n  "
            + "\n  ".join(failed))
        sys.exit(1)


SIDES = {"ours": "ours", "hf": "hf (padded)", "hf_packed": "hf packed"}


def summarize(case, res):
    for side in SIDES:
        r = res.get(side, {})
        if not r or r.get("skipped"):
            continue
        if "error" in r:
            log(f"   {side}: ERROR {r['error']}")
        else:
            mode = f" ({r['mode']})" if "mode" in r else ""
            log(f"   {SIDES[side]}{mode}: {r['sup'] / r['secs']:,.0f} trained tok/s, "
                f"{r['real'] / r['secs']:,.0f} real tok/s, {r['slots'] / r['secs']:,.0f} slots/s, "
                f"{r['secs'] / r['steps'] * 1e3:.0f} ms/step, first step{' (compile)' if side == 'ours' else ''} "
                f"{r['first_s']:.1f} s, "
                f"peak {r['peak_gb']:.1f} GB, loss step 0 {r['loss0']:.4f}")
    o = res.get("ours", {})
    res["mismatch"] = []
    for side, what in (("hf", "vs HF (same weights, same supervised tokens)"),
                       ("hf_packed", "vs HF packed (same packed batch: document isolation)")):
        h = res.get(side, {})
        checks = []
        if "token_losses" in o and "token_losses" in h:
            checks.append(common.token_check(what, o["token_losses"], h["token_losses"], "bf16"))
        if "loss0" in o and "check_loss" in h:
            checks.append(common.loss_check(what, o["loss0"], h["check_loss"], "bf16"))
        for line, ok in checks:
            log(f"   {line}")
            if not ok:
                res["mismatch"].append(line)
    for n in res.get("notes", []):
        log(f"   {n}")


def table(results, device_name, final=True):
    import model as M
    rows = []
    header = ["case", "ours tok/s", "HF tok/s", "ratio", "HF packed tok/s", "ratio", "ours MFU", "HF MFU",
              "HF packed MFU", "ours peak GB", "HF peak GB", "HF packed peak GB"]
    for case, res in results:
        if res.get("skipped") or "error" in res:
            rows.append([case, "skipped" if res.get("skipped") else "error"] + ["-"] * (len(header) - 2))
            continue
        cells = {}
        for side in SIDES:
            r = res.get(side, {"skipped": True})
            if r.get("skipped"):
                cells[side] = ("-", "-", "-", None)
                continue
            if "error" in r:
                cells[side] = ("error", "-", "-", None)
                continue
            tps = r["sup"] / r["secs"]
            mfu = M.flops_per_token(res["margs"], r["span"]) * r["real"] / r["secs"] / PEAK_FLOPS
            cells[side] = (f"{tps:,.0f}", f"{mfu:.1%}", f"{r['peak_gb']:.1f}", tps)
        o = cells["ours"][3]
        ratio = {s: f"{o / cells[s][3]:.2f}x" if o and cells[s][3] else "-" for s in ("hf", "hf_packed")}
        rows.append([case + (" LOSS MISMATCH" if res.get("mismatch") else ""), cells["ours"][0], cells["hf"][0],
                     ratio["hf"], cells["hf_packed"][0], ratio["hf_packed"]]
                    + [cells[s][1] for s in SIDES] + [cells[s][2] for s in SIDES])
    text = (f"\n== bench/gpu.py on {device_name}: trained (supervised) tokens/s, bf16, {time.time() - _T0:.0f} s "
            f"total; "
            f"HF = Trainer's padded batches, HF packed = our packed rows with position_ids (padding-free); MFU at the "
            f"documents' attention span, head on every real token, peak {PEAK_FLOPS / 1e12:.0f} TFLOP/s\n"
            + common.fmt_table(header, rows))
    if final:
        log(text)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "gpu_bench.txt"), "w") as f:
            f.write("\n".join(REPORT) + ("\n" if final else "\n(partial)" + text + "\n"))
        if final:
            print(f"(written to {os.path.join(out, 'gpu_bench.txt')})")


def run_generate(args, device):
    """bench/generate.py's GPU mode in a subprocess, bounded by the time left."""
    if args.smoke:
        cmd = [sys.executable, os.path.join(_HERE, "generate.py"), "--dim", "64", "--n-layers", "1",
               "--vocab", "512", "--new-tokens", "4", "--batch-sizes", "1"]
    else:
        cmd = [sys.executable, os.path.join(_HERE, "generate.py"), "--device", "cuda", "--dtype", "bfloat16"]
    timeout = max(5.0, left(args) - 5)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        text = (out.stdout + out.stderr).strip().splitlines()
        for line in text[-15:]:
            log(f"   {line}")
        if out.returncode:
            log(f"   generate.py exited with {out.returncode}")
    except subprocess.TimeoutExpired:
        log(f"   generate.py: killed after {timeout:.0f} s (time budget)")


if __name__ == "__main__":
    main()
