#!/usr/bin/env bash
# Set up and run the quickstart: a baby GPT trained on tiny Shakespeare characters, then a sample from it.
#
#   bash quickstart.sh                                   # downloads tiny Shakespeare if it is not here yet
#   bash quickstart.sh --input=path/to/input.txt         # offline: use a local copy of the text
#   bash quickstart.sh --input=input.txt --max_iters=500 # other arguments go to train.py
#
# Makes .venv (python3 -m venv; set PYTHON=python3.11 to pick another interpreter), installs requirements.txt
# into it, prepares data/shakespeare_char, trains with config/train_shakespeare_char.py on a GPU (CUDA or
# Apple silicon) or config/train_shakespeare_char_cpu.py on a CPU, and prints a sample.
set -euo pipefail

input="${INPUT:-}"
train_args=()
for arg in "$@"; do
    case "$arg" in
        --input=*) input="${arg#--input=}" ;;
        -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) train_args+=("$arg") ;;
    esac
done
if [[ -n "$input" ]]; then  # resolve it against the caller's directory before we cd
    if [[ -d "$(dirname "$input")" ]]; then
        input="$(cd "$(dirname "$input")" && pwd)/$(basename "$input")"
    fi
    if [[ ! -f "$input" ]]; then
        echo "error: --input=$input: no such file" >&2
        exit 1
    fi
fi

cd "$(dirname "${BASH_SOURCE[0]}")"

# ----------------------------------------------------------------------------- environment
if [[ ! -x .venv/bin/python ]]; then
    # the pinned numpy and torch have wheels for these only: say so before pip fails deep inside an install
    if ! "${PYTHON:-python3}" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))'; then
        echo "error: $("${PYTHON:-python3}" --version 2>&1) found; this repo needs Python 3.11-3.13:" \
             "install one and run PYTHON=python3.12 bash $0" >&2
        exit 1
    fi
    echo "== creating .venv"
    "${PYTHON:-python3}" -m venv .venv
fi
echo "== installing requirements.txt into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
py=.venv/bin/python

# ----------------------------------------------------------------------------- data
data=data/shakespeare_char
if [[ -n "$input" ]]; then
    echo "== preparing $data from $input"
    "$py" "$data/prepare.py" --input="$input"
elif [[ -f "$data/train.bin" && -f "$data/val.bin" && -f "$data/meta.json" ]]; then
    echo "== $data is already prepared (pass --input=path/to/input.txt to prepare it again)"
else
    echo "== preparing $data"
    "$py" "$data/prepare.py"
fi

# ----------------------------------------------------------------------------- train
accel="$("$py" -c 'import torch; print("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")')"
if [[ "$accel" == cpu ]]; then
    config=config/train_shakespeare_char_cpu.py
    sample_args=(--device=cpu)
else
    config=config/train_shakespeare_char.py
    sample_args=()
fi
echo "== training on $accel: python train.py $config ${train_args[*]:-}"
"$py" train.py "$config" ${train_args[@]+"${train_args[@]}"}

# ----------------------------------------------------------------------------- sample
echo "== sampling: python sample.py --out_dir=out-shakespeare-char --num_samples=1 --max_new_tokens=500 ${sample_args[*]:-}"
"$py" sample.py --out_dir=out-shakespeare-char --num_samples=1 --max_new_tokens=500 ${sample_args[@]+"${sample_args[@]}"}
