#!/usr/bin/env bash
# Every GPU measurement of gptforge in one call (< 8 minutes on one H200), one table at the end:
#   training tokens/s and MFU: gpt2 (T 1024) and gpt3-small (T 2048, band layers), bf16, torch.compile
#   decode: gpt2 at batch 1, 8, 32, eager and CUDA graphs (time to first token, per output token, tokens/s)
#   muon: GPT-2 124M, 600 steps with AdamW and with train.optimizer=muon on Python's standard library (char-level,
#         prepared here): steps and time to AdamW's final val loss (unmeasured so far: no GPU run yet)
#   FSDP2: a 2-step `gptforge train` under torchrun, train.parallel=fsdp, from data it prepares: one rank per
#          GPU when there are two or more; with one GPU, 2 ranks on CPU (gloo), since gptforge refuses FSDP in
#          a single process and NCCL cannot put two ranks on one GPU
#
#   bash benchmarks/gpu_suite.sh               # on the GPU machine, from the repository root
#   bash benchmarks/gpu_suite.sh --cpu-smoke   # anywhere: the same code paths on CPU at toy sizes
#   (other arguments go to benchmarks/gpu_suite.py, e.g. --skip train)
#
# Needs only torch (>= 2.5; the lent H200 has 2.11), numpy, tiktoken, tokenizers, safetensors and
# matplotlib, all in that machine's image; no network. PYTHON overrides the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SMOKE=""
if [[ " $* " == *" --cpu-smoke "* ]]; then
  SMOKE="--cpu-smoke"
  export CUDA_VISIBLE_DEVICES=""
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)

# A tiny character corpus prepared here: the FSDP2 smoke's data, and the muon row's in the CPU smoke.
"$PY" - "$WORK/corpus.txt" <<'EOF'
import random, sys
random.seed(0)
words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "runs", "away", "home"]
with open(sys.argv[1], "w") as f:
    for _ in range(4000):
        f.write(" ".join(random.choice(words) for _ in range(12)) + ".\n")
EOF
"$PY" -m gptforge prepare "$WORK/corpus.txt" --tokenizer char --out "$WORK/data" > "$WORK/prepare.log" 2>&1
TTL_DATA="$WORK/data"
if [[ -z "$SMOKE" ]]; then  # the muon row's corpus on a GPU: Python's standard library, char-level
  "$PY" -m gptforge prepare builtin:pystdlib --tokenizer char --out "$WORK/pystdlib" > "$WORK/prepare_ttl.log" 2>&1
  TTL_DATA="$WORK/pystdlib"
fi

"$PY" benchmarks/gpu_suite.py --ttl-data "$TTL_DATA" "$@" | tee "$WORK/suite.txt"  # e.g. --skip train, --steps 20

# FSDP2 smoke: two optimizer steps of a small GPT-2 under torchrun on the tiny corpus.
NGPU=$(CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES-}" "$PY" -c "import torch; print(torch.cuda.device_count())")
if (( NGPU >= 2 )); then NPROC=$NGPU; FSDP_DEVICE=auto; else NPROC=2; FSDP_DEVICE=cpu; fi
fsdp_t0=$(date +%s)
fsdp_status="FAILED"
if OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PY" -m torch.distributed.run --nproc_per_node $NPROC --master_addr 127.0.0.1 --master_port 0 \
    --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:0 -m gptforge train \
    --data "$WORK/data" --out "$WORK/run" --set train.parallel=fsdp --set train.max_steps=2 --set train.device=$FSDP_DEVICE \
    --set model.n_layer=2 --set model.n_head=2 --set model.n_embd=64 --set model.block_size=64 \
    --set train.micro_batch_size=4 --set train.eval_every=2 --set train.eval_batches=1 \
    --set train.checkpoint_every=2 --set train.sample_tokens=0 --set train.log_every=1 \
    > "$WORK/fsdp.log" 2>&1 && ls "$WORK/run"/checkpoints/*/model.safetensors > /dev/null 2>&1; then
  fsdp_status="ok"
fi
fsdp_s=$(( $(date +%s) - fsdp_t0 ))
loss=$(grep -o 'step 2/2 | loss [0-9.]*' "$WORK/fsdp.log" | tail -1 || true)

echo
echo "==== gpu_suite.sh ($(( $(date +%s) - start )) s${SMOKE:+, CPU smoke: numbers meaningless}) ===="
sed -n '/^==== gpu_suite ====$/,$p' "$WORK/suite.txt" | tail -n +2
echo "fsdp2  torchrun nproc $NPROC ($FSDP_DEVICE), 2 steps, consolidated checkpoint | $fsdp_status | ${fsdp_s} s | ${loss:-no loss line}"
if [[ "$fsdp_status" != "ok" ]]; then
  grep -v "^\s*$" "$WORK/fsdp.log" | head -20
  exit 1
fi
