"""The self-contained HTML report: summary, contents, tables (sortable), figures with captions, definitions,
settings, provenance and failed cells. No network: style, script and plots (base64 PNG) are inline."""
from __future__ import annotations

import base64
import html
import json

import pandas as pd

from reports.render import NOT_APPLICABLE, html_table, shown_tables
from reports.table import ComparisonTable

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em 2em; color: #222; max-width: 1900px; }
table { border-collapse: collapse; margin: 0.6em 0 1.4em; font-size: 0.78em; }
caption { text-align: left; font-weight: 600; padding: 0.3em 0; }
th, td { border-bottom: 1px solid #ccc; padding: 0.2em 0.4em; text-align: right; white-space: nowrap; }
thead th { white-space: normal; vertical-align: bottom; }
div.flags { white-space: normal; font-weight: normal; max-width: 16em; margin-top: 0.15em; }
td.na { color: #888; cursor: help; }
th:first-child, td.note, table.meta td, table.failed td { text-align: left; }
td.note { color: #555; font-size: 0.92em; }
table.failed td, table.meta td { white-space: normal; overflow-wrap: anywhere; }
thead th { border-bottom: 2px solid #444; position: relative; }
table.sortable thead th { cursor: pointer; }
table.sortable thead th[aria-sort="ascending"]::after { content: " \\25B2"; font-size: 0.7em; }
table.sortable thead th[aria-sort="descending"]::after { content: " \\25BC"; font-size: 0.7em; }
.scroll { overflow-x: auto; max-width: 100%; }
.flag { display: inline-block; background: #fde3c8; color: #7a3d00; border-radius: 3px; padding: 0 0.35em;
        margin-right: 0.2em; font-size: 0.85em; cursor: help; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
figure { margin: 1em 0 2em; }
figcaption { max-width: 80em; color: #333; }
dt { font-weight: 600; margin-top: 0.5em; }
dd { margin-left: 1.5em; max-width: 80em; }
nav ul { columns: 2; max-width: 60em; }
"""

# Click a header to sort its table's rows (numbers by data-v, text otherwise); again to reverse.
# With #selftest in the URL the page checks itself and writes the findings as JSON into <pre id=selftest>.
SCRIPT = """
function sortBy(th) {
  const table = th.closest('table'), body = table.tBodies[0], i = th.cellIndex;
  const down = th.getAttribute('aria-sort') === 'ascending';
  table.querySelectorAll('thead th').forEach(h => h.removeAttribute('aria-sort'));
  th.setAttribute('aria-sort', down ? 'descending' : 'ascending');
  const key = row => { const c = row.cells[i]; const v = c && c.dataset.v;
    return v !== undefined && v !== '' && !isNaN(+v) ? +v : (c ? c.textContent.trim() : ''); };
  const rows = Array.from(body.rows).sort((a, b) => {
    const x = key(a), y = key(b);
    const order = (typeof x === 'number' && typeof y === 'number') ? x - y : String(x).localeCompare(String(y));
    return down ? -order : order; });
  rows.forEach(r => body.appendChild(r));
}
document.querySelectorAll('table.sortable thead th').forEach(th => th.addEventListener('click', () => sortBy(th)));
function selftest() {
  // a table that scrolls inside its box does not widen the page: each box is checked too
  const boxes = Array.from(document.querySelectorAll('.scroll')).map(b => ({id: b.id, scrollWidth: b.scrollWidth,
                                                                           clientWidth: b.clientWidth}));
  const out = {scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth, boxes: boxes,
               images: Array.from(document.images).map(im => ({alt: im.alt, naturalWidth: im.naturalWidth})),
               summary: document.getElementById('summary').textContent, sorted: null};
  const table = document.querySelector('table.sortable');
  const th = table && Array.from(table.tHead.rows[0].cells).find(h => {
    const i = h.cellIndex; const v = Array.from(table.tBodies[0].rows).map(r => r.cells[i] && r.cells[i].dataset.v)
      .filter(x => x); return new Set(v).size > 1; });
  if (th) {
    th.click();
    const values = Array.from(table.tBodies[0].rows).map(r => r.cells[th.cellIndex].dataset.v)
      .filter(v => v !== undefined && v !== '').map(Number);
    out.sorted = {column: th.textContent, values: values};
  }
  document.getElementById('selftest').textContent = JSON.stringify(out);
}
if (location.hash === '#selftest') { window.addEventListener('load', selftest); }
"""

FIGURE_CAPTIONS = {
    "bound_vs_k": ("Each model's IWAE_K bound (circles) against the number of importance samples K on a log axis, "
                   "its ELBO at K = 1 (open square), and its log p(x) (dashed, exact or best estimate). A bound "
                   "that rises with K toward its dashed line is tightening; the distance left is the gap. Bars: "
                   "± standard error. Flagged rows are drawn but do not set the axes."),
    "gap": ("For each model, its own best log p(x) minus each of its bounds (reference in brackets), a bar per "
            "bound; shorter is tighter. The axis is symlog (linear within 0.1 nats); bars: ± paired standard error "
            "(per-example differences on shared examples and draws), often much smaller than either number's."),
    "kl_layers": ("Where the KL goes: for a hierarchy, the KL of each layer (a category, 1 = next to the data); for a "
                  "diffusion, T x the KL of each step along its time t (lines of different T comparable)."),
    "throughput": ("Samples per second of each estimator against K, one panel per model, all panels on one scale "
                   "(shared log axes) so heights compare across models; line style: device. A point is the median "
                   "over every timed call (all seeds), its bar the interquartile range of those calls: how much "
                   "the speed varied from call to call (a panel's title gives its widest, as a share of the median: "
                   "a few percent hides behind the marker)."),
    "bound_vs_steps": ("Bounds against a diffusion's steps T and a hierarchy's layers L on one log axis, for datasets "
                       "where some model was run at two or more T or L (colour: series, a line through its T or L; "
                       "style: bound; a one-layer model is a large square at L = 1 for reference); log p(x) dashed "
                       "black. A range of many decades gets a symlog axis and a zoomed linear panel below."),
    "gradient_snr": ("Signal-to-noise ratio of gradient estimates against K on log axes; the slope says how fast more "
                     "samples help (K^0.5 for a well-behaved estimator)."),
}

DEFINITIONS = [
    ("ELBO, IWAE_K", "Evidence lower bound (one draw per example) and the importance-weighted bound with K draws; "
                     "both are lower bounds on log p(x) in nats per example, higher is tighter."),
    ("log p(x), log p(x) from", "The model's log-likelihood: exact where the model has a closed form, else its best "
                                "estimate (AIS above IWAE with the most draws); the next column says which."),
    ("gap", "The model's own best log p(x) minus a bound, mean over examples of the per-example difference; never "
            "another model's log p(x). Its error is paired (sd of the differences / sqrt(n))."),
    ("stderr vs mc_stderr", "The ± of a cell is the standard error over examples (how much the mean would move with "
                            "other test examples), combined over seeds. mc_stderr in the rows is the Monte Carlo "
                            "error alone (same examples, fresh draws), usually much smaller."),
    ("seeds", "Training seeds averaged over; the ± then also carries the spread between seeds."),
    ("KL z_l, KL total", "KL divergence of each stochastic layer's posterior from its prior, nats per example."),
    ("AU", "Active units: latent dimensions whose posterior mean varies across examples (variance > 0.01)."),
    ("samples/s (device)", "Draws per second of the estimator of the model's tightest bound, at that bound's K "
                           "(the note says which), the median of the timed repeats."),
    ("AIS", "Annealed importance sampling estimate of log p(x) (steps x chains, leapfrog steps, schedule, start); a "
            "stochastic lower bound, tighter than IWAE with enough steps."),
    ("BDMC", "Bidirectional Monte Carlo on simulated data: AIS forward (lower) and reverse (upper) bounds; the gap "
             "upper - lower bounds the error of AIS at those settings."),
    ("k-hat", "Pareto shape of the largest importance weights per example (PSIS). Above 0.7 the weights' variance is "
              "effectively infinite and the estimate unreliable."),
    ("ESS", "Effective sample size of the K importance weights, (sum w)^2 / sum w^2: near 1 means one draw dominates."),
    ("flags", "Computed from the rows, beside a model that should not be taken at face value: weights (k-hat > 0.7 "
              "on more than 20% of examples, or ESS about 1), below uniform (a bound under -D log 2 on D binary "
              "dims), not converged (validation ELBO still rising at the end of training), failed (a measurement "
              "that raised an error or gave no finite number). Hover a flag for its numbers."),
    (f"{NOT_APPLICABLE} (dash)", "Not applicable: the estimator does not apply to this model (active units of a "
                                 "model without posterior means, say); not a failure and no reason for distrust. "
                                 "Hover it for the reason. An empty cell: not measured in these runs."),
]


def _e(text: object) -> str:
    return html.escape(str(text))


def _anchor(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def _summary(summary: pd.DataFrame | None, flags: dict) -> str:
    """Per dataset: the tightest bound, each model's gap to its own reference, the flags that apply."""
    if summary is None or summary.empty:
        return "<p>No bounds measured.</p>"
    parts = []
    evaluated = summary[summary["split"] != "train"]
    for dataset, mine in evaluated.groupby("dataset", sort=True):
        bounds = mine[mine["kind"] == "bound"]
        if bounds.empty:
            continue
        best = bounds.loc[bounds["value"].idxmax()]
        names = [name for name, _ in flags.get((dataset, best["label"]), [])]
        caveat = f" (flagged: {', '.join(names)})" if names else ""
        items = []
        for label in dict.fromkeys(mine["label"]):
            gaps = mine[(mine["kind"] == "gap") & (mine["label"] == label)]
            text = _e(label)
            if not gaps.empty:  # the ELBO's gap (the variational gap), and the tightest other bound's
                shown = gaps[gaps["column"] == "ELBO"]
                others = gaps[gaps["column"] != "ELBO"]
                if not others.empty:
                    shown = pd.concat([shown, others.loc[[others["value"].idxmin()]]])
                text += ": gap " + ", ".join(f"of {_e(g['column'])} {g['value']:.2f} ± {g['stderr']:.2f}"
                                             for _, g in shown.iterrows())
                text += f" nats to its {_e(gaps['reference'].iloc[0])}"
            mine_flags = flags.get((dataset, label), [])
            if mine_flags:
                text += " " + " ".join(f"<span class=\"flag\" title=\"{_e(d)}\">{_e(n)}</span>" for n, d in mine_flags)
            items.append(f"<li>{text}</li>")
        parts.append(f"<h3>{_e(dataset)}</h3><p class=\"tightest\">Tightest bound: <b>{_e(best['label'])}</b> "
                     f"{_e(best['column'])} = {best['value']:.2f} ± {best['stderr']:.2f} nats per example"
                     f"{_e(caveat)}.</p><ul>{''.join(items)}</ul>")
    return "".join(parts)


def _settings(manifests: dict) -> str:
    """The settings behind the numbers, from each run's manifest (its suite and options)."""
    rows = []
    for run_dir, manifest in manifests.items():
        suite = (manifest or {}).get("suite", {}) or {}
        contents = suite.get("contents", {}) or {}
        train, evaluation, timing = (contents.get(k, {}) or {} for k in ("train", "eval", "timing"))
        grid = [f"{e.get('name')} K={e['k']}" for e in contents.get("estimators", []) if "k" in e]
        steps = train.get("steps") if "steps" in train else f"{train.get('epochs')} epochs"
        fields = [("suite", f"{suite.get('name', '?')}: {contents.get('description', '')}"),
                  ("datasets", ", ".join(map(str, contents.get("datasets", [])))),
                  ("training steps", f"{steps} (batch {train.get('batch_size')}, lr {train.get('lr')})"),
                  ("examples evaluated", f"{evaluation.get('n_examples', 'all')} of the {evaluation.get('split', '?')} "
                                         "split"),
                  ("K grid", "; ".join(grid)),
                  ("seeds", ", ".join(map(str, contents.get("seeds", [])))),
                  ("threads", str(manifest.get("threads", contents.get("threads", "?")))),
                  ("device", f"{manifest.get('device', '?')} ({manifest.get('device_name', '')})"),
                  ("timing", ", ".join(f"{k} {v}" for k, v in timing.items()))]
        body = "".join(f"<tr><th>{_e(f)}</th><td>{_e(t)}</td></tr>" for f, t in fields)
        rows.append(f"<table class=\"meta\"><caption>{_e(run_dir)}</caption>{body}</table>")
    return "".join(rows) or "<p>No manifest.</p>"


def html_page(tables: list[ComparisonTable], manifests: dict, failed: pd.DataFrame | None,
              images: dict[str, bytes], plot_note: str | None, *, summary: pd.DataFrame | None, flags: dict,
              provenance: list, seed_note: str, not_drawn: dict[str, str] | None = None) -> str:
    sections = [("summary", "Summary"), ("tables", "Tables"), ("plots", "Plots"), ("definitions", "Definitions"),
                ("settings", "Settings"), ("provenance", "Provenance"), ("failed", "Failed and not-applicable cells")]
    toc = "".join(f"<li><a href=\"#{a}\">{_e(t)}</a></li>" for a, t in sections)
    tables = shown_tables(tables)  # wide tables in parts, each fitting the page
    table_links = "".join(f"<li><a href=\"#t-{_anchor(t.title)}\">{_e(t.short_title)}</a></li>" for t in tables)
    not_drawn = not_drawn or {}
    plot_links = "".join(f"<li><a href=\"#p-{_anchor(n)}\">{_e(n)}</a></li>" for n in [*images, *not_drawn])
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
             "<meta name=\"viewport\" content=\"width=device-width\"><title>elbo-bench report</title>",
             f"<style>{STYLE}</style></head><body>", "<h1>elbo-bench report</h1>",
             f"<section id=\"summary\"><h2>Summary</h2>{_summary(summary, flags)}</section>",
             f"<nav><h2>Contents</h2><ul>{toc}</ul><ul>{table_links}{plot_links}</ul></nav>",
             f"<section id=\"tables\"><h2>Tables</h2><p>{_e(seed_note)} Best value per column in bold (not in a "
             "one-row table). Click a column header to sort. Hover a flag for its numbers, a dash "
             f"({NOT_APPLICABLE}: not applicable) for its reason. Wide tables come in parts (bounds, diagnostics), "
             "each row's label repeated.</p>"]
    for table in tables:
        parts.append(f"<div class=\"scroll\" id=\"t-{_anchor(table.title)}\">{html_table(table, flags)}</div>")
    parts.append("</section><section id=\"plots\"><h2>Plots</h2>")
    if plot_note:
        parts.append(f"<p>{_e(plot_note)}</p>")
    for name, png in images.items():
        encoded = base64.b64encode(png).decode("ascii")
        caption = FIGURE_CAPTIONS.get(name, name)
        parts.append(f"<figure id=\"p-{_anchor(name)}\">"
                     f"<img alt=\"{_e(name)}\" src=\"data:image/png;base64,{encoded}\">"
                     f"<figcaption><b>{_e(name)}</b>: {_e(caption)}</figcaption></figure>")
    for name, reason in not_drawn.items():  # a plot left out on purpose says why where it would have been
        parts.append(f"<p class=\"not-drawn\" id=\"p-{_anchor(name)}\"><b>{_e(name)}</b> is not drawn: "
                     f"{_e(reason)}</p>")
    definitions = "".join(f"<dt>{_e(term)}</dt><dd>{_e(text)}</dd>" for term, text in DEFINITIONS)
    parts.append(f"</section><section id=\"definitions\"><h2>Definitions</h2><dl>{definitions}</dl></section>")
    parts.append(f"<section id=\"settings\"><h2>Settings</h2>{_settings(manifests)}</section>")
    parts.append("<section id=\"provenance\"><h2>Provenance</h2>")
    for run_dir, fields in provenance:
        rows = "".join(f"<tr><th>{_e(f)}</th><td>{_e(t)}</td></tr>" for f, t in fields)
        parts.append(f"<div class=\"scroll\"><table class=\"meta\"><caption>{_e(run_dir)}</caption>{rows}</table>"
                     "</div>")
    parts.append("</section><section id=\"failed\"><h2>Failed and not-applicable cells</h2>")
    if failed is None:
        parts.append("<p>None.</p>")
    else:
        head = "".join(f"<th>{_e(c)}</th>" for c in failed.columns)
        body = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>"
                       for row in failed.itertuples(index=False))
        parts.append(f"<table class=\"failed sortable\"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    parts.append("</section><pre id=\"selftest\"></pre>")
    parts.append(f"<script>{SCRIPT}</script></body></html>")
    return "\n".join(parts)


def selftest_findings(dom: str) -> dict:
    """The JSON the page's selftest wrote into <pre id=selftest>, from a dumped DOM ({} when absent)."""
    start = dom.find("<pre id=\"selftest\">")
    if start < 0:
        return {}
    text = dom[start + len("<pre id=\"selftest\">"):dom.index("</pre>", start)]
    return json.loads(html.unescape(text)) if text.strip() else {}
