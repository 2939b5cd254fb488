"""generate.py: KV-cache decoding = full recompute, compiled decoding = eager (one graph, no recompiles), greedy
parity with HF generate, GSM8K answer extraction and evaluation (also under FSDP2 on 2 CPU ranks), and the command
line.

    python3 -m pytest -q -x tests/test_generate.py
"""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import generate as gen
import model as model_lib
from generate import extract_answer

ROOT = Path(__file__).resolve().parent.parent


def tiny_args(**kw):
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=97,
                max_seq_len=64, rope_theta=10000.0)
    return model_lib.ModelArgs(**{**base, **kw})


def tiny_model(seed=0, **kw):
    # nn.Linear's default init (not 0.02): logits spread widely, so greedy never hinges on a near-tie
    torch.manual_seed(seed)
    return model_lib.Transformer(tiny_args(**kw)).eval()


class Recorder(torch.nn.Module):
    """Passes forward calls through to a model and keeps (tokens, positions, logits) of each."""

    def __init__(self, model):
        super().__init__()
        self.model, self.args, self.calls = model, model.args, []

    def forward(self, tokens, positions=None, cache=None, logits_at=None):
        logits = self.model(tokens, positions, cache=cache, logits_at=logits_at)
        self.calls.append((tokens.clone(), positions.clone(), logits.clone()))
        return logits


# ---------------------------------------------------------------------------------------------------------------
# decoding


@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qwen3"])
@pytest.mark.parametrize("prompt_lens", [[7], [5, 11, 2, 8]], ids=["single", "batch"])
def test_kv_cache_logits_match_full_recompute(prompt_lens, qk_norm):
    model = tiny_model(qk_norm=qk_norm)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in prompt_lens]
    rec = Recorder(model)
    new = 6
    outs = gen.generate(rec, prompts, new, stop_ids=[])  # no stop: every row runs all steps
    assert [len(o) for o in outs] == [new] * len(prompts)
    assert len(rec.calls) == new  # one prefill + new - 1 decode steps: the prefix is never recomputed
    assert rec.calls[0][0].shape == (len(prompts), max(prompt_lens))
    with torch.no_grad():
        for step, (tokens, positions, logits) in enumerate(rec.calls):
            for b, prompt in enumerate(prompts):
                full = prompt + outs[b][:step]
                expected = model(torch.tensor([full]))[0, -1]  # recompute the whole sequence, no cache
                if step == 0:  # the prefill returns only each prompt's last-position logits: (B, vocab)
                    got = logits[b]
                else:
                    assert tokens[b].tolist() == [outs[b][step - 1]] and positions[b].tolist() == [len(full) - 1]
                    got = logits[b, -1]
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
                assert outs[b][step] == expected.argmax().item()


@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qwen3"])
def test_generate_under_bf16_autocast(qk_norm):
    """train.py's one-rank evaluation runs inside bf16 autocast over fp32 weights: the KV cache takes autocast's dtype
    (k/v are bf16 matmul outputs) and each step's logits stay those of a full recompute under the same autocast."""
    model = tiny_model(qk_norm=qk_norm)
    prompts = [[5, 17, 3, 90, 41, 8, 2], [60, 7]]
    rec = Recorder(model)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert gen.compute_dtype(model) == torch.bfloat16
        outs = gen.generate(rec, prompts, 5, stop_ids=[])
        for step, (_, _, logits) in enumerate(rec.calls):
            for b, prompt in enumerate(prompts):
                expected = model(torch.tensor([prompt + outs[b][:step]]))[0, -1].float()
                got = (logits[b] if step == 0 else logits[b, -1]).float()
                assert (got - expected).abs().max() <= 0.05 * expected.abs().max(), (step, b)
    assert gen.compute_dtype(model) == torch.float32


def test_finished_sequences_leave_the_batch():
    model = tiny_model()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12]]
    free = [gen.generate(model, [p], 10, stop_ids=[])[0] for p in prompts]
    j = next(j for j in range(2, 10) if free[0][j] not in free[0][:j])
    stop = free[0][j]  # sequence 0 stops at step j (the others maybe elsewhere or never)
    single = [gen.generate(model, [p], 10, stop_ids=[stop])[0] for p in prompts]
    assert single[0] == free[0][:j]  # the stop token is not part of the completion
    rec = Recorder(model)
    assert gen.generate(rec, prompts, 10, stop_ids=[stop]) == single
    batch_sizes = [t.shape[0] for t, _, _ in rec.calls]
    assert batch_sizes == sorted(batch_sizes, reverse=True) and batch_sizes[-1] < len(prompts)
    # all stop at once -> no further forward calls
    rec = Recorder(model)
    assert gen.generate(rec, [[1, 2, 3]], 10, stop_ids=[free[0][0]]) == [[]] and len(rec.calls) == 1


def test_context_limit_and_bad_prompts():
    model = tiny_model()  # max_seq_len 64
    out = gen.generate(model, [[1] * 60, [2] * 10], 20, stop_ids=[])
    assert [len(o) for o in out] == [4, 20]  # prompt + completion never exceeds max_seq_len
    with pytest.raises(ValueError, match="max_seq_len=64"):
        gen.generate(model, [[1] * 64], 5, stop_ids=[])
    with pytest.raises(ValueError, match="prompt 1 has 0 tokens"):
        gen.generate(model, [[1], []], 5, stop_ids=[])
    with pytest.raises(ValueError, match="top_p"):
        gen.generate(model, [[1]], 5, stop_ids=[], temperature=1.0, top_p=0.0)


def test_sampling():
    model = tiny_model()
    prompts = [[1, 2, 3], [4, 5]]
    greedy = gen.generate(model, prompts, 12, stop_ids=[])
    a = gen.generate(model, prompts, 12, stop_ids=[], temperature=1.0, seed=123)
    assert a == gen.generate(model, prompts, 12, stop_ids=[], temperature=1.0, seed=123)  # seeded: reproducible
    assert a != gen.generate(model, prompts, 12, stop_ids=[], temperature=1.0, seed=124)
    assert a != greedy
    # top_p that keeps only the most likely token is greedy; temperature 0 ignores the seed
    assert gen.generate(model, prompts, 12, stop_ids=[], temperature=1.0, top_p=1e-6, seed=5) == greedy
    assert gen.generate(model, prompts, 12, stop_ids=[], seed=5) == greedy


def test_sample_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {gen.sample(logits, 1.0, 0.7, g).item() for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7 needs token 1 too; 0.5 + 0.3 >= 0.7 stops there
    assert gen.sample(logits, 0.0, 1.0, None, vocab_size=4).item() == 0
    assert gen.sample(logits, 0.0, 1.0, None, vocab_size=1).tolist() == [0]
    padded = torch.tensor([[0.0, 1.0, 9.0]])  # id 2 is past the tokenizer's vocabulary
    assert gen.sample(padded, 0.0, 1.0, None, vocab_size=2).item() == 1


def test_sampling_probs_match_transformers_warpers():
    """temperature -> top_k -> top_p, as transformers' TemperatureLogitsWarper, TopKLogitsWarper and
    TopPLogitsWarper filter (generate(do_sample=True)): the same tokens kept, the same renormalized probabilities."""
    generation = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(0)
    checked = 0
    for case in range(200):
        V = int(torch.randint(2, 3000, (1,), generator=g))
        logits = torch.randn(3, V, generator=g) * float(torch.rand(1, generator=g) * 6 + 0.1)
        temperature = float(torch.rand(1, generator=g)) * 1.5 + 0.2
        top_k = [0, 1, 5, 20, 50][case % 5]
        top_p = [1.0, 0.9, 0.5, 0.95, 0.1][case // 5 % 5]
        scores = generation.TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            scores = generation.TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1:
            scores = generation.TopPLogitsWarper(top_p)(None, scores)
        want = torch.softmax(scores, dim=-1)
        got = gen.sampling_probs(logits, temperature, top_p, top_k)
        got = got / got.sum(dim=-1, keepdim=True)
        # a cumulative probability within rounding of top_p may cut one token either way: skip those rows
        p = torch.softmax(logits / temperature, -1).sort(-1, descending=True).values
        if top_k:
            p[:, top_k:] = 0
        near = ((p / p.sum(-1, keepdim=True)).cumsum(-1) - top_p).abs().min(-1).values < 1e-5
        ok = ~near if top_p < 1 else torch.ones(3, dtype=torch.bool)
        torch.testing.assert_close(got[ok], want[ok], atol=1e-6, rtol=1e-4)
        checked += int(ok.sum())
    assert checked > 590
    # ties with the k-th token stay (bf16 logits tie often)
    tied = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0]])
    assert (gen.sampling_probs(tied, 1.0, top_k=2) > 0).tolist() == [[True, True, True, True, False, False]]
    want = torch.softmax(generation.TopKLogitsWarper(2)(None, tied.clone()), dim=-1)
    torch.testing.assert_close(gen.sampling_probs(tied, 1.0, top_k=2) / gen.sampling_probs(tied, 1.0, top_k=2).sum(), want)


# ---------------------------------------------------------------------------------------------------------------
# compiled decoding (torch.compile on CPU: inductor's C++ backend; a few seconds per graph)


def unique_graphs():
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]  # graphs dynamo has captured (and handed to inductor) so far


def stops_ending_rows_at_different_steps(free, new):
    """Two stop ids under which at least two rows stop early, at different steps > 0, and one row runs to the end
    (free: completions without stop ids). Returns (stop ids, the completion lengths they give)."""
    def lengths(stops):
        return [next((i for i, t in enumerate(o) if t in stops), new) for o in free]
    for a in free[0]:
        for b in free[1]:
            n = lengths({a, b})
            if len({k for k in n if 0 < k < new}) >= 2 and new in n:
                return [a, b], n
    raise AssertionError(f"no such stop ids in {free}")


@pytest.mark.parametrize("kw", [{}, dict(qk_norm=True, head_dim=32)], ids=["llama", "qwen3"])
def test_compiled_decode_equals_eager_and_compiles_once(kw):
    """One graph for the whole decode step; rows that stop stay in the batch but are not emitted; greedy ids equal
    the eager path's (which drops stopped rows). Later calls with other prompt lengths but the same batch size and
    cache length reuse the graph, including one where a row reaches the context (its position is clamped)."""
    torch._dynamo.reset()  # earlier tests may have compiled this shape already
    model = tiny_model(max_seq_len=256, **kw)
    prompts, new = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12]], 10
    stops, lengths = stops_ending_rows_at_different_steps(gen.generate(model, prompts, new, stop_ids=[]), new)
    eager = gen.generate(model, prompts, new, stop_ids=stops)
    assert [len(o) for o in eager] == lengths
    before = unique_graphs()
    assert gen.generate(model, prompts, new, stop_ids=stops, compile=True) == eager
    assert unique_graphs() == before + 1  # fullgraph: the model forward of one token is one graph
    assert gen._STATIC_CACHES[model].max_len == 256  # 6 + 10 slots needed, rounded up (and capped at the context)
    others = [[7, 8], [9] * 20, [3, 1, 4, 1, 5], [2]]
    assert gen.generate(model, others, new, stop_ids=stops, compile=True) == gen.generate(model, others, new, stops)
    at_limit = [[5] * 250, [6] * 3, [7], [8, 9]]  # row 0 reaches max_seq_len after 6 tokens, the others go on
    out = gen.generate(model, at_limit, new, stop_ids=[], compile=True)
    assert [len(o) for o in out] == [6, new, new, new] and out == gen.generate(model, at_limit, new, stop_ids=[])
    assert unique_graphs() == before + 1  # no recompilation


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs (compile mode reduce-overhead) need CUDA")
def test_cuda_compiled_decode_with_cuda_graphs_equals_eager():
    """On CUDA compile=True replays CUDA graphs over the static KV cache: fp32 greedy ids equal eager's across two
    calls (the second replays the recorded graph), and a bf16 model decodes under it too."""
    torch._dynamo.reset()
    model = tiny_model(max_seq_len=256, qk_norm=True).cuda()
    prompts, new = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12]], 12
    stops, _ = stops_ending_rows_at_different_steps(gen.generate(model, prompts, new, stop_ids=[]), new)
    for ps in (prompts, [[7, 8], [9] * 20, [3, 1, 4, 1, 5], [2]]):
        assert gen.generate(model, ps, new, stop_ids=stops, compile=True) == gen.generate(model, ps, new, stops)
    out = gen.generate(model.to(torch.bfloat16), prompts, new, stop_ids=[], compile=True)
    assert [len(o) for o in out] == [new] * len(prompts)


def test_cache_length():
    assert gen.cache_length(33, 8192, compile=False) == 33  # eager: exactly what is needed
    assert [gen.cache_length(n, 8192, compile=True) for n in (1, 33, 256, 257)] == [256, 256, 256, 512]
    assert gen.cache_length(300, 300, compile=True) == 300  # never past the context


# ---------------------------------------------------------------------------------------------------------------
# parity with Hugging Face generate


def hf_tiny(kind, tmp_path):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common, rope_theta=500000.0, tie_word_embeddings=False)
        cls = transformers.LlamaForCausalLM
    else:
        cfg = transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)
        cls = transformers.Qwen3ForCausalLM
    torch.manual_seed(0)
    hf = cls(cfg).eval()
    hf.save_pretrained(tmp_path)
    return hf, model_lib.load_hf(tmp_path).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_greedy_matches_hf_generate(kind, tmp_path):
    hf, ours = hf_tiny(kind, tmp_path)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 120, (n,), generator=g).tolist() for n in (9, 3, 14, 6)]

    def hf_generate(prompt, eos):
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=16, eos_token_id=eos, pad_token_id=0)[0, len(prompt):]
        out = out.tolist()
        return out[:out.index(eos)] if eos in out else out  # HF keeps the eos (then pads); ours ends before it

    with torch.no_grad():
        free = [hf_generate(p, None) for p in prompts]
    assert gen.generate(ours, prompts, 16, stop_ids=[]) == free
    eos = free[0][5]  # an eos the greedy paths actually meet: stopping must match too
    with torch.no_grad():
        expected = [hf_generate(p, eos) for p in prompts]
    assert len(expected[0]) == 5
    assert gen.generate(ours, prompts, 16, stop_ids=[eos]) == expected


# ---------------------------------------------------------------------------------------------------------------
# GSM8K answers


def test_extract_answer_on_every_gsm8k_test_answer(gsm8k_dir):
    rows = [json.loads(line) for line in open(gsm8k_dir / "test.jsonl")]
    assert len(rows) == 1319
    for row in rows:
        expected = row["answer"].split("#### ")[-1].strip().replace(",", "")
        assert extract_answer(row["answer"]) == expected, row["answer"]
        assert gen.question_and_gold(row) == (row["question"], expected)


@pytest.mark.parametrize("text, expected", [
    ("So she has 1,000 apples.", "1000"),
    ("#### 1,450,000", "1450000"),
    ("It costs $5", "5"),
    ("#### $5", "5"),
    ("She paid $1,234.50 in total", "1234.5"),
    ("The temperature is -3", "-3"),
    ("She lost -$5 that day", "-5"),
    ("16-3", "3"),  # a minus between numbers is subtraction, not a sign
    ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs", "9"),
    ("2.50", "2.5"),
    ("#### 2.5", "2.5"),
    ("#### 3.0", "3"),
    ("0.50 of it, i.e. .5", "0.5"),
    ("The answer is 18.", "18"),
    ("no number here", None),
    ("", None),
    ("3 apples and 4 pears make 7", "7"),
    ("#### 18\n\nQuestion: she buys 5 more", "18"),  # the first '####' answer wins over later numbers
    ("#### unknown, but 7 eggs", "7"),  # '####' without a number: last-number fallback
    ("The answer is 42\n####", "42"),
])
def test_extract_answer_tricky_outputs(text, expected):
    assert extract_answer(text) == expected


def test_strict_answers_and_gold():
    """Gold answers and strict-match take only the number right after '####'; predictions fall back to the last
    number (flexible-extract), e.g. for a completion cut off mid-calculation."""
    assert extract_answer("x = 5\n####") == "5" and extract_answer("x = 5\n####", strict=True) is None
    assert extract_answer("She has 3 + 4 = 7", strict=True) is None
    assert extract_answer("so\n#### 1,000", strict=True) == "1000"
    # a worked solution without '#### N' has no gold: its last number is not the answer to score against
    assert gen.question_and_gold({"question": "What is 1 + 1?", "answer": "1 + 1 = 2"}) == ("What is 1 + 1?", None)


def test_gold_from_src_tgt_and_bad_rows():
    assert gen.question_and_gold({"src": "1+1=", "tgt": "#### 2"}) == ("1+1=", "2")
    with pytest.raises(ValueError, match="'question'/'answer' or 'src'/'tgt'"):
        gen.question_and_gold({"prompt": "x"})


# ---------------------------------------------------------------------------------------------------------------
# prompts, evaluation, command line (real tokenizers, tiny models)


def hf_dir_with_tokenizer(tmp_path, tokenizer_dir, vocab_size, max_seq_len=256):
    """A tiny random model saved as an HF directory, with the tokenizer files next to it."""
    import shutil
    model = tiny_model(vocab_size=vocab_size, max_seq_len=max_seq_len, tie_embeddings=True)
    out = tmp_path / "hf"
    model_lib.save_hf(model, model.args, out)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, out / f.name)
    return out


def test_build_prompt(llama3_tokenizer_dir):
    import tokenizer as tokenizer_lib
    tok = tokenizer_lib.load_tokenizer(str(llama3_tokenizer_dir))
    q = "Natalia sold 48 clips. How many?"
    assert gen.build_prompt(tok, q, chat=False) == [tok.bos_id] + tok.encode(q)
    # chat: the prompt is exactly the rendered conversation up to the first supervised (assistant) token
    ids = gen.build_prompt(tok, q, chat=True, system="Be brief.")
    full, mask = tok.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": q},
                                  {"role": "assistant", "content": "#### 72"}])
    assert full[:len(ids)] == ids and mask.index(1) == len(ids)
    with pytest.raises(ValueError, match="--system needs --chat"):
        gen.build_prompt(tok, q, chat=False, system="x")


@pytest.mark.parametrize("chat", [False, True], ids=["src_tgt", "chat_mode"])
@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_build_prompt_matches_training_format(family, chat, request):
    """A model trained on data.py's src/tgt examples (plain or chat_mode) is prompted with exactly the tokens that
    preceded its first supervised token."""
    import data
    import tokenizer as tokenizer_lib
    tok = tokenizer_lib.load_tokenizer(str(request.getfixturevalue(f"{family}_tokenizer_dir")))
    q, a = "Natalia sold 48 clips. How many?", "She sold 48 + 24 = 72.\n#### 72"
    cfg = data.DatasetConfig(src_field="question", tgt_field="answer", chat_mode=chat)
    ids, mask = data.encode_example({"question": q, "answer": a}, cfg, tok, "test")
    prompt = gen.build_prompt(tok, q, chat=chat)
    assert ids[:len(prompt)] == prompt and list(mask).index(1) == len(prompt)
    if not chat:
        assert prompt == ([tok.bos_id] if family == "llama3" else []) + tok.encode(q)
        for mode in ("as_is", "prompt_response"):  # evaluation prompts follow dataset.source_encode_mode too
            cfg = data.DatasetConfig(src_field="question", tgt_field="answer", source_encode_mode=mode)
            ids, mask = data.encode_example({"question": q, "answer": a}, cfg, tok, "test")
            prompt = gen.build_prompt(tok, q, chat=False, source_encode_mode=mode)
            assert ids[:len(prompt)] == prompt and list(mask).index(1) == len(prompt)


def test_evaluate_gsm8k(llama3_tokenizer_dir, monkeypatch):
    import tokenizer as tokenizer_lib
    tok = tokenizer_lib.load_tokenizer(str(llama3_tokenizer_dir))
    examples = [{"question": f"What is {i} plus {i}?" + " Think." * i, "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"}
                for i in range(7)] + [{"src": "Two and two?", "tgt": "#### 4"}]
    # A scripted "model": answer right for even i, wrong for odd; checks batching, length sorting and bookkeeping.
    scripted = {tuple(gen.build_prompt(tok, ex.get("question", ex.get("src")), chat=False)): ex for ex in examples}

    def fake_generate(model, prompts, max_new_tokens, stop_ids, vocab_size=None, sync_ranks=False, compile=False):
        assert len(prompts) <= 3 and stop_ids == tok.stop_ids and not sync_ranks and compile == compiled
        sizes.append(len(prompts))
        outs = []
        for p in prompts:
            gold = extract_answer(scripted[tuple(p)].get("answer", scripted[tuple(p)].get("tgt")))
            outs.append(tok.encode(f"so #### {gold if int(gold) % 4 == 0 else 'none'}"))
        return outs

    monkeypatch.setattr(gen, "generate", fake_generate)
    model = tiny_model(vocab_size=tok.vocab_size)  # every id the tokenizer gives must fit (check_token_ids)
    model.train()
    compiled, sizes = True, []
    assert gen.evaluate_gsm8k(model, tok, examples, False, batch_size=3, limit=2, compile=True)["total"] == 2
    assert sizes == [2]  # one batch: nothing to top up
    compiled = False
    res = gen.evaluate_gsm8k(model, tok, examples, chat=False, batch_size=3, max_new_tokens=8)
    assert model.training  # restored
    assert (res["correct"], res["total"]) == (5, 8) and res["accuracy"] == 5 / 8  # i = 0, 2, 4, 6 and the 4
    assert [p["index"] for p in res["predictions"]] == list(range(8))
    assert [p["correct"] for p in res["predictions"]] == [True, False] * 3 + [True, True]
    assert res["predictions"][1]["prediction"] is None and res["predictions"][1]["gold"] == "2"
    assert gen.evaluate_gsm8k(model, tok, examples, False, batch_size=3, limit=2)["total"] == 2
    compiled, sizes[:] = True, []
    res_c = gen.evaluate_gsm8k(model, tok, examples, chat=False, batch_size=3, max_new_tokens=8, compile=True)
    assert sizes == [3, 3, 3] and res_c == res  # the last batch (2) topped up to the compiled graph's batch size


def test_evaluate_gsm8k_with_a_real_model_matches_generate(llama3_tokenizer_dir):
    import tokenizer as tokenizer_lib
    tok = tokenizer_lib.load_tokenizer(str(llama3_tokenizer_dir))
    model = tiny_model(vocab_size=tok.vocab_size + 3, max_seq_len=128)  # a padded vocabulary, as presets have
    examples = [{"question": "One" + " more" * i, "answer": "#### 1"} for i in range(5)]
    res = gen.evaluate_gsm8k(model, tok, examples, chat=True, batch_size=2, max_new_tokens=6)
    for ex, pred in zip(examples, res["predictions"]):
        [ids] = gen.generate(model, [gen.build_prompt(tok, ex["question"], True)], 6, tok.stop_ids,
                             vocab_size=tok.vocab_size)
        assert pred["completion"] == tok.decode(ids)


def test_evaluate_gsm8k_skips_long_prompts_and_missing_gold():
    """An example whose prompt leaves no room for a new token, or whose answer has no '#### N', is skipped and
    counted, not an error that ends the evaluation (and train.py's run) nor a wrong answer; accuracy is over the
    rest, which decode exactly as they would alone."""
    model, tok, examples = fsdp_case()  # max_seq_len 64; a prompt is bos + one id per byte
    examples = examples[:2] + [{"question": "a" * 63, "answer": "#### 1"},  # 64 tokens: no room
                               {"question": "b" * 62, "answer": "#### 1"},  # 63 tokens: room for one
                               {"question": "What is 1 + 1?", "answer": "no hashes here"}]
    res = gen.evaluate_gsm8k(model, tok, examples, False, batch_size=2, max_new_tokens=12)
    assert res["skipped"] == {"no_gold": 1, "empty_prompt": 0, "prompt_too_long": 1} and res["total"] == 3
    assert [p["skipped"] for p in res["predictions"]] == [None, None, "prompt_too_long", None, "no_gold"]
    assert res["predictions"][2]["correct"] is None and res["predictions"][4]["gold"] is None
    alone = gen.evaluate_gsm8k(model, tok, [examples[i] for i in (0, 1, 3)], False, batch_size=2, max_new_tokens=12)
    assert [p["completion"] for p in alone["predictions"]] == [res["predictions"][i]["completion"] for i in (0, 1, 3)]
    assert len(res["predictions"][3]["completion"].split()) == 1  # the 63-token prompt got its one token
    lines = gen.summary_lines(res)
    assert lines[0] == ("skipped 2 of 5 examples: 1 no_gold (answer without '#### N'), 1 prompt_too_long (no room "
                        "for one new token within the model's max_seq_len)")
    assert lines[-1].startswith(f"accuracy: {res['accuracy']:.4f} ({res['correct']}/3 evaluated; flexible-extract")
    none = gen.evaluate_gsm8k(model, tok, examples[4:], False)
    assert none["total"] == 0 and none["accuracy"] != none["accuracy"]  # NaN: nothing was evaluated


def test_token_ids_must_fit_the_model():
    """A tokenizer of another model: a one-line error before the forward would fail with an IndexError."""
    model, tok, examples = fsdp_case()
    small = tiny_model(vocab_size=90)  # ByteTok's bos id (96) does not fit
    with pytest.raises(ValueError, match=r"token id 96 \(a prompt\) does not fit the model's vocab_size=90: the "
                                         r"tokenizer \(97 ids\) does not belong to this model"):
        gen.evaluate_gsm8k(small, tok, examples, False)
    gen.check_token_ids(model, tok, [[96, 5]])
    with pytest.raises(ValueError, match=r"token id 86 \(a stop id\)"):
        gen.check_token_ids(tiny_model(vocab_size=80), tok, [[5]])


FSDP_SCRIPT = textwrap.dedent("""
    import gc, json, os, sys, torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2])
    import generate as gen, test_generate as t
    dist.init_process_group("gloo")
    model, tok, examples = t.fsdp_case()
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    res = gen.evaluate_gsm8k(model, tok, examples, chat=False, batch_size=2, max_new_tokens=12)
    # one write() per line: the two ranks share the pipe, and print() may split text and newline into two writes
    sys.stdout.write(f"RESULT{dist.get_rank()} " + json.dumps([p["completion"] for p in res["predictions"]]) + "\\n")
    sys.stdout.flush()
    # FSDP2 + gloo on CPU (torch 2.13): about 1 exit in 10 aborts ("terminate called without an active exception")
    # in destructors at interpreter exit, after destroy_process_group has returned on both ranks. Free the FSDP
    # state while the group lives, and leave without running exit-time destructors.
    del model
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)
""")


class ByteTok:
    """A stand-in tokenizer: one id per byte, stop ids chosen so that completions end at different steps."""
    vocab_size, bos_id, stop_ids = 97, 96, [62, 86, 40]

    def encode(self, text, bos=False, eos=False):
        assert not eos, "evaluation prompts of source_encode_mode 'prompt' have no eos"
        return [self.bos_id] * bos + [b % 96 for b in text.encode()]

    def decode(self, ids):
        return " ".join(map(str, ids))


def fsdp_case():
    # with tiny_model() and these stop ids the greedy completions have 5, 4, 3, 2 and 11 tokens
    questions = ["q", "hello", "xyz!", "12", "zz top"]
    return tiny_model(), ByteTok(), [{"question": q, "answer": "#### 1"} for q in questions]


def test_evaluate_gsm8k_under_fsdp2_on_two_ranks(tmp_path):
    """5 examples, batches of 2 -> 3 batches over 2 ranks (rank 1 decodes a filler that stops long before rank 0's
    last batch does); completions stop at different steps on each rank. A mismatch in forward calls between ranks
    hangs FSDP (hence the timeout)."""
    model, tok, examples = fsdp_case()
    expected = [p["completion"] for p in gen.evaluate_gsm8k(model, tok, examples, False, 2, 12)["predictions"]]
    assert sorted(len(c.split()) for c in expected) == [2, 3, 4, 5, 11]  # the stops really differ
    script = tmp_path / "fsdp_eval.py"
    script.write_text(FSDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(ROOT), str(ROOT / "tests")], capture_output=True, text=True,
                          timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for rank in (0, 1):  # every rank returns the global result
        [line] = [ln for ln in proc.stdout.splitlines() if ln.startswith(f"RESULT{rank} ")]
        assert json.loads(line.split(" ", 1)[1]) == expected


def test_cli(llama3_tokenizer_dir, qwen3_tokenizer_dir, tmp_path, capsys, monkeypatch):
    import tokenizer as tokenizer_lib
    model_dir = hf_dir_with_tokenizer(tmp_path, llama3_tokenizer_dir, vocab_size=128256, max_seq_len=48)
    tok = tokenizer_lib.load_tokenizer(str(model_dir))
    model = model_lib.load_hf(model_dir)

    assert gen.main([str(model_dir), "--prompt", "Hello there", "--max-new-tokens", "5"]) == 0
    [ids] = gen.generate(model, [gen.build_prompt(tok, "Hello there", False)], 5, tok.stop_ids,
                         vocab_size=tok.vocab_size)
    assert capsys.readouterr().out == tok.decode(ids) + "\n"  # only the completion

    assert gen.main([str(model_dir), "--chat", "--system", "S", "--prompt", "Hi", "--max-new-tokens", "3",
                     "--temperature", "0.8", "--top-p", "0.9", "--seed", "1"]) == 0
    capsys.readouterr()

    data_file = tmp_path / "gsm.jsonl"
    data_file.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": f"#### {i}"}) + "\n" for i in range(3)))
    pred_file = tmp_path / "pred.jsonl"
    assert gen.main([str(model_dir), "--gsm8k", str(data_file), "--limit", "2", "--batch-size", "2",
                     "--max-new-tokens", "4", "--output", str(pred_file)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"accuracy: \d\.\d{4} \(\d/2 evaluated; flexible-extract: .*\)", last), last
    preds = [json.loads(line) for line in open(pred_file)]
    assert [p["gold"] for p in preds] == ["0", "1"] and {"prediction", "completion", "correct"} <= preds[0].keys()

    # a training output directory resolves to its HF export
    assert gen.resolve_model_dir(tmp_path) == model_dir

    # bad input: one clear line, exit code != 0
    assert gen.main([str(model_dir), "--prompt", "word " * 60]) == 1
    err = capsys.readouterr().err
    assert "max_seq_len=48" in err and err.count("\n") == 1
    assert gen.main([str(tmp_path / "nope"), "--prompt", "x"]) == 1
    assert "model directory not found" in capsys.readouterr().err
    assert gen.main([str(model_dir), "--gsm8k", str(tmp_path / "missing.jsonl")]) == 1
    assert "GSM8K file not found" in capsys.readouterr().err
    assert gen.main([str(model_dir), "--gsm8k", str(tmp_path)]) == 1
    assert f"GSM8K path {tmp_path} is a directory; a .jsonl file is expected" in capsys.readouterr().err
    no_gold = tmp_path / "no_gold.jsonl"
    no_gold.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "no hashes here"}) + "\n")
    assert gen.main([str(model_dir), "--gsm8k", str(no_gold)]) == 1
    out, err = capsys.readouterr()
    assert "skipped 1 of 1 examples: 1 no_gold" in out and err.count("\n") == 1
    assert "none of the 1 GSM8K examples could be evaluated" in err
    # a tokenizer of another model (Qwen3's stop ids are past this Llama-sized vocabulary): one line, no IndexError
    assert gen.main([str(model_dir), "--prompt", "What is 1 + 2?", "--tokenizer", str(qwen3_tokenizer_dir)]) == 1
    err = capsys.readouterr().err
    assert "does not fit the model's vocab_size=128256" in err and "does not belong to this model" in err
    assert err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        gen.main([str(model_dir), "--prompt", "x", "--bogus"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        gen.main([str(model_dir)])  # neither --prompt nor --gsm8k
    gsm = ["--gsm8k", str(data_file)]
    for bad, msg in [(["--prompt", "x", "--batch-size", "0"], "must be >= 1"),
                     (["--prompt", "x", "--device", "cuda"], "sees no CUDA GPU"),
                     ([*gsm, "--limit", "-1"], "must be >= 1"),
                     ([*gsm, "--temperature", "0.7", "--seed", "3"],
                      "--temperature does not apply to --gsm8k (greedy evaluation); --seed does not apply to --gsm8k"),
                     (["--prompt", "x", "--output", "p.jsonl"], "--output does not apply to --prompt"),
                     (["--prompt", "x", "--top-p", "0.9"], "--top-p does not apply to greedy decoding (--temperature 0)")]:
        if "--device" in bad and torch.cuda.is_available():
            continue
        with pytest.raises(SystemExit):
            gen.main([str(model_dir), *bad])
        assert msg in capsys.readouterr().err
    assert gen.main([str(model_dir), "--prompt", "x", "--temperature", "1", "--top-k", "-1"]) == 1
    assert "top_k >= 0" in capsys.readouterr().err

    # --compile reaches generate (test_compiled_decode_equals_eager_and_compiles_once tests what it does)
    seen = []
    monkeypatch.setattr(gen, "generate", lambda *a, compile=False, **kw: seen.append(compile) or [[] for _ in a[1]])
    assert gen.main([str(model_dir), "--prompt", "Hi", "--compile"]) == 0
    assert gen.main([str(model_dir), "--gsm8k", str(data_file), "--limit", "1", "--compile"]) == 0
    assert gen.main([str(model_dir), "--prompt", "Hi"]) == 0
    assert seen == [True, True, False]


def test_hub_model_paths(llama3_tokenizer_dir, tmp_path, capsys, monkeypatch):
    """hg://org/name for MODEL and --tokenizer goes through data.py's Hub resolver (train.py's, for model.path);
    without huggingface_hub that is a one-line error naming what to install, not 'hg:/...' not found."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    model = tiny_model()
    model_lib.save_hf(model, model.args, tmp_path / "snap")
    snapshots, calls = {"org/name": tmp_path / "snap", "org/tok": llama3_tokenizer_dir}, {}
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda **kw: calls.update({kw["repo_id"]: kw}) or str(snapshots[kw["repo_id"]]))
    assert gen.resolve_model_dir("hg://org/name") == tmp_path / "snap" and calls["org/name"]["repo_type"] == "model"
    with pytest.raises(FileNotFoundError, match="has no tokenizer files"):  # resolved, then loaded like a directory
        gen.load_model("hg://org/name")
    loaded, tok = gen.load_model("hg://org/name", tokenizer_path="hg://org/tok")
    assert tok.files and "*.safetensors" not in calls["org/tok"]["allow_patterns"]  # a tokenizer: its small files
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails: not installed
    assert gen.main(["hg://meta-llama/Llama-3.2-1B", "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert err == ("generate.py: error: MODEL hg://meta-llama/Llama-3.2-1B needs huggingface_hub: "
                   "pip install huggingface_hub\n")


def test_cli_prompts_follow_the_run_and_bad_options_fail_first(tmp_path, qwen3_tokenizer_dir, monkeypatch, capsys):
    """A run trained in chat mode is prompted in chat mode (as train.py's evaluation does) unless --no-chat; several
    --prompt are one batch; --no-thinking is Qwen3's non-thinking prompt; non-finite sampling values, an unknown
    device and an --output directory are errors before anything runs."""
    import torch.distributed.checkpoint as dcp
    from dataclasses import asdict
    model = tiny_model(vocab_size=261 + 3, tie_embeddings=True)
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(ckpt))
    run_cfg = {"tokenizer": {"path": "byte", "chat_format": ""}, "model": {"name": "demo", "path": ""},
               "dataset": {"chat_mode": True, "source_encode_mode": "prompt"}}
    torch.save({"step": 2, "model_args": asdict(model.args), "config": run_cfg}, ckpt / "trainer_state.pt")
    seen = []

    def fake_generate(model, prompts, *a, **kw):
        seen.append(prompts)
        return [[72, 105]] * len(prompts)
    monkeypatch.setattr(gen, "generate", fake_generate)
    tok = gen.tokenizer_lib.load_tokenizer("byte")
    chat = lambda q: gen.build_prompt(tok, q, chat=True)  # noqa: E731
    assert gen.main([str(ckpt), "--prompt", "a", "--prompt", "b"]) == 0
    out, err = capsys.readouterr()
    assert seen[-1] == [chat("a"), chat("b")] and out == "--- 0: Hi\n--- 1: Hi\n"
    assert "note: --chat, as the run trained (its dataset.chat_mode=true" in err
    assert gen.main([str(ckpt), "--prompt", "a", "--no-chat"]) == 0
    assert seen[-1] == [gen.build_prompt(tok, "a", chat=False)] and capsys.readouterr().out == "Hi\n"
    qwen = gen.tokenizer_lib.load_tokenizer(qwen3_tokenizer_dir)
    ids = gen.build_prompt(qwen, "q", chat=True, chat_kwargs={"enable_thinking": False})
    assert qwen.decode(ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    for bad, msg in ((["--temperature", "nan"], "must be finite"), (["--device", "bogus"], "--device bogus: this torch"),
                     (["--gsm8k", "x.jsonl", "--output", str(tmp_path)], "is a directory")):
        with pytest.raises(SystemExit):
            gen.main([str(ckpt), *(["--prompt", "a"] if "--gsm8k" not in bad else []), *bad])
        assert msg in capsys.readouterr().err


def test_load_training_outputs(tmp_path):
    """A train.py checkpoint (DCP + trainer_state.pt), and a run directory whose newest output is picked; the byte
    tokenizer (which has no files) comes from the run's config."""
    import torch.distributed.checkpoint as dcp
    import yaml
    from dataclasses import asdict
    model = tiny_model(vocab_size=261 + 3, tie_embeddings=True)
    run_cfg = {"tokenizer": {"path": "byte", "chat_format": ""}, "model": {"name": "demo", "path": ""}}
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(ckpt))
    torch.save({"step": 2, "model_args": asdict(model.args), "config": run_cfg}, ckpt / "trainer_state.pt")
    (tmp_path / "run" / "checkpoints" / "step_00000003.tmp").mkdir()  # an unfinished write is never picked
    prompt = [256, 72, 105]  # <|bos|> "Hi"
    expected = gen.generate(model, [prompt], 8, stop_ids=[])
    for path in (ckpt, tmp_path / "run"):
        loaded, tok = gen.load_model(path)
        assert gen.resolve_model_dir(path) == ckpt and tok.vocab_size == 261 and tok.chat_format == "chatml"
        assert gen.generate(loaded, [prompt], 8, stop_ids=[]) == expected
    # an HF export written after the checkpoint wins; its tokenizer comes from the run's config.yaml
    model_lib.save_hf(model, model.args, tmp_path / "run" / "hf")
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(run_cfg))
    loaded, tok = gen.load_model(tmp_path / "run")
    assert gen.resolve_model_dir(tmp_path / "run") == tmp_path / "run" / "hf" and tok.vocab_size == 261
    assert gen.generate(loaded, [prompt], 8, stop_ids=[]) == expected
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        gen.resolve_model_dir(tmp_path / "run" / "checkpoints" / "step_00000003.tmp")
    # any export inside the run directory (train.py --export RUN/checkpoints/step_N RUN/hf_step2) finds its config
    model_lib.save_hf(model, model.args, tmp_path / "run" / "hf_step2")
    assert gen.load_model(tmp_path / "run" / "hf_step2")[1].vocab_size == 261
    # a YAML beside an HF directory outside a train.py output directory, or not a run config, is not read as one
    for sub, text, run_dir in [("other/model", yaml.safe_dump(run_cfg), False), ("notes/hf", "- just\n- a list\n", True),
                               ("misc/hf", "foo: 1\n", True)]:
        model_lib.save_hf(model, model.args, tmp_path / sub)
        (tmp_path / sub).parent.joinpath("config.yaml").write_text(text)
        if run_dir:
            (tmp_path / sub).parent.joinpath("metrics.jsonl").write_text("")
        with pytest.raises(FileNotFoundError, match="has no tokenizer files"):
            gen.load_model(tmp_path / sub)


def test_cli_subprocess_missing_model(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "generate.py"), str(tmp_path / "nope"), "--prompt", "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "model directory not found" in proc.stderr
