rule prepare_data:
    """One dataset: build it and write its deterministic train/val/test split indices."""
    output:
        arrays=f"{R}/data/{{dataset}}/arrays.safetensors",
        splits=f"{R}/data/{{dataset}}/splits.json",
    params:
        spec=lambda wc: js(DATA_SPECS[wc.dataset]),
        split=js(config["split"]),
        out=lambda wc: data_dir(wc.dataset),
    log:
        f"{R}/logs/prepare_data/{{dataset}}.log",
    threads: 1
    resources:
        mem_mb=RES["mem_mb"],
        runtime=RES["runtime"],
    shell:
        "mergemix prepare --name {wildcards.dataset} --spec {params.spec:q} --split {params.split:q} "
        "--out {params.out} 2> {log}"
