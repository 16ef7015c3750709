# Beyond the paper's uniform subsets (docs/search-and-merge-methods.md, "Merge methods and weighted mixtures"):
# merge_eval.methods compares merge methods as surrogates of mixture fine-tuning, and
# merge_eval.strategy: weights searches mixture proportions from the best subset.
METHODS = [m for m in ME.get("methods") or []]
# merge_eval.method_options: fixed options per compared method; merge_eval.tune: options tuned on
# val per method and target before the method's merge-eval (the tuned options replace the defaults)
METHOD_OPTIONS = SETTINGS.merge_eval.method_options
TUNE = SETTINGS.merge_eval.tune
TUNED = [m for m in METHODS if m in TUNE.space]
TUNE_SPEC = js(TUNE.tuner())


def tuned_json(method, target):
    return f"{R}/tune/{method}/{target}.json"


rule tune_method:
    """A merge method's options tuned on a target's val split: each setting of merge_eval.tune.space
    scored by the best merged val accuracy of the study's subset search (optuna TPE; resumable)."""
    input:
        pretrained=PRETRAINED,
        pretrained_manifest=PRETRAINED_MANIFEST,
        models=lambda wc: [finetuned(c) for c in CANDIDATES[wc.target]],
        manifests=lambda wc: [manifest(finetuned(c)) for c in CANDIDATES[wc.target]],
        target=lambda wc: prepared_files(wc.target),
        heads=lambda wc: head_files([wc.target]),
    output:
        json=f"{R}/tune/{{method}}/{{target}}.json",
        table=f"{R}/tune/{{method}}/{{target}}.csv",
    log:
        f"{R}/logs/tune_method/{{method}}/{{target}}.log",
    wildcard_constraints:
        method="|".join(TUNED) if TUNED else "no-method",
    threads: GPU_THREADS
    resources:
        **GPU_RES,
    params:
        backend=BACKEND,
        fixed=lambda wc: js(METHOD_OPTIONS.get(wc.method) or {}),
        space=lambda wc: js(TUNE.space[wc.method]),
        tune=TUNE_SPEC,
        search=lambda wc: js(search_spec(wc.target)),
        models=lambda wc: [f"{c}={finetuned(c)}" for c in CANDIDATES[wc.target]],
        target=lambda wc: data_dir(wc.target),
        eval=EVAL_SPEC,
        journal=lambda wc: f"{R}/tune/journal/{wc.method}/{wc.target}.log",
    shell:
        "{MERGEMIX} tune-method --threads {threads} --backend {params.backend:q} --method {wildcards.method:q} "
        "--fixed {params.fixed:q} --space {params.space:q} --tune {params.tune:q} --search {params.search:q} "
        "--pretrained {input.pretrained:q} --models {params.models:q} --target {params.target:q} --eval {params.eval:q} "
        "--journal {params.journal:q} --out {output.json:q} --out-csv {output.table:q} 2> {log:q}"


WEIGHTS_ON = ME["strategy"] == "weights"
WEIGHTS = SETTINGS.merge_eval.weights
# the search's settings (check_samples is the check's: changing it does not rerun the search)
WEIGHTS_SPEC = js(WEIGHTS.search())
CHECK_SAMPLES = WEIGHTS.check_samples if WEIGHTS_ON else 0


rule merge_eval_method:
    """Every subset of a target merged with one method of merge_eval.methods (its default options)
    and evaluated: the same fine-tuned models as the study's own merge-eval."""
    input:
        pretrained=PRETRAINED,
        pretrained_manifest=PRETRAINED_MANIFEST,
        models=lambda wc: [finetuned(c) for c in CANDIDATES[wc.target]],
        manifests=lambda wc: [manifest(finetuned(c)) for c in CANDIDATES[wc.target]],
        target=lambda wc: prepared_files(wc.target),
        heads=lambda wc: head_files([wc.target]),
        tuned=lambda wc: [tuned_json(wc.method, wc.target)] if wc.method in TUNED else [],
    output:
        f"{R}/merge_eval/methods/{{method}}/{{target}}.csv",
    log:
        f"{R}/logs/merge_eval/methods/{{method}}/{{target}}.log",
    wildcard_constraints:
        method="|".join(METHODS) if METHODS else "no-method",
    threads: GPU_THREADS
    resources:
        **GPU_RES,
    params:
        backend=BACKEND,
        merge=lambda wc: js(SETTINGS.merge_eval.merge(wc.method)),
        models=lambda wc: [f"{c}={finetuned(c)}" for c in CANDIDATES[wc.target]],
        target=lambda wc: data_dir(wc.target),
        eval=EVAL_SPEC,
    shell:
        "{MERGEMIX} merge-eval --threads {threads} --backend {params.backend:q} --merge {params.merge:q} "
        "--pretrained {input.pretrained:q} --models {params.models:q} --target {params.target:q} "
        "--chunk 0 --chunks 1 --eval {params.eval:q} --test all --options-from {input.tuned:q} --out {output:q} 2> {log:q}"


rule compare_methods:
    """Per merge method and target: Pearson of merged vs mixture-fine-tuned accuracy and the M2M choice."""
    input:
        pretrained=f"{R}/pretrained.csv",
        merge_eval=[f"{R}/merge_eval/methods/{m}/{t}.csv" for m in METHODS for t in TARGETS],
        mixture=[f"{R}/mixture/{t}.csv" for t in TARGETS] if MIXTURE_ON else [],
        tuned=[tuned_json(m, t) for m in TUNED for t in TARGETS],
    output:
        table=report(f"{R}/methods.csv", caption="../report/methods.rst", category="Tables"),
        figures=report(
            expand(f"{R}/figures/methods.{{fmt}}", fmt=list(SETTINGS.analysis.figure_formats)),
            caption="../report/methods.rst",
            category="Figures",
        ),
    log:
        f"{R}/logs/compare_methods.log",
    threads: 1
    resources:
        **CPU_RES,
    params:
        figure=lambda wc, output: str(Path(output.figures[0]).with_suffix("")),  # figures/methods, no extension
        merge_eval=[f"{m}:{t}={R}/merge_eval/methods/{m}/{t}.csv" for m in METHODS for t in TARGETS],
        mixture=[f"{t}={R}/mixture/{t}.csv" for t in TARGETS] if MIXTURE_ON else [],
        options=js(METHOD_OPTIONS),
        tuned=[f"{m}:{t}={tuned_json(m, t)}" for m in TUNED for t in TARGETS],
        formats=list(SETTINGS.analysis.figure_formats),
        analysis=js(SETTINGS.analysis),
    shell:
        "{MERGEMIX} compare-methods --pretrained-csv {input.pretrained:q} --merge-eval {params.merge_eval:q} "
        "--mixture {params.mixture:q} --options {params.options:q} --tuned {params.tuned:q} --out {output.table:q} --figure {params.figure:q} --formats {params.formats:q} "
        "--analysis {params.analysis:q} 2> {log:q}"


rule weights_search:
    """Mixture proportions searched on merged val accuracy from the target's best subset (optuna
    CMA-ES or TPE; the journal lets a rerun resume)."""
    input:
        pretrained=PRETRAINED,
        pretrained_manifest=PRETRAINED_MANIFEST,
        models=lambda wc: [finetuned(c) for c in CANDIDATES[wc.target]],
        manifests=lambda wc: [manifest(finetuned(c)) for c in CANDIDATES[wc.target]],
        target=lambda wc: prepared_files(wc.target),
        heads=lambda wc: head_files([wc.target]),
        merge_eval=f"{R}/merge_eval/{{target}}.csv",
    output:
        weights=f"{R}/weights/{{target}}.json",
        table=f"{R}/weights/{{target}}.csv",
    log:
        f"{R}/logs/weights_search/{{target}}.log",
    threads: GPU_THREADS
    resources:
        **GPU_RES,
    params:
        backend=BACKEND,
        weights=WEIGHTS_SPEC,
        models=lambda wc: [f"{c}={finetuned(c)}" for c in CANDIDATES[wc.target]],
        target=lambda wc: data_dir(wc.target),
        eval=EVAL_SPEC,
        journal=lambda wc: f"{R}/weights/journal/{wc.target}.log",
    shell:
        "{MERGEMIX} weights-search --threads {threads} --backend {params.backend:q} --weights {params.weights:q} "
        "--pretrained {input.pretrained:q} --models {params.models:q} --target {params.target:q} "
        "--merge-eval {input.merge_eval:q} --eval {params.eval:q} --journal {params.journal:q} "
        "--out {output.weights:q} --out-csv {output.table:q} 2> {log:q}"


rule weighted_finetune:
    """The m2m_weighted model: fine-tuned on the candidates in the searched proportions."""
    input:
        pretrained=PRETRAINED,
        pretrained_manifest=PRETRAINED_MANIFEST,
        weights=f"{R}/weights/{{target}}.json",
        data=lambda wc: prepared_files(*CANDIDATES[wc.target], wc.target),
        heads=lambda wc: head_files(CANDIDATES[wc.target] + [wc.target]),
    output:
        model=f"{R}/models/weighted/{{target}}/model.safetensors",
        manifest=f"{R}/models/weighted/{{target}}/model.json",
        result=f"{R}/final/{{target}}.weighted.json",
    log:
        f"{R}/logs/weighted_finetune/{{target}}.log",
    threads: GPU_THREADS
    resources:
        **GPU_RES,
    params:
        backend=BACKEND,
        hp=FINETUNE_HP,
        data=lambda wc: [f"{c}={data_dir(c)}" for c in CANDIDATES[wc.target]],
        target=lambda wc: data_dir(wc.target),
    shell:
        "{MERGEMIX} weighted-finetune --threads {threads} {CHECKPOINT_ARGS} --backend {params.backend:q} --hparams {params.hp:q} "
        "--pretrained {input.pretrained:q} --weights {input.weights:q} --data {params.data:q} "
        "--target {params.target:q} --out {output.model:q} --eval-out {output.result:q} 2> {log:q}"


rule weights_check:
    """Sampled weight vectors of a target's candidates, each merged and fine-tuned (the check that
    weighted merged accuracy predicts weighted fine-tuning, as for subsets)."""
    input:
        pretrained=PRETRAINED,
        pretrained_manifest=PRETRAINED_MANIFEST,
        models=lambda wc: [finetuned(c) for c in CANDIDATES[wc.target]],
        manifests=lambda wc: [manifest(finetuned(c)) for c in CANDIDATES[wc.target]],
        data=lambda wc: prepared_files(*CANDIDATES[wc.target], wc.target),
        heads=lambda wc: head_files(CANDIDATES[wc.target] + [wc.target]),
    output:
        f"{R}/weights/check/{{target}}.csv",
    log:
        f"{R}/logs/weights_check/{{target}}.log",
    threads: GPU_THREADS
    resources:
        **pack_resources(GPU_RES, max(1, CHECK_SAMPLES)),
    params:
        backend=BACKEND,
        hp=FINETUNE_HP,
        models=lambda wc: [f"{c}={finetuned(c)}" for c in CANDIDATES[wc.target]],
        data=lambda wc: [f"{c}={data_dir(c)}" for c in CANDIDATES[wc.target]],
        target=lambda wc: data_dir(wc.target),
        samples=CHECK_SAMPLES,
        seed=WEIGHTS.seed,
        eval=EVAL_SPEC,
    shell:
        "{MERGEMIX} weights-check --threads {threads} --backend {params.backend:q} --hparams {params.hp:q} "
        "--pretrained {input.pretrained:q} --models {params.models:q} --data {params.data:q} --target {params.target:q} "
        "--samples {params.samples:q} --seed {params.seed:q} --eval {params.eval:q} --out {output:q} 2> {log:q}"


rule weights_check_table:
    """Per target: Pearson of weighted merged against weighted fine-tuned test accuracy."""
    input:
        pretrained=f"{R}/pretrained.csv",
        checks=[f"{R}/weights/check/{t}.csv" for t in TARGETS],
    output:
        report(f"{R}/weights_check.csv", caption="../report/weights_check.rst", category="Tables"),
    log:
        f"{R}/logs/weights_check_table.log",
    threads: 1
    resources:
        **CPU_RES,
    params:
        checks=[f"{t}={R}/weights/check/{t}.csv" for t in TARGETS],
        analysis=js(SETTINGS.analysis),
    shell:
        "{MERGEMIX} weights-check-table --checks {params.checks:q} --pretrained-csv {input.pretrained:q} "
        "--analysis {params.analysis:q} --out {output:q} 2> {log:q}"


def methods_files():
    """What merge_eval.methods and strategy: weights add to the study (for rule all and analyze)."""
    files = []
    if METHODS:
        files += list(rules.compare_methods.input.merge_eval) + list(rules.compare_methods.output)
        files += [f"{R}/tune/{m}/{t}.{ext}" for m in TUNED for t in TARGETS for ext in ("json", "csv")]
    if WEIGHTS_ON:
        for t in TARGETS:
            files += [
                f"{R}/weights/{t}.json",
                f"{R}/weights/{t}.csv",
                f"{R}/final/{t}.weighted.json",
                f"{R}/models/weighted/{t}/model.safetensors",
                f"{R}/models/weighted/{t}/model.json",
            ]
    if CHECK_SAMPLES:
        files += list(rules.weights_check_table.input.checks) + [f"{R}/weights_check.csv"]
    return files
