"""CSV tables, small PNG figures and one self-contained HTML page (figures embedded) from the results of
:func:`msxai.experiments.runner.run_model` for one or more models."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
from pathlib import Path

import numpy as np

from msxai import SEQUENCE_KEYS, SEQUENCES
from msxai.experiments.selection import CLASSES
from msxai.experiments.state import ModelResults

DPI = 72


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


# ------------------------------------------------------------------------------------------------------ CSV
def _plain(v):
    if isinstance(v, (np.floating, float)):
        return float(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    return v


def write_csv(path: Path, rows: list[dict], exclude=("features",)) -> Path:
    rows = [{k: _plain(v) for k, v in r.items() if k not in exclude} for r in rows]
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols or ["empty"])
        w.writeheader()
        for r in rows:
            w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    return path


def read_csv(path) -> list[dict]:
    with Path(path).open() as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------------------------------ figures
def _fig_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _show_map(ax, m, title, cmap="RdBu_r"):
    lim = float(np.abs(m).max()) or 1.0
    im = ax.imshow(m.T, origin="lower", cmap=cmap, vmin=-lim, vmax=lim)
    ax.set_title(title, fontsize=7)
    ax.axis("off")
    return im


def _outline(ax, dom, color="k"):
    if dom.any() and not dom.all():
        ax.contour(dom.T.astype(float), levels=[0.5], colors=color, linewidths=0.6, origin="lower")


def fig_exp1(res: ModelResults) -> bytes | None:
    if not res.exp1_crops:
        return None
    plt = _plt()
    names = list(dict.fromkeys(c["name"] for c in res.exp1_crops))
    fig, axes = plt.subplots(len(names), 5, figsize=(9, 2.0 * len(names)), squeeze=False)
    labels = {c["name"]: c.get("label", "") for c in res.exp1_crops}
    for i, n in enumerate(names):
        crops = {c["aggregation"]: c for c in res.exp1_crops if c["name"] == n}
        first = next(iter(crops.values()))
        axes[i, 0].imshow(first["flair"].T, origin="lower", cmap="gray")
        _outline(axes[i, 0], first["domain"], "yellow")
        axes[i, 0].set_title(f"{labels.get(n, '')} TP ({n.split('|')[0]})", fontsize=7)
        axes[i, 0].axis("off")
        for j, (agg, c) in enumerate((a, crops.get(a)) for a in ("max", "mean")):
            for k, name in enumerate(SEQUENCES):
                ax = axes[i, 1 + 2 * k + j]
                if c is None:
                    ax.axis("off")
                    continue
                m = c["maps"][k]
                im = _show_map(ax, m, f"{name} {agg} (Eq.{3 if agg == 'max' else 2})\n"
                                      f"[{m.min():.3g}, {m.max():.3g}]")
                _outline(ax, c["domain"])
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    fig.suptitle(f"{res.model}: mean vs max aggregation (axial slice through the lesion)", fontsize=8)
    return _fig_bytes(fig)


def fig_exp2(res: ModelResults) -> bytes | None:
    vals = res.exp2_values
    if not vals or all(vals[k][r].size == 0 for k in vals for r in vals[k]):
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
    data, labels = [], []
    for key, name in zip(SEQUENCE_KEYS, SEQUENCES):
        for region in ("inside", "ring"):
            v = vals[key][region]
            data.append(v if v.size else np.array([np.nan]))
            labels.append(f"{name}\n{region}")
    ok = [d[np.isfinite(d)] for d in data]
    pos = [i for i, d in enumerate(ok) if d.size > 1]
    if pos:
        axes[0].violinplot([ok[i] for i in pos], positions=pos, showmedians=True)
    axes[0].axhline(0, color="k", lw=0.5)
    axes[0].set_xticks(range(len(labels)), labels, fontsize=7)
    axes[0].set_ylabel("saliency (|g| >= cut)", fontsize=7)
    axes[0].set_title("TP lesions: values inside / in the ring", fontsize=8)
    fr = [r["frac_positive"] for r in res.exp2]
    lo = [r["frac_positive"] - r["frac_positive_lo"] for r in res.exp2]
    hi = [r["frac_positive_hi"] - r["frac_positive"] for r in res.exp2]
    axes[1].bar(range(len(fr)), np.nan_to_num(fr), yerr=[np.nan_to_num(lo), np.nan_to_num(hi)],
                color=["#c44", "#c88", "#44c", "#88c"])
    axes[1].axhline(0.5, color="k", lw=0.5, ls="--")
    axes[1].set_ylim(0, 1)
    axes[1].set_xticks(range(len(labels)), labels, fontsize=7)
    axes[1].set_title("fraction of kept values that are positive (95% CI)", fontsize=8)
    for ax in axes:
        ax.tick_params(labelsize=7)
    return _fig_bytes(fig)


def fig_exp3(res: ModelResults) -> bytes | None:
    if not res.lesions:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
    for ax, stat in zip(axes, ("flair_peak_max", "flair_peak_min")):
        groups = [np.array([r[stat] for r in res.lesions if r["cls"] == c]) for c in CLASSES]
        pos = [i for i, g in enumerate(groups) if g.size > 1]
        if pos:
            ax.violinplot([groups[i] for i in pos], positions=pos, showmedians=True)
        for i, g in enumerate(groups):
            ax.scatter(np.full(g.size, i) + 0.05 * np.random.default_rng(i).standard_normal(g.size), g, s=6,
                       color="k", zorder=3)
        ax.set_xticks(range(len(CLASSES)), [f"{c}\n(n={g.size})" for c, g in zip(CLASSES, groups)], fontsize=7)
        ax.set_title(f"{stat.replace('_', ' ')} in the domain", fontsize=8)
        ax.axhline(0, color="k", lw=0.5)
        ax.tick_params(labelsize=7)
    return _fig_bytes(fig)


def fig_exp5(res: ModelResults) -> bytes | None:
    if not res.exp5_crops:
        return None
    plt = _plt()
    crops = res.exp5_crops
    fig, axes = plt.subplots(2, len(crops), figsize=(2.0 * len(crops), 4.0), squeeze=False)
    for j, c in enumerate(crops):
        axes[0, j].imshow(c["flair"].T, origin="lower", cmap="gray")
        _outline(axes[0, j], c["domain"], "yellow")
        axes[0, j].set_title(f"{c['condition']}\np={c['mean_prob']:.2f} "
                             f"{'detected' if c['detected'] else 'missed'}", fontsize=7)
        axes[0, j].axis("off")
        m = c["maps"][0]
        _show_map(axes[1, j], m, f"FLAIR saliency [{m.min():.3g}, {m.max():.3g}]")
        _outline(axes[1, j], c["domain"])
    return _fig_bytes(fig)


def fig_exp6(results: list[ModelResults]) -> bytes | None:
    rows = [r for res in results for r in res.exp6]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3))
    keys = list(dict.fromkeys((r["model"], r["case"], r["lesion_id"]) for r in rows))
    for i, k in enumerate(keys):
        rr = [r for r in rows if (r["model"], r["case"], r["lesion_id"]) == k]
        x = [r["radius_mm"] for r in rr]
        y = [r["mean_prob"] for r in rr]
        line, = ax.plot(x, y, lw=1, label=f"{k[0]} {k[1]} #{k[2]} ({rr[0]['volume_mm3']:.0f} mm³)")
        det = [r["detected"] for r in rr]
        ax.scatter([a for a, d in zip(x, det) if d], [b for b, d in zip(y, det) if d], s=10, color=line.get_color())
        ax.scatter([a for a, d in zip(x, det) if not d], [b for b, d in zip(y, det) if not d], s=10,
                   facecolors="none", edgecolors=line.get_color())
    ax.axhline(0.3, color="k", lw=0.5, ls="--")
    ax.set_xlabel("context restored around the lesion (mm)", fontsize=8)
    ax.set_ylabel("mean softmax in Ω", fontsize=8)
    ax.set_ylim(0, 1)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="best")
    ax.set_title("context dilation (filled = detected, open = missed; dashed = threshold 0.3)", fontsize=8)
    return _fig_bytes(fig)


# ------------------------------------------------------------------------------------------------------ HTML
CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222;line-height:1.4}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}td,th{border:1px solid #bbb;padding:2px 6px;text-align:right}
th{background:#eee}td.l,th.l{text-align:left}.note{color:#555;font-size:13px}img{max-width:100%}
h2{border-bottom:1px solid #ccc;margin-top:1.6em}.ok{color:#060}.bad{color:#a00}.inc{color:#a60}"""


def _fmt(v, digits=3):
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        if not np.isfinite(v):
            return "n/a"
        return f"{v:.{digits}g}"
    return html.escape(str(v))


def _table(rows: list[dict], cols: list[str] | None = None, headers: dict | None = None) -> str:
    if not rows:
        return "<p class=note>(no rows)</p>"
    cols = cols or [k for k in rows[0] if k != "features"]
    headers = headers or {}
    out = ["<table><tr>" + "".join(f"<th>{html.escape(headers.get(c, c))}</th>" for c in cols) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(
            f"<td class={'l' if isinstance(r.get(c), str) else 'r'}>{_fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _img(data: bytes | None, alt: str) -> str:
    if data is None:
        return f"<p class=note>({html.escape(alt)}: nothing to plot)</p>"
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _ci(est, lo, hi):
    return f"{_fmt(est)} [{_fmt(lo)}, {_fmt(hi)}]"


def _verdict(ok) -> str:
    if ok == "ns":
        return "<span class=inc>not significant</span>"
    if ok is None:
        return "<span class=inc>inconclusive</span>"
    return "<span class=ok>agrees</span>" if ok else "<span class=bad>differs</span>"


def sign_verdict(row: dict | None, expect_positive: bool) -> bool | None:
    """``True`` when the 95 % CI of the positive fraction lies on the expected side of 0.5, ``False`` when on the
    other side, ``None`` when it contains 0.5 or there is nothing to judge."""
    if row is None or not row.get("n_kept"):
        return None
    lo, hi = row["frac_positive_lo"], row["frac_positive_hi"]
    if lo > 0.5:
        return expect_positive
    if hi < 0.5:
        return not expect_positive
    return None


# What the papers report (Spagnolo et al., Sci Rep 2026, doi 10.1038/s41598-026-36560-9 / arXiv 2406.09335; the
# follow-up: Spagnolo et al., "Exploiting XAI maps to improve MS lesion segmentation and detection in MRI",
# arXiv 2409.03772), as written in their abstracts.
PAPER = {
    "cohort": "687 MS patients, 4023 FLAIR + MPRAGE scans (University Hospital Basel), 4 expert raters; test nDSC "
              "U-Net 0.71, nnU-Net 0.78, Swin UNETR 0.80; TPR 79/78/85 %, FDR 37/38/36 %, FNR 20/22/14 % "
              "(arXiv v1, U-Net: 3050 TP, 1818 FP, 789 FN lesions); N = 50 noise samples, Eq. 3",
    "sign": "FLAIR: positive saliency inside the lesion, negative in its immediate neighbourhood; MPRAGE much "
            "weaker (the model relies on FLAIR)",
    "peaks": "peak saliency distributions differ significantly between TP, FP, FN and TN (Fig. 11)",
    "context": "about 7 mm of perilesional context around the lesion border is needed for detection (arXiv v1, "
               "U-Net, TP lesions of 90-120 mm^3; Fig. 15 of the journal version per architecture)",
    "flag": "follow-up: logistic regression on 93 radiomic features of ~21000 TP/FP saliency maps (72 training "
            "patients); on 37 test patients lesion F1 0.7006 -> 0.7450 [0.7358, 0.7547], PPV 0.6265 -> 0.7817",
}


def findings(res: ModelResults) -> list[dict]:
    """The paper's findings next to ours, for one model (measured values, with a verdict)."""
    rows = []
    e2 = {(r["sequence"], r["region"]): r for r in res.exp2}
    for seq, region, pos, text in (("FLAIR", "inside", True, "FLAIR saliency is positive inside TP lesions"),
                                   ("FLAIR", "ring", False, "FLAIR saliency is negative in the ring around them"),
                                   ("MPRAGE", "inside", False, "MPRAGE saliency is negative inside TP lesions"),
                                   ("MPRAGE", "ring", True, "MPRAGE saliency is positive in the ring")):
        r = e2.get((seq, region))
        ours = ("n/a" if r is None or not r["n_kept"] else
                f"fraction of kept values > 0: {_ci(r['frac_positive'], r['frac_positive_lo'], r['frac_positive_hi'])}"
                f" (n = {r['n_kept']} of {r['n_values']} values, {r['n_lesions']} lesions)")
        rows.append({"paper": text, "ours": ours, "verdict": sign_verdict(r, pos)})
    fl = sum(r["sum_abs"] for r in res.exp2 if r["sequence"] == "FLAIR")
    mp = sum(r["sum_abs"] for r in res.exp2 if r["sequence"] == "MPRAGE")
    n_les = len(res.exp2_lesions)
    n_fl = sum(1 for r in res.exp2_lesions
               if r["flair_inside_abs_sum"] + r["flair_ring_abs_sum"] > r["mprage_inside_abs_sum"] + r["mprage_ring_abs_sum"])
    share = fl / (fl + mp) if fl + mp > 0 else float("nan")
    rows.append({"paper": "FLAIR dominates the saliency of TP lesions",
                 "ours": f"FLAIR share of sum |g| inside + ring: {_fmt(share)}; FLAIR larger in {n_fl}/{n_les} TP lesions",
                 "verdict": None if n_les == 0 else bool(share > 0.5)})
    for stat, text in (("flair_peak_max", "TP and FP differ in peak max FLAIR saliency (significant)"),
                       ("flair_peak_min", "TP and FP differ in peak min FLAIR saliency (significant)")):
        t = next((t for t in res.exp3_tests if t["statistic"] == stat and {t["a"], t["b"]} == {"TP", "FP"}), None)
        med = {r["cls"]: r for r in res.exp3 if r["statistic"] == stat}
        if t is None or not np.isfinite(t["p"]):
            rows.append({"paper": text, "ours": "not testable (a class is empty)", "verdict": None})
            continue
        rows.append({"paper": text,
                     "ours": f"median TP {_fmt(med['TP']['median'])} (n={med['TP']['n']}) vs FP "
                             f"{_fmt(med['FP']['median'])} (n={med['FP']['n']}); Mann-Whitney p = {_fmt(t['p'])}",
                     "verdict": True if t["p"] < 0.05 else "ns"})
    t = next((t for t in res.exp3_tests if t["statistic"] == "flair_peak_max" and {t["a"], t["b"]} == {"TP", "TN"}),
             None)
    med = {r["cls"]: r for r in res.exp3 if r["statistic"] == "flair_peak_max"}
    if t is not None and np.isfinite(t["p"]):
        rows.append({"paper": "healthy tissue (TN) has much lower peak FLAIR saliency than TP lesions",
                     "ours": f"median TP {_fmt(med['TP']['median'])} vs TN {_fmt(med['TN']['median'])}; "
                             f"Mann-Whitney p = {_fmt(t['p'])}",
                     "verdict": ("ns" if t["p"] >= 0.05 else bool(med["TN"]["median"] < med["TP"]["median"]))})
    wm = next((r for r in res.exp4 if r["domain"].startswith("healthy-WM")), None)
    if wm is not None:
        rows.append({"paper": "a healthy-WM domain gets much smaller saliency than a TP lesion (sanity check)",
                     "ours": f"FLAIR map range of the healthy-WM ball = {_fmt(wm['flair_range_vs_tp'])} x the TP's "
                             f"(mean softmax in it {_fmt(wm['mean_prob'])})",
                     "verdict": None if not np.isfinite(wm["flair_range_vs_tp"]) else bool(wm["flair_range_vs_tp"] < 1)})
    by_lesion: dict = {}
    for r in res.exp5:
        by_lesion.setdefault((r["case"], r["lesion_id"]), {})[r["condition"]] = r
    margin = res.config.get("transplant_margin_mm", 3.0)
    for (c, l), conds in by_lesion.items():
        bg, bgm = conds.get("background"), conds.get(f"background + {margin:g} mm")
        if bg is None or bgm is None or bg.get("status") != "ok" or bgm.get("status") != "ok":
            continue
        parts = [f"{k}: p = {_fmt(v['mean_prob'])}, {'detected' if v['detected'] else 'missed'}"
                 for k, v in conds.items() if v.get("status") == "ok"]
        rows.append({"paper": "a lesion moved outside the head alone is not detected; with its surrounding "
                              f"{margin:g} mm of tissue it is (FLAIR hyperintensity + healthy WM around it)",
                     "ours": f"{c} #{l}: " + "; ".join(parts),
                     "verdict": bool((not bg["detected"]) and bgm["detected"])})
    ctx = res.exp6
    if ctx:
        first = {}
        for r in ctx:
            k = (r["case"], r["lesion_id"])
            if r["detected"] and k not in first:
                first[k] = r["radius_mm"]
        n = len({(r["case"], r["lesion_id"]) for r in ctx})
        txt = ", ".join(f"{c} #{l}: {first.get((c, l), 'never')} mm" for c, l in
                        dict.fromkeys((r["case"], r["lesion_id"]) for r in ctx))
        rows.append({"paper": "the lesion alone is not detected; detection needs about 7 mm of surrounding context "
                              "(U-Net, arXiv v1)",
                     "ours": f"first radius at which the lesion is detected: {txt}",
                     "verdict": None if n == 0 else bool(all((c, l) in first and first[(c, l)] > 0 for c, l in
                                                              {(r['case'], r['lesion_id']) for r in ctx}))})
    if res.randomization:
        rho = [r["flair_spearman"] for r in res.randomization if np.isfinite(r["flair_spearman"])]
        rows.append({"paper": "(sanity check, Adebayo et al. 2018; not in the paper) maps of a weight-randomised "
                              "network differ from the trained network's",
                     "ours": "FLAIR Spearman rho trained vs randomised: " + ", ".join(_fmt(x) for x in rho),
                     "verdict": None if not rho else bool(max(abs(x) for x in rho) < 0.5)})
    ev = res.error_flag
    if ev.get("status") == "ok":
        auc, gain = ev["auc"], ev["f1"]["gain"]
        rows.append({"paper": "follow-up paper: saliency features separate TP from FP lesions; dropping predicted FP "
                              "raises lesion F1 (0.7006 -> 0.7450 [0.7358, 0.7547])",
                     "ours": f"out-of-fold AUC {auc.text()} ({ev['n_tp']} TP, {ev['n_fp']} FP, {ev['n_patients']} "
                             f"patients); lesion F1 {_fmt(ev['f1']['f1_before'])} -> {_fmt(ev['f1']['f1_after'])}, "
                             f"gain {gain.text()}",
                     "verdict": (True if auc.lo > 0.5 else False if auc.hi < 0.5 else None)})
    return rows


def _section_model(res: ModelResults, files: dict) -> str:
    c = res.config
    s = [f"<h2 id='{slug(res.model)}'>Model {html.escape(res.model)}</h2>",
         f"<p class=note>weights: {html.escape(res.source or 'in-memory network')}</p>",
         f"<p class=note>maps: instance SmoothGrad, Eq. {3 if c.get('aggregation') == 'max' else 2} "
         f"({c.get('aggregation')}), N = {c.get('samples')}, σ = {c.get('sigma_fraction')} × FLAIR range, seed "
         f"{c.get('seed')}; at most {c.get('max_lesions_per_class')} domains per class"
         + (f", each costing at most {c.get('max_domain_cost'):g} voxel-windows" if c.get("max_domain_cost") else "")
         + f"; TN and healthy-WM balls of {c.get('tn_mm3', 93.0):g} mm³; run time "
         f"{res.timings.get('total_s', 0) / 60:.1f} min.</p>"]
    s.append(_run_line(res))
    s.append("<h3>Segmentation of the cohort</h3>")
    s.append(_table(res.segmentation, ["case", "dice", "n_pred", "n_truth", "tp", "fp", "fn", "F1", "n_tn_spheres"]))
    s.append("<p class=note>" + "; ".join(html.escape(n) for n in res.notes) + "</p>")
    for f in res.failures:
        s.append(f"<p class=bad>experiment failed: {html.escape(f)}</p>")
    s.append("<h3>Findings: paper vs ours</h3>")
    f = findings(res)
    s.append("<table><tr><th class=l>paper (Spagnolo et al. 2026)</th><th class=l>ours (measured)</th><th>verdict</th></tr>"
             + "".join(f"<tr><td class=l>{html.escape(r['paper'])}</td><td class=l>{html.escape(r['ours'])}</td>"
                       f"<td>{_verdict(r['verdict'])}</td></tr>" for r in f) + "</table>")
    s.append("<p class=note>verdict: 'agrees' when our 95% CI (sign fractions), the Mann-Whitney p &lt; 0.05 (TP vs FP), "
             "the FLAIR share &gt; 0.5, or detection only with context &gt; 0 mm supports the paper's statement; "
             "'not significant' when p &ge; 0.05 (with few lesions a real difference can go undetected); "
             "'inconclusive' when the CI contains 0.5 or a class is empty.</p>")
    # exp 1
    s.append("<h3>1. Mean (Eq. 2) vs max (Eq. 3) aggregation</h3>")
    cap = []
    if res.config.get("exp1_max_cost"):
        cap.append(f"costing at most {res.config['exp1_max_cost']:g} voxel-windows")
    if res.config.get("exp1_max_voxels", 100000) < 100000:
        cap.append(f"with at most {res.config['exp1_max_voxels']} voxels")
    cap_text = f"the largest TP {' and '.join(cap)}" if cap else "the largest TP"
    s.append(f"<p>Instance SmoothGrad of a large TP lesion ({cap_text}: Eq. 3 costs one backward pass per lesion "
             f"voxel, covering window and noise copy) and of the smallest TP lesion, with both aggregations "
             f"(N = {res.config.get('exp1_samples') or res.config['samples']}). "
             "Eq. 2 averages the per-output-voxel gradients, so opposite signs cancel and the values shrink with the "
             "lesion size; Eq. 3 keeps, per input voxel, the gradient of largest magnitude. Columns *_min/_max are "
             "over the whole map, *_in over the lesion.</p>")
    s.append(_table(res.exp1, ["lesion", "case", "lesion_id", "voxels", "volume_mm3", "aggregation", "samples", "flair_min",
                               "flair_max", "flair_min_in", "flair_max_in", "mprage_min", "mprage_max"]))
    s.append(_img(files.get("fig1"), "experiment 1"))
    if res.exp1:
        span = {(r["lesion"], r["aggregation"]): r["flair_max"] - r["flair_min"] for r in res.exp1}
        parts = [f"{les}: FLAIR range max/mean = {_fmt(span[(les, 'max')] / span[(les, 'mean')])}"
                 for les in dict.fromkeys(r["lesion"] for r in res.exp1)
                 if span.get((les, "mean")) and (les, "max") in span]
        s.append("<p>Measured: " + html.escape("; ".join(parts)) + " (paper Fig. 7: the max aggregation gives a "
                 "wider value range, and the mean aggregation's range shrinks for large lesions).</p>")
    # exp 2
    s.append("<h3>2. FLAIR vs MPRAGE inside and around TP lesions</h3>")
    rel = res.config.get("min_abs_relative")
    cut_text = (f"values with |g| &lt; {res.config['min_abs']:g} are discarded (as in the paper)" if rel is None else
                f"values with |g| &lt; {rel:g} × the lesion's peak |g| (over both maps) are discarded (the paper's "
                f"absolute cut of 0.1 is meant for Eq. 3 maps; with Eq. 2 the values shrink with the lesion size)")
    s.append(f"<p>Values of the maps inside each explained TP lesion and in the ring of voxels within "
             f"{res.config['ring_mm']:g} mm around it; {cut_text}. The sign pattern is measured as the fraction of kept values that "
             "are positive; medians of the positive, negative and all kept values; 95% percentile bootstrap CIs "
             "resampling whole lesions (voxels of one lesion are not independent).</p>")
    s.append(_table(res.exp2, ["sequence", "region", "n_values", "n_kept", "frac_positive", "frac_positive_lo",
                               "frac_positive_hi", "median_positive", "median_positive_lo", "median_positive_hi",
                               "median_negative", "median_negative_lo", "median_negative_hi", "n_lesions",
                               "lesions_with_positive_median", "sum_abs"]))
    s.append(_img(files.get("fig2"), "experiment 2"))
    # exp 3
    s.append("<h3>3. Peak FLAIR saliency of TP, FP, FN and TN domains</h3>")
    s.append(f"<p>FN lesions are explained with their ground-truth domain; TN domains are "
             f"{res.config.get('tn_mm3', 93.0):g} mm³ balls (paper: 93 mm³) inside the brain touching neither the "
             "truth nor the prediction. Medians with 95% bootstrap CIs, two-sided Mann-Whitney U for every pair "
             "(exact p for small samples without ties). Paper: " + html.escape(PAPER["peaks"]) + ".</p>")
    s.append(_table([r for r in res.exp3], ["statistic", "cls", "n", "median", "ci_lo", "ci_hi"]))
    s.append(_table(res.exp3_tests, ["statistic", "a", "b", "n_a", "n_b", "U", "p", "method", "auc"]))
    s.append(_img(files.get("fig3"), "experiment 3"))
    # exp 4
    s.append("<h3>4. Sanity checks: healthy white matter and a single voxel</h3>")
    s.append("<p>Map ranges (over the whole map) for the TP lesion, a one-voxel domain at its centre of mass and a "
             f"{res.config.get('tn_mm3', 93.0):g} mm³ ball in healthy white matter of the same patient; *_range_vs_tp = range / range of the TP "
             "map. The paper reports much smaller values for domains the network does not call lesion.</p>")
    s.append(_table(res.exp4, ["case", "domain", "voxels", "mean_prob", "flair_min", "flair_max", "mprage_min",
                               "mprage_max", "flair_range_vs_tp", "mprage_range_vs_tp"]))
    # exp 5
    s.append("<h3>5. Lesion transplant</h3>")
    s.append("<p>A TP lesion (its voxels, all channels) moved into healthy white matter, outside the head "
             f"(background), and outside with the {res.config['transplant_margin_mm']:g} mm of tissue around it. "
             "mean_prob = mean softmax over the moved Ω; detected = a predicted lesion (t = 0.3, 18-connected, "
             "≥ 5 mm³, computed within 5 mm of Ω) overlaps Ω; saliency = instance SmoothGrad of the moved Ω.</p>")
    s.append(_table(res.exp5, ["case", "lesion_id", "voxels", "condition", "status", "mean_prob", "detected",
                               "flair_peak_max", "flair_peak_min", "mprage_peak_max", "mprage_peak_min",
                               "flair_abs_share_within_3mm"]))
    s.append(_img(files.get("fig5"), "experiment 5"))
    # randomisation
    s.append("<h3>Model randomisation check</h3>")
    s.append("<p>Maps of the same lesions from the same architecture with re-initialised weights; Spearman rank "
             "correlation with the trained maps over the voxels within 5 mm of the lesion. A saliency method that "
             "explains the model must give different maps (low correlation).</p>")
    s.append(_table(res.randomization))
    # exp 7
    s.append("<h3>7. Beyond the paper: saliency-based error flag</h3>")
    ev = res.error_flag
    if ev.get("status") != "ok":
        s.append(f"<p class=note>{html.escape(str(ev.get('status', 'not run')))}</p>")
    else:
        f1 = ev["f1"]
        s.append(
            f"<p>Logistic regression (standardised, class-balanced, L2) on {len(res.error_flag_model.feature_names) if res.error_flag_model else 0} "
            f"saliency features of the explained TP/FP lesions ({ev['n_tp']} TP, {ev['n_fp']} FP, "
            f"{ev['n_patients']} patients), GroupKFold by patient ({ev['n_folds']} folds). "
            f"Out-of-fold AUC (FP vs TP) = <b>{ev['auc'].text()}</b> (95% cluster bootstrap CI over patients); "
            f"baseline without saliency (log volume, mean and max softmax): {ev['auc_baseline'].text()}. "
            f"Dropping the lesions with out-of-fold score &gt; 0.5 ({ev['n_flagged_fp']} FP and {ev['n_flagged_tp']} TP "
            f"flagged) changes the cohort lesion F1 from {_fmt(f1['f1_before'])} to {_fmt(f1['f1_after'])}: gain "
            f"<b>{f1['gain'].text()}</b> (95% bootstrap CI over patients; only explained lesions can be flagged).</p>")
        if files.get("flag_json"):
            s.append(f"<p class=note>Model fitted on all these lesions: <code>{html.escape(files['flag_json'])}</code>; "
                     "installed with <code>--ship-error-flag</code> as the bundle's <code>models/error_flag.json</code>, "
                     "it gives <code>msxai explain</code> and the MONAI Label explain task an <code>error_score</code> "
                     "(probability that the lesion is a false positive) and <code>error_flag</code> (score &gt; "
                     "threshold) per lesion, only for maps made like the training maps (same weights sha256, "
                     f"Eq. {3 if res.config.get('aggregation') == 'max' else 2}, N = {res.config.get('samples')}, "
                     f"σ = {res.config.get('sigma_fraction')}) of lesions the bundle predicted; otherwise "
                     "<code>error_score</code> is null and <code>error_flag_reason</code> says why. Paper (follow-up): "
                     + html.escape(PAPER["flag"]) + ".</p>")
    s.append("<h3>Timings</h3>" + _table([{k: round(v, 1) for k, v in res.timings.items()}]))
    return "\n".join(s)


def _context_text(results: list[ModelResults]) -> str:
    """What the context-dilation rows actually hold: lesions per model and the radii (paper: 1 mm steps to 35 mm)."""
    rows = [r for res in results for r in res.exp6]
    if not rows:
        return "context dilation: not run"
    radii = sorted({float(r["radius_mm"]) for r in rows})
    per_model = {}
    for r in rows:
        per_model.setdefault(r["model"], set()).add((r["case"], r["lesion_id"]))
    steps = np.diff(radii)
    regular = len(steps) > 0 and np.allclose(steps, steps[0])
    rtext = (f"0-{radii[-1]:g} mm in {steps[0]:g} mm steps" if regular and radii[0] == 0 else
             "radii " + ", ".join(f"{x:g}" for x in radii) + " mm")
    return ("context dilation: " + ", ".join(f"{m} {len(v)} lesion(s)" for m, v in per_model.items()) + "; "
            + rtext + " (paper: 1 mm steps up to 35 mm)")


def _run_line(res: ModelResults) -> str:
    rs = getattr(res, "run_settings", None) or {}
    if not rs:
        return ""
    args = rs.get("arguments", {})
    keep = {k: v for k, v in args.items() if v not in (None, False, [], "") and k not in ("func", "command")}
    return (f"<p class=note>computed by: <code>{html.escape(str(rs.get('command', '')))}</code> at "
            f"{html.escape(str(rs.get('generated', '')))}, torch threads {html.escape(str(rs.get('torch threads', '')))}"
            f"; arguments: {html.escape(json.dumps(keep, default=str))}</p>")


def write_report(results: list[ModelResults], out_dir, title: str = "msxai experiments", settings: dict | None = None,
                 save_pngs: bool = True) -> Path:
    """Write CSVs, PNGs, error-flag JSONs and ``report.html`` into ``out_dir``; returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(settings or {})
    seg, les, e1, e2, e2l, e3, e3t, e4, e5, e6, rnd, flag_rows, flag_sum = ([] for _ in range(13))
    html_models = []
    for res in results:
        seg += res.segmentation
        les += [{k: v for k, v in r.items() if k != "features"} for r in res.lesions]
        e1 += res.exp1
        e2 += [{"model": res.model, **r} for r in res.exp2]
        e2l += res.exp2_lesions
        e3 += [{"model": res.model, **r} for r in res.exp3]
        e3t += [{"model": res.model, **r} for r in res.exp3_tests]
        e4 += res.exp4
        e5 += res.exp5
        e6 += res.exp6
        rnd += res.randomization
        flag_rows += res.error_flag_rows
        ev = res.error_flag
        row = {"model": res.model, "status": ev.get("status", ""), "n_tp": ev.get("n_tp"), "n_fp": ev.get("n_fp"),
               "n_patients": ev.get("n_patients")}
        if ev.get("status") == "ok":
            row.update(auc=ev["auc"].estimate, auc_lo=ev["auc"].lo, auc_hi=ev["auc"].hi,
                       auc_baseline=ev["auc_baseline"].estimate, auc_baseline_lo=ev["auc_baseline"].lo,
                       auc_baseline_hi=ev["auc_baseline"].hi, f1_before=ev["f1"]["f1_before"],
                       f1_after=ev["f1"]["f1_after"], f1_gain=ev["f1"]["gain"].estimate,
                       f1_gain_lo=ev["f1"]["gain"].lo, f1_gain_hi=ev["f1"]["gain"].hi,
                       n_dropped=ev["f1"]["n_dropped"], n_folds=ev["n_folds"])
        if res.kind != "context":
            flag_sum.append(row)
        if res.kind == "context":
            html_models.append(f"<h2 id='{slug(res.model)}'>Model {html.escape(res.model)}</h2><p class=note>weights: "
                               f"{html.escape(res.source)}</p><p>Context dilation only (experiment 6, forward passes): "
                               "the saliency experiments were not run for this bundle in this report (CPU budget).</p>"
                               + _run_line(res))
            continue
        files = {}
        m = slug(res.model)
        for key, fn in (("fig1", fig_exp1), ("fig2", fig_exp2), ("fig3", fig_exp3), ("fig5", fig_exp5)):
            data = fn(res)
            files[key] = data
            if data is not None and save_pngs:
                (out / f"{key}_{m}.png").write_bytes(data)
        if res.error_flag_model is not None:
            p = res.error_flag_model.save(out / f"error_flag_{m}.json")
            files["flag_json"] = p.name
        html_models.append(_section_model(res, files))
    tables = {"segmentation.csv": seg, "lesions.csv": les, "exp1_aggregation.csv": e1, "exp2_sign.csv": e2,
              "exp2_lesions.csv": e2l, "exp3_peaks.csv": e3, "exp3_mannwhitney.csv": e3t, "exp4_sanity.csv": e4,
              "exp5_transplant.csv": e5, "exp6_context.csv": e6, "randomization.csv": rnd,
              "error_flag_scores.csv": flag_rows, "error_flag_summary.csv": flag_sum}
    for name, rows in tables.items():
        write_csv(out / name, rows)
    fig6 = fig_exp6(results)
    if fig6 is not None and save_pngs:
        (out / "fig6_context.png").write_bytes(fig6)
    cfg = results[0].config if results else {}
    light = [r.model for r in results if r.kind == "context"]
    n_cases = len({r["case"] for r in seg})
    if not settings.get("cohort") or settings.get("cohort") == "see each model's run":
        cohorts = list(dict.fromkeys(str((r.run_settings or {}).get("cohort", "")) for r in results
                                     if getattr(r, "run_settings", None)))
        settings["cohort"] = "; ".join(c for c in cohorts if c)
    (out / "settings.json").write_text(json.dumps({**settings, "config": cfg}, indent=1, default=str))
    head = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    head.append(
        "<p>Reproduction of the experiments of Spagnolo et al., <i>Instance-level quantitative saliency in multiple "
        "sclerosis lesion segmentation</i>, Sci Rep 2026, with the msxai bundles. Saliency = instance SmoothGrad "
        "through the exact sliding-window function of each bundle (lesion logit, channel 1), one map per input "
        "sequence (FLAIR, MPRAGE/T1). Lesions: softmax &gt; 0.3, 18-connected, ≥ 5 mm³.</p>")
    diffs = [
        f"noise samples N = {cfg.get('samples')} (paper: 50), σ = {cfg.get('sigma_fraction')} × FLAIR range",
        f"aggregation of the bulk maps: {cfg.get('aggregation')} (Eq. {3 if cfg.get('aggregation') == 'max' else 2}; paper: Eq. 3)",
        f"at most {cfg.get('max_lesions_per_class')} explained domains per class (TP/FP/FN/TN) per model over the "
        f"whole cohort, picked at random (seeded) in turn from each case (paper: every lesion of its test patients)",
        (f"CPU budget: only domains whose Eq. 3 cost is at most {cfg.get('max_domain_cost'):g} voxel-windows (sum "
         "over the domain's voxels of the 96³ sliding windows covering each voxel) were explained in bulk: this "
         "favours small lesions and lesions read by few windows; the large lesion of experiment 1 "
         + (f"(at most {cfg.get('exp1_max_cost'):g} voxel-windows) " if cfg.get('exp1_max_cost') else "")
         + "joins the TP set" if cfg.get("max_domain_cost") else "no cost cap on the explained domains"),
        f"TN domains and the healthy-WM ball: {cfg.get('tn_mm3', 93.0):g} mm³ balls (paper: 93 mm³)",
        f"cohort: {n_cases} case(s): {html.escape(str(settings.get('cohort', '')))}",
        f"TN: {cfg.get('n_tn')} spheres of 93 mm³ sampled per patient, of which at most "
        f"{cfg.get('max_lesions_per_class')} are explained",
        _context_text(results) + f"; transplants: {cfg.get('transplant_lesions')} lesion(s)",
        f"bootstrap resamples: {cfg.get('n_boot')}; seed {cfg.get('seed')}",
    ]
    if light:
        diffs.append("context dilation only (no saliency) for: " + html.escape(", ".join(light)))
    head.append("<p class=note>The paper's setting: " + html.escape(PAPER["cohort"]) + ". Ours: synthetic subjects "
                "(MNI152-based phantoms with simulated lesions) and one real patient, networks trained for minutes on "
                "2 CPU cores; compare directions and signs, not magnitudes.</p>")
    head.append("<h2>Settings (where they differ from the paper)</h2><ul>" + "".join(f"<li>{d}</li>" for d in diffs)
                + "</ul>")
    for k, v in settings.items():
        if k not in ("cohort",):
            head.append(f"<p class=note>{html.escape(str(k))}: {html.escape(str(v))}</p>")
    head.append("<p>Models: " + ", ".join(f"<a href='#{slug(r.model)}'>{html.escape(r.model)}</a>" for r in results)
                + ". Tables: " + ", ".join(f"<a href='{n}'>{n}</a>" for n in tables) + ".</p>")
    body = html_models
    body.append("<h2>6. Context dilation (all models)</h2>")
    body.append("<p>Lesions: true lesions of 90-120 mm³ (the paper's range), the ones read by the fewest sliding "
                "windows first (CPU budget), the same for every architecture; for each architecture Ω = its own "
                "predicted lesion overlapping the true lesion (as in the paper: the predicted TP component; its volume "
                "is in the table; an architecture that misses the lesion has no curve for it). Paper: " + html.escape(PAPER["context"])
                + ". Every voxel farther than r mm from Ω is set to the background value (the median outside the brain, "
                "per channel), r = 0 (lesion alone) ... max; mean softmax in Ω and detection per step (forward passes "
                "only; detection = a component of softmax &gt; 0.3, 18-connected, ≥ 5 mm³, computed within 3 mm of "
                "Ω, overlaps Ω). "
                + html.escape(" ".join(f"{r.model}: {r.exp6_note}." for r in results)) + "</p>")
    body.append(_img(fig6, "experiment 6"))
    ctx_first = []
    for res in results:
        keys = dict.fromkeys((r["case"], r["lesion_id"]) for r in res.exp6)
        for c, l in keys:
            rr = [r for r in res.exp6 if (r["case"], r["lesion_id"]) == (c, l)]
            det = [r["radius_mm"] for r in rr if r["detected"]]
            ctx_first.append({"model": res.model, "case": c, "lesion_id": l, "volume_mm3": rr[0]["volume_mm3"],
                              "prob_lesion_alone": rr[0]["mean_prob"], "prob_full_context": rr[0]["full_context_mean_prob"],
                              "detected_full_context": rr[0]["full_context_detected"],
                              "first_detected_mm": det[0] if det else "never",
                              "prob_at_max_radius": rr[-1]["mean_prob"]})
    body.append(_table(ctx_first))
    text = "\n".join(head + body) + "</body></html>\n"
    path = out / "report.html"
    path.write_text(text)
    return path
