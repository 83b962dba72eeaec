"""``mops-serve``: one pruned base and one MoPs adapter behind an OpenAI-compatible HTTP API.

Built on :func:`mops.load` and :class:`mops.injection.PromptedLM`; nothing in the rest of
the toolkit imports this package. The parts:

- :mod:`~mops.serve.engine` -- continuous batching on one engine thread (requests of
  different tasks share steps, each with its own gate weights, sampling and stops);
- :mod:`~mops.serve.kv_slots`, :mod:`~mops.serve.decode_attention`,
  :mod:`~mops.serve.batch_shapes` -- per-row keys and values, and a decode step whose
  arithmetic for a row does not depend on the rows beside it;
- :mod:`~mops.serve.sampling`, :mod:`~mops.serve.text_stream` -- per-row token choice,
  incremental detokenization and stop strings;
- :mod:`~mops.serve.schemas`, :mod:`~mops.serve.chat`, :mod:`~mops.serve.errors`,
  :mod:`~mops.serve.app`, :mod:`~mops.serve.metrics` -- the HTTP API (FastAPI), request
  validation, OpenAI-style errors, Prometheus metrics;
- :mod:`~mops.serve.cli` -- the ``mops-serve`` command.
"""
