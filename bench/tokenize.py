"""Tokens/s of our encode_batch (tiktoken) against HF `tokenizers`' batch APIs at the same thread count, on GSM8K
train (question + answer per example), for Llama 3.2 and Qwen3. Prints a table with the ratios (goal: >= 1.0x).

    python3 bench/tokenize.py [--threads 2] [--repeats 7] [--data ../shared/data/gsm8k/train.jsonl]
    python3 bench/tokenize.py --threads 1 2        # one child process per thread count (rayon's pool is fixed)

HF is timed on both of its batch APIs: `encode_batch` (Encodings with offsets, what transformers' fast tokenizers
call) and `encode_batch_fast` (no offsets: its fastest batch API, when the installed `tokenizers` has it). The
ratio column compares ours with HF's FASTEST API. HF's thread count is set the only way `tokenizers` offers: the
environment (RAYON_NUM_THREADS, TOKENIZERS_PARALLELISM=true) before it is imported; the script prints how many rayon
worker threads actually started. Ours gets the same count as `encode_batch(num_threads=N)`.

Timing: after a warm-up of every method, `--repeats` rounds each time every method once, in an order that rotates
every round (so load drift hits all alike); the table gives the MEDIAN per method (and the best in brackets). HF's
time covers the API call only (Encoding objects), not reading `.ids` out of them; ours returns lists of ids.
The ids of every method are checked equal on every text.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Replace bench/ on sys.path: this file would otherwise shadow the standard library's tokenize module.
sys.path[0] = str(ROOT)


def n_threads_now():
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return -1


def run_one(args, threads):
    # rayon reads these once, when its global pool starts: set them before tokenizers is imported (and used)
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    import tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from tokenizer import load_tokenizer

    rows = [json.loads(line) for line in open(args.data)]
    texts = [r["question"] + "\n" + r["answer"] for r in rows]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{len(texts)} texts ({sum(map(len, texts)) / 1e6:.2f} M chars), {threads} threads, median (best) of "
          f"{args.repeats} interleaved rounds; tokenizers {tokenizers.__version__}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average {load}\n")
    print(f"{'tokenizer':<10} {'tokens':>9} {'ours tok/s':>22} {'HF encode_batch':>22} "
          f"{'HF encode_batch_fast':>22} {'ours/HF':>7} {'ours/HF fast':>12}")
    results = {}
    for path in args.tokenizers:
        ours = load_tokenizer(path)
        hf = HFTokenizer.from_file(str(Path(path) / "tokenizer.json"))
        methods = {"ours": lambda: ours.encode_batch(texts, num_threads=threads),
                   "hf": lambda: hf.encode_batch(texts, add_special_tokens=False)}
        if hasattr(hf, "encode_batch_fast"):
            methods["hf_fast"] = lambda: hf.encode_batch_fast(texts, add_special_tokens=False)
        before = n_threads_now()
        outs = {k: f() for k, f in methods.items()}  # warm-up (thread pools, caches) and the ids to check
        rayon_workers = n_threads_now() - before if results == {} else None
        ids = outs["ours"]
        for k in methods:
            if k != "ours":
                bad = [i for i, (a, e) in enumerate(zip(ids, outs[k])) if a != e.ids]
                assert len(outs[k]) == len(ids) and not bad, f"{path}: ids differ from HF {k} on texts {bad[:5]}"
        del outs
        times = {k: [] for k in methods}
        names = list(methods)
        for r in range(args.repeats):
            for k in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                methods[k]()
                times[k].append(time.perf_counter() - t0)
        n = sum(map(len, ids))
        med = {k: statistics.median(v) for k, v in times.items()}
        cell = {k: f"{n / med[k] / 1e6:.2f}M ({n / min(times[k]) / 1e6:.2f}M)" for k in times}
        fast = min(med[k] for k in med if k != "ours")
        print(f"{Path(path).name:<10} {n:>9} {cell['ours']:>22} {cell['hf']:>22} {cell.get('hf_fast', 'n/a'):>22} "
              f"{med['hf'] / med['ours']:>6.2f}x {fast / med['ours']:>11.2f}x")
        if rayon_workers is not None:
            print(f"           (threads started by the warm-up: {rayon_workers}; HF's rayon pool is "
                  f"{threads} workers when RAYON_NUM_THREADS is honoured)")
        results[Path(path).name] = {k: n / v for k, v in med.items()}
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[os.cpu_count()],
                   help="thread count of both sides; several: one child process each")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"))
    p.add_argument("--tokenizers", nargs="+", default=[str(ROOT / ".cache/test_files/llama3.2"),
                                                        str(ROOT / ".cache/test_files/qwen3")])
    args = p.parse_args()
    if len(args.threads) == 1:
        run_one(args, args.threads[0])
        return
    for t in args.threads:  # rayon's global pool is sized once per process
        cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(t), "--repeats", str(args.repeats),
               "--data", args.data, "--tokenizers", *args.tokenizers]
        print(f"== {t} thread(s)", flush=True)
        subprocess.run(cmd, check=True)
        print(flush=True)


if __name__ == "__main__":
    main()
