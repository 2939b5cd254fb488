"""Decode throughput of generate.generate, eager and compile=True, against Hugging Face generate, default (dynamic
KV cache, eager) and with a static cache + torch.compile, on the same random-init Llama and prompts.

    python bench/generate.py                                    # CPU, fp32: dim 512, 8 layers, vocab 32000 (56M)
    python bench/generate.py --dim 128 --n-layers 4 --n-heads 4 --n-kv-heads 4 --vocab 384   # 1M demo shape
    python bench/generate.py --device cuda --dtype bfloat16     # compiled: CUDA graphs ("reduce-overhead")
    python bench/generate.py --dim 2048 --n-layers 16 --vocab 128256 --device cuda --dtype bfloat16 --new-tokens 256

Variants: "ours eager", "ours compiled" (`generate(compile=True)`: one torch.compile'd one-token forward over a
static KV cache), "HF" (`model.generate` as it runs by default: DynamicCache, no compilation) and "HF static+compiled"
(`generate(cache_implementation="static", compile_config=CompileConfig(...))`: transformers' own compiled decoding,
a StaticCache and `torch.compile(model.__call__)` for the decode steps, with the same torch.compile settings as ours:
fullgraph=True, dynamic=False, mode "reduce-overhead" on CUDA and the default mode on CPU; transformers compiles only
on accelerators unless CompileConfig._compile_all_devices is set, which this script sets on CPU). --hf-static-eager
also times HF's static cache without compilation; --no-compile / --no-hf-compile drop the compiled variants.

Greedy, eos disabled, so every variant decodes exactly --new-tokens tokens per sequence. Decode tokens/s excludes
the prefill: B * (N - 1) / (time for N new tokens - time for 1 new token). Compilation happens in an untimed warm-up
run of every variant; then --repeats rounds time every variant (N tokens, then 1) in an order that rotates each
round, so load drift hits all alike. The table gives the MEDIAN over rounds of each variant's rate (the best-of
rate, min(time N) - min(time 1), in the notes below it). The "same" columns count sequences whose tokens equal
HF default's exactly (bf16 ties can differ legitimately; fp32 should match).
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


def decode_rates(runs, batch_size, new_tokens, repeats, device, optional=()):
    """runs: {name: run(n)}, run(n) generates n new tokens per sequence. Warms every run up (compilation), then
    `repeats` interleaved rounds. Returns {name: (median decode tok/s, best-of decode tok/s, output of run(N))};
    a run named in `optional` whose warm-up raises is reported (None) instead of ending the benchmark."""
    outs, failed = {}, {}
    for k, run in runs.items():  # warm-up (and compilation); the tokens to compare
        try:
            outs[k] = run(new_tokens)
            run(1)
        except Exception as e:
            if k not in optional:
                raise
            failed[k] = None
            print(f"{k}: failed, left out: {type(e).__name__}: {str(e)[:300]}", flush=True)
    runs = {k: r for k, r in runs.items() if k not in failed}
    names, full, one = list(runs), {k: [] for k in runs}, {k: [] for k in runs}
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            full[k].append(timed(lambda: runs[k](new_tokens), device)[0])
            one[k].append(timed(lambda: runs[k](1), device)[0])
    n = batch_size * (new_tokens - 1)
    res = {}
    for k in names:
        med = sorted(n / max(f - o, 1e-9) for f, o in zip(full[k], one[k]))[len(full[k]) // 2]
        res[k] = (med, n / max(min(full[k]) - min(one[k]), 1e-9), outs[k])
    return {**res, **failed}


def loadavg():
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


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
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds (the median is reported)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time generate(compile=True), one compiled decode graph (--no-compile: eager only)")
    p.add_argument("--hf-compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time HF generate with cache_implementation='static' and a CompileConfig")
    p.add_argument("--hf-static-eager", action="store_true", help="also time HF's static cache without compilation")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default); 1 is steadier on a "
                   "loaded machine, where OpenMP barriers of tiny decode ops stall")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    import transformers
    from transformers import CompileConfig

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
    # transformers' compiled decoding, with ours' torch.compile settings (generate.py: fullgraph, one graph per
    # shape, CUDA graphs on CUDA). transformers compiles only on accelerators unless asked to compile everywhere.
    cuda = a.device.startswith("cuda")
    compile_config = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead" if cuda else "default")
    if not cuda:
        compile_config._compile_all_devices = True
    n_params = sum(p.numel() for p in ours_model.parameters())
    print(f"device={a.device} dtype={a.dtype} threads={torch.get_num_threads()} params={n_params / 1e6:.1f}M "
          f"prompt_len={a.prompt_len} new_tokens={a.new_tokens} repeats={a.repeats} torch={torch.__version__} "
          f"transformers={transformers.__version__} {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    ours_names = ["ours eager"] + (["ours compiled"] if a.compile else [])
    hf_names = ["HF"] + (["HF static"] if a.hf_static_eager else []) + (["HF static+compiled"] if a.hf_compile else [])
    names = ours_names + hf_names
    ratios = [(o, h) for o in ours_names for h in hf_names if h != "HF static"]
    print("| batch | " + " | ".join(f"{n} tok/s" for n in names) + " | "
          + " | ".join(f"{o} / {h}" for o, h in ratios) + " | same as HF (" + ", ".join(k for k in names if k != "HF")
          + ") | load |\n" + "|---" * (3 + len(names) + len(ratios)) + "|")
    notes = []
    g = torch.Generator().manual_seed(1)
    for bs in a.batch_sizes:
        prompts = torch.randint(0, a.vocab, (bs, a.prompt_len), generator=g)
        x = prompts.to(a.device)

        def ours_run(c):
            return lambda n: gen.generate(ours_model, prompts.tolist(), n, stop_ids=[], compile=c)

        def hf_run(**kw):
            def run(n):
                with torch.no_grad():
                    out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                                      min_new_tokens=n, eos_token_id=None, pad_token_id=0, **kw)
                return out[:, a.prompt_len:].tolist()
            return run

        runs = {"ours eager": ours_run(False), "ours compiled": ours_run(True), "HF": hf_run(),
                "HF static": hf_run(cache_implementation="static"),
                "HF static+compiled": hf_run(cache_implementation="static", compile_config=compile_config)}
        load0 = loadavg()
        res = decode_rates({k: runs[k] for k in names}, bs, a.new_tokens, a.repeats, a.device,
                           optional=[k for k in hf_names if k != "HF"])
        ref = res["HF"][2]
        same = [f"{sum(o == h for o, h in zip(res[k][2], ref))}/{bs}" if res[k] else "n/a" for k in names if k != "HF"]
        print(f"| {bs} | " + " | ".join(f"{res[k][0]:.1f}" if res[k] else "failed" for k in names) + " | "
              + " | ".join(f"{res[o][0] / res[h][0]:.2f}x" if res[o] and res[h] else "n/a" for o, h in ratios)
              + " | " + ", ".join(same) + f" | {load0} -> {loadavg()} |", flush=True)
        notes.append(f"batch {bs} best-of rates: " + ", ".join(f"{k} {res[k][1]:.1f}" for k in names if res[k]))
    print("\n".join(notes))
    if a.hf_compile and not hasattr(hf, "_compiled_call"):
        print("WARNING: transformers did not compile its decode step (no model._compiled_call)")


if __name__ == "__main__":
    main()
