"""``format: mergemix``: a model saved by mergemix (``model.safetensors`` + ``model.json`` manifest),
e.g. fine-tuned by another study from the same pre-trained model.

Checked: the file's sha256 against its manifest, that it is a fine-tuned model, that its backend
configuration is the study's and that it was fine-tuned from the study's pre-trained model (the
pre-trained file's sha256): a model from another pre-trained file is refused with both hashes.
"""

from __future__ import annotations

from pathlib import Path

from mergemix import io, provenance

from . import GivenModelError, Loaded


def _file(path: Path) -> Path:
    return path / "model.safetensors" if path.is_dir() else path


def detect(path) -> str | None:
    f = _file(Path(path))
    return "mergemix" if f.suffix == ".safetensors" and f.is_file() and io.manifest_path(f).is_file() else None


def load(path, fmt, backend, model, pretrained) -> Loaded:
    f = _file(Path(path))
    try:
        state, manifest = io.load_model(f)
    except io.ModelFileError as e:
        raise GivenModelError(str(e)) from None
    if manifest.get("kind") != "finetuned":
        raise GivenModelError(f"{io.manifest_path(f)}: kind is {manifest.get('kind')!r}, expected 'finetuned'")
    diff = provenance._backend_diff(
        manifest.get("backend") or {}, backend.describe(), getattr(backend, "merge_only_params", ())
    )
    if diff:
        key, got, want = diff
        raise GivenModelError(f"{io.manifest_path(f)}: {key} is {got!r} in the given model but {want!r} in the study")
    if manifest.get("pretrained_sha256") != pretrained.get("sha256"):
        raise GivenModelError(
            f"{io.manifest_path(f)}: fine-tuned from the pre-trained model with sha256 {manifest.get('pretrained_sha256')} "
            f"but the study's pre-trained model has sha256 {pretrained.get('sha256')}: it derives from another base"
        )
    return Loaded(
        state,
        base=manifest.get("pretrained_sha256"),
        info={"data": manifest.get("data"), "hyperparameters": manifest.get("hyperparameters")},
    )
