localrules:
    download_data,


rule download_data:
    """Fetch a dataset's files (sources with a download step only). A local rule: login nodes have
    internet, compute nodes often do not; every later job reads only these local files."""
    output:
        f"{R}/downloads/{{dataset}}/download.json",
    params:
        spec=lambda wc: js(data_spec(wc.dataset)),
        out=lambda wc: download_dir(wc.dataset),
    log:
        f"{R}/logs/download_data/{{dataset}}.log",
    threads: 1
    resources:
        **CPU_RES,
    shell:
        "{MERGEMIX} download --name {wildcards.dataset} --spec {params.spec:q} --out {params.out} 2> {log}"


rule prepare_data:
    """One dataset: build it and write its deterministic train/val/test split indices."""
    input:
        lambda wc: [f"{download_dir(wc.dataset)}/download.json"] if wc.dataset in DOWNLOADED else [],
    output:
        # splits.json is written last, beside arrays.safetensors (array samples) or samples.jsonl
        # (record samples, e.g. chats); a rule output cannot name one or the other, so only it is declared
        splits=f"{R}/data/{{dataset}}/splits.json",
    params:
        spec=lambda wc: js(data_spec(wc.dataset)),
        split=js(config["split"]),
        out=lambda wc: data_dir(wc.dataset),
        local=lambda wc: f"--local {download_dir(wc.dataset)}" if wc.dataset in DOWNLOADED else "",
    log:
        f"{R}/logs/prepare_data/{{dataset}}.log",
    threads: 1
    resources:
        **CPU_RES,
    shell:
        "{MERGEMIX} prepare --name {wildcards.dataset} --spec {params.spec:q} --split {params.split:q} "
        "{params.local} --out {params.out} 2> {log}"
