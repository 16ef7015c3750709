# mergemix: the Merge to Mix study as a Snakemake workflow.
#   snakemake --cores 2                                  # embedded digits study (config/config.yaml)
#   snakemake --profile workflow/profiles/default --configfile config/<study>.yaml
# Every rule runs one `mergemix <stage>` command; all logic lives in the installable package.

from snakemake.utils import min_version

min_version("8.0")


# `snakemake --report report.html`: the study's front page (what was run, how to read the tables)
report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/clip.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/mixture.smk"
include: "workflow/rules/methods.smk"
include: "workflow/rules/analysis.smk"


rule all:
    default_target: True
    input:
        rules.analyze.output,
        STUDY_FILES,  # every result (analysis.smk): deleting one and rerunning rebuilds it
        methods_files(),  # merge_eval.methods and strategy: weights (methods.smk)


onstart:
    # say where jobs run: a Slurm run is never mistaken for a local one (or the reverse)
    _plugin = getattr(workflow, "executor_plugin", None)
    _executor = getattr(_plugin, "name", None) or "local"
    print(
        f"mergemix: study {STUDY!r}, results in {R}; executor: {_executor}"
        + (" (jobs run on this machine; for Slurm: snakemake --profile slurm ...)" if _executor == "local" else ""),
        flush=True,
    )
    # one checkout at a time per results folder (Snakemake's own lock is per checkout)
    from mergemix.runlock import LockError, acquire

    try:
        acquire(R, workflow.basedir)
    except LockError as e:
        from snakemake.exceptions import WorkflowError

        raise WorkflowError(f"mergemix: {e}") from None


onerror:
    from mergemix.runlock import release

    release(R, workflow.basedir)


onsuccess:
    from mergemix.runlock import release

    release(R, workflow.basedir)
    sel = Path(R) / "selection.csv"
    if sel.exists():
        print(f"\nSelection table ({sel}):", flush=True)
        shell(f"{MERGEMIX} show {shlex.quote(str(sel))}")
