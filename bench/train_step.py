"""One training step, same architecture and same batch: OUR model (chunked CE loss, optional per-block
torch.compile) against transformers' LlamaForCausalLM / Qwen3ForCausalLM (attn_implementation="sdpa", its default
loss), both fp32 with grad-norm clipping at 1.0, on CPU; each side's optimizer is its default AdamW (fused for both:
train.py's and Trainer's).

    python bench/train_step.py                          # Llama (vocab 128,256) and Qwen3 (151,936) shapes, ~4 min each
    python bench/train_step.py --models llama --compile blocks --hf-compile off    # the two sides as users run them
    python bench/train_step.py --models llama --compile both --hf-compile off layers model   # every variant

Variants (each its own worker; the default runs ours eager, ours compiled and HF eager and HF per-layer compiled, so
each of ours is compared with each of HF's in one run):
  ours          --compile off|both: our model eager
  ours+compile  --compile blocks|both: per-block torch.compile, as train.py trains
  hf            --hf-compile off: transformers eager, as Trainer runs it by default
  hf+compile-layers  --hf-compile layers: each decoder layer torch.compile'd in place (what accelerate's regional
                compilation does; the same granularity as ours)
  hf+compile-model   --hf-compile model: torch.compile(model), what Trainer(torch_compile=True) does (accelerate's
                TorchDynamoPlugin: backend inductor, default mode, dynamic=None)

Each side runs in its own child process (spawned), so each one's peak RSS is its own; the parent alternates
timed rounds between the children (ours k steps, HF k steps, ours k steps, ...) so that drift in machine load
hits both alike. Both children load the same weights (the parent saves a random init with model.save_hf; ours
reads it with model.load_hf, HF with from_pretrained) and train on the same batch, so the loss of the first step
must agree: that is printed as the correctness check.

Tokens/s counts every token of the (B,T) batch. The label mask is an SFT one: each row is a multi-turn
conversation whose assistant spans (--supervised, default 60% of tokens) are supervised. HF gets unshifted labels
(it shifts internally), ours the shifted ones, so both supervise exactly the same tokens.
Peak RSS "train" is the high-water mark from just before the first step (model and optimizer built, Linux
/proc/self/clear_refs) to the end; "process" also includes loading.
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

import torch

from bench import common


# ---------------------------------------------------------------------------------------------- the two sides
def setup_ours(spec):
    """Runs in a worker process: our model from the saved HF dir, optimizer, batch -> (step, info)."""
    model, opt = common.ours_model_and_optimizer(spec)
    tokens, _, labels = common.sft_batch(spec["batch_size"], spec["seq_len"], model.args.vocab_size,
                                         seed=spec["seed"], supervised=spec["supervised"])
    n_sup = int((labels != -100).sum())

    def step():
        # model(tokens, labels) is the SUM of token CE; divide by the supervised-token count as train.py does.
        loss = model(tokens, labels=labels) / n_sup
        loss_val = common.backward_and_step(model, opt, loss)
        return {"loss": loss_val}

    return step, {"n_sup": n_sup}


def setup_hf(spec):
    """Runs in a worker process: transformers' model from the same HF dir, same optimizer, same batch; compiled per
    decoder layer (spec["hf_compile"] == "layers") or whole (== "model", as Trainer(torch_compile=True)) or not."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    opt = common.hf_optimizer(model)
    if spec["hf_compile"] == "layers":
        for layer in model.model.layers:
            layer.compile()
    elif spec["hf_compile"] == "model":
        model = torch.compile(model)  # parameters() and forward pass through to the module
    tokens, hf_labels, _ = common.sft_batch(spec["batch_size"], spec["seq_len"], model.config.vocab_size,
                                            seed=spec["seed"], supervised=spec["supervised"])
    n_sup = int((hf_labels[:, 1:] != -100).sum())

    def step():
        loss = model(input_ids=tokens, labels=hf_labels).loss  # HF shifts labels and takes the mean itself
        loss_val = common.backward_and_step(model, opt, loss)
        return {"loss": loss_val}

    return step, {"n_sup": n_sup}


# ---------------------------------------------------------------------------------------------- one model shape
def bench_shape(shape, args):
    import model as M
    margs = common.model_args(shape)
    T = args.seq_len
    with tempfile.TemporaryDirectory() as hf_dir:
        common.save_random_init(margs, hf_dir)
        spec = dict(hf_dir=hf_dir, batch_size=args.batch_size, seq_len=T, seed=args.seed, supervised=args.supervised,
                    threads=args.threads, compile=False, ours_fused=ours_fused(args), hf_compile="off")
        variants = {"off": [("ours", False)], "blocks": [("ours+compile", True)],
                    "both": [("ours", False), ("ours+compile", True)]}[args.compile]
        sides = []
        try:
            # Workers start one at a time so that loading one does not slow the other's first step.
            for name, comp in variants:
                sides.append(common.Worker(name, setup_ours, {**spec, "compile": comp}))
            for hc in args.hf_compile:
                sides.append(common.Worker(HF_NAMES[hc], setup_hf, {**spec, "hf_compile": hc}))
            n_sup = {s.name: s.info["n_sup"] for s in sides}
            assert len(set(n_sup.values())) == 1, f"sides supervise different token counts: {n_sup}"
            mem = common.run_alternating(sides, args.warmup, args.rounds, args.steps)
            if not all(s.info["reset_ok"] for s in sides):
                print("note: could not reset the peak RSS (/proc/self/clear_refs): 'train' includes loading")
        finally:
            for s in sides:
                s.close()

    ntok = args.batch_size * T
    ours_sides = sides[:len(variants)]
    hf_sides = sides[len(variants):]
    hf = hf_sides[0]
    rows = []
    for s in sides:
        sec = common.median([t for t, _ in s.records])
        rows.append([s.name, f"{ntok / sec:,.0f}", f"{sec:.2f}", f"{s.first_step_s:.1f}", f"{s.loss0:.5f}",
                     f"{mem[s.name]['train']:.2f}", f"{mem[s.name]['process']:.2f}"])
    n_sup = n_sup[hf.name]
    print(f"\n== {shape}: {M.num_params(margs) / 1e6:.1f}M params, vocab {margs.vocab_size:,}, "
          f"tied={margs.tie_embeddings}, batch {args.batch_size}x{T}, {n_sup} supervised tokens "
          f"({n_sup / ntok:.0%}), {len(hf.records)} timed steps per side; {common.env_line()}")
    print(common.fmt_table(["side", "tok/s", "s/step(med)", "1st step s", "loss step0", "peak RSS train GB",
                            "peak RSS process GB"], rows))
    result = {"shape": shape}
    for h in hf_sides:  # every one of ours against every one of HF's
        hf_sec = common.median([t for t, _ in h.records])
        for s in ours_sides:
            sec = common.median([t for t, _ in s.records])
            diff = abs(s.loss0 - h.loss0) / abs(h.loss0)
            speed, memr = hf_sec / sec, mem[s.name]["train"] / mem[h.name]["train"]
            print(f"{s.name} / {h.name}: throughput {speed:.2f}x (goal >= 1.15: "
                  f"{'met' if speed >= 1.15 else 'MISSED'}), peak RSS train {memr:.2f}x (goal <= 0.6: "
                  f"{'met' if memr <= 0.6 else 'MISSED'}; process "
                  f"{mem[s.name]['process'] / mem[h.name]['process']:.2f}x); step-0 loss rel diff {diff:.1e} "
                  f"{'OK' if diff < 1e-4 else 'MISMATCH'}")
            result[f"{s.name} / {h.name}"] = dict(speedup=speed, mem_ratio=memr, loss_diff=diff)
    return result


HF_NAMES = {"off": "hf", "layers": "hf+compile-layers", "model": "hf+compile-model"}


def ours_fused(args):
    return args.ours_adamw == "fused"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="llama,qwen3", help="comma-separated keys of bench/common.py CPU_SHAPES")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--supervised", type=float, default=0.6, help="fraction of supervised tokens (assistant spans)")
    p.add_argument("--compile", choices=["off", "blocks", "both"], default="both",
                   help="ours: eager, per-block torch.compile, or both side by side (default)")
    p.add_argument("--hf-compile", nargs="+", choices=list(HF_NAMES), default=["off", "layers"],
                   help="HF variants, each its own worker: eager (off), each decoder layer compiled (layers), or\n"
                        "torch.compile(model) as Trainer(torch_compile=True) (model); default: off layers")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side (the first is reported)")
    common.add_timing_args(p)
    args = p.parse_args()
    print(common.env_line())
    print(f"batch {args.batch_size}x{args.seq_len}, fp32, clip 1.0; AdamW: ours "
          f"{'fused' if ours_fused(args) else 'foreach'} (--ours-adamw {args.ours_adamw}), HF fused (Trainer "
          f"default); ours compile={args.compile}; HF sdpa, compile={' '.join(args.hf_compile)}")
    for shape in args.models.split(","):
        bench_shape(shape, args)
    print(common.env_line())


if __name__ == "__main__":
    main()
