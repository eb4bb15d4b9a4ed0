"""The engine of one worker: requests in, tokens out.

llm_engine.py (the step loop: add, abort, step, stream) drives scheduler.py (continuous
batching over the KV block manager, ints and lists only), runner.py (the step as tensors
through the model), sampler.py and detokenizer.py; async_engine.py runs the loop on a
thread for asyncio callers. request.py, sampling_params.py and outputs.py are the data
that flows through it.
"""
