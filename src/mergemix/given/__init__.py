"""Given fine-tuned models ("bring your own checkpoints"): the study's ``models:`` section.

A user who already holds one fine-tuned model per candidate dataset hands them in; each is loaded
from its own format, checked to derive from the study's pre-trained model, converted to the
backend's merge keys and saved as a mergemix model (safetensors + manifest) at the path the
fine-tune stage would have written. Everything downstream (merge-eval, search, analysis) is the
same as for mergemix's own fine-tunes.

Formats (``format:`` of a ``models`` entry; ``auto`` detects from the files), each one small
module with ``detect(path) -> str | None`` and ``load(path, fmt, backend, model, pretrained) -> Loaded``:

* ``mergemix``: a ``model.safetensors`` with its ``model.json`` manifest (:mod:`.native`);
* ``open_clip``: an open_clip state dict (``.safetensors``; ``.pt``/``.bin`` with
  ``torch.load(weights_only=True)``), and ``clip_hf``: a transformers ``CLIPVisionModel`` folder
  (``config.json`` + ``model.safetensors``), converted to the clip backend's keys (:mod:`.clip`);
* ``peft``: a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, IA3
  or LoRA), and ``causal_lm_hf``: full causal-LM weights in transformers format (:mod:`.lm`).

Only safetensors or ``weights_only`` loading; never code from a checkpoint (no
``trust_remote_code``, no pickled modules).

Checks before a given model is accepted (each refusal names the file and both values):

* the format's own base check (architecture in the checkpoint's config, the base model an adapter
  config names, its target modules, rank and type) against the study's backend;
* key set and shapes against the pre-trained model's merge params (:func:`mergemix.provenance.check_state`),
  after casting floating tensors to the pre-trained dtype (the original dtype is recorded);
* the relative distance ``||theta - theta_0|| / ||theta_0||`` in merge space is at most the entry's
  ``max_distance`` (default 0.5): fine-tuning moves weights by a few percent, a model from another
  pre-training run by about sqrt(2); over the tensors where theta_0 is not zero (LoRA's B factors are
  left out), skipped where all of theta_0 is zero (LoRA updates in merge space).

The manifest records what was selected from: ``given: {source, revision, format, files: {name:
sha256}, base, relative_distance, ...}``; ``hyperparameters`` is ``{"given": true}`` (unknown), so
given models are never combined with mergemix's own fine-tunes (the hyperparameter check refuses).
"""

from __future__ import annotations

import importlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger("mergemix")

# format name -> module (lazily imported: a study with clip models never imports transformers' LM code)
FORMATS: dict[str, str] = {
    "mergemix": "mergemix.given.native",
    "open_clip": "mergemix.given.clip",
    "clip_hf": "mergemix.given.clip",
    "peft": "mergemix.given.lm",
    "causal_lm_hf": "mergemix.given.lm",
}
# which formats each backend accepts (the backend's keys are what a format converts to)
BACKEND_FORMATS: dict[str, tuple[str, ...]] = {
    "smallcnn": ("mergemix",),
    "clip": ("mergemix", "open_clip", "clip_hf"),
    "causal_lm": ("mergemix", "peft", "causal_lm_hf"),
}
DEFAULT_MAX_DISTANCE = 0.5
GIVEN_HYPERPARAMETERS = {"given": True}


class GivenModelError(ValueError):
    """A given model that cannot be used by this study (wrong format, base, keys or shapes)."""


@dataclass
class Loaded:
    """A given checkpoint converted to the backend: ``state`` has the keys of the backend's
    ``merge_params`` (shapes checked by the caller); ``base``: the base model the checkpoint names
    (None if it names none); ``info``: facts recorded in the manifest's ``given`` field."""

    state: dict
    base: str | None = None
    info: dict = field(default_factory=dict)


def read_json_object(path) -> dict:
    """A checkpoint's JSON file (config.json, adapter_config.json) as a dict, or a clear refusal."""
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GivenModelError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise GivenModelError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def format_module(fmt: str):
    if fmt not in FORMATS:
        raise GivenModelError(f"unknown model format {fmt!r}; allowed: auto, {', '.join(FORMATS)}")
    return importlib.import_module(FORMATS[fmt])


def detect_format(path, backend_name: str) -> str:
    """The format of ``path`` among those the backend accepts (``format: auto``)."""
    path = Path(path)
    if not path.exists():
        raise GivenModelError(f"given model {path} does not exist; fix its path in the models section")
    allowed = BACKEND_FORMATS.get(backend_name, tuple(FORMATS))
    seen = []
    for fmt in allowed:
        mod = format_module(fmt)
        if mod.__name__ in seen:
            continue
        seen.append(mod.__name__)
        found = mod.detect(path)
        if found in allowed:
            return found
    raise GivenModelError(
        f"{path}: not a model format the {backend_name!r} backend reads ({', '.join(allowed)}); "
        "see docs for the files each format needs, or set format: explicitly"
    )


def source_files(path) -> dict[str, str]:
    """sha256 of every file a given model consists of (a file, or a folder's files), by relative name."""
    from mergemix import io

    path = Path(path)
    if path.is_file():
        return {path.name: io.sha256_file(path)}
    return {
        str(p.relative_to(path)): io.sha256_file(p)
        for p in sorted(path.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    }


def relative_distance(state: Mapping, reference: Mapping, backend=None) -> float | None:
    """``||theta - theta_0|| / ||theta_0||`` in merge space, over the tensors where theta_0 is not
    zero (a zero-initialised tensor, LoRA's B factor, has no scale to compare with); None where all
    of theta_0 is zero (LoRA updates in merge space)."""
    import torch

    if backend is not None:
        state, reference = backend.to_merge_space(dict(state)), backend.to_merge_space(dict(reference))
    num = den = 0.0
    for k, ref in reference.items():
        r = ref.detach().double().cpu()
        r2 = float(torch.sum(r**2))
        if r2 == 0:
            continue
        num += float(torch.sum((state[k].detach().double().cpu() - r) ** 2))
        den += r2
    return None if den == 0 else math.sqrt(num / den)


def cast_like(state: Mapping, reference: Mapping) -> tuple[dict, dict]:
    """Floating tensors cast to the reference's dtype; returns (state, {key: original dtype} of those cast)."""
    out, cast = {}, {}
    for k, t in state.items():
        ref = reference.get(k)
        if ref is not None and t.is_floating_point() and ref.is_floating_point() and t.dtype != ref.dtype:
            cast[k] = str(t.dtype).replace("torch.", "")
            t = t.to(ref.dtype)
        out[k] = t
    return out, cast


@dataclass
class Base:
    """The study's pre-trained model as the given models are checked against it: loaded once for
    all of them (``mergemix select`` imports several in one process)."""

    backend: Any
    model: Any
    pretrained: dict  # its checked manifest
    reference: dict  # its merge params (name -> tensor): the keys, shapes and dtypes a given model must have


def load_base(backend_spec: dict, pretrained, threads: int = 1) -> Base:
    from mergemix import provenance
    from mergemix.stages import get_backend

    backend = get_backend(backend_spec, threads=threads)
    model = backend.load_pretrained(pretrained)
    pre = provenance.pretrained_manifest(pretrained, backend)
    return Base(backend, model, pre, {k: v.detach() for k, v in backend.merge_params(model).items()})


def import_model(
    backend_spec: dict,
    pretrained,
    spec: Mapping[str, Any],
    dataset: str,
    out_path,
    path=None,
    threads: int = 1,
    base: Base | None = None,
) -> dict:
    """Load the given model of ``dataset`` (``spec``: its ``models`` entry; ``path``: where its files
    are, default ``spec['path']``; a hub entry's download folder), check it against the pre-trained
    model and save it as a mergemix fine-tuned model at ``out_path``. ``base``: the pre-trained
    model already loaded by :func:`load_base` (default: loaded here)."""
    from mergemix import io, provenance

    path = Path(path if path is not None else spec["path"])
    base = base or load_base(backend_spec, pretrained, threads)
    backend, model, pre, reference = base.backend, base.model, base.pretrained, base.reference
    fmt = spec.get("format", "auto")
    if fmt == "auto":
        fmt = detect_format(path, backend_spec["name"])
    allowed = BACKEND_FORMATS.get(backend_spec["name"], tuple(FORMATS))
    if fmt not in allowed:
        raise GivenModelError(
            f"models.{dataset}: format {fmt!r} is not read by the {backend_spec['name']!r} backend; "
            f"allowed: {', '.join(allowed)}"
        )
    if not path.exists():
        raise GivenModelError(f"models.{dataset}: {path} does not exist; fix its path")
    loaded = format_module(fmt).load(path, fmt, backend, model, pre)
    state, cast = cast_like(loaded.state, reference)
    try:
        provenance.check_state(state, reference, path=path)
    except provenance.ProvenanceError as e:
        raise GivenModelError(
            f"models.{dataset}: {str(e).split('; delete')[0]}: it is not a fine-tune of the "
            f"study's pre-trained model ({backend.describe()['name']})"
        ) from None
    dist = relative_distance(state, reference, backend)
    limit = float(spec.get("max_distance", DEFAULT_MAX_DISTANCE))
    if dist is not None and dist > limit:
        raise GivenModelError(
            f"models.{dataset}: {path} is {dist:.3f} away from the study's pre-trained model (relative L2 distance; "
            f"fine-tunes are within {limit}): it derives from another base than {pre.get('source', pretrained)!r}. "
            "Give a model fine-tuned from the study's pre-trained model, or raise models."
            f"{dataset}.max_distance if you are sure"
        )
    manifest = {
        "kind": "finetuned",
        "backend": backend.describe(),
        "pretrained_sha256": pre["sha256"],
        "data": [{"name": dataset, "sha256": None}],
        "hyperparameters": dict(GIVEN_HYPERPARAMETERS),
        "given": {
            "source": spec.get("hub") or str(Path(spec["path"]).resolve() if spec.get("path") else path),
            "revision": spec.get("revision"),
            "format": fmt,
            "files": source_files(path),
            "base": loaded.base,
            "relative_distance": dist,
            "cast_from": sorted(set(cast.values())),
            **loaded.info,
        },
    }
    info = io.save_model(out_path, state, manifest)
    log.info(
        "given model of %s: %s (%s, distance %s) -> %s",
        dataset,
        manifest["given"]["source"],
        fmt,
        "n/a" if dist is None else f"{dist:.4f}",
        out_path,
    )
    return info
