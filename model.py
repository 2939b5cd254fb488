"""Llama 3.x and Qwen3 decoder in plain PyTorch, with Hugging Face / Meta checkpoint converters.

    from model import Transformer, get_preset, load_hf, save_hf
    model = load_hf("path/to/Llama-3.2-1B", dtype=torch.bfloat16, device="cuda")   # HF dir or Meta consolidated.*.pth
    logits = model(tokens)                                          # (B,T) -> (B,T,vocab)
    loss_sum = model(tokens, positions=pos, doc_ids=doc, labels=labels)   # fp32 SUM of token CE (labels != -100)
    save_hf(model, model.args, "out/hf", generation_config={"bos_token_id": 128000, "eos_token_id": [128001, 128009]})

    with torch.device("meta"): model = Transformer(get_preset("llama3_1_8b"))   # then shard, to_empty, init_weights()

The two families differ only by Qwen3's per-head RMSNorm on q/k (`qk_norm`) and a head_dim that need not equal
dim / n_heads, so one module with an `if args.qk_norm:` serves both. Module names follow Meta's reference
(tok_embeddings, attention.wq, feed_forward.w1, ...); `_HF_NAMES` is the one map to Hugging Face names.
Tests: python3 -m pytest -q tests/test_model.py
"""
import glob
import json
import math
import os
import re
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

# None: flex_attention for packed rows on CUDA, SDPA + boolean mask elsewhere. True/False force it (tests run
# the flex path on CPU, where its forward works in eager mode but its backward does not exist).
USE_FLEX: bool | None = None
# Supervised rows per cross-entropy chunk. Live at a time for 1024 x 151,936 logits: 0.6 GB (fp32 logits overwritten
# by their gradient, or bf16 compiled: logits + gradient); eager bf16 also holds an fp32 copy: 1.2 GB.
CE_CHUNK = 1024


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None  # llama3 type: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
    qk_norm: bool = False  # Qwen3
    tie_embeddings: bool = False
    max_seq_len: int = 8192  # HF max_position_embeddings
    model_type: str = "llama"  # "llama" | "qwen3"  (selects the HF architecture on export)

    def __post_init__(self):
        if self.model_type not in _HF_ARCH:
            raise ValueError(f"model_type={self.model_type!r} is not supported; use one of {sorted(_HF_ARCH)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "llama3"))
            if kind != "llama3":
                raise ValueError(f"rope_scaling type {kind!r} is not supported (only 'llama3')")
            missing = [k for k in _LLAMA3_ROPE_KEYS if k not in self.rope_scaling]
            if missing:
                raise ValueError(f"rope_scaling is missing {missing}: {self.rope_scaling}")
            self.rope_scaling = {"rope_type": "llama3", **{k: self.rope_scaling[k] for k in _LLAMA3_ROPE_KEYS}}

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """LlamaForCausalLM / Qwen3ForCausalLM config.json -> ModelArgs. Anything we would compute differently
        from HF raises, naming the field. Defaults for absent fields are HF's own (LlamaConfig / Qwen3Config)."""
        mt = cfg.get("model_type")
        if mt not in _HF_ARCH:
            raise ValueError(f"config.json model_type={mt!r} is not supported; use one of {sorted(_HF_ARCH)}")
        for key, ok in [("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                        ("use_sliding_window", False), ("attention_dropout", 0.0)]:
            if cfg.get(key, ok) != ok:
                raise ValueError(f"config.json {key}={cfg[key]!r} is not supported (expected {ok!r})")
        if any(t != "full_attention" for t in cfg.get("layer_types") or []):
            raise ValueError(f"config.json layer_types={cfg['layer_types']} is not supported (only full_attention)")
        # transformers >= 5 writes rope_parameters={rope_type, rope_theta, ...}; older files rope_theta + rope_scaling.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "llama3"):
            raise ValueError(f"config.json rope type {kind!r} is not supported (only default and llama3)")
        n_heads = cfg["num_attention_heads"]
        # Absent fields: LlamaConfig derives them (kv heads = heads, head_dim = hidden / heads); Qwen3Config has
        # fixed defaults (32 kv heads, head_dim 128). An explicit null means "= heads" in both.
        qwen = mt == "qwen3"
        n_kv = cfg.get("num_key_value_heads", 32 if qwen else None) or n_heads
        head_dim = cfg.get("head_dim", 128 if qwen else None) or cfg["hidden_size"] // n_heads
        return cls(
            dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=n_heads, n_kv_heads=n_kv,
            head_dim=head_dim,
            hidden_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=rope if kind == "llama3" else None, qk_norm=mt == "qwen3",
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_seq_len=cfg.get("max_position_embeddings", 2048 if mt == "llama" else 32768), model_type=mt)

    def to_hf_config(self) -> dict:
        """The config.json fields of the HF architecture (legacy rope_theta/rope_scaling keys, which every
        transformers version reads, as in the published Llama 3 / Qwen3 repos)."""
        if self.qk_norm != (self.model_type == "qwen3"):
            raise ValueError(f"qk_norm={self.qk_norm} has no HF equivalent for model_type={self.model_type!r}")
        cfg = {
            "architectures": [_HF_ARCH[self.model_type]], "model_type": self.model_type,
            "hidden_size": self.dim, "intermediate_size": self.hidden_dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "hidden_act": "silu", "max_position_embeddings": self.max_seq_len, "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling, "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_embeddings, "attention_bias": False, "attention_dropout": 0.0,
            "initializer_range": 0.02, "use_cache": True,
        }
        if self.model_type == "llama":
            cfg.update(mlp_bias=False, pretraining_tp=1)
        else:
            cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.n_layers)
        return cfg


_HF_ARCH = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _llama3_rope(factor):
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


def _qwen3(dim, n_layers, n_heads, hidden_dim, tie):
    return ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=8, head_dim=128, hidden_dim=hidden_dim,
                     vocab_size=151936, norm_eps=1e-6, rope_theta=1000000.0, qk_norm=True, tie_embeddings=tie,
                     max_seq_len=40960, model_type="qwen3")


_L3 = dict(vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=131072, model_type="llama")
# The numbers of each model's published HF config.json (meta-llama/*, Qwen/*), copied, never derived.
PRESETS: dict[str, ModelArgs] = {
    "llama3_2_1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, hidden_dim=8192,
                             rope_scaling=_llama3_rope(32.0), tie_embeddings=True, **_L3),
    "llama3_2_3b": ModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, head_dim=128, hidden_dim=8192,
                             rope_scaling=_llama3_rope(32.0), tie_embeddings=True, **_L3),
    "llama3_1_8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336,
                             rope_scaling=_llama3_rope(8.0), **_L3),
    "llama3_1_70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128, hidden_dim=28672,
                              rope_scaling=_llama3_rope(8.0), **_L3),
    "qwen3_0_6b": _qwen3(1024, 28, 16, 3072, tie=True),
    "qwen3_1_7b": _qwen3(2048, 28, 16, 6144, tie=True),
    "qwen3_4b": _qwen3(2560, 36, 32, 9728, tie=True),
    "qwen3_8b": _qwen3(4096, 36, 32, 12288, tie=False),
    "qwen3_14b": _qwen3(5120, 40, 40, 17408, tie=False),
    "qwen3_32b": _qwen3(5120, 64, 64, 25600, tie=False),
    # Tiny shapes for tests: GQA, llama3 rope scaling, untied / Qwen3 with head_dim != dim // n_heads, tied.
    "tiny_llama": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=512,
                            rope_scaling=_llama3_rope(8.0), max_seq_len=65536),  # > the rope original 8192, as HF wants
    "tiny_qwen3": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=128, vocab_size=512,
                            norm_eps=1e-6, rope_theta=1000000.0, qk_norm=True, tie_embeddings=True, max_seq_len=4096,
                            model_type="qwen3"),
    # The CPU demo with the byte tokenizer (261 ids, vocab padded to 384).
    "demo": ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=32, hidden_dim=384, vocab_size=384,
                      rope_theta=10000.0, tie_embeddings=True, max_seq_len=1024),
}


def get_preset(name: str) -> ModelArgs:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    args = PRESETS[name]
    return replace(args, rope_scaling=dict(args.rope_scaling) if args.rope_scaling else None)


# ----------------------------------------------------------------------------------------------------- model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalize in fp32, cast back, then scale: HF LlamaRMSNorm's exact order of operations (bf16 parity).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(args: ModelArgs, device=None) -> torch.Tensor:
    """(head_dim/2,) fp32 inverse frequencies; llama3 scaling as HF `_compute_llama3_parameters`: long wavelengths
    are divided by `factor`, short ones kept, and the band in between interpolated smoothly."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    if args.rope_scaling is None:
        return inv_freq
    s = args.rope_scaling
    factor, lo, hi, old_len = (s["factor"], s["low_freq_factor"], s["high_freq_factor"],
                               s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache:
    """Preallocated keys/values, (B, n_kv_heads, max_len, head_dim) per layer. A token at position p is stored in
    slot p, and a query at position p sees slots <= p: right-padded prompts of different lengths are fine, because
    a pad slot is overwritten by the real token at that position before any query can see it."""

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.max_len = max_len
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]

    def zero_(self):
        for t in self.k + self.v:
            t.zero_()

    def select(self, rows: torch.Tensor):
        """Keep only these batch rows (generation drops finished sequences so they stop costing compute)."""
        self.k, self.v = [k[rows] for k in self.k], [v[rows] for v in self.v]

    def update(self, layer: int, positions, k, v):
        # positions (B,T); k, v (B,KV,T,D) -> the whole cache of this layer, (B,KV,max_len,D). Row b's token t goes to
        # slot positions[b, t]: an index_put_ (cache[b, :, p] = ...), which torch.compile updates in place; a
        # scatter_ there becomes a copy of the whole cache per layer and step.
        rows = torch.arange(k.size(0), device=k.device)[:, None]  # (B,1), broadcast against positions (B,T)
        self.k[layer][rows, :, positions] = k.transpose(1, 2)  # indexed shape (B,T,KV,D): advanced dims go first
        self.v[layer][rows, :, positions] = v.transpose(1, 2)
        return self.k[layer], self.v[layer]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id, self.n_heads, self.n_kv_heads, self.head_dim = layer_id, args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        if args.qk_norm:  # Qwen3: RMSNorm over each head's vector, before RoPE
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, positions=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B,H,T,D)
        # HF rotate_half layout: pairs are (i, i + D/2); cos/sin (B,1,T,D) arrive in the activation dtype, as in HF.
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        # Under bf16 autocast cos/sin follow the fp32 residual stream, so RoPE leaves q/k in fp32 while v (a matmul
        # output) is bf16: one dtype for flex_attention and the KV cache. A no-op without autocast.
        q, k = q.to(v.dtype), k.to(v.dtype)
        if cache is not None:
            k, v = cache.update(self.layer_id, positions, k, v)  # (B,KV,max_len,D)
        if isinstance(mask, torch.Tensor) or mask is None:
            # mask None: plain causal, the flash kernel; else (B,1,T,S) bool, True = may attend.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        else:  # a flex_attention BlockMask (packed documents on CUDA)
            y = _flex_attention(q.is_cuda)(q, k, v, block_mask=mask, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # gate_proj
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)  # down_proj
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # up_proj

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, layer_id)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin, mask, cache=None, positions=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, positions)
        return h + self.feed_forward(self.ffn_norm(h))


_FLEX = None
_CREATE_BLOCK_MASK = None


def _flex_attention(cuda: bool):
    # Compiled lazily on first use: eager flex_attention is an unfused reference path, and compiling at import would
    # be an import-time side effect. On CPU (tests) the eager version is used: its forward works there.
    global _FLEX
    from torch.nn.attention.flex_attention import flex_attention
    if not cuda:
        return flex_attention
    if _FLEX is None:
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def document_block_mask(doc_ids):
    """flex_attention BlockMask: causal within each document of a packed row. doc_ids (B,T)."""
    from torch.nn.attention.flex_attention import create_block_mask
    B, T = doc_ids.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (q_idx >= kv_idx)

    # Eager create_block_mask materializes the dense (B,1,T,T) mask before reducing it to blocks; compiled, it does
    # not (measured on H200 at B=4, T=2048: 7 ms -> 2.5 ms per forward). CPU tests use the eager reference.
    global _CREATE_BLOCK_MASK
    if doc_ids.is_cuda and _CREATE_BLOCK_MASK is None:
        _CREATE_BLOCK_MASK = torch.compile(create_block_mask)
    build = _CREATE_BLOCK_MASK if doc_ids.is_cuda else create_block_mask
    return build(mask_mod, B, None, T, T, device=doc_ids.device)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # train.py sets it with trainer.compile: the loss's elementwise part (ce_grad) compiled, the head's matmuls not
        self.compile_loss = False
        # No RoPE buffer: inv_freq (head_dim/2 numbers) is recomputed from args in every forward, so there is nothing
        # for to_empty to leave as garbage or for model.to(bfloat16) to round (a bf16 inv_freq ruins long positions).

    @torch.no_grad()
    def init_weights(self):
        """normal(0, 0.02) for every matrix (HF's initializer_range), ones for norms, and re-tie: a tie does not
        survive to_empty from the meta device. RoPE has no buffers to recompute (see __init__)."""
        if self.args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def forward(self, tokens, positions=None, doc_ids=None, labels=None, cache=None, logits_at=None):
        """tokens (B,T) -> logits (B,T,vocab), or with labels (B,T) (already shifted, -100 = ignore) the fp32 SUM
        of token cross-entropies. positions (B,T): RoPE positions, default arange(T); with a cache, also the slot
        each token is written to. doc_ids (B,T): document of each token in a packed row; attention stays inside.
        logits_at (B,): return only the logits at this position of each row, (B, vocab) (a generation prefill)."""
        B, T = tokens.shape
        if positions is None:
            if cache is not None:
                raise ValueError("forward with a KVCache needs positions (the absolute slot of each token)")
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        if T > (self.args.max_seq_len if cache is None else cache.max_len):
            raise ValueError(f"sequence length {T} > " + (f"max_seq_len={self.args.max_seq_len} of this model"
                                                         if cache is None else f"the KV cache's {cache.max_len} slots"))
        # cos/sin from positions (as HF does), once per forward for all layers: (B,1,T,head_dim) fp32.
        freqs = positions[..., None].float() * rope_inv_freq(self.args, device=tokens.device)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        cos, sin = emb.cos(), emb.sin()

        if cache is not None:
            if doc_ids is not None:
                raise ValueError("doc_ids (packed documents) cannot be combined with a KVCache")
            # Query at position p sees cache slots <= p: (B,1,T,max_len).
            mask = (torch.arange(cache.max_len, device=tokens.device) <= positions[:, :, None])[:, None]
        elif doc_ids is None:
            mask = None  # causal: SDPA is_causal (flash)
        elif USE_FLEX or (USE_FLEX is None and tokens.is_cuda):
            mask = document_block_mask(doc_ids)  # built once, shared by all layers
        else:  # block-diagonal causal bool mask (B,1,T,T)
            causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
            mask = ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]

        h = self.tok_embeddings(tokens)
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)  # once here, not in every layer
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache, positions)
        h = self.norm(h)
        if logits_at is not None:  # (B,) one position per row -> logits (B, vocab): a prefill needs only its last
            return self.output(h[torch.arange(B, device=h.device), logits_at])
        if labels is None:
            return self.output(h)
        return self._chunked_ce(h, labels)

    def _chunked_ce(self, h, labels):
        """SUM of token cross-entropies over labels != -100 without (B*T, vocab) logits: only supervised rows go
        through the head, CE_CHUNK rows at a time (TRL chunked_nll, Liger's fused linear cross-entropy). The head
        weight is read here, inside the root forward, so FSDP2 unshards it once for all chunks."""
        keep = labels != -100
        hs, ys = h[keep], labels[keep].long()  # (N, dim), (N,)
        w = self.output.weight
        if hs.size(0) == 0:
            # Nothing supervised on this rank: a zero that still reaches every parameter, so backward (and FSDP's
            # gradient reduce-scatter) runs the same on every rank.
            return (h.sum() + w.sum()).float() * 0.0
        if torch.is_grad_enabled() and (hs.requires_grad or w.requires_grad):
            grad_fn = _compiled_ce_grad() if self.compile_loss else ce_grad
            dev = hs.device.type
            if torch.is_autocast_enabled(dev):
                # Cast once here (autograd casts the gradients back to fp32): inside the Function autocast would
                # re-cast the whole head weight in every chunk's matmul, and the in-place addmm_ would run in fp32.
                dt = torch.get_autocast_dtype(dev)
                with torch.autocast(dev, enabled=False):
                    return _FusedLinearCE.apply(hs.to(dt), w.to(dt), ys, CE_CHUNK, grad_fn)
            return _FusedLinearCE.apply(hs, w, ys, CE_CHUNK, grad_fn)
        return sum(_ce_sum(hs[i:i + CE_CHUNK], w, ys[i:i + CE_CHUNK]) for i in range(0, hs.size(0), CE_CHUNK))


def _ce_sum(h, w, y):
    return F.cross_entropy(F.linear(h, w).float(), y, reduction="sum")


def ce_grad(logits, y):
    """(C, vocab) logits, (C,) targets -> (fp32 SUM of the C cross-entropies, d sum / d logits in logits' dtype).
    fp32 logits are overwritten (they become the gradient). The work is elementwise over the whole block, so memory
    bound: eager, ~8 passes over fp32 logits; compiled (Transformer.compile_loss), a logsumexp pass and one fused
    pointwise pass (4-6x faster on CPU for 1024 x 128,256)."""
    z = logits.float()  # (C, vocab)
    lse = torch.logsumexp(z, dim=-1)
    loss = (lse - z.gather(1, y[:, None]).squeeze(1)).sum()
    p = z.sub_(lse[:, None]).exp_()  # softmax, in place
    if torch.compiler.is_compiling():  # d/d logits = softmax - onehot, the one-hot fused into the same pass
        p.sub_((torch.arange(p.shape[1], device=p.device) == y[:, None]).to(p.dtype))
    else:  # eager, the same without a (C, vocab) one-hot mask
        p[torch.arange(len(y), device=p.device), y] -= 1.0
    return loss, p.to(logits.dtype)


_CE_GRAD_COMPILED = None


def _compiled_ce_grad():
    global _CE_GRAD_COMPILED
    if _CE_GRAD_COMPILED is None:  # lazily, like _flex_attention: no compile at import
        # Full chunks run a graph specialized to CE_CHUNK rows; the ragged last chunk one with a dynamic row count
        # (compiled once, at the first other size). dynamo also specializes 1 row and a lone chunk (a label slice at
        # offset 0): at most 4 graphs in a run.
        _CE_GRAD_COMPILED = torch.compile(ce_grad)
    return _CE_GRAD_COMPILED


class _FusedLinearCE(torch.autograd.Function):
    """SUM cross-entropy of h @ w.T with the gradients computed chunk by chunk during forward: each chunk's fp32
    logits live only inside its loop iteration and are never recomputed (a checkpointed chunk would run the head
    matmul and softmax twice; the head is most of an SFT step at a 128k-152k vocabulary). 3 matmuls per chunk."""

    @staticmethod
    def forward(ctx, h, w, y, chunk, grad_fn):
        # grad_w sums every chunk's (C,vocab)^T @ (C,dim) in w.dtype: in bf16 each addmm_ rounds the running sum, so
        # with many chunks the head's gradient is a little noisier than autograd's one fp32-accumulated matmul (0.5%
        # vs 0.24% relative at 16 chunks). An fp32 accumulator would cost vocab x dim x 4 bytes at the memory peak.
        grad_h, grad_w = torch.empty_like(h), torch.zeros_like(w)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], chunk):
            hc = h[i:i + chunk]
            loss_c, g = grad_fn(hc @ w.t(), y[i:i + chunk])  # g: (C, vocab), softmax - onehot
            loss += loss_c
            grad_h[i:i + chunk] = g @ w
            grad_w.addmm_(g.t(), hc)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        # In place: a second (vocab, dim) head gradient would raise the memory peak. A second backward through this
        # graph (retain_graph) then fails autograd's version check instead of scaling twice.
        return grad_h.mul_(grad_loss), grad_w.mul_(grad_loss), None, None, None


@torch.no_grad()
def untrained_token_ids(model: Transformer, ratio: float = 1e-6) -> list[int]:
    """Input-embedding rows that were never trained: Llama 3 base models ship their chat special tokens (<|eot_id|>,
    <|start_header_id|>, <|end_header_id|>, the reserved ones) with all-zero or ~1e-20 rows. A row counts when its
    largest |value| is below `ratio` x the median row's."""
    amax = model.tok_embeddings.weight.detach().abs().amax(dim=1).float()
    return torch.nonzero(amax <= ratio * amax.median()).flatten().tolist()


@torch.no_grad()
def fix_untrained_tokens(model: Transformer, ids: list[int]) -> None:
    """Set these rows of the input embedding, and of an untied LM head, to the mean of the trained rows (Unsloth's
    fix): from a zero row the model cannot even tell these tokens apart from each other, and an untrained head row
    makes the token improbable at first, so fine-tuning on them starts from a wrong point."""
    if not ids:
        return
    emb = model.tok_embeddings.weight
    trained = torch.ones(emb.shape[0], dtype=torch.bool, device=emb.device)
    trained[untrained_token_ids(model)] = False
    idx = torch.tensor(ids, device=emb.device)
    for w in {id(t): t for t in (emb, model.output.weight)}.values():  # a tied table once
        w[idx] = w[trained].float().mean(dim=0).to(w.dtype)


def num_params(args: ModelArgs, exclude_embeddings: bool = False) -> int:
    """Parameter count (tied weights once), built on the meta device. exclude_embeddings drops the
    tok_embeddings table (a gather, not a matmul); with tied embeddings that is also the head."""
    with torch.device("meta"):
        model = Transformer(args)
    n = sum(p.numel() for p in model.parameters())
    return n - model.tok_embeddings.weight.numel() if exclude_embeddings else n


def flops_per_token(args: ModelArgs, seq_len: float, head_share: float = 1.0) -> float:
    """Training FLOPs per token, THE MFU formula of this repo. 6 * (matmul weights: attention + MLP + output head,
    not the embedding gather; a tied head counts as a matmul) for forward+backward, plus attention scores and
    values: 12 * n_layers * n_heads * head_dim * seq_len in the PaLM convention, halved to 6 because causal
    attention computes only half the score matrix (what flash/flex kernels actually do).
    head_share: the fraction of tokens that go through the head. MFU counts every token (1.0); the fused loss runs
    the head only on supervised ones, so the FLOPs a GPU executes are those at head_share = supervised / tokens and
    seq_len = sum(doc_len^2) / sum(doc_len) for packed documents (bench/gpu.py reports both)."""
    a = args
    per_layer = a.dim * a.head_dim * (2 * a.n_heads + 2 * a.n_kv_heads) + 3 * a.dim * a.hidden_dim
    matmul = a.n_layers * per_layer + head_share * a.dim * a.vocab_size
    return 6.0 * matmul + 6.0 * a.n_layers * a.n_heads * a.head_dim * seq_len


# ------------------------------------------------------------------------------------------------ converters

# Our name -> Hugging Face name ("{}" = layer index). Our names are Meta's, so Meta checkpoints need no renaming.
_HF_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.attention.q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "layers.{}.attention.k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
    "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_OUR_NAMES = {v: k for k, v in _HF_NAMES.items()}


# Older transformers versions saved RoPE's inv_freq buffer in checkpoints; it follows from config.json (HF skips it).
_DERIVED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _tied_head_differs(where: str) -> ValueError:
    return ValueError(f"{where}: lm_head.weight differs from model.embed_tokens.weight but config.json says "
                      "tie_word_embeddings=true: set it to false to train both matrices (transformers then unties them "
                      "too), or delete lm_head.weight from the checkpoint to tie the head to the embedding")


def _rename(key: str, table: dict) -> str | None:
    m = re.search(r"(?<=layers\.)\d+(?=\.)", key)
    template = key[:m.start()] + "{}" + key[m.end():] if m else key
    if template not in table:
        return None
    return table[template].format(m.group()) if m else table[template]


def _expected_shapes(args: ModelArgs) -> dict:
    """Our parameter names -> shapes (output.weight omitted when tied: the checkpoint stores the matrix once)."""
    with torch.device("meta"):
        model = Transformer(args)
    return {k: tuple(p.shape) for k, p in model.named_parameters()}  # named_parameters dedups the tie


def ours_to_hf(sd: dict, args: ModelArgs) -> dict:
    """Our state dict -> HF names. Strict (every parameter present, shapes checked, as load_hf is); a tied head
    is saved once, as HF does."""
    shapes, out = _expected_shapes(args), {}
    for key, t in sd.items():
        if key == "output.weight" and args.tie_embeddings:
            continue
        _check(key, key, t, shapes, "our state dict")
        out[_rename(key, _HF_NAMES)] = t
    _check_complete(shapes, {k: None for k in sd}, "our state dict")
    return out


def _check(key, ours, t, shapes, where):
    if ours not in shapes:
        raise ValueError(f"{where}: unexpected tensor {key!r} (not a parameter of this model config)")
    if tuple(t.shape) != shapes[ours]:
        raise ValueError(f"{where}: tensor {key!r} has shape {tuple(t.shape)}, the model config implies {shapes[ours]}")


def _check_complete(shapes, got, where):
    missing = [k for k in shapes if k not in got]
    if missing:
        raise ValueError(f"{where}: missing tensor {_rename(missing[0], _HF_NAMES)!r} (ours: {missing[0]!r}) "
                         f"and {len(missing) - 1} more")


def empty_model(args, dtype=torch.float32, device="cpu") -> Transformer:
    """A Transformer with uninitialized storage (every weight is about to be loaded): no time spent on random init."""
    with torch.device("meta"):
        model = Transformer(args)
    model.to(dtype=dtype).to_empty(device=device)
    if args.tie_embeddings:  # to_empty breaks the tie
        model.output.weight = model.tok_embeddings.weight
    return model


def load_hf(path, dtype=torch.float32, device="cpu") -> Transformer:
    """A Hugging Face model directory (config.json + model.safetensors or shards with model.safetensors.index.json)
    or a Meta one (params.json + consolidated.*.pth) -> Transformer with every weight from the checkpoint, in
    `dtype` on `device`. Tensors are copied one at a time, so peak memory is the model plus its largest tensor."""
    path = str(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory: load_hf needs a HF model directory or a Meta one")
    if glob.glob(os.path.join(path, "consolidated.*.pth")):
        return _load_meta(path, dtype, device)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{cfg_file} not found: load_hf needs config.json + *.safetensors (HF) "
                                f"or params.json + consolidated.*.pth (Meta)")
    try:
        with open(cfg_file) as f:
            args = ModelArgs.from_hf_config(json.load(f))
    except (ValueError, KeyError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{cfg_file}: {e if isinstance(e, ValueError) else f'missing field {e}'}") from None
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json "
                                f"(pytorch_model.bin checkpoints are not supported: convert them to safetensors)")
    model = empty_model(args, dtype, device)
    params = dict(model.named_parameters())
    shapes = {k: tuple(p.shape) for k, p in params.items()}
    filled, head = set(), None
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} (listed in {index}) not found")
        for key, t in _read_safetensors(file):
            ours = _rename(key, _OUR_NAMES)
            if _DERIVED.search(key):
                continue
            if ours == "output.weight" and args.tie_embeddings:
                head = (t, file)  # checked against the embedding once everything is loaded
                continue
            _check(key, ours, t, shapes, file)
            if ours in filled:
                raise ValueError(f"{file}: tensor {key!r} appears twice in the checkpoint")
            with torch.no_grad():
                params[ours].copy_(t)
            filled.add(ours)
    _check_complete(shapes, filled, path)
    if head is not None and not torch.equal(head[0].to(dtype), model.tok_embeddings.weight.cpu()):
        raise _tied_head_differs(head[1])
    return model


def _read_safetensors(file):
    from safetensors import safe_open
    try:  # a truncated or corrupt file fails here (header) or in get_tensor (data)
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    except Exception as e:  # only safetensors' own errors land here: the caller's raise does not enter a generator
        raise ValueError(f"{file}: cannot read safetensors ({type(e).__name__}: {e}); truncated or corrupt?") from None


def save_hf(model_or_state_dict, args: ModelArgs, path, generation_config: dict | None = None,
            max_shard_bytes: int = 5 * 2**30):
    """Export in HF format: model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json,
    config.json, and generation_config.json when given. Full (not sharded/DTensor) tensors expected; stale
    model*.safetensors files in `path` are removed so shards of an older export cannot mix in."""
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    hf = {k: t.detach().to("cpu").contiguous() for k, t in ours_to_hf(sd, args).items()}
    os.makedirs(path, exist_ok=True)
    for stale in glob.glob(os.path.join(path, "model*.safetensors")) + glob.glob(os.path.join(path, "model*.index.json")):
        os.remove(stale)
    shards, size = [[]], 0
    for k, t in hf.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    from safetensors.torch import save_file
    weight_map = {}
    for i, keys in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: hf[k] for k in keys}, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in hf.values())
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    cfg = args.to_hf_config()
    dtype = str(next(iter(hf.values())).dtype).removeprefix("torch.")
    cfg.update(torch_dtype=dtype, dtype=dtype)  # transformers < 5 reads torch_dtype, >= 5 dtype
    # not pad_token_id: transformers makes it the embedding's padding_idx (no gradient for that row when training
    # further); the published Llama 3 / Qwen3 configs have none. generation_config.json keeps it for generate().
    for k in ("bos_token_id", "eos_token_id"):
        if generation_config and k in generation_config:
            cfg[k] = generation_config[k]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if generation_config is not None:
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump(generation_config, f, indent=2)


def _meta_to_hf_qk(w, n_heads):
    # Meta's RoPE rotates interleaved pairs (2i, 2i+1); HF's rotate_half pairs (i, i + D/2). Reorder each head's
    # output rows so HF-layout math gives the same result (HF convert_llama_weights_to_hf.py `permute`).
    return w.view(n_heads, w.shape[0] // n_heads // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def _load_meta(path, dtype, device):
    """Meta's original format: params.json + consolidated.NN.pth (NN > 00: model-parallel shards, merged as
    HF's converter does for Llama 3). hidden_dim and vocab_size are read from the tensors, not re-derived.
    use_scaled_rope takes `rope_scaling_factor` from params.json, else 8 (Meta's apply_scaling default). Meta's
    Llama 3.2 params.json may not state a factor while HF's config says 32: prefer the HF files for 3.2."""
    pfile = os.path.join(path, "params.json")
    if not os.path.isfile(pfile):
        raise FileNotFoundError(f"{pfile} not found (Meta checkpoints need params.json next to consolidated.*.pth)")
    with open(pfile) as f:
        p = json.load(f)
    files = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    shards = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files]
    sd = {}
    for key in shards[0]:
        parts = [s[key] for s in shards]
        if len(parts) == 1 or key.endswith("norm.weight"):  # norms are replicated
            sd[key] = parts[0]
        else:  # row-parallel wo/w2 split the input dim; everything else (incl. Llama 3's embedding) the output dim
            sd[key] = torch.cat(parts, dim=1 if key.endswith(("wo.weight", "w2.weight")) else 0)
    try:
        dim, n_heads = p["dim"], p["n_heads"]
        n_kv = p.get("n_kv_heads") or n_heads
        emb = sd["tok_embeddings.weight"]
        tie = "output.weight" not in sd or torch.equal(sd["output.weight"], emb)
        args = ModelArgs(dim=dim, n_layers=p["n_layers"], n_heads=n_heads, n_kv_heads=n_kv, head_dim=dim // n_heads,
                         hidden_dim=sd["layers.0.feed_forward.w1.weight"].shape[0], vocab_size=emb.shape[0],
                         norm_eps=p.get("norm_eps", 1e-5), rope_theta=float(p.get("rope_theta", 10000.0)),
                         rope_scaling=_llama3_rope(float(p.get("rope_scaling_factor") or 8.0)) if p.get("use_scaled_rope") else None,
                         tie_embeddings=tie, max_seq_len=131072 if p.get("use_scaled_rope") else 8192)
    except KeyError as e:
        raise ValueError(f"{path}: params.json or consolidated.*.pth lacks {e}") from None
    if tie:
        sd.pop("output.weight", None)
    for i in range(args.n_layers):
        for name, n in (("wq", n_heads), ("wk", n_kv)):
            key = f"layers.{i}.attention.{name}.weight"
            if key in sd:
                sd[key] = _meta_to_hf_qk(sd[key], n)
    model = empty_model(args, dtype, device)
    params = dict(model.named_parameters())
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    for key, t in sd.items():
        _check(key, key, t, shapes, files[0])
        with torch.no_grad():
            params[key].copy_(t)
    _check_complete(shapes, sd, files[0])
    return model
