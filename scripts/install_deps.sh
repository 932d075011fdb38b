#!/usr/bin/env bash
# Installs, from Debian's packages, whatever hra's build, tests, examples and benchmarks need
# and is not there yet. Needs root (or sudo) only when something is missing.
set -euo pipefail
pkgs=(build-essential cmake libeigen3-dev catch2 libbenchmark-dev nlohmann-json3-dev zlib1g-dev
      dataset-fashion-mnist clang libclang-rt-14-dev libopenmpi-dev openmpi-bin)
pkgs+=("$@")
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
