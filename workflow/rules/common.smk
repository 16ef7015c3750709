# Shared helpers: config loading and validation, paths, and the per-stage params.
import json
import shlex
import sys
from pathlib import Path

from mergemix.backends.base import backend_class
from mergemix.config import (
    ConfigError,
    candidates_of,
    load_yaml,
    pack_sizes,
    resolve_strategy,
    targets_of,
    validate_config,
)
from mergemix.data.registry import needs_download
from mergemix.subsets import all_subsets, parse_subset, sample_mixtures, sort_key, subset_id

# The embedded study is the default; a --configfile replaces it (it is not merged into it).
if not config:
    config.update(load_yaml(Path(workflow.basedir) / "config" / "config.yaml"))
try:
    _checked = validate_config(config)  # the package's schema (mergemix/schemas/config.schema.yaml)
except ConfigError as e:
    raise ValueError(
        f"{e}\n(config file(s): {', '.join(map(str, workflow.configfiles)) or 'config/config.yaml'})"
    ) from None
config.clear()
config.update(_checked)

# Rules run the CLI of the interpreter that runs Snakemake, whatever PATH holds (a venv need not
# be activated); quoted, so an interpreter path with spaces works.
MERGEMIX = f"{shlex.quote(sys.executable)} -m mergemix"

STUDY = config["study"]
# Every path and free text in a rule's shell command is quoted (`:q`), so a results_dir with
# spaces or shell characters is only a folder name; names (study, datasets, targets, candidates)
# are restricted by the schema's name pattern. Braces would read as wildcards in rule paths.
if any(c in config["results_dir"] for c in "{}") or any(ord(c) < 32 for c in config["results_dir"]):
    raise ValueError(
        f"results_dir: {config['results_dir']!r} has braces or control characters, which Snakemake cannot "
        "use in file paths; choose another folder"
    )
R = f"{config['results_dir']}/{STUDY}"
DATASETS = sorted(config["datasets"])
TARGETS = targets_of(config)
CANDIDATES = {t: candidates_of(config, t) for t in TARGETS}
MIXTURE_ON = config["mixture"]["enabled"]
from mergemix.settings import PretrainHParams, Section, Study

SETTINGS = Study.from_config(config)  # typed, frozen sections (defaults only in the schema)
FINAL_ON = SETTINGS.final.enabled
# selection only: no mixture study and no final fine-tune, so no mixture is ever trained
TRAIN_NOTHING = not MIXTURE_ON and not FINAL_ON
# models: given fine-tuned models (one per candidate), imported instead of fine-tuned (train.smk)
GIVEN = config["models"]
# fine-tune checkpoints (preemption): the flags of every fine-tune stage; not params, so changing
# how often a job saves never reruns a finished fine-tune
CHECKPOINT_ARGS = (
    f"--checkpoint-every-seconds {SETTINGS.checkpoint.every_seconds:g} "
    f"--checkpoint-every-steps {int(SETTINGS.checkpoint.every_steps or 0)}"
)
CHUNKS = config["merge_eval"]["chunks"]
# Search: each target's strategy (`auto` resolved: exhaustive while 2^N-1 fits the budget). The
# exhaustive strategy fans out into CHUNKS jobs per target; a budgeted one runs WORKERS jobs
# (optuna shares one journal between them; the others run one job).
ME = config["merge_eval"]
STRATEGY = {t: resolve_strategy(config, len(CANDIDATES[t])) for t in TARGETS}
WORKERS = ME["workers"]


def search_spec(target):
    """The target's subset search: `auto` resolved (STRATEGY), a null budget as 1023 (settings.Search.resolved)."""
    return SETTINGS.merge_eval.search().resolved(len(CANDIDATES[target]))


# Mixture study: every mixture, or a fixed size-stratified sample shared by all targets (each
# target takes the sampled mixtures that avoid it), plus its single datasets and all its candidates.
SAMPLE = config["mixture"]["sample"] if MIXTURE_ON else None
if SAMPLE:
    _pool = sorted({c for t in TARGETS for c in CANDIDATES[t]})
    SAMPLED = sample_mixtures(_pool, SAMPLE["size"], SAMPLE["seed"], max_size=max(len(c) for c in CANDIDATES.values()))
else:
    SAMPLED = []
RES = config["resources"]
PRETRAIN = "_pretrain"


def js(obj):
    """Deterministic JSON, so unchanged config slices never look changed to Snakemake; a typed
    section (mergemix.settings) as its to_dict()."""
    if isinstance(obj, Section):
        obj = obj.to_dict()
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


DATA_SPECS = dict(config["datasets"])
if "pretrain" in config:
    DATA_SPECS[PRETRAIN] = config["pretrain"]["data"]

BACKEND = js(config["backend"])
BACKEND_CLASS = backend_class(config["backend"]["name"])
# Resources. CPU_RES for light rules; GPU_RES for the rules that train, merge, evaluate or embed:
# they ask for GPUs (and the GPU partition) only when the study's backend needs them, or when
# resources.gpu says so, so the embedded study runs on CPU nodes.
# cpus_per_task always equals the rule's threads (the profile's default only covers local rules).
GPUS = RES["gpu"] if RES["gpu"] is not None else (1 if BACKEND_CLASS.needs_gpu else 0)
CPU_RES = {"mem_mb": RES["mem_mb"], "runtime": RES["runtime"], "cpus_per_task": 1}
if RES["partition"]:
    CPU_RES["slurm_partition"] = RES["partition"]
# CPU rules that use the study's threads (e.g. clip's zero-shot heads)
CPU_RES_THREADED = {**CPU_RES, "cpus_per_task": RES["threads"]}
if GPUS:
    GPU_THREADS = RES["gpu_threads"] or RES["threads"]
    GPU_RES = {
        "mem_mb": RES["gpu_mem_mb"] or RES["mem_mb"],
        "runtime": RES["gpu_runtime"] or RES["runtime"],
        "cpus_per_task": GPU_THREADS,
        "gpu": GPUS,
        "slurm_partition": RES["gpu_partition"],
    }
else:
    GPU_THREADS = RES["threads"]
    GPU_RES = {**CPU_RES, "cpus_per_task": GPU_THREADS}
# datasets whose source fetches files first (a local rule; later jobs read local files only)
DOWNLOADED = sorted(n for n, spec in DATA_SPECS.items() if needs_download(spec))
FINETUNE_HP = js(SETTINGS.finetune)  # settings.HParams: every key (the schema's defaults filled in)

# Packing (config `pack`; docs/design.md, Packing short jobs): where a backend's jobs last seconds, one job
# runs a pack of them (one Python start and torch import instead of one each), writing exactly the
# files, bit for bit, that a job per item would. Packs are fixed-size runs of the sorted items, each a
# rule of its own (`name:`) declaring every file it reads and writes, so every path is unchanged;
# a size of 1 keeps the one-job-per-item rules. On Slurm the profile groups the packs (group `pack`).
PACK = pack_sizes(config)


def packs(items, size):
    """``items`` (sorted) dealt round-robin into ceil(n / size) packs of at most ``size``: pack k holds
    items k, k + P, k + 2P, ... of P packs, so packs of mixtures sorted by size carry similar work
    and finish together instead of leaving the largest mixtures for one last job."""
    items = list(items)
    n = -(-len(items) // size)
    return [items[k::n] for k in range(n)]


# Slurm job groups (workflow/profiles/slurm sets group-components; local runs ignore groups): short
# jobs of one kind share one allocation instead of one sbatch each. `short`: the per-target CSV jobs
# (gather_merge_eval, similarity), seconds on CPU whatever the backend; `eval`: the evaluation jobs
# (mixture_eval, eval_pretrained) when they get no GPU (a group asks for the sum of its parallel
# jobs' resources). Not prepare_data: Snakemake deletes every output of a failed group job, so one
# bad dataset would take its group's prepared datasets down with it.
SHORT_GROUP = "short"
EVAL_GROUP = None if GPUS else "eval"


def pack_resources(res, n):
    """A pack of ``n`` jobs asks for ``n`` times a job's runtime (resources.runtime is per job)."""
    return {**res, "runtime": res["runtime"] * n}


def data_dir(name):
    return f"{R}/data/{name}"


def data_file(name):
    return f"{data_dir(name)}/splits.json"


# The file a dataset's prepare job writes beside splits.json (mergemix.data.prepared): the record
# sources (chat data and benchmark targets, mergemix.data.text) write JSON lines, the others
# (digits, images) an array file. Declared, so that deleting it reruns prepare_data.
RECORD_SOURCES = frozenset({"hf_chat", "jsonl_chat", "benchmarks", "lm_eval"})


def data_file_name(name):
    return "samples.jsonl" if DATA_SPECS[name]["source"] in RECORD_SOURCES else "arrays.safetensors"


def prepared_files(*names):
    """What a job reads of prepared datasets: each one's data file and its splits.json."""
    return [f for n in names for f in (f"{data_dir(n)}/{data_file_name(n)}", data_file(n))]


def download_dir(name):
    return f"{R}/downloads/{name}"


def finetuned(name):
    return f"{R}/models/finetuned/{name}/model.safetensors"


def mixture_model(sid):
    """A one-dataset mixture is that dataset's fine-tuned model: it is trained once."""
    names = parse_subset(sid)
    return finetuned(names[0]) if len(names) == 1 else f"{R}/models/mixture/{sid}/model.safetensors"


def mixtures_of(target):
    """Mixtures fine-tuned for a target: all subsets with the oracle on, the sample's (plus singles
    and all candidates) with mixture.sample, else only all candidates."""
    cands = CANDIDATES[target]
    if TRAIN_NOTHING:
        return []
    if not MIXTURE_ON:
        return [subset_id(cands)]
    if not SAMPLE:
        return [subset_id(s) for s in all_subsets(cands)]
    picked = [[c] for c in cands] + [s for s in SAMPLED if set(s) <= set(cands)] + [cands]
    return sorted({subset_id(s) for s in picked}, key=sort_key)


def similarity_subsets(target):
    """Subsets the similarity baseline scores: all of them when every mixture is fine-tuned, else
    the fine-tuned ones (a similarity choice is only reported where its mixture has a model);
    all of them again in a selection-only study (its choice is reported, nothing is fine-tuned)."""
    return None if (MIXTURE_ON and not SAMPLE) or TRAIN_NOTHING else mixtures_of(target)


def needs_sampled_merges(target):
    """A budgeted search scores few of the fine-tuned mixtures' subsets: for the correlation study
    their merged models are evaluated apart (never used for selection)."""
    return MIXTURE_ON and STRATEGY[target] != "exhaustive"


def manifest(model_path):
    """A model's manifest, written beside it (mergemix.io.manifest_path); jobs that load a model read both."""
    return model_path.removesuffix(".safetensors") + ".json"


PRETRAINED = f"{R}/models/pretrained/model.safetensors"
PRETRAINED_MANIFEST = manifest(PRETRAINED)
# per-dataset frozen heads (clip's zero-shot heads) live beside the pre-trained model
HEADS = f"{R}/models/pretrained/heads"


def head_files(names):
    """The head files a job on these datasets needs: none unless the backend has per-dataset heads."""
    if not getattr(BACKEND_CLASS, "has_heads", False):
        return []
    return [f for n in names for f in (f"{HEADS}/{n}.safetensors", f"{HEADS}/{n}.json")]  # head and its manifest


# dataset spec keys that only the head uses: changing prompt templates recomputes the head (and
# what depends on it), not the download or the decoded images
HEAD_ONLY_KEYS = ("templates",)


def data_spec(name):
    return {k: v for k, v in DATA_SPECS[name].items() if k not in HEAD_ONLY_KEYS}


wildcard_constraints:
    dataset="[A-Za-z0-9_][A-Za-z0-9_-]*",
    target="[A-Za-z0-9][A-Za-z0-9_-]*",
    subset="[A-Za-z0-9][A-Za-z0-9_+-]*",
    chunk="[0-9]+",
    worker="[0-9]+",
