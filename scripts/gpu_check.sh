#!/usr/bin/env bash
# The GPU check: everything that needs CUDA, in one offline run of under 8 minutes, ending with
# one summary table (also when a step fails or times out, or the script is interrupted). Run it
# from anywhere on a CUDA machine with the project's software already there (Python 3, torch +
# triton, transformers, pytest); it installs nothing and reaches no network:
#
#     scripts/gpu_check.sh             # logs in $GPU_CHECK_LOGS (default: a temp dir)
#     scripts/gpu_check.sh --dry-run   # anywhere: the plan, each step's limit, total vs budget
#
# Steps, most valuable first: setup (prerequisites named when missing, the bench model), the
# CUDA-graph capture test alone, the Triton kernel tests compiled for CUDA (three processes at
# once), our runner on CUDA against itself on the CPU, model equivalence against transformers
# with our side on CUDA, offline throughput (tok/s against HF, J/token from NVML, CUDA graphs
# against eager), benchmarks/kernels.py (bandwidth against a measured copy), `tessera serve
# --device cuda` + `tessera bench serve` (when redis-server is here), TP=2 over NCCL (when two
# GPUs are). Step limits add up to less than the budget; a step that would start with under
# 20 s left is skipped, and every step's limit is cut to what is left.
# Environment: PYTHON (default python3), OFFLINE_ARGS (gpu_throughput flags besides
# --device cuda --model; default below), GPU_CHECK_BUDGET_S (default 470).
set -u
cd "$(dirname "$0")/.."
DRY_RUN=0
[[ ${1:-} == --dry-run ]] && DRY_RUN=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PY=${PYTHON:-python3}
if (( DRY_RUN )); then
    export LOGS=${GPU_CHECK_LOGS:-'$LOGS'}
else
    export LOGS=${GPU_CHECK_LOGS:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
    mkdir -p "$LOGS"
fi
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$LOGS/triton-cache}   # compiled once, reused later
export BENCH_MODEL="$LOGS/bench"
BUDGET=${GPU_CHECK_BUDGET_S:-470}
MARGIN=40          # process start-ups between steps, the summary, slack
OFFLINE_ARGS=${OFFLINE_ARGS---dtype bfloat16 --num-requests 64 --output-len 64 --hf-single 4 --hf-batched 32 --energy --graphs-vs-eager 8}
T0=$(date +%s)
ROWS=()
FAILED=0
PLANNED=0
row() { ROWS+=("$(printf '%-22s %-7s %6s  %s' "$1" "$2" "$3" "${4:0:110}")"); }

summary() {
    (( DRY_RUN )) && return
    echo
    echo "=== gpu_check summary ($(( $(date +%s) - T0 ))s of ${BUDGET}s, logs in $LOGS) ==="
    printf '%-22s %-7s %6s  %s\n' step status time "key figures"
    printf '%s\n' "${ROWS[@]+"${ROWS[@]}"}"
}
trap summary EXIT
trap 'row interrupted ABORT - "the script was stopped"; FAILED=1; exit 130' INT TERM

# [WHAT=...] step NAME LIMIT_S FIGURE_CMD WHEN -- COMMAND...: run COMMAND with a timeout, log
# it, add a row. FIGURE_CMD reads the log on stdin and prints the step's key figures on one
# line. WHEN is empty, or a condition (a bash expression) under which the step runs, else it
# is skipped with $SKIP_REASON. WHAT describes the step in the --dry-run plan.
step() {
    local name=$1 limit=$2 figure=$3 when=$4; shift 5
    if (( DRY_RUN )); then
        PLANNED=$(( PLANNED + limit ))
        local what
        what=$(printf '%s' "${when:+[if $when] }${WHAT:-$*}" | tr '\n' ' ' | tr -s ' ')
        printf '  %-20s %4ss  %s\n' "$name" "$limit" "${what:0:120}"
        return
    fi
    if [[ -n $when ]] && ! eval "$when"; then
        row "$name" SKIP - "${SKIP_REASON:-not applicable here}"; return
    fi
    local left=$(( BUDGET - ($(date +%s) - T0) ))
    if (( left < 20 )); then row "$name" SKIP - "time budget spent"; return; fi
    (( limit > left )) && limit=$left
    echo "=== $name (limit ${limit}s) ==="
    local start=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$? secs=$(( $(date +%s) - start )) status=PASS
    if (( rc == 124 || rc == 137 )); then status=TIMEOUT; elif (( rc != 0 )); then status=FAIL; fi
    [[ $status == PASS ]] || FAILED=1
    tail -n 25 "$LOGS/$name.log"
    local fig
    fig=$(bash -c "$figure" < "$LOGS/$name.log" 2>/dev/null | tail -n 1)
    row "$name" "$status" "${secs}s" "$fig"
}

pytest_figure='grep -E "passed|failed|error" | tail -n 1 | sed "s/=//g"'

# ---- prerequisites: each one named when missing -------------------------------------------
check_prereqs() {
    local missing=()
    command -v "$PY" > /dev/null || { echo "MISSING: $PY (set PYTHON=...)"; return 1; }
    "$PY" -c "import pytest" 2> /dev/null || missing+=("pytest (two steps run it)")
    command -v "${CC:-cc}" > /dev/null || command -v gcc > /dev/null || command -v clang > /dev/null \
        || missing+=("a C compiler (Triton builds its launcher with one: set CC or install gcc)")
    "$PY" -c "import os, sysconfig; p = sysconfig.get_paths()['include']
assert os.path.exists(os.path.join(p, 'Python.h')), p" 2> /dev/null \
        || missing+=("Python headers, Python.h (Triton's launcher build; python3-dev)")
    "$PY" - 2> /dev/null <<'EOF' || missing+=("libcuda.so (ldconfig -p, or TRITON_LIBCUDA_PATH)")
import os, subprocess
if not os.environ.get("TRITON_LIBCUDA_PATH"):
    try:
        from triton.backends.nvidia.driver import libcuda_dirs
        assert libcuda_dirs()
    except ImportError:
        assert "libcuda.so" in subprocess.run(["ldconfig", "-p"], capture_output=True,
                                              text=True).stdout
EOF
    "$PY" -c "import triton" 2> /dev/null || missing+=("triton (pip install '.[triton]')")
    "$PY" -c "import transformers" 2> /dev/null || missing+=("transformers")
    command -v nvidia-smi > /dev/null || echo "note: no nvidia-smi (energy needs it or pynvml)"
    command -v redis-server > /dev/null || echo "note: no redis-server: serve-bench is skipped"
    (( ${#missing[@]} )) && printf 'MISSING: %s\n' "${missing[@]}"
    (( ${#missing[@]} == 0 ))
}

if (( DRY_RUN )); then
    echo "gpu_check plan (budget ${BUDGET}s; prerequisites are checked first, without a limit):"
else
    echo "=== environment ==="
    nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv,noheader 2>&1 | head -n 4
    "$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| devices", torch.cuda.device_count(),
      "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
for name in ("triton", "transformers", "pynvml"):
    try:
        print(name, __import__(name).__version__)
    except (ImportError, AttributeError):
        print(name, "MISSING")
EOF
    if check_prereqs; then PREREQS=ok; else PREREQS=missing; fi
    row prerequisites "$( [[ $PREREQS == ok ]] && echo PASS || echo FAIL)" - \
        "$( [[ $PREREQS == ok ]] && echo all present || echo 'see MISSING lines above')"
    [[ $PREREQS == ok ]] || FAILED=1
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: no CUDA device here; nothing to check"; row cuda-device FAIL - "none"
        exit 2
    fi
    GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
    "$PY" -c "import pytest" 2> /dev/null && HAVE_PYTEST=1 || HAVE_PYTEST=0
fi

WHAT="make the bench model (tessera.make_model, preset bench)" step setup 20 "grep -E '^bench model'" "" -- "$PY" - <<'EOF'
import os
from tessera.make_model import make_model
path = make_model(os.environ["BENCH_MODEL"], "llama", preset="bench")
print("bench model", path)
EOF

# The one real capture test, alone and early: nothing else may starve it.
SKIP_REASON="pytest missing"
WHAT="tests/test_cuda_graphs.py -k cuda: decode graphs captured, replayed == eager" \
step cuda-graphs 40 "$pytest_figure" "(( HAVE_PYTEST ))" -- \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py -k cuda

# Compiling ~60 Triton variants from a cold cache is most of this step: three processes.
WHAT="tests/test_kernels_triton.py on CUDA, compiled for real (3 processes)" \
step kernel-tests-cuda 90 "$pytest_figure" "(( HAVE_PYTEST ))" -- bash -c '
    run() { TESSERA_KERNEL_DEVICE=cuda TRITON_INTERPRET=0 "$PY" -m pytest -q -p no:cacheprovider \
                tests/test_kernels_triton.py -k "$1" > "$LOGS/kernel-tests-$2.log" 2>&1; }
    run attention a & a=$!; run runner b & b=$!; run "not attention and not runner" c & c=$!
    rc=0; for p in $a $b $c; do wait $p || rc=1; done
    cat "$LOGS"/kernel-tests-[abc].log
    "$PY" - "$LOGS"/kernel-tests-[abc].log <<EOF
import re, sys
n = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
for f in sys.argv[1:]:
    for k, v in re.findall(r"(\d+) (passed|failed|skipped|error)", open(f).read()[-400:]):
        n[v] += int(k)
print(" ".join(f"{v} {k}" for k, v in n.items() if v))
EOF
    exit $rc'

SKIP_REASON=""
# Teacher-forced: both devices see the CPU run's tokens, so every step's logits compare.
WHAT="4 archs, chunked prompts + decodes, CUDA (Triton) logits vs CPU (torch), fp32" \
step runner-cuda-vs-cpu 45 "grep -E '^worst'" "" -- "$PY" - <<'EOF'
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

# Ours on CUDA (Triton kernels, decode graphs in the offline API), HF on the CPU, fp32.
SKIP_REASON="pytest missing"
WHAT="tests/test_model_equivalence.py (offline API + runner, 4 archs) on cuda vs HF" \
step model-equivalence 40 "$pytest_figure" "(( HAVE_PYTEST ))" -- \
    env TESSERA_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_model_equivalence.py -k "offline or whole"

SKIP_REASON=""
# shellcheck disable=SC2086
WHAT="benchmarks/gpu_throughput.py --device cuda $OFFLINE_ARGS" \
step offline-throughput 60 "grep -E '^(bfloat16|float32|float16) |^energy|^graphs' | tr -s ' ' | paste -sd '|'" "" -- \
    "$PY" benchmarks/gpu_throughput.py --device cuda --model "$BENCH_MODEL" $OFFLINE_ARGS

WHAT="benchmarks/kernels.py: each kernel vs torch, GB/s vs a measured copy" \
step kernel-benchmark 45 "\"$PY\" -c \"
import json; d = json.load(open('$LOGS/kernels.json'))
r = {x['kernel'].split()[0] + '/' + x['shape']: x for x in d['rows']}
f = lambda k: '%.0f%s' % (r[k]['achieved'], 'GB/s' if r[k]['metric'] == 'GB/s' else 'TF')
print('copy %.0fGB/s mm %.0fTF | decode8b %s | prefill8b %s | rmsnorm8b %s | min speedup %.2fx' % (
    d['copy_gbps'], d['matmul_tflops'], f('decode/llama8b'), f('prefill/llama8b'),
    f('fused_add_rms_norm/llama8b'), min(x['speedup'] for x in d['rows'])))
\"" "" -- "$PY" benchmarks/kernels.py --json "$LOGS/kernels.json"

# The services on the GPU: a private redis-server, worker, scheduler, gateway; then load.
can_serve() {
    if ! command -v redis-server > /dev/null; then SKIP_REASON="no redis-server on this machine"; return 1; fi
    if ! "$PY" -m tessera.cli serve --help 2> /dev/null | grep -q -- "--device"; then
        SKIP_REASON="tessera serve has no --device in this checkout"; return 1
    fi
}
WHAT="tessera serve --device cuda (bench model, bf16) + tessera bench serve, 64 prompts" \
step serve-bench 50 "grep -iE 'throughput|ttft' | tr -s ' ' | paste -sd '|'" "can_serve" -- bash -c '
    port() { "$PY" -c "import socket; s = socket.socket(); s.bind((\"127.0.0.1\", 0)); print(s.getsockname()[1])"; }
    http=$(port); grpc=$(port)
    "$PY" -m tessera.cli serve --model "$BENCH_MODEL" --device cuda --dtype bfloat16 \
        --http-port "$http" --grpc-port "$grpc" > "$LOGS/serve-stack.log" 2>&1 &
    pid=$!
    trap "kill -TERM $pid 2> /dev/null; wait $pid 2> /dev/null" EXIT
    until grep -q "tessera serving" "$LOGS/serve-stack.log"; do
        kill -0 $pid 2> /dev/null || { echo "tessera serve exited:"; tail -n 40 "$LOGS/serve-stack.log"; exit 1; }
        sleep 0.5
    done
    "$PY" -m tessera.cli bench serve --base-url "http://127.0.0.1:$http" --model bench \
        --num-prompts 64 --random-input-len 128 --random-output-len 64 --max-concurrency 16 \
        --no-progress'

two_gpus() { SKIP_REASON="one GPU here (TP=2 over NCCL needs two)"; (( GPUS >= 2 )); }
WHAT="LLM(tensor_parallel_size=2, device=cuda) greedy == TP=1, over NCCL" \
step tp2-nccl 40 "grep -E '^tp2'" "two_gpus" -- "$PY" - <<'EOF'
import tempfile
from tessera import LLM, SamplingParams
from tessera.make_model import make_model

model = str(make_model(tempfile.mkdtemp() + "/m", "llama", preset="small"))
prompts = [{"prompt_token_ids": [(13 * i + 7 * j) % 500 + 1 for j in range(n)]}
           for i, n in enumerate((3, 40, 130, 7, 300, 1, 64, 90))]
params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
one = LLM(model, device="cuda", num_kv_blocks=512)
ref = [o.outputs[0].token_ids for o in one.generate(prompts, params, use_tqdm=False)]
del one
import gc, torch; gc.collect(); torch.cuda.empty_cache()   # its KV cache and graphs
with LLM(model, device="cuda", tensor_parallel_size=2, num_kv_blocks=512) as two:
    got = [o.outputs[0].token_ids for o in two.generate(prompts, params, use_tqdm=False)]
same = sum(a == b for a, b in zip(ref, got))
print(f"tp2 over NCCL on cuda:0+1: {same}/{len(ref)} greedy sequences equal to TP=1, fp32")
assert same == len(ref)
EOF

if (( DRY_RUN )); then
    echo "total: ${PLANNED}s of step limits + ${MARGIN}s margin = $(( PLANNED + MARGIN ))s, budget ${BUDGET}s"
    (( PLANNED + MARGIN <= BUDGET )) || { echo "gpu_check: the plan exceeds its budget"; exit 1; }
    exit 0
fi
exit $FAILED
