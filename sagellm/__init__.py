"""sagellm: an LLM inference container for Amazon SageMaker."""

__version__ = "0.1.0"
