"""vLLM's engine behind sagellm's engine contract (ENGINE=vllm): the same RequestHandle and
TokenEvent stream as sagellm's own engine, so the API layer runs on either unchanged.

Import the submodules directly; they import vLLM only inside functions, so importing them does
nothing and sagellm stays importable where vLLM is not installed.
"""
