"""The report of an `edgecv optimize` run: report.md, report.json and PNG plots from a `RunRecord`.

The pipeline fills the record as it goes; this module only renders it. Plots use matplotlib's Agg
backend (no display needed).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPORT_MD = "report.md"
REPORT_JSON = "report.json"
TRAINING_PNG = "training.png"
STAGES_PNG = "stages.png"
SPARSITY_PNG = "sparsity.png"


@dataclass
class FlowStage:
    """One row of the data-flow table: what goes into a pipeline stage and what comes out."""

    stage: str
    input: str
    operation: str
    output: str
    example: str = ""


@dataclass
class StageResult:
    """One model variant measured on the test set in its runtime."""

    stage: str
    accuracy: float | None = None
    bytes: int | None = None
    gzip_bytes: int | None = None
    latency_ms: float | None = None
    runtime: str = ""
    note: str = ""


@dataclass
class RunRecord:
    """Everything a pipeline run measured. Plain data: it is written verbatim to report.json."""

    name: str
    version: str
    data: str
    seed: int
    command: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    input_spec: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # {epoch, phase, loss, train_acc, val_acc, seconds}
    sparsity: dict[str, float] = field(default_factory=dict)  # layer name -> fraction of zero weights
    flow: list[FlowStage] = field(default_factory=list)
    stages: list[StageResult] = field(default_factory=list)
    bundle: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_report(record: RunRecord, out_dir: Path) -> dict[str, Path]:
    """Write report.md, report.json and the plots into `out_dir`; return {kind: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    paths["training"] = plot_training(record.history, out_dir / TRAINING_PNG)
    paths["stages"] = plot_stages(record.stages, out_dir / STAGES_PNG)
    if record.sparsity:
        paths["sparsity"] = plot_sparsity(record.sparsity, out_dir / SPARSITY_PNG)
    paths["json"] = out_dir / REPORT_JSON
    paths["json"].write_text(json.dumps(record.to_dict(), indent=2, default=str) + "\n")
    paths["markdown"] = out_dir / REPORT_MD
    paths["markdown"].write_text(render_markdown(record, {k: p.name for k, p in paths.items()}))
    log.info("Wrote report %s", paths["markdown"])
    return paths


def load_record(path: Path) -> RunRecord:
    """Read a report.json back (to re-render a report without re-running the pipeline)."""
    doc = json.loads(Path(path).read_text())
    doc["flow"] = [FlowStage(**row) for row in doc.get("flow", [])]
    doc["stages"] = [StageResult(**row) for row in doc.get("stages", [])]
    return RunRecord(**doc)


def size_reduction(record: RunRecord) -> tuple[int, int] | None:
    """(fp32 raw bytes, int8 bundle archive bytes), when both were measured."""
    fp32 = next((s.bytes for s in record.stages if s.stage.startswith("fp32") and s.bytes), None)
    bundle = record.bundle.get("archive_bytes")
    if fp32 is None or not bundle:
        return None
    return int(fp32), int(bundle)


def render_markdown(record: RunRecord, images: Mapping[str, str] | None = None) -> str:
    images = images or {}
    lines: list[str] = [f"# {record.name} {record.version}: optimization report", ""]
    if record.command:
        lines += ["Reproduce with:", "", "```", record.command, "```", ""]
    reduction = size_reduction(record)
    if reduction:
        fp32, bundle = reduction
        lines += [f"**Model size reduced from {human_bytes(fp32)} to {human_bytes(bundle)}** "
                  f"({fp32 / bundle:.1f}× smaller: fp32 ONNX raw → int8 bundle archive, gzip).", ""]
    best = _headline(record)
    if best:
        lines += [best, ""]

    lines += ["## Data flow", "", "| # | Stage | Input | Operation | Output | Example |", "|---|---|---|---|---|---|"]
    for i, row in enumerate(record.flow, start=1):
        lines.append(f"| {i} | {row.stage} | {row.input} | {row.operation} | {row.output} | {row.example} |")
    lines.append("")

    lines += ["## Training trace", ""]
    if images.get("training"):
        lines += [f"![training curves]({images['training']})", ""]
    lines += ["| Epoch | Phase | Loss ↓ | Train accuracy ↑ | Val accuracy ↑ | Seconds |",
              "|---:|---|---:|---:|---:|---:|"]
    for epoch in record.history:
        lines.append(f"| {epoch.get('epoch', '')} | {epoch.get('phase', 'train')} | {_num(epoch.get('loss'), 4)} | "
                     f"{_num(epoch.get('train_acc'), 4)} | {_num(epoch.get('val_acc'), 4)} | "
                     f"{_num(epoch.get('seconds'), 1)} |")
    lines.append("")

    lines += ["## Accuracy, size and latency per stage", ""]
    if images.get("stages"):
        lines += [f"![accuracy and size per stage]({images['stages']})", ""]
    lines += ["Accuracy on the test set, measured in the runtime named; latency is the single-thread median for "
              "one image.", "",
              "| Stage | Runtime | Accuracy | Size raw | Size gzip | Latency |", "|---|---|---:|---:|---:|---:|"]
    for s in record.stages:
        lat = f"{s.latency_ms * 1000:.1f} µs" if s.latency_ms is not None else "–"
        lines.append(f"| {s.stage} | {s.runtime or '–'} | {_num(s.accuracy, 4)} | {human_bytes(s.bytes)} | "
                     f"{human_bytes(s.gzip_bytes)} | {lat} |")
    lines.append("")

    if record.sparsity:
        lines += ["## Sparsity per layer", ""]
        if images.get("sparsity"):
            lines += [f"![sparsity per layer]({images['sparsity']})", ""]
        lines += ["| Layer | Zero weights |", "|---|---:|"]
        lines += [f"| {name} | {frac * 100:.1f} % |" for name, frac in record.sparsity.items()]
        lines.append("")

    if record.bundle:
        lines += ["## Bundle", "", "| Key | Value |", "|---|---|"]
        for key in sorted(record.bundle):
            value = record.bundle[key]
            shown = human_bytes(value) if key.endswith("bytes") and isinstance(value, int) else value
            lines.append(f"| {key} | {shown} |")
        lines.append("")
    if record.settings or record.dataset or record.model:
        lines += ["## Settings", "", "| Key | Value |", "|---|---|"]
        for section in (record.dataset, record.model, record.settings):
            lines += [f"| {k} | {section[k]} |" for k in sorted(section)]
        lines.append("")
    if record.timings_s:
        lines += ["## Time per stage", "", "| Stage | Seconds |", "|---|---:|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in record.timings_s.items()]
        lines.append("")
    if record.machine:
        lines += ["## Machine", ""] + [f"- {k}: {v}" for k, v in sorted(record.machine.items())] + [""]
    return "\n".join(lines)


def plot_training(history: Sequence[Mapping[str, Any]], out: Path) -> Path:
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    xs = list(range(1, len(history) + 1))
    suffix = {"finetune": "ft", "structured": "st"}
    labels = [f"{r.get('epoch', i)}{suffix.get(r.get('phase', ''), '')}" for i, r in zip(xs, history, strict=True)]
    loss = [r.get("loss") for r in history]
    ax_loss.plot(xs, loss, marker="o", color="tab:red")
    ax_loss.set_title("Training loss")
    ax_loss.set_ylabel("cross-entropy")
    for key, name, colour in (("train_acc", "train", "tab:blue"), ("val_acc", "validation", "tab:green")):
        ys = [r.get(key) for r in history]
        if any(y is not None for y in ys):
            ax_acc.plot(xs, [y if y is not None else float("nan") for y in ys], marker="o", label=name, color=colour)
    ax_acc.set_title("Accuracy")
    ax_acc.legend(loc="lower right")
    first_ft = next((i for i, r in zip(xs, history, strict=True) if r.get("phase") == "finetune"), None)
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch (st / ft = fine-tune after channel / magnitude pruning)")
        ax.set_xticks(xs, labels)
        ax.grid(alpha=0.3)
        if first_ft is not None:
            ax.axvline(first_ft - 0.5, color="grey", linestyle="--", linewidth=1)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_stages(stages: Sequence[StageResult], out: Path) -> Path:
    plt = _pyplot()
    fig, (ax_acc, ax_size) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=100)
    names = [s.stage for s in stages]
    ys = list(range(len(stages)))
    accs = [s.accuracy or 0.0 for s in stages]
    ax_acc.barh(ys, [a * 100 for a in accs], color="tab:blue")
    for y, a in zip(ys, accs, strict=True):
        ax_acc.text(a * 100, y, f" {a * 100:.2f}", va="center", fontsize=8)
    measured = [a * 100 for a in accs if a > 0] or [0.0, 100.0]
    ax_acc.set_xlim(max(0.0, min(measured) - 2), min(100.0, max(measured) + 1.5))
    ax_acc.set_yticks(ys, names)
    ax_acc.invert_yaxis()
    ax_acc.set_xlabel("test accuracy (%)")
    ax_acc.set_title("Accuracy per stage")
    height = 0.4
    raw = [(s.bytes or 0) / 1024 for s in stages]
    gz = [(s.gzip_bytes or 0) / 1024 for s in stages]
    ax_size.barh([y - height / 2 for y in ys], raw, height, label="raw", color="tab:orange")
    ax_size.barh([y + height / 2 for y in ys], gz, height, label="gzip", color="tab:purple")
    for y, r, g in zip(ys, raw, gz, strict=True):
        ax_size.text(r, y - height / 2, f" {r:.0f}", va="center", fontsize=8)
        ax_size.text(g, y + height / 2, f" {g:.0f}", va="center", fontsize=8)
    ax_size.set_yticks(ys, names)
    ax_size.invert_yaxis()
    ax_size.set_xlabel("size (KiB)")
    ax_size.set_title("Size per stage")
    ax_size.legend(loc="lower right")
    ax_size.set_xlim(0, max([*raw, 1.0]) * 1.18)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_sparsity(sparsity: Mapping[str, float], out: Path) -> Path:
    plt = _pyplot()
    names = list(sparsity)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.5), dpi=100)
    ys = list(range(len(names)))
    vals = [sparsity[n] * 100 for n in names]
    ax.barh(ys, vals, color="tab:gray")
    for y, v in zip(ys, vals, strict=True):
        ax.text(v, y, f" {v:.1f} %", va="center", fontsize=8)
    ax.set_yticks(ys, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 110)
    ax.set_xlabel("zero weights (%)")
    ax.set_title("Sparsity per layer after pruning")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "–"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.2f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{int(n)} B"


def _headline(record: RunRecord) -> str:
    """Test accuracy of every stage, int8 drops measured against the fp32 model they were quantized from."""
    measured = [(s.stage, s.accuracy) for s in record.stages if s.accuracy is not None]
    fp32 = [(name, acc) for name, acc in measured if not name.startswith("int8")]
    int8 = [(name, acc) for name, acc in measured if name.startswith("int8")]
    if not fp32 or not int8:
        return ""
    source, source_acc = fp32[-1]
    parts = [f"{name} {acc * 100:.2f} %" for name, acc in fp32]
    parts += [f"{name} {acc * 100:.2f} % ({(acc - source_acc) * 100:+.2f} points vs {source})" for name, acc in int8]
    return "Test accuracy: " + "; ".join(parts) + "."


def _num(value: Any, digits: int) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
