"""Shared artifacts of the TorchScript, AOTInductor and C++ tests, built once per test session (``cpp_cases``).

The reference is HF PEFT: a tiny GPT-2 with a LoRA adapter made and saved by HF PEFT itself (B
perturbed, so it is not the identity), bound into peftc programs with ``AdapterState.load``. The
AOTInductor package (``peftc export --format aoti --merge`` of that adapter; 1–2 min of g++) and the
C++ example binary (about a minute) are built at most once per session by :class:`CppCases` (a
session-scoped fixture in ``conftest.py``) and shared by test_torchscript.py, test_aoti.py and test_cpp.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_export_cases
import pytest
import torch
from conftest import captured, tiny_gpt2
from onnx_export_cases import ExportCases

ATOL = 1e-4
REPO = Path(__file__).resolve().parents[2]
CPP_DIR = REPO / "examples" / "cpp"
#: held-out (batch, seq, left pads): none is the capture example's 2 × 8
SHAPES = [(1, 7, [0]), (3, 5, [0, 0, 2]), (4, 12, [0, 3, 6, 11])]


@dataclass
class Gpt2Lora:
    """A saved HF PEFT LoRA adapter over the tiny GPT-2, and the HF models to compare with."""

    adapter_dir: Path
    peft_model: torch.nn.Module
    base_model: torch.nn.Module

    def program(self, merge: bool):
        """A fresh eval program of the tiny GPT-2 with the adapter bound (and folded when ``merge``)."""
        from peftc.passes import insertion_pipeline, merge_pipeline

        from peftc.adapters import AdapterState

        program, _ = captured("gpt2", "causal-lm")
        state = AdapterState.load(self.adapter_dir)
        insertion_pipeline(state.config, state)(program)
        if merge:
            merge_pipeline()(program)
        return program


class CppCases:
    """This session's HF PEFT adapter, AOTInductor package and C++ binary, made on first use.

    Args:
        cases: the session's :class:`~onnx_export_cases.ExportCases` (its root and its memo).
    """

    def __init__(self, cases: ExportCases):
        self.cases = cases

    def scratch(self, name: str) -> Path:
        return self.cases.scratch(name)

    def gpt2_lora(self) -> Gpt2Lora:
        """The tiny GPT-2 with a LoRA adapter saved by HF PEFT (skips without peft)."""
        return self.cases.memo("cpp-gpt2-lora", self._gpt2_lora)

    def aoti_package(self) -> Path:
        """``model.pt2`` of ``peftc export --format aoti --merge`` on the HF PEFT adapter: the merged GPT-2 LoRA
        program compiled with AOTInductor, in a verified artifact (skips without a C++ compiler)."""
        return self.cases.memo("cpp-aoti-package", self._aoti_package)

    def peftc_run_binary(self) -> Path:
        """examples/cpp built once (CMake when present, else the documented g++ line); skips without a compiler."""
        return self.cases.memo("cpp-binary", self._peftc_run_binary)

    def run_cpp(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.peftc_run_binary()), *args], capture_output=True, text=True, timeout=300)

    def _gpt2_lora(self) -> Gpt2Lora:
        peft = pytest.importorskip("peft", reason="HF PEFT is the reference for these tests")
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], task_type="CAUSAL_LM")
        peft_model = peft.get_peft_model(tiny_gpt2(), config).eval()
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:  # B = 0 at init would make the adapter the identity
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
        adapter_dir = self.scratch("gpt2-lora") / "adapter"
        peft_model.save_pretrained(adapter_dir)
        return Gpt2Lora(adapter_dir, peft_model, tiny_gpt2())

    def _aoti_package(self) -> Path:
        from peftc.exporters.aoti import compiler_available

        from peftc.exporting import export

        if compiler_available() is None:
            pytest.skip("AOTInductor needs a C++ compiler (g++, c++, clang++ or $CXX) and none is on PATH")
        base = self.scratch("aoti") / "base"
        tiny_gpt2().save_pretrained(base, safe_serialization=True)  # the base the adapter was made on
        onnx_export_cases.save_tokenizer(base)
        out = export(self.gpt2_lora().adapter_dir, model=str(base), format="aoti", merge=True, out=base.parent / "art")
        return out / "model.pt2"

    def _peftc_run_binary(self) -> Path:
        if not (_torch_dir() / "include" / "torch" / "script.h").exists():
            pytest.skip("the installed torch wheel ships no LibTorch headers (torch/include/torch/script.h)")
        compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
        if compiler is None:
            pytest.skip("no C++ compiler on PATH (g++ / c++ / $CXX) to build examples/cpp")
        build = self.scratch("cpp-build")
        env = {**os.environ, "CXX": compiler}
        cmake = shutil.which("cmake")
        if cmake:
            prefix = torch.utils.cmake_prefix_path
            steps = [
                [
                    cmake,
                    "-S",
                    str(CPP_DIR),
                    "-B",
                    str(build),
                    f"-DCMAKE_PREFIX_PATH={prefix}",
                    "-DCMAKE_BUILD_TYPE=Release",
                ],
                [cmake, "--build", str(build), "-j2"],
            ]
        else:
            steps = [gxx_command(CPP_DIR / "peftc_run.cpp", build / "peftc_run", compiler)]
        for step in steps:
            done = subprocess.run(step, cwd=build, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                tail = (done.stdout + done.stderr)[-3000:]
                pytest.fail(f"building examples/cpp failed ({' '.join(step[:3])} …):\n{tail}")
        binary = build / "peftc_run"
        assert binary.exists(), f"the build finished but {binary} is missing"
        return binary


def make_inputs(names: list[str], batch: int, seq: int, pads: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs keyed by name; row i left-padded by pads[i] with pad id 0 (real ids are 1..127)."""
    return onnx_export_cases.make_inputs("", names, batch, seq, pads, seed)


def hf_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        return model(**inputs).logits.float().numpy()


def max_diff(got: np.ndarray, want: np.ndarray, inputs: dict[str, torch.Tensor], causal: bool = True) -> float:
    """Max |got − want| over real (unpadded) positions for causal LMs, every row otherwise."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    rows = inputs["attention_mask"].bool().numpy() if causal else np.ones(got.shape[0], dtype=bool)
    return float(np.abs(got[rows] - want[rows]).max())


def _torch_dir() -> Path:
    return Path(torch.__file__).resolve().parent


def gxx_command(source: Path, binary: Path, compiler: str = "g++") -> list[str]:
    """The one-line g++ build documented in examples/cpp/README.md."""
    lib = _torch_dir() / "lib"
    include = _torch_dir() / "include"
    abi = int(torch.compiled_with_cxx11_abi())
    return [
        compiler, "-std=c++20", "-O2", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", str(source), "-o", str(binary),
        f"-I{include}", f"-I{include / 'torch/csrc/api/include'}",
        f"-L{lib}", f"-Wl,-rpath,{lib}", "-ltorch", "-ltorch_cpu", "-lc10",
    ]  # fmt: skip


def parse_logits(stdout: str) -> np.ndarray:
    """The C++ example's output: ``shape D0 D1 …`` then the values, whitespace-separated."""
    lines = stdout.strip().splitlines()
    head = lines[0].split()
    assert head[0] == "shape", lines[0]
    shape = [int(d) for d in head[1:]]
    values = np.array(" ".join(lines[1:]).split(), dtype=np.float64)
    assert values.size == int(np.prod(shape)), (values.size, shape)
    return values.reshape(shape)


def ids_arg(ids: torch.Tensor, mask: torch.Tensor) -> str:
    """``--ids`` text for left-padded rows: only the real tokens (the C++ side re-pads and derives the mask)."""
    rows = []
    for row, keep in zip(ids.tolist(), mask.bool().tolist(), strict=True):
        rows.append(",".join(str(t) for t, k in zip(row, keep, strict=True) if k))
    return ";".join(rows)
