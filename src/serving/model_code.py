"""What MLflow runs to rebuild the registered classifier ("models from code"): the model is
this code, logged with it, not a pickled object, so loading it executes nothing but the
project's own `src` code that ships in the model folder."""

from mlflow.models import set_model

from src.serving.pyfunc_model import ImageClassifier

set_model(ImageClassifier())
