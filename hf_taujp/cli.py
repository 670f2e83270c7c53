"""`hf-taujp` command line: `hf-taujp demo [...]` (the main job) and `hf-taujp merge RECIPE.yaml [...]`."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]

_USAGE = """usage: hf-taujp {demo,merge} [options]

  demo   fine-tune non-linear / linear / linear + τJp on small built-in tasks, merge, evaluate
  merge  merge task vectors from a YAML recipe (see `hf-taujp merge --help`)
"""


def main(argv=None) -> int:
    """Entry point; `argv` defaults to sys.argv[1:]. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from .demo import main as demo_main

        demo_main(rest)
        return 0
    if cmd == "merge":
        try:
            from .merging.recipe import cli_merge
        except ImportError as e:
            print(f"hf-taujp merge is not available: {e} (hf_taujp.merging.recipe.cli_merge missing)", file=sys.stderr)
            return 1
        out = cli_merge(rest)
        return int(out) if isinstance(out, int) else 0
    print(f"hf-taujp: unknown command {cmd!r}\n{_USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
