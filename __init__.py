"""stagemesh: serve language models too large for one GPU as a mesh of gRPC services.

`from stagemesh import LLM, SamplingParams` is the offline API (llm.py); it is imported on first use, so
the services and the CLI, which import this package too, start without it.
"""

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str):
    if name in __all__:
        from stagemesh import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'stagemesh' has no attribute {name!r}")
