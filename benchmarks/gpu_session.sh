#!/usr/bin/env bash
# One GPU session: correctness checks, benchmarks and (optionally) the default model's training run,
# results packed into $OUT. Every stage has its own time limit, so one failure leaves the others' results.
#
#   OUT=/some/dir bash benchmarks/gpu_session.sh                      # contract, lookup, train, encode
#   OUT=/some/dir STAGES="default contract lookup" PACK=.data/pack768 bash benchmarks/gpu_session.sh
#
# Stages (in this order; "default" runs in the background while "contract" runs):
#   default   examples/train_default.py warm-started from vit_vq:default-v1 (DEFAULT_MINUTES, PACK): the v2 recipe
#   rescore   benchmarks/bench_rescore.py (exact mode's float64 rescoring: layouts, tiles, splits; candidate sets
#             against whole-codebook rescoring on the rows the bound leaves)
#   contract  tests/test_backend_contract.py on CUDA (exact mode: 0 rows off the float64 optimum), with both
#             rescorings (candidate sets, and VIT_VQ_RESCORE=codebook, the whole codebook)
#   lookup    benchmarks/bench_lookup.py (LOOKUP_CASES, or the five built-in cases), exact with candidate sets and
#             exact_codebook (the older whole-codebook rescoring) in the same run; then the default model's latents
#   train     benchmarks/bench_train.py
#   encode    benchmarks/bench_encode.py
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
STAGES=" ${STAGES:-contract lookup train encode} "
R="$OUT/results"; mkdir -p "$R"
has() { [[ "$STAGES" == *" $1 "* ]]; }
pack() { tar czf "$OUT/results.tgz" -C "$OUT" results; }  # after every stage: a later stage's timeout loses nothing
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$R/device.txt"
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$R/device.txt"
nproc | sed 's/^/cpus /' | tee -a "$R/device.txt"

if has default; then
  D=/tmp/default-gpu
  (timeout "${DEFAULT_S:-450}" python examples/train_default.py --data "${PACK:-.data/pack768}" --device "${DEFAULT_DEVICE:-cuda}" --eval-crops "${DEFAULT_EVAL_CROPS:-1024}" \
      --init-from vit_vq/assets/default_v1 --train all --minutes "${DEFAULT_MINUTES:-4.5}" \
      --batch-size "${DEFAULT_BATCH:-512}" --lr "${DEFAULT_LR:-5e-4}" --workers "${DEFAULT_WORKERS:-13}" \
      --output "$D" > "$R/default.log" 2>&1; echo "default rc=$?" >> "$R/default.log") &
  TRAIN_PID=$!
fi
if has rescore; then
  timeout "${RESCORE_S:-150}" python benchmarks/bench_rescore.py --out "$R/rescore" > "$R/rescore.log" 2>&1
  echo "rescore rc=$?"; tail -60 "$R/rescore.log"; pack
fi
if has contract; then
  timeout "${CONTRACT_S:-150}" python -m pytest -q -x tests/test_backend_contract.py -k cuda > "$R/contract.log" 2>&1
  echo "contract rc=$?"; tail -5 "$R/contract.log"; pack
fi
if has default; then
  wait "$TRAIN_PID"; tail -45 "$R/default.log"
  if [ -d "$D/final" ]; then
    cp "$D/final/model.safetensors" "$OUT/default_model.safetensors"
    mkdir -p "$R/default_final" && cp "$D/final/config.json" "$D/final/eval.json" "$D/final/README.md" "$R/default_final/"
  fi
  ls "$D" > "$R/default_files.txt" 2>&1; pack
fi
if has lookup; then
  extra=(); [ -n "${LOOKUP_CASES:-}" ] && extra=(--cases "$LOOKUP_CASES" --methods "${LOOKUP_METHODS:-naive,cdist,exact,exact_codebook,exact_tf32x3,fast}")
  timeout "${LOOKUP_S:-420}" python benchmarks/bench_lookup.py --out "$R/lookup" "${extra[@]}" > "$R/lookup.log" 2>&1
  echo "lookup rc=$?"; tail -30 "$R/lookup.log"; pack
  timeout "${LOOKUP_REAL_S:-90}" python benchmarks/bench_lookup.py --out "$R/lookup_real" --latents real --no-checks \
      --methods naive,exact,exact_codebook,fast > "$R/lookup_real.log" 2>&1
  echo "lookup_real rc=$?"; tail -12 "$R/lookup_real.log"; pack
fi
if has train; then
  timeout "${TRAIN_S:-150}" python benchmarks/bench_train.py --out "$R/train" --budget-s "${TRAIN_BUDGET:-110}" > "$R/train.log" 2>&1
  echo "train rc=$?"; tail -14 "$R/train.log"; pack
fi
if has encode; then
  timeout "${ENCODE_S:-150}" python benchmarks/bench_encode.py --out "$R/encode" --budget-s "${ENCODE_BUDGET:-110}" > "$R/encode.log" 2>&1
  echo "encode rc=$?"; tail -16 "$R/encode.log"
fi
pack && rm -rf "$R"
