"""Supervised fine-tuning of Llama 3.x / Qwen3: one flat train(cfg), FSDP2 + per-block torch.compile, DCP checkpoints.

    python train.py configs/demo.yaml                                   # CPU demo: byte model learns addition
    python train.py configs/llama3_2_1b_gsm8k.yaml optimizer.lr=1e-5 trainer.grad_accum=4
    torchrun --nproc_per_node=8 train.py configs/qwen3_4b_gsm8k.yaml    # FSDP2 over 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        train.py configs/qwen3_4b_gsm8k.yaml trainer.dp_replicate=2     # HSDP: replicate across nodes, shard within
    python train.py --export OUT/checkpoints/step_00000100 OUT/hf_step100   # any checkpoint -> HF directory

Config: a YAML file of sections (dataset, model, tokenizer, trainer, optimizer, lr_scheduler, regime, checkpoint,
evaluation), then `section.key=value` overrides (`--config-file FILE` also works). The resolved config is printed and
saved as <checkpoint.dir>/config.yaml. A run resumes from the newest complete checkpoint in checkpoint.dir, at any
world size. Loss: SUM of token cross-entropies / global number of supervised tokens (all micro-batches, all ranks).
"""
import argparse
import contextlib
import dataclasses
import difflib
import itertools
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import sys
import time
import typing
import warnings
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import data
import generate
import model as model_lib
import tokenizer as tokenizer_lib

# ------------------------------------------------------------------------------------------------------ config


@dataclass
class ModelConfig:
    name: str = ""   # a model.PRESETS name: random init (e.g. demo, tiny_llama)
    path: str = ""   # or pretrained weights: an HF directory, or hg://org/name (huggingface_hub)
    fix_untrained_tokens: bool = True  # untrained (all-zero) embedding rows the data uses -> the mean embedding


@dataclass
class TokenizerConfig:
    path: str = ""         # "" = the model directory; "byte" = the built-in byte tokenizer; or a directory / hg://
    chat_format: str = ""  # "" = the tokenizer's own (llama3 | qwen3 | chatml | jinja)


@dataclass
class TrainerConfig:
    device: str = "auto"                    # auto | cpu | cuda
    dtype: str = "auto"                     # auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float32
    grad_accum: int = 1                     # micro-batches per optimizer step (alias: gradient_accumulation)
    max_grad_norm: float = 1.0              # 0 = no clipping (the norm is still logged)
    compile: bool = False                   # torch.compile each block in place, and the loss's softmax
    activation_checkpointing: str = "off"   # off | full | selective (keep matmul/attention outputs)
    dp_replicate: int = 1                   # HSDP: replicate over this many groups, shard within (e.g. = nodes)
    reshard_after_forward: bool = True      # FSDP2: free gathered blocks after forward (false: ZeRO-2-like, faster)
    seed: int = 0
    skip_nonfinite: bool = False            # skip a step with a non-finite loss / grad norm instead of stopping
    num_threads: int = 0                    # CPU intra-op threads (0 = torch's default)
    tensorboard: bool = False               # also log to <checkpoint.dir>/tb (needs the tensorboard package)
    profile_steps: list[int] = field(default_factory=list)  # [first, last]: torch.profiler trace of these steps
    dist_timeout_minutes: float = 60.0      # how long a rank waits in a collective (rank 0 downloading, exporting)


@dataclass
class OptimizerConfig:  # AdamW; no weight decay on 1-D parameters (norms, biases)
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1
    eps: float = 1e-8


@dataclass
class LRSchedulerConfig:
    name: str = "cosine"        # cosine | linear | wsd | constant (after a linear warmup)
    warmup_steps: int = 0
    final_lr_scale: float = 0.1  # final lr = optimizer.lr * final_lr_scale
    decay_fraction: float = 0.2  # wsd (warmup-stable-decay): the last fraction of the steps decays linearly


@dataclass
class RegimeConfig:
    num_steps: int = 1000
    num_data_epochs: int = 0                # > 0: also stop after this many passes over the train split
    validate_every_n_steps: int = 0         # 0 = only at the end (needs dataset.valid_split)
    checkpoint_every_n_steps: int = 0       # 0 = only at the end
    keep_last_n_checkpoints: int = 1        # 0 = keep all
    publish_metrics_every_n_steps: int = 10


@dataclass
class CheckpointConfig:
    dir: str = "out"         # output directory: config.yaml, metrics.jsonl, checkpoints/ (alias: output_dir)
    resume: bool = True      # continue from the newest complete checkpoint in dir
    export_hf: bool = False  # at the end, write an HF directory (safetensors, config, tokenizer) to <dir>/hf
    export_dtype: str = "auto"  # auto (the training dtype: bfloat16 on GPU) | bfloat16 | float32


@dataclass
class EvaluationConfig:  # GSM8K-style exact-match accuracy of greedy generations ('#### N' answers)
    split: str = ""           # "" = off; a split of dataset.path (e.g. test), or a .jsonl path
    every_n_steps: int = 0    # 0 = only at the start and the end
    at_start: bool = True     # also before training (step 0)
    limit: int = 0            # first N examples (0 = all)
    batch_size: int = 32
    max_new_tokens: int = 256


@dataclass
class Config:
    dataset: data.DatasetConfig = field(default_factory=data.DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    regime: RegimeConfig = field(default_factory=RegimeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)


# fairseq2 / common spellings -> our field names
ALIASES = {"trainer.gradient_accumulation": "trainer.grad_accum", "trainer.max_gradient_norm": "trainer.max_grad_norm",
           "trainer.torch_compile": "trainer.compile", "checkpoint.output_dir": "checkpoint.dir"}


def _coerce(key: str, typ, value):
    """value (from YAML) as the field type `typ`. PyYAML reads 3e-5 as a string: floats accept numeric strings.
    An int field rejects 1.5 and a bool field rejects 1 (YAML true/false only)."""
    args = typing.get_args(typ)
    if type(None) in args:  # X | None
        if value is None:
            return None
        typ = next(a for a in args if a is not type(None))
    origin = typing.get_origin(typ) or typ
    if typ is str and value is None:
        return ""  # YAML null for an unset string (fairseq2's valid_split: null)
    if origin is list and value is None:
        return []  # `trainer.profile_steps=` on the command line, as an empty string clears a string key
    ok = (typ is bool and isinstance(value, bool)) or (typ is int and isinstance(value, int) and not isinstance(value, bool)) \
        or (typ is str and isinstance(value, str)) or (origin is dict and isinstance(value, dict))
    if ok:
        return value
    if typ is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    if origin is list and isinstance(value, (list, tuple)):
        (item,) = typing.get_args(typ) or (object,)
        return [v if item is object else _coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    name = getattr(typ, "__name__", str(typ))
    raise ValueError(f"config key {key}: expected {name}, got {type(value).__name__} {value!r}")


def _merge(obj, d: dict, where: str, prefix: str = ""):
    if not isinstance(d, dict):
        raise ValueError(f"{where}: section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {d!r}")
    hints = typing.get_type_hints(type(obj))
    given = {}  # field -> the spelling it was given as (an alias and its field in one mapping: the later would win)
    for k, v in d.items():
        spelled, k = str(k), ALIASES.get(prefix + str(k), prefix + str(k)).removeprefix(prefix)
        if k in given:
            raise ValueError(f"{where}: '{prefix}{given[k]}' and '{prefix}{spelled}' set the same key: keep one")
        given[k] = spelled
        if k not in hints:
            valid = list(hints)
            close = difflib.get_close_matches(k, valid, n=3)
            hint = f"; did you mean {' or '.join(prefix + c for c in close)}?" if close else ""
            raise ValueError(f"{where}: unknown config key '{prefix}{k}'{hint} (valid: {', '.join(valid)})")
        if dataclasses.is_dataclass(hints[k]):
            _merge(getattr(obj, k), v, where, f"{prefix}{k}.")
        else:
            setattr(obj, k, _coerce(prefix + k, hints[k], v))


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans only: true / false (any case). In YAML 1.1 off / on / yes / no are
    booleans too, so `activation_checkpointing: off` (a string field) would arrive as False. (Other YAML 1.1 rules,
    e.g. 010 = 8, are kept.) A key given twice in one mapping is an error (YAML 1.2 forbids it; PyYAML keeps the last
    one, so a second `trainer:` section would silently drop the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden, as YAML allows
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:  # a list as a key: the base class says what is wrong, with the line
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' given twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Yaml12Loader.yaml_implicit_resolvers = {  # a copy without the YAML 1.1 bool resolver (the others kept, in order)
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def _yaml(text: str, where: str, in_file: bool = True):
    try:
        return yaml.load(text, Loader=_Yaml12Loader)
    except yaml.YAMLError as e:  # a one-line error with the file and line, not a parser traceback
        mark = getattr(e, "problem_mark", None)
        at = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None and in_file else ""
        raise ValueError(f"{where}{at}: not valid YAML ({getattr(e, 'problem', None) or e})") from None


def load_config(argv: list[str]) -> "Config":
    """argv: ["CONFIG.yaml" | "--config-file", "CONFIG.yaml", "section.key=value" | "--section.key=value", ...]."""
    argv, path = list(argv), None
    if "--config-file" in argv:
        i = argv.index("--config-file")
        if i + 1 >= len(argv):
            raise ValueError("--config-file needs a path")
        path = argv.pop(i + 1)
        argv.pop(i)
    elif argv and not argv[0].lstrip("-").count("="):
        path = argv.pop(0)
    cfg = Config()
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        _merge(cfg, _yaml(Path(path).read_text(), path) or {}, path)
    for arg in argv:
        key, eq, val = arg.removeprefix("--").partition("=")
        if not eq or not key:
            raise ValueError(f"bad override {arg!r}: expected section.key=value")
        *parents, leaf = key.split(".")
        d = {leaf: _yaml(val, f"override {arg!r}", in_file=False)}
        for p in reversed(parents):
            d = {p: d}
        _merge(cfg, d, f"override {arg!r}")
    validate(cfg)
    # Local model and tokenizer paths made absolute: the saved config (and generate.py / --export reading it from
    # another directory) must find them again.
    for sec, key in (("model", "path"), ("tokenizer", "path")):
        value = getattr(getattr(cfg, sec), key)
        if value and value != "byte" and not value.startswith("hg://"):
            setattr(getattr(cfg, sec), key, str(Path(value).resolve()))
    return cfg


def validate(cfg: Config):
    """Errors that would otherwise surface minutes (or a cluster allocation) later, one line each."""
    def check(ok, msg):
        if not ok:
            raise ValueError(msg)
    ds, r, t = cfg.dataset, cfg.regime, cfg.trainer
    check(bool(cfg.model.name) != bool(cfg.model.path),
          f"set exactly one of model.name (a preset) and model.path, got name={cfg.model.name!r}, "
          f"path={cfg.model.path!r} (to replace a config's one on the command line, empty the other: model.path=)")
    if cfg.model.name:
        model_lib.get_preset(cfg.model.name)  # ValueError listing the presets
        check(bool(cfg.tokenizer.path), "tokenizer.path is required with model.name (e.g. tokenizer.path=byte)")
    elif not cfg.model.path.startswith("hg://") and not Path(cfg.model.path).exists():
        raise FileNotFoundError(f"model.path not found: {cfg.model.path}")
    tok = cfg.tokenizer.path
    if tok and tok != "byte" and not tok.startswith("hg://") and not Path(tok).exists():
        raise FileNotFoundError(f"tokenizer.path not found: {tok}")
    check(bool(ds.path or ds.sources), "dataset.path is required (a .jsonl file, a directory or hg://org/name), "
                                       "or dataset.sources (a list of {path, weight, ...})")
    if ds.path and not ds.generate_demo and not ds.path.startswith("hg://") and not Path(ds.path).exists():
        raise FileNotFoundError(f"dataset.path not found: {ds.path} (relative paths start at the current directory; "
                                "override it: dataset.path=/data/gsm8k)")
    data.check_config(ds)  # batching options (e.g. max_num_tokens < max_seq_len)
    check(r.num_steps >= 1, f"regime.num_steps must be >= 1, got {r.num_steps}")
    check(r.num_data_epochs >= 0, f"regime.num_data_epochs must be >= 0 (0 = off), got {r.num_data_epochs}")
    p = cfg.trainer.profile_steps
    check(p == [] or (len(p) == 2 and 1 <= p[0] <= p[1]),
          f"trainer.profile_steps must be [] or [first, last] with 1 <= first <= last, got {p}")
    for k in ("validate_every_n_steps", "checkpoint_every_n_steps", "keep_last_n_checkpoints"):
        check(getattr(r, k) >= 0, f"regime.{k} must be >= 0, got {getattr(r, k)}")
    check(r.publish_metrics_every_n_steps >= 1, "regime.publish_metrics_every_n_steps must be >= 1")
    check(t.device in ("auto", "cpu", "cuda"), f"trainer.device must be auto|cpu|cuda, got {t.device!r}")
    check(t.device != "cuda" or torch.cuda.is_available(),
          f"trainer.device=cuda, but this torch ({torch.__version__}) sees no CUDA GPU")
    check(t.dtype in ("auto", "float32", "bfloat16"), f"trainer.dtype must be auto|float32|bfloat16, got {t.dtype!r}")
    check(cfg.checkpoint.export_dtype in ("auto", "float32", "bfloat16"),
          f"checkpoint.export_dtype must be auto|float32|bfloat16, got {cfg.checkpoint.export_dtype!r}")
    check(t.grad_accum >= 1, f"trainer.grad_accum must be >= 1, got {t.grad_accum}")
    check(t.max_grad_norm >= 0, f"trainer.max_grad_norm must be >= 0, got {t.max_grad_norm}")
    check(t.activation_checkpointing in ("off", "full", "selective"),
          f"trainer.activation_checkpointing must be off|full|selective, got {t.activation_checkpointing!r}")
    check(t.dp_replicate >= 1, f"trainer.dp_replicate must be >= 1, got {t.dp_replicate}")
    o, s = cfg.optimizer, cfg.lr_scheduler
    check(0 < o.lr < math.inf and 0 < o.eps < math.inf and 0 <= o.weight_decay < math.inf,
          f"optimizer: need finite lr > 0, eps > 0 and weight_decay >= 0, got {o.lr}, {o.eps}, {o.weight_decay}")
    check(t.seed >= 0 and t.num_threads >= 0, f"trainer.seed and num_threads must be >= 0, got {t.seed}, {t.num_threads}")
    check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optimizer.betas must be [b1, b2] in [0, 1), got {o.betas}")
    check(s.name in ("cosine", "linear", "wsd", "constant"),
          f"lr_scheduler.name must be cosine|linear|wsd|constant, got {s.name!r}")
    check(0 <= s.decay_fraction <= 1, f"lr_scheduler.decay_fraction must be in [0, 1], got {s.decay_fraction}")
    check(s.warmup_steps >= 0 and 0 <= s.final_lr_scale <= 1, "lr_scheduler: need warmup_steps >= 0, 0 <= final_lr_scale <= 1")
    check(t.dist_timeout_minutes > 0, f"trainer.dist_timeout_minutes must be > 0, got {t.dist_timeout_minutes}")
    out = Path(cfg.checkpoint.dir)
    check(not out.exists() or out.is_dir(), f"checkpoint.dir {out} is a file, not a directory: set checkpoint.dir to "
                                            "a new directory or an earlier run's")
    old = complete_checkpoints(out / "checkpoints")
    check(cfg.checkpoint.resume or not old,
          f"checkpoint.dir {cfg.checkpoint.dir} holds checkpoints of an earlier run (newest {old[-1].name if old else ''})"
          " and checkpoint.resume=false: a fresh run there would mix with them (and the next resume could pick theirs)."
          " Set another checkpoint.dir, delete its checkpoints/, or resume (checkpoint.resume=true)")
    e = cfg.evaluation
    if e.split.endswith(".jsonl") and not Path(e.split).is_file():
        raise FileNotFoundError(f"evaluation.split: {e.split} not found (a .jsonl path is read as a file; relative "
                                "paths start at the current directory)")
    check(e.limit >= 0 and e.batch_size >= 1 and e.max_new_tokens >= 1 and e.every_n_steps >= 0,
          "evaluation: need limit >= 0, batch_size >= 1, max_new_tokens >= 1, every_n_steps >= 0")


# ------------------------------------------------------------------------------------------------- helpers


def print0(*args):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def resolve_path(path: str, what: str, tokenizer_only: bool = False) -> Path:
    """A local path as is; hg://org/name through huggingface_hub (local rank 0 downloads, the others reuse its cache).
    what: the config key, for errors; tokenizer_only: fetch a tokenizer's small files only."""
    if not path.startswith("hg://"):
        return Path(path)
    fetch = lambda: data.hub_snapshot(path, what, "model", tokenizer_only=tokenizer_only)  # noqa: E731
    local = fetch() if int(os.environ.get("LOCAL_RANK", 0)) == 0 else None
    barrier()
    return Path(local or fetch())


def load_tokenizer(tokenizer_path: str, model_path: str, chat_format: str):
    """tokenizer.path, or the model's directory when it is empty (hg:// resolved); errors name the key it came from."""
    path, what = (tokenizer_path, "tokenizer.path") if tokenizer_path else \
        (model_path, "model.path (the tokenizer's source: tokenizer.path is empty)")
    if path != "byte" and not path.startswith("hg://") and not Path(path).exists():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    return tokenizer_lib.load_tokenizer(path if path == "byte" else str(resolve_path(path, what, tokenizer_only=True)),
                                        chat_format or None)


def load_run_tokenizer(tokenizer_path: str, model_path: str, chat_format: str):
    """A trained run's tokenizer, for --export and generate.py: load_tokenizer, and a path that is gone (e.g. the
    pretrained model the run started from was moved) says how to go on."""
    try:
        return load_tokenizer(tokenizer_path, model_path, chat_format)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (the run's tokenizer, as its config names it): pass --tokenizer PATH with the "
                                "tokenizer files the run trained with") from None


def build_optimizer(model, cfg: OptimizerConfig, fused: bool = True) -> torch.optim.AdamW:
    """AdamW with no weight decay on 1-D parameters (norms, biases). Fused on every device: on CPU too (torch >= 2.4),
    where it is ~6x faster than foreach (0.04 s vs 0.25 s a step for 70M parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def checkpoint_dtype(model_dir: Path, default: torch.dtype) -> torch.dtype:
    """The precision the HF checkpoint is stored in (config.json dtype / torch_dtype): rank 0 reads it at that
    precision, so bf16 files cost half the host memory and fp32 files reach the fp32 master weights unrounded."""
    cfg_file = model_dir / "config.json"
    try:
        hf = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}  # a Meta checkpoint has none
    except json.JSONDecodeError as e:  # json's message alone names no file
        raise ValueError(f"{cfg_file}: not valid JSON ({e}): fix or replace the model's config.json") from None
    name = hf.get("dtype") or hf.get("torch_dtype")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float32}.get(name, default)


def get_lr(step: int, cfg: Config) -> float:
    """Linear warmup to optimizer.lr, then cosine / linear decay to lr * final_lr_scale at num_steps (or constant);
    wsd holds the lr after warmup and decays linearly over the last decay_fraction of the steps (MiniCPM's schedule:
    a run can be continued from a checkpoint taken before the decay)."""
    s, base = cfg.lr_scheduler, cfg.optimizer.lr
    if step < s.warmup_steps:
        return base * (step + 1) / (s.warmup_steps + 1)
    if s.name == "wsd":
        decay_start = max(s.warmup_steps, cfg.regime.num_steps - round(s.decay_fraction * cfg.regime.num_steps))
        progress = max(0.0, min(1.0, (step - decay_start) / max(1, cfg.regime.num_steps - decay_start)))
        return base * (1 - (1 - s.final_lr_scale) * progress)
    progress = min(1.0, (step - s.warmup_steps) / max(1, cfg.regime.num_steps - s.warmup_steps))
    if s.name == "cosine":
        return base * (s.final_lr_scale + (1 - s.final_lr_scale) * 0.5 * (1 + math.cos(math.pi * progress)))
    if s.name == "linear":
        return base * (1 - (1 - s.final_lr_scale) * progress)
    return base


# Selective activation checkpointing: keep the outputs of matmuls and attention (costly to recompute), recompute
# the cheap elementwise ops and norms (torchtitan's op-level SAC, without its every-other-mm refinement).
_SAC_SAVE = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
             torch.ops.aten._scaled_dot_product_efficient_attention.default,
             torch.ops.aten._scaled_dot_product_flash_attention.default,
             torch.ops.aten._scaled_dot_product_cudnn_attention.default,
             torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
             torch._higher_order_ops.flex_attention}  # packed rows on CUDA (as torchtitan's list)


def _sac_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAC_SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(block: torch.nn.Module, mode: str):
    """Wrap the block's forward in place (no wrapper module, so state-dict keys stay clean)."""
    forward = block.forward
    extra = {} if mode == "full" else {"context_fn": partial(create_selective_checkpoint_contexts, _sac_policy)}
    block.forward = lambda *a, **k: checkpoint(forward, *a, use_reentrant=False, **extra, **k)


CKPT_PREFIX = "step_"


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Checkpoints that finished writing (a killed writer leaves only a *.tmp directory), oldest first."""
    if not ckpt_root.is_dir():
        return []
    done = [p for p in ckpt_root.glob(CKPT_PREFIX + "*")  # not step_N.tmp, nor a user's copy like step_N.bak
            if re.fullmatch(CKPT_PREFIX + r"\d+", p.name) and (p / "trainer_state.pt").is_file()]
    return sorted(done, key=lambda p: int(p.name.removeprefix(CKPT_PREFIX)))


@contextlib.contextmanager
def quiet_single_process_dcp():
    # One process (one GPU, or CPU) has no process group; DCP warns about that on every save and load.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_checkpoint(ckpt_root: Path, step: int, model, optimizer, train_loader, extra: dict, keep_last: int):
    """Sharded DCP save of model + optimizer (each rank writes its own shards; nothing gathered) into step_N.tmp,
    renamed to step_N only when every rank is done, so a crash mid-write leaves the previous checkpoint the newest.
    Multi-node needs checkpoint.dir on a shared filesystem (as DCP does)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    final = ckpt_root / f"{CKPT_PREFIX}{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:  # this write's directory, and any a killed earlier write left (a checkpoint's worth of disk each)
        for stale in ckpt_root.glob(f"{CKPT_PREFIX}*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with quiet_single_process_dcp():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    torch.save(rng, tmp / f"rng_rank{rank}.pt")
    if rank == 0:  # the loader's state is one global cursor, identical on every rank: stored once
        torch.save({"step": step, "loader": train_loader.state_dict(), "done": None, **extra}, tmp / "trainer_state.pt")
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)  # none expected: a run resumes from the newest, or refuses to start
        os.replace(tmp, final)  # atomic: the checkpoint appears complete or not at all
        old = complete_checkpoints(ckpt_root)
        for p in old[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(p)
    barrier()
    return final


ARCH_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size", "tie_embeddings",
               "qk_norm", "model_type")  # the ModelArgs fields that decide the weights' shapes and meaning


def mark_done(ckpt: Path, work: str):
    """Record in a checkpoint's trainer state which work of its step completed: "step" (the validation / evaluation
    due at that step) or "end" (the run's final validation / evaluation after its last step). A resume from it does
    the work that is not recorded (e.g. the end work of a periodic checkpoint resumed with num_steps lowered to it)."""
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    torch.save({**state, "done": work}, ckpt / "trainer_state.pt.tmp")
    os.replace(ckpt / "trainer_state.pt.tmp", ckpt / "trainer_state.pt")


def work_done(state: dict) -> str | None:
    """A checkpoint's completed work (see mark_done): None, "step" or "end". Checkpoints written before each one
    recorded it (no "done" key) were marked only at the end of a run (with True): an unmarked periodic one is taken
    as done, so that an upgrade does not run its validation / evaluation again."""
    done = state.get("done", "legacy")
    if done == "legacy":
        return "step" if state["step"] < state["config"]["regime"]["num_steps"] else None
    return "end" if done is True else done or None


def load_checkpoint(path: Path, model, optimizer, train_loader) -> dict:
    """Restore model, optimizer, loader and RNG; DCP reshards, so the world size may differ from the writer's.
    Returns the trainer state: step, loader, model_args, config (as resolved by the run that wrote it), dtype."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    trainer_state = torch.load(path / "trainer_state.pt", weights_only=False)  # our own file (loader state, config)
    theirs, ours = trainer_state["model_args"], asdict(model.args)
    changed = [k for k in ours if k in theirs and theirs[k] != ours[k]]
    if shape := [f"{k} {theirs[k]} -> {ours[k]}" for k in changed if k in ARCH_FIELDS]:
        # DCP would fail on the first tensor of another shape in a long traceback, or load equal shapes silently
        raise ValueError(f"{path} holds another model ({', '.join(shape)}): resume it with the model it was trained "
                         "with, or start a fresh run in another checkpoint.dir")
    if changed:  # e.g. max_seq_len or RoPE scaling for a longer context: the weights fit, the new values apply
        diff = ", ".join(f"{k} {theirs[k]} -> {ours[k]}" for k in changed)
        print0(f"note: model settings differ from the checkpoint's ({diff}): the new ones apply")
    # before the weights: a refused loader state should not cost a 70B load first
    train_loader.load_state_dict(trainer_state["loader"])
    model_sd, optim_sd = get_state_dict(model, optimizer)  # initializes empty AdamW state so it has a layout
    state = {"model": model_sd, "optim": optim_sd}
    with quiet_single_process_dcp():
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    # The optimizer state carries the checkpoint's hyperparameters; this run's config wins (lr: get_lr, each step).
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for g, h in zip(optimizer.param_groups, hyper):
        g.update(h)
    rng_file = path / f"rng_rank{rank}.pt"
    if rng_file.is_file():  # absent when resuming at a larger world size: the seed-derived state stays
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return trainer_state


def generation_config(tok, source_dir: Path | None = None) -> dict:
    """eos_token_id lists every id that ends generation: eos AND the chat end-of-turn (with eos alone, a chat model's
    generation runs on past <|eot_id|>). The pretrained model's generation_config.json is kept otherwise (its sampling
    defaults: temperature / top_p of an Instruct model, which vLLM and transformers apply), as transformers'
    save_pretrained of a fine-tuned model keeps it."""
    src = source_dir / "generation_config.json" if source_dir else None
    gen = json.loads(src.read_text()) if src and src.is_file() else {"do_sample": False}
    gen.pop("transformers_version", None)
    eos = list(dict.fromkeys(i for i in [tok.eos_id, tok.eot_id, *tok.stop_ids] if i is not None))
    gen["eos_token_id"] = eos
    if tok.bos_id is not None:
        gen["bos_token_id"] = tok.bos_id
    if tok.pad_id is not None:
        gen["pad_token_id"] = tok.pad_id
    return gen


def export_hf(model, args, tok, out_dir: Path, dtype: torch.dtype = torch.float32, source_dir: Path | None = None):
    """Gather the full weights to rank 0's CPU (others get nothing) and write an HF directory in `dtype`.
    source_dir: the pretrained model's directory (its generation_config.json is carried over)."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_initialized() or dist.get_rank() == 0:
        sd = {k: v.to(dtype) for k, v in sd.items()}  # a tied head stays one tensor: ours_to_hf writes it once
        model_lib.save_hf(sd, args, out_dir, generation_config=generation_config(tok, source_dir))
        tok.save(out_dir)
        print0(f"exported HF model to {out_dir}")
        if tok.files and tok.chat_format in ("llama3", "qwen3", "chatml") and not tok.chat_template:
            print0(f"note: the tokenizer has no chat_template (its source files have none): transformers' "
                   f"apply_chat_template and chat servers need one; generate.py --chat renders {tok.chat_format}")
    barrier()


def export_dtype(name: str, trained: str) -> torch.dtype:
    """checkpoint.export_dtype: auto = the dtype the run computed in (bf16 on GPU: half the files of fp32)."""
    return getattr(torch, (trained if name == "auto" else name).removeprefix("torch."))


def load_checkpoint_model(ckpt_dir) -> tuple[torch.nn.Module, dict]:
    """A saved (sharded, any world size) checkpoint's weights in a plain CPU Transformer, and its trainer state."""
    ckpt = Path(ckpt_dir)
    if not (ckpt / "trainer_state.pt").is_file():
        raise FileNotFoundError(f"not a complete checkpoint (no trainer_state.pt): {ckpt}")
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)  # our own file
    model = model_lib.empty_model(model_lib.ModelArgs(**state["model_args"]))  # every weight is read below
    sd = model.state_dict()
    with quiet_single_process_dcp():
        dcp.load({"model": sd}, checkpoint_id=str(ckpt), no_dist=True)
    model.load_state_dict(sd)
    return model, state


def source_model_dir(path: str) -> Path | None:
    """The pretrained model's local directory, for its generation_config.json: a local path as is; for hg:// only
    what the Hub cache already holds (an export must not download a whole model, nor fail offline)."""
    if not path or not path.startswith("hg://"):
        return Path(path) if path else None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache("/".join(path[5:].strip("/").split("/")[:2]), "generation_config.json")
    return Path(found).parent if isinstance(found, str) else None


def export_checkpoint(ckpt_dir: str, out_dir: str, tokenizer: str = ""):
    """`python train.py --export CKPT_DIR OUT_DIR [--tokenizer PATH]`: a saved checkpoint (or a run directory's newest)
    -> an HF directory, in one process. The tokenizer: `tokenizer`, else the run's (its tokenizer.path or model.path)."""
    if not (Path(ckpt_dir) / "trainer_state.pt").is_file() and complete_checkpoints(Path(ckpt_dir) / "checkpoints"):
        ckpt_dir = complete_checkpoints(Path(ckpt_dir) / "checkpoints")[-1]
        print(f"exporting the newest checkpoint of the run: {ckpt_dir}")
    model, state = load_checkpoint_model(ckpt_dir)
    tok_cfg, model_cfg = state["config"]["tokenizer"], state["config"]["model"]
    tok = load_tokenizer(tokenizer, "", "") if tokenizer else \
        load_run_tokenizer(tok_cfg["path"], model_cfg["path"], tok_cfg["chat_format"])
    dtype = export_dtype(state["config"]["checkpoint"].get("export_dtype", "auto"), state.get("dtype", "float32"))
    export_hf(model, model.args, tok, Path(out_dir), dtype, source_model_dir(model_cfg["path"]))


def load_eval_examples(cfg: Config) -> list[dict]:
    """GSM8K-format rows {"question", "answer"} of evaluation.split (src_field / tgt_field mapped), read with data.py's
    file layout rules (a .jsonl path, or a split of dataset.path: <split>.jsonl, hg://...). With dataset.sources: the
    split of every source that has it, each with its own field names."""
    e, ds = cfg.evaluation, cfg.dataset
    if e.split.endswith(".jsonl"):
        groups = [(ds, [e.split])]
    elif ds.sources:
        groups, missing = [], []
        for s in data.source_configs(ds):
            files = data.resolve_files(s.cfg.path, e.split, f"{s.where}.path", True, s.cfg.train_split)
            if files:
                groups.append((s.cfg, files))
            else:
                missing.append(s.name)
        if missing and groups:
            print0(f"evaluation.split={e.split}: sources without it, skipped: {', '.join(missing)}")
        if not groups:
            raise FileNotFoundError(f"evaluation.split={e.split}: no entry of dataset.sources has a '{e.split}' split; "
                                    "set evaluation.split to a split one has, or to a .jsonl path")
    else:
        groups = [(ds, data.resolve_files(ds.path, e.split, "dataset.path", train_split=ds.train_split))]
    per_group = [[(c, where, raw) for f in files for where, raw in data.read_records(f)] for c, files in groups]
    # the sources in turn: evaluation.limit takes from each of them, not the first source's first examples
    rows = [r for turn in itertools.zip_longest(*per_group) for r in turn if r is not None]
    rows = rows[:e.limit] if e.limit else rows
    try:  # every field checked now (file:line), not when the evaluation reaches it after training
        examples = [generate.gsm8k_row(data.parse_record(where, raw), where, (c.src_field, c.tgt_field))
                    for c, where, raw in rows]
    except data.BadExample as err:
        raise ValueError(f"evaluation.split={e.split}: {err}") from None
    # known now, not at the end of a long run: an evaluation that would score nothing (evaluate_gsm8k skips them)
    no_gold = sum(generate.question_and_gold(ex)[1] is None for ex in examples)
    if no_gold == len(examples):
        raise ValueError(f"evaluation.split={e.split}: none of its {len(examples)} examples has a '#### N' answer "
                         "(GSM8K style) to score: point evaluation.split at such data, or set it to ''")
    if no_gold:
        print0(f"evaluation.split={e.split}: {no_gold} of {len(examples)} examples have no '#### N' answer: "
               "skipped and counted at each evaluation")
    return examples


# Dense bf16 peak per GPU (NVIDIA spec sheets), looked up by the first key the device name contains: the PCIe and
# NVL cards, with lower clocks and power, come before their SXM names.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989e12, "H200": 989e12,
                   "A100": 312e12, "B200": 2250e12}


def peak_flops(device: torch.device | str) -> float | None:
    """The peak for a CUDA device (or a device name, e.g. "NVIDIA H100 PCIe"); None when unknown or not a GPU."""
    if isinstance(device, torch.device):
        if device.type != "cuda":
            return None
        device = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device), None)


def trim_metrics(path: Path, last_step: int, redo_step: int | None = None) -> int:
    """Drop metrics.jsonl records after last_step (and unreadable lines: a write cut by a crash), so that the steps
    a resumed run trains again after its checkpoint (or a fresh run in the same dir: last_step -1) are logged once;
    and the validation / evaluation records of redo_step, whose end-of-run work a relaunch does again after a stop or
    an error cut it short. Returns how many records were dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    def keep(line):
        try:
            rec = json.loads(line)
            return rec["step"] <= last_step and not (rec["step"] == redo_step and "loss" not in rec)
        except (ValueError, KeyError, TypeError):
            return False
    kept = [line for line in lines if keep(line)]
    if len(kept) < len(lines):
        path.with_suffix(".tmp").write_text("".join(line + "\n" for line in kept))
        os.replace(path.with_suffix(".tmp"), path)
    return len(lines) - len(kept)


def json_safe(record: dict) -> dict:
    """NaN / inf (a skipped non-finite step) as null: json.dumps would write NaN, which strict JSON parsers reject."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def reset_peak_memory(device: torch.device):
    if device.type == "cuda":  # the CPU figure, the process's peak RSS, cannot be reset
        torch.cuda.reset_peak_memory_stats(device)


def memory_gb(device: torch.device) -> float:
    """Peak memory: on CUDA since the last reset_peak_memory (the loop resets it before each step); on CPU the
    process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # peak RSS (Linux: KiB)


QUIT = []  # a second Ctrl-C was raised: main() ends the run as an interrupt, whatever exception it surfaced as


@contextlib.contextmanager
def stop_signals():
    """SIGTERM / SIGUSR1 (what SLURM and Kubernetes send before preemption) and Ctrl-C (SIGINT) ask for a checkpoint
    at the end of the step: yields [flag, signal number], set by the handler. The ranks agree through the step's loss
    all-reduce, so all of them stop after the same step (after the last one, in its validation / evaluation: through
    an all-reduce of the flag between them). A second Ctrl-C quits at once, without the checkpoint (main: exit 130). The
    handler only sets the flag: printing from it could re-enter a stdout write the signal interrupted. The previous
    handlers come back on exit, also on an error (train() may run inside a notebook)."""
    signalled = [0.0, None]

    def on_signal(signum, frame):
        if signum == signal.SIGINT and signalled[1] == signal.SIGINT:
            QUIT.append(signum)
            raise KeyboardInterrupt
        signalled[:] = [1.0, signum]
    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        yield signalled
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------------------------------- train


def start_profiler(device: torch.device) -> torch.profiler.profile:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=acts)
    prof.start()
    return prof


def finish_profiler(prof, out_dir: Path, rank: int, steps: list[int], device: torch.device):
    """Chrome trace per rank (chrome://tracing, perfetto.dev) and, on rank 0, the ops that took the most time."""
    prof.stop()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"steps_{steps[0]}-{steps[1]}_rank{rank}.json"
    prof.export_chrome_trace(str(path))
    print0(f"profile of steps {steps[0]}-{steps[1]} (trace: {path}), " + profile_table(prof, device))


def profile_table(prof, device: torch.device, rows: int = 15) -> str:
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return f"ops by {key}:\n" + prof.key_averages().table(sort_by=key, row_limit=rows)


def train(cfg: Config) -> dict:
    """Returns {"step", "val_loss", "eval"} of the last evaluations (for tests and scripts)."""
    # --- distributed setup: torchrun sets RANK/WORLD_SIZE; a plain `python train.py` (one CPU / GPU) is undistributed
    device_type = cfg.trainer.device if cfg.trainer.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # FSDP2 shards across 2+ ranks and gives them bf16 compute over fp32 master weights (MixedPrecisionPolicy). One
    # rank has nothing to shard: it trains the plain module under bf16 autocast, as torchtitan does (measured on an
    # H200, Llama 3.2 1B shape: 46.7% MFU with autocast vs 42.9% with 1-rank FSDP2; on CPU FSDP's hooks cost 3x).
    use_fsdp = world > 1
    if not use_fsdp and cfg.trainer.dp_replicate > 1:
        raise ValueError(f"trainer.dp_replicate={cfg.trainer.dp_replicate} replicates across processes, but this run is "
                         "one process: launch it with torchrun (e.g. --nnodes=N --nproc_per_node=G)")
    if "RANK" in os.environ and not dist.is_initialized():
        # NCCL's default 10 minutes is shorter than what rank 0 may do alone while the others wait in a collective
        # (download a model, build the token cache, export 70B to safetensors); past the timeout NCCL kills the job.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None,
                                timeout=timedelta(minutes=cfg.trainer.dist_timeout_minutes))
    if cfg.trainer.num_threads > 0:
        torch.set_num_threads(cfg.trainer.num_threads)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.trainer.dtype]
    # One rank: matmuls (and attention) in bf16 over the fp32 weights; norms, softmax and the residual stream in fp32.
    amp = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 and not use_fsdp \
        else contextlib.nullcontext
    mesh = None
    if use_fsdp:
        R = cfg.trainer.dp_replicate
        if world % R:
            raise ValueError(f"trainer.dp_replicate={R} must divide the world size {world}")
        mesh = init_device_mesh(device.type, (R, world // R), mesh_dim_names=("dp_replicate", "dp_shard")) \
            if R > 1 else init_device_mesh(device.type, (world,), mesh_dim_names=("dp_shard",))
    is_master = rank == 0
    out_dir = Path(cfg.checkpoint.dir)
    ckpt_root = out_dir / "checkpoints"
    if is_master:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # e.g. a parent is a file, or no permission: OSError's own text names no key
            raise OSError(f"checkpoint.dir {out_dir}: cannot create it ({e.strerror}): set checkpoint.dir to a "
                          "directory you can write") from None
        text = yaml.safe_dump(asdict(cfg), sort_keys=False)
        print(f"# resolved config (saved to {out_dir / 'config.yaml'})\n{text}", flush=True)
        (out_dir / "config.yaml").write_text(text)
    random.seed(cfg.trainer.seed)
    SummaryWriter = None  # checked here, not after minutes of tokenizing and loading
    if cfg.trainer.tensorboard and is_master:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("trainer.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
    # settings that would silently do nothing
    if cfg.regime.validate_every_n_steps and not cfg.dataset.valid_split:
        print0(f"note: regime.validate_every_n_steps={cfg.regime.validate_every_n_steps} does nothing without "
               "dataset.valid_split")
    for key, split in (("dataset.valid_split", cfg.dataset.valid_split), ("evaluation.split", cfg.evaluation.split)):
        if split and split == cfg.dataset.train_split:
            print0(f"note: {key}={split} is the train split: it measures the training data, not held-out data")
    if cfg.evaluation.every_n_steps and not cfg.evaluation.split:
        print0(f"note: evaluation.every_n_steps={cfg.evaluation.every_n_steps} does nothing without evaluation.split")

    # --- tokenizer and data
    tok = load_tokenizer(cfg.tokenizer.path, cfg.model.path, cfg.tokenizer.chat_format)
    loader_kw = dict(rank=rank, world_size=world, seed=cfg.trainer.seed, device=device)
    train_loader = data.build_loader(cfg.dataset, tok, cfg.dataset.train_split, **loader_kw)
    val_loader = data.build_loader(cfg.dataset, tok, cfg.dataset.valid_split, infinite=False, **loader_kw) \
        if cfg.dataset.valid_split else None
    eval_examples = load_eval_examples(cfg) if cfg.evaluation.split else None

    # --- model: meta-device build -> AC -> compile -> FSDP2 -> materialize shards -> rank 0 loads, broadcasts
    # Rank 0 alone holds the full weights (pretrained, or a seeded random init identical at any world size); the
    # other ranks only get their shards, by broadcast, so a 70B run needs 70B of host memory on rank 0 only.
    model_dir = resolve_path(cfg.model.path, "model.path") if cfg.model.path else None
    full = None
    if is_master and model_dir:
        full = model_lib.load_hf(model_dir, dtype=checkpoint_dtype(model_dir, dtype))
        untrained = model_lib.untrained_token_ids(full)
        if untrained and cfg.model.fix_untrained_tokens:  # e.g. Llama 3 base's chat tokens, in chat-format data
            used = data.ids_present(train_loader.data, untrained)
            model_lib.fix_untrained_tokens(full, used)
            print(f"model: {len(untrained)} untrained (all-zero) embedding rows; the data uses {len(used)}, set to "
                  f"the mean embedding: {', '.join(tok.decode([i]) for i in used[:12])}"
                  f"{' ...' if len(used) > 12 else ''} (model.fix_untrained_tokens=false keeps them)", flush=True)
    elif is_master:
        torch.manual_seed(cfg.trainer.seed)
        full = model_lib.Transformer(model_lib.get_preset(cfg.model.name))
        full.init_weights()
    box = [full.args if full is not None else None]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    args = box[0]
    # What must fit the embedding table is every id the model will see, not the tokenizer's whole list: Llama 3.2's
    # tokenizer files add <|image|> = 128256 to a 128,256-row model, and neither text nor chat rendering emits it.
    max_id = max([train_loader.pad_id] + [ld.data.meta["max_id"] for ld in (train_loader, val_loader) if ld])
    if cfg.dataset.max_seq_len > args.max_seq_len:
        raise ValueError(f"dataset.max_seq_len={cfg.dataset.max_seq_len} is longer than the model's context "
                         f"(max_seq_len={args.max_seq_len}, config.json max_position_embeddings): lower it")
    if max_id >= args.vocab_size:
        # a preset is a random init sized for the byte tokenizer (tiny_llama: 512 ids) or for its family's tokenizer
        fix = f"; model.name={cfg.model.name} has a {args.vocab_size}-token vocabulary: use model.path with the HF " \
            "directory of the tokenizer's model, or a full-size preset of its family" if cfg.model.name else ""
        raise ValueError(f"token id {max_id} (data or pad) does not fit the model's vocab_size={args.vocab_size}: "
                         f"the tokenizer ({tok.vocab_size} ids) does not belong to this model{fix}")
    with torch.device("meta"):
        model = model_lib.Transformer(args)
    model.compile_loss = cfg.trainer.compile
    if cfg.trainer.activation_checkpointing == "selective" and not cfg.trainer.compile and device.type == "cuda":
        # eager blocks call flex_attention as a compiled function, whose ops the policy never sees
        print0("note: selective activation checkpointing keeps flex_attention's output (packed rows) only with "
               "trainer.compile=true; without it attention is recomputed in the backward")
    for block in model.layers:
        if cfg.trainer.activation_checkpointing != "off":
            apply_activation_checkpointing(block, cfg.trainer.activation_checkpointing)
        if cfg.trainer.compile:
            block.compile()  # in place: no "_orig_mod." in state-dict keys
    if use_fsdp:
        mp = MixedPrecisionPolicy(param_dtype=dtype if dtype != torch.float32 else None, reduce_dtype=torch.float32)
        for i, block in enumerate(model.layers):
            # reshard_after_forward=False keeps every gathered block until its backward: no second all-gather, at
            # the memory of the unsharded bf16 weights. The last block's backward starts right after the forward,
            # so resharding it would only re-gather it.
            reshard = cfg.trainer.reshard_after_forward and i < len(model.layers) - 1
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, mp_policy=mp)  # root: embeddings, final norm, head (tied with embeddings)
        for m in model.modules():
            if isinstance(m, FSDPModule):  # we divide by the global token count ourselves: FSDP must only sum
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM; factor 1 needs none)
    model.to_empty(device=device)
    with warnings.catch_warnings():  # random init of CPU DTensors warns; the values are overwritten right below
        warnings.filterwarnings("ignore", message="DTensor random operators")
        model.init_weights()  # re-ties the embedding (to_empty breaks the tie); the values come next
    if use_fsdp:
        set_model_state_dict(model, full.state_dict() if is_master else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        model.load_state_dict(full.state_dict())
    del full
    assert not args.tie_embeddings or model.output.weight is model.tok_embeddings.weight, "embedding tie lost"
    n_params = model_lib.num_params(args)
    print0(f"model: {cfg.model.name or cfg.model.path} {n_params / 1e6:.1f}M params | world {world} | "
           f"device {device.type} | {'FSDP2' if use_fsdp else 'one rank, no FSDP'} | dtype {dtype}"
           f"{'' if use_fsdp or dtype == torch.float32 else ' (autocast)'} | compile {cfg.trainer.compile}")

    # --- optimizer, resume
    optimizer = build_optimizer(model, cfg.optimizer)
    step, resumed = 0, None
    ckpts = complete_checkpoints(ckpt_root) if cfg.checkpoint.resume else []
    if ckpts:
        resumed = load_checkpoint(ckpts[-1], model, optimizer, train_loader)
        step = resumed["step"]
        print0(f"resumed from {ckpts[-1]} at step {step}")
    done = work_done(resumed) if resumed is not None else None  # what completed of its step's work
    # What of the checkpoint's work did not complete (a stop, a crash or an error came first): the resume does it at
    # its first step; the end work also when a periodic checkpoint is now the last step (num_steps lowered to it).
    redo_step_work = resumed is not None and not done
    redo_end_work = resumed is not None and done != "end"
    if cfg.regime.num_data_epochs:
        # fairseq2's num_data_epochs: num_steps and the epochs are both limits, the earlier one ends the run, and
        # the lr schedule spans the steps actually run. A step takes world x grad_accum of the global batches; what is
        # left is counted from the loader's position, so a run resumed at another world size stops after the same data.
        per_step, bpe = world * cfg.trainer.grad_accum, train_loader.batches_per_epoch
        left = max(0, cfg.regime.num_data_epochs * bpe - (train_loader.epoch * bpe + train_loader.index))
        epoch_steps = step + math.ceil(left / per_step)
        train_loader.stop_at(cfg.regime.num_data_epochs * bpe)  # a last step that reaches past it gets fillers
        binding = "the data epochs" if epoch_steps <= cfg.regime.num_steps else \
            f"regime.num_steps (raise it for all {cfg.regime.num_data_epochs} epochs)"
        over = f" (a step takes {per_step} batches, an epoch has {bpe})" if per_step > bpe else ""
        if left % per_step and epoch_steps <= cfg.regime.num_steps:
            over += f"; the last step has {left % per_step} of its {per_step} batches (the others are fillers without " \
                "labels: no example is trained more often than the epochs say)"
        print0(f"regime: {cfg.regime.num_data_epochs} data epoch(s) = {epoch_steps} steps of {per_step} global "
               f"batch{'es' if per_step > 1 else ''} each{over}, num_steps={cfg.regime.num_steps}: stopping after "
               f"{min(epoch_steps, cfg.regime.num_steps)} steps, set by {binding}")
        cfg.regime.num_steps = min(cfg.regime.num_steps, epoch_steps)
    if resumed is not None:  # a resume that changes the optimizer or lr schedule, or has nothing left to do, says so
        before, now = resumed["config"], asdict(cfg)
        changed = [f"{sec}.{k}: {before[sec].get(k)} -> {now[sec][k]}" for sec, keys in
                   (("regime", ["num_steps"]), ("optimizer", list(now["optimizer"])),
                    ("lr_scheduler", list(now["lr_scheduler"]))) for k in keys if before[sec].get(k) != now[sec][k]]
        if changed:
            print0(f"note: the optimizer / lr schedule differs from the checkpoint's run ({'; '.join(changed)}): "
                   f"it continues from step {step} with the new settings")
        if before["model"]["path"] != now["model"]["path"]:
            print0(f"note: model.path changed ({before['model']['path']} -> {now['model']['path']}): the weights "
                   "come from the checkpoint (model.path initializes a fresh run only)")
        if step >= cfg.regime.num_steps:
            print0(f"note: the checkpoint is at step {step} and regime.num_steps={cfg.regime.num_steps}: nothing left "
                   "to train (raise regime.num_steps to continue)" + ("; its final validation and evaluation ran "
                   "already" if done == "end" else ""))
    if cfg.lr_scheduler.warmup_steps >= cfg.regime.num_steps:
        print0(f"note: lr_scheduler.warmup_steps={cfg.lr_scheduler.warmup_steps} >= the run's {cfg.regime.num_steps} "
               f"steps: the lr never reaches optimizer.lr={cfg.optimizer.lr}")
    extra = {"model_args": asdict(args), "config": asdict(cfg), "dtype": str(dtype)}  # for `--export` and for humans

    # --- logging
    metrics_file = None
    if is_master:
        # the work of its step, done again (trimmed: logged once)
        redo = redo_step_work or (step >= cfg.regime.num_steps and redo_end_work)
        dropped = trim_metrics(out_dir / "metrics.jsonl", step if resumed is not None else -1, step if redo else None)
        if dropped:
            print(f"metrics.jsonl: dropped {dropped} records " + (
                "of an earlier run here that left no checkpoint" if resumed is None else
                f"of the checkpoint's step {step} (its validation / evaluation, done again) or later" if redo else
                f"after the checkpoint's step {step} (steps this run trains again)"), flush=True)
        metrics_file = open(out_dir / "metrics.jsonl", "a")
    tb = SummaryWriter(str(out_dir / "tb")) if SummaryWriter is not None else None

    def publish(record: dict):
        if is_master:
            metrics_file.write(json.dumps(json_safe(record)) + "\n")
            metrics_file.flush()
            for k, v in record.items():
                if tb is not None and isinstance(v, (int, float)) and k != "step":
                    tb.add_scalar(k, v, record["step"])

    # A mixture's validation batches each hold one source (data.plan_by_source): a loss per source, by name.
    val_sources = [s["name"] for s in val_loader.data.meta.get("sources", [])] if val_loader else []

    def validate() -> dict:
        """{"": the loss over the whole split, and per source of a mixture of 2+: {name: loss}."""
        model.eval()
        sums = torch.zeros(max(1, len(val_sources)), 2, device=device, dtype=torch.float64)  # loss sum, tokens
        with torch.no_grad():
            for b in val_loader:  # one full pass; the same number of batches on every rank
                with amp():
                    sums[max(b.source, 0), 0] += model(b.tokens, b.positions, b.doc_ids, b.labels).double()
                sums[max(b.source, 0), 1] += b.num_label_tokens
        model.train()
        all_reduce_sum(sums)
        mean = lambda s: (s[0] / s[1].clamp(min=1)).item()  # noqa: E731
        per_source = {name: mean(sums[i]) for i, name in enumerate(val_sources)} if len(val_sources) > 1 else {}
        return {"": mean(sums.sum(0)), **per_source}

    def evaluate() -> dict:
        with torch.compiler.set_stance("force_eager"), amp():  # generation shapes vary every step: no recompiles
            res = generate.evaluate_gsm8k(model, tok, eval_examples, chat=cfg.dataset.chat_mode,
                                          batch_size=cfg.evaluation.batch_size,
                                          max_new_tokens=cfg.evaluation.max_new_tokens,
                                          source_encode_mode=cfg.dataset.source_encode_mode)
        pred_file = out_dir / "eval" / f"step_{step:08d}.jsonl"  # every completion, to read what the model says
        if is_master:
            generate.write_predictions(pred_file, res["predictions"])
        for line in generate.summary_lines(res)[:-1]:  # skipped examples by reason, strict-match accuracy
            print0(f"step {step}: {line}")
        print0(f"step {step}: gsm8k accuracy {res['accuracy']:.1%} ({res['correct']}/{res['total']}), "
               f"predictions in {pred_file}")
        publish({"step": step, "eval_accuracy": res["accuracy"]})
        return res

    # --- training loop: lr -> (eval / checkpoint) -> micro-steps -> clip -> step -> log
    num_steps, grad_accum = cfg.regime.num_steps, cfg.trainer.grad_accum
    result = {"step": step, "val_loss": None, "eval": None}
    model.train()
    train_iter = iter(train_loader)
    # since the last log; loss: summed over the supervised tokens of the steps with a finite loss (loss_labels)
    window = dict.fromkeys(("tokens", "labels", "padded", "flops", "steps", "loss", "loss_labels", "time"), 0)
    start_step, train_time = step, 0.0  # train_time: seconds in training steps (no eval / checkpoint), for the ETA
    prof = None  # a torch.profiler run over trainer.profile_steps
    stop = False
    saved = (start_step, ckpts[-1] if resumed is not None else None)  # the newest checkpoint: step, directory

    def log_window():
        """Publish the means over the steps since the last record (the loss per supervised token of those with a
        finite one)."""
        nonlocal window
        dt = window["time"]
        rec = {"step": step, "loss": window["loss"] / window["loss_labels"] if window["loss_labels"] else math.nan, "lr": lr,
               "grad_norm": grad_norm, "tokens_per_s": window["tokens"] / dt, "label_tokens_per_s": window["labels"] / dt,
               "padding": 1 - window["tokens"] / max(1, window["padded"]), "memory_gb": memory_gb(device)}
        peak = peak_flops(device)
        if peak:
            rec["mfu"] = window["flops"] / dt / (peak * world)
        eta = train_time / (step - start_step) * (num_steps - step)
        print0(f"step {step}/{num_steps} | loss {rec['loss']:.4f} | lr {lr:.2e} | gnorm {grad_norm:.3f} | "
               f"tok/s {rec['tokens_per_s']:,.0f} (sup {rec['label_tokens_per_s']:,.0f})"
               + (f" | mfu {rec['mfu']:.1%}" if "mfu" in rec else "")
               + f" | pad {rec['padding']:.1%} | mem {rec['memory_gb']:.2f}GB | eta {eta / 60:.1f}m")
        publish(rec)
        window = dict.fromkeys(window, 0)

    def checkpoint():
        nonlocal saved
        saved = (step, save_checkpoint(ckpt_root, step, model, optimizer, train_loader, extra,
                                       cfg.regime.keep_last_n_checkpoints))
        print0(f"step {step}: saved checkpoint {saved[1]}")

    with stop_signals() as signalled:  # [flag, signal number]: a stop was asked (see stop_signals)
        def signal_agreed() -> bool:
            """Whether any rank got a stop signal: every rank asks at the same point, so all of them get one answer."""
            return all_reduce_sum(torch.tensor(signalled[0], dtype=torch.float64, device=device)).item() > 0

        while True:
            if stop:
                if window["steps"]:  # the steps since the last record
                    log_window()
                unsaved = step > saved[0]  # else stopped in the end work, after the final checkpoint
                if signalled[1] is not None:
                    print(f"rank {rank}: got {signal.Signals(signalled[1]).name}: "
                          + ("checkpoint and stop" if unsaved else f"stop (step {step} is checkpointed)")
                          + (" (Ctrl-C again quits without it)" if unsaved and signalled[1] == signal.SIGINT else ""),
                          flush=True)
                if prof is not None:  # stopped inside trainer.profile_steps: keep what was traced
                    finish_profiler(prof, out_dir / "profile", rank, [cfg.trainer.profile_steps[0], step], device)
                if unsaved:
                    checkpoint()
                print0(f"step {step}: stopped by a signal; launch the same command again to resume")
                result["stopped"] = signalled[1] or signal.SIGTERM  # the signal (another rank's, for the others)
                break
            lr = get_lr(step, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            last = step >= num_steps
            # The work due at a step (validation, evaluation; the final ones after the last step) runs after its
            # checkpoint, which records it once it completed (mark_done); at the resume's first step only what the
            # checkpoint does not record (redo_step_work, redo_end_work).
            fresh = step > start_step or redo_step_work
            end = last and (step > start_step or redo_end_work)
            every = lambda n: n > 0 and step % n == 0 and fresh  # noqa: E731
            # The checkpoint before the validation and evaluation: an error in them (e.g. an evaluation prompt longer
            # than the model's context) must not lose the steps since the last one.
            if step > start_step and (last or every(cfg.regime.checkpoint_every_n_steps)):
                checkpoint()
            # A signal during the end work (or the final checkpoint's write) skips what is left of it: no training step
            # is left to carry the flag in its all-reduce, so the ranks agree on it before each part and after the last.
            stop = end and signal_agreed()
            if not stop and val_loader and (end or every(cfg.regime.validate_every_n_steps)):
                val = validate()
                result["val_loss"] = val.pop("")
                print0(f"step {step}: validation loss {result['val_loss']:.4f}"
                       + (f" ({', '.join(f'{name} {v:.4f}' for name, v in val.items())})" if val else ""))
                publish({"step": step, "val_loss": result["val_loss"], **{f"val_loss/{k}": v for k, v in val.items()}})
                stop = end and signal_agreed()
            if not stop and eval_examples and (end or (step == start_step == 0 and cfg.evaluation.at_start)
                                               or every(cfg.evaluation.every_n_steps)):
                result["eval"] = evaluate()
                stop = end and signal_agreed()
            if stop:
                continue  # stopped at the top of the loop; the checkpoint stays not done: a relaunch does the end work
            if (fresh or end) and saved[0] == step and is_master:  # done: a resume from here does not redo it
                mark_done(saved[1], "end" if end else "step")
            if last:
                break
            reset_peak_memory(device)  # the logged memory is the training step's, not a validation's or evaluation's

            # The step's micro-batches are fetched up front: the global count of supervised tokens must be known before
            # the first backward. data.py's loader prefetches the next ones in a background thread meanwhile.
            if cfg.trainer.profile_steps and step + 1 == cfg.trainer.profile_steps[0]:
                prof = start_profiler(device)
            t0 = time.perf_counter()
            batches = [next(train_iter) for _ in range(grad_accum)]
            # model FLOPs (for the MFU): real tokens x flops_per_token, attention over each document (what the
            # doc-masked model computes, packed or padded: a token's mean causal span is sum(n^2) / sum(n))
            flops = sum(b.num_tokens * model_lib.flops_per_token(args, b.doc_len_sq / max(b.num_tokens, 1))
                        for b in batches)
            counts = torch.tensor([sum(b.num_label_tokens for b in batches), sum(b.num_tokens for b in batches),
                                   sum(b.tokens.numel() for b in batches), flops], dtype=torch.float64)
            # from pinned memory without a host sync: the CPU queues this step's forward while the GPU still runs the
            # last optimizer step (a plain host->GPU copy would wait for it)
            counts = counts.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else counts
            all_reduce_sum(counts)
            n_labels = counts[0].clamp(min=1).float()  # guard: a step with no supervised token has loss 0
            loss_sum = torch.zeros((), device=device)
            for i, b in enumerate(batches):
                if use_fsdp:  # reduce-scatter gradients only after the last micro-batch
                    model.set_requires_gradient_sync(i == grad_accum - 1)
                with amp():
                    loss = model(b.tokens, b.positions, b.doc_ids, b.labels) / n_labels  # SUM of CE / global count
                loss.backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.max_grad_norm or float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
                grad_norm = grad_norm.full_tensor()
            # The step's one host read (besides the loss's selection of supervised rows in each forward): the
            # non-finite check needs loss and grad norm, the log needs the token counts.
            # The stop flag rides along in the loss all-reduce, so a signal during this step ends the run after it.
            # n: supervised tokens, real tokens, token slots, model FLOPs
            ends = all_reduce_sum(torch.stack([loss_sum.double(), loss_sum.new_tensor(signalled[0], dtype=torch.float64)]))
            loss_val, stop, grad_norm, *n = torch.cat([ends, grad_norm.double()[None], counts]).tolist()
            finite = math.isfinite(loss_val) and math.isfinite(grad_norm)
            if not finite:
                if not cfg.trainer.skip_nonfinite:
                    raise FloatingPointError(f"non-finite loss {loss_val} / grad norm {grad_norm} at step {step + 1}: "
                                             "stopping (last checkpoint kept; trainer.skip_nonfinite=true skips such "
                                             "steps)")
                print0(f"step {step + 1}: non-finite loss {loss_val} / grad norm {grad_norm}: step skipped")
            elif n[0] > 0:
                optimizer.step()
            else:
                print0(f"step {step + 1}: no supervised token in the global batch: no update")
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            train_time += dt
            if prof is not None and step in (cfg.trainer.profile_steps[1], num_steps):
                finish_profiler(prof, out_dir / "profile", rank, [cfg.trainer.profile_steps[0], step], device)
                prof = None

            for k, v in zip(("labels", "tokens", "padded", "flops"), n):
                window[k] += v
            window["steps"] += 1
            window["time"] += dt
            if finite:  # loss_val is the step's mean per supervised token: weighted back by its count
                window["loss"] += loss_val * n[0]
                window["loss_labels"] += n[0]
            if step % cfg.regime.publish_metrics_every_n_steps == 0 or step == num_steps:
                log_window()


    # --- final export
    if cfg.checkpoint.export_hf and not result.get("stopped"):
        export_hf(model, args, tok, out_dir / "hf", export_dtype(cfg.checkpoint.export_dtype, str(dtype)), model_dir)
    result["step"] = step
    if metrics_file:
        metrics_file.close()
    if tb is not None:
        tb.close()
    if dist.is_initialized():
        # The ranks leave together: one tearing gloo down while another still works (rank 0 marks the checkpoint
        # done) could abort at exit ("terminate called without an active exception", 1 run in ~5 on CPU).
        dist.barrier()
    return result


@contextlib.contextmanager
def one_line_errors(prefix: str = "error"):
    """Bad input (config, paths, data, sizes) ends a command with one line saying what and where, not a traceback.
    data.py's command line uses it too."""
    try:
        yield
    except (ValueError, OSError, ImportError, FloatingPointError) as e:  # OSError: FileNotFoundError, permissions
        raise SystemExit(f"{prefix}: {e}") from None


def main(argv: list[str]):
    QUIT.clear()  # a second Ctrl-C of an earlier main() in this process (a notebook) is not this run's
    if argv and argv[0] == "--export":
        p = argparse.ArgumentParser(prog="python train.py --export", description="a checkpoint (or a run directory's "
                                    "newest) -> an HF directory (safetensors, config, tokenizer files)")
        p.add_argument("checkpoint", help="a checkpoint directory (step_N) or a run's checkpoint.dir")
        p.add_argument("out_dir")
        p.add_argument("--tokenizer", default="", help="tokenizer path (default: the run's tokenizer.path or model.path)")
        a = p.parse_args(argv[1:])
        with one_line_errors():
            export_checkpoint(a.checkpoint, a.out_dir, a.tokenizer)
        return
    if not argv or argv[0] in ("-h", "--help"):
        raise SystemExit(__doc__)
    try:
        with one_line_errors("config error"):
            cfg = load_config(argv)
    except SystemExit as e:  # under torchrun every rank reads the config: rank 0 alone says what is wrong
        raise (e if int(os.environ.get("RANK", 0)) == 0 else SystemExit(1)) from None
    try:
        with one_line_errors():
            result = train(cfg)
        if result.get("stopped"):  # checkpointed and stopped early: not a finished run (`train && evaluate`)
            raise SystemExit(128 + int(result["stopped"]))
    except torch.OutOfMemoryError as e:
        asked = re.search(r"Tried to allocate [\d.]+ \w+", str(e))  # the rest of torch's message is pages long
        raise SystemExit(f"error: out of GPU memory{f' ({asked[0]})' if asked else ''}. Lower dataset.max_num_tokens "
                         "or dataset.batch_size (keeping the global batch with trainer.grad_accum), set "
                         "trainer.activation_checkpointing=selective or full, or use more GPUs (FSDP2 shards "
                         "weights, gradients and optimizer state)") from None
    except BaseException as e:
        # A second Ctrl-C quits at once. Inside a checkpoint write it surfaces as whatever the writer makes of it:
        # DCP's CheckpointException, torch.save's RuntimeError ("unexpected pos"), an OSError turned into one line:
        # one line for all of them; the next save removes the step_N.tmp it leaves.
        if isinstance(e, KeyboardInterrupt) or QUIT:
            print("interrupted: quit at once; launch the same command again to resume (or finish) from the newest "
                  "complete checkpoint", file=sys.stderr, flush=True)
            raise SystemExit(128 + signal.SIGINT) from None
        # Another rank died (its own error is in the output above): this one's collective fails with gloo's transport
        # error. One line, not a 20-line traceback burying the real error among the ranks' output. (NCCL's errors can
        # be a rank's own: they keep their traceback.)
        if dist.is_initialized() and isinstance(e, RuntimeError) and any(
                s in str(e) for s in ("Connection closed by peer", "Connection reset by peer")):
            raise SystemExit(f"rank {dist.get_rank()}: stopped: another rank failed (its error is above): "
                             f"{(str(e).splitlines() or [''])[0][:300]}") from None
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
