"""Shared fixtures. Files from outside the repo (../shared, downloaded tokenizers) are required under CI=true
and skipped with a message elsewhere, so a missing file can never turn into a silently green CI."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project is a flat set of modules at the repo root
TEST_FILES = ROOT / ".cache" / "test_files"
SHARED = ROOT.parent / "shared"


def require_path(path: Path, what: str) -> Path:
    """Return `path` if it exists; fail under CI, skip elsewhere, naming what is missing."""
    if path.exists():
        return path
    msg = f"missing {what}: {path}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg + " (required under CI=true; run tests/fetch_test_files.sh / provide ../shared)")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def llama3_tokenizer_dir() -> Path:
    """The real Llama 3.2 tokenizer (tokenizer.model, tokenizer.json, tokenizer_config.json)."""
    return require_path(TEST_FILES / "llama3.2" / "tokenizer.model", "Llama 3.2 tokenizer (tests/fetch_test_files.sh)").parent


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer (vocab.json, merges.txt, tokenizer.json, tokenizer_config.json)."""
    return require_path(TEST_FILES / "qwen3" / "tokenizer.json", "Qwen3 tokenizer (tests/fetch_test_files.sh)").parent


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    return require_path(SHARED / "data" / "gsm8k" / "test.jsonl", "GSM8K data in ../shared/data/gsm8k").parent


@pytest.fixture(scope="session")
def chat_templates_dir() -> Path:
    return require_path(SHARED / "reference" / "chat_templates" / "qwen3.jinja", "chat templates in ../shared/reference").parent
