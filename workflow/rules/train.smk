if BACKEND_CLASS.can_pretrain:

    rule pretrain:
        """The built-in model's pre-training (smallcnn); hub backends fetch weights instead."""
        input:
            prepared_files(PRETRAIN),
        output:
            model=PRETRAINED,
            manifest=PRETRAINED_MANIFEST,
        log:
            f"{R}/logs/pretrain.log",
        threads: GPU_THREADS
        resources:
            **GPU_RES,
        params:
            backend=BACKEND,
            hp=js(PretrainHParams.from_dict(config["pretrain"]["hparams"], "pretrain.hparams")),
            data=lambda wc, input: str(Path(input[0]).parent),  # the prepared folder of the input files
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
        log:
            f"{R}/logs/fetch_pretrained.log",
        threads: 1
        resources:
            **CPU_RES,
        params:
            backend=BACKEND,
        shell:
            "{MERGEMIX} fetch-pretrained --backend {params.backend:q} --out {output.model:q} 2> {log:q}"


# every dataset some target has as a candidate: each is fine-tuned once (or given: models)
FINETUNED = sorted({c for t in TARGETS for c in CANDIDATES[t]} - set(GIVEN))
HUB_MODELS = sorted(n for n, s in GIVEN.items() if "hub" in s)


def given_files(name):
    """What import_model reads of a given model: its local file or folder, or its hub download."""
    spec = GIVEN[name]
    return [f"{R}/given/{name}"] if "hub" in spec else [spec["path"]]


if HUB_MODELS:

    localrules:
        download_model,

    rule download_model:
        """A given model's files from the hub at its pinned revision (a local rule: the only one
        that downloads given models; jobs on compute nodes read the folder)."""
        output:
            directory(f"{R}/given/{{name}}"),
        log:
            f"{R}/logs/download_model/{{name}}.log",
        wildcard_constraints:
            name="|".join(HUB_MODELS),
        threads: 1
        resources:
            **CPU_RES,
        params:
            spec=lambda wc: js(GIVEN[wc.name]),
        shell:
            "{MERGEMIX} download-model --spec {params.spec:q} --out {output:q} 2> {log:q}"


if GIVEN:

    rule import_model:
        """A given fine-tuned model checked against the pre-trained one (base, keys, shapes,
        distance) and saved in mergemix's format where the fine-tune would have written it."""
        input:
            pretrained=PRETRAINED,
            pretrained_manifest=PRETRAINED_MANIFEST,
            given=lambda wc: given_files(wc.dataset),
        output:
            model=f"{R}/models/finetuned/{{dataset}}/model.safetensors",
            manifest=f"{R}/models/finetuned/{{dataset}}/model.json",
        log:
            f"{R}/logs/import_model/{{dataset}}.log",
        wildcard_constraints:
            dataset="|".join(sorted(GIVEN)),
        threads: GPU_THREADS
        resources:
            **GPU_RES,
        params:
            backend=BACKEND,
            spec=lambda wc: js(GIVEN[wc.dataset]),
        shell:
            "{MERGEMIX} import-model --threads {threads} --backend {params.backend:q} --pretrained {input.pretrained:q} "
            "--spec {params.spec:q} --dataset {wildcards.dataset:q} --path {input.given:q} --out {output.model:q} 2> {log:q}"


if not FINETUNED:
    pass  # every candidate is given: nothing is fine-tuned
elif PACK["finetune"] == 1:

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
        log:
            f"{R}/logs/finetune/{{dataset}}.log",
        threads: GPU_THREADS
        resources:
            **GPU_RES,
        params:
            backend=BACKEND,
            hp=FINETUNE_HP,
            data=lambda wc: data_dir(wc.dataset),
        shell:
            "{MERGEMIX} finetune --threads {threads} {CHECKPOINT_ARGS} --backend {params.backend:q} --hparams {params.hp:q} "
            "--pretrained {input.pretrained:q} --data {params.data:q} --out {output.model:q} 2> {log:q}"

else:
    # pack.finetune datasets per job: rules finetune_pack0, 1, ... (see PACK in common.smk)
    for _k, _pack in enumerate(packs(FINETUNED, PACK["finetune"])):

        rule:
            """A pack of single-dataset fine-tunes in one process, each model bit for bit as its own
            job would write it (mergemix finetune-pack)."""
            name:
                f"finetune_pack{_k}"
            input:
                pretrained=PRETRAINED,
                pretrained_manifest=PRETRAINED_MANIFEST,
                data=prepared_files(*_pack),
                heads=head_files(_pack),
            output:
                models=[finetuned(n) for n in _pack],
                manifests=[manifest(finetuned(n)) for n in _pack],
            log:
                f"{R}/logs/finetune/pack{_k}.log",
            # first after pretrain: merge-eval waits for these, the mixtures (priority 0) for nothing
            priority: 2
            threads: GPU_THREADS
            resources:
                **pack_resources(GPU_RES, len(_pack)),
            params:
                backend=BACKEND,
                hp=FINETUNE_HP,
                data=[f"{n}={data_dir(n)}" for n in _pack],
                subsets=_pack,
            shell:
                "{MERGEMIX} finetune-pack --threads {threads} {CHECKPOINT_ARGS} --backend {params.backend:q} --hparams {params.hp:q} "
                "--pretrained {input.pretrained:q} --data {params.data:q} --subsets {params.subsets:q} "
                "--out {output.models:q} 2> {log:q}"


rule eval_pretrained:
    """theta_0 on every target's val and test splits (the baseline of every logit delta)."""
    input:
        pretrained=PRETRAINED,
        pretrained_manifest=PRETRAINED_MANIFEST,
        data=prepared_files(*TARGETS),
        heads=head_files(TARGETS),
    output:
        f"{R}/pretrained.csv",
    log:
        f"{R}/logs/eval_pretrained.log",
    group:
        EVAL_GROUP
    threads: GPU_THREADS
    resources:
        **GPU_RES,
    params:
        backend=BACKEND,
        targets=[f"{t}={data_dir(t)}" for t in TARGETS],
    shell:
        "{MERGEMIX} eval-pretrained --threads {threads} --backend {params.backend:q} "
        "--pretrained {input.pretrained:q} --targets {params.targets:q} --out {output:q} 2> {log:q}"


if not FINAL_ON:
    pass  # final.enabled: false: the chosen mixtures are not fine-tuned
elif PACK["finetune"] == 1:

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
        log:
            f"{R}/logs/final_finetune/{{target}}.log",
        threads: GPU_THREADS
        resources:
            **GPU_RES,
        params:
            backend=BACKEND,
            hp=FINETUNE_HP,
            data=lambda wc: [f"{c}={data_dir(c)}" for c in CANDIDATES[wc.target]],
            target=lambda wc: data_dir(wc.target),
        shell:
            "{MERGEMIX} final-finetune --threads {threads} {CHECKPOINT_ARGS} --backend {params.backend:q} --hparams {params.hp:q} "
            "--pretrained {input.pretrained:q} --merge-eval {input.merge_eval:q} --data {params.data:q} "
            "--target {params.target:q} --out {output.model:q} --eval-out {output.result:q} 2> {log:q}"

else:
    # pack.finetune targets per job: rules final_finetune_pack0, 1, ... (see PACK in common.smk)
    for _k, _pack in enumerate(packs(sorted(TARGETS), PACK["finetune"])):
        _names = sorted({n for t in _pack for n in CANDIDATES[t] + [t]})

        rule:
            """A pack of targets' final fine-tunes in one process, each as its own job would write it."""
            name:
                f"final_finetune_pack{_k}"
            input:
                pretrained=PRETRAINED,
                pretrained_manifest=PRETRAINED_MANIFEST,
                merge_eval=[f"{R}/merge_eval/{t}.csv" for t in _pack],
                data=prepared_files(*_names),
                heads=head_files(_names),
            output:
                models=[f"{R}/models/final/{t}/model.safetensors" for t in _pack],
                manifests=[f"{R}/models/final/{t}/model.json" for t in _pack],
                results=[f"{R}/final/{t}.json" for t in _pack],
            log:
                f"{R}/logs/final_finetune/pack{_k}.log",
            priority: 1
            threads: GPU_THREADS
            resources:
                **pack_resources(GPU_RES, len(_pack)),
            params:
                backend=BACKEND,
                hp=FINETUNE_HP,
                candidates=js({t: CANDIDATES[t] for t in _pack}),
                data=[f"{n}={data_dir(n)}" for n in _names],
                merge_eval=[f"{t}={R}/merge_eval/{t}.csv" for t in _pack],
                models=[f"{t}={R}/models/final/{t}/model.safetensors" for t in _pack],
                results=[f"{t}={R}/final/{t}.json" for t in _pack],
            shell:
                "{MERGEMIX} final-finetune-pack --threads {threads} {CHECKPOINT_ARGS} --backend {params.backend:q} --hparams {params.hp:q} "
                "--pretrained {input.pretrained:q} --candidates {params.candidates:q} --data {params.data:q} "
                "--merge-eval {params.merge_eval:q} --out {params.models:q} --eval-out {params.results:q} 2> {log:q}"
