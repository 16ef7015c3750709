rule mixture_finetune:
    """theta*(S): fine-tuned on the union of a mixture's datasets. One job per unique mixture,
    shared by every target whose candidates contain it."""
    input:
        pretrained=PRETRAINED,
        pretrained_manifest=PRETRAINED_MANIFEST,
        data=lambda wc: prepared_files(*parse_subset(wc.subset)),
        heads=lambda wc: head_files(parse_subset(wc.subset)),
    output:
        model=f"{R}/models/mixture/{{subset}}/model.safetensors",
        manifest=f"{R}/models/mixture/{{subset}}/model.json",
    params:
        backend=BACKEND,
        hp=FINETUNE_HP,
        data=lambda wc: [data_dir(n) for n in parse_subset(wc.subset)],
    log:
        f"{R}/logs/mixture_finetune/{{subset}}.log",
    threads: GPU_THREADS
    resources:
        **GPU_RES,
    shell:
        "{MERGEMIX} finetune --threads {threads} --backend {params.backend:q} --hparams {params.hp:q} "
        "--pretrained {input.pretrained:q} --data {params.data:q} --out {output.model:q} 2> {log:q}"


rule mixture_eval:
    """A target's mixture-fine-tuned models on its val and test splits."""
    input:
        pretrained=PRETRAINED,
        pretrained_manifest=PRETRAINED_MANIFEST,
        models=lambda wc: [mixture_model(s) for s in mixtures_of(wc.target)],
        manifests=lambda wc: [manifest(mixture_model(s)) for s in mixtures_of(wc.target)],
        target=lambda wc: prepared_files(wc.target),
        heads=lambda wc: head_files([wc.target]),
    output:
        f"{R}/mixture/{{target}}.csv",
    params:
        backend=BACKEND,
        models=lambda wc: [f"{s}={mixture_model(s)}" for s in mixtures_of(wc.target)],
        target=lambda wc: data_dir(wc.target),
    log:
        f"{R}/logs/mixture_eval/{{target}}.log",
    threads: GPU_THREADS
    resources:
        **GPU_RES,
    shell:
        "{MERGEMIX} eval-models --threads {threads} --backend {params.backend:q} --pretrained {input.pretrained:q} "
        "--models {params.models:q} --target {params.target:q} --out {output:q} 2> {log:q}"
