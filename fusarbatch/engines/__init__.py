"""Engines behind ``fusarbatch run --engine``: ``hf`` (FUSAR-GPT through transformers ``generate``,
:class:`fusarbatch.model.FusarGPT`, the default) and ``vllm`` (FUSAR-GPT's vision side in PyTorch, the
language model served by vLLM, :mod:`fusarbatch.engines.vllm_engine`; optional extra ``fusarbatch[vllm]``).
Both answer a worker's tiles through ``generate_tiles(images, anchors, prompts, max_new_tokens=,
batch_size=)``."""
