"""Deterministic random-weight Hugging Face model folders, made offline.

Operations:
- `make_model(arch, size, out_dir, seed=..., dtype=...)`: write a folder that
  `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` load offline
  (modules: `factory`, `configs`, `specs`, `tokenizer`).
- `ensure_demo_model()`: the built-in demo model (qwen3, small), made once
  under `$KVCELLAR_HOME/models` or `~/.cache/kvcellar/models` (module `demo`).

Architectures (`ARCHS`): qwen3 (full attention), gemma3 (sliding + full
attention), qwen3_5 (linear + full attention). Sizes (`SIZES`): tiny (tests),
small (demo), 0.6b (Qwen3-0.6B shape, for measurements). Weight dtypes
(`DTYPES`): bfloat16 (default), float32.
"""

from kvcellar.models.demo import ensure_demo_model
from kvcellar.models.factory import make_model
from kvcellar.models.specs import ARCHS, DTYPES, SIZES

__all__ = ["ARCHS", "DTYPES", "SIZES", "ensure_demo_model", "make_model"]
