"""Stage `extract`: run the frozen conv base once over every split and cache its features.

Batches stream from the memory-mapped prepared images through `tf.data`; features are
written into a memory-mapped `.npy` file batch by batch, so memory does not grow with the
dataset. A model trained from scratch has no conv base: then nothing is extracted and
`train_head` trains the whole network on the images (the folder holds only `info.json`).
"""

from __future__ import annotations

import json
import logging
import shutil

from omegaconf import DictConfig

from src.config.checks import is_pretrained
from src.config.paths import resolve_path
from src.data import arrays
from src.fitting import precision
from src.models import networks
from src.outputs import folders
from src.stages import reuse, stage

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


@stage.reads(
    "model", "dataset.image_size", "train.batch_size", "train.precision",
    "paths.prepared", "paths.features", "paths.cache",
)  # fmt: skip
def run(cfg: DictConfig) -> dict:
    """Extract features of train/val/test with the configured backbone."""
    final = resolve_path(cfg.paths.features)
    out_dir = folders.staging_dir(final)
    info: dict = {
        "model": cfg.model.name,
        "pretrained": is_pretrained(cfg),
        "splits": {},
        "cache_key": reuse.stage_key(cfg, "extract"),
    }
    if is_pretrained(cfg):
        info["precision"] = precision.use(cfg.train.precision)  # before the base is built
        base = networks.conv_base(cfg.model, cfg.dataset.image_size)
        preprocess = networks.preprocessing(cfg.model)
        prepared = arrays.prepared_dir(cfg)
        for split in SPLITS:
            images, labels = arrays.load_images(cfg, split)
            shape = networks.predict_to_file(
                base, preprocess, images, cfg.train.batch_size, out_dir / f"features_{split}.npy"
            )
            shutil.copyfile(prepared / f"labels_{split}.npy", out_dir / f"labels_{split}.npy")
            info["splits"][split] = {"images": len(images), "feature_shape": list(shape[1:])}
            log.info("%s: features %s", split, shape)
        info["feature_shape"] = list(base.output_shape[1:])
    else:
        log.info("%s trains from scratch: no conv base, nothing to extract", cfg.model.name)
    (out_dir / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    folders.replace_dir(out_dir, final)
    return info


if __name__ == "__main__":
    stage.main("extract", run, tensorflow=True)
