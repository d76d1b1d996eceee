#!/usr/bin/env bash
# Puts onnxruntime's C headers into DEST (default: ort-dev/ beside this script, where the Makefile looks
# first) from Debian's libonnxruntime-dev package, unpacked, not installed: its library and dependencies
# are not needed (fgc_train links the python wheel's libonnxruntime). Takes the package from the apt
# sources configured here when they have it (Debian 13 trixie and later), else from Debian trixie
# through a private apt configuration under DEST (the system's apt setup is left alone).
# Needs apt-get, dpkg-deb and, for the trixie fallback, /usr/share/keyrings/debian-archive-keyring.gpg.
set -euo pipefail
dest=$(realpath -m "${1:-$(dirname "$0")/ort-dev}")
header="$dest/usr/include/onnxruntime/onnxruntime_c_api.h"
if [ -f "$header" ]; then echo "$header: already there"; exit 0; fi
mkdir -p "$dest/apt/lists/partial" "$dest/apt/cache/archives/partial"
cd "$dest/apt"
if apt-cache show libonnxruntime-dev >/dev/null 2>&1; then
  apt=()
else
  keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  [ -f "$keyring" ] || { echo "get_ort_headers.sh: no libonnxruntime-dev in the apt sources and no $keyring for Debian's; pass ORT_INCLUDE=DIR to make instead" >&2; exit 1; }
  echo "deb [signed-by=$keyring] http://deb.debian.org/debian trixie main" > sources.list
  apt=(-o "Dir::Etc::SourceList=$dest/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
       -o "Dir::State::Lists=$dest/apt/lists" -o "Dir::Cache=$dest/apt/cache")
  apt-get "${apt[@]}" update -qq
fi
apt-get "${apt[@]}" download libonnxruntime-dev 2>&1 | grep -v "unsandboxed" || true
deb=$(ls libonnxruntime-dev_*.deb)
dpkg-deb -x "$deb" "$dest"
[ -f "$header" ] || { echo "get_ort_headers.sh: $deb holds no onnxruntime_c_api.h" >&2; exit 1; }
rm -rf "$dest/apt"   # the package lists (about 20 MB) and the .deb
echo "$header: from $deb (C API version $(sed -n 's/^#define ORT_API_VERSION //p' "$header"))"
