#!/usr/bin/env bash
# Download torchvision's ImageNet ResNet weights as .safetensors (timm's copies of the
# torchvision checkpoints: same key names, no torch needed to read them).
#
#   bash scripts/get_pretrained.sh resnet50 ~/weights          # -> ~/weights/resnet50.tv_in1k.safetensors
#   bash scripts/get_pretrained.sh timm/resnet50.tv2_in1k DIR  # any hub id holding model.safetensors
#
# Then: python main.py --config=configs/cub.py --config.model.pretrained=DIR/resnet50.tv_in1k.safetensors
set -euo pipefail

usage() {
  echo "usage: bash scripts/get_pretrained.sh {resnet18|resnet34|resnet50|HUB_ID} [DIR]" >&2
  exit 2
}
[[ $# -ge 1 && $# -le 2 ]] || usage
case "$1" in
  resnet18|resnet34|resnet50) repo="timm/$1.tv_in1k" ;;  # torchvision IMAGENET1K_V1 weights
  */*) repo="${1#hf-hub:}" ;;
  *) usage ;;
esac
dir="${2:-$HOME/.cache/lmoe_jax/weights}"
mkdir -p "$dir"
out="$dir/${repo#*/}.safetensors"
url="https://huggingface.co/$repo/resolve/main/model.safetensors"

fail() {
  rm -f "$out.part"
  echo "error: could not download $url (offline?). On a machine with internet run this script" \
       "there, copy the file to $out, and pass --config.model.pretrained=$out" >&2
  exit 1
}
if [[ -s "$out" ]]; then
  echo "already there: $out" >&2
elif command -v curl >/dev/null; then
  curl -fL --retry 3 -o "$out.part" "$url" || fail
elif command -v wget >/dev/null; then
  wget -O "$out.part" "$url" || fail
else
  echo "error: neither curl nor wget is installed; download $url to $out by hand." >&2
  exit 1
fi
[[ -s "$out" ]] || mv "$out.part" "$out"
echo "--config.model.pretrained=$out"
