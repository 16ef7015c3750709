# Per-dataset frozen heads, for backends that classify with one (clip: zero-shot heads). Each head
# is computed once from the pre-trained model and the dataset's class names and templates; the
# rules that train or evaluate on a dataset take its head as an input (head_files, common.smk).
if getattr(BACKEND_CLASS, "has_heads", False):

    rule zeroshot_head:
        """A dataset's zero-shot head: class names x templates through the text tower, averaged,
        scaled by the logit scale. Never trained or merged."""
        input:
            pretrained=PRETRAINED,
            pretrained_manifest=PRETRAINED_MANIFEST,
            data=lambda wc: prepared_files(wc.dataset),
        output:
            head=f"{HEADS}/{{dataset}}.safetensors",
            manifest=f"{HEADS}/{{dataset}}.json",
        log:
            f"{R}/logs/zeroshot_head/{{dataset}}.log",
        threads: RES["threads"]
        resources:
            **CPU_RES_THREADED,  # a few thousand prompts through the text tower: minutes on CPU, no GPU queue
        params:
            backend=BACKEND,
            data=lambda wc: data_dir(wc.dataset),
            templates=lambda wc: js(DATA_SPECS[wc.dataset].get("templates")),
        shell:
            "{MERGEMIX} head --threads {threads} --backend {params.backend:q} --pretrained {input.pretrained:q} "
            "--data {params.data:q} --templates {params.templates:q} --out {output.head:q} 2> {log:q}"
