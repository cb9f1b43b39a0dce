"""The report's tables (methods, the article's precision table, the raw comparison, the evaluation suite): raw
values as DataFrames (for the CSVs), their cells as text, and their markdown files."""

from __future__ import annotations

import pandas as pd

from pipeline.report.cells import (
    CI_NOTE,
    PUBLISHED_MARK,
    cell,
    drop_cell,
    flag_notes,
    interval,
    notes,
    overlapping,
    speed_cell,
    tuned_cell,
)
from pipeline.report.provenance import provenance_block
from pipeline.report.runs import (
    SETTING_FIELDS,
    accuracy,
    col,
    delta_ppl,
    is_true,
    missing,
    nominal_bits,
    num,
    run_labels,
    run_settings,
    run_value,
    setting_text,
)
from pipeline.tasks import TASK_GROUPS as GROUPS

# The article's verdict per precision, shown next to what we measure: the table under "Accuracy vs
# Efficiency: Lessons from the Quantization Methods Comparison" (../shared/reference/000_a51b381b08561bd5.txt,
# lines 53-58). Its first row is FP16; our reference is the model as loaded.
ARTICLE = {
    "FP": {"accuracy": "Excellent", "memory": "High", "speed": "Baseline", "stability": "Very High"},
    "8-bit": {"accuracy": "Near-Perfect", "memory": "Medium", "speed": "Faster", "stability": "Very High"},
    "4-bit": {"accuracy": "Very Good", "memory": "Low", "speed": "Much Faster", "stability": "High"},
    "2-bit": {"accuracy": "Good", "memory": "Very Low", "speed": "Fastest", "stability": "Medium"},
}


# The precision table's columns the article has no word for, at batch 1.
EFFICIENCY_COLUMNS = ("Energy J/token (measured)", "Energy J/token (est.)", "$/1M tokens", "Decode vs floor")
EFFICIENCY_NOTE = (
    "Energy J/token: per generated token at batch 1, over the decode's timed windows; (measured): a hardware "
    "counter (RAPL or NVML, tag `energy_source`), (est.): CPU seconds times `profile.energy.watts_per_core` where "
    "the machine has no counter, never mixed in one column. $/1M tokens: `profile.cost.usd_per_hour` over the "
    "measured decode tok/s at batch 1. Decode vs floor: ms per decoded token over the time to read the weights "
    "one step reads at the measured memory bandwidth (1x: only streaming weights)."
)

# ---------------------------------------------------------------------------------------------
# Tables


def _speed_columns(runs: pd.DataFrame) -> dict[str, pd.Series]:
    """Decode speed and the speed-up vs the reference, its interval, noise floor and verdict (raw values)."""
    return {
        "decode tok/s": num(runs, "metrics.decode_tok_s"),
        "speed-up": num(runs, "metrics.speedup_vs_ref"),
        "speed-up lo": num(runs, "metrics.speedup_vs_ref_ci_low"),
        "speed-up hi": num(runs, "metrics.speedup_vs_ref_ci_high"),
        "speed noise %": num(runs, "metrics.speed_noise_pct"),
        "speed-up is win": num(runs, "metrics.speedup_is_win"),
    }


def _efficiency_columns(runs: pd.DataFrame) -> dict[str, pd.Series]:
    """Energy per generated token (measured by a counter, or the CPU-seconds estimate: two columns, never
    one), cost per million tokens and decode time over the memory-bandwidth floor, at batch 1 (raw values)."""
    return {
        "energy J/token": num(runs, "metrics.energy_j_per_token"),
        "energy J/token (est.)": num(runs, "metrics.energy_j_per_token_est"),
        "energy source": col(runs, "tags.energy_source"),
        "$/1M tokens": num(runs, "metrics.usd_per_1m_tokens"),
        "decode vs floor": num(runs, "metrics.decode_vs_floor"),
    }


def method_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per method run (the reference first), raw values (intervals as lo/hi columns); missing stay NaN."""
    acc = accuracy(runs)
    bpw = num(runs, "metrics.bits_per_weight")
    dppl_low, dppl_high = num(runs, "metrics.dppl_pct_ci_low"), num(runs, "metrics.dppl_pct_ci_high")
    published = is_true(col(runs, "tags.on_published_grid"))
    table = pd.DataFrame(
        {
            "method": col(runs, "tags.method"),
            "family": col(runs, "tags.family"),
            "algorithm": col(runs, "tags.algorithm"),
            "setting": run_settings(runs),
            "bits/weight": bpw,
            # the share of the text decoder's weights (embeddings and lm_head included) bits/weight covers
            "coverage %": 100 * num(runs, "metrics.quantized_weight_share"),
            "ppl": num(runs, "metrics.ppl"),
            "Δppl %": delta_ppl(runs),
            "Δppl % lo": dppl_low,
            "Δppl % hi": dppl_high,
            "≈ Δppl (same bits)": overlapping(run_labels(runs), dppl_low, dppl_high, nominal_bits(runs)),
            "KL": num(runs, "metrics.kl_vs_ref"),
            "KL lo": num(runs, "metrics.kl_vs_ref_ci_low"),
            "KL hi": num(runs, "metrics.kl_vs_ref_ci_high"),
            "acc_avg": num(runs, "metrics.acc_avg"),
            "acc_avg stderr": num(runs, "metrics.acc_avg_stderr"),
            "acc drop %": num(runs, "metrics.acc_drop_pct"),
            "acc drop % lo": num(runs, "metrics.acc_drop_pct_ci_low"),
            "acc drop % hi": num(runs, "metrics.acc_drop_pct_ci_high"),
            "acc drop significant": num(runs, "metrics.acc_drop_significant"),
            "weight MB": num(runs, "metrics.weight_mb"),
            "mem -% layers": 100 * (1 - bpw / 16),  # vs fp16 over the quantized layers
            "mem -% model": num(runs, "metrics.mem_reduction_vs_fp16_pct"),
            "kept": col(runs, "tags.kept_layers"),  # what the method left float and how it is stored
            **_speed_columns(runs),
            **_efficiency_columns(runs),
            "stability (std)": acc["std"],
            "tuned settings": [
                tuned_cell(*cells)
                for cells in zip(
                    col(runs, "tags.overrides"), col(runs, "tags.tuned_from"), col(runs, "tags.tuned_settings")
                )
            ],
            "tuned vs preset": col(runs, "tags.tuned_vs_preset"),
            "on published grid": published,
            "kernels": col(runs, "tags.kernels"),
            "exports": [exports_cell(v, m) for v, m in zip(col(runs, "tags.exports"), col(runs, "tags.method"))],
            "gen match": num(runs, "metrics.gen_match_rate"),
            "notes": notes(runs),
        }
    )
    # Runs at about the same bits per weight (8.02 and 8.00) together, most accurate first.
    order = table.assign(_bits=table["bits/weight"].round(1), _drop=acc["drop_pct"]).sort_values(
        ["_bits", "_drop"], ascending=[False, True], na_position="last"
    )
    return table.loc[order.index].reset_index(drop=True)


def exports_cell(tag, method) -> str:
    """The formats a run's weights can be written to exactly (its ``exports`` tag, e.g.
    ``checkpoint,compressed-tensors,gguf:Q4_1``); the reference has nothing quantized to export."""
    if missing(tag):
        return "-" if method == "fp" else "not recorded"
    return str(tag).replace(",", ", ")


def _interval_cells(table: pd.DataFrame, name: str, fmt: str) -> list[str]:
    """'value [lo, hi]' per row, from the columns ``name``, ``name lo`` and ``name hi``."""
    return [interval(*v, fmt) for v in zip(table[name], table[f"{name} lo"], table[f"{name} hi"])]


def _memory_cells(table: pd.DataFrame) -> list[str]:
    """'layers / model' per row: memory reduction vs fp16 in %, over the quantized layers and the whole model."""
    return [f"{cell(a, '{:.0f}')} / {cell(b, '{:.0f}')}" for a, b in zip(table["mem -% layers"], table["mem -% model"])]


def _speed_cells(table: pd.DataFrame) -> list[str]:
    """The speed-up per row with its interval, marked where it is not a win (see ``speed_cell``)."""
    columns = ("speed-up", "speed-up lo", "speed-up hi", "speed noise %", "speed-up is win")
    return [speed_cell(*v) for v in zip(*(table[c] for c in columns))]


def _efficiency_cells(table: pd.DataFrame) -> dict[str, list[str]]:
    """Energy (measured / estimated, apart), cost and decode vs floor as they read in the tables."""
    return {
        "energy J/token (measured)": [cell(v, "{:.3g}") for v in table["energy J/token"]],
        "energy J/token (est.)": [cell(v, "{:.3g}") for v in table["energy J/token (est.)"]],
        "$/1M tokens": [cell(v, "{:.3g}") for v in table["$/1M tokens"]],
        "decode vs floor": [cell(v, "{:.1f}x") for v in table["decode vs floor"]],
    }


def method_cells(table: pd.DataFrame) -> pd.DataFrame:
    """The method table as it reads in methods.md: intervals next to their figures, flags marked."""
    t = table
    method = [f"{m} {PUBLISHED_MARK}" if p else cell(m, "{}") for m, p in zip(t["method"], t["on published grid"])]
    return pd.DataFrame(
        {
            "method": method,
            "family": [cell(v, "{}") for v in t["family"]],
            "algorithm": [cell(v, "{}") for v in t["algorithm"]],
            "setting": t["setting"],
            "bits/weight": [cell(v, "{:.2f}") for v in t["bits/weight"]],
            "coverage %": [cell(v, "{:.0f}") for v in t["coverage %"]],
            "Δppl % [95% CI]": _interval_cells(t, "Δppl %", "{:+.1f}"),
            "≈ Δppl (same bits)": t["≈ Δppl (same bits)"],
            "KL [95% CI]": _interval_cells(t, "KL", "{:.4f}"),
            "acc drop % [95% CI]": [
                drop_cell(*v)
                for v in zip(t["acc drop %"], t["acc drop % lo"], t["acc drop % hi"], t["acc drop significant"])
            ],
            "weight MB": [cell(v, "{:.1f}") for v in t["weight MB"]],
            "mem -% layers / model": _memory_cells(t),
            "kept (stored as)": [cell(v, "{}") for v in t["kept"]],
            "decode tok/s": [cell(v, "{:.1f}") for v in t["decode tok/s"]],
            "speed-up [95% CI]": _speed_cells(t),
            "speed noise": [cell(v, "±{:.1f}%") for v in t["speed noise %"]],
            **_efficiency_cells(t),
            "stability (std)": [cell(v, "±{:.3g}") for v in t["stability (std)"]],
            "tuned settings": t["tuned settings"],
            "kernels": [cell(v, "{}") for v in t["kernels"]],
            "exports": t["exports"],
            "gen match": [cell(v, "{:.3f}") for v in t["gen match"]],
            "notes": t["notes"],
        }
    )


def best_run(runs: pd.DataFrame) -> pd.Series:
    """The most accurate run: lowest zero-shot accuracy drop where runs measured it, else lowest KL."""
    drop = num(runs, "metrics.acc_drop_pct")
    key = drop if drop.notna().any() else num(runs, "metrics.kl_vs_ref")
    return runs.loc[key.idxmin()] if key.notna().any() else runs.iloc[0]


def _ties(runs: pd.DataFrame, best: pd.Series) -> list[str]:
    """The runs whose interval on the pick's metric (acc drop, else KL) overlaps the best run's."""
    metric = "acc_drop_pct" if num(runs, "metrics.acc_drop_pct").notna().any() else "kl_vs_ref"
    low, high = num(runs, f"metrics.{metric}_ci_low"), num(runs, f"metrics.{metric}_ci_high")
    same = pd.Series(0, index=runs.index)
    tied = overlapping(run_labels(runs), low, high, same)[best.name]
    return [] if tied == "-" else tied.split(", ")


def _pair(measured: str, word: str | None) -> str:
    return f"{measured} · *{word}*" if word else measured


def precision_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The article's table, measured: the reference, then the best run at each precision (8/4/2 bits, and
    any other). Runs on the published grid are left out of the picks: they reproduce the checkpoint."""
    acc, bits = accuracy(runs), nominal_bits(runs)
    eligible = runs[~is_true(col(runs, "tags.on_published_grid"))]
    groups = [("FP", runs[col(runs, "tags.method") == "fp"])]
    for b in sorted({8, 4, 2} | {int(b) for b in bits.dropna()}, reverse=True):
        groups.append((f"{b}-bit", eligible[bits[eligible.index] == b]))
    rows = []
    for label, group in groups:
        words = ARTICLE.get(label, {})
        if group.empty:
            row = {"Precision": label, "best method": "no run"}
            for key in ("accuracy", "memory", "speed", "stability"):
                row[key.capitalize()] = _pair("-", words.get(key))
            row |= dict.fromkeys(EFFICIENCY_COLUMNS, "-")
            rows.append(row)
            continue
        run = best_run(group)
        metric, value, drop, low, high, std = acc.loc[run.name, ["metric", "value", "drop_pct", "low", "high", "std"]]
        if label == "FP":
            measured_acc = f"{metric} {cell(value, '{:.4g}')}"
        elif metric == "acc_avg":
            measured_acc = (
                "acc drop " + drop_cell(drop, low, high, run_value(run, "metrics.acc_drop_significant")) + "%"
            )
        else:
            measured_acc = f"Δppl {interval(drop, low, high, '{:+.1f}')}%"
        layers_pct = 100 * (1 - run_value(run, "metrics.bits_per_weight") / 16)
        model_pct = run_value(run, "metrics.mem_reduction_vs_fp16_pct")
        memory = f"{cell(layers_pct, '{:.0f}%')} / {cell(model_pct, '{:.0f}%')}"
        speed = speed_cell(
            *(
                run_value(run, f"metrics.{m}")
                for m in ("speedup_vs_ref", "speedup_vs_ref_ci_low", "speedup_vs_ref_ci_high")
            ),
            run_value(run, "metrics.speed_noise_pct"),
            run_value(run, "metrics.speedup_is_win"),
        )
        efficiency = dict(
            zip(
                EFFICIENCY_COLUMNS,
                (
                    cell(run_value(run, "metrics.energy_j_per_token"), "{:.3g}"),
                    cell(run_value(run, "metrics.energy_j_per_token_est"), "{:.3g}"),
                    cell(run_value(run, "metrics.usd_per_1m_tokens"), "{:.3g}"),
                    cell(run_value(run, "metrics.decode_vs_floor"), "{:.1f}x"),
                ),
                strict=True,
            )
        )
        stability = "not repeated" if missing(std) else f"±{std:.3g} ({metric} std, seeds {run.get('tags.repeats')})"
        setting = setting_text(*(run.get(f) for f in SETTING_FIELDS))
        best = run.get("tags.method") if setting == "-" else f"{run.get('tags.method')} ({setting})"
        ties = _ties(group, run) if label != "FP" else []
        rows.append(
            {
                "Precision": label,
                "best method": best + (f" ≈ {', '.join(ties)}" if ties else ""),
                "Accuracy": _pair(measured_acc, words.get("accuracy")),
                "Memory": _pair(memory, words.get("memory")),
                "Speed": _pair(speed, words.get("speed")),
                "Stability": _pair(stability, words.get("stability")),
                **efficiency,
            }
        )
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame) -> str:
    """A markdown table of the cells; a missing value is '-', a '|' inside a cell is escaped."""
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v, "{}").replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines) + "\n"


def methods_markdown(experiment: str, runs: pd.DataFrame) -> str:
    return (
        f"# {experiment}: methods\n\n"
        + provenance_block(runs)
        + "\nΔppl % = 100·(ppl/ppl_ref − 1) and acc drop % (relative drop of zero-shot task accuracy, "
        "`acc_drop_pct`): vs the reference, lower is better; rows sorted by acc drop where measured, else Δppl. "
        "coverage %: the share of the text decoder's weights (embeddings and lm_head included) that bits/weight "
        "covers (`quantized_weight_share`); the rest stays float (in its stored dtype) and counts in weight MB. "
        f"{CI_NOTE}; a value without one comes from a run that logged none. "
        "≈ Δppl: the methods at the same nominal bits whose Δppl intervals overlap this one's (not told apart "
        "by this protocol). sig.: the accuracy drop's interval excludes 0. speed-up: decode at batch 1 vs the "
        "reference in the same process, [95% CI]; speed noise: the reference timed against itself; ~noise: not a "
        "win (the interval does not clear 1 + noise). mem -%: memory reduction vs fp16 over the quantized layers "
        "(100·(1 − bits/16)) / the whole model (everything stored, in its stored dtype, a tied table once); kept: "
        "what the method left unquantized and how it is stored (`kept_layers`: the embeddings, in "
        "`layers.keep_dtype` or on `layers.embeddings`' grid, and the norms). stability: std of the accuracy "
        "metric across seeds, for methods "
        "repeated over seeds. exports: the formats the run's weights can be written to exactly "
        "(`python -m pipeline.export --run-id ID --format F`; gguf with its GGML type; tag `exports`, the reasons "
        "for the others in `exports_refused`); not recorded: a run older than the tag. gen match: `gen_match_rate`. "
        + EFFICIENCY_NOTE
        + "\n\n"
        + flag_notes(runs)
        + to_markdown(method_cells(method_table(runs)))
    )


def precision_markdown(experiment: str, runs: pd.DataFrame) -> str:
    published = is_true(col(runs, "tags.on_published_grid"))
    left_out = (
        f"Left out of the picks ({PUBLISHED_MARK} on the published grid: reproduces the checkpoint, says nothing "
        f"about the method): {', '.join(run_labels(runs)[published])}.\n\n"
        if published.any()
        else ""
    )
    return (
        f"# {experiment}: the article's precision table, measured\n\n"
        + provenance_block(runs)
        + "\nEach cell: what this experiment measured · *the article's word* for that precision. The best "
        "run per precision has the lowest zero-shot accuracy drop where runs measured tasks, else the "
        "lowest KL vs the reference; ≈ names the runs whose interval on that metric overlaps the best's "
        f"(not told apart). Accuracy: drop vs the reference (lower is better), {CI_NOTE}; sig.: the "
        "interval excludes 0. Memory: reduction vs fp16 over quantized layers / whole model (everything "
        "stored, the embeddings and norms in their stored dtype; a reference stored wider than fp16 is "
        "negative). Speed: decode speed-up vs the reference, batch 1, [95% CI]; ~noise: inside the noise floor, "
        "not a win. Stability: std of the accuracy metric across seeds. "
        + EFFICIENCY_NOTE
        + "\n\n"
        + left_out
        + to_markdown(precision_table(runs))
    )


# ---------------------------------------------------------------------------------------------
# The raw comparison (every run's numbers, and methods side by side per setting)


def comparison(runs: pd.DataFrame) -> pd.DataFrame:
    """Every run's raw numbers (intervals as lo/hi columns), by bits per weight then perplexity."""
    layers_pct = 100 * (1 - num(runs, "metrics.bits_per_weight") / 16)
    table = pd.DataFrame(
        {
            "method": col(runs, "tags.method"),
            "run": col(runs, "tags.mlflow.runName"),
            "setting": run_settings(runs),
            "bits/weight": num(runs, "metrics.bits_per_weight"),
            "weight MB": num(runs, "metrics.weight_mb"),
            "mem -% layers": layers_pct,
            "mem -% model": num(runs, "metrics.mem_reduction_vs_fp16_pct"),
            "kept": col(runs, "tags.kept_layers"),
            "ppl": num(runs, "metrics.ppl"),
            "ppl lo": num(runs, "metrics.ppl_ci_low"),
            "ppl hi": num(runs, "metrics.ppl_ci_high"),
            "Δppl %": delta_ppl(runs),
            "Δppl % lo": num(runs, "metrics.dppl_pct_ci_low"),
            "Δppl % hi": num(runs, "metrics.dppl_pct_ci_high"),
            "KL": num(runs, "metrics.kl_vs_ref"),
            "KL lo": num(runs, "metrics.kl_vs_ref_ci_low"),
            "KL hi": num(runs, "metrics.kl_vs_ref_ci_high"),
            "top-1": num(runs, "metrics.top1_agree"),
            **_speed_columns(runs),
            "kernels": col(runs, "tags.kernels"),
            "notes": notes(runs),
        }
    )
    order = table.sort_values(["bits/weight", "ppl"], ascending=[False, True], na_position="last").index
    return table.loc[order].reset_index(drop=True)


def comparison_cells(table: pd.DataFrame) -> pd.DataFrame:
    t = table
    return pd.DataFrame(
        {
            "method": [cell(v, "{}") for v in t["method"]],
            "run": [cell(v, "{}") for v in t["run"]],
            "bits/weight": [cell(v, "{:.2f}") for v in t["bits/weight"]],
            "weight MB": [cell(v, "{:.1f}") for v in t["weight MB"]],
            "mem -% vs fp16 (layers / model)": _memory_cells(t),
            "kept (stored as)": [cell(v, "{}") for v in t["kept"]],
            "ppl [95% CI]": _interval_cells(t, "ppl", "{:.2f}"),
            "Δppl % [95% CI]": _interval_cells(t, "Δppl %", "{:+.1f}"),
            "KL [95% CI]": _interval_cells(t, "KL", "{:.4f}"),
            "top-1": [cell(v, "{:.3f}") for v in t["top-1"]],
            "decode tok/s": [cell(v, "{:.1f}") for v in t["decode tok/s"]],
            "speed-up [95% CI]": _speed_cells(t),
            "kernels": [cell(v, "{}") for v in t["kernels"]],
            "notes": t["notes"],
        }
    )


def by_setting(runs: pd.DataFrame) -> str:
    """Methods side by side at each setting: 'ppl / Δppl% [95% CI] / KL / bits per weight' per cell, and
    '≈ X' where method X at the same setting has an overlapping Δppl interval."""
    runs = runs.assign(setting=run_settings(runs))
    runs = runs[runs["setting"] != "-"]  # the reference has no setting
    methods = col(runs, "tags.method").astype(str)
    ties = overlapping(
        methods, num(runs, "metrics.dppl_pct_ci_low"), num(runs, "metrics.dppl_pct_ci_high"), runs["setting"]
    )
    runs = runs.assign(
        cell=[
            f"{cell(p, '{:.1f}')} / {interval(d, lo, hi, '{:+.1f}')} / {cell(k, '{:.3f}')} / {cell(b, '{:.2f}')}"
            + ("" if tie == "-" else f" ≈ {tie}")
            for p, d, lo, hi, k, b, tie in zip(
                num(runs, "metrics.ppl"),
                delta_ppl(runs),
                num(runs, "metrics.dppl_pct_ci_low"),
                num(runs, "metrics.dppl_pct_ci_high"),
                num(runs, "metrics.kl_vs_ref"),
                num(runs, "metrics.bits_per_weight"),
                ties,
            )
        ]
    )
    grid = runs.pivot_table(index="setting", columns="tags.method", values="cell", aggfunc="first")
    grid = grid.sort_index(key=lambda idx: [(-int(s.split("-")[0]), s) for s in idx])
    lines = ["| setting | " + " | ".join(grid.columns) + " |", "|" + "---|" * (len(grid.columns) + 1)]
    for setting, row in grid.iterrows():
        lines.append(f"| {setting} | " + " | ".join("-" if pd.isna(v) else v for v in row) + " |")
    return (
        "Cells: perplexity / Δppl % [95% CI] / KL vs reference / bits per weight; ≈ X: method X at the same "
        "setting has an overlapping Δppl interval (the two are not told apart).\n\n" + "\n".join(lines) + "\n"
    )


def comparison_markdown(experiment: str, runs: pd.DataFrame) -> str:
    table = comparison(runs)
    caveats = set(col(runs, "tags.caveat").dropna())
    protocol = runs.iloc[0]  # one protocol per table: check_provenance refuses (or flags) a mix
    header = (
        f"# {experiment}: {len(table)} runs\n\n"
        + provenance_block(runs)
        + f"\nPerplexity protocol: corpus {protocol.get('params.data.evaluation.corpus')}, "
        f"{protocol.get('params.eval.tokens')} tokens, context {protocol.get('params.eval.context')}, "
        f"stride {protocol.get('params.eval.stride')}, add_special_tokens "
        f"{protocol.get('params.eval.add_special_tokens')}, BOS {cell(protocol.get('params.eval.bos_used'), '{}')}; "
        f"KL over the first {protocol.get('params.eval.kl_tokens')} tokens. Speed: decode at batch 1, "
        f"{protocol.get('params.profile.threads')} thread(s), ratio to the reference in the same process; "
        f"~noise: not a win. {CI_NOTE}.\n"
    )
    text = header + "".join(f"\nCaveat: {c}\n" for c in sorted(caveats)) + "\n" + flag_notes(runs)
    text += to_markdown(comparison_cells(table))
    if col(runs, "tags.method").nunique() > 1 and nominal_bits(runs).nunique() > 1:
        text += "\n## By setting\n\n" + by_setting(runs)
    return text


# ---------------------------------------------------------------------------------------------
# The evaluation suite (zero-shot groups, perplexity by context length, generation)


def suite_table(runs: pd.DataFrame) -> pd.DataFrame | None:
    """Per method: accuracy per task group and its standard error, ``acc_avg`` ± stderr, ``acc_drop_pct``
    with its interval and significance, ``ppl_ctx/*``, generation agreement (raw values).

    None when no run measured tasks or context lengths.
    """
    groups = [group for group in GROUPS if f"metrics.acc/{group}" in runs]  # TASK_GROUPS order
    contexts = sorted((c for c in runs.columns if c.startswith("metrics.ppl_ctx/")), key=lambda c: int(c.split("/")[1]))
    if not groups and not contexts:
        return None
    published = is_true(col(runs, "tags.on_published_grid"))
    columns = {
        "method": col(runs, "tags.method").where(~published, col(runs, "tags.method") + f" {PUBLISHED_MARK}"),
        "bits/weight": num(runs, "metrics.bits_per_weight"),
    }
    for group in groups:
        columns |= {
            group: num(runs, f"metrics.acc/{group}"),
            f"{group} stderr": num(runs, f"metrics.acc_stderr/{group}"),
        }
    columns |= {
        "acc_avg": num(runs, "metrics.acc_avg"),
        "acc_avg stderr": num(runs, "metrics.acc_avg_stderr"),
        "drop %": num(runs, "metrics.acc_drop_pct"),
        "drop % lo": num(runs, "metrics.acc_drop_pct_ci_low"),
        "drop % hi": num(runs, "metrics.acc_drop_pct_ci_high"),
        "significant": num(runs, "metrics.acc_drop_significant"),
    }
    columns |= {f"ppl@{c.split('/')[1]}": num(runs, c) for c in contexts}
    columns |= {
        "gen match": num(runs, "metrics.gen_match_rate"),
        "first diverg.": num(runs, "metrics.gen_first_divergence"),
        "repetition": num(runs, "metrics.gen_repetition_rate"),
        "notes": notes(runs),
    }
    table = pd.DataFrame(columns)
    return table.sort_values(["bits/weight", "drop %"], ascending=[False, True], na_position="last").reset_index(
        drop=True
    )


def suite_cells(table: pd.DataFrame) -> pd.DataFrame:
    """The suite as it reads in suite.md: 'acc ± stderr', 'drop [lo, hi]', significant yes/no."""
    groups = [c for c in table.columns if f"{c} stderr" in table.columns]
    cells = {
        "method": [cell(v, "{}") for v in table["method"]],
        "bits/weight": [cell(v, "{:.2f}") for v in table["bits/weight"]],
    }
    for group in groups:
        cells[group] = [
            cell(v, "{:.3f}") + ("" if missing(e) or missing(v) else f" ± {e:.3f}")
            for v, e in zip(table[group], table[f"{group} stderr"])
        ]
    cells["drop % [95% CI]"] = _interval_cells(table, "drop %", "{:+.1f}")
    cells["significant"] = [{1.0: "yes", 0.0: "no"}.get(v, "-") for v in table["significant"]]
    for column in table.columns:
        if column.startswith("ppl@"):
            cells[column] = [cell(v, "{:.2f}") for v in table[column]]
    cells["gen match"] = [cell(v, "{:.3f}") for v in table["gen match"]]
    cells["first diverg."] = [cell(v, "{:.1f}") for v in table["first diverg."]]
    cells["repetition"] = [cell(v, "{:.3f}") for v in table["repetition"]]
    cells["notes"] = table["notes"]
    return pd.DataFrame(cells)


def suite_markdown(experiment: str, runs: pd.DataFrame, table: pd.DataFrame) -> str:
    first = runs.iloc[0]
    return (
        f"# {experiment}: evaluation suite\n\n"
        + provenance_block(runs)
        + "\nZero-shot accuracy per task group through lm-eval (each group the mean of its tasks, acc_norm where "
        "reported), `acc_avg` (mean of the groups) and its relative drop vs the reference (`acc_drop_pct`); "
        "perplexity at several context lengths on the same tokens (`ppl@<len>`); greedy generation vs the "
        "reference (`gen match`: same token at the same position; `first diverg.`: mean index of the first "
        "different token; `repetition`: repeated 3-grams). "
        f"Tasks: {first.get('params.eval.tasks.names')}, limit {first.get('params.eval.tasks.limit')} per task, "
        f"{first.get('params.eval.tasks.num_fewshot')}-shot; generation: "
        f"{first.get('params.eval.generation.new_tokens')} tokens per prompt.\n\n"
        "Intervals: accuracy ± its standard error over the task's examples (lm-eval's `acc_stderr`; a group's "
        "and acc_avg's combined over their tasks); drop [lo, hi]: the 95% interval of acc_drop_pct, paired over "
        "examples vs the reference; significant: yes where that interval excludes 0 (`acc_drop_significant`), "
        "no where it does not: that drop is within the noise of the task sample.\n\n"
        + flag_notes(runs)
        + to_markdown(suite_cells(table))
    )
