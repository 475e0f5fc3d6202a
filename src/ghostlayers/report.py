"""Results a person can read: Markdown tables and plots from `compare` rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(head: list[str], body: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def method_label(row: Row) -> str:
    """A row's recovery as a column name: the method, with its refit when it has one ("ghost + refit 4")."""
    refit = row.get("refit")
    return row["recover"] if refit in (None, "none") else f"{row['recover']} + refit {refit}"


def _cells(rows: list[Row]) -> tuple[Row | None, list[tuple[str, int]], list[str]]:
    dense = next((r for r in rows if r.get("recover") == "dense"), None)
    groups = sorted({(r["select"], r["drop"]) for r in rows if r.get("recover") != "dense"})
    methods = list(dict.fromkeys(method_label(r) for r in rows if r.get("recover") != "dense"))
    return dense, groups, methods


def comparison_tables(rows: list[Row]) -> str:
    """Perplexity and held-out alignment error, one line per (selection, drop), one column per method."""
    dense, groups, methods = _cells(rows)
    by = {(r["select"], r["drop"], method_label(r)): r for r in rows if r.get("recover") != "dense"}
    best = {}
    for g in groups:
        scored = [(by[(*g, m)]["perplexity"], m) for m in methods if "perplexity" in by.get((*g, m), {})]
        best[g] = min(scored)[1] if scored else None

    def ppl(g, m):
        r = by.get((*g, m))
        if r is None:
            return "-"
        if "error" in r and "perplexity" not in r:
            return "n/a"
        text = _fmt(r["perplexity"])
        return f"**{text}**" if best[g] == m else text

    def align(g, m):
        r = by.get((*g, m))
        errs = None if r is None else r.get("align_error")
        return "-" if not errs else "/".join(f"{e:.3f}" for e in errs) if len(errs) <= 2 else f"mean {sum(errs) / len(errs):.3f}"

    head = ["selection", "drop", "removed", *methods]
    removed = {g: next((by[(*g, m)].get("removed", []) for m in methods if (*g, m) in by), []) for g in groups}
    dense_ppl = _fmt(dense["perplexity"]) if dense is not None else "-"
    ppl_body = [[g[0], str(g[1]), _layers(removed[g]), dense_ppl, *[ppl(g, m) for m in methods]] for g in groups]
    align_body = [[g[0], str(g[1]), _layers(removed[g]), *[align(g, m) for m in methods]] for g in groups]
    text = []
    if dense is not None:
        text.append(f"Dense model: perplexity {_fmt(dense['perplexity'])} on {dense['tokens']} held-out tokens.\n")
    ppl_head = [*head[:3], "dense", *head[3:]]
    text += ["Perplexity on held-out text (lower is better; best pruned model per row in bold):\n",
             markdown_table(ppl_head, ppl_body)]
    if any("kl_mean" in r for r in by.values()):
        def kl(g, m):
            r = by.get((*g, m))
            return "-" if r is None or "kl_mean" not in r else f"{r['kl_mean']:.3f} / {r['top1_agreement']:.1f}%"

        text += ["\nKL(dense ‖ pruned) per token, mean / top-1 agreement with the dense model, on the same held-out "
                 "windows (lower KL and higher agreement are better):\n",
                 markdown_table(head, [[g[0], str(g[1]), _layers(removed[g]), *[kl(g, m) for m in methods]]
                                       for g in groups])]
    text += ["\nAlignment error ‖ĥ − Y‖ / ‖X − Y‖ at each removed block, on held-out windows "
             "(1.0 = no better than no recovery; lower is better):\n", markdown_table(head, align_body)]
    failed = [r for r in rows if "error" in r and "perplexity" not in r]
    if failed:
        text.append("\nNot applicable:\n")
        text += [f"- {method_label(r)} ({r['select']}, drop {r['drop']}): {r['error']}" for r in failed]
    return "\n".join(text) + "\n"


def _layers(layers: list[int]) -> str:
    """[12, 13, 14, 17] -> "12-14,17"."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def plot_perplexity(rows: list[Row], path: Path) -> None:
    """Perplexity against layers removed, one line per method, one panel per selection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense, groups, methods = _cells(rows)
    selects = list(dict.fromkeys(g[0] for g in groups))
    fig, axes = plt.subplots(1, len(selects), figsize=(5.5 * len(selects), 4.2), squeeze=False, sharey=True)
    for ax, select in zip(axes[0], selects):
        for method in methods:
            points = sorted((r["drop"], r["perplexity"]) for r in rows
                            if r.get("select") == select and r.get("recover") != "dense" and method_label(r) == method
                            and "perplexity" in r)
            if points:
                ax.plot(*zip(*points), marker="o", label=method, linewidth=2.2 if method == "ghost" else 1.4)
        if dense is not None:
            ax.axhline(dense["perplexity"], color="black", linestyle="--", linewidth=1, label="dense")
        ax.set_yscale("log")
        ax.set_xticks(sorted({g[1] for g in groups}))
        ax.set_xlabel("layers removed")
        ax.set_title(f"selection: {select}")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("held-out perplexity (log scale)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_similarity(similarity_file: Path, rows: list[Row], path: Path) -> None:
    """Heatmap of mean cos(h_i, h_j) between layer inputs, with each selected block [s, e) marked at (s, e)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = json.loads(similarity_file.read_text())["mean_cos"]
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(matrix, cmap="viridis", origin="upper")
    fig.colorbar(image, ax=ax, label="mean per-token cos(h_i, h_j)")
    markers = {}
    for r in rows:
        if r.get("recover") in (None, "dense") or not r.get("removed"):
            continue
        markers.setdefault((r["select"], r["drop"]), r["removed"])
    shapes = ["s", "o", "^", "D", "v", "P"]
    for k, ((select, drop), removed) in enumerate(sorted(markers.items())):
        runs, start = [], removed[0]
        for a, b in zip(removed, removed[1:] + [None]):
            if b != a + 1:
                runs.append((start, a + 1))
                start = b
        xs, ys = [e for _, e in runs], [s for s, _ in runs]
        ax.scatter(xs, ys, marker=shapes[k % len(shapes)], facecolors="none", edgecolors="red", s=60,
                   label=f"{select} drop {drop}")
    ax.set_xlabel("j (input of layer j; last = final norm)")
    ax.set_ylabel("i")
    ax.set_title("similarity of layer inputs; markers: removed blocks [i, j)")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_selection_scores(rows: list[Row], path: Path) -> None:
    """Each loss criterion's score of every candidate (held-out loss of the pruned, repaired model) against the
    candidate (block start, or for loss-greedy each layer at the step it was picked), one line per drop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[tuple[str, int], dict[int, float]] = {}
    for r in rows:
        if r.get("scored_with") and r.get("scores"):
            curves.setdefault((r["select"], r["drop"]), {int(k): v for k, v in r["scores"].items()})
    selects = sorted({s for s, _ in curves})
    fig, axes = plt.subplots(1, len(selects), figsize=(5.5 * len(selects), 4.2), squeeze=False)
    for ax, select in zip(axes[0], selects):
        for (sel, drop), scores in sorted(curves.items()):
            if sel == select:
                greedy = "greedy" in select  # scores of the layers in the order picked, else of every block start
                xs = list(scores) if greedy else sorted(scores)
                ax.plot(range(1, len(xs) + 1) if greedy else xs, [scores[x] for x in xs], marker="o",
                        label=f"drop {drop}")
        ax.set_xlabel("step (one layer removed at each)" if "greedy" in select else "block start")
        ax.set_ylabel("held-out loss, repaired")
        ax.set_title(f"selection: {select}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: list[Row], out: Path, header: str = "") -> str:
    """results.md, perplexity.png, similarity.png and (for the loss criteria) selection.png in `out`; returns the
    Markdown text."""
    text = header + comparison_tables(rows)
    scored = {_accuracy_label(r): r["accuracy"] for r in _accuracy_order(rows)}
    if scored:
        text += "\n\nZero-shot accuracy (higher is better):\n\n" + accuracy_table(scored) + "\n"
    (out / "results.md").write_text(text)
    if any("perplexity" in r and r.get("recover") != "dense" for r in rows):
        plot_perplexity(rows, out / "perplexity.png")
    if (out / "similarity.json").is_file():
        plot_similarity(out / "similarity.json", rows, out / "similarity.png")
    if any(r.get("scored_with") and r.get("scores") for r in rows):
        plot_selection_scores(rows, out / "selection.png")
    return text


def _accuracy_order(rows: list[Row]) -> list[Row]:
    """Rows with accuracy: the dense model first, then by (selection, drop), methods in their run order."""
    dense, groups, methods = _cells(rows)
    by = {(r.get("select"), r.get("drop"), "dense" if r.get("recover") == "dense" else method_label(r)): r
          for r in rows if "accuracy" in r}
    ordered = [by[(None, 0, "dense")]] if (None, 0, "dense") in by else []
    return ordered + [by[(*g, m)] for g in groups for m in methods if (*g, m) in by]


def _accuracy_label(row: Row) -> str:
    if row.get("recover") == "dense":
        return "dense"
    return f"{row['select']} {row['drop']}: {method_label(row)}"


def _size(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def info_text(s: dict[str, Any]) -> str:
    """`ghostlayers info`: a folder summary from `export.describe`, for a person."""
    lines = [f"{s['path']}: {s['export']} export, model_type {s['model_type']}"]
    if s["export"] == "exact":
        lines.append("  load: ghostlayers.load(DIR) or AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)")
    elif s["export"] == "vanilla":
        lines.append("  load: AutoModelForCausalLM.from_pretrained(DIR) (a standard checkpoint)")
    elif s["export"] == "gguf":
        lines.append("  run:  llama.cpp (llama-cli -m FILE), Ollama, LM Studio; in Python ghostlayers.load_model(FILE)")
    layers, sel, rec, cal = s["layers"], s.get("selection") or {}, s.get("recovery") or {}, s.get("calibration") or {}
    if s.get("base_model"):
        lines.append(f"  base model:  {s['base_model']}")
    removed = layers.get("removed")
    lines.append(
        f"  layers:      {layers['pruned']}" + (f" of {layers['dense']}" if layers.get("dense") else "")
        + (f"; removed {', '.join(map(str, removed))}" if removed else "")
    )
    if sel:
        lines.append(f"  selection:   {sel.get('criterion')} ({sel.get('drop')} layers)")
    if rec:
        eps = rec.get("eps")
        extras = [f"eps {eps:g}" if isinstance(eps, (int, float)) else f"eps {eps}"] if eps is not None else []
        extras += ["affine"] if rec.get("affine") else []
        extras += [f"rank {rec['rank']}"] if rec.get("rank") else []
        extras += [f"{rec['token_weights']} token weights"] if rec.get("token_weights") not in (None, "uniform") else []
        extras += ["fitted sequentially"] if rec.get("fit") == "sequential" else []
        extras += ["one operator per removed layer"] if rec.get("per_layer") else []
        lines.append(f"  recovery:    {rec.get('method')}" + "".join(f", {x}" for x in extras))
    refit = rec.get("refit") if rec else None
    if refit and refit.get("matrices"):
        lines.append(f"  refit:       {_refit_text(refit)}")
    for op in s["operators"]:
        parts = ", ".join(f"{k} {' x '.join(map(str, v))}" for k, v in (op.get("parts") or {}).items())
        lines.append(f"  operator:    {op['module']}  {' x '.join(map(str, op['shape']))}  {op['dtype']}"
                     + (f"  ({parts})" if len(op.get("parts") or {}) > 1 else "")
                     + (f", |b| {op['bias_norm']:.3g}" if op.get("bias_norm") is not None else ""))
        sigma = ", ".join(f"{v:.3g}" for v in op["singular_values"][:3])
        rank = f", effective rank {op['effective_rank']:.0f}" if "effective_rank" in op else ""
        lines.append(
            f"               W = I + M: |M|/|I| {op['distance_from_identity']:.3f}, antisymmetric share of M "
            f"{100 * op['antisymmetric_share']:.0f}%, largest singular values of M {sigma}{rank}"
        )
    if cal:
        lines.append(
            f"  calibration: {cal.get('source')}, {cal.get('samples')} windows of {cal.get('seq_len')} tokens, "
            f"seed {cal.get('seed')} ({cal.get('tokens')} tokens)"
        )
    lines.append(f"  weights:     {', '.join(s['weights_dtype'])}")
    p, b = s["parameters"], s["size_bytes"]
    ratio = lambda a, d: f"{a / d:.3f}" if a is not None and d else "-"  # noqa: E731
    pruned_total = p["pruned"] + p["operators"]
    table = markdown_table(
        ["", "dense", "pruned", "pruned / dense"],
        [
            ["parameters", _count(p["dense"]), f"{_count(pruned_total)} ({_count(p['operators'])} in operators)",
             ratio(pruned_total, p["dense"])],
            ["weights on disk", _size(b["dense_weights_computed"]) + (" (computed)" if b["dense_weights_computed"] else "")
             if not b.get("dense_file") else f"{_size(b['dense_file'])} (the source GGUF)",
             _size(b["weights"]), ratio(b["weights"], b.get("dense_file") or b["dense_weights_computed"])],
        ],
    )
    lines += ["", table, "", f"{'file' if s['export'] == 'gguf' else 'folder'} size on disk: {_size(b['folder'])}"]
    if s.get("created"):
        lines.append(f"created {s['created']} with ghostlayers {(s.get('versions') or {}).get('ghostlayers')}")
    return "\n".join(lines)


def _refit_text(refit: dict[str, Any]) -> str:
    """The refit of a manifest in one line: which matrices of which layers, the ridge, the calibration errors."""
    matrices = refit["matrices"]
    layers = sorted({m["layer"] for m in matrices})
    names = ", ".join(dict.fromkeys(m["matrix"] for m in matrices))
    rhos = sorted({m["rho"] for m in matrices})
    rho = f"ρ {rhos[0]:g}" if len(rhos) == 1 else f"ρ {rhos[0]:g}-{rhos[-1]:g}"
    mean = lambda key: sum(m[key] for m in matrices) / len(matrices)  # noqa: E731
    return (f"{len(matrices)} matrices ({names}) of dense layers {_layers(layers)}"
            + (" (and the layer before each block)" if refit.get("before") else "")
            + f", {rho}{' (cv)' if refit.get('ridge') == 'cv' else ''}; mean relative error on the calibration "
            f"sums {mean('error_before'):.3f} -> {mean('error_after'):.3f}")


def accuracy_table(results: dict[str, dict[str, Any]]) -> str:
    """Zero-shot accuracy (%), one row per model, `acc / acc_norm` per task, then both averages.

    `results` maps a row label to `zeroshot.accuracy`'s output."""
    tasks = list(dict.fromkeys(t for r in results.values() for t in r["tasks"]))
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    body = []
    for label, r in results.items():
        cells = [f"{pct(r['tasks'][t]['acc'])} / {pct(r['tasks'][t]['acc_norm'])}" if t in r["tasks"] else "-" for t in tasks]
        body.append([label, *cells, pct(r["average"]["acc"]), pct(r["average"]["acc_norm"])])
    first = next(iter(results.values()))["average"]
    note = (
        f"acc / acc_norm in %, per task; averages: acc over {first['acc_tasks']} tasks, acc_norm over the "
        f"{first['acc_norm_tasks']} that report it (acc_norm divides each choice's log-likelihood by its length in bytes)"
    )
    return markdown_table(["model", *tasks, "avg acc", "avg acc_norm"], body) + "\n\n" + note


HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # what an alias is on the hub


def model_card(manifest: dict[str, Any], export: str, license: str | None = None) -> str:
    """README.md of an export: YAML front matter in the hub's convention (base model, tags, pipeline, library,
    licence where the source declares one), then how the model was made, from its manifest."""
    base = str(manifest.get("base_model") or "")
    base = HUB_IDS.get(base, base)
    front = ["---"] + ([f"base_model: {json.dumps(base)}"] if base else []) + [
        "tags:", "- ghostlayers", "- layer-pruning", "pipeline_tag: text-generation", "library_name: transformers"]
    front += [f"license: {json.dumps(license)}"] if license else []
    front.append("---")
    dense, kept = manifest.get("num_layers_dense"), manifest.get("kept_layers") or []
    removed = manifest.get("removed_layers") or []
    sel, rec, cal = (manifest.get(k) or {} for k in ("selection", "recovery", "calibration"))
    refit = rec.get("refit") or {}
    lines = [f"# {base or 'A model'} without {len(removed)} of its {dense} decoder layers", "",
             f"Made with [ghostlayers](https://pypi.org/project/ghostlayers/) {manifest.get('versions', {}).get('ghostlayers', '')}"
             f" (Ghosted Layers: closed-form recovery of layer-pruned LLMs).", "",
             f"- layers removed: {_layers(removed)} ({len(kept)} kept)",
             f"- selection: {sel.get('criterion')}" + (f", {sel.get('drop')} layers" if sel.get("drop") else ""),
             f"- recovery: {rec.get('method')}" + (f", shrunk toward {rec['shrink']}" if rec.get("shrink") else ""),
             "- refit: " + (f"the write projections of {refit.get('layers')} kept layers after each boundary, in "
                            f"closed form (ρ {refit.get('ridge')})" if refit else "none")]
    if cal:
        lines.append(f"- calibration: {cal.get('source')}, {cal.get('samples')} windows of {cal.get('seq_len')} tokens, "
                     f"seed {cal.get('seed')}")
    load = ("`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` (the operators are modules: "
            "modeling_ghostlayers.py)" if export == "exact" else "`AutoModelForCausalLM.from_pretrained(DIR)`, a "
            "standard checkpoint of the base architecture")
    lines += ["", f"Load it with {load}. `ghostlayers.json` holds the full record of how it was made; "
              "`ghostlayers info DIR` prints it."]
    lines += _measured(manifest)
    return "\n".join(front + [""] + lines) + "\n"


def _measured(manifest: dict[str, Any]) -> list[str]:
    """The model card's figures measured while the model was made: each boundary operator's relative fit error and
    each refitted projection's error before and after, on the calibration windows (1.0 = no better than nothing);
    then anything a command recorded under `measured`."""
    found = []
    for op in manifest.get("operators") or []:
        errors = ", ".join(f"{e:.3f}" for e in op.get("relative_fit_error") or [])
        if errors:
            found.append(f"- the operator for layers [{op['block'][0]}, {op['block'][1]}): relative fit error {errors}")
    for m in ((manifest.get("recovery") or {}).get("refit") or {}).get("matrices") or []:
        if m.get("error_before") is not None and m.get("error_after") is not None:
            found.append(f"- refit of layer {m['layer']}'s {m['matrix']}: error {m['error_before']:.3f} → "
                         f"{m['error_after']:.3f}")
    found += [f"- {k}: {v}" for k, v in (manifest.get("measured") or {}).items()]
    return ["", "Measured while it was made, on the calibration windows (relative errors: 1.0 is no better than "
            "removing the layers with nothing in their place):", "", *found] if found else []
