if BACKEND_CLASS.can_pretrain:

    rule pretrain:
        """The built-in model's pre-training (smallcnn); hub backends fetch weights instead."""
        input:
            prepared_files(PRETRAIN),
        output:
            model=PRETRAINED,
            manifest=PRETRAINED_MANIFEST,
        params:
            backend=BACKEND,
            hp=js(config.get("pretrain", {}).get("hparams", {})),
            data=data_dir(PRETRAIN),
        log:
            f"{R}/logs/pretrain.log",
        threads: GPU_THREADS
        resources:
            **GPU_RES,
        shell:
            "{MERGEMIX} pretrain --threads {threads} --backend {params.backend:q} --hparams {params.hp:q} "
            "--data {params.data:q} --out {output.model:q} 2> {log:q}"


else:

    localrules:
        fetch_pretrained,

    rule fetch_pretrained:
        """Published pre-trained weights (hub or local path) saved in mergemix's format. A local
        rule, the only one that may download model weights."""
        output:
            model=PRETRAINED,
            manifest=PRETRAINED_MANIFEST,
        params:
            backend=BACKEND,
        log:
            f"{R}/logs/fetch_pretrained.log",
        threads: 1
        resources:
            **CPU_RES,
        shell:
            "{MERGEMIX} fetch-pretrained --backend {params.backend:q} --out {output.model:q} 2> {log:q}"


rule finetune:
    """theta_i: the pre-trained model fine-tuned on one dataset (identical hyperparameters for all)."""
    input:
        pretrained=PRETRAINED,
        pretrained_manifest=PRETRAINED_MANIFEST,
        data=lambda wc: prepared_files(wc.dataset),
        heads=lambda wc: head_files([wc.dataset]),
    output:
        model=f"{R}/models/finetuned/{{dataset}}/model.safetensors",
        manifest=f"{R}/models/finetuned/{{dataset}}/model.json",
    params:
        backend=BACKEND,
        hp=FINETUNE_HP,
        data=lambda wc: data_dir(wc.dataset),
    log:
        f"{R}/logs/finetune/{{dataset}}.log",
    threads: GPU_THREADS
    resources:
        **GPU_RES,
    shell:
        "{MERGEMIX} finetune --threads {threads} --backend {params.backend:q} --hparams {params.hp:q} "
        "--pretrained {input.pretrained:q} --data {params.data:q} --out {output.model:q} 2> {log:q}"


rule eval_pretrained:
    """theta_0 on every target's val and test splits (the baseline of every logit delta)."""
    input:
        pretrained=PRETRAINED,
        pretrained_manifest=PRETRAINED_MANIFEST,
        data=prepared_files(*TARGETS),
        heads=head_files(TARGETS),
    output:
        f"{R}/pretrained.csv",
    params:
        backend=BACKEND,
        targets=[f"{t}={data_dir(t)}" for t in TARGETS],
    log:
        f"{R}/logs/eval_pretrained.log",
    threads: GPU_THREADS
    resources:
        **GPU_RES,
    shell:
        "{MERGEMIX} eval-pretrained --threads {threads} --backend {params.backend:q} "
        "--pretrained {input.pretrained:q} --targets {params.targets:q} --out {output:q} 2> {log:q}"


rule final_finetune:
    """Algorithm 1's deployed model: fine-tuned on the mixture selected by merged val accuracy."""
    input:
        pretrained=PRETRAINED,
        pretrained_manifest=PRETRAINED_MANIFEST,
        merge_eval=f"{R}/merge_eval/{{target}}.csv",
        data=lambda wc: prepared_files(*CANDIDATES[wc.target], wc.target),
        heads=lambda wc: head_files(CANDIDATES[wc.target] + [wc.target]),
    output:
        model=f"{R}/models/final/{{target}}/model.safetensors",
        manifest=f"{R}/models/final/{{target}}/model.json",
        result=f"{R}/final/{{target}}.json",
    params:
        backend=BACKEND,
        hp=FINETUNE_HP,
        data=lambda wc: [f"{c}={data_dir(c)}" for c in CANDIDATES[wc.target]],
        target=lambda wc: data_dir(wc.target),
    log:
        f"{R}/logs/final_finetune/{{target}}.log",
    threads: GPU_THREADS
    resources:
        **GPU_RES,
    shell:
        "{MERGEMIX} final-finetune --threads {threads} --backend {params.backend:q} --hparams {params.hp:q} "
        "--pretrained {input.pretrained:q} --merge-eval {input.merge_eval:q} --data {params.data:q} "
        "--target {params.target:q} --out {output.model:q} --eval-out {output.result:q} 2> {log:q}"
