"""Custom SageMaker handlers: /opt/ml/model/code/inference.py overriding the defaults
(sagellm/api/sagemaker_hooks.py) of model_fn / input_fn / predict_fn / output_fn."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

from sagellm.api import sagemaker_hooks as defaults
from sagellm.api.responses import RawResponse, StreamResponse
from sagellm.errors import GenerationError, ModelLoadError, SagellmError

log = logging.getLogger("sagellm")

HOOKS = ("model_fn", "input_fn", "predict_fn", "output_fn")


class Handlers:
    """The four hooks, each the user's when their code/inference.py defines it, else ours."""

    def __init__(self, model_dir: str, ctx):
        defaults.set_context(ctx)
        self.user_path = Path(model_dir) / "code" / "inference.py"
        user = self._load_user() if self.user_path.is_file() else None
        self.overridden = [h for h in HOOKS if user is not None and callable(getattr(user, h, None))]
        for hook in HOOKS:
            setattr(self, hook, getattr(user, hook) if hook in self.overridden else getattr(defaults, hook))
        if self.overridden:
            log.info("custom handlers from %s: %s", self.user_path, ", ".join(self.overridden))
        try:
            self.model = self.model_fn(model_dir)
        except Exception as exc:
            raise ModelLoadError(f"model_fn in {self.user_path} failed: {type(exc).__name__}: {exc}") from exc

    @property
    def active(self) -> bool:
        """Only user code changes /invocations; the defaults are what it does anyway."""
        return bool(self.overridden)

    def _load_user(self):
        spec = importlib.util.spec_from_file_location("sagellm_user_inference", self.user_path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(self.user_path.parent))  # its own helper modules, as SageMaker allows
        # The user's file is itself named inference.py, and its folder now comes first on sys.path:
        # its `import inference` must still mean sagellm's defaults (what the top-level
        # inference.py re-exports), not the file again.
        sys.modules.setdefault("inference", defaults)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise ModelLoadError(f"could not import {self.user_path}: {type(exc).__name__}: {exc}") from exc
        return module

    def invoke(self, ctx, body: bytes, content_type: str, accept: str) -> RawResponse | StreamResponse:
        # With our model_fn, use this request's context (it notices client disconnects).
        model = self.model if "model_fn" in self.overridden else ctx
        try:
            data = self.input_fn(body, content_type)
            prediction = self.predict_fn(data, model)
            if isinstance(prediction, StreamResponse):
                return prediction
            out = self.output_fn(prediction, accept)
        except SagellmError:
            raise
        except Exception as exc:  # the user's code: say where, never send the traceback
            log.exception("custom handler failed")
            raise GenerationError(f"custom handler in {self.user_path} failed: {type(exc).__name__}: {exc}") from None
        body_out, mime = out if isinstance(out, tuple) else (out, accept or "application/json")
        if not isinstance(body_out, (bytes, str)):
            body_out = str(body_out)
        return RawResponse(body_out, mime if mime and mime != "*/*" else "application/json")
