def merge_eval_parts(target):
    """The per-job CSVs of a target's merge-eval: exhaustive chunks, or budgeted-search workers."""
    if STRATEGY[target] == "exhaustive":
        return [f"{R}/merge_eval/chunks/{target}/{k}.csv" for k in range(CHUNKS)]
    return [f"{R}/merge_eval/search/{target}/worker{k}.csv" for k in range(WORKERS)]


def search_summaries(target):
    if STRATEGY[target] == "exhaustive":
        return []
    return [f"{R}/merge_eval/search/{target}/worker{k}.json" for k in range(WORKERS)]


# merge_eval.eval_batch_size and precision: how merge-eval and search jobs run the forward pass
EVAL_SPEC = js(SETTINGS.merge_eval.eval())
# merge_eval.method and options: the study's merge
MERGE_SPEC = js(SETTINGS.merge_eval.merge())


def merge_test_args(target):
    """merge_eval.test for a target's merge-eval chunks. `selected` scores the test split of each
    chunk's best on val and of the subsets the tables report: the all-candidates subset and the
    fine-tuned mixtures of the correlation study (every subset when every mixture is fine-tuned,
    so that case is `all`)."""
    if config["merge_eval"]["test"] == "all" or (MIXTURE_ON and not SAMPLE):
        return ["--test", "all"]
    return ["--test", "selected", "--test-subsets", *mixtures_of(target)]


rule merge_eval:
    """One chunk of the 2^N-1 subsets of a target's candidates: merge (eq. 4) and evaluate
    (the exhaustive strategy)."""
    input:
        pretrained=PRETRAINED,
        pretrained_manifest=PRETRAINED_MANIFEST,
        models=lambda wc: [finetuned(c) for c in CANDIDATES[wc.target]],
        manifests=lambda wc: [manifest(finetuned(c)) for c in CANDIDATES[wc.target]],
        target=lambda wc: prepared_files(wc.target),
        heads=lambda wc: head_files([wc.target]),
    output:
        f"{R}/merge_eval/chunks/{{target}}/{{chunk}}.csv",
    log:
        f"{R}/logs/merge_eval/{{target}}/{{chunk}}.log",
    # ahead of the mixture fine-tunes (priority 0): the selection and final fine-tunes are not left for last
    priority: 1
    threads: GPU_THREADS
    resources:
        **GPU_RES,
    params:
        backend=BACKEND,
        merge=MERGE_SPEC,
        models=lambda wc: [f"{c}={finetuned(c)}" for c in CANDIDATES[wc.target]],
        target=lambda wc: data_dir(wc.target),
        chunks=CHUNKS,
        eval=EVAL_SPEC,
        test=lambda wc: merge_test_args(wc.target),
    shell:
        "{MERGEMIX} merge-eval --threads {threads} --backend {params.backend:q} --merge {params.merge:q} "
        "--pretrained {input.pretrained:q} --models {params.models:q} --target {params.target:q} "
        "--chunk {wildcards.chunk} --chunks {params.chunks} --eval {params.eval:q} {params.test:q} --out {output:q} 2> {log:q}"


rule merge_search:
    """One worker of a budgeted search over a target's subsets (merge_eval.strategy). optuna's
    workers share a journal file in the search folder: a killed search resumes where it stopped."""
    input:
        pretrained=PRETRAINED,
        pretrained_manifest=PRETRAINED_MANIFEST,
        models=lambda wc: [finetuned(c) for c in CANDIDATES[wc.target]],
        manifests=lambda wc: [manifest(finetuned(c)) for c in CANDIDATES[wc.target]],
        target=lambda wc: prepared_files(wc.target),
        heads=lambda wc: head_files([wc.target]),
    output:
        csv=f"{R}/merge_eval/search/{{target}}/worker{{worker}}.csv",
        summary=f"{R}/merge_eval/search/{{target}}/worker{{worker}}.json",
    log:
        f"{R}/logs/merge_search/{{target}}/{{worker}}.log",
    threads: GPU_THREADS
    resources:
        **GPU_RES,
    params:
        backend=BACKEND,
        merge=MERGE_SPEC,
        search=lambda wc: js(search_spec(wc.target)),
        models=lambda wc: [f"{c}={finetuned(c)}" for c in CANDIDATES[wc.target]],
        target=lambda wc: data_dir(wc.target),
        workers=WORKERS,
        # resume state, not a result: one optuna study per fingerprint of models, target and settings
        journal=lambda wc: f"{R}/merge_eval/search/{wc.target}/journal.log",
        eval=EVAL_SPEC,
        # the correlation study's mixtures get their test split from merge_eval_sampled
        test=config["merge_eval"]["test"],
    shell:
        "{MERGEMIX} search --threads {threads} --backend {params.backend:q} --merge {params.merge:q} "
        "--search {params.search:q} --pretrained {input.pretrained:q} --models {params.models:q} "
        "--target {params.target:q} --worker {wildcards.worker} --workers {params.workers} "
        "--journal {params.journal:q} --eval {params.eval:q} --test {params.test:q} --out {output.csv:q} "
        "--summary {output.summary:q} 2> {log:q}"


rule merge_eval_sampled:
    """Merged models of the mixture sample's subsets, for the correlation study of a budgeted
    search (the search itself scores few of them). Not used for selection."""
    input:
        pretrained=PRETRAINED,
        pretrained_manifest=PRETRAINED_MANIFEST,
        models=lambda wc: [finetuned(c) for c in CANDIDATES[wc.target]],
        manifests=lambda wc: [manifest(finetuned(c)) for c in CANDIDATES[wc.target]],
        target=lambda wc: prepared_files(wc.target),
        heads=lambda wc: head_files([wc.target]),
    output:
        f"{R}/merge_eval/sampled/{{target}}.csv",
    log:
        f"{R}/logs/merge_eval_sampled/{{target}}.log",
    threads: GPU_THREADS
    resources:
        **GPU_RES,
    params:
        backend=BACKEND,
        merge=MERGE_SPEC,
        models=lambda wc: [f"{c}={finetuned(c)}" for c in CANDIDATES[wc.target]],
        target=lambda wc: data_dir(wc.target),
        subsets=lambda wc: mixtures_of(wc.target),
        eval=EVAL_SPEC,
    shell:
        "{MERGEMIX} merge-eval --threads {threads} --backend {params.backend:q} --merge {params.merge:q} "
        "--pretrained {input.pretrained:q} --models {params.models:q} --target {params.target:q} "
        "--subsets {params.subsets:q} --eval {params.eval:q} --out {output:q} 2> {log:q}"


rule gather_merge_eval:
    """All of a target's merge-eval rows, one per subset, checked (every subset exactly once for
    exhaustive; never the same subset and slice twice for a search), with the search's cost."""
    input:
        parts=lambda wc: merge_eval_parts(wc.target),
        summaries=lambda wc: search_summaries(wc.target),
    output:
        csv=f"{R}/merge_eval/{{target}}.csv",
        summary=f"{R}/merge_eval/{{target}}.json",
    log:
        f"{R}/logs/gather_merge_eval/{{target}}.log",
    # ahead of the mixture fine-tunes (priority 0): the selection and final fine-tunes are not left for last
    priority: 1
    group:
        SHORT_GROUP
    threads: 1
    resources:
        **CPU_RES,
    params:
        candidates=lambda wc: CANDIDATES[wc.target],
    shell:
        "{MERGEMIX} gather --candidates {params.candidates:q} --chunks {input.parts:q} --summaries {input.summaries:q} "
        "--out {output.csv:q} --summary {output.summary:q} 2> {log:q}"
