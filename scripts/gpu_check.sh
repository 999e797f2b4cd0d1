#!/usr/bin/env bash
# The GPU check: everything that needs CUDA, in one run of under 8 minutes, ending with one
# summary table. Run from anywhere on a CUDA machine with the project's software already
# there (Python 3.12, torch + triton, transformers); it installs nothing and needs no Redis:
#
#     scripts/gpu_check.sh            # logs in $GPU_CHECK_LOGS (default: a temp dir)
#
# Steps: the Triton kernel tests compiled for CUDA (no interpreter), our model runner on CUDA
# (Triton kernels) against itself on the CPU (torch references), the model equivalence tests
# against transformers, benchmarks/kernels.py, and benchmarks/offline_throughput.py.
# Environment: PYTHON (default python), OFFLINE_ARGS (offline_throughput flags besides
# --device cuda; default "--dtype bfloat16", "" for its own defaults),
# GPU_CHECK_BUDGET_S (default 470: later steps are skipped once it is spent).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
LOGS=${GPU_CHECK_LOGS:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$LOGS"
BUDGET=${GPU_CHECK_BUDGET_S:-470}
T0=$(date +%s)
ROWS=()
FAILED=0

# step NAME LIMIT_S FIGURE_CMD -- COMMAND...: run COMMAND with a timeout, log it, record a row.
# FIGURE_CMD reads the log on stdin and prints the step's key figures on one line.
step() {
    local name=$1 limit=$2 figure=$3; shift 4
    local left=$(( BUDGET - ($(date +%s) - T0) ))
    if (( left < 20 )); then
        ROWS+=("$(printf '%-26s %-7s %6s  %s' "$name" SKIP - "time budget spent")"); return
    fi
    (( limit > left )) && limit=$left
    echo "=== $name (limit ${limit}s) ==="
    local start=$(date +%s)
    timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$? secs=$(( $(date +%s) - start )) status=PASS
    if (( rc == 124 )); then status=TIMEOUT; elif (( rc != 0 )); then status=FAIL; fi
    [[ $status == PASS ]] || FAILED=1
    tail -n 30 "$LOGS/$name.log"
    local fig
    fig=$(bash -c "$figure" < "$LOGS/$name.log" 2>/dev/null | tail -n 1)
    ROWS+=("$(printf '%-26s %-7s %5ss  %s' "$name" "$status" "$secs" "${fig:0:110}")")
}

pytest_figure='grep -E "passed|failed|error" | tail -n 1 | sed "s/=//g"'

echo "=== environment ==="
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 2
$PY - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton MISSING")
try:
    import transformers; print("transformers", transformers.__version__)
except ImportError:
    print("transformers MISSING")
EOF
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device here; nothing to check"; exit 2
fi

step kernel-tests-cuda 170 "$pytest_figure" -- \
    env TESSERA_KERNEL_DEVICE=cuda TRITON_INTERPRET=0 $PY -m pytest -q -p no:cacheprovider \
    tests/test_kernels_triton.py

# Teacher-forced: both devices see the CPU run's tokens, so every step's logits compare.
step runner-cuda-vs-cpu 120 "grep -E '^worst'" -- $PY - <<'EOF'
import random, tempfile
import torch
from common.model_config import ModelConfig
from tessera.make_model import make_model
from worker.runner import ModelRunner, SequenceInput

def run(cfg, device, prompts, forced=None, chunk=64, new_tokens=8):
    r = ModelRunner(cfg, "float32", num_blocks=256, block_size=16, device=device)
    tables = [list(range(i * 64, (i + 1) * 64)) for i in range(len(prompts))]
    random.Random(1).shuffle(tables)
    done, gen, logits = [0] * len(prompts), [[] for _ in prompts], []
    while any(len(g) < new_tokens for g in gen):
        seqs, which = [], []
        for i, p in enumerate(prompts):
            if done[i] < len(p):
                toks = p[done[i]:done[i] + chunk]       # prompt chunks mixed with decodes
            elif len(gen[i]) < new_tokens:
                toks = [gen[i][-1]]
            else:
                continue
            seqs.append(SequenceInput(toks, done[i], tables[i])); which.append(i)
        out = r.execute(seqs)
        logits.append(out.logits.cpu())
        for i, s, tok in zip(which, seqs, out.greedy_token_ids):
            done[i] += len(s.token_ids)
            if done[i] >= len(prompts[i]):
                gen[i].append(forced[i][len(gen[i])] if forced else tok)
    return logits, gen

worst = 0.0
for arch in ("llama", "mistral", "qwen2", "gpt2"):
    cfg = ModelConfig.from_dir(make_model(tempfile.mkdtemp() + "/m", arch, preset="small"))
    rng = random.Random(0)
    prompts = [[rng.randrange(cfg.vocab_size) for _ in range(n)] for n in (1, 17, 100, 600)]
    cpu_logits, cpu_gen = run(cfg, "cpu", prompts)
    cuda_logits, _ = run(cfg, "cuda", prompts, forced=cpu_gen)
    diff = max((a - b).abs().max().item() for a, b in zip(cpu_logits, cuda_logits))
    same = sum(a.argmax(-1).eq(b.argmax(-1)).sum().item() for a, b in zip(cpu_logits, cuda_logits))
    total = sum(a.shape[0] for a in cpu_logits)
    print(f"{arch:8s} steps {len(cpu_logits)}  max |logit diff| {diff:.2e}  argmax equal {same}/{total}")
    worst = max(worst, diff)
print(f"worst max |logit diff| cuda (Triton) vs cpu (torch), float32: {worst:.2e}")
assert worst < 2e-3, "CUDA runner disagrees with the CPU runner"
EOF

step model-equivalence 200 "$pytest_figure" -- \
    $PY -m pytest -q -p no:cacheprovider tests/test_model_equivalence.py tests/test_cuda_graphs.py

step kernel-benchmark 120 "$PY -c \"
import json; d = json.load(open('$LOGS/kernels.json'))
r = {x['kernel'].split()[0] + '/' + x['shape']: x for x in d['rows']}
f = lambda k: '%.0f%s' % (r[k]['achieved'], 'GB/s' if r[k]['metric'] == 'GB/s' else 'TF')
print('copy %.0fGB/s mm %.0fTF | decode8b %s | prefill8b %s | rmsnorm8b %s | min speedup %.2fx' % (
    d['copy_gbps'], d['matmul_tflops'], f('decode/llama8b'), f('prefill/llama8b'),
    f('fused_add_rms_norm/llama8b'), min(x['speedup'] for x in d['rows'])))
\"" -- $PY benchmarks/kernels.py --json "$LOGS/kernels.json"

if [[ -f benchmarks/offline_throughput.py ]]; then
    # shellcheck disable=SC2086
    step offline-throughput 200 "grep -E '^(bfloat16|float32|float16) ' | tr -s ' ' | paste -sd '|'" -- \
        $PY benchmarks/offline_throughput.py --device cuda ${OFFLINE_ARGS---dtype bfloat16}
else
    ROWS+=("$(printf '%-26s %-7s %6s  %s' offline-throughput SKIP - \
        "benchmarks/offline_throughput.py not in this checkout")")
fi

echo
echo "=== gpu_check summary ($(( $(date +%s) - T0 ))s, logs in $LOGS) ==="
printf '%-26s %-7s %6s  %s\n' step status time "key figures"
printf '%s\n' "${ROWS[@]}"
exit $FAILED
