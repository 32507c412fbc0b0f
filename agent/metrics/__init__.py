"""Prometheus metrics (text format 0.0.4, ``prometheus_client``): ``GET /v1/metrics`` and ``[metrics] listen``.

What is counted, and where (docs/metrics.md lists every metric and its labels):

* events are counted where they happen, through small hooks: a request answered (the server), a signature on
  the token (the audited signer), a request to a bank and how it ended (the bank transport's observer), a token
  cache lookup (the token client). Labels come from the code or the configuration only: operation names from
  the :class:`~agent.operations.spec.Operation` enum, HTTP statuses the agent answers, bank names and key
  aliases from the configuration, error class names from the code; never a path, scope or anything else a
  caller chose, so the number of series is bounded by the configuration.
* state is read from the live objects (session pool, audit trail, certificates) by :mod:`agent.metrics.sampler`.

Several serving processes (``[daemon] processes`` > 1) share one view: prometheus_client's multiprocess mode,
each process writing its values to memory-mapped files in a private directory (mode 0700, made by the supervisor
before it forks, removed when it stops), and a scrape, in whichever process it lands, reading them all. Chosen
over the supervisor gathering each process's numbers at scrape time because that needs a request/answer
protocol to every serving process on the path of every scrape, and a process stuck in a hung HSM call would
then stall or blank the scrape exactly when it matters; a file is read whatever its writer is doing. The cost
is on the hot path: 3.1 µs of CPU per signing request instead of 1.5 µs in memory (docs/metrics.md).

Modules: :mod:`~agent.metrics.instruments` (the metrics, their hooks, the scrape), :mod:`~agent.metrics.sampler`
(the state), :mod:`~agent.metrics.settings` (``[metrics]``), :mod:`~agent.metrics.listener` (the TCP port).
Nothing is imported here: prometheus_client costs ~40 ms to import, which a CLI command that shows no metrics
does not pay.
"""

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the text exposition format's
