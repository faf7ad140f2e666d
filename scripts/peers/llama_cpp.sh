#!/usr/bin/env bash
# Benchmark peer: llama.cpp's own `llama-server` (C++), the server a GGUF user would pick, serving a GGUF file.
# Never a dependency of kvcellar: it is built in its own folder from the llama.cpp sources that PyPI's
# llama-cpp-python sdist vendors (the one route to llama.cpp's source from a package registry).
#
#   scripts/peers/llama_cpp.sh install              # once: fetch the sdist, build llama-server (a long C++ build)
#   scripts/peers/llama_cpp.sh serve FILE.gguf PORT # foreground; stop it with SIGINT/SIGTERM
#
# Env: LLAMA_PEER_DIR (default ~/.cache/kvcellar-peers/llama-cpp), LLAMA_PEER_VERSION (llama-cpp-python, default 0.3.36),
#      LLAMA_PEER_THREADS (default nproc), LLAMA_PEER_CTX (context, default 9000), LLAMA_PEER_CACHE_RAM_MIB (default 8192).
# Served with one slot, prompt caching on (llama-server's default `cache_prompt`), `--cache-ram` for evicted prompts,
# and the file's own chat template, so it answers the same OpenAI-compatible requests as `kvcellar serve`.
set -euo pipefail
DIR=${LLAMA_PEER_DIR:-$HOME/.cache/kvcellar-peers/llama-cpp}
VERSION=${LLAMA_PEER_VERSION:-0.3.36}
cmd=${1:-}
case "$cmd" in
  install)
    mkdir -p "$DIR"
    if [ ! -x "$DIR/build/bin/llama-server" ]; then
      [ -f "$DIR/llama_cpp_python-$VERSION.tar.gz" ] || python3 -m pip download -q --no-deps --no-binary :all: \
        "llama-cpp-python==$VERSION" -d "$DIR"
      rm -rf "$DIR/src" && mkdir -p "$DIR/src"
      tar xzf "$DIR/llama_cpp_python-$VERSION.tar.gz" -C "$DIR/src" --strip-components=3 \
        "llama_cpp_python-$VERSION/vendor/llama.cpp"
      cmake -S "$DIR/src" -B "$DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >/dev/null
      cmake --build "$DIR/build" --target llama-server -j "$(nproc)"
    fi
    "$DIR/build/bin/llama-server" --version 2>&1 | head -2
    ;;
  serve)
    model=${2:?GGUF file}; port=${3:?port}
    [ -x "$DIR/build/bin/llama-server" ] || { echo "run '$0 install' first" >&2; exit 2; }
    exec "$DIR/build/bin/llama-server" -m "$model" --host 127.0.0.1 --port "$port" \
      -t "${LLAMA_PEER_THREADS:-$(nproc)}" -c "${LLAMA_PEER_CTX:-9000}" -np 1 \
      --cache-ram "${LLAMA_PEER_CACHE_RAM_MIB:-8192}" --jinja --metrics --no-webui
    ;;
  *) echo "usage: $0 install | serve FILE.gguf PORT" >&2; exit 2 ;;
esac
