rule mixture_finetune:
    """theta*(S): fine-tuned on the union of a mixture's datasets. One job per unique mixture,
    shared by every target whose candidates contain it."""
    input:
        pretrained=PRETRAINED,
        data=lambda wc: [data_file(n) for n in parse_subset(wc.subset)],
        heads=lambda wc: head_files(parse_subset(wc.subset)),
    output:
        model=f"{R}/models/mixture/{{subset}}/model.safetensors",
        manifest=f"{R}/models/mixture/{{subset}}/model.json",
    params:
        backend=BACKEND,
        hp=FINETUNE_HP,
        data=lambda wc: " ".join(data_dir(n) for n in parse_subset(wc.subset)),
    log:
        f"{R}/logs/mixture_finetune/{{subset}}.log",
    threads: GPU_THREADS
    resources:
        **GPU_RES,
    shell:
        "{MERGEMIX} finetune --threads {threads} --backend {params.backend:q} --hparams {params.hp:q} "
        "--pretrained {input.pretrained} --data {params.data} --out {output.model} 2> {log}"


rule mixture_eval:
    """A target's mixture-fine-tuned models on its val and test splits."""
    input:
        pretrained=PRETRAINED,
        models=lambda wc: [mixture_model(s) for s in mixtures_of(wc.target)],
        target=lambda wc: data_file(wc.target),
        heads=lambda wc: head_files([wc.target]),
    output:
        f"{R}/mixture/{{target}}.csv",
    params:
        backend=BACKEND,
        models=lambda wc: " ".join(f"{s}={mixture_model(s)}" for s in mixtures_of(wc.target)),
        target=lambda wc: data_dir(wc.target),
    log:
        f"{R}/logs/mixture_eval/{{target}}.log",
    threads: GPU_THREADS
    resources:
        **GPU_RES,
    shell:
        "{MERGEMIX} eval-models --threads {threads} --backend {params.backend:q} --pretrained {input.pretrained} "
        "--models {params.models} --target {params.target} --out {output} 2> {log}"
