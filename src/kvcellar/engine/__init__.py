"""The inference engine: load a model folder, run requests on one worker thread.

Modules: `loader` (offline loading, device/dtype), `weights` (fp32 compute on
bf16-stored weights), `prompt` (templating, message
boundaries), `prepared` (one request's checked prompt and block keys, and the
one input rule), `prefill` (the two chunk schedules), `schedule` (which one an
engine runs), `invariance` (the load-time check behind the row-invariant one),
`attention` (`kvcellar_sdpa`, query pieces, CPU decode steps), `sampling`, `text_stream`
(detokenizing, stop strings), `runner` (one request), `worker` (the model's
thread), `engine` (the public facade).
"""

from kvcellar.engine.engine import Engine
from kvcellar.engine.prepared import PreparedPrompt
from kvcellar.engine.request import GenerationResult, PromptSegments, StreamEvent, Timings
from kvcellar.engine.sampling import SamplingParams

__all__ = ["Engine", "GenerationResult", "PreparedPrompt", "PromptSegments", "SamplingParams", "StreamEvent", "Timings"]
