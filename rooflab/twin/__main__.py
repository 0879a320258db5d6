"""``python -m rooflab.twin serve …`` — start the twin (a simulated vLLM server); ``… tokenizer`` prints its
local tokenizer directory. ``rooflab twin`` forwards here, and launchers start the twin this way, so the
twin's options are declared once."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rooflab twin", description="The twin: a simulated vLLM server.")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the OpenAI-compatible API of a simulated vLLM")
    s.add_argument("--model", required=True, help="model config name (rooflab models) or a HF model directory")
    s.add_argument("--hardware", default="H100-SXM", help="GPU datasheet (rooflab hardware)")
    s.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--accel", type=float, default=1.0, help="simulated seconds per wall-clock second")
    s.add_argument("--trace", type=Path, default=None, help="write instrumented-vLLM OTEL JSONL traces here")
    s.add_argument("--max-num-seqs", type=int, default=256)
    s.add_argument("--max-num-batched-tokens", type=int, default=2048)
    s.add_argument("--max-model-len", type=int, default=4096)
    s.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    s.add_argument("--enable-prefix-caching", action="store_true")
    s.add_argument("--num-gpu-blocks", type=int, default=None, help="override the KV-cache size in blocks")
    s.add_argument("--served-model-name", default=None)
    s.add_argument("--seed", type=int, default=0)
    sub.add_parser("tokenizer", help="build (if needed) and print the twin's local tokenizer directory")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "tokenizer":
        from rooflab.twin.tokenizer import ensure_tokenizer

        print(ensure_tokenizer())
        return 0
    import uvicorn

    from rooflab.model.engine_config import EngineConfig
    from rooflab.twin.server import build_server, create_app

    cfg = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
                       enable_prefix_caching=args.enable_prefix_caching, num_gpu_blocks=args.num_gpu_blocks)
    server = build_server(args.model, args.hardware, args.tp, accel=args.accel, trace_path=args.trace,
                          seed=args.seed, served_model_name=args.served_model_name, engine_config=cfg)
    print(f"twin: {server.model_name} TP{args.tp} on {args.hardware}, {server.engine.num_blocks} KV blocks, "
          f"accel {args.accel:g}x, tokenizer {server.tok.path}", flush=True)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
