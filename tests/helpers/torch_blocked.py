"""Run Python code in a child interpreter where `import torch` fails.

For tests that hold a module torch-free (the core, the spec-decode proposers): a meta-path finder
installed before the code runs refuses torch and everything under it.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

BLOCK_TORCH = textwrap.dedent('''
    import sys

    class NoTorch:
        """Refuse torch (and anything under it) at import."""
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, NoTorch())
''')


def run_without_torch(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `code` (dedented) from the repo root with torch blocked; stdout/stderr captured."""
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
