"""Class names and prompt templates of the paper's eight vision datasets (zero-shot CLIP heads).

The templates are those of the task-vectors line of work (Ilharco et al., 2023), which the Merge
to Mix vision study follows; class names are the cleaned, prompt-ready names of the same code, in
the label order of the datasets' Hugging Face mirrors named in ``config/clip_vit_b32.yaml``.

Cars (196 classes) and SUN397 (397 classes) take their class names from the dataset's own label
feature (``classnames: from_data``): the hub mirrors carry readable names ("AM General Hummer SUV
2000", "abbey"), so a copy here would only be a second list to keep in step.

A dataset spec selects them by name (``classnames: dtd``, ``templates: dtd``) or gives its own
lists (``templates: ["a photo of a {}."]``); ``{}`` is replaced by the class name.
"""

from __future__ import annotations

DIGITS = [str(i) for i in range(10)]

CLASSNAMES: dict[str, list[str]] = {
    "mnist": DIGITS,
    "svhn": DIGITS,
    "eurosat": [
        "annual crop land", "forest", "brushland or shrubland", "highway or road",
        "industrial buildings or commercial buildings", "pasture land", "permanent crop land",
        "residential buildings or homes or apartments", "river", "lake or sea",
    ],
    "dtd": [
        "banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked",
        "crosshatched", "crystalline", "dotted", "fibrous", "flecked", "freckled", "frilly", "gauzy",
        "grid", "grooved", "honeycombed", "interlaced", "knitted", "lacelike", "lined", "marbled",
        "matted", "meshed", "paisley", "perforated", "pitted", "pleated", "polka-dotted", "porous",
        "potholed", "scaly", "smeared", "spiralled", "sprinkled", "stained", "stratified", "striped",
        "studded", "swirly", "veined", "waffled", "woven", "wrinkled", "zigzagged",
    ],
    "resisc45": [
        "airplane", "airport", "baseball diamond", "basketball court", "beach", "bridge", "chaparral",
        "church", "circular farmland", "cloud", "commercial area", "dense residential", "desert",
        "forest", "freeway", "golf course", "ground track field", "harbor", "industrial area",
        "intersection", "island", "lake", "meadow", "medium residential", "mobile home park",
        "mountain", "overpass", "palace", "parking lot", "railway", "railway station",
        "rectangular farmland", "river", "roundabout", "runway", "sea ice", "ship", "snowberg",
        "sparse residential", "stadium", "storage tank", "tennis court", "terrace",
        "thermal power station", "wetland",
    ],
    "gtsrb": [
        "red and white circle 20 kph speed limit", "red and white circle 30 kph speed limit",
        "red and white circle 50 kph speed limit", "red and white circle 60 kph speed limit",
        "red and white circle 70 kph speed limit", "red and white circle 80 kph speed limit",
        "end / de-restriction of 80 kph speed limit", "red and white circle 100 kph speed limit",
        "red and white circle 120 kph speed limit", "red and white circle red car and black car no passing",
        "red and white circle red truck and black car no passing", "red and white triangle road intersection warning",
        "white and yellow diamond priority road", "red and white upside down triangle yield right-of-way",
        "stop", "empty red and white circle", "red and white circle no truck entry",
        "red circle with white horizonal stripe no entry", "red and white triangle with exclamation mark warning",
        "red and white triangle with black left curve approaching warning",
        "red and white triangle with black right curve approaching warning",
        "red and white triangle with black double curve approaching warning",
        "red and white triangle rough / bumpy road warning", "red and white triangle car skidding / slipping warning",
        "red and white triangle with merging / narrow lanes warning",
        "red and white triangle with person digging / construction / road work warning",
        "red and white triangle with traffic light approaching warning",
        "red and white triangle with person walking warning",
        "red and white triangle with child and person walking warning",
        "red and white triangle with bicyle warning", "red and white triangle with snowflake / ice warning",
        "red and white triangle with deer warning", "white circle with gray strike bar no speed limit",
        "blue circle with white right turn arrow mandatory", "blue circle with white left turn arrow mandatory",
        "blue circle with white forward arrow mandatory", "blue circle with white forward or right turn arrow mandatory",
        "blue circle with white forward or left turn arrow mandatory", "blue circle with white keep right arrow mandatory",
        "blue circle with white keep left arrow mandatory", "blue circle with white arrows indicating a traffic circle",
        "white circle with gray strike bar indicating no passing for cars has ended",
        "white circle with gray strike bar indicating no passing for trucks has ended",
    ],
}

TEMPLATES: dict[str, list[str]] = {
    "generic": ["a photo of a {}."],
    "cars": [
        "a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!",
        "a photo of my dirty {}.", "a photo of my clean {}.", "a photo of my new {}.", "a photo of my old {}.",
    ],
    "dtd": [
        "a photo of a {} texture.", "a photo of a {} pattern.", "a photo of a {} thing.", "a photo of a {} object.",
        "a photo of the {} texture.", "a photo of the {} pattern.", "a photo of the {} thing.", "a photo of the {} object.",
    ],
    "eurosat": [
        "a centered satellite photo of {}.", "a centered satellite photo of a {}.", "a centered satellite photo of the {}.",
    ],
    "gtsrb": [
        'a zoomed in photo of a "{}" traffic sign.', 'a centered photo of a "{}" traffic sign.',
        'a close up photo of a "{}" traffic sign.',
    ],
    "mnist": ['a photo of the number: "{}".'],
    "resisc45": [
        "satellite imagery of {}.", "aerial imagery of {}.", "satellite photo of {}.", "aerial photo of {}.",
        "satellite view of {}.", "aerial view of {}.",
        "satellite imagery of a {}.", "aerial imagery of a {}.", "satellite photo of a {}.", "aerial photo of a {}.",
        "satellite view of a {}.", "aerial view of a {}.",
        "satellite imagery of the {}.", "aerial imagery of the {}.", "satellite photo of the {}.",
        "aerial photo of the {}.", "satellite view of the {}.", "aerial view of the {}.",
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
    return names
