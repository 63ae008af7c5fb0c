"""vLLM's engine behind sagellm's EngineClient (ENGINE=vllm): build.build_vllm makes a
VllmEngineClient (client.py) over vLLM's AsyncLLM (engine.py), whose request outputs become our
TokenEvents (request.py); params.py maps SamplingParams, args.py the settings.

Import the submodules directly; they import vLLM only inside functions, so importing them does
nothing and sagellm stays importable where vLLM is not installed.
"""
