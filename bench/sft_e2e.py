"""End to end on real data: GSM8K train (7,473 examples) with the real Llama 3.2 tokenizer through OUR pipeline
(data.build_loader: best-fit-decreasing packing into rows with per-document positions and attention, then our
training step) against transformers fed the way its Trainer feeds by default, on CPU, fp32.

    python bench/sft_e2e.py                                  # ~2 min on 2 cores
    python bench/sft_e2e.py --budget 8192 --seq-len 1024 --compile off

Both sides: the Llama-architecture shape of bench/train_step.py (vocab 128,256), the same random init (saved once
with model.save_hf; ours reads it with model.load_hf, HF with from_pretrained), the same tokenized examples
(data.py's cache: src=question with BOS, tgt=answer with EOS, the answer supervised), grad clipping 1.0, each side's
default AdamW. The token budget per optimizer step is --budget token slots (padding included):
  ours: data.py packing, max_num_tokens=budget -> budget // seq_len rows of seq_len tokens (~99% real tokens),
        documents isolated by doc_ids (SDPA with a block-diagonal causal mask on CPU);
  HF:   Trainer defaults: static batches of N examples in random order (RandomSampler, every epoch reshuffled,
        last batch kept), padded to the longest example of the batch (DataCollatorWithPadding / TRL's collator:
        right padding, attention_mask, labels -100 on pads and prompt), loss = the model's own (mean over
        supervised tokens). N is the largest batch size whose MEAN padded size N * max_len over random batches
        is <= budget, found on the real length distribution (printed).
Time per step includes fetching the batch (our loader with its prefetch thread; HF collation). Trained tokens =
supervised tokens (labels != -100), identical per example on both sides. Epoch time is extrapolated: ours
batches/epoch x mean seconds/step (all batches have the same shape); HF seconds per padded token slot measured x
the padded token slots of one full epoch of its sampler (batches differ in size). One-time tokenization (data.py's
cache build) is excluded and reported separately.
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
# bench/ holds tokenize.py and data.py: first on sys.path (as `python bench/x.py` puts it) they would shadow the
# standard library's tokenize (which torch imports) and the repository's data.py. Use the repository root instead.
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse
import tempfile
import time

import numpy as np
import torch

from bench import common


def dataset_config(spec):
    import data
    return data.DatasetConfig(path=spec["data"], src_field="question", tgt_field="answer", max_seq_len=spec["seq_len"],
                              max_num_tokens=spec["budget"], packing=True, shuffle=True, cache_dir=spec["cache_dir"])


# ---------------------------------------------------------------------------------------------- the two sides
def setup_ours(spec):
    import data
    import tokenizer as T
    tok = T.load_tokenizer(spec["tokenizer"])
    loader = data.build_loader(dataset_config(spec), tok, "train", seed=spec["seed"])
    model, opt = common.ours_model_and_optimizer(spec)
    it = iter(loader)

    def step():
        b = next(it)
        # as train.py: SUM of token CE / supervised tokens of the step
        loss = model(b.tokens, b.positions, b.doc_ids, b.labels) / max(b.num_label_tokens, 1)
        loss_val = common.backward_and_step(model, opt, loss)
        return {"loss": loss_val, "sup": b.num_label_tokens, "real": b.num_tokens, "slots": b.tokens.numel()}

    return step, {"batches_per_epoch": loader.batches_per_epoch}


def setup_hf(spec):
    import data
    import tokenizer as T
    from transformers import AutoModelForCausalLM
    tok = T.load_tokenizer(spec["tokenizer"])
    td = data.load_data(dataset_config(spec), tok, "train")  # the cache the parent built: same examples as ours
    examples = [td.example(i) for i in range(len(td))]  # (ids, mask) numpy arrays, HF feeds all ids
    pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_id
    model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    opt = common.hf_optimizer(model)
    lengths = [len(ids) for ids, _ in examples]
    state = {"epoch": 0, "batches": common.hf_batches(lengths, spec["hf_batch_size"], spec["seed"], 0)}

    def next_indices():
        if not state["batches"]:
            state["epoch"] += 1
            state["batches"] = common.hf_batches(lengths, spec["hf_batch_size"], spec["seed"], state["epoch"])
        return state["batches"].pop(0)

    def step():
        input_ids, attention_mask, labels = common.hf_collate([examples[i] for i in next_indices()], pad_id)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss_val = common.backward_and_step(model, opt, loss)
        return {"loss": loss_val, "sup": int((labels[:, 1:] != -100).sum()), "real": int(attention_mask.sum()),
                "slots": input_ids.numel()}

    return step, {"n_examples": len(examples)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=os.path.join(common.REPO, "..", "shared", "data", "gsm8k"),
                   help="directory with train.jsonl (fields question / answer)")
    p.add_argument("--tokenizer", default=os.path.join(common.REPO, ".cache", "test_files", "llama3.2"))
    p.add_argument("--cache-dir", default=os.path.join(common.REPO, ".cache", "bench_data"),
                   help="data.py's tokenized cache (built once, reused)")
    p.add_argument("--model", default="llama", help="a key of bench/common.py CPU_SHAPES or a model.py preset")
    p.add_argument("--budget", type=int, default=4096, help="token slots (padding included) per optimizer step")
    p.add_argument("--seq-len", type=int, default=512,
                   help="ours: packed row length (and max example length; GSM8K max is 461). On CPU the document mask\n"
                        "is dense (SDPA over the whole row), so shorter rows cost less attention per token")
    p.add_argument("--compile", choices=["off", "blocks"], default="blocks", help="ours: per-block torch.compile (faster on CPU too)")
    p.add_argument("--warmup", type=int, default=1)
    common.add_timing_args(p)
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.data, "train.jsonl")):
        raise FileNotFoundError(f"{args.data}/train.jsonl not found: pass --data DIR (GSM8K, fields question/answer)")
    if args.budget % args.seq_len:
        raise ValueError(f"--budget {args.budget} must be a multiple of --seq-len {args.seq_len} (whole packed rows)")
    print(common.env_line())

    import data
    import model as M
    import tokenizer as T
    spec = dict(data=os.path.abspath(args.data), tokenizer=args.tokenizer, cache_dir=args.cache_dir,
                seq_len=args.seq_len, budget=args.budget, seed=args.seed, threads=args.threads, compile=False,
                ours_fused=args.ours_adamw == "fused")
    # Tokenize once here (data.py's cache), so neither timed side pays for it.
    t0 = time.perf_counter()
    td = data.load_data(dataset_config(spec), T.load_tokenizer(args.tokenizer), "train")
    t_cache = time.perf_counter() - t0
    hf_lengths = (td.lengths + 1).tolist()  # HF feeds all ids; ours n ids -> n - 1 model tokens
    n_hf = common.choose_hf_batch_size(hf_lengths, args.budget, args.seed)
    hf_epoch = common.hf_batches(hf_lengths, n_hf, args.seed, 0)
    hf_epoch_slots = sum(len(b) * max(hf_lengths[i] for i in b) for b in hf_epoch)
    sup_total = int(td.meta.get("num_label_tokens", 0))
    print(f"GSM8K train: {len(td)} examples, {int(td.lengths.sum()):,} model tokens, {sup_total:,} supervised; "
          f"tokenize+cache {t_cache:.1f}s (0 when cached)")
    print(f"AdamW: ours {'fused' if spec['ours_fused'] else 'foreach'} (--ours-adamw {args.ours_adamw}), HF fused "
          f"(Trainer default); ours compile={args.compile}; fp32; HF sdpa")
    print(f"budget {args.budget} token slots/step: ours {args.budget // args.seq_len} packed rows x {args.seq_len}; "
          f"HF static batch {n_hf} examples padded to the longest ({hf_epoch_slots / len(hf_epoch):.0f} slots/step "
          f"on average over an epoch, {len(hf_epoch)} steps/epoch)")

    margs = common.model_args(args.model)
    with tempfile.TemporaryDirectory() as hf_dir:
        common.save_random_init(margs, hf_dir)
        spec["hf_dir"] = hf_dir
        sides = []
        try:
            sides.append(common.Worker("ours" + ("+compile" if args.compile == "blocks" else ""), setup_ours,
                                       {**spec, "compile": args.compile == "blocks"}))
            sides.append(common.Worker("hf", setup_hf, {**spec, "hf_batch_size": n_hf}))
            mem = common.run_alternating(sides, args.warmup, args.rounds, args.steps)
        finally:
            for s in sides:
                s.close()

    rows, res = [], {}
    for s in sides:
        secs = sum(t for t, _ in s.records)
        tot = {k: sum(r[k] for _, r in s.records) for k in ("sup", "real", "slots")}
        if s.name.startswith("ours"):
            epoch_s = s.info["batches_per_epoch"] * secs / len(s.records)
        else:
            epoch_s = hf_epoch_slots * secs / tot["slots"]
        res[s.name] = dict(sup_tps=tot["sup"] / secs, epoch_s=epoch_s)
        rows.append([s.name, f"{tot['sup'] / secs:,.0f}", f"{tot['real'] / secs:,.0f}", f"{tot['slots'] / secs:,.0f}",
                     f"{tot['real'] / tot['slots']:.1%}", f"{secs / len(s.records):.2f}", f"{s.first_step_s:.1f}",
                     f"{epoch_s / 60:.1f}", f"{mem[s.name]['train']:.2f}"])
    print(f"\n== {args.model} ({M.num_params(margs) / 1e6:.1f}M params), {len(sides[0].records)} timed steps per side, "
          f"alternating rounds of {args.steps}")
    print(common.fmt_table(["side", "trained tok/s", "real tok/s", "slots/s", "real frac", "s/step", "1st step s",
                            "epoch min", "peak RSS train GB"], rows))
    ours, hf = sides[0].name, sides[1].name
    print(f"{ours} / hf: trained tokens/s {res[ours]['sup_tps'] / res[hf]['sup_tps']:.2f}x; "
          f"epoch {res[ours]['epoch_s'] / 60:.1f} min vs {res[hf]['epoch_s'] / 60:.1f} min")
    print(common.env_line())


if __name__ == "__main__":
    main()
