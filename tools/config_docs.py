#!/usr/bin/env python
"""Write ``config/README.md``, the reference of every study config key, from the package's schema.

    python tools/config_docs.py            # (re)write config/README.md
    python tools/config_docs.py --check    # exit 1 if config/README.md is not what this would write

Types, defaults, allowed values and descriptions come from ``src/mergemix/schemas/config.schema.yaml``
(``$ref`` definitions resolved, nested sections expanded). The keys the schema leaves open and the
code declares (``backend.params`` of each built-in backend, the spec keys of each built-in dataset
source, merge-method options, search-strategy options) come from the
package's own tables, built-ins only, so the output does not depend on which plugins are installed.

Where the schema has no description for a key, the row shows the key's type, default and allowed
values and, if there is one, the short text of :data:`NOTES` below (marked "†"); the file ends with
the list of those keys. A note for a key that is not in the schema is an error, so the notes cannot
outlive their keys; a description added to the schema replaces its note.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import yaml

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "src" / "mergemix" / "schemas" / "config.schema.yaml"
OUTPUT = ROOT / "config" / "README.md"
DOCS = "../docs"  # config/README.md -> docs/

# Text for keys the schema does not describe (dotted path -> text; "<name>" stands for any name).
NOTES = {
    "results_dir": "folder the study's outputs go under: `<results_dir>/<study>/`",
    "backend": f"the model family ([studies]({DOCS}/studies.md), [extending]({DOCS}/extending.md#a-backend))",
    "backend.name": "a registered backend: a built-in (see [`backend.params`](#backendparams-of-the-built-in-backends)) "
    "or a plugin's (entry-point group `mergemix.backends`)",
    "backend.params": "the backend's parameters; unknown ones are refused (see "
    "[`backend.params`](#backendparams-of-the-built-in-backends))",
    "pretrain.data": "the pre-training dataset, a dataset spec as under `datasets`",
    "pretrain.hparams": "the pre-training recipe, the keys of `finetune`",
    "split": "deterministic train/val/test splits, their indices saved in each dataset's `splits.json`",
    "split.seed": "seed of every split (one seed for all datasets)",
    "split.val": "fraction of the data in the validation split, where a source gives no fixed splits",
    "split.test": "fraction of the data in the test split, where a source gives no fixed splits",
    "split.val_from_train": "where a source has a train split but no validation split: the fraction of train "
    "carved out as validation (seeded)",
    "split.val_cap": "at most this many validation examples carved from train",
    "split.max_train": "cap on each dataset's training examples (null: no cap)",
    "split.max_val": "cap on each dataset's validation examples (null: no cap)",
    "split.max_test": "cap on each dataset's test examples (null: no cap)",
    "datasets": "dataset name -> spec: `source` names a registered source, the other keys are its parameters "
    "(see [`datasets.<name>`](#datasetsname-keys-of-the-built-in-sources))",
    "datasets.<name>.source": "a registered dataset source: a built-in or a plugin's (entry-point group `mergemix.datasets`)",
    "finetune": "hyperparameters of every fine-tune: single datasets, mixtures and the final model alike",
    "finetune.epochs": "passes over the training data (a mixture: over the union of its datasets' train splits)",
    "finetune.lr": "peak learning rate (write `1.0e-3`, not `1e-3`, which YAML reads as a string)",
    "finetune.batch_size": "examples per optimizer step",
    "finetune.optimizer": "`torch.optim` AdamW (decoupled weight decay), Adam (L2 weight decay) or SGD (heavy-ball momentum)",
    "finetune.momentum": "SGD's momentum (no dampening, not Nesterov)",
    "finetune.weight_decay": "weight decay of the optimizer",
    "finetune.schedule": "learning-rate schedule after the warmup",
    "finetune.warmup_frac": "fraction of the steps with a linear warmup",
    "finetune.grad_clip": "clip the gradient norm to this value (null: no clipping)",
    "finetune.seed": "seed of the data order and of everything random in training",
    "models.<name>.format": f"how the given model is stored (see [given models]({DOCS}/given-models.md)); `auto` detects it",
    "final": "the deployed model of Algorithm 1",
    "merge_eval": "how merged models are searched and scored ([search strategies and merge methods]"
    f"({DOCS}/search-and-merge-methods.md))",
    "merge_eval.method": "the merge method of the merged models: a built-in (see "
    "[merge-method options](#merge-method-options-merge_evaloptions-merge_evalmethod_optionsmethod)) "
    "or a plugin's (entry-point group `mergemix.merge_methods`)",
    "merge_eval.options": "options of `merge_eval.method`, checked against its declared options (see "
    "[merge-method options](#merge-method-options-merge_evaloptions-merge_evalmethod_optionsmethod))",
    "mixture": "fine-tuning on mixtures: the oracle, the correlation study and the similarity/random baselines",
    "mixture.sample.seed": "seed of the sample",
    "analysis": "the analysis stage (`correlation.csv`, `selection.csv`, figures)",
    "analysis.logit_eps": "accuracies are clipped to [eps, 1 - eps] before the logit of the logit-accuracy deltas",
    "analysis.figure_formats": "file formats of every figure",
    "analysis.similarity_split": "split whose embeddings the similarity baselines compare",
    "resources.threads": "threads (Slurm `cpus_per_task`) of each job",
    "resources.mem_mb": "memory of each job, in MB",
}

INTRO = f"""\
# Configuration reference

<!-- Generated by tools/config_docs.py from src/mergemix/schemas/config.schema.yaml and the package's
     option tables. Do not edit: change the schema or the code, then run `python tools/config_docs.py`. -->

A study is one YAML file in this folder. `mergemix check-config config/<study>.yaml` validates it
against the package's schema (`src/mergemix/schemas/config.schema.yaml`, the file the workflow uses
too), fills in the defaults below and refuses a bad key with its name, the value given and what is
allowed. A `--configfile` replaces `config/config.yaml`; the two are not merged. How to run a study:
[docs/running.md]({DOCS}/running.md); the shipped studies: [docs/studies.md]({DOCS}/studies.md).

Columns: **default** is filled in when the key is left out ("required": it must be given; "-": no
default, the key is optional); **allowed** is what the schema accepts beyond the type. A "†" marks a
description written in `tools/config_docs.py` because the schema has none for that key (listed at the
end). `<name>` stands for any dataset name (letters, digits, `_`, `-`, starting with a letter or digit).
"""


# --- schema walking ----------------------------------------------------------------------------------
def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def fmt_value(v: Any) -> str:
    """A YAML-looking literal, in backticks."""
    if v is None:
        text = "null"
    elif isinstance(v, bool):
        text = "true" if v else "false"
    elif isinstance(v, (int, float, str)):
        text = str(v)
    else:
        text = json.dumps(v, sort_keys=False).replace('"', "")
    return f"`{text}`"


def cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def type_alternatives(node: dict) -> list[dict]:
    """The oneOf/anyOf alternatives of ``node`` that are types (not mere ``required`` constraints)."""
    alts = node.get("oneOf") or node.get("anyOf") or []
    return [a for a in alts if set(a) - {"required"}]


class Schema:
    def __init__(self, schema: dict):
        self.schema = schema
        self.defs = schema.get("definitions", {})
        self.def_uses: dict[str, list[str]] = {}  # object definition -> the paths that use it
        self.undescribed: list[str] = []
        self.notes_used: set[str] = set()
        self._collect_uses(schema, "")

    # a node with its $ref resolved (sibling keys win over the definition's)
    def resolve(self, node: dict) -> tuple[dict, str | None]:
        ref = node.get("$ref")
        if not ref:
            return node, None
        name = ref.rsplit("/", 1)[-1]
        merged = {**self.defs[name], **{k: v for k, v in node.items() if k != "$ref"}}
        return merged, name

    def children(self, node: dict, path: str) -> Iterator[tuple[str, dict]]:
        """(path, child) of ``node``: its properties, its ``<name>`` values (additionalProperties)
        and, at the same path, its oneOf/anyOf alternatives."""
        for key, child in (node.get("properties") or {}).items():
            yield (f"{path}.{key}" if path else key), child
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            yield f"{path}.<name>", extra
        for alt in node.get("oneOf", []) + node.get("anyOf", []):
            yield path, alt

    def _collect_uses(self, node: dict, path: str) -> None:
        for p, child in self.children(node, path):
            full, ref = self.resolve(child)
            if ref and full.get("properties") and p not in self.def_uses.get(ref, []):
                self.def_uses.setdefault(ref, []).append(p)
            if child is not node:
                self._collect_uses(full, p)

    def primary(self, ref: str) -> str:
        """The path whose section documents a shared definition (its last use: ``finetune`` for the
        hyperparameters, ``datasets.<name>`` for a dataset spec)."""
        return self.def_uses[ref][-1]

    # --- the columns ------------------------------------------------------------------------------
    def type_text(self, node: dict) -> str:
        node, ref = self.resolve(node)
        alts = type_alternatives(node)
        if alts:
            return " or ".join(self.type_text(a) for a in alts)
        if ref == "name":
            return "name"
        t = node.get("type")
        if "enum" in node and not t:
            return "one of " + ", ".join(map(fmt_value, node["enum"]))
        types = t if isinstance(t, list) else [t] if t else []
        out = []
        for typ in types:
            if typ == "array":
                items = node.get("items")
                out.append(f"list of {self.type_text(items)}" if items else "list")
            elif typ == "object":
                extra = node.get("additionalProperties")
                if isinstance(extra, dict) and not node.get("properties"):
                    out.append(f"mapping of name to {self.type_text(extra)}")
                else:
                    out.append("section" if node.get("properties") else "mapping")
            else:
                out.append(str(typ))
        if not out and node.get("properties"):
            out.append("section")
        return " or ".join(out) or "any"

    def allowed_text(self, node: dict) -> str:
        node, ref = self.resolve(node)
        alts = type_alternatives(node)
        if alts:
            parts = [self.allowed_text(a) or self.type_text(a) for a in alts]
            return "; ".join(p for p in parts if p)
        parts = []
        one_of_keys = [a["required"] for a in node.get("oneOf", []) if set(a) == {"required"}]
        if one_of_keys:
            parts.append("exactly one of " + ", ".join(" + ".join(f"`{k}`" for k in r) for r in one_of_keys))
        if "enum" in node:
            parts.append(", ".join(map(fmt_value, node["enum"])))
        lo = (
            ("≥", node["minimum"])
            if "minimum" in node
            else (">", node["exclusiveMinimum"])
            if "exclusiveMinimum" in node
            else None
        )
        hi = (
            ("≤", node["maximum"])
            if "maximum" in node
            else ("<", node["exclusiveMaximum"])
            if "exclusiveMaximum" in node
            else None
        )
        if lo and hi:
            parts.append(f"{'[' if lo[0] == '≥' else '('}{lo[1]}, {hi[1]}{']' if hi[0] == '≤' else ')'}")
        elif lo:
            parts.append(f"{lo[0]} {lo[1]}")
        elif hi:
            parts.append(f"{hi[0]} {hi[1]}")
        if "pattern" in node:
            parts.append(f"matches `{node['pattern']}`")
        if node.get("minLength"):
            parts.append("non-empty")
        if "minItems" in node:
            parts.append(f"at least {node['minItems']} item{'s' if node['minItems'] > 1 else ''}")
        if node.get("uniqueItems"):
            parts.append("no duplicates")
        if "minProperties" in node:
            parts.append(f"at least {node['minProperties']} entries")
        items = node.get("items")
        if isinstance(items, dict):
            inner = self.allowed_text(items)
            if inner and not (ref is None and items.get("$ref") == "#/definitions/name"):
                parts.append(f"each {inner}")
        req = node.get("required")
        if req and node.get("properties") and len(node["required"]) < len(node["properties"]):
            parts.append("needs " + ", ".join(f"`{r}`" for r in req))
        return "; ".join(parts)

    def description(self, node: dict, path: str) -> str:
        node, _ = self.resolve(node)
        text = node.get("description")
        if text:
            return cell(text)
        self.undescribed.append(path)
        note = NOTES.get(path)
        if note:
            self.notes_used.add(path)
            return cell(note) + " †"
        return ""

    # --- the tables -------------------------------------------------------------------------------
    def rows(self, node: dict, path: str) -> Iterator[tuple[str, dict, bool]]:
        """(dotted key, child node, required) for each property of ``node`` at ``path``."""
        required = set(node.get("required") or [])
        for key, child in (node.get("properties") or {}).items():
            yield (f"{path}.{key}" if path else key), child, key in required

    def default_text(self, node: dict, required: bool) -> str:
        node, _ = self.resolve(node)
        if "default" in node:
            return fmt_value(node["default"])
        return "required" if required else "-"

    def table(self, node: dict, path: str, link) -> list[str]:
        out = ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
        for key, child, required in self.rows(node, path):
            target = link(key, child)
            name = f"[`{key}`](#{target})" if target else f"`{key}`"
            out.append(
                "| "
                + " | ".join(
                    [
                        name,
                        cell(self.type_text(child)),
                        cell(self.default_text(child, required)),
                        cell(self.allowed_text(child)),
                        self.description(child, key),
                    ]
                )
                + " |"
            )
        return out


def sections(s: Schema) -> list[str]:
    """The top-level table, then a section per object with properties, depth first; a definition
    used at several paths (``$ref``) gets one section, at its primary path."""
    out: list[str] = []
    anchors: dict[str, str] = {}  # path -> anchor of the section documenting it

    def title(path: str, node: dict) -> str:
        _, ref = s.resolve(node)
        if ref in s.def_uses:
            return ", ".join(f"`{p}`" for p in s.def_uses[ref])
        return f"`{path}`"

    def subsections(path: str, node: dict) -> list[tuple[str, dict]]:
        """The nodes under ``node`` with properties of their own, looking through mappings
        (``datasets.<name>``) and alternatives (``mixture.sample``) that have none."""
        found = []
        for p, c in s.children(node, path):
            full = s.resolve(c)[0]
            if full.get("properties"):
                found.append((p, c))
            elif c is not node:
                found += subsections(p, full)
        return found

    def plan(path: str, node: dict) -> None:
        for sub_path, sub in subsections(path, node):
            anchors.setdefault(sub_path, slug(title(sub_path, sub)))
            plan(sub_path, s.resolve(sub)[0])

    plan("", s.schema)

    def link(key: str, child: dict) -> str | None:
        if key in anchors:
            return anchors[key]
        return anchors.get(f"{key}.<name>")

    required = ", ".join(f"`{r}`" for r in s.schema.get("required", []))
    out += ["## Top-level keys", "", f"Required: {required}.", ""]
    out += s.table(s.schema, "", link) + [""]

    def write(path: str, node: dict, level: int) -> None:
        full, ref = s.resolve(node)
        if ref in s.def_uses and path != s.primary(ref):
            return  # documented once, at its primary path
        heading = title(path, node)
        out.extend([f"{'#' * level} {heading}", ""])
        if full.get("description"):
            out.extend([cell(full["description"]), ""])
        if full.get("required"):
            out.extend(["Required: " + ", ".join(f"`{r}`" for r in full["required"]) + ".", ""])
        one_of = [a["required"] for a in full.get("oneOf", []) if set(a) == {"required"}]
        if one_of:
            out.extend(["Give exactly one of " + ", ".join(" + ".join(f"`{k}`" for k in r) for r in one_of) + ".", ""])
        if ref in s.def_uses and len(s.def_uses[ref]) > 1:
            out.extend(
                [
                    f"The same keys (schema definition `{ref}`) under each of {heading}; the rows name them "
                    f"under `{path}`.",
                    "",
                ]
            )
        out.extend(s.table(full, path, link) + [""])
        for sub_path, sub in subsections(path, full):
            write(sub_path, sub, min(level + 1, 4))

    for sub_path, sub in subsections("", s.schema):
        write(sub_path, sub, 2)
    return out


# --- what the code declares --------------------------------------------------------------------------
def code_sections() -> list[str]:
    from mergemix.backends import base as backends
    from mergemix.data import registry as sources
    from mergemix.merge_methods import METHODS
    from mergemix.search import base as search

    out: list[str] = []

    out += [
        "## `backend.params` of the built-in backends",
        "",
        "Each backend's parameters and their defaults (`mergemix.backends`; unknown parameters are refused). "
        f"What they mean: [docs/studies.md]({DOCS}/studies.md) (`smallcnn`: the embedded study; `clip`: the vision "
        "study; `causal_lm`: the language study). A plugin backend declares its own.",
        "",
    ]
    for name in backends.BUILTIN_BACKENDS:
        cls = backends.BACKENDS[name]
        facts = [
            f"pack size {cls.pack_size}",
            "needs a GPU" if cls.needs_gpu else "no GPU",
            "pre-trained by the `pretrain` rule" if cls.can_pretrain else "weights fetched by `fetch_pretrained`",
        ]
        out += [f"### `{name}`", "", f"{'; '.join(facts)}.", "", "| parameter | default |", "|---|---|"]
        out += [f"| `{k}` | {cell(fmt_value(v))} |" for k, v in cls.defaults.items()]
        out += [""]

    out += [
        "## `datasets.<name>`: keys of the built-in sources",
        "",
        "Besides `source`, a dataset spec takes exactly the keys its source declares (`mergemix.data`); an "
        'unknown key is refused. "any" means the source checks the value itself when it prepares the dataset. '
        f"The sources and their keys in use: [docs/studies.md]({DOCS}/studies.md); a source of your own: "
        f"[docs/extending.md]({DOCS}/extending.md#a-dataset-source).",
        "",
        "| source | download step | keys (allowed values) | local paths checked at `check-config` |",
        "|---|---|---|---|",
    ]
    for name in sources.BUILTIN_SOURCES:
        sources.SOURCES[name]  # imported: its declaration registered
        params = sources.SOURCE_PARAMS[name]
        keys = ", ".join(
            f"`{k}`" + (f" ({', '.join(map(str, v))})" if isinstance(v, (list, tuple)) else " (any)")
            for k, v in params.items()
        )
        local = ", ".join(f"`{k}` ({kind})" for k, kind in sources.LOCAL_PATHS.get(name, {}).items()) or "-"
        out.append(f"| `{name}` | {'yes' if name in sources.DOWNLOADERS else 'no'} | {cell(keys)} | {local} |")
    out += [""]

    out += [
        "## Merge-method options (`merge_eval.options`, `merge_eval.method_options.<method>`)",
        "",
        "The options each built-in merge method declares (`mergemix.merge_methods`), checked at `check-config`. "
        "`merge_eval.options` are those of `merge_eval.method`; `merge_eval.method_options.<method>` fix the options "
        "of a method compared in `merge_eval.methods`; `merge_eval.tune.space.<method>` tunes the numeric and "
        f"choice options. What the methods compute: [docs/search-and-merge-methods.md]({DOCS}/search-and-merge-methods.md).",
        "",
        "| method | option | type | default | allowed | what it does |",
        "|---|---|---|---|---|---|",
    ]
    for method, spec in METHODS.items():
        if not spec.options:
            out.append(f"| `{method}` | - | | | | no options |")
        for key, opt in spec.options.items():
            out.append(
                "| "
                + " | ".join(
                    [
                        f"`{method}`",
                        f"`{key}`",
                        opt.kind.__name__,
                        cell(opt.default_doc or fmt_value(opt.default)),
                        cell(opt.allowed),
                        cell(opt.help),
                    ]
                )
                + " |"
            )
    out += [""]

    out += [
        "## `merge_eval.strategy_options`: options of the search strategies",
        "",
        "The options each built-in strategy declares (`mergemix.search`), given under `merge_eval.strategy_options` "
        "with a named `merge_eval.strategy` (`auto` takes none). What they do: "
        f"[docs/search-and-merge-methods.md]({DOCS}/search-and-merge-methods.md#search-strategies).",
        "",
        "| strategy | budget counts | `workers` > 1 | option | default | allowed |",
        "|---|---|---|---|---|---|",
    ]
    for name in search.BUILTIN_STRATEGIES:  # a plugin's strategies are not listed
        cls = search.get_strategy(name)
        head = [f"`{cls.name}`", cls.cost, "yes" if cls.supports_workers else "no"]
        if not cls.options:
            out.append("| " + " | ".join(head + ["-", "", "no options"]) + " |")
        for key, opt in cls.options.items():
            out.append("| " + " | ".join(head + [f"`{key}`", cell(fmt_value(opt.default)), cell(opt.help)]) + " |")
    out += [""]

    return out


def render(schema_path: Path = SCHEMA) -> str:
    schema = yaml.safe_load(schema_path.read_text())
    s = Schema(schema)
    all_paths = set(_all_paths(s, schema, ""))
    stale = sorted(set(NOTES) - all_paths)
    if stale:
        raise SystemExit(
            f"tools/config_docs.py: NOTES name keys that are not in the schema: {', '.join(stale)}; "
            "remove or rename them"
        )
    lines = [INTRO] + sections(s) + code_sections()
    undescribed = sorted(dict.fromkeys(s.undescribed))
    lines += [
        "## Keys without a description in the schema",
        "",
        'The schema has no `description` for these keys; a "†" text above comes from `tools/config_docs.py`. '
        "Adding a description to the schema replaces it.",
        "",
    ]
    lines += [", ".join(f"`{p}`" + ("" if p in s.notes_used else " (no text)") for p in undescribed), ""]
    return "\n".join(lines).rstrip() + "\n"


def _all_paths(s: Schema, node: dict, path: str, documented: bool = False) -> Iterator[str]:
    """Every key path of the schema; with ``documented``, those config/README.md has a row for: a
    shared definition's keys under its primary path only, and ``<name>`` entries only where they
    are sections (a mapping of lists is one row)."""
    for p, child in s.children(node, path):
        full, ref = s.resolve(child)
        if p != path and not (documented and p.endswith(".<name>") and not full.get("properties")):
            yield p
        if documented and ref in s.def_uses and p != s.primary(ref):
            continue
        yield from _all_paths(s, full, p, documented)


def documented_paths(schema_path: Path = SCHEMA) -> list[str]:
    """The key paths config/README.md must name (see :func:`_all_paths`)."""
    s = Schema(yaml.safe_load(schema_path.read_text()))
    return list(dict.fromkeys(_all_paths(s, s.schema, "", documented=True)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the file differs from what would be written")
    p.add_argument("--output", type=Path, default=OUTPUT, help="the file (default: config/README.md)")
    p.add_argument("--schema", type=Path, default=SCHEMA)
    args = p.parse_args(argv)
    text = render(args.schema)
    if args.check:
        old = args.output.read_text() if args.output.exists() else ""
        if old == text:
            print(f"{args.output}: up to date")
            return 0
        diff = difflib.unified_diff(
            old.splitlines(), text.splitlines(), str(args.output), "generated", lineterm="", n=1
        )
        print("\n".join(list(diff)[:40]))
        print(f"{args.output} is stale: run `python tools/config_docs.py`", file=sys.stderr)
        return 1
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
