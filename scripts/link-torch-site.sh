#!/usr/bin/env bash
# Give the Triton Python-backend stub's packages (DEST: $VENV/triton-python/X.Y, which
# scripts/setup.sh --triton-server fills) a torch: a link in DEST to each entry of SITE (the
# site-packages of a Python X.Y that has torch, the same X.Y as the stub's) that DEST lacks.
# DEST's own packages come first (numpy 1.x: the stub misreads string tensors with numpy 2), so
# SITE's numpy is never linked. The torch engine's Triton text model (torch_text_model.py) needs
# torch and safetensors there; on the GPU machine SITE is the image's torch environment.
#   scripts/link-torch-site.sh SITE DEST
set -euo pipefail
site=$1 dest=$2
[ -d "$site/torch" ] || { echo "link-torch-site: $site has no torch" >&2; exit 2; }
mkdir -p "$dest"
for entry in "$site"/*; do
  name=$(basename "$entry")
  case "$name" in
    numpy|numpy-*|numpy.libs|__pycache__|_distutils_hack|*.pth) continue ;;
  esac
  [ -e "$dest/$name" ] || [ -L "$dest/$name" ] || ln -s "$entry" "$dest/$name"
done
