"""data.py: formats, masks, sources (file, dir, hg://, parquet), length rules, the three batching modes, packing
isolation through the model, distributed striding, resume, weighted mixing of dataset.sources, bad input, the cache,
the demo data and the report.

    python3 -m pytest -q -x tests/test_data.py
"""
import dataclasses
import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from data import DatasetConfig, build_loader, plan_epoch
from tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("byte")


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def qa_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        a, b = int(rng.integers(0, 10 ** int(rng.integers(1, 5)))), int(rng.integers(0, 1000))
        rows.append({"src": f"Q{i}: {a}+{b}=" + "x" * int(rng.integers(0, 40)), "tgt": f"{a + b} ({i})"})
    return rows


def cfg_for(tmp_path, path, **kw):
    kw.setdefault("num_prefetch", 0)
    return DatasetConfig(path=str(path), cache_dir=str(tmp_path / "cache"), **kw)


def mixed_cfg(tmp_path, sources, **kw):
    kw.setdefault("num_prefetch", 0)
    return DatasetConfig(sources=sources, cache_dir=str(tmp_path / "cache"), **kw)


def dataset_cfg(kind, tmp_path, qa_dir, **kw):
    """qa_dir as dataset.path, or as dataset.sources mixed with a second source (weights 1.5 and 0.5)."""
    if kind == "path":
        return cfg_for(tmp_path, qa_dir, **kw)
    other = write_jsonl(tmp_path / "other" / "train.jsonl", qa_rows(61, seed=2))
    return mixed_cfg(tmp_path, [{"path": str(qa_dir), "weight": 1.5}, {"path": other, "weight": 0.5}], **kw)


def tagged_rows(tag, n, src="src", tgt="tgt"):
    """Examples whose prompt starts with [<tag><i>], so a batch's text tells which source and example it holds."""
    return [{src: f"[{tag}{i}] " + "x" * (i % 7), tgt: f"#### {i}"} for i in range(n)]


def tags_of(batches, tok):
    return Counter(t for b in batches for row in b.tokens.tolist() for t in re.findall(r"\[(\w\d+)\]", tok.decode(row)))


def one_epoch(loader):
    return [next(loader) for _ in range(loader.batches_per_epoch)]


def example_of(loader, i):
    ids, mask = loader.data.example(i)
    return ids.tolist(), mask.tolist()


# ------------------------------------------------------------------------------------------------ formats and masks

def test_src_tgt_prefix_property_and_mask(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", [{"src": "What is 2+3?", "tgt": "5"}])
    loader = build_loader(cfg_for(tmp_path, f, batch_size=1, packing=False), tok, "train")
    ids, mask = example_of(loader, 0)
    src, tgt = tok.encode("What is 2+3?", bos=True), tok.encode("5", eos=True)
    assert ids == src + tgt and ids[0] == tok.bos_id and ids[-1] == tok.eos_id  # prefix property, bos + ... + eos
    assert mask == [0] * len(src) + [1] * len(tgt)
    b = next(loader)
    # tokens = ids[:-1]; labels = ids[1:] where supervised: the target and its eos are trained, the prompt is not
    assert b.tokens[0].tolist() == ids[:-1]
    assert b.labels[0].tolist() == [-100] * (len(src) - 1) + tgt
    assert (b.num_tokens, b.num_label_tokens) == (len(ids) - 1, len(tgt))
    assert b.doc_ids is None and b.positions[0].tolist() == list(range(len(ids) - 1))


@pytest.mark.parametrize("s_mode,t_mode", [("as_is", "as_is"), ("prompt_response", "prompt"), ("prompt", "as_is")])
def test_encode_modes(tmp_path, tok, s_mode, t_mode):
    f = write_jsonl(tmp_path / "d.jsonl", [{"src": "ab", "tgt": "cd"}])
    cfg = cfg_for(tmp_path, f, source_encode_mode=s_mode, target_encode_mode=t_mode, train_on_prompt=True)
    ids, mask = example_of(build_loader(cfg, tok, "train"), 0)
    enc = lambda text, mode: tok.encode(text, bos=mode == "prompt", eos=mode == "prompt_response")
    assert ids == enc("ab", s_mode) + enc("cd", t_mode)
    assert mask == [1] * len(ids)  # train_on_prompt: the prompt is supervised too


def test_custom_fields_gsm8k(tmp_path, tok, gsm8k_dir):
    with open(gsm8k_dir / "train.jsonl") as f:
        rows = [json.loads(next(f)) for _ in range(20)]
    path = write_jsonl(tmp_path / "gsm" / "train.jsonl", rows)
    loader = build_loader(cfg_for(tmp_path, path, src_field="question", tgt_field="answer"), tok, "train")
    assert len(loader.data) == 20
    ids, mask = example_of(loader, 3)
    q = tok.encode(rows[3]["question"], bos=True)
    assert ids == q + tok.encode(rows[3]["answer"], eos=True) and sum(mask) == len(ids) - len(q)


@pytest.mark.parametrize("key", ["messages", "chat", "conversation"])
def test_chat_formats(tmp_path, tok, key):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    f = write_jsonl(tmp_path / "d.jsonl", [{key: conv}])
    cfg = cfg_for(tmp_path, f, messages_field="conversation" if key == "conversation" else "messages")
    ids, mask = example_of(build_loader(cfg, tok, "train"), 0)
    assert (ids, mask) == tuple(map(list, tok.render_chat(conv, train_on="assistant")))
    supervised = tok.decode([i for i, m in zip(ids, mask) if m])
    assert supervised == "Hello<|im_end|>4<|im_end|>"  # both assistant turns and their end-of-turn, nothing else
    cfg = dataclasses.replace(cfg, train_on="last_assistant")
    ids, mask = example_of(build_loader(cfg, tok, "train"), 0)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "4<|im_end|>"


def test_null_messages_field_is_absent(tmp_path, tok):
    """Parquet fills a column a row lacks with null: a src/tgt row beside chat rows must stay a src/tgt example."""
    path = write_jsonl(tmp_path / "m" / "train.jsonl", [{"src": "a", "tgt": "b", "messages": None},
                                                         {"messages": [{"role": "user", "content": "x"},
                                                                       {"role": "assistant", "content": "y"}]}])
    loader = build_loader(cfg_for(tmp_path, path), tok, "train")
    assert len(loader.data) == 2 and loader.data.meta["drops"] == {}
    assert example_of(loader, 0)[0] == tok.encode("a", bos=True) + tok.encode("b", eos=True)


def test_chat_mode_wraps_src_tgt(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", [{"src": "2+2?", "tgt": "4"}])
    ids, mask = example_of(build_loader(cfg_for(tmp_path, f, chat_mode=True), tok, "train"), 0)
    expect = tok.render_chat([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}])
    assert (ids, mask) == tuple(map(list, expect))
    assert ids[-2:] == [tok.eot_id, ord("\n")] and mask[-2] == 1  # end-of-turn trained


def test_real_tokenizers_masks(tmp_path, llama3_tokenizer_dir, qwen3_tokenizer_dir):
    rows = [{"src": "What is 7*6?", "tgt": "7*6 = 42\n#### 42"}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    for d in (llama3_tokenizer_dir, qwen3_tokenizer_dir):
        t = load_tokenizer(str(d))
        ids, mask = example_of(build_loader(cfg_for(tmp_path, f), t, "train"), 0)
        src = t.encode(rows[0]["src"], bos=True)
        assert ids == src + t.encode(rows[0]["tgt"], eos=True) and ids[-1] == t.eos_id and mask[-1] == 1
        assert ids.count(t.bos_id) == (1 if t.bos_id is not None else 0)  # Llama 3: exactly one <|begin_of_text|>
        ids, mask = example_of(build_loader(cfg_for(tmp_path, f, chat_mode=True), t, "train"), 0)
        last_sup = max(i for i, m in enumerate(mask) if m)
        assert ids[last_sup] == t.eot_id  # <|eot_id|> / <|im_end|> inside the labels
        assert "7*6 = 42\n#### 42" in t.decode([i for i, m in zip(ids, mask) if m])


def test_tool_records_real_tokenizers(tmp_path, llama3_tokenizer_dir, qwen3_tokenizer_dir):
    """A record's "tools" and tool messages reach render_chat; tool calls are trained, tool responses are not."""
    tools = [{"type": "function", "function": {"name": "add", "description": "Summe",
                                               "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}]
    conv = [{"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                                                                 "function": {"name": "add", "arguments": {"a": 1}}}]},
            {"role": "tool", "content": "2"}, {"role": "assistant", "content": "2"}]
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": conv, "tools": tools}])
    for d in (llama3_tokenizer_dir, qwen3_tokenizer_dir):
        t = load_tokenizer(str(d))
        ids, mask = example_of(build_loader(cfg_for(tmp_path, f), t, "train"), 0)
        assert (ids, mask) == tuple(map(list, t.render_chat(conv, tools=tools)))
        text, sup = t.decode(ids), t.decode([i for i, m in zip(ids, mask) if m])
        assert "Summe" in text and "Summe" not in sup  # the tools are rendered, never trained
        assert '"add"' in sup and sup.count(t.decode([t.eot_id])) == 2  # the call and the answer, each with end-of-turn
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": conv}, {"messages": [{**conv[1], "tool_calls": conv[1]}]}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: render_chat: messages\[0\]\['tool_calls'\] must be a list"):
        build_loader(cfg_for(tmp_path, bad), t, "train")


# ------------------------------------------------------------------------------------------------ sources

def test_path_kinds(tmp_path, tok):
    rows = qa_rows(12)
    write_jsonl(tmp_path / "a" / "train.jsonl", rows)
    write_jsonl(tmp_path / "a" / "valid.jsonl", rows[:3])
    write_jsonl(tmp_path / "b" / "train" / "x" / "part1.jsonl", rows[:5])
    write_jsonl(tmp_path / "b" / "train" / "part0.jsonl", rows[5:])
    write_jsonl(tmp_path / "c" / "main" / "train-00000-of-00001.jsonl", rows)
    counts = {}
    for name, path, split in [("file", tmp_path / "a" / "train.jsonl", "train"), ("dir", tmp_path / "a", "train"),
                              ("dir-valid", tmp_path / "a", "valid"), ("subdir", tmp_path / "b", "train"),
                              ("hub-layout", tmp_path / "c", "train")]:
        counts[name] = len(build_loader(cfg_for(tmp_path, path), tok, split).data)
    assert counts == {"file": 12, "dir": 12, "dir-valid": 3, "subdir": 12, "hub-layout": 12}
    with pytest.raises(FileNotFoundError, match="no data for split 'test'"):
        build_loader(cfg_for(tmp_path, tmp_path / "a"), tok, "test")
    with pytest.raises(ValueError, match="is one file"):  # a single file is no validation set
        build_loader(cfg_for(tmp_path, tmp_path / "a" / "train.jsonl", valid_split="valid"), tok, "valid")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_loader(cfg_for(tmp_path, tmp_path / "nope"), tok, "train")
    # a local directory's subdirectories are read together (shards, languages)
    write_jsonl(tmp_path / "c" / "socratic" / "train-00000-of-00001.jsonl", rows)
    assert len(build_loader(cfg_for(tmp_path, tmp_path / "c"), tok, "train").data) == 24
    # one split in two formats side by side would be read twice
    (tmp_path / "a" / "train.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match=r"split 'train' is there as .*train.jsonl and .*train.parquet; keep one"):
        build_loader(cfg_for(tmp_path, tmp_path / "a"), tok, "train")


def test_two_layouts_of_a_split_are_an_error(tmp_path, tok):
    """<split>.jsonl beside <split>/ shards or the Hub's **/<split>-*.parquet: one of them used to be read silently
    (400 of 500 examples); both would usually be one dataset twice."""
    write_jsonl(tmp_path / "d" / "train.jsonl", qa_rows(4))
    write_jsonl(tmp_path / "d" / "valid.jsonl", qa_rows(2))
    write_jsonl(tmp_path / "d" / "train" / "part-1.jsonl", qa_rows(1))
    with pytest.raises(ValueError, match=r"dataset.path .*d: split 'train' is there in 2 layouts, train.jsonl and "
                                         r"train/part-1.jsonl: keep one layout"):
        build_loader(cfg_for(tmp_path, tmp_path / "d"), tok, "train")
    shutil.rmtree(tmp_path / "d" / "train")
    (tmp_path / "d" / "data").mkdir()
    (tmp_path / "d" / "data" / "train-00000-of-00001.parquet").write_bytes(b"")  # found, never read
    with pytest.raises(ValueError, match=r"2 layouts, train.jsonl and data/train-00000-of-00001.parquet: keep one"):
        build_loader(cfg_for(tmp_path, tmp_path / "d"), tok, "train")
    assert len(build_loader(cfg_for(tmp_path, tmp_path / "d"), tok, "valid").data) == 2  # the other split: one layout
    shutil.rmtree(tmp_path / "d" / "data")
    write_jsonl(tmp_path / "d" / "train-small.jsonl", qa_rows(3))  # another dataset, not a shard (no digit after -)
    assert len(build_loader(cfg_for(tmp_path, tmp_path / "d"), tok, "train").data) == 4


def offline_hub_repo(tmp_path, monkeypatch, repo_id: str, kind: str = "datasets") -> Path:
    """The snapshot directory of `repo_id` in an offline huggingface_hub cache under tmp_path (fill it, then read it
    through hg://repo_id as if downloaded)."""
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / f"{kind}--{repo_id.replace('/', '--')}"  # huggingface_hub's cache layout
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the environment at import: patch its constants for an already imported module
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / commit


def test_hub_dataset_from_offline_cache(tmp_path, tok, monkeypatch):
    snapshot = offline_hub_repo(tmp_path, monkeypatch, "org/name")
    write_jsonl(snapshot / "main" / "train-00000-of-00001.jsonl", qa_rows(7))
    write_jsonl(snapshot / "main" / "test-00000-of-00001.jsonl", qa_rows(2))
    assert len(build_loader(cfg_for(tmp_path, "hg://org/name"), tok, "train").data) == 7
    assert len(build_loader(cfg_for(tmp_path, "hg://org/name/main"), tok, "test").data) == 2
    one_file = "hg://org/name/main/train-00000-of-00001.jsonl"  # a Hub file is the train split only, as a local one
    assert len(build_loader(cfg_for(tmp_path, one_file), tok, "train").data) == 7
    with pytest.raises(ValueError, match="is one file"):
        build_loader(cfg_for(tmp_path, one_file, valid_split="valid"), tok, "valid")
    with pytest.raises(FileNotFoundError, match="hg://org/missing: .*; HF_HUB_OFFLINE is set and the Hugging Face "
                                                "cache lacks it: unset it to download"):
        build_loader(cfg_for(tmp_path, "hg://org/missing"), tok, "train")
    with pytest.raises(ValueError, match="hg://org"):
        build_loader(cfg_for(tmp_path, "hg://org"), tok, "train")
    # a Hub dataset's configs (gsm8k: main/, socratic/) would be read together, each question twice
    write_jsonl(snapshot / "socratic" / "train-00000-of-00001.jsonl", qa_rows(7))
    with pytest.raises(ValueError, match=r"split 'train' files in 2 subdirectories \(main, socratic\), usually the "
                                         r"dataset's configs: point dataset.path at one"):
        build_loader(cfg_for(tmp_path, "hg://org/name"), tok, "train")
    assert len(build_loader(cfg_for(tmp_path, "hg://org/name/socratic"), tok, "train").data) == 7


def test_hub_unreachable_says_what_to_do(tmp_path, tok, monkeypatch):
    """No network and nothing cached: huggingface_hub raises LocalEntryNotFoundError from its connection error."""
    hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.errors import LocalEntryNotFoundError
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(**kwargs):
        try:
            raise ConnectionError("[Errno -3] Temporary failure in name resolution")
        except ConnectionError as e:
            raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub") from e
    monkeypatch.setattr(hub, "snapshot_download", unreachable)
    with pytest.raises(FileNotFoundError) as e:
        build_loader(cfg_for(tmp_path, "hg://org/name"), tok, "train")
    assert re.fullmatch(r"dataset.path hg://org/name: cannot get Hub dataset org/name \(LocalEntryNotFoundError: .*\); "
                        r"no network\? download the repo elsewhere and set dataset.path to that local directory, or "
                        r"fill the Hugging Face cache .* HF_HUB_OFFLINE=1 then reads it", str(e.value)), str(e.value)


def test_parquet(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    rows = qa_rows(9)
    os.makedirs(tmp_path / "p")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p" / "train.parquet")
    loader = build_loader(cfg_for(tmp_path, tmp_path / "p"), tok, "train")
    assert len(loader.data) == 9 and example_of(loader, 0)[0] == tok.encode(rows[0]["src"], bos=True) + tok.encode(
        rows[0]["tgt"], eos=True)


# ------------------------------------------------------------------------------------------------ length rules

def test_length_rules_counted_by_reason(tmp_path, tok, capsys):
    rows = [{"src": "q", "tgt": "a"}, {"src": "p" * 50, "tgt": "t" * 5}, {"src": "q", "tgt": "y" * 100},
            {"messages": [{"role": "user", "content": "no answer"}]}, {"src": "ok", "tgt": "fine"}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    loader = build_loader(cfg_for(tmp_path, f, min_seq_len=4, max_seq_len=40), tok, "train")
    assert loader.data.meta["drops"] == {"too_short": 1, "too_long": 2, "no_supervised": 1}
    assert loader.data.meta["num_read"] == 5 and len(loader.data) == 1
    assert "too_long" in capsys.readouterr().out  # reported at start-up

    # truncate keeps the start: the response loses its end; a prompt that fills max_seq_len alone is still dropped
    loader = build_loader(cfg_for(tmp_path, f, min_seq_len=4, max_seq_len=40, truncate=True), tok, "train")
    assert loader.data.meta["truncated"] == 1 and len(loader.data) == 2
    assert loader.data.meta["drops"] == {"too_short": 1, "too_long": 1, "no_supervised": 1}
    texts = [tok.decode(example_of(loader, i)[0]) for i in range(len(loader.data))]
    assert "<|bos|>q" + "y" * 39 in texts  # 41 ids: the prompt whole, the response cut (eos lost)
    assert data.truncate_example([1, 2, 3, 4], [0, 0, 0, 1], 3) is None  # never 0 supervised tokens

    # what is kept is a prefix of the whole rendering (a context inference also shows), trained prompt or not
    for row in ({"src": "p" * 50, "tgt": "ANSWER"},
                {"messages": [{"role": "user", "content": "p" * 50}, {"role": "assistant", "content": "ANSWER"}]}):
        f = write_jsonl(tmp_path / "p.jsonl", [row])
        for c in (cfg_for(tmp_path, f, max_seq_len=32, truncate=True, train_on_prompt=True),
                  cfg_for(tmp_path, f, max_seq_len=32, truncate=True, train_on="all"),
                  cfg_for(tmp_path, f, max_seq_len=32, truncate=True)):
            if not (c.train_on_prompt or c.train_on == "all" and "messages" in row):  # train_on is a chat option
                # the response only is trained: the prompt fills the 33 ids, nothing supervised is left: dropped, not
                # kept as an answer without its question (or a chat without its headers)
                with pytest.raises(ValueError, match=r"no usable examples \(read 1, dropped \{'too_long': 1\}"):
                    build_loader(c, tok, "train")
                continue
            ids, mask = example_of(build_loader(c, tok, "train"), 0)
            full, full_mask = data.encode_example(row, c, tok, "row")
            assert ids == full[:33] and mask == full_mask[:33] and all(mask[1:])


# ------------------------------------------------------------------------------------------------ batching

@pytest.fixture()
def qa_dir(tmp_path):
    write_jsonl(tmp_path / "qa" / "train.jsonl", qa_rows(203))
    write_jsonl(tmp_path / "qa" / "valid.jsonl", qa_rows(17, seed=1))
    return tmp_path / "qa"


MODES = {"static": dict(packing=False, batch_size=8), "dynamic": dict(packing=False, max_num_tokens=256),
         "packed": dict(packing=True, max_num_tokens=256)}


@pytest.mark.parametrize("mode", MODES)
def test_batching_modes_limits_and_counts(tmp_path, tok, qa_dir, mode):
    cfg = cfg_for(tmp_path, qa_dir, max_seq_len=64, **MODES[mode])
    loader = build_loader(cfg, tok, "train")
    lengths = loader.data.lengths
    for epoch in range(2):  # each example exactly once per epoch, whatever the mode
        plan = plan_epoch(lengths, cfg, seed=0, epoch=epoch, shuffle=True)
        seen = sorted(i for batch in plan for row in batch for i in row)
        assert seen == list(range(len(lengths)))
    batches = one_epoch(loader)
    assert sum(b.num_tokens for b in batches) == lengths.sum()
    labels = sum(int(loader.data.mask[loader.data.offsets[i] + 1:loader.data.offsets[i + 1]].sum())
                 for i in range(len(lengths)))
    assert sum(b.num_label_tokens for b in batches) == labels == loader.data.meta["num_label_tokens"]
    for b in batches:
        B, T = b.tokens.shape
        assert b.labels.shape == b.positions.shape == (B, T)
        if mode == "static":
            assert B <= 8 and T <= 64
        if mode == "dynamic":
            assert B * T <= 256
        if mode == "packed":
            assert T == 64 and B <= 256 // 64 and b.doc_ids.dtype == torch.int32
            for row in range(B):  # positions restart at 0 exactly where the document changes
                starts = (b.positions[row] == 0).nonzero().flatten().tolist()
                changes = [0] + (torch.diff(b.doc_ids[row]) != 0).nonzero().flatten().add(1).tolist()
                assert starts == changes


def test_packing_fills_rows(tmp_path, tok, qa_dir):
    # best fit: each item goes to the row it fills tightest -> [5,3] [5,3] [4,2,2], 3 full rows of 8
    rows = data.best_fit_decreasing(np.array([2, 5, 3, 4, 2, 5, 3]), np.arange(7), 8)
    assert sorted(sorted(row) for row in rows) == [[0, 3, 4], [1, 2], [5, 6]] or len(rows) == 3
    assert all(np.array([2, 5, 3, 4, 2, 5, 3])[r].sum() == 8 for r in rows)
    cfg = cfg_for(tmp_path, qa_dir, max_seq_len=256, batch_size=4)
    lengths = build_loader(cfg, tok, "train").data.lengths
    plan = plan_epoch(lengths, cfg, 0, 0, True)
    rows = [row for batch in plan for row in batch]
    assert all(lengths[row].sum() <= 256 for row in rows)
    assert len(rows) <= int(np.ceil(lengths.sum() / 256)) + 1  # nearly the lower bound
    assert data.real_token_fraction(plan, lengths, cfg) > 0.95
    loader = build_loader(cfg, tok, "train")
    b = next(loader)  # doc_len_sq (the MFU's attention term) = sum of squared document lengths, from doc_ids
    doc_key = (b.doc_ids + 1000 * torch.arange(len(b.doc_ids))[:, None])[b.tokens.ne(loader.pad_id)]  # real tokens
    sizes = torch.unique(doc_key, return_counts=True)[1]
    assert b.doc_len_sq == int((sizes ** 2).sum()) and int(sizes.sum()) == b.num_tokens


def test_packing_isolation_matches_unpacked_loss(tmp_path, tok, qa_dir):
    from model import Transformer, get_preset
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny_llama")).float()
    model.init_weights()
    packed_cfg = cfg_for(tmp_path, qa_dir, max_seq_len=128, batch_size=2)
    loader = build_loader(packed_cfg, tok, "train")
    batch = next(loader)
    rows = loader.plan(0)[0]
    assert max(len(r) for r in rows) > 1  # really packed
    with torch.no_grad():
        packed = model(batch.tokens, batch.positions, batch.doc_ids, labels=batch.labels)
        leaky = model(batch.tokens, batch.positions, None, labels=batch.labels)
        unpacked, n = torch.zeros((), dtype=torch.float64), 0
        for i in (i for row in rows for i in row):
            one = data.collate(loader.data, [[i]], tok.pad_id, None)
            unpacked += model(one.tokens, labels=one.labels).double()
            n += one.num_label_tokens
    assert n == batch.num_label_tokens
    torch.testing.assert_close(packed.double() / n, unpacked / n, atol=1e-5, rtol=0)
    assert abs(leaky.double() / n - unpacked / n) > 1e-3  # without the document mask attention leaks: detectable


# ------------------------------------------------------------------------------------------------ distributed, resume

@pytest.mark.parametrize("kind", ["path", "sources"])
def test_global_batches_strided_over_ranks(tmp_path, tok, qa_dir, kind):
    cfg = dataset_cfg(kind, tmp_path, qa_dir, max_seq_len=64, batch_size=4)
    single = build_loader(cfg, tok, "train")
    stream = [next(single) for _ in range(2 * single.batches_per_epoch + 3)]  # crosses two epoch boundaries
    ranks = [build_loader(cfg, tok, "train", rank=r, world_size=2) for r in range(2)]
    for k in range(len(stream) // 2):
        for r in range(2):
            assert torch.equal(next(ranks[r]).tokens, stream[2 * k + r].tokens)
    assert ranks[0].state_dict() == ranks[1].state_dict()
    # epochs are reshuffled; the same seed gives the same order, another seed another one
    e0, e1 = (plan_epoch(single.data.lengths, cfg, 0, e, True) for e in (0, 1))
    assert e0 != e1 and e0 == plan_epoch(single.data.lengths, cfg, 0, 0, True)
    assert e0 != plan_epoch(single.data.lengths, cfg, 1, 0, True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("kind", ["path", "sources"])
def test_resume_identical_batches(tmp_path, tok, qa_dir, mode, world, kind):
    cfg = dataset_cfg(kind, tmp_path, qa_dir, max_seq_len=64, num_prefetch=2, **MODES[mode])
    k = 7
    for r in range(world):
        ref = build_loader(cfg, tok, "train", rank=r, world_size=world, seed=3)
        expect = [next(ref) for _ in range(k + ref.batches_per_epoch)]
        run = build_loader(cfg, tok, "train", rank=r, world_size=world, seed=3)
        for _ in range(k):
            next(run)
        state = run.state_dict()
        fresh = build_loader(cfg, tok, "train", rank=r, world_size=world, seed=3)
        fresh.load_state_dict(state)
        for b, e in zip((next(fresh) for _ in range(ref.batches_per_epoch)), expect[k:]):
            assert torch.equal(b.tokens, e.tokens) and torch.equal(b.labels, e.labels)
            assert b.doc_ids is None and e.doc_ids is None or torch.equal(b.doc_ids, e.doc_ids)
        ref.close(), run.close(), fresh.close()


def test_resume_refuses_changed_batching_options(tmp_path, tok, qa_dir):
    """The same batch count can hide other batches (shuffle off, another max_num_tokens): the rest of the epoch
    would repeat and skip examples."""
    run = build_loader(cfg_for(tmp_path, qa_dir, max_seq_len=64, batch_size=4), tok, "train")
    next(run)
    state = run.state_dict()
    other = build_loader(cfg_for(tmp_path, qa_dir, max_seq_len=64, batch_size=4, shuffle=False), tok, "train")
    assert other.batches_per_epoch == run.batches_per_epoch
    with pytest.raises(ValueError, match=r"the batching options changed since the checkpoint \(dataset.shuffle: "
                                         r"True -> False\)"):
        other.load_state_dict(state)
    del state["batching"]  # a checkpoint from before the options were stored: still accepted
    build_loader(cfg_for(tmp_path, qa_dir, max_seq_len=64, batch_size=4), tok, "train").load_state_dict(state)


def test_resume_after_the_data_changed_says_what_to_do(tmp_path, tok, qa_dir):
    run = build_loader(cfg_for(tmp_path, qa_dir, max_seq_len=64, batch_size=4), tok, "train")
    state = run.state_dict()
    write_jsonl(qa_dir / "train.jsonl", qa_rows(207))
    other = build_loader(cfg_for(tmp_path, qa_dir, max_seq_len=64, batch_size=4), tok, "train")
    with pytest.raises(ValueError, match=r"does not match this loader .*changed since the checkpoint; restore them to "
                                         r"resume, or start a new run in another checkpoint.dir \(to go on from the "
                                         r"trained weights: python train.py --export .*model.path=OUT\)"):
        other.load_state_dict(state)


def test_resume_at_another_world_size_continues_global_stream(tmp_path, tok, qa_dir):
    cfg = cfg_for(tmp_path, qa_dir, max_seq_len=64, batch_size=4)
    single = build_loader(cfg, tok, "train")
    stream = [next(single) for _ in range(20)]
    two = [build_loader(cfg, tok, "train", rank=r, world_size=2) for r in range(2)]
    for _ in range(3):  # 3 steps at 2 ranks = global batches 0..5
        for ld in two:
            next(ld)
    state = two[0].state_dict()
    resumed = build_loader(cfg, tok, "train")  # 1 rank continues at global batch 6
    resumed.load_state_dict(state)
    for g in range(6, 20):
        assert torch.equal(next(resumed).tokens, stream[g].tokens)
    other = dataclasses.replace(cfg, batch_size=5)
    with pytest.raises(ValueError, match="batching options changed"):
        build_loader(other, tok, "train").load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        build_loader(cfg, tok, "train", seed=1).load_state_dict(state)


def test_validation_one_pass_with_fillers(tmp_path, tok, qa_dir):
    cfg = cfg_for(tmp_path, qa_dir, valid_split="valid", max_seq_len=64, batch_size=3, packing=False)
    loaders = [build_loader(cfg, tok, "valid", rank=r, world_size=4, infinite=False) for r in range(4)]
    n = loaders[0].batches_per_epoch  # 17 examples / 3 = 6 global batches -> 2 per rank, 2 fillers
    out = [list(ld) for ld in loaders]
    assert n == 6 and [len(o) for o in out] == [2, 2, 2, 2]
    real = [b for o in out for b in o if b.num_label_tokens > 0]
    assert len(real) == n and sum(b.num_tokens for b in real) == loaders[0].data.lengths.sum()
    assert all((b.labels == -100).all() for o in out for b in o if b.num_label_tokens == 0)
    assert len(list(loaders[0])) == 2  # a second pass restarts


def test_prefetch_errors_surface(tmp_path, tok, qa_dir, monkeypatch):
    loader = build_loader(cfg_for(tmp_path, qa_dir, num_prefetch=2, max_seq_len=64), tok, "train")

    def boom(*a, **k):
        raise RuntimeError("collate failed")
    monkeypatch.setattr(data, "collate", boom)
    with pytest.raises(RuntimeError, match="collate failed"):
        next(loader)


# ------------------------------------------------------------------------------------------------ mixing

def test_mix_weights_give_exact_counts_every_epoch(tmp_path, tok, capsys):
    weights = {"a": 1, "b": 2, "c": 0.5, "d": 2.5}
    sources = [{"path": write_jsonl(tmp_path / f"{t}.jsonl", tagged_rows(t, 10)), "weight": w}
               for t, w in weights.items()]
    cfg = mixed_cfg(tmp_path, sources, max_seq_len=64, batch_size=2, train_on_prompt=True)  # mask[0] is 1 too
    loader = build_loader(cfg, tok, "train")
    assert "source c: 10 examples kept x weight 0.5 = 5 per epoch" in capsys.readouterr().out
    assert len(loader.data) == 10 + 20 + 5 + 25
    epochs = [one_epoch(loader) for _ in range(2)]
    tags = [tags_of(e, tok) for e in epochs]
    assert tags[0] == tags[1]  # the same multiset every epoch: the fractions are drawn once per run
    assert [b.tokens.tolist() for b in epochs[0]] != [b.tokens.tolist() for b in epochs[1]]  # but reshuffled
    times = {t: Counter(k for tag, k in tags[0].items() if tag[0] == t) for t in weights}  # times seen -> examples
    assert times == {"a": {1: 10}, "b": {2: 10}, "c": {1: 5}, "d": {2: 5, 3: 5}}
    assert sum(b.num_label_tokens for b in epochs[0]) == loader.data.meta["num_label_tokens"]


def test_mix_selection_depends_on_seed_only(tmp_path, tok):
    sources = [{"path": write_jsonl(tmp_path / "a.jsonl", tagged_rows("a", 40)), "weight": 0.5},
               {"path": write_jsonl(tmp_path / "b.jsonl", tagged_rows("b", 40)), "weight": 1.5}]
    cfg = mixed_cfg(tmp_path, sources, max_seq_len=64)

    def picked(**kw):
        d = build_loader(cfg, tok, "train", **kw).data
        return sorted(tok.decode(d.example(i)[0].tolist()) for i in range(len(d)))
    ref = picked(seed=5)
    assert len(ref) == 20 + 60
    assert picked(seed=5, rank=1, world_size=2) == ref and picked(seed=5) == ref  # every rank, every construction
    assert picked(seed=6) != ref


def test_mix_resume_refuses_changed_weights(tmp_path, tok):
    """A checkpoint's loader state names its epoch size: resuming after a weight change is an error, not a silent
    continuation on another mixture (here the batch count per epoch happens to stay the same)."""
    a = write_jsonl(tmp_path / "a.jsonl", tagged_rows("a", 40))
    old = build_loader(mixed_cfg(tmp_path, [{"path": a, "weight": 1.0}], batch_size=64, packing=False), tok, "train")
    new = build_loader(mixed_cfg(tmp_path, [{"path": a, "weight": 1.5}], batch_size=64, packing=False), tok, "train")
    assert old.batches_per_epoch == new.batches_per_epoch == 1
    new.load_state_dict(new.state_dict())
    with pytest.raises(ValueError, match="40 examples per epoch.*60 examples.*weights"):
        new.load_state_dict(old.state_dict())
    # weights swapped between two sources of the same size: same totals, another mixture
    b = write_jsonl(tmp_path / "b.jsonl", tagged_rows("b", 40))
    ab = build_loader(mixed_cfg(tmp_path, [{"path": a, "weight": 2.0}, {"path": b}]), tok, "train")
    ba = build_loader(mixed_cfg(tmp_path, [{"path": a}, {"path": b, "weight": 2.0}]), tok, "train")
    assert len(ab.data) == len(ba.data) == 120
    with pytest.raises(ValueError, match=r"mixture .*\['a', 2.0, 80\].* is not this run's .*\['b', 2.0, 80\]"):
        ba.load_state_dict(ab.state_dict())


def test_mix_per_source_fields(tmp_path, tok):
    qa = {"question": "What is 2+3?", "answer": "5\n#### 5"}
    conv = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [qa])
    sources = [{"path": gsm, "src_field": "question", "tgt_field": "answer", "name": "gsm8k"},
               {"path": write_jsonl(tmp_path / "st.jsonl", [{"src": "hi", "tgt": "there"}])},
               {"path": write_jsonl(tmp_path / "chat.jsonl", [{"conversation": conv}]),
                "messages_field": "conversation"},
               {"path": gsm, "src_field": "question", "tgt_field": "answer", "chat_mode": True}]
    loader = build_loader(mixed_cfg(tmp_path, sources, shuffle=False, packing=False, batch_size=1), tok, "train")
    expect = [(tok.encode(qa["question"], bos=True) + tok.encode(qa["answer"], eos=True), None),
              (tok.encode("hi", bos=True) + tok.encode("there", eos=True), None),
              tuple(map(list, tok.render_chat(conv))),
              tuple(map(list, tok.render_chat([{"role": "user", "content": qa["question"]},
                                               {"role": "assistant", "content": qa["answer"]}])))]
    for i, (ids, mask) in enumerate(expect):
        got_ids, got_mask = example_of(loader, i)
        assert got_ids == ids and (mask is None or got_mask == mask)
        assert next(loader).tokens[0].tolist() == ids[:-1]  # collate reads each source's cache
    meta = loader.data.meta["sources"]
    assert [m["name"] for m in meta] == ["gsm8k", "st", "chat", "gsm"]
    assert meta[0]["cache"] != meta[3]["cache"]  # the same file read another way has its own cache


def test_mix_validation_split_and_eval_examples(tmp_path, tok, capsys):
    import train
    write_jsonl(tmp_path / "a" / "train.jsonl", tagged_rows("a", 6))
    write_jsonl(tmp_path / "a" / "valid.jsonl", tagged_rows("v", 3))
    write_jsonl(tmp_path / "q" / "train.jsonl", tagged_rows("q", 4, "question", "answer"))
    write_jsonl(tmp_path / "q" / "valid.jsonl", tagged_rows("w", 2, "question", "answer"))
    write_jsonl(tmp_path / "b" / "train.jsonl", tagged_rows("b", 4))  # a directory without a valid split
    one_file = write_jsonl(tmp_path / "c.jsonl", tagged_rows("c", 4))  # one file: the train split only
    sources = [{"path": str(tmp_path / "a"), "weight": 2},
               {"path": str(tmp_path / "q"), "src_field": "question", "tgt_field": "answer"},
               {"path": str(tmp_path / "b")}, {"path": one_file, "weight": 0.5}]
    cfg = mixed_cfg(tmp_path, sources, valid_split="valid", max_seq_len=64, batch_size=2)
    valid = build_loader(cfg, tok, "valid", infinite=False)
    out = capsys.readouterr().out
    assert "source b" in out and "source c" in out and out.count("has no 'valid' split: skipped") == 2
    assert tags_of(list(valid), tok) == {t: 1 for t in ("v0", "v1", "v2", "w0", "w1")}  # all, unweighted
    with pytest.raises(FileNotFoundError, match="no entry of dataset.sources has a 'test' split"):
        build_loader(cfg, tok, "test", infinite=False)

    c = train.Config(dataset=cfg, evaluation=train.EvaluationConfig(split="valid"))
    rows = train.load_eval_examples(c)  # each source's own field names
    assert [r["question"].split("]")[0] for r in rows] == ["[v0", "[w0", "[v1", "[w1", "[v2"]  # sources in turn
    c.evaluation.limit = 2  # evaluation.limit takes from each source, not the first source's first examples
    assert [r["question"].split("]")[0] for r in train.load_eval_examples(c)] == ["[v0", "[w0"]
    c.evaluation.limit = 0
    assert rows[1]["answer"] == "#### 0"  # w0: its source's own answer field
    c.evaluation.split = "test"
    with pytest.raises(FileNotFoundError, match="no entry of dataset.sources has a 'test' split"):
        train.load_eval_examples(c)


def test_mix_config_errors(tmp_path, tok, qa_dir):
    f = write_jsonl(tmp_path / "d.jsonl", qa_rows(10))
    cases = [([{"path": f}], dict(path=f), "dataset.path and dataset.sources are both set: use one or the other"),
             ([{"path": f}, {"path": f, "wieght": 2}], {},
              r"dataset.sources\[1\]: unknown key 'wieght' \(valid: path, weight, "),
             ([{"path": f, "weight": 0}], {}, r"dataset.sources\[0\].weight must be a number > 0"),
             ([{"path": f, "weight": -1.5}], {}, r"dataset.sources\[0\].weight must be a number > 0"),
             ([{"path": f, "weight": "lots"}], {}, r"dataset.sources\[0\].weight must be a number > 0"),
             ([{"path": f, "weight": True}], {}, r"dataset.sources\[0\].weight must be a number > 0"),
             ([{"path": f}, {"weight": 2}], {}, r"dataset.sources\[1\].path is required"),
             ([f], {}, r"dataset.sources\[0\] must be a mapping"),
             ([{"path": f, "chat_mode": "yes"}], {}, r"dataset.sources\[0\].chat_mode must be a bool"),
             ([{"path": f}], dict(generate_demo=True), "generate_demo .* not usable with dataset.sources"),
             ([{"path": f, "weight": 0.01}], {}, r"dataset.sources\[0\].weight=0.01 keeps 0 of its 10 examples"),
             ([{"path": f}, {"path": str(tmp_path / "nope")}], {}, r"dataset.sources\[1\].path .*nope does not exist")]
    for sources, extra, msg in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=msg):
            build_loader(dataclasses.replace(mixed_cfg(tmp_path, sources), **extra), tok, "train")
    assert len(build_loader(mixed_cfg(tmp_path, [{"path": f, "weight": "5e-1"}]), tok, "train").data) == 5  # YAML str


def test_mix_validation_batches_hold_one_source_each(tmp_path, tok):
    """A mixture's validation pass plans each source apart (plan_by_source): every batch holds one source and says
    which, so train.py can report a loss per source; every example is seen once, at 1 and 2 ranks."""
    for tag, n in (("a", 13), ("b", 9)):
        os.makedirs(tmp_path / tag)
        write_jsonl(tmp_path / tag / "train.jsonl", tagged_rows(tag, 5))
        write_jsonl(tmp_path / tag / "valid.jsonl", tagged_rows(tag, n))
    cfg = mixed_cfg(tmp_path, [{"path": str(tmp_path / "a")}, {"path": str(tmp_path / "b")}], max_seq_len=64,
                    max_num_tokens=128, valid_split="valid")
    seen = Counter()
    for world in (1, 2):
        for rank in range(world):
            for b in build_loader(cfg, tok, "valid", rank, world, infinite=False):
                tags = tags_of([b], tok)
                if b.num_label_tokens:  # not a filler
                    assert {t[0] for t in tags} == {"ab"[b.source]}, (b.source, tags)
                    seen.update(tags)
    assert seen == Counter({f"{t}{i}": 2 for t, n in (("a", 13), ("b", 9)) for i in range(n)})


def test_examples_not_ending_on_a_stop_token_are_counted_and_warned(tmp_path, tok, capsys):
    """Targets without eos (target_encode_mode=as_is) teach a model never to stop: the cache counts the
    examples whose last supervised token is not a stop token, and the loader says so; the default (eos) is silent."""
    path = write_jsonl(tmp_path / "d" / "train.jsonl", qa_rows(12))
    ok = build_loader(cfg_for(tmp_path, os.path.dirname(path)), tok, "train")
    assert ok.data.meta["no_stop_token"] == 0 and "WARNING" not in capsys.readouterr().out
    bad = build_loader(cfg_for(tmp_path, os.path.dirname(path), target_encode_mode="as_is"), tok, "train")
    assert bad.data.meta["no_stop_token"] == 12
    assert "WARNING: 12 of 12 examples end their supervised tokens on something else than a stop token" in \
        capsys.readouterr().out
    # chatml with train_on: all supervises the "\n" after <|im_end|>: that still ends on the stop token
    chats = write_jsonl(tmp_path / "c" / "train.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                                        {"role": "assistant", "content": "a"}]}] * 3)
    assert build_loader(cfg_for(tmp_path, chats, train_on="all"), tok, "train").data.meta["no_stop_token"] == 0
    # a response cut by truncation is expected not to end on a stop token: not counted; a whole one is
    long = write_jsonl(tmp_path / "t" / "train.jsonl", [{"src": "p", "tgt": "r"}, {"src": "p", "tgt": "r" * 50}])
    meta = build_loader(cfg_for(tmp_path, long, max_seq_len=20, truncate=True, target_encode_mode="as_is"), tok,
                        "train").data.meta
    assert meta["truncated"] == 1 and meta["no_stop_token"] == 1


def test_mix_trains_end_to_end(tmp_path):
    """train.py with two sources (GSM8K-style question/answer and src/tgt): trains, validates, writes metrics."""
    from test_train import tiny_cfg, train_in_process
    data.make_demo_data(tmp_path / "add", n_train=60, n_valid=8, max_value=99)
    write_jsonl(tmp_path / "st" / "train.jsonl", qa_rows(30))
    write_jsonl(tmp_path / "st" / "valid.jsonl", qa_rows(6, seed=1))
    sources = [{"path": str(tmp_path / "add"), "weight": 1.5},
               {"path": str(tmp_path / "st"), "src_field": "src", "tgt_field": "tgt", "name": "plain"}]
    d = tiny_cfg({"path": "", "cache_dir": str(tmp_path / "cache")}, tmp_path / "out",
                 dataset={"sources": sources}, regime={"num_steps": 3},
                 evaluation={"split": "valid", "limit": 4, "max_new_tokens": 4, "at_start": False})
    result = train_in_process(d, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    # evaluation.limit=4 takes 2 from each source; the plain source's answers have no '#### N': skipped, counted
    assert result["step"] == 3 and np.isfinite(result["val_loss"]) and result["eval"]["total"] == 2
    assert result["eval"]["skipped"]["no_gold"] == 2
    # validation: one loss per source, and the overall loss is their mean weighted by supervised tokens
    val = next(r for r in records if "val_loss" in r)
    n = [build_loader(dataclasses.replace(DatasetConfig(**{k: v for k, v in d["dataset"].items() if k != "sources"}),
                                          sources=[s]), load_tokenizer("byte"), "valid",
                     infinite=False).data.meta["num_label_tokens"]
         for s in sources]
    assert val["val_loss/add"] != val["val_loss/plain"]
    assert val["val_loss"] == pytest.approx((val["val_loss/add"] * n[0] + val["val_loss/plain"] * n[1]) / sum(n))


# ------------------------------------------------------------------------------------------------ bad input

GOOD = json.dumps({"src": "a", "tgt": "b"})
BAD = {  # name: (file content bytes, message, reason counted with skip_bad_examples)
    "malformed_json": (GOOD + "\n{\"src\": \"a\", \n", r"d\.jsonl:2:14: malformed JSON \(Expecting property name",
                       "invalid_json"),
    "unterminated_string": (GOOD + "\n{\"src\": \"a\n", r"d\.jsonl:2:9: malformed JSON \(Unterminated string\); "
                            r"dataset\.skip_bad_examples=true skips \(and counts\) such examples$", "invalid_json"),
    "missing_field": (GOOD + "\n" + json.dumps({"src": "a"}), r"d\.jsonl:2: missing field 'tgt'", "missing_field"),
    "non_string": (json.dumps({"src": 1, "tgt": "b"}) + "\n" + GOOD, r"d\.jsonl:1: field 'src' must be a string",
                   "bad_field"),
    "empty_target": (GOOD + "\n\n" + json.dumps({"src": "a", "tgt": ""}), r"d\.jsonl:3: field 'tgt' is empty",
                     "empty_target"),
    "invalid_utf8": (GOOD.encode() + b"\n{\"src\": \"\xff\xfe\", \"tgt\": \"b\"}\n", r"d\.jsonl:2: invalid UTF-8",
                     "invalid_utf8"),
    "not_object": (GOOD + "\n[1, 2]", r"d\.jsonl:2: expected a JSON object", "invalid_json"),
    "huge_int": (GOOD + '\n{"src": ' + "9" * 5000 + ', "tgt": "b"}', r"d\.jsonl:2: unreadable JSON", "invalid_json"),
    "deep_nesting": (GOOD + "\n" + "[" * 100000 + "]" * 100000, r"d\.jsonl:2: unreadable JSON .RecursionError",
                     "invalid_json"),
    "lone_surrogate": (GOOD + "\n" + json.dumps({"src": "bad \ud800", "tgt": "b"}), r"d\.jsonl:2: .*surrogate",
                       "bad_field"),  # valid JSON, not encodable as UTF-8
    "bad_messages": (GOOD + "\n" + json.dumps({"messages": [{"role": "bot", "content": "x"}]}),
                     r"d\.jsonl:2: messages\[0\]", "bad_field"),
    # tool calling: the byte tokenizer's chatml has no tool format; malformed tools / tool_calls
    "tool_role_chatml": (GOOD + "\n" + json.dumps({"messages": [{"role": "user", "content": "x"},
                                                               {"role": "tool", "content": "y"}]}),
                         r"d\.jsonl:2: render_chat: messages\[1\] is a tool message, but chat_format 'chatml'",
                         "bad_field"),
    "tools_not_list": (json.dumps({"messages": [{"role": "user", "content": "x"}], "tools": "f"}) + "\n" + GOOD,
                       r"d\.jsonl:1: render_chat: tools must be a list", "bad_field"),
    "tool_call_chatml": (GOOD + "\n" + json.dumps({"messages": [{"role": "assistant", "content": "",
                                                                "tool_calls": [{"name": "f", "arguments": {}}]}]}),
                         r"d\.jsonl:2: render_chat: messages\[0\] is a tool call, but chat_format 'chatml'", "bad_field"),
    # messages beside src and tgt: which one to train on is the user's call, not a silent pick
    "messages_and_src_tgt": (GOOD + "\n" + json.dumps({"src": "a", "tgt": "b", "messages": [
        {"role": "user", "content": "u"}, {"role": "assistant", "content": "m"}]}),
        r"d\.jsonl:2: both 'messages' \(chat messages\) and 'src'/'tgt' are set", "ambiguous"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_names_file_and_line(tmp_path, tok, name):
    content, msg, reason = BAD[name]
    path = tmp_path / "d.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=msg):
        build_loader(cfg_for(tmp_path, path), tok, "train")
    loader = build_loader(cfg_for(tmp_path, path, skip_bad_examples=True), tok, "train")
    assert loader.data.meta["drops"] == {reason: 1} and len(loader.data) == loader.data.meta["num_read"] - 1


def test_empty_file_and_empty_dir(tmp_path, tok):
    (tmp_path / "e").mkdir()
    with pytest.raises(FileNotFoundError, match="no data for split 'train'"):
        build_loader(cfg_for(tmp_path, tmp_path / "e"), tok, "train")
    write_jsonl(tmp_path / "e" / "train" / "a.jsonl", [GOOD])
    (tmp_path / "e" / "train" / "b.jsonl").write_text("\n  \n")
    with pytest.raises(ValueError, match=r"b\.jsonl: empty file"):
        build_loader(cfg_for(tmp_path, tmp_path / "e"), tok, "train")
    loader = build_loader(cfg_for(tmp_path, tmp_path / "e", skip_bad_examples=True), tok, "train")
    assert loader.data.meta["drops"] == {"empty_file": 1} and len(loader.data) == 1
    (tmp_path / "e" / "train" / "a.jsonl").write_text("")
    with pytest.raises(ValueError, match="no usable examples"):  # nothing at all is always an error
        build_loader(cfg_for(tmp_path, tmp_path / "e", skip_bad_examples=True), tok, "train")


def test_stop_at_gives_fillers_past_the_end(tmp_path, tok):
    """num_data_epochs' end inside a step: the batches past it are fillers (no labels, no tokens counted) on every
    rank, and the loader's position stays at the end (a resume with more epochs continues from there)."""
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(40))
    cfg = cfg_for(tmp_path, path, batch_size=4, packing=False)
    loaders = [build_loader(cfg, tok, "train", rank=r, world_size=2) for r in range(2)]
    bpe = loaders[0].batches_per_epoch
    assert bpe == 10
    for ld in loaders:
        ld.stop_at(bpe + 1)  # 11 real batches: 6 steps of 2 take 12, the 12th is a filler (rank 1's 6th)
    got = [[next(ld) for _ in range(6)] for ld in loaders]
    labels = [b.num_label_tokens for step in zip(*got) for b in step]
    assert all(n > 0 for n in labels[:11]) and labels[11] == 0 and got[1][5].num_tokens == 0
    assert (got[1][5].labels == -100).all() and got[1][5].tokens.shape[0] == 4  # a whole batch, trained on nothing
    assert [ld.state_dict()["epoch"] * bpe + ld.state_dict()["index"] for ld in loaders] == [bpe + 1] * 2


def test_compressed_file_is_named(tmp_path, tok):
    """A .jsonl.gz read as text would be "invalid UTF-8" line after line (and skip_bad_examples would skip it all)."""
    import gzip
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress((GOOD + "\n").encode() * 3))
    for skip in (False, True):
        with pytest.raises(ValueError, match=r"d\.jsonl\.gz is gzip-compressed: decompress it first"):
            build_loader(cfg_for(tmp_path, path, skip_bad_examples=skip), tok, "train")


def test_no_usable_examples_says_why(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"src": "a" * 50, "tgt": "b"}] * 2)
    with pytest.raises(ValueError, match=r"dropped \{'too_long': 2\}\): raise dataset.max_seq_len"):
        build_loader(cfg_for(tmp_path, path, max_seq_len=16), tok, "train")
    with pytest.raises(ValueError, match=r"dropped \{'missing_field': 2\}\): check the field names"):
        build_loader(cfg_for(tmp_path, path, tgt_field="answer", skip_bad_examples=True), tok, "train")


def test_bom_crlf_and_huge_line(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    huge = json.dumps({"src": "z" * (10 << 20), "tgt": "b"})  # a 10 MB line: read, tokenized, dropped as too long
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\r\n" + huge.encode() + b"\r\n" + GOOD.encode() + b"\r\n")
    loader = build_loader(cfg_for(tmp_path, path), tok, "train")
    assert len(loader.data) == 2 and loader.data.meta["drops"] == {"too_long": 1}
    assert example_of(loader, 0)[0] == tok.encode("a", bos=True) + tok.encode("b", eos=True)  # no BOM, no \r


def test_config_errors(tmp_path, tok, qa_dir):
    for bad, msg in [(dict(source_encode_mode="bos"), "source_encode_mode"), (dict(packing=False), "set batch_size"),
                     (dict(batch_size=4, max_num_tokens=4096), "not both"),
                     (dict(max_num_tokens=100), "max_num_tokens"),
                     (dict(num_workers=-1), r"dataset.num_workers must be >= 0 \(0 = one per CPU, at most 8\), got -1"),
                     (dict(generate_demo=True, demo_n_train=0), "need demo_n_train >= 1"),
                     (dict(path=""), "dataset.path is empty")]:
        with pytest.raises(ValueError, match=msg):
            build_loader(dataclasses.replace(cfg_for(tmp_path, qa_dir), **bad), tok, "train")


# ------------------------------------------------------------------------------------------------ cache

def test_cache_reused_and_invalidated(tmp_path, tok, qa_dir, monkeypatch):
    cfg = cfg_for(tmp_path, qa_dir, max_seq_len=64)
    built = build_loader(cfg, tok, "train").data
    first = built.directory
    assert built.meta["max_id"] == int(built.tokens.max())  # train.py checks it against the model's vocab
    calls = []
    real_build = data.build_cache
    monkeypatch.setattr(data, "build_cache", lambda *a: (calls.append(1), real_build(*a)))
    assert build_loader(cfg, tok, "train").data.directory == first and not calls  # reused, not rebuilt
    assert build_loader(dataclasses.replace(cfg, batch_size=3), tok, "train").data.directory == first  # batching: same
    assert build_loader(dataclasses.replace(cfg, max_seq_len=32), tok, "train").data.directory != first
    other_tok = load_tokenizer("byte", chat_format="chatml")
    other_tok.eos_id = other_tok.pad_id  # a tokenizer that ids differently must not reuse the cache
    assert data.cache_path(data.resolve_files(str(qa_dir), "train"), cfg, other_tok, "train") != first
    os.utime(qa_dir / "train.jsonl", ns=(1, 1))  # the source changed
    assert build_loader(cfg, tok, "train").data.directory != first and len(calls) == 2
    assert not [p for p in os.listdir(tmp_path / "cache") if ".tmp-" in p]  # temp dirs renamed or removed


def test_cache_follows_the_tokenizer_file_read(tmp_path, llama3_tokenizer_dir):
    """A directory's tokenizer.model and its merges-only tokenizer.json hold the same files but tokenize " Việt"
    differently (one token vs three): each gets its own cache, and reloading the same file reuses it."""
    row = {"src": "Việt Nam có bao nhiêu tỉnh?", "tgt": "Việt Nam #### 63"}
    path = write_jsonl(tmp_path / "viet" / "train.jsonl", [row] * 3)
    caches = {}
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer.model", "tokenizer.json"):
        t = load_tokenizer(llama3_tokenizer_dir / name)
        loader = build_loader(cfg_for(tmp_path, path), t, "train")
        assert example_of(loader, 0)[0] == t.encode(row["src"], bos=True) + t.encode(row["tgt"], eos=True), name
        assert caches.setdefault(name, loader.data.directory) == loader.data.directory
    assert caches["tokenizer.model"] != caches["tokenizer.json"]


def test_damaged_cache_is_a_clear_error(tmp_path, tok, qa_dir):
    loader = build_loader(cfg_for(tmp_path, qa_dir), tok, "train")
    tokens = Path(loader.data.directory) / "tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"token cache {loader.data.directory} is damaged .*delete that directory"):
        build_loader(cfg_for(tmp_path, qa_dir), tok, "train")


def test_parallel_build_equals_serial(tmp_path, tok, qa_dir, monkeypatch):
    monkeypatch.setattr(data, "POOL_MIN_BYTES", 0)
    serial = build_loader(cfg_for(tmp_path / "s", qa_dir, num_workers=1), tok, "train").data
    par = build_loader(cfg_for(tmp_path / "p", qa_dir, num_workers=2), tok, "train").data
    assert np.array_equal(serial.tokens, par.tokens) and np.array_equal(serial.mask, par.mask)
    assert np.array_equal(serial.offsets, par.offsets) and serial.meta["drops"] == par.meta["drops"]
    bad = tmp_path / "bad"
    write_jsonl(bad / "train.jsonl", qa_rows(600) + ["{oops"])  # an error raised inside a worker names the line
    with pytest.raises(ValueError, match=r"train\.jsonl:601:2: malformed JSON"):
        build_loader(cfg_for(tmp_path, bad, num_workers=2), tok, "train")


# ------------------------------------------------------------------------------------------------ demo, report

def test_demo_answer_is_column_addition():
    assert data.demo_answer(49, 97, 2) == "9+7+0=16\n4+9+1=14\n#### 146"
    assert data.demo_answer(3, 4, 2) == "3+4+0=7\n0+0+0=0\n#### 7"  # leading zeros pad the columns, not the result
    assert data.demo_answer(999, 1, 3) == "9+1+0=10\n9+0+1=10\n9+0+1=10\n#### 1000"
    from generate import extract_answer
    assert extract_answer(data.demo_answer(58, 67, 2)) == "125"  # the evaluation reads the '#### ' line


def test_demo_data_and_generate_demo(tmp_path, tok):
    data.make_demo_data(tmp_path / "demo", n_train=50, n_valid=10)
    rows = [json.loads(line) for line in open(tmp_path / "demo" / "train.jsonl")]
    valid = [json.loads(line) for line in open(tmp_path / "demo" / "valid.jsonl")]
    assert len(rows) == 50 and len(valid) == 10 and not {r["question"] for r in rows} & {r["question"] for r in valid}
    for r in rows:
        a, b = map(int, r["question"].removeprefix("What is ").removesuffix("?").split(" + "))
        assert r["answer"].endswith(f"\n#### {a + b}")
    cfg = cfg_for(tmp_path, tmp_path / "gen", generate_demo=True, src_field="question", tgt_field="answer",
                  demo_n_train=30, demo_n_valid=5, valid_split="valid")
    assert len(build_loader(cfg, tok, "train").data) == 30
    assert len(build_loader(cfg, tok, "valid", infinite=False).data) == 5
    cfg = dataclasses.replace(cfg, demo_n_train=40)  # our own demo data follows its options
    assert len(build_loader(cfg, tok, "train").data) == 40
    write_jsonl(tmp_path / "mine" / "train.jsonl", qa_rows(3))  # somebody else's data is never overwritten
    cfg = dataclasses.replace(cfg, path=str(tmp_path / "mine"), src_field="src", tgt_field="tgt")
    assert len(build_loader(cfg, tok, "train").data) == 3


def test_report_cli(tmp_path, qa_dir, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset:\n  path: {qa_dir}\n  valid_split: valid\n  max_seq_len: 64\n"
                   f"  cache_dir: {tmp_path}/cache\n"
                   "tokenizer:\n  path: byte\nmodel:\n  name: demo\n")
    data.main([str(cfg), "dataset.max_num_tokens=256"])
    out = capsys.readouterr().out
    for s in ["203 examples read", "== valid", "static 16", "dynamic 256", "packed 4x64", "padding", "example 0",
              "supervised tokens are shown between \u00ab and \u00bb", "\u00ab"]:  # no ANSI codes into a pipe
        assert s in out, s
    # train_on_prompt: every id but the first is a target (nothing predicts the first; its mask bit is 1)
    data.main([str(cfg), "dataset.train_on_prompt=true"])
    out = capsys.readouterr().out
    example = out[out.index("--- example 0"):].split("\n")[1]
    assert example.startswith("<|bos|>\u00ab") and example.count("\u00ab") == 1, example
    with pytest.raises(SystemExit, match="config error: .*unknown config key"):  # one line, as train.py
        data.main([str(cfg), "dataset.bogus=1"])
    with pytest.raises(SystemExit, match="error: .*tokenizer.path"):
        data.main([str(cfg), "tokenizer.path=hg://org/missing"])


def test_report_cli_counts_a_mixtures_validation_as_the_loader_does(tmp_path, capsys):
    """A mixture's validation batches hold one source each, unshuffled: the report's batch count is the loader's."""
    for name, n in (("a", 13), ("b", 7)):
        write_jsonl(tmp_path / name / "train.jsonl", qa_rows(20))
        write_jsonl(tmp_path / name / "valid.jsonl", qa_rows(n, seed=1))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset:\n  sources: [{{path: {tmp_path / 'a'}}}, {{path: {tmp_path / 'b'}}}]\n  valid_split: "
                   f"valid\n  max_seq_len: 64\n  batch_size: 4\n  packing: false\n  cache_dir: {tmp_path}/cache\n"
                   "tokenizer:\n  path: byte\nmodel:\n  name: demo\n")
    data.main([str(cfg)])
    valid = capsys.readouterr().out.split("== valid")[1]
    assert "static 4: 6 batches/epoch" in valid, valid  # ceil(13 / 4) + ceil(7 / 4); mixed, 5


def test_report_cli_tokenizer_from_hub(tmp_path, qa_dir, llama3_tokenizer_dir, monkeypatch, capsys):
    """The shipped configs name model.path: hg://...: data.py resolves it as train.py does."""
    snapshot = offline_hub_repo(tmp_path, monkeypatch, "org/llama", kind="models")
    shutil.copytree(llama3_tokenizer_dir, snapshot)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset:\n  path: {qa_dir}\n  cache_dir: {tmp_path}/cache\nmodel:\n  path: hg://org/llama\n")
    data.main([str(cfg)])
    assert "203 examples read" in capsys.readouterr().out
