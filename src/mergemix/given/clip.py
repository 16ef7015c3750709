"""Given fine-tunes of the ``clip`` backend's image encoder: ``format: open_clip`` and ``format: clip_hf``.

* ``open_clip``: an open_clip checkpoint, a ``.safetensors`` file or a ``.pt``/``.pth``/``.bin`` read
  with ``torch.load(weights_only=True)`` (a file holding pickled objects is refused, never unpickled):
  a full CLIP state dict (``visual.*``, ``transformer.*``, ...), one nested under ``state_dict`` (open_clip's
  training checkpoints) or with DDP's ``module.`` prefix; a folder holding one such file (e.g. a hub
  download with ``open_clip_model.safetensors``) is read too. The ``visual.*`` tensors are kept.
* ``clip_hf``: a transformers ``CLIPVisionModel``, ``CLIPVisionModelWithProjection`` or ``CLIPModel``
  folder written by ``save_pretrained`` (``config.json`` + ``model.safetensors``, possibly sharded;
  ``pytorch_model.bin`` only if ``torch.load(weights_only=True)`` reads it). The safetensors are read
  directly (transformers is not needed, no code from the checkpoint is run) and the vision tower's
  keys converted to open_clip's (the inverse of transformers' ``convert_clip_original_pytorch_to_hf.py``):
  q, k and v projections concatenated into ``in_proj_weight``/``in_proj_bias``, ``visual_projection.weight``
  transposed into ``visual.proj``. A ``CLIPVisionModel`` has no projection: ``visual.proj`` is the
  pre-trained model's (fine-tuning the vision model does not change it), recorded as
  ``proj_from_pretrained``. The text tower of a ``CLIPModel`` is ignored.

Base checks: the checkpoint's architecture (width, layers, patch and image size, MLP width and
projection of an open_clip state; the ``config.json`` fields of a transformers folder, activation and
layer-norm epsilon included) against the study's open_clip architecture, each mismatch named with both
values; the core then checks keys, shapes and the distance to the pre-trained weights.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Mapping

from . import GivenModelError, Loaded, read_json_object

log = logging.getLogger("mergemix")

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
HF_MODEL_TYPES = ("clip_vision_model", "clip")
HF_ARCHITECTURES = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel")
# transformers' CLIPVisionConfig defaults (a config.json written by save_pretrained may omit them)
HF_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
# open_clip's CLIPVisionCfg defaults (a model config lists only what differs)
OC_VISION_DEFAULTS = {
    "layers": 12,
    "width": 768,
    "head_width": 64,
    "mlp_ratio": 4.0,
    "patch_size": 16,
    "image_size": 224,
}
# open_clip vision features transformers' CLIP vision tower does not have: (field, value of the plain ViT)
OC_PLAIN_VIT = (
    ("timm_model_name", None),
    ("attentional_pool", False),
    ("no_ln_pre", False),
    ("pos_embed_type", "learnable"),
    ("final_ln_after_pool", False),
    ("pool_type", "tok"),
    ("ls_init_value", None),
    ("qk_norm", False),
    ("scaled_cosine_attn", False),
    ("scale_heads", False),
    ("scale_attn_inner", False),
    ("scale_attn", False),
    ("scale_fc", False),
)


# --- reading checkpoints ------------------------------------------------------------------------------
def _torch_load(file: Path):
    """``torch.load(weights_only=True)`` on the CPU (memory-mapped where the file allows it)."""
    import torch

    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError and friends: anything weights_only refuses
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GivenModelError(
            f"{file}: cannot be read with torch.load(weights_only=True) ({first[:300]}); mergemix never unpickles "
            "code or objects from a checkpoint: load it yourself and save its state_dict() as safetensors"
        ) from None


def _unwrap(obj, file: Path) -> dict:
    """A state dict from a torch.load result: nested under ``state_dict``, ``module.`` prefix removed."""
    import torch

    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise GivenModelError(f"{file}: holds a {type(obj).__name__}, not a state dict (name -> tensor)")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def _strip(keys) -> dict:
    """{key without DDP's ``module.`` prefix: key in the file} (the prefix removed only if every key has it)."""
    keys = list(keys)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module.") :]: k for k in keys}
    return {k: k for k in keys}


def _safetensors_keys(file: Path) -> list:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return list(f.keys())


def _read_safetensors(file: Path, keys) -> dict:
    """Only ``keys`` (names in the file) of a safetensors file."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return {k: f.get_tensor(k) for k in keys}


def _checkpoint_keys(file: Path) -> list:
    """Key names of a checkpoint file after unwrapping (``module.`` stripped); safetensors: header only."""
    if file.suffix == ".safetensors":
        return list(_strip(_safetensors_keys(file)))
    return list(_unwrap(_torch_load(file), file))


def _has_visual(keys) -> bool:
    return any(k.startswith("visual.") for k in keys)


def _open_clip_files(folder: Path) -> list:
    """Checkpoint files in ``folder`` (not below) holding ``visual.*`` keys; safetensors preferred where
    both are there (a hub folder often holds the same weights as .safetensors and .bin)."""
    found = []
    for f in sorted(folder.iterdir()):
        if f.is_file() and not f.name.startswith(".") and f.suffix in WEIGHT_SUFFIXES:
            try:
                keys = _checkpoint_keys(f)
            except Exception:  # noqa: BLE001 - unreadable here; not a candidate
                continue
            if _has_visual(keys):
                found.append(f)
    safe = [f for f in found if f.suffix == ".safetensors"]
    return safe or found


def _read_json(file: Path) -> dict:
    return read_json_object(file)


def _is_clip_config(cfg: Mapping) -> bool:
    archs = cfg.get("architectures") or []
    return cfg.get("model_type") in HF_MODEL_TYPES or any(a in HF_ARCHITECTURES for a in archs)


# --- format detection -----------------------------------------------------------------------------------
def detect(path) -> str | None:
    """``clip_hf`` for a folder whose config.json is a transformers CLIP model; ``open_clip`` for a
    checkpoint file with ``visual.*`` keys or a folder holding exactly one; None otherwise."""
    path = Path(path)
    try:
        if path.is_dir():
            cfg = path / "config.json"
            if cfg.is_file() and _is_clip_config(_read_json(cfg)):
                return "clip_hf"
            return "open_clip" if len(_open_clip_files(path)) == 1 else None
        if path.is_file() and path.suffix in WEIGHT_SUFFIXES and _has_visual(_checkpoint_keys(path)):
            return "open_clip"
    except Exception:  # noqa: BLE001 - detection only says what a path is; load reports why not
        return None
    return None


# --- the study's architecture -----------------------------------------------------------------------------
def _side(v):
    if isinstance(v, (list, tuple)):
        return int(v[0]) if len(set(v)) == 1 else tuple(int(x) for x in v)
    return int(v)


def _study_arch(backend) -> tuple[str, dict]:
    """The backend's open_clip architecture name and its vision tower in transformers' terms."""
    from mergemix.backends.clip import _open_clip

    open_clip = _open_clip()
    name = backend.params["model"]
    register = getattr(backend, "_register_config", None)
    if register is not None:  # load_pretrained has registered it already; harmless again
        register(open_clip)
    oc = open_clip.get_model_config(name)
    if oc is None:
        raise GivenModelError(f"open_clip has no architecture {name!r} (the study's backend model)")
    vc = {**OC_VISION_DEFAULTS, **(oc.get("vision_cfg") or {})}
    if isinstance(vc["layers"], (list, tuple)):
        raise GivenModelError(
            f"the study's architecture {name} is a ResNet; format clip_hf holds a ViT: "
            "give its fine-tunes in format open_clip"
        )
    for key, plain in OC_PLAIN_VIT:
        if vc.get(key, plain) != plain:
            raise GivenModelError(
                f"the study's architecture {name} has vision_cfg.{key} {vc[key]!r}, which transformers' CLIP vision "
                "tower does not have: give its fine-tunes in format open_clip"
            )
    act_kwargs = vc.get("act_kwargs") or {}
    if oc.get("quick_gelu"):
        act = "quick_gelu"
    elif not act_kwargs:
        act = "gelu"
    elif act_kwargs == {"approximate": "tanh"}:
        act = "gelu_pytorch_tanh"
    else:
        raise GivenModelError(
            f"the study's architecture {name} has vision_cfg.act_kwargs {act_kwargs}, which "
            "transformers' CLIP vision tower does not have: give its fine-tunes in format open_clip"
        )
    width = int(vc["width"])
    arch = {
        "hidden_size": width,
        "num_hidden_layers": int(vc["layers"]),
        "num_attention_heads": width // int(vc["head_width"]),
        "patch_size": _side(vc["patch_size"]),
        "image_size": _side(vc["image_size"]),
        "intermediate_size": int(width * float(vc["mlp_ratio"])),
        "hidden_act": act,
        "layer_norm_eps": float((vc.get("norm_kwargs") or {}).get("eps", 1e-5)),
        "projection_dim": int(oc["embed_dim"]),
    }
    return name, arch


def _state_arch(state: Mapping) -> dict:
    """What an open_clip ``visual.*`` state says about its architecture (None where it does not say)."""
    conv = state.get("visual.conv1.weight")
    pos = state.get("visual.positional_embedding")
    fc = state.get("visual.transformer.resblocks.0.mlp.c_fc.weight")
    proj = state.get("visual.proj")
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"visual\.transformer\.resblocks\.(\d+)\.", k))}
    arch = {
        "layers": len(blocks) or None,
        "width": int(conv.shape[0]) if conv is not None and conv.dim() == 4 else None,
        "patch_size": int(conv.shape[-1]) if conv is not None and conv.dim() == 4 else None,
        "image_size": None,
        "mlp_width": int(fc.shape[0]) if fc is not None and fc.dim() == 2 else None,
        "embed_dim": int(proj.shape[1]) if proj is not None and proj.dim() == 2 else None,
    }
    if pos is not None and pos.dim() == 2 and arch["patch_size"]:
        grid = math.isqrt(int(pos.shape[0]) - 1)
        arch["image_size"] = grid * arch["patch_size"] if grid * grid == int(pos.shape[0]) - 1 else None
    return arch


# --- open_clip ----------------------------------------------------------------------------------------------
def _open_clip_file(path: Path) -> Path:
    if path.is_file():
        return path
    found = _open_clip_files(path)
    if len(found) != 1:
        what = (
            "no checkpoint file with visual.* keys"
            if not found
            else f"{len(found)} checkpoint files with visual.* keys ({', '.join(f.name for f in found)})"
        )
        raise GivenModelError(f"{path}: {what}; give the path of the one file (format open_clip)")
    return found[0]


def _load_open_clip(path: Path, backend, reference: Mapping) -> Loaded:
    file = _open_clip_file(path)
    if file.suffix == ".safetensors":
        names = _strip(_safetensors_keys(file))
        tensors = None
    elif file.suffix in WEIGHT_SUFFIXES:
        tensors = _unwrap(_torch_load(file), file)
        names = {k: k for k in tensors}
    else:
        raise GivenModelError(f"{file}: not an open_clip checkpoint (.safetensors, .pt, .pth or .bin)")
    keys = [k for k in names if k.startswith("visual.")]
    prefix = ""
    if not keys and names and {f"visual.{k}" for k in names} == set(reference):
        keys, prefix = list(names), "visual."  # the image encoder's own state dict (model.visual.state_dict())
    if not keys:
        sample = sorted({k.split(".")[0] for k in names})[:8]
        raise GivenModelError(
            f"{file}: no visual.* tensors (the image encoder of an open_clip model); its keys start with {sample}"
        )
    if tensors is None:
        read = _read_safetensors(file, [names[k] for k in keys])
        state = {prefix + k: read[names[k]] for k in keys}
    else:
        state = {prefix + k: tensors[k] for k in keys}
    name = backend.params["model"]
    got, want = _state_arch(state), _state_arch(reference)
    for k, w in want.items():
        g = got[k]
        if g is not None and w is not None and g != w:
            raise GivenModelError(f"{file}: image encoder {k} {g} but the study's {name} has {w}: another architecture")
    return Loaded(
        state,
        base=None,
        info={"checkpoint": file.name, "architecture": {k: v for k, v in got.items() if v is not None}},
    )


# --- transformers CLIP ----------------------------------------------------------------------------------------
def _hf_weights(folder: Path) -> list:
    """The weight files of a transformers folder: safetensors (single or sharded) preferred."""
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            weight_map = _read_json(folder / index).get("weight_map") or {}
            files = [folder / f for f in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing or not files:
                raise GivenModelError(f"{folder / index}: shard files {missing or 'none'} are missing")
            return files
    raise GivenModelError(f"{folder}: no model.safetensors (or pytorch_model.bin) next to config.json")


def _read_hf(files) -> dict:
    """Every tensor of a transformers checkpoint except the text tower's (never needed)."""
    out = {}
    for f in files:
        if f.suffix == ".safetensors":
            keep = [k for k in _safetensors_keys(f) if not k.startswith(("text_model.", "text_projection."))]
            out.update(_read_safetensors(f, keep))
        else:
            out.update(
                {
                    k: v
                    for k, v in _unwrap(_torch_load(f), f).items()
                    if not k.startswith(("text_model.", "text_projection."))
                }
            )
    return out


_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_TOP = {
    "embeddings.class_embedding": "visual.class_embedding",
    "embeddings.patch_embedding.weight": "visual.conv1.weight",
    "embeddings.position_embedding.weight": "visual.positional_embedding",
    "pre_layrnorm.weight": "visual.ln_pre.weight",
    "pre_layrnorm.bias": "visual.ln_pre.bias",
    "post_layernorm.weight": "visual.ln_post.weight",
    "post_layernorm.bias": "visual.ln_post.bias",
}
_IGNORED = ("embeddings.position_ids",)  # a buffer (older transformers saved it)


def hf_to_open_clip(vision: Mapping, where) -> dict:
    """transformers' CLIP vision-tower tensors (keys relative to ``vision_model``) as open_clip ``visual.*``."""
    import torch

    out, qkv, unknown = {}, {}, []
    for k, v in vision.items():
        if k in _TOP:
            out[_TOP[k]] = v
            continue
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", k)
        if m:
            i, mod, kind = int(m.group(1)), m.group(2), m.group(3)
            if mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((i, kind), {})[mod[-6]] = v
                continue
            if mod in _LAYER:
                out[f"visual.transformer.resblocks.{i}.{_LAYER[mod]}.{kind}"] = v
                continue
        if k not in _IGNORED:
            unknown.append(k)
    if unknown:
        raise GivenModelError(
            f"{where}: vision-tower tensors {sorted(unknown)[:5]} have no counterpart in open_clip's "
            "CLIP ViT: another architecture"
        )
    for (i, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            have = ", ".join(f"{p}_proj.{kind}" for p in sorted(parts))
            raise GivenModelError(f"{where}: encoder layer {i} has self_attn {have} but needs all of q, k, v")
        name = "in_proj_weight" if kind == "weight" else "in_proj_bias"
        out[f"visual.transformer.resblocks.{i}.attn.{name}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out


def _hf_config(cfg: Mapping, file: Path) -> tuple[dict, str, int]:
    """(vision config with defaults, its field prefix in messages, projection_dim)."""
    if cfg.get("model_type") == "clip" or "vision_config" in cfg:
        vc = {**HF_VISION_DEFAULTS, **(cfg.get("vision_config") or {})}
        return vc, "vision_config.", int(cfg.get("projection_dim", 512))
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") == "clip_vision_model" or any(a in HF_ARCHITECTURES for a in archs):
        vc = {**HF_VISION_DEFAULTS, **cfg}
        return vc, "", int(vc["projection_dim"])
    raise GivenModelError(
        f"{file}: model_type {cfg.get('model_type')!r} is not a transformers CLIP model ({' or '.join(HF_MODEL_TYPES)})"
    )


def _check_preprocess(folder: Path, pretrained: Mapping, info: dict) -> None:
    """Warn where the checkpoint's image processor normalises otherwise than the study's model."""
    f = folder / "preprocessor_config.json"
    pp = (pretrained or {}).get("preprocess") or {}
    if not f.is_file() or not pp:
        return
    try:
        proc = _read_json(f)
    except GivenModelError:
        return
    for ours, theirs in (("mean", "image_mean"), ("std", "image_std")):
        a, b = pp.get(ours), proc.get(theirs)
        if a is not None and b is not None and (len(a) != len(b) or any(abs(x - y) > 1e-3 for x, y in zip(a, b))):
            log.warning(
                "%s: %s %s but the study's model normalises with %s %s; the study evaluates with its own",
                f,
                theirs,
                b,
                ours,
                a,
            )
            info.setdefault("preprocessor_differs", {})[theirs] = b


def _load_clip_hf(path: Path, backend, reference: Mapping, pretrained: Mapping) -> Loaded:
    if not path.is_dir() or not (path / "config.json").is_file():
        raise GivenModelError(
            f"{path}: format clip_hf is a folder with config.json and model.safetensors (transformers' save_pretrained)"
        )
    cfg_file = path / "config.json"
    cfg = _read_json(cfg_file)
    vc, where, projection_dim = _hf_config(cfg, cfg_file)
    files = _hf_weights(path)
    raw = _read_hf(files)
    if any(k.startswith("vision_model.") for k in raw):
        vision = {k[len("vision_model.") :]: v for k, v in raw.items() if k.startswith("vision_model.")}
    elif "embeddings.patch_embedding.weight" in raw:  # a CLIPVisionModel saved by transformers >= 5
        vision = {k: v for k, v in raw.items() if k != "visual_projection.weight"}
    else:
        raise GivenModelError(
            f"{path}: no CLIP vision-tower tensors (vision_model.* or embeddings.*) in "
            f"{', '.join(f.name for f in files)}"
        )
    projection = raw.get("visual_projection.weight")

    name, want = _study_arch(backend)
    checks = [k for k in want if k != "projection_dim"] + (["projection_dim"] if projection is not None else [])
    for k in checks:
        got, exp = vc.get(k), want[k]
        if k == "layer_norm_eps":
            same = got is not None and math.isclose(float(got), exp, rel_tol=1e-6)
        elif k == "projection_dim":
            got = projection_dim
            same = got == exp
        elif k in ("patch_size", "image_size"):
            same = got is not None and _side(got) == exp
        else:
            same = got == exp
        if not same:
            field = k if k == "projection_dim" else where + k  # a CLIPModel's projection_dim is top-level
            raise GivenModelError(f"{cfg_file}: {field} {got} but the study's {name} has {exp}")

    state = hf_to_open_clip(vision, path)
    info: dict = {
        "architecture": {k: vc.get(k) for k in want if k != "projection_dim"},
        "hf_architectures": list(cfg.get("architectures") or []),
        "checkpoint": [f.name for f in files],
    }
    if projection is not None:
        state["visual.proj"] = projection.t().contiguous()
        info["architecture"]["projection_dim"] = projection_dim
    elif "visual.proj" in reference:
        state["visual.proj"] = reference["visual.proj"].detach().cpu().clone()
        info["proj_from_pretrained"] = True
    _check_preprocess(path, pretrained, info)
    return Loaded({k: v.contiguous() for k, v in state.items()}, base=cfg.get("_name_or_path") or None, info=info)


# --- entry point ---------------------------------------------------------------------------------------------
def load(path, fmt, backend, model, pretrained) -> Loaded:
    path = Path(path)
    reference = {k: v.detach() for k, v in backend.merge_params(model).items()}
    if fmt == "open_clip":
        return _load_open_clip(path, backend, reference)
    if fmt == "clip_hf":
        return _load_clip_hf(path, backend, reference, pretrained)
    raise GivenModelError(f"format {fmt!r} is not read by mergemix.given.clip (open_clip, clip_hf)")
