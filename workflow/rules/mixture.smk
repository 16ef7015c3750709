# the mixtures of two or more datasets fine-tuned for any target (a one-dataset mixture is that
# dataset's fine-tuned model), each once
MIXTURES = sorted({s for t in TARGETS for s in mixtures_of(t) if len(parse_subset(s)) > 1}, key=sort_key)


if PACK["finetune"] == 1:

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
        log:
            f"{R}/logs/mixture_finetune/{{subset}}.log",
        threads: GPU_THREADS
        resources:
            **GPU_RES,
        params:
            backend=BACKEND,
            hp=FINETUNE_HP,
            data=lambda wc: [data_dir(n) for n in parse_subset(wc.subset)],
        shell:
            "{MERGEMIX} finetune --threads {threads} {CHECKPOINT_ARGS} --backend {params.backend:q} --hparams {params.hp:q} "
            "--pretrained {input.pretrained:q} --data {params.data:q} --out {output.model:q} 2> {log:q}"

else:
    # pack.finetune mixtures per job: rules mixture_finetune_pack0, 1, ... (see PACK in common.smk)
    for _k, _pack in enumerate(packs(MIXTURES, PACK["finetune"])):
        _names = sorted({n for s in _pack for n in parse_subset(s)})

        rule:
            """A pack of mixture fine-tunes in one process, each model bit for bit as its own job
            would write it (mergemix finetune-pack)."""
            name:
                f"mixture_finetune_pack{_k}"
            input:
                pretrained=PRETRAINED,
                pretrained_manifest=PRETRAINED_MANIFEST,
                data=prepared_files(*_names),
                heads=head_files(_names),
            output:
                models=[f"{R}/models/mixture/{s}/model.safetensors" for s in _pack],
                manifests=[f"{R}/models/mixture/{s}/model.json" for s in _pack],
            log:
                f"{R}/logs/mixture_finetune/pack{_k}.log",
            threads: GPU_THREADS
            resources:
                **pack_resources(GPU_RES, len(_pack)),
            params:
                backend=BACKEND,
                hp=FINETUNE_HP,
                data=[f"{n}={data_dir(n)}" for n in _names],
                subsets=_pack,
            shell:
                "{MERGEMIX} finetune-pack --threads {threads} {CHECKPOINT_ARGS} --backend {params.backend:q} --hparams {params.hp:q} "
                "--pretrained {input.pretrained:q} --data {params.data:q} --subsets {params.subsets:q} "
                "--out {output.models:q} 2> {log:q}"


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
    log:
        f"{R}/logs/mixture_eval/{{target}}.log",
    group:
        EVAL_GROUP
    threads: GPU_THREADS
    resources:
        **GPU_RES,
    params:
        backend=BACKEND,
        models=lambda wc: [f"{s}={mixture_model(s)}" for s in mixtures_of(wc.target)],
        target=lambda wc: data_dir(wc.target),
    shell:
        "{MERGEMIX} eval-models --threads {threads} --backend {params.backend:q} --pretrained {input.pretrained:q} "
        "--models {params.models:q} --target {params.target:q} --out {output:q} 2> {log:q}"
