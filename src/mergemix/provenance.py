"""Provenance of saved models: what each one derives from, and the checks before models are combined.

Every model mergemix saves records in its manifest (beside the safetensors file):

* ``pretrained_sha256``: the sha256 of the pre-trained model file it started from (``None`` for the
  pre-trained model itself),
* ``backend``: the backend name and params,
* ``data``: ``[{name, sha256}]``, the datasets it was trained on and the sha256 of their prepared
  data file (recorded by the prepare stage in ``splits.json``),
* ``hyperparameters``.

A stage that loads fine-tuned models calls :func:`check_model` on each one, so models fine-tuned
from another pre-trained model, with another backend configuration, on another dataset than their
folder says, or with other tensors than the pre-trained model's are refused instead of merged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from mergemix import io

REQUIRED_FIELDS = ("pretrained_sha256", "backend", "data", "hyperparameters")


class ProvenanceError(ValueError):
    """A saved model that does not derive from what the stage combines it with."""


def _norm(obj: Any) -> Any:
    """JSON round trip: tuples become lists and keys strings, as they are in a manifest."""
    return json.loads(json.dumps(obj, sort_keys=True))


def _rerun(path) -> str:
    return f"delete {Path(path).parent} and rerun snakemake (it reruns the fine-tune stage)"


def data_record(datasets) -> list[dict]:
    """``[{name, sha256}]`` of prepared datasets (objects with ``name`` and ``sha256``), by name."""
    return sorted(({"name": d.name, "sha256": d.sha256} for d in datasets), key=lambda r: r["name"])


def _backend_diff(recorded: Mapping, expected: Mapping, ignore: Sequence[str] = ()) -> tuple[str, Any, Any] | None:
    """The first differing field of two backend descriptions, as (field, recorded, expected).
    ``ignore``: params that change how models are merged or evaluated, not what was trained
    (``Backend.merge_only_params``, e.g. causal_lm's ``lora_merge`` and ``eval_batch_size``)."""
    recorded, expected = _norm(dict(recorded)), _norm(dict(expected))
    if recorded.get("name") != expected.get("name"):
        return "backend.name", recorded.get("name"), expected.get("name")
    rp, ep = recorded.get("params") or {}, expected.get("params") or {}
    for k in sorted((set(rp) | set(ep)) - set(ignore)):
        if rp.get(k, "<absent>") != ep.get(k, "<absent>"):
            return f"backend.params.{k}", rp.get(k, "<absent>"), ep.get(k, "<absent>")
    return None


def _describe(backend) -> dict:
    return backend.describe() if hasattr(backend, "describe") else dict(backend)


def pretrained_manifest(path, backend) -> dict:
    """The manifest of the pre-trained model ``path``, checked to come from ``backend``'s configuration."""
    mpath = io.manifest_path(path)
    if not mpath.exists():
        raise io.ModelFileError(f"the manifest {mpath} of the pre-trained model is missing; rerun the pretrain stage")
    manifest = io.read_json(mpath)
    if "backend" not in manifest or "sha256" not in manifest:
        raise ProvenanceError(
            f"{mpath}: no backend or sha256 field (written by an older mergemix); delete {Path(path).parent} and "
            "rerun snakemake (it reruns the pretrain or fetch_pretrained stage)"
        )
    diff = _backend_diff(manifest["backend"], _describe(backend), getattr(backend, "merge_only_params", ()))
    if diff:
        field, got, want = diff
        raise ProvenanceError(
            f"{mpath}: {field} is {got!r} in the pre-trained model but {want!r} in this job's backend; the pre-trained "
            f"model was made with another backend configuration: delete {Path(path).parent} and rerun snakemake"
        )
    return manifest


def check_model(
    manifest: Mapping,
    state: Mapping | None,
    *,
    path,
    expected_datasets: str | Sequence[str] | None,
    pretrained: Mapping,
    backend,
    reference: Mapping | None = None,
    pretrained_path=None,
) -> None:
    """Refuse a fine-tuned model that does not derive from ``pretrained`` with ``backend``.

    ``manifest``/``state``: the model loaded from ``path``; ``expected_datasets``: the dataset (or
    datasets of a mixture) its place in the pipeline says it was fine-tuned on; ``pretrained``: the
    pre-trained model's manifest (see :func:`pretrained_manifest`); ``reference``: the pre-trained
    model's merge params (name -> tensor), whose keys, shapes and dtypes the state must have.
    Raises :class:`ProvenanceError` naming the file, the field and both values.
    """
    mpath = io.manifest_path(path)
    missing = [f for f in REQUIRED_FIELDS if f not in manifest]
    if missing:
        raise ProvenanceError(
            f"{mpath}: no {', '.join(missing)} field(s): the model was written by an older mergemix and its origin "
            f"cannot be checked; delete the models folder ({Path(path).parent.parent}) and rerun snakemake "
            "(it reruns the fine-tune stage)"
        )
    if manifest.get("kind", "finetuned") not in ("finetuned",):
        raise ProvenanceError(
            f"{mpath}: kind is {manifest.get('kind')!r}, expected 'finetuned': this is not a fine-tuned model; {_rerun(path)}"
        )
    pre_sha = pretrained.get("sha256")
    if manifest["pretrained_sha256"] != pre_sha:
        where = f" {io.manifest_path(pretrained_path)}" if pretrained_path else ""
        raise ProvenanceError(
            f"{mpath}: pretrained_sha256 is {manifest['pretrained_sha256']} but the pre-trained model{where} has "
            f"sha256 {pre_sha}: it was fine-tuned from another pre-trained model; {_rerun(path)}"
        )
    diff = _backend_diff(manifest["backend"], _describe(backend), getattr(backend, "merge_only_params", ()))
    if diff:
        field, got, want = diff
        raise ProvenanceError(
            f"{mpath}: {field} is {got!r} in the model but {want!r} in this job's backend; {_rerun(path)}"
        )
    if expected_datasets is not None:
        want = sorted([expected_datasets] if isinstance(expected_datasets, str) else expected_datasets)
        got = sorted(r.get("name") for r in manifest["data"])
        if got != want:
            raise ProvenanceError(
                f"{mpath}: data names {got} but this job uses it as the model of {'+'.join(want)!r}: a model copied "
                f"into another dataset's folder? {_rerun(path)}"
            )
    if state is not None and reference is not None:
        check_state(state, reference, path=path)


def check_state(state: Mapping, reference: Mapping, *, path) -> None:
    """The same keys, shapes and dtypes as the pre-trained model's merge params ``reference``."""
    missing, extra = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
    if missing or extra:
        raise ProvenanceError(
            f"{path}: tensors differ from the pre-trained model's: missing {missing[:5]}, unexpected {extra[:5]}; "
            f"{_rerun(path)}"
        )
    for k, ref in reference.items():
        t = state[k]
        if tuple(t.shape) != tuple(ref.shape):
            raise ProvenanceError(
                f"{path}: tensor {k!r} has shape {list(t.shape)} but the pre-trained model's has {list(ref.shape)}; "
                f"{_rerun(path)}"
            )
        if t.dtype != ref.dtype:
            raise ProvenanceError(
                f"{path}: tensor {k!r} has dtype {str(t.dtype).replace('torch.', '')} but the pre-trained model's has "
                f"{str(ref.dtype).replace('torch.', '')}; {_rerun(path)}"
            )


def check_same_hyperparameters(manifests: Mapping[str, Mapping]) -> None:
    """Models combined in one job were fine-tuned with identical hyperparameters (``{path: manifest}``)."""
    items = list(manifests.items())
    if not items:
        return
    first_path, first = items[0]
    for p, m in items[1:]:
        a, b = _norm(first.get("hyperparameters")), _norm(m.get("hyperparameters"))
        if a != b:
            keys = sorted(k for k in set(a or {}) | set(b or {}) if (a or {}).get(k) != (b or {}).get(k))
            k = keys[0] if keys else "hyperparameters"
            raise ProvenanceError(
                f"{io.manifest_path(p)}: hyperparameters.{k} is {(b or {}).get(k)!r} but {(a or {}).get(k)!r} in "
                f"{io.manifest_path(first_path)}: models fine-tuned with different hyperparameters are not comparable; "
                "delete the folder of the one that differs from the study's finetune section and rerun snakemake "
                "(it reruns the fine-tune stage)"
            )
