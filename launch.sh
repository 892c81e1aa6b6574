#!/usr/bin/env bash
# LDM Studio set-up and launcher.
#   ./launch.sh          install what is missing, then start the studio at http://127.0.0.1:7860
#                        (arguments go to app.py: --api adds the AUTOMATIC1111-compatible API, --nowebui serves it alone)
#   ./launch.sh test     install what is missing, with the test packages and Chromium, then run the whole test suite
#   ./launch.sh train    train the embedded default model's three stages (see README)
#   ./launch.sh batch    python -m ldm batch (see README, Beyond one machine); with --ray local|ADDRESS among
#                        its arguments it installs Ray (requirements-ray.txt) first
#   ./launch.sh --ray ...  any of the above, with the optional Ray extra installed first; plain ./launch.sh
#                        never installs it (./launch.sh test always does, so the Ray tests run)
# Both are idempotent: the second run installs nothing and starts at once.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV=.venv
PYTHON=${PYTHON:-python3}
# Weights and tokenizers are never downloaded at run time.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
export HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False

say() { printf '[launch] %s\n' "$*" >&2; }

apt_install() {
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    say "installing Debian packages: $*"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    say "please install these system packages: $*"; exit 1
  fi
}

ensure_venv() {
  command -v "$PYTHON" >/dev/null || apt_install python3
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV" 2>/dev/null || { rm -rf "$VENV"; apt_install python3-venv; "$PYTHON" -m venv "$VENV"; }
    "$VENV/bin/python" -m pip install -q --upgrade pip
  fi
}

# pip_install STAMP [pip args...]: runs pip only when the requirement files changed since the last success.
pip_install() {
  local name=$1; shift
  local stamp="$VENV/.installed-$name" want
  want=$(cat "$@" 2>/dev/null | sha256sum | cut -c1-64)
  want=$(printf '%s %s' "$want" "$*" | sha256sum | cut -c1-64)
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && return 0
  say "installing $name packages"
  local args=()
  for f in "$@"; do case $f in *nodeps*) args+=(--no-deps -r "$f");; *) args+=(-r "$f");; esac; done
  # torch first and alone, so that no other package can bring a different build of it.
  if [ "$name" = runtime ]; then "$VENV/bin/python" -m pip install -q "$(grep -E '^torch==' requirements.txt)"; fi
  "$VENV/bin/python" -m pip install -q "${args[@]}"
  echo "$want" >"$stamp"
}

install_runtime() {
  ensure_venv
  pip_install runtime requirements.txt
  pip_install nodeps requirements-nodeps.txt
  ensure_build_tools
}

# On a CPU with AVX512-BF16, bf16 attention and Winograd's data transforms run through our C++ kernels
# (ldm/kernels/cpu_kernels.py), built on first use with a C++ compiler; without one torch's run instead.
ensure_build_tools() {
  grep -qw avx512_bf16 /proc/cpuinfo 2>/dev/null || return 0
  command -v "${CXX:-c++}" >/dev/null && return 0
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt_install g++
  else
    say "optional: install g++ for the faster bf16 attention kernel (torch's kernel runs without it)"
  fi
}

# The optional Ray extra (ldm/distributed/): the batch command's --ray local|ADDRESS.
install_ray() { pip_install ray requirements-ray.txt; }

# wants_ray ARGS...: true when the arguments hold a --ray other than none.
wants_ray() {
  while [ $# -gt 0 ]; do
    case $1 in
      --ray=none) ;;
      --ray=*) return 0;;
      --ray) [ "${2:-none}" != none ] && return 0; shift;;
    esac
    shift
  done
  return 1
}

# The browser tests drive Debian's Chromium through Playwright (which cannot download its own here).
ensure_chromium() {
  [ -x "${LDM_STUDIO_CHROMIUM:-/usr/bin/chromium}" ] || apt_install chromium
}

WITH_RAY=0
if [ "${1:-}" = --ray ]; then WITH_RAY=1; shift; fi

case "${1:-}" in
  test)
    shift
    install_runtime
    pip_install dev requirements-dev.txt
    install_ray
    ensure_chromium
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  train)
    shift
    install_runtime
    for stage in autoencoder txt2img upscale; do "$VENV/bin/python" -m ldm train "$stage" "$@"; done
    exec "$VENV/bin/python" -m ldm eval
    ;;
  batch)
    shift
    install_runtime
    if [ "$WITH_RAY" = 1 ] || wants_ray "$@"; then install_ray; fi
    exec "$VENV/bin/python" -m ldm batch "$@"
    ;;
  *)
    install_runtime
    if [ "$WITH_RAY" = 1 ]; then install_ray; fi
    exec "$VENV/bin/python" app.py "$@"
    ;;
esac
