"""Download a given model from the hub at its revision (the ``download_model`` local rule).

Only weights and configs are fetched (safetensors, json, txt; never ``.bin``/``.pt`` pickles or
``.py`` code), into the rule's folder, with ``download.json`` recording the repository, the
configured revision and the commit it resolved to.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Mapping

from mergemix import io

log = logging.getLogger("mergemix")
PATTERNS = ("*.safetensors", "*.json", "*.txt", "*.model")
_SHA = re.compile(r"^[0-9a-f]{40}$")


def download_model(spec: Mapping, out_dir) -> dict:
    from huggingface_hub import HfApi, snapshot_download

    repo, revision = spec["hub"], spec.get("revision", "main")
    sub = spec.get("subfolder")
    patterns = [f"{sub}/{p}" for p in PATTERNS] if sub else list(PATTERNS)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    commit = HfApi().model_info(repo, revision=revision).sha
    snapshot_download(repo_id=repo, revision=commit, local_dir=str(tmp), allow_patterns=patterns)
    src = tmp / sub if sub else tmp
    if not any(src.glob("*.safetensors")):
        raise FileNotFoundError(
            f"models: {repo}@{revision}{'/' + sub if sub else ''} has no .safetensors weights; "
            "mergemix reads only safetensors from the hub (no pickles)"
        )
    if not _SHA.match(str(revision)):
        log.warning(
            "models: %s revision %r is a branch or tag (resolved to %s); pin it with mergemix pin-revisions",
            repo,
            revision,
            commit,
        )
    record = {"hub": repo, "revision": revision, "resolved_revision": commit, "subfolder": sub}
    io.write_json(src / "download.json", record)
    src.rename(out_dir)
    if sub:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return record
