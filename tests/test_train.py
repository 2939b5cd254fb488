"""train.py on CPU: config errors, the demo end to end, FSDP2 (torchrun, gloo) vs one process, grad accumulation,
compile / activation checkpointing, SIGKILL + resume, crash during a checkpoint write, HF export, multi-node HSDP.

    python3 -m pytest -q -x tests/test_train.py          # ~4-5 min on 2 cores
"""
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import data
import generate
import model as M
import train

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """~200 addition problems (GSM8K format) and a shared tokenized-data cache."""
    d = tmp_path_factory.mktemp("data")
    data.make_demo_data(d / "add", n_train=200, n_valid=16, max_value=99)
    return {"path": str(d / "add"), "cache_dir": str(d / "cache")}


def tiny_cfg(tiny_data, out_dir, **sections) -> dict:
    """The YAML dict of a tiny run: tiny_llama, byte tokenizer, packed rows of 128, constant lr, metrics every step."""
    cfg = {
        "dataset": {**tiny_data, "valid_split": "valid", "src_field": "question", "tgt_field": "answer",
                    "max_seq_len": 128, "batch_size": 2, "num_prefetch": 0},
        "model": {"name": "tiny_llama"}, "tokenizer": {"path": "byte"},
        "trainer": {"device": "cpu"}, "optimizer": {"lr": 3e-3},
        "lr_scheduler": {"name": "constant", "warmup_steps": 0},
        "regime": {"num_steps": 4, "publish_metrics_every_n_steps": 1},
        "checkpoint": {"dir": str(out_dir)},
    }
    for section, kv in sections.items():
        cfg.setdefault(section, {}).update(kv)
    return cfg


def write_cfg(cfg: dict, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def losses(out_dir) -> dict[int, float]:
    """step -> training loss from metrics.jsonl (a resumed run's later lines win)."""
    out = {}
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, timeout=300, expect_rc=0):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if expect_rc is not None and p.returncode != expect_rc:
        raise AssertionError(f"{' '.join(map(str, cmd))} -> rc {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def torchrun(nproc, config, *overrides, timeout=300):
    return run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={free_port()}", "train.py", config, *overrides], timeout)


def train_in_process(cfg_dict, tmp_path, name="cfg.yaml"):
    return train.train(train.load_config([write_cfg(cfg_dict, tmp_path / name)]))


def close(a: dict, b: dict, steps, tol):
    for s in steps:
        assert abs(a[s] - b[s]) <= tol, f"step {s}: {a[s]} vs {b[s]}"


# ------------------------------------------------------------------------------------------------------ config


def test_config_parsing_and_overrides(tiny_data, tmp_path, monkeypatch):
    path = write_cfg(tiny_cfg(tiny_data, tmp_path / "out", optimizer={"lr": "3e-5"},
                              trainer={"gradient_accumulation": 3}) | {"checkpoint": {"output_dir": "/tmp/x"}},
                     tmp_path / "c.yaml")
    cfg = train.load_config([path, "optimizer.betas=[0.9,0.99]", "--regime.num_steps=7", "dataset.valid_split=null"])
    assert cfg.optimizer.lr == 3e-5 and isinstance(cfg.optimizer.lr, float)  # YAML's '3e-5' string coerced
    assert cfg.trainer.grad_accum == 3 and cfg.checkpoint.dir == "/tmp/x"      # fairseq2-style aliases
    assert cfg.optimizer.betas == [0.9, 0.99] and cfg.regime.num_steps == 7 and cfg.dataset.valid_split == ""
    assert train.load_config(["--config-file", path, "optimizer.lr=1"]).optimizer.lr == 1.0  # int -> float is fine
    # local model / tokenizer paths are stored absolute: generate.py and --export read them from anywhere
    monkeypatch.chdir(tmp_path)
    assert train.load_config([path, "model.name=", "model.path=.", "tokenizer.path=c.yaml"]).model.path == \
        str(tmp_path) and train.load_config([path, "tokenizer.path=c.yaml"]).tokenizer.path == path


@pytest.mark.parametrize("override, match", [
    ("optimizr.lr=1", r"unknown config key 'optimizr'.*did you mean optimizer"),
    ("trainer.grad_acum=2", r"unknown config key 'trainer.grad_acum'.*did you mean trainer.grad_accum"),
    ("regime.num_steps=1.5", r"regime.num_steps: expected int, got float"),
    ("trainer.compile=1", r"trainer.compile: expected bool, got int"),
    ("trainer.compile=yes", r"trainer.compile: expected bool, got str 'yes'"),  # YAML 1.2: yes is no boolean
    ("optimizer.lr=fast", r"optimizer.lr: expected float, got str"),
    ("regime.num_steps=0", r"regime.num_steps must be >= 1"),
    ("dataset.max_num_tokens=64", r"max_num_tokens=64 < max_seq_len=128"),
    ("trainer.activation_checkpointing=some", r"off\|full\|selective"),
    ("lr_scheduler.name=step", r"cosine\|linear\|wsd\|constant"),
    ("lr_scheduler.decay_fraction=1.5", r"decay_fraction must be in \[0, 1\]"),
    ("checkpoint.export_dtype=fp16", r"checkpoint.export_dtype must be auto\|float32\|bfloat16"),
    ("model.path=/nonexistent/model", r"exactly one of model.name .*name='tiny_llama'.*empty the other"),
    ("regime=3", r"section 'regime' must be a mapping"),
    ("dataset.path=", r"dataset.path is required"),
    ("trainer.dp_replicate=0", r"trainer.dp_replicate must be >= 1"),
    ("num_steps", r"expected section.key=value"),
    ("trainer.profile_steps=[3,2]", r"trainer.profile_steps must be \[\] or \[first, last\]"),
    ("regime.num_data_epochs=-1", r"regime.num_data_epochs must be >= 0"),
    ("optimizer.betas=[0.9", r"override 'optimizer.betas=\[0.9': not valid YAML"),
    ("optimizer.lr=inf", r"need finite lr > 0"),
    ("trainer.seed=-1", r"trainer.seed and num_threads must be >= 0"),
    ("dataset.batch_size=-1", r"dataset.batch_size must be >= 0"),
    ("dataset.min_seq_len=-3", r"need 0 <= min_seq_len <= max_seq_len"),
    pytest.param("trainer.device=cuda", r"trainer.device=cuda, but this torch .* sees no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
])
def test_config_errors(tiny_data, tmp_path, override, match):
    path = write_cfg(tiny_cfg(tiny_data, tmp_path / "out", dataset={"batch_size": 0}), tmp_path / "c.yaml")
    with pytest.raises(ValueError, match=match):
        train.load_config([path, override])


def test_config_missing_files(tiny_data, tmp_path):
    path = write_cfg(tiny_cfg(tiny_data, tmp_path / "out"), tmp_path / "c.yaml")
    with pytest.raises(FileNotFoundError, match="dataset.path not found"):
        train.load_config([path, "dataset.path=/nonexistent/data.jsonl"])
    with pytest.raises(FileNotFoundError, match="model.path not found"):
        train.load_config([path, "model.name=", "model.path=/nonexistent/model"])
    with pytest.raises(FileNotFoundError, match="config file not found"):
        train.load_config([str(tmp_path / "missing.yaml")])
    (tmp_path / "broken.yaml").write_text("dataset:\n  path: [unclosed\nmodel:\n  name: x\n")
    with pytest.raises(ValueError, match=f"{tmp_path / 'broken.yaml'}, line 3 column 6: not valid YAML"):
        train.load_config([str(tmp_path / "broken.yaml")])
    with pytest.raises(SystemExit, match="config error: .*unknown config key"):  # the CLI: one line, no traceback
        train.main([path, "bogus.key=1"])
    with pytest.raises(FileNotFoundError, match="evaluation.split: .*missing.jsonl not found"):
        train.load_config([path, f"evaluation.split={tmp_path / 'missing.jsonl'}"])


def test_yaml_merge_keys_and_anchors(tiny_data, tmp_path):
    """`<<: *anchor` (a source list's shared fields) still loads: its keys may be overridden, as YAML allows."""
    path = write_cfg(tiny_cfg(tiny_data, tmp_path / "out"), tmp_path / "c.yaml")
    text = Path(path).read_text().replace("optimizer:\n", "optimizer: &opt\n") + "lr_scheduler:\n  <<: *opt\n"
    text = text.replace("lr_scheduler:\n  name: constant\n  warmup_steps: 0\n", "")
    Path(path).write_text(text)
    with pytest.raises(ValueError, match="unknown config key 'lr_scheduler.lr'"):  # the merged keys did arrive
        train.load_config([path])


def test_config_keys_given_twice_are_errors(tiny_data, tmp_path):
    """PyYAML keeps the last of two equal keys: a second `trainer:` section silently dropped the first; an alias
    beside its key (gradient_accumulation and grad_accum) silently lost one value."""
    path = write_cfg(tiny_cfg(tiny_data, tmp_path / "out"), tmp_path / "c.yaml")
    text = Path(path).read_text()
    Path(path).write_text(text + "trainer:\n  seed: 5\n")
    with pytest.raises(ValueError, match=r"line \d+ column 1: not valid YAML \(key 'trainer' given twice"):
        train.load_config([path])
    Path(path).write_text(text.replace("trainer:\n", "trainer:\n  gradient_accumulation: 4\n  grad_accum: 2\n"))
    with pytest.raises(ValueError, match="'trainer.gradient_accumulation' and 'trainer.grad_accum' set the same key"):
        train.load_config([path])
    # on the command line a later override wins, as for any key; an empty value clears a list
    Path(path).write_text(text)
    cfg = train.load_config([path, "trainer.gradient_accumulation=4", "trainer.grad_accum=2", "trainer.profile_steps="])
    assert cfg.trainer.grad_accum == 2 and cfg.trainer.profile_steps == []


def test_yaml_off_on_yes_no_are_strings(tiny_data, tmp_path):
    """Config YAML is read with YAML 1.2's booleans (true / false in any case): PyYAML's YAML 1.1 reads off / on /
    yes / no as booleans, so the README's `activation_checkpointing: off` failed as `expected str, got bool False`."""
    path = write_cfg(tiny_cfg(tiny_data, tmp_path / "out"), tmp_path / "c.yaml")
    text = Path(path).read_text().replace("trainer:\n", "trainer:\n  activation_checkpointing: off\n  compile: TRUE\n")
    Path(path).write_text(text)
    cfg = train.load_config([path])
    assert cfg.trainer.activation_checkpointing == "off" and cfg.trainer.compile is True
    cfg = train.load_config([path, "trainer.activation_checkpointing=off", "trainer.compile=False"])
    assert cfg.trainer.activation_checkpointing == "off" and cfg.trainer.compile is False
    with pytest.raises(ValueError, match="activation_checkpointing must be off.full.selective, got 'on'"):
        train.load_config([path, "trainer.activation_checkpointing=on"])


def test_config_errors_name_the_key_or_file_and_print_on_rank_0_only(tiny_data, tmp_path, monkeypatch):
    """checkpoint.dir on a file (or under one) names the key, not only OSError's text; a malformed model config.json
    names the file; under torchrun only rank 0 prints a config error, the others exit 1 silently."""
    (tmp_path / "afile").write_text("")
    path = write_cfg(tiny_cfg(tiny_data, tmp_path / "afile"), tmp_path / "c.yaml")
    with pytest.raises(ValueError, match=f"checkpoint.dir {tmp_path / 'afile'} is a file, not a directory"):
        train.load_config([path])
    cfg = train.load_config([path, f"checkpoint.dir={tmp_path / 'afile' / 'out'}"])
    with pytest.raises(OSError, match=f"checkpoint.dir {tmp_path / 'afile' / 'out'}: cannot create it "
                                      r"\(Not a directory\)"):
        train.train(cfg)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"not": "json\n')
    with pytest.raises(ValueError, match=f"{tmp_path / 'model' / 'config.json'}: not valid JSON"):
        train.checkpoint_dtype(tmp_path / "model", torch.float32)
    monkeypatch.setenv("RANK", "1")  # rank 0 prints it (test_config_missing_files)
    with pytest.raises(SystemExit) as e:
        train.main([path, "bogus.key=1"])
    assert e.value.code == 1  # the status of a one-line error, with nothing printed


def test_settings_that_do_nothing_are_noted(tiny_data, tmp_path, monkeypatch, capsys):
    """Periodic validation without dataset.valid_split, periodic evaluation without evaluation.split: a note each
    (before the data is read: the fake tokenizer load ends the run there)."""
    def stop(*a, **kw):
        raise RuntimeError("stop here")
    monkeypatch.setattr(train, "load_tokenizer", stop)
    cfg = tiny_cfg(tiny_data, tmp_path / "out", dataset={"valid_split": ""},
                   regime={"validate_every_n_steps": 1}, evaluation={"every_n_steps": 2})
    with pytest.raises(RuntimeError, match="stop here"):
        train_in_process(cfg, tmp_path)
    out = capsys.readouterr().out
    assert "note: regime.validate_every_n_steps=1 does nothing without dataset.valid_split" in out
    assert "note: evaluation.every_n_steps=2 does nothing without evaluation.split" in out
    # validation or evaluation on the train split measures the training data: said, not silent
    cfg = tiny_cfg(tiny_data, tmp_path / "out", dataset={"valid_split": "train"}, evaluation={"split": "train"})
    with pytest.raises(RuntimeError, match="stop here"):
        train_in_process(cfg, tmp_path)
    out = capsys.readouterr().out
    for key in ("dataset.valid_split", "evaluation.split"):
        assert f"note: {key}=train is the train split: it measures the training data, not held-out data" in out


def test_hub_errors_name_the_key_the_tokenizer_came_from(tiny_data, tmp_path, monkeypatch):
    """With tokenizer.path empty the tokenizer is fetched from model.path: its errors name model.path (not an unset
    tokenizer.path), and only the tokenizer's small files are fetched first."""
    seen = []

    def hub_snapshot(url, what, repo_type, tokenizer_only=False):
        seen.append((what, tokenizer_only))
        raise FileNotFoundError(f"{what} {url}: cannot get Hub {repo_type}")
    monkeypatch.setattr(train.data, "hub_snapshot", hub_snapshot)
    cfg = tiny_cfg(tiny_data, tmp_path / "out", model={"name": "", "path": "hg://org/name"}, tokenizer={"path": ""})
    with pytest.raises(FileNotFoundError, match=r"^model.path \(the tokenizer's source: tokenizer.path is empty\) "
                                                "hg://org/name: cannot get Hub model"):
        train_in_process(cfg, tmp_path)
    cfg["tokenizer"]["path"] = "hg://org/tok"
    with pytest.raises(FileNotFoundError, match="^tokenizer.path hg://org/tok: cannot get Hub model"):
        train_in_process(cfg, tmp_path)
    assert [tokenizer_only for _, tokenizer_only in seen] == [True, True]


def test_fresh_run_into_a_directory_with_checkpoints_is_refused(tiny_data, tmp_path):
    """checkpoint.resume=false where an earlier run left checkpoints: its pruning would delete the new run's own
    checkpoint (the old one has the higher step) and the next resume would pick the old run."""
    out = tmp_path / "out"
    (out / "checkpoints" / "step_00000004").mkdir(parents=True)
    (out / "checkpoints" / "step_00000004" / "trainer_state.pt").write_bytes(b"")
    path = write_cfg(tiny_cfg(tiny_data, out), tmp_path / "c.yaml")
    assert train.load_config([path]).checkpoint.resume  # resuming it is fine (the default)
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run .newest step_00000004"):
        train.load_config([path, "checkpoint.resume=false"])


def test_process_group_timeout_is_the_configured_one(tiny_data, tmp_path, monkeypatch):
    """NCCL's default 10 min would kill ranks waiting while rank 0 downloads / exports a large model."""
    seen = {}

    def fake_init(backend, **kw):
        seen.update(kw)
        raise RuntimeError("stop here")
    monkeypatch.setattr(train.dist, "init_process_group", fake_init)
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    path = write_cfg(tiny_cfg(tiny_data, tmp_path / "out", trainer={"device": "cpu", "dist_timeout_minutes": 90}),
                     tmp_path / "c.yaml")
    with pytest.raises(RuntimeError, match="stop here"):
        train.train(train.load_config([path]))
    assert seen["timeout"].total_seconds() == 90 * 60


def get_lr_then_ctrl_c(step, cfg, presses=1):
    if step == 2:
        for _ in range(presses):
            os.kill(os.getpid(), signal.SIGINT)
    return LR(step, cfg)


LR = train.get_lr
LR_BUILD = train.build_optimizer


def test_ctrl_c_checkpoints_then_resume_says_what_changed_and_export_takes_the_run(tiny_data, tmp_path, monkeypatch,
                                                                                    capsys):
    """Ctrl-C ends the step, writes a checkpoint and stops (a second one quits at once); a resume with another
    num_steps says so; `--export RUN_DIR` exports the run's newest checkpoint."""
    handler = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(train, "get_lr", get_lr_then_ctrl_c)
    cfg = tiny_cfg(tiny_data, tmp_path / "out", dataset={"valid_split": ""})
    assert train_in_process(cfg, tmp_path)["stopped"]
    assert "got SIGINT: checkpoint and stop (Ctrl-C again quits without it)" in capsys.readouterr().out
    assert [p.name for p in train.complete_checkpoints(tmp_path / "out" / "checkpoints")] == ["step_00000003"]
    assert signal.getsignal(signal.SIGINT) is handler  # restored

    monkeypatch.setattr(train, "get_lr", lambda step, cfg: get_lr_then_ctrl_c(step, cfg, presses=2))
    with pytest.raises(KeyboardInterrupt):
        train_in_process(tiny_cfg(tiny_data, tmp_path / "out2", dataset={"valid_split": ""}), tmp_path, "c2.yaml")
    assert signal.getsignal(signal.SIGINT) is handler and not (tmp_path / "out2" / "checkpoints").exists()

    monkeypatch.setattr(train, "get_lr", LR)
    cfg["regime"]["num_steps"] = 2
    assert train_in_process(cfg, tmp_path)["step"] == 3
    out = capsys.readouterr().out
    assert "the optimizer / lr schedule differs from the checkpoint's run (regime.num_steps: 4 -> 2)" in out
    assert "the checkpoint is at step 3 and regime.num_steps=2: nothing left to train" in out
    # the checkpoint's optimizer state carries its hyperparameters: the new config's must win, and say so
    built = []
    monkeypatch.setattr(train, "build_optimizer", lambda *a, **kw: built.append(LR_BUILD(*a, **kw)) or built[-1])
    cfg["regime"]["num_steps"] = 4
    cfg["optimizer"].update(weight_decay=0.5, betas=[0.5, 0.6], eps=1e-3)
    assert train_in_process(cfg, tmp_path)["step"] == 4
    assert "(optimizer.betas: [0.9, 0.95] -> [0.5, 0.6]; optimizer.weight_decay: 0.1 -> 0.5; optimizer.eps: 1e-08 " \
        "-> 0.001): it continues from step 3 with the new settings" in capsys.readouterr().out
    assert [(g["weight_decay"], g["betas"], g["eps"]) for g in built[0].param_groups] == \
        [(0.5, (0.5, 0.6), 1e-3), (0.0, (0.5, 0.6), 1e-3)]
    monkeypatch.setattr(train, "build_optimizer", LR_BUILD)
    train.main(["--export", str(tmp_path / "out"), str(tmp_path / "hf")])
    assert "exporting the newest checkpoint of the run: " in capsys.readouterr().out
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    with pytest.raises(SystemExit, match="error: not a complete checkpoint"):  # one line, no traceback
        train.main(["--export", str(tmp_path / "nothing"), str(tmp_path / "hf")])
    # the run's tokenizer is gone (its config names a moved directory): say so and how to export anyway
    ckpt = train.complete_checkpoints(tmp_path / "out" / "checkpoints")[-1]
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    state["config"]["tokenizer"]["path"] = str(tmp_path / "moved_tokenizer")
    torch.save(state, ckpt / "trainer_state.pt")
    with pytest.raises(SystemExit, match=r"error: tokenizer.path: .*moved_tokenizer does not exist \(the run's "
                                         r"tokenizer, as its config names it\): pass --tokenizer PATH"):
        train.main(["--export", str(ckpt), str(tmp_path / "hf2")])
    train.main(["--export", str(ckpt), str(tmp_path / "hf2"), "--tokenizer", "byte"])
    assert (tmp_path / "hf2" / "model.safetensors").is_file()


def test_evaluation_never_reads_a_single_train_file(tiny_data, tmp_path):
    """One data file is the train split: evaluation.split=valid on it must not score the training questions."""
    train_file = str(Path(tiny_data["path"]) / "train.jsonl")
    path = write_cfg(tiny_cfg(tiny_data, tmp_path / "out", dataset={"path": train_file, "valid_split": ""},
                              evaluation={"split": "valid"}), tmp_path / "c.yaml")
    with pytest.raises(ValueError, match="is one file"):
        train.load_eval_examples(train.load_config([path]))
    valid_file = str(Path(tiny_data["path"]) / "valid.jsonl")  # a .jsonl evaluation.split is read as given
    assert len(train.load_eval_examples(train.load_config([path, f"evaluation.split={valid_file}"]))) == 16


def test_an_evaluation_split_without_gold_answers_fails_at_start(tiny_data, tmp_path, capsys):
    """Every example without a '#### N' answer would score nothing, found only at the end of the run: an error at
    load time; some without one are noted (evaluate_gsm8k skips and counts them)."""
    rows = [{"question": "What is 1 + 1?", "answer": "2"}] * 3
    (tmp_path / "no_gold.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = write_cfg(tiny_cfg(tiny_data, tmp_path / "out", evaluation={"split": str(tmp_path / "no_gold.jsonl")}),
                     tmp_path / "c.yaml")
    with pytest.raises(ValueError, match=r"none of its 3 examples has a '#### N' answer"):
        train.load_eval_examples(train.load_config([path]))
    (tmp_path / "no_gold.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + [{"question": "q",
                                                                                           "answer": "#### 4"}]))
    assert len(train.load_eval_examples(train.load_config([path]))) == 4
    assert "3 of 4 examples have no '#### N' answer" in capsys.readouterr().out


def test_evaluation_fields_are_checked_at_start(tiny_data, tmp_path):
    """A number or a null where the question or answer should be: one line naming file:line when the split is read,
    not a traceback (or an error after the whole run trained) when the evaluation reaches it."""
    good = {"question": "What is 1 + 1?", "answer": "#### 2"}
    for bad, msg in (({"question": "q", "answer": 4}, r"field 'answer' must be a string, got int"),
                     ({"question": None, "answer": "#### 2"}, r"field 'question' must be a string, got NoneType"),
                     ({"question": "q"}, r"missing field 'answer'")):
        f = tmp_path / "ev.jsonl"
        f.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        path = write_cfg(tiny_cfg(tiny_data, tmp_path / "out", evaluation={"split": str(f)}), tmp_path / "c.yaml")
        with pytest.raises(ValueError, match=rf"evaluation.split=.*ev\.jsonl: .*ev\.jsonl:2: {msg}"):
            train.load_eval_examples(train.load_config([path]))
        with pytest.raises(ValueError, match=rf"ev\.jsonl:2: {msg}"):  # generate.py --gsm8k reads it the same way
            generate.load_jsonl(f)
        assert generate.load_jsonl(f, limit=1) == [good]  # --limit 1: the bad row after it is not read


def test_lr_schedule():
    cfg = train.Config()
    cfg.regime.num_steps, cfg.optimizer.lr = 110, 1.0
    cfg.lr_scheduler.warmup_steps, cfg.lr_scheduler.final_lr_scale = 10, 0.1
    assert train.get_lr(0, cfg) == pytest.approx(1 / 11) and train.get_lr(10, cfg) == pytest.approx(1.0)
    assert train.get_lr(60, cfg) == pytest.approx(0.55) and train.get_lr(110, cfg) == pytest.approx(0.1)
    cfg.lr_scheduler.name = "linear"
    assert train.get_lr(60, cfg) == pytest.approx(0.55) and train.get_lr(35, cfg) == pytest.approx(0.775)
    cfg.lr_scheduler.name, cfg.lr_scheduler.decay_fraction = "wsd", 0.2  # decay over steps 88..110
    assert train.get_lr(5, cfg) == pytest.approx(6 / 11) and train.get_lr(88, cfg) == 1.0
    assert train.get_lr(99, cfg) == pytest.approx(0.55) and train.get_lr(110, cfg) == pytest.approx(0.1)
    cfg.lr_scheduler.name = "constant"
    assert train.get_lr(100, cfg) == 1.0


def test_peak_flops_by_device_name():
    assert train.peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and train.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert train.peak_flops("NVIDIA H100 NVL") == 835e12 and train.peak_flops("NVIDIA H200") == 989e12
    assert train.peak_flops("NVIDIA GeForce RTX 4090") is None and train.peak_flops(torch.device("cpu")) is None


# -------------------------------------------------------------------------------------------------- training


def test_logged_mfu_is_model_flops_of_the_real_tokens(tiny_data, tmp_path, monkeypatch):
    """mfu = model FLOPs / time / peak, the FLOPs summed over micro-batches: real (non-pad) tokens x
    model.flops_per_token with attention over each document (span sum(n^2) / sum(n)), not over the packed row."""
    monkeypatch.setattr(train, "peak_flops", lambda device: 1e12)
    cfg = tiny_cfg(tiny_data, tmp_path / "out", trainer={"device": "cpu", "grad_accum": 2},
                   dataset={"valid_split": "", "shuffle": False})
    train_in_process(cfg, tmp_path)
    recs = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    loader = data.build_loader(train.load_config([write_cfg(cfg, tmp_path / "c.yaml")]).dataset,
                               train.load_tokenizer("byte", "", ""), "train")
    args = M.get_preset("tiny_llama")
    for step in range(4):  # the same batches the run took (one rank, 2 micro-batches a step)
        batches = [next(loader) for _ in range(2)]
        want = sum(b.num_tokens * M.flops_per_token(args, b.doc_len_sq / b.num_tokens) for b in batches)
        tokens = sum(b.num_tokens for b in batches)
        assert recs[step]["step"] == step + 1 and recs[step]["mfu"] * 1e12 / recs[step]["tokens_per_s"] == \
            pytest.approx(want / tokens)
        assert batches[0].doc_len_sq < batches[0].tokens.shape[1] * batches[0].num_tokens  # documents < rows


def test_num_data_epochs_limits_the_run_and_the_schedule(tiny_data, tmp_path, capsys):
    """regime.num_data_epochs: the run ends after N passes (ceil(N x batches per epoch / (world x grad_accum))
    steps) when that comes before num_steps, and the lr schedule ends there too; num_steps still binds if earlier."""
    cfg = tiny_cfg(tiny_data, tmp_path / "a", regime={"num_steps": 1000, "num_data_epochs": 2},
                   trainer={"grad_accum": 3}, dataset={"valid_split": ""},
                   lr_scheduler={"name": "linear", "final_lr_scale": 0.0})
    res = train_in_process(cfg, tmp_path, "a.yaml")
    per_epoch = data.build_loader(train.load_config([write_cfg(cfg, tmp_path / "a.yaml")]).dataset,
                                  train.load_tokenizer("byte", "", ""), "train").batches_per_epoch
    expected = -(-2 * per_epoch // 3)
    assert 2 < expected < 1000 and res["step"] == expected
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert lrs[-1] == pytest.approx(3e-3 / expected)  # the linear decay ends with the run (lr of the last step)
    out = capsys.readouterr().out
    assert "set by the data epochs" in out
    # 3 batches a step: the last step reaches past the 2 epochs: fillers there, the loader stops at the epochs' end
    assert 2 * per_epoch % 3 and f"the last step has {2 * per_epoch % 3} of its 3 batches" in out
    ckpt = train.complete_checkpoints(tmp_path / "a" / "checkpoints")[-1]
    loader = torch.load(ckpt / "trainer_state.pt", weights_only=False)["loader"]
    assert (loader["epoch"], loader["index"]) == (2, 0)
    cfg = tiny_cfg(tiny_data, tmp_path / "b", regime={"num_steps": 2, "num_data_epochs": 2}, dataset={"valid_split": ""})
    assert train_in_process(cfg, tmp_path, "b.yaml")["step"] == 2
    assert "set by regime.num_steps (raise it for all 2 epochs)" in capsys.readouterr().out
    # stopped at step 3, resumed with twice the batches per step (as at twice the world size): what is left of the
    # 2 epochs is counted from the loader's position, so the run still ends after 2 epochs of data
    cfg["regime"]["num_steps"] = 3
    train_in_process(cfg, tmp_path, "b.yaml")
    cfg["regime"]["num_steps"], cfg["trainer"] = 1000, {**cfg["trainer"], "grad_accum": 2}
    assert train_in_process(cfg, tmp_path, "b2.yaml")["step"] == 3 + -(-(2 * per_epoch - 3) // 2)


def test_profile_steps_write_a_trace_and_a_table(tiny_data, tmp_path, capsys):
    """trainer.profile_steps=[2, 3]: a chrome trace of steps 2-3 and the top ops on stdout; a range past the end of
    the run is closed at the last step."""
    cfg = tiny_cfg(tiny_data, tmp_path / "out", regime={"num_steps": 4}, trainer={"profile_steps": [2, 3]},
                   dataset={"valid_split": ""})
    train_in_process(cfg, tmp_path)
    trace = json.loads((tmp_path / "out" / "profile" / "steps_2-3_rank0.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "aten::mm" in names or "aten::addmm" in names, sorted(names)[:50]
    out = capsys.readouterr().out
    assert "profile of steps 2-3" in out and "Self CPU" in out
    cfg = tiny_cfg(tiny_data, tmp_path / "late", regime={"num_steps": 2}, trainer={"profile_steps": [2, 9]},
                   dataset={"valid_split": ""})
    train_in_process(cfg, tmp_path, "late.yaml")
    assert (tmp_path / "late" / "profile" / "steps_2-2_rank0.json").is_file()


def test_untrained_special_tokens_the_data_uses_are_fixed_at_load(tiny_data, tmp_path, capsys):
    """A pretrained model whose <|eos|> (trained on: the end of every target) and <|im_start|> (unused by this data)
    rows are zero, as Llama 3 base's chat tokens: train.py sets the used one to the mean embedding and says so."""
    import model as model_lib
    m = model_lib.Transformer(model_lib.get_preset("tiny_llama"))
    m.init_weights()
    with torch.no_grad():
        m.tok_embeddings.weight[[257, 259]] = 0.0
    model_lib.save_hf(m, m.args, tmp_path / "base")
    cfg = tiny_cfg(tiny_data, tmp_path / "out", model={"name": "", "path": str(tmp_path / "base")},
                   regime={"num_steps": 1}, dataset={"valid_split": ""})
    train_in_process(cfg, tmp_path)
    out = capsys.readouterr().out
    assert "model: 2 untrained (all-zero) embedding rows; the data uses 1, set to the mean embedding: <|eos|>" in out
    assert data.ids_present(data.build_loader(train.load_config([write_cfg(cfg, tmp_path / "c.yaml")]).dataset,
                                              train.load_tokenizer("byte", "", ""), "train").data, [257, 259]) == [257]


def test_hf_export_keeps_the_pretrained_generation_config(tiny_data, tmp_path):
    """An Instruct model's sampling defaults (generation_config.json) survive fine-tuning, as with transformers'
    save_pretrained; eos ids are the tokenizer's stop ids; config.json has no pad_token_id (HF's padding_idx)."""
    import model as model_lib
    m = model_lib.Transformer(model_lib.get_preset("tiny_llama"))
    m.init_weights()
    model_lib.save_hf(m, m.args, tmp_path / "base")
    (tmp_path / "base" / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": 5, "transformers_version": "4.45.0"}))
    cfg = tiny_cfg(tiny_data, tmp_path / "out", model={"name": "", "path": str(tmp_path / "base")},
                   regime={"num_steps": 1}, dataset={"valid_split": ""}, checkpoint={"export_hf": True})
    train_in_process(cfg, tmp_path)
    train.main(["--export", str(tmp_path / "out"), str(tmp_path / "hf2")])
    for hf_dir in (tmp_path / "out" / "hf", tmp_path / "hf2"):
        gen = json.loads((hf_dir / "generation_config.json").read_text())
        assert gen == {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [257, 260],
                       "bos_token_id": 256, "pad_token_id": 258}, gen
        config = json.loads((hf_dir / "config.json").read_text())
        assert config["eos_token_id"] == [257, 260] and "pad_token_id" not in config


def test_hf_export_dtype(tiny_data, tmp_path):
    """checkpoint.export_dtype: auto = the training dtype (float32 on one CPU process, bfloat16 when training in
    bf16); the files, config.json and `--export` of the checkpoint agree, and transformers loads them."""
    transformers = pytest.importorskip("transformers")
    from safetensors import safe_open
    for name, trainer, export, want in [("fp32", {}, "auto", "float32"),
                                        ("bf16", {"dtype": "bfloat16"}, "auto", "bfloat16"),
                                        ("forced", {}, "bfloat16", "bfloat16")]:
        cfg = tiny_cfg(tiny_data, tmp_path / name, regime={"num_steps": 1}, trainer=trainer,
                       dataset={"valid_split": ""}, checkpoint={"export_hf": True, "export_dtype": export})
        train_in_process(cfg, tmp_path, f"{name}.yaml")
        ckpt = train.complete_checkpoints(tmp_path / name / "checkpoints")[-1]
        train.main(["--export", str(ckpt), str(tmp_path / name / "hf2")])
        for hf_dir in (tmp_path / name / "hf", tmp_path / name / "hf2"):
            with safe_open(hf_dir / "model.safetensors", "pt") as f:
                assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {f"torch.{want}"}, (name, hf_dir)
            assert json.loads((hf_dir / "config.json").read_text())["dtype"] == want
        ours, _ = train.load_checkpoint_model(ckpt)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name / "hf", dtype=torch.float32)
        tokens = torch.randint(0, 261, (1, 12))
        with torch.no_grad():
            tol = 1e-4 if want == "float32" else 5e-2
            torch.testing.assert_close(hf(tokens).logits, ours(tokens), atol=tol, rtol=tol)


def test_demo_short_and_hf_export(tmp_path):
    """The README's demo config, shortened: loss falls, accuracy is printed at step 0 and at the end, and the HF
    export (end of training, and `--export` of the checkpoint) loads in transformers with our logits."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "demo"
    p = run([sys.executable, "train.py", "configs/demo.yaml", f"checkpoint.dir={out}", f"dataset.path={out}/data",
             f"dataset.cache_dir={out}/cache", "dataset.demo_n_train=400", "dataset.demo_n_valid=8",
             "dataset.batch_size=2", "trainer.num_threads=1", "regime.num_steps=12", "regime.validate_every_n_steps=6",
             "regime.publish_metrics_every_n_steps=3", "evaluation.limit=4", "evaluation.max_new_tokens=8"])
    assert "step 0: gsm8k accuracy" in p.stdout and "step 12: gsm8k accuracy" in p.stdout, p.stdout[-2000:]
    assert (out / "config.yaml").is_file() and "step 12: validation loss" in p.stdout
    preds = [json.loads(line) for line in (out / "eval" / "step_00000012.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and {"question", "gold", "prediction", "correct", "completion"} <= preds[0].keys()
    curve = losses(out)
    assert curve[12] < curve[3] - 0.5, curve

    ckpt = train.complete_checkpoints(out / "checkpoints")[-1]
    ours, _ = train.load_checkpoint_model(ckpt)
    run([sys.executable, "train.py", "--export", str(ckpt), str(tmp_path / "hf2")])
    tokens = torch.randint(0, 261, (2, 24))
    with torch.no_grad():
        want = ours(tokens)
    for hf_dir in (out / "hf", tmp_path / "hf2"):
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(hf(tokens).logits, want, atol=1e-4, rtol=1e-4)
        gen = json.loads((hf_dir / "generation_config.json").read_text())
        assert 257 in gen["eos_token_id"] and 260 in gen["eos_token_id"]  # byte tokenizer: <|eos|>, <|im_end|>


@pytest.fixture(scope="module")
def reference_run(tiny_data, tmp_path_factory):
    """One process, grad_accum 2, 7 steps of tiny_qwen3 (tied embeddings, QK-norm): the run FSDP must match."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = tiny_cfg(tiny_data, tmp / "out", model={"name": "tiny_qwen3"}, trainer={"grad_accum": 2},
                   regime={"num_steps": 7})
    train_in_process(cfg, tmp)
    return cfg, losses(tmp / "out")


def test_fsdp_two_ranks_match_one_and_resume_on_one_rank(reference_run, tmp_path):
    """2 ranks x grad_accum 1 (FSDP2, gloo) == 1 rank x grad_accum 2 on the same global batches, to 1e-4; then the
    2-rank checkpoint (step 5) resumed by ONE rank continues the same curve."""
    cfg, ref = reference_run
    cfg = json.loads(json.dumps(cfg))
    cfg["checkpoint"]["dir"] = str(tmp_path / "out")
    cfg["trainer"]["grad_accum"] = 1
    cfg["regime"]["num_steps"] = 5
    cfg["evaluation"] = {"split": "valid", "at_start": False, "limit": 3, "batch_size": 2, "max_new_tokens": 4}
    p = torchrun(2, write_cfg(cfg, tmp_path / "c2.yaml"))
    assert "world 2 | device cpu | FSDP2" in p.stdout and "step 5: gsm8k accuracy" in p.stdout  # sharded generation
    two = losses(tmp_path / "out")
    close(two, ref, range(1, 6), 1e-4)
    assert [p.name for p in train.complete_checkpoints(tmp_path / "out" / "checkpoints")] == ["step_00000005"]

    cfg["trainer"]["grad_accum"] = 2
    cfg["regime"]["num_steps"] = 7
    del cfg["evaluation"]
    result = train_in_process(cfg, tmp_path, "c1.yaml")
    assert result["step"] == 7
    close(losses(tmp_path / "out"), ref, [6, 7], 1e-4)


def test_fsdp_two_ranks_bf16_mixed_precision_tracks_fp32(reference_run, tmp_path):
    """The multi-GPU precision path on CPU: 2 ranks, FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce fp32), so
    the fused linear-CE and every matmul run on bf16 parameters under FSDP; the curve stays near the fp32 one.
    (With trainer.reshard_after_forward=false: blocks stay gathered from forward to backward.)"""
    cfg, ref = reference_run
    cfg = json.loads(json.dumps(cfg))
    cfg["checkpoint"]["dir"] = str(tmp_path / "out")
    cfg["trainer"].update(grad_accum=1, dtype="bfloat16", reshard_after_forward=False)
    cfg["regime"]["num_steps"] = 4
    p = torchrun(2, write_cfg(cfg, tmp_path / "c.yaml"))
    assert "world 2 | device cpu | FSDP2 | dtype torch.bfloat16 |" in p.stdout, p.stdout[-2000:]
    got = losses(tmp_path / "out")
    close(got, ref, range(1, 5), 0.01 * ref[1])
    assert [got[s] for s in range(1, 5)] != [ref[s] for s in range(1, 5)]  # bf16 did run


SIGNAL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {root!r})
import train
get_lr = train.get_lr
def get_lr_then_signal(step, cfg):  # rank 1 alone gets SIGTERM while step 3 starts
    if step == 2 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGTERM)
    return get_lr(step, cfg)
train.get_lr = get_lr_then_signal
train.main(sys.argv[1:])
"""


def test_sigterm_on_one_rank_checkpoints_and_stops_all_then_resumes(reference_run, tmp_path):
    """Preemption: SIGTERM reaches rank 1 only, during step 3. Both ranks finish step 3, agree to stop (through the
    step's loss all-reduce), write the step-3 checkpoint and exit 143 (128 + SIGTERM: not a finished run); one process
    resumes it on the reference curve."""
    cfg, ref = reference_run
    cfg = json.loads(json.dumps(cfg))
    cfg["checkpoint"]["dir"] = str(tmp_path / "out")
    cfg["trainer"]["grad_accum"] = 1
    (tmp_path / "sig.py").write_text(SIGNAL_SCRIPT.format(root=str(ROOT)))
    p = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
             str(tmp_path / "sig.py"), write_cfg(cfg, tmp_path / "c2.yaml")], expect_rc=1)  # not a finished run
    assert "exitcode  : 143" in p.stderr  # the workers exit 128 + SIGTERM
    assert "rank 1: got SIGTERM" in p.stdout and "rank 0: got" not in p.stdout, p.stdout[-3000:]
    assert "step 3: saved checkpoint" in p.stdout and "step 3: stopped by a signal" in p.stdout
    assert [c.name for c in train.complete_checkpoints(tmp_path / "out" / "checkpoints")] == ["step_00000003"]
    close(losses(tmp_path / "out"), ref, [1, 2, 3], 1e-4)
    assert max(losses(tmp_path / "out")) == 3

    cfg["trainer"]["grad_accum"] = 2
    assert train_in_process(cfg, tmp_path, "c1.yaml")["step"] == 7
    close(losses(tmp_path / "out"), ref, range(1, 8), 1e-4)


def test_a_data_error_on_two_ranks_is_one_line_on_each(tiny_data, tmp_path):
    """Rank 0 builds the token cache while rank 1 waits: its error must reach rank 1 as well, not a lost connection."""
    cfg = tiny_cfg(tiny_data, tmp_path / "out", dataset={"max_seq_len": 9, "cache_dir": str(tmp_path / "cache")})
    p = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
             "train.py", write_cfg(cfg, tmp_path / "c.yaml")], expect_rc=1)
    out = p.stdout + p.stderr  # the two ranks write at once: their lines may interleave
    assert out.count("error: ") == 2 and out.count("no usable examples (read 200") == 2, out[-4000:]
    assert "error: rank 0 could not build the dataset" in out and "Connection" not in out


def test_an_error_on_rank_0_alone_is_one_line_on_the_other(tiny_data, tmp_path):
    """Rank 0 fails alone (its checkpoint write: checkpoints/ is a file): rank 1's barrier then fails with a transport
    error; it says so in one line, so that rank 0's own error is not buried under its traceback."""
    cfg = tiny_cfg(tiny_data, tmp_path / "out", regime={"num_steps": 1}, dataset={"valid_split": ""})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "checkpoints").write_text("")
    p = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
             "train.py", write_cfg(cfg, tmp_path / "c.yaml")], expect_rc=1)
    out = p.stdout + p.stderr
    assert "error: [Errno 20] Not a directory" in out, out[-4000:]
    assert "rank 1: stopped: another rank failed (its error is above)" in out and "[rank1]: Traceback" not in out


def test_multinode_hsdp_smoke(reference_run, tmp_path):
    """Two torchrun launches (--nnodes=2, one process each) on localhost form one job; trainer.dp_replicate=2 makes
    the mesh 2 (replicate) x 1 (shard): HSDP. Same curve as one process."""
    cfg, ref = reference_run
    cfg = json.loads(json.dumps(cfg))
    cfg["checkpoint"]["dir"] = str(tmp_path / "out")
    cfg["trainer"].update(grad_accum=1, dp_replicate=2)
    cfg["regime"].update(num_steps=3)
    path, port = write_cfg(cfg, tmp_path / "c.yaml"), free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={r}", "--master_addr=127.0.0.1", f"--master_port={port}", "train.py", path],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "world 2" in outs[0]
    close(losses(tmp_path / "out"), ref, [1, 2, 3], 1e-4)


def test_compile_and_activation_checkpointing_match_eager(tiny_data, tmp_path):
    """Per-block compile (inductor on CPU) and full / selective activation checkpointing give the eager losses."""
    base = tiny_cfg(tiny_data, tmp_path / "eager", regime={"num_steps": 3}, dataset={"valid_split": ""})
    train_in_process(base, tmp_path)
    ref = losses(tmp_path / "eager")
    for name, trainer in [("full", {"activation_checkpointing": "full"}),
                          ("selective", {"activation_checkpointing": "selective"}),
                          ("compile", {"compile": True})]:
        cfg = json.loads(json.dumps(base))
        cfg["checkpoint"]["dir"] = str(tmp_path / name)
        cfg["trainer"].update(trainer)
        train_in_process(cfg, tmp_path, f"{name}.yaml")
        close(losses(tmp_path / name), ref, [1, 2, 3], 1e-5 if name != "compile" else 1e-3)


def test_one_rank_bf16_autocast_trains_validates_and_evaluates(tiny_data, tmp_path, capsys):
    """trainer.dtype=bfloat16 on one process (train.py's one-GPU path, here on CPU): bf16 autocast over fp32 weights
    trains near the fp32 curve, and validation and generation (KV cache in bf16) run under the same autocast."""
    fp32 = tiny_cfg(tiny_data, tmp_path / "fp32", regime={"num_steps": 4}, dataset={"valid_split": ""})
    train_in_process(fp32, tmp_path, "fp32.yaml")
    bf16 = tiny_cfg(tiny_data, tmp_path / "bf16", regime={"num_steps": 4}, trainer={"dtype": "bfloat16"},
                    evaluation={"split": "valid", "limit": 4, "batch_size": 2, "max_new_tokens": 4})
    res = train_in_process(bf16, tmp_path, "bf16.yaml")
    out = capsys.readouterr().out
    assert "one rank, no FSDP | dtype torch.bfloat16 (autocast)" in out, out[-2000:]
    assert "step 4: gsm8k accuracy" in out and res["eval"]["total"] == 4 and math.isfinite(res["val_loss"])
    ref, got = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    close(got, ref, [1, 2, 3, 4], 0.03 * ref[1])
    assert got != ref  # bf16 matmuls did run


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the one-GPU path needs CUDA")
@pytest.mark.parametrize("ac", ["off", "selective"])
def test_cuda_one_gpu_autocast_compile_run(ac, tiny_data, tmp_path, capsys):
    """`python train.py` on one GPU: no FSDP, bf16 autocast, per-block compile, flex_attention for packed rows (also
    under selective activation checkpointing, which saves flex's output), validation and evaluation under autocast;
    its curve stays near the CPU fp32 one."""
    cpu = tiny_cfg(tiny_data, tmp_path / "cpu", regime={"num_steps": 4}, dataset={"valid_split": ""})
    train_in_process(cpu, tmp_path, "cpu.yaml")
    gpu = tiny_cfg(tiny_data, tmp_path / "gpu", regime={"num_steps": 4},
                   trainer={"device": "cuda", "dtype": "auto", "compile": True, "activation_checkpointing": ac},
                   evaluation={"split": "valid", "limit": 4, "batch_size": 2, "max_new_tokens": 4})
    res = train_in_process(gpu, tmp_path, "gpu.yaml")
    out = capsys.readouterr().out
    assert "device cuda | one rank, no FSDP | dtype torch.bfloat16 (autocast) | compile True" in out, out[-2000:]
    assert res["eval"]["total"] == 4 and math.isfinite(res["val_loss"])
    close(losses(tmp_path / "gpu"), losses(tmp_path / "cpu"), [1, 2, 3, 4], 0.03 * losses(tmp_path / "cpu")[1])


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {root!r})
import train
save = train.dcp.save
def save_then_die(state, checkpoint_id, **kw):  # SIGKILL once step 6's shards are written, before the rename
    save(state, checkpoint_id=checkpoint_id, **kw)
    if checkpoint_id.endswith("step_00000006.tmp"):
        os.kill(os.getpid(), signal.SIGKILL)
train.dcp.save = save_then_die
train.main(sys.argv[1:])
"""


def test_sigkill_during_checkpoint_then_resume_is_bit_identical(tiny_data, tmp_path):
    """Straight 6 steps vs a run SIGKILLed while writing its step-6 checkpoint: the step-4 checkpoint stays the newest
    complete one, keep_last_n_checkpoints=2 holds, and resuming from it gives bit-identical losses and weights."""
    cfg = tiny_cfg(tiny_data, tmp_path / "straight", lr_scheduler={"name": "cosine", "warmup_steps": 2},
                   regime={"num_steps": 6, "checkpoint_every_n_steps": 2, "keep_last_n_checkpoints": 2},
                   dataset={"valid_split": ""})
    train_in_process(cfg, tmp_path, "straight.yaml")
    straight = losses(tmp_path / "straight")

    cfg["checkpoint"]["dir"] = str(tmp_path / "killed")
    path = write_cfg(cfg, tmp_path / "killed.yaml")
    (tmp_path / "kill.py").write_text(KILL_SCRIPT.format(root=str(ROOT)))
    p = run([sys.executable, str(tmp_path / "kill.py"), path], expect_rc=None)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    ckpts = tmp_path / "killed" / "checkpoints"
    assert [c.name for c in train.complete_checkpoints(ckpts)] == ["step_00000002", "step_00000004"]
    assert (ckpts / "step_00000006.tmp").is_dir()  # the half-written one, never picked up
    (ckpts / "step_00000005.tmp").mkdir()  # another killed write's leftover
    shutil.copytree(ckpts / "step_00000004", ckpts / "step_00000009.bak")  # a user's copy: not a checkpoint

    result = train_in_process(cfg, tmp_path, "killed.yaml")  # automatic resume from step 4
    assert result["step"] == 6
    resumed = losses(tmp_path / "killed")
    assert all(resumed[s] == straight[s] for s in range(1, 7)), (resumed, straight)
    # steps 5 and 6 ran twice (before the kill, after the resume): metrics.jsonl logs each step once
    logged = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").open()]
    assert logged == [1, 2, 3, 4, 5, 6], logged
    names = [c.name for c in train.complete_checkpoints(ckpts)]
    assert names == ["step_00000004", "step_00000006"]
    assert sorted(p.name for p in ckpts.iterdir()) == names + ["step_00000009.bak"]  # stale .tmp dirs removed
    a, _ = train.load_checkpoint_model(tmp_path / "straight" / "checkpoints" / "step_00000006")
    b, _ = train.load_checkpoint_model(ckpts / "step_00000006")
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k


def test_errors_found_when_the_model_is_known(tiny_data, tmp_path, capsys, monkeypatch):
    """Checks that need the model (or the world size) before any step: the data's max_seq_len against the model's
    context; dp_replicate without torchrun; a checkpoint of another architecture (one line, not DCP's traceback)."""
    cfg = tiny_cfg(tiny_data, tmp_path / "out", dataset={"valid_split": "", "max_seq_len": 70000, "batch_size": 0,
                                                         "max_num_tokens": 70000}, regime={"num_steps": 1})
    with pytest.raises(ValueError, match=r"dataset.max_seq_len=70000 is longer than the model's context "
                                         r"\(max_seq_len=65536"):
        train_in_process(cfg, tmp_path)
    cfg = tiny_cfg(tiny_data, tmp_path / "out", trainer={"dp_replicate": 2}, regime={"num_steps": 1},
                   dataset={"valid_split": ""})
    with pytest.raises(ValueError, match="dp_replicate=2 replicates across processes, but this run is one process"):
        train_in_process(cfg, tmp_path)
    cfg["trainer"]["dp_replicate"] = 1
    train_in_process(cfg, tmp_path)
    cfg["model"]["name"] = "tiny_qwen3"
    with pytest.raises(ValueError, match=r"step_00000001 holds another model \(head_dim 16 -> 32, .*model_type llama "
                                         r"-> qwen3\): resume it with the model it was trained with"):
        train_in_process(cfg, tmp_path)
    # a resume with nothing left neither validates nor evaluates again (nor logs it twice)
    cfg = tiny_cfg(tiny_data, tmp_path / "val", regime={"num_steps": 2})
    train_in_process(cfg, tmp_path)
    train_in_process(cfg, tmp_path)
    assert "nothing left to train (raise regime.num_steps to continue); its final validation and evaluation ran " \
        "already" in capsys.readouterr().out
    vals = [r for r in map(json.loads, (tmp_path / "val" / "metrics.jsonl").open()) if "val_loss" in r]
    assert [r["step"] for r in vals] == [2]
    # a setting that leaves the weights' shapes (another context length) is a note, not a refusal
    import dataclasses
    monkeypatch.setitem(M.PRESETS, "tiny_llama", dataclasses.replace(M.get_preset("tiny_llama"), max_seq_len=32768))
    cfg["regime"]["num_steps"] = 3
    assert train_in_process(cfg, tmp_path)["step"] == 3
    assert "note: model settings differ from the checkpoint's (max_seq_len 65536 -> 32768): the new ones apply" in \
        capsys.readouterr().out


def test_logged_loss_is_per_supervised_token_over_the_window(tiny_data, tmp_path):
    """A record every 2 steps holds the loss per supervised token of both steps (steps weighted by their counts),
    from the same run logged every step (bit-identical on CPU) and the loader's label counts."""
    every = tiny_cfg(tiny_data, tmp_path / "every", dataset={"valid_split": ""})
    train_in_process(every, tmp_path, "every.yaml")
    pairs = tiny_cfg(tiny_data, tmp_path / "pairs", dataset={"valid_split": ""},
                     regime={"publish_metrics_every_n_steps": 2})
    train_in_process(pairs, tmp_path, "pairs.yaml")
    cfg = train.load_config([write_cfg(every, tmp_path / "every.yaml")])
    loader = data.build_loader(cfg.dataset, train.load_tokenizer("byte", "", ""), "train", seed=cfg.trainer.seed)
    n = [next(loader).num_label_tokens for _ in range(4)]
    step = losses(tmp_path / "every")
    want = {k: (step[k - 1] * n[k - 2] + step[k] * n[k - 1]) / (n[k - 2] + n[k - 1]) for k in (2, 4)}
    assert len(set(n)) > 1 and losses(tmp_path / "pairs") == pytest.approx(want, rel=1e-6)


def test_stop_in_the_last_step_does_the_end_work_once_at_the_relaunch(tiny_data, tmp_path, monkeypatch, capsys):
    """Ctrl-C during the last step checkpoints it before the final validation: the relaunch validates (once), marks
    the checkpoint done, and a further relaunch does not validate again."""
    monkeypatch.setattr(train, "get_lr", get_lr_then_ctrl_c)  # Ctrl-C while step 3 (the last) trains
    cfg = tiny_cfg(tiny_data, tmp_path / "out", regime={"num_steps": 3})
    assert train_in_process(cfg, tmp_path)["stopped"]
    monkeypatch.setattr(train, "get_lr", LR)
    for _ in range(2):
        assert train_in_process(cfg, tmp_path)["step"] == 3
    vals = [r["step"] for r in map(json.loads, (tmp_path / "out" / "metrics.jsonl").open()) if "val_loss" in r]
    assert vals == [3], vals


def fake_evaluate(calls, fail=None):
    """generate.evaluate_gsm8k's stand-in: records each call; fail(n) for the n-th call (1-based) may raise or signal."""
    def evaluate(model, tok, examples, **kw):
        calls.append(len(examples))
        if fail:
            fail(len(calls))
        return {"accuracy": 0.0, "correct": 0, "strict_correct": 0, "total": len(examples), "predictions": [],
                "skipped": dict.fromkeys(train.generate.SKIP_REASONS, 0)}
    return evaluate


def end_records(out_dir) -> list[tuple[int, str]]:
    """(step, kind) of the validation and evaluation records of metrics.jsonl."""
    recs = map(json.loads, (Path(out_dir) / "metrics.jsonl").open())
    return [(r["step"], "val" if "val_loss" in r else "eval") for r in recs if "loss" not in r]


def test_the_final_checkpoint_is_written_before_the_end_work(tiny_data, tmp_path, monkeypatch):
    """An error in the final evaluation (e.g. a prompt too long for the model) leaves the final checkpoint, not
    marked done: the relaunch trains nothing, validates and evaluates again (each logged once), marks it done; a
    further relaunch does neither."""
    def too_long(n):
        if n == 1:
            raise ValueError("prompt too long")
    calls = []
    monkeypatch.setattr(train.generate, "evaluate_gsm8k", fake_evaluate(calls, too_long))
    cfg = tiny_cfg(tiny_data, tmp_path / "out", regime={"num_steps": 2},
                   evaluation={"split": "valid", "at_start": False, "limit": 2})
    with pytest.raises(ValueError, match="prompt too long"):
        train_in_process(cfg, tmp_path)
    ckpts = train.complete_checkpoints(tmp_path / "out" / "checkpoints")
    assert [c.name for c in ckpts] == ["step_00000002"]
    assert not torch.load(ckpts[0] / "trainer_state.pt", weights_only=False).get("done")
    for _ in range(2):
        assert train_in_process(cfg, tmp_path)["step"] == 2
    assert len(calls) == 2 and end_records(tmp_path / "out") == [(2, "val"), (2, "eval")]
    assert torch.load(ckpts[0] / "trainer_state.pt", weights_only=False)["done"]


@pytest.mark.parametrize("during", ["validation", "evaluation"])
def test_a_signal_during_the_end_work_stops_with_its_status(during, tiny_data, tmp_path, monkeypatch, capsys):
    """SIGTERM during the final validation or evaluation (after the final checkpoint) skips the rest of that work
    and the HF export, and exits 143 as a stop mid-training does; the checkpoint stays not done, so the relaunch
    validates, evaluates (each logged once) and exports."""
    def sigterm(*_):
        os.kill(os.getpid(), signal.SIGTERM)
    calls = []
    monkeypatch.setattr(train.generate, "evaluate_gsm8k", fake_evaluate(calls, sigterm if during == "evaluation" else None))
    forward = M.Transformer.forward

    def forward_then_sigterm(self, *a, **kw):  # in eval mode: validation (evaluation is the fake)
        if not self.training:
            sigterm()
        return forward(self, *a, **kw)
    if during == "validation":
        monkeypatch.setattr(M.Transformer, "forward", forward_then_sigterm)
    cfg = tiny_cfg(tiny_data, tmp_path / "out", regime={"num_steps": 2}, checkpoint={"export_hf": True},
                   evaluation={"split": "valid", "at_start": False, "limit": 2})
    path = write_cfg(cfg, tmp_path / "c.yaml")
    with pytest.raises(SystemExit) as e:
        train.main([path])
    assert e.value.code == 128 + signal.SIGTERM
    out = capsys.readouterr().out
    assert "step 2: saved checkpoint" in out and "rank 0: got SIGTERM: stop (step 2 is checkpointed)" in out
    assert "step 2: stopped by a signal" in out and not (tmp_path / "out" / "hf").exists()
    assert len(calls) == (during == "evaluation") and end_records(tmp_path / "out") == \
        [(2, "val")] + [(2, "eval")] * (during == "evaluation")
    ckpt = train.complete_checkpoints(tmp_path / "out" / "checkpoints")[-1]
    assert not torch.load(ckpt / "trainer_state.pt", weights_only=False).get("done")

    monkeypatch.undo()
    monkeypatch.setattr(train.generate, "evaluate_gsm8k", fake_evaluate(calls))
    assert train_in_process(cfg, tmp_path)["step"] == 2
    assert end_records(tmp_path / "out") == [(2, "val"), (2, "eval")] and (tmp_path / "out" / "hf").is_dir()
    assert torch.load(ckpt / "trainer_state.pt", weights_only=False)["done"]


@pytest.mark.parametrize("writer", ["dcp", "torch.save"])
def test_ctrl_c_twice_during_a_checkpoint_write_is_one_line(writer, tiny_data, tmp_path, monkeypatch, capsys):
    """The second Ctrl-C lands inside a checkpoint write: DCP wraps the KeyboardInterrupt in a CheckpointException (a
    140-line traceback), torch.save's zip writer raises a RuntimeError ("unexpected pos") in its place: main says it
    in one line and exits 130 either way; no checkpoint is complete."""
    monkeypatch.setattr(train, "get_lr", get_lr_then_ctrl_c)  # the first Ctrl-C: checkpoint after step 3
    if writer == "dcp":
        from torch.distributed.checkpoint import FileSystemWriter
        write = FileSystemWriter.write_data

        def ctrl_c_then_write(self, *a, **kw):
            os.kill(os.getpid(), signal.SIGINT)
            return write(self, *a, **kw)
        monkeypatch.setattr(FileSystemWriter, "write_data", ctrl_c_then_write)
    else:
        save = torch.save

        def save_with_ctrl_c(obj, f, *a, **kw):
            if "rng_rank" in str(f):
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(1)  # the handler raises KeyboardInterrupt here
                except KeyboardInterrupt:
                    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
            return save(obj, f, *a, **kw)
        monkeypatch.setattr(train.torch, "save", save_with_ctrl_c)
    path = write_cfg(tiny_cfg(tiny_data, tmp_path / "out", dataset={"valid_split": ""}), tmp_path / "c.yaml")
    with pytest.raises(SystemExit) as e:
        train.main([path])
    assert e.value.code == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert err.startswith("interrupted: quit at once; launch the same command again") and err.count("\n") == 1, err
    assert train.complete_checkpoints(tmp_path / "out" / "checkpoints") == []
    # the next main() in this process (a notebook) reports its own errors, not that quit
    monkeypatch.undo()
    with pytest.raises(SystemExit, match="error: dataset.path not found"):
        train.main([path, "trainer.seed=1", f"dataset.path={tmp_path / 'nothing'}"])


def test_validation_cut_short_at_a_periodic_checkpoint_is_redone(tiny_data, tmp_path, monkeypatch):
    """A crash in the validation of a periodic checkpoint's step (the checkpoint is written, its work not marked done):
    the relaunch resumes there and validates that step again before training on (each step's record logged once)."""
    forward = M.Transformer.forward

    def forward_crashing_in_validation(self, *a, **kw):
        if not self.training:
            raise RuntimeError("node lost")
        return forward(self, *a, **kw)
    monkeypatch.setattr(M.Transformer, "forward", forward_crashing_in_validation)
    cfg = tiny_cfg(tiny_data, tmp_path / "out", regime={"num_steps": 4, "checkpoint_every_n_steps": 2,
                                                         "validate_every_n_steps": 2})
    with pytest.raises(RuntimeError, match="node lost"):
        train_in_process(cfg, tmp_path)
    ckpt = train.complete_checkpoints(tmp_path / "out" / "checkpoints")[-1]
    assert ckpt.name == "step_00000002" and not torch.load(ckpt / "trainer_state.pt", weights_only=False).get("done")
    monkeypatch.undo()
    assert train_in_process(cfg, tmp_path)["step"] == 4
    assert end_records(tmp_path / "out") == [(2, "val"), (4, "val")]
    for c in train.complete_checkpoints(tmp_path / "out" / "checkpoints"):  # keep_last_n_checkpoints=1: step 4
        assert torch.load(c / "trainer_state.pt", weights_only=False)["done"] == "end"


def test_a_periodic_checkpoint_resumed_as_the_last_step_does_the_end_work(tiny_data, tmp_path, monkeypatch):
    """Step 2's checkpoint has its own (periodic) work done; resumed with num_steps lowered to 2 it is the last step:
    the final validation and evaluation still run (once). A checkpoint of older code without the record is taken as
    done at a periodic step (no second validation after an upgrade), and as not done at the run's last step."""
    calls = []
    monkeypatch.setattr(train.generate, "evaluate_gsm8k", fake_evaluate(calls))
    cfg = tiny_cfg(tiny_data, tmp_path / "out", regime={"num_steps": 3, "checkpoint_every_n_steps": 2,
                                                         "validate_every_n_steps": 2, "keep_last_n_checkpoints": 0},
                   evaluation={"split": "valid", "at_start": False, "limit": 2})
    assert train_in_process(cfg, tmp_path)["step"] == 3
    ckpts = train.complete_checkpoints(tmp_path / "out" / "checkpoints")
    assert [torch.load(c / "trainer_state.pt", weights_only=False)["done"] for c in ckpts] == ["step", "end"]
    assert end_records(tmp_path / "out") == [(2, "val"), (3, "val"), (3, "eval")]
    shutil.rmtree(ckpts[1])
    cfg["regime"]["num_steps"] = 2
    assert train_in_process(cfg, tmp_path)["step"] == 2
    assert end_records(tmp_path / "out") == [(2, "val"), (2, "eval")] and len(calls) == 2
    assert torch.load(ckpts[0] / "trainer_state.pt", weights_only=False)["done"] == "end"
    state = {"step": 2, "config": {"regime": {"num_steps": 3}}}  # older code: only a final checkpoint was marked
    assert train.work_done(state) == "step" and train.work_done({**state, "step": 3}) is None
    assert train.work_done({**state, "step": 3, "done": True}) == "end"


def test_nonfinite_loss_stops_or_skips(tiny_data, tmp_path):
    """lr=1e30 blows the weights up after step 1: the run stops naming step 2 (no checkpoint of it), or with
    trainer.skip_nonfinite skips such steps and finishes."""
    cfg = tiny_cfg(tiny_data, tmp_path / "out", optimizer={"lr": 1e30, "weight_decay": 0.0},
                   trainer={"max_grad_norm": 0.0}, regime={"num_steps": 3, "checkpoint_every_n_steps": 1},
                   dataset={"valid_split": ""})
    with pytest.raises(FloatingPointError, match="non-finite .* at step 2"):  # one line from main (one_line_errors)
        train_in_process(cfg, tmp_path)
    assert [c.name for c in train.complete_checkpoints(tmp_path / "out" / "checkpoints")] == ["step_00000001"]
    cfg["trainer"]["skip_nonfinite"] = True
    cfg["checkpoint"]["dir"] = str(tmp_path / "skip")
    assert train_in_process(cfg, tmp_path, "skip.yaml")["step"] == 3
    # skipped steps are logged as a missing loss (strict JSON null), never as 0 or NaN
    def strict(c):
        raise ValueError(f"not strict JSON: {c}")
    recs = [json.loads(line, parse_constant=strict) for line in (tmp_path / "skip" / "metrics.jsonl").open()]
    assert [(r["step"], r["loss"] is None) for r in recs if "loss" in r] == [(1, False), (2, True), (3, True)]


def test_vocab_check_is_on_the_ids_the_model_sees(tiny_data, tmp_path, llama3_tokenizer_dir, qwen3_tokenizer_dir):
    """The real Llama 3.2 tokenizer files list 128,257 ids (<|image|> = 128256) for a 128,256-row model: that trains,
    because no text or chat rendering emits it. A tokenizer whose ids do not fit the model is a clear error."""
    import dataclasses
    import model as model_lib
    args = dataclasses.replace(model_lib.get_preset("tiny_llama"), vocab_size=128256)
    torch.manual_seed(0)
    m = model_lib.Transformer(args)
    m.init_weights()
    model_lib.save_hf(m, args, tmp_path / "llama_vocab")
    cfg = tiny_cfg(tiny_data, tmp_path / "ok", model={"name": "", "path": str(tmp_path / "llama_vocab")},
                   tokenizer={"path": str(llama3_tokenizer_dir)}, regime={"num_steps": 1})
    assert train_in_process(cfg, tmp_path, "ok.yaml")["step"] == 1
    cfg = tiny_cfg(tiny_data, tmp_path / "bad", tokenizer={"path": str(qwen3_tokenizer_dir)})
    with pytest.raises(ValueError, match="does not fit the model's vocab_size=512"):
        train_in_process(cfg, tmp_path, "bad.yaml")


def test_a_preset_too_small_for_the_tokenizer_says_what_to_use(tiny_data, tmp_path, monkeypatch):
    """A preset's random init has its own vocabulary size (tiny_llama: 512, for the byte tokenizer): a tokenizer it
    cannot hold gets told to use model.path (its model's HF directory) or a full-size preset, in one line."""
    import dataclasses
    monkeypatch.setitem(M.PRESETS, "tiny_llama", dataclasses.replace(M.get_preset("tiny_llama"), vocab_size=200))
    with pytest.raises(ValueError, match=r"does not fit the model's vocab_size=200: .*; model.name=tiny_llama has a "
                                         r"200-token vocabulary: use model.path with the HF directory of the "
                                         r"tokenizer's model, or a full-size preset") as e:
        train_in_process(tiny_cfg(tiny_data, tmp_path / "out", dataset={"valid_split": ""}), tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load_and_validate(name, gsm8k_dir):
    """Every config in configs/ parses with no unknown key or wrong type (the GSM8K ones with the data path given)."""
    overrides = [] if name == "demo.yaml" else [f"dataset.path={gsm8k_dir}"]
    cfg = train.load_config([str(ROOT / "configs" / name), *overrides])
    assert cfg.regime.num_steps > 0 and (cfg.model.name or cfg.model.path)
    if name != "demo.yaml":
        assert (cfg.dataset.src_field, cfg.dataset.tgt_field) == ("question", "answer")
        assert cfg.dataset.packing and cfg.trainer.compile


def test_cli_out_of_memory_is_one_line_with_what_to_do(tiny_data, tmp_path, monkeypatch):
    def oom(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of "
                                     "79.1 GiB of which 1.2 GiB is free. " + "Of the allocated memory ... " * 20)
    monkeypatch.setattr(train, "train", oom)
    with pytest.raises(SystemExit) as e:
        train.main([write_cfg(tiny_cfg(tiny_data, tmp_path / "out"), tmp_path / "c.yaml")])
    msg = str(e.value)
    assert msg.startswith("error: out of GPU memory (Tried to allocate 2.50 GiB). Lower dataset.max_num_tokens")
    assert "activation_checkpointing" in msg and "\n" not in msg and len(msg) < 400


def test_cli_bad_data_is_one_line_not_a_traceback(tiny_data, tmp_path):
    """Errors found while training starts (here a malformed JSONL line) reach the user as one line naming file:line."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"question": "What is 1 + 1?", "answer": "#### 2"}\n{"question": oops\n')
    cfg = tiny_cfg({"path": str(bad), "cache_dir": str(tmp_path / "cache")}, tmp_path / "out")
    cfg["dataset"]["valid_split"] = ""
    p = run([sys.executable, "train.py", write_cfg(cfg, tmp_path / "bad.yaml")], expect_rc=1)
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: ") and "train.jsonl:2" in p.stderr
