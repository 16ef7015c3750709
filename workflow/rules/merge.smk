rule merge_eval:
    """One chunk of the 2^N-1 subsets of a target's candidates: merge (eq. 4) and evaluate."""
    input:
        pretrained=PRETRAINED,
        models=lambda wc: [finetuned(c) for c in CANDIDATES[wc.target]],
        target=lambda wc: data_file(wc.target),
        heads=lambda wc: head_files([wc.target]),
    output:
        f"{R}/merge_eval/chunks/{{target}}/{{chunk}}.csv",
    params:
        backend=BACKEND,
        merge=js({k: config["merge_eval"][k] for k in ("method", "options")}),
        models=lambda wc: " ".join(f"{c}={finetuned(c)}" for c in CANDIDATES[wc.target]),
        target=lambda wc: data_dir(wc.target),
        chunks=CHUNKS,
    log:
        f"{R}/logs/merge_eval/{{target}}/{{chunk}}.log",
    threads: GPU_THREADS
    resources:
        **GPU_RES,
    shell:
        "mergemix merge-eval --threads {threads} --backend {params.backend:q} --merge {params.merge:q} "
        "--pretrained {input.pretrained} --models {params.models} --target {params.target} "
        "--chunk {wildcards.chunk} --chunks {params.chunks} --out {output} 2> {log}"


rule gather_merge_eval:
    """All chunks of a target, checked to cover every non-empty subset exactly once."""
    input:
        lambda wc: [f"{R}/merge_eval/chunks/{wc.target}/{k}.csv" for k in range(CHUNKS)],
    output:
        f"{R}/merge_eval/{{target}}.csv",
    params:
        candidates=lambda wc: " ".join(CANDIDATES[wc.target]),
    log:
        f"{R}/logs/gather_merge_eval/{{target}}.log",
    threads: 1
    resources:
        **CPU_RES,
    shell:
        "mergemix gather --candidates {params.candidates} --chunks {input} --out {output} 2> {log}"
