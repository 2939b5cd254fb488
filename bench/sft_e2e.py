"""End to end on real data: GSM8K train (7,473 examples) with the real Llama 3.2 tokenizer through OUR pipeline
(data.build_loader: best-fit-decreasing packing into rows with per-document positions and attention, then our
training step) against transformers fed two ways, on CPU, fp32: as its Trainer feeds by default (padded batches)
and padding-free (our packed rows), and against TRL's SFTTrainer with packing (when trl is installed), in separate
processes timed in alternating rounds.

    python bench/sft_e2e.py                                  # ~4 min on 2 cores
    python bench/sft_e2e.py --rounds 2 --steps 1             # quicker (~2.5 min), noisier
    python bench/sft_e2e.py --budget 8192 --seq-len 1024 --compile off

All sides: the Llama-architecture shape of bench/train_step.py (vocab 128,256), the same random init (common.INIT_STD,
saved once with model.save_hf; ours reads it with model.load_hf, HF with from_pretrained), the same tokenized examples
(data.py's cache: src=question with BOS, tgt=answer with EOS, the answer supervised), grad clipping 1.0, each side's
default AdamW. The token budget per optimizer step is --budget token slots (padding included):
  ours: data.py packing, max_num_tokens=budget -> budget // seq_len rows of seq_len tokens (~99% real tokens),
        documents isolated by doc_ids (SDPA with a block-diagonal causal mask on CPU);
  HF:   Trainer defaults: static batches of N examples in random order (RandomSampler, every epoch reshuffled,
        last batch kept), padded to the longest example of the batch (DataCollatorWithPadding / TRL's collator:
        right padding, attention_mask, labels -100 on pads and prompt), loss = the model's own (mean over
        supervised tokens). N is the largest batch size whose MEAN padded size N * max_len over random batches
        is <= budget, found on the real length distribution (printed). The issue's goal is defined against this.
  HF packed: what a user who avoids padding does (TRL padding_free / DataCollatorWithFlattening): EXACTLY our
        packed rows from our loader (same seed, so the same batches in the same order, checked by a fingerprint):
        input_ids, position_ids restarting per document, no attention_mask, use_cache=False, HF-convention labels
        (common.hf_packed_inputs); transformers 5.x derives the documents from position_ids and SDPA masks across
        them. On the same first batch and weights its per-token CE (before the step) and its step-0 loss must
        equal ours (common.TOKEN_RTOL, LOSS_RTOL): that shows the document isolation really happens (with
        use_cache=True it silently does not); otherwise the run stops before timing.
  TRL:  SFTTrainer(packing=True) as its users run it (setup_trl): its own tokenization of {prompt: question,
        completion: answer} records, completion-only loss, best-fit-decreasing rows of seq_len flattened padding-free,
        its fused chunked LM head (TRL >= 1.x; on CPU its torch fallback, scoring every position, not only the
        supervised ones), entropy / token-accuracy metrics, Trainer's default AdamW, per_device_train_batch_size =
        budget // seq_len rows. Its batches are its own, so its check is its first batch: TRL's per-token log-probs
        against our model on the same flattened row (which shows its sdpa path isolates the documents).
Time per step includes fetching the batch (our loader with its prefetch thread; HF collation). Trained tokens =
supervised tokens (labels != -100), identical per example on all sides. Epoch time is extrapolated: ours and HF
packed batches/epoch x mean seconds/step (all batches have the same shape); HF padded seconds per padded token slot
measured x the padded token slots of one full epoch of its sampler (batches differ in size). The headline is the
epoch-time ratio: HF padded's few timed batches are less representative of its padding than a whole epoch.
One-time tokenization (data.py's cache build) is excluded and reported separately; the check's forward runs in each
worker's setup (ours' blocks compile there, so "1st step s" of ours no longer includes compilation).
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
    # The check: per-token CE of the first batch (the first step's), here in setup, so that its full logits are
    # not counted in the training peak RSS. Grad mode on: the blocks compile here, for the training graph.
    pending = [next(it)]
    check = common.ours_token_losses(model, pending[0].tokens, pending[0].positions, pending[0].doc_ids,
                                     pending[0].labels)

    def step():
        b = pending.pop() if pending else next(it)
        # as train.py: SUM of token CE / supervised tokens of the step
        loss = model(b.tokens, b.positions, b.doc_ids, b.labels) / max(b.num_label_tokens, 1)
        loss_val = common.backward_and_step(model, opt, loss)
        return {"loss": loss_val, "sup": b.num_label_tokens, "real": b.num_tokens, "slots": b.tokens.numel()}

    return step, {"batches_per_epoch": loader.batches_per_epoch, "token_losses": check.numpy(),
                  "fingerprint": fingerprint(pending[0].tokens)}


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


def setup_hf_packed(spec):
    import data
    import tokenizer as T
    from transformers import AutoModelForCausalLM
    tok = T.load_tokenizer(spec["tokenizer"])
    loader = data.build_loader(dataset_config(spec), tok, "train", seed=spec["seed"])  # ours' batches, same order
    model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    opt = common.hf_optimizer(model)
    it = iter(loader)
    pending = [next(it)]  # as ours: the check's forward in setup, before the peak-RSS reset
    b0 = pending[0]
    check = common.hf_token_losses(model, common.hf_packed_inputs(b0.tokens, b0.labels, b0.positions))

    def step():
        b = pending.pop() if pending else next(it)
        loss = model(**common.hf_packed_inputs(b.tokens, b.labels, b.positions)).loss  # HF's own mean CE
        loss_val = common.backward_and_step(model, opt, loss)
        return {"loss": loss_val, "sup": b.num_label_tokens, "real": b.num_tokens, "slots": b.tokens.numel()}

    return step, {"batches_per_epoch": loader.batches_per_epoch, "token_losses": check.numpy(),
                  "fingerprint": fingerprint(b0.tokens)}


def setup_trl(spec):
    """TRL's SFTTrainer as its users run it: its own data pipeline (prompt-completion records tokenized by the HF
    tokenizer, completion-only loss, packing=True: best-fit-decreasing rows of max_length flattened padding-free with
    position_ids), its own loss (the fused, chunked LM head of TRL >= 1.x with its entropy / token-accuracy metrics),
    the Trainer's default optimizer; driven one optimizer step at a time through Trainer.training_step."""
    import json
    import model as M
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    import transformers
    transformers.logging.set_verbosity_error()  # its per-example notes would fill the benchmark's output
    with open(os.path.join(spec["data"], "train.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    ds = Dataset.from_list([{"prompt": r["question"], "completion": r["answer"]} for r in records])
    hf_tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
    model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32, attn_implementation="sdpa")
    rows = spec["budget"] // spec["seq_len"]
    cfg = SFTConfig(output_dir=os.path.join(spec["hf_dir"], "trl_out"), per_device_train_batch_size=rows,
                    max_length=spec["seq_len"], packing=True, learning_rate=1e-5, max_grad_norm=1.0,
                    seed=spec["seed"], save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                    disable_tqdm=True, max_steps=10 ** 6)
    t0 = time.perf_counter()
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=hf_tok)
    prep_s = time.perf_counter() - t0
    opt = trainer.create_optimizer()
    loader = trainer.get_train_dataloader()
    state = {"it": iter(loader)}

    def next_batch():
        try:
            return next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            return next(state["it"])

    # The check: TRL's first batch through its fused head against our model on the same flattened row (documents
    # from position_ids restarting at 0), per supervised token. TRL's sdpa path must isolate the documents too.
    pending = [next_batch()]
    b0 = pending[0]
    with torch.no_grad():
        out = model(**b0, fused_lm_head=True)
        trl_losses = -out.log_probs[out.label_mask]
        ours = M.load_hf(spec["hf_dir"], dtype=torch.float32, device="cpu")
        ids, pos = b0["input_ids"], b0["position_ids"]
        labels = torch.nn.functional.pad(b0["labels"][:, 1:], (0, 1), value=-100)  # ours: the target of position t
        ours_losses = common.ours_token_losses(ours, ids, pos, (pos == 0).cumsum(1), labels)
        del ours, out
    sup = sum(sum(1 for t in labels if t != -100) for labels in trainer.train_dataset["labels"])

    def step():
        b = pending.pop() if pending else next_batch()
        n_sup = int((b["labels"][:, 1:] != -100).sum())  # Trainer's num_items_in_batch
        loss = trainer.training_step(model, b, n_sup)  # forward + backward (TRL's compute_loss)
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        loss_val, _ = loss.item(), gn.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"loss": loss_val, "sup": n_sup, "real": b["input_ids"].numel(), "slots": rows * spec["seq_len"]}

    return step, {"batches_per_epoch": len(loader), "prep_s": prep_s, "sup_per_epoch": sup,
                  "token_losses": ours_losses.numpy(), "ref_token_losses": trl_losses.numpy()}


def fingerprint(tokens):
    """A number that differs between different batches (to check two sides got the same one)."""
    return int((tokens.flatten() * torch.arange(1, tokens.numel() + 1) % 1000003).sum())


def check_losses(sides):
    """After every side's first step: HF packed fed our first packed batch must compute our model (fail loudly):
    the per-token CE before the step (common.token_check) and the step-0 mean loss (common.loss_check)."""
    ours, hfp = sides[0], sides[2]
    if ours.info["fingerprint"] != hfp.info["fingerprint"]:
        raise SystemExit("HF packed did not get ours' first batch (fingerprints differ): no loss check possible")
    checks = [common.token_check("(first packed batch, HF packed)", ours.info["token_losses"],
                                 hfp.info["token_losses"], "fp32"),
              common.loss_check("(first packed batch, HF packed)", ours.loss0, hfp.loss0, "fp32")]
    trl = [s for s in sides if s.name == "trl"]
    if trl:  # TRL's own first batch, checked against our model in its worker
        checks.append(common.token_check("(TRL's first packed batch, TRL's fused head vs ours)",
                                         trl[0].info["token_losses"], trl[0].info["ref_token_losses"], "fp32"))
    for line, _ in checks:
        print(line, flush=True)
    if not all(ok for _, ok in checks):
        raise SystemExit("FAILED: an HF side does not compute ours' losses on the same packed batch and weights: one "
                         "side does not isolate the documents (or positions/labels differ); numbers not valid")


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
    p.add_argument("--trl", choices=["auto", "on", "off"], default="auto",
                   help="a fourth side, TRL's SFTTrainer with packing=True (auto: when trl is installed)")
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
          f"(Trainer default); ours compile={args.compile}; fp32; HF sdpa; init std {common.INIT_STD}")
    print(f"budget {args.budget} token slots/step: ours and HF packed {args.budget // args.seq_len} packed rows x "
          f"{args.seq_len}; HF padded: static batch {n_hf} examples padded to the longest "
          f"({hf_epoch_slots / len(hf_epoch):.0f} slots/step on average over an epoch, {len(hf_epoch)} steps/epoch)")

    use_trl = args.trl == "on"
    if args.trl == "auto":
        try:
            import trl  # noqa: F401
            use_trl = True
        except ImportError:
            print("note: trl is not installed: no TRL side (pip install trl; --trl off silences this)")
    margs = common.model_args(args.model)
    with tempfile.TemporaryDirectory() as hf_dir:
        common.save_random_init(margs, hf_dir)
        spec["hf_dir"] = hf_dir
        sides = []
        try:
            sides.append(common.Worker("ours" + ("+compile" if args.compile == "blocks" else ""), setup_ours,
                                       {**spec, "compile": args.compile == "blocks"}))
            sides.append(common.Worker("hf padded", setup_hf, {**spec, "hf_batch_size": n_hf}))
            sides.append(common.Worker("hf packed", setup_hf_packed, spec))
            if use_trl:
                sides.append(common.Worker("trl", setup_trl, spec))
                print(f"TRL SFTTrainer (trl {__import__('trl').__version__}): dataset preparation (tokenize + pack) "
                      f"{sides[-1].info['prep_s']:.1f}s, {sides[-1].info['batches_per_epoch']} steps/epoch, "
                      f"{sides[-1].info['sup_per_epoch']:,} supervised tokens/epoch (ours {sup_total:,})", flush=True)
            mem = common.run_alternating(sides, args.warmup, args.rounds, args.steps, after_first=check_losses)
        finally:
            for s in sides:
                s.close()

    rows, res = [], {}
    for s in sides:
        secs = sum(t for t, _ in s.records)
        tot = {k: sum(r[k] for _, r in s.records) for k in ("sup", "real", "slots")}
        if "batches_per_epoch" in s.info:  # ours, hf packed: every batch has the same shape
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
    ours, pad, pk = (res[s.name] for s in sides[:3])
    epoch = {k: r["epoch_s"] / ours["epoch_s"] for k, r in (("pad", pad), ("pk", pk))}
    print(f"\nHEADLINE, one epoch of GSM8K train: ours {ours['epoch_s'] / 60:.1f} min; HF padded (Trainer default) "
          f"{pad['epoch_s'] / 60:.1f} min = {epoch['pad']:.2f}x (goal >= 2x: {'met' if epoch['pad'] >= 2 else 'MISSED'}"
          f"); "
          f"HF packed (padding-free, our rows) {pk['epoch_s'] / 60:.1f} min = {epoch['pk']:.2f}x")
    if "trl" in res:
        print(f"TRL SFTTrainer (packing=True, its own tokenization and rows): {res['trl']['epoch_s'] / 60:.1f} min = "
              f"{res['trl']['epoch_s'] / ours['epoch_s']:.2f}x ours; trained tok/s ours / TRL "
              f"{ours['sup_tps'] / res['trl']['sup_tps']:.2f}x")
    print(f"trained tokens/s of the timed batches only: ours / HF padded {ours['sup_tps'] / pad['sup_tps']:.2f}x "
          f"(its {len(sides[1].records)} batches pad differently from a whole epoch), ours / HF packed "
          f"{ours['sup_tps'] / pk['sup_tps']:.2f}x (the same batches: the model step alone)")
    print(f"checked: step-0 loss on the first packed batch, ours {sides[0].loss0:.6f}, HF packed {sides[2].loss0:.6f}")
    print(common.env_line())


if __name__ == "__main__":
    main()
