"""Resolving and loading the model: HF_MODEL_ID, /opt/ml/model, or the bundled default."""

from sagellm.model.loader import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]
