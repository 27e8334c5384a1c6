#!/usr/bin/env python3
"""Fetches the texts of the split fine-tuning benchmark (BENCHMARKS.md, "Split fine-tuning") and
writes them as JSONL for `lsplit finetune`. Run by hand, not by CI; nothing it fetches is
committed.

- Training domain: the reStructuredText documentation in click's sdist (PyPI, `pip download`).
  Whole files are held out (never chunks of a training file), so the held-out perplexity
  measures the domain, not memorised pages.
- General text: English prose from Debian's `doc-debian` package (`apt-get download`): the
  Debian manifesto, the social contract and the constitution.

Writes into --out (default ~/.cache/lambda-split/finetune-data):
  domain-train.jsonl, domain-heldout.jsonl, general.jsonl   ({"text": ...} per line)
and prints each package's version and sha256.

    python3 bench/finetune_data.py [--out DIR] [--chars 400] [--eval-chunks 24]
"""

import argparse
import gzip
import hashlib
import json
import pathlib
import subprocess
import sys
import tarfile
import tempfile

CLICK = "click==8.1.7"
# Held-out domain files: whole pages the adapter never trains on.
HELD_OUT = {"testing.rst", "utils.rst", "prompts.rst"}
# Pages that are mostly lists of versions or API stubs, not prose.
SKIPPED = {"changes.rst", "api.rst", "license.rst", "contrib.rst"}
DEBIAN = "doc-debian"
GENERAL = ["debian-manifesto.gz", "social-contract.txt.gz", "constitution.txt.gz"]


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def chunks(text, limit):
    """Paragraphs (blank-line separated) packed into chunks of at most `limit` characters; a
    longer paragraph is its own chunk (`lsplit finetune --max-len` cuts it into windows)."""
    out, current = [], ""
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        if current and len(current) + 2 + len(para) > limit:
            out.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current:
        out.append(current)
    return out


def spaced(texts, n):
    """At most `n` of `texts`, evenly spaced, so that a short evaluation still covers each file."""
    if len(texts) <= n:
        return texts
    return [texts[i * len(texts) // n] for i in range(n)]


def write(path, texts):
    with path.open("w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    print(f"{path}: {len(texts)} chunks, {sum(len(t) for t in texts)} characters")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path.home() / ".cache/lambda-split/finetune-data"
    )
    parser.add_argument("--chars", type=int, default=400, help="characters per chunk at most")
    parser.add_argument(
        "--eval-chunks", type=int, default=24,
        help="chunks kept in each evaluation file, evenly spaced (evaluation runs twice a run)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--quiet", CLICK, "-d", str(tmp)],
            check=True,
        )
        (sdist,) = tmp.glob("click-*.tar.gz")
        print(f"domain: {sdist.name} sha256 {sha256(sdist)}")
        train, held = [], []
        with tarfile.open(sdist) as tar:
            members = sorted(
                (m for m in tar.getmembers() if m.name.count("/") == 2 and "/docs/" in m.name
                 and m.name.endswith(".rst")),
                key=lambda m: m.name,
            )
            for m in members:
                name = m.name.rsplit("/", 1)[1]
                if name in SKIPPED:
                    continue
                text = tar.extractfile(m).read().decode("utf-8")
                (held if name in HELD_OUT else train).extend(chunks(text, args.chars))

        subprocess.run(["apt-get", "download", "--quiet", DEBIAN], check=True, cwd=tmp)
        (deb,) = tmp.glob(f"{DEBIAN}_*.deb")
        print(f"general: {deb.name} sha256 {sha256(deb)}")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "deb")], check=True)
        general = []
        for name in GENERAL:
            text = gzip.decompress((tmp / "deb/usr/share/doc/debian" / name).read_bytes())
            general.extend(chunks(text.decode("utf-8"), args.chars))

    write(args.out / "domain-train.jsonl", train)
    write(args.out / "domain-heldout.jsonl", spaced(held, args.eval_chunks))
    write(args.out / "general.jsonl", spaced(general, args.eval_chunks))


if __name__ == "__main__":
    main()
