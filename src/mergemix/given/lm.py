"""Given models of the ``causal_lm`` backend: ``peft`` adapters and ``causal_lm_hf`` full weights.

* ``peft``: a folder written by peft's ``save_pretrained``: ``adapter_config.json`` and
  ``adapter_model.safetensors`` (``adapter_model.bin`` only if ``torch.load(weights_only=True)``
  reads it), IA3 or LoRA. The tensors are read directly (peft is not asked to load the folder, so
  no code or pickled object from it runs) and peft's saved names (``...k_proj.ia3_l``, without the
  adapter name) are mapped to the backend's (``...k_proj.ia3_l.default``). The config is checked
  against the study's live adapter (``peft_type``, ``base_model_name_or_path``, ``target_modules``,
  IA3's ``feedforward_modules``, LoRA's ``r``, ``lora_alpha`` and every option that changes what
  the update means: ``fan_in_fan_out``, ``use_rslora``, ``use_dora``, bias, rank/alpha patterns,
  extra trained modules...).

  LoRA: the given A factors were initialised with the user's seed, not the study's
  (``init_seed``). With ``lora_merge: products`` (the default) that does not matter: models are
  merged as their dense updates ``scaling * B @ A``. With ``lora_merge: factors`` A and B are
  merged separately, which only approximates a merge of the updates when every model's A stays
  near the same init: a given adapter whose A factors are not those of the study's pre-trained
  adapter (relative distance above 0.5) is refused.
* ``causal_lm_hf``: a transformers ``save_pretrained`` folder of a ``*ForCausalLM`` (``config.json``
  and ``model.safetensors``, or shards with ``model.safetensors.index.json``), for a study with
  ``adapter: none`` (full weights). The config's architecture fields (``model_type``,
  ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``vocab_size``...) must be the
  study's base model's; ``_name_or_path`` (if the config has one) is recorded as the base. Never
  ``trust_remote_code``: only the JSON config and the safetensors are read.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

from . import DEFAULT_MAX_DISTANCE, GivenModelError, Loaded, read_json_object

log = logging.getLogger("mergemix")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
HF_SINGLE, HF_INDEX = "model.safetensors", "model.safetensors.index.json"
# peft's adapter layer names; the backend's keys have the adapter name ("default") after them
ADAPTER_TENSORS = ("ia3_l", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
_ADAPTER_NAME = re.compile(r"\.(" + "|".join(ADAPTER_TENSORS) + r")\.default(?=\.|$)")
# adapter config fields that change which tensors exist or what an update means (besides the
# checked-by-name ones): the given value must be the study's (missing ones: peft's default)
LORA_MEANING = (
    "fan_in_fan_out",
    "use_rslora",
    "use_dora",
    "bias",
    "lora_bias",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "layer_replication",
    "exclude_modules",
    "target_parameters",
    "trainable_token_indices",
    "use_qalora",
)
IA3_MEANING = ("fan_in_fan_out", "modules_to_save", "layers_to_transform", "layers_pattern", "exclude_modules")
# config.json fields of the base architecture compared with the study's base model's config
ARCH_FIELDS = (
    "model_type",
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
)


# ---------------------------------------------------------------------------------------------
# detection
# ---------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    return read_json_object(path)


def _is_causal_lm_config(path: Path) -> bool:
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    archs = cfg.get("architectures") if isinstance(cfg, dict) else None
    return isinstance(archs, list) and any(isinstance(a, str) and a.endswith("ForCausalLM") for a in archs)


def detect(path) -> str | None:
    """``peft`` for a folder with ``adapter_config.json``; ``causal_lm_hf`` for a folder whose
    ``config.json`` names a ``*ForCausalLM`` architecture and that has safetensors weights."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / ADAPTER_CONFIG).is_file():
        return "peft"
    if _is_causal_lm_config(path) and ((path / HF_SINGLE).is_file() or (path / HF_INDEX).is_file()):
        return "causal_lm_hf"
    return None


def load(path, fmt, backend, model, pretrained) -> Loaded:
    if fmt == "peft":
        return load_peft(Path(path), backend, model, pretrained)
    if fmt == "causal_lm_hf":
        return load_causal_lm_hf(Path(path), backend, model, pretrained)
    raise GivenModelError(f"{path}: format {fmt!r} is not read by mergemix.given.lm (peft, causal_lm_hf)")


# ---------------------------------------------------------------------------------------------
# peft adapters
# ---------------------------------------------------------------------------------------------
def _read_adapter_tensors(path: Path) -> tuple[dict, str]:
    st, binf = path / ADAPTER_FILES[0], path / ADAPTER_FILES[1]
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(st), device="cpu"), st.name
        except (SafetensorError, OSError, ValueError) as e:
            raise GivenModelError(f"{st}: not a readable safetensors file ({e})") from None
    if binf.is_file():
        import pickle

        import torch

        try:
            state = torch.load(str(binf), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
            raise GivenModelError(
                f"{binf}: refused: it cannot be read with torch.load(weights_only=True) (it holds pickled objects "
                f"beyond tensors: {str(e).splitlines()[0] if str(e) else type(e).__name__}); save the adapter with "
                "peft's save_pretrained(..., safe_serialization=True) to get adapter_model.safetensors"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise GivenModelError(f"{binf}: not a state dict of tensors")
        return state, binf.name
    raise GivenModelError(f"{path}: no {ADAPTER_FILES[0]} (or {ADAPTER_FILES[1]}) beside {ADAPTER_CONFIG}")


def _norm(v):
    """A config value for comparison: sets/tuples as sorted lists, empty containers/False as None."""
    if isinstance(v, (set, frozenset, tuple, list)):
        v = sorted(v, key=str)
    if isinstance(v, dict):
        v = {k: _norm(x) for k, x in sorted(v.items())}
    if v is None or v is False or (isinstance(v, (list, dict, str)) and len(v) == 0):
        return None
    return v


def _adapted_modules(keys) -> list[str]:
    """The full names (in the base model, e.g. ``model.layers.0.mlp.down_proj``) of the modules
    with adapter tensors in peft's saved keys."""
    out = set()
    for k in keys:
        parts = k.split(".")
        i = next((i for i, p in enumerate(parts) if p in ADAPTER_TENSORS), None)
        if i:
            name = ".".join(parts[:i])
            out.add(name[len("base_model.model.") :] if name.startswith("base_model.model.") else name)
    return sorted(out)


def _modules(value, saved_keys, every: bool) -> list[str]:
    """``target_modules``/``feedforward_modules`` as a sorted list of module names: a list as is; a
    regex string (peft: full match on the module's full name) or ``all-linear`` resolved against the
    modules adapted in the file (``every``: the pattern chose all of them, as target_modules did)."""
    if value is None:
        return []
    if isinstance(value, str):
        mods = _adapted_modules(saved_keys)
        if not every and value != "all-linear":
            mods = [m for m in mods if re.fullmatch(value, m)]
        return sorted({m.rsplit(".", 1)[-1] for m in mods})
    return sorted(set(value))


def _study_base_names(backend, pretrained: dict) -> list[str]:
    names = [str(backend.params.get("model"))]
    origin = (pretrained or {}).get("origin") or {}
    names += [str(origin[k]) for k in ("hub", "local") if origin.get(k)]
    return list(dict.fromkeys(names))


def _same_base(given: str, names: list[str]) -> bool:
    g = given.rstrip("/")
    for n in names:
        if g == n.rstrip("/"):
            return True
        if (
            Path(g).expanduser().is_dir()
            and Path(n).expanduser().is_dir()
            and Path(g).expanduser().resolve() == Path(n).expanduser().resolve()
        ):
            return True
    return False


def _refuse(cfg_path: Path, field: str, given, study, why: str = "") -> GivenModelError:
    return GivenModelError(
        f"{cfg_path}: {field} is {given!r} in the given adapter but {study!r} in the study's backend"
        + (f"; {why}" if why else "")
    )


def load_peft(path: Path, backend, model, pretrained) -> Loaded:
    import torch

    cfg_path = path / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise GivenModelError(
            f"{path}: no {ADAPTER_CONFIG}; a peft adapter folder is written by peft's save_pretrained"
        )
    cfg = _read_json(cfg_path)
    adapter = backend.params.get("adapter")
    ptype = str(cfg.get("peft_type", "")).upper()
    if adapter == "none":
        raise _refuse(
            cfg_path,
            "peft_type",
            ptype,
            "adapter: none",
            "the study merges full weights (adapter: none); give full causal_lm_hf models, or set "
            f"backend.params.adapter: {ptype.lower()!r} to merge adapters",
        )
    if ptype != str(adapter).upper():
        raise _refuse(
            cfg_path,
            "peft_type",
            ptype,
            str(adapter).upper(),
            f"the study's backend merges {adapter} adapters (backend.params.adapter); give {adapter} "
            "adapters or change backend.params.adapter",
        )
    live_cfg = model.peft_config["default"]  # the study's adapter config, as peft resolved it

    state, fname = _read_adapter_tensors(path)
    saved_keys = list(state)

    base = cfg.get("base_model_name_or_path")
    names = _study_base_names(backend, pretrained)
    if base:
        if not _same_base(str(base), names):
            raise GivenModelError(
                f"{cfg_path}: base_model_name_or_path is {base!r} but the study's base model is {names[0]!r}"
                + (f" (also known as {', '.join(repr(n) for n in names[1:])})" if len(names) > 1 else "")
                + ": the adapter was trained on another base model. Names are compared as given (a hub id, or a "
                "local folder compared by its resolved path): if it is the same model under another name (a local "
                f"copy of the hub model, say), set base_model_name_or_path in {cfg_path.name} to {names[0]!r}"
            )
    else:
        log.warning("%s names no base_model_name_or_path; its base is checked by its tensors only", cfg_path)

    raw_t = cfg.get("target_modules")
    given_t = _modules(raw_t, saved_keys, every=True)
    study_t = sorted(set(backend.params["target_modules"]))
    if given_t != study_t:
        shown = given_t if isinstance(raw_t, (list, tuple)) else f"{raw_t} (adapting {given_t})"
        raise _refuse(
            cfg_path,
            "target_modules",
            shown,
            study_t,
            "the adapter adapts other modules; set backend.params.target_modules to the adapter's",
        )
    info = {"peft_type": ptype, "target_modules": given_t, "peft_version": cfg.get("peft_version")}

    if ptype == "IA3":
        raw_ff = cfg.get("feedforward_modules")
        given_ff = _modules(raw_ff, saved_keys, every=False)
        study_ff = sorted(set(live_cfg.feedforward_modules or []))
        if given_ff != study_ff:
            shown = given_ff if not isinstance(raw_ff, str) else f"{raw_ff} (matching {given_ff})"
            raise _refuse(
                cfg_path,
                "feedforward_modules",
                shown,
                study_ff,
                "IA3 scales the input of feed-forward modules and the output of the others; set "
                "backend.params.feedforward_modules to the adapter's",
            )
        info["feedforward_modules"] = given_ff
        meaning = IA3_MEANING
    else:
        for field in ("r", "lora_alpha"):
            g, s = cfg.get(field), getattr(live_cfg, field)
            if g != s:
                hint = (
                    "the factors' shapes differ"
                    if field == "r"
                    else f"the update is scaling * B @ A with scaling = lora_alpha / r ({g}/{cfg.get('r')} given, "
                    f"{s}/{live_cfg.r} in the study)"
                )
                raise _refuse(
                    cfg_path,
                    field,
                    g,
                    s,
                    f"{hint}; set backend.params.lora_{'r' if field == 'r' else 'alpha'}"
                    " to the adapter's (all given adapters must share it)",
                )
        info.update(r=cfg.get("r"), lora_alpha=cfg.get("lora_alpha"))
        meaning = LORA_MEANING
    for field in meaning:
        if field not in cfg:
            continue  # an older peft without the option: its default, which is the study's
        g, s = _norm(cfg.get(field)), _norm(getattr(live_cfg, field, None))
        if g != s:
            raise _refuse(
                cfg_path,
                field,
                cfg.get(field),
                getattr(live_cfg, field, None),
                "this option changes which tensors the adapter has or what its update means; the study's "
                "backend does not support it",
            )

    # peft's saved names -> the backend's merge keys
    reference = {k: v.detach() for k, v in backend.merge_params(model).items()}
    to_ours = {_ADAPTER_NAME.sub(r".\1", k): k for k in reference}
    missing = sorted(s for s in to_ours if s not in state)
    extra = sorted(k for k in saved_keys if k not in to_ours)
    if missing or extra:
        raise GivenModelError(
            f"{path / fname}: tensors differ from the study's {ptype} adapter: missing {missing[:5]}"
            f"{' (%d in all)' % len(missing) if len(missing) > 5 else ''}, unexpected {extra[:5]}"
            f"{' (%d in all)' % len(extra) if len(extra) > 5 else ''}: not an adapter of the study's base model "
            "and configuration"
        )
    out = {to_ours[k]: v for k, v in state.items()}

    if ptype == "LORA" and not backend.merges_products():
        a_keys = [k for k in reference if k.endswith(".lora_A.default.weight")]
        num = sum(float(torch.sum((out[k].double() - reference[k].double()) ** 2)) for k in a_keys)
        den = sum(float(torch.sum(reference[k].double() ** 2)) for k in a_keys)
        dist = math.sqrt(num / den) if den else 0.0
        if dist > DEFAULT_MAX_DISTANCE:
            raise GivenModelError(
                f"{path / fname}: its LoRA A factors are {dist:.3f} away (relative L2) from the study's pre-trained "
                f"adapter's (at most {DEFAULT_MAX_DISTANCE}): the adapter was initialised with another seed. With "
                "lora_merge: factors the A and B factors of different models are merged separately, which is no "
                "merge of their updates unless they share A's init; use lora_merge: products (the default, an exact "
                "merge of the dense updates scaling * B @ A) in backend.params"
            )
        info["lora_a_distance"] = dist
    return Loaded(out, base=str(base) if base else None, info=info)


# ---------------------------------------------------------------------------------------------
# full causal-LM weights (transformers save_pretrained folder)
# ---------------------------------------------------------------------------------------------
def _hf_weight_files(path: Path) -> list[Path]:
    if (path / HF_SINGLE).is_file():
        return [path / HF_SINGLE]
    if (path / HF_INDEX).is_file():
        index = _read_json(path / HF_INDEX)
        wm = index.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise GivenModelError(f"{path / HF_INDEX}: no weight_map")
        files = [path / f for f in sorted(set(wm.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise GivenModelError(f"{path / HF_INDEX}: shard(s) {absent[:3]} named in the index are missing")
        return files
    found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    raise GivenModelError(
        f"{path}: no {HF_SINGLE} or {HF_INDEX}"
        + (
            f" (found {found[:3]}: pickled weights are not read; save with save_pretrained(..., "
            "safe_serialization=True))"
            if found
            else ""
        )
    )


def _read_safetensors(files: list[Path]) -> dict:
    from safetensors import SafetensorError, safe_open

    state = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                for k in fh.keys():
                    if k in state:
                        raise GivenModelError(f"{f}: tensor {k!r} is also in another shard")
                    state[k] = fh.get_tensor(k)
        except (SafetensorError, OSError) as e:
            raise GivenModelError(f"{f}: not a readable safetensors file ({e})") from None
    return state


def _config_value(cfg, key):
    return getattr(cfg, key, None) if not isinstance(cfg, dict) else cfg.get(key)


def load_causal_lm_hf(path: Path, backend, model, pretrained) -> Loaded:
    import torch

    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise GivenModelError(f"{path}: no config.json; a transformers model folder is written by save_pretrained")
    cfg = _read_json(cfg_path)
    if backend.params.get("adapter") != "none":
        raise GivenModelError(
            f"{path}: full causal-LM weights, but the study's backend merges {backend.params.get('adapter')} adapters "
            "(backend.params.adapter); set backend.params.adapter: none to merge full weights (small models only: "
            "the engine holds every model in memory), or give peft adapters"
        )
    archs = cfg.get("architectures") or []
    if not any(isinstance(a, str) and a.endswith("ForCausalLM") for a in archs):
        raise GivenModelError(f"{cfg_path}: architectures is {archs!r}, not a *ForCausalLM model")
    study_cfg = model.config
    for key in ARCH_FIELDS:
        g, s = cfg.get(key), _config_value(study_cfg, key)
        if g is None or s is None:
            continue
        if _norm(g) != _norm(s):
            raise GivenModelError(
                f"{cfg_path}: {key} is {g!r} in the given model but {s!r} in the study's base model "
                f"({backend.params.get('model')!r}): it is not a fine-tune of the study's base model"
            )
    raw = _read_safetensors(_hf_weight_files(path))

    # file names -> the backend's merge keys (tied weights: merge_params has each once, by its first name)
    reference = backend.merge_params(model)
    canonical = {id(p): k for k, p in reference.items()}
    alias = {
        n: canonical[id(p)]
        for n, p in model.named_parameters(remove_duplicate=False)
        if id(p) in canonical and n not in reference
    }
    out, dropped = {}, []
    for k, v in raw.items():
        if k in reference:
            out[k] = v
        elif k in alias:
            dropped.append(k)  # a tied weight saved under its second name too
    for k in dropped:
        first = alias[k]
        if first not in out:
            out[first] = raw[k]
        elif not torch.equal(raw[k].to(out[first].dtype), out[first]):
            raise GivenModelError(
                f"{path}: {k!r} and {first!r} are tied in the study's base model but differ in the given model"
            )
    missing = sorted(set(reference) - set(out))
    extra = sorted(set(raw) - set(out) - set(dropped))
    if missing or extra:
        raise GivenModelError(
            f"{path}: tensors differ from the study's base model's parameters: missing {missing[:5]}"
            f"{' (%d in all)' % len(missing) if len(missing) > 5 else ''}, unexpected {extra[:5]}"
            f"{' (%d in all)' % len(extra) if len(extra) > 5 else ''}: not a fine-tune of the study's base model"
        )
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in out.values()})
    info = {"model_type": cfg.get("model_type"), "architectures": archs, "stored_dtypes": dtypes}
    base = cfg.get("_name_or_path") or None
    return Loaded(out, base=str(base) if base else None, info=info)
