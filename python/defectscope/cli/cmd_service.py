"""``batch`` and ``serve``: many files on Dask, and the ZeroMQ service."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from defectscope.cli.cmd_map import MAPPING
from defectscope.cli.options import add_backend_option, add_frame_options


def cmd_batch(args: argparse.Namespace) -> int:
    from defectscope.service.batch import run_batch

    options = MAPPING.build(args)
    # run_batch checks the output folder itself: never an input, never the model's folder.
    rows = run_batch(
        args.sources,
        args.model,
        args.out,
        options=options,
        scheduler=args.scheduler,
        workers=args.workers,
        backend=args.backend,
        channel=args.channel,
        frame_index=args.frame_index,
        sum_frames=args.sum,
        verbose=getattr(args, "verbose", False),
    )
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "error")}
    print(
        f"{len(rows)} files: {counts['ok']} mapped, {counts['skipped']} already done, "
        f"{counts['error']} errors -> {args.out / 'index.parquet'}"
    )
    for row in rows:
        if row["status"] == "error":
            print(f"  {row['error']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from defectscope.service.server import serve

    options = MAPPING.build(args)
    logging.getLogger("defectscope").setLevel(logging.INFO)
    print(f"serving {args.artifact} on {args.bind} (Ctrl-C or SIGTERM to stop)", flush=True)
    served = serve(
        args.artifact,
        args.bind,
        args.backend,
        args.curve_secret,
        args.curve_clients,
        args.max_pixels,
        max_bytes=args.max_bytes,
        request_timeout_s=args.request_timeout,
        shutdown_grace_s=args.shutdown_grace,
        options=options,
    )
    print(f"stopped after {served} requests")
    return 0


def add_batch(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+", help="files, folders (recursive) or globs")
    p.add_argument("--model", required=True, help="model dir, .onnx or TensorRT engine")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--scheduler", default="local")
    p.add_argument("--workers", type=int, default=None)
    add_backend_option(p)
    MAPPING.add(p, defaults={"top_k": 10})
    # run_batch takes no pixel size yet, so batch has no --pixel-size/--unit.
    add_frame_options(p, calibration=False)
    p.set_defaults(func=cmd_batch)


def add_serve(p: argparse.ArgumentParser) -> None:
    from defectscope.service import server

    p.add_argument("artifact", type=Path, help="model dir, .onnx or TensorRT engine")
    p.add_argument("--bind", default=server.DEFAULT_BIND)
    add_backend_option(p)
    p.add_argument("--curve-secret", type=Path, help="server secret key file (CURVE)")
    p.add_argument("--curve-clients", type=Path, help="folder of authorized client public keys")
    p.add_argument("--max-pixels", type=int, default=server.DEFAULT_MAX_PIXELS)
    p.add_argument("--max-bytes", type=int, default=server.DEFAULT_MAX_BYTES)
    p.add_argument("--request-timeout", type=float, default=server.DEFAULT_REQUEST_TIMEOUT_S)
    p.add_argument("--shutdown-grace", type=float, default=server.SHUTDOWN_GRACE_S)
    # What each request's own map options apply over.
    MAPPING.add(p)
    p.set_defaults(func=cmd_serve)
