"""`hf-taujp` command line: one subcommand per entry of :data:`COMMANDS` (name → "module:function",
imported only when run; the function takes the remaining arguments and returns the exit status)."""

from __future__ import annotations

import importlib
import sys

__all__ = ["main", "COMMANDS"]

# subcommand → (entry point "module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "glue": ("hf_taujp.recipes.glue:main",
             "the main job: GLUE text-to-text task addition, non-linear / linear / τJp fine-tuning (see --help)"),
    "demo": ("hf_taujp.demo:main",
             "synthetic word-list tasks with a MiniLM zero-shot head (smoke demo, superseded by `glue`)"),
    "merge-bench": ("hf_taujp.recipes.glue:merge_bench_main",
                    "compare merge methods (TA, TIES, TSV, Iso-C/CTS, WUDI, ...) on the vectors of a `glue` run"),
    "merge": ("hf_taujp.merging.recipe:cli_merge",
              "merge task vectors from a YAML recipe (see `hf-taujp merge --help`)"),
    "toxicity": ("hf_taujp.recipes.toxicity:main",
                 "toxicity negation with a causal LM: fine-tune on toxic text, subtract the vector, toxicity vs perplexity"),
    "clip": ("hf_taujp.recipes.clip:main",
             "CLIP vision task addition / negation with frozen zero-shot heads (see `hf-taujp clip --help`)"),
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [f"usage: hf-taujp {{{','.join(COMMANDS)}}} [options]", "       hf-taujp --version", ""]
    lines += [f"  {c.ljust(width)}  {h}" for c, (_, h) in COMMANDS.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """Entry point; `argv` defaults to sys.argv[1:]. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"hf-taujp {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"hf-taujp: unknown command {cmd!r}\n{_usage()}", file=sys.stderr)
        return 2
    module, func = COMMANDS[cmd][0].split(":")
    from .errors import HfTaujpError

    try:
        out = getattr(importlib.import_module(module), func)(rest)
    except HfTaujpError as e:  # a user error: one line, exit status 2 (tracebacks are for our bugs)
        print(f"hf-taujp {cmd}: error: {e}", file=sys.stderr)
        return 2
    return out if isinstance(out, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
