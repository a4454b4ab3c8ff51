"""Every README snippet runs as written.

Each ```python / ```bash block of README.md carries a marker on the line before it::

    <!-- readme-test: run; dir=tiny; slow; "peftc train" -> "peftc train --max-steps 2" -->
    <!-- readme-test: skip: why it cannot run here (and which test covers it) -->

``run`` blocks run in a fresh process (bash: ``bash -euo pipefail``; python: this interpreter) with this
environment's ``peftc`` on PATH, and fail the test when they exit non-zero. Blocks with the same
``dir=NAME`` share one working directory, in README order (the HF PEFT snippet loads the adapter the
quick start trained); other blocks get one of their own. ``setup=NAME`` prepares files a block names
(``my-llama``: a tiny Llama directory and data files). ``"A" -> "B"`` replaces text before running, to
train for 2 steps where the README trains for minutes; nothing else is changed. ``slow`` marks blocks
that take more than 20 s here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(r"^```(python|bash)\s*$")
_MARKER = re.compile(r"^<!-- readme-test: (?P<body>.*) -->$")
_SUBSTITUTION = re.compile(r'^"(?P<old>[^"]+)" -> "(?P<new>[^"]*)"$')


@dataclass
class Snippet:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    run: bool = False
    skip_reason: str = ""
    dir: str | None = None
    setup: str | None = None
    slow: bool = False
    substitutions: list[tuple[str, str]] = field(default_factory=list)

    def text(self) -> str:
        code = self.code
        for old, new in self.substitutions:
            code = code.replace(old, new)
        return code


def _parse_marker(body: str, snippet: Snippet) -> None:
    head, _, rest = body.partition(";")
    if head.startswith("skip:") and head[5:].strip():
        snippet.skip_reason = body[5:].strip()
        return
    if head.strip() != "run":
        raise ValueError(f"README.md:{snippet.line}: marker must start with 'run' or 'skip: <reason>', got {body!r}")
    snippet.run = True
    for item in (x.strip() for x in rest.split(";") if x.strip()):
        sub = _SUBSTITUTION.match(item)
        if sub:
            snippet.substitutions.append((sub["old"], sub["new"]))
        elif item == "slow":
            snippet.slow = True
        elif item.startswith(("dir=", "setup=")):
            key, _, value = item.partition("=")
            setattr(snippet, key, value)
        else:
            raise ValueError(f"README.md:{snippet.line}: unknown marker item {item!r}")


def snippets() -> list[Snippet]:
    """The python and bash blocks of the README, with their markers (unmarked ones have neither run nor skip)."""
    lines = README.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        snippet = Snippet(fence[1], "\n".join(lines[i + 1 : end]) + "\n", i + 1)
        marker = _MARKER.match(lines[i - 1]) if i else None
        if marker:
            _parse_marker(marker["body"], snippet)
        found.append(snippet)
        i = end + 1
    return found


def test_every_snippet_is_marked_run_or_skip_with_a_reason():
    unmarked = [s.line for s in snippets() if not s.run and not s.skip_reason]
    assert not unmarked, (
        f"README.md lines {unmarked}: put '<!-- readme-test: run -->' (or '<!-- readme-test: skip: <why> -->') on "
        "the line before each ```python/```bash block; see tests/test_readme.py"
    )
    for s in snippets():
        for old, _ in s.substitutions:
            assert old in s.code, f"README.md:{s.line}: substitution {old!r} matches nothing in the block"
        assert s.setup in (None, *SETUPS), f"README.md:{s.line}: unknown setup {s.setup!r}"


# -- setups ----------------------------------------------------------------------------------------------------------


def _my_llama(work: Path) -> None:
    """./my-llama (a 2-layer Llama with a causal tokenizer from MiniLM's files), train.jsonl, eval.jsonl."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftc.models import causal_tokenizer, preset_path

    tokenizer = causal_tokenizer(preset_path("minilm"))
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(work / "my-llama", safe_serialization=True)
    tokenizer.save_pretrained(work / "my-llama")
    texts = [f"the {a} sat on the {b}" for a in ("cat", "dog", "bird", "fox") for b in ("mat", "hill", "roof")]
    (work / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (work / "eval.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:4]))


SETUPS = {"my-llama": _my_llama}


# -- running -------------------------------------------------------------------------------------------------------


def _groups() -> list[tuple[str, list[Snippet]]]:
    """Runnable blocks by working directory, in README order (a block without ``dir`` is its own group)."""
    groups: dict[str, list[Snippet]] = {}
    for s in snippets():
        if s.run:
            groups.setdefault(s.dir or f"line{s.line}", []).append(s)
    return list(groups.items())


def _params():
    for name, group in _groups():
        marks = [pytest.mark.slow] if any(s.slow for s in group) else []
        yield pytest.param(group, id=name, marks=marks)


def _env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")  # the CI machines' 2 cores are shared
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _run(snippet: Snippet, work: Path) -> subprocess.CompletedProcess:
    code = snippet.text()
    if snippet.lang == "bash":
        argv = ["bash", "-euo", "pipefail", "-c", code]
    else:
        argv = [sys.executable, "-c", code]
    return subprocess.run(argv, cwd=work, env=_env(), capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("group", list(_params()))
def test_snippets_run_as_written(group: list[Snippet], tmp_path):
    try:
        from peftc.models import preset_path

        preset_path("minilm")
    except Exception as e:  # noqa: BLE001 - the README's examples use the MiniLM package
        pytest.skip(f"MiniLM unavailable: {e}")
    for snippet in group:
        if snippet.setup:
            SETUPS[snippet.setup](tmp_path)
        result = _run(snippet, tmp_path)
        assert result.returncode == 0, (
            f"README.md:{snippet.line} ({snippet.lang}) exited {result.returncode}:\n{snippet.text()}\n--- stderr ---\n"
            f"{result.stderr[-3000:]}"
        )
