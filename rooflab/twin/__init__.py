"""The twin: a simulated vLLM server (docs/spec.md §5) — the embedded stand-in for a GPU vLLM server.

engine.py   vLLM-v1-like scheduler, paged KV cache, preemption, prefix caching
simulate.py fast (discrete-event) mode: a workload through the engine, no HTTP, no sleeping
truth.py    the hidden ground-truth step timing (richer than the 7-feature model), configs/twin/<hw>.yaml
calibrate.py  replays the real H100 step records through the truth model (python -m rooflab.twin.calibrate)
records.py  what the engine records of each step and request (the source of the OTEL traces)
otel.py     writes records as OTEL JSONL in the instrumented-vLLM format
server.py   OpenAI-compatible HTTP server with time acceleration
tokenizer.py  a local BPE tokenizer, trained offline, served as the model's tokenizer

Only modules in this package may read configs/twin/ (the truth must stay hidden from calibration).
"""
