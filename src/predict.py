"""Classify images with a trained model:

    python -m src.predict path/to/image.jpg
    python -m src.predict path/to/folder --model models/final.keras
    python -m src.predict photo.png --model models:/image-classifier/1

`--model` is a `.keras` file (default: the pipeline's final model; class names from the
`classes.json` beside it) or an MLflow model URI (`runs:/<id>/model`,
`models:/<name>/<version>`, classes from the model's metadata), resolved against the
tracking store configured in params.yaml.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from src.config import load_params, resolve_path
from src.prepare import IMAGE_SUFFIXES, load_rgb, natural_key


def image_files(target: Path) -> list[Path]:
    """The image itself, or the images under a folder (recursively, in natural order)."""
    if target.is_file():
        return [target]
    if target.is_dir():
        files = [p for p in target.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        return sorted(files, key=lambda p: natural_key(str(p.relative_to(target))))
    raise FileNotFoundError(f"{target} is neither an image nor a folder")


def load_model(spec: str | None) -> tuple[object, list[str]]:
    """(Keras model, class names) from a .keras path or an MLflow model URI."""
    import keras

    if spec is None or ":/" not in spec:
        path = Path(spec) if spec else resolve_path(load_params().paths.models) / "final.keras"
        classes_file = path.with_name("classes.json")  # train_head writes it beside the models
        for needed in (path, classes_file):
            if not needed.is_file():
                raise FileNotFoundError(f"{needed} not found: run `dvc repro` first or pass --model")
        return keras.saving.load_model(path), json.loads(classes_file.read_text())
    import mlflow

    from src import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri(load_params()))
    model = mlflow.tensorflow.load_model(spec)
    classes = mlflow.models.get_model_info(spec).metadata["classes"]
    return model, classes


def predict(model, classes: list[str], files: list[Path], batch_size: int = 32) -> list[dict]:
    """Class and probability for each image file."""
    from src.models import probabilities

    size = model.input_shape[1]
    results = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        batch = np.stack([load_rgb(f, size) for f in chunk]).astype(np.float32)
        probs = probabilities(model.predict(batch, verbose=0))
        for path, p in zip(chunk, probs):
            best = int(p.argmax())
            results.append({"path": str(path), "class": classes[best], "probability": float(p[best])})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.predict", description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path, help="an image file or a folder of images")
    parser.add_argument("--model", help="a .keras file or an MLflow model URI (default: models/final.keras)")
    args = parser.parse_args(argv)
    try:
        files = image_files(args.target)
        if not files:
            raise FileNotFoundError(f"no images under {args.target}")
        model, classes = load_model(args.model)
    except (FileNotFoundError, KeyError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for row in predict(model, classes, files):
        print(f"{row['path']}\t{row['class']}\t{row['probability']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
