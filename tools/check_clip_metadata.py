#!/usr/bin/env python3
"""Check the vision study's shipped class names, templates and hub ids against fusion-bench.

fusion-bench (PyPI, MIT) is the model-merging benchmark of the author of the ``tanganke/*`` Hugging
Face mirrors that ``config/clip_vit_b32.yaml`` downloads. Its wheel carries, for each of the paper's
eight datasets, the class names in the mirror's label order and the prompt templates
(``fusion_bench/tasks/clip_classification/<dataset>.py``) and the hub id it loads
(``fusion_bench_config/dataset/image_classification/{train,test}/<dataset>.yaml``). This script reads
those files from the wheel without importing fusion-bench (whose dependencies are heavy), and
compares them with ``mergemix.data.clip_datasets`` and the study config. It exits 1 on any
difference.

    python tools/check_clip_metadata.py                 # pip-downloads the pinned wheel (PyPI only)
    python tools/check_clip_metadata.py --wheel F.whl   # or reads a wheel you have
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
FUSION_BENCH = "fusion-bench==0.2.33"

#: our dataset name -> fusion-bench's module name and config name
NAMES = {
    "cars": ("stanford_cars", "stanford-cars"),
    "dtd": ("dtd", "dtd"),
    "eurosat": ("eurosat", "eurosat"),
    "gtsrb": ("gtsrb", "gtsrb"),
    "mnist": ("mnist", "mnist"),
    "resisc45": ("resisc45", "resisc45"),
    "sun397": ("sun397", "sun397"),
    "svhn": ("svhn", "svhn"),
}
#: fusion-bench loads MNIST and SVHN by their old short ids; the hub serves them under these now
HUB_ALIASES = {"mnist": "ylecun/mnist", "svhn": "ufldl-stanford/svhn"}


def _template(node: ast.expr) -> str:
    """``lambda c: f"a photo of a {c}."`` -> ``"a photo of a {}."``."""
    if not isinstance(node, ast.Lambda) or not isinstance(node.body, ast.JoinedStr):
        raise ValueError(f"template is not a lambda returning an f-string: {ast.unparse(node)}")
    return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.body.values)


def parse_task_module(source: str) -> dict:
    """The ``classnames`` list and ``templates`` (as ``{}`` strings) of a fusion-bench task module."""
    found = {}
    for stmt in ast.parse(source).body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            name = stmt.targets[0].id
            if name == "classnames":
                found[name] = ast.literal_eval(stmt.value)
            elif name == "templates":
                found[name] = [_template(e) for e in stmt.value.elts]
    missing = {"classnames", "templates"} - set(found)
    if missing:
        raise ValueError(f"no {', '.join(sorted(missing))} in the module")
    return found


def parse_dataset_config(text: str) -> tuple[str, str | None]:
    """(hub id, config name) of a fusion-bench ``datasets.load_dataset`` config."""
    (spec,) = yaml.safe_load(text).values()
    if "path" in spec:
        return spec["path"], spec.get("name")
    args = spec["_args_"]
    return args[0], (args[1] if len(args) > 1 else None)


def read_wheel(wheel: Path) -> dict:
    out = {}
    with zipfile.ZipFile(wheel) as z:
        for ours, (module, cfg) in NAMES.items():
            meta = parse_task_module(z.read(f"fusion_bench/tasks/clip_classification/{module}.py").decode())
            hubs = {
                split: parse_dataset_config(
                    z.read(f"fusion_bench_config/dataset/image_classification/{split}/{cfg}.yaml").decode()
                )
                for split in ("train", "test")
            }
            out[ours] = {**meta, "hub": hubs}
    return out


def download_wheel(dest: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), FUSION_BENCH], check=True
    )
    (wheel,) = dest.glob("fusion_bench-*.whl")
    return wheel


def compare(reference: dict, classnames: dict, templates: dict, datasets: dict) -> list[str]:
    """Every difference between the reference (from the wheel) and ours, as readable lines."""
    problems = []
    for name, ref in reference.items():
        ours = classnames.get(name)
        if ours != ref["classnames"]:
            if ours is None or len(ours) != len(ref["classnames"]):
                problems.append(
                    f"{name}: {0 if ours is None else len(ours)} class names, reference has {len(ref['classnames'])}"
                )
            else:
                i = next(i for i, (a, b) in enumerate(zip(ours, ref["classnames"])) if a != b)
                problems.append(f"{name}: class {i} is {ours[i]!r}, reference has {ref['classnames'][i]!r}")
        if templates.get(name) != ref["templates"]:
            problems.append(f"{name}: templates {templates.get(name)} differ from the reference {ref['templates']}")
        spec = datasets.get(name, {})
        for split, (hub, config) in ref["hub"].items():
            hub = HUB_ALIASES.get(hub, hub)
            if (spec.get("hub_id"), spec.get("config")) != (hub, config):
                problems.append(
                    f"{name}: config reads {spec.get('hub_id')} (config {spec.get('config')}), the "
                    f"reference loads {hub} (config {config}) for {split}"
                )
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheel", type=Path, help=f"a {FUSION_BENCH} wheel (default: pip download it)")
    ap.add_argument("--config", type=Path, default=ROOT / "config" / "clip_vit_b32.yaml")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from mergemix.data.clip_datasets import CLASSNAMES, TEMPLATES

    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or download_wheel(Path(tmp))
        reference = read_wheel(wheel)
    datasets = yaml.safe_load(args.config.read_text())["datasets"]
    for name, ref in reference.items():
        hubs = sorted({HUB_ALIASES.get(h, h) + (f" ({c})" if c else "") for h, c in ref["hub"].values()})
        print(f"{name:9s} {len(ref['classnames']):4d} classes  {len(ref['templates']):2d} templates  {', '.join(hubs)}")
    problems = compare(reference, CLASSNAMES, TEMPLATES, datasets)
    for p in problems:
        print("MISMATCH", p)
    print(
        f"{len(reference)} datasets checked against {wheel.name}: "
        + ("all class names, templates and hub ids match" if not problems else f"{len(problems)} mismatches")
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
