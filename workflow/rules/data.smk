localrules:
    download_data,


rule download_data:
    """Fetch a dataset's files (sources with a download step only). A local rule: login nodes have
    internet, compute nodes often do not; every later job reads only these local files."""
    output:
        f"{R}/downloads/{{dataset}}/download.json",
    log:
        f"{R}/logs/download_data/{{dataset}}.log",
    threads: 1
    resources:
        **CPU_RES,
    params:
        spec=lambda wc: js(data_spec(wc.dataset)),
        out=lambda wc: download_dir(wc.dataset),
    shell:
        "{MERGEMIX} download --name {wildcards.dataset:q} --spec {params.spec:q} --out {params.out:q} 2> {log:q}"


# prepare_data writes a dataset's data file (data_file_name: arrays.safetensors or samples.jsonl)
# and then splits.json; both are outputs. A rule's output names one file for all its jobs, so the
# rule covers the datasets whose data file is PREPARED_FILE; a study with datasets of both kinds
# gets a second rule for the others (prepare_data_records, below).
PREPARED_KINDS = {}
for _name in sorted(DATA_SPECS):
    PREPARED_KINDS.setdefault(data_file_name(_name), []).append(_name)
PREPARED_FILE = "arrays.safetensors" if "arrays.safetensors" in PREPARED_KINDS else "samples.jsonl"


rule prepare_data:
    """One dataset: build it and write its deterministic train/val/test split indices."""
    input:
        lambda wc: [f"{download_dir(wc.dataset)}/download.json"] if wc.dataset in DOWNLOADED else [],
    output:
        splits=f"{R}/data/{{dataset}}/splits.json",
        data=f"{R}/data/{{dataset}}/{PREPARED_FILE}",
    log:
        f"{R}/logs/prepare_data/{{dataset}}.log",
    wildcard_constraints:
        dataset="|".join(PREPARED_KINDS[PREPARED_FILE]),
    threads: 1
    resources:
        **CPU_RES,
    params:
        spec=lambda wc: js(data_spec(wc.dataset)),
        split=js(SETTINGS.split),
        out=lambda wc: data_dir(wc.dataset),
        local=lambda wc: ["--local", download_dir(wc.dataset)] if wc.dataset in DOWNLOADED else [],
    shell:
        "{MERGEMIX} prepare --name {wildcards.dataset:q} --spec {params.spec:q} --split {params.split:q} "
        "{params.local:q} --out {params.out:q} 2> {log:q}"


if len(PREPARED_KINDS) > 1:

    use rule prepare_data as prepare_data_records with:
        output:
            splits=f"{R}/data/{{dataset}}/splits.json",
            data=f"{R}/data/{{dataset}}/samples.jsonl",
        wildcard_constraints:
            dataset="|".join(PREPARED_KINDS["samples.jsonl"]),
