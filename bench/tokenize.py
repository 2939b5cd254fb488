"""Tokens/s of our encode_batch (tiktoken) against HF `tokenizers` encode_batch, same thread count, on GSM8K train
(question + answer per example), for Llama 3.2 and Qwen3. Prints a table with the ratio (goal: >= 1.0x).

    python3 bench/tokenize.py [--threads N] [--repeats 3] [--data ../shared/data/gsm8k/train.jsonl]
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Replace bench/ on sys.path: this file would otherwise shadow the standard library's tokenize module.
sys.path[0] = str(ROOT)


def best_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"))
    p.add_argument("--tokenizers", nargs="+", default=[str(ROOT / ".cache/test_files/llama3.2"),
                                                        str(ROOT / ".cache/test_files/qwen3")])
    args = p.parse_args()
    # rayon reads these once, when its pool starts: set them before tokenizers is imported
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    from tokenizers import Tokenizer as HFTokenizer

    from tokenizer import load_tokenizer

    rows = [json.loads(line) for line in open(args.data)]
    texts = [r["question"] + "\n" + r["answer"] for r in rows]
    print(f"{len(texts)} texts ({sum(map(len, texts)) / 1e6:.2f} M chars), {args.threads} threads, "
          f"best of {args.repeats}\n")
    print(f"{'tokenizer':<12} {'tokens':>9} {'ours tok/s':>12} {'HF tok/s':>12} {'ratio':>7}")
    for path in args.tokenizers:
        ours = load_tokenizer(path)
        hf = HFTokenizer.from_file(str(Path(path) / "tokenizer.json"))
        ours.encode_batch(texts[:100], num_threads=args.threads)  # warm up thread pools
        hf.encode_batch(texts[:100], add_special_tokens=False)
        t_ours, ids = best_time(lambda: ours.encode_batch(texts, num_threads=args.threads), args.repeats)
        t_hf, enc = best_time(lambda: hf.encode_batch(texts, add_special_tokens=False), args.repeats)
        assert ids == [e.ids for e in enc], f"{path}: ids differ from HF tokenizers"
        n = sum(map(len, ids))
        print(f"{Path(path).name:<12} {n:>9} {n / t_ours:>12,.0f} {n / t_hf:>12,.0f} {t_hf / t_ours:>6.2f}x")


if __name__ == "__main__":
    main()
