"""Decode step on CUDA: graph replay vs eager (the same engine), vs the weight-bytes / HBM floor.
argv: model folder, comma-separated context lengths, out json."""
import json, sys, time, torch
from kvcellar import CacheConfig, Engine

model_dir, lengths, out = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], sys.argv[3]
res = {"model": model_dir, "rows": []}
eng = Engine.load(model_dir, device="cuda", cache=CacheConfig(enabled=False))
runner = eng._worker.runner
weights = sum(p.numel() * p.element_size() for p in eng.loaded.model.parameters())
x = torch.empty(4 * 1024**3, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); s = time.perf_counter()
for _ in range(10): y.copy_(x)
torch.cuda.synchronize(); bw = 10 * 2 * x.numel() / (time.perf_counter() - s)
del x, y; torch.cuda.empty_cache()
cfg = eng.loaded.model.config
res.update(weight_bytes=weights, copy_bw_GBs=bw / 1e9, floor_weights_ms=1000 * weights / bw)
print(res, flush=True)
graphs = runner.graphs
for n in lengths:
    ids = [((i * 7919) % 30000) + 100 for i in range(n)]
    kv_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * n * 2
    for mode in ("graphs", "eager", "graphs"):
        runner.graphs = graphs if mode == "graphs" else None
        started = time.perf_counter()
        r = eng.generate(prompt_ids=ids, max_tokens=160, ignore_eos=True)
        row = dict(n=n, mode=mode, step_ms=1000 / r.timings.decode_tok_s, first_s=time.perf_counter() - started,
                   floor_ms=1000 * (weights + kv_bytes) / bw, captured=graphs.num_captured, failed=graphs.failed)
        res["rows"].append(row)
        print(row, flush=True)
json.dump(res, open(out, "w"), indent=1)
