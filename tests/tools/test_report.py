"""The pipeline report: Markdown tables with the real numbers, JSON, and readable PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from edgecv.tools.report import FlowStage, RunRecord, StageResult, load_record, render_markdown, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sample_record() -> RunRecord:
    return RunRecord(
        name="fashion-mnist", version="1.0.0", data="fashion-mnist", seed=0,
        command="edgecv optimize --data fashion-mnist --out runs/fm",
        history=[
            {"epoch": 1, "phase": "train", "loss": 0.61, "train_acc": 0.78, "val_acc": 0.84, "seconds": 12.0},
            {"epoch": 2, "phase": "train", "loss": 0.38, "train_acc": 0.86, "val_acc": 0.88, "seconds": 11.5},
            {"epoch": 1, "phase": "finetune", "loss": 0.31, "train_acc": 0.89, "val_acc": 0.90, "seconds": 12.2},
        ],
        sparsity={"features.0.weight": 0.21, "features.3.weight": 0.48, "classifier.1.weight": 0.52},
        flow=[FlowStage("Original data input", "60000 images × 28 × 28 × 1", "Load IDX files",
                        "54000 train / 6000 val / 10000 test", "")] * 7,
        stages=[
            StageResult("fp32", 0.9123, 968_000, 897_000, 0.0715, "onnxruntime"),
            StageResult("pruned fp32 (50 %)", 0.9101, 968_000, 520_000, 0.0712, "onnxruntime"),
            StageResult("int8 ONNX", 0.9098, 264_000, 168_000, 0.0445, "onnxruntime"),
            StageResult("int8 TFLite", 0.9090, 250_000, 160_000, 0.0243, "litert"),
        ],
        bundle={"archive_bytes": 121_000, "key_id": "abcd"},
        timings_s={"train": 24.0},
    )


def test_report_writes_markdown_json_and_pngs(tmp_path: Path) -> None:
    paths = write_report(sample_record(), tmp_path)
    assert set(paths) == {"training", "stages", "sparsity", "json", "markdown"}
    for key in ("training", "stages", "sparsity"):
        data = paths[key].read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000  # a real plot, not an empty canvas
    doc = json.loads(paths["json"].read_text())
    assert doc["stages"][2]["accuracy"] == 0.9098 and doc["history"][2]["phase"] == "finetune"
    md = paths["markdown"].read_text()
    for image in ("training.png", "stages.png", "sparsity.png"):
        assert f"]({image})" in md
    assert load_record(paths["json"]) == sample_record()  # report.json is the complete record


def test_markdown_reproduces_the_reference_tables_with_real_numbers() -> None:
    md = render_markdown(sample_record())
    assert "Model size reduced from 945.3 KiB to 118.2 KiB" in md and "8.0× smaller" in md
    assert "| 7 | Original data input | 60000 images × 28 × 28 × 1 |" in md
    assert "| 2 | train | 0.3800 | 0.8600 | 0.8800 | 11.5 |" in md  # epoch trace
    assert "| int8 TFLite | litert | 0.9090 | 244.1 KiB | 156.2 KiB | 24.3 µs |" in md
    assert "| classifier.1.weight | 52.0 % |" in md
    assert "int8 ONNX 90.98 % (-0.03 points vs pruned fp32 (50 %))" in md


def test_report_without_sparsity_or_bundle_still_renders(tmp_path: Path) -> None:
    record = sample_record()
    record.sparsity, record.bundle = {}, {}
    paths = write_report(record, tmp_path)
    assert "sparsity" not in paths
    assert "Model size reduced" not in paths["markdown"].read_text()
