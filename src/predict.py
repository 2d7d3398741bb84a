"""Classify images with a trained model:

    python -m src.predict path/to/image.jpg
    python -m src.predict path/to/folder other.png more/ --model models/final.keras
    python -m src.predict photo.png --model models:/image-classifier@champion
    python -m src.predict photo.png --model models/export/model_int8.tflite

`--model` is a `.keras` file (default: the pipeline's final model; class names from the
`classes.json` beside it), an exported `.onnx` or `.tflite` file (`dvc repro export`; class names
from its side-car JSON), or an MLflow model URI (`runs:/<id>/model`,
`models:/<name>/<version>`, `models:/<name>@<alias>`; classes from the model's metadata),
resolved against the tracking store configured in params.yaml. Of an MLflow model the Keras
network is loaded: its `keras` flavor (what `src.tracking` logs and registers), or the
`tensorflow` flavor of models registered before that.

When the evaluate stage fitted a temperature (`evaluate.temperature_scaling`), the
probabilities are calibrated with it: from the `temperature.json` beside a `.keras` file, or,
for an MLflow model, from its metadata or the `temperature` metric of the run that logged it.
The class is the same either way; a note on stderr names the temperature applied.

`--views N` averages each image's probabilities with those of N augmented views of it, drawn by
the model's own augmentation block (test-time augmentation, as `evaluate.tta_views` measures it);
for a Keras model trained with augmentation. The temperature, fitted on single views, is then
not applied.

Takes any number of image files and folders. Prints `path<TAB>class<TAB>probability` for each
readable image. Files that cannot be decoded
are listed on stderr (`skipped <path>: <reason>`) and the others still classified; under a
folder, hidden files (`.DS_Store`, `._x.jpg`) and non-image suffixes are left out. Exit status:
0 when at least one image was classified, 1 when none could be read, 2 for a missing target
or a model that cannot be loaded (before any image is read)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from src.errors import ConfigError
from src.evaluation.views import augmentation_block
from src.exporting.device import read_classes
from src.exporting.runtimes import EXPORTED_SUFFIXES, ExportedModel
from src.images.decode import IMAGE_SUFFIXES
from src.outputs import console
from src.serving.loading import ModelError, image_files, load_model, load_temperature, predict


def exported_model(path: Path) -> tuple[ExportedModel, list[str], None]:
    """An exported ONNX or LiteRT file and its classes (its side-car JSON); no temperature: the
    exported model gives the probabilities it was trained to give."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; export the model first (dvc repro export)")
    try:
        return ExportedModel(path), read_classes(path), None
    except (ValueError, RuntimeError) as err:  # the runtime's own errors for what is not a model
        raise ModelError(f"{path}: not an exported model the runtime can load ({err})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.predict", description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="+", type=Path, metavar="target", help="image files and folders")
    parser.add_argument("--model", help="a .keras file or an MLflow model URI (default: models/final.keras)")
    parser.add_argument(
        "--views",
        type=int,
        default=0,
        choices=range(0, 65),
        metavar="N",
        help="average each image with N augmented views (0-64; a Keras model trained with augmentation)",
    )
    args = parser.parse_args(argv)
    console.setup_logging()
    files: list[Path] = []
    try:
        for target in args.targets:
            found = image_files(target)
            if not found:
                raise FileNotFoundError(f"no image files under {target} ({' '.join(sorted(IMAGE_SUFFIXES))})")
            files += [path for path in found if path not in files]
            left_out = sum(p.is_file() for p in target.rglob("*")) - len(found) if target.is_dir() else 0
            if left_out:
                print(f"note: left out {left_out} hidden or non-image files under {target}", file=sys.stderr)
        console.start_tensorflow()
        if args.model and Path(args.model).suffix in EXPORTED_SUFFIXES:  # an exported file
            model, classes, temperature = exported_model(Path(args.model))
        else:
            model, classes = load_model(args.model)
            temperature = load_temperature(args.model)
        if args.views and augmentation_block(model) is None:
            raise ModelError(
                f"--views needs a Keras model with an augmentation block; {args.model or 'the final model'} "
                "has none (exported files never do, and a model trained with every augment.* off has none); "
                "leave out --views"
            )
    except (FileNotFoundError, ModelError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if temperature is not None and args.views:
        note = f"note: temperature {temperature:.4g} not applied: it was fitted on single views"
        print(note, file=sys.stderr)
        temperature = None
    if temperature is not None:
        print(f"note: probabilities calibrated with temperature {temperature:.4g}", file=sys.stderr)
    skipped: list[tuple[Path, str]] = []
    rows = predict(model, classes, files, skipped=skipped, temperature=temperature, views=args.views)
    for row in rows:
        print(f"{row['path']}\t{row['class']}\t{row['probability']:.4f}")
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if not rows:
        print(f"error: no image could be read ({len(files)} tried)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
