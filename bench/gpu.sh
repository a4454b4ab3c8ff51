#!/usr/bin/env bash
# bench/gpu.sh: peftc vs HF PEFT training on one CUDA GPU, bf16, eager and torch.compile'd.
#
# Sets up what it needs: a virtualenv (default .venv-gpu, or $PEFTC_GPU_VENV) holding the versions this
# repository is tested with (a GPU machine may carry others): torch, transformers and peft pinned below,
# peftc installed editable from this checkout. An existing venv with the right versions is reused
# (pip is not called), so the script also runs on a machine without network once the venv exists.
#
# Then bench/train_vs_peft.py, bf16 (base stored in bf16, autocast, float32 LoRA) eager and compiled,
# fp32 eager for reference, gradient checkpointing, on
#   * GPT-2-124M shape, batch 8 x 512;
#   * a ~1.1B LLaMA shape (TinyLlama's: 22 layers x 2048, GQA 32/4 heads), batch 4 x 512;
# and prints tokens/s and peak GPU memory (torch.cuda.max_memory_allocated over the timed steps) of each,
# with the ratios vs HF PEFT measured in the same run. Targets: eager >= 1.0x, compiled >= 1.3x,
# memory <= HF PEFT's. Takes ~10-20 minutes (mostly compilation and the 1B model's init).
#
#   bash bench/gpu.sh                # both shapes
#   bash bench/gpu.sh gpt2           # one shape
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=2.13.0 TRANSFORMERS=4.57.6 PEFT=0.21.2
VENV=${PEFTC_GPU_VENV:-.venv-gpu}
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
fi
have() { "$PY" -c "import torch, transformers, peft, peftc, sys; sys.exit(not (torch.__version__.split('+')[0] == '$TORCH' and transformers.__version__ == '$TRANSFORMERS' and peft.__version__ == '$PEFT'))" 2>/dev/null; }
if ! have; then
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q "torch==$TORCH" "transformers==$TRANSFORMERS" "peft==$PEFT"
  "$PY" -m pip install -q -e .
fi
"$PY" - <<'PY'
import sys, torch, transformers, peft
if not torch.cuda.is_available():
    sys.exit(f"bench/gpu.sh: torch {torch.__version__} sees no CUDA device (torch.version.cuda={torch.version.cuda})")
print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, peft {peft.__version__}; {__import__('datetime').date.today()}")
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
SHAPES=${1:-"gpt2 llama-1b"}
for shape in $SHAPES; do
  case $shape in
    gpt2) BATCH=8 SEQ=512 ;;
    *) BATCH=4 SEQ=512 ;;
  esac
  echo "== $shape, batch $BATCH x $SEQ"
  "$PY" bench/train_vs_peft.py --shape "$shape" --batch "$BATCH" --seq "$SEQ" --steps 10 --warmup 3 \
    --precision bf16 --compile --gradient-checkpointing --threads 8
done
