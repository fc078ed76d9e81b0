#!/usr/bin/env bash
# One self-contained GPU training run; docs/development/gpu_training.md says how and why.
#
#   scripts/gpu_train.sh prepare INIT [TRAIN OPTIONS...]   here: wheels, data pack, init
#   scripts/gpu_train.sh run                               there: the device command runs this
#   scripts/gpu_train.sh fetch FILES_AT RUN_DIR            here: the results into a run folder
#
# INIT is a checkpoint (or a run folder holding one) to start from, or "none". TRAIN OPTIONS
# are those of `dlwsi-train train` (--lmbda, --latent, --hyper, --ssim-weight, --lr,
# --batch, --crop, ...); prepare stores them in .gpu/train_args. The device command is
#
#   bash scripts/gpu_train.sh run        with carry [".whl", ".gpu"] and timeout_s 600
#
# Everything it needs travels in .whl (compressai and pytorch-msssim wheels) and .gpu
# (pack.npz, init.pt, train_args); both are ignored by git (.git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/.."

GPU=.gpu
WHL=${WHL:-.whl}
COMPRESSAI=compressai==1.2.8
MSSSIM=pytorch-msssim==1.0.0
CONSTRICTION=constriction==0.4.2  # numcodecs_dlwsi imports it; the device image lacks it

die() { echo "gpu_train.sh: $*" >&2; exit 1; }

local_python() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"
    elif [ -x .venv/bin/python ]; then echo .venv/bin/python
    else echo python3; fi
}

exclude() {  # keep a folder out of git (and so out of the plain working-tree copy)
    local file
    file=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$file")"
    grep -qxF "$1" "$file" 2>/dev/null || echo "$1" >>"$file"
}

mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

dir_bytes() { find "$1" -type f -printf '%s\n' 2>/dev/null | awk '{ s += $1 } END { print s + 0 }'; }

tree_bytes() {  # what travels anyway: tracked and untracked-not-ignored files
    git ls-files -z --cached --others --exclude-standard | sort -zu |
        xargs -0 -r stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s + 0 }'
}

prepare() {
    [ $# -ge 1 ] || die "usage: prepare INIT|none [TRAIN OPTIONS...]"
    local init=$1 py
    shift
    py=$(local_python)
    exclude /.whl/
    exclude /.gpu/
    rm -rf "$GPU"
    mkdir -p "$GPU" "$WHL"

    # 1. wheels for the device's Python 3.12 (compressai, constriction, pytorch-msssim; it has torch, torchvision, numpy, scipy,
    #    pillow, einops, pandas, tqdm, torch-geometric; compressai's wheel is manylinux_2_34)
    if ! ls "$WHL"/compressai-1.2.8-cp312-*.whl >/dev/null 2>&1; then
        "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_34_x86_64 \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d "$WHL" "$COMPRESSAI"
    fi
    if ! ls "$WHL"/constriction-0.4.2-cp312-*.whl >/dev/null 2>&1; then
        "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$WHL" "$CONSTRICTION"
    fi
    if ! ls "$WHL"/pytorch_msssim-1.0.0-py3-none-any.whl >/dev/null 2>&1; then
        "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform any -d "$WHL" "$MSSSIM"
    fi

    # 2. the checkpoint to start from, without optimizer state (a third of the bytes) and
    #    with float weights in float16 (half again; 2**-11 relative error, which the first
    #    steps absorb): every MiB saved here goes to the data pack
    local args=(--batch 64 --crop 256 --steps 1000000)
    if [ "$init" != none ]; then
        [ -d "$init" ] && init=$init/checkpoint.pt
        [ -f "$init" ] || die "no checkpoint at $init"
        "$py" - "$init" "$GPU/init.pt" <<'EOF'
import sys, torch
state = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
slim = {k: state[k] for k in ("model", "model_config", "config", "step") if k in state}
# small tensors (bounds such as the 1e-9 likelihood bound, which float16 rounds to 0,
# and per-channel parameters) stay float32: they cost nothing
slim["model"] = {name: value.half() if value.is_floating_point() and value.numel() >= 4096
                 else value for name, value in slim["model"].items()}
torch.save(slim, sys.argv[2])
EOF
        args+=(--init "$GPU/init.pt")
    fi
    args+=("$@")  # the caller's options come last and win
    printf '%s\n' "${args[@]}" >"$GPU/train_args"
    "$py" - "$init" "$GPU/source.json" "${args[@]}" <<'EOF'
import json, subprocess, sys, datetime
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout
json.dump({"init": None if sys.argv[1] == "none" else sys.argv[1], "train_args": sys.argv[3:],
           "commit": commit.strip(), "prepared": datetime.datetime.now().isoformat()},
          open(sys.argv[2], "w"), indent=2)
EOF

    # 3. the data pack: whatever the travel limit leaves (64 MiB for the whole tree)
    local tree whl init_bytes budget
    tree=$(tree_bytes)
    whl=$(dir_bytes "$WHL")
    init_bytes=$(dir_bytes "$GPU")
    budget=${PACK_MB:-$(awk -v t="$tree" -v w="$whl" -v i="$init_bytes" -v total="${TOTAL_MB:-62}" \
        'BEGIN { b = total - (t + w + i) / 1048576; if (b > 40) b = 40; printf "%.1f", b }')}
    awk -v b="$budget" 'BEGIN { exit !(b >= 6) }' ||
        die "only ${budget} MiB left for the data pack (tree $(mib "$tree") MiB)"
    echo "packing ${budget} MiB of training data (tree $(mib "$tree") MiB, wheels $(mib "$whl") MiB, init $(mib "$init_bytes") MiB)"
    "$py" -m numcodecs_dlwsi.train pack "$GPU/pack.npz" --budget-mb "$budget" \
        ${PACK_OPTIONS:-}

    # 4. the exact code path, on the CPU: one bf16 step from the pack with these options
    local check
    check=$(mktemp -d)
    "$py" -m numcodecs_dlwsi.train train "$check/run" "${args[@]}" --steps 1 --batch 2 \
        --crop 128 --device cpu --amp bf16 --data-pack "$GPU/pack.npz" >"$check/out" 2>&1 ||
        { cat "$check/out"; die "the CPU check of these options failed"; }
    rm -rf "$check"

    local total
    total=$((tree + $(dir_bytes "$WHL") + $(dir_bytes "$GPU")))
    echo "travels: tree $(mib "$tree") + .whl $(mib "$(dir_bytes "$WHL")") + .gpu $(mib "$(dir_bytes "$GPU")") = $(mib "$total") MiB (limit 64)"
    echo "device command (carry [\".whl\", \".gpu\"], timeout_s 600):"
    echo "  bash scripts/gpu_train.sh run"
}

run() {  # everything it prints also goes to $OUT/train.txt
    local out=${OUT:-/tmp/dlwsi-gpu-out}
    mkdir -p "$out"
    set +e
    run_inner "$out" 2>&1 | tee "$out/train.txt"
    local rc=${PIPESTATUS[0]}
    set -e
    return "$rc"
}

run_inner() {
    local out=$1 py=${PYTHON:-python3} site=${SITE:-/tmp/dlwsi-site} stubs=/tmp/dlwsi-stubs
    # the run folder lives outside the tree; a second call on a still-warm machine resumes it
    local run_dir=${RUN_DIR:-/tmp/dlwsi-gpu-run}
    set -e
    [ -f "$GPU/pack.npz" ] && [ -f "$GPU/train_args" ] || die "no $GPU: run prepare here first"
    nvidia-smi -L 2>/dev/null || true

    # wheels: pip checks the platform tag; if it refuses, a wheel is only a zip
    local tag wheels
    tag=$("$py" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
    wheels=("$WHL"/compressai-1.2.8-"$tag"-*.whl "$WHL"/constriction-0.4.2-"$tag"-*.whl
            "$WHL"/pytorch_msssim-1.0.0-py3-none-any.whl)
    if ! "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" "${wheels[@]}"; then
        echo "pip refused the wheels; unpacking them"
        for w in "${wheels[@]}"; do "$py" -m zipfile -e "$w" "$site"; done
    fi
    export PYTHONPATH="$site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1

    # preflight, in seconds: import-time stand-ins for compressai's point-cloud/dataset
    # dependencies if the image lacks one, and for its C++ entropy coder if that cannot
    # load (training never calls either; export happens on the CPU machine)
    rm -rf "$stubs"
    "$py" - "$site" "$stubs" <<'EOF'
import importlib, pathlib, sys
site, stubs = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
STUBS = {
    "einops/__init__.py": "def rearrange(*a, **k):\n    raise NotImplementedError\n"
                          "repeat = reduce = rearrange\n",
    "pandas/__init__.py": "",
    "requests/__init__.py": "",
    "tqdm/__init__.py": "def tqdm(iterable=None, *a, **k):\n    return iterable\n",
    "torch_geometric/__init__.py": "",
    "torch_geometric/data/__init__.py": "class Data:\n    pass\n",
    "torch_geometric/data/datapipes.py": "def functional_transform(name):\n"
                                         "    return lambda cls: cls\n",
    "torch_geometric/transforms/__init__.py": "class BaseTransform:\n    pass\n\n\n"
                                              "class Center(BaseTransform):\n    pass\n",
}
for module in ("einops", "pandas", "requests", "tqdm", "torch_geometric"):
    try:
        importlib.import_module(module)
    except Exception as error:  # noqa: BLE001
        print(f"preflight: {module} does not import ({error}); using a stand-in")
        for rel, text in STUBS.items():
            if rel.startswith(module + "/"):
                (stubs / rel).parent.mkdir(parents=True, exist_ok=True)
                (stubs / rel).write_text(text)
sys.path.insert(0, str(stubs))
try:
    import compressai._CXX, compressai.ans  # noqa: E401, F401
except Exception as error:  # noqa: BLE001
    print(f"preflight: compressai's C++ extensions do not load ({error}); stand-ins")
    for so in (site / "compressai").glob("*.so"):
        so.unlink()
    (site / "compressai" / "_CXX.py").write_text(
        "def pmf_to_quantized_cdf(*a, **k):\n    raise NotImplementedError\n")
    (site / "compressai" / "ans.py").write_text(
        "class _Missing:  # built by the entropy models, used only to code bitstreams\n"
        "    def __init__(self, *a, **k):\n        pass\n\n"
        "    def __getattr__(self, name):\n"
        "        raise NotImplementedError('compressai.ans is a stand-in here')\n"
        "\n\nBufferedRansEncoder = RansEncoder = RansDecoder = _Missing\n")
EOF
    [ -d "$stubs" ] && export PYTHONPATH="$stubs:$PYTHONPATH"
    "$py" - "${DEVICE:-cuda}" "$GPU/pack.npz" <<'EOF'
import json, sys
import numpy as np, torch
from PIL import features
import compressai, pytorch_msssim  # noqa: F401
import numcodecs_dlwsi.train.train  # noqa: F401
print(f"preflight: python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"numpy {np.__version__}, compressai {compressai.__version__}")
if sys.argv[1] == "cuda":
    if not torch.cuda.is_available():
        sys.exit("preflight: CUDA is not available")
    print(f"preflight: {torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}")
with np.load(sys.argv[2]) as f:
    codec = json.loads(str(f["meta"]))["codec"]
if codec == "webp" and not features.check("webp"):
    sys.exit("preflight: this Pillow cannot decode WebP: make the pack with --codec png")
EOF

    # train until the deadline (DEADLINE_S after this script started, default 570 s for
    # timeout_s 600), leaving 40 s for start-up, the last validation and the copies
    local budget minutes args=()
    budget=$(( ${DEADLINE_S:-570} - SECONDS - 40 ))
    minutes=$(awk -v b="$budget" -v m="${MINUTES:-1000}" \
        'BEGIN { x = b / 60; if (m < x) x = m; if (x < 0.5) x = 0.5; printf "%.2f", x }')
    mapfile -t args <"$GPU/train_args"
    echo "training for at most $minutes minutes: ${args[*]}"
    local rc=0
    "$py" -m numcodecs_dlwsi.train train "$run_dir" --device "${DEVICE:-cuda}" \
        --amp "${AMP:-bf16}" --data-pack "$GPU/pack.npz" "${args[@]}" \
        ${BATCH:+--batch "$BATCH"} ${CROP:+--crop "$CROP"} --minutes "$minutes" || rc=$?
    collect "$run_dir" "$out"
    return $rc
}

collect() {  # the run into $OUT: files back are limited to 16 MiB each, so split
    local run=$1 out=$2
    [ -f "$run/checkpoint.pt" ] || { echo "no checkpoint was written"; return 0; }
    cp "$run/config.json" "$run/log.jsonl" "$out/"
    (cd "$run" && sha256sum checkpoint.pt) >"$out/SHA256SUMS"
    split -b 15M -d -a 2 "$run/checkpoint.pt" "$out/checkpoint.pt.part"
    (cd "$out" && sha256sum checkpoint.pt.part*) >>"$out/SHA256SUMS"
    ls -l "$out"
}

fetch() {
    [ $# -eq 2 ] || die "usage: fetch FILES_AT RUN_DIR"
    local from=$1 run=$2 py
    py=$(local_python)
    [ -f "$from/SHA256SUMS" ] || die "no SHA256SUMS in $from"
    [ -e "$run/checkpoint.pt" ] && die "$run/checkpoint.pt exists: fetch into a new folder"
    (cd "$from" && sha256sum -c --quiet --ignore-missing SHA256SUMS)
    mkdir -p "$run"
    cat "$from"/checkpoint.pt.part* >"$run/checkpoint.pt.tmp"
    local want got
    want=$(awk '$2 == "checkpoint.pt" { print $1 }' "$from/SHA256SUMS")
    got=$(sha256sum "$run/checkpoint.pt.tmp" | cut -d' ' -f1)
    [ "$want" = "$got" ] || { rm -f "$run/checkpoint.pt.tmp"; die "checkpoint checksum differs"; }
    mv "$run/checkpoint.pt.tmp" "$run/checkpoint.pt"
    cp "$from/config.json" "$from/log.jsonl" "$run/"
    [ -f "$from/train.txt" ] && cp "$from/train.txt" "$run/gpu_train.txt"
    "$py" - "$run" "$GPU/source.json" <<'EOF'
import json, pathlib, sys, torch
run, source = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
config = json.loads((run / "config.json").read_text())
if source.exists() and config.get("init"):  # record where .gpu/init.pt came from
    config["init"] = json.loads(source.read_text())["init"]
    (run / "config.json").write_text(json.dumps(config, indent=2))
state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
print(f"{run}: step {state['step']}, model {state['model_config']}")
EOF
    echo "continue on the CPU, e.g.:"
    echo "  dlwsi-train train $run --steps N --batch 8 --crop 128 --threads 1"
}

case "${1:-}" in
    prepare) shift; prepare "$@" ;;
    run) shift; run "$@" ;;
    fetch) shift; fetch "$@" ;;
    *) sed -n '2,16p' "$0"; exit 2 ;;
esac
