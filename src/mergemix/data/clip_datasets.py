"""Class names and prompt templates of the paper's eight vision datasets (zero-shot CLIP heads).

The templates are those of the task-vectors line of work (Ilharco et al., 2023), which the Merge
to Mix vision study follows. The class names of all eight (196 for Cars, 397 for SUN397) ship in
``clip_classnames.json`` beside this file, in the label order of the Hugging Face mirrors named in
``config/clip_vit_b32.yaml``; the file says where they come from, and
``tools/check_clip_metadata.py`` re-checks names and templates against that source.

A dataset spec selects them by name (``classnames: dtd``, ``templates: dtd``), gives its own
lists (``templates: ["a photo of a {}."]``), or takes the names its data carries
(``classnames: from_data``); ``{}`` in a template is replaced by the class name.
"""

from __future__ import annotations

import json
from pathlib import Path

CLASSNAMES_FILE = Path(__file__).with_name("clip_classnames.json")

#: built-in class-name sets, by name, each in label order
CLASSNAMES: dict[str, list[str]] = {
    k: v for k, v in json.loads(CLASSNAMES_FILE.read_text(encoding="utf-8")).items() if not k.startswith("_")
}

TEMPLATES: dict[str, list[str]] = {
    "generic": ["a photo of a {}."],
    "cars": [
        "a photo of a {}.",
        "a photo of the {}.",
        "a photo of my {}.",
        "i love my {}!",
        "a photo of my dirty {}.",
        "a photo of my clean {}.",
        "a photo of my new {}.",
        "a photo of my old {}.",
    ],
    "dtd": [
        "a photo of a {} texture.",
        "a photo of a {} pattern.",
        "a photo of a {} thing.",
        "a photo of a {} object.",
        "a photo of the {} texture.",
        "a photo of the {} pattern.",
        "a photo of the {} thing.",
        "a photo of the {} object.",
    ],
    "eurosat": [
        "a centered satellite photo of {}.",
        "a centered satellite photo of a {}.",
        "a centered satellite photo of the {}.",
    ],
    "gtsrb": [
        'a zoomed in photo of a "{}" traffic sign.',
        'a centered photo of a "{}" traffic sign.',
        'a close up photo of a "{}" traffic sign.',
    ],
    "mnist": ['a photo of the number: "{}".'],
    "resisc45": [
        "satellite imagery of {}.",
        "aerial imagery of {}.",
        "satellite photo of {}.",
        "aerial photo of {}.",
        "satellite view of {}.",
        "aerial view of {}.",
        "satellite imagery of a {}.",
        "aerial imagery of a {}.",
        "satellite photo of a {}.",
        "aerial photo of a {}.",
        "satellite view of a {}.",
        "aerial view of a {}.",
        "satellite imagery of the {}.",
        "aerial imagery of the {}.",
        "satellite photo of the {}.",
        "aerial photo of the {}.",
        "satellite view of the {}.",
        "aerial view of the {}.",
    ],
    "sun397": ["a photo of a {}.", "a photo of the {}."],
    "svhn": ['a photo of the number: "{}".'],
}

FROM_DATA = "from_data"


def resolve_templates(value) -> list[str]:
    """A template set by name, or a list of templates with one ``{}`` each."""
    if value is None:
        value = "generic"
    if isinstance(value, str):
        if value not in TEMPLATES:
            raise ValueError(
                f"unknown template set {value!r}; built in: {', '.join(sorted(TEMPLATES))}, or give a list of "
                "strings with one '{}' each"
            )
        return list(TEMPLATES[value])
    templates = list(value)
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"templates must be a non-empty list of strings with exactly one '{{}}' each; bad: {bad[:3]}")
    return templates


def resolve_classnames(value, from_data: list[str] | None) -> list[str]:
    """Prompt class names: a built-in set by name, an explicit list, or the dataset's own names.

    ``from_data`` are the names the data carries (a label feature's names, folder names), in
    label order. A built-in set or list must have as many names as the data has classes.
    """
    if value is None or value == FROM_DATA:
        if not from_data:
            raise ValueError(
                "the dataset carries no class names (its label column is not a ClassLabel); give "
                f"classnames: one of {', '.join(sorted(CLASSNAMES))}, or a list of names in label order"
            )
        return [str(c).replace("_", " ") for c in from_data]
    if isinstance(value, str):
        if value not in CLASSNAMES:
            raise ValueError(
                f"unknown class-name set {value!r}; built in: {', '.join(sorted(CLASSNAMES))}, '{FROM_DATA}', "
                "or a list of names in label order"
            )
        names = list(CLASSNAMES[value])
    else:
        names = [str(c) for c in value]
    if from_data is not None and len(from_data) != len(names):
        raise ValueError(
            f"{len(names)} class names given but the data has {len(from_data)} classes; check the classnames "
            "setting against the dataset (or use classnames: from_data)"
        )
    if from_data and _same_names_other_order(names, from_data):
        i = next(i for i, (a, b) in enumerate(zip(names, from_data)) if _norm(a) != _norm(b))
        raise ValueError(
            f"the class names given are the data's own names in another order (label {i} is {from_data[i]!r} in "
            f"the data but {names[i]!r} here), so every label would be scored against the wrong prompt; list the "
            "names in the data's label order, or use classnames: from_data"
        )
    return names


def _norm(name) -> str:
    return " ".join(str(name).lower().replace("_", " ").replace("-", " ").split())


def _same_names_other_order(names: list[str], data: list) -> bool:
    ours, theirs = [_norm(n) for n in names], [_norm(n) for n in data]
    return ours != theirs and sorted(ours) == sorted(theirs)
