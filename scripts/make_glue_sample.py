"""Rebuild the GLUE sample shipped in hf_taujp/recipes/data/glue_sample from a GLUE TSV folder.

    python scripts/make_glue_sample.py ../shared/data/glue --train 400 --dev 200

Rows are a seeded random sample (seed 0) of each file, written back in the original TSV layout
(header kept), so the package reads the sample with the same code as the full folder.
"""

import argparse
import os
import random

FILES = {"CoLA": False, "SST-2": True, "MRPC": True, "RTE": True}  # folder -> has a header line


def main():
    p = argparse.ArgumentParser()
    p.add_argument("glue_dir")
    p.add_argument("--train", type=int, default=400)
    p.add_argument("--dev", type=int, default=200)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "hf_taujp", "recipes", "data", "glue_sample"))
    a = p.parse_args()
    for folder, header in FILES.items():
        os.makedirs(os.path.join(a.out, folder), exist_ok=True)
        for split, n in (("train", a.train), ("dev", a.dev)):
            with open(os.path.join(a.glue_dir, folder, f"{split}.tsv"), encoding="utf-8-sig") as f:
                lines = f.read().splitlines()
            head, body = (lines[:1], lines[1:]) if header else ([], lines)
            body = [x for x in body if x.strip()]
            idx = sorted(random.Random(0).sample(range(len(body)), min(n, len(body))))
            with open(os.path.join(a.out, folder, f"{split}.tsv"), "w", encoding="utf-8", newline="\n") as f:
                f.write("\n".join(head + [body[i] for i in idx]) + "\n")


if __name__ == "__main__":
    main()
