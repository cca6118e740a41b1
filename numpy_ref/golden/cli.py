"""The command line: ``python -m numpy_ref.golden write|verify|list`` (the package docstring);
``write --format onnx`` writes ONNX backend node tests instead (`numpy_ref.golden.onnx_export`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from numpy_ref.golden.files import matches, write
from numpy_ref.golden.registry import MANIFEST, all_cases
from numpy_ref.golden.verify import verify

FORMATS = ("safetensors", "onnx")  # write --format; the first is the default

# --------------------------------------------------------------------------------------------
# command line


def _size(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB" if n < 1 << 20 else \
        f"{n / (1 << 20):.2f} MiB"


def _write_onnx(directory: str, only: Sequence[str] | None) -> int:
    from numpy_ref.golden.onnx_export import summary_lines, write_onnx

    try:
        index = write_onnx(directory, only)
    except (ModuleNotFoundError, ValueError) as e:  # no onnx; a bad --only
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write to {directory}: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(index['cases'])} ONNX node tests (model.onnx, test_data_set_0/) to "
          f"{Path(directory).resolve()} (index: onnx_cases.json):")
    for line in summary_lines(index):
        print(line)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m numpy_ref.golden",
        description="Write, verify or list numpy_ref's golden vectors (safetensors files "
                    "and a manifest).")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="compute the cases and write DIR/*.safetensors and "
                                     "DIR/manifest.json (files of an earlier manifest in DIR "
                                     "that this one does not list are removed)")
    w.add_argument("directory")
    w.add_argument("--only", action="append", metavar="PATTERN",
                   help="only cases whose name contains PATTERN (or matches it as a glob "
                        "with * ? [...]); may be repeated")
    w.add_argument("--format", choices=FORMATS, default=FORMATS[0],
                   help="safetensors (default): the golden files and manifest; onnx: one "
                        "ONNX backend node test per case an ONNX operator expresses "
                        "(DIR/test_<case>/model.onnx, test_data_set_0/*.pb; forward only)")
    v = sub.add_parser("verify", help="recompute every case of DIR's manifest and check the "
                                      "files; exit 1 on any mismatch")
    v.add_argument("directory")
    ls = sub.add_parser("list", help="list the cases (of DIR's manifest, with its tensors)")
    ls.add_argument("directory", nargs="?")
    ls.add_argument("--only", action="append", metavar="PATTERN")
    args = parser.parse_args(argv)

    if args.command == "write" and args.format == "onnx":
        return _write_onnx(args.directory, args.only)
    if args.command == "write":
        try:
            manifest = write(args.directory, args.only)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            print(f"error: cannot write to {args.directory}: {e}", file=sys.stderr)
            return 2
        total = sum(e["size"] for e in manifest["cases"].values())
        print(f"wrote {len(manifest['cases'])} files, {_size(total)} in total, to "
              f"{Path(args.directory).resolve()} (manifest: {MANIFEST})")
        return 0
    if args.command == "verify":
        problems = verify(args.directory)
        for p in problems:
            print(p)
        if problems:
            print(f"FAILED: {len(problems)} problem(s) in {args.directory}")
            return 1
        n = len(json.loads((Path(args.directory) / MANIFEST).read_text())["cases"])
        print(f"OK: {n} cases in {args.directory} verified")
        return 0
    if args.directory is None:
        for name, config, _ in all_cases():
            if matches(name, args.only):
                print(f"{name}: {config.functions}")
        return 0
    try:
        cases = json.loads((Path(args.directory) / MANIFEST).read_text())["cases"]
    except (OSError, ValueError, KeyError) as e:
        print(f"error: cannot read the manifest: {e}", file=sys.stderr)
        return 2
    for name, entry in cases.items():
        if not matches(name, args.only):
            continue
        print(f"{name} ({entry['size']} B): {entry['semantics']}")
        for t, info in entry["tensors"].items():
            tol = f"  atol={info['atol']:.3g} rtol={info['rtol']:.3g}" if "atol" in info else ""
            print(f"    {t:<32} {info['dtype']:<4} {info['shape']}{tol}")
    return 0
