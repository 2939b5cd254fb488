"""Tokenizer tests: ids equal to HF `tokenizers`, chat ids/text equal to the Jinja templates (as transformers renders
them), loss masks, bad input. Run: python3 -m pytest -q -x tests/test_tokenizer.py

Real tokenizer files and GSM8K come from conftest fixtures (fail under CI=true, skip elsewhere when missing)."""
import json
import os
import shutil
import sys
import unicodedata
from pathlib import Path

import pytest

import tokenizer as T
from tokenizer import load_tokenizer, visualize

HARD = [  # hard strings for id parity: whitespace, CRLF, numbers, code, contractions, CJK, emoji, combining chars
    "Hello world", "  leading spaces", "trailing   ", "a\tb\t\tc\t", "line1\r\nline2\r\n\r\n", "\n\n\n", " " * 50 + "x",
    " " * 1000, "\t" * 64, "12345678901234567890", "3.14159 1,000,000 $12.50 -7e-3", "I'm can't we'll they've she'd HE'S",
    "naïve café résumé", "e\u0301 a\u0308 n\u0303 A\u030a", "日本語のテキスト、中文文本。한국어", "emoji 😀👍🏽👨‍👩‍👧 🇺🇸",
    "def f(x):\n    return x**2  # comment\n\tpass\n", "if (a&&b) { c[i] = d->e; }", "\u00a0nbsp\u3000ideo\u2028ls\u0085nel\u200bz",
    "x" * 5000, "a" + " \n" * 30, "Ω≈ç√∫˜µ≤≥÷ ¡™£¢∞§¶•ªº–≠", ">\u0338 =\u0338", "\x00\x01\x7f control", "ﬁ ﬂ Ａ１ ① ²",
    "don't\r\n\r\n  'quoted' \"dq\"", "a" * 20000, " " * 20000 + "x", "7" * 3000,
    "مرحبا بالعالم", "Привет, мир!", "   \n  \n\t \r\n", "0.000001 +1 1/2 50%",
]
CONVS = [  # single/multi turn, with/without system, whitespace to trim, think blocks in content and reasoning_content
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "  Be brief. "}, {"role": "user", "content": "Hi\n"},
     {"role": "assistant", "content": " Hello!\n\nHow can I help?  "}, {"role": "user", "content": "2+2 = ?"},
     {"role": "assistant", "content": "It is 4."}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nans1"},
     {"role": "user", "content": "q2"}, {"role": "assistant", "content": "ans2", "reasoning_content": "\nthink2\n"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n\nx", "reasoning_content": "r"}],
    [{"role": "system", "content": "sys"}, {"role": "user", "content": "日本語 😀 12345"},
     {"role": "assistant", "content": "  code:\n\tdef f(): pass\r\n"}],
    [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "calling"},  # tool results
     {"role": "tool", "content": '{"t": 20}'}, {"role": "tool", "content": " sunny\n"}, {"role": "assistant", "content": "20, sunny"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "r1"},  # Qwen: not a query
     {"role": "user", "content": "<tool_response>x</tool_response>"}, {"role": "assistant", "content": "b", "reasoning_content": "r2"}],
    [{"role": "assistant", "content": "Hi! How can I help?"}, {"role": "user", "content": "2+2?"},  # opens with a greeting
     {"role": "assistant", "content": "4"}],
]


def test_byte_tokenizer():
    tok = load_tokenizer("byte")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.eot_id) == (261, 256, 257, 258, 260)
    assert tok.stop_ids == [257, 260] and tok.chat_format == "chatml"
    assert tok.encode("hé", bos=True, eos=True) == [256, 104, 195, 169, 257]  # <|bos|> h é(2 bytes) <|eos|>
    s = "héllo 😀 <|im_end|> <|eos|>"
    assert max(tok.encode(s)) < 256 and tok.decode(tok.encode(s)) == s  # special strings stay bytes
    assert tok.encode_batch(["ab", "c"], eos=True) == [[97, 98, 257], [99, 257]]
    ids, mask = tok.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    assert [i for i, m in zip(ids, mask) if m] == [121, 111, 260]  # "yo" + <|im_end|>
    ids, mask = tok.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n") and not any(mask)  # nothing supervised: detectable


def test_train_on_and_visualize():
    tok = load_tokenizer("byte")
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "v"}, {"role": "assistant", "content": "b"}]
    sup = lambda train_on: tok.decode([i for i, m in zip(*tok.render_chat(conv, train_on=train_on)) if m])
    assert sup("assistant") == "a<|im_end|>b<|im_end|>"
    assert sup("last_assistant") == "b<|im_end|>"
    ids, mask = tok.render_chat(conv, train_on="all")
    assert all(mask) and len(ids) == len(mask)
    ids, mask = tok.render_chat(conv)
    vis = visualize(ids, mask, tok)
    assert "\x1b[30;42ma<|im_end|>\x1b[0m" in vis and vis.replace("\x1b[30;42m", "").replace("\x1b[0m", "") == tok.decode(ids)


def test_bad_input(tmp_path):
    tok = load_tokenizer("byte")
    with pytest.raises(ValueError, match="non-empty list"):
        tok.render_chat([])
    with pytest.raises(ValueError, match=r"messages\[1\] has unknown role 'robot'"):
        tok.render_chat([{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}])
    with pytest.raises(ValueError, match=r"messages\[0\]\['content'\] must be a str"):
        tok.render_chat([{"role": "user", "content": ["x"]}])
    with pytest.raises(ValueError, match=r"messages\[0\] must be a dict with 'role' and 'content'"):
        tok.render_chat([{"role": "user"}])
    with pytest.raises(ValueError, match="unknown train_on"):
        tok.render_chat([{"role": "user", "content": "x"}], train_on="prompt")
    with pytest.raises(ValueError, match="unknown kwargs"):
        tok.render_chat([{"role": "user", "content": "x"}], enable_thinking=False)
    with pytest.raises(ValueError, match="encode expects a str"):
        tok.encode(None)
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        tok.encode_batch(["a", 3])
    with pytest.raises(ValueError, match="unknown chat_format"):
        load_tokenizer("byte", chat_format="alpaca")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no tokenizer in .*: set tokenizer.path to a directory or file with one"):
        load_tokenizer(tmp_path)
    # an HF export of a model trained with the byte tokenizer (which has no files to copy) names it
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [257, 260], "bos_token_id": 256}))
    with pytest.raises(FileNotFoundError, match="generation_config.json has the byte tokenizer's stop ids: use "
                                                "tokenizer.path=byte"):
        load_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").unlink()
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(FileNotFoundError, match=r"lacks \['vocab.json'\]"):
        load_tokenizer(tmp_path)
    (tmp_path / "merges.txt").unlink()
    (tmp_path / "tokenizer_config.json").write_text("{")
    with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: not valid JSON"):
        load_tokenizer(tmp_path)
    wordpiece = {"model": {"type": "WordPiece", "vocab": {"a": 0}}, "decoder": {"type": "WordPiece"}, "added_tokens": []}
    (tmp_path / "tokenizer.json").write_text(json.dumps(wordpiece))
    with pytest.raises(ValueError, match="'WordPiece'.*not supported; supported: byte-level BPE"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}, "decoder": {"type": "ByteLevel"}}))
    with pytest.raises(ValueError, match="model.vocab .dict. and model.merges .list. are required"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x07garbage")
    with pytest.raises(ValueError, match="neither Llama 3 tiktoken ranks nor a SentencePiece model"):
        load_tokenizer(tmp_path)
    for bad_line in (b"not-base64!! 1", b"Ig== x", b"Ig=="):
        (tmp_path / "tokenizer.model").write_bytes(b"IQ== 0\n" + bad_line + b"\n")
        with pytest.raises(ValueError, match=r"tokenizer.model:2: expected '<base64 token> <rank>'"):
            load_tokenizer(tmp_path)


# ------------------------------------------------------------------ small trained tokenizers (hermetic)
@pytest.mark.parametrize("digits", [False, True], ids=["gpt2", "smollm2_digits"])
def test_gpt2_style_tokenizer_json(tmp_path, digits):
    """GPT-2 style byte-level BPE (ByteLevel regex; SmolLM2 adds an individual-digit split) trained in-process."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) if digits else byte_level
    hf.decoder = decoders.ByteLevel()
    corpus = HARD + ["The quick brown fox jumps over the lazy dog 1234 times."] * 20
    hf.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       special_tokens=["<|endoftext|>"], show_progress=False))
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.eos_id == 0 and tok.chat_format is None  # <|endoftext|>; no chat tokens, no template
    for s in HARD + ["a  1  22 333 x\t4", "abc123def 456"]:
        assert tok.encode(s) == hf.encode(s).ids, s
        assert tok.decode(tok.encode(s)) == s
    with pytest.raises(ValueError, match="has no chat format"):
        tok.render_chat([{"role": "user", "content": "x"}])


def test_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    lines = ["Hello world, the cat sat on the mat.", "Numbers 12 and 42 stay text! a<b, c>d, e/f"] * 50
    (tmp_path / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=100, model_type="bpe", pad_id=3, character_coverage=1.0,
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    tok = load_tokenizer(tmp_path)
    assert (tok.backend, tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == ("sentencepiece", 100, 1, 2, 3)
    for s in ["the cat sat", "Hello world 12", "<s> </s> stay text"]:
        assert tok.encode(s, bos=True, eos=True) == [1] + sp.encode(s) + [2]
        assert tok.decode(tok.encode(s)) == s
    assert 1 not in tok.encode("<s>") and 2 not in tok.encode("</s>")  # control strings in text stay text
    assert tok.encode_batch(["the cat", "mat"]) == [sp.encode("the cat"), sp.encode("mat")]
    with pytest.raises(ValueError, match="has no chat format"):
        tok.render_chat([{"role": "user", "content": "x"}])


# ------------------------------------------------------------------ real tokenizers vs HF
@pytest.fixture(scope="module")
def llama(llama3_tokenizer_dir):
    # a directory loads tokenizer.model (tiktoken ranks) + tokenizer_config.json; the file path picks tokenizer.json
    return {"model": load_tokenizer(llama3_tokenizer_dir), "json": load_tokenizer(llama3_tokenizer_dir / "tokenizer.json")}


@pytest.fixture(scope="module")
def qwen(qwen3_tokenizer_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen_vocab_merges")  # the same tokenizer, from vocab.json + merges.txt only
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        os.symlink(qwen3_tokenizer_dir / f, d / f)
    return {"json": load_tokenizer(qwen3_tokenizer_dir), "vocab_merges": load_tokenizer(d)}


@pytest.fixture(scope="module")
def gsm8k_texts(gsm8k_dir):
    rows = [json.loads(line) for line in open(gsm8k_dir / "test.jsonl")]
    return [e["question"] for e in rows] + [e["answer"] for e in rows]


def test_special_ids(llama, qwen):
    for tok in llama.values():  # Llama 3.2 base config: eos <|end_of_text|>; chat turns end with <|eot_id|>
        assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.eot_id) == (128256 + 1, 128000, 128001, 128004, 128009)
        assert tok.stop_ids == [128001, 128009] and tok.chat_format == "llama3"
        assert tok.special["<|start_header_id|>"] == 128006 and tok.special["<|reserved_special_token_246|>"] == 128255
        assert tok.special["<|image|>"] == 128256  # this tokenizer_config.json adds one more (Llama 3.2 Vision files)
    for tok in qwen.values():  # Qwen3 chat config: eos <|im_end|>, pad/end-of-text <|endoftext|>, no BOS
        assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eot_id) == (None, 151645, 151643, 151645)
        assert tok.stop_ids == [151645, 151643] and tok.chat_format == "qwen3" and tok.vocab_size == 151669
        assert tok.encode("hi", bos=True) == tok.encode("hi")  # Qwen has no BOS: nothing to add


def test_llama3_model_without_config(llama3_tokenizer_dir, llama, tmp_path):
    """A bare tokenizer.model gets Meta's 256 special tokens (llama-models tokenizer.py), with the same ids."""
    os.symlink(llama3_tokenizer_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    tok = load_tokenizer(tmp_path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.eot_id) == (128256, 128000, 128001, 128004, 128009)
    assert tok.special == {s: i for s, i in llama["json"].special.items() if s != "<|image|>"}


def test_ids_match_hf(llama, qwen, llama3_tokenizer_dir, qwen3_tokenizer_dir, gsm8k_texts):
    from tokenizers import Tokenizer as HFTokenizer

    for toks, d in [(llama, llama3_tokenizer_dir), (qwen, qwen3_tokenizer_dir)]:
        hf = HFTokenizer.from_file(str(d / "tokenizer.json"))
        texts = gsm8k_texts + HARD
        want = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
        for name, tok in toks.items():
            got = tok.encode_batch(texts)
            bad = [t for t, a, b in zip(texts, got, want) if a != b]
            assert not bad, f"{d.name} from {name}: {len(bad)} mismatches, first {bad[0]!r:.100}"
            assert [tok.encode(t) for t in HARD] == want[len(gsm8k_texts):]
            for t in HARD:  # Qwen's normalizer is NFC: text round-trips to its NFC form
                assert tok.decode(tok.encode(t)) == (unicodedata.normalize("NFC", t) if tok.nfc else t)


def test_ignore_merges_as_the_tokenizer_json_says(llama, llama3_tokenizer_dir, tmp_path):
    """tiktoken (Meta's tokenizer.model) returns a pre-token found in the vocab whole: HF's ignore_merges=true. This
    tokenizer.json says false (merges only), under which HF splits 588 Llama 3 tokens such as " Việt": ours from
    that file must too, and from the same file with true (as Meta's official one) keep them whole, like the .model."""
    from tokenizers import Tokenizer as HFTokenizer
    texts = [" Việt Nam", "Tôi là người Việt, hôm nay trời đẹp.", "To je jeho auto. Güzel bir gün, işte böyle."]
    j = json.loads((llama3_tokenizer_dir / "tokenizer.json").read_text())
    assert j["model"]["ignore_merges"] is False
    (tmp_path / "true").mkdir()
    j["model"]["ignore_merges"] = True
    (tmp_path / "true" / "tokenizer.json").write_text(json.dumps(j))
    for path, ours_model_equal in [(llama3_tokenizer_dir / "tokenizer.json", False),
                                   (tmp_path / "true" / "tokenizer.json", True)]:
        hf, ours = HFTokenizer.from_file(str(path)), load_tokenizer(path)
        want = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
        assert [ours.encode(t) for t in texts] == want and ours.encode_batch(texts) == want, path
        assert (want == [llama["model"].encode(t) for t in texts]) == ours_model_equal
        assert [ours.decode(ids) for ids in want] == texts
    assert llama["model"].encode(" Việt") == [101798]
    assert llama["json"].encode(" Việt") == [11655, 26298, 83] and llama["json"].decode([101798]) == " Việt"


def test_special_strings_stay_text(llama, qwen):
    """Deliberate difference from HF (which turns them into control tokens): special strings in text are text."""
    tok = llama["json"]
    ids = tok.encode("a <|eot_id|> <|begin_of_text|>")
    assert not set(ids) & set(tok.special.values()) and tok.decode(ids) == "a <|eot_id|> <|begin_of_text|>"
    tok = qwen["json"]
    ids = tok.encode("<|im_end|><|endoftext|>")
    assert not set(ids) & set(tok.special.values())
    # Qwen's non-special added tokens (<think>, <tool_call>) ARE matched in text, exactly as HF does
    assert tok.encode("<think>x</think>") == [151667, 87, 151668]
    assert tok.encode("e\u0301") == tok.encode("é")  # NFC


def test_lone_surrogate_is_an_error(llama, qwen):
    """tiktoken would encode "\\ud800" (a broken JSON escape) as U+FFFD, SentencePiece drop it: the text trained on
    would silently differ from the data. Byte-level tokenizers, like HF's, refuse it."""
    for tok in [*llama.values(), *qwen.values(), load_tokenizer("byte")]:
        for call in (lambda: tok.encode("a\ud800"), lambda: tok.encode_batch(["ok", "b\udfff"]),
                     lambda: tok.render_chat([{"role": "user", "content": "\ud800"}, {"role": "assistant", "content": "x"}])):
            with pytest.raises(ValueError, match="surrogate"):
                call()


def test_save_replaces_an_earlier_exports_tokenizer(llama3_tokenizer_dir, qwen, tmp_path):
    """Exporting Qwen where a Llama export was: Llama's tokenizer.model left beside Qwen's files would be loaded
    (before tokenizer.json) by our loader: the wrong tokenizer, silently. Every tokenizer file not written is removed."""
    load_tokenizer(llama3_tokenizer_dir).save(tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.model").is_file()
    qwen["json"].save(tmp_path / "hf")
    assert not (tmp_path / "hf" / "tokenizer.model").exists()
    assert load_tokenizer(tmp_path / "hf").encode("Natalia sold clips") == qwen["json"].encode("Natalia sold clips")
    load_tokenizer("byte").save(tmp_path / "hf")  # no files: none left either
    assert not any((tmp_path / "hf" / f).exists() for f in ("tokenizer.json", "vocab.json", "merges.txt"))


def test_save_roundtrip(llama, tmp_path):
    files = llama["json"].save(tmp_path)
    assert sorted(Path(f).name for f in files) == ["tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    assert load_tokenizer(tmp_path / "tokenizer.json").encode(HARD[15]) == llama["json"].encode(HARD[15])
    assert load_tokenizer("byte").save(tmp_path / "b") == []  # the byte tokenizer has no files


def test_generation_config_and_instruct_eos(llama3_tokenizer_dir, tmp_path):
    """Llama 3.x Instruct: eos_token <|eot_id|>; generation_config.json eos_token_id list adds <|eom_id|>."""
    os.symlink(llama3_tokenizer_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    cfg = json.loads((llama3_tokenizer_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "<|eot_id|>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))
    tok = load_tokenizer(tmp_path)
    assert (tok.eos_id, tok.eot_id, tok.stop_ids) == (128009, 128009, [128009, 128001, 128008])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match="'<|nope|>'.*not in the vocabulary"):
        load_tokenizer(tmp_path)


# ------------------------------------------------------------------ chat rendering vs Jinja / transformers
def jinja_render(template: str, messages, add_generation_prompt, **kwargs) -> str:
    """The template rendered like transformers' apply_chat_template(tokenize=False), from plain jinja2."""
    jinja2 = pytest.importorskip("jinja2")

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception  # strftime_now left undefined: date_string is always passed
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)  # transformers'

    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)


@pytest.fixture(scope="module")
def hf_auto(llama3_tokenizer_dir, qwen3_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    return {"llama": transformers.AutoTokenizer.from_pretrained(str(llama3_tokenizer_dir)),
            "qwen": transformers.AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir))}


def _hf_ids(hf, conv, template, agp, **kw):
    out = hf.apply_chat_template(conv, chat_template=template, tokenize=True, add_generation_prompt=agp, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("agp", [False, True], ids=["train", "gen_prompt"])
def test_chat_matches_templates(llama, qwen, hf_auto, chat_templates_dir, agp):
    # llama {}: our default date and the template's fallback (no strftime_now in plain jinja) are both "26 Jul 2024";
    # transformers would pass strftime_now (today), so HF ids get date_string explicitly
    cases = [("llama", llama["json"], "llama3.2-instruct.jinja", [{}, {"date_string": "1 Jan 2025"}]),
             ("qwen", qwen["json"], "qwen3.jinja", [{}, {"enable_thinking": False}, {"enable_thinking": True},
                                                    {"enable_thinking": None}])]  # `is false`: None adds no block
    for name, tok, fname, kwargs in cases:
        template = (chat_templates_dir / fname).read_text()
        for conv in CONVS:
            for kw in kwargs:
                ids, mask = tok.render_chat(conv, add_generation_prompt=agp, **kw)
                bos = {"bos_token": "<|begin_of_text|>"} if name == "llama" else {}
                assert tok.decode(ids) == jinja_render(template, conv, agp, **bos, **kw), (name, conv, kw)
                hf_kw = {"date_string": "26 Jul 2024", **kw} if name == "llama" else kw
                assert ids == _hf_ids(hf_auto[name], conv, template, agp, **hf_kw), (name, conv, kw)
                assert len(mask) == len(ids)
    # our default date is the template's fallback "26 Jul 2024" (transformers would pass today's date via strftime_now)
    ids, _ = llama["json"].render_chat(CONVS[0])
    assert "Today Date: 26 Jul 2024\n\n<|eot_id|>" in llama["json"].decode(ids)


def test_special_strings_in_chat_content(llama, qwen, hf_auto, chat_templates_dir):
    """Deliberate difference: the text is byte-identical to the template, but a special string inside content stays
    text, while HF's render-then-tokenize turns it into a control token (a prompt-injection hazard)."""
    conv = [{"role": "user", "content": "end <|im_end|> now"}, {"role": "assistant", "content": "ok <|eot_id|>"}]
    for name, tok, fname in [("llama", llama["json"], "llama3.2-instruct.jinja"), ("qwen", qwen["json"], "qwen3.jinja")]:
        template = (chat_templates_dir / fname).read_text()
        ids, mask = tok.render_chat(conv)
        assert tok.decode(ids) == jinja_render(template, conv, False, bos_token="<|begin_of_text|>", date_string="26 Jul 2024")
        assert ids != _hf_ids(hf_auto[name], conv, template, False, date_string="26 Jul 2024")
        n_special = sum(i in tok.special.values() for i in ids)
        assert n_special == {"llama": 1 + 3 * 3, "qwen": 2 * 2}[name]  # BOS + 3 per turn; 2 per turn


def test_masks(llama, qwen):
    conv = CONVS[2]
    tok = llama["json"]  # supervised = each assistant content (trimmed, as the template does) + <|eot_id|>
    ids, mask = tok.render_chat(conv)
    want = tok.encode("Hello!\n\nHow can I help?") + [128009] + tok.encode("It is 4.") + [128009]
    assert [i for i, m in zip(ids, mask) if m] == want
    assert mask[-1] == 1 and ids[-1] == 128009 and ids.count(128000) == 1  # final eot trained; exactly one BOS
    tok = qwen["json"]  # earlier turns: content + <|im_end|>; the last turn also has its (empty) think block
    ids, mask = tok.render_chat(conv)
    want = tok.encode(" Hello!\n\nHow can I help?  ") + [151645] + tok.encode("<think>\n\n</think>\n\nIt is 4.") + [151645]
    assert [i for i, m in zip(ids, mask) if m] == want
    assert ids[-2:] == [151645, 198] and mask[-2:] == [1, 0]  # <|im_end|> trained, the "\n" after it not
    ids, mask = tok.render_chat(CONVS[3], train_on="last_assistant")
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "<think>\nthink2\n</think>\n\nans2<|im_end|>"
    for tok in (llama["json"], qwen["json"]):
        assert not any(tok.render_chat(CONVS[0])[1])  # no assistant turn: all-zero mask
        with pytest.raises(ValueError, match="unknown role"):
            tok.render_chat([{"role": "narrator", "content": "x"}])


@pytest.fixture
def llama_jinja_dir(llama3_tokenizer_dir, chat_templates_dir, tmp_path):
    for f in ("tokenizer.model", "tokenizer_config.json"):
        os.symlink(llama3_tokenizer_dir / f, tmp_path / f)
    shutil.copy(chat_templates_dir / "llama3.2-instruct.jinja", tmp_path / "chat_template.jinja")
    return tmp_path


def test_jinja_format(llama_jinja_dir, qwen3_tokenizer_dir, llama, qwen):
    """chat_format='jinja' renders the model's own template; the mask comes from rendering conversation prefixes."""
    pytest.importorskip("jinja2")
    assert load_tokenizer(llama_jinja_dir).chat_format == "llama3"  # auto: the template is the Llama 3.1+ one
    tok = load_tokenizer(llama_jinja_dir, chat_format="jinja")
    for conv in CONVS:  # the same ids and masks (a conversation opening with the assistant: its turn alone trained)
        for agp in (False, True):
            assert tok.render_chat(conv, agp, date_string="26 Jul 2024") == llama["json"].render_chat(conv, agp)
    # Qwen3's template drops earlier think blocks, so it is not prefix-stable in multi-turn: a clear error
    tok = load_tokenizer(qwen3_tokenizer_dir, chat_format="jinja")
    assert tok.render_chat(CONVS[1]) == qwen["json"].render_chat(CONVS[1])  # single turn is fine
    with pytest.raises(ValueError, match=r"not prefix-stable at messages\[2\]"):
        tok.render_chat(CONVS[2])
    # the template's own raise_exception is a ValueError (data.py then names the line, or counts the skip)
    two_calls = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [
        {"name": "f", "arguments": {}}, {"name": "g", "arguments": {}}]}]
    with pytest.raises(ValueError, match="chat template refused this conversation: .*single tool-calls"):
        load_tokenizer(llama_jinja_dir, chat_format="jinja").render_chat(two_calls, tools=[{"name": "f"}])


def test_jinja_missing(llama_jinja_dir, monkeypatch):
    tok = load_tokenizer(llama_jinja_dir, chat_format="jinja")
    monkeypatch.setitem(sys.modules, "jinja2", None)
    with pytest.raises(ImportError, match="needs jinja2"):
        tok.render_chat(CONVS[1])


def test_chat_format_requires_tokens():
    with pytest.raises(ValueError, match="needs special tokens"):
        load_tokenizer("byte", chat_format="llama3")
    assert T.CHAT_FORMATS == ("llama3", "qwen3", "chatml", "jinja") and T.TRAIN_ON == ("assistant", "last_assistant", "all")


# ------------------------------------------------------------------ tool calling vs the templates
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city, in °C (Zürich, 東京).",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers",
                                        "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                                                        "b": {"type": "integer"}}}}}


def call(name, arguments, wrapper=True):
    fn = {"name": name, "arguments": arguments}
    return {"type": "function", "function": fn} if wrapper else fn


# (name, tools, messages, formats): both formats unless the case uses what only one template accepts
TOOL_CONVS = [
    ("one_call_no_system", [WEATHER], [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Zürich"})]},
        {"role": "tool", "content": '{"temp": 20, "sky": "sonnig ☀"}'},
        {"role": "assistant", "content": "20 °C and sunny."}], ("llama", "qwen")),
    ("system_string_args_two_responses", [WEATHER, ADD], [
        {"role": "system", "content": "You are a helpful agent. "},
        {"role": "user", "content": "  Weather in 東京, and 2+3? "},
        {"role": "assistant", "content": "",
         "tool_calls": [call("get_weather", '{"city": "東京", "unit": "c"}')]},
        {"role": "tool", "content": "18"}, {"role": "tool", "content": "cloudy"},
        {"role": "assistant", "content": "18 °C, cloudy."},
        {"role": "user", "content": "and 2+3?"},
        {"role": "assistant", "content": "", "tool_calls": [call("add", {"a": 2, "b": 3})]}], ("llama", "qwen")),
    ("empty_tools_list", [], [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
     ("llama", "qwen")),
    ("two_calls_reasoning", [WEATHER, ADD], [  # reasoning before and after tool turns; no system
        {"role": "user", "content": "Weather in Paris and Zürich?"},
        {"role": "assistant", "content": "Checking both.", "reasoning_content": "Two cities: two calls.",
         "tool_calls": [call("get_weather", {"city": "Paris"}), call("get_weather", '{"city": "Zürich"}', wrapper=False)]},
        {"role": "tool", "content": "21"}, {"role": "tool", "content": "19"},
        {"role": "assistant", "content": "<think>\nParis is warmer.\n</think>\n\nParis 21 °C, Zürich 19 °C."},
        {"role": "user", "content": "<tool_response>late result</tool_response>"},  # not a query (multi_step_tool)
        {"role": "assistant", "content": "Noted.", "reasoning_content": "late"}], ("qwen",)),
    ("reasoning_dropped_before_last_query", [ADD], [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "", "reasoning_content": "use add", "tool_calls": [call("add", {"a": 2, "b": 3})]},
        {"role": "tool", "content": "5"},
        {"role": "assistant", "content": "5", "reasoning_content": "done"},
        {"role": "user", "content": "4+4?"},
        {"role": "assistant", "content": "\n", "reasoning_content": "again",  # "\n" content: truthy, then stripped
         "tool_calls": [call("add", {"a": 4, "b": 4}, wrapper=False)]}], ("qwen",)),
    ("ipython_mapping_content", [WEATHER], [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": "ignored by the template", "tool_calls": [call("get_weather", {"city": "Zürich"})]},
        {"role": "ipython", "content": {"temp": 20, "note": "très chaud"}},
        {"role": "tool", "content": [1, "ü"]},
        {"role": "assistant", "content": "20 °C."}], ("llama",)),
]
TOOL_TEMPLATES = {"llama": ("llama3.2-instruct.jinja", [{}, {"tools_in_user_message": False}]),
                  "qwen": ("qwen3.jinja", [{}, {"enable_thinking": False}])}


@pytest.mark.parametrize("case", TOOL_CONVS, ids=[c[0] for c in TOOL_CONVS])
def test_tool_chat_matches_templates(llama, qwen, hf_auto, chat_templates_dir, case):
    """Text byte-equal to the template (plain jinja2), ids equal to transformers' apply_chat_template(tools=...)."""
    _, tools, conv, formats = case
    for name in formats:
        tok = {"llama": llama["json"], "qwen": qwen["json"]}[name]
        fname, kwargs = TOOL_TEMPLATES[name]
        template = (chat_templates_dir / fname).read_text()
        bos = {"bos_token": "<|begin_of_text|>", "date_string": "26 Jul 2024"} if name == "llama" else {}
        for agp in (False, True):
            for kw in kwargs:
                ids, mask = tok.render_chat(conv, add_generation_prompt=agp, tools=tools, **kw)
                assert tok.decode(ids) == jinja_render(template, conv, agp, tools=tools, **bos, **kw), (name, kw)
                hf_kw = {"date_string": "26 Jul 2024", **kw} if name == "llama" else kw
                assert ids == _hf_ids(hf_auto[name], conv, template, agp, tools=tools, **hf_kw), (name, kw)
                assert len(mask) == len(ids)


def _supervised_runs(tok, ids, mask):
    runs, cur = [], []
    for i, m in zip(ids + [None], mask + [0]):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs


def test_tool_masks(llama, qwen):
    """Supervised = each assistant turn (content, tool calls, end-of-turn); never the tools block or tool responses."""
    _, tools, conv, _ = TOOL_CONVS[0]
    tok = qwen["json"]
    ids, mask = tok.render_chat(conv, tools=tools)
    assert _supervised_runs(tok, ids, mask) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call><|im_end|>',
        "<think>\n\n</think>\n\n20 °C and sunny.<|im_end|>"]
    tok = llama["json"]
    ids, mask = tok.render_chat(conv, tools=tools)
    assert _supervised_runs(tok, ids, mask) == ['{"name": "get_weather", "parameters": {"city": "Zürich"}}<|eot_id|>',
                                                "20 °C and sunny.<|eot_id|>"]
    # two calls in one Qwen3 turn, after its kept reasoning; the tool responses between turns stay unsupervised
    _, tools, conv, _ = TOOL_CONVS[3]
    tok = qwen["json"]
    ids, mask = tok.render_chat(conv, tools=tools)
    runs = _supervised_runs(tok, ids, mask)
    assert runs[0] == ('<think>\nTwo cities: two calls.\n</think>\n\nChecking both.\n<tool_call>\n{"name": "get_weather", '
                       '"arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": '
                       '{"city": "Zürich"}}\n</tool_call><|im_end|>')
    assert len(runs) == 3 and all(r.endswith("<|im_end|>") and "tool_response" not in r for r in runs)
    ids, mask = tok.render_chat(conv, tools=tools, train_on="last_assistant")
    assert _supervised_runs(tok, ids, mask) == ["<think>\nlate\n</think>\n\nNoted.<|im_end|>"]
    for tok in (llama["json"], qwen["json"]):
        for _, tools, conv, formats in TOOL_CONVS:
            if ("llama" if tok is llama["json"] else "qwen") in formats:
                ids, mask = tok.render_chat(conv, tools=tools)
                text = "".join(_supervised_runs(tok, ids, mask))
                assert not any(s in text for s in ("# Tools", "Given the following", "<tool_response>", '"temp"'))
                assert sum(r.endswith(("<|eot_id|>", "<|im_end|>")) for r in _supervised_runs(tok, ids, mask)) == \
                    sum(m["role"] == "assistant" for m in conv)
                assert all(tok.render_chat(conv, tools=tools, train_on="all")[1])


def test_tool_bad_input(llama, qwen):
    weather = [{"role": "user", "content": "w?"}]
    two = weather + [{"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "a"})] * 2}]
    cases = [  # (tokenizer, messages, tools, error)
        (llama["json"], two, [WEATHER], r"messages\[1\] has 2 tool calls; llama3 renders exactly one"),
        (qwen["json"], weather + [{"role": "assistant", "content": "", "tool_calls": {"name": "x"}}], None,
         r"messages\[1\]\['tool_calls'\] must be a list, got dict"),
        (qwen["json"], [{"role": "ipython", "content": "x"}], None, r"messages\[0\] has unknown role 'ipython'"),
        (qwen["json"], [{"role": "user", "content": "x", "tool_calls": []}], None, "only assistant messages call tools"),
        (llama["json"], weather + [{"role": "assistant", "content": "", "tool_calls": [call("f", {}, wrapper=False)]}],
         None, r"\['tool_calls'\]\[0\] must be \{'function'"),
        (qwen["json"], weather + [{"role": "assistant", "content": "", "tool_calls": [call("f", 3)]}], None,
         r"\['tool_calls'\]\[0\] must be .*optional"),
        (qwen["json"], weather, {"name": "f"}, "tools must be a list of function-schema dicts"),
        (llama["json"], [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], [WEATHER],
         "llama3 puts tools in the first user message"),
        (qwen["json"], [{"role": "tool", "content": {"a": 1}}], None, r"messages\[0\]\['content'\] must be a str"),
        (load_tokenizer("byte"), weather, [WEATHER], "got tools, but chat_format 'chatml' has no tool-calling format"),
        (load_tokenizer("byte"), weather + [{"role": "tool", "content": "x"}], None,
         r"messages\[1\] is a tool message, but chat_format 'chatml'"),
    ]
    for tok, conv, tools, err in cases:
        with pytest.raises(ValueError, match=err) as e:
            tok.render_chat(conv, tools=tools)
        assert "\n" not in str(e.value)
    # two calls are fine for Qwen3; the Llama template itself raises on them (what the check above mirrors)
    qwen["json"].render_chat(two, tools=[WEATHER])
    # llama3 tools without a user message are fine in the system prompt
    llama["json"].render_chat([{"role": "assistant", "content": "a"}], tools=[WEATHER], tools_in_user_message=False)
    # OpenAI-style "content": null beside tool_calls renders as "" (the templates need a string); without calls it
    # stays an error
    for tok in (llama["json"], qwen["json"]):
        calling = weather + [{"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "a"})]}]
        nulled = [dict(m, content=None) if "tool_calls" in m else m for m in calling]
        assert tok.render_chat(nulled, tools=[WEATHER]) == tok.render_chat(calling, tools=[WEATHER])
        absent = [{k: v for k, v in m.items() if k != "content"} if "tool_calls" in m else m for m in calling]
        assert tok.render_chat(absent, tools=[WEATHER]) == tok.render_chat(calling, tools=[WEATHER])
        with pytest.raises(ValueError, match=r"messages\[1\]\['content'\] must be a str, got NoneType"):
            tok.render_chat(weather + [{"role": "assistant", "content": None}])


def test_tool_jinja_format(llama_jinja_dir, llama):
    """chat_format='jinja' passes tools to the template: same ids and mask as the llama3 renderer."""
    pytest.importorskip("jinja2")
    tok = load_tokenizer(llama_jinja_dir, chat_format="jinja")
    for _, tools, conv, formats in TOOL_CONVS:
        if "llama" in formats:
            assert tok.render_chat(conv, tools=tools, date_string="26 Jul 2024") == \
                llama["json"].render_chat(conv, tools=tools)


def test_tojson_is_transformers():
    from transformers.utils import chat_template_utils as ctu

    assert T.tojson({"a": "ü<>&", "b": [1, 2.5]}) == '{"a": "ü<>&", "b": [1, 2.5]}'  # no HTML escaping, no \\u
    src = Path(ctu.__file__).read_text()
    assert "json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)" in src
