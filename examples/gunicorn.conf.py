"""gunicorn settings for serving a model with inferscope: one /metrics for every worker.

    gunicorn -c examples/gunicorn.conf.py 'myservice:app'

Workers are recycled after ``max_requests`` calls (a leak then costs a restart, not an outage);
what a recycled worker had counted stays in the scrape, so counters never go back. The master
serves the merged metrics of all workers on port 9464 (``INFERSCOPE_PROMETHEUS_PORT``): it is
never recycled, so the endpoint never moves. For an ASGI app (FastAPI), add
``-k uvicorn_worker.UvicornWorker``, or mount ``inferscope.make_asgi_app()`` in the app instead
(examples/fastapi_prometheus.py). See docs/multiprocess.md.
"""

import os

bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "4"))
max_requests = int(os.environ.get("MAX_REQUESTS", "1000"))
max_requests_jitter = max_requests // 10
graceful_timeout = 10

# The workers publish their aggregates to shared memory. Set here, gunicorn exports it to the master
# and to every worker, including those it starts later.
raw_env = ["INFERSCOPE_MULTIPROCESS=true"]


def when_ready(server):
    """In the master, once it listens: serve every worker's metrics, merged, on one port.

    The master exports no OTLP itself: a worker forked while it had an OTLP/gRPC export in flight
    could not use gRPC (docs/deploy.md). The workers export their own, from the environment.
    """
    import inferscope

    inferscope.configure(
        multiprocess=True,
        metrics_exporters=["prometheus"],
        prometheus_host=os.environ.get("INFERSCOPE_PROMETHEUS_HOST", "127.0.0.1"),
        prometheus_port=int(os.environ.get("INFERSCOPE_PROMETHEUS_PORT", "9464")),
    )
