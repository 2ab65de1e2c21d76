"""The trainer's Prometheus endpoint, so Grafana shows training beside serving.

Metric names are a contract with the dashboard: change them only together.
"""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector, start_http_server

from trainer.checkpoints import Progress


class TrainingMetrics:
    def __init__(self, port: int, start: Progress):
        self.registry = CollectorRegistry()
        r = self.registry
        self.loss = Gauge("gpt_train_loss", "Training loss of the latest logged step", registry=r)
        self.val_loss = Gauge("gpt_val_loss", "Validation loss of the latest evaluation", registry=r)
        self.best_val_loss = Gauge(
            "gpt_train_best_val_loss", "Lowest validation loss so far (best_model.pt)", registry=r
        )
        self.lr = Gauge("gpt_train_learning_rate", "Learning rate of the latest step", registry=r)
        self.tokens_per_second = Gauge("gpt_train_tokens_per_second", "Training throughput, all processes", registry=r)
        self.grad_norm = Gauge("gpt_train_grad_norm", "Gradient norm before clipping", registry=r)
        self.step = Gauge("gpt_train_step", "Optimizer steps completed", registry=r)
        self.tokens = Counter("gpt_train_tokens", "Tokens trained on, resumed runs included", registry=r)
        self.checkpoints = Counter(
            "gpt_train_checkpoints", "Checkpoints written, by file", ["kind"], registry=r
        )
        for kind in ("best", "last", "final"):
            self.checkpoints.labels(kind=kind)
        # Memory and CPU of the trainer, beside the service's processes on the dashboard.
        ProcessCollector(registry=r)
        # NaN, not 0, until known: a dashboard shows a gap rather than a perfect loss.
        for gauge, value in ((self.loss, start.loss), (self.val_loss, start.val_loss),
                             (self.best_val_loss, start.best_loss)):
            gauge.set(math.nan if value is None else value)
        self.step.set(start.step)
        self.tokens.inc(start.tokens)
        self._server, _ = start_http_server(port, registry=r)
        self.port = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
