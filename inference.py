"""SageMaker's handler contract for sagellm: model_fn / input_fn / predict_fn / output_fn.

The defaults live in the package (sagellm/api/sagemaker_hooks.py, which says what each does);
this file re-exports them so that a model's own `code/inference.py` can `import inference` and
call them, e.g. `inference.predict_fn(data, inference.sagellm_context())`.
"""

from sagellm.api.sagemaker_hooks import input_fn, model_fn, output_fn, predict_fn, sagellm_context

__all__ = ["model_fn", "input_fn", "predict_fn", "output_fn", "sagellm_context"]
