"""`snakemake --lint`, failing on every lint except the few that are design decisions, each with its reason.

Snakemake's linter reports ``Lints for rule X`` / ``Lints for snakefile F`` blocks of ``* Title:``
items. The ones allowed below are deliberate (docs/design.md, docs/running.md); anything else fails
``make lint``.
"""

from __future__ import annotations

import re
import subprocess
import sys

ALLOWED = {
    "Specify a conda environment or container for each rule.": "one software environment, the interpreter that runs Snakemake (docs/running.md, software deployment)",
    "Shell command directly uses variable MERGEMIX from outside of the rule": "the interpreter's path is not a param: moving the venv must not rerun every finished job",
    "Shell command directly uses variable CHECKPOINT_ARGS from outside of the rule": "how often a fine-tune saves its state is not a param: changing it must not rerun finished fine-tunes",
    "Mixed rules and functions in same snakefile.": "the path helpers sit beside the rules whose inputs they compute (several read rules.<name>)",
}


def lints(text: str) -> list[tuple[str, str]]:
    """(where, title) of each lint in the linter's text output."""
    out, where = [], ""
    for line in text.splitlines():
        m = re.match(r"Lints for (.+):$", line)
        if m:
            where = m.group(1)
        m = re.match(r"\s+\* (.+?):?$", line)
        if m and where:
            out.append((where, m.group(1).rstrip(":")))
    return out


def main() -> int:
    r = subprocess.run([sys.executable, "-m", "snakemake", "--lint", *sys.argv[1:]], capture_output=True, text=True)
    found = lints(r.stdout + r.stderr)
    bad = [(w, t) for w, t in found if t.rstrip(".") not in {a.rstrip(".") for a in ALLOWED}]
    if r.returncode not in (0, 1) or (r.returncode != 0 and not found):
        print(r.stdout[-3000:] + r.stderr[-3000:])
        return r.returncode or 1
    for where, title in bad:
        print(f"snakemake --lint: {where}: {title}")
    allowed = len(found) - len(bad)
    print(
        f"snakemake --lint: {len(bad)} lint(s) to fix; {allowed} allowed by design ({', '.join(sorted({t for _, t in found if (_, t) not in bad}))[:200]})"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
