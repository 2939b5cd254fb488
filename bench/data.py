"""Data pipeline benchmark on GSM8K train with the real Llama 3.2 and Qwen3 tokenizers: cache build time, examples/s,
real (non-pad) token fraction per batching mode, and the loader's time per batch against a training step.

    python bench/data.py [--data ../shared/data/gsm8k/train.jsonl] [--max-seq-len 2048] [--rows 8]

Goals: packed >= 98% real tokens; loader time per batch < 2% of a training step of the smallest real preset. The step
is ESTIMATED, not measured: a qwen3_0_6b step on an H100 at 40% MFU = flops_per_token * tokens / (0.4 * 989e12).
The loader time is measured synchronously (num_prefetch=0), i.e. without the overlap the prefetch thread gives.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# bench/ first on sys.path would shadow the repo's data.py (this file) and the standard library's tokenize
# (bench/tokenize.py, imported through inspect): put the repository root in its place before any other import.
sys.path[0] = ROOT

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import data  # noqa: E402
from data import DatasetConfig, plan_epoch, real_token_fraction  # noqa: E402
from model import flops_per_token, get_preset  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402
from train import PEAK_BF16_FLOPS  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "gsm8k", "train.jsonl"))
    p.add_argument("--tokenizers", nargs="+", default=[os.path.join(ROOT, ".cache", "test_files", "llama3.2"),
                                                      os.path.join(ROOT, ".cache", "test_files", "qwen3")])
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--rows", type=int, default=8, help="packed rows per batch (dynamic: the same token budget)")
    p.add_argument("--batches", type=int, default=50, help="batches timed per mode")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (0 = one per CPU, at most 8)")
    args = p.parse_args()
    tokens_per_batch = args.rows * args.max_seq_len
    step_s = flops_per_token(get_preset("qwen3_0_6b"), args.max_seq_len) * tokens_per_batch / (0.4 * PEAK_BF16_FLOPS["H100"])
    print(f"data {args.data}; {os.cpu_count()} CPUs; estimated qwen3_0_6b H100 step for {tokens_per_batch} tokens "
          f"at 40% MFU: {step_s * 1e3:.1f} ms (2% = {step_s * 20:.2f} ms)")
    for tok_dir in args.tokenizers:
        tok = load_tokenizer(tok_dir)
        with tempfile.TemporaryDirectory() as cache:
            base = DatasetConfig(path=args.data, src_field="question", tgt_field="answer", cache_dir=cache,
                                 max_seq_len=args.max_seq_len, num_prefetch=0, num_workers=args.workers)
            t0 = time.perf_counter()
            d = data.load_data(base, tok, "train")
            build = time.perf_counter() - t0
            t0 = time.perf_counter()
            data.load_data(base, tok, "train")
            reuse = time.perf_counter() - t0
            n = d.meta["num_read"]
            print(f"\n{os.path.basename(tok_dir)}: {n} examples, {len(d)} kept, {int(d.lengths.sum())} tokens "
                  f"(mean {d.lengths.mean():.0f}, max {d.lengths.max()}), {d.meta['num_label_tokens']} supervised; "
                  f"cache build {build:.2f} s = {n / build:,.0f} examples/s; cached reload {reuse * 1e3:.0f} ms")
            modes = {"static 16": dict(packing=False, batch_size=16),
                     f"dynamic {tokens_per_batch}": dict(packing=False, max_num_tokens=tokens_per_batch),
                     f"packed {args.rows}x{args.max_seq_len}": dict(packing=True, max_num_tokens=tokens_per_batch)}
            for name, over in modes.items():
                cfg = dataclasses.replace(base, **over)
                t0 = time.perf_counter()
                plan = plan_epoch(d.lengths, cfg, 0, 0, True)
                plan_s = time.perf_counter() - t0
                loader = data.Loader(d, cfg, 0, 1, 0, "cpu", True, tok.eos_id)
                next(loader)  # warm up
                k = min(args.batches, loader.batches_per_epoch)
                t0 = time.perf_counter()
                batches = [next(loader) for _ in range(k)]
                per_batch = (time.perf_counter() - t0) / k
                ntok = sum(b.tokens.numel() for b in batches) / k
                real = real_token_fraction(plan, d.lengths, cfg)
                print(f"  {name:>18}: {len(plan):5d} batches/epoch, real tokens {real:6.1%}, "
                      f"plan {plan_s * 1e3:6.1f} ms/epoch, loader {per_batch * 1e3:6.2f} ms/batch of {ntok:,.0f} "
                      "tokens "
                      f"= {per_batch / step_s:.2%} of the estimated step")


if __name__ == "__main__":
    main()
