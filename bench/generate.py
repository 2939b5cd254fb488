"""Decode throughput of generate.generate, eager and compile=True, against Hugging Face generate, on the same
random-init Llama and prompts.

    python bench/generate.py                                    # CPU, fp32: dim 512, 8 layers, vocab 32000
    python bench/generate.py --device cuda --dtype bfloat16     # compiled: CUDA graphs ("reduce-overhead")
    python bench/generate.py --dim 2048 --n-layers 16 --vocab 128256 --device cuda --dtype bfloat16 --new-tokens 256

Greedy, eos disabled, so both decode exactly --new-tokens tokens per sequence. Decode tokens/s excludes the prefill:
it is B * (N - 1) / (time for N new tokens - time for 1 new token), the best of --repeats runs; compilation
happens in an untimed warm-up run. The "same" columns count sequences whose tokens match HF's exactly (bf16 ties
can differ legitimately; fp32 should match).
"""
import os
import sys

# bench/ holds generate.py (this file), data.py and tokenize.py: first on sys.path (as `python bench/x.py` puts it)
# they would shadow the repository's modules and the standard library's tokenize. Put the repo root there instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import generate as gen  # noqa: E402
import model as model_lib  # noqa: E402


def timed(fn, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def decode_rate(run, batch_size, new_tokens, repeats, device):
    """run(n) generates n new tokens per sequence; returns (decode tokens/s, the output of run(new_tokens))."""
    run(new_tokens)  # warm-up (and compilation)
    t_full = min(timed(lambda: run(new_tokens), device)[0] for _ in range(repeats))
    t_one = min(timed(lambda: run(1), device)[0] for _ in range(repeats))
    return batch_size * (new_tokens - 1) / max(t_full - t_one, 1e-9), run(new_tokens)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=8)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--n-kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time generate(compile=True), one compiled decode graph (--no-compile: eager and HF only)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default); 1 is steadier on a "
                   "loaded machine, where OpenMP barriers of tiny decode ops stall")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    import transformers

    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.dim, intermediate_size=4 * a.dim * 2 // 3 // 64 * 64 + 64,
        num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
        max_position_embeddings=a.prompt_len + a.new_tokens + 64, rope_theta=500000.0, tie_word_embeddings=False,
        initializer_range=0.1)  # a wider init than 0.02 keeps greedy argmaxes away from near-ties
    hf = transformers.LlamaForCausalLM(cfg).eval().to(dtype)  # both sides read the same (rounded) weights
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours_model = model_lib.load_hf(tmp, dtype=dtype, device=a.device).eval()
    hf = hf.to(a.device)
    n_params = sum(p.numel() for p in ours_model.parameters())
    print(f"device={a.device} dtype={a.dtype} threads={torch.get_num_threads()} params={n_params / 1e6:.1f}M "
          f"prompt_len={a.prompt_len} new_tokens={a.new_tokens} compile={a.compile} torch={torch.__version__} "
          f"transformers={transformers.__version__}")
    variants = [False, True] if a.compile else [False]
    names = ["ours eager", "ours compiled"][:len(variants)]
    print("| batch | " + " | ".join(f"{n} tok/s" for n in names) + " | HF tok/s | "
          + " | ".join(f"{n} / HF" for n in names) + " | " + " | ".join(f"same ({n})" for n in names)
          + " | tokens equal before the first difference |\n" + "|---" * (3 + 3 * len(variants)) + "|")
    g = torch.Generator().manual_seed(1)
    for bs in a.batch_sizes:
        prompts = torch.randint(0, a.vocab, (bs, a.prompt_len), generator=g)
        ours = [decode_rate(lambda n: gen.generate(ours_model, prompts.tolist(), n, stop_ids=[], compile=c),
                            bs, a.new_tokens, a.repeats, a.device) for c in variants]
        x = prompts.to(a.device)

        def hf_run(n):
            with torch.no_grad():
                return hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                                   min_new_tokens=n, eos_token_id=None, pad_token_id=0)
        hf_rate, hf_out = decode_rate(hf_run, bs, a.new_tokens, a.repeats, a.device)
        hf_out = hf_out[:, a.prompt_len:].tolist()
        same = [sum(o == h for o, h in zip(out, hf_out)) for _, out in ours]
        prefix = [sum(next((i for i, (x, y) in enumerate(zip(o, h)) if x != y), len(o)) for o, h in zip(out, hf_out))
                  for _, out in ours]
        print(f"| {bs} | " + " | ".join(f"{rate:.1f}" for rate, _ in ours) + f" | {hf_rate:.1f} | "
              + " | ".join(f"{rate / hf_rate:.2f}x" for rate, _ in ours) + " | "
              + " | ".join(f"{n}/{bs}" for n in same) + " | " + ", ".join(f"{n / bs:.1f}" for n in prefix) + " |")


if __name__ == "__main__":
    main()
