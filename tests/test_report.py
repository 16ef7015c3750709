"""`snakemake --report` on the tiny study: the workflow description (front page), the tables as
HTML inline, the per-metric similarity table, captions, and a real headless browser (Debian's
chromium, when installed) rendering the report and the tables with no broken link."""

import base64
import html as htmllib
import json
import os
import re
import shutil
import subprocess
import urllib.parse
import warnings
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from test_workflow import run_study, snakemake

from conftest import ROOT, tiny_config
from mergemix import report_tables
from mergemix.report_tables import METRIC_LABELS
from mergemix.similarity import METRICS

REPORT_TABLES = ["selection.html", "correlation.html", "similarity_selection.html"]


@pytest.fixture(scope="module")
def report(tiny_study, tmp_path_factory):
    """The tiny study (4 digits domains, every mixture fine-tuned; the session's one run) and its report."""
    pytest.importorskip("pygments", reason="snakemake --report needs pygments: pip install 'snakemake[reports]'")
    tmp = tmp_path_factory.mktemp("report")
    cfg, path, out, _ = tiny_study
    html = tmp / "report.html"
    snakemake(path, "--report", str(html))
    return cfg, out, html


def script_var(html: str, name: str):
    """A JSON variable of the report's own script blocks (<script id="results"> var results = ...;)."""
    m = re.search(rf'<script id="{name.replace("_", "-")}">\s*var {name} = (.*?);\s*</script>', html, re.DOTALL)
    assert m, f"no {name} in the report"
    return json.loads(m.group(1))


def data_uri_bytes(uri: str) -> bytes:
    head, _, payload = uri.partition(",")
    assert head.startswith("data:") and head.endswith(";base64"), head[:80]
    return base64.b64decode(payload)


class Elements(HTMLParser):
    """Tags with their attributes, table rows as cell texts, and text, outside scripts and styles."""

    def __init__(self):
        super().__init__()
        self.tags, self.rows, self.text = [], [], []
        self._skip, self._row, self._cell = 0, None, None

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self._skip += 1
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._skip -= 1
        elif tag in ("td", "th") and self._cell is not None:
            self._row.append(" ".join(" ".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._skip:
            return
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def parse(html: str) -> Elements:
    p = Elements()
    p.feed(html)
    return p


def row_of(rows, first: str):
    hits = [r for r in rows if r and r[0] == first]
    assert hits, f"no table row for {first!r}"
    return hits[0]


def fmt(v) -> str:
    return "–" if pd.isna(v) else f"{v:.3f}"


@pytest.mark.workflow
def test_report_front_page_tables_and_captions(report):
    cfg, out, path = report
    html = path.read_text(encoding="utf-8")
    targets = sorted(cfg["datasets"])
    sel = pd.read_csv(out / "selection.csv").set_index("target")
    simsel = pd.read_csv(out / "similarity_selection.csv").set_index("target")
    metric = sel.loc["average", "similarity_metric"]
    assert metric in METRICS

    # the workflow description: what the study is and ran, how to read it, with the selection table inline
    desc = parse(script_var(html, "workflow_desc"))
    text = " ".join("".join(desc.text).split())
    for phrase in [
        f"Merge to Mix: study {cfg['study']}",
        "What this study ran",
        "How to read the report",
        "Validation and test",
        "backend smallcnn",
        "Targets (4): " + ", ".join(targets),
        "Results at a glance",
    ]:
        assert phrase in text, phrase
    assert "system-message" not in script_var(html, "workflow_desc")  # no rst error rendered into the page
    for t in targets:  # Table 1 layout, 3 decimals, the columns in words
        row = row_of(desc.rows, t)
        assert row[1:4] == [
            fmt(sel.loc[t, "pretrained"]),
            fmt(sel.loc[t, "m2m_merged"]),
            fmt(sel.loc[t, "m2m_finetuned"]),
        ]
    assert row_of(desc.rows, "Average")[2] == fmt(sel.loc["average", "m2m_merged"])
    header = row_of(desc.rows, "Target task")
    assert "Merge to Mix (merged model)" in header and "Oracle" in header
    assert any(METRIC_LABELS[metric] in h for h in header)  # the similarity column names its metric in words
    assert not any(code in " ".join(header) for code in ("m2m_", "pearson_", metric))
    imgs = [a for tag, a in desc.tags if tag == "img"]
    assert len(imgs) == 1 and data_uri_bytes(imgs[0]["src"]).startswith(b"\x89PNG")  # the overview, embedded

    # the tables as HTML results of the report (shown inline), next to the CSVs
    results = script_var(html, "results")
    by_name = {Path(k).name: v for k, v in results.items()}
    assert {*REPORT_TABLES, "selection.csv", "similarity_selection.csv", "correlation.csv", "overview.png"} <= set(
        by_name
    )
    for name in REPORT_TABLES:
        assert by_name[name]["mime_type"] == "text/html"
    page = parse(data_uri_bytes(by_name["selection.html"]["data_uri"]).decode())
    for t in targets:
        row = row_of(page.rows, t)
        assert fmt(sel.loc[t, "oracle"]) in row and fmt(sel.loc[t, "random"]) in row
    page = parse(data_uri_bytes(by_name["similarity_selection.html"]["data_uri"]).decode())
    header = " ".join(row_of(page.rows, "Target task"))
    assert all(METRIC_LABELS[m] in header for m in METRICS)
    for t in [*targets, "average"]:
        row = row_of(page.rows, "Average" if t == "average" else t)
        assert [c.split()[0] for c in row[1:]] == [fmt(simsel.loc[t, m]) for m in METRICS]
    assert fmt(simsel.loc["average", metric]) == fmt(
        sel.loc["average", "similarity"]
    )  # its column in the selection table
    page = parse(data_uri_bytes(by_name["correlation.html"]["data_uri"]).decode())
    corr = pd.read_csv(out / "correlation.csv").set_index("target")
    for t in targets:
        r = corr.loc[t, "pearson_logit"]
        assert row_of(page.rows, t)[2] == ("–" if pd.isna(r) else f"{r:.2f}")
    assert data_uri_bytes(by_name["overview.png"]["data_uri"]).startswith(b"\x89PNG")

    # captions say how the numbers were computed: the similarity metric is chosen on test accuracy
    for name in ("selection.html", "similarity_selection.html"):
        cap = " ".join(re.sub(r"<[^>]+>", "", by_name[name]["caption"]).split())
        assert "test" in cap and "section 4.3" in cap and "favours" in cap, cap
    cap = " ".join(re.sub(r"<[^>]+>", "", by_name["overview.png"]["caption"]).split())
    assert "oracle" in cap and "pre-trained" in cap


def chromium() -> str | None:
    """A headless Chromium: on PATH, or Debian's package installed now when this runs as root with
    apt-get (as tests/slurm/cluster.sh installs Slurm); None when neither works (the test skips)."""
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
    found = next((shutil.which(n) for n in names if shutil.which(n)), None)
    if found is None and shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (
            ["apt-get", "install", "-y", "-qq", "chromium"],
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "chromium"],
        ):
            if (
                subprocess.run(cmd, capture_output=True, env=env, timeout=900, check=False).returncode == 0
                and cmd[1] == "install"
            ):
                break
        found = next((shutil.which(n) for n in names if shutil.which(n)), None)
    return found


# Run in the page once it has loaded (and React has drawn it): what each image, table and link
# became, written into the DOM for --dump-dom to return.
PROBE = """<script>
window.addEventListener("load", () => setTimeout(() => {
  const root = document.getElementById("app");
  const probe = {
    images: [...root.querySelectorAll("img")].map(i => ({src: i.getAttribute("src").slice(0, 40), complete: i.complete, width: i.naturalWidth})),
    tables: [...root.querySelectorAll("table")].map(t => [...t.querySelectorAll("tr")].map(r => [...r.cells].map(c => c.textContent.trim()))),
    links: [...document.querySelectorAll("[href], [src]")].map(e => e.getAttribute("href") ?? e.getAttribute("src")),
    hasResult: (typeof results !== "undefined") ? Object.keys(results) : [],
  };
  const pre = document.createElement("pre");
  pre.id = "mm-probe";
  pre.textContent = JSON.stringify(probe);
  document.body.appendChild(pre);
}, 200));
</script>"""


def dump_dom(browser: str, page: Path, profile: Path) -> str:
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        page.as_uri(),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.workflow
def test_report_renders_in_a_headless_browser(report, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip(
            "no headless Chromium on PATH (Debian: apt-get install chromium); the report's HTML is checked "
            "without a browser by test_report_front_page_tables_and_captions"
        )
    cfg, _, path = report
    targets = sorted(cfg["datasets"])
    html = path.read_text(encoding="utf-8")
    probed = tmp_path / "probed.html"
    end = html.rindex("</body>")  # the last one: the report's scripts hold the string too
    probed.write_text(html[:end] + PROBE + html[end:], encoding="utf-8")
    dom = dump_dom(browser, probed, tmp_path / "profile")
    m = re.search(r'<pre id="mm-probe">(.*?)</pre>', dom, re.DOTALL)
    assert m, "the page did not finish loading in the browser"
    probe = json.loads(htmllib.unescape(m.group(1)))

    # the front page: the overview image decoded, the selection table drawn with a row per target
    assert all(i["complete"] and i["width"] > 0 for i in probe["images"]), probe["images"]  # every image decoded
    images = [i for i in probe["images"] if i["src"].startswith("data:image/png")]
    assert images and all(i["width"] > 300 for i in images), probe["images"]
    selection = [t for t in probe["tables"] if t and t[0] and t[0][0] == "Target task"]
    assert selection, probe["tables"]
    assert [r[0] for r in selection[0][1:]] == targets + ["Average"]

    # no broken links: each href/src is an in-page anchor, a data: URI that decodes, or the report's own
    # navigation to a result or category that exists in it
    results = script_var(html, "results")
    categories = script_var(html, "categories")
    assert set(probe["hasResult"]) == set(results)
    for link in probe["links"]:
        if link.startswith("#"):
            continue
        if link.startswith("data:"):
            if ";base64," in link:
                assert data_uri_bytes(link), link[:60]
            continue
        m = re.fullmatch(r"javascript:app\.(showResultInfo|showCategory)\('(.*)'\)", link)
        assert m, f"link neither in-page nor a data URI: {link[:120]}"
        arg = urllib.parse.unquote(m.group(2))
        assert arg in (results if m.group(1) == "showResultInfo" else categories), link

    # the tables the report embeds render on their own: rows per target, no link out
    for name in REPORT_TABLES:
        uri = next(v["data_uri"] for k, v in results.items() if Path(k).name == name)
        page = tmp_path / name
        page.write_bytes(data_uri_bytes(uri))
        shown = parse(dump_dom(browser, page, tmp_path / "profile"))
        firsts = [r[0] for r in shown.rows if r]
        assert set(targets) <= set(firsts) and "Average" in firsts, (name, firsts)
        assert not [a for tag, a in shown.tags if "href" in a or ("src" in a and tag != "script")], name


# ---------------------------------------------------------------------------------------------
# without the workflow: studies that leave columns empty, and every caption in every kind of study


def selection_only_tables():
    """Tables as a selection-only study writes them (mixture.enabled and final.enabled false)."""
    targets = ["a", "b"]
    nan = float("nan")
    sel = pd.DataFrame(
        {
            "target": [*targets, "average"],
            "pretrained": [0.5, 0.6, 0.55],
            "m2m_merged": [0.7, 0.8, 0.75],
            "m2m_finetuned": nan,
            "m2m_weighted": nan,
            "all_datasets": nan,
            "similarity": nan,
            "similarity_metric": "",
            "random": nan,
            "oracle": nan,
            "selected": ["b+c", "a", ""],
            "similarity_subset": "",
            "oracle_subset": "",
            "search": "exhaustive",
            "evaluations": [3, 3, 3],
            "exhaustive_evaluations": [3, 3, 3],
            "val_examples": [30, 30, 30],
            "exhaustive_val_examples": [30, 30, 30],
            "mixtures": nan,
            "oracle_scope": "",
        }
    )
    corr = pd.DataFrame(
        {
            "target": [*targets, "average"],
            "n_points": nan,
            "pearson_acc": nan,
            "pearson_logit": nan,
            **{f"{m}_pearson_{k}": nan for m in METRICS for k in ("acc", "logit")},
        }
    )
    simsel = pd.DataFrame({"target": [*targets, "average"], **{m: nan for m in METRICS}})
    choices = {"a": {m: "b" for m in METRICS}, "b": {m: "a+c" for m in METRICS}}
    return sel, corr, simsel, choices


def test_tables_of_a_selection_only_study(tmp_path):
    sel, corr, simsel, choices = selection_only_tables()
    paths = report_tables.write_report(tmp_path, sel, corr, simsel, choices, "", overview_png=b"\x89PNG fake")
    assert sorted(p.name for p in paths) == sorted([*REPORT_TABLES, "front_page.html"])
    pages = {p.name: p.read_text() for p in paths}
    assert not any("nan" in re.sub(r"<style>.*?</style>", "", t, flags=re.DOTALL).lower() for t in pages.values())
    page = parse(pages["selection.html"])
    assert row_of(page.rows, "a")[1:4] == ["0.500", "0.700", "–"]  # pre-trained, merged, fine-tuned (not run)
    assert "Merge to Mix (weighted fine-tune)" not in " ".join(row_of(page.rows, "Target task"))  # only when run
    assert "did not run" in "".join(page.text)
    page = parse(pages["similarity_selection.html"])
    assert row_of(page.rows, "b")[1:] == ["– a+c"] * len(METRICS)  # no accuracy, the choice still shown
    assert "No metric is reported" in "".join(page.text)
    front = parse(pages["front_page.html"])
    assert [a["src"][:22] for tag, a in front.tags if tag == "img"] == ["data:image/png;base64,"]


STUDY_KINDS = {
    "every mixture": {},
    "sampled mixtures": {"mixture": {"enabled": True, "sample": {"size": 3, "seed": 0}}},
    "no mixture study": {"mixture": {"enabled": False}},
    "no final fine-tune": {"final": {"enabled": False}},
    "selection only": {"mixture": {"enabled": False}, "final": {"enabled": False}},
}


@pytest.mark.parametrize("kind", list(STUDY_KINDS))
def test_captions_render_for_every_kind_of_study(kind, default_config, tmp_path):
    """Each caption and the workflow description render as Snakemake renders them (Jinja with
    trim_blocks and lstrip_blocks, then docutils) with no reStructuredText error or warning."""
    from types import SimpleNamespace as NS

    import jinja2
    from docutils.core import publish_parts

    from mergemix.config import validate_config

    cfg = validate_config({**default_config, "results_dir": str(tmp_path), **STUDY_KINDS[kind]})
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "front_page.html").write_text('<div class="mm-front">front</div>')
    files = [NS(target=n, path=tmp_path / "report" / n) for n in REPORT_TABLES] + [
        NS(target=n, path=tmp_path / n) for n in ("selection.csv", "rankings.csv")
    ]
    categories = [NS(name="Tables"), NS(name="Figures")]
    links = "\n".join(
        [".. _Tables: javascript:x", ".. _Figures: javascript:x", *(f".. _{f.target}: javascript:y" for f in files)]
    )
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    texts = {}
    for rst in sorted((ROOT / "workflow" / "report").glob("*.rst")):
        text = env.from_string(rst.read_text() + "\n\n" + links).render(
            snakemake=NS(config=cfg), categories=categories, files=files
        )
        with warnings.catch_warnings():  # docutils 0.22 deprecates writer_name, which Snakemake still uses
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            body = publish_parts(text, writer_name="html", settings_overrides={"report_level": 2, "halt_level": 2})[
                "html_body"
            ]
        assert "system-message" not in body, (rst.name, body)
        texts[rst.name] = " ".join(re.sub(r"<[^>]+>", "", body).split())
    assert "Merge to Mix: study digits" in texts["workflow.rst"] and "front" in texts["workflow.rst"]
    assert "section 4.3" in texts["selection.rst"] and "section 4.3" in texts["similarity_selection.rst"]
    if kind == "selection only":
        assert "Selection only" in texts["selection.rst"] and "Selection only" in texts["workflow.rst"]
    if kind == "sampled mixtures":
        assert "oracle among sampled" in texts["selection.rst"]
    if kind == "no mixture study":
        assert "No mixture study" in texts["selection.rst"] and "No mixture study" in texts["correlation.rst"]
