"""Export the final model for devices: `python -m src.export`, the same as the DVC stage `export`
(`dvc repro export`): reads params.yaml, writes `models/export/` and `reports/export.json`. What
it writes and measures: src/stages/export.py. Classify images with an exported file:
`python -m src.predict photo.jpg --model models/export/model_int8.tflite`."""

from src.stages import export, stage

if __name__ == "__main__":
    stage.main("export", export.run, tensorflow=True)
