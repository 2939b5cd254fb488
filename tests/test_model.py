"""Model tests: HF parity (tiny random Llama / Qwen3, fp32 CPU), converters and round trips, packed-document
masking, chunked cross-entropy, KV cache, presets, and one-line errors on bad checkpoints.

    python3 -m pytest -q tests/test_model.py
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import model as M
from model import KVCache, ModelArgs, Transformer, get_preset, load_hf, save_hf

V = 512  # vocab of the tiny presets


def tiny(name, seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    args = get_preset(name)
    for k, v in overrides.items():
        setattr(args, k, v)
    m = Transformer(args)
    m.init_weights()
    with torch.no_grad():  # non-trivial norm weights, so a swapped or skipped norm shows in the logits
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    return m.eval()


def one_line_error(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"


# --------------------------------------------------------------------------------------------- presets


def test_published_param_counts():
    # Published totals (HF model cards / safetensors metadata; tied matrices counted once).
    assert M.num_params(get_preset("llama3_2_1b")) == 1_235_814_400
    assert M.num_params(get_preset("llama3_1_8b")) == 8_030_261_248
    assert M.num_params(get_preset("qwen3_0_6b")) == 596_049_920
    assert M.num_params(get_preset("qwen3_8b")) == 8_190_735_360
    a = get_preset("llama3_2_1b")
    assert M.num_params(a, exclude_embeddings=True) == 1_235_814_400 - a.vocab_size * a.dim


def test_preset_fields():
    for name in ("llama3_2_1b", "llama3_2_3b", "qwen3_0_6b", "qwen3_1_7b", "qwen3_4b"):
        assert get_preset(name).tie_embeddings, name
    for name in ("llama3_1_8b", "llama3_1_70b", "qwen3_8b", "qwen3_14b", "qwen3_32b"):
        assert not get_preset(name).tie_embeddings, name
    for name in ("qwen3_0_6b", "qwen3_1_7b", "qwen3_4b", "qwen3_8b", "qwen3_14b", "qwen3_32b"):
        a = get_preset(name)
        assert (a.head_dim, a.vocab_size, a.rope_theta, a.norm_eps, a.max_seq_len, a.qk_norm) == \
            (128, 151936, 1e6, 1e-6, 40960, True)
    assert get_preset("llama3_2_3b").rope_scaling["factor"] == 32.0
    assert get_preset("llama3_1_8b").rope_scaling["factor"] == 8.0
    t = get_preset("tiny_qwen3")
    assert t.head_dim != t.dim // t.n_heads and t.tie_embeddings and t.qk_norm


def test_get_preset_is_a_copy_and_unknown_raises():
    a = get_preset("tiny_llama")
    a.dim, a.rope_scaling["factor"] = 1, 99.0
    assert get_preset("tiny_llama").dim == 64 and get_preset("tiny_llama").rope_scaling["factor"] == 8.0
    with pytest.raises(ValueError) as e:
        get_preset("llama9_70b")
    one_line_error(e, "llama9_70b", "tiny_llama", "qwen3_8b")


@pytest.mark.parametrize("name", list(M.PRESETS))
def test_hf_config_round_trip(name):
    a = get_preset(name)
    cfg = json.loads(json.dumps(a.to_hf_config()))
    assert ModelArgs.from_hf_config(cfg) == a


def test_flops_per_token_counts_every_matmul():
    a = get_preset("tiny_qwen3")  # tied: the head matmul still costs FLOPs
    with torch.device("meta"):
        m = Transformer(a)
    linear = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    assert M.flops_per_token(a, 100) == 6 * linear + 6 * a.n_layers * a.n_heads * a.head_dim * 100


def test_published_config_json_parses_to_presets():
    # Verbatim field values of meta-llama/Llama-3.2-1B and Qwen/Qwen3-8B config.json (legacy rope keys).
    llama = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
             "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
             "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072,
             "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16,
             "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
             "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                              "original_max_position_embeddings": 8192, "rope_type": "llama3"},
             "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
             "vocab_size": 128256}
    qwen = {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
            "initializer_range": 0.02, "intermediate_size": 12288, "max_position_embeddings": 40960,
            "max_window_layers": 36, "model_type": "qwen3", "num_attention_heads": 32, "num_hidden_layers": 36,
            "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
            "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
            "use_sliding_window": False, "vocab_size": 151936}
    assert ModelArgs.from_hf_config(llama) == get_preset("llama3_2_1b")
    assert ModelArgs.from_hf_config(qwen) == get_preset("qwen3_8b")


# ---------------------------------------------------------------------------------------- config errors


def _cfg(**kw):
    cfg = get_preset("tiny_llama").to_hf_config()
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize("field,value", [
    ("model_type", "mistral"), ("attention_bias", True), ("mlp_bias", True), ("hidden_act", "gelu"),
    ("use_sliding_window", True), ("attention_dropout", 0.1), ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
    ("layer_types", ["full_attention", "sliding_attention"]),
])
def test_from_hf_config_rejects_unsupported(field, value):
    with pytest.raises(ValueError) as e:
        ModelArgs.from_hf_config(_cfg(**{field: value}))
    one_line_error(e, "yarn" if field == "rope_scaling" else field)


def test_from_hf_config_smollm_style_and_v5_rope_parameters():
    # SmolLM2-135M-like: 9 heads, 3 KV heads, no head_dim key -> HF's rule hidden_size // num_attention_heads.
    cfg = _cfg(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, rope_scaling=None, rope_theta=1e5)
    del cfg["head_dim"]
    a = ModelArgs.from_hf_config(cfg)
    assert (a.head_dim, a.n_heads, a.n_kv_heads, a.rope_scaling, a.rope_theta) == (64, 9, 3, None, 1e5)
    # transformers >= 5 writes rope_parameters instead of rope_theta/rope_scaling
    cfg = _cfg()
    rope = dict(cfg.pop("rope_scaling"), rope_theta=cfg.pop("rope_theta"))
    assert ModelArgs.from_hf_config(dict(cfg, rope_parameters=rope)) == get_preset("tiny_llama")


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("absent", [("head_dim",), ("num_key_value_heads",), ("head_dim", "num_key_value_heads")])
def test_from_hf_config_absent_fields_default_as_transformers(kind, absent):
    # LlamaConfig derives absent head_dim / kv heads from the heads; Qwen3Config has fixed defaults (128, 32)
    transformers = pytest.importorskip("transformers")
    cfg = get_preset("tiny_qwen3" if kind == "qwen3" else "tiny_llama").to_hf_config()
    cfg.update(hidden_size=256, num_attention_heads=64)  # a multiple of Qwen3Config's 32 kv heads, not equal
    for k in absent:
        del cfg[k]
    hf = (transformers.Qwen3Config if kind == "qwen3" else transformers.LlamaConfig)(**cfg)
    a = ModelArgs.from_hf_config(cfg)
    assert (a.head_dim, a.n_kv_heads) == (hf.head_dim, hf.num_key_value_heads)


# ------------------------------------------------------------------------------------------- HF parity


def hf_model(kind, tie):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie)
    if kind == "smollm":  # SmolLM2-135M's shape family: 9 heads, 3 KV heads, plain RoPE, tied
        cfg = transformers.LlamaConfig(**dict(common, hidden_size=72, num_attention_heads=9, num_key_value_heads=3),
                                       rope_theta=100000.0)
    elif kind == "llama":  # original_max_position_embeddings 32: llama3 scaling bends every band at this size
        cfg = transformers.LlamaConfig(**common, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32})
    else:
        cfg = transformers.Qwen3Config(**common, head_dim=32, rope_theta=1e6)  # head_dim != 64 // 4
    torch.manual_seed(1)
    m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if n.endswith("norm.weight") else 0.05 * torch.randn_like(p))
    return m.eval()


@pytest.mark.parametrize("kind,tie", [("llama", False), ("llama", True), ("qwen3", False), ("qwen3", True)])
def test_hf_parity_both_directions(kind, tie, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = hf_model(kind, tie)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf")
    assert ours.args.tie_embeddings == tie and ours.args.qk_norm == (kind == "qwen3")
    assert (ours.output.weight is ours.tok_embeddings.weight) == tie
    tokens = torch.randint(0, V, (2, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
        got = ours(tokens)
    assert (got - ref).abs().max() <= 1e-4
    # export -> transformers loads it and computes the same logits
    save_hf(ours, ours.args, tmp_path / "ours", generation_config={"bos_token_id": 1, "eos_token_id": [2, 3]})
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert back.config.tie_word_embeddings == tie and list(back.generation_config.eos_token_id) == [2, 3]
    with torch.no_grad():
        assert (back(tokens).logits - ref).abs().max() <= 1e-4


def test_hf_parity_smollm_shape_head_dim_absent_from_config(tmp_path):
    pytest.importorskip("transformers")
    hf = hf_model("smollm", True)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["head_dim"]  # older Llama / SmolLM2 configs have no head_dim
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = load_hf(tmp_path)
    assert (ours.args.n_heads, ours.args.n_kv_heads, ours.args.head_dim) == (9, 3, 8)
    tokens = torch.randint(0, V, (1, 16))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max() <= 1e-4


def test_bf16_forward_keeps_fp32_rope_and_loss():
    m = tiny("tiny_llama")
    tokens = torch.randint(0, V, (1, 300))
    with torch.no_grad():
        ref = m(tokens)
        m.to(torch.bfloat16)  # would round a RoPE buffer to bf16; ours is computed in fp32 every forward
        logits, loss = m(tokens), m(tokens, labels=tokens)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert (logits.float() - ref).abs().max() < 0.1 * ref.abs().max()


# ------------------------------------------------------------------------------------ round trips / Meta


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen3"])
def test_save_load_bit_identical_sharded(name, tmp_path):
    m = tiny(name)
    sd = m.state_dict()
    save_hf(m, m.args, tmp_path, max_shard_bytes=100_000)  # forces several shards + index
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert ("lm_head.weight" in index["weight_map"]) == (not m.args.tie_embeddings)  # tied: saved once, as HF
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == [M._HF_ARCH[m.args.model_type]] and cfg["torch_dtype"] == "float32"
    back = load_hf(tmp_path)
    assert back.args == m.args
    for k, v in back.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert (back.output.weight is back.tok_embeddings.weight) == m.args.tie_embeddings
    save_hf(m, m.args, tmp_path)  # re-export unsharded: stale shards must not survive
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]


def test_load_hf_dtype(tmp_path):
    m = tiny("tiny_llama")
    save_hf(m, m.args, tmp_path)
    b = load_hf(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in b.parameters())
    assert torch.equal(b.tok_embeddings.weight, m.tok_embeddings.weight.bfloat16())


def hf_to_meta_qk(w, n_heads):  # the inverse of model._meta_to_hf_qk
    return w.view(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


@pytest.mark.parametrize("tie,n_shards", [(False, 1), (True, 1), (False, 2)])
def test_meta_consolidated_format(tie, n_shards, tmp_path):
    # Build Meta's layout from ours: interleaved-RoPE q/k rows (the inverse of HF's converter permute), Meta names,
    # model-parallel shards split as fairscale does. Loading must give back the same model and logits.
    m = tiny("tiny_llama", tie_embeddings=tie)
    a = m.args
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    if tie:
        sd["output.weight"] = sd["tok_embeddings.weight"].clone()  # Meta's files store the head even when tied
    for i in range(a.n_layers):
        for name, n in (("wq", a.n_heads), ("wk", a.n_kv_heads)):
            key = f"layers.{i}.attention.{name}.weight"
            assert torch.equal(M._meta_to_hf_qk(hf_to_meta_qk(sd[key], n), n), sd[key])
            sd[key] = hf_to_meta_qk(sd[key], n)
    for r in range(n_shards):
        shard = {}
        for k, v in sd.items():
            dim = 1 if k.endswith(("wo.weight", "w2.weight")) else 0
            shard[k] = v if k.endswith("norm.weight") else v.chunk(n_shards, dim=dim)[r].clone()
        torch.save(shard, tmp_path / f"consolidated.{r:02d}.pth")
    (tmp_path / "params.json").write_text(json.dumps({
        "dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads, "vocab_size": V,
        "multiple_of": 32, "ffn_dim_multiplier": 1.0, "norm_eps": a.norm_eps, "rope_theta": a.rope_theta,
        "use_scaled_rope": True}))
    back = load_hf(tmp_path)
    assert back.args.tie_embeddings == tie and back.args.hidden_dim == a.hidden_dim
    assert back.args.rope_scaling == a.rope_scaling
    tokens = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens), m(tokens), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------- bad checkpoints


def _saved(tmp_path, name="tiny_llama"):
    m = tiny(name)
    save_hf(m, m.args, tmp_path)
    return m


def _rewrite_safetensors(tmp_path, edit):
    from safetensors.torch import load_file, save_file
    f = tmp_path / "model.safetensors"
    sd = load_file(f)
    edit(sd)
    save_file(sd, f)


def test_error_missing_config(tmp_path):
    _saved(tmp_path)
    os.remove(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError) as e:
        load_hf(tmp_path)
    one_line_error(e, "config.json")
    with pytest.raises(FileNotFoundError) as e:
        load_hf(tmp_path / "nope")
    one_line_error(e, "nope")


def test_error_unsupported_model_type(tmp_path):
    _saved(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, model_type="gemma")))
    with pytest.raises(ValueError) as e:
        load_hf(tmp_path)
    one_line_error(e, "config.json", "model_type", "gemma")


def test_error_missing_tensor(tmp_path):
    _saved(tmp_path)
    _rewrite_safetensors(tmp_path, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError) as e:
        load_hf(tmp_path)
    one_line_error(e, "missing tensor", "model.layers.1.mlp.up_proj.weight")


def test_error_wrong_shape(tmp_path):
    _saved(tmp_path)
    _rewrite_safetensors(tmp_path, lambda sd: sd.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(ValueError) as e:
        load_hf(tmp_path)
    one_line_error(e, "model.safetensors", "model.norm.weight", "(65,)", "(64,)")


def test_error_unexpected_tensor(tmp_path):
    _saved(tmp_path)
    _rewrite_safetensors(tmp_path, lambda sd: sd.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(ValueError) as e:
        load_hf(tmp_path)
    one_line_error(e, "model.safetensors", "unexpected tensor", "q_proj.bias")


def test_error_tied_head_differs(tmp_path):
    _saved(tmp_path, "tiny_qwen3")
    _rewrite_safetensors(tmp_path, lambda sd: sd.update({"lm_head.weight": torch.zeros(V, 64)}))
    with pytest.raises(ValueError) as e:
        load_hf(tmp_path)
    one_line_error(e, "lm_head.weight", "tie_word_embeddings=true", "set it to false")


def test_load_skips_rope_buffers_and_an_equal_tied_head(tmp_path):
    # older transformers saved rotary_emb.inv_freq; tied checkpoints converted by other tools store a copy of the head
    m = _saved(tmp_path, "tiny_qwen3")
    _rewrite_safetensors(tmp_path, lambda sd: sd.update({
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(m.args.head_dim // 2),
        "lm_head.weight": sd["model.embed_tokens.weight"].clone()}))
    back = load_hf(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), m.state_dict().values()))
    assert back.output.weight is back.tok_embeddings.weight


@pytest.mark.parametrize("keep", [0.5, 0.001])  # truncated data / truncated header
def test_error_truncated_safetensors(tmp_path, keep):
    _saved(tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ValueError) as e:
        load_hf(tmp_path)
    one_line_error(e, str(f))


# --------------------------------------------------------------------------- packing, loss, KV cache


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen3"])
@pytest.mark.parametrize("flex", [False, True])
def test_packed_row_equals_documents_alone(name, flex, monkeypatch):
    monkeypatch.setattr(M, "USE_FLEX", flex)  # flex forward runs on CPU (eager); only its backward is GPU-only
    m = tiny(name)
    lens = [5, 9, 3]
    docs = [torch.randint(0, V, (n,)) for n in lens]
    tokens = torch.cat(docs)[None]  # (1,17)
    positions = torch.cat([torch.arange(n) for n in lens])[None]
    doc_ids = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lens)])[None]
    with torch.no_grad():
        packed = m(tokens, positions=positions, doc_ids=doc_ids)[0]
        alone = torch.cat([m(d[None])[0] for d in docs])
        leaky = m(tokens, positions=positions)[0]  # without the document mask, later documents see earlier ones
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)
    assert (leaky[5:] - alone[5:]).abs().max() > 1e-3


@pytest.mark.parametrize("name,compile_loss", [("tiny_llama", False), ("tiny_qwen3", False), ("tiny_qwen3", True)])
def test_chunked_ce_matches_full_cross_entropy(name, compile_loss, monkeypatch):
    monkeypatch.setattr(M, "CE_CHUNK", 7)  # several chunks and a ragged last one
    m = tiny(name).train()
    m.compile_loss = compile_loss  # train.py's trainer.compile: ce_grad compiled (inductor's C++ backend on CPU)
    tokens = torch.randint(0, V, (2, 20))
    labels = torch.randint(0, V, (2, 20))
    labels[0, :6] = -100
    labels[1, 15:] = -100
    doc_ids = torch.tensor([[0] * 8 + [1] * 12, [0] * 20])
    loss = m(tokens, doc_ids=doc_ids, labels=labels)
    grads = [p.grad for p in (loss.backward(), m.parameters())[1]]
    m.zero_grad()
    ref = F.cross_entropy(m(tokens, doc_ids=doc_ids).float().flatten(0, 1), labels.flatten(), reduction="sum")
    ref.backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref)
    for g, p in zip(grads, m.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_compiled_ce_grad_equals_eager_and_autograd():
    """ce_grad's two forms, eager (an index_put of -1 at the targets) and compiled (a one-hot fused into the softmax's
    pass), against autograd through F.cross_entropy: fp32 and bf16 logits, a full and a ragged chunk; no graph break,
    and nothing recompiled by a second pass."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    torch.manual_seed(0)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(M.ce_grad, fullgraph=True, backend=counter)
    frames = []
    for _ in range(2):  # the second pass compiles nothing new
        for dtype in (torch.float32, torch.bfloat16):
            for rows in (16, 5):
                logits, y = (torch.randn(rows, 1000) * 4).to(dtype), torch.randint(0, 1000, (rows,))
                ref_in = logits.float().clone().requires_grad_()  # fp32: .float() would return logits itself
                ref = F.cross_entropy(ref_in, y, reduction="sum")
                ref.backward()
                loss, g = compiled(logits.clone(), y)
                eager_loss, eager_g = M.ce_grad(logits.clone(), y)
                assert g.dtype == eager_g.dtype == dtype and loss.dtype == eager_loss.dtype == torch.float32
                torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-3)
                torch.testing.assert_close(eager_loss, ref.detach(), rtol=1e-5, atol=1e-3)
                tol = {"rtol": 0, "atol": 1e-5 if dtype == torch.float32 else 4e-3}  # bf16: one rounding of a value <= 1
                torch.testing.assert_close(g.float(), ref_in.grad, **tol)
                torch.testing.assert_close(eager_g.float(), ref_in.grad, **tol)
        frames.append(counter.frame_count)
    assert frames[0] == frames[1] <= 4, frames  # e.g. 16 rows static, then any row count (dynamic), per dtype


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen3"])
def test_autocast_bf16_step_runs_the_head_in_bf16_and_matches_fp32(name, monkeypatch):
    """train.py's one-rank precision (bf16 autocast over fp32 weights): the fused loss head gets bf16 inputs, cast once
    (inside the Function autocast would re-cast the head weight per chunk and its addmm_ would run in fp32), q/k
    leave RoPE in v's dtype, gradients reach the fp32 parameters in fp32, and loss and grads stay near fp32's."""
    monkeypatch.setattr(M, "CE_CHUNK", 7)
    seen = []
    apply = M._FusedLinearCE.apply
    monkeypatch.setattr(M._FusedLinearCE, "apply",
                        lambda h, w, y, c, f: seen.append((h.dtype, w.dtype)) or apply(h, w, y, c, f))
    attn_dtypes = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: attn_dtypes.append((q.dtype, k.dtype, v.dtype)) or sdpa(q, k, v, **kw))
    m = tiny(name).train()
    tokens, labels = torch.randint(0, V, (2, 20)), torch.randint(0, V, (2, 20))
    labels[0, :6] = -100
    doc_ids = torch.tensor([[0] * 8 + [1] * 12, [0] * 20])
    ref = m(tokens, doc_ids=doc_ids, labels=labels)
    ref_grads = [g.clone() for g in torch.autograd.grad(ref, list(m.parameters()))]
    seen.clear(), attn_dtypes.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(tokens, doc_ids=doc_ids, labels=labels)
    grads = torch.autograd.grad(loss, list(m.parameters()))
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    assert attn_dtypes and all(d == (torch.bfloat16,) * 3 for d in attn_dtypes), attn_dtypes
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=0)
    for g, r in zip(grads, ref_grads):
        assert (g - r).norm() <= 0.05 * r.norm() + 1e-6, ((g - r).norm(), r.norm())


@pytest.mark.parametrize("tie", [False, True])
def test_untrained_tokens_found_and_set_to_the_mean(tie):
    """Llama 3 base ships chat special tokens with all-zero embedding rows: found by their tiny norm;
    the ones the data uses get the mean of the trained rows (embedding and untied head), the others stay."""
    m = tiny("tiny_llama", tie_embeddings=tie)
    with torch.no_grad():
        m.tok_embeddings.weight[[5, 7]] = 0.0
        m.tok_embeddings.weight[9] = 1e-20  # "near zero", as some checkpoints have
        if not tie:
            m.output.weight[[5, 7, 9]] = 1e-3
    assert M.untrained_token_ids(m) == [5, 7, 9]
    emb_mean = m.tok_embeddings.weight[[i for i in range(V) if i not in (5, 7, 9)]].mean(0)
    head_mean = m.output.weight[[i for i in range(V) if i not in (5, 7, 9)]].mean(0)
    M.fix_untrained_tokens(m, [5, 9])
    torch.testing.assert_close(m.tok_embeddings.weight[5], emb_mean)
    torch.testing.assert_close(m.tok_embeddings.weight[9], emb_mean)
    torch.testing.assert_close(m.output.weight[5], emb_mean if tie else head_mean)
    assert not m.tok_embeddings.weight[7].any()
    assert M.untrained_token_ids(m) == [7] and (m.output.weight is m.tok_embeddings.weight) == tie


@pytest.mark.parametrize("mask", ["causal", "documents", "cache", "flex"])
def test_block_compiles_without_graph_breaks(mask):
    """train.py compiles each block: a graph break there (a .item(), a Python branch on a tensor) would silently split
    it and cost speed. fullgraph=True turns a break into an error; aot_eager also traces the backward (not for flex:
    FlexAttention has no CPU backward; its BlockMask path is the one CUDA training takes)."""
    torch._dynamo.reset()
    m = tiny("tiny_qwen3")
    B, T = 2, 16
    x = torch.randn(B, T, m.args.dim, requires_grad=mask not in ("cache", "flex"))
    positions = torch.arange(T).expand(B, T)
    freqs = (positions[..., None].float() * M.rope_inv_freq(m.args)).repeat(1, 1, 2)[:, None]  # (B,1,T,head_dim)
    cos, sin = freqs.cos(), freqs.sin()
    cache = KVCache(m.args, B, 32, "cpu", torch.float32) if mask == "cache" else None
    same_doc = torch.arange(T)[:, None] // 8 == torch.arange(T) // 8  # two documents of 8
    attn_mask = {"causal": None, "cache": (torch.arange(32) <= positions[:, :, None])[:, None],
                 "documents": (torch.ones(T, T, dtype=torch.bool).tril() & same_doc)[None, None],
                 "flex": M.document_block_mask((torch.arange(T) // 8).expand(B, T).contiguous())}[mask]
    block = m.layers[0]
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with torch.set_grad_enabled(mask not in ("cache", "flex")):
        out = compiled(x, cos, sin, attn_mask, cache, positions if cache else None)
        ref = block(x, cos, sin, attn_mask, KVCache(m.args, B, 32, "cpu", torch.float32) if cache else None,
                    positions if cache else None)
    torch.testing.assert_close(out, ref)
    if mask not in ("cache", "flex"):
        out.sum().backward()


def test_chunked_ce_no_supervised_tokens_still_backprops():
    m = tiny("tiny_llama").train()
    loss = m(torch.randint(0, V, (1, 8)), labels=torch.full((1, 8), -100))
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in m.parameters())


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen3"])
def test_kv_cache_matches_full_recompute(name):
    m = tiny(name)
    prompts = [torch.randint(0, V, (n,)) for n in (7, 3, 5)]
    steps, B, P = 6, len(prompts), max(len(p) for p in prompts)
    cont = torch.randint(0, V, (B, steps))  # tokens fed at each decode step (teacher forcing)
    cache = KVCache(m.args, B, P + steps, device="cpu", dtype=torch.float32)
    padded = torch.zeros(B, P, dtype=torch.long)  # right-padded with token 0
    for b, p in enumerate(prompts):
        padded[b, :len(p)] = p
    lens = torch.tensor([len(p) for p in prompts])
    with torch.no_grad():
        logits = m(padded, positions=torch.arange(P).expand(B, P), cache=cache)
        for b, p in enumerate(prompts):  # prefill: each prompt's last real position
            torch.testing.assert_close(logits[b, len(p) - 1], m(p[None])[0, -1], rtol=0, atol=1e-5)
        for t in range(steps):
            step = m(cont[:, t:t + 1], positions=(lens + t)[:, None], cache=cache)[:, 0]
            for b, p in enumerate(prompts):
                full = m(torch.cat([p, cont[b, :t + 1]])[None])[0, -1]
                torch.testing.assert_close(step[b], full, rtol=0, atol=1e-5)


def test_meta_device_init_and_errors():
    with torch.device("meta"):
        m = Transformer(get_preset("tiny_qwen3"))
    m.to_empty(device="cpu")
    m.init_weights()
    assert m.output.weight is m.tok_embeddings.weight
    assert torch.isfinite(m(torch.randint(0, V, (1, 4)))).all()
    with pytest.raises(ValueError) as e:
        m(torch.zeros(1, 4097, dtype=torch.long))
    one_line_error(e, "4097", "max_seq_len")
    with pytest.raises(ValueError) as e:
        m(torch.zeros(1, 2, dtype=torch.long), cache=KVCache(m.args, 1, 8, "cpu", torch.float32))
    one_line_error(e, "positions")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention backward and BlockMask kernels need CUDA")
def test_cuda_flex_matches_sdpa_mask_forward_and_backward(monkeypatch):
    m = tiny("tiny_qwen3").cuda().train()
    tokens = torch.randint(0, V, (2, 300), device="cuda")
    doc_ids = torch.tensor([[0] * 100 + [1] * 150 + [2] * 50, [0] * 300], device="cuda")
    positions = torch.cat([torch.arange(100), torch.arange(150), torch.arange(50)]).cuda()[None].repeat(2, 1)
    positions[1] = torch.arange(300)
    out = {}
    for flex in (True, False):
        monkeypatch.setattr(M, "USE_FLEX", flex)
        m.zero_grad()
        loss = m(tokens, positions=positions, doc_ids=doc_ids, labels=tokens)
        loss.backward()
        out[flex] = (loss.detach(), [p.grad.clone() for p in m.parameters()])
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-4, atol=1e-3)
    for a, b in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention backward and compiled blocks need CUDA")
def test_cuda_autocast_compiled_flex_step_matches_fp32_eager(monkeypatch):
    """train.py's one-GPU step: bf16 autocast over fp32 weights, per-block compile, flex_attention document mask,
    fused linear-CE cast once: loss and gradients near an fp32 eager step with the SDPA mask."""
    monkeypatch.setattr(M, "CE_CHUNK", 64)
    m = tiny("tiny_qwen3").cuda().train()
    tokens = torch.randint(0, V, (2, 256), device="cuda")
    doc_ids = torch.tensor([[0] * 100 + [1] * 156, [0] * 256], device="cuda")
    positions = torch.cat([torch.arange(100), torch.arange(156)]).cuda()[None].repeat(2, 1)
    positions[1] = torch.arange(256)
    labels = tokens.roll(-1, 1)
    labels[:, :30] = -100
    monkeypatch.setattr(M, "USE_FLEX", False)
    ref = m(tokens, positions=positions, doc_ids=doc_ids, labels=labels)
    ref_grads = [g.clone() for g in torch.autograd.grad(ref, list(m.parameters()))]
    monkeypatch.setattr(M, "USE_FLEX", True)
    for block in m.layers:
        block.compile()
    for _ in range(2):  # the second call runs the compiled code without compiling
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(tokens, positions=positions, doc_ids=doc_ids, labels=labels)
        grads = torch.autograd.grad(loss, list(m.parameters()))
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=0)
    for g, r in zip(grads, ref_grads):
        assert (g - r).norm() <= 0.05 * r.norm() + 1e-6, ((g - r).norm(), r.norm())
