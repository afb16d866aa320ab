"""Detection engines behind ``fusarbatch run --engine`` (issue 9): the FUSAR-GPT model (``model``, the
default) and a classical two-parameter CFAR ship detector (``cfar``, :mod:`fusarbatch.engines.cfar`)."""
