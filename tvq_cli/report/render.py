"""Rich tables for people; the same dicts go out as JSON for pipelines."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def setting_text(q: dict) -> str:
    """One quantization setting of a report, in words."""
    if "bits" not in q:
        return f"low-rate ({q['codec']}: dead-zone quantizer, rANS-coded)"
    group = "per tensor" if q["group_size"] == 0 else f"groups of {q['group_size']}"
    scales = f"{q['scale_bits']}-bit scales" if q["scale_bits"] else "fp32 scales"
    return f"{q['bits']} bits, {group}, {q['range']} range, {scales}, {q['codec']} codes"


def render_inspect(report: dict, console: Console) -> None:
    summary = Table(title=f"tvq archive {report['archive']}", show_header=False)
    summary.add_column("field", style="bold")
    summary.add_column("value")
    scheme = report["scheme"]
    if report["error_correction"] is not None:
        scheme += (
            " (error correction on)" if report["error_correction"] else " (no error correction)"
        )
    summary.add_row("scheme", scheme)
    summary.add_row("tasks", ", ".join(t["name"] for t in report["tasks"]))
    for q in report["quantization"]:
        summary.add_row(
            f"{q['role']} quantization", f"{setting_text(q)}: {q['parameters']:,} parameters"
        )
    p = report["parameters"]
    summary.add_row(
        "parameters",
        f"{p['total']:,} ({p['quantized']:,} quantized, "
        f"{p['exact']:,} exact, {p['shared']:,} non-float shared)",
    )
    b = report["bytes"]
    summary.add_row(
        "bytes",
        f"{human_bytes(b['total'])} = codes {human_bytes(b['codes'])} + "
        f"scales/zero-points {human_bytes(b['scales'])} + exact {human_bytes(b['exact'])}"
        f" + files {human_bytes(b['files'])} + header {human_bytes(b['header'])}",
    )
    summary.add_row("bits per weight", f"{report['bits_per_weight']:.3f} (all metadata counted)")
    c = report["compression"]
    summary.add_row(
        "compression",
        f"{c['vs_fp32']:.2f}x vs fp32 checkpoints, "
        f"{c['vs_original']:.2f}x vs original-dtype checkpoints",
    )
    if "verified" in report:
        v = report["verified"]
        summary.add_row(
            "integrity",
            f"OK: {v['stored_tensors']} stored tensors, {human_bytes(v['payload_bytes'])} read, "
            "every checksum matches",
        )
    console.print(summary)
    if report["format_version"] > 1:
        console.print(_task_table(report["tasks"]))
    if "error" in report:
        table = Table(title="task vector reconstruction error")
        for col in ("task", "rel L2", "cosine", "max |err|", "SNR dB"):
            table.add_column(col, justify="right" if col != "task" else "left")
        for row in [*report["tasks"], {"name": "overall", **report["error"]}]:
            table.add_row(
                row["name"],
                _fmt(row["rel_l2"]),
                _fmt(row["cosine"], 6),
                _fmt(row["max_abs_error"]),
                _fmt(row["snr_db"]),
            )
        console.print(table)
    if report.get("tensors") and "error" in report:
        table = Table(title="per tensor")
        for col in ("task", "tensor", "kind", "rel L2", "cosine", "max |err|", "SNR dB"):
            table.add_column(col)
        for row in report["tensors"]:
            table.add_row(
                row["task"],
                row["tensor"],
                row["kind"],
                _fmt(row["rel_l2"]),
                _fmt(row["cosine"], 6),
                _fmt(row["max_abs_error"]),
                _fmt(row["snr_db"]),
            )
        console.print(table)
    elif report.get("tensors"):
        table = Table(title="per tensor")
        for col in ("tensor", "kind", "shape", "dtype", "quantization"):
            table.add_column(col)
        for row in report["tensors"]:
            quant = ", ".join(
                f"{p['role']} {p['bits']}b/g{p['group_size']}"
                if "bits" in p
                else f"{p['role']} low-rate"
                for p in row["parts"]
            )
            table.add_row(
                row["tensor"],
                row["kind"],
                "x".join(map(str, row["shape"])),
                row["dtype"],
                quant or "-",
            )
        console.print(table)


def _task_table(tasks: list[dict]) -> Table:
    """What each task was packed from: its dtype, added rows, names, files, fingerprint."""
    table = Table(title="tasks as packed")
    for col in ("task", "from", "dtype", "added rows (stored exactly)", "names", "files"):
        table.add_column(col)
    table.add_column("fingerprint")
    for t in tasks:
        dtype = t["dtype"] or "-"
        if t["dtypes"]:
            dtype += f" ({len(t['dtypes'])} other)"
        rows = ", ".join(f"{name} +{n}" for name, n in t["added_rows"].items()) or "-"
        names = []
        if t["renamed"]:
            names.append(" ".join(f"{k} {v!r}" for k, v in t["renamed"].items() if v))
        names += [f"{copy} = {original}" for copy, original in t["copies"].items()]
        names += [f"no {name}" for name in t["absent"]]
        files = f"{len(t['files'])}, {human_bytes(sum(t['files'].values()))}" if t["files"] else "-"
        fingerprint = (t["fingerprint"] or "-").removeprefix("sha256:")[:12]
        table.add_row(
            t["name"], t["source"], dtype, rows, "; ".join(names) or "-", files, fingerprint
        )
    return table


def render_methods(methods: list[dict], console: Console) -> None:
    table = Table(title="merge methods (details: docs/merge.md)")
    table.add_column("method", style="bold")
    table.add_column("what it does")
    table.add_column("options (default)")
    for m in methods:
        options = ", ".join(f"{o['flag']} ({o['default']})" for o in m["options"]) or "-"
        extra = []
        if m["takes_weights"]:
            extra.append("--weights")
        if m["per_task"]:
            extra.append("--task NAME | --all-tasks")
        table.add_row(m["name"], m["summary"], options + ("; " + ", ".join(extra) if extra else ""))
    console.print(table)


def _coefficients(values: dict) -> str:
    parts = []
    for key, value in values.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
            parts.append(f"{key}: {value}")
        else:
            parts.append(f"{key}={_fmt(value)}")
    return "; ".join(parts) or "none"


def render_merge(report: dict, console: Console) -> None:
    out = report["output"]
    n = len(report["tasks"])
    console.print(
        f"merged {n} task{'s' if n != 1 else ''} ({', '.join(report['tasks'])}) "
        f"with {report['method']}"
    )
    console.print(f"  coefficients: {_coefficients(report['coefficients'])}")
    if report["weights"] is not None:
        console.print(f"  weights: {', '.join(_fmt(w) for w in report['weights'])}")
    if report["fingerprint_mismatch"]:
        console.print(
            "  [yellow]--allow-different-base: packed against another pretrained model: "
            f"{', '.join(report['fingerprint_mismatch'])}[/yellow]"
        )
    for left in report.get("left_out_rows", []):
        console.print(
            f"  vocabulary: the pretrained one; {left['rows']} row(s) task {left['task']} added "
            f"to {left['tensor']} are left out (tvq extract --task {left['task']} has them)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    what = {
        "safetensors": "model file",
        "folder": "model folder",
        "tvq": "archive",
        "compressed-tensors": "packed model folder",
    }[out["format"]]
    if out.get("targets"):
        what += f" for task(s) {', '.join(out['targets'])}"
    detail = f"dtype {out['dtype']}" if out["format"] != "tvq" else out["grid"]
    console.print(
        f"  wrote {what} {out['path']}: {human_bytes(out['bytes'])} in {len(out['files'])} "
        f"file(s), {detail}, {report['seconds']:.1f} s"
    )
    if "quantization" in out:
        console.print(f"  {_packing(out['quantization'])}")
    rounding = report.get("rounding")
    if rounding:
        overall = rounding["overall"]
        how = rounding["mode"]
        if rounding["samples"]:
            how += f" ({rounding['samples']} samples, seed {report['seed']})"
        share = rounding["ambiguous"] / max(rounding["values"], 1)
        console.print(
            f"  rounding: {how}; {rounding['ambiguous']:,} of {rounding['values']:,} values "
            f"ambiguous ({share:.2%}); {rounding['tensors_changed']} of {rounding['tensors']} "
            "tensors differ from nearest rounding"
        )
        if overall["cosine_nearest"] is not None:
            near = ", ".join(f"{c:.6f}" for c in overall["cosine_nearest"])
            chosen = ", ".join(f"{c:.6f}" for c in overall["cosine_chosen"])
            console.print(f"  cosine per input, nearest: {near}; chosen: {chosen}")


def _packing(q: dict) -> str:
    """One line on a packed output: its scheme and which Linear layers stay dense."""
    grid = "symmetric" if q["symmetric"] else "asymmetric"
    group = f"groups of {q['group_size']}" if q["group_size"] else "per channel"
    kept = ", ".join(q["ignore"][:4]) + (", ..." if len(q["ignore"]) > 4 else "")
    dense = f"{len(q['ignore'])} kept dense ({kept})" if q["ignore"] else "none kept dense"
    return (
        f"{q['scheme']} ({q['bits']}-bit {grid}, {group}): {q['packed']} Linear layers packed, "
        f"{dense}; layers found by {q['layers_from']}"
    )


def render_zoo(manifest: dict, root: str, console: Console) -> None:
    table = Table(title=f"model zoo {root} (seed {manifest['seed']})")
    table.add_column("task", style="bold")
    table.add_column("pretrained %", justify="right")
    table.add_column("fine-tuned %", justify="right")
    table.add_column("TA merge %", justify="right")
    for t in manifest["tasks"]:
        table.add_row(
            t["name"],
            f"{t['accuracy_pretrained_probe']:.2f}",
            f"{t['accuracy_finetuned']:.2f}",
            f"{t['accuracy_task_arithmetic']:.2f}",
        )
    rows = manifest["tasks"]
    means = [
        sum(t[key] for t in rows) / len(rows)
        for key in ("accuracy_pretrained_probe", "accuracy_finetuned", "accuracy_task_arithmetic")
    ]
    table.add_row("mean", *(f"{m:.2f}" for m in means), style="bold")
    console.print(table)
    console.print(
        f"{manifest['n_parameters']:,} parameters per backbone; task arithmetic with lambda "
        f"{manifest['task_arithmetic_lambda']}; heads frozen at the pretrained linear probe"
    )


def render_accuracy(report: dict, console: Console) -> None:
    table = Table(title=f"accuracy of {report['checkpoint']}")
    table.add_column("task", style="bold")
    table.add_column("accuracy %", justify="right")
    for task, acc in report["accuracy"].items():
        table.add_row(task, f"{acc:.2f}")
    table.add_row("mean", f"{report['mean']:.2f}", style="bold")
    console.print(table)


def render_extract(report: dict, console: Console) -> None:
    out = report["output"]
    what = "model folder" if out["format"] == "folder" else "model file"
    rows = "".join(f", +{n} rows of {name}" for name, n in report["added_rows"].items())
    console.print(
        f"extracted task {report['task']}: wrote {what} {out['path']}: {report['tensors']} "
        f"tensors{rows}, {human_bytes(out['bytes'])} in {len(out['files'])} file(s), "
        f"dtype {out['dtype'] or 'as pretrained'}, {report['seconds']:.1f} s",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    against = report.get("against")
    if against:
        check = {
            "match": "is the fine-tune packed as this task (fingerprint matches)",
            "not recorded": "compared (the archive records no fingerprint to check)",
        }[against["fingerprint"]]
        console.print(
            f"  {against['path']} {check}; task vector rel-L2 {_fmt(against['rel_l2'])}, "
            f"cosine {_fmt(against['cosine'], 6)}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
