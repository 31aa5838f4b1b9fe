#!/usr/bin/env bash
# One GPU session: correctness checks and the three benchmarks, results packed into $OUT.
# Usage (repo root, CUDA machine): OUT=/some/dir bash benchmarks/gpu_session.sh
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
R="$OUT/results"; mkdir -p "$R"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$R/device.txt"
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$R/device.txt"
timeout "${LOOKUP_S:-260}" python benchmarks/bench_lookup.py --out "$R/lookup" > "$R/lookup.log" 2>&1; echo "lookup rc=$?"
tail -40 "$R/lookup.log"
timeout "${TRAIN_S:-150}" python benchmarks/bench_train.py --out "$R/train" --budget-s 110 > "$R/train.log" 2>&1; echo "train rc=$?"
tail -14 "$R/train.log"
timeout "${ENCODE_S:-150}" python benchmarks/bench_encode.py --out "$R/encode" --budget-s 110 > "$R/encode.log" 2>&1; echo "encode rc=$?"
tail -16 "$R/encode.log"
tar czf "$OUT/results.tgz" -C "$OUT" results && rm -rf "$R"
