# every dataset a target or candidate: each is embedded once
EMBEDDED = sorted(set(TARGETS) | {c for t in TARGETS for c in CANDIDATES[t]})


if PACK["embed"] == 1:

    rule embed:
        """Embeddings of a dataset's split from the pre-trained model (appendix A.4)."""
        input:
            pretrained=PRETRAINED,
            pretrained_manifest=PRETRAINED_MANIFEST,
            data=lambda wc: prepared_files(wc.dataset),
        output:
            f"{R}/embeddings/{{dataset}}.safetensors",
        log:
            f"{R}/logs/embed/{{dataset}}.log",
        threads: GPU_THREADS
        resources:
            **GPU_RES,
        params:
            backend=BACKEND,
            data=lambda wc: data_dir(wc.dataset),
            split=SETTINGS.analysis.similarity_split,
        shell:
            "{MERGEMIX} embed --threads {threads} --backend {params.backend:q} --pretrained {input.pretrained:q} "
            "--data {params.data:q} --split {params.split:q} --out {output:q} 2> {log:q}"

else:
    # pack.embed datasets per job: rules embed_pack0, 1, ... (see PACK in common.smk)
    for _k, _pack in enumerate(packs(EMBEDDED, PACK["embed"])):

        rule:
            """Embeddings of a pack of datasets' split from the pre-trained model, in one process."""
            name:
                f"embed_pack{_k}"
            input:
                pretrained=PRETRAINED,
                pretrained_manifest=PRETRAINED_MANIFEST,
                data=prepared_files(*_pack),
            output:
                [f"{R}/embeddings/{n}.safetensors" for n in _pack],
            log:
                f"{R}/logs/embed/pack{_k}.log",
            threads: GPU_THREADS
            resources:
                **pack_resources(GPU_RES, len(_pack)),
            params:
                backend=BACKEND,
                data=[data_dir(n) for n in _pack],
                split=SETTINGS.analysis.similarity_split,
            shell:
                "{MERGEMIX} embed-pack --threads {threads} --backend {params.backend:q} --pretrained {input.pretrained:q} "
                "--data {params.data:q} --split {params.split:q} --out {output:q} 2> {log:q}"


rule similarity:
    """The six similarity scores of every subset of a target's candidates."""
    input:
        target=f"{R}/embeddings/{{target}}.safetensors",
        candidates=lambda wc: [f"{R}/embeddings/{c}.safetensors" for c in CANDIDATES[wc.target]],
    output:
        f"{R}/similarity/{{target}}.csv",
    log:
        f"{R}/logs/similarity/{{target}}.log",
    group:
        SHORT_GROUP
    threads: 1
    resources:
        **CPU_RES,
    params:
        candidates=lambda wc: [f"{c}={R}/embeddings/{c}.safetensors" for c in CANDIDATES[wc.target]],
        subsets=lambda wc: (
            [] if similarity_subsets(wc.target) is None else ["--subsets", *similarity_subsets(wc.target)]
        ),
    shell:
        "{MERGEMIX} similarity --target {input.target:q} --candidates {params.candidates:q} {params.subsets:q} "
        "--out {output:q} 2> {log:q}"


FIG_FORMATS = list(SETTINGS.analysis.figure_formats)
FIGURES = ["merged_vs_mixture"] + [
    f"similarity_{m}" for m in ("avg_max_cos", "avg_min_l2", "avg_avg_cos", "avg_avg_l2", "max_max_cos", "min_min_l2")
]


rule analyze:
    """Correlations (section 4.2), baselines and the Table 1 layout, and Figure 1 style plots."""
    input:
        pretrained=f"{R}/pretrained.csv",
        merge_eval=expand(f"{R}/merge_eval/{{target}}.csv", target=TARGETS),
        search=expand(f"{R}/merge_eval/{{target}}.json", target=TARGETS),
        sampled=[f"{R}/merge_eval/sampled/{t}.csv" for t in TARGETS if needs_sampled_merges(t)],
        mixture=[f"{R}/mixture/{t}.csv" for t in TARGETS] if not TRAIN_NOTHING else [],
        similarity=expand(f"{R}/similarity/{{target}}.csv", target=TARGETS),
        final=[f"{R}/final/{t}.json" for t in TARGETS] if FINAL_ON else [],
        weighted=[f"{R}/final/{t}.weighted.json" for t in TARGETS] if WEIGHTS_ON else [],
    output:
        correlation=report(f"{R}/correlation.csv", caption="../report/correlation.rst", category="Tables"),
        selection=report(f"{R}/selection.csv", caption="../report/selection.rst", category="Tables"),
        similarity_selection=report(
            f"{R}/similarity_selection.csv", caption="../report/similarity_selection.rst", category="Tables"
        ),
        rankings=report(f"{R}/rankings.csv", caption="../report/rankings.rst", category="Tables"),
        figures=report(
            expand(f"{R}/figures/{{fig}}.{{fmt}}", fig=FIGURES, fmt=FIG_FORMATS),
            caption="../report/figures.rst",
            category="Figures",
        ),
        # the report's front page and inline tables: HTML versions of the CSVs above, and an overview figure
        overview=report(
            expand(f"{R}/figures/overview.{{fmt}}", fmt=FIG_FORMATS),
            caption="../report/overview.rst",
            category="Figures",
        ),
        selection_html=report(f"{R}/report/selection.html", caption="../report/selection.rst", category="Tables"),
        correlation_html=report(f"{R}/report/correlation.html", caption="../report/correlation.rst", category="Tables"),
        similarity_html=report(
            f"{R}/report/similarity_selection.html", caption="../report/similarity_selection.rst", category="Tables"
        ),
        front_page=f"{R}/report/front_page.html",  # included by workflow/report/workflow.rst
    log:
        f"{R}/logs/analyze.log",
    threads: 1
    resources:
        **CPU_RES,
    params:
        out_dir=lambda wc, output: str(Path(output.correlation).parent),  # the study folder R
        targets=js(CANDIDATES),
        options=js(
            {**SETTINGS.analysis.to_dict(), "mixtures": "off" if not MIXTURE_ON else "sampled" if SAMPLE else "all"}
        ),
        merge_eval=[f"{t}={R}/merge_eval/{t}.csv" for t in TARGETS],
        search=[f"{t}={R}/merge_eval/{t}.json" for t in TARGETS],
        sampled=[f"{t}={R}/merge_eval/sampled/{t}.csv" for t in TARGETS if needs_sampled_merges(t)],
        mixture=[f"{t}={R}/mixture/{t}.csv" for t in TARGETS] if not TRAIN_NOTHING else [],
        similarity=[f"{t}={R}/similarity/{t}.csv" for t in TARGETS],
        final=[f"{t}={R}/final/{t}.json" for t in TARGETS] if FINAL_ON else [],
        weighted=[f"{t}={R}/final/{t}.weighted.json" for t in TARGETS] if WEIGHTS_ON else [],
    shell:
        "{MERGEMIX} analyze --targets {params.targets:q} --options {params.options:q} "
        "--pretrained-csv {input.pretrained:q} --merge-eval {params.merge_eval:q} --search {params.search:q} "
        "--merge-eval-sampled {params.sampled:q} --mixture {params.mixture:q} "
        "--similarity {params.similarity:q} --final {params.final:q} --weighted {params.weighted:q} --out-dir {params.out_dir:q} 2> {log:q}"


def study_files():
    """Every file the study's jobs write (logs aside), for rule all. Snakemake reruns a job whose
    output is missing only when a target, or a job that runs anyway, needs that file; with all of
    them named by the target, deleting any file and rerunning rebuilds it and what depends on it."""
    cands = sorted({c for t in TARGETS for c in CANDIDATES[t]})
    used = sorted(set(TARGETS) | set(cands))
    prepared = used + ([PRETRAIN] if PRETRAIN in DATA_SPECS else [])
    files = [f"{download_dir(n)}/download.json" for n in prepared if n in DOWNLOADED]
    files += [f"{R}/given/{n}" for n in HUB_MODELS]
    files += prepared_files(*prepared) + [PRETRAINED, PRETRAINED_MANIFEST] + head_files(used)
    models = {finetuned(c) for c in cands} | {mixture_model(s) for t in TARGETS for s in mixtures_of(t)}
    files += [f for m in sorted(models) for f in (m, manifest(m))]
    files += [f"{R}/embeddings/{n}.safetensors" for n in used]
    for t in TARGETS:
        files += merge_eval_parts(t) + search_summaries(t)
        if FINAL_ON:
            files += [f"{R}/models/final/{t}/model.safetensors", f"{R}/models/final/{t}/model.json"]
    return files + list(rules.analyze.input)


STUDY_FILES = study_files()
